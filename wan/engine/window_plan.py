"""Sliding windows as plain data: how a long clip is cut into windows, which prompt each window
gets, and which window settings a request may ask for (no torch here).

A window is one ordinary generation of ``frames`` (4k+1) frames. Its first ``overlap`` frames are
conditioned on the last frames already made (by the previous window, or by the video a
continuation starts from) and are not written again; its last ``discard`` frames are dropped (the
end of a clip is often the weakest part, Wan2GP's ``sliding_window_discard_last_frames``). So each
window adds ``frames - overlap - discard`` new frames and, as in Wan2GP, a clip of L frames takes

    windows = 1 + ceil((L - size + discard) / (size - discard - overlap))

windows of ``size`` frames. The last window is only as long as it needs to be, rounded up to 4k+1
frames; the few frames of that rounding become extra overlap (more conditioning, nothing wasted)
when enough frames exist before it, else they are discarded at its end. A clip no longer than one
window is one plain run: no overlap, no discard, the very run the same request without windows
makes.

Positions are frames of the written video: a continuation's input frames come first (``prefix``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WINDOW_SEPARATOR = "[/window]"  # splits a prompt into one prompt per window
SEAMS = ("cut", "crossfade")
COLOR_CORRECTIONS = ("off", "mean_std", "histogram")
MAX_OVERLAP_NOISE = 150  # sliding_window_overlap_noise, in thousandths (Wan2GP's settings allow 150)
# tasks whose clip can be made in windows (t2i makes one image; the rest take their last frames as
# conditioning: latents of the overlap, the overlap as known frames for i2v, control frames for VACE)
WINDOW_TASKS = ("t2v", "i2v", "flf2v", "fun_inp", "fun_control", "vace", "v2v", "ti2v")
# tasks a video can be continued with (v2v re-noises a video of its own: not a continuation)
CONTINUE_TASKS = ("t2v", "i2v", "flf2v", "fun_inp", "fun_control", "vace", "ti2v")


@dataclass(frozen=True)
class Window:
    """One window of a run.

    Attributes:
        index: 1-based.
        start: position of its first frame in the written video.
        frames: frames it generates (4k+1).
        overlap: its first frames, conditioned on frames made before (not written again).
        discard: its last frames, dropped.
        prompt: its prompt.
        seed: its noise seed (the run's seed + index - 1).
    """

    index: int
    start: int
    frames: int
    overlap: int
    discard: int
    prompt: str
    seed: int

    @property
    def new(self) -> int:
        """Frames this window adds to the video."""
        return self.frames - self.overlap - self.discard

    def to_dict(self) -> dict:
        return {"window": self.index, "start": self.start, "frames": self.frames, "overlap": self.overlap,
                "discard": self.discard, "new": self.new, "prompt": self.prompt, "seed": self.seed}


def round_up_frames(n: int, stride_t: int = 4) -> int:
    """The smallest ``stride_t``·k + 1 frame count >= ``n`` (what the VAE takes)."""
    return 1 + max(0, math.ceil((n - 1) / stride_t)) * stride_t


def window_count(total: int, size: int, overlap: int, discard: int) -> int:
    """Wan2GP's count of windows for ``total`` frames (1 when the clip fits one window)."""
    if size <= 0 or total <= size:
        return 1
    return 1 + math.ceil((total - size + discard) / (size - discard - overlap))


def plan_windows(total: int, size: int, overlap: int, discard: int, *, prompts: list[str] | None = None,
                 seed: int = 0, prefix: int = 0, end_fixed: bool = False, stride_t: int = 4) -> list[Window]:
    """The windows that make ``total`` new frames after ``prefix`` existing ones.

    Args:
        total: new frames to make (the request's ``frames``).
        size: frames per window, 4k+1 (0: no limit, one window).
        overlap, discard: as the request's ``sliding_window_overlap`` / ``..._discard_last_frames``.
        prompts: one per window (the last one repeats when there are fewer; extra ones are unused).
        prefix: frames already there (a continuation's input video): the first window overlaps them.
        end_fixed: the last frame is given (an end image): the last window discards nothing.
    """
    prompts = prompts or [""]
    lone = prefix == 0 and (size <= 0 or total <= size)
    if lone:  # the plain run, exactly
        return [Window(1, 0, total, 0, 0, prompts[0], seed)]
    limit = size if size > 0 else None
    out: list[Window] = []
    done, pos = 0, prefix
    while done < total:
        o, d = min(overlap, pos), discard
        remaining = total - done
        if limit is None or remaining <= limit - o - d:  # the last window: as long as it needs to be
            d = 0 if end_fixed else d
            want = o + remaining + d
            frames = round_up_frames(want, stride_t)
            extra = frames - want
            if pos >= o + extra:
                o += extra
            else:
                d += extra
            new = remaining
        else:
            frames, new = limit, limit - o - d
        if new < 1:
            raise ValueError(f"a window of {size} frames overlapping {o} and discarding {d} makes no new frame")
        index = len(out) + 1
        out.append(Window(index, pos - o, frames, o, d, prompts[min(index, len(prompts)) - 1],
                          (seed + index - 1) % 2**32))
        done, pos = done + new, pos + new
    return out


def window_prompts(prompt: str, windowed: bool) -> list[str]:
    """The prompts of the windows: the parts between ``[/window]`` separators, else (a run in
    several windows) the prompt's non-empty lines, else the whole prompt."""
    if WINDOW_SEPARATOR in prompt:
        return [p.strip() for p in prompt.split(WINDOW_SEPARATOR)]
    if windowed:
        lines = [line.strip() for line in prompt.splitlines() if line.strip()]
        return lines or [prompt]
    return [prompt]


def is_windowed(req) -> bool:
    """Whether a (resolved) request runs through the window runner: sliding windows are set, or a
    video is continued. A single image (one frame, no continuation) never is."""
    return bool(getattr(req, "continue_video", None)) or (getattr(req, "sliding_window_size", 0) > 0
                                                         and (req.frames or 0) > 1)


def check_window_request(req, stride_t: int = 4) -> list[Window]:
    """Refuses window settings that cannot run, naming the field; returns the planned windows
    (with a continuation, as if its video had enough frames to overlap: the run plans again with
    the real count). ``req`` is a resolved request."""
    from wan.engine.request import RequestError
    size, overlap, discard = req.sliding_window_size, req.sliding_window_overlap, req.sliding_window_discard_last_frames
    if size != 0 and (size < 1 + stride_t or (size - 1) % stride_t):
        near = max(1 + stride_t, (size - 1) // stride_t * stride_t + 1)
        raise RequestError("sliding_window_size", size, f"0 (no windows) or {stride_t}k+1 frames of at least "
                                                        f"{1 + stride_t} (5, 9, ... 81 ...); nearest: {near}")
    if overlap < 1:
        raise RequestError("sliding_window_overlap", overlap, "at least 1 frame (Wan2GP's default: 5)")
    if discard < 0:
        raise RequestError("sliding_window_discard_last_frames", discard, "0 or more frames")
    if size and overlap >= size:
        raise RequestError("sliding_window_overlap", overlap,
                           f"fewer frames than the window ({size}): each window must make new frames")
    if size and size - overlap - discard < 1:
        raise RequestError("sliding_window_discard_last_frames", discard,
                           f"at most {size - overlap - 1}: a window of {size} frames overlapping {overlap} must "
                           "keep at least one new frame")
    if req.sliding_window_seam not in SEAMS:
        raise RequestError("sliding_window_seam", req.sliding_window_seam, f"one of: {', '.join(SEAMS)}")
    if req.sliding_window_color_correction not in COLOR_CORRECTIONS:
        raise RequestError("sliding_window_color_correction", req.sliding_window_color_correction,
                           f"one of: {', '.join(COLOR_CORRECTIONS)}")
    strength = req.sliding_window_color_correction_strength
    if not 0.0 <= strength <= 1.0:
        raise RequestError("sliding_window_color_correction_strength", strength, "a number from 0 (off) to 1")
    noise = req.sliding_window_overlap_noise
    if not 0 <= noise <= MAX_OVERLAP_NOISE:
        raise RequestError("sliding_window_overlap_noise", noise,
                           f"a whole number from 0 (off) to {MAX_OVERLAP_NOISE} (thousandths of noise; Wan2GP's "
                           "VACE default: 20)")
    windowed = is_windowed(req)
    if not windowed:
        prompts = window_prompts(req.prompt, False)
        if len(prompts) > 1:
            raise RequestError("prompt", req.prompt, f"one prompt: {WINDOW_SEPARATOR} separates the prompts of "
                                                     "sliding windows (set --sliding_window_size)")
        return [Window(1, 0, req.frames, 0, 0, req.prompt, req.seed)]
    if req.task not in WINDOW_TASKS:
        field = "continue_video" if req.continue_video else "sliding_window_size"
        raise RequestError(field, getattr(req, field), f"a video task ({', '.join(WINDOW_TASKS)}); "
                                                       f"task {req.task} makes one image")
    if req.continue_video and req.task not in CONTINUE_TASKS:
        raise RequestError("continue_video", req.continue_video,
                           f"a task that continues a video ({', '.join(CONTINUE_TASKS)}), not {req.task}")
    if req.continue_video and req.image:
        raise RequestError("image", req.image, "no start image when a video is continued: its last frames "
                                               "start the new ones")
    if req.save_latents:
        raise RequestError("save_latents", True, "false with sliding windows or a continuation (each window has "
                                                 "latents of its own; the video is written window by window)")
    windows = plan_request(req, overlap + stride_t if req.continue_video else 0, stride_t)
    prompts = window_prompts(req.prompt, len(windows) > 1)
    if len(prompts) > 1 and any(not p for p in prompts):
        empty = next(i for i, p in enumerate(prompts, 1) if not p)
        raise RequestError("prompt", req.prompt, f"a prompt for every window ({WINDOW_SEPARATOR} part {empty} "
                                                 "is empty)")
    if len(prompts) > len(windows):
        raise RequestError("prompt", req.prompt,
                           f"at most one prompt per window: {len(prompts)} prompts (one per line, or separated "
                           f"by {WINDOW_SEPARATOR}) for {len(windows)} window(s) of {req.frames} frames; join "
                           "lines that describe one window, or make more frames")
    return windows


def plan_request(req, prefix: int, stride_t: int = 4) -> list[Window]:
    """The windows of a resolved request after ``prefix`` existing frames, each with its prompt
    (:func:`window_prompts`) and seed."""
    args = (req.frames, req.sliding_window_size, req.sliding_window_overlap, req.sliding_window_discard_last_frames)
    kwargs = dict(seed=req.seed, prefix=prefix, end_fixed=bool(req.end_image), stride_t=stride_t)
    count = len(plan_windows(*args, **kwargs))
    return plan_windows(*args, prompts=window_prompts(req.prompt, count > 1), **kwargs)
