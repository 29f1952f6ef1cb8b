"""LoRAs applied at run time: outputs equal a model whose weights were merged by hand, and
detaching restores the base outputs exactly."""

import pytest
import torch

from helpers import lora_test_dit, rel_err, run_lora_probe
from wan.lora.apply import LoraRuntime, LoraUse
from wan.lora.schedule import parse_multiplier

TARGETS = ("blocks.0.self_attn.q", "blocks.1.ffn.0", "blocks.1.cross_attn.o")


def Const(v):  # noqa: N802 - reads like the multiplier it builds
    return parse_multiplier(str(v))


def PerStep(values):  # noqa: N802
    return parse_multiplier(",".join(str(v) for v in values))


@pytest.fixture()
def model():
    return lora_test_dit()


run = run_lora_probe


def lora_file(kind, shapes, seed=0):
    from wan.lora.formats import LoraFile, LoraWeights
    g = torch.Generator().manual_seed(seed)
    targets = {}
    for name, (out_f, in_f) in shapes.items():
        r = 4
        if kind == "lora":
            w = LoraWeights(kind="lora", down=torch.randn(r, in_f, generator=g) * 0.1,
                            up=torch.randn(out_f, r, generator=g) * 0.1, alpha=2.0,
                            diff_b=torch.randn(out_f, generator=g) * 0.01)
        elif kind == "lora+diff":  # a low-rank pair that also carries a full .diff (some distillation LoRAs)
            w = LoraWeights(kind="lora", down=torch.randn(r, in_f, generator=g) * 0.1,
                            up=torch.randn(out_f, r, generator=g) * 0.1, alpha=2.0,
                            diff=torch.randn(out_f, in_f, generator=g) * 0.01)
        elif kind == "full":
            w = LoraWeights(kind="full", diff=torch.randn(out_f, in_f, generator=g) * 0.01)
        elif kind == "loha":
            w = LoraWeights(kind="loha", w1a=torch.randn(out_f, r, generator=g) * 0.1,
                            w1b=torch.randn(r, in_f, generator=g) * 0.1, w2a=torch.randn(out_f, r, generator=g) * 0.1,
                            w2b=torch.randn(r, in_f, generator=g) * 0.1, alpha=4.0)
        elif kind == "dora":
            w = LoraWeights(kind="lora", down=torch.randn(r, in_f, generator=g) * 0.1,
                            up=torch.randn(out_f, r, generator=g) * 0.1, alpha=4.0,
                            dora_scale=torch.rand(out_f, generator=g) + 0.5)
        targets[name] = w
    return LoraFile(path="test", format="comfy", targets=targets, metadata={}, dropped=[])


def shapes_of(model):
    mods = dict(model.named_modules())
    return {n: (mods[n].out_features, mods[n].in_features) for n in TARGETS}


def merged_by_hand(model, lora, mult):
    """A copy of the model with W + mult * delta (and the DoRA rescale) written into its weights."""
    import copy
    m = copy.deepcopy(model)
    mods = dict(m.named_modules())
    with torch.no_grad():
        for name, w in lora.targets.items():
            lin = mods[name]
            W = lin.weight.double()
            if w.kind == "lora":
                delta = (w.up.double() @ w.down.double()) * (w.alpha / w.down.shape[0])
                if w.diff is not None:
                    delta = delta + w.diff.double()
            elif w.kind == "loha":
                delta = (w.w1a.double() @ w.w1b.double()) * (w.w2a.double() @ w.w2b.double()) * (w.alpha / w.w1b.shape[0])
            else:
                delta = w.diff.double()
            W = W + mult * delta
            if w.dora_scale is not None:
                W = w.dora_scale.double().reshape(-1, 1) * W / W.norm(dim=1, keepdim=True)
            lin.weight.copy_(W.float())
            if w.diff_b is not None:
                lin.bias.add_(mult * w.diff_b)
    return m


@pytest.mark.parametrize("kind", ["lora", "lora+diff", "full", "loha", "dora"])
def test_runtime_lora_equals_hand_merge_and_detach_restores(model, kind):
    """Includes blocks.1.ffn.0, whose fused matmul + GELU must step aside for the LoRA's hook."""
    base = run(model)
    lora = lora_file(kind, shapes_of(model))
    expected = run(merged_by_hand(model, lora, 0.8))  # before attaching: a copy would take the hooks along
    rt = LoraRuntime([LoraUse(lora, Const(0.8))])
    rt.attach(model)
    assert set(rt.attached) == set(TARGETS)
    out = run(model)
    assert rel_err(out, expected) <= 1e-5
    assert rel_err(out, base) > 1e-4  # the LoRA does something
    rt.detach()
    assert torch.equal(run(model), base)


def test_multiplier_changes_per_step_and_filters_apply(model):
    lora = lora_file("lora", shapes_of(model))
    rt = LoraRuntime([LoraUse(lora, PerStep([1.0, 0.0]), allow=lambda n: "ffn" not in n)])
    rt.attach(model)
    assert "blocks.1.ffn.0" not in rt.attached
    rt.set_step(0, 4)
    first = run(model)
    rt.set_step(3, 4)
    assert rt.multipliers() == [0.0]
    rt.detach()
    base = run(model)
    rt.attach(model)
    rt.set_step(3, 4)
    assert torch.equal(run(model), base)  # multiplier 0: exactly the base
    rt.set_step(0, 4)
    assert torch.equal(run(model), first)
    rt.detach()
