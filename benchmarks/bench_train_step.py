"""One LoRA training step at Wan 2.1 1.3B shape: Wan Studio's trainer against musubi-tuner's, same run.

    .venv/bin/python benchmarks/bench_train_step.py --musubi /tmp/musubi --musubi-python /tmp/musubi-venv/bin/python
    .venv/bin/python benchmarks/bench_train_step.py --musubi /tmp/musubi --musubi-python ... --frames 1 --size 64 \\
        --steps 1 --rounds 1                                    (plumbing check, ~5 min)

``--musubi`` is a checkout of musubi-tuner's public source (its ``src/musubi_tuner`` is imported from
there, nothing of it is copied here); ``--musubi-python`` a Python with the packages its Wan training
imports (torch, accelerate, diffusers, transformers, av, cv2, toml, voluptuous ...). See README.md.

Both sides run their whole training loop, each in its own subprocess, on the same files: one random
1.3B-shape DiT checkpoint in the official key layout (bf16, the file of bench_dit.py) and one dataset of
musubi-format latent and text caches (random latents of a short clip, random umT5 states), with the same
settings: bf16 mixed precision, gradient checkpointing, batch 1, LoRA rank/alpha on the 300 block linears
(musubi's networks.lora_wan targets), AdamW, gradient clipping 1.0, musubi's default timestep sampling.

- musubi: ``wan_train_network.main()`` with its own command line (``--sdpa --max_data_loader_n_workers 0``),
  its trainer class subclassed only to read clocks in its documented hooks (``on_train_start``,
  ``on_post_optimizer_step``) and, on the CPU, to hold its float32-autocast modules in float32
  (``on_transformer_loaded``, see ``_musubi_cpu_fixes``).
- ours: ``wan.train.trainer.Trainer`` from a :class:`TrainConfig` with the same settings.

Step time: the interval between consecutive optimizer-step ends (data, forward, loss, backward with the
recomputation, clipping, AdamW), wall clock and process CPU time (all threads); the first ``--warmup``
steps are not counted. The subprocesses alternate ``--rounds`` times (ours, musubi, musubi, ours, ...)
so that a change of machine load hits both. Each subprocess also times a bf16 GEMM right before and right
after its steps, so every step time can be set against the rate the machine gave at that moment.

Memory: peak resident memory (VmHWM) over the training steps, reset when the loop starts (model loaded,
LoRA attached, optimizer built), and the growth above the resident size at that point; the process's
whole peak (getrusage, loading included) beside it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from memory import AllocatedPeak, peak_bytes, reset_peak  # noqa: E402  (stdlib only: the musubi interpreter imports it too)

CACHE = ROOT / "benchmarks" / ".cache"
SHAPE_13B = dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16, text_dim=4096, text_len=512)
TEXT_TOKENS = 24
SEED = 42


# -- measurement helpers (both interpreters) -------------------------------------------------------


def gemm_rate(seconds: float = 1.0) -> float:
    """bf16 GEMM rate (FLOP/s) now: a 2048x1536 @ 1536x8960 product (a 1.3B FFN layer on 2048 tokens),
    the median of the repeats that fit in ``seconds``."""
    a = torch.randn(2048, 1536).bfloat16()
    b = torch.randn(1536, 8960).bfloat16()
    a @ b
    times, end = [], time.perf_counter() + seconds
    while not times or time.perf_counter() < end:
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 * 1536 * 8960 / statistics.median(times)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _busy_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, of this process): /proc/stat's first line without idle and
    iowait, and this process's utime + stime (all its threads)."""
    with open("/proc/stat") as fh:
        f = [int(v) for v in fh.readline().split()[1:9]]
    with open("/proc/self/stat") as fh:
        own = fh.read().rsplit(")", 1)[1].split()
    return sum(f) - f[3] - f[4], int(own[11]) + int(own[12])


def _minor_faults() -> int:
    """Pages this process has touched for the first time so far (fresh memory from the kernel)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


class StepClock:
    """Clocks read at the loop start and at each optimizer step's end; memory peak reset at the start.
    ``others``: the cores other processes kept busy during each step (the machine is shared)."""

    def __init__(self, total_steps: int, profile_step: int | None = None):
        self.total = total_steps
        self.profile_step, self.profiler = profile_step, None
        self.walls: list[float] = []
        self.cpus: list[float] = []
        self.jiffies: list[tuple[int, int]] = []
        self.faults: list[int] = []
        self.result: dict = {}

    def _read(self) -> None:
        self.walls.append(time.perf_counter())
        self.cpus.append(time.process_time())
        self.jiffies.append(_busy_jiffies())
        self.faults.append(_minor_faults())

    def start(self, *modules) -> None:
        """``modules``: the DiT and the LoRA network, whose parameter and buffer bytes are recorded."""
        self.result["weights_bytes"] = sum(t.numel() * t.element_size() for m in modules
                                           for t in (*m.parameters(), *m.buffers()))
        self.result["gemm_before"] = gemm_rate()
        self.result["rss_start"] = reset_peak()
        self.result["rss_file_start"] = _status_kib("RssFile") * 1024
        self.allocated = AllocatedPeak(interval=0.005)
        self.result["allocated_start"] = self.allocated.start()
        self._read()

    def step(self, loss: float | None = None) -> None:
        self._read()
        done = len(self.walls) - 1
        if self.profiler is not None:  # the profiled step ended: its top operators go to the log (stderr)
            self.profiler.__exit__(None, None, None)
            print(self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), file=sys.stderr)
            print(self.profiler.key_averages(group_by_input_shape=True).table(
                sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=40,
                max_shapes_column_width=70), file=sys.stderr)
            self.profiler = None
        if self.profile_step is not None and done == self.profile_step - 1:
            from torch.profiler import ProfilerActivity, profile
            self.profiler = profile(activities=[ProfilerActivity.CPU], record_shapes=True)
            self.profiler.__enter__()
        if done == self.total:
            self.result["peak_steps"] = peak_bytes()
            self.result["allocated_peak"] = self.allocated.stop()
            self.result["rss_file_end"] = _status_kib("RssFile") * 1024
            self.result["gemm_after"] = gemm_rate()

    def report(self) -> dict:
        out = dict(self.result)
        out["wall"] = [b - a for a, b in zip(self.walls, self.walls[1:])]
        out["cpu"] = [b - a for a, b in zip(self.cpus, self.cpus[1:])]
        out["faults"] = [b - a for a, b in zip(self.faults, self.faults[1:])]
        hz = os.sysconf("SC_CLK_TCK")
        out["others"] = [((b[0] - a[0]) - (b[1] - a[1])) / hz / w
                         for a, b, w in zip(self.jiffies, self.jiffies[1:], out["wall"])]
        out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out["threads"] = torch.get_num_threads()
        out["torch"] = torch.__version__
        return out


# -- the step FLOPs ----------------------------------------------------------------------------------


def step_flops(tokens: int, rank: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one training step of the reference computation (the text padded to
    512 rows, as musubi and the original code do), matmuls and attention only.

    Per block, on n video tokens and T = 512 text rows (d = 1536, f = 8960):
      forward   Fb = 2 [4 n d^2 (self q,k,v,o) + 2 n d^2 (cross q,o) + 2 T d^2 (cross k,v)
                        + 2 n d f (ffn) + 2 n^2 d (self-attention) + 2 n T d (cross-attention)] + LoRA
      LoRA      2 r (in + out) per row for each of the 10 adapters (k,v adapters on the T text rows)
    Outside the blocks: the text embedding 2 T (4096 d + d^2) (video patch/time/head layers: < 0.1%).

    The DiT is frozen, so the backward needs the gradients of the activations only, never those of the
    base weights: each frozen linear costs its forward once more (dX = dY W), the attention products
    twice their forward (dQ, dK from dS and dV, dP), the adapters twice (input and weight gradients);
    the cross-attention k,v projections of the text need no backward at all (nothing trainable feeds
    them). With gradient checkpointing every block runs its forward twice. So

      step = forward (all)  +  recompute (blocks)  +  backward (blocks)
           ~ 3 x the block forward: the usual "forward + 2x backward" is for trained base weights.
    """
    d, f, layers, T = SHAPE_13B["dim"], SHAPE_13B["ffn_dim"], SHAPE_13B["num_layers"], SHAPE_13B["text_len"]
    n = tokens
    lin_video = 2 * (4 * n * d * d + 2 * n * d * d + 2 * n * d * f)
    lin_text = 2 * (2 * T * d * d)
    attn = 2 * (2 * n * n * d + 2 * n * T * d)
    lora = 2 * rank * (6 * n * 2 * d + 2 * T * 2 * d + n * (d + f) * 2)
    block_fwd = lin_video + lin_text + attn + lora
    text_embed = 2 * T * (SHAPE_13B["text_dim"] * d + d * d)
    forward = layers * block_fwd + text_embed
    recompute = layers * block_fwd
    backward = layers * (lin_video + 2 * attn + 2 * lora)
    return {"forward": forward, "recompute": recompute, "backward": backward,
            "step": forward + recompute + backward}


# -- ours (the project's interpreter) ----------------------------------------------------------------


def case_ours(args) -> dict:
    sys.path.insert(0, str(ROOT))
    from wan.train.config import TrainConfig
    from wan.train.trainer import Trainer

    clock = StepClock(args.warmup + args.steps, args.profile)

    class Timed(Trainer):
        def optimizer_step(self):
            norm = super().optimizer_step()
            clock.step()
            return norm

    out_dir = tempfile.mkdtemp(prefix="bench_train_ours_")
    cfg = TrainConfig.of(dit=str(args.dit), dataset_config=str(args.data), mixed_precision="bf16",
                         gradient_checkpointing=True, network_dim=args.rank, network_alpha=float(args.alpha),
                         optimizer_type="AdamW", learning_rate=1e-4, max_grad_norm=1.0,
                         max_train_steps=args.warmup + args.steps, seed=SEED, output_dir=out_dir, output_name="lora")
    trainer = Timed(cfg, progress=False, say=lambda line: None).setup()
    clock.start(*trainer.experts.values(), trainer.network)
    result = trainer.train()
    trainer.close()
    report = clock.report()
    report["losses"] = result.losses
    return report


# -- musubi-tuner (its interpreter, its source tree) -------------------------------------------------


def _import_torchvision() -> str:
    """musubi's Wan training imports torchvision (for sample videos and i2v's CLIP only). PyPI has no CPU
    torchvision for this torch, and the CUDA wheel's compiled ops cannot load against a CPU torch, which
    makes ``import torchvision`` fail when it registers meta kernels for them. Then its unused compiled
    ops (nms, roi_align ...) get placeholder schemas and the pure-Python package imports."""
    try:
        importlib.import_module("torchvision")
        return "torchvision imported as is"
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("roi_align", "_roi_align_backward", "ps_roi_align", "_ps_roi_align_backward", "roi_pool",
                   "_roi_pool_backward", "ps_roi_pool", "_ps_roi_pool_backward", "nms", "qnms", "qroi_align",
                   "deform_conv2d", "_deform_conv2d_backward"):
            lib.define(f"{op}(Tensor x) -> Tensor")
        _import_torchvision.lib = lib  # keep the library alive
        importlib.import_module("torchvision")
        return "torchvision's compiled ops (unused) given placeholder schemas: CUDA wheel on a CPU torch"


def _musubi_cpu_fixes(transformer) -> list[str]:
    """What musubi's WanModel needs to run its forward on a CPU, from outside its source.

    Its time embedding runs under ``torch.autocast(device_type, dtype=float32)`` and its affine LayerNorms
    (``norm3``) call ``layer_norm(x.float())`` on bf16 weights: on CUDA, autocast computes both in float32;
    CPU autocast supports bf16/fp16 only (it warns and turns itself off), so the float32 input meets bf16
    weights and the forward fails. Holding those modules' weights in float32 gives the CUDA computation
    (the bf16 values, computed in float32) at +34 MB (time embedding and projection) + 0.4 MB (norms)."""
    if next(transformer.parameters()).device.type != "cpu":
        return []
    transformer.time_embedding.float()
    transformer.time_projection.float()
    norms = [m for m in transformer.modules() if isinstance(m, torch.nn.LayerNorm) and m.weight is not None]
    for m in norms:
        m.float()
    return [f"time_embedding, time_projection and {len(norms)} affine LayerNorms held in float32"]


def case_musubi(args) -> dict:
    src = Path(args.musubi) / "src"
    sys.path.insert(0, str(src))
    notes = [_import_torchvision()]
    # wan/modules/t5.py evaluates torch.cuda.current_device() as a default argument when the module is
    # imported (the T5 encoder is never built in training): answer 0 while importing, then restore.
    current_device = torch.cuda.current_device
    if not torch.cuda.is_available():
        torch.cuda.current_device = lambda: 0
        notes.append("torch.cuda.current_device() answered 0 while musubi's modules were imported")
    try:
        from musubi_tuner import wan_train_network as wtn
    finally:
        torch.cuda.current_device = current_device

    clock = StepClock(args.warmup + args.steps, args.profile)
    losses: list[float] = []

    class Timed(wtn.WanNetworkTrainer):
        def on_transformer_loaded(self, a, accelerator, transformer):
            notes.extend(_musubi_cpu_fixes(transformer))
            return super().on_transformer_loaded(a, accelerator, transformer)

        def on_train_start(self, a, accelerator, network, transformer, optimizer):
            super().on_train_start(a, accelerator, network, transformer, optimizer)
            clock.start(accelerator.unwrap_model(transformer), accelerator.unwrap_model(network))

        def on_post_optimizer_step(self, *a, **k):
            clock.step()
            return super().on_post_optimizer_step(*a, **k)

        def compute_loss(self, *a, **k):
            loss, metrics = super().compute_loss(*a, **k)
            losses.append(float(loss.detach()))
            return loss, metrics

    wtn.WanNetworkTrainer = Timed  # main() builds the trainer by this module name
    out_dir = tempfile.mkdtemp(prefix="bench_train_musubi_")
    sys.argv = ["wan_train_network.py", "--task", "t2v-1.3B", "--dit", str(args.dit),
                "--dataset_config", str(args.data), "--sdpa", "--mixed_precision", "bf16", "--gradient_checkpointing",
                "--network_module", "networks.lora_wan", "--network_dim", str(args.rank),
                "--network_alpha", str(args.alpha), "--optimizer_type", "AdamW", "--learning_rate", "1e-4",
                "--max_grad_norm", "1.0", "--max_train_steps", str(args.warmup + args.steps),
                "--max_data_loader_n_workers", "0", "--seed", str(SEED), "--output_dir", out_dir,
                "--output_name", "lora"]
    wtn.main()
    report = clock.report()
    report["losses"] = losses
    report["notes"] = notes
    report["commit"] = args.musubi_commit
    return report


# -- the parent ------------------------------------------------------------------------------------------


def write_dataset(root: Path, frames: int, size: int, items: int) -> Path:
    """musubi-format caches of ``items`` clips of ``frames`` frames at size x size (random bf16 latents, as
    musubi caches them with its bf16 VAE) with random umT5 states of TEXT_TOKENS tokens, and the dataset
    TOML both trainers read."""
    sys.path.insert(0, str(ROOT))
    from wan.train.cache_files import (latent_frames, text_cache_name, video_latent_cache_name, write_latent_cache,
                                       write_text_cache)
    toml = root / "data.toml"
    if toml.exists():
        return toml
    g = torch.Generator().manual_seed(1)
    cache, videos = root / "cache", root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i in range(items):
        name = f"clip{i}.mp4"
        lat = torch.randn(16, latent_frames(frames), size // 8, size // 8, generator=g).bfloat16()
        write_latent_cache(cache / video_latent_cache_name(name, 0, frames, (size, size)), lat,
                           original_size=(size, size), frame_count=frames)
        write_text_cache(cache / text_cache_name(name), torch.randn(TEXT_TOKENS, 4096, generator=g).bfloat16(),
                         caption=f"clip {i}")
    tmp = toml.with_suffix(".tmp")
    tmp.write_text(f'[general]\nresolution = [{size}, {size}]\ncaption_extension = ".txt"\nbatch_size = 1\n'
                   f'enable_bucket = false\n\n[[datasets]]\nvideo_directory = "{videos}"\n'
                   f'cache_directory = "{cache}"\ntarget_frames = [{frames}]\nframe_extraction = "head"\n')
    os.replace(tmp, toml)
    return toml


def musubi_commit(path: Path) -> str:
    """The commit of the musubi tree: its COMMIT file (an exported tree has no .git), else git, else unknown."""
    if (path / "COMMIT").is_file():
        return (path / "COMMIT").read_text().strip()
    for candidate in (path / ".git", path):
        try:
            out = subprocess.run(["git", "--git-dir", str(candidate), "rev-parse", "HEAD"], capture_output=True,
                                 text=True, check=True)
            return out.stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            continue
    return "unknown"


def run_child(python: str, impl: str, args, log_dir: Path, round_no: int) -> dict:
    cmd = [python, __file__, "--case", impl, "--dit", str(args.dit), "--data", str(args.data),
           "--rank", str(args.rank), "--alpha", str(args.alpha), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--musubi", str(args.musubi or ""), "--musubi-commit", args.musubi_commit]
    env = dict(os.environ)
    if args.profile:
        cmd += ["--profile", str(args.profile)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
        env["OMP_NUM_THREADS"] = str(args.threads)
    log = log_dir / f"{impl}_{round_no}.log"
    print(f"  round {round_no}: {impl} ... ", end="", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{impl} failed (exit {proc.returncode}); see {log}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{time.perf_counter() - t0:.0f} s, steps {[round(w, 1) for w in result['wall']]} s, other processes "
          f"{[round(o, 1) for o in result['others']]} cores", file=sys.stderr)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--musubi", type=Path, help="musubi-tuner source tree (holds src/musubi_tuner)")
    ap.add_argument("--musubi-python", default=None,
                    help="interpreter with musubi's packages (default: <musubi>/../musubi-venv/bin/python)")
    ap.add_argument("--frames", type=int, default=5, help="pixel frames of the clip (4k+1; 5 -> 2 latent frames)")
    ap.add_argument("--size", type=int, default=256, help="clip width and height in pixels")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--alpha", type=float, default=32.0)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--rounds", type=int, default=3, help="subprocesses per side, alternating")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both subprocesses (default: torch's)")
    ap.add_argument("--quiet", type=float, default=0.25,
                    help="steps during which other processes kept more cores busy are left out of the medians")
    ap.add_argument("--profile", type=int, default=None, metavar="K",
                    help="profile step K (1-based) of each subprocess: its top operators go to the subprocess logs "
                         "(the step's time is then not comparable)")
    ap.add_argument("--report", type=Path, help="print the table of a results.json of an earlier run, run nothing")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    ap.add_argument("--dit", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--musubi-commit", default="",
                    help="the musubi commit to record (default: <musubi>/COMMIT, else git)")
    args = ap.parse_args()

    if args.case:
        if args.threads:
            torch.set_num_threads(args.threads)
        result = case_ours(args) if args.case == "ours" else case_musubi(args)
        print(json.dumps(result))
        return

    if args.report:
        saved = json.loads(args.report.read_text())
        summarize(saved["meta"], saved["results"], args.quiet)
        return

    if args.musubi is None or not (args.musubi / "src" / "musubi_tuner" / "wan_train_network.py").exists():
        raise SystemExit("--musubi: a musubi-tuner source tree (with src/musubi_tuner/wan_train_network.py) is required")
    musubi_python = args.musubi_python or str(args.musubi.parent / "musubi-venv" / "bin" / "python")
    args.musubi_commit = args.musubi_commit or musubi_commit(args.musubi)

    import bench_dit
    args.dit = bench_dit.checkpoint_path()
    if not args.dit.exists():
        print(f"writing {args.dit} ...", file=sys.stderr)
        bench_dit.write_checkpoint(args.dit)
    items = args.warmup + args.steps
    args.data = write_dataset(CACHE / f"train_step_{args.frames}x{args.size}_{items}", args.frames, args.size, items)

    log_dir = Path(tempfile.mkdtemp(prefix="bench_train_step_"))
    print(f"subprocess logs in {log_dir}", file=sys.stderr)
    results: dict[str, list[dict]] = {"ours": [], "musubi": []}
    for r in range(args.rounds):
        order = ("ours", "musubi") if r % 2 == 0 else ("musubi", "ours")
        for impl in order:
            python = sys.executable if impl == "ours" else musubi_python
            results[impl].append(run_child(python, impl, args, log_dir, r + 1))

    meta = {k: getattr(args, k) for k in ("frames", "size", "rank", "alpha", "steps", "warmup", "rounds",
                                           "musubi_commit")}
    path = log_dir / "results.json"
    path.write_text(json.dumps({"meta": meta, "results": results}))
    summarize(meta, results, args.quiet)
    print(f"raw results: {path} (print again: --report {path})", file=sys.stderr)


def summarize(meta: dict, results: dict[str, list[dict]], quiet: float) -> None:
    """Prints the table. Steps during which other processes kept more than ``quiet`` cores busy are shown
    but left out of the medians when each side has at least two steps below it (two threads on two shared
    cores slow down far more than the load: every parallel region waits for a descheduled thread)."""
    warm = meta["warmup"]
    lat_f = (meta["frames"] - 1) // 4 + 1
    tokens = lat_f * (meta["size"] // 16) ** 2
    flops = step_flops(tokens, meta["rank"])

    def steps(impl):
        """(wall, cpu, others, GEMM rate of its subprocess: mean of before and after) of each timed step."""
        return [(w, c, o, (res["gemm_before"] + res["gemm_after"]) / 2) for res in results[impl]
                for w, c, o in zip(res["wall"][warm:], res["cpu"][warm:], res["others"][warm:])]

    picked = {impl: [st for st in steps(impl) if st[2] <= quiet] for impl in results}
    use_quiet = all(len(v) >= 2 for v in picked.values())
    if not use_quiet:
        picked = {impl: steps(impl) for impl in results}
    med = {impl: {"wall": statistics.median(st[0] for st in v), "cpu": statistics.median(st[1] for st in v),
                  "others": statistics.mean(st[2] for st in v),
                  "frac": statistics.median(flops["step"] / st[0] / st[3] for st in v)} for impl, v in picked.items()}
    peak = {impl: max(res["peak_steps"] for res in results[impl]) for impl in results}
    alloc = {impl: max(res.get("allocated_peak", 0) for res in results[impl]) for impl in results}
    grow = {impl: max(res["peak_steps"] - res["rss_start"] for res in results[impl]) for impl in results}
    whole = {impl: max(res["maxrss"] for res in results[impl]) for impl in results}
    rates = [res[k] for impl in results for res in results[impl] for k in ("gemm_before", "gemm_after")]
    ours, theirs = results["ours"][0], results["musubi"][0]
    gib = 2 ** 30
    size = meta["size"]

    print(f"\nLoRA training step, Wan 2.1 1.3B shape, bf16 autocast, gradient checkpointing, batch 1: "
          f"{meta['frames']} frames at {size}x{size} (latent 16x{lat_f}x{size // 8}x{size // 8}, {tokens} tokens), "
          f"{TEXT_TOKENS} text tokens, LoRA rank {meta['rank']} alpha {meta['alpha']:g} on 300 linears, AdamW; "
          f"{ours['threads']} threads; {meta['rounds']} subprocess(es) per side alternating, {meta['steps']} timed "
          f"step(s) each after {warm} warm-up")
    print(f"musubi-tuner {meta['musubi_commit'][:12]} (torch {theirs['torch']}); ours torch {ours['torch']}")
    for note in theirs.get("notes", []):
        print(f"  musubi side: {note}")
    print(f"\nstep FLOPs (reference computation, text padded to 512 rows): {flops['step'] / 1e12:.2f} T "
          f"= forward {flops['forward'] / 1e12:.2f} + recompute {flops['recompute'] / 1e12:.2f} "
          f"+ backward {flops['backward'] / 1e12:.2f}")
    print(f"bf16 GEMM rate in the subprocesses: {min(rates) / 1e9:.0f} to {max(rates) / 1e9:.0f} GFLOP/s "
          f"(median over 1 s, before and after each subprocess's steps)")
    counted = {impl: f"{len(picked[impl])} of {len(steps(impl))}" for impl in results}
    print(f"steps counted: {counted['ours']} (ours), {counted['musubi']} (musubi): "
          + (f"those with other processes at <= {quiet:g} busy cores" if use_quiet else
             f"all (too few had other processes at <= {quiet:g} busy cores: the times are unreliable)")
          + f"; other processes during them: {med['ours']['others']:.2f} / {med['musubi']['others']:.2f} cores "
          f"of {os.cpu_count()}\n")
    print("| measure | Wan Studio | musubi-tuner | ratio | target |\n|---|---|---|---|---|")
    print(f"| step wall time, median (s) | {med['ours']['wall']:.1f} | {med['musubi']['wall']:.1f} | "
          f"**{med['ours']['wall'] / med['musubi']['wall']:.2f}** | <= 0.85 |")
    faults = {impl: statistics.median(f for res in results[impl] for f in res.get("faults", [0])[warm:])
              for impl in results}
    if faults["ours"] and faults["musubi"]:
        print(f"| fresh pages per step (minor faults, median; GiB of 4 KiB pages) | {faults['ours'] * 4096 / gib:.2f} | "
              f"{faults['musubi'] * 4096 / gib:.2f} | {faults['ours'] / faults['musubi']:.2f} | |")
    print(f"| step CPU time, all threads, median (s) | {med['ours']['cpu']:.1f} | {med['musubi']['cpu']:.1f} | "
          f"{med['ours']['cpu'] / med['musubi']['cpu']:.2f} | |")
    print(f"| step FLOPs / step time / GEMM rate of its subprocess (ratio: time ratio at equal rates) | "
          f"{med['ours']['frac']:.0%} | {med['musubi']['frac']:.0%} | "
          f"{med['musubi']['frac'] / med['ours']['frac']:.2f} | |")
    if alloc["ours"] and alloc["musubi"]:
        print(f"| peak allocated during the steps: malloc in use, the CPU's max_memory_allocated (GiB) | "
              f"{alloc['ours'] / gib:.2f} | {alloc['musubi'] / gib:.2f} | **{alloc['ours'] / alloc['musubi']:.2f}** "
              f"| <= 0.9 |")
    print(f"| peak resident during the steps: allocated + what the heap keeps, the CPU's max_memory_reserved "
          f"(GiB) | {peak['ours'] / gib:.2f} | {peak['musubi'] / gib:.2f} | "
          f"**{peak['ours'] / peak['musubi']:.2f}** | <= 0.9 |")
    print(f"| growth above the loop start's resident size (GiB) | {grow['ours'] / gib:.2f} | "
          f"{grow['musubi'] / gib:.2f} | {grow['ours'] / grow['musubi']:.2f} | |")
    print(f"| whole-process peak, loading included (GiB) | {whole['ours'] / gib:.2f} | {whole['musubi'] / gib:.2f} | "
          f"{whole['ours'] / whole['musubi']:.2f} | |")
    print(f"| at the loop start: DiT + LoRA tensors (GiB) | {ours['weights_bytes'] / gib:.2f} | "
          f"{theirs['weights_bytes'] / gib:.2f} | | |")
    print(f"| at the loop start: the rest (libraries, allocator; file-backed part) (GiB) | "
          f"{(ours['rss_start'] - ours['weights_bytes']) / gib:.2f} ({ours['rss_file_start'] / gib:.2f}) | "
          f"{(theirs['rss_start'] - theirs['weights_bytes']) / gib:.2f} ({theirs['rss_file_start'] / gib:.2f}) | | |")
    print("\nper-step wall times (s):", {impl: [round(st[0], 1) for st in steps(impl)] for impl in results})
    print("other processes' busy cores per step:", {impl: [round(st[2], 1) for st in steps(impl)] for impl in results})
    print("losses (first subprocess):", {impl: [round(v, 4) for v in results[impl][0]["losses"]] for impl in results})

if __name__ == "__main__":
    main()
