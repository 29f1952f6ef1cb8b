"""The Train tab's dataset: a folder of images and/or videos with captions, or a musubi dataset TOML,
inside the folders training may use (``datasets_dir`` and the output folder); what it holds as
musubi-tuner sees it (each item's caption, bucket and frame windows, from file headers), what is
wrong with it, the captions written in place, and the TOML written for it.

A folder becomes a TOML of our own (:func:`folder_toml`): one video dataset for its videos and one
image dataset for its images, captions ``<name>.txt``, bucketing on, and a cache folder per choice of
resolution, frames and extraction (``<folder>/cache/64x64_9f_head/video``), so that runs with other
settings never delete or train on each other's caches. The TOML is saved beside the dataset
(``<folder>/wan_studio_dataset.toml``, never over a file we did not write) and a copy goes into each
run's folder: the job trains on what was shown when it was queued.

Every path from the browser is resolved and checked (:func:`wan.app.security.check_train_path`), and so
is every path a TOML names (its folders, its JSONL rows' files) before anything is read.
"""

from __future__ import annotations

import os
import tomllib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from wan.app.train_request import TrainRequestError, short

CAPTION_EXTENSION = ".txt"
DATASET_TOML = "wan_studio_dataset.toml"
TOML_HEADER = "# Written by Wan Studio's Train tab (musubi-tuner's dataset format); it is rewritten there.\n"
CACHE_FOLDER = "cache"
FRAME_CHOICES = ("head", "chunk", "slide", "uniform")
MIN_SIDE, SIDE_STEP = 16, 16
MAX_REPEATS = 100
MAX_CAPTION_CHARS = 2000
MAX_CHOICES = 200
MAX_THUMBNAILS = 60
THUMB_SIDE = 160
ASPECT_SPREAD = 1.5  # largest / smallest aspect ratio above this: "very different aspect ratios"


@dataclass(frozen=True)
class DatasetChoice:
    """What the tab asks of a folder: the training size, frames per clip and how they are taken."""

    width: int = 64
    height: int = 64
    frames: int = 9
    frame_extraction: str = "head"
    frame_stride: int = 1
    frame_sample: int = 1
    num_repeats: int = 1

    @property
    def cache_key(self) -> str:
        """The cache folder of these settings: ``64x64_9f_head`` (``_s4`` / ``_n3`` for slide / uniform)."""
        extra = {"slide": f"_s{self.frame_stride}", "uniform": f"_n{self.frame_sample}"}.get(self.frame_extraction, "")
        return f"{self.width}x{self.height}_{self.frames}f_{self.frame_extraction}{extra}"


@dataclass
class Preview:
    """A dataset as the tab shows it."""

    source: Path                 # the folder, or the TOML file
    toml_text: str               # the TOML trained on (ours for a folder, the file's own otherwise)
    config: object               # wan.train.dataset_config.DatasetConfig
    listings: list               # one wan.train.dataset_items.DatasetListing per dataset
    warnings: list[str] = field(default_factory=list)

    @property
    def from_toml(self) -> bool:
        return self.source.is_file()

    @property
    def items(self) -> list:
        return [item for listing in self.listings for item in listing.items]

    def usable(self) -> list:
        """Items training can use: listed, readable, captioned, with at least one frame window."""
        out = []
        for listing in self.listings:
            for item in listing.items:
                if item.used and item.caption and item.size is not None and \
                        (item.windows or not listing.blueprint.is_video):
                    out.append(item)
        return out

    def caption_extension(self, key: str) -> str | None:
        for listing in self.listings:
            if any(item.key == key for item in listing.items):
                return listing.blueprint.caption_extension
        return None


# ---------------------------------------------------------------------------------------------
# Where


def source_choices(settings) -> list[tuple[str, str]]:
    """(label, path) of what ``datasets_dir`` offers: folders holding images or videos (the folder
    itself and two levels below it) and the TOML files there; labels relative to it."""
    from wan.app.security import train_roots
    from wan.train.dataset_items import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
    root = train_roots(settings)[0]
    if not root.is_dir():
        return []
    media = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
    out: list[tuple[str, str]] = []
    for folder, subfolders, names in _walk(root, depth=2):
        rel = folder.relative_to(root).as_posix()
        label = rel if rel != "." else f"{root.name}/ (the datasets folder itself)"
        if any(n.endswith(media) for n in names):
            out.append((label, str(folder)))
        for name in sorted(n for n in names if n.endswith(".toml")):
            out.append(((folder / name).relative_to(root).as_posix(), str(folder / name)))
        if len(out) >= MAX_CHOICES:
            break
    return out[:MAX_CHOICES]


def _walk(root: Path, depth: int):
    """(folder, subfolders, file names) below ``root`` to ``depth`` levels, sorted, no hidden names, no
    cache folders, no links followed."""
    todo = [(root, 0)]
    while todo:
        folder, level = todo.pop(0)
        try:
            with os.scandir(folder) as entries:
                entries = sorted(entries, key=lambda e: e.name)
        except OSError:
            continue
        names = [e.name for e in entries if not e.name.startswith(".") and e.is_file(follow_symlinks=False)]
        subs = [e.name for e in entries if not e.name.startswith(".") and e.name != CACHE_FOLDER
                and e.is_dir(follow_symlinks=False)]
        yield folder, subs, names
        if level < depth:
            todo += [(folder / s, level + 1) for s in subs]


def resolve_source(text, settings) -> Path:
    """The folder or TOML file ``text`` names (relative: inside ``datasets_dir``), checked to lie in the
    folders training may use and to exist. Raises TrainRequestError on ``dataset``."""
    from wan.app.security import check_train_path, train_roots
    if text is None or (isinstance(text, str) and not text.strip()):
        roots = " or ".join(map(str, train_roots(settings)))
        raise TrainRequestError("dataset", f"required: a folder of images or videos with captions, or a dataset TOML, "
                                           f"inside {roots}")
    try:
        path = check_train_path(text, settings, "dataset")
    except ValueError as e:
        raise TrainRequestError("dataset", str(e).removeprefix("dataset: ")) from None
    if path.is_file() and path.suffix == ".toml":
        return path
    if not path.is_dir():
        raise TrainRequestError.bad("dataset", text, "an existing folder of images or videos, or a .toml file")
    return path


# ---------------------------------------------------------------------------------------------
# The choices of the tab


def check_choice(values: dict, limits) -> DatasetChoice:
    """The tab's dataset settings, each checked (TrainRequestError naming ``width``, ``frames``...)."""
    def whole(key: str, low: int, high: int, words: str) -> int:
        value = values.get(key)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TrainRequestError.bad(key, value, words)
        return value
    side = (f"a multiple of {SIDE_STEP} from {MIN_SIDE}, with width x height at most {limits.max_pixels} pixels "
            "(--max_pixels)")
    width = whole("width", MIN_SIDE, limits.max_pixels, side)
    height = whole("height", MIN_SIDE, limits.max_pixels, side)
    for key, v in (("width", width), ("height", height)):
        if v % SIDE_STEP:
            raise TrainRequestError.bad(key, v, side)
    if width * height > limits.max_pixels:
        raise TrainRequestError.bad("height", height, f"{width}x{height} is {width * height} pixels; at most "
                                                      f"{limits.max_pixels} on this server (--max_pixels)")
    frames = whole("frames", 1, limits.max_frames, f"4k+1 frames (1, 5, 9, ... 81) up to {limits.max_frames} "
                                                   "(--max_frames)")
    if (frames - 1) % 4:
        lower, upper = frames - (frames - 1) % 4, frames - (frames - 1) % 4 + 4
        raise TrainRequestError.bad("frames", frames, f"4k+1 frames: the VAE packs 4 frames per latent after the "
                                                      f"first (1, 5, 9, ...); {lower} or {upper}")
    mode = values.get("frame_extraction") or "head"
    if mode not in FRAME_CHOICES:
        raise TrainRequestError.bad("frame_extraction", mode, f"one of {', '.join(FRAME_CHOICES)}")
    stride = whole("frame_stride", 1, 10_000, "an integer >= 1") if mode == "slide" else 1
    sample = whole("frame_sample", 1, 64, "an integer from 1 to 64") if mode == "uniform" else 1
    repeats = whole("num_repeats", 1, MAX_REPEATS, f"an integer from 1 to {MAX_REPEATS}") \
        if values.get("num_repeats") is not None else 1
    return DatasetChoice(width, height, frames, mode, stride, sample, repeats)


def folder_toml(folder: Path, choice: DatasetChoice, images: bool, videos: bool) -> str:
    """The TOML of a folder: a video dataset for its videos, an image dataset for its images."""
    def q(path: Path) -> str:
        return '"' + str(path).replace("\\", "\\\\").replace('"', '\\"') + '"'
    cache = folder / CACHE_FOLDER / choice.cache_key
    lines = [TOML_HEADER.rstrip("\n"), "[general]", f"resolution = [{choice.width}, {choice.height}]",
             f'caption_extension = "{CAPTION_EXTENSION}"', "batch_size = 1", "enable_bucket = true",
             "bucket_no_upscale = false", f"num_repeats = {choice.num_repeats}"]
    if videos:
        lines += ["", "[[datasets]]", f"video_directory = {q(folder)}", f"cache_directory = {q(cache / 'video')}",
                  f"target_frames = [{choice.frames}]", f'frame_extraction = "{choice.frame_extraction}"']
        if choice.frame_extraction == "slide":
            lines.append(f"frame_stride = {choice.frame_stride}")
        if choice.frame_extraction == "uniform":
            lines.append(f"frame_sample = {choice.frame_sample}")
    if images:
        lines += ["", "[[datasets]]", f"image_directory = {q(folder)}", f"cache_directory = {q(cache / 'image')}"]
    return "\n".join(lines) + "\n"


def media_in(folder: Path) -> tuple[bool, bool]:
    """(has images, has videos) as musubi lists them (not recursive, no hidden names)."""
    from wan.train.dataset_items import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, media_files
    return bool(media_files(folder, IMAGE_EXTENSIONS)), bool(media_files(folder, VIDEO_EXTENSIONS))


# ---------------------------------------------------------------------------------------------
# Reading a dataset


def preview(source_text, values: dict, settings) -> Preview:
    """The dataset ``source_text`` names, as musubi sees it, with its warnings. A folder is read with
    the tab's choices (``values``: width, height, frames, frame_extraction...); a TOML file as it is.

    Raises:
        TrainRequestError: naming ``dataset`` (outside the allowed folders, missing, no media, an
            unreadable TOML or one naming other folders) or a choice (``frames``...).
    """
    from wan.app.security import limits_of
    from wan.train.dataset_config import DatasetConfigError, load_dataset_config, parse_dataset_config
    from wan.train.dataset_items import list_items
    source = resolve_source(source_text, settings)
    limits = limits_of(settings)
    try:
        if source.is_file():
            config = load_dataset_config(source)
            text = source.read_text(encoding="utf-8")
        else:
            images, videos = media_in(source)
            if not (images or videos):
                raise TrainRequestError("dataset", f"{source}: an empty dataset, no image or video in it (png, jpg, "
                                                   "webp; mp4, webm, mov, mkv...)")
            text = folder_toml(source, check_choice(values, limits), images, videos)
            config = parse_dataset_config(tomllib.loads(text), str(source / DATASET_TOML), path=source / DATASET_TOML)
    except DatasetConfigError as e:
        raise TrainRequestError("dataset", str(e)) from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise TrainRequestError("dataset", f"{source} cannot be read ({e})") from None
    check_config(config, settings, limits)
    listings = [list_items(bp) for bp in config.datasets]
    result = Preview(source, text, config, listings)
    _check_listed_paths(result, settings)
    result.warnings = warnings_of(result)
    return result


def check_config(config, settings, limits) -> None:
    """Every folder and file a dataset TOML names lies in the folders training may use, and its sizes
    and frames are within the server's limits."""
    from wan.app.security import is_inside, train_roots
    roots = train_roots(settings)
    for bp in config.datasets:
        for key in ("image_directory", "image_jsonl_file", "video_directory", "video_jsonl_file",
                    "control_directory", "cache_directory"):
            path = getattr(bp, key, None)
            if path is not None and not any(is_inside(os.path.abspath(path), root) for root in roots):
                raise TrainRequestError("dataset", f"{bp.key}.{key} {short(str(path))} is outside the folders training "
                                                   f"may use ({' or '.join(map(str, roots))})")
        width, height = bp.resolution
        if width * height > limits.max_pixels:
            raise TrainRequestError("dataset", f"{bp.key}.resolution {width}x{height} is {width * height} pixels; "
                                               f"at most {limits.max_pixels} on this server (--max_pixels)")
        if bp.is_video:
            frames = bp.max_frames if bp.frame_extraction == "full" else max(bp.target_frames)
            if frames > limits.max_frames:
                key = "max_frames" if bp.frame_extraction == "full" else "target_frames"
                raise TrainRequestError("dataset", f"{bp.key}.{key} {frames} frames; at most {limits.max_frames} on "
                                                   "this server (--max_frames)")


def _check_listed_paths(result: Preview, settings) -> None:
    """Items and controls of JSONL rows may name any path: each must lie in the allowed folders."""
    from wan.app.security import is_inside, train_roots
    roots = train_roots(settings)
    for listing in result.listings:
        for item in listing.items:
            for path in (item.key, *item.controls):
                if not any(is_inside(os.path.abspath(path), root) for root in roots):
                    raise TrainRequestError("dataset", f"{listing.blueprint.key}: item {short(path)} is outside the "
                                                       f"folders training may use ({' or '.join(map(str, roots))})")


def require_usable(result: Preview) -> None:
    """Refuses a dataset with nothing to train on, saying why (field ``dataset``)."""
    if result.usable():
        return
    found = result.items
    if not found:
        raise TrainRequestError("dataset", f"{result.source}: an empty dataset (no image or video found)")
    raise TrainRequestError("dataset", f"{result.source}: none of its {len(found)} item(s) can be trained on; "
                                       f"fix what the warnings say: " + "; ".join(result.warnings[:3]))


def warnings_of(result: Preview) -> list[str]:
    """The dataset's problems in the tab's words: missing captions, unreadable files, clips too short
    for the frames asked, very different aspect ratios, musubi's notes."""
    from wan.train.dataset_items import PROBLEM_TITLES
    out: list[str] = []
    problems: list[tuple[str, str]] = []
    for listing in result.listings:
        problems += [(p.kind, p.message) for p in listing.problems]
        problems += [(p.kind, f"{item.name}: {p.message}") for item in listing.items for p in item.problems]
        out += [f"{listing.blueprint.key}: {note}" for note in listing.blueprint.notes]
    for kind, title in PROBLEM_TITLES.items():
        found = [message for k, message in problems if k == kind]
        if found:
            more = f"; and {len(found) - 5} more" if len(found) > 5 else ""
            out.append(f"{title} ({len(found)}): " + "; ".join(found[:5]) + more)
    sizes = [item.size for item in result.items if item.size]
    if sizes:
        ratios = sorted(w / h for w, h in sizes)
        if ratios[-1] / ratios[0] > ASPECT_SPREAD:
            buckets = Counter(item.bucket for item in result.items if item.bucket)
            out.append(f"very different aspect ratios ({ratios[0]:.2f} to {ratios[-1]:.2f}, width / height): the items "
                       f"fall in {len(buckets)} buckets ({', '.join(f'{w}x{h}' for w, h in sorted(buckets))}), and "
                       "each bucket trains in batches of its own")
    return out


# ---------------------------------------------------------------------------------------------
# What the tab shows


def item_rows(result: Preview) -> list[list[str]]:
    """One row per item: kind, file, caption, size, frames and windows, bucket, problems."""
    rows = []
    for listing in result.listings:
        bp = listing.blueprint
        for item in listing.items:
            windows = " ".join(f"[{s}:{s + n}]" for s, n in item.windows[:6]) + (" ..." if len(item.windows) > 6 else "")
            frames = (f"{item.frame_count} -> {windows or 'no window'}" if bp.is_video and item.frame_count is not None
                      else "")
            rows.append([bp.kind, item.name, item.caption if item.caption is not None else "(missing)",
                         f"{item.size[0]}x{item.size[1]}" if item.size else "?", frames,
                         f"{item.bucket[0]}x{item.bucket[1]}" if item.bucket else "",
                         "; ".join(p.message for p in item.problems)])
    return rows


def summary(result: Preview) -> str:
    """One paragraph: what was found, what trains, the frame extraction."""
    parts = []
    for listing in result.listings:
        bp = listing.blueprint
        used = [i for i in listing.items if i.used]
        windows = sum(len(i.windows) for i in used)
        extraction = (f", frames {list(bp.target_frames)} by {bp.frame_extraction} extraction: {windows} windows"
                      if bp.is_video else "")
        parts.append(f"{len(listing.items)} {bp.kind}(s) at {bp.resolution[0]}x{bp.resolution[1]}{extraction}")
    return f"{len(result.usable())} item(s) ready to train on; " + "; ".join(parts)


def thumbnails(result: Preview, limit: int = MAX_THUMBNAILS) -> list[tuple[object, str]]:
    """(small picture, caption) per item: an image scaled down, a video's first frame; an item that
    cannot be read gets a grey square."""
    from PIL import Image
    out = []
    for listing in result.listings:
        for item in listing.items:
            if len(out) >= limit:
                return out
            try:
                picture = _first_frame(item.key) if listing.blueprint.is_video else Image.open(item.key).convert("RGB")
                picture.thumbnail((THUMB_SIDE, THUMB_SIDE))
            except Exception:  # noqa: BLE001 - an unreadable file is a warning, never a broken preview
                picture = Image.new("RGB", (64, 64), (90, 90, 90))
            label = f"{item.name}: {item.caption}" if item.caption else f"{item.name}: ⚠ no caption"
            out.append((picture, label))
    return out


def _first_frame(path: str):
    import av
    with av.open(path) as container:
        for frame in container.decode(video=0):
            return frame.to_image()
    raise ValueError(f"{path}: no frame")


# ---------------------------------------------------------------------------------------------
# Writing: captions, the TOML


def write_caption(result: Preview, item_key, text, settings) -> Path:
    """Writes the caption of one listed item in place (``<name><caption_extension>`` beside it,
    atomically), only inside the folders training may use. Returns the caption file."""
    from wan.app.security import is_inside, train_roots
    from wan.fileio import write_text_atomic
    keys = {item.key for item in result.items}
    if not isinstance(item_key, str) or item_key not in keys:
        raise TrainRequestError.bad("caption item", item_key, "an item of the dataset shown (preview it again)")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_CAPTION_CHARS or \
            not all(c.isprintable() or c in "\n\t" for c in text):
        raise TrainRequestError.bad("caption", text, f"printable text of 1 to {MAX_CAPTION_CHARS} characters")
    ext = result.caption_extension(item_key) or CAPTION_EXTENSION
    path = Path(os.path.splitext(item_key)[0] + ext)
    roots = train_roots(settings)
    if not any(is_inside(path, root) for root in roots):
        raise TrainRequestError("caption item", f"{short(str(path))} is outside the folders training may use")
    return write_text_atomic(path, " ".join(text.split()) + "\n")


def save_toml(result: Preview) -> Path | None:
    """Saves a folder's TOML beside its media (``wan_studio_dataset.toml``) unless a file of that name
    that we did not write is there; None for a TOML source (it is its own file) or such a clash."""
    from wan.fileio import write_text_atomic
    if result.from_toml:
        return None
    path = result.source / DATASET_TOML
    if path.exists():
        try:
            ours = path.read_text(encoding="utf-8").startswith(TOML_HEADER[:40])
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            return None
    return write_text_atomic(path, result.toml_text)
