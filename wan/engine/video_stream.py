"""Videos a window at a time: one MP4 written as its frames come, and parts of input videos read
without holding the rest.

:class:`StreamingVideo` is ``save_outputs`` for a video whose frames arrive in pieces (the windows
of a long clip): ffmpeg runs from the first piece to the last with the same settings as every other
MP4 of the engine (``media_out.mp4_command``), into a dot-temp file of the output folder; ``finish``
gives it (and the sidecar ``.json``) its final, never-overwriting name the way ``save_outputs``
does; ``abort`` (or an error) leaves nothing under a final name. Memory holds one piece at a time.

:func:`read_frames` decodes frames ``start .. start + count`` of a video, each fitted to the output
size as it comes, and :func:`iter_frames` yields a video's frames as uint8 one by one: a window
reads its part of a long control or input video, a continuation copies its input, and neither
keeps more than it needs.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from wan.engine.media_in import _uint8_to_unit
from wan.engine.media_out import (
    OutputOptions,
    _check_fps,
    _check_stem,
    _encode_json,
    _fsync_file,
    _publish,
    _unlink_quiet,
    as_frames,
    metadata_to_json,
    mp4_command,
    render_name,
)


class StreamingVideo:
    """One MP4 (plus its sidecar ``.json``) written piece by piece; see the module's text.

    ``limit``: frames kept in all (later ones are dropped: the request's ``trim_tail``).
    """

    def __init__(self, options: OutputOptions, fps, metadata: dict, size: tuple[int, int], *, seed: int,
                 prompt: str, model: str | None = None, task: str | None = None, limit: int | None = None,
                 now: datetime | None = None):
        self.options, self.fps, self.limit = options, _check_fps(fps), limit
        self.width, self.height = size
        if self.width % 2 or self.height % 2:
            raise ValueError(f"a video written window by window needs an even size, got {self.width}x{self.height}")
        self.text = metadata_to_json(metadata)
        self.stem = render_name(options.name_template, now=now or datetime.now(), seed=seed, prompt=prompt,
                                model=model or metadata.get("model"), task=task or metadata.get("task"))
        self.folder = Path(options.folder)
        _check_stem(self.stem, self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self._temps: list[Path] = []
        self._meta_dir = tempfile.TemporaryDirectory(prefix="wan_ffmeta_")
        self._err = tempfile.TemporaryFile()
        self._video = self._temp(self.stem + ".mp4")
        cmd = mp4_command(self.width, self.height, self.fps, self._video, options.video_quality, self.text,
                          Path(self._meta_dir.name))
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._err)

    def _temp(self, final_name: str) -> Path:
        temp = self.folder / f".{final_name}.{secrets.token_hex(6)}.tmp"
        os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        self._temps.append(temp)
        return temp

    def write(self, frames) -> None:
        """Appends frames ``[T, H, W, 3]`` uint8 of the video's size."""
        frames = as_frames(frames)
        if frames.shape[1:3] != (self.height, self.width):
            raise ValueError(f"frames of {frames.shape[2]}x{frames.shape[1]} for a video of {self.width}x{self.height}")
        if self.limit is not None:
            frames = frames[:max(0, self.limit - self.written)]
        try:
            for frame in frames:
                self._proc.stdin.write(memoryview(np.ascontiguousarray(frame)).cast("B"))
        except BrokenPipeError:
            self._fail()
        self.written += frames.shape[0]

    def finish(self) -> list[Path]:
        """Closes the video and publishes ``<name>.mp4`` (and ``<name>.json``); returns the paths."""
        try:
            if self.written == 0:
                raise ValueError("no frames were written")
            self._proc.stdin.close()
            if self._proc.wait() != 0:
                self._fail()
            _fsync_file(self._video)
            temps = [(self._video, ".mp4")]
            if self.options.sidecar_json:
                sidecar = self._temp(self.stem + ".json")
                _encode_json(self.text, sidecar)
                _fsync_file(sidecar)
                temps.append((sidecar, ".json"))
            return _publish(temps, self.folder, self.stem, numbered=True)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stops ffmpeg and removes the temp files (nothing is left under a final name)."""
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        for temp in self._temps:
            _unlink_quiet(temp)
        self._temps.clear()
        self._err.close()
        self._meta_dir.cleanup()

    def _fail(self) -> None:
        self._proc.wait()
        self._err.seek(0)
        message = self._err.read().decode("utf-8", "replace").strip()[-2000:]
        raise RuntimeError(f"ffmpeg failed (exit {self._proc.returncode}) writing {self._video}: "
                           f"{message or 'no message'}")

    def __enter__(self) -> "StreamingVideo":
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def iter_frames(path: str | os.PathLike) -> Iterator[np.ndarray]:
    """The frames ``[H, W, 3]`` uint8 RGB of a video file, one at a time (ValueError naming the file
    when it cannot be read)."""
    import av
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            for frame in container.decode(container.streams.video[0]):
                yield frame.to_ndarray(format="rgb24")
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e})") from e


def count_frames(path: str | os.PathLike) -> int:
    """Frames of a video file, by decoding it (exact, whatever its header says)."""
    return sum(1 for _ in iter_frames(path))


def read_frames(path: str | os.PathLike, start: int, count: int,
                fit: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Frames ``start .. start + count`` of a video as ``[3, count, h, w]`` in [-1, 1], each passed
    through ``fit`` (``[3, 1, H, W] -> [3, 1, h, w]``) as it is decoded. A video that ends early
    gives fewer frames (the caller says what it needed)."""
    kept = []
    for i, pixels in enumerate(iter_frames(path)):
        if i >= start + count:
            break
        if i >= start:
            kept.append(fit(_uint8_to_unit(pixels.transpose(2, 0, 1))[:, None]))
    if not kept:
        return torch.empty(3, 0, 0, 0)
    return torch.cat(kept, dim=1)
