"""Reading inputs: images and videos as tensors in [-1, 1], and resizing them.

Pixel values follow the official Wan preprocessing (``TF.to_tensor(img).sub_(0.5).div_(0.5)``):
``x = uint8 / 255`` in float32, then ``(x - 0.5) / 0.5``. Layouts: an image is [3, H, W], a video
[3, T, H, W] (channels first, RGB), both float32. A video is decoded frame by frame and only as far
as the caller asks, each frame transformed (resized) as it comes, so memory follows the job, not the
file; ``probe_video`` reads a video's size, length and rate from its header alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from wan.engine.media_probe import check_file as _check_file
from wan.engine.media_probe import probe_video  # noqa: F401 - re-exported (wan.engine.media)

RESIZE_MODES = ("bicubic", "bilinear", "area", "nearest", "nearest-exact")


def _uint8_to_unit(pixels: np.ndarray) -> torch.Tensor:
    """[..., 3] uint8 -> float32 in [-1, 1] (same layout), with the official order of operations."""
    pixels = np.require(pixels, requirements=("C", "W"))  # Pillow's arrays are read-only: copy those
    return torch.from_numpy(pixels).float().div_(255).sub_(0.5).div_(0.5)


def load_image(path: str | os.PathLike) -> torch.Tensor:
    """Reads an image file -> [3, H, W] float32 RGB in [-1, 1].

    Alpha is dropped (not composited, as the official code's ``convert("RGB")``); palette, grey and
    CMYK images are converted to RGB; 16-bit grey keeps its precision. The EXIF orientation is applied
    (a phone photo comes out as a viewer shows it; the official code ignores the tag).
    Raises FileNotFoundError if missing, ValueError naming the path if unreadable.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = _check_file(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here with its name
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16L", "I;16B", "I"):
                # 16-bit grey: scale from its own range instead of clipping at 255
                # (Pillow opens 16-bit PNGs as "I;16" or, in older versions, "I": 0..65535 either way)
                grey = np.asarray(img, dtype=np.float32) / 65535.0
                unit = torch.from_numpy(np.clip(grey, 0, 1)).sub_(0.5).div_(0.5)
                return unit[None].expand(3, -1, -1).contiguous()
            if img.mode in ("P", "PA"):  # palette with transparency: via RGBA, so PIL does not warn
                img = img.convert("RGBA")
            pixels = np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from e
    return _uint8_to_unit(pixels).permute(2, 0, 1).contiguous()


def load_video(path: str | os.PathLike, max_frames: int | None = None,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Reads a video file (first video stream) -> ([3, T, H, W] float32 RGB in [-1, 1], fps).

    Frames are decoded one at a time and decoding stops after ``max_frames``, so memory is bounded
    by what the caller keeps, not by the file: a 240-frame 720p clip is 2.7 GB once in float32.

    Args:
        max_frames: stop after this many frames (None: all). The result is allocated once, for
            ``max_frames`` frames of the first frame's (transformed) size.
        transform: applied to each frame as it is decoded, ``[3, 1, H, W] -> [3, 1, h, w]`` (a resize
            to the output size), so only its result is kept. Resizing frame by frame equals resizing
            the clip: interpolation never mixes frames.
    Raises FileNotFoundError if missing, ValueError naming the path if it is not a readable video.
    """
    import av

    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, int)
                                   or max_frames < 1):
        raise ValueError(f"max_frames must be None or an integer >= 1, got {max_frames!r}")
    path = _check_file(path)
    kept: list = []  # uint8 [H, W, 3] frames, or transformed [3, 1, h, w] ones
    out, count, size = None, 0, None  # with max_frames: the result, filled frame by frame
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            for frame in container.decode(stream):
                if size is None:
                    size = (frame.width, frame.height)
                elif (frame.width, frame.height) != size:  # checked before converting it
                    raise ValueError(f"{path}: the frame size changes within the video "
                                     f"({size[0]}x{size[1]}, then {frame.width}x{frame.height} at frame {count})")
                pixels = frame.to_ndarray(format="rgb24")
                if max_frames is None and transform is None:
                    kept.append(pixels)  # stays uint8 until the end: a quarter of the float size
                else:
                    unit = _uint8_to_unit(pixels.transpose(2, 0, 1))[:, None]  # [3, 1, H, W], contiguous
                    unit = transform(unit) if transform is not None else unit
                    if max_frames is None:
                        kept.append(unit)
                    else:
                        if out is None:
                            out = torch.empty(3, max_frames, *unit.shape[-2:], dtype=unit.dtype)
                        out[:, count] = unit[:, 0]
                count += 1
                if max_frames is not None and count >= max_frames:
                    break
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e})") from e
    if not count:
        raise ValueError(f"{path}: the video has no decodable frames")
    if not rate:
        raise ValueError(f"{path}: the video stream has no frame rate")
    if out is not None:
        video = out if count == max_frames else out[:, :count].contiguous()
    elif transform is not None:
        video = torch.cat(kept, dim=1)
    else:
        video = _uint8_to_unit(np.stack(kept)).permute(3, 0, 1, 2).contiguous()
    return video, float(rate)


def resize_video(video: torch.Tensor, height: int, width: int, mode: str = "bicubic",
                 antialias: bool = False) -> torch.Tensor:
    """Resizes every frame of [3, T, H, W] (or one image [3, H, W]) to (height, width).

    The defaults (bicubic, no antialias, align_corners=False) are what the official i2v code does to
    its input image, so the result matches it; bicubic may overshoot [-1, 1] slightly, as there.
    ``antialias=True`` (bilinear/bicubic) is kinder to strong downscales; "area" averages.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"mode must be one of {RESIZE_MODES}, got {mode!r}")
    if not isinstance(video, torch.Tensor) or video.ndim not in (3, 4) or video.shape[0] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise ValueError(f"resize_video expects [3, T, H, W] or [3, H, W], got {shape}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"height and width must be >= 1, got {height}x{width}")
    if antialias and mode not in ("bilinear", "bicubic"):
        raise ValueError(f"antialias applies to bilinear and bicubic only, not {mode!r}")
    image = video.ndim == 3
    frames = (video[:, None] if image else video).transpose(0, 1)  # [T, 3, H, W]
    if not frames.is_floating_point():
        raise ValueError(f"resize_video expects a float tensor, got {video.dtype}")
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    if mode in ("bilinear", "bicubic"):
        kwargs["antialias"] = antialias
    out = F.interpolate(frames, size=(int(height), int(width)), mode=mode, **kwargs).transpose(0, 1)
    return out[:, 0].contiguous() if image else out.contiguous()
