"""How much memory a training run needs, in words, and what to say when it runs out."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from wan.optim.planner import GiB, gb
from wan.train.errors import TrainingOutOfMemory

OOM_ADVICE = ("--gradient_checkpointing (and --gradient_checkpointing_cpu_offload), --fp8_base (with "
              "--fp8_scaled), --mixed_precision bf16, a smaller resolution or fewer frames in the dataset "
              "(re-cache), a smaller batch_size, --offload_inactive_dit for Wan 2.2 A14B, --blocks_to_swap N "
              "(with --gradient_checkpointing)")


def out_of_memory(exc: BaseException, device: torch.device) -> TrainingOutOfMemory:
    """The error to raise for an out-of-memory ``exc``: what ran out, and the settings that use less
    (a sample's generation, ``GenerationOutOfMemory``, says so and which stage of it)."""
    stage = getattr(exc, "stage", None)
    if stage is not None:
        return TrainingOutOfMemory(f"out of memory on {device} while making a sample ({stage}: {exc.cause}). "
                                   f"Settings that use less: fewer or smaller samples (--sample_prompts), "
                                   f"{OOM_ADVICE}")
    first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return TrainingOutOfMemory(f"out of memory on {device} ({first}). Settings that use less: {OOM_ADVICE}")


def _size(n: float) -> str:
    return gb(n) if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MB"


def memory_estimate(experts: Mapping[str, nn.Module], network: nn.Module, optimizer_name: str,
                    latent_shape: tuple[int, ...], activation_bytes: int, checkpointing: bool,
                    device: torch.device, offload_inactive: bool) -> list[str]:
    """A rough memory budget in words: weights, LoRA, its gradients and optimizer states, activations
    (for one process: with several, each holds all of this for its own part of the batch).

    Activations per DiT block and token are counted as (14 * dim + 2 * ffn_dim) values in the compute
    dtype plus 4 float32 copies of the residual stream; with gradient checkpointing only each block's
    float32 input is kept, plus one block's worth while it is recomputed."""
    dit = next(iter(experts.values()))
    weight_bytes = [sum(t.numel() * t.element_size() for t in [*d.parameters(), *d.buffers()])
                    for d in experts.values()]
    lora_params = sum(p.numel() for p in network.parameters())
    states = 0 if "sgd" in optimizer_name.lower() else 2
    states_bytes = lora_params * (2 if "8bit" in optimizer_name.lower() else 4 * states) if states else 0
    cfg = dit.config
    b, _, f, h, w = latent_shape if len(latent_shape) == 5 else (1, 0, 1, 1, 1)
    tokens = b * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    per_block = tokens * ((14 * cfg.dim + 2 * cfg.ffn_dim) * activation_bytes + 4 * cfg.dim * 4)
    blocks = len(dit.blocks)
    activations = tokens * cfg.dim * 4 * blocks + per_block if checkpointing else per_block * blocks
    resident = weight_bytes[:1] if offload_inactive and device.type == "cuda" else weight_bytes
    total = sum(resident) + lora_params * 8 + states_bytes + activations
    experts_words = " + ".join(_size(x) for x in weight_bytes)
    return [
        "memory estimate (rough):",
        f"  DiT weights: {experts_words}" + (" (the idle expert in CPU memory)" if len(resident) < len(weight_bytes)
                                             else ""),
        f"  LoRA: {lora_params / 1e6:.2f}M parameters, {_size(lora_params * 4)} + gradients {_size(lora_params * 4)} + "
        f"optimizer states {_size(states_bytes)}",
        f"  activations: ~{_size(activations)} for a batch of latents {list(latent_shape)} ({tokens} tokens)"
        + (", gradient checkpointing" if checkpointing else ", without gradient checkpointing"),
        f"  total on {device.type}: ~{_size(total)}",
    ]


def device_note(device: torch.device) -> list[str]:
    """The device's memory next to the estimate (CUDA only)."""
    if device.type != "cuda":
        return []
    total = torch.cuda.mem_get_info(device)[1]
    return [f"  the GPU has {gb(total)}; if the estimate is near or above it, see --gradient_checkpointing and "
            "--fp8_base"]
