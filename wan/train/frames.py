"""Which frames of a video become training items: musubi-tuner's frame extraction, as pure functions
of frame counts (no decoding).

Read from musubi's ``VideoDataset`` (``dataset/image_video_dataset.py``) and ``load_video``
(``dataset/media_utils.py``):

- ``target_frames`` are de-duplicated, sorted and each rounded down to 4N+1 (:func:`normalise_target_frames`).
- With ``source_fps``, frames are dropped to reach Wan's 16 fps before anything else
  (:func:`kept_frame_indices`); without it every frame is used whatever the video's rate.
- In ``head`` mode musubi only loads frames below ``max(target_frames)`` (:func:`loaded_frame_count`).
- The windows, each (start, frame count), come from :func:`frame_windows`.
"""

from __future__ import annotations

import numpy as np

WAN_FPS = 16.0
VAE_FRAME_STRIDE = 4  # the VAE packs 4 frames per latent after the first: lengths are 4N+1
FRAME_EXTRACTIONS = ("head", "chunk", "slide", "uniform", "full")


def round_to_4n1(frames: int) -> int:
    """``frames`` rounded down to the nearest 4N+1 (1, 5, 9, ...)."""
    return (frames - 1) // VAE_FRAME_STRIDE * VAE_FRAME_STRIDE + 1


def normalise_target_frames(values) -> tuple[int, ...]:
    """musubi's target_frames: unique values, sorted, each rounded down to 4N+1, unique again."""
    return tuple(sorted({round_to_4n1(v) for v in values}))


def effective_extraction(mode: str, frame_sample: int) -> str:
    """``uniform`` with one sample is ``head`` (musubi switches the mode, with a warning)."""
    return "head" if mode == "uniform" and frame_sample == 1 else mode


def kept_frame_indices(frame_count: int, source_fps: float | None, target_fps: float = WAN_FPS) -> list[int]:
    """For each source frame musubi keeps, its index on the target-rate timeline, in order.

    Without ``source_fps`` every frame is kept at its own index. With it, frame i gets the index
    ``int(t)`` where t starts at 0 and grows by target_fps / source_fps per source frame (summed
    step by step in floating point, as musubi does, so rounding matches); a frame whose index
    equals the previous kept frame's is dropped. From 30 fps to 16 this keeps 16 frames of 30;
    from a rate below 16 no frame is dropped but indices skip.
    """
    if source_fps is None:
        return list(range(frame_count))
    delta = target_fps / source_fps
    kept, position, previous = [], 0.0, -1
    for _ in range(frame_count):
        index = int(position)
        position += delta
        if index != previous:
            kept.append(index)
            previous = index
    return kept


def loaded_frame_count(frame_count: int, source_fps: float | None, end_frame: int | None = None,
                       target_fps: float = WAN_FPS) -> int:
    """How many frames musubi's ``load_video`` returns for a video (or folder of frames) of
    ``frame_count`` frames: after dropping frames for ``source_fps``, those whose index is below
    ``end_frame`` (the source index without ``source_fps``, the target-rate index with it)."""
    indices = kept_frame_indices(frame_count, source_fps, target_fps)
    if end_frame is None:
        return len(indices)
    return sum(1 for i in indices if i < end_frame)  # indices only grow: the same as musubi's break


def frame_windows(frame_count: int, target_frames, mode: str = "head", frame_stride: int = 1,
                  frame_sample: int = 1, max_frames: int = 129) -> list[tuple[int, int]]:
    """The (start, frame count) windows musubi cuts from a video of ``frame_count`` loaded frames,
    in musubi's order, duplicates kept (``uniform`` can repeat a start; the cache file is the same).

    - head: (0, N) for each N that fits.
    - chunk: back-to-back windows (0, N), (N, N), ... that fit whole, for each N.
    - slide: a window every ``frame_stride`` frames, for each N that fits.
    - uniform: ``frame_sample`` starts spread evenly over [0, frame_count - N] (numpy's
      ``linspace`` truncated to integers), for each N that fits.
    - full: (0, min(frame_count, max_frames) rounded down to 4N+1); ``target_frames`` is unused.

    ``target_frames`` should already be normalised (:func:`normalise_target_frames`).
    """
    if frame_count < 1:
        return []
    mode = effective_extraction(mode, frame_sample)
    if mode == "full":
        return [(0, round_to_4n1(min(frame_count, max_frames)))]
    windows: list[tuple[int, int]] = []
    for n in target_frames:
        if mode == "chunk":
            windows += [(i, n) for i in range(0, frame_count, n) if i + n <= frame_count]
        elif n > frame_count:
            continue
        elif mode == "head":
            windows.append((0, n))
        elif mode == "slide":
            windows += [(i, n) for i in range(0, frame_count - n + 1, frame_stride)]
        elif mode == "uniform":
            windows += [(int(i), n) for i in np.linspace(0, frame_count - n, frame_sample, dtype=int)]
        else:
            raise ValueError(f"frame_extraction {mode!r} is not one of {', '.join(FRAME_EXTRACTIONS)}")
    return windows


def video_windows(frame_count: int, target_frames, mode: str = "head", frame_stride: int = 1,
                  frame_sample: int = 1, max_frames: int = 129, source_fps: float | None = None,
                  target_fps: float = WAN_FPS) -> tuple[int, list[tuple[int, int]]]:
    """(frames musubi loads, windows) for a video of ``frame_count`` source frames: the frame-rate
    conversion, the ``head`` mode's early stop at ``max(target_frames)``, then :func:`frame_windows`."""
    mode = effective_extraction(mode, frame_sample)
    end = max(target_frames) if mode == "head" and target_frames else None
    loaded = loaded_frame_count(frame_count, source_fps, end, target_fps)
    return loaded, frame_windows(loaded, target_frames, mode, frame_stride, frame_sample, max_frames)
