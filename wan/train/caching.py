"""Caching before training: each dataset item's VAE latents and its caption's umT5 output, written as
musubi-tuner's ``wan_cache_latents.py`` and ``wan_cache_text_encoder_outputs.py`` write them (names,
keys and metadata from :mod:`wan.train.cache_files`), so that musubi trains on our caches and we on its.

What musubi does, and so do we (read from ``cache_latents.py``, ``cache_text_encoder_outputs.py``,
``wan_cache_latents.py``, ``wan_cache_text_encoder_outputs.py`` and ``dataset/image_video_dataset.py``):

- Pixels: see :mod:`wan.train.media_frames`. A video is read once, resized to the bucket of its first
  frame (bucketing always on for videos), then cut into its windows; a window's cache is named after
  the *bucket* size (musubi resizes while reading, so the "original size" it records is the
  bucket's), an image's after its own size. Pixels become ``uint8 / 127.5 - 1`` in the VAE's dtype.
- Batches: windows (or images) of one bucket and frame count go together, ``batch_size`` of the
  dataset at a time; ``--batch_size`` splits those further. Latents are stored in the VAE's dtype.
- i2v (``--i2v``, implied by ``--clip``): the first-frame mask and the VAE latent of the first frame
  followed by zero frames (``latents_image``); with a CLIP (Wan 2.1 i2v) its features of the first
  frame, stored as float16. Fun Control: the control video, cut or padded to the item's frames,
  resized to the item's bucket, encoded as ``latents_control``.
- Text: one cache per media file, the caption's umT5 output trimmed to its tokens (``varlen_t5``),
  batches of the dataset's ``batch_size`` split by ``--batch_size``; ``--fp8_t5`` runs the encoder
  with fp8 weights.
- ``skip_existing``: musubi skips a cache file that exists, whatever it holds. Here a file is
  skipped only when it is also valid for this run (:func:`~wan.train.cache_files.cache_is_valid`:
  bucket, frames, the VAE's latent channels, the parts this run makes; a text cache: its caption);
  one that is not is made again and the report says why. Without it every file is made again, as
  in musubi.
- Afterwards the cache files of the folder that no item of the dataset makes any more (another
  resolution, other windows, an item gone) are deleted, unless ``keep_cache``. Unlike musubi, which
  stops at the first unreadable item, we go on with the others and keep the files of the items
  that failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wan.train.buckets import control_size, video_bucket_selector
from wan.train.cache_files import (ARCHITECTURE, CLIP_DIM, CLIP_TOKENS, LATENT_SUFFIX, T5_DIM, TEXT_SUFFIX, CacheCheck,
                                   CacheFileError, cache_is_valid, i2v_image_latents, i2v_mask, i2v_pixel_input,
                                   image_latent_cache_name, parse_image_cache_name, parse_video_cache_name,
                                   read_text_cache, text_cache_is_valid, text_cache_name, video_latent_cache_name,
                                   write_latent_cache, write_text_cache)
from wan.train.dataset_config import DatasetBlueprint, DatasetConfig
from wan.train.dataset_items import DatasetItem, dataset_report, list_items
from wan.train.frames import frame_windows
from wan.train.media_frames import fit_length, read_image, read_video_frames, resize_to_bucket

Progress = Callable[[str], None]


# ----------------------------------------------------------------------------- the report


@dataclass
class CacheRunReport:
    """What a caching run did. Paths are the cache files; ``redone`` lists files that existed but did
    not fit this run, with the reason; ``failed`` the items that could not be cached, with why."""

    what: str  # "latent" or "text encoder"
    written: list[Path] = field(default_factory=list)
    reused: list[Path] = field(default_factory=list)
    redone: list[tuple[Path, str]] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)  # stale files left in place (keep_cache)
    failed: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    encoder_calls: int = 0  # VAE or text-encoder batches run

    @property
    def ok(self) -> bool:
        return not self.failed

    def lines(self) -> list[str]:
        """The summary the CLI prints: counts, then each redone, removed and failed entry."""
        head = (f"{self.what} caches: {len(self.written)} written, {len(self.reused)} reused, "
                f"{len(self.redone)} made again (did not fit), {len(self.removed)} stale removed")
        if self.kept:
            head += f", {len(self.kept)} stale kept"
        if self.failed:
            head += f"; {len(self.failed)} item(s) failed"
        lines = [head]
        lines += [f"  made again {path.name}: {why}" for path, why in self.redone]
        lines += [f"  removed {path}" for path in self.removed]
        lines += [f"  kept {path} (no item makes it; --keep_cache)" for path in self.kept]
        lines += [f"  failed {key}: {why}" for key, why in self.failed]
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def _reason(check: CacheCheck, path: Path) -> str:
    """A check's reason without the path it starts with."""
    return check.reason.removeprefix(f"{path}: ")


# ----------------------------------------------------------------------------- latents


@dataclass
class _Work:
    """One latent cache to make: its pixels [F, H, W, 3] uint8 and what its file records."""

    path: Path
    item: DatasetItem
    pixels: np.ndarray
    original_size: tuple[int, int]
    frame_count: int | None  # pixel frames of a video window; None for an image
    control: np.ndarray | None = None  # [F, h, w, 3] uint8

    @property
    def batch_key(self) -> tuple:
        """Items that may share a VAE call: same frames and size, same control shape."""
        return self.pixels.shape, None if self.control is None else self.control.shape


@dataclass
class _LatentJob:
    vae: torch.nn.Module
    clip: torch.nn.Module | None
    i2v: bool
    tile: object | None
    device: torch.device
    batch_size: int | None
    skip_existing: bool
    report: CacheRunReport

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.conv1.weight.dtype

    @property
    def channels(self) -> int:
        return int(self.vae.z_dim)


def cache_latents(config: DatasetConfig, vae, *, clip=None, i2v: bool = False, vae_tiling=False,
                  batch_size: int | None = None, skip_existing: bool = False, keep_cache: bool = False,
                  device: str | torch.device | None = None, progress: Progress | None = None) -> CacheRunReport:
    """Writes the latent cache of every item (every window of a video) of every dataset of ``config``.

    Args:
        vae: a loaded Wan VAE (``wan.load_vae``); its dtype is the latents' dtype.
        clip: a loaded CLIP vision tower (``wan.load_clip``) for Wan 2.1 i2v; implies ``i2v``.
        i2v: also write the first-frame conditioning (mask and image latents).
        vae_tiling: True for the default tiles, or a ``wan.models.vae_tiling.TileConfig``.
        batch_size: at most this many items per VAE call (None: the dataset's batch_size).
        skip_existing: keep existing caches that are valid for this run.
        keep_cache: leave the cache files that no item makes any more.
        device: where the pixels go (None: the VAE's device).
        progress: called with a line of text after each item.
    """
    from wan.models.vae_tiling import TileConfig

    tile = TileConfig() if vae_tiling is True else (vae_tiling or None)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    report = CacheRunReport("latent")
    job = _LatentJob(vae, clip, i2v or clip is not None, tile, device, batch_size, skip_existing, report)
    for bp in config.datasets:
        _dataset_latents(bp, job, keep_cache, progress)
    return report


def _dataset_latents(bp: DatasetBlueprint, job: _LatentJob, keep_cache: bool, progress: Progress | None) -> None:
    listing = list_items(bp)
    report = job.report
    report.notes += [f"{bp.key}: {p.message}" for p in listing.problems]
    wanted: set[Path] = set()
    protected: set[str] = set()  # bases of failed items: their old files stay
    pending: dict[tuple, list[_Work]] = {}
    items = [i for i in listing.items if i.used]
    for number, item in enumerate(items, 1):
        try:
            works = _item_works(bp, item, report)
        except ValueError as e:
            report.failed.append((item.key, str(e)))
            protected.add(item.base)
            continue
        for work in works:
            wanted.add(_norm(work.path))
            if not _needs_encoding(work, job):
                continue
            batch = pending.setdefault(work.batch_key, [])
            batch.append(work)
            if len(batch) >= bp.batch_size:
                _encode_batches(pending.pop(work.batch_key), job, protected)
        if progress is not None:
            progress(f"{bp.key}: {number}/{len(items)} items read, {job.report.encoder_calls} VAE batches")
    for batch in pending.values():
        _encode_batches(batch, job, protected)
    parse = parse_video_cache_name if bp.is_video else parse_image_cache_name
    _remove_stale(Path(bp.cache_directory), f"*{LATENT_SUFFIX}", wanted, protected, keep_cache, report,
                  lambda path: parse(path).item_key)


def _item_works(bp: DatasetBlueprint, item: DatasetItem, report: CacheRunReport) -> list[_Work]:
    """The latent caches of one item with their pixels; ValueError when it cannot be cached."""
    if item.size is None:
        raise ValueError("; ".join(p.message for p in item.problems) or "unreadable")
    control_problems = [p.message for p in item.problems if p.kind == "control"]
    if control_problems:
        raise ValueError("; ".join(control_problems))
    folder = Path(bp.cache_directory)
    if not bp.is_video:
        pixels, own = read_image(item.key, item.bucket)
        control = None
        if item.controls:  # musubi encodes the first control image of a non one-frame dataset
            size = item.control_sizes[0] if item.control_sizes else control_size(
                own, item.bucket, bp.no_resize_control, bp.control_resolution)
            control = read_image(item.controls[0], size)[0][None]
        return [_Work(folder / image_latent_cache_name(item.key, own), item, pixels[None], own, None, control)]
    selector = video_bucket_selector(bp.resolution)
    end = max(bp.target_frames) if bp.frame_extraction == "head" else None
    frames, bucket = read_video_frames(item.key, selector.bucket, end, bp.source_fps)
    windows = frame_windows(len(frames), bp.target_frames, bp.frame_extraction, bp.frame_stride, bp.frame_sample,
                            bp.max_frames)
    if tuple(windows) != tuple(item.windows):
        report.notes.append(f"{item.key}: {len(frames)} frames decoded, its header said otherwise; its windows "
                            f"are {windows} (musubi counts decoded frames too)")
    if not windows:
        report.notes.append(f"{item.key}: {len(frames)} frames, no window of {list(bp.target_frames)} fits; "
                            "nothing to cache")
    control = None
    if item.controls:
        control_frames, _ = read_video_frames(item.controls[0], selector.bucket, end, bp.source_fps)
        control_frames = fit_length([resize_to_bucket(f, bucket) for f in control_frames], len(frames))
        control = np.stack(control_frames)
    video = np.stack(frames)
    works = []
    for start, count in dict.fromkeys(windows):  # uniform may repeat a window: one file
        path = folder / video_latent_cache_name(item.key, start, count, bucket)
        works.append(_Work(path, item, video[start:start + count], bucket, count,
                           None if control is None else control[start:start + count]))
    return works


def _needs_encoding(work: _Work, job: _LatentJob) -> bool:
    """False when the existing file is reused; records a file that did not fit."""
    if not work.path.exists():
        return True
    check = _latent_check(work, job)
    if check and job.skip_existing:
        job.report.reused.append(work.path)
        return False
    if not check:
        job.report.redone.append((work.path, _reason(check, work.path)))
    return True


def _latent_check(work: _Work, job: _LatentJob) -> CacheCheck:
    frames, height, width = work.pixels.shape[:3]
    check = cache_is_valid(work.path, width, height, frames, latent_channels=job.channels,
                           original_size=work.original_size, need_image_latents=job.i2v,
                           need_clip=job.clip is not None, need_control=work.control is not None)
    clip_shape = _clip_shape(job.clip)
    if check or clip_shape is None or clip_shape == (CLIP_TOKENS, CLIP_DIM) or "clip features" not in check.reason:
        return check
    # cache_is_valid knows ViT-H's features only; another CLIP (the TEST family's) is checked here: the
    # clip shape is the one fault found, so everything checked before it holds, and what it checks after
    # it (the parts this run needs) is checked again here
    from safetensors import safe_open
    with safe_open(str(work.path), "pt") as f:
        keys = list(f.keys())
        shape = next(tuple(f.get_slice(k).get_shape()) for k in keys if k.startswith("clip_"))
    if shape[-2:] != clip_shape:
        return CacheCheck(False, f"{work.path}: clip features have shape {list(shape)}, "
                                 f"the CLIP makes {list(clip_shape)}")
    for needed, prefix in ((job.i2v, "latents_image_"), (work.control is not None, "latents_control_")):
        if needed and not any(k.startswith(prefix) for k in keys):
            return CacheCheck(False, f"{work.path}: no {prefix.rstrip('_')} (needed for this training)")
    return CacheCheck(True)


def _clip_shape(clip) -> tuple[int, int] | None:
    """(tokens, width) of a CLIP tower's features, from its dimensions; None without a CLIP."""
    return None if clip is None else (int(clip.dims.tokens), int(clip.dims.dim))


def _encode_batches(works: list[_Work], job: _LatentJob, protected: set[str]) -> None:
    """Encodes ``works`` (one bucket) in VAE calls of at most ``job.batch_size`` items and writes them."""
    size = job.batch_size or len(works)
    for i in range(0, len(works), size):
        chunk = works[i:i + size]
        try:
            _encode_and_write(chunk, job)
        except (ValueError, RuntimeError, OSError) as e:
            for work in chunk:
                job.report.failed.append((work.item.key, f"{work.path.name}: {type(e).__name__}: {e}"))
                protected.add(work.item.base)


def _to_unit(pixels: list[np.ndarray], job: _LatentJob) -> torch.Tensor:
    """[B] x [F, H, W, 3] uint8 -> [B, 3, F, H, W] in [-1, 1], computed in the VAE's dtype as musubi does."""
    video = torch.from_numpy(np.stack(pixels)).permute(0, 4, 1, 2, 3).contiguous()
    return video.to(job.device, dtype=job.dtype) / 127.5 - 1.0


@torch.no_grad()
def _encode_and_write(works: list[_Work], job: _LatentJob) -> None:
    vae, dtype = job.vae, job.dtype
    video = _to_unit([w.pixels for w in works], job)
    latents = vae.encode(video, tile=job.tile).to(dtype)
    job.report.encoder_calls += 1
    frames, (lat_h, lat_w) = video.shape[2], latents.shape[-2:]
    clip_features = image_latents = control_latents = None
    if job.i2v:
        first = video[:, :, 0]
        if job.clip is not None:
            clip_features = job.clip(first).to(torch.float16)
        conditioning = torch.stack([i2v_pixel_input(frame, frames) for frame in first])
        encoded = vae.encode(conditioning, tile=job.tile).to(dtype)
        mask = i2v_mask(frames, lat_h, lat_w, dtype=dtype).to(encoded.device)
        image_latents = [i2v_image_latents(mask, e) for e in encoded]
    if works[0].control is not None:
        control_latents = vae.encode(_to_unit([w.control for w in works], job), tile=job.tile).to(dtype)
    for i, work in enumerate(works):
        write_latent_cache(work.path, latents[i], original_size=work.original_size, frame_count=work.frame_count,
                           image_latents=None if image_latents is None else image_latents[i],
                           clip=None if clip_features is None else clip_features[i],
                           control_latents=None if control_latents is None else control_latents[i])
        job.report.written.append(work.path)


# ----------------------------------------------------------------------------- text encoder outputs


def fp8_text_encoder(text_encoder) -> str:
    """Quantises the umT5 to fp8 weights in place, as generation does for ``quant_te: fp8``
    (``--fp8_t5``); returns the quantisation summary."""
    from wan.optim.quant import keep_from_traits, quantize_
    return quantize_(text_encoder, "fp8", keep=keep_from_traits(text_encoder)).summary()


def cache_text_encoder_outputs(config: DatasetConfig, text_encoder, *, batch_size: int | None = None,
                               skip_existing: bool = False, keep_cache: bool = False,
                               progress: Progress | None = None) -> CacheRunReport:
    """Writes the text-encoder cache of every item's caption in every dataset of ``config``.

    Args:
        text_encoder: a loaded umT5 (``wan.load_text_encoder``) with its tokenizer; its dtype is the cache's.
        batch_size: at most this many captions per encoder call (None: the dataset's batch_size).
        skip_existing: keep existing caches made from the same caption.
        keep_cache: leave the text caches that no item makes any more.
    """
    report = CacheRunReport("text encoder")
    for bp in config.datasets:
        listing = list_items(bp)
        folder = Path(bp.cache_directory)
        wanted: set[Path] = set()
        protected: set[str] = set()
        pending: list[tuple[Path, str]] = []
        items = [i for i in listing.items if i.used]
        for item in items:
            path = folder / text_cache_name(item.key)
            wanted.add(_norm(path))
            if item.caption is None:
                why = [p.message for p in item.problems if p.kind in ("caption", "unreadable")]
                report.failed.append((item.key, "; ".join(why) or "no caption"))
                protected.add(item.base)
                continue
            if path.exists():
                check = _text_check(path, item.caption, int(text_encoder.dim))
                if check and skip_existing:
                    report.reused.append(path)
                    continue
                if not check:
                    report.redone.append((path, _reason(check, path)))
            pending.append((path, item.caption))
            if len(pending) >= bp.batch_size:
                _encode_texts(pending, text_encoder, batch_size, report)
                pending = []
                if progress is not None:
                    progress(f"{bp.key}: {len(report.written)} text caches written")
        _encode_texts(pending, text_encoder, batch_size, report)
        _remove_stale(folder, f"*{TEXT_SUFFIX}", wanted, protected, keep_cache, report,
                      lambda path: path.name[: -len(TEXT_SUFFIX)])
    return report


def _text_check(path: Path, caption: str, dim: int) -> CacheCheck:
    """``text_cache_is_valid`` for umT5-XXL; an encoder of another width (the TEST family's) is checked
    on its own width here, since ``text_cache_is_valid`` knows 4096 only."""
    if dim == T5_DIM:
        return text_cache_is_valid(path, caption)
    try:
        cache = read_text_cache(path)
    except CacheFileError as e:
        return CacheCheck(False, str(e))
    if cache.metadata.get("architecture") != ARCHITECTURE:
        return CacheCheck(False, f"{path}: architecture is {cache.metadata.get('architecture')!r}, "
                                 f"not {ARCHITECTURE!r}")
    if cache.t5.shape[-1] != dim:
        return CacheCheck(False, f"{path}: {cache.t5.shape[-1]} wide, the text encoder makes {dim}")
    if cache.caption != caption:
        return CacheCheck(False, f"{path}: made from caption {cache.caption!r}, the caption is now {caption!r}")
    return CacheCheck(True)


@torch.no_grad()
def _encode_texts(pending: list[tuple[Path, str]], text_encoder, batch_size: int | None,
                  report: CacheRunReport) -> None:
    size = batch_size or len(pending) or 1
    for i in range(0, len(pending), size):
        chunk = pending[i:i + size]
        outputs = text_encoder.encode_prompts([caption for _, caption in chunk])
        report.encoder_calls += 1
        for (path, caption), t5 in zip(chunk, outputs):
            write_text_cache(path, t5, caption=caption)
            report.written.append(path)


# ----------------------------------------------------------------------------- stale files


def _norm(path: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(path)))


def _remove_stale(folder: Path, pattern: str, wanted: set[Path], protected: set[str], keep_cache: bool,
                  report: CacheRunReport, base_of: Callable[[Path], str]) -> None:
    """musubi's clean-up: every ``pattern`` file of the folder that no item made or reused this run is
    deleted (kept with ``keep_cache``), except those of items that failed (``base_of``: the media
    name a cache file belongs to)."""
    if not folder.is_dir():
        return
    for path in sorted(folder.glob(pattern)):
        if _norm(path) in wanted:
            continue
        try:
            if base_of(path) in protected:
                continue
        except CacheFileError:
            pass  # a name no item could make: stale like the others
        if keep_cache:
            report.kept.append(path)
        else:
            path.unlink(missing_ok=True)
            report.removed.append(path)


# ----------------------------------------------------------------------------- dataset check


@dataclass(frozen=True)
class DatasetCacheNames:
    """The cache file names of one dataset, from :mod:`wan.train.cache_files` (a ``CacheNaming`` for
    :func:`wan.train.dataset_items.dataset_report`): a video window's file carries its *bucket* size,
    which needs the dataset's resolution; an image's carries its own size."""

    resolution: tuple[int, int]
    latent_pattern: str = f"*{LATENT_SUFFIX}"

    def latent_name(self, base: str, size: tuple[int, int], window: tuple[int, int] | None = None) -> str:
        media = f"{base}.media"  # the names are made from a media path; its extension is dropped
        if window is None:
            return image_latent_cache_name(media, size)
        bucket = video_bucket_selector(self.resolution).bucket(size)
        return video_latent_cache_name(media, window[0], window[1], bucket)

    def text_name(self, base: str) -> str:
        return text_cache_name(f"{base}.media")


def dataset_check_report(config: DatasetConfig, limit: int = 50) -> str:
    """The text of ``wgp.py dataset check``: :func:`dataset_report` with each dataset's cache state
    counted on the names this module writes."""
    lines = [f"{config.path}: {len(config.datasets)} dataset(s)"]
    for bp in config.datasets:
        one = DatasetConfig(config.path, (bp,))
        lines += dataset_report(one, DatasetCacheNames(tuple(bp.resolution)), limit).splitlines()[1:]
    return "\n".join(lines)
