"""Task recipes: what the DiT receives besides the noisy latent, built as the reference builds it.

Each recipe turns a resolved request plus the loaded networks into a :class:`Conditioning`: the
latent shape to draw noise for, and the extra inputs of the DiT (``y``, CLIP features, VACE
context, Fun reference latent), plus what the loop must do besides denoising (TI2V first-frame
replacement, video-to-video start, VACE reference frames to drop at the end).

Conventions from the official Wan code (see ``shared/reference/wan-architecture.md`` §6):
images are [-1, 1] tensors; i2v sizes come from a max area and the image's aspect ratio; the i2v
mask marks known latent frames with 1 and is folded 4 frames per latent frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from wan.engine.request import GenerationRequest, RequestError


@dataclass
class Conditioning:
    """Everything the denoising loop needs besides the noise and the text.

    Attributes:
        noise_shape: [C, F', H', W'] of one latent video (VACE: reference frames included).
        size: (width, height) of the output video.
        dit_kwargs: extra keyword arguments of the DiT forward (same for cond and uncond passes).
        fixed_latent, fixed_mask: TI2V image mode: after every step, ``latent = (1 - m) * z + m * latent``;
            ``fixed_mask`` [C, F', H', W'] is 0 where the latent is the clean image.
        init_latent: video-to-video: the clean latent of the input video (noised at the start step).
        drop_front: latent frames to remove before decoding (VACE reference images).
        keep: latent frames known in advance (a sliding window's overlap), set again at every step.
        overlap_noise: VACE windows: noise blended into the overlap's control latents at every step.
    """

    noise_shape: tuple[int, int, int, int]
    size: tuple[int, int]
    dit_kwargs: dict = field(default_factory=dict)
    fixed_latent: torch.Tensor | None = None
    fixed_mask: torch.Tensor | None = None
    init_latent: torch.Tensor | None = None
    drop_front: int = 0
    keep: "KeptLatent | None" = None
    overlap_noise: "OverlapNoise | None" = None

    def token_timesteps(self, t: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
        """Timestep input of the DiT at ``t``: [1], or per token [1, L] in TI2V image mode where
        first-frame tokens are clean (t = 0), as the reference does."""
        if self.fixed_mask is None:
            return t.reshape(1)
        m = self.fixed_mask[0, ::patch[0], ::patch[1], ::patch[2]]
        return (m * t).flatten()[None]


@dataclass
class KeptLatent:
    """Latent frames known before sampling (the overlap of a sliding window, Wan2GP's "overlapped
    latents"): before the first step and after every step the loop sets frames ``offset ..
    offset + n`` of the latent to ``(1 - σ)·latent + σ·noise`` at that step's noise level σ, so
    they end clean and the frames after them are made to continue them.

    ``latent``, ``noise``: [C, n, h, w]; ``noise`` is the run's own noise of those frames.
    """

    latent: torch.Tensor
    noise: torch.Tensor
    offset: int = 0

    def apply(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """``x`` [C, F, h, w] with the kept frames at noise level ``sigma`` (a new tensor)."""
        n = self.latent.shape[1]
        x = x.clone()
        x[:, self.offset:self.offset + n] = ((1 - sigma) * self.latent + sigma * self.noise).to(x)
        return x


@dataclass
class OverlapNoise:
    """Wan2GP's ``sliding_window_overlap_noise`` for a VACE window: before every step, the control's
    inactive latents (its first 16 channels) at the overlap's latent frames become
    ``(1 - f)·latent + f·noise``, with fresh noise each step and ``f`` the setting in thousandths;
    the kept frames then hold the model less rigidly, which Wan2GP uses against blur at the seams.

    Wan2GP draws the noise from the global generator; here it comes from a generator seeded with the
    window's seed (drawn on the CPU), so a run repeats exactly.

    ``context``: the DiT's ``vace_context`` [1, C, F, h, w], changed in place (every pass of the
    step reads it); ``latent`` [16, n, h, w]: the overlap's VAE latents; ``offset``: its first
    latent frame (after the reference images).
    """

    context: torch.Tensor
    latent: torch.Tensor
    factor: float
    seed: int
    offset: int = 0
    generator: torch.Generator | None = None

    def apply(self) -> None:
        """Sets the overlap's control latents for the next step (one draw of noise per call)."""
        if self.generator is None:
            self.generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn(self.latent.shape, generator=self.generator).to(self.latent)
        c, n = self.latent.shape[:2]
        self.context[0, :c, self.offset:self.offset + n] = ((1 - self.factor) * self.latent
                                                            + self.factor * noise).to(self.context)


# ---------------------------------------------------------------------------------------------
# Shapes


def latent_shape(z_dim: int, stride: tuple[int, int, int], frames: int, width: int, height: int):
    return (z_dim, (frames - 1) // stride[0] + 1, height // stride[1], width // stride[2])


def max_area_size(image_hw: tuple[int, int], max_area: int, stride: tuple[int, int, int],
                  patch: tuple[int, int, int]) -> tuple[int, int]:
    """Wan 2.1 i2v: the (width, height) of the output keeps the image's aspect ratio within
    ``max_area`` pixels, rounded down to whole patches of latents (the reference's lat_h/lat_w)."""
    h, w = image_hw
    aspect = h / w
    lat_h = round(math.sqrt(max_area * aspect) // stride[1] // patch[1] * patch[1])
    lat_w = round(math.sqrt(max_area / aspect) // stride[2] // patch[2] * patch[2])
    return lat_w * stride[2], lat_h * stride[1]


def best_output_size(w: int, h: int, dw: int, dh: int, expected_area: int) -> tuple[int, int]:
    """Wan 2.2 TI2V: the (width, height), multiples of (dw, dh) within ``expected_area``, whose
    aspect is closest to the image's; width-first and height-first rounding are both tried."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    r1, r2 = ow1 / oh1, ow2 / oh2
    return (ow1, oh1) if max(ratio / r1, r1 / ratio) < max(ratio / r2, r2 / ratio) else (ow2, oh2)


def resize(image: torch.Tensor, height: int, width: int, mode: str = "bicubic") -> torch.Tensor:
    """[3, H, W] or [3, T, H, W] in [-1, 1] -> same at (height, width) (torch resize, as the reference)."""
    if image.shape[-2:] == (height, width):
        return image
    if image.dim() == 3:
        return F.interpolate(image[None].float(), size=(height, width), mode=mode, align_corners=False)[0]
    frames = image.transpose(0, 1).float()  # [T, 3, H, W]
    return F.interpolate(frames, size=(height, width), mode=mode, align_corners=False).transpose(0, 1)


def resize_cover(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[3, T, H, W] scaled to cover (height, width), then the centre cropped: the official VACE
    ``resize_crop`` (``wan/utils/vace_processor.py``), bicubic with antialias, sizes rounded."""
    h, w = video.shape[-2:]
    if (h, w) == (height, width):
        return video
    scale = max(width / w, height / h)
    frames = video.transpose(0, 1).float()  # [T, 3, H, W]
    frames = F.interpolate(frames, size=(round(scale * h), round(scale * w)), mode="bicubic", antialias=True)
    top, left = (frames.shape[-2] - height) // 2, (frames.shape[-1] - width) // 2
    return frames[..., top:top + height, left:left + width].transpose(0, 1)


def center_crop_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize to cover (height, width) keeping the aspect, then crop the centre (flf2v's last frame)."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    image = resize(image, nh, nw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return image[..., top:top + height, left:left + width]


def known_frames_mask(frames: int, lat_h: int, lat_w: int, first: bool, last: bool,
                      stride_t: int = 4) -> torch.Tensor:
    """The i2v/flf2v mask: [stride_t, F', lat_h, lat_w], 1 on known frames, folded as the
    reference folds it (the first frame repeated stride_t times, then stride_t frames per latent)."""
    msk = torch.zeros(1, frames, lat_h, lat_w)
    if first:
        msk[:, 0] = 1
    if last:
        msk[:, -1] = 1
    msk = torch.cat([msk[:, :1].repeat_interleave(stride_t, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // stride_t, stride_t, lat_h, lat_w).transpose(1, 2)[0]


def pil_to_tensor(img) -> torch.Tensor:
    """PIL RGB image -> [3, H, W] float32 in [-1, 1] (uint8 / 255, then *2 - 1, as the reference)."""
    import numpy as np
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def tensor_to_pil(image: torch.Tensor):
    """[3, H, W] in [-1, 1] -> PIL RGB image (rounded to uint8)."""
    from PIL import Image
    arr = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


# ---------------------------------------------------------------------------------------------
# Recipes


class Inputs:
    """Loads the request's input files on demand (images and videos as [-1, 1] tensors)."""

    def __init__(self, req: GenerationRequest):
        self.req = req

    def image(self, name: str = "image") -> torch.Tensor:
        from wan.engine.media import load_image
        path = getattr(self.req, name)
        try:
            return load_image(path)
        except (OSError, ValueError) as e:
            raise RequestError(name, path, f"a readable image file ({e})") from None

    def video(self, name: str, frames: int, height: int, width: int, fit: str = "squash") -> torch.Tensor:
        """[3, frames, height, width]: the first ``frames`` frames at the output size. ``fit``:
        ``"squash"`` resizes to the size (bicubic), ``"cover"`` scales to cover it and crops the centre
        (bicubic with antialias), as the official VACE code prepares its control and mask videos.
        Only those frames are decoded, each resized as it comes (the same numbers as resizing the
        clip), so memory follows the job whatever the file's length and size."""
        path = getattr(self.req, name)
        if fit == "cover":
            def fit_frame(clip):
                return resize_cover(clip, height, width)
        else:
            def fit_frame(clip):
                return resize(clip, height, width)
        video, _fps = self._read_video(name, frames, fit_frame)
        if video.shape[1] < frames:
            raise RequestError(name, path, f"a video of at least {frames} frames (the clip's length); "
                                           f"it has {video.shape[1]}")
        return video

    def _read_video(self, name: str, frames: int, fit_frame) -> tuple[torch.Tensor, float]:
        """At most ``frames`` frames of the video file of field ``name``, each passed through
        ``fit_frame`` ([3, 1, H, W] -> [3, 1, h, w]) as it is decoded: ([3, T, h, w] in [-1, 1], fps)."""
        from wan.engine.media import load_video
        path = getattr(self.req, name)
        try:
            return load_video(path, max_frames=frames, transform=fit_frame)
        except (OSError, ValueError) as e:
            raise RequestError(name, path, f"a readable video file ({e})") from None


def build_conditioning(req: GenerationRequest, spec, nets, device, inputs: Inputs | None = None) -> Conditioning:
    """Dispatches to the recipe of ``req.task``. ``nets`` has ``vae``, ``clip`` (or None), ``dit``.
    ``inputs``: where the input images and videos come from (default: the request's files; a
    sliding window gives its own part of them, ``wan.engine.windows.WindowInputs``)."""
    recipe = {"t2v": _text, "t2i": _text, "ti2v": _ti2v, "i2v": _i2v, "flf2v": _i2v, "fun_inp": _i2v,
              "v2v": _v2v, "fun_control": _fun_control, "vace": _vace}[req.task]
    return recipe(req, spec, nets, device, inputs or Inputs(req))


def _encode(vae, video: torch.Tensor, device) -> torch.Tensor:
    """[3, T, H, W] in [-1, 1] -> normalised latents [C, T', h, w]."""
    return vae.encode(video[None].to(device=device, dtype=torch.float32))[0]


def _text(req, spec, nets, device, inputs) -> Conditioning:
    shape = latent_shape(spec.vae.z_dim, spec.vae.stride, req.frames, req.width, req.height)
    return Conditioning(shape, (req.width, req.height))


def _i2v(req, spec, nets, device, inputs) -> Conditioning:
    """i2v / flf2v / Fun InP: y = [known-frame mask (4), VAE latents of (first, zeros..., last)]."""
    stride, patch = spec.vae.stride, spec.arch.patch_size
    first = inputs.image("image") if req.image else None
    last = inputs.image("end_image") if req.end_image else None
    if first is not None and last is not None:  # the last frame takes the first one's size
        last = center_crop_resize(last, *first.shape[-2:])
    ref = first if first is not None else last
    width, height = max_area_size(ref.shape[-2:], req.width * req.height, stride, patch)
    lat_h, lat_w = height // stride[1], width // stride[2]
    frames = req.frames
    video = torch.zeros(3, frames, height, width)
    if first is not None:
        video[:, 0] = resize(first, height, width)
    if last is not None:
        video[:, -1] = resize(last, height, width)
    y = torch.cat([known_frames_mask(frames, lat_h, lat_w, first is not None, last is not None, stride[0]).to(device),
                   _encode(nets.vae, video, device)])
    kwargs = {"y": y[None]}
    if nets.dit.config.image_dim:  # Wan 2.1 i2v / flf2v / Fun: CLIP on the original images
        images = [img for img in (first, last) if img is not None]
        feats = nets.clip(torch.stack(images).to(device))
        kwargs["clip_fea"] = feats.reshape(1, -1, feats.shape[-1])
    shape = (spec.vae.z_dim, (frames - 1) // stride[0] + 1, lat_h, lat_w)
    return Conditioning(shape, (width, height), kwargs)


def _ti2v(req, spec, nets, device, inputs) -> Conditioning:
    """Wan 2.2 TI2V-5B: text-to-video, or with an image: its latent replaces the first latent frame
    at every step and its tokens get timestep 0."""
    if not req.image:
        return _text(req, spec, nets, device, inputs)
    from PIL import Image
    stride, patch = spec.vae.stride, spec.arch.patch_size
    img = tensor_to_pil(inputs.image("image"))
    dw, dh = patch[2] * stride[2], patch[1] * stride[1]
    ow, oh = best_output_size(img.width, img.height, dw, dh, req.width * req.height)
    scale = max(ow / img.width, oh / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    image = pil_to_tensor(img.crop((x1, y1, x1 + ow, y1 + oh)))
    z = _encode(nets.vae, image[:, None], device)  # [C, 1, h, w]
    shape = latent_shape(spec.vae.z_dim, stride, req.frames, ow, oh)
    mask = torch.ones(shape, device=device)
    mask[:, 0] = 0
    fixed = torch.zeros(shape, device=device)
    fixed[:, :1] = z
    return Conditioning(shape, (ow, oh), fixed_latent=fixed, fixed_mask=mask)


def _v2v(req, spec, nets, device, inputs) -> Conditioning:
    video = inputs.video("video", req.frames, req.height, req.width)
    cond = _text(req, spec, nets, device, inputs)
    cond.init_latent = _encode(nets.vae, video, device)
    return cond


def _fun_control(req, spec, nets, device, inputs) -> Conditioning:
    """Fun Control: y = [control video latents (16), reference image latents (16, frame 0 only)];
    Fun V1.1 models also take the reference latent through ref_conv."""
    control = inputs.video("control_video", req.frames, req.height, req.width)
    cond = _text(req, spec, nets, device, inputs)
    control_lat = _encode(nets.vae, control, device)
    ref_lat = torch.zeros_like(control_lat)
    image = resize(inputs.image("image"), req.height, req.width) if req.image else None
    if image is not None:
        ref_lat[:, :1] = _encode(nets.vae, image[:, None], device)
    kwargs = {"y": torch.cat([control_lat, ref_lat])[None]}
    cfg = nets.dit.config
    if cfg.ref_conv_in and image is not None:
        kwargs["ref_latent"] = ref_lat[:, 0][None]
    if cfg.image_dim:
        clip_in = image if image is not None else torch.zeros(3, req.height, req.width)
        kwargs["clip_fea"] = nets.clip(clip_in[None].to(device))
    return Conditioning(cond.noise_shape, cond.size, kwargs)


def _vace(req, spec, nets, device, inputs) -> Conditioning:
    """VACE: context = [inactive latents (16), reactive latents (16), mask (64)], reference images
    encoded as extra latent frames in front (dropped after denoising).

    As the official code: the mask is the mask video's first channel mapped to [0, 1]; the frames are
    split with it thresholded at 0.5, while the 64 mask channels take its raw values, so feathered
    (grey) edges reach the model as grey."""
    stride, frames, h, w = spec.vae.stride, req.frames, req.height, req.width
    video = (inputs.video("control_video", frames, h, w, fit="cover") if req.control_video
             else torch.zeros(3, frames, h, w))
    if req.mask_video:
        mask = ((inputs.video("mask_video", frames, h, w, fit="cover")[:1] + 1) / 2).clamp(0, 1)
    else:
        mask = torch.ones(1, frames, h, w)
    split = (mask > 0.5).float()
    inactive = _encode(nets.vae, video * (1 - split), device)
    reactive = _encode(nets.vae, video * split, device)
    latents = torch.cat([inactive, reactive])
    refs = [_fit_on_white(Inputs(req.replace(image=p)).image("image"), h, w) for p in req.ref_images]
    ref_lat = [torch.cat([z := _encode(nets.vae, r[:, None], device), torch.zeros_like(z)]) for r in refs]
    packed = _pack_vace_mask(mask[0], stride).to(device)
    if ref_lat:
        latents = torch.cat([*ref_lat, latents], dim=1)
        packed = torch.cat([packed.new_zeros(packed.shape[0], len(ref_lat), *packed.shape[2:]), packed], dim=1)
    context = torch.cat([latents, packed])[None]
    shape = (spec.vae.z_dim, latents.shape[1], h // stride[1], w // stride[2])
    return Conditioning(shape, (w, h), {"vace_context": context, "vace_scale": req.vace_scale},
                        drop_front=len(ref_lat))


def _pack_vace_mask(mask: torch.Tensor, stride: tuple[int, int, int]) -> torch.Tensor:
    """[T, H, W] pixel mask -> [sh*sw, T', H/sh, W/sw]: each latent cell's sh x sw pixels become
    channels, then time is resampled to the latent frame count (nearest), as the reference."""
    t, h, w = mask.shape
    sh, sw = stride[1], stride[2]
    packed = mask.view(t, h // sh, sh, w // sw, sw).permute(2, 4, 0, 1, 3).reshape(sh * sw, t, h // sh, w // sw)
    return F.interpolate(packed[None], size=((t + 3) // stride[0], h // sh, w // sw), mode="nearest-exact")[0]


def _fit_on_white(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A VACE reference image scaled to fit inside (height, width), centred on white."""
    ih, iw = image.shape[-2:]
    if (ih, iw) == (height, width):
        return image
    scale = min(height / ih, width / iw)
    nh, nw = int(ih * scale), int(iw * scale)
    canvas = torch.ones(3, height, width)
    top, left = (height - nh) // 2, (width - nw) // 2
    canvas[:, top:top + nh, left:left + nw] = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear",
                                                            align_corners=False)[0]
    return canvas
