"""What an input file is, from its header alone: an image's size, a video's size, length and rate.

Cheap whatever the file's size and free of torch, so that a request's input files are checked when
it is submitted (``resolve_request``), before a job is queued or anything is decoded.
"""

from __future__ import annotations

import os
from pathlib import Path


def check_file(path) -> Path:
    """``path`` as a Path when it is an existing file; FileNotFoundError or ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    return path


def probe_image(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image, from its header (Pillow opens lazily: no pixel is decoded).
    Raises ValueError naming the path and the reason."""
    from PIL import Image, UnidentifiedImageError
    try:
        path = check_file(path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    try:
        with Image.open(path) as img:
            return int(img.width), int(img.height)
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def probe_video(path: str | os.PathLike) -> tuple[int, int, int | None, float]:
    """(width, height, frame count or None, fps) of a video's first video stream, from the container
    and stream headers: no frame is converted or kept, so it is cheap whatever the file's size
    (a check before a job is queued).

    The size is the coded frame size (what ``load_video`` decodes; a rotation tag is not applied).
    The frame count is the stream's own count where the container stores one (MP4, MOV), else its
    duration times the frame rate rounded (WebM, MKV), else None.
    Raises ValueError naming the path and the reason for any file it cannot use: missing, not a
    file, not a video, no video stream, no frame size or no frame rate in the header.
    """
    import av

    try:
        path = check_file(path)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = stream.frames or None
            if frames is None and rate:
                seconds = None
                if stream.duration and stream.time_base:
                    seconds = float(stream.duration * stream.time_base)
                elif container.duration:
                    seconds = container.duration / av.time_base
                frames = round(seconds * float(rate)) if seconds and seconds > 0 else None
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e})") from e
    if not width or not height:
        raise ValueError(f"{path}: the video stream has no frame size in its header")
    if not rate:
        raise ValueError(f"{path}: the video stream has no frame rate")
    return int(width), int(height), frames, float(rate)
