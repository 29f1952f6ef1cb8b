"""The dataset TOML of musubi-tuner, read the way musubi reads it for Wan: a ``[general]`` table and
an array of ``[[datasets]]``, each an image or a video dataset (see ``docs/dataset_config.md`` and
``dataset/config_utils.py`` in musubi-tuner).

What musubi does, and so do we:

- ``[general]`` holds only the keys any dataset may hold (resolution, caption_extension,
  batch_size, num_repeats, enable_bucket, bucket_no_upscale); a dataset's own value wins, then
  ``[general]``'s, then the default.
- A dataset with ``video_directory`` or ``video_jsonl_file`` is a video dataset, else an image
  dataset; each kind has its own keys (``target_frames`` and the frame keys are video-only,
  ``no_resize_control``/``control_resolution`` and the one-frame ``fp_1f_*`` keys image-only).
- ``resolution`` is [width, height] or one number for a square; default 960x544.
- ``target_frames`` (default [1]) are de-duplicated, sorted and rounded down to 4N+1.
- ``uniform`` with ``frame_sample = 1`` is ``head``; ``bucket_no_upscale`` is off without ``enable_bucket``.
- Without ``cache_directory`` the cache goes in the image or video directory; no two datasets may
  share a cache directory.
- The renamed keys ``flux_kontext_no_resize_control``, ``qwen_image_edit_no_resize_control`` and
  ``qwen_image_edit_control_resolution`` are read as their new names (a new name given too wins).
- Paths are used as written: a relative one is relative to the working directory (musubi's
  behaviour), unless ``base_dir`` is given to :func:`load_dataset_config`.

Where we are stricter than musubi, because musubi would fail later or silently do something the
file does not say: unknown keys and values of the wrong type are errors here as there, and so are
a dataset with both a directory and a JSONL file (musubi silently takes the directory), no
directory at all, a JSONL dataset without ``cache_directory`` (musubi fails when caching), a
directory dataset without ``caption_extension`` (musubi fails reading captions), an extension
without its leading dot (musubi would find no caption), sizes and counts below 1, an empty
``[[datasets]]`` list, and ``multiple_target`` (Qwen-Image-Layered only). We are looser in one
place: ``source_fps = 30`` is read as 30.0 (musubi asks for a decimal number and refuses 30).
What musubi only warns about, or silently ignores, is kept in each blueprint's ``notes``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import model_validator

from wan.config import (Bool, ConfigError, ConfigModel, choice, fail, integer, is_int, items, number, read_toml, rule,
                        validate)
from wan.train.frames import FRAME_EXTRACTIONS, effective_extraction, normalise_target_frames

DEFAULT_RESOLUTION = (960, 544)
MIN_SIDE = 16


class DatasetConfigError(ConfigError):
    """A dataset TOML that cannot be used: names the file, the dotted key, the value and what is allowed."""


# ----------------------------------------------------------------------------- value types


def _is_size(v: Any) -> bool:
    sides = [v] if is_int(v) else v if isinstance(v, list) and len(v) == 2 else None
    return sides is not None and all(is_int(s) and s >= MIN_SIDE for s in sides)


# Every key is optional (``X | None = None``: None means not given, so [general] or the default
# applies); TOML has no null, so the words never offer one.
Size = rule(f"one integer or [width, height], each >= {MIN_SIDE}", _is_size,
            lambda v: (v, v) if is_int(v) else tuple(v))
PathText = rule("a path (a non-empty string)", lambda v: isinstance(v, str) and v.strip() != "" and "\0" not in v)
CaptionExtension = rule("a file extension starting with '.', such as '.txt'",
                        lambda v: isinstance(v, str) and len(v) > 1 and v.startswith("."))
Count = integer(1)


# ----------------------------------------------------------------------------- the schema


class _Common(ConfigModel):
    """Keys allowed in [general] and in every dataset; None: not given here."""

    resolution: Size | None = None
    caption_extension: CaptionExtension | None = None
    batch_size: Count | None = None
    num_repeats: Count | None = None
    enable_bucket: Bool | None = None
    bucket_no_upscale: Bool | None = None


class _General(_Common):
    """The [general] table."""


class _Dataset(_Common):
    """Keys of both dataset kinds."""

    cache_directory: PathText | None = None
    control_directory: PathText | None = None
    # FramePack's; musubi accepts it everywhere and adds it to the batch key of Wan images
    fp_latent_window_size: Count | None = None

    def _one_source(self, directory: str, jsonl: str) -> None:
        """Exactly one of the two source keys; a JSONL file needs its own cache directory."""
        has_dir, has_jsonl = getattr(self, directory) is not None, getattr(self, jsonl) is not None
        if has_dir and has_jsonl:
            fail(f"give {directory} or {jsonl}, not both (musubi would silently use {directory})", jsonl)
        if has_jsonl and self.cache_directory is None:
            fail(f"required with {jsonl}: the cache files need a folder of their own", "cache_directory")


class _ImageDataset(_Dataset):
    image_directory: PathText | None = None
    image_jsonl_file: PathText | None = None
    no_resize_control: Bool | None = None
    control_resolution: Size | None = None
    # Wan one-frame training (docs/wan_1f.md) reuses FramePack's keys; fp_1f_no_post is unused by Wan
    fp_1f_clean_indices: items(integer(0)) | None = None
    fp_1f_target_index: integer(0) | None = None
    fp_1f_no_post: Bool | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _ImageDataset:
        self._one_source("image_directory", "image_jsonl_file")
        return self


class _VideoDataset(_Dataset):
    video_directory: PathText | None = None
    video_jsonl_file: PathText | None = None
    target_frames: items(integer(1)) | None = None
    frame_extraction: choice(FRAME_EXTRACTIONS) | None = None
    frame_stride: Count | None = None
    frame_sample: Count | None = None
    max_frames: Count | None = None
    source_fps: number(0, open=True) | None = None

    @model_validator(mode="after")
    def _consistent(self) -> _VideoDataset:
        self._one_source("video_directory", "video_jsonl_file")
        return self


class _File(ConfigModel):
    """The file's top level."""

    general: _General = _General()
    datasets: items(dict[str, Any])


COMMON_KEYS = tuple(_Common.model_fields)
IMAGE_KEYS = tuple(k for k in _ImageDataset.model_fields if k not in _VideoDataset.model_fields)
VIDEO_KEYS = tuple(k for k in _VideoDataset.model_fields if k not in _ImageDataset.model_fields)
DATASET_ONLY_KEYS = tuple(k for k in {**_ImageDataset.model_fields, **_VideoDataset.model_fields}
                          if k not in COMMON_KEYS)
RENAMED_KEYS = {"flux_kontext_no_resize_control": "no_resize_control",
                "qwen_image_edit_no_resize_control": "no_resize_control",
                "qwen_image_edit_control_resolution": "control_resolution"}
REFUSED_KEYS = {"multiple_target": "is for Qwen-Image-Layered training; a Wan dataset has one target per item",
                "debug_dataset": "is a command-line flag of musubi, not a dataset key"}


# ----------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class DatasetBlueprint:
    """One ``[[datasets]]`` entry with ``[general]`` and musubi's defaults filled in: what an image or
    video dataset of musubi is built from. Paths are as written (or under ``base_dir``)."""

    index: int
    is_video: bool
    cache_directory: Path  # resolved: the media directory when the file gives none
    image_directory: Path | None = None
    image_jsonl_file: Path | None = None
    video_directory: Path | None = None
    video_jsonl_file: Path | None = None
    control_directory: Path | None = None
    resolution: tuple[int, int] = DEFAULT_RESOLUTION
    caption_extension: str | None = None
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = False
    bucket_no_upscale: bool = False
    no_resize_control: bool = False
    control_resolution: tuple[int, int] | None = None
    target_frames: tuple[int, ...] = (1,)  # normalised: unique, sorted, 4N+1
    frame_extraction: str = "head"  # effective: uniform with frame_sample 1 is head
    frame_stride: int = 1
    frame_sample: int = 1
    max_frames: int = 129
    source_fps: float | None = None
    fp_latent_window_size: int = 9
    fp_1f_clean_indices: tuple[int, ...] | None = None
    fp_1f_target_index: int | None = None
    fp_1f_no_post: bool = False
    notes: tuple[str, ...] = ()  # what musubi warns about or silently ignores here

    @property
    def key(self) -> str:
        """Its place in the file, as error messages name it: ``datasets[0]``."""
        return f"datasets[{self.index}]"

    @property
    def kind(self) -> str:
        return "video" if self.is_video else "image"

    @property
    def media_directory(self) -> Path | None:
        return self.video_directory if self.is_video else self.image_directory

    @property
    def jsonl_file(self) -> Path | None:
        return self.video_jsonl_file if self.is_video else self.image_jsonl_file

    @property
    def control_count(self) -> int:
        """Control images per item musubi reads for Wan: one, or one per one-frame clean index."""
        return len(self.fp_1f_clean_indices) if self.fp_1f_clean_indices else 1


@dataclass(frozen=True)
class DatasetConfig:
    """A dataset TOML: the file it came from and its datasets in order."""

    path: Path
    datasets: tuple[DatasetBlueprint, ...]


# ----------------------------------------------------------------------------- reading


def load_dataset_config(path: str | os.PathLike, base_dir: str | os.PathLike | None = None) -> DatasetConfig:
    """Reads and checks a dataset TOML. Relative paths inside it stay relative to the working
    directory as in musubi, or are placed under ``base_dir`` when it is given.
    Raises :class:`DatasetConfigError` naming the file, the dotted key, the value and what is allowed."""
    path = Path(path)
    return parse_dataset_config(read_toml(path, DatasetConfigError), str(path), base_dir, path)


def parse_dataset_config(raw: dict, where: str = "dataset config", base_dir: str | os.PathLike | None = None,
                         path: Path | None = None) -> DatasetConfig:
    """The checked config of a file's parsed table ``raw``; ``where`` names the file in errors."""
    for key in raw:
        if key not in _File.model_fields:
            raise DatasetConfigError.unknown(where, key, key, tuple(_File.model_fields))
    if not raw.get("datasets", None):  # missing or empty: musubi would build nothing to train on
        raise DatasetConfigError.say(where, "datasets", "no dataset: add at least one [[datasets]] table")
    if isinstance(raw.get("general"), dict):
        _refuse_misplaced_general(raw["general"], where)
    top = validate(_File, raw, where, DatasetConfigError)
    base = Path(base_dir) if base_dir is not None else None
    blueprints = tuple(_dataset(i, data, top.general, where, base) for i, data in enumerate(top.datasets))
    _check_cache_directories(blueprints, where)
    return DatasetConfig(path or Path(where), blueprints)


def _renamed(section: dict, notes: list[str]) -> dict:
    """``section`` with musubi's renamed keys under their new names (a new name given too wins)."""
    out = dict(section)
    for old, new in RENAMED_KEYS.items():
        if old in out:
            value = out.pop(old)
            if new in out:
                notes.append(f"{old} is ignored: {new} is given too")
            else:
                out[new] = value
                notes.append(f"{old} is the old name of {new}")
    return out


def _refuse_misplaced_general(general: dict, where: str) -> None:
    for key in general:
        if key in DATASET_ONLY_KEYS:
            why = " (each dataset needs its own)" if key == "cache_directory" else ""
            raise DatasetConfigError.say(where, f"general.{key}",
                                         f"goes in each [[datasets]] table{why}, not in [general]; "
                                         f"[general] holds only {', '.join(COMMON_KEYS)}")


def _kind(data: dict, where: str, at: str) -> bool:
    """True for a video dataset; errors for a dataset with no source key or with both kinds."""
    image = [k for k in ("image_directory", "image_jsonl_file") if k in data]
    video = [k for k in ("video_directory", "video_jsonl_file") if k in data]
    if image and video:
        raise DatasetConfigError.say(where, f"{at}.{video[0]}", f"a dataset holds images or videos, not both; "
                                                                f"this one also has {image[0]}")
    if not image and not video:
        raise DatasetConfigError.say(where, at, "required key is missing: give one of image_directory, "
                                                "image_jsonl_file, video_directory, video_jsonl_file")
    for key in data:
        if key in REFUSED_KEYS:
            raise DatasetConfigError.say(where, f"{at}.{key}", f"{key} {REFUSED_KEYS[key]}")
        wrong = VIDEO_KEYS if image else IMAGE_KEYS
        if key in wrong:
            other = "video" if image else "image"
            raise DatasetConfigError.say(where, f"{at}.{key}", f"is a key of {other} datasets; this dataset "
                                                               f"has {(image or video)[0]}")
    return bool(video)


def _dataset(index: int, data: dict, general: _General, where: str, base: Path | None) -> DatasetBlueprint:
    """One dataset checked, merged with [general] and the defaults, as a blueprint."""
    at, notes = f"datasets[{index}]", []
    data = _renamed(data, notes)
    if data.get("multiple_target") is False:  # the default, harmless: only true asks for what Wan lacks
        data.pop("multiple_target")
    is_video = _kind(data, where, at)
    own = validate(_VideoDataset if is_video else _ImageDataset, data, where, DatasetConfigError, at)

    def pick(key: str, default: Any) -> Any:
        """The dataset's value, else [general]'s, else the default (musubi's fallback order)."""
        for section in (own, general):
            value = getattr(section, key, None)
            if value is not None:
                return value
        return default

    def place(text: str | None) -> Path | None:
        return None if text is None else Path(text) if base is None or os.path.isabs(text) else base / text

    values = {key: pick(key, default) for key, default in _COMMON_DEFAULTS.items()}
    source_dir = own.video_directory if is_video else own.image_directory
    if source_dir is not None and values["caption_extension"] is None:
        raise DatasetConfigError.say(where, f"{at}.caption_extension",
                                     f"required with {'video' if is_video else 'image'}_directory (here or in "
                                     f"[general]): captions are read from <name><caption_extension>")
    if values["bucket_no_upscale"] and not values["enable_bucket"]:
        notes.append("bucket_no_upscale is ignored without enable_bucket")
        values["bucket_no_upscale"] = False
    if own.control_directory is not None and source_dir is None:
        notes.append("control_directory is ignored with a JSONL file: give control_path in its rows")
    if not is_video and not values["enable_bucket"] and any(s % 16 for s in values["resolution"]):
        notes.append(f"resolution {values['resolution'][0]}x{values['resolution'][1]} is used as is without "
                     f"enable_bucket, and is not a multiple of 16")
    kind_values = _video_values(own, notes) if is_video else _image_values(own, notes)
    if is_video and (not values["enable_bucket"] or values["bucket_no_upscale"]):
        notes.append("musubi caches videos with enable_bucket on and bucket_no_upscale off whatever this file says; "
                     "the two only group the cached items into batches (with sizes that differ, keep batch_size 1 "
                     "or turn enable_bucket on)")
    return DatasetBlueprint(
        index=index, is_video=is_video, cache_directory=place(own.cache_directory or source_dir),
        image_directory=None if is_video else place(own.image_directory),
        image_jsonl_file=None if is_video else place(own.image_jsonl_file),
        video_directory=place(own.video_directory) if is_video else None,
        video_jsonl_file=place(own.video_jsonl_file) if is_video else None,
        control_directory=place(own.control_directory) if source_dir is not None else None,
        fp_latent_window_size=own.fp_latent_window_size or 9,
        **values, **kind_values, notes=tuple(notes))


_COMMON_DEFAULTS = {"resolution": DEFAULT_RESOLUTION, "caption_extension": None, "batch_size": 1, "num_repeats": 1,
                    "enable_bucket": False, "bucket_no_upscale": False}


def _image_values(own: _ImageDataset, notes: list[str]) -> dict[str, Any]:
    if own.fp_1f_no_post is not None:
        notes.append("fp_1f_no_post is not used by Wan")
    return {"no_resize_control": bool(own.no_resize_control), "control_resolution": own.control_resolution,
            "fp_1f_clean_indices": own.fp_1f_clean_indices, "fp_1f_target_index": own.fp_1f_target_index,
            "fp_1f_no_post": bool(own.fp_1f_no_post)}


def _video_values(own: _VideoDataset, notes: list[str]) -> dict[str, Any]:
    given = own.target_frames or (1,)
    frames = normalise_target_frames(given)
    if list(frames) != sorted(set(given)):
        notes.append(f"target_frames {list(given)} are read as {list(frames)} (each rounded down to 4N+1)")
    sample = own.frame_sample or 1
    mode = effective_extraction(own.frame_extraction or "head", sample)
    if mode != (own.frame_extraction or "head"):
        notes.append("frame_extraction uniform with frame_sample 1 is head")
    if mode == "chunk" and 1 in frames:
        notes.append("target_frames has 1 with chunk extraction: every frame also becomes an item of its own")
    # musubi silently ignores the parameters of the other modes
    used_by = {"frame_stride": "slide", "frame_sample": "uniform", "max_frames": "full"}
    for key, owner in used_by.items():
        if getattr(own, key) is not None and mode != owner and (own.frame_extraction or "head") != owner:
            notes.append(f"{key} is used only by {owner} extraction")
    if own.target_frames is not None and mode == "full":
        notes.append("target_frames is not used by full extraction")
    return {"target_frames": frames, "frame_extraction": mode, "frame_stride": own.frame_stride or 1,
            "frame_sample": sample, "max_frames": own.max_frames or 129, "source_fps": own.source_fps}


def _check_cache_directories(blueprints: tuple[DatasetBlueprint, ...], where: str) -> None:
    """No two datasets may write their cache files to one folder (musubi's rule; we compare the
    folders as absolute paths where musubi compares the strings)."""
    seen: dict[str, DatasetBlueprint] = {}
    for bp in blueprints:
        folder = os.path.normpath(os.path.abspath(bp.cache_directory))
        if folder in seen:
            first = seen[folder]
            raise DatasetConfigError.say(
                where, f"{bp.key}.cache_directory",
                f"{str(bp.cache_directory)!r} is the cache directory of {first.key} too; each dataset needs its "
                f"own (without cache_directory it is the {bp.kind} directory)")
        seen[folder] = bp
