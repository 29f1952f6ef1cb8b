"""The DiTs a training run trains on: which files, loaded how (dtype, fp8, the idle expert in CPU memory),
the expert boundary of a Wan 2.2 A14B pair, and what each DiT is given besides latents and text (``y``,
``clip_fea``) for a batch of caches."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from wan.train.config import TrainConfig, TrainConfigError
from wan.train.data import Batch, DataError

SINGLE = "transformer"
EXPERTS = ("high_noise", "low_noise")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dit_files(cfg: TrainConfig) -> tuple[Any, dict[str, str]]:
    """(registry spec or None, expert -> checkpoint path): ``transformer``, or ``high_noise`` and
    ``low_noise`` for a Wan 2.2 A14B pair. Registry files are fetched (TEST models are generated)."""
    from wan.loading.download import ensure_files
    from wan.registry import get_model
    if cfg.task and not cfg.model and not cfg.dit:
        raise TrainConfigError("--task: the command line maps musubi task names to registry models; in code, "
                               "give model= (a registry id) or dit=")
    spec = get_model(cfg.model) if cfg.model else None
    if cfg.dit and cfg.dit_high_noise:
        return spec, {"high_noise": cfg.dit_high_noise, "low_noise": cfg.dit}
    if cfg.dit:
        return spec, {SINGLE: cfg.dit}
    if spec is None:
        raise TrainConfigError("--dit: required: give --dit (a DiT checkpoint) or --model (a registry model)")
    variant = {"fp16": "fp16"}.get(cfg.precision, "bf16")
    paths = ensure_files(spec, cfg.checkpoint_dir, variant=variant, components=["transformer"])
    if spec.is_two_expert:
        files = {e: str(paths[f"transformer_{e}"]) for e in EXPERTS}
        if cfg.dit_high_noise:
            files["high_noise"] = cfg.dit_high_noise
        return spec, files
    if cfg.dit_high_noise:
        raise TrainConfigError(f"--dit_high_noise: model {spec.id} has one DiT, not two experts")
    return spec, {SINGLE: str(paths["transformer"])}


def conditioning(batch: Batch, dit_cfg: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The DiT's ``y`` and ``clip_fea`` for a batch, as musubi's ``call_dit`` builds them.

    ``in_dim`` tells what ``y`` is: latents only (t2v, TI2V); + 4 + C i2v/flf2v/Fun-InP (the cached
    ``latents_image``: first-frame mask and image latent); + 2C Fun-Control (control latents, then the
    image latent's first frame, zeros elsewhere or when there is none). CLIP features go to models with
    an image embedding (Wan 2.1 i2v, flf2v)."""
    c = batch.latents.shape[1]
    if c != dit_cfg.out_dim:
        raise DataError(f"the DiT predicts {dit_cfg.out_dim} latent channels; the caches of {batch.names[:3]} have {c} "
                        "(made with another model's VAE?)")
    extra, out = dit_cfg.in_dim - c, {}
    if extra == c + 4:
        if batch.image_latents is None:
            raise DataError(f"the DiT takes image conditioning (in_dim {dit_cfg.in_dim}); the caches of "
                                f"{batch.names[:3]} have no latents_image: cache them for i2v")
        out["y"] = batch.image_latents.to(device)
    elif extra == 2 * c:
        if batch.control_latents is None:
            raise DataError(f"the DiT is a Fun-Control model (in_dim {dit_cfg.in_dim}); the caches of "
                                f"{batch.names[:3]} have no latents_control")
        image = torch.zeros_like(batch.control_latents)
        if batch.image_latents is not None:
            image = batch.image_latents[:, 4:].clone()
            image[:, :, 1:] = 0
        out["y"] = torch.cat([batch.control_latents, image.to(batch.control_latents.dtype)], dim=1).to(device)
    elif extra != 0:
        raise DataError(f"the DiT takes {dit_cfg.in_dim} input channels; latents of {c} channels do not fit "
                            "(were the caches made with this model's VAE?)")
    if dit_cfg.image_dim:
        if batch.clip is not None:
            out["clip_fea"] = batch.clip.to(device)
        elif extra == c + 4 and dit_cfg.model_type in ("i2v", "flf2v"):
            raise DataError(f"the DiT takes CLIP features (Wan 2.1 i2v/flf2v); the caches of {batch.names[:3]} "
                                "have no clip_*: cache them with the CLIP model")
    return out


def load_dits(cfg: TrainConfig, device: torch.device,
              say: Callable[[str], None] = print) -> tuple[Any, dict[str, nn.Module], dict[str, str]]:
    """(registry spec or None, expert -> frozen DiT, expert -> file) for ``cfg``: loaded in the
    ``--mixed_precision`` dtype (else the file's), fp8 with ``--fp8_base`` (quantised in CPU memory first, so
    the device never holds the full-precision weights), the high-noise expert left in CPU memory with
    ``--offload_inactive_dit`` (musubi starts on the low-noise one)."""
    spec, paths = resolve_dit_files(cfg)
    import wan
    from wan.models.dit import WanDiT
    dtype = AUTOCAST_DTYPES.get(cfg.precision)  # None keeps the file's dtype, as musubi's dit_dtype
    experts = {}
    for key, path in paths.items():
        idle = cfg.offload_inactive_dit and key == "high_noise"
        say(f"loading DiT {key}: {path}")
        dit = wan.load_transformer(path, device="cpu" if idle or cfg.fp8_base else device, dtype=dtype,
                                   keep_fp8=cfg.fp8_base)
        if cfg.fp8_base:
            from wan.optim.quant import quantize_
            mode = "fp8_scaled" if cfg.fp8_scaled else "fp8"
            report = quantize_(dit, mode, keep=lambda n: not n.startswith("blocks.") or WanDiT.keep_in_fp32(n))
            say(f"--fp8_base: {report.summary()}")
            if not idle:
                dit.to(device)
        experts[key] = dit.requires_grad_(False)
        if cfg.blocks_to_swap:
            experts[key] = swap_blocks(dit, path, cfg.blocks_to_swap, device, dtype, say)
    if len(experts) == 2:
        a, b = (experts[e].config for e in EXPERTS)
        if a != b:
            raise TrainConfigError(f"--dit_high_noise: the two experts differ ({a} vs {b})")
    return spec, experts, paths


def swap_blocks(dit: nn.Module, path, count: int, device: torch.device, dtype, say) -> nn.Module:
    """``--blocks_to_swap N``: N of the DiT's blocks are not kept on the device but read from the
    checkpoint when run, with the block streaming of generation (``wan.optim.offload``): in the forward
    pass, and again for the backward pass's recomputation (gradient checkpointing replays the block's
    hooks). The others stay resident. The handle lives as long as the DiT."""
    from wan.optim.offload import stream_blocks_
    blocks = len(dit.blocks)
    if count >= blocks:
        raise TrainConfigError(f"--blocks_to_swap: {count} is not allowed; fewer than the DiT's {blocks} blocks")
    handle = stream_blocks_(dit, path, prefetch=1, budget_blocks=blocks - count, device=device, dtype=dtype)
    dit._block_swap = handle  # keeps the streaming (and its reader thread) with the network
    say(f"--blocks_to_swap {count}: {count} of {blocks} blocks read from {Path(str(path)).name} when they run, "
        f"{blocks - count} kept on {device}")
    return dit


def expert_boundary(cfg: TrainConfig, experts: Mapping[str, nn.Module], spec: Any,
                    say: Callable[[str], None] = print) -> float | None:
    """The noise level in [0, 1] from which the high-noise expert trains (two experts; None with one):
    ``--timestep_boundary`` (0..1 or 0..1000), else the registry model's."""
    if len(experts) == 1:
        if cfg.timestep_boundary is not None:
            say("--timestep_boundary is used with two experts only (give --dit_high_noise too)")
        return None
    boundary = cfg.timestep_boundary
    if boundary is None:
        boundary = spec.defaults.boundary if spec is not None else None
    if boundary is None:
        raise TrainConfigError("--timestep_boundary: required to train two experts (the model gives none)")
    return boundary / 1000 if boundary > 1 else boundary


__all__ = ["SINGLE", "EXPERTS", "AUTOCAST_DTYPES", "conditioning", "expert_boundary", "load_dits",
           "resolve_dit_files"]
