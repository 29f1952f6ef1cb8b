"""VACE inputs as the official Wan 2.1 code prepares them (``wan/vace.py``: ``prepare_source``,
``vace_encode_frames``, ``vace_encode_masks``; ``wan/utils/vace_processor.py``: ``resize_crop``),
checked against hand computations of those formulas written here:

- the mask is the first channel of the mask video mapped to [0, 1]: ``clamp((m + 1) / 2, 0, 1)``
  for ``m`` in [-1, 1];
- the frames are split with the mask thresholded at 0.5 (``M = m01 > 0.5``): the inactive part is
  ``video * (1 - M)``, the reactive part ``video * M``;
- the 64 mask channels take the raw [0, 1] values: channel ``8 * dy + dx`` is ``m01[:, dy::8, dx::8]``,
  then time is resampled to the latent frame count by nearest-exact (source frame
  ``floor((i + 0.5) * T / T')``);
- a control or mask video of another size is scaled to cover the output and centre-cropped.
"""

from types import SimpleNamespace

import torch

from wan.engine import GenerationRequest, resolve_request
from wan.engine import conditioning as cond_mod
from wan.registry import get_model

T, H, W = 9, 64, 64


class RecordingVae:
    """Records what is encoded; returns zeros of the latent shape."""

    def __init__(self):
        self.inputs = []

    def encode(self, video):
        self.inputs.append(video[0].clone())
        _, _, t, h, w = video.shape
        return torch.zeros(1, 16, (t - 1) // 4 + 1, h // 8, w // 8)


def _unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [3, T, H, W] in [-1, 1], as a video file is read."""
    return pixels.permute(3, 0, 1, 2).float() / 255 * 2 - 1


def soft_mask() -> torch.Tensor:
    """A rectangle of 255 with a 2-pixel border of grey values 100, 127, 128 and 200, whose
    channels differ (only the first one counts)."""
    m = torch.zeros(T, H, W, 3, dtype=torch.uint8)
    m[:, 16:48, 16:48] = 255
    for k, v in enumerate((100, 127, 128, 200)):  # one grey per side, two pixels thick
        side = [(slice(14, 16), slice(14, 50)), (slice(48, 50), slice(14, 50)),
                (slice(14, 50), slice(14, 16)), (slice(14, 50), slice(48, 50))][k]
        m[:, side[0], side[1]] = torch.tensor([v, 255 - v, v // 2], dtype=torch.uint8)
    return m


def run_vace(monkeypatch, tmp_path, videos: dict[str, torch.Tensor]):
    """The VACE recipe with the input videos given as tensors: (recording VAE, conditioning). The
    request names files (it checks they exist); their content is the tensors."""
    spec = get_model("test-tiny-vace")
    fields = {}
    for name in videos:
        fields[name] = str(tmp_path / f"{name}.mp4")
        (tmp_path / f"{name}.mp4").touch()
    req, _ = resolve_request(GenerationRequest(model=spec.id, task="vace", prompt="x", frames=T, width=W,
                                               height=H, **fields), check_files=False)
    def read_video(self, name, frames, fit_frame):  # as load_video: the first frames, one at a time
        clip = videos[name][:, :frames]
        return torch.cat([fit_frame(clip[:, t:t + 1]) for t in range(clip.shape[1])], dim=1), 16.0
    monkeypatch.setattr(cond_mod.Inputs, "_read_video", read_video)
    vae = RecordingVae()
    nets = SimpleNamespace(vae=vae, clip=None, dit=SimpleNamespace(config=SimpleNamespace(image_dim=None)))
    return vae, cond_mod.build_conditioning(req, spec, nets, "cpu")


def hand_mask_channels(m01: torch.Tensor) -> torch.Tensor:
    """[T, H, W] -> [64, T', H/8, W/8], written out loop by loop."""
    t_lat = (T + 3) // 4
    out = torch.zeros(64, t_lat, H // 8, W // 8)
    for dy in range(8):
        for dx in range(8):
            for i in range(t_lat):
                src = int((i + 0.5) * T / t_lat)
                out[8 * dy + dx, i] = m01[src, dy::8, dx::8]
    return out


def test_a_soft_mask_reaches_the_model_as_the_official_code_passes_it(monkeypatch, tmp_path):
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, T, H, W, generator=g) * 2 - 1
    mask = _unit(soft_mask())
    vae, cond = run_vace(monkeypatch, tmp_path, {"control_video": video, "mask_video": mask})
    m01 = ((mask[0] + 1) / 2).clamp(0, 1)         # first channel only
    hard = (m01 > 0.5).float()
    inactive, reactive = vae.inputs
    assert torch.allclose(inactive, video * (1 - hard), atol=1e-6)
    assert torch.allclose(reactive, video * hard, atol=1e-6)
    channels = cond.dit_kwargs["vace_context"][0, 32:]
    assert torch.allclose(channels, hand_mask_channels(m01), atol=1e-6)
    # the grey border reaches the mask channels as grey (not 0 or 1)
    greys = channels[(channels > 0) & (channels < 1)]
    assert {round(float(v) * 255) for v in greys} == {100, 127, 128, 200}
    # and the split follows the threshold: 127 is out, 128 is in
    assert hard[0, 48, 30] == 0 and hard[0, 30, 15] == 1  # the sides of 127 and 128


def test_a_hard_mask_gives_what_it_gave_before(monkeypatch, tmp_path):
    """With pixels of 0 and 255 on every channel, the raw mask is the thresholded one: the split and
    the channels equal the former computation (channel mean > 0 in [-1, 1], used for both)."""
    pixels = torch.zeros(T, H, W, 3, dtype=torch.uint8)
    pixels[:, 8:40, 24:56] = 255
    g = torch.Generator().manual_seed(1)
    video = torch.rand(3, T, H, W, generator=g) * 2 - 1
    mask = _unit(pixels)
    vae, cond = run_vace(monkeypatch, tmp_path, {"control_video": video, "mask_video": mask})
    former = (mask.mean(0, keepdim=True) > 0).float()
    assert torch.equal(vae.inputs[0], video * (1 - former)) and torch.equal(vae.inputs[1], video * former)
    assert torch.equal(cond.dit_kwargs["vace_context"][0, 32:], hand_mask_channels(former[0]))


def test_a_control_video_of_another_shape_is_scaled_to_cover_and_centre_cropped(monkeypatch, tmp_path):
    """96x64 into a 64x64 output: the scale to cover is 1 (no resampling), the centre 64 columns stay;
    squashing it, as before, would have resampled every column."""
    g = torch.Generator().manual_seed(2)
    wide = torch.rand(3, T, H, 96, generator=g) * 2 - 1
    vae, _ = run_vace(monkeypatch, tmp_path, {"control_video": wide})
    inactive, reactive = vae.inputs
    assert torch.equal(reactive, wide[..., 16:80]) and torch.equal(inactive, torch.zeros_like(reactive))
