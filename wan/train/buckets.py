"""Aspect-ratio buckets: the size an image or a video is resized and cropped to before it is encoded,
computed as musubi-tuner's ``BucketSelector`` (``dataset/bucket.py``) does for Wan, so that our cache
files and batches match the ones musubi makes.

Sizes are (width, height) everywhere, as in musubi. The rules, read from its source:

- With ``enable_bucket``, the buckets all have about the area of the configured resolution: for
  each width ``w`` stepping by 16 from ``sqrt(area) // 2`` (rounded down to 16) while
  ``w < sqrt(area) + 16``, the height is ``area // w`` rounded down to 16; both ``(w, h)`` and
  ``(h, w)`` are buckets. An item goes to the bucket whose width/height ratio is nearest to its
  own; on a tie, the first bucket in sorted (width, height) order.
- With ``bucket_no_upscale`` (only with ``enable_bucket``), an item no larger in area than the
  resolution keeps its own size, each side rounded down to 16.
- Without ``enable_bucket`` there is one bucket, the resolution itself (not rounded to 16).
- The item is then scaled so that it covers the bucket (the larger of the two scales, sides
  rounded to the nearest pixel) and centre-cropped to it (:func:`resize_plan`).

musubi builds the selector for *video caching* with bucketing always on and no_upscale off,
whatever the dataset says (see :func:`video_bucket_selector`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESO_STEP = 16  # Wan: 8x VAE downscale times the 2x2 patch


def round_down(value: int, step: int = RESO_STEP) -> int:
    """``value`` rounded down to a multiple of ``step`` (musubi's ``divisible_by``)."""
    return value - value % step


def bucket_sizes(resolution: tuple[int, int], step: int = RESO_STEP) -> tuple[tuple[int, int], ...]:
    """Every bucket of ``resolution`` (width, height) when bucketing is on, sorted."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area))  # musubi's float form, kept so that the edge cases match too
    sizes = set()
    for w in range(round_down(side // 2, step), side + step, step):
        h = round_down(area // w, step) if w else 0
        if h:  # zero only for resolutions under 2 steps a side, where musubi divides by zero
            sizes.add((w, h))
            sizes.add((h, w))
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class BucketSelector:
    """Picks the bucket of an item's size for one dataset (resolution and bucket flags)."""

    resolution: tuple[int, int]
    enable_bucket: bool = True
    no_upscale: bool = False
    step: int = RESO_STEP

    def __post_init__(self) -> None:
        # musubi ignores no_upscale when bucketing is off (BaseDataset and BucketSelector both do)
        if not self.enable_bucket:
            object.__setattr__(self, "no_upscale", False)

    @property
    def area(self) -> int:
        return self.resolution[0] * self.resolution[1]

    @property
    def sizes(self) -> tuple[tuple[int, int], ...]:
        """The buckets: the resolution alone without bucketing, else :func:`bucket_sizes`."""
        return bucket_sizes(self.resolution, self.step) if self.enable_bucket else (tuple(self.resolution),)

    def bucket(self, size: tuple[int, int]) -> tuple[int, int]:
        """The bucket (width, height) an item of ``size`` (width, height) is resized and cropped to."""
        width, height = size
        if self.no_upscale and width * height <= self.area:
            return round_down(width, self.step), round_down(height, self.step)
        return nearest_aspect(self.sizes, width / height)


def nearest_aspect(sizes: tuple[tuple[int, int], ...], aspect: float) -> tuple[int, int]:
    """The size whose width/height is nearest to ``aspect``; the first one on a tie (numpy's argmin)."""
    best, best_error = sizes[0], math.inf
    for w, h in sizes:
        error = abs(w / h - aspect)
        if error < best_error:
            best, best_error = (w, h), error
    return best


def image_bucket_selector(resolution: tuple[int, int], enable_bucket: bool, no_upscale: bool) -> BucketSelector:
    """The selector musubi uses for an image dataset: the dataset's own flags."""
    return BucketSelector(tuple(resolution), enable_bucket, no_upscale)


def video_bucket_selector(resolution: tuple[int, int]) -> BucketSelector:
    """The selector musubi uses when it caches a video dataset's latents: ``BucketSelector(resolution)``
    with its defaults, i.e. bucketing on and no_upscale off, whatever ``enable_bucket`` and
    ``bucket_no_upscale`` say (they only group cached items into batches when training)."""
    return BucketSelector(tuple(resolution), True, False)


def area_bucket(size: tuple[int, int], resolution: tuple[int, int], step: int = RESO_STEP) -> tuple[int, int]:
    """musubi's ``calculate_bucket_resolution``, used for control images with ``control_resolution``:
    a size of about the resolution's area with the aspect of ``size``. Starting from the exact
    sides rounded down to ``step``, it tries widths two steps either way (height = area // width,
    rounded down) and keeps the nearest aspect ratio; the first one on a tie. Widths or heights of
    zero are skipped (musubi would divide by zero there)."""
    area = resolution[0] * resolution[1]
    width, height = size
    aspect = width / height
    base_w = round_down(int(math.sqrt(area * aspect)), step)
    base_h = round_down(int(math.sqrt(area / aspect)), step)
    best, best_error = None, math.inf
    for i in range(-2, 3):
        w = base_w + i * step
        h = round_down(area // w, step) if w > 0 else 0
        if h <= 0:
            continue
        error = abs(w / h - aspect)
        if error < best_error:
            best, best_error = (w, h), error
    return best if best is not None else (base_w, base_h)


def control_size(size: tuple[int, int], bucket: tuple[int, int], no_resize_control: bool,
                 control_resolution: tuple[int, int] | None, step: int = RESO_STEP) -> tuple[int, int]:
    """The size a control image of ``size`` is resized and cropped to, in an image dataset whose
    item went to ``bucket`` (musubi's ``ImageDataset.retrieve_latent_cache_batches``):

    - neither option: the item's bucket;
    - ``control_resolution`` alone: :func:`area_bucket` of the control at that resolution;
    - ``no_resize_control`` alone: its own size, sides rounded down to ``step``;
    - both: its own size (not rounded) unless its area exceeds ``control_resolution``'s, then
      :func:`area_bucket`.

    Control videos (video datasets) always go to the item's bucket.
    """
    width, height = size
    if no_resize_control:
        if control_resolution is None:
            return round_down(width, step), round_down(height, step)
        if width * height > control_resolution[0] * control_resolution[1]:
            return area_bucket(size, control_resolution, step)
        return width, height
    if control_resolution is not None:
        return area_bucket(size, control_resolution, step)
    return tuple(bucket)


@dataclass(frozen=True)
class ResizePlan:
    """How an item becomes its bucket: scaled to ``scaled`` (width, height), then the box
    (left, top, right, bottom) is cropped out of the centre."""

    scaled: tuple[int, int]
    crop: tuple[int, int, int, int]
    upscale: bool


def resize_plan(size: tuple[int, int], bucket: tuple[int, int]) -> ResizePlan:
    """musubi's ``resize_image_to_bucket`` without the pixels: the item is scaled by the larger of
    bucket/size along each side (so it covers the bucket), each side ``int(side * scale + 0.5)``,
    then centre-cropped with the offsets rounded down. It upscales with Lanczos when the scale is
    above 1, else downscales with area averaging; an item already at the bucket size is unchanged."""
    width, height = size
    if tuple(size) == tuple(bucket):
        return ResizePlan(tuple(size), (0, 0, width, height), False)
    scale = max(bucket[0] / width, bucket[1] / height)
    scaled_w, scaled_h = int(width * scale + 0.5), int(height * scale + 0.5)
    left, top = (scaled_w - bucket[0]) // 2, (scaled_h - bucket[1]) // 2
    return ResizePlan((scaled_w, scaled_h), (left, top, left + bucket[0], top + bucket[1]), scale > 1)
