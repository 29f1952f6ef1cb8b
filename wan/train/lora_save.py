"""Saving a trained :class:`~wan.train.network.LoraNetwork` as a LoRA file, with musubi-tuner's metadata.

Layouts (``save_format``):

* ``musubi`` (default): ``lora_unet_<module path with _>.lora_down.weight`` [r, in],
  ``.lora_up.weight`` [out, r] and the scalar ``.alpha``, as musubi's ``LoRANetwork.save_weights``.
* ``comfy``: ``diffusion_model.<module path>.lora_A.weight`` [r, in], ``.lora_B.weight`` [out, r]
  and ``diffusion_model.<module path>.alpha``: ComfyUI's ``comfy/lora.py`` reads ``<x>.alpha`` next
  to ``<x>.lora_B.weight``/``<x>.lora_A.weight`` and scales by alpha / rank, so the file needs no
  conversion and keeps the exact tensors. (musubi's ``convert_lora.py`` instead folds sqrt(alpha/r)
  into both matrices and drops alpha; equal in effect, not bit for bit.)

Where: :func:`lora_folder` is the folder a run's LoRA files go to: ``--output_dir``, or, when that is a
LoRA root (the drop-in folder with one subfolder per model family, see :mod:`wan.lora.library`), the
subfolder of the family of the model trained on, where ``generate`` and the app look for it.

Every tensor, alpha included, is written in the save dtype (float32 by default, as musubi's
``resolve_save_dtype`` without ``--save_precision``). Metadata: the ``ss_*`` keys of musubi's
``trainer_base.py`` (:func:`training_metadata`), the ``modelspec.*`` keys of its
``utils/sai_model_spec.py`` (:func:`modelspec_metadata`), and the ``sshs_model_hash`` /
``sshs_legacy_hash`` its ``save_weights`` adds. Files are written aside and renamed into place, so a
crash or a full disk never leaves a half-written LoRA under the final name.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import torch

from wan.lora.convert import save_lora, to_comfy, to_musubi
from wan.train.network import NETWORK_MODULE, LoraNetwork

SAVE_FORMATS = ("musubi", "comfy")
BASE_MODEL_VERSION = "wan"  # musubi's ARCHITECTURE_WAN_FULL, written to ss_base_model_version
# musubi's SS_METADATA_MINIMUM_KEYS: what --no_metadata keeps.
MINIMUM_KEYS = ("ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
# Training values musubi writes as ss_<name>; the caller fills those it knows.
TRAINING_KEYS = (
    "session_id", "training_started_at", "output_name", "learning_rate", "num_train_items",
    "num_batches_per_epoch", "num_epochs", "gradient_checkpointing", "gradient_checkpointing_cpu_offload",
    "gradient_accumulation_steps", "max_train_steps", "lr_warmup_steps", "lr_scheduler", "mixed_precision",
    "seed", "training_comment", "optimizer", "max_grad_norm", "fp8_base", "full_fp16", "full_bf16",
    "weighting_scheme", "logit_mean", "logit_std", "mode_scale", "guidance_scale", "timestep_sampling",
    "sigmoid_scale", "discrete_flow_shift", "datasets", "training_finished_at", "steps", "epoch",
)
# modelspec for Wan (sai_model_spec.py): musubi names every Wan "wan2.1", 2.2 included.
MODELSPEC_ARCH = "wan2.1"
MODELSPEC_IMPL = "https://github.com/Wan-Video/Wan2.1"
MODELSPEC_DEFAULT_RESOLUTION = (1280, 720)


# ---------------------------------------------------------------------------------------------
# Metadata


def _text(value: Any) -> str:
    """A metadata value as musubi writes it: str(), except lists/dicts, which become JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value)
    return str(value)


def training_metadata(network: LoraNetwork, training: Mapping[str, Any] | None = None, *,
                      dit_path: str | os.PathLike | None = None, vae_path: str | os.PathLike | None = None,
                      network_args: Mapping[str, str] | None = None, minimal: bool = False) -> dict[str, str]:
    """musubi's ``ss_*`` metadata for ``network``.

    The network fills ``ss_network_module`` (``networks.lora_wan``), ``ss_network_dim``,
    ``ss_network_alpha``, ``ss_network_dropout``, ``ss_network_args`` (``network_args`` as given,
    else the network's non-default settings; absent when there are none) and
    ``ss_base_model_version`` (``wan``). ``training`` maps names of :data:`TRAINING_KEYS` (without
    the ``ss_`` prefix; ``datasets`` may be a list, written as JSON) or full ``ss_*`` keys to values;
    only what it holds is written. ``dit_path`` / ``vae_path`` give ``ss_sd_model_name`` /
    ``ss_vae_name`` (the file name when the path exists, as musubi). ``minimal`` keeps only
    :data:`MINIMUM_KEYS` (musubi's ``--no_metadata``).
    """
    meta: dict[str, Any] = {}
    for key, value in (training or {}).items():
        if key in TRAINING_KEYS:
            meta[f"ss_{key}"] = value
        elif key.startswith("ss_"):
            meta[key] = value
        else:
            raise ValueError(f"training metadata key {key!r} is not allowed; one of {', '.join(TRAINING_KEYS)} "
                             "or a full ss_* key")
    meta.update({
        "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": network.lora_dim,
        "ss_network_alpha": network.alpha,
        "ss_network_dropout": network.dropout,
    })
    args = dict(network_args) if network_args is not None else network.network_args()
    if args:
        meta["ss_network_args"] = json.dumps(args)
    for key, path in (("ss_sd_model_name", dit_path), ("ss_vae_name", vae_path)):
        if path is not None:
            meta[key] = os.path.basename(path) if os.path.exists(path) else str(path)
    out = {k: _text(v) for k, v in meta.items()}
    return {k: v for k, v in out.items() if k in MINIMUM_KEYS} if minimal else out


def modelspec_metadata(*, title: str | None = None, timestamp: float | None = None,
                       resolution: int | str | tuple[int, int] | None = None, author: str | None = None,
                       description: str | None = None, license: str | None = None, tags: str | None = None,
                       timestep_range: tuple[int, int] | None = None,
                       architecture: str | None = None) -> dict[str, str]:
    """The ``modelspec.*`` keys musubi's ``sai_model_spec.build_metadata`` writes for a Wan LoRA.

    ``title`` defaults to ``LoRA@<timestamp>``; ``resolution`` (``W,H`` text, one int or (W, H))
    to 1280x720, musubi's placeholder; ``timestep_range`` (min, max) on the 0..1000 scale, written
    when training was limited to it; ``architecture`` replaces ``wan2.1`` (musubi's ``--metadata_arch``).
    Author, description, license and tags are written only when given.
    """
    ts = time.time() if timestamp is None else timestamp
    if resolution is None:
        resolution = MODELSPEC_DEFAULT_RESOLUTION
    elif isinstance(resolution, str):
        resolution = tuple(int(v) for v in resolution.split(","))
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if len(resolution) == 1:
        resolution = (resolution[0], resolution[0])
    meta = {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{architecture or MODELSPEC_ARCH}/lora",
        "modelspec.implementation": MODELSPEC_IMPL,
        "modelspec.title": title if title is not None else f"LoRA@{ts}",
        "modelspec.resolution": f"{resolution[0]}x{resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(ts)).isoformat(),
    }
    for key, value in (("author", author), ("description", description), ("license", license), ("tags", tags)):
        if value is not None:
            meta[f"modelspec.{key}"] = value
    if timestep_range is not None:
        meta["modelspec.timestep_range"] = f"{timestep_range[0]},{timestep_range[1]}"
    return meta


def addnet_hashes(state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as musubi's ``precalculate_safetensors_hashes``:
    the file serialised with only its ``ss_*`` metadata, then the sha256 of everything after the
    header, and the first 8 hex digits of the sha256 of the 64 KiB at 1 MiB."""
    from safetensors.torch import save
    data = save(dict(state), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


# ---------------------------------------------------------------------------------------------
# Where


def is_lora_root(folder: str | os.PathLike) -> bool:
    """Is ``folder`` a LoRA root (``loras/`` with one subfolder per model family)? It is when it is named
    ``loras`` (the drop-in folder's name: the default of ``--lora_dir`` and of the app's setting) or holds a
    family folder or the ``presets`` folder already."""
    from wan.lora.library import FAMILY_FOLDERS, PRESETS_FOLDER
    folder = Path(folder)
    if folder.name == "loras":
        return True
    return folder.is_dir() and any((folder / name).is_dir() for name in (*FAMILY_FOLDERS.values(), PRESETS_FOLDER))


def lora_folder(output_dir: str | os.PathLike, spec: Any = None) -> Path:
    """The folder the LoRA files of a run go to: ``output_dir``, or its subfolder of ``spec``'s model family
    (``loras/test/`` for a TEST model) when ``output_dir`` is a LoRA root (:func:`is_lora_root`). Without a
    registry model (``spec`` None) or for a model no family folder covers, ``output_dir`` itself."""
    out = Path(output_dir)
    if spec is None or not is_lora_root(out):
        return out
    from wan.lora.library import FAMILY_FOLDERS, family_for_model
    family = family_for_model(spec)
    return out / FAMILY_FOLDERS[family] if family is not None else out


# ---------------------------------------------------------------------------------------------
# Saving


def network_state(network: LoraNetwork, save_format: str = "musubi",
                  dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """The network's tensors in the ``save_format`` layout, CPU copies in ``dtype`` (None keeps the
    training dtype), alpha included."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format {save_format!r} is not allowed; one of {', '.join(SAVE_FORMATS)}")
    lora = network.to_lora_file(dtype)
    return to_musubi(lora) if save_format == "musubi" else to_comfy(lora)


def save_network(network: LoraNetwork, path: str | os.PathLike, *, save_format: str = "musubi",
                 dtype: torch.dtype | None = torch.float32, metadata: Mapping[str, str] | None = None) -> Path:
    """Writes ``network`` to ``path`` (.safetensors) atomically; returns the path.

    ``metadata``: e.g. :func:`training_metadata` plus :func:`modelspec_metadata`; the
    ``sshs_*`` hashes of the written tensors are added. The folder is created if needed.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {str(path)!r} is not allowed; a .safetensors file")
    state = network_state(network, save_format, dtype)
    meta = {str(k): _text(v) for k, v in (metadata or {}).items()}
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(state, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a name of our own rather than mkstemp's, whose 0600 mode would stay on the final file
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        save_lora(state, tmp, meta)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
