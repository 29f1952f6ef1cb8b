"""Writing results: MP4 / PNG / latents with embedded metadata, unique names, atomic files.

Frame convention (one, everywhere in this module): ``frames`` is ``[T, H, W, 3]`` uint8 RGB, as a
numpy array or a torch tensor. A decoded video ``[3, T, H, W]`` in [-1, 1] is turned into that with
``to_uint8_frames``, which reproduces the official Wan save code's rounding.

What lands on disk, for one ``save_outputs`` call with the name ``<name>``:
    ``<name>.mp4``   T > 1: H.264 (libx264), yuv420p, ``-movflags +faststart``; the metadata JSON in
                     the MP4 ``comment`` tag (readable with PyAV, ``ffmpeg -i``, exiftool);
    ``<name>.png``   T == 1: the frame, metadata JSON in an iTXt chunk keyed ``wan_studio``;
    ``<name>.json``  the same metadata (``OutputOptions.sidecar_json``);
    ``<name>.latents.safetensors``  the latents (key ``latents``), metadata JSON under the header
                     metadata key ``wan_studio`` (``OutputOptions.save_latents``).

Never a partial file under a final name, never an overwrite:
    1. every file is written in full to ``.<final name>.<12 hex>.tmp`` in the output folder, fsynced;
    2. the group gets its names with ``os.link(temp, final)``, which fails if the name exists, so two
       writers (threads or processes) can never claim the same name; on a clash the whole group moves
       to ``<name>_2``, ``<name>_3``, ...; then the temps are unlinked.
       Where the filesystem has no hard links, an empty placeholder is created with ``O_EXCL`` and the
       temp is ``os.replace``d onto it (a crash in that short window leaves an empty file).
    3. any error removes the temps and the names claimed so far, then re-raises.
A crash leaves at most dot-tmp files: ``remove_stale_temp_files(folder)`` deletes old ones.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import secrets
import string
import subprocess
import tempfile
import time
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan.engine.request import request_default
from wan.engine.request_checks import template_problem
from wan.fileio import fsync_dir

METADATA_KEY = "wan_studio"      # PNG iTXt key and safetensors header key
MP4_METADATA_TAG = "comment"     # MP4 tag (©cmt atom) that carries the JSON
TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"
PROMPT_CHARS = 40                # characters of the prompt kept in a file name
MAX_STEM_BYTES = 180             # keeps ".<stem>.latents.safetensors.<hex>.tmp" under 255 bytes
_TEMP_RE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}
# errno values meaning "this filesystem cannot hard-link": fall back to an O_EXCL placeholder.
_NO_HARDLINK = {errno.EPERM, errno.EACCES, errno.EXDEV, errno.EMLINK, errno.ENOSYS,
                getattr(errno, "ENOTSUP", -1), getattr(errno, "EOPNOTSUPP", -1)}


@dataclass
class OutputOptions:
    """Where and how results are written. Validated on construction (ValueError naming the field).
    The defaults are those of a request's output fields, so a direct caller writes what a request would.

    Attributes:
        folder: output folder, created when missing.
        name_template: file name without extension; fields {time} (YYYY-MM-DD_HH-MM-SS), {seed},
            {prompt} (first 40 characters, sanitised), {model}, {task}. Literal text may use letters,
            digits, '-', '_', '.', ' ' (spaces become '_').
        video_quality: 0 (worst) .. 10 (best), imageio's scale: libx264 CRF = int((1 - q/10) * 51);
            8 gives CRF 10, what the official Wan code writes.
        save_latents: also write ``<name>.latents.safetensors``.
        trim_tail_frames: frames dropped from the end before writing (must leave at least one).
        sidecar_json: also write ``<name>.json`` with the metadata.
    """

    folder: str = request_default("output_dir")
    name_template: str = request_default("name_template")
    video_quality: int = request_default("quality")
    save_latents: bool = request_default("save_latents")
    trim_tail_frames: int = request_default("trim_tail")
    sidecar_json: bool = True

    def __post_init__(self):
        if not str(self.folder):
            raise ValueError("OutputOptions.folder must not be empty")
        _check_template(self.name_template)
        q = self.video_quality
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 <= q <= 10:
            raise ValueError(f"OutputOptions.video_quality must be a number in 0..10, got {q!r}")
        t = self.trim_tail_frames
        if isinstance(t, bool) or not isinstance(t, int) or t < 0:
            raise ValueError(f"OutputOptions.trim_tail_frames must be an integer >= 0, got {t!r}")


# ----------------------------------------------------------------------------------------------
# Frames and metadata


def to_uint8_frames(video: torch.Tensor, rounding: str = "auto") -> np.ndarray:
    """Decoded video [3, T, H, W] in [-1, 1] -> frames [T, H, W, 3] uint8, as the official code does.

    The value is ``(clamp(x, -1, 1) + 1) / 2 * 255`` in float32, then:
        "floor"   truncation, as Wan's ``save_video`` (``(x * 255).type(torch.uint8)``);
        "nearest" + 0.5 then truncation, as torchvision's ``save_image`` that Wan uses for T == 1;
        "auto"    "floor" when T > 1, "nearest" when T == 1: the official file for either case.
    """
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise ValueError(f"to_uint8_frames expects a tensor [3, T, H, W] in [-1, 1], got {shape}")
    if rounding == "auto":
        rounding = "nearest" if video.shape[1] == 1 else "floor"
    if rounding not in ("floor", "nearest"):
        raise ValueError(f"rounding must be 'auto', 'floor' or 'nearest', got {rounding!r}")
    x = (video.detach().float().clamp(-1, 1) + 1) / 2 * 255
    if rounding == "nearest":
        x = (x + 0.5).clamp_(0, 255)
    return x.to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()


def as_frames(frames: Any, what: str = "frames") -> np.ndarray:
    """Checks the frame convention and returns a C-contiguous numpy [T, H, W, 3] uint8 array."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray):
        raise TypeError(f"{what} must be a numpy array or torch tensor, got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"{what} must be uint8 [T, H, W, 3] with T, H, W >= 1, got {frames.dtype} "
                         f"{list(frames.shape)}; convert a decoded [3, T, H, W] video with to_uint8_frames()")
    return np.ascontiguousarray(frames)


def metadata_to_json(metadata: dict) -> str:
    """The compact JSON stored in every file. Only JSON-native values, so reading it back is exact."""
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    _check_json_value(metadata, "metadata")
    return json.dumps(metadata, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _check_json_value(value: Any, where: str) -> None:
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{where} is {value}: JSON has no NaN or infinity")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has the key {key!r} ({type(key).__name__}): keys must be str")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise TypeError(f"{where} is a {type(value).__name__}, which JSON cannot hold "
                    "(use str, int, float, bool, None, list or dict)")


# ----------------------------------------------------------------------------------------------
# Encoders: each writes one finished file to `dest` (a temp path) and nothing else.


def crf_for_quality(quality: float) -> int:
    """imageio's 0..10 quality scale -> libx264 CRF (0 best .. 51 worst)."""
    return int((1 - quality / 10.0) * 51)


def _pad_to_even(frames: np.ndarray) -> np.ndarray:
    """yuv420p halves the chroma planes, so H.264 needs even sizes: repeat the last row/column."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    warnings.warn(f"video size {w}x{h} is odd; H.264 yuv420p needs even sizes, so the last "
                  f"row/column is repeated to {w + w % 2}x{h + h % 2}", stacklevel=3)
    return np.ascontiguousarray(np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge"))


def _frame_bytes(frames: np.ndarray) -> Iterator[memoryview]:
    """One raw rgb24 frame at a time (a seam where tests inject a mid-encode failure)."""
    for frame in frames:
        yield memoryview(frame).cast("B")


def _ffmetadata(text: str) -> str:
    """An ffmetadata file that sets the comment tag; it avoids command-line length limits."""
    escaped = re.sub(r"([=;#\\\n])", r"\\\1", text)
    return f";FFMETADATA1\n{MP4_METADATA_TAG}={escaped}\n"


def mp4_command(width: int, height: int, fps, dest: Path, quality: float, comment: str | None,
                meta_dir: Path) -> list[str]:
    """The ffmpeg command that reads raw rgb24 frames of ``width`` x ``height`` (even) on stdin and
    writes the H.264 MP4 ``dest``, the comment tag from a file written into ``meta_dir`` (every MP4
    of the engine is written with it: ``encode_mp4`` and the window-by-window writer)."""
    import imageio_ffmpeg

    rate = fps if isinstance(fps, Fraction) else Fraction(fps).limit_denominator(1001)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(rate), "-i", "-"]
    if comment is not None:
        meta_file = meta_dir / "meta.txt"
        meta_file.write_text(_ffmetadata(comment), encoding="utf-8")
        cmd += ["-f", "ffmetadata", "-i", str(meta_file), "-map_metadata", "1"]
    return cmd + ["-map", "0:v:0", "-an", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                  "-crf", str(crf_for_quality(quality)), "-movflags", "+faststart", "-f", "mp4", str(dest)]


def encode_mp4(frames: np.ndarray, fps: float, dest: Path, quality: float = request_default("quality"),
               comment: str | None = None) -> None:
    """Encodes frames [T, H, W, 3] uint8 (even H, W) to an H.264 MP4 at `dest` with the bundled ffmpeg.

    The same path as the official code (imageio -> ffmpeg, libx264, yuv420p, CRF from `quality`), but
    ffmpeg's exit status is checked: a failed encode raises RuntimeError with ffmpeg's message.
    """
    _, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory(prefix="wan_ffmeta_") as meta_dir:
        cmd = mp4_command(w, h, fps, dest, quality, comment, Path(meta_dir))
        with tempfile.TemporaryFile() as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
            try:
                try:
                    for chunk in _frame_bytes(frames):
                        proc.stdin.write(chunk)
                    proc.stdin.close()
                except BrokenPipeError:
                    pass  # ffmpeg stopped reading: its exit status and message say why
                code = proc.wait()
            except BaseException:
                proc.kill()  # our side failed midway: stop ffmpeg before the temp file is removed
                proc.wait()
                raise
            finally:
                if proc.stdin and not proc.stdin.closed:
                    try:
                        proc.stdin.close()
                    except OSError:
                        pass
            if code != 0:
                err.seek(0)
                message = err.read().decode("utf-8", "replace").strip()[-2000:]
                raise RuntimeError(f"ffmpeg failed (exit {code}) writing {dest}: {message or 'no message'}")


def encode_png(frame: np.ndarray, dest: Path, text: str | None = None) -> None:
    """Writes one frame [H, W, 3] uint8 as an RGB PNG, `text` in the iTXt chunk ``wan_studio``.

    (Pillow reads text chunks up to 1 MB back; metadata is a few KB.)
    """
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_itxt(METADATA_KEY, text)
    with open(dest, "wb") as f:
        Image.fromarray(frame).save(f, format="PNG", pnginfo=info)  # uint8 [H, W, 3] is RGB


def encode_latents(latents: torch.Tensor, dest: Path, text: str | None = None) -> None:
    """Writes latents (any shape and dtype) as safetensors key ``latents``; `text` in the header."""
    from safetensors.torch import save

    meta = {METADATA_KEY: text} if text is not None else None
    data = save({"latents": latents.detach().cpu().contiguous()}, metadata=meta)
    with open(dest, "wb") as f:
        f.write(data)


def _encode_json(text: str, dest: Path) -> None:
    pretty = json.dumps(json.loads(text), ensure_ascii=False, indent=2)
    with open(dest, "w", encoding="utf-8") as f:
        f.write(pretty + "\n")


# ----------------------------------------------------------------------------------------------
# Names


def _check_template(template: str) -> None:
    problem = template_problem(template)
    if problem:
        raise ValueError(f"OutputOptions.name_template {template!r} {problem}")


def sanitize_name_part(text: Any, max_chars: int = PROMPT_CHARS, fallback: str = "untitled") -> str:
    """A file-name-safe piece: letters (any script), digits, '-' and '_' only; spaces -> '_'.

    Everything else (path separators, dots, quotes, control characters) is dropped, so the result
    can never be a path or '..'. Runs of '_' are merged; never empty (`fallback`).
    """
    text = unicodedata.normalize("NFKC", str(text))
    text = "".join(c for c in text.replace("\n", " ").replace("\t", " ").strip()[:max_chars * 4]
                   if c.isalnum() or c in "-_ ")
    text = re.sub(r"[ _]+", "_", text.strip()).strip("_")[:max_chars].strip("_")
    return text or fallback


def render_name(template: str, *, now: datetime, seed: int, prompt: str, model: str | None = None,
                task: str | None = None) -> str:
    """The file stem (no extension) from the template; every field value is sanitised."""
    _check_template(template)
    values = {
        "time": now.strftime(TIME_FORMAT),
        "seed": sanitize_name_part(seed, max_chars=24, fallback="0"),
        "prompt": sanitize_name_part(prompt),
        "model": sanitize_name_part(model or "model", max_chars=48),
        "task": sanitize_name_part(task or "task", max_chars=24),
    }
    stem = string.Formatter().vformat(template, (), values).replace(" ", "_")
    stem = stem.lstrip(".").rstrip(". ")  # no hidden files, no '..', no trailing dot (Windows)
    # cut to the byte budget at once (a character cut in half is dropped)
    stem = stem.encode("utf-8")[:MAX_STEM_BYTES].decode("utf-8", "ignore").rstrip(". ")
    if not stem or stem.split(".")[0].upper() in _WINDOWS_RESERVED:
        stem = f"_{stem}"
    return stem


def _check_stem(stem: str, folder: Path) -> None:
    """Whatever the template, the names written (``<stem>.<suffix>``, numbered ``<stem>_N``, and their
    ``.<name>.<hex>.tmp`` temps) stay directly inside ``folder``: a stem is one path component."""
    if not stem or stem in (".", "..") or Path(stem).name != stem or "/" in stem or "\\" in stem or "\x00" in stem:
        raise ValueError(f"output name {stem!r} is not a plain file name; outputs are written inside {folder}")


# ----------------------------------------------------------------------------------------------
# Atomic publishing


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _temp_files(folder: Path) -> Iterator[Callable[[str, Callable[[Path], None]], Path]]:
    """Yields `make(final_name, write)`: runs write(temp) on a fresh dot-tmp file, fsyncs it.

    Every temp file still present on exit (error, or not published) is removed.
    """
    made: list[Path] = []

    def make(final_name: str, write: Callable[[Path], None]) -> Path:
        temp = folder / f".{final_name}.{secrets.token_hex(6)}.tmp"
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        made.append(temp)
        write(temp)
        _fsync_file(temp)
        return temp

    try:
        yield make
    finally:
        for temp in made:
            _unlink_quiet(temp)


def _claim(temp: Path, final: Path) -> str | None:
    """Gives `final` to the finished `temp` unless the name exists. Returns how, or None if taken."""
    try:
        os.link(temp, final)  # atomic and exclusive: fails if `final` exists
        return "linked"
    except FileExistsError:
        return None
    except OSError as e:
        if e.errno not in _NO_HARDLINK:
            raise
    try:  # no hard links here: reserve the name with an exclusive create, fill it in _publish
        os.close(os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        return "reserved"
    except FileExistsError:
        return None


def _publish(temps: list[tuple[Path, str]], folder: Path, stem: str, numbered: bool) -> list[Path]:
    """Moves finished temps [(temp, suffix)] to ``<stem><suffix>`` (or ``<stem>_N<suffix>``) as a group."""
    for n in range(1, 100_000):
        base = stem if n == 1 else f"{stem}_{n}"
        finals = [folder / f"{base}{suffix}" for _, suffix in temps]
        claimed: list[tuple[Path, Path, str]] = []
        try:
            for (temp, _), final in zip(temps, finals):
                how = _claim(temp, final)
                if how is None:
                    break
                claimed.append((temp, final, how))
            else:
                for temp, final, how in claimed:
                    if how == "linked":
                        os.unlink(temp)
                    else:
                        os.replace(temp, final)
                fsync_dir(folder)
                return finals
        except BaseException:
            for _, final, _ in claimed:
                _unlink_quiet(final)
            raise
        for _, final, _ in claimed:  # a name of the group was taken: release ours, try the next
            _unlink_quiet(final)
        if not numbered:
            taken = next((f for f in finals if f.exists()), finals[0])
            raise FileExistsError(f"{taken} already exists; outputs are never overwritten")
    raise FileExistsError(f"no free name for {folder / stem} after 99999 attempts")


def remove_stale_temp_files(folder: str | os.PathLike, min_age_s: float = 3600.0) -> list[Path]:
    """Deletes ``.<name>.<12 hex>.tmp`` files older than `min_age_s` (left by a crash); returns them.

    The age limit keeps the temps of writers that are still running: pass 0 only when none is.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed, cutoff = [], time.time() - min_age_s
    for entry in folder.iterdir():
        if _TEMP_RE.match(entry.name) and entry.is_file() and entry.stat().st_mtime <= cutoff:
            _unlink_quiet(entry)
            removed.append(entry)
    return removed


# ----------------------------------------------------------------------------------------------
# Public writers


def _split_name(path: Path, suffixes: tuple[str, ...]) -> tuple[Path, str, str]:
    name = path.name
    for suffix in suffixes:
        if name.lower().endswith(suffix) and len(name) > len(suffix):
            return path.parent, name[: -len(suffix)], name[-len(suffix):]
    raise ValueError(f"{path}: expected a file name ending in {' or '.join(suffixes)}")


def _write_one(path, suffixes, write: Callable[[Path], None]) -> Path:
    folder, stem, suffix = _split_name(Path(path), suffixes)
    folder.mkdir(parents=True, exist_ok=True)
    with _temp_files(folder) as make:
        temp = make(stem + suffix, write)
        return _publish([(temp, suffix)], folder, stem, numbered=False)[0]


def write_video(frames, fps: float, path: str | os.PathLike, *, metadata: dict | None = None,
                quality: float = request_default("quality")) -> Path:
    """Writes frames [T, H, W, 3] uint8 to the new MP4 `path` atomically (FileExistsError if taken).

    Odd sizes are padded to even by repeating the last row/column (with a warning), never resized.
    """
    frames = _pad_to_even(as_frames(frames))
    fps = _check_fps(fps)
    text = metadata_to_json(metadata) if metadata is not None else None
    return _write_one(path, (".mp4",), lambda temp: encode_mp4(frames, fps, temp, quality, text))


def write_image(frame, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Writes one frame [H, W, 3] (or [1, H, W, 3]) uint8 to the new PNG `path` atomically."""
    if getattr(frame, "ndim", 0) == 3:
        frame = frame[None]
    frames = as_frames(frame, "frame")
    if frames.shape[0] != 1:
        raise ValueError(f"write_image takes one frame, got {frames.shape[0]}")
    text = metadata_to_json(metadata) if metadata is not None else None
    return _write_one(path, (".png",), lambda temp: encode_png(frames[0], temp, text))


def write_latents(latents: torch.Tensor, path: str | os.PathLike, *, metadata: dict | None = None) -> Path:
    """Writes latents to the new ``.safetensors`` `path` atomically, metadata in the header."""
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    text = metadata_to_json(metadata) if metadata is not None else None
    return _write_one(path, (".latents.safetensors", ".safetensors"),
                      lambda temp: encode_latents(latents, temp, text))


def _check_fps(fps) -> float | Fraction:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, Fraction)) or not 0 < fps <= 1000:
        raise ValueError(f"fps must be a number in (0, 1000], got {fps!r}")
    return fps


def save_outputs(frames, fps: int, metadata: dict, options: OutputOptions, *, seed: int, prompt: str,
                 latents: torch.Tensor | None = None, now: datetime | None = None,
                 model: str | None = None, task: str | None = None) -> list[Path]:
    """Writes one result under a fresh name from `options`; returns [primary, json?, latents?].

    Args:
        frames: [T, H, W, 3] uint8 (see ``to_uint8_frames``); ``trim_tail_frames`` are dropped first,
            then T == 1 gives a PNG and T > 1 an MP4.
        metadata: JSON-native dict embedded in every file; ``read_metadata`` returns it unchanged.
        latents: saved when ``options.save_latents`` (required then), untrimmed.
        now: the time for {time} (default: the current local time).
        model, task: values for {model} / {task}; default ``metadata["model"]`` / ``metadata["task"]``.
    Everything is validated before anything is encoded; no partial file is ever left under a final name.
    """
    frames = as_frames(frames)
    if options.trim_tail_frames:
        keep = frames.shape[0] - options.trim_tail_frames
        if keep < 1:
            raise ValueError(f"trim_tail_frames={options.trim_tail_frames} would leave {keep} of "
                             f"{frames.shape[0]} frames; at least 1 must remain")
        frames = frames[:keep]
    if frames.shape[0] > 1:
        frames = _pad_to_even(frames)
        fps = _check_fps(fps)
    if options.save_latents and latents is None:
        raise ValueError("OutputOptions.save_latents is set but no latents were passed to save_outputs")
    if latents is not None and not isinstance(latents, torch.Tensor):
        raise TypeError(f"latents must be a torch.Tensor, got {type(latents).__name__}")
    text = metadata_to_json(metadata)
    stem = render_name(options.name_template, now=now or datetime.now(), seed=seed, prompt=prompt,
                       model=model or metadata.get("model"), task=task or metadata.get("task"))
    folder = Path(options.folder)
    _check_stem(stem, folder)
    folder.mkdir(parents=True, exist_ok=True)

    with _temp_files(folder) as make:
        if frames.shape[0] == 1:
            temps = [(make(stem + ".png", lambda p: encode_png(frames[0], p, text)), ".png")]
        else:
            quality = options.video_quality
            temps = [(make(stem + ".mp4", lambda p: encode_mp4(frames, fps, p, quality, text)), ".mp4")]
        if options.sidecar_json:
            temps.append((make(stem + ".json", lambda p: _encode_json(text, p)), ".json"))
        if options.save_latents:
            suffix = ".latents.safetensors"
            temps.append((make(stem + suffix, lambda p: encode_latents(latents, p, text)), suffix))
        return _publish(temps, folder, stem, numbered=True)


# ----------------------------------------------------------------------------------------------
# Reading metadata back


def read_metadata(path: str | os.PathLike) -> dict:
    """The metadata dict embedded by ``save_outputs`` in an .mp4 / .png / .json / .safetensors file.

    Raises FileNotFoundError when the file is missing, ValueError (naming the file) when it holds no
    Wan Studio metadata or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix not in _METADATA_READERS:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (expected "
                         f"{', '.join(sorted(_METADATA_READERS))})")
    reader, where = _METADATA_READERS[suffix]
    try:
        text = reader(path)
    except Exception as e:  # corrupt or foreign file: one clear error type for callers
        raise ValueError(f"{path}: cannot read metadata ({type(e).__name__}: {e})") from e
    if text is None:
        hint = " (a sidecar .json may exist next to it)" if path.with_suffix(".json").is_file() else ""
        raise ValueError(f"{path}: no Wan Studio metadata found (looked for {where}){hint}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {where} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        # ValueError, not TypeError: the file's content is wrong, not an argument
        raise ValueError(f"{path}: {where} holds JSON {type(value).__name__}, expected an object")  # noqa: TRY004
    return value


def _text_of_json(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def _text_of_png(path: Path) -> str | None:
    from PIL import Image
    with Image.open(path) as img:
        return img.text.get(METADATA_KEY)


def _text_of_mp4(path: Path) -> str | None:
    import av
    with av.open(str(path)) as container:
        return container.metadata.get(MP4_METADATA_TAG)


def _text_of_safetensors(path: Path) -> str | None:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return (f.metadata() or {}).get(METADATA_KEY)


_MP4_READER = (_text_of_mp4, f"the '{MP4_METADATA_TAG}' tag")
_METADATA_READERS = {
    ".json": (_text_of_json, "the file's JSON"),
    ".png": (_text_of_png, f"a PNG text chunk '{METADATA_KEY}'"),
    ".mp4": _MP4_READER, ".m4v": _MP4_READER, ".mov": _MP4_READER, ".mkv": _MP4_READER,
    ".safetensors": (_text_of_safetensors, f"the safetensors header key '{METADATA_KEY}'"),
}
