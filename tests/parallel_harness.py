"""Runs parallel scenarios on N CPU processes (gloo), as torchrun would start them, for the tests.

:func:`spawn` starts ``world`` processes with torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` on a free port, ``OMP_NUM_THREADS=1``); each runs a
function of this module that joins through :func:`wan.parallel.parallel_session` (so the group is
destroyed on every exit) and returns a dict, saved to ``<out>/rank<r>.pt`` for the test to read.
A run past its deadline is killed (its own processes only) and reported.

The scenarios build their inputs with the same seeded functions the tests use for the
single-process references (:func:`case_inputs`, :func:`tiny_dit`), so the parent process never
needs a process group.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------
# Inputs shared by the workers and the single-process references

# name -> (variant, seed, latent [C, F, H, W], extras); patch (1, 2, 2): tokens = F * H/2 * W/2
CASES = {
    "t2v_even": ("t2v", 100, (16, 2, 4, 4), {}),                     # 8 tokens
    "t2v_odd": ("t2v", 100, (16, 3, 2, 6), {}),                      # 9 tokens: padded to 10
    "i2v_odd": ("i2v", 101, (16, 3, 2, 6), {"y": 20, "clip": 17}),
    "vace_odd": ("vace", 103, (16, 3, 2, 6), {"vace": 96}),
    "ti2v_odd": ("ti2v", 104, (48, 3, 2, 6), {"per_token_t": True}),
    "fun_control_odd": ("fun_control", 106, (16, 2, 2, 6), {"y": 32, "clip": 17, "ref": True}),  # 3 ref + 6
    "a14b_high": ("t2v", 200, (16, 3, 2, 6), {}),
    "a14b_low": ("t2v", 201, (16, 3, 2, 6), {"t": 300.0}),
}


def tiny_dit(variant: str, seed: int, dtype: torch.dtype = torch.float32):
    """A tiny TEST DiT (``wan.testing.tiny_family``), eval mode; with a half ``dtype`` the float32
    islands stay float32 as the loader keeps them."""
    from wan.models.dit import DiTConfig, WanDiT
    from wan.testing.tiny_family import TINY_DIT, TINY_DIT_VARIANTS, tiny_dit_state_dict
    dit = WanDiT(DiTConfig(**TINY_DIT, **TINY_DIT_VARIANTS[variant]))
    dit.load_state_dict(tiny_dit_state_dict(variant, seed))
    if dtype != torch.float32:
        for name, p in dit.named_parameters():
            if not WanDiT.keep_in_fp32(name):
                p.data = p.data.to(dtype)
    return dit.eval()


def case_inputs(name: str) -> tuple[str, int, dict]:
    """(variant, seed, forward kwargs) of a case, deterministic."""
    variant, seed, shape, extra = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    c, f, h, w = shape
    kw = {"x": torch.randn(1, c, f, h, w, generator=g),
          "timestep": torch.tensor([extra.get("t", 700.0)]),
          "context": torch.randn(1, 7, 32, generator=g)}
    if "y" in extra:
        kw["y"] = torch.randn(1, extra["y"], f, h, w, generator=g)
    if "clip" in extra:
        kw["clip_fea"] = torch.randn(1, extra["clip"], 160, generator=g)
    if "vace" in extra:
        kw["vace_context"] = torch.randn(1, extra["vace"], f, h, w, generator=g)
        kw["vace_scale"] = 0.7
    if extra.get("ref"):
        kw["ref_latent"] = torch.randn(1, 16, h, w, generator=g)
    if extra.get("per_token_t"):
        tokens = f * (h // 2) * (w // 2)
        kw["timestep"] = (torch.rand(1, tokens, generator=g) * 1000).round()
        kw["timestep"][0, : (h // 2) * (w // 2)] = 0.0  # first frame clean, as TI2V image mode
    return variant, seed, kw


def plain_ffn(dit) -> None:
    """Keeps the FFN off the fused oneDNN linear+GELU op, which has no backward (a hook on the
    layer sends ``linear_gelu_tanh`` down its plain path)."""
    for block in [*dit.blocks, *getattr(dit, "vace_blocks", ())]:
        block.ffn[0].register_forward_hook(lambda m, a, o: None)


def forward(dit, kw: dict) -> torch.Tensor:
    kw = dict(kw)
    return dit(kw.pop("x"), kw.pop("timestep"), kw.pop("context"), **kw)


def cfg_inputs():
    """A step's inputs for the CFG scenario: latent [C, F, H, W], timestep, prompt and negative
    prompt contexts of different lengths, and a third context for a skip-layer-like pass."""
    g = torch.Generator().manual_seed(7)
    return {"latent": torch.randn(16, 3, 2, 6, generator=g), "timestep": torch.tensor([600.0]),
            "cond": {"context": torch.randn(1, 7, 32, generator=g)},
            "uncond": {"context": torch.randn(1, 4, 32, generator=g)},
            "cond_skip": {"context": torch.randn(1, 5, 32, generator=g)}}


T5_FILE = "tiny_t5.safetensors"


def t5_inputs():
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(3, 60, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, target: str, world: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    result = globals()[target](rank, Path(out))
    torch.save(result, Path(out) / f"rank{rank}.pt")


def spawn(target: str, world: int, out: Path, timeout: float = 240.0) -> list[dict]:
    """Runs ``target`` (a function name of this module: ``(rank, out) -> dict``) on ``world``
    processes; returns each rank's dict. Raises with the worker's traceback on a failure."""
    import torch.multiprocessing as mp
    before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read when a child loads torch, before _entry runs
    try:
        ctx = mp.start_processes(_entry, args=(target, world, free_port(), str(out)), nprocs=world, join=False,
                                 start_method="spawn")
    finally:
        if before is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = before
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"parallel scenario {target} on {world} processes ran past {timeout:.0f} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# Scenarios (run in each worker)


def _timed(results: dict, key: str, fn):
    t = time.perf_counter()
    results[key] = fn()
    results.setdefault("_seconds", {})[key] = time.perf_counter() - t


def scenarios(rank: int, out: Path) -> dict:
    """Every two-process scenario in one launch (a launch costs seconds of imports)."""
    from wan.parallel import ParallelConfig, init_parallel, parallel_session
    results: dict = {}
    with parallel_session(ParallelConfig(ulysses_size=2), timeout=timedelta(seconds=120)) as sp_state:
        _timed(results, "ulysses", lambda: _ulysses_cases(sp_state))
        _timed(results, "ulysses_extra", lambda: _ulysses_extra(sp_state))
        cfg_state = init_parallel(ParallelConfig(cfg_parallel=True))  # same processes, mesh (2, 1)
        assert not cfg_state.owned
        _timed(results, "cfg", lambda: _cfg_case(cfg_state))
        _timed(results, "broadcast", lambda: sp_state.broadcast({"seed": 1234 + rank, "prompt": f"from {rank}"}))
        _timed(results, "fsdp", lambda: _fsdp_cases(sp_state, out))
        results["ranks"] = (sp_state.rank, sp_state.sp_rank, cfg_state.cfg_rank)
    return results


def _ulysses_run(state, dits: dict, kws: dict, counter=None, mask=True) -> dict:
    from wan.engine.attach import attach_job
    from wan.parallel import UlyssesParallel
    part = UlyssesParallel(state.sp_group, counter)
    part.mask_padded_keys = mask
    out = {}
    with attach_job(dits, [part]) as notices, torch.inference_mode():
        for key, dit in dits.items():
            out[key] = forward(dit, kws[key])
    out["_notices"] = notices
    return out


def _ulysses_cases(state) -> dict:
    from wan.parallel import CommCounter
    res = {}
    for name in ("t2v_even", "t2v_odd", "i2v_odd", "vace_odd", "ti2v_odd", "fun_control_odd"):
        variant, seed, kw = case_inputs(name)
        counter = CommCounter()
        dit = tiny_dit(variant, seed)
        res[name] = _ulysses_run(state, {"transformer": dit}, {"transformer": kw}, counter)["transformer"]
        res[name + "/bytes"] = (dict(counter.bytes_sent), dict(counter.calls))
        # attach_job has detached: nothing of the part is left on the network
        res[name + "/clean"] = (dit.block_runner is None and "_vace_hints" not in vars(dit)
                                and not dit._forward_pre_hooks and not dit.head._forward_hooks
                                and not dit.head._forward_pre_hooks
                                and not any(b.self_attn._forward_pre_hooks for b in dit.blocks))
    # two experts attached at once, as the A14B job does
    dits, kws = {}, {}
    for expert, name in (("high_noise", "a14b_high"), ("low_noise", "a14b_low")):
        variant, seed, kw = case_inputs(name)
        dits[expert], kws[expert] = tiny_dit(variant, seed), kw
    res["a14b"] = _ulysses_run(state, dits, kws)
    return res


def _ulysses_extra(state) -> dict:
    """Padding leak, a wrapped step cache, gradients."""
    import torch.distributed as dist
    from wan.engine.attach import SetOnNetworks, attach_job
    from wan.optim.step_cache import StepRunner
    from wan.parallel import UlyssesParallel
    res = {}
    variant, seed, kw = case_inputs("t2v_odd")
    dit = tiny_dit(variant, seed)
    res["unmasked"] = _ulysses_run(state, {"transformer": dit}, {"transformer": kw}, mask=False)["transformer"]

    # a step cache's runner, wrapped: step 0 computes, step 1 reuses this rank's cached residual
    runner = StepRunner(schedule=[True, False])
    outs = []
    with attach_job({"transformer": dit}, [SetOnNetworks("block_runner", runner),
                                           UlyssesParallel(state.sp_group)]), torch.inference_mode():
        for step, t in enumerate((900.0, 500.0)):
            runner.begin(step, "transformer/cond")
            outs.append(forward(dit, {**kw, "timestep": torch.tensor([t])}))
    res["step_cache"] = (outs, runner.computed, runner.reused)

    # attached in the wrong order: the step cache's runner replaces the Ulysses one; refused
    try:
        with attach_job({"transformer": dit}, [UlyssesParallel(state.sp_group), SetOnNetworks("block_runner",
                                                                                              StepRunner())]):
            forward(dit, kw)
        res["wrong_order"] = None
    except RuntimeError as e:
        res["wrong_order"] = str(e)

    # the loop's batched CFG (a batch of two) through Ulysses
    from wan.engine.loop import _batched_passes
    inp = cfg_inputs()
    with attach_job({"transformer": dit}, [UlyssesParallel(state.sp_group)]), torch.inference_mode():
        res["batched"] = _batched_passes(dit, inp["latent"], inp["timestep"], inp["cond"], inp["uncond"])

    # gradients through the autograd all-to-alls (LoRA training): summed over the sequence group
    plain_ffn(dit)
    x = kw["x"].clone().requires_grad_()
    with attach_job({"transformer": dit}, [UlyssesParallel(state.sp_group)]):
        out = forward(dit, {**kw, "x": x})
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    grads = [x.grad.clone(), dit.blocks[0].self_attn.q.weight.grad.clone()]
    for g in grads:
        dist.all_reduce(g, group=state.sp_group)
    res["grads"] = grads
    return res


def _cfg_case(state) -> dict:
    from wan.optim.guidance import GuidanceSettings, StepGuidance
    from wan.parallel import CfgParallel, CommCounter
    inp = cfg_inputs()
    dit = tiny_dit("t2v", 100)
    counter = CommCounter()
    cfg = CfgParallel(state.cfg_group, counter)
    guidance = StepGuidance(GuidanceSettings(), steps=1)
    ran: list[str] = []

    def compute(name):
        ran.append(name)
        return dit(inp["latent"][None], inp["timestep"], **inp[name])[0]

    with torch.inference_mode():
        flows = cfg.run_passes(("cond", "uncond"), compute)
        flow = guidance.combine(0, flows, 5.0, inp["latent"])
        two = (dict(counter.bytes_sent), ran[:])
        three = cfg.run_passes(("cond", "uncond", "cond_skip"), compute)
        single = cfg.run_passes(("cond",), compute)
    return {"flows": flows, "flow": flow, "two": two, "ran": ran, "three": three, "single": single}


def _fsdp_cases(state, out: Path) -> dict:
    import wan
    from wan.engine.attach import attach_job
    from wan.parallel import UlyssesParallel
    from wan.parallel.fsdp import is_sharded, shard_dit, shard_text_encoder
    res = {}
    mesh = state.fsdp_mesh
    with torch.inference_mode():
        variant, seed, kw = case_inputs("t2v_odd")
        dit = shard_dit(tiny_dit(variant, seed), mesh)
        res["dit"] = forward(dit, kw)
        res["dit_sharded"] = is_sharded(dit) and all(is_sharded(b) for b in dit.blocks)
        local = dit.blocks[0].self_attn.q.weight.to_local()
        res["dit_local_rows"] = local.shape[0]
        # TeaCache reads the time embedding outside a forward: gathered for it
        from wan.optim.step_cache import time_embeddings
        from wan.parallel.fsdp import gathered
        with gathered(dit):
            res["time_embeddings"] = time_embeddings(dit, torch.tensor([999.0, 500.0]))
        # VACE (its before_proj / after_proj run outside the blocks' forward), then with Ulysses
        variant, seed, kw = case_inputs("vace_odd")
        vace = shard_dit(tiny_dit(variant, seed), mesh)
        res["dit_vace"] = forward(vace, kw)
        with attach_job({"transformer": vace}, [UlyssesParallel(state.sp_group)]):
            res["dit_vace_ulysses"] = forward(vace, kw)
        # bf16 linears beside float32 islands: one FSDP group per dtype
        variant, seed, kw = case_inputs("vace_odd")
        mixed = shard_dit(tiny_dit(variant, seed, torch.bfloat16), mesh)
        res["dit_bf16"] = forward(mixed, kw)
        te = wan.load_text_encoder(out / T5_FILE, dtype=torch.float32)
        shard_text_encoder(te, mesh)
        res["t5"] = te(*t5_inputs())
    return res


def composed(rank: int, out: Path) -> dict:
    """cfg 2 x ulysses 2 on four processes, FSDP over all four: one guided step of a VACE DiT."""
    from wan.engine.attach import attach_job
    from wan.optim.guidance import GuidanceSettings, StepGuidance
    from wan.parallel import CfgParallel, CommCounter, ParallelConfig, UlyssesParallel, parallel_session
    from wan.parallel.fsdp import shard_dit
    config = ParallelConfig(ulysses_size=2, cfg_parallel=True, dit_fsdp=True)
    with parallel_session(config, timeout=timedelta(seconds=120)) as state:
        variant, seed, kw = case_inputs("vace_odd")
        inp = cfg_inputs()
        dit = shard_dit(tiny_dit(variant, seed), state.fsdp_mesh)
        counter = CommCounter()
        cfg = CfgParallel(state.cfg_group, counter)
        extra = {k: kw[k] for k in ("vace_context", "vace_scale")}

        def compute(name):
            return dit(inp["latent"][None], inp["timestep"], **inp[name], **extra)[0]

        with attach_job({"transformer": dit}, [UlyssesParallel(state.sp_group, counter)]), torch.inference_mode():
            flows = cfg.run_passes(("cond", "uncond"), compute)
            flow = StepGuidance(GuidanceSettings(), steps=1).combine(0, flows, 5.0, inp["latent"])
        return {"flow": flow, "mine": cfg.mine(("cond", "uncond")), "bytes": dict(counter.bytes_sent),
                "place": (state.cfg_rank, state.sp_rank)}
