"""LoRAs merged into the weights: outputs equal the hook path, detaching restores every parameter
bit for bit, schedules re-merge only when the value changes, quantised layers keep hooks."""

import copy

import pytest
import torch
from safetensors.torch import save_file

from helpers import lora_test_dit, rel_err, run_lora_probe
from wan.lora.apply import LoraRuntime, LoraUse
from wan.lora.formats import load_lora
from wan.lora.schedule import parse_multiplier

# (module, out, in): square attention layers and the non-square FFN input
TARGETS = (("blocks.0.self_attn.q", 64, 64), ("blocks.1.ffn.0", 96, 64), ("blocks.1.cross_attn.o", 64, 64))
TOL = 1e-5  # merge vs hooks: float32, the same maths in another order (measured ~1e-7)
KINDS = ("lora", "loha", "lokr", "dora", "diff")


@pytest.fixture()
def model():
    return lora_test_dit()


run = run_lora_probe


def lora_state(kind: str, seed: int = 0, r: int = 4) -> dict[str, torch.Tensor]:
    """Tensors of one LoRA file in public key layouts: ComfyUI names for LoRA/DoRA/diff, musubi
    (LyCORIS) names for LoHa/LoKr."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=0.1):
        return torch.randn(*shape, generator=g) * s
    state = {}
    for name, out_f, in_f in TARGETS:
        comfy, musubi = f"diffusion_model.{name}", "lora_unet_" + name.replace(".", "_")
        if kind in ("lora", "dora"):
            state |= {f"{comfy}.lora_A.weight": rnd(r, in_f), f"{comfy}.lora_B.weight": rnd(out_f, r),
                      f"{comfy}.alpha": torch.tensor(2.0)}
            if kind == "dora":
                state[f"{comfy}.dora_scale"] = torch.rand(out_f, 1, generator=g) + 0.5
            else:
                state[f"{comfy}.diff_b"] = rnd(out_f, s=0.01)
        elif kind == "loha":
            state |= {f"{musubi}.hada_w1_a": rnd(out_f, r, s=0.3), f"{musubi}.hada_w1_b": rnd(r, in_f, s=0.3),
                      f"{musubi}.hada_w2_a": rnd(out_f, r, s=0.3), f"{musubi}.hada_w2_b": rnd(r, in_f, s=0.3),
                      f"{musubi}.alpha": torch.tensor(4.0)}
        elif kind == "lokr":  # kron([4, 4], [out/4, r] @ [r, in/4])
            state |= {f"{musubi}.lokr_w1": rnd(4, 4, s=0.3), f"{musubi}.lokr_w2_a": rnd(out_f // 4, r, s=0.3),
                      f"{musubi}.lokr_w2_b": rnd(r, in_f // 4, s=0.3), f"{musubi}.alpha": torch.tensor(2.0)}
        else:  # distillation-style full deltas, also on a norm (merged in both modes)
            state |= {f"{comfy}.diff": rnd(out_f, in_f, s=0.01), f"{comfy}.diff_b": rnd(out_f, s=0.01)}
    if kind == "diff":
        state["diffusion_model.blocks.0.norm3.diff"] = rnd(64, s=0.05)
    return state


def write_lora(tmp_path, kind, seed=0):
    path = tmp_path / f"{kind}_{seed}.safetensors"
    save_file(lora_state(kind, seed), str(path))
    return load_lora(path)


def snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def assert_bit_identical(m, before):
    after = m.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(after[k], before[k])]
    assert not changed, f"parameters not restored: {changed}"


def merged_by_hand(model, lora, mult):
    """A copy of ``model`` with W + mult * delta written in float64, then the DoRA rescale
    ``magnitude * W / ||W||`` per output row: a reference independent of wan.lora.merge."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, w in lora.targets.items():
            layer = m.get_submodule(name)
            weight = layer.weight.double()
            weight = weight + mult * w.delta(tuple(weight.shape)).double()
            if w.dora_scale is not None:
                weight = w.dora_scale.double().reshape(-1, 1) * weight / weight.norm(dim=1, keepdim=True)
            layer.weight.copy_(weight.float())
            if w.diff_b is not None:
                layer.bias.copy_((layer.bias.double() + mult * w.diff_b.double()).float())
    return m


def output_with(model, uses, mode, steps=None):
    """Output of ``model`` with the LoRAs attached in ``mode`` (at each step of ``steps`` if given)."""
    rt = LoraRuntime(uses, mode=mode)
    rt.attach(model)
    try:
        if steps is None:
            return run(model), rt
        outs = []
        for i in range(steps):
            rt.set_step(i, steps)
            outs.append(run(model))
        return outs, rt
    finally:
        rt.detach()


@pytest.mark.parametrize("kind", KINDS)
def test_merge_equals_hooks_and_unmerge_is_bit_exact(model, tmp_path, kind):
    lora = write_lora(tmp_path, kind)
    base, before = run(model), snapshot(model)
    by_hand = run(merged_by_hand(model, lora, 0.8))
    hooked, _ = output_with(model, [LoraUse(lora, parse_multiplier("0.8"))], "hooks")
    rt = LoraRuntime([LoraUse(lora, parse_multiplier("0.8"))], mode="merge")
    rt.attach(model)
    linears = {n for n, _, _ in TARGETS}
    assert set(rt.merged) >= linears and not rt.hooked
    assert not any(m._forward_hooks for m in model.modules())  # merged: nothing added at run time
    merged = run(model)
    rt.detach()
    assert rel_err(merged, hooked) <= TOL
    assert rel_err(merged, by_hand) <= TOL
    assert rel_err(merged, base) > 1e-4  # the LoRA does something
    assert_bit_identical(model, before)
    assert torch.equal(run(model), base)


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merge_in_row_pieces_equals_hooks(model, tmp_path, monkeypatch, kind):
    """On the CPU large weights are merged a few rows at a time; 5 rows per piece here, so every
    target (64 or 96 rows, ragged last piece included) is cut up."""
    import wan.lora.merge as merge
    monkeypatch.setattr(merge, "_CPU_CHUNK_VALUES", 5 * 64)
    lora = write_lora(tmp_path, kind)
    ffn = model.blocks[1].ffn[0].weight  # [96, 64]: 20 pieces
    assert len(merge._row_chunks(ffn, [merge.Term(lora.targets["blocks.1.ffn.0"], 0)])) == 20
    uses = [LoraUse(lora, parse_multiplier("0.8"))]
    before = snapshot(model)
    hooked, _ = output_with(model, uses, "hooks")
    merged, _ = output_with(model, uses, "merge")
    assert rel_err(merged, hooked) <= TOL
    assert_bit_identical(model, before)


def test_two_loras_with_filters_merge_like_hooks(model, tmp_path):
    """A DoRA LoRA and a plain one on the same layers; the plain one kept off the FFN."""
    uses = [LoraUse(write_lora(tmp_path, "dora", 1), parse_multiplier("0.7")),
            LoraUse(write_lora(tmp_path, "lora", 2), parse_multiplier("-0.5"), allow=lambda n: "ffn" not in n)]
    before = snapshot(model)
    hooked, _ = output_with(model, uses, "hooks")
    merged, _ = output_with(model, uses, "merge")
    assert rel_err(merged, hooked) <= TOL
    only_dora, _ = output_with(model, uses[:1], "merge")
    assert rel_err(merged, only_dora) > 1e-4
    assert_bit_identical(model, before)


def test_schedule_remerges_only_at_the_switch_step(model, tmp_path):
    lora = write_lora(tmp_path, "lora")
    before = snapshot(model)
    steps = 4  # "1.0,0.5" over 4 steps: 1.0 1.0 0.5 0.5
    hooked, _ = output_with(model, [LoraUse(lora, parse_multiplier("1.0,0.5"))], "hooks", steps)
    rt = LoraRuntime([LoraUse(lora, parse_multiplier("1.0,0.5"))], mode="merge")
    rt.attach(model)
    n = len(rt.merged)
    writes, outs = [rt.merge_writes], []
    for i in range(steps):
        rt.set_step(i, steps)
        writes.append(rt.merge_writes)
        outs.append(run(model))
    rt.detach()
    assert writes == [n, n, n, 2 * n, 2 * n]  # merged at attach, again at step 2 only
    for ours, ref in zip(outs, hooked, strict=True):
        assert rel_err(ours, ref) <= TOL
    assert rel_err(outs[0], outs[2]) > 1e-4
    assert_bit_identical(model, before)


def test_zero_multiplier_writes_the_original_back_exactly(model, tmp_path):
    lora = write_lora(tmp_path, "dora")
    base = run(model)
    outs, _ = output_with(model, [LoraUse(lora, parse_multiplier("1,0"))], "merge", steps=2)
    assert torch.equal(outs[1], base)


def test_quantised_layer_keeps_hooks_with_a_notice(model, tmp_path):
    from wan.layers.quant import QuantLinear
    attn = model.blocks[0].self_attn
    attn.q = QuantLinear.from_linear(attn.q, "int8")
    lora = write_lora(tmp_path, "lora")
    before = snapshot(model)
    use = [LoraUse(lora, parse_multiplier("0.8"))]
    notices = LoraRuntime(use, mode="merge").notices(model)
    assert len(notices) == 1 and "blocks.0.self_attn.q" in notices[0] and "quantised (int8)" in notices[0]
    assert LoraRuntime(use, mode="hooks").notices(model) == []
    hooked, _ = output_with(model, use, "hooks")
    rt = LoraRuntime(use, mode="merge")
    rt.attach(model)
    assert rt.hooked == ["blocks.0.self_attn.q"] and "blocks.0.self_attn.q" not in rt.merged
    merged = run(model)
    rt.detach()
    assert rel_err(merged, hooked) <= TOL
    assert_bit_identical(model, before)


@pytest.mark.parametrize("mode", ["hooks", "merge"])
def test_targets_that_cannot_be_applied_are_skipped_with_a_notice(model, tmp_path, mode):
    """A LoRA tensor of another width (a partial match) and a bias delta on a bare parameter are
    left out and named, rather than failing at the first forward; the rest still applies."""
    state = lora_state("lora")
    state["diffusion_model.blocks.0.self_attn.k.lora_A.weight"] = torch.randn(4, 32)
    state["diffusion_model.blocks.0.self_attn.k.lora_B.weight"] = torch.randn(64, 4)
    state["diffusion_model.blocks.1.modulation.diff_b"] = torch.randn(6)
    save_file(state, str(tmp_path / "odd.safetensors"))
    use = [LoraUse(load_lora(tmp_path / "odd.safetensors"), parse_multiplier("0.8"))]
    notices = LoraRuntime(use, mode=mode).notices(model)
    assert any("blocks.0.self_attn.k" in n and "does not fit" in n for n in notices)
    assert any("blocks.1.modulation" in n for n in notices)
    base, before = run(model), snapshot(model)
    out, _ = output_with(model, use, mode)
    assert rel_err(out, base) > 1e-4
    assert_bit_identical(model, before)


def test_bad_mode_names_the_allowed_values(model):
    with pytest.raises(ValueError, match="'fused' is not one of hooks, merge, auto"):
        LoraRuntime([], mode="fused")
    from wan.optim.profiles import Profile, ProfileError, apply_overrides
    assert Profile().lora.mode == "hooks"
    assert apply_overrides(Profile(), {"lora.mode": "merge"}).lora.mode == "merge"
    with pytest.raises(ProfileError, match=r"lora.mode: 'fused' is not allowed; expected one of hooks, merge, auto"):
        apply_overrides(Profile(), {"lora.mode": "fused"})


# --------------------------------------------------------------------------- through the engine


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from wan.engine import Engine
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    loras = tmp_path_factory.mktemp("loras")
    g = torch.Generator().manual_seed(0)
    state = {}
    for b in (0, 1):  # musubi layout, the tiny family's width 256 and FFN 512
        for mod, out_f, in_f in (("self_attn_q", 256, 256), ("ffn_0", 512, 256)):
            key = f"lora_unet_blocks_{b}_{mod}"
            state |= {f"{key}.lora_down.weight": torch.randn(4, in_f, generator=g) * 0.2,
                      f"{key}.lora_up.weight": torch.randn(out_f, 4, generator=g) * 0.2,
                      f"{key}.alpha": torch.tensor(4.0)}
    save_file(state, str(loras / "style.safetensors"))
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32, lora_dir=loras)


def test_engine_merge_mode_equals_hooks_and_leaves_the_model_untouched(engine):
    from wan.engine import GenerationRequest, LoraChoice, RequestError
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=3, seed=4,
                            loras=[LoraChoice("style.safetensors", "1.0,0.5")])
    hooks = engine.generate(req.replace(profile_overrides={"lora.mode": "hooks"}), write=False)
    dit = engine.models.current.dit
    before = snapshot(dit)
    hooks_seen = []
    merged = engine.generate(req.replace(profile_overrides={"lora.mode": "merge"}), write=False,
                             progress=lambda info: hooks_seen.append(any(m._forward_hooks for m in dit.modules())))
    assert engine.models.current.dit is dit  # the same loaded model, not a reload
    assert hooks_seen and not any(hooks_seen)  # the LoRA ran merged, not through hooks
    assert rel_err(merged.latent, hooks.latent) <= TOL
    plain = engine.generate(req.replace(loras=[]), write=False)
    assert rel_err(merged.latent, plain.latent) > 1e-4
    assert_bit_identical(dit, before)
    with pytest.raises(RequestError, match="lora.mode.*hooks, merge, auto"):
        engine.generate(req.replace(profile_overrides={"lora.mode": "fused"}), write=False)


def test_prepare_loras_reports_quantised_layers_in_merge_mode(engine):
    from wan.engine import LoraChoice
    from wan.lora.job import prepare_loras
    from wan.optim.quant import quantize_
    dit = copy.deepcopy(engine.models.current.dit)
    quantize_(dit, "int8", keep=lambda n: "ffn" in n)
    choices = [LoraChoice("style.safetensors", "1.0")]
    job = prepare_loras(choices, {"transformer": dit}, engine.lora_dir, mode="merge")
    assert any("keep the LoRA as hooks" in n and "quantised (int8)" in n and "self_attn.q" in n for n in job.notices)
    assert not prepare_loras(choices, {"transformer": dit}, engine.lora_dir, mode="hooks").notices
    with pytest.raises(ValueError, match="hooks, merge, auto"):
        prepare_loras(choices, {"transformer": dit}, engine.lora_dir, mode="fast")
