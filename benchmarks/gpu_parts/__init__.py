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


# The order is the priority within the whole run's budget (480 s by default): the parts the open
# issues wait for come first (the engine on CUDA, the training step's CUDA peak, the NCCL path);
# the parts with several cases of their own (profiles, VAE, compile) come last and fit what is left
# (each starts no case it cannot finish: ``Ctx.time_left``).
PARTS: tuple[Part, ...] = (
    Part("environment", "Environment and bf16 GEMM rate", 30),
    Part("dit", "DiT forward at 1.3B and 14B shape, bf16", 60),
    Part("attention", "Attention backends at 1.3B shape", 60),
    Part("quant", "fp8 and int8 weights against bf16", 60),
    Part("engine", "Whole TEST-model generations on CUDA against the CPU", 60),
    Part("train_parallel", "LoRA training step and the NCCL process group", 130),
    Part("profiles", "Shipped profiles on a 14B-shape DiT under a VRAM budget", 150),
    Part("vae", "VAE 2.1 and 2.2 decode", 100),
    Part("compile", "torch.compile of the repeated blocks", 120),
)


def part_named(name: str) -> Part:
    for p in PARTS:
        if p.name == name:
            return p
    raise ValueError(f"part '{name}': expected one of {', '.join(p.name for p in PARTS)}")
