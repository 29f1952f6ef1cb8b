"""What every part of the GPU check shares: the run's context, the shapes, timing, memory peaks and
the form of a part's result.

A part is a module of this package with one function, ``run(ctx: Ctx) -> dict``, that returns
:func:`measured` or :func:`skipped`; an exception (or a timeout, or a crash of its process) makes
the driver record the part as failed with the error. Within a part, one case that fails (one
attention backend, one profile) is a row saying so, not an exception: the others still run.

In a dry run (``ctx.dry``) every shape is tiny and the device is the CPU, so the same code runs in
seconds on a machine without a GPU; the numbers mean nothing there, only that each path works.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[2]



def registry_shape(model_id: str) -> dict:
    """(dim, ffn_dim, num_heads, num_layers) of a public model, from the registry."""
    from wan.registry import get_model
    arch = get_model(model_id).arch
    return {"dim": arch.dim, "ffn_dim": arch.ffn_dim, "num_heads": arch.num_heads, "num_layers": arch.num_layers}


# Public Wan DiT shapes (head_dim 128). The dry run's is tiny but keeps head_dim 64, which every
# attention kernel accepts.
SHAPE_1_3B = registry_shape("wan2.1-t2v-1.3B")
SHAPE_14B = registry_shape("wan2.1-t2v-14B")
SHAPE_DRY = {"dim": 128, "ffn_dim": 256, "num_heads": 2, "num_layers": 2, "text_dim": 64}


@dataclass
class Ctx:
    """The run as a part sees it.

    Attributes:
        dry: the CPU dry run (tiny shapes, CPU device).
        device: where the part runs (``cuda`` on the lent machine, ``cpu`` in the dry run).
        gemm_rate: the measured bf16 GEMM rate in FLOP/s (the environment part measures it; None
            before it has run, or when it failed).
        work: a scratch folder for files a part writes (checkpoints at real shapes); emptied by
            nobody but the machine's end, so a part may reuse what an earlier part wrote there.
        seed: the one seed of every random weight and input.
        limit_s: the time limit the driver gave this part (its own, or less when the run's budget
            is short): past it the part's process is killed and what it measured is lost, so a
            part with several cases starts no case that would end after :meth:`time_left` runs out.
    """

    dry: bool
    device: torch.device
    gemm_rate: float | None = None
    work: Path = field(default_factory=lambda: Path(os.environ.get("WAN_GPU_CHECK_WORK", "/tmp/wan-gpu-check")))
    seed: int = 0
    limit_s: float = 120.0
    started: float = field(default_factory=time.monotonic)  # when the driver started the part's process

    def time_left(self, share: float = 1.0) -> float:
        """Seconds left until ``share`` of this part's limit is spent (negative once past it)."""
        return share * self.limit_s - (time.monotonic() - self.started)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def dit_shape(self, name: str) -> dict:
        """DiTConfig keyword arguments of the ``"1.3b"`` or ``"14b"`` shape (tiny in the dry run)."""
        if self.dry:
            return dict(SHAPE_DRY)
        return dict({"1.3b": SHAPE_1_3B, "14b": SHAPE_14B}[name])

    def latent_video(self, height: int = 480, width: int = 832, frames: int = 81, channels: int = 16,
                     stride: tuple[int, int] = (4, 8)) -> tuple[int, int, int, int]:
        """Latent (channels, frames, height, width) of a video of that size (Wan 2.1 VAE strides
        4 in time, 8 in space); in the dry run a 5-frame 64x64 video's."""
        if self.dry:
            height, width, frames = 64, 64, 5
        t, s = stride
        return channels, (frames - 1) // t + 1, height // s, width // s


# -- results -------------------------------------------------------------------------------------


def measured(columns: list[str], rows: list[list], *, notes: list[str] | None = None, data: dict | None = None) -> dict:
    """A part's measured result: a table (its cells are shown as given) and notes under it;
    ``data`` holds the raw numbers for the JSON."""
    for row in rows:
        if len(row) != len(columns):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(columns)} columns")
    return {"status": "measured", "columns": list(columns), "rows": [list(r) for r in rows],
            "notes": list(notes or []), "data": dict(data or {})}


def skipped(reason: str) -> dict:
    """A part that could not run here, and why."""
    return {"status": "skipped", "reason": reason}


def is_oom(e: BaseException | None) -> bool:
    """An out-of-memory error, also when it comes wrapped (the block streamer's reader thread
    raises it inside a CheckpointError; cuBLAS and cuDNN report theirs as RuntimeErrors)."""
    while e is not None:
        if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower() or "ALLOC_FAILED" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def case_error(e: BaseException) -> str:
    """One line for a case that failed inside a part (shown in its row)."""
    text = f"{type(e).__name__}: {e}".splitlines()[0]
    return "failed: " + (text[:200] + "…" if len(text) > 200 else text)


# -- timing and memory ---------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, *, runs: int = 3, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in seconds, over ``runs`` calls after ``warmup`` calls, with the
    device synchronised around each call."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class Peak:
    """Peak memory over a ``with`` block: CUDA's allocated and reserved peaks on a GPU, the process's
    resident peak on the CPU (``allocated`` and ``reserved`` then both hold it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocated = self.reserved = self.base = 0

    def __enter__(self) -> "Peak":
        free_memory()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = _reset_rss_peak()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated = torch.cuda.max_memory_allocated(self.device)
            self.reserved = torch.cuda.max_memory_reserved(self.device)
        else:
            self.allocated = self.reserved = _rss_peak()

    @property
    def growth(self) -> int:
        """Peak allocated above what was allocated when the block began."""
        return max(0, self.allocated - self.base)


def _reset_rss_peak() -> int:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    return _rss_peak("VmRSS")


def _rss_peak(field_name: str = "VmHWM") -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- models at real shapes, random weights -------------------------------------------------------


def random_dit(shape: dict, device: torch.device, *, dtype: torch.dtype = torch.bfloat16, num_layers: int | None = None,
               seed: int = 0, **config):
    """A WanDiT of ``shape`` (optionally fewer layers) built straight on ``device`` with random
    weights (normal, std 0.02), in ``dtype`` except the modules the reference keeps in float32."""
    from wan.models.dit import DiTConfig, WanDiT
    kwargs = dict(shape, **config)
    if num_layers is not None:
        kwargs["num_layers"] = num_layers
    with torch.device("meta"):
        model = WanDiT(DiTConfig(**kwargs))
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.data = p.data.to(torch.float32 if WanDiT.keep_in_fp32(name) else dtype)
            p.data.normal_(0.0, 0.02, generator=g)
    return model.eval().requires_grad_(False)


def dit_inputs(ctx: Ctx, shape: dict, latent: tuple[int, int, int, int], text_tokens: int = 24, seed: int = 1):
    """(x, t, context) for one forward: a latent video, a mid timestep and a text embedding."""
    g = torch.Generator(device=ctx.device).manual_seed(seed)
    x = torch.randn(1, *latent, generator=g, device=ctx.device)
    ctx_dim = shape.get("text_dim", 4096)
    context = torch.randn(1, text_tokens, ctx_dim, generator=g, device=ctx.device)
    return x, torch.tensor([757.0], device=ctx.device), context


def tokens_of(latent: tuple[int, int, int, int], patch: tuple[int, int, int] = (1, 2, 2)) -> int:
    _, f, h, w = latent
    return (f // patch[0]) * (h // patch[1]) * (w // patch[2])


def dit_flops(shape: dict, tokens: int, text_tokens: int = 512, num_layers: int | None = None) -> float:
    """FLOPs (2 x multiply-adds) of one DiT forward: the linear layers and both attentions, with
    the reference's ``text_tokens`` text rows (512: the reference pads every prompt to 512)."""
    d, ffn = shape["dim"], shape["ffn_dim"]
    layers = num_layers if num_layers is not None else shape["num_layers"]
    text_dim = shape.get("text_dim", 4096)
    n = tokens
    per_layer = n * (6 * d * d + 2 * d * ffn) + text_tokens * 2 * d * d + 2 * n * n * d + 2 * n * text_tokens * d
    text = text_tokens * (text_dim * d + d * d)
    return 2.0 * (layers * per_layer + text)


# -- formatting ----------------------------------------------------------------------------------


def ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def gib(n: float | None) -> str:
    return "–" if n is None else f"{n / 2**30:.2f} GiB"


def tflops(flops: float, seconds: float) -> str:
    return f"{flops / seconds / 1e12:.1f}"


def mfu(ctx: Ctx, flops: float, seconds: float) -> str:
    """The share of the measured bf16 GEMM rate that ``flops`` in ``seconds`` reach."""
    return "–" if not ctx.gemm_rate else f"{flops / seconds / ctx.gemm_rate:.0%}"


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float32."""
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
