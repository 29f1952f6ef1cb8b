"""The pixels of a dataset item as musubi-tuner reads them for caching: uint8 RGB frames, resized and
centre-cropped to the item's bucket, before they become [-1, 1] tensors.

Read from musubi's ``dataset/media_utils.py`` (``resize_image_to_bucket``, ``load_video``) and
``dataset/datasources.py``:

- An image is opened with Pillow as stored (no EXIF rotation); a mode other than RGB or RGBA is
  converted to RGB; an alpha channel is dropped after resizing (``cache_latents.encode_datasets``).
- Resizing follows :func:`wan.train.buckets.resize_plan`: scale so the item covers the bucket, each
  side ``int(side * scale + 0.5)``; Lanczos (Pillow) when the scale is above 1, else OpenCV's
  ``INTER_AREA`` (reproduced here in numpy: OpenCV is not a dependency); then the centre crop with
  the offsets rounded down. An item already at its bucket size is left as it is.
- A video is decoded with PyAV (``frame.to_image()``: RGB), a folder of frames is its images in
  sorted order (each converted to RGB). The bucket comes from the first frame and every frame is
  resized to it as it is read. With ``source_fps`` frames are dropped to reach 16 fps (see
  :func:`wan.train.frames.kept_frame_indices`); ``end`` stops at that index (``head`` extraction
  reads only the frames it needs).

These are the pixels both musubi and we encode, so that a cache made by either matches.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator

import numpy as np

from wan.train.buckets import resize_plan
from wan.train.frames import WAN_FPS

Size = tuple[int, int]  # (width, height)


# ----------------------------------------------------------------------------- images


def open_image(path: str | os.PathLike):
    """A Pillow image of ``path`` in RGB or RGBA, as musubi opens dataset images. Raises ValueError
    naming the path when it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None
    return image if image.mode in ("RGB", "RGBA") else image.convert("RGB")


def read_image(path: str | os.PathLike, bucket: Size) -> tuple[np.ndarray, Size]:
    """(pixels [H, W, 3] uint8 at ``bucket``, the image's own (width, height))."""
    image = open_image(path)
    return rgb(resize_to_bucket(image, bucket)), image.size


def rgb(pixels: np.ndarray) -> np.ndarray:
    """The three colour channels of [H, W, 3 or 4] pixels (musubi drops alpha, never composites it)."""
    return pixels[..., :3] if pixels.shape[-1] == 4 else pixels


# ----------------------------------------------------------------------------- resizing


def resize_to_bucket(image, bucket: Size) -> np.ndarray:
    """musubi's ``resize_image_to_bucket``: a Pillow image or an [H, W, C] uint8 array -> an [h, w, C]
    uint8 array of exactly ``bucket`` (width, height)."""
    from PIL import Image

    is_pil = isinstance(image, Image.Image)
    size = image.size if is_pil else (image.shape[1], image.shape[0])
    if tuple(size) == tuple(bucket):
        return np.array(image) if is_pil else image
    plan = resize_plan(size, bucket)
    if plan.upscale:
        pil = image if is_pil else Image.fromarray(image)
        scaled = np.array(pil.resize(plan.scaled, Image.LANCZOS))
    else:
        scaled = area_resize(np.array(image) if is_pil else image, plan.scaled)
    left, top, right, bottom = plan.crop
    return scaled[top:bottom, left:right]


def area_resize(pixels: np.ndarray, size: Size) -> np.ndarray:
    """OpenCV's ``cv2.resize(pixels, size, interpolation=cv2.INTER_AREA)`` for a shrink (or the same
    size) of [H, W] or [H, W, C] uint8 pixels: each output pixel averages the input area it covers.

    OpenCV has two paths, kept apart here so that the rounding matches too: whole-number factors on
    both axes average blocks (2x2 rounds half up, as its vector code does; other factors round half
    to even); other factors weigh partly covered pixels by their overlap, summed in float32 along
    rows then columns in OpenCV's order, rounded half to even. Byte-equal to OpenCV 5.1 on 1,500
    random shrinks (1 to 4 channels, factors 1 to 5, whole and not) when this was written."""
    height, width = pixels.shape[:2]
    if (width, height) == tuple(size):
        return pixels.copy()
    if size[0] > width or size[1] > height:
        raise ValueError(f"area_resize shrinks only: {width}x{height} -> {size[0]}x{size[1]}")
    scale_x, scale_y = width / size[0], height / size[1]
    data = pixels if pixels.ndim == 3 else pixels[..., None]
    fx, fy = round(scale_x), round(scale_y)
    if abs(scale_x - fx) < np.finfo(float).eps and abs(scale_y - fy) < np.finfo(float).eps:
        out = _area_blocks(data, fx, fy, size)
    else:
        # rows first, then columns, each a float32 sum in source order, as OpenCV's resizeArea runs
        rows = _area_pass(data.astype(np.float32), _area_taps(width, size[0], scale_x), axis=1)
        summed = _area_pass(rows, _area_taps(height, size[1], scale_y), axis=0)
        out = np.clip(np.rint(summed), 0, 255).astype(np.uint8)
    return out if pixels.ndim == 3 else out[..., 0]


def _area_blocks(data: np.ndarray, fx: int, fy: int, size: Size) -> np.ndarray:
    """Whole-number shrink: the mean of each fy x fx block (OpenCV's ``resizeAreaFast``)."""
    w, h = size
    blocks = data[:h * fy, :w * fx].astype(np.int32).reshape(h, fy, w, fx, data.shape[2])
    total = blocks.sum(axis=(1, 3))
    if fx == 2 and fy == 2:
        return ((total + 2) >> 2).astype(np.uint8)
    return np.clip(np.rint(total * np.float32(1.0 / (fx * fy))), 0, 255).astype(np.uint8)


def _area_taps(source: int, target: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """(source indices, float32 weights), each [taps, target], of OpenCV's ``computeResizeAreaTab``
    along one axis, in source order; unused taps have weight 0 (adding 0.0 leaves a sum unchanged)."""
    taps: list[list[tuple[int, float]]] = []
    for d in range(target):
        f1 = d * scale
        f2 = f1 + scale
        cell = min(scale, source - f1)
        s1, s2 = math.ceil(f1), math.floor(f2)
        s2 = min(s2, source - 1)
        s1 = min(s1, s2)
        row = []
        if s1 - f1 > 1e-3:
            row.append((s1 - 1, (s1 - f1) / cell))
        row += [(s, 1.0 / cell) for s in range(s1, s2)]
        if f2 - s2 > 1e-3:
            row.append((s2, min(min(f2 - s2, 1.0), cell) / cell))
        taps.append(row)
    count = max(len(row) for row in taps)
    index = np.zeros((count, target), dtype=np.int64)
    weight = np.zeros((count, target), dtype=np.float32)
    for d, row in enumerate(taps):
        for t, (s, w) in enumerate(row):
            index[t, d], weight[t, d] = s, w
    return index, weight


def _area_pass(data: np.ndarray, taps: tuple[np.ndarray, np.ndarray], axis: int) -> np.ndarray:
    """One axis of the area resize: for each output position the float32 sum, tap by tap."""
    index, weight = taps
    shape = [1] * data.ndim
    shape[axis] = index.shape[1]
    total = None
    for t in range(index.shape[0]):
        term = np.take(data, index[t], axis=axis) * weight[t].reshape(shape)
        total = term if total is None else total + term
    return total


# ----------------------------------------------------------------------------- videos


def target_indices(source_fps: float | None, target_fps: float = WAN_FPS) -> Iterator[int | None]:
    """For each source frame in turn, its index on the target-rate timeline, or None when the frame
    is dropped (musubi's ``load_video``; the same rule as :func:`wan.train.frames.kept_frame_indices`)."""
    if source_fps is None:
        index = 0
        while True:
            yield index
            index += 1
    delta, position, previous = target_fps / source_fps, 0.0, -1
    while True:
        index = int(position)
        position += delta
        if index == previous:
            yield None
        else:
            previous = index
            yield index


def read_video_frames(path: str | os.PathLike, bucket_of: Callable[[Size], Size], end: int | None = None,
                      source_fps: float | None = None, target_fps: float = WAN_FPS) -> tuple[list[np.ndarray], Size]:
    """(frames [H, W, 3] uint8 resized to the bucket of the first frame, that bucket) of a video file
    or a folder of frames, as musubi's ``load_video``: frames dropped for ``source_fps``, reading
    stopped at ``end`` (an index on the target timeline). Raises ValueError naming the path."""
    frames: list[np.ndarray] = []
    bucket: Size | None = None
    indices = target_indices(source_fps, target_fps)
    for image in _decoded(path):
        index = next(indices)
        if index is None:
            continue
        if end is not None and index >= end:
            break
        if bucket is None:
            bucket = tuple(bucket_of(image.size))
        frames.append(rgb(resize_to_bucket(image, bucket)))
    if not frames:
        raise ValueError(f"{path}: no frame could be read")
    return frames, bucket


def _decoded(path: str | os.PathLike) -> Iterator:
    """Pillow RGB images of each frame, in order, decoded one at a time."""
    if os.path.isdir(path):
        from wan.train.dataset_items import IMAGE_EXTENSIONS, media_files
        for name in media_files(path, IMAGE_EXTENSIONS):
            yield open_image(name).convert("RGB")
        return
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: has no video stream")
            for frame in container.decode(video=0):
                yield frame.to_image()
    except (av.error.FFmpegError, OSError) as e:
        raise ValueError(f"{path}: cannot read the video ({type(e).__name__}: {e})") from e


def fit_length(frames: list[np.ndarray], count: int) -> list[np.ndarray]:
    """A control video cut or padded to ``count`` frames: musubi repeats the last frame of a short one."""
    return frames[:count] if len(frames) >= count else frames + [frames[-1]] * (count - len(frames))
