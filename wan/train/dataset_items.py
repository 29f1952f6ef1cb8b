"""The items of a dataset as musubi-tuner finds them, from file headers only (no pixel is decoded),
with what each gives (bucket, frame windows, cache files) and what is wrong with it; and the text
``wgp.py dataset check D.toml`` prints (:func:`dataset_report`).

Read from musubi's ``dataset/datasources.py`` and ``dataset/media_utils.py``:

- A directory lists its files ending in one of the extensions below (exact case, as Linux's glob
  matches them; not recursive, no hidden names), sorted by path.
- Image directory: an image is used only if a caption file with the same name before the last
  extension exists (musubi's filter; the others are left out silently). Caption: the file
  ``<path without extension><caption_extension>``, stripped.
- Video directory: every video is used; a missing caption stops musubi when it caches text.
- Control image of ``a.png``: files of the control directory named ``a.<ext>`` or ``a_<digits>.<ext>``,
  items with the longest names matched first, the plain name before the numbered ones; Wan takes
  one (or one per ``fp_1f_clean_indices``). Control video of ``a.mp4``: ``a.mp4``, else a folder
  ``a``, else ``a.<video ext>``.
- JSONL rows: ``image_path`` (or ``image_path_0``) / ``video_path``, ``caption``; ``control_path``
  or ``control_path_<N>`` (images, in N order) / ``control_path`` (videos). A video path that is
  not a file is a folder of frames (its images, sorted). Row paths are used as written.
- An item's key is its path; its cache file names use the name without its last extension.

musubi stops on the whole dataset for a missing control or a bad JSONL line; here each becomes a
problem of its item or dataset, so that one check lists them all.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from wan.engine.media_probe import probe_image, probe_video
from wan.train.buckets import control_size, image_bucket_selector, video_bucket_selector
from wan.train.dataset_config import DatasetBlueprint, DatasetConfig
from wan.train.frames import loaded_frame_count, video_windows

_IMAGE = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".avif")
_VIDEO = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".flv", ".wmv", ".m4v", ".mpg", ".mpeg")
IMAGE_EXTENSIONS = _IMAGE + tuple(e.upper() for e in _IMAGE)  # musubi lists these two cases only
VIDEO_EXTENSIONS = _VIDEO + tuple(e.upper() for e in _VIDEO)

# Problem kinds, in the order and words the report lists them
PROBLEM_TITLES = {"source": "dataset problems", "caption": "missing captions", "unreadable": "unreadable files",
                  "control": "control problems", "frames": "too short for target_frames",
                  "cache": "cache name clashes"}


@dataclass(frozen=True)
class Problem:
    kind: str  # a key of PROBLEM_TITLES
    message: str


@dataclass(frozen=True)
class DatasetItem:
    """One image or video: ``key`` is its path as musubi lists it. ``size`` is its own (width,
    height); ``frame_count`` a video's frames in the file, ``loaded_frames`` those musubi loads
    (after ``source_fps`` and ``head``'s early stop); ``windows`` the (start, frames) cut from them."""

    key: str
    caption: str | None = None
    size: tuple[int, int] | None = None
    frame_count: int | None = None
    loaded_frames: int | None = None
    controls: tuple[str, ...] = ()
    control_sizes: tuple[tuple[int, int], ...] = ()  # images: the size each control becomes
    bucket: tuple[int, int] | None = None
    windows: tuple[tuple[int, int], ...] = ()
    problems: tuple[Problem, ...] = ()
    used: bool = True  # False: musubi leaves it out (an image without a caption file)

    @property
    def name(self) -> str:
        return os.path.basename(self.key)

    @property
    def base(self) -> str:
        """The name its cache files start with."""
        return os.path.splitext(self.name)[0]


@dataclass(frozen=True)
class DatasetListing:
    blueprint: DatasetBlueprint
    items: tuple[DatasetItem, ...]
    problems: tuple[Problem, ...] = ()  # the dataset's own (missing folder, bad JSONL line, name clashes)


@dataclass
class _Entry:
    """An item found, before its headers are read."""

    key: str
    caption: str | None = None
    controls: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    used: bool = True


# ----------------------------------------------------------------------------- finding items


def list_items(bp: DatasetBlueprint) -> DatasetListing:
    """Every item of a dataset with its size, frames, bucket, windows and problems."""
    if bp.jsonl_file is not None:
        entries, problems = (_video_jsonl if bp.is_video else _image_jsonl)(bp)
    else:
        entries, problems = (_video_directory if bp.is_video else _image_directory)(bp)
    items = tuple(_describe(bp, e) for e in entries)
    return DatasetListing(bp, items, tuple(problems + _name_clashes(items)))


def media_files(folder: str | os.PathLike, extensions: tuple[str, ...]) -> list[str]:
    """The paths in ``folder`` ending in one of ``extensions`` (musubi's glob: not hidden), sorted."""
    names = [n for n in os.listdir(folder) if not n.startswith(".") and n.endswith(extensions)]
    return sorted(os.path.join(folder, n) for n in names)


def _read_caption(path: str) -> tuple[str | None, Problem | None]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip(), None
    except FileNotFoundError:
        return None, Problem("caption", f"no caption file {os.path.basename(path)}")
    except (OSError, UnicodeDecodeError) as e:
        return None, Problem("unreadable", f"cannot read the caption file {os.path.basename(path)} ({e})")


def _image_directory(bp: DatasetBlueprint) -> tuple[list[_Entry], list[Problem]]:
    folder, ext = str(bp.image_directory), bp.caption_extension
    if not os.path.isdir(folder):
        return [], [Problem("source", f"image_directory {folder} is not a folder")]
    # musubi keeps an image when some "*<ext>" file has its name before the last extension
    caption_bases = {os.path.splitext(n)[0] for n in os.listdir(folder) if n.endswith(ext) and not n.startswith(".")}
    entries = []
    for path in media_files(folder, IMAGE_EXTENSIONS):
        caption_path = os.path.splitext(path)[0] + ext
        if os.path.splitext(os.path.basename(path))[0] not in caption_bases:
            why = ("its caption_extension has two dots, which musubi's caption matching misses"
                   if os.path.exists(caption_path) else f"no caption file {os.path.basename(caption_path)}")
            problem = Problem("caption", f"{why}; musubi leaves the image out")
            entries.append(_Entry(path, problems=[problem], used=False))
            continue
        caption, problem = _read_caption(caption_path)
        entries.append(_Entry(path, caption, problems=[problem] if problem else []))
    problems = []
    if bp.control_directory is not None:
        problems = _match_image_controls([e for e in entries if e.used], str(bp.control_directory), bp.control_count)
    return entries, problems


def _match_image_controls(entries: list[_Entry], folder: str, count: int) -> list[Problem]:
    """Fills each entry's controls from ``folder`` (musubi's matching); problems of the folder itself."""
    if not os.path.isdir(folder):
        return [Problem("source", f"control_directory {folder} is not a folder")]
    pool = set(media_files(folder, IMAGE_EXTENSIONS))
    # longer names first, so that "a_1.png" takes "a_1.png" before "a.png" could claim it as "a_1"
    for entry in sorted(entries, key=lambda e: len(os.path.basename(e.key)), reverse=True):
        base = os.path.splitext(os.path.basename(entry.key))[0]
        found = {p for p in pool if os.path.basename(p).startswith((base + ".", base + "_"))}
        pool -= found
        # musubi's sort key: 0 for the plain name, else 1 + the number after the name's last "_"
        stems = {p: os.path.splitext(os.path.basename(p))[0] for p in found}
        numbers = {p: stem.rsplit("_", 1)[-1] for p, stem in stems.items() if stem != base}
        bad = sorted(p for p, number in numbers.items() if not number.isdigit())
        if not found:
            entry.problems.append(Problem("control", f"no control image {base}.* or {base}_<N>.* in {folder}"))
        elif bad:
            entry.problems.append(Problem("control", f"control image {os.path.basename(bad[0])}: musubi stops here, "
                                                     f"the part after '{base}_' is not a number"))
        elif len(found) < count:
            entry.problems.append(Problem("control", f"{len(found)} control image(s), {count} needed"))
        else:  # the plain name first, then by number (musubi leaves equal keys unordered; we sort by path)
            order = sorted(found, key=lambda p: (int(numbers[p]) + 1 if p in numbers else 0, p))
            entry.controls = order[:count]
    return []


def _video_directory(bp: DatasetBlueprint) -> tuple[list[_Entry], list[Problem]]:
    folder = str(bp.video_directory)
    if not os.path.isdir(folder):
        return [], [Problem("source", f"video_directory {folder} is not a folder")]
    control_dir = None if bp.control_directory is None else str(bp.control_directory)
    problems = [] if control_dir is None or os.path.isdir(control_dir) else [
        Problem("source", f"control_directory {control_dir} is not a folder")]
    entries = []
    for path in media_files(folder, VIDEO_EXTENSIONS):
        caption, problem = _read_caption(os.path.splitext(path)[0] + bp.caption_extension)
        if problem and problem.kind == "caption":
            problem = Problem("caption", f"{problem.message}; musubi stops when caching text")
        entry = _Entry(path, caption, problems=[problem] if problem else [])
        if control_dir is not None and not problems:
            control = _video_control(path, control_dir)
            if control:
                entry.controls = [control]
            else:
                entry.problems.append(Problem("control", f"no control video or folder {_base(path)} in {control_dir}"))
        entries.append(entry)
    return entries, problems


def _base(path: str) -> str:
    """A path's file name without its last extension."""
    return os.path.splitext(os.path.basename(path))[0]


def _video_control(path: str, folder: str) -> str | None:
    """The control of a video: same file name, else a folder of its base name, else another extension."""
    same = os.path.join(folder, os.path.basename(path))
    if os.path.exists(same):
        return same
    base = os.path.join(folder, _base(path))
    if os.path.isdir(base):
        return base
    return next((base + ext for ext in VIDEO_EXTENSIONS if os.path.exists(base + ext)), None)


def _jsonl_rows(path: str) -> tuple[list[tuple[int, dict]], list[Problem]]:
    """(line number, row) of each JSON object line; a line musubi cannot read is a problem."""
    rows, problems = [], []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except (OSError, UnicodeDecodeError) as e:
        return [], [Problem("source", f"cannot read {path} ({e})")]
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(Problem("source", f"{path} line {number}: not valid JSON ({e.msg}); musubi stops here"))
            continue
        if not isinstance(row, dict):
            problems.append(Problem("source", f"{path} line {number}: not a JSON object"))
            continue
        rows.append((number, row))
    return rows, problems


def _row_entry(row: dict, number: int, path_keys: tuple[str, ...], jsonl: str) -> _Entry | Problem:
    key = next((row[k] for k in path_keys if k in row), None)
    if not isinstance(key, str) or not key:
        return Problem("source", f"{jsonl} line {number}: no {path_keys[0]}")
    caption = row.get("caption")
    problems = [] if isinstance(caption, str) else [Problem("caption", f"no caption in {jsonl} line {number}")]
    return _Entry(key, caption.strip() if isinstance(caption, str) else None, problems=problems)


def _image_jsonl(bp: DatasetBlueprint) -> tuple[list[_Entry], list[Problem]]:
    jsonl = str(bp.image_jsonl_file)
    rows, problems = _jsonl_rows(jsonl)
    entries, controls = [], []
    for number, row in rows:
        entry = _row_entry(row, number, ("image_path", "image_path_0"), jsonl)
        if isinstance(entry, Problem):
            problems.append(entry)
            continue
        paths, bad = _row_controls(row)
        if bad:
            entry.problems.append(Problem("control", f"{jsonl} line {number}: {bad}"))
        entries.append(entry)
        controls.append(paths)
    if any(controls):  # musubi: once one row has a control, every row needs control_count of them
        for entry, paths in zip(entries, controls):
            if len(paths) < bp.control_count:
                entry.problems.append(Problem("control", f"{len(paths)} control path(s) in its row, "
                                                         f"{bp.control_count} needed"))
            entry.controls = paths[:bp.control_count]
    return entries, problems


def _row_controls(row: dict) -> tuple[list[str], str | None]:
    """The control paths of an image row in musubi's order: control_path, then control_path_<N> by N."""
    numbered = {k: v for k, v in row.items() if k.startswith("control_path_")}
    if "control_path" in row:
        numbered["control_path_0"] = row["control_path"]
    try:
        keys = sorted(numbered, key=lambda k: int(k.rsplit("_", 1)[-1]))
    except ValueError:
        return [], f"a control_path_<N> key whose N is not a number: {sorted(numbered)}"
    return [str(numbered[k]) for k in keys], None


def _video_jsonl(bp: DatasetBlueprint) -> tuple[list[_Entry], list[Problem]]:
    jsonl = str(bp.video_jsonl_file)
    rows, problems = _jsonl_rows(jsonl)
    has_control = any("control_path" in row for _, row in rows)
    entries = []
    for number, row in rows:
        entry = _row_entry(row, number, ("video_path",), jsonl)
        if isinstance(entry, Problem):
            problems.append(entry)
            continue
        if row.get("control_path"):
            entry.controls = [str(row["control_path"])]
        elif has_control and "control_path" not in row:
            entry.problems.append(Problem("control", f"no control_path in {jsonl} line {number} (other rows have one)"))
        entries.append(entry)
    return entries, problems


# ----------------------------------------------------------------------------- reading headers


def frames_of(path: str) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) of a video file or a folder of frames, from headers only.
    Raises ValueError naming the path and the reason."""
    if os.path.isdir(path):
        frames = media_files(path, IMAGE_EXTENSIONS)
        if not frames:
            raise ValueError(f"{path}: a folder with no image in it")
        return probe_image(frames[0]), len(frames)
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file or folder")
    width, height, count, _fps = probe_video(path)
    return (width, height), count if count is not None else _count_packets(path)


def _count_packets(path: str) -> int:
    """Frames of a video whose header does not say: its video packets, read without decoding."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _describe(bp: DatasetBlueprint, entry: _Entry) -> DatasetItem:
    """An entry with its headers read: size, frames, bucket, windows, control sizes."""
    problems = list(entry.problems)
    size = frames = loaded = bucket = None
    windows: tuple[tuple[int, int], ...] = ()
    control_sizes: list[tuple[int, int]] = []
    try:
        if bp.is_video:
            size, frames = frames_of(entry.key)
        else:
            size = probe_image(entry.key)
    except ValueError as e:
        problems.append(Problem("unreadable", str(e).removeprefix(f"{entry.key}: ")))
    if size is not None and bp.is_video:
        bucket = video_bucket_selector(bp.resolution).bucket(size)
        loaded, found = video_windows(frames, bp.target_frames, bp.frame_extraction, bp.frame_stride, bp.frame_sample,
                                      bp.max_frames, bp.source_fps)
        windows = tuple(found)
        if not windows:
            problems.append(Problem("frames", f"{loaded} frames: no window of {list(bp.target_frames)} fits"))
    elif size is not None:
        bucket = image_bucket_selector(bp.resolution, bp.enable_bucket, bp.bucket_no_upscale).bucket(size)
    for control in entry.controls:
        try:
            if bp.is_video:
                frames_of(control)
            else:
                control_sizes.append(control_size(probe_image(control), bucket or bp.resolution,
                                                  bp.no_resize_control, bp.control_resolution))
        except ValueError as e:
            problems.append(Problem("control", f"control {e}"))
    return DatasetItem(entry.key, entry.caption, size, frames, loaded, tuple(entry.controls), tuple(control_sizes),
                       bucket, windows, tuple(problems), entry.used)


def _name_clashes(items: tuple[DatasetItem, ...]) -> list[Problem]:
    """Items whose cache files would have the same names (same name before the extension)."""
    by_base: dict[str, list[str]] = {}
    for item in items:
        if item.used:
            by_base.setdefault(item.base, []).append(item.key)
    return [Problem("cache", f"{', '.join(keys)} share the cache name {base!r}: their cache files overwrite each other")
            for base, keys in by_base.items() if len(keys) > 1]


# ----------------------------------------------------------------------------- cache files


class CacheNaming(Protocol):
    """Names of an item's cache files; ``wan/train/cache_files.py`` can pass its own."""

    latent_pattern: str  # glob of every latent file musubi trains on in a cache directory

    def latent_name(self, base: str, size: tuple[int, int], window: tuple[int, int] | None) -> str: ...

    def text_name(self, base: str) -> str: ...


@dataclass(frozen=True)
class MusubiCacheNames:
    """musubi-tuner's cache file names, computed here so that this module stands alone:
    ``<base>_<start:05d>-<frames:03d>_<W:04d>x<H:04d>_wan.safetensors`` for a video window,
    ``<base>_<W:04d>x<H:04d>_wan.safetensors`` for an image, ``<base>_wan_te.safetensors`` for the
    text encoder's output. W x H is an image's own size, but a video's bucket: musubi resizes video
    frames as it reads them, so the size it records for a video is the bucket's."""

    architecture: str = "wan"

    @property
    def latent_pattern(self) -> str:
        return f"*_{self.architecture}.safetensors"

    def latent_name(self, base: str, size: tuple[int, int], window: tuple[int, int] | None = None) -> str:
        frames = "" if window is None else f"_{window[0]:05d}-{window[1]:03d}"
        return f"{base}{frames}_{size[0]:04d}x{size[1]:04d}_{self.architecture}.safetensors"

    def text_name(self, base: str) -> str:
        return f"{base}_{self.architecture}_te.safetensors"


MUSUBI_CACHE_NAMES = MusubiCacheNames()


def expected_cache_files(bp: DatasetBlueprint, item: DatasetItem,
                         naming: CacheNaming = MUSUBI_CACHE_NAMES) -> tuple[tuple[Path, ...], Path | None]:
    """The latent files (one per window of a video) and the text-encoder file musubi writes for
    ``item`` in the dataset's cache directory; none for an item it leaves out or cannot read."""
    if not item.used or item.size is None:
        return (), None
    folder = Path(bp.cache_directory)
    windows = item.windows if bp.is_video else (None,)
    size = item.bucket if bp.is_video and item.bucket is not None else item.size
    latents = tuple(dict.fromkeys(folder / naming.latent_name(item.base, size, w) for w in windows))
    return latents, folder / naming.text_name(item.base)


@dataclass(frozen=True)
class CacheState:
    """Which expected cache files exist; ``other_latents``: latent files no item of the dataset
    expects, which musubi still trains on (it takes every latent file of the folder)."""

    latents: tuple[int, int]  # (present, expected)
    texts: tuple[int, int]
    other_latents: int


def cache_state(listing: DatasetListing, naming: CacheNaming = MUSUBI_CACHE_NAMES) -> CacheState:
    latents: set[Path] = set()
    texts: set[Path] = set()
    for item in listing.items:
        item_latents, text = expected_cache_files(listing.blueprint, item, naming)
        latents.update(item_latents)
        texts.update([text] if text else [])
    folder = Path(listing.blueprint.cache_directory)
    present = set(folder.glob("*")) if folder.is_dir() else set()
    others = {p for p in folder.glob(naming.latent_pattern)} - latents if folder.is_dir() else set()
    return CacheState((len(latents & present), len(latents)), (len(texts & present), len(texts)), len(others))


# ----------------------------------------------------------------------------- the report


def dataset_report(config: DatasetConfig, naming: CacheNaming = MUSUBI_CACHE_NAMES, limit: int = 50) -> str:
    """What ``wgp.py dataset check D.toml`` prints: per dataset its settings and musubi's notes, the
    items found and used, the buckets with counts, the frames and windows of each video, the
    problems by kind (missing captions, unreadable files, controls, ...) and which cache files
    exist. A list longer than ``limit`` lines is cut, saying how many lines were left out."""
    lines = [f"{config.path}: {len(config.datasets)} dataset(s)"]
    for bp in config.datasets:
        lines += [""] + _dataset_lines(list_items(bp), naming, limit)
    return "\n".join(lines)


def _dataset_lines(listing: DatasetListing, naming: CacheNaming, limit: int) -> list[str]:
    """The report of one dataset: header and settings, counts, buckets, frames, problems, cache."""
    bp, items = listing.blueprint, listing.items
    used = [i for i in items if i.used]
    label = (lambda i: i.key) if bp.jsonl_file else (lambda i: i.name)  # JSONL rows may share a file name
    lines = _header_lines(bp)
    counted = f"{len(items)} found, {len(used)} used" if len(used) != len(items) else f"{len(items)}"
    windows = sum(len(i.windows) for i in used)
    per_epoch = (windows if bp.is_video else sum(1 for i in used if i.size)) * bp.num_repeats
    lines.append(f"  items: {counted}" + (f", {windows} windows" if bp.is_video else "")
                 + f"; {per_epoch} per epoch with num_repeats {bp.num_repeats}")
    # a video's batches are split by frame count too: its bucket is (width, height, frames)
    buckets = Counter((*i.bucket, n) if bp.is_video else i.bucket for i in used if i.bucket
                      for n in ([w[1] for w in i.windows] if bp.is_video else [0]))
    sizes = ", ".join(f"{'x'.join(map(str, k))}: {n}" for k, n in sorted(buckets.items()))
    lines.append(f"  buckets: {sizes or 'none'}")
    if bp.is_video:
        lines += _cut("frames per item", [f"{label(i)}: {_frames_line(bp, i)}" for i in used if i.frame_count], limit)
    problems = [(p.kind, p.message) for p in listing.problems]
    problems += [(p.kind, f"{label(i)}: {p.message}") for i in items for p in i.problems]
    for kind, title in PROBLEM_TITLES.items():
        lines += _cut(title, [message for k, message in problems if k == kind], limit)
    state = cache_state(listing, naming)
    others = (f"; {state.other_latents} other latent file(s) there, which musubi trains on too"
              if state.other_latents else "")
    lines.append(f"  cache: {state.latents[0]} of {state.latents[1]} latent files, {state.texts[0]} of "
                 f"{state.texts[1]} text-encoder files present{others}")
    return lines


def _header_lines(bp: DatasetBlueprint) -> list[str]:
    """Where a dataset's items come from, its settings, its folders and musubi's notes."""
    source = f"{bp.kind}_{'jsonl_file' if bp.jsonl_file else 'directory'} {bp.jsonl_file or bp.media_directory}"
    lines = [f"{bp.key}: {bp.kind} dataset, {source}", "  " + _settings(bp)]
    if bp.control_directory is not None:
        lines.append(f"  control_directory {bp.control_directory}")
    lines.append(f"  cache_directory {bp.cache_directory}")
    return lines + [f"  note: {note}" for note in bp.notes]


def _settings(bp: DatasetBlueprint) -> str:
    words = {True: "true", False: "false"}
    text = (f"resolution {bp.resolution[0]}x{bp.resolution[1]}, enable_bucket {words[bp.enable_bucket]}, "
            f"bucket_no_upscale {words[bp.bucket_no_upscale]}, batch_size {bp.batch_size}")
    if not bp.is_video:
        return text
    mode = {"slide": f" (frame_stride {bp.frame_stride})", "uniform": f" (frame_sample {bp.frame_sample})",
            "full": f" (max_frames {bp.max_frames})"}.get(bp.frame_extraction, "")
    fps = f", source_fps {bp.source_fps:g}" if bp.source_fps else ""
    frames = "" if bp.frame_extraction == "full" else f", target_frames {list(bp.target_frames)}"
    return f"{text}{frames}, frame_extraction {bp.frame_extraction}{mode}{fps}"


def _frames_line(bp: DatasetBlueprint, item: DatasetItem) -> str:
    at_rate = "" if bp.source_fps is None else f" ({loaded_frame_count(item.frame_count, bp.source_fps)} at 16 fps)"
    return f"{item.frame_count} frames{at_rate} -> {_windows_text(item.windows) or 'no window'}"


def _windows_text(windows: tuple[tuple[int, int], ...]) -> str:
    """Windows as slices of the loaded frames, ``[0:17]``; a long list shows its ends and its length."""
    shown = [f"[{s}:{s + n}]" for s, n in windows]
    if len(shown) > 6:
        shown = shown[:4] + ["...", shown[-1], f"({len(windows)} windows)"]
    return " ".join(shown)


def _cut(title: str, entries: list[str], limit: int) -> list[str]:
    """A titled list, at most ``limit`` entries; nothing when empty."""
    if not entries:
        return []
    more = [f"    ... and {len(entries) - limit} more"] if len(entries) > limit else []
    return [f"  {title} ({len(entries)}):"] + [f"    {e}" for e in entries[:limit]] + more
