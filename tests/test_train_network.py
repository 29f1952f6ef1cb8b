"""The trainable LoRA network (wan.train.network) and its files (wan.train.lora_save), on tiny DiTs:
musubi-tuner's targets, init, forward and layouts, and the project's LoRA library reading the result."""

import copy
import functools
import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from helpers import rel_err
from wan.engine.attach import attach_job
from wan.lora.compat import check_lora, linear_shapes
from wan.lora.formats import load_lora
from wan.models.dit import DiTConfig, WanDiT
from wan.testing.tiny_family import TINY_CLIP, TINY_DIT, TINY_DIT_VARIANTS, TINY_T5, tiny_dit_state_dict
from wan.train.lora_save import (MINIMUM_KEYS, addnet_hashes, modelspec_metadata, network_state, save_network,
                                 training_metadata)
from wan.train.network import LoraModule, LoraNetwork, parse_network_args, target_modules

BLOCK_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
I2V_BLOCK_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                     "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img",
                     "cross_attn.v_img", "ffn.0", "ffn.2")


@functools.lru_cache(maxsize=None)
def _weights(variant: str, seed: int) -> dict:
    return tiny_dit_state_dict(variant, seed)


def tiny_dit(variant="t2v", seed=7) -> WanDiT:
    """A tiny float32 DiT of ``variant`` with the tiny family's seeded weights, in eval mode."""
    dit = WanDiT(DiTConfig(**TINY_DIT, **TINY_DIT_VARIANTS[variant]))
    dit.load_state_dict(_weights(variant, seed))  # copies: the cached tensors are never trained
    return dit.eval()


def inputs(variant="t2v", seed=1):
    """Fixed inputs for one forward: 1 frame of 4x4 latents (4 tokens), 5 text tokens."""
    g = torch.Generator().manual_seed(seed)
    kw = dict(x=torch.randn(1, 16, 1, 4, 4, generator=g), timestep=torch.tensor([600.0]),
              context=torch.randn(1, 5, TINY_T5["dim"], generator=g))
    if variant == "i2v":
        kw["y"] = torch.randn(1, 20, 1, 4, 4, generator=g)
        kw["clip_fea"] = torch.randn(1, 17, TINY_CLIP["dim"], generator=g)
    return kw


def randomize_lora_(net: LoraNetwork, seed=3, std=0.05) -> LoraNetwork:
    """Nonzero up weights (they start at zero) and fresh down weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in net.lora_modules():
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * std)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * std)
    return net


def merged_by_hand(dit: WanDiT, net: LoraNetwork) -> WanDiT:
    """A copy of ``dit`` with W + multiplier * alpha/r * up @ down written into each target (float64 maths)."""
    merged = copy.deepcopy(dit)
    mods = dict(merged.named_modules())
    with torch.no_grad():
        for name, m in net.lora_modules():
            delta = m.lora_up.weight.double() @ m.lora_down.weight.double() * (float(m.alpha) / m.lora_dim)
            lin = mods[name]
            lin.weight.copy_((lin.weight.double() + net.multiplier * delta).float())
    return merged


# ---------------------------------------------------------------------------------------------
# Targets


def test_targets_are_the_block_linears_in_module_order():
    net = LoraNetwork(tiny_dit("t2v"))
    assert net.names == [f"blocks.{i}.{t}" for i in range(2) for t in BLOCK_TARGETS]
    assert len(net.names) == 20
    # children carry musubi's key names, so state_dict() is musubi's layout
    suffixes = ("lora_down.weight", "lora_up.weight", "alpha")
    want = [f"lora_unet_{n.replace('.', '_')}.{s}" for n in net.names for s in suffixes]
    assert sorted(net.state_dict()) == sorted(want)


def test_i2v_adds_image_keys_and_vace_blocks_are_not_targets():
    assert LoraNetwork(tiny_dit("i2v")).names == [f"blocks.{i}.{t}" for i in range(2) for t in I2V_BLOCK_TARGETS]
    # VaceBlock subclasses Block, but musubi matches the class name exactly (and has no VACE)
    vace = LoraNetwork(tiny_dit("vace"))
    assert vace.names == [f"blocks.{i}.{t}" for i in range(2) for t in BLOCK_TARGETS]


def test_include_overrides_exclude_and_does_not_restrict():
    dit = tiny_dit("t2v")
    net = LoraNetwork(dit, exclude_patterns=[r".*ffn.*"], include_patterns=[r"blocks\.0\.ffn\.0"])
    assert "blocks.0.ffn.0" in net.names and "blocks.0.ffn.2" not in net.names and "blocks.1.ffn.0" not in net.names
    assert len(net.names) == 17
    # patterns match the whole name: "ffn" alone matches nothing
    assert len(LoraNetwork(dit, exclude_patterns=["ffn"]).names) == 20
    # include alone keeps every target (it only overrides exclusions)
    assert len(LoraNetwork(dit, include_patterns=[r"blocks\.0\..*"]).names) == 20
    # musubi's network_args form: a Python list literal in a string
    kwargs = parse_network_args(['exclude_patterns=[r".*cross_attn.*"]', "loraplus_lr_ratio=4"])
    assert kwargs["loraplus_lr_ratio"] == 4.0
    assert len(LoraNetwork(dit, **kwargs).names) == 12


def test_default_exclusion_regex_applies_inside_blocks():
    class Block(nn.Module):  # noqa: D401 - a stand-in with the target class name
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.norm_proj, self.head_mix, self.time_projection = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    root = nn.Module()
    root.blocks = nn.ModuleList([Block()])
    root.head = nn.Linear(4, 4)  # outside any block: never a target
    assert [n for n, _ in target_modules(root)] == ["blocks.0.proj"]
    included = target_modules(root, include_patterns=[r".*norm_proj"])
    assert [n for n, _ in included] == ["blocks.0.proj", "blocks.0.norm_proj"]


@pytest.mark.parametrize("kwargs", [dict(exclude_patterns=["("]), dict(network_dim=0), dict(network_dropout=1.0),
                                    dict(exclude_patterns=[".*"])])
def test_bad_settings_are_errors(kwargs):
    with pytest.raises(ValueError):
        LoraNetwork(tiny_dit("t2v"), **kwargs)
    with pytest.raises(ValueError, match="not allowed"):
        parse_network_args(["conv_dim=4"])


# ---------------------------------------------------------------------------------------------
# Init and forward


def test_init_as_musubi():
    net = LoraNetwork(tiny_dit("t2v"), network_dim=8)
    for name, m in net.lora_modules():
        fan_in = m.lora_down.in_features
        bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)): gain sqrt(1/3) * sqrt(3 / fan_in)
        w = m.lora_down.weight
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.1 * bound
        assert torch.count_nonzero(m.lora_up.weight) == 0
        assert m.alpha.shape == () and m.alpha.dtype == torch.float32 and float(m.alpha) == 1.0
        assert m.scale == 1 / 8
    # the same RNG draws as musubi's LoRAModule: Linear(in, r), Linear(r, out), then kaiming on down
    torch.manual_seed(11)
    ours = LoraModule("x", 32, 48, 4, 1.0)
    torch.manual_seed(11)
    down, _ = nn.Linear(32, 4, bias=False), nn.Linear(4, 48, bias=False)
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    assert torch.equal(ours.lora_down.weight, down.weight)
    # alpha 0 means alpha = rank (scale 1), as musubi
    assert LoraModule("x", 8, 8, 4, 0).scale == 1.0


@pytest.mark.parametrize("variant", ["t2v", "i2v"])
def test_forward_equals_hand_merged_weights(variant):
    dit = tiny_dit(variant)
    net = randomize_lora_(LoraNetwork(dit, network_dim=4, network_alpha=2.0, network_dropout=0.5, rank_dropout=0.5,
                                      module_dropout=0.5, multiplier=0.7))
    net.eval()  # dropouts are training-only
    reference = merged_by_hand(dit, net)
    with torch.no_grad():
        base = dit(**inputs(variant))
        with attach_job({"transformer": dit}, [net]) as notices:
            ours = dit(**inputs(variant))
        want = reference(**inputs(variant))
    assert notices == [f"LoRA training: {len(net.names)} modules, rank 4, alpha 2 (scale 0.5)"]
    assert rel_err(ours - base, want - base) < 1e-4  # the LoRA's own contribution
    assert rel_err(ours, want) < 1e-5


@pytest.mark.parametrize("autocast", [False, True])
def test_the_hooked_adapter_adds_in_place_with_the_gradients_of_the_plain_formula(autocast):
    """The hook adds the adapter into the layer's own output (one addmm_, no temporaries), also under bf16
    autocast on a bf16 layer (training's case); values and gradients equal base + m * s * up(down(x))."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if autocast else torch.float32
    layer = nn.Linear(24, 40).to(dtype).requires_grad_(False)
    lora = LoraModule("x", 24, 40, 4, 2.0)
    with torch.no_grad():
        lora.lora_up.weight.normal_()
    lora.multiplier = 0.7
    x = torch.randn(2, 5, 24, dtype=dtype, requires_grad=True)
    in_place = []

    def hook(module, args, out):
        result = lora.add_to(args[0], out, inplace=True)
        in_place.append(result is out)
        return result
    handle = layer.register_forward_hook(hook)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        ours = layer(x)
    handle.remove()
    ours.float().square().sum().backward()
    got = [t.grad.clone() for t in (x, lora.lora_down.weight, lora.lora_up.weight)]
    for t in (x, lora.lora_down.weight, lora.lora_up.weight):
        t.grad = None
    xf = x.detach().float().requires_grad_()
    want = (layer.float()(xf) + 0.7 * lora.scale * lora.lora_up(lora.lora_down(xf)))
    want.square().sum().backward()
    wanted = [xf.grad, lora.lora_down.weight.grad, lora.lora_up.weight.grad]
    tol = 2e-2 if autocast else 1e-5  # bf16: 8 bits of mantissa
    assert ours.dtype == dtype and in_place == [True]
    assert rel_err(ours.float(), want) < tol
    for g, w in zip(got, wanted):
        assert rel_err(g.float(), w) < tol


def test_backward_reaches_only_lora_params_and_detach_restores():
    dit = tiny_dit("t2v")
    flags = {n: p.requires_grad for n, p in dit.named_parameters()}
    net = LoraNetwork(dit)
    with torch.no_grad():
        base = dit(**inputs())
    params, _ = net.prepare_optimizer_params(1e-4)
    net.train()
    net.attach(dit)
    out = dit(**inputs())
    # up starts at zero: the untrained LoRA changes nothing (not bit for bit: with a hook on ffn.0 the
    # DiT takes the plain GELU path instead of the fused CPU kernel, which rounds differently)
    assert rel_err(out, base) < 1e-6
    out.square().mean().backward()
    assert all(p.grad is None and not p.requires_grad for p in dit.parameters())
    for _, m in net.lora_modules():
        assert m.lora_up.weight.grad is not None and m.lora_up.weight.grad.abs().sum() > 0
        assert m.lora_down.weight.grad is not None  # zero while up is zero, but on the graph
    assert sum(len(g["params"]) for g in params) == 2 * len(net.names)
    net.detach(dit)
    assert {n: p.requires_grad for n, p in dit.named_parameters()} == flags
    assert not any(m._forward_hooks for m in dit.modules())


def test_detach_restores_outputs_bit_identically():
    dit = tiny_dit("i2v")
    state = {k: v.clone() for k, v in dit.state_dict().items()}
    with torch.no_grad():
        base = dit(**inputs("i2v"))
        net = randomize_lora_(LoraNetwork(dit))
        with attach_job({"transformer": dit}, [net]):
            assert not torch.equal(dit(**inputs("i2v")), base)
            with pytest.raises(RuntimeError, match="already attached"):
                net.attach(dit)
        assert not net.attached
        assert torch.equal(dit(**inputs("i2v")), base)
    assert all(torch.equal(v, state[k]) for k, v in dit.state_dict().items())


def test_attach_to_a_model_without_the_targets_fails_cleanly():
    net = LoraNetwork(tiny_dit("i2v"))
    t2v = tiny_dit("t2v")
    with pytest.raises(ValueError, match="k_img"):
        net.attach({"transformer": t2v})
    assert not net.attached and not any(m._forward_hooks for m in t2v.modules())
    assert all(p.requires_grad for p in t2v.parameters())


def test_one_lora_shared_by_two_experts():
    high, low = tiny_dit("t2v", seed=1), tiny_dit("t2v", seed=2)
    net = randomize_lora_(LoraNetwork(high))
    net.train()
    net.attach({"high_noise": high, "low_noise": low})
    (high(**inputs()).square().mean() + low(**inputs()).square().mean()).backward()
    grads_both = [m.lora_up.weight.grad.clone() for _, m in net.lora_modules()]
    net.zero_grad()
    high(**inputs()).square().mean().backward()
    assert any(not torch.equal(a, m.lora_up.weight.grad) for a, (_, m) in zip(grads_both, net.lora_modules()))
    net.detach()
    assert not any(m._forward_hooks for d in (high, low) for m in d.modules())


def test_dropouts_follow_musubi_in_training():
    m = LoraModule("x", 16, 12, 4, 2.0, dropout=None, rank_dropout=0.5)
    with torch.no_grad():
        m.lora_up.weight.normal_()
    m.train()
    x, base = torch.randn(3, 5, 16), torch.randn(3, 5, 12)
    torch.manual_seed(5)
    got = m.add_to(x, base)
    torch.manual_seed(5)
    mask = torch.rand((3, 4)) > 0.5  # one draw per (sample, rank), shared over tokens
    want = base + m.lora_up(m.lora_down(x) * mask[:, None, :]) * 1.0 * (m.scale / 0.5)
    assert torch.allclose(got, want, atol=1e-6)
    skip = LoraModule("x", 16, 12, 4, 2.0, module_dropout=0.999999).train()
    with torch.no_grad():
        skip.lora_up.weight.normal_()
    assert torch.equal(skip.add_to(x, base), base)
    drop = LoraModule("x", 16, 12, 4, 2.0, dropout=0.5).train()
    with torch.no_grad():
        drop.lora_up.weight.normal_()
    torch.manual_seed(6)
    got = drop.add_to(x, base)
    torch.manual_seed(6)
    want = base + drop.lora_up(torch.nn.functional.dropout(drop.lora_down(x), p=0.5)) * drop.scale
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(drop.eval().add_to(x, base), base + drop.lora_up(drop.lora_down(x)) * drop.scale)


def test_quantised_base_fp8_only_lora_trains():
    from wan.layers.quant import QuantLinear
    from wan.optim.quant import quantize_
    dit = tiny_dit("t2v")
    quantize_(dit, "fp8_scaled", keep=WanDiT.keep_in_fp32)
    assert isinstance(dit.blocks[0].self_attn.q, QuantLinear)
    net = randomize_lora_(LoraNetwork(dit))
    assert len(net.names) == 20
    with torch.no_grad():
        base = dit(**inputs())
    net.train()
    net.attach(dit)
    # one layer: quantised base + LoRA == the dequantised weight with the delta merged
    layer, m = dit.blocks[1].ffn[0], net.lora_module("blocks.1.ffn.0")
    x = torch.randn(2, 3, layer.in_features)
    merged = layer.dequantized_weight(torch.float32) + m.lora_up.weight @ m.lora_down.weight * m.scale
    assert rel_err(layer(x), torch.nn.functional.linear(x, merged, layer.bias)) < 1e-5
    dit(**inputs()).square().mean().backward()
    assert all(p.grad is None for p in dit.parameters()) and all(b.grad is None for b in dit.buffers())
    assert all(m.lora_up.weight.grad is not None and m.lora_down.weight.grad.abs().sum() > 0
               for _, m in net.lora_modules())
    net.detach()
    with torch.no_grad():
        assert torch.equal(dit(**inputs()), base)


# ---------------------------------------------------------------------------------------------
# Optimizer groups


def test_loraplus_groups():
    dit = tiny_dit("t2v")
    params, desc = LoraNetwork(dit).prepare_optimizer_params(2e-4)
    assert desc == ["unet"] and params[0]["lr"] == 2e-4 and len(params[0]["params"]) == 40
    net = LoraNetwork(dit, loraplus_lr_ratio=16)
    params, desc = net.prepare_optimizer_params(unet_lr=1e-4)
    assert desc == ["unet", "unet plus"]
    assert params[0]["lr"] == 1e-4 and params[1]["lr"] == pytest.approx(1.6e-3)
    ups = {id(m.lora_up.weight) for _, m in net.lora_modules()}
    downs = {id(m.lora_down.weight) for _, m in net.lora_modules()}
    assert {id(p) for p in params[0]["params"]} == downs and {id(p) for p in params[1]["params"]} == ups
    assert all(p.requires_grad for p in net.parameters())
    torch.optim.AdamW(params)  # the groups are what an optimizer takes


# ---------------------------------------------------------------------------------------------
# Saving and loading


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def test_save_musubi_layout_and_metadata(tmp_path):
    dit = tiny_dit("i2v")
    net = randomize_lora_(LoraNetwork(dit, network_dim=4, network_alpha=2.0, exclude_patterns=[r".*ffn\.2"]))
    training = {"learning_rate": 1e-4, "seed": 42, "fp8_base": False, "steps": 10,
                "datasets": [{"resolution": [256, 256]}]}
    meta = training_metadata(net, training, dit_path=str(tmp_path / "none.safetensors"))
    meta.update(modelspec_metadata(title="my-lora", timestamp=1_700_000_000, timestep_range=(0, 900)))
    path = save_network(net, tmp_path / "out" / "my-lora.safetensors", metadata=meta)
    tensors, md = _read(path)
    assert len(tensors) == 3 * len(net.names) == 3 * 22
    for name, m in net.lora_modules():
        key = "lora_unet_" + name.replace(".", "_")
        assert tensors[f"{key}.lora_down.weight"].shape == (4, m.lora_down.in_features)
        assert tensors[f"{key}.lora_up.weight"].shape == (m.lora_up.out_features, 4)
        assert tensors[f"{key}.alpha"].shape == () and float(tensors[f"{key}.alpha"]) == 2.0
        assert torch.equal(tensors[f"{key}.lora_up.weight"], m.lora_up.weight)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert md["ss_network_module"] == "networks.lora_wan" and md["ss_network_dim"] == "4"
    assert md["ss_network_alpha"] == "2.0" and md["ss_base_model_version"] == "wan"
    assert json.loads(md["ss_network_args"]) == {"exclude_patterns": "['.*ffn\\\\.2']"}
    assert md["ss_learning_rate"] == "0.0001" and md["ss_seed"] == "42" and md["ss_fp8_base"] == "False"
    assert json.loads(md["ss_datasets"]) == [{"resolution": [256, 256]}]
    assert md["ss_sd_model_name"].endswith("none.safetensors") and md["ss_network_dropout"] == "None"
    assert md["modelspec.architecture"] == "wan2.1/lora" and md["modelspec.title"] == "my-lora"
    assert md["modelspec.timestep_range"] == "0,900" and md["modelspec.resolution"] == "1280x720"
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == addnet_hashes(tensors, md)
    assert [p.name for p in path.parent.iterdir()] == ["my-lora.safetensors"]  # no temp file left
    # the project's LoRA library reads it as a musubi LoRA that fits the model fully
    lora = load_lora(path)
    assert lora.format == "musubi" and not lora.dropped
    compat = check_lora(lora, linear_shapes(dit))
    assert compat.status == "full" and compat.matched == 22
    # save precision: every tensor, alpha included
    state = network_state(net, dtype=torch.bfloat16)
    assert {t.dtype for t in state.values()} == {torch.bfloat16}


def test_save_comfy_layout(tmp_path):
    dit = tiny_dit("t2v")
    net = randomize_lora_(LoraNetwork(dit, network_alpha=4.0))
    path = save_network(net, tmp_path / "c.safetensors", save_format="comfy")
    tensors, md = _read(path)
    assert len(tensors) == 60
    for name, m in net.lora_modules():
        base = f"diffusion_model.{name}"
        assert torch.equal(tensors[f"{base}.lora_A.weight"], m.lora_down.weight)
        assert torch.equal(tensors[f"{base}.lora_B.weight"], m.lora_up.weight)
        assert float(tensors[f"{base}.alpha"]) == 4.0  # comfy/lora.py reads "<x>.alpha", scale alpha / rank
    assert "sshs_model_hash" in md
    lora = load_lora(path)
    assert lora.format == "comfy" and check_lora(lora, linear_shapes(dit)).status == "full"
    assert lora.targets["blocks.0.ffn.0"].scale() == 1.0
    with pytest.raises(ValueError, match="save_format"):
        save_network(net, tmp_path / "x.safetensors", save_format="kohya")


@pytest.mark.parametrize("save_format", ["musubi", "comfy"])
def test_round_trip_save_then_load_weights(tmp_path, save_format):
    dit = tiny_dit("t2v")
    net = randomize_lora_(LoraNetwork(dit, network_alpha=2.0), seed=5)
    path = save_network(net, tmp_path / "r.safetensors", save_format=save_format)
    other = LoraNetwork(dit, network_alpha=2.0)
    report = other.load_weights(path)
    assert report.loaded == net.names and not report.missing and not report.alpha_changed
    a, b = net.state_dict(), other.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_load_weights_adopts_alpha_and_names_what_does_not_fit(tmp_path):
    dit = tiny_dit("t2v")
    full = randomize_lora_(LoraNetwork(dit, network_alpha=8.0))
    path = save_network(full, tmp_path / "full.safetensors")
    net = LoraNetwork(dit)  # alpha 1
    report = net.load_weights(path)
    assert len(report.alpha_changed) == 20 and net.lora_module("blocks.0.ffn.0").scale == 2.0
    assert any("alpha taken from the file" in line for line in report.notices())
    partial = LoraNetwork(dit, exclude_patterns=[r".*ffn.*"])
    with pytest.raises(ValueError, match=r"blocks\.0\.ffn\.0: no such target"):
        partial.load_weights(path)
    # fewer adapters in the file than in the network: the rest keep their initial weights
    small = save_network(randomize_lora_(partial), tmp_path / "partial.safetensors")
    report = LoraNetwork(dit).load_weights(small)
    assert len(report.missing) == 4 and "blocks.1.ffn.2" in report.missing
    with pytest.raises(ValueError, match="rank 8"):
        LoraNetwork(dit, network_dim=8).load_weights(path)


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    import wan.train.lora_save as lora_save
    net = LoraNetwork(tiny_dit("t2v"))
    target = tmp_path / "l.safetensors"
    target.write_bytes(b"previous")

    def broken(state, path, metadata=None):
        open(path, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(lora_save, "save_lora", broken)
    with pytest.raises(OSError, match="disk full"):
        save_network(net, target)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["l.safetensors"]


def test_training_metadata_keys():
    net = LoraNetwork(tiny_dit("t2v"), network_dim=16, network_alpha=8, loraplus_lr_ratio=4)
    md = training_metadata(net, {"optimizer": "AdamW", "ss_custom": 1})
    assert md["ss_network_dim"] == "16" and md["ss_network_alpha"] == "8" and md["ss_optimizer"] == "AdamW"
    assert md["ss_custom"] == "1" and json.loads(md["ss_network_args"]) == {"loraplus_lr_ratio": "4"}
    assert set(training_metadata(net, {"seed": 1}, minimal=True)) == set(MINIMUM_KEYS)
    with pytest.raises(ValueError, match="learning_rat"):
        training_metadata(net, {"learning_rat": 1})
    assert modelspec_metadata(resolution="960,544", timestamp=0)["modelspec.resolution"] == "960x544"
