"""wan.parallel on two CPU processes (gloo), against the single-process DiT, T5 and guidance.

One launch runs every scenario (``parallel_harness.scenarios``: Ulysses on the TEST variants,
CFG parallel, FSDP2, the byte counts); the tests compare what each rank returned with references
computed here, in this process, by the unchanged networks. Float32 results must agree within
1e-5 relative (largest difference against the largest value).
"""


import pytest
import torch
import torch.distributed as dist

from parallel_harness import (CASES, T5_FILE, case_inputs, cfg_inputs, forward, plain_ffn, spawn, t5_inputs,
                              tiny_dit)
from wan.parallel import perf_model as pm


def test_gloo_is_there():
    """These tests need torch.distributed with gloo: its absence fails here, it is never a skip."""
    assert dist.is_available() and dist.is_gloo_available()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    from safetensors.torch import save_file
    from wan.testing.tiny_encoders import tiny_t5_state_dict
    out = tmp_path_factory.mktemp("parallel")
    save_file(tiny_t5_state_dict(seed=400), str(out / T5_FILE))
    return spawn("scenarios", 2, out)


def close(out: torch.Tensor, ref: torch.Tensor, rel: float = 1e-5) -> bool:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    return (out.float() - ref.float()).abs().max().item() <= rel * ref.float().abs().max().item()


def reference(name: str, dtype=torch.float32, plain: bool = False) -> torch.Tensor:
    variant, seed, kw = case_inputs(name)
    dit = tiny_dit(variant, seed, dtype)
    if plain:
        plain_ffn(dit)
    with torch.inference_mode():
        return forward(dit, kw)


def tokens(name: str) -> int:
    _, _, (_, f, h, w), extra = CASES[name]
    return f * (h // 2) * (w // 2) + ((h // 2) * (w // 2) if extra.get("ref") else 0)


# ---------------------------------------------------------------------------------------------
# Ulysses


@pytest.mark.parametrize("name", ["t2v_even", "t2v_odd", "i2v_odd", "vace_odd", "ti2v_odd", "fun_control_odd"])
def test_ulysses_forward_equals_single_process(ranks, name):
    ref = reference(name)
    for r in ranks:
        assert close(r["ulysses"][name], ref)
        assert r["ulysses"][name + "/clean"], "attach_job left a part of UlyssesParallel on the DiT"


def test_ulysses_two_experts_attached_together(ranks):
    for r in ranks:
        out = r["ulysses"]["a14b"]
        assert out["_notices"] == ["Ulysses sequence parallel on 2 processes"]
        assert close(out["high_noise"], reference("a14b_high"))
        assert close(out["low_noise"], reference("a14b_low"))


def test_padded_keys_are_masked(ranks):
    """9 tokens on 2 ranks: one padded token. Letting its key in changes the result (so the
    test would see a leak); the masked path equals the single process."""
    assert tokens("t2v_odd") % 2 == 1
    ref = reference("t2v_odd")
    for r in ranks:
        assert close(r["ulysses"]["t2v_odd"], ref)
        assert not close(r["ulysses_extra"]["unmasked"], ref, rel=1e-3)


@pytest.mark.parametrize("name", ["t2v_even", "t2v_odd", "vace_odd", "ti2v_odd", "fun_control_odd"])
def test_bytes_sent_equal_the_performance_model(ranks, name):
    variant, _, _ = case_inputs(name)
    cfg = tiny_dit(variant, 0).config
    vace = bool(cfg.vace_layers)
    expected = pm.ulysses_forward_bytes(cfg, tokens(name), 2, elem_bytes=4, vace=vace)
    for r in ranks:
        sent, calls = r["ulysses"][name + "/bytes"]
        assert sent == expected
        assert calls == pm.ulysses_forward_calls(cfg, 2, vace=vace)


def test_ulysses_wraps_a_step_cache_runner(ranks):
    from wan.optim.step_cache import StepRunner
    variant, seed, kw = case_inputs("t2v_odd")
    dit = tiny_dit(variant, seed)
    runner = StepRunner(schedule=[True, False])
    dit.block_runner = runner
    refs = []
    with torch.inference_mode():
        for step, t in enumerate((900.0, 500.0)):
            runner.begin(step, "transformer/cond")
            refs.append(forward(dit, {**kw, "timestep": torch.tensor([t])}))
    for r in ranks:
        outs, computed, reused = r["ulysses_extra"]["step_cache"]
        assert (computed, reused) == (1, 1)
        assert all(close(o, ref) for o, ref in zip(outs, refs))


def test_ulysses_attached_before_a_block_runner_is_refused(ranks):
    for r in ranks:
        assert r["ulysses_extra"]["wrong_order"].startswith(
            "UlyssesParallel: a self-attention ran outside the Ulysses block runner")


def test_ulysses_runs_the_loops_batched_cfg(ranks):
    from wan.engine.loop import _batched_passes
    inp = cfg_inputs()
    with torch.inference_mode():
        ref = _batched_passes(tiny_dit("t2v", 100), inp["latent"], inp["timestep"], inp["cond"], inp["uncond"])
    for r in ranks:
        assert all(close(r["ulysses_extra"]["batched"][k], ref[k]) for k in ("cond", "uncond"))


def test_ulysses_gradients_summed_over_the_group_equal_single_process(ranks):
    variant, seed, kw = case_inputs("t2v_odd")
    dit = tiny_dit(variant, seed)
    plain_ffn(dit)
    x = kw["x"].clone().requires_grad_()
    out = forward(dit, {**kw, "x": x})
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    for r in ranks:
        gx, gq = r["ulysses_extra"]["grads"]
        assert close(gx, x.grad) and close(gq, dit.blocks[0].self_attn.q.weight.grad)


# ---------------------------------------------------------------------------------------------
# CFG parallel


def test_cfg_parallel_equals_batched_cfg(ranks):
    from wan.engine.loop import _batched_passes
    from wan.optim.guidance import GuidanceSettings, StepGuidance
    inp = cfg_inputs()
    dit = tiny_dit("t2v", 100)
    with torch.inference_mode():
        flows = _batched_passes(dit, inp["latent"], inp["timestep"], inp["cond"], inp["uncond"])
        flow = StepGuidance(GuidanceSettings(), steps=1).combine(0, flows, 5.0, inp["latent"])
        skip = dit(inp["latent"][None], inp["timestep"], **inp["cond_skip"])[0]
    latent_bytes = inp["latent"].numel() * 4
    for rank, r in enumerate(ranks):
        got = r["cfg"]
        assert close(got["flow"], flow)
        assert all(close(got["flows"][k], flows[k]) for k in ("cond", "uncond"))
        bytes_sent, ran = got["two"]
        assert ran == [("cond", "uncond")[rank]]                      # one pass per rank
        assert bytes_sent == {"all_gather": pm.cfg_step_bytes(inp["latent"].shape)} == {"all_gather": latent_bytes}
        three = got["three"]
        assert close(three["cond"], flows["cond"]) and close(three["uncond"], flows["uncond"])
        assert close(three["cond_skip"], skip)
        assert close(got["single"]["cond"], flows["cond"])
        assert len(got["ran"]) == 1 + 2 + 1                           # same forwards on both ranks
    assert torch.equal(ranks[0]["cfg"]["flow"], ranks[1]["cfg"]["flow"])  # same step everywhere


def test_rank_zero_request_reaches_every_rank(ranks):
    assert [r["broadcast"] for r in ranks] == [{"seed": 1234, "prompt": "from 0"}] * 2
    assert [r["ranks"] for r in ranks] == [(0, 0, 0), (1, 1, 1)]


# ---------------------------------------------------------------------------------------------
# FSDP2


def test_fsdp_dit_equals_unsharded(ranks):
    ref, ref_vace = reference("t2v_odd"), reference("vace_odd")
    for r in ranks:
        fs = r["fsdp"]
        assert fs["dit_sharded"] and fs["dit_local_rows"] == 128   # 256 rows of q split in two
        assert close(fs["dit"], ref)
        assert close(fs["dit_vace"], ref_vace)
        assert close(fs["dit_vace_ulysses"], ref_vace)            # composed with Ulysses


def test_fsdp_gathered_time_embeddings_for_teacache(ranks):
    from wan.optim.step_cache import time_embeddings
    ref = time_embeddings(tiny_dit("t2v", 100), torch.tensor([999.0, 500.0]))
    for r in ranks:
        assert all(close(a, b) for a, b in zip(r["fsdp"]["time_embeddings"], ref))


def test_fsdp_mixed_dtype_dit_equals_unsharded(ranks):
    """bf16 linears beside float32 norms and modulation, as the loader leaves a bf16 DiT. FSDP's
    hooks on the linears send the FFN down the plain linear + GELU path (rounded between the two
    in bf16), so the reference takes that path too."""
    ref = reference("vace_odd", torch.bfloat16, plain=True)
    for r in ranks:
        assert close(r["fsdp"]["dit_bf16"], ref, rel=1e-5)


def test_fsdp_text_encoder_equals_unsharded(ranks, tmp_path):
    import wan
    from safetensors.torch import save_file
    from wan.testing.tiny_encoders import tiny_t5_state_dict
    save_file(tiny_t5_state_dict(seed=400), str(tmp_path / T5_FILE))
    te = wan.load_text_encoder(tmp_path / T5_FILE, dtype=torch.float32)
    with torch.inference_mode():
        ref = te(*t5_inputs())
    for r in ranks:
        assert close(r["fsdp"]["t5"], ref)


def test_scenarios_took(ranks):
    """Not a check: the seconds each scenario took on each rank, for the log (-s)."""
    for rank, r in enumerate(ranks):
        print(f"rank {rank}: " + ", ".join(f"{k} {v:.1f}s" for k, v in r["_seconds"].items()))


def test_cfg_times_ulysses_with_fsdp_on_four_processes(tmp_path):
    """cfg 2 x ulysses 2 with FSDP over all four ranks equals one process's guided step."""
    ranks4 = spawn("composed", 4, tmp_path)
    variant, seed, kw = case_inputs("vace_odd")
    inp = cfg_inputs()
    dit = tiny_dit(variant, seed)
    extra = {k: kw[k] for k in ("vace_context", "vace_scale")}
    from wan.optim.guidance import GuidanceSettings, StepGuidance
    with torch.inference_mode():
        flows = {n: dit(inp["latent"][None], inp["timestep"], **inp[n], **extra)[0] for n in ("cond", "uncond")}
        flow = StepGuidance(GuidanceSettings(), steps=1).combine(0, flows, 5.0, inp["latent"])
    assert [r["place"] for r in ranks4] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [r["mine"] for r in ranks4] == [["cond"], ["cond"], ["uncond"], ["uncond"]]
    for r in ranks4:
        assert close(r["flow"], flow)
