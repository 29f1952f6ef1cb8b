"""Sliding windows and video continuation: a clip longer than one run, made window by window.

``Engine.generate`` hands a request here when it sets ``sliding_window_size`` or
``continue_video`` (:func:`wan.engine.window_plan.is_windowed`). The windows are planned by
:mod:`wan.engine.window_plan`; each one is an ordinary run of the engine (``Engine.denoise``: its
LoRAs, step savers, attention and progress), with its own prompt and seed (the run's + index - 1)
and with its first frames conditioned on the last frames already made, as Wan2GP does:

- every task but TI2V: the overlap's latents are *kept*: the first latent frames of the window
  are, at every step, the VAE latents of the overlap frames noised to that step's noise level
  (``Conditioning.keep``, :class:`~wan.engine.conditioning.KeptLatent`), so the window's motion
  continues from them. The VAE folds 4 frames per latent frame after the first, so an overlap of
  4k+1 frames is kept whole (Wan2GP's default overlap is 5); of any other overlap, its first 4k+1;
- VACE, besides: the overlap frames are the first frames of the window's control video, with a
  mask that keeps them; the rest of the control (and mask) video is the user's, at the window's
  position (or none). ``sliding_window_overlap_noise`` (Wan2GP's) blends fresh noise into those
  control latents at every step (:class:`~wan.engine.conditioning.OverlapNoise`);
- i2v / flf2v / Fun InP: the overlap frames are the window's known frames (the ``y`` mask marks
  them, CLIP sees the last of them): with an overlap of 1, the previous window's last frame is the
  next one's start image. The end image applies to the last window only;
- Fun Control, v2v: the window reads its part of the control video / input video;
- TI2V: its own mechanism: the overlap latents are fixed clean, their tokens at timestep 0;
- t2v: the kept latents alone condition it (Wan2GP runs t2v windows the same way).

Each window is decoded, its colours matched to the reference window (:mod:`wan.engine.color_match`:
the first window, or the frames a continuation starts from), its last ``discard`` frames dropped,
and joined at the seam: ``cut`` keeps the frames already made and drops the window's overlap;
``crossfade`` blends the overlap linearly from the old frames to the new ones. Its frames are then
written to the one output file (:class:`~wan.engine.video_stream.StreamingVideo`) before the next
window starts: memory holds one window and its overlap, whatever the number of windows.

Continuation: the input video's frames are written first as they are (resized to the output size
if they differ) and its last frames are the overlap of the first window; the seam with the input
is always a cut, so the input's frames reach the output unchanged (up to the video codec).

The metadata holds the request (every window setting, the prompt with its window separators, the
continued video's path), so ``--from_output`` rebuilds the whole run, and, for reading, the plan
(``windows``) and the continued video (``continued_from``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from wan.engine.color_match import ColorStats, match_colors
from wan.engine.conditioning import (
    Conditioning,
    Inputs,
    KeptLatent,
    OverlapNoise,
    build_conditioning,
    center_crop_resize,
    latent_shape,
    max_area_size,
    resize,
    resize_cover,
)
from wan.engine.loop import StepInfo
from wan.engine.request import GenerationRequest, RequestError
from wan.engine.window_plan import Window, plan_request

I2V_TASKS = ("i2v", "flf2v", "fun_inp")


def run_windows(engine, req: GenerationRequest, spec, nets, profile, savers, loras, progress, cancel,
                write: bool, notices: list[str]):
    """Makes the windowed (or continued) video of the resolved ``req`` with the loaded ``nets``;
    returns the engine's ``GenerationResult``. ``progress`` gets each step with its window."""
    from wan.engine.engine import GenerationResult, _check_cancel, draw_noise, vae_tiling
    device, stride = engine.device, spec.vae.stride
    source = _Continued(req.continue_video) if req.continue_video else None
    windows = plan_request(req, source.frames if source else 0, stride[0])
    n = len(windows)
    size = _continued_size(req, spec, source) if source else None
    metadata = engine.metadata(req, nets)
    metadata["windows"] = [w.to_dict() for w in windows]
    if source:
        metadata["continued_from"] = {"path": str(req.continue_video), "frames": source.frames}
    total = (source.frames if source else 0) + req.frames
    out = _Output(req, spec, metadata, total - req.trim_tail, write, first_prompt=windows[0].prompt)
    keep_frames = req.sliding_window_overlap + stride[0]  # the last frames a window may overlap
    timeline = _Timeline(out, keep_frames)
    mode, strength = req.sliding_window_color_correction, req.sliding_window_color_correction_strength
    correct = mode != "off" and strength > 0
    reference: ColorStats | None = None
    steps: list[StepInfo] = []
    latent = lone_video = None
    try:
        if source:
            out.open(size)
            seed_frames = timeline.add_input(source, size)
            reference = ColorStats.of(seed_frames) if correct else None
        for w in windows:
            _check_cancel(cancel, f"before window {w.index} of {n}")
            last = w.index == n
            req_w = _window_request(req, w, last=last, size=size)
            cond = noise = None
            if w.overlap:
                cond = window_conditioning(req_w, spec, nets, device, w, timeline.last(w.overlap), size, source)
                noise = draw_noise(cond.noise_shape, w.seed, device, req.cpu_noise)
                if cond.keep is not None:
                    cond.keep.noise = noise[:, cond.keep.offset:cond.keep.offset + cond.keep.latent.shape[1]]
            elif req.task in I2V_TASKS and n > 1:
                cond = _pad_clip(build_conditioning(req_w, spec, nets, device), nets)
            latent, cond = engine.denoise(req_w, nets, noise=noise, cond=cond,
                                          progress=_window_progress(progress, steps, w, n), cancel=cancel,
                                          savers=savers, loras=loras,
                                          attention=profile.attention if profile else ("sdpa",), notices=notices)
            _check_cancel(cancel, f"before decoding window {w.index} of {n}")
            engine._stage = f"decoding window {w.index} of {n}"
            video = nets.vae.decode(latent[None].float(), tile=vae_tiling(profile, cond.size))[0]
            if size is None:
                size = cond.size
                out.open(size)
            if n == 1 and not source:
                lone_video = video  # exactly the plain run's (on its device)
            video = video[:, :w.frames - w.discard].float().cpu()  # colour matching and writing on the CPU
            if correct and reference is None:
                reference = ColorStats.of(video)  # the first window is the reference
            elif correct:
                video = match_colors(video, reference, mode, strength)
            timeline.join(video, w.overlap, crossfade=req.sliding_window_seam == "crossfade",
                          hold=0 if last or req.sliding_window_seam == "cut" else req.sliding_window_overlap)
            del video
        if savers.magcache_source is not None:
            notices += savers.magcache_source.finish()
        _check_cancel(cancel, "before writing")
        files = out.finish()
    except BaseException:
        out.abort()
        raise
    video = lone_video if lone_video is not None else out.collected()
    if req.sliding_window_overlap_noise and req.task != "vace" and (n > 1 or source):
        notices.append(f"sliding_window_overlap_noise {req.sliding_window_overlap_noise}: applies to VACE windows "
                       f"only; task {req.task} does not use it")
    if n > 1 or source:
        notices.append(f"sliding windows: {n} window(s) of up to {max(w.frames for w in windows)} frames, overlap "
                       f"{req.sliding_window_overlap}, {req.sliding_window_seam} seams"
                       + (f"; continued from the {source.frames} frames of {req.continue_video}" if source else ""))
    return GenerationResult(files=files, request=req, metadata=metadata, latent=latent, video=video, steps=steps,
                            notices=notices)


# ---------------------------------------------------------------------------------------------
# One window's request and conditioning


def _window_request(req: GenerationRequest, w: Window, last: bool, size) -> GenerationRequest:
    """What one window runs: its frames, prompt and seed; the end image only in the last window;
    the size of the video once it is known."""
    changes = dict(prompt=w.prompt, seed=w.seed, frames=w.frames, sliding_window_size=0, continue_video=None,
                   end_image=req.end_image if last else None, trim_tail=0)
    if size is not None:
        changes.update(width=size[0], height=size[1])
    return req.replace(**changes)


def window_conditioning(req_w: GenerationRequest, spec, nets, device, w: Window, before: torch.Tensor, size,
                        source) -> Conditioning:
    """The conditioning of a window whose first ``w.overlap`` frames are ``before`` ([3, o, H, W] in
    [-1, 1], at the output size ``size``): see the module's text for each task."""
    stride = spec.vae.stride
    width, height = size
    task = req_w.task
    if task in I2V_TASKS:
        cond = _i2v_window(req_w, spec, nets, device, before, size)
    elif task == "ti2v":
        cond = build_conditioning(req_w.replace(image=None), spec, nets, device)
    else:
        inputs = WindowInputs(req_w, w, before, source.frames if source else 0, source_request=req_w)
        fields = {"vace": ("control_video", "mask_video")}.get(task, ())
        placeholder = {f: getattr(req_w, f) or f"<window {w.index} {f}>" for f in fields}  # read through inputs
        cond = build_conditioning(req_w.replace(**placeholder), spec, nets, device, inputs=inputs)
    # the overlap's whole latent frames: its first 4k+1 frames
    kept = 1 + (w.overlap - 1) // stride[0]
    z = nets.vae.encode(before[:, :1 + (kept - 1) * stride[0]][None].to(device=device, dtype=torch.float32))[0]
    if task == "ti2v":  # clean, at timestep 0, as its first frame in image mode
        shape = latent_shape(spec.vae.z_dim, stride, req_w.frames, width, height)
        mask = torch.ones(shape, device=device)
        mask[:, :kept] = 0
        fixed = torch.zeros(shape, device=device)
        fixed[:, :kept] = z
        cond.fixed_latent, cond.fixed_mask = fixed, mask
    else:
        cond.keep = KeptLatent(z, torch.zeros_like(z), offset=cond.drop_front)
    if task == "vace" and req_w.sliding_window_overlap_noise:
        cond.overlap_noise = OverlapNoise(cond.dit_kwargs["vace_context"], z, req_w.sliding_window_overlap_noise / 1000,
                                          seed=w.seed, offset=cond.drop_front)
    return cond


def _i2v_window(req_w, spec, nets, device, before: torch.Tensor, size) -> Conditioning:
    """i2v / flf2v / Fun InP: y = [mask of the known frames (the overlap, and the end image in the
    last window), VAE latents of (overlap, zeros..., end image)]; CLIP on the overlap's last frame
    (and the end image)."""
    stride = spec.vae.stride
    width, height = size
    frames, o = req_w.frames, before.shape[1]
    lat_h, lat_w = height // stride[1], width // stride[2]
    video = torch.zeros(3, frames, height, width)
    video[:, :o] = before.cpu()
    last = None
    if req_w.end_image:
        last = center_crop_resize(Inputs(req_w).image("end_image"), height, width)
        video[:, -1] = last
    mask = known_mask(frames, lat_h, lat_w, o, last is not None, stride[0]).to(device)
    y = torch.cat([mask, nets.vae.encode(video[None].to(device=device, dtype=torch.float32))[0]])
    kwargs = {"y": y[None]}
    if nets.dit.config.image_dim:
        images = [before[:, -1].cpu()] + ([last] if last is not None else [])
        feats = nets.clip(torch.stack(images).to(device))
        kwargs["clip_fea"] = feats.reshape(1, -1, feats.shape[-1])
    shape = (spec.vae.z_dim, (frames - 1) // stride[0] + 1, lat_h, lat_w)
    return _pad_clip(Conditioning(shape, (width, height), kwargs), nets)


def known_mask(frames: int, lat_h: int, lat_w: int, first: int, last: bool, stride_t: int = 4) -> torch.Tensor:
    """The i2v mask with the first ``first`` frames (and the last one) known: [stride_t, F', h, w],
    folded as the reference folds it (``conditioning.known_frames_mask`` for ``first`` = 1)."""
    msk = torch.zeros(1, frames, lat_h, lat_w)
    msk[:, :first] = 1
    if last:
        msk[:, -1] = 1
    msk = torch.cat([msk[:, :1].repeat_interleave(stride_t, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // stride_t, stride_t, lat_h, lat_w).transpose(1, 2)[0]


def _pad_clip(cond: Conditioning, nets) -> Conditioning:
    """A window of an flf2v model with no end image: its CLIP input has room for two images, so the
    start image is given twice."""
    clip = cond.dit_kwargs.get("clip_fea")
    pos = getattr(nets.dit.config, "image_pos_tokens", None)
    if clip is not None and pos and clip.shape[1] * 2 == pos:
        cond.dit_kwargs["clip_fea"] = torch.cat([clip, clip], dim=1)
    return cond


class WindowInputs(Inputs):
    """The input videos of one window: the part of each video at the window's position (and, for
    VACE, the overlap frames in front of the control video with a mask that keeps them)."""

    def __init__(self, req, window: Window, before: torch.Tensor, prefix: int, source_request):
        super().__init__(req)
        self.window, self.before, self.prefix = window, before, prefix
        self.files = source_request

    def video(self, name: str, frames: int, height: int, width: int, fit: str = "squash") -> torch.Tensor:
        w, o = self.window, self.window.overlap
        if self.req.task == "vace" and name in ("control_video", "mask_video"):
            rest = self._segment(name, w.start + o, frames - o, height, width, fit)
            if name == "control_video":
                head = self.before.cpu().float()
                rest = rest if rest is not None else torch.zeros(3, frames - o, height, width)
            else:  # -1: mask 0 (keep the frame), +1: mask 1 (make it)
                head = -torch.ones(3, o, height, width)
                rest = rest if rest is not None else torch.ones(3, frames - o, height, width)
            return torch.cat([head, rest], dim=1)
        video = self._segment(name, w.start, frames, height, width, fit)
        if video is None:
            raise RequestError(name, getattr(self.req, name), "an input video for this window")
        return video

    def _segment(self, name: str, start: int, count: int, height: int, width: int, fit: str) -> torch.Tensor | None:
        """Frames ``start .. start + count`` (positions of the written video) of the user's video
        ``name``, fitted to the size; None when the request has none. Its frame 0 is the first new
        frame: with a continuation, positions before it repeat that frame."""
        from wan.engine.video_stream import read_frames
        path = getattr(self.files, name)
        if not path:
            return None

        def fitted(clip):
            return resize_cover(clip, height, width) if fit == "cover" else resize(clip, height, width)
        first = start - self.prefix
        try:
            video = read_frames(path, max(first, 0), count - max(-first, 0), fitted)
        except (OSError, ValueError) as e:
            raise RequestError(name, path, f"a readable video file ({e})") from None
        if first < 0 and video.shape[1]:
            video = torch.cat([video[:, :1].expand(-1, -first, -1, -1), video], dim=1)
        if video.shape[1] < count:
            raise RequestError(name, path, f"a video of at least {first + count} frames (window {self.window.index} "
                                           f"reads frames {max(first, 0)}..{first + count - 1}); it has fewer")
        return video


# ---------------------------------------------------------------------------------------------
# Continuation, the output and the seams


class _Continued:
    """The video a continuation starts from."""

    def __init__(self, path: str):
        from wan.engine.video_stream import count_frames
        self.path = path
        try:
            self.frames = count_frames(path)
        except (OSError, ValueError) as e:
            raise RequestError("continue_video", path, f"a readable video file ({e})") from None
        if not self.frames:
            raise RequestError("continue_video", path, "a video with at least one frame")


def _continued_size(req, spec, source: _Continued) -> tuple[int, int]:
    """The output size of a continuation: the request's, or for the i2v family (whose size follows
    its start image) the continued video's own size when it is a valid one within the request's
    area, else the largest one of its aspect within that area."""
    if req.task not in I2V_TASKS:
        return req.width, req.height
    from wan.engine.media_probe import probe_video
    width, height, _, _ = probe_video(source.path)
    step = spec.vae.stride[1] * spec.arch.patch_size[1]
    if width % step == 0 and height % step == 0 and width * height <= req.width * req.height:
        return width, height
    return max_area_size((height, width), req.width * req.height, spec.vae.stride, spec.arch.patch_size)


class _Output:
    """Where the frames go: the streaming MP4 (``write``), and in memory when nothing is written
    (``write=False``: the caller gets the whole video)."""

    def __init__(self, req, spec, metadata: dict, limit: int, write: bool, first_prompt: str):
        self.req, self.spec, self.metadata, self.limit, self.write = req, spec, metadata, limit, write
        self.first_prompt = first_prompt
        self.stream = None
        self.kept: list[torch.Tensor] = []
        self.count = 0

    def open(self, size) -> None:
        if not self.write or self.stream is not None:
            return
        from wan.engine.media import OutputOptions
        from wan.engine.video_stream import StreamingVideo
        r = self.req
        options = OutputOptions(folder=r.output_dir, name_template=r.name_template, video_quality=r.quality)
        self.stream = StreamingVideo(options, r.fps, self.metadata, size, seed=r.seed, prompt=self.first_prompt,
                                     model=self.spec.id, task=r.task, limit=self.limit)

    def emit(self, frames: torch.Tensor) -> None:
        """Frames [3, T, H, W] in [-1, 1], rounded as every video of the engine is."""
        from wan.engine.media import to_uint8_frames
        if frames.shape[1]:
            self.emit_uint8(to_uint8_frames(frames, rounding="floor"), frames)

    def emit_uint8(self, pixels, frames: torch.Tensor | None = None) -> None:
        if self.stream is not None:
            self.stream.write(pixels)
        elif not self.write:
            keep = max(0, min(len(pixels), self.limit - self.count))
            if frames is None:
                from wan.engine.media_in import _uint8_to_unit
                frames = _uint8_to_unit(pixels).permute(3, 0, 1, 2)
            self.kept.append(frames[:, :keep].float().cpu())
        self.count += len(pixels)

    def collected(self) -> torch.Tensor | None:
        return torch.cat(self.kept, dim=1) if self.kept else None

    def finish(self) -> list[Path]:
        return self.stream.finish() if self.stream is not None else []

    def abort(self) -> None:
        if self.stream is not None:
            self.stream.abort()


class _Timeline:
    """The video as it is made: frames go out to the output as soon as they are final; the last
    ``keep`` frames stay at hand as the next window's overlap, and with a crossfade the last
    ``hold`` of them wait for the blend with the next window."""

    def __init__(self, out: _Output, keep: int):
        self.out, self.keep = out, keep
        self.tail: torch.Tensor | None = None  # [3, <=keep, H, W]
        self.pending = 0                       # trailing frames of ``tail`` not yet sent

    def last(self, count: int) -> torch.Tensor:
        if self.tail is None or self.tail.shape[1] < count:
            raise RuntimeError(f"a window overlaps {count} frames, but only "
                               f"{0 if self.tail is None else self.tail.shape[1]} are at hand")
        return self.tail[:, -count:]

    def add_input(self, source: _Continued, size) -> torch.Tensor:
        """Sends a continuation's video frame by frame (resized to ``size`` where it differs, else
        exactly its pixels); returns its last frames (the first window's overlap)."""
        from wan.engine.media_in import _uint8_to_unit
        from wan.engine.video_stream import iter_frames
        width, height = size
        for pixels in iter_frames(source.path):
            frame = _uint8_to_unit(pixels).permute(2, 0, 1)[:, None]  # [3, 1, h, w]
            if pixels.shape[:2] != (height, width):
                frame = resize_cover(frame, height, width).clamp(-1, 1)
                pixels = ((frame[:, 0].permute(1, 2, 0) + 1) * 127.5).round().to(torch.uint8).numpy()
            self.out.emit_uint8(pixels[None], frame)
            self._remember(frame)
        return self.tail

    def join(self, video: torch.Tensor, overlap: int, crossfade: bool, hold: int) -> None:
        """Adds a window's frames (its discarded frames already dropped) whose first ``overlap``
        frames stand where frames were already made; all but the last ``hold`` go out."""
        video = video.float().cpu()
        pending = self.tail[:, self.tail.shape[1] - self.pending:] if self.pending else video[:, :0]
        if crossfade and self.pending:
            p = min(self.pending, overlap)
            old, new = pending[:, pending.shape[1] - p:], video[:, overlap - p:overlap]
            weight = torch.arange(1, p + 1, dtype=torch.float32).div_(p + 1).view(1, p, 1, 1)
            pending = torch.cat([pending[:, :pending.shape[1] - p], (1 - weight) * old + weight * new], dim=1)
        made = torch.cat([pending, video[:, overlap:]], dim=1)
        hold = min(hold, made.shape[1])
        self.out.emit(made[:, :made.shape[1] - hold])
        before = self.tail[:, :self.tail.shape[1] - self.pending] if self.tail is not None else made[:, :0]
        self.tail = torch.cat([before, made], dim=1)[:, -self.keep:]
        self.pending = hold

    def _remember(self, frame: torch.Tensor) -> None:
        frame = frame.float().cpu()
        self.tail = frame if self.tail is None else torch.cat([self.tail, frame], 1)[:, -self.keep:]


def _window_progress(progress, steps: list, w: Window, n: int):
    """The engine's progress callback for window ``w`` of ``n``: each step with its window, and an
    ETA for the whole run (this window's rest, then the windows to come at this window's pace)."""
    def record(info: StepInfo) -> None:
        per_window = info.elapsed + info.eta
        info = dataclasses.replace(info, window=w.index, windows=n, eta=info.eta + (n - w.index) * per_window)
        steps.append(dataclasses.replace(info, latent=None))  # steps of every window: no latents kept
        if progress is not None:
            progress(info)
    return record
