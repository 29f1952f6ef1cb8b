"""musubi-tuner's Wan cache files, byte-compatible in names, keys, dtypes and metadata, so that a cache made by
either tool is reused by the other.

Two files per training item, in the dataset's cache directory:

    <base>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_wan.safetensors    video latents (one per extracted clip)
    <base>_<W:04d>x<H:04d>_wan.safetensors                             image latents
    <base>_wan_te.safetensors                                          umT5 output for the caption

<base> is the media file name without its extension; W x H is the *original* media size (before bucket resizing):
the trainer parses it back from the name and recomputes the bucket from it. Latent file keys, with the torch dtype
name as suffix (``bfloat16``, ``float32``, ``float8_e4m3fn`` ...):

    latents_{F}x{H}x{W}_{dtype}         [C, F, H, W]      VAE latents (C = 16 for the Wan 2.1 VAE, 48 for Wan 2.2's)
    latents_image_{F}x{H}x{W}_{dtype}   [4 + C, F, H, W]  i2v conditioning: first-frame mask, then the VAE latent of
                                                          the first frame followed by zero (grey) pixel frames
    latents_control_{F}x{H}x{W}_{dtype} [C, F, H, W]      Fun-Control: VAE latents of the control video
    clip_{dtype}                        [257, 1280]       Wan 2.1 i2v CLIP features, stored as float16 although the
                                                          suffix is the *latents'* dtype (musubi does exactly this)
    f_indices_int32                     [F]               one-frame mode only: latent frame indices

Text file key: ``varlen_t5_{dtype}`` [L, 4096], the umT5 output trimmed to the real token count.
Metadata: ``architecture=wan``, ``width``, ``height`` (original size), ``format_version=1.0.1`` and, for videos,
``frame_count``; the text file has ``architecture``, ``caption1``, ``format_version``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from wan.fileio import write_bytes_atomic

log = logging.getLogger(__name__)

ARCHITECTURE = "wan"  # musubi's short and full names for Wan (2.1 and 2.2 alike) are both "wan"
FORMAT_VERSION = "1.0.1"
LATENT_SUFFIX = f"_{ARCHITECTURE}.safetensors"
TEXT_SUFFIX = f"_{ARCHITECTURE}_te.safetensors"
T5_DIM = 4096
CLIP_TOKENS, CLIP_DIM = 257, 1280
I2V_MASK_CHANNELS = 4
VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = {16: 8, 48: 16}  # latent channels -> pixels per latent cell (Wan 2.1 VAE, Wan 2.2 VAE)
_MAX_HEADER = 100 * 1024 * 1024  # a header larger than this is garbage, not a cache

_LATENT_KEY = re.compile(r"^latents(?:_(image|control))?_(\d+)x(\d+)x(\d+)_(.+)$")
_OTHER_KEYS = {"clip": re.compile(r"^clip_(.+)$"), "f_indices": re.compile(r"^f_indices_(.+)$")}
_T5_KEY = re.compile(r"^varlen_t5_(.+)$")


class CacheFileError(ValueError):
    """A cache file that cannot be used; the message names the file and what is wrong."""


# ---------------------------------------------------------------------------------------------------------------
# Names


def dtype_name(dtype: torch.dtype) -> str:
    """The key suffix musubi writes for ``dtype``: the torch name without ``torch.`` (``bfloat16``)."""
    return str(dtype).split(".")[-1]


def latent_frames(frames: int) -> int:
    """Latent frame count for ``frames`` pixel frames (4N+1 -> N+1): the VAE keeps frame 0 and folds 4 per latent."""
    return (frames - 1) // VAE_TEMPORAL_STRIDE + 1


def _media_base(media_path: str | os.PathLike) -> str:
    """The media file name without folder and extension, as musubi derives it (``os.path.splitext``)."""
    return os.path.splitext(os.path.basename(os.fspath(media_path)))[0]


def video_latent_cache_name(
    media_path: str | os.PathLike, start: int, frames: int, original_size: tuple[int, int]
) -> str:
    """Name of the latent cache of the clip of ``frames`` frames from ``start`` in a video whose frames are
    ``original_size`` = (W, H) before bucket resizing."""
    # musubi first makes an item key "<media without ext>_<start>-<frames><ext>" then strips folder and extension
    body, ext = os.path.splitext(os.fspath(media_path))
    base = _media_base(f"{body}_{int(start):05d}-{int(frames):03d}{ext}")
    width, height = original_size
    return f"{base}_{int(width):04d}x{int(height):04d}{LATENT_SUFFIX}"


def image_latent_cache_name(media_path: str | os.PathLike, original_size: tuple[int, int]) -> str:
    """Name of the latent cache of an image whose size is ``original_size`` = (W, H) before bucket resizing."""
    width, height = original_size
    return f"{_media_base(media_path)}_{int(width):04d}x{int(height):04d}{LATENT_SUFFIX}"


def text_cache_name(media_path: str | os.PathLike) -> str:
    """Name of the text-encoder cache of a media file (one per media file, shared by all its clips)."""
    return f"{_media_base(media_path)}{TEXT_SUFFIX}"


@dataclass(frozen=True)
class CacheName:
    """What the trainer reads from a latent cache name. ``start``/``frames``/``section`` are None for images."""

    item_key: str  # media base name (plus "_<start>-<frames>" when an image dataset reads a video cache's name)
    original_size: tuple[int, int]  # (W, H)
    start: int | None = None
    frames: int | None = None
    section: int | None = None  # optional third field "00000-000-00" that musubi's parser tolerates

    @property
    def text_cache_name(self) -> str:
        """The text-encoder cache the trainer pairs with this latent cache."""
        return f"{self.item_key}{TEXT_SUFFIX}"


def _name_tokens(name: str | os.PathLike, count: int) -> list[str]:
    """The ``_``-separated tokens of a latent cache file name, checked to have the Wan suffix and ``count`` tokens."""
    base = os.path.basename(os.fspath(name))
    if not base.endswith(LATENT_SUFFIX) or base.endswith(TEXT_SUFFIX):
        raise CacheFileError(f"{name}: not a Wan latent cache name (must end with '{LATENT_SUFFIX}')")
    tokens = base.split("_")
    if len(tokens) < count:
        raise CacheFileError(f"{name}: too few '_'-separated parts for a latent cache name")
    return tokens


def _parse_size(name: str | os.PathLike, token: str) -> tuple[int, int]:
    """``"0512x0768"`` -> (512, 768); errors name the file."""
    parts = token.split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise CacheFileError(f"{name}: size part {token!r} is not <W>x<H>")
    return int(parts[0]), int(parts[1])


def parse_video_cache_name(name: str | os.PathLike) -> CacheName:
    """Parses ``<base>_<start>-<frames>[-<section>]_<W>x<H>_wan.safetensors`` as musubi's VideoDataset does:
    split on ``_``; the last-but-one token is the size, the one before it the frame range, the rest the key."""
    tokens = _name_tokens(name, 3)
    size = _parse_size(name, tokens[-2])
    # musubi reads the first two "-" fields and ignores the rest (an optional section index)
    frame_parts = tokens[-3].split("-")
    if len(frame_parts) < 2 or not all(p.isdigit() for p in frame_parts[:2]):
        raise CacheFileError(f"{name}: frame part {tokens[-3]!r} is not <start>-<frames>")
    section = int(frame_parts[2]) if len(frame_parts) > 2 and frame_parts[2].isdigit() else None
    return CacheName("_".join(tokens[:-3]), size, int(frame_parts[0]), int(frame_parts[1]), section)


def parse_image_cache_name(name: str | os.PathLike) -> CacheName:
    """Parses ``<base>_<W>x<H>_wan.safetensors`` as musubi's ImageDataset does (the key is everything before
    the size token)."""
    tokens = _name_tokens(name, 2)
    return CacheName("_".join(tokens[:-2]), _parse_size(name, tokens[-2]))


@dataclass(frozen=True)
class CacheItem:
    """One training item found in a cache directory: its parsed latent name and both file paths."""

    name: CacheName
    latent_path: Path
    text_path: Path


def find_cache_items(cache_dir: str | os.PathLike, *, video: bool) -> list[CacheItem]:
    """The items the trainer would train on: every ``*_wan.safetensors`` in ``cache_dir`` (sorted), parsed as a
    video or an image cache name, paired with ``<item_key>_wan_te.safetensors``; an item without its text cache is
    skipped with a warning, as musubi does."""
    cache_dir = Path(cache_dir)
    parse = parse_video_cache_name if video else parse_image_cache_name
    items = []
    for latent_path in sorted(cache_dir.glob(f"*{LATENT_SUFFIX}")):
        name = parse(latent_path)
        text_path = cache_dir / name.text_cache_name
        if not text_path.exists():
            log.warning("Text encoder output cache file not found: %s", text_path)
            continue
        items.append(CacheItem(name, latent_path, text_path))
    return items


# ---------------------------------------------------------------------------------------------------------------
# I2V conditioning, built as musubi's wan_cache_latents.py does


def i2v_mask(frames: int, lat_h: int, lat_w: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The 4-channel first-frame mask [4, latent_frames(frames), lat_h, lat_w]: 1 where the first pixel frame
    is known, 0 elsewhere. ``frames`` is the pixel frame count (4N+1)."""
    if frames < 1 or (frames - 1) % VAE_TEMPORAL_STRIDE:
        raise ValueError(f"i2v mask: {frames} frames is not 4N+1")
    per_frame = torch.zeros(frames, lat_h, lat_w, dtype=dtype)
    per_frame[0] = 1
    # The VAE gives frame 0 a latent frame of its own and folds 4 pixel frames into each later one, so frame 0 is
    # counted 4 times; then each group of 4 pixel frames becomes the 4 mask channels of one latent frame.
    grouped = torch.cat([per_frame[:1].expand(VAE_TEMPORAL_STRIDE, -1, -1), per_frame[1:]])
    return grouped.view(-1, VAE_TEMPORAL_STRIDE, lat_h, lat_w).transpose(0, 1).contiguous()


def i2v_pixel_input(first_frame: torch.Tensor, frames: int) -> torch.Tensor:
    """The video the VAE encodes for the i2v conditioning: the first frame [3, H, W] or [3, 1, H, W] in [-1, 1]
    followed by ``frames - 1`` zero frames (mid-grey after normalisation) -> [3, frames, H, W]."""
    if first_frame.dim() == 3:
        first_frame = first_frame.unsqueeze(1)
    if first_frame.dim() != 4 or first_frame.shape[0] != 3 or first_frame.shape[1] != 1:
        raise ValueError(f"i2v first frame must be [3, H, W] or [3, 1, H, W], got {list(first_frame.shape)}")
    padding = first_frame.new_zeros(3, frames - 1, *first_frame.shape[2:])
    return torch.cat([first_frame, padding], dim=1)


def i2v_image_latents(mask: torch.Tensor, encoded: torch.Tensor) -> torch.Tensor:
    """``latents_image``: the mask [4, F, h, w] then the VAE latent of ``i2v_pixel_input`` [C, >=F, h, w] cut to F
    frames, on channels -> [4 + C, F, h, w] in the latent's dtype."""
    frames = mask.shape[1]
    if encoded.dim() != 4 or encoded.shape[1] < frames or encoded.shape[2:] != mask.shape[2:]:
        raise ValueError(f"i2v: encoded latent {list(encoded.shape)} does not fit mask {list(mask.shape)}")
    return torch.cat([mask.to(encoded.dtype), encoded[:, :frames]], dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Writing


def _cpu_copy(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous CPU copy (never a view of the caller's tensor: NaN repair must not touch it, and safetensors
    refuses tensors that share storage)."""
    return tensor.detach().to(device="cpu", dtype=dtype, memory_format=torch.contiguous_format, copy=True)


def _replace_nan(tensors: dict[str, torch.Tensor], path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """NaN -> 0 in every tensor, with a warning naming the key and file (musubi writes the cache anyway)."""
    out = {}
    for key, value in tensors.items():
        if value.is_floating_point():
            # fp8 tensors lack most CPU kernels: test and repair them through float32, which holds them exactly
            wide = value.float() if value.element_size() == 1 else value
            nan = torch.isnan(wide)
            if nan.any():
                log.warning("%s tensor has NaN: %s, replace NaN with 0", key, path)
                value = wide.masked_fill(nan, 0).to(value.dtype)
        out[key] = value
    return out


def _write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """A temporary file in the same folder renamed over ``path``, so a reader (or musubi's glob, which the
    ``.tmp`` name does not match) never sees a half-written cache."""
    return write_bytes_atomic(path, data)


def latent_cache_tensors(
    latents: torch.Tensor,
    image_latents: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    control_latents: torch.Tensor | None = None,
    f_indices: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """The key -> tensor dict of a latent cache. ``latents`` [C, F, H, W]; ``image_latents`` [4 + C, F, H, W];
    ``control_latents`` [C, F, H, W]; ``clip`` [257, 1280] (or [n, 257, 1280] in one-frame mode)."""
    if latents.dim() != 4:
        raise ValueError(f"latents must be [C, F, H, W], got {list(latents.shape)}")
    _, frames, height, width = latents.shape
    dtype = latents.dtype
    # Every suffix, clip's included, is the latents' dtype: musubi builds one dtype string and reuses it
    suffix = dtype_name(dtype)
    shape = f"{frames}x{height}x{width}"
    tensors = {f"latents_{shape}_{suffix}": _cpu_copy(latents)}
    if clip is not None:
        tensors[f"clip_{suffix}"] = _cpu_copy(clip, torch.float16)  # musubi always stores CLIP features as fp16
    for role, extra in (("image", image_latents), ("control", control_latents)):
        if extra is not None:
            if extra.dim() != 4 or tuple(extra.shape[1:]) != (frames, height, width):
                raise ValueError(f"{role} latents {list(extra.shape)} do not match latents {list(latents.shape)}")
            tensors[f"latents_{role}_{shape}_{suffix}"] = _cpu_copy(extra, dtype)  # musubi's are in the VAE dtype
    if f_indices is not None:
        tensors[f"f_indices_{dtype_name(torch.int32)}"] = torch.tensor(list(f_indices), dtype=torch.int32)
    return tensors


def latent_cache_metadata(original_size: tuple[int, int], frame_count: int | None = None) -> dict[str, str]:
    """The latent file's metadata; ``frame_count`` (pixel frames) is written for videos only, as in musubi."""
    metadata = {
        "architecture": ARCHITECTURE,
        "width": f"{int(original_size[0])}",
        "height": f"{int(original_size[1])}",
        "format_version": FORMAT_VERSION,
    }
    if frame_count is not None:
        metadata["frame_count"] = f"{int(frame_count)}"
    return metadata


def write_latent_cache(
    path: str | os.PathLike,
    latents: torch.Tensor,
    *,
    original_size: tuple[int, int],
    frame_count: int | None = None,
    image_latents: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    control_latents: torch.Tensor | None = None,
    f_indices: list[int] | None = None,
) -> Path:
    """Writes a latent cache (see the module docstring for the keys). ``original_size`` is the media's (W, H)
    before bucket resizing; ``frame_count`` the clip's pixel frames (None for images)."""
    tensors = latent_cache_tensors(latents, image_latents, clip, control_latents, f_indices)
    tensors = _replace_nan(tensors, path)
    return _write_atomic(path, save(tensors, metadata=latent_cache_metadata(original_size, frame_count)))


def text_cache_tensors(t5: torch.Tensor) -> dict[str, torch.Tensor]:
    """The key -> tensor dict of a text cache: ``t5`` [L, 4096], already trimmed to the real token count."""
    if t5.dim() != 2:
        raise ValueError(f"T5 output must be [L, dim] (trimmed, no batch), got {list(t5.shape)}")
    return {f"varlen_t5_{dtype_name(t5.dtype)}": _cpu_copy(t5)}


def text_cache_metadata(caption: str) -> dict[str, str]:
    """The text file's metadata."""
    return {"architecture": ARCHITECTURE, "caption1": caption, "format_version": FORMAT_VERSION}


@lru_cache(maxsize=1)
def _dtype_names() -> tuple[str, ...]:
    """Every torch dtype name, longest first, so ``float8_e4m3fn`` is stripped whole rather than as ``fn``."""
    names = {dtype_name(v) for v in vars(torch).values() if isinstance(v, torch.dtype)}
    return tuple(sorted(names, key=len, reverse=True))


def _strip_dtype(key: str) -> str:
    """``varlen_t5_bfloat16`` -> ``varlen_t5``; a key without a known dtype suffix is returned unchanged."""
    for name in _dtype_names():
        if key.endswith("_" + name):
            return key[: -len(name) - 1]
    return key


def write_text_cache(path: str | os.PathLike, t5: torch.Tensor, *, caption: str, merge_existing: bool = True) -> Path:
    """Writes a text cache. Like musubi, an existing file is merged: its other keys and extra metadata are kept,
    a key of the same name in another dtype is dropped, and a changed caption is overwritten with a warning."""
    tensors = _replace_nan(text_cache_tensors(t5), path)
    metadata = text_cache_metadata(caption)
    if merge_existing and Path(path).exists():
        try:
            old_tensors, old_meta = _load(path)
        except CacheFileError as exc:
            # musubi would crash here; an unreadable cache is simply replaced
            log.warning("%s: existing text cache unreadable (%s), overwriting it", path, exc)
        else:
            if old_meta.get("architecture") != ARCHITECTURE:
                raise CacheFileError(f"{path}: existing text cache is for {old_meta.get('architecture')!r}, not 'wan'")
            if old_meta.get("caption1") != caption:
                log.warning("%s: caption changed from %r to %r, overwriting", path, old_meta.get("caption1"), caption)
            new_bases = {_strip_dtype(key) for key in tensors}
            tensors.update({k: v for k, v in old_tensors.items() if _strip_dtype(k) not in new_bases})
            metadata.update({k: v for k, v in old_meta.items() if k not in ("caption1", "format_version")})
    return _write_atomic(path, save(tensors, metadata=metadata))


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor entries {key: {dtype, shape, data_offsets}} and metadata of a safetensors file, without reading
    the data; a file whose size disagrees with its header (truncated or padded) is an error."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CacheFileError(f"{path}: {size} bytes, too short for a safetensors file")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(size - 8, _MAX_HEADER):
                raise CacheFileError(f"{path}: header length {header_len} does not fit a {size}-byte file (truncated?)")
            header = json.loads(fh.read(header_len))
    except OSError as exc:
        raise CacheFileError(f"{path}: cannot read: {exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CacheFileError(f"{path}: header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise CacheFileError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    try:
        data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise CacheFileError(f"{path}: malformed tensor entry in header") from exc
    if 8 + header_len + data_end != size:
        raise CacheFileError(f"{path}: header says {8 + header_len + data_end} bytes, file has {size} (truncated?)")
    return header, metadata


def _key_role(key: str) -> tuple[str, tuple[int, int, int] | None, str] | None:
    """(role, (F, H, W) from the name or None, dtype suffix) of a latent-file key; None for unknown keys."""
    match = _LATENT_KEY.match(key)
    if match:
        role = "latents" if match.group(1) is None else f"latents_{match.group(1)}"
        return role, (int(match.group(2)), int(match.group(3)), int(match.group(4))), match.group(5)
    for role, pattern in _OTHER_KEYS.items():
        match = pattern.match(key)
        if match:
            return role, None, match.group(1)
    return None


def _roles(path: str | os.PathLike, keys) -> dict[str, tuple[str, tuple[int, int, int] | None, str]]:
    """role -> (key, name shape, dtype suffix) for the known keys; two keys for one role is an error."""
    roles = {}
    for key in keys:
        parsed = _key_role(key)
        if parsed is None:
            continue
        role, shape, dtype = parsed
        if role in roles:
            raise CacheFileError(f"{path}: two keys for {role}: {roles[role][0]!r} and {key!r}")
        roles[role] = (key, shape, dtype)
    return roles


@dataclass
class LatentCache:
    """A read latent cache. Tensors as stored (CPU, stored dtype); ``dtype_names`` and ``key_shapes`` are parsed
    from the key names per role (``latents``, ``latents_image``, ``latents_control``, ``clip``, ``f_indices``)."""

    path: Path
    latents: torch.Tensor  # [C, F, H, W]
    image_latents: torch.Tensor | None  # [4 + C, F, H, W]
    clip: torch.Tensor | None  # [257, 1280] float16 (or [n, 257, 1280])
    control_latents: torch.Tensor | None  # [C, F, H, W]
    f_indices: torch.Tensor | None  # [F] int32
    metadata: dict[str, str]
    dtype_names: dict[str, str]
    key_shapes: dict[str, tuple[int, int, int]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # keys this module does not know, kept as read

    @property
    def original_size(self) -> tuple[int, int]:
        """(W, H) of the media before bucket resizing, from the metadata."""
        return int(self.metadata["width"]), int(self.metadata["height"])

    @property
    def frame_count(self) -> int | None:
        """Pixel frames of the clip (videos only)."""
        return int(self.metadata["frame_count"]) if "frame_count" in self.metadata else None


def _load(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a cache file; errors name the file."""
    _, metadata = _read_header(path)  # gives a precise reason for truncated files before safetensors does
    try:
        return load_file(os.fspath(path)), metadata
    except Exception as exc:  # safetensors raises its own error types; the caller only needs the reason
        raise CacheFileError(f"{path}: cannot load tensors: {exc}") from exc


def read_latent_cache(path: str | os.PathLike) -> LatentCache:
    """Reads a latent cache written by musubi-tuner or by ``write_latent_cache`` (any dtype suffix)."""
    tensors, metadata = _load(path)
    roles = _roles(path, tensors)
    if "latents" not in roles:
        raise CacheFileError(f"{path}: no latents_<F>x<H>x<W>_<dtype> key (keys: {sorted(tensors)})")
    for role, (key, shape, _) in roles.items():
        if shape is not None and (tensors[key].dim() != 4 or tuple(tensors[key].shape[1:]) != shape):
            raise CacheFileError(f"{path}: {key} has shape {list(tensors[key].shape)}, its name says [C, {shape}]")

    def take(role: str) -> torch.Tensor | None:
        return tensors.pop(roles[role][0]) if role in roles else None

    return LatentCache(
        path=Path(path),
        latents=take("latents"),
        image_latents=take("latents_image"),
        clip=take("clip"),
        control_latents=take("latents_control"),
        f_indices=take("f_indices"),
        metadata=metadata,
        dtype_names={role: dtype for role, (_, _, dtype) in roles.items()},
        key_shapes={role: shape for role, (_, shape, _) in roles.items() if shape is not None},
        extra=tensors,
    )


@dataclass
class TextCache:
    """A read text cache: ``t5`` [L, 4096] as stored, the dtype suffix of its key, and the caption it encodes."""

    path: Path
    t5: torch.Tensor
    dtype_name: str
    metadata: dict[str, str]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def caption(self) -> str | None:
        """The caption the cache was made from (``caption1``)."""
        return self.metadata.get("caption1")


def _t5_key(path: str | os.PathLike, keys) -> tuple[str, str]:
    """(key, dtype suffix) of the single ``varlen_t5_<dtype>`` key."""
    found = [(key, m.group(1)) for key in keys if (m := _T5_KEY.match(key))]
    if len(found) != 1:
        raise CacheFileError(f"{path}: expected one varlen_t5_<dtype> key, found {[k for k, _ in found]}")
    return found[0]


def read_text_cache(path: str | os.PathLike) -> TextCache:
    """Reads a text cache written by musubi-tuner or by ``write_text_cache``."""
    tensors, metadata = _load(path)
    key, dtype = _t5_key(path, tensors)
    t5 = tensors.pop(key)
    if t5.dim() != 2:
        raise CacheFileError(f"{path}: {key} has shape {list(t5.shape)}, expected [L, {T5_DIM}]")
    return TextCache(Path(path), t5, dtype, metadata, tensors)


# ---------------------------------------------------------------------------------------------------------------
# Reuse or redo


@dataclass(frozen=True)
class CacheCheck:
    """The answer of a validity check: true when the cache can be reused, else ``reason`` says why not."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


def _invalid(path: str | os.PathLike, reason: str) -> CacheCheck:
    return CacheCheck(False, f"{path}: {reason}")


def _latent_problem(
    path, header, metadata, *, width, height, frames, latent_channels, original_size, need_image_latents, need_clip,
    need_control,
) -> str | None:
    """The first reason the header does not match the request, or None."""
    if metadata.get("architecture") != ARCHITECTURE:
        return f"architecture is {metadata.get('architecture')!r}, not {ARCHITECTURE!r}"
    roles = _roles(path, header)
    if "latents" not in roles:
        return "no latents_<F>x<H>x<W>_<dtype> key"
    for role, (key, name_shape, _) in roles.items():
        shape = tuple(header[key]["shape"])
        if name_shape is not None and (len(shape) != 4 or shape[1:] != name_shape):
            return f"{key} has shape {list(shape)}, its name says [C, {name_shape}]"
    key = roles["latents"][0]
    channels, lat_f, lat_h, lat_w = header[key]["shape"]
    if channels != latent_channels:
        return f"{channels} latent channels, the VAE makes {latent_channels}"
    stride = VAE_SPATIAL_STRIDE[latent_channels]
    if (lat_w * stride, lat_h * stride) != (width, height):
        return f"latents are for {lat_w * stride}x{lat_h * stride}, the bucket is {width}x{height}"
    if "f_indices" in roles:  # one-frame mode: latent frames are the listed control and target indices
        expected_f = header[roles["f_indices"][0]]["shape"][0]
    else:
        expected_f = latent_frames(frames)
    if lat_f != expected_f:
        return f"{lat_f} latent frames, {frames} frames need {expected_f}"
    if "frame_count" in metadata and metadata["frame_count"] != str(frames):
        return f"frame_count is {metadata['frame_count']}, expected {frames}"
    made_from = (metadata.get("width"), metadata.get("height"))
    if original_size is not None and made_from != tuple(str(int(v)) for v in original_size):
        return f"made from a {made_from[0]}x{made_from[1]} original, expected {original_size[0]}x{original_size[1]}"
    shapes = {role: list(header[key]["shape"]) for role, (key, _, _) in roles.items()}
    if "latents_image" in shapes and shapes["latents_image"][0] != I2V_MASK_CHANNELS + channels:
        return f"image latents have {shapes['latents_image'][0]} channels, expected 4 + {channels}"
    if "latents_control" in shapes and shapes["latents_control"][0] != channels:
        return f"control latents have {shapes['latents_control'][0]} channels, expected {channels}"
    if "clip" in shapes and shapes["clip"][-2:] != [CLIP_TOKENS, CLIP_DIM]:
        return f"clip features have shape {shapes['clip']}, expected [..., {CLIP_TOKENS}, {CLIP_DIM}]"
    for needed, role in ((need_image_latents, "latents_image"), (need_clip, "clip"), (need_control, "latents_control")):
        if needed and role not in roles:
            return f"no {role} (needed for this training)"
    return None


def cache_is_valid(
    path: str | os.PathLike,
    width: int,
    height: int,
    frames: int = 1,
    *,
    latent_channels: int = 16,
    original_size: tuple[int, int] | None = None,
    need_image_latents: bool = False,
    need_clip: bool = False,
    need_control: bool = False,
) -> CacheCheck:
    """Whether the latent cache at ``path`` can be reused for a ``width`` x ``height`` bucket (pixels) and ``frames``
    pixel frames (1 for images) with a VAE of ``latent_channels`` (16: Wan 2.1 VAE, 48: Wan 2.2 VAE). Reads only
    the header; a missing, truncated or malformed file is invalid, never an exception."""
    if latent_channels not in VAE_SPATIAL_STRIDE:
        raise ValueError(f"latent_channels must be one of {sorted(VAE_SPATIAL_STRIDE)}, got {latent_channels}")
    if not os.path.exists(path):
        return _invalid(path, "does not exist")
    try:
        header, metadata = _read_header(path)
        problem = _latent_problem(
            path, header, metadata, width=width, height=height, frames=frames, latent_channels=latent_channels,
            original_size=original_size, need_image_latents=need_image_latents, need_clip=need_clip,
            need_control=need_control,
        )
    except CacheFileError as exc:
        return CacheCheck(False, str(exc))
    except (KeyError, TypeError, ValueError) as exc:  # a header with odd entries (wrong types, missing shapes)
        return _invalid(path, f"malformed header: {exc!r}")
    return _invalid(path, problem) if problem else CacheCheck(True)


def text_cache_is_valid(path: str | os.PathLike, caption: str | None = None) -> CacheCheck:
    """Whether the text cache at ``path`` can be reused: readable, Wan, one ``varlen_t5`` [L, 4096] key and, when
    ``caption`` is given, made from that caption."""
    if not os.path.exists(path):
        return _invalid(path, "does not exist")
    try:
        header, metadata = _read_header(path)
        key, _ = _t5_key(path, header)
    except CacheFileError as exc:
        return CacheCheck(False, str(exc))
    shape = header[key].get("shape") if isinstance(header[key], dict) else None
    if metadata.get("architecture") != ARCHITECTURE:
        return _invalid(path, f"architecture is {metadata.get('architecture')!r}, not {ARCHITECTURE!r}")
    if not isinstance(shape, list) or len(shape) != 2 or shape[1] != T5_DIM or shape[0] < 1:
        return _invalid(path, f"{key} has shape {shape}, expected [L, {T5_DIM}]")
    if caption is not None and metadata.get("caption1") != caption:
        return _invalid(path, f"made from caption {metadata.get('caption1')!r}, the caption is now {caption!r}")
    return CacheCheck(True)
