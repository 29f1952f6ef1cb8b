"""The parts of the GPU check (``benchmarks/gpu_check.py``), in the order they run.

Each part is a module here with ``run(ctx) -> dict`` (see :mod:`common`). ``limit_s`` is the most a
part may take on the GPU; the dry run gives each part ``dry_limit_s``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    name: str         # module name in this package, and the part's key in the JSON
    title: str        # heading in the Markdown table
    limit_s: int      # time limit on the GPU
    dry_limit_s: int = 120


PARTS: tuple[Part, ...] = (
    Part("environment", "Environment and bf16 GEMM rate", 60),
    Part("dit", "DiT forward at 1.3B and 14B shape, bf16", 150),
    Part("attention", "Attention backends at 1.3B shape", 90),
    Part("quant", "fp8 and int8 weights against bf16", 90),
    Part("profiles", "Shipped profiles on a 14B-shape DiT under a VRAM budget", 240),
    Part("compile", "torch.compile of the repeated blocks", 180),
    Part("vae", "VAE 2.1 and 2.2 decode", 150),
    Part("engine", "Whole TEST-model generations on CUDA against the CPU", 120),
    Part("train_parallel", "LoRA training step and the NCCL process group", 150),
)


def part_named(name: str) -> Part:
    for p in PARTS:
        if p.name == name:
            return p
    raise ValueError(f"part '{name}': expected one of {', '.join(p.name for p in PARTS)}")
