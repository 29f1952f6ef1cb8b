"""Parallel generation end to end: ``torchrun ... wgp.py generate --ulysses_size 2`` (and
``--cfg_parallel``) on two CPU processes (gloo) against the single-process output, the engine's
parallel path for more tasks and TeaCache, and bad settings named before any model loads.

Two launches of two processes: ``wgp.py generate --ulysses_size 2``, and this file run as a
script under torchrun (:func:`engine_scenarios`: ``generate --cfg_parallel`` through the CLI's
entry, then the engine's parallel path), whose ranks save what they got for the tests to compare
with single-process references computed here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from wan.engine.request import LoraChoice

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a fox in the snow"
FRAMES = 5  # 2 latent frames: the decode is most of a tiny run's time


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, timeout: float = 240) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m torch.distributed.run --nproc_per_node 2 ARGS`` on a free port; (result, seconds)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONPATH=str(ROOT))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    begin = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(free_port()), *map(str, args)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return r, time.perf_counter() - begin


def read_video(path) -> np.ndarray:
    import av
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def engine(ckpts):
    from wan.engine import Engine
    return Engine(checkpoint_dir=ckpts, device="cpu")


@pytest.fixture(scope="module")
def single(engine, tmp_path_factory):
    """The single-process output of the CLI's request (the engine, in this process: the CLI's
    tests hold the two equal)."""
    from wan.engine import GenerationRequest
    out = tmp_path_factory.mktemp("single")
    result = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt=PROMPT, steps=2, seed=5, frames=FRAMES,
                                               output_dir=str(out)))
    return read_video(next(p for p in result.files if p.suffix == ".mp4"))


def reference_latent(engine, request, savers=None) -> torch.Tensor:
    """The single-process final latent of ``request`` (the loop of ``Engine.generate``, without
    decoding, which the parallel run's rank 0 did)."""
    from wan.engine import resolve_request
    req, spec = resolve_request(request, engine.registry)
    profile, savers = engine._profile_and_savers(req, spec, savers)
    nets = engine.models.get(spec, profile)
    return engine.denoise(req, nets, savers=savers, loras=engine._loras(req, nets, profile),
                          attention=profile.attention if profile else ("sdpa",))[0]


CLI_ARGS = ["generate", "--model", "test-tiny-t2v", "--prompt", PROMPT, "--steps", "2", "--seed", "5", "--frames",
            str(FRAMES), "--quiet"]


def check_cli_output(stdout: str, out: Path, single: np.ndarray) -> None:
    """One video (and its sidecar), printed once and written once, equal to the single-process one."""
    assert len([p for p in stdout.split() if p.endswith(".mp4")]) == 1, stdout  # rank 0 alone prints
    assert sorted(p.suffix for p in out.iterdir()) == [".json", ".mp4"]      # and alone writes
    frames = read_video(next(out.glob("*.mp4")))
    assert frames.shape == single.shape
    assert np.abs(frames.astype(int) - single.astype(int)).max() <= 1


def test_torchrun_wgp_generate_ulysses_equals_the_single_process_file(ckpts, single, tmp_path):
    out = tmp_path / "out"
    r, seconds = torchrun(ROOT / "wgp.py", *CLI_ARGS, "--checkpoint_dir", ckpts, "--output_dir", out,
                          "--ulysses_size", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    check_cli_output(r.stdout, out, single)
    print(f"torchrun 2 processes, wgp.py generate --ulysses_size 2: {seconds:.1f} s")


def test_torchrun_generate_cfg_parallel_equals_the_single_process_file(ranks, single):
    """``generate --cfg_parallel`` (cfg 2 x ulysses 1) through the CLI's entry (``wan.cli.main``,
    all that ``wgp.py`` calls) on the ranks of the engine scenarios' launch, which saves a launch."""
    results, folder = ranks
    assert [r["cli_cfg"]["code"] for r in results] == [0, 0]
    check_cli_output(results[0]["cli_cfg"]["stdout"] + results[1]["cli_cfg"]["stdout"], folder.parent / "cli_cfg",
                     single)


# ---------------------------------------------------------------------------------------------
# The engine's parallel path, in one launch of this file


MODELS = {"vace": "test-tiny-vace", "ti2v": "test-tiny-ti2v", "a14b": "test-tiny-t2v-a14b", "fsdp": "test-tiny-t2v",
          "nag_cfg": "test-tiny-t2v", "nag_ulysses": "test-tiny-t2v-a14b"}
# NAG across processes: beside CFG 5 with the passes split over two ranks (the prompt's pass, which
# NAG guides, on rank 0 alone); and at guidance 1 under Ulysses (tokens split: NAG's norms are per
# token) on the two-expert model, with a scale per guidance phase
NAG = {"nag_cfg": dict(nag_scale=4.0, guidance=5.0, negative_prompt="blurry, grey"),
       "nag_ulysses": dict(nag_scale=4.0, nag2_scale=2.0, guidance=1.0, guidance_high_noise=1.0,
                           negative_prompt="blurry, grey")}


def _inputs(folder: Path, write: bool = True) -> dict:
    """Request fields of each scenario, with the VACE and TI2V input files (written by rank 0 when
    ``write``, read by every rank)."""
    if write:
        _write_inputs(folder)
    return {name: dict(model=MODELS[name], **kw) for name, kw in {
        "vace": dict(control_video=str(folder / "clip.mp4"), mask_video=str(folder / "mask.mp4"),
                     ref_images=[str(folder / "ref.png")]),
        "ti2v": dict(image=str(folder / "start.png")),
        "a14b": {},
        "fsdp": dict(loras=[LoraChoice(str(folder / "lora.safetensors"), "0.8")]),
        **NAG}.items()}


def _write_inputs(folder: Path) -> None:
    import av
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    lora = {}
    for b in (0, 1):  # musubi-tuner's layout, on the self-attention q and the FFN's first layer
        for layer, (out_dim, in_dim) in {"self_attn_q": (256, 256), "ffn_0": (512, 256)}.items():
            key = f"lora_unet_blocks_{b}_{layer}"
            lora[f"{key}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.2
            lora[f"{key}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.2
            lora[f"{key}.alpha"] = torch.tensor(4.0)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(folder / "lora.safetensors"))
    from PIL import Image
    g = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(g.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(folder / "ref.png")
    Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "start.png")
    for name in ("clip.mp4", "mask.mp4"):
        with av.open(str(folder / name), "w") as c:
            s = c.add_stream("libx264", rate=16)
            s.width, s.height, s.pix_fmt = 64, 64, "yuv420p"
            for _ in range(9):
                c.mux(s.encode(av.VideoFrame.from_ndarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8),
                                                          format="rgb24")))
            c.mux(s.encode())


def _teacache_savers(threshold: float):
    """TeaCache savers whose runner notes the (step, pass) it reused; returns (savers, runners made)."""
    from wan.optim.step_cache import StepRunner
    from wan.optim.step_savers import StepSavers
    made: list = []

    class Recording(StepRunner):
        def __call__(self, dit, tokens, inputs):
            before = self.reused
            out = super().__call__(dit, tokens, inputs)
            if self.reused > before:
                self.skipped.append((self.step, self.pass_name))
            return out

    class Savers(StepSavers):
        def runner(self, networks, sampler, start):
            runner = Recording(schedule=super().runner(networks, sampler, start).schedule)
            runner.skipped = []
            made.append(runner)
            return runner

    return Savers(teacache_threshold=threshold), made


# TeaCache threshold of rank 0 (skips steps) and of rank 1 (computes every step): rank 0's schedule wins
TEACACHE = (1.5, 0.0)  # the tiny model's raw step distances are about 1: 1.5 skips every other step


def _cli(out: Path, ckpts: Path) -> dict:
    """``generate --cfg_parallel`` through the CLI's entry on this rank; its exit code and stdout."""
    import contextlib
    import io
    from wan.cli import main
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*CLI_ARGS, "--checkpoint_dir", str(ckpts), "--output_dir", str(out / "cli_cfg"),
                     "--cfg_parallel"])
    return {"code": code, "stdout": stdout.getvalue()}


def engine_scenarios(out: Path, ckpts: Path) -> None:
    """Runs on each rank under torchrun; saves ``out/rank<r>.pt``."""
    import torch.distributed as dist
    from wan.engine import Engine, GenerationRequest
    from wan.parallel import ParallelConfig, parallel_session
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    inputs = _inputs(out / "inputs") if rank == 0 else None
    res: dict = {}
    with parallel_session(ParallelConfig(ulysses_size=2)):  # one process group for every generation
        box = [inputs]  # rank 0 has written the files
        dist.broadcast_object_list(box)
        inputs = box[0]
        res["cli_cfg"] = _cli(out, ckpts)
        engine = Engine(checkpoint_dir=ckpts, device="cpu")
        runs = {"vace": (ParallelConfig(ulysses_size=2), dict(seed=-1)),
                "ti2v": (ParallelConfig(cfg_parallel=True), dict(seed=7)),
                "a14b": (ParallelConfig(ulysses_size=2), dict(seed=8)),
                "fsdp": (ParallelConfig(ulysses_size=2, dit_fsdp=True, t5_fsdp=True), dict(seed=11)),
                "nag_cfg": (ParallelConfig(cfg_parallel=True), dict(seed=12)),
                "nag_ulysses": (ParallelConfig(ulysses_size=2), dict(seed=13))}
        for name, (config, extra) in runs.items():
            begin = time.perf_counter()
            req = GenerationRequest(prompt=PROMPT, steps=2, frames=FRAMES, **inputs[name], **extra)
            result = engine.generate(req, write=False, parallel=config)
            res[name] = {"latent": result.latent, "seed": result.request.seed, "video": result.video,
                         "files": result.files, "notices": result.notices, "seconds": time.perf_counter() - begin,
                         "comm": result.comm_bytes, "passes": [len(step.passes) for step in result.steps]}
        savers, made = _teacache_savers(TEACACHE[rank])
        req = GenerationRequest(model="test-tiny-t2v", prompt=PROMPT, steps=6, seed=9, frames=FRAMES)
        result = engine.generate(req, write=False, savers=savers, parallel=ParallelConfig(ulysses_size=2))
        res["teacache"] = {"latent": result.latent, "skipped": made[0].skipped}
        try:  # MagCache without a table: a parallel run cannot record one
            engine.generate(req.replace(profile_overrides={"step_savers.magcache.enabled": True}), write=False,
                            parallel=ParallelConfig(ulysses_size=2))
            res["magcache"] = None
        except ValueError as e:
            res["magcache"] = str(e)
    torch.save(res, out / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    r, seconds = torchrun(Path(__file__), out, ckpts)
    assert r.returncode == 0, r.stderr[-4000:]
    print(f"torchrun 2 processes, engine scenarios: {seconds:.1f} s")
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in range(2)], out / "inputs"


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return a.shape == b.shape and (a - b).abs().max().item() <= rel * b.abs().max().item()


@pytest.mark.parametrize("name", ["vace", "ti2v", "a14b", "fsdp"])
def test_engine_tasks_in_parallel_equal_single_process(name, ranks, engine):
    from wan.engine import GenerationRequest
    results, folder = ranks
    inputs = _inputs(folder, write=False)  # the files the ranks read
    main, other = results[0][name], results[1][name]
    assert main["seed"] == other["seed"] and main["seed"] >= 0  # rank 0's seed (drawn for the VACE run's -1)
    assert main["files"] == [] and other["files"] == []  # write=False
    assert main["video"] is not None and other["video"] is None  # rank 0 alone decodes
    ref = reference_latent(engine, GenerationRequest(prompt=PROMPT, steps=2, frames=FRAMES, seed=main["seed"],
                                                     **inputs[name]))
    assert close(main["latent"], ref) and close(other["latent"], ref)
    if name == "fsdp":  # the DiT and umT5 sharded; the LoRA's hooks on every targeted layer
        assert any("transformer: blocks sharded over 2 processes" in n for n in main["notices"])
        assert any("text encoder: blocks sharded over 2 processes" in n for n in main["notices"])
        assert not any("LoRA" in n for n in main["notices"]), main["notices"]  # no partial match
        plain = reference_latent(engine, GenerationRequest(prompt=PROMPT, steps=2, frames=FRAMES, seed=main["seed"],
                                                           model=MODELS[name]))
        assert not close(plain, ref, 1e-2)  # the LoRA changed the output


@pytest.mark.parametrize("name", ["nag_cfg", "nag_ulysses"])
def test_nag_in_parallel_equals_single_process(name, ranks, engine):
    """NAG's guided cross-attention under CFG parallel (the guided pass on one rank) and Ulysses (a
    scale per phase, tokens split) gives the single-process latent; without NAG it would differ."""
    from wan.engine import GenerationRequest
    results, _ = ranks
    req = GenerationRequest(prompt=PROMPT, steps=2, frames=FRAMES, model=MODELS[name], seed=results[0][name]["seed"],
                            **NAG[name])
    ref = reference_latent(engine, req)
    assert close(results[0][name]["latent"], ref) and close(results[1][name]["latent"], ref)
    assert any(n.startswith("NAG on the prompt's cross-attention: scale 4") for n in results[0][name]["notices"])
    assert not close(reference_latent(engine, req.replace(nag_scale=1.0, nag2_scale=None)), ref, 1e-2)


@pytest.mark.parametrize("name", ["a14b", "ti2v"])
def test_bytes_counted_in_a_generation_equal_the_performance_model(name, ranks, engine):
    """What each rank sent in a whole TEST generation (Ulysses: a14b; CFG parallel: ti2v) is what
    ``wan.parallel.perf_model`` predicts from the model's dimensions (float32 on the CPU)."""
    from wan.parallel import perf_model as pm
    results, _ = ranks
    arch = engine.registry.get(MODELS[name]).arch
    for r in results:
        run = r[name]
        c, f, h, w = run["latent"].shape
        if name == "a14b":  # ulysses 2: every pass is a forward on half the tokens
            tokens = f * (h // arch.patch_size[1]) * (w // arch.patch_size[2])
            per = pm.ulysses_forward_bytes(arch, tokens, 2, elem_bytes=4)
            expected = {k: v * sum(run["passes"]) for k, v in per.items()}
        else:  # cfg 2: one all-gather of the predictions per step with two passes
            expected = {"all_gather": sum(pm.cfg_step_bytes((c, f, h, w), 2, p) for p in run["passes"])}
        assert run["comm"] == expected and sum(expected.values()) > 0


def test_teacache_skips_the_same_steps_on_every_rank(ranks, engine):
    from wan.engine import GenerationRequest
    results, _ = ranks
    skipped = [r["teacache"]["skipped"] for r in results]
    assert skipped[0] == skipped[1] and skipped[0], skipped  # rank 1's own threshold would skip nothing
    savers, made = _teacache_savers(TEACACHE[0])
    ref = reference_latent(engine, GenerationRequest(model="test-tiny-t2v", prompt=PROMPT, steps=6, seed=9,
                                                     frames=FRAMES), savers)
    assert made[0].skipped == skipped[0]
    assert close(results[0]["teacache"]["latent"], ref)


def test_magcache_recording_is_refused_in_parallel(ranks):
    results, _ = ranks
    for r in results:
        assert r["magcache"] and "MagCache" in r["magcache"] and "single process" in r["magcache"]


# ---------------------------------------------------------------------------------------------
# Bad settings, named before any model loads (in this process: the CLI's own checks)


BAD = {
    "heads": (["--model", "wan2.1-t2v-1.3B", "--ulysses_size", "5"], "--ulysses_size 5: must divide the model's 12"),
    "no_torchrun": (["--model", "test-tiny-t2v", "--ulysses_size", "2"], "torchrun --nproc_per_node 2"),
    "guidance_one": (["--model", "test-tiny-t2v", "--cfg_parallel", "--guidance", "1"],
                     "--cfg_parallel (on): guidance is 1"),
    "ring": (["--model", "test-tiny-t2v", "--ring_size", "2"], "--ring_size 2: ring attention is not available"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_parallel_settings_are_named_before_loading(case, tmp_path, capsys, monkeypatch):
    from wan.cli import main
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    args, words = BAD[case]
    code = main(["generate", *args, "--prompt", "x", "--checkpoint_dir", str(tmp_path / "ck"),
                 "--output_dir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and words in err, err
    assert not (tmp_path / "ck").exists() and not (tmp_path / "out").exists()  # nothing loaded or written


if __name__ == "__main__":  # under torchrun: python -m torch.distributed.run ... this_file OUT CKPTS
    engine_scenarios(Path(sys.argv[1]), Path(sys.argv[2]))
