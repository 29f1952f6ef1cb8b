"""Part 1: the machine. GPU, driver, torch and CUDA versions, free memory, the optional packages
found, and the measured bf16 GEMM rate that the other parts' MFU is read against."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess

import torch

from gpu_parts.common import Ctx, gib, measured, timed

OPTIONAL = ("triton", "sageattention", "flash_attn", "flash_attn_interface", "xformers", "mmgp", "optimum-quanto",
            "pydantic", "ftfy", "accelerate", "bitsandbytes")


def gemm_rate(ctx: Ctx) -> tuple[float, int]:
    """bf16 FLOP/s of an n x n x n matrix product (n = 8192 on a GPU), median of 5 after warm-up."""
    n = 256 if ctx.dry else 8192
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    a = torch.randn(n, n, generator=g, device=ctx.device).bfloat16()
    b = torch.randn(n, n, generator=g, device=ctx.device).bfloat16()
    seconds = timed(lambda: a @ b, ctx.device, runs=5, warmup=3)
    return 2.0 * n ** 3 / seconds, n


def package_versions() -> dict[str, str]:
    found = {}
    for name in OPTIONAL:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown (no nvidia-smi)"


def run(ctx: Ctx) -> dict:
    rate, n = gemm_rate(ctx)
    data = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "gemm_rate": rate, "gemm_n": n, "packages": package_versions()}
    rows = [["torch", torch.__version__], ["CUDA (torch's)", str(torch.version.cuda)],
            ["Python", platform.python_version()]]
    if ctx.cuda:
        props = torch.cuda.get_device_properties(ctx.device)
        free, total = torch.cuda.mem_get_info(ctx.device)
        data.update(gpu_name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    free_bytes=free, total_bytes=total, driver=driver_version(),
                    nccl=".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "missing")
        rows += [["GPU", props.name], ["compute capability", data["capability"]], ["multiprocessors", str(props.multi_processor_count)],
                 ["driver", data["driver"]], ["NCCL", data["nccl"]], ["memory free / total", f"{gib(free)} / {gib(total)}"]]
    else:
        data.update(gpu_name="cpu-dry-run", threads=torch.get_num_threads())
        rows += [["device", f"CPU, {torch.get_num_threads()} threads (dry run)"]]
    rows.append([f"bf16 GEMM {n}x{n}x{n}", f"{rate / 1e12:.1f} TFLOP/s"])
    rows.append(["optional packages", ", ".join(f"{k} {v}" for k, v in data["packages"].items())])
    return measured(["what", "value"], rows, data=data)
