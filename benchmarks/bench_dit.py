"""DiT at Wan 2.1 1.3B shape: our forward against diffusers', and the memory of loading.

    .venv/bin/python benchmarks/bench_dit.py            # all measurements, markdown table out
    .venv/bin/python benchmarks/bench_dit.py --frames 5 --size 128 --runs 5

Same random weights for both (written once as an official bf16 checkpoint, converted with the
project's key map for diffusers). Times are interleaved in one process (ours, theirs, ours, ...)
and compared as a ratio of medians; memory is measured in fresh subprocesses, one per case.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from memory import peak_bytes, reset_peak, run_case  # noqa: E402
from wan.registry import get_model  # noqa: E402

CACHE = ROOT / "benchmarks" / ".cache"
_ARCH = get_model("wan2.1-t2v-1.3B").arch
SHAPE_13B = dict(dim=_ARCH.dim, ffn_dim=_ARCH.ffn_dim, num_heads=_ARCH.num_heads, num_layers=_ARCH.num_layers)
TEXT_TOKENS = 24


def checkpoint_path() -> Path:
    return CACHE / "dit_1.3b_shape_bf16.safetensors"


def write_checkpoint(path: Path) -> None:
    """Random 1.3B-shape weights in the official layout, bf16 (as the ComfyUI bf16 files)."""
    from safetensors.torch import save_file
    from wan.models.dit import DiTConfig, WanDiT
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(DiTConfig(**SHAPE_13B)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)


def load_ours(path: Path):
    import wan
    return wan.load_transformer(path, dtype=torch.bfloat16)


def load_diffusers(path: Path):
    """diffusers' model with the same weights, bf16 with its float32 modules, as from_pretrained
    with torch_dtype=bfloat16 gives."""
    from diffusers import WanTransformer3DModel
    from safetensors.torch import load_file
    from wan.loading.keymaps import DIT_DIFFUSERS
    with torch.device("meta"):
        model = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)
    # load_file maps the file lazily; clone so the weights are resident before anything is measured
    state = {DIT_DIFFUSERS.from_official(k): v.clone() for k, v in load_file(str(path)).items()}
    keep32 = model._keep_in_fp32_modules or []
    for k in list(state):
        if any(part in k.split(".") for part in keep32):
            state[k] = state[k].float()
    model.load_state_dict(state, strict=False, assign=True)
    # the rotary tables are buffers outside the state dict: build them for real
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed
    model.rope = WanRotaryPosEmbed(128, (1, 2, 2), 1024)
    return model.eval()


def make_inputs(frames: int, size: int):
    g = torch.Generator().manual_seed(1)
    lat = size // 8
    x = torch.randn(1, 16, frames, lat, lat, generator=g)
    ctx = torch.randn(1, TEXT_TOKENS, 4096, generator=g)
    return x, torch.tensor([757.0]), ctx


def denoising_setup(frames: int, size: int):
    """The 1.3B-shape DiT loaded in bf16 (the checkpoint written on first use), with a latent noise
    [16, frames, size/8, size/8] and random text embeddings for a denoising run: 24 prompt tokens,
    40 negative-prompt tokens. Returns (dit, noise, cond, uncond); one seed for all."""
    import wan
    path = checkpoint_path()
    if not path.exists():
        write_checkpoint(path)
    dit = wan.load_transformer(path, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    lat = size // 8
    noise = torch.randn(16, frames, lat, lat, generator=g)
    cond = {"context": torch.randn(1, TEXT_TOKENS, 4096, generator=g)}
    uncond = {"context": torch.randn(1, 40, 4096, generator=g)}
    return dit, noise, cond, uncond


def run_ours(model, inputs):
    x, t, ctx = inputs
    return model(x, t, ctx)


def run_diffusers(model, inputs):
    x, t, ctx = inputs
    ctx512 = torch.nn.functional.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))
    return model(hidden_states=x.bfloat16(), timestep=t, encoder_hidden_states=ctx512.bfloat16(), return_dict=False)[0]


def reference_flops(frames: int, size: int) -> float:
    """Multiply-adds x2 of the reference computation (512 text rows), linear layers and attention."""
    d, ffn, layers = SHAPE_13B["dim"], SHAPE_13B["ffn_dim"], SHAPE_13B["num_layers"]
    n = frames * (size // 16) ** 2
    per_layer = n * (6 * d * d + 2 * d * ffn) + 512 * 2 * d * d + 2 * n * n * d + 2 * n * 512 * d
    text = 512 * (4096 * d + d * d)
    return 2.0 * (layers * per_layer + text)


def matmul_rate() -> float:
    """bf16 GEMM rate of this machine (FLOP/s), a 2048x1536 @ 1536x8960 product."""
    a = torch.randn(2048, 1536).bfloat16()
    b = torch.randn(1536, 8960).bfloat16()
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * 2048 * 1536 * 8960 / statistics.median(times)


# -- cases run in subprocesses --------------------------------------------------------------------


def case_load(path: Path) -> dict:
    base = reset_peak()
    model = load_ours(path)
    return {"peak_growth": peak_bytes() - base, "file_bytes": path.stat().st_size,
            "weights_bytes": sum(p.numel() * p.element_size() for p in model.state_dict().values())}


def case_forward(path: Path, impl: str, frames: int, size: int) -> dict:
    model = (load_ours if impl == "ours" else load_diffusers)(path)
    inputs = make_inputs(frames, size)
    fn = run_ours if impl == "ours" else run_diffusers
    # The first forward right after loading: after a warm-up run the allocator keeps freed
    # activation memory resident, and a second run would show no growth at all.
    with torch.inference_mode():
        base = reset_peak()
        fn(model, inputs)
    return {"peak_growth": peak_bytes() - base}


def in_subprocess(*args: str) -> dict:
    return run_case(__file__, *args)


# -- main -----------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=5, help="latent frames (5 = a 17-frame clip)")
    ap.add_argument("--size", type=int, default=128, help="video width and height in pixels")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    path = checkpoint_path()
    if args.case:
        kind, *rest = args.case
        result = case_load(path) if kind == "load" else case_forward(path, rest[0], int(rest[1]), int(rest[2]))
        print(json.dumps(result))
        return

    if not path.exists():
        print(f"writing {path} ...", file=sys.stderr)
        write_checkpoint(path)
    torch.manual_seed(0)
    rate = matmul_rate()
    ours, theirs = load_ours(path), load_diffusers(path)
    inputs = make_inputs(args.frames, args.size)
    t_ours, t_theirs = [], []
    with torch.inference_mode():
        out_o, out_t = run_ours(ours, inputs), run_diffusers(theirs, inputs)
        for _ in range(args.runs):
            for fn, model, acc in ((run_ours, ours, t_ours), (run_diffusers, theirs, t_theirs)):
                t0 = time.perf_counter()
                fn(model, inputs)
                acc.append(time.perf_counter() - t0)
    diff = ((out_o.float() - out_t.float()).abs().max() / out_t.float().abs().max()).item()
    del ours, theirs
    mem = {impl: in_subprocess("forward", impl, str(args.frames), str(args.size)) for impl in ("ours", "diffusers")}
    load = in_subprocess("load")

    flops = reference_flops(args.frames, args.size)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    tokens = args.frames * (args.size // 16) ** 2
    print(f"\nDiT 1.3B shape, bf16, latent 16x{args.frames}x{args.size // 8}x{args.size // 8} "
          f"({tokens} tokens, {TEXT_TOKENS} text tokens), {torch.get_num_threads()} threads, bf16 GEMM {rate / 1e9:.0f} GFLOP/s\n")
    print("| measure | ours | diffusers | ratio |\n|---|---|---|---|")
    print(f"| forward time, median of {args.runs} (s) | {mo:.3f} | {mt:.3f} | {mo / mt:.2f} |")
    print(f"| reference FLOPs / time / GEMM rate | {flops / mo / rate:.0%} | {flops / mt / rate:.0%} | |")
    print(f"| forward peak memory above the loaded model (MB) | {mem['ours']['peak_growth'] / 2**20:.0f} | "
          f"{mem['diffusers']['peak_growth'] / 2**20:.0f} | {mem['ours']['peak_growth'] / mem['diffusers']['peak_growth']:.2f} |")
    print(f"\nbf16 outputs: max |ours - diffusers| / max |diffusers| = {diff:.3g} (diffusers keeps a bf16 residual stream; "
          f"we keep the reference's float32 one)")
    print(f"\nloading: peak memory growth {load['peak_growth'] / 2**30:.2f} GiB for a {load['file_bytes'] / 2**30:.2f} GiB file "
          f"({load['weights_bytes'] / 2**30:.2f} GiB of weights in memory): {load['peak_growth'] / load['file_bytes']:.2f}x the file")


if __name__ == "__main__":
    main()
