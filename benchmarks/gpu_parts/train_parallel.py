"""Part 9: one LoRA training step at 1.3B shape on CUDA, and the parallel generation's process-group
path on one rank (NCCL on CUDA, gloo in the dry run).

Every case runs in a subprocess of its own under a time limit (a hang or a crash is a row with the
subprocess's stderr tail, and the next case still runs); this module is also those subprocesses'
script (``--worker train`` / ``--worker parallel``).

(a) Training, through the trainer's Python API (``wan.train.trainer.Trainer``, what ``wgp.py train``
runs; the CLI has no way to report memory): a random 1.3B-shape DiT file in the official layout
(bf16) and musubi-format latent and text caches of a 480x832, 33-frame clip (random latents,
random umT5 states), ``--fp8_base`` with ``--gradient_checkpointing``, bf16 autocast, LoRA rank 32
on the block linears, AdamW. Step time: between optimizer-step ends, the device synchronised,
median after one warm-up step. Memory: ``torch.cuda.max_memory_allocated`` / ``_reserved`` of the
trainer's process over the steps (reset once setup is done: model, LoRA, optimizer). The same
without ``--fp8_base`` for comparison when time allows.

(b) Parallel generation on a TEST model (``test-tiny-t2v``):

- ``torchrun --nproc_per_node 1 wgp.py generate --dit_fsdp --t5_fsdp ...`` (the CLI), its latents
  compared with the single-process CLI run when it succeeds. Today the project refuses FSDP in a
  one-process launch (``wan.parallel.check_parallel``), and the row says so.
- so that the process-group path is measured all the same, a ``torchrun --nproc_per_node 1``
  worker opens a one-rank group itself (``init_process_group``, the ``(cfg, sp)`` mesh as
  ``wan.parallel.init_parallel`` builds it for several ranks) and runs the engine's parallel path
  on it: ``ModelManager.get(..., sharding=Sharding(...))`` (FSDP2 over the one rank) and
  ``Engine.denoise(..., parallel=state)`` (rank 0's noise and step-saver decisions broadcast;
  Ulysses on a one-rank sp group attaches nothing), then the VAE decode, with and without
  ``--dit_fsdp --t5_fsdp``; each against the plain ``Engine.generate`` of the same request in the
  same process, with each case's peak memory (torch's counters read in the worker; the engine
  reports none). When torch's one-rank FSDP2 path fails inside the engine's ``inference_mode``
  (it does with torch 2.13 on the CPU), the FSDP case runs once more with each FSDP unit gathered
  once outside it first (:func:`prime_fsdp`), and both rows are shown.

(b) runs first (it is short); (a) has the rest of the part's time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a worker script: the part's imports need benchmarks/ and the root
    _here = Path(__file__).resolve()
    sys.path[:0] = [str(_here.parents[1]), str(_here.parents[2])]

import torch

from gpu_parts.common import ROOT, Ctx, Peak, gib, measured, ms

MODEL = "test-tiny-t2v"
PROMPT = "a fox in the snow"
TEXT_TOKENS = 24
LORA_RANK = 32
TAIL = 300  # characters of a failed subprocess's stderr shown in its row


# -- the cases' settings -------------------------------------------------------------------------


def train_settings(ctx: Ctx) -> dict:
    """The training worker's settings: shape, clip, steps (tiny in the dry run)."""
    shape = dict(ctx.dit_shape("1.3b"), in_dim=16, out_dim=16)
    shape.setdefault("text_dim", 4096)
    if ctx.dry:
        clip = {"width": 64, "height": 64, "frames": 5}
        warmup, steps = 1, 1
    else:
        clip = {"width": 832, "height": 480, "frames": 33}
        warmup, steps = 1, 3
    cases = [{"name": "fp8_base", "fp8_base": True}]
    if not ctx.dry:
        cases.append({"name": "bf16 base", "fp8_base": False})
    return {"device": str(ctx.device), "dry": ctx.dry, "shape": shape, "clip": clip, "warmup": warmup, "steps": steps,
            "cases": cases, "work": str(ctx.work), "seed": 42}


def generate_settings(ctx: Ctx) -> dict:
    """The request of every generation in (b) (the CLI's flags say the same)."""
    if ctx.dry:
        return dict(model=MODEL, prompt=PROMPT, seed=5, steps=2, width=64, height=64, frames=1)
    return dict(model=MODEL, prompt=PROMPT, seed=5, steps=4, width=96, height=64, frames=9)


def checkpoint_dir(ctx: Ctx) -> Path:
    """The TEST family's folder, shared with the engine part (written there on first use)."""
    return ctx.work / "tiny_ckpts"


# -- subprocesses ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(ctx: Ctx) -> dict:
    # the root first, and whatever PYTHONPATH holds (gpu_check.sh puts the carried wheels there)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", GRADIO_ANALYTICS_ENABLED="False")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if ctx.dry:
        env["OMP_NUM_THREADS"] = "1"  # as the tests launch torchrun on the CPU
    else:
        env.setdefault("NCCL_DEBUG", "WARN")  # NCCL's own reason reaches the stderr tail
    return env


def run_cmd(cmd: list[str], timeout: float, env: dict, log: Path) -> tuple[int | None, float, str]:
    """Runs ``cmd`` (stdout and stderr to ``log``); past ``timeout`` seconds it and every process it
    started are stopped. Returns (exit code or None on timeout, seconds, the log's tail).

    The child stays in this process's group, so the driver's kill of the part reaches it; torchrun
    starts its workers in sessions of their own, and they (like the training worker) end themselves
    when their parent goes (:func:`watch_parent`)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            code = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            stop(proc)
            code = None
    seconds = time.perf_counter() - t0
    tail = log.read_text(errors="replace")[-3000:].strip()
    # into the part's own output, which the driver keeps in its .log (the temporary folder goes)
    print(f"$ {' '.join(map(str, cmd))}\n  -> exit {code} in {seconds:.1f} s; its output's tail:\n{tail[-2000:]}\n",
          flush=True)
    return code, seconds, tail


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid`` (read from /proc), children first."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        for child in parents.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to ``proc`` (torchrun passes it on to its workers), then SIGKILL to it and to every
    process it had started."""
    below = _descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    for pid in (proc.pid, *below):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait()


def watch_parent() -> None:
    """In a worker: ends this process when its parent is gone (the part timed out or was killed),
    so that no orphan keeps the GPU's memory for the next parts."""
    import threading
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, daemon=True, name="watch-parent").start()


def short_tail(tail: str) -> str:
    """The last meaningful lines of a subprocess's output, for a row: torchrun's own report of a
    failed worker (its log lines and the launcher's traceback) left out."""
    lines = [ln for ln in tail.splitlines() if ln.strip() and not ln.startswith(("[W", "W1", "E1", "I1"))]
    for i, ln in enumerate(lines[:-1]):
        if ln.startswith("Traceback (most recent call last):") and "<frozen runpy>" in lines[i + 1]:
            lines = lines[:i]  # the launcher's traceback: everything after it is torchrun's
            break
    return " ⏎ ".join(lines)[-TAIL:]


def torchrun_cmd(script: list[str], port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_addr", "127.0.0.1",
            "--master_port", str(port), *script]


# -- (a) the training step -------------------------------------------------------------------------


def write_dit(path: Path, shape: dict, device: torch.device) -> None:
    """Random weights of a DiT of ``shape`` in the official key layout, bf16 (std 0.02), drawn on
    ``device`` (fast on a GPU) and written atomically."""
    from safetensors.torch import save_file
    from wan.models.dit import DiTConfig, WanDiT
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(DiTConfig(**shape)).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    state = {k: (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu() for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")  # another run writing the same file writes its own
    save_file(state, str(tmp))
    os.replace(tmp, path)


def write_dataset(root: Path, clip: dict, text_dim: int, items: int) -> Path:
    """musubi-format caches of ``items`` clips (random bf16 latents, random umT5 states of
    TEXT_TOKENS tokens) and the dataset TOML the trainer reads (bench_train_step.py's layout, at any
    size and text width)."""
    from wan.train.cache_files import (latent_frames, text_cache_name, video_latent_cache_name, write_latent_cache,
                                       write_text_cache)
    toml = root / "data.toml"
    if toml.exists():
        return toml
    import shutil
    w, h, frames = clip["width"], clip["height"], clip["frames"]
    g = torch.Generator().manual_seed(1)
    aside = root.with_name(f"{root.name}.tmp{os.getpid()}")  # written aside, renamed into place whole
    shutil.rmtree(aside, ignore_errors=True)
    cache, videos = aside / "cache", aside / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(items):
        name = f"clip{i}.mp4"
        lat = torch.randn(16, latent_frames(frames), h // 8, w // 8, generator=g).bfloat16()
        write_latent_cache(cache / video_latent_cache_name(name, 0, frames, (w, h)), lat, original_size=(w, h),
                           frame_count=frames)
        write_text_cache(cache / text_cache_name(name), torch.randn(TEXT_TOKENS, text_dim, generator=g).bfloat16(),
                         caption=f"clip {i}")
    (aside / "data.toml").write_text(
        f'[general]\nresolution = [{w}, {h}]\ncaption_extension = ".txt"\nbatch_size = 1\n'
        f'enable_bucket = false\n\n[[datasets]]\nvideo_directory = "{root / "videos"}"\n'
        f'cache_directory = "{root / "cache"}"\ntarget_frames = [{frames}]\nframe_extraction = "head"\n')
    try:
        os.rename(aside, root)
    except OSError:  # another run put it there first (or a half-made folder of a killed run is in the way)
        shutil.rmtree(aside, ignore_errors=True)
        if not toml.exists():
            raise
    return toml


def train_case(s: dict, case: dict, dit: Path, data: Path, out: Path) -> dict:
    """One training run of ``warmup + steps`` optimizer steps; times and memory peaks."""
    from gpu_parts.common import sync
    from wan.train.config import TrainConfig
    from wan.train.trainer import Trainer
    device = torch.device(s["device"])
    ends: list[float] = []

    class Timed(Trainer):
        def optimizer_step(self):
            norm = super().optimizer_step()
            sync(self.device)
            ends.append(time.perf_counter())
            return norm

    said: list[str] = []
    cfg = TrainConfig.of(dit=str(dit), dataset_config=str(data), device=s["device"], mixed_precision="bf16",
                         gradient_checkpointing=True, fp8_base=case["fp8_base"], network_dim=LORA_RANK,
                         network_alpha=float(LORA_RANK), optimizer_type="AdamW", learning_rate=1e-4,
                         max_grad_norm=1.0, max_train_steps=s["warmup"] + s["steps"], seed=s["seed"],
                         output_dir=str(out / case["name"].replace(" ", "_")), output_name="lora")
    t0 = time.perf_counter()
    trainer = Timed(cfg, progress=False, say=said.append)
    try:
        trainer.setup()
        sync(device)
        setup_s = time.perf_counter() - t0
        start_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
        with Peak(device) as peak:
            ends.append(time.perf_counter())
            result = trainer.train()
    finally:
        trainer.close()
    steps = [b - a for a, b in zip(ends, ends[1:])]
    timed = steps[s["warmup"]:] or steps
    return {"setup_s": setup_s, "step_s": steps, "median_step_s": statistics.median(timed),
            "peak_allocated": peak.allocated, "peak_reserved": peak.reserved, "allocated_at_start": start_alloc,
            "losses": result.losses, "estimate": [ln.strip() for ln in said if ln.strip().startswith("total on")],
            "quant": [ln for ln in said if ln.startswith("--fp8_base")]}


def worker_train(s: dict, out: Path) -> None:
    device = torch.device(s["device"])
    work = Path(s["work"])
    shape, clip = s["shape"], s["clip"]
    results: dict = {}

    def save():
        (out / "result.json").write_text(json.dumps(results, default=str))

    t0 = time.perf_counter()
    tag = f"{shape['dim']}x{shape['num_layers']}_t{shape['text_dim']}"
    dit = work / f"train_dit_{tag}_bf16.safetensors"
    if not dit.exists():
        write_dit(dit, shape, device)
    results["write_dit_s"] = time.perf_counter() - t0
    items = s["warmup"] + s["steps"]
    name = f"train_data_{clip['width']}x{clip['height']}x{clip['frames']}_t{shape['text_dim']}_{items}"
    data = write_dataset(work / name, clip, shape["text_dim"], items)
    results["prepare_s"] = time.perf_counter() - t0
    save()
    for i, case in enumerate(s["cases"]):
        if i and time.perf_counter() - t0 > s.get("second_case_before_s", 1e9):
            results[case["name"]] = {"skipped": "the part's time was short"}
            save()
            continue
        try:
            results[case["name"]] = train_case(s, case, dit, data, out)
        except Exception as e:  # the next case still runs
            traceback.print_exc()
            results[case["name"]] = {"error": f"{type(e).__name__}: {e}"[:1000]}
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def train_rows(ctx: Ctx, timeout: float, tmp: Path) -> tuple[list[list], dict]:
    s = train_settings(ctx)
    s["second_case_before_s"] = max(0.0, timeout * 0.45)  # the bf16 comparison only when the first case was quick
    spec_path, out = tmp / "train.json", tmp / "train_out"
    out.mkdir()
    spec_path.write_text(json.dumps(s))
    code, seconds, tail = run_cmd([sys.executable, str(Path(__file__).resolve()), "--worker", "train", "--spec",
                                   str(spec_path), "--out", str(out)], timeout, child_env(ctx), tmp / "train.log")
    res = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    clip, shape = s["clip"], s["shape"]
    lat_f = (clip["frames"] - 1) // 4 + 1
    tokens = lat_f * (clip["height"] // 16) * (clip["width"] // 16)
    what = (f"{shape['num_layers']} blocks of dim {shape['dim']}, {clip['width']}x{clip['height']}x{clip['frames']} "
            f"({tokens} tokens)")
    rows = []
    for case in s["cases"]:
        r = res.get(case["name"])
        label = f"train: LoRA step, {case['name']}, grad ckpt, bf16 autocast"
        if r is None:
            why = "timed out" if code is None else f"exit code {code}"
            rows.append([label, f"failed ({why} after {seconds:.0f} s): {short_tail(tail)}", "–", "–", "–", what])
        elif "error" in r or "skipped" in r:
            rows.append([label, ("failed: " + r["error"][:TAIL]) if "error" in r else "skipped: " + r["skipped"],
                         "–", "–", "–", what])
        else:
            losses = ", ".join(f"{v:.4g}" for v in r["losses"])
            estimate = "; the trainer's estimate: " + r["estimate"][0] if r.get("estimate") else ""
            rows.append([label, f"{ms(r['median_step_s'])} (setup {ms(r['setup_s'])})", gib(r["peak_allocated"]),
                         gib(r["peak_reserved"]), f"losses {losses}", what + estimate])
    return rows, {"settings": s, "result": res, "exit_code": code, "seconds": seconds}


# -- (b) parallel generation -----------------------------------------------------------------------


def prime_fsdp(dits: dict) -> int:
    """Gathers and frees each FSDP unit of the DiTs once outside ``inference_mode``. torch's FSDP2
    path for a one-rank mesh (``FSDPParamGroup.wait_for_unshard``, world size 1) allocates its
    gather buffers at the first forward, inside the engine's ``inference_mode``, and then fails
    reading their version counter ("Inference tensors do not track version counter"); buffers made
    here are plain tensors, which that path reuses. Returns the units primed."""
    from torch.distributed.fsdp import FSDPModule
    n = 0
    with torch.no_grad():
        for dit in dits.values():
            for m in dit.modules():
                if isinstance(m, FSDPModule):
                    m.unshard()
                    m.reshard()
                    n += 1
    return n


def generate_case(engine, request, ps, device: torch.device, prime: bool = False) -> dict:
    """One generation: ``Engine.generate`` in a single process (``ps`` None), else the engine's
    parallel path on ``ps`` (loading with its sharding, ``Engine.denoise`` with ``parallel``, decode);
    ``prime``: :func:`prime_fsdp` before the loop."""
    from gpu_parts.common import sync
    from wan.engine import resolve_request
    from wan.engine.model_manager import Sharding
    peak = Peak(device).__enter__()  # CUDA's counters (the process's resident peak on the CPU)
    sync(device)
    t0 = time.perf_counter()
    notices: list[str] = []
    if ps is None:
        result = engine.generate(request, write=False)
        latent, video, notices = result.latent, result.video, list(result.notices)
    else:
        req, spec = resolve_request(request, engine.registry, limits=engine.limits)
        c = ps.config
        sharding = Sharding(ps.fsdp_mesh, c.dit_fsdp, c.t5_fsdp) if (c.dit_fsdp or c.t5_fsdp) else None
        nets = engine.models.get(spec, None, None, sharding=sharding)
        notices += nets.notes
        if prime:
            notices.append(f"primed {prime_fsdp(nets.dits)} FSDP units outside inference_mode")
        latent, _ = engine.denoise(req, nets, parallel=ps, notices=notices)
        video = nets.vae.decode(latent[None].float())[0]
        notices.append("sent: " + (", ".join(f"{k} {v} B" for k, v in sorted(ps.counter.bytes_sent.items()))
                                   or "nothing"))
    sync(device)
    seconds = time.perf_counter() - t0
    peak.__exit__(None, None, None)
    out = {"seconds": seconds, "latent": latent.detach().float().cpu(), "video": video.detach().float().cpu(),
           "notices": notices, "peak_allocated": peak.allocated, "peak_reserved": peak.reserved}
    engine.models.release()  # sharded networks must not outlive their process group
    return out


def worker_parallel(s: dict, out: Path) -> None:
    """Under ``torchrun --nproc_per_node 1``: the single-process generation, then a one-rank group
    (NCCL on CUDA, gloo on the CPU) and the engine's parallel path on it, with and without FSDP."""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from wan.engine import Engine, GenerationRequest
    from wan.parallel import Launch, ParallelConfig, ParallelState
    from wan.parallel.groups import MESH_DIMS
    launch = Launch.from_env()
    device = torch.device("cuda", launch.local_rank) if s["device"] == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results: dict = {"launch": [launch.rank, launch.world_size, launch.local_rank]}

    def save():
        (out / "result.json").write_text(json.dumps(results, default=str))

    def record(name: str, fn, ref=None):
        try:
            r = fn()
        except Exception as e:  # the next case still runs
            traceback.print_exc()
            results[name] = {"error": f"{type(e).__name__}: {e}"[:1000]}
            save()
            return None
        entry = {k: v for k, v in r.items() if k not in ("latent", "video")}
        if ref is not None:
            entry["max_abs_latent"] = (r["latent"] - ref["latent"]).abs().max().item()
            entry["max_abs_frames"] = (r["video"] - ref["video"]).abs().max().item()
        results[name] = entry
        save()
        return r

    # no text cache: every case runs the text encoder (sharded with --t5_fsdp)
    engine = Engine(checkpoint_dir=s["checkpoint_dir"], device=device, lora_dir=None, text_cache_mb=0)
    request = GenerationRequest(**s["request"])
    try:  # warm-up: first-call costs (CUDA context, kernels, the TEST files written) out of the rows
        engine.generate(request, write=False)
    except Exception as e:  # the cases below fail alike and say why
        traceback.print_exc()
        results["warmup_error"] = f"{type(e).__name__}: {e}"[:1000]
    engine.models.release()
    ref = record("single", lambda: generate_case(engine, request, None, device))
    backend = "nccl" if device.type == "cuda" else "gloo"
    t0 = time.perf_counter()
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timedelta(seconds=60),
                            **kwargs)
    try:
        mesh = init_device_mesh(device.type, (1, launch.world_size), mesh_dim_names=MESH_DIMS)
        results["group"] = {"backend": dist.get_backend(), "world_size": dist.get_world_size(),
                            "init_s": time.perf_counter() - t0}
        save()
        fsdp = ParallelConfig(dit_fsdp=True, t5_fsdp=True)
        for name, config, prime in (("fsdp", fsdp, False), ("plain", ParallelConfig(), False)):
            state = ParallelState(config, launch, device, mesh, owned=False)
            record(name, lambda: generate_case(engine, request, state, device, prime), ref)
        if "error" in results.get("fsdp", {}):  # torch's one-rank FSDP2 path under inference_mode: once more, primed
            state = ParallelState(fsdp, launch, device, mesh, owned=False)
            record("fsdp_primed", lambda: generate_case(engine, request, state, device, True), ref)
    finally:
        engine.models.release()
        if dist.is_initialized():
            dist.destroy_process_group()


def cli_args(ctx: Ctx, out: Path) -> list[str]:
    """``wgp.py generate`` of one frame (a PNG, no ffmpeg needed) with its latents written too."""
    r = generate_settings(ctx)
    return [str(ROOT / "wgp.py"), "generate", "--model", r["model"], "--prompt", r["prompt"], "--seed", str(r["seed"]),
            "--steps", str(r["steps"]), "--width", str(r["width"]), "--height", str(r["height"]), "--frames", "1",
            "--save_latents", "--quiet", "--checkpoint_dir", str(checkpoint_dir(ctx)), "--output_dir", str(out)]


def read_latents(folder: Path) -> torch.Tensor | None:
    from safetensors import safe_open
    files = sorted(folder.glob("*.safetensors")) if folder.exists() else []
    if not files:
        return None
    with safe_open(str(files[0]), "pt") as f:
        return f.get_tensor(next(iter(f.keys()))).float()


def parallel_rows(ctx: Ctx, deadline: float, tmp: Path) -> tuple[list[list], dict]:
    rows, data = [], {}
    env = child_env(ctx)
    backend = "NCCL" if ctx.cuda else "gloo"

    # the worker: single process, then the one-rank group with and without FSDP
    s = {"device": ctx.device.type, "checkpoint_dir": str(checkpoint_dir(ctx)), "request": generate_settings(ctx)}
    spec_path, out = tmp / "parallel.json", tmp / "parallel_out"
    out.mkdir()
    spec_path.write_text(json.dumps(s))
    limit = min(60.0, deadline - time.perf_counter() - 20)
    code, seconds, tail = run_cmd(torchrun_cmd([str(Path(__file__).resolve()), "--worker", "parallel", "--spec",
                                                str(spec_path), "--out", str(out)], free_port()),
                                  limit, env, tmp / "parallel.log")
    res = json.loads((out / "result.json").read_text()) if (out / "result.json").exists() else {}
    data["worker"] = {"result": res, "exit_code": code, "seconds": seconds}
    group = res.get("group", {})
    labels = {"single": "generate: one process, no group (Engine.generate)",
              "fsdp": f"generate: torchrun 1 rank, {backend} group, --dit_fsdp --t5_fsdp (Engine.denoise)",
              "fsdp_primed": "generate: the same, FSDP units primed outside inference_mode (Engine.denoise)",
              "plain": f"generate: torchrun 1 rank, {backend} group, no FSDP (Engine.denoise)"}
    for name, label in labels.items():
        r = res.get(name)
        if name == "fsdp_primed" and r is None and "error" not in res.get("fsdp", {"error": ""}):
            continue  # run only when the plain FSDP case failed
        if r is None:
            why = ("timed out" if code is None else f"exit code {code}") + f" after {seconds:.0f} s"
            rows.append([label, f"failed ({why}): {short_tail(tail)}", "–", "–", "–", "–"])
        elif "error" in r:
            why = ("torch's FSDP2 path for one rank (world size 1) inside the engine's inference_mode"
                   if "Inference tensors do not track version counter" in r["error"] else "–")
            rows.append([label, "failed: " + r["error"][:TAIL], "–", "–", "–", why])
        else:
            vs = ("reference" if name == "single" else
                  f"max Δ latent {r['max_abs_latent']:.3g}, frames {r['max_abs_frames']:.3g}")
            extra = [n for n in r.get("notices", []) if "sharded" in n or n.startswith("sent:") or "parallel" in n]
            if name != "single" and group:
                extra.insert(0, f"group init {ms(group.get('init_s'))}")
            rows.append([label, ms(r["seconds"]), gib(r.get("peak_allocated")), gib(r.get("peak_reserved")), vs,
                         "; ".join(extra)[:TAIL] or "–"])

    # the CLI: torchrun --nproc_per_node 1 wgp.py generate --dit_fsdp --t5_fsdp
    label = "CLI: torchrun --nproc_per_node 1 wgp.py generate --dit_fsdp --t5_fsdp"
    left = deadline - time.perf_counter()
    if ctx.dry:  # it only shows the refusal today; the dry run saves its launch
        rows.append([label, "skipped: the dry run (the GPU run shows whether the CLI takes one process)",
                     "–", "–", "–", "–"])
        return rows, data
    if left < 15:
        rows.append([label, "skipped: the part's time was short", "–", "–", "–", "–"])
        return rows, data
    cli_out = tmp / "cli_fsdp"
    code, seconds, tail = run_cmd(torchrun_cmd([*cli_args(ctx, cli_out), "--dit_fsdp", "--t5_fsdp"], free_port()),
                                  min(45.0, left - 5), env, tmp / "cli_fsdp.log")
    data["cli_fsdp"] = {"exit_code": code, "seconds": seconds}
    if code != 0:
        refused = code is not None and ("error: --" in tail or code == 2)  # the CLI's exit 2, torchrun's 1
        what = "timed out" if code is None else (f"refused (exit {code})" if refused else f"failed (exit {code})")
        rows.append([label, f"{what} after {seconds:.0f} s: {short_tail(tail)}", "–", "–", "–",
                     "one frame, --save_latents"])
        return rows, data
    fsdp_latent = read_latents(cli_out)
    left = deadline - time.perf_counter()
    vs = "–"
    if left > 15 and fsdp_latent is not None:
        single_out = tmp / "cli_single"
        code1, seconds1, tail1 = run_cmd([sys.executable, *cli_args(ctx, single_out)], min(40.0, left - 5), env,
                                         tmp / "cli_single.log")
        data["cli_single"] = {"exit_code": code1, "seconds": seconds1}
        single_latent = read_latents(single_out)
        if code1 == 0 and single_latent is not None:
            vs = f"max Δ latent {(fsdp_latent - single_latent).abs().max().item():.3g} (vs the CLI in one process)"
        else:
            vs = f"the single-process CLI run failed: {short_tail(tail1)}"
    elif fsdp_latent is None:
        vs = "no latents file written"
    rows.append([label, ms(seconds) + " (whole launch)", "–", "–", vs, "one frame, --save_latents"])
    return rows, data


# -- the part ----------------------------------------------------------------------------------------


def run(ctx: Ctx) -> dict:
    t0 = time.perf_counter()
    deadline = t0 + ctx.time_left() - 10.0  # a margin for the report
    columns = ["case", "time", "peak allocated", "peak reserved", "against", "details"]
    data: dict = {}
    with tempfile.TemporaryDirectory(prefix="gc_train_parallel_") as tmp_name:
        tmp = Path(tmp_name)
        # (b) first: short; (a) gets the rest of the time
        rows, data["parallel"] = parallel_rows(ctx, min(deadline, t0 + (55.0 if ctx.dry else 65.0)), tmp)
        left = deadline - time.perf_counter()
        if left < 20:
            rows.append(["train: LoRA step", "skipped: the part's time was short", "–", "–", "–", "–"])
        else:
            train, data["train"] = train_rows(ctx, left - 5, tmp)
            rows = train + rows
    notes = [
        "train: the trainer's Python API (Trainer with its optimizer_step timed; wgp.py train runs the same class) on "
        "a random DiT in the official layout and musubi-format caches; time = median step after one warm-up, the "
        "device synchronised; peaks = torch.cuda.max_memory_allocated/_reserved of the trainer's process over the "
        "steps (the process's resident peak in the dry run); LoRA rank 32 on the block linears, AdamW, batch 1.",
        "generate: test-tiny-t2v, the same request in every row (" + ", ".join(
            f"{k} {v}" for k, v in generate_settings(ctx).items() if k not in ("model", "prompt")) + "); the worker "
        "is started by torchrun --nproc_per_node 1 and opens the one-rank group itself, because the project's "
        "parallel_session refuses FSDP with one process (see the CLI row). Peaks: torch.cuda counters in the "
        "worker over each case, loading included (the engine reports none); with one rank FSDP shards nothing, so "
        "they show the gathers' overhead, not a saving.",
    ]
    import importlib.util
    needed = (("sentencepiece", "writes the TEST family's tokenizer on first use: wan.testing.tiny_encoders"),
              ("PIL", "imported by wan.train.timesteps, so by the trainer; the CLI's PNG writer"))
    missing = [f"{mod} ({why})" for mod, why in needed if importlib.util.find_spec(mod) is None]
    if missing:
        notes.append("not importable here: " + "; ".join(missing))
    if ctx.dry:
        notes.append("dry run: the CPU, gloo; tiny DiT, one timed step, no bf16-base comparison; peaks are the "
                     "process's resident memory.")
    return measured(columns, rows, notes=notes, data=data)


# -- the workers' entry ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="a worker of the GPU check's train_parallel part")
    ap.add_argument("--worker", choices=("train", "parallel"), required=True)
    ap.add_argument("--spec", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    spec = json.loads(args.spec.read_text())
    watch_parent()
    (worker_train if args.worker == "train" else worker_parallel)(spec, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
