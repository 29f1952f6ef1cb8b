"""Loading Wan 2.1 / 2.2 VAEs from official, ComfyUI and diffusers checkpoints.

Formats:
- official ``Wan2.1_VAE.pth`` / ``Wan2.2_VAE.pth`` (read with ``weights_only``, memory-mapped);
- ComfyUI ``wan_2.1_vae.safetensors`` / ``wan2.2_vae.safetensors``: official key names, possibly
  under a ``vae.`` or ``first_stage_model.`` prefix;
- diffusers ``AutoencoderKLWan`` (a folder with config.json + weights, a pipeline folder whose
  ``vae`` subfolder holds them, or a weights file), converted with the key table below.

The version and every hyperparameter are inferred from tensor shapes; a config.json is not needed.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from wan.loading.files import Checkpoint, CheckpointError, materialize, open_checkpoint

# Prefixes that wrap a VAE state dict inside bigger files.
KNOWN_PREFIXES = ("", "vae.", "first_stage_model.", "model.", "module.")
_OFFICIAL_MARK = "decoder.conv1.weight"
_DIFFUSERS_MARK = "decoder.conv_in.weight"

# ---------------------------------------------------------------------------------------------
# Official <-> diffusers key table (reference section 3.3).
#
# Rows are (official prefix, diffusers prefix); {side} is encoder/decoder, {i} and {j} are block
# indices copied across. The rest of a key after the prefix goes through _LEAF_ROWS (the names
# inside a residual block); resampler (resample.1, time_conv) and attention names are identical.

_COMMON_ROWS = [
    ("conv1.", "quant_conv."),
    ("conv2.", "post_quant_conv."),
    ("{side}.conv1.", "{side}.conv_in."),
    ("{side}.head.0.", "{side}.norm_out."),
    ("{side}.head.2.", "{side}.conv_out."),
    ("{side}.middle.0.", "{side}.mid_block.resnets.0."),
    ("{side}.middle.1.", "{side}.mid_block.attentions.0."),
    ("{side}.middle.2.", "{side}.mid_block.resnets.1."),
]

_LEAF_ROWS = [
    ("residual.0.", "norm1."),
    ("residual.2.", "conv1."),
    ("residual.3.", "norm2."),
    ("residual.6.", "conv2."),
    ("shortcut.", "conv_shortcut."),
]


def _rows_21(num_res_blocks: int, stages: int) -> list[tuple[str, str]]:
    """Wan 2.1: the encoder list is flat in both formats; the decoder's flat list of
    ``num_res_blocks + 1`` residual blocks + 1 upsampler per stage is grouped by diffusers."""
    per_stage = num_res_blocks + 2
    rows = [("encoder.downsamples.{i}.", "encoder.down_blocks.{i}.")]
    for i in range(stages):
        for j in range(num_res_blocks + 1):
            rows.append((f"decoder.upsamples.{i * per_stage + j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        rows.append((f"decoder.upsamples.{i * per_stage + num_res_blocks + 1}.",
                     f"decoder.up_blocks.{i}.upsamplers.0."))
    return rows


def _rows_22(num_res_blocks: int) -> list[tuple[str, str]]:
    """Wan 2.2: stages are blocks in both formats; the resampler is the last entry officially."""
    return [
        (f"encoder.downsamples.{{i}}.downsamples.{num_res_blocks}.", "encoder.down_blocks.{i}.downsampler."),
        ("encoder.downsamples.{i}.downsamples.{j}.", "encoder.down_blocks.{i}.resnets.{j}."),
        (f"decoder.upsamples.{{i}}.upsamples.{num_res_blocks + 1}.", "decoder.up_blocks.{i}.upsampler."),
        ("decoder.upsamples.{i}.upsamples.{j}.", "decoder.up_blocks.{i}.resnets.{j}."),
    ]


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
    """The compiled form of a key template (a few dozen templates, asked for once per key)."""
    fields = {"side": r"(?P<side>encoder|decoder)", "i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)"}
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(re.escape(p) if n % 2 == 0 else fields[p] for n, p in enumerate(parts))
    return re.compile("^" + regex)


def _convert_key(key: str, rows: list[tuple[str, str]], to_diffusers: bool) -> str | None:
    for official, diffusers in rows + _COMMON_ROWS:
        src, dst = (official, diffusers) if to_diffusers else (diffusers, official)
        m = _pattern(src).match(key)
        if m is None:
            continue
        rest = key[m.end():]
        for leaf_off, leaf_dif in _LEAF_ROWS:
            leaf_src, leaf_dst = (leaf_off, leaf_dif) if to_diffusers else (leaf_dif, leaf_off)
            if rest.startswith(leaf_src):
                rest = leaf_dst + rest[len(leaf_src):]
                break
        return dst.format(**m.groupdict()) + rest
    return None


def _indices(keys, prefix: str) -> list[int]:
    pat = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def _diffusers_layout(keys) -> tuple[str, int, int]:
    """(version, num_res_blocks, stages) of a diffusers AutoencoderKLWan key set."""
    version = "2.2" if any(".downsampler." in k or ".upsampler." in k for k in keys) else "2.1"
    resnets = _indices(keys, "decoder.up_blocks.0.resnets.")
    stages = len(_indices(keys, "decoder.up_blocks."))
    return version, len(resnets) - 1, stages


def _official_layout(keys) -> tuple[str, int, int]:
    """(version, num_res_blocks, stages) of an official key set."""
    if any(k.startswith("encoder.downsamples.0.downsamples.") for k in keys):
        stages = len(_indices(keys, "encoder.downsamples."))
        res = [j for j in _indices(keys, "encoder.downsamples.0.downsamples.")
               if f"encoder.downsamples.0.downsamples.{j}.residual.0.gamma" in keys]
        return "2.2", len(res), stages
    blocks = _indices(keys, "encoder.downsamples.")
    first_resample = next((n for n in blocks if f"encoder.downsamples.{n}.resample.1.weight" in keys),
                          len(blocks))
    resamplers = sum(f"encoder.downsamples.{n}.resample.1.weight" in keys for n in blocks)
    return "2.1", first_resample, resamplers + 1


def diffusers_to_official(keys) -> dict[str, str]:
    """Maps each diffusers ``AutoencoderKLWan`` key to its official name (unknown keys: None)."""
    keys = list(keys)
    version, nrb, stages = _diffusers_layout(keys)
    rows = _rows_21(nrb, stages) if version == "2.1" else _rows_22(nrb)
    return {k: _convert_key(k, rows, to_diffusers=False) for k in keys}


def official_to_diffusers(keys) -> dict[str, str]:
    """Maps each official key to its diffusers ``AutoencoderKLWan`` name (unknown keys: None)."""
    keys = list(keys)
    version, nrb, stages = _official_layout(keys)
    rows = _rows_21(nrb, stages) if version == "2.1" else _rows_22(nrb)
    return {k: _convert_key(k, rows, to_diffusers=True) for k in keys}


# ---------------------------------------------------------------------------------------------
# Hyperparameters from shapes


def infer_vae_config(shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> tuple[str, dict]:
    """(version, constructor kwargs) from the shapes of an official-layout key set."""
    def shape(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"{source}: Wan VAE tensor '{key}' is missing")
        return shapes[key]

    version, nrb, stages = _official_layout(shapes)
    dim = shape("encoder.conv1.weight")[0]
    z_dim = shape("conv2.weight")[0]
    in_ch = shape("encoder.conv1.weight")[1]
    expected_in = 3 if version == "2.1" else 12
    if in_ch != expected_in:
        raise CheckpointError(f"{source}: encoder.conv1 takes {in_ch} channels; a Wan {version} VAE "
                              f"takes {expected_in}")
    if nrb < 1 or stages < 2:
        raise CheckpointError(f"{source}: could not find the encoder stages of a Wan {version} VAE "
                              f"(found {nrb} residual blocks per stage, {stages} stages)")
    outs, temporal = [], []
    for i in range(stages):
        if version == "2.1":
            base = f"encoder.downsamples.{i * (nrb + 1)}"
            resampler = f"encoder.downsamples.{i * (nrb + 1) + nrb}"
        else:
            base, resampler = f"encoder.downsamples.{i}.downsamples.0", f"encoder.downsamples.{i}.downsamples.{nrb}"
        outs.append(shape(f"{base}.residual.2.weight")[0])
        if i < stages - 1:
            temporal.append(f"{resampler}.time_conv.weight" in shapes)
    if any(o % dim for o in outs):
        raise CheckpointError(f"{source}: encoder stage widths {outs} are not multiples of the base "
                              f"width {dim}")
    config = dict(dim=dim, z_dim=z_dim, dim_mult=[o // dim for o in outs], num_res_blocks=nrb,
                  temporal_downsample=temporal)
    if version == "2.2":
        config["dec_dim"] = shape("decoder.head.2.weight")[1] // config["dim_mult"][0]
    return version, config


# ---------------------------------------------------------------------------------------------
# Loading


def official_names(ckpt: Checkpoint, source: str) -> dict[str, str]:
    """Official key -> key in the checkpoint (prefix stripped, diffusers names converted)."""
    keys = ckpt.keys()
    for prefix in KNOWN_PREFIXES:
        if prefix + _OFFICIAL_MARK in ckpt:
            return {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
        if prefix + _DIFFUSERS_MARK in ckpt:
            inner = [k[len(prefix):] for k in keys if k.startswith(prefix)]
            names = diffusers_to_official(inner)
            unknown = [k for k, v in names.items() if v is None]
            if unknown:
                raise CheckpointError(f"{source}: diffusers VAE tensor '{prefix + unknown[0]}' has no "
                                      f"official Wan VAE name ({len(unknown)} such tensors)")
            return {v: prefix + k for k, v in names.items()}
    sample = ", ".join(keys[:3])
    raise CheckpointError(
        f"{source}: does not look like a Wan VAE checkpoint (expected '{_OFFICIAL_MARK}' or diffusers "
        f"'{_DIFFUSERS_MARK}', optionally under one of the prefixes "
        f"{[p for p in KNOWN_PREFIXES if p]}; found {len(keys)} tensors such as {sample})")


def load_vae(path, device="cpu", dtype=None):
    """Loads a Wan 2.1 or 2.2 VAE (version detected), in eval mode.

    Args:
        path: ``.pth`` / ``.safetensors`` file, diffusers VAE folder, or diffusers pipeline folder.
        device: where the weights go.
        dtype: floating dtype of the weights (None: float32, the reference precision).
    Returns:
        ``WanVAE21`` or ``WanVAE22`` (``encode``, ``decode``, ``z_dim``, ``stride``, ``version``).
    """
    from wan.models.vae21 import LATENTS_MEAN_21, WanVAE21
    from wan.models.vae22 import LATENTS_MEAN_22, WanVAE22

    ckpt = open_checkpoint(path, subfolder="vae")
    source = str(ckpt.files[0] if len(ckpt.files) == 1 else Path(path))
    names = official_names(ckpt, source)
    shapes = {k: ckpt.shape(src) for k, src in names.items()}
    version, config = infer_vae_config(shapes, source)
    want_z = len(LATENTS_MEAN_21 if version == "2.1" else LATENTS_MEAN_22)
    if config["z_dim"] != want_z:
        raise CheckpointError(f"{source}: latent channels (conv2) = {config['z_dim']}; a Wan {version} "
                              f"VAE has {want_z}")
    cls = WanVAE21 if version == "2.1" else WanVAE22
    tensors = ((k, (lambda src=src: ckpt.tensor(src))) for k, src in names.items())
    model = materialize(lambda: cls(**config), tensors, device=device, dtype=dtype or torch.float32,
                        source=source)
    return model.prepare_weights_()
