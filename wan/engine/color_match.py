"""Colour correction of sliding windows: each window's colours pulled towards a reference.

Windows drift: each one starts from the last frames of the one before, and small shifts of
brightness, contrast and tint add up over a long clip. Wan2GP matches every frame of a window to
one reference frame in CIE Lab (mean and standard deviation per channel) and blends the result
with a strength. Here:

- the reference is a set of statistics of a whole *reference window* (the first window, or the
  frames a continuation starts from), kept as a few numbers per channel, never as frames;
- one mapping per window, computed from all of its frames and applied to each of them: the
  window's own motion of light and colour (a cloud passing) is kept, only its drift away from the
  reference is removed, and no frame flickers against its neighbours;
- ``mean_std``: per Lab channel ``(x - mean_w) / std_w * std_ref + mean_ref``;
  ``histogram``: per Lab channel, the window's quantiles mapped onto the reference's (a monotone
  piecewise-linear curve through :data:`QUANTILES` points), which also fixes a changed tone curve;
- ``strength`` in [0, 1] blends the corrected frames with the decoded ones (in RGB): 0 is off.

Frames are ``[3, T, H, W]`` in [-1, 1] (the decoded convention) and stay so. The sRGB <-> Lab
conversion is the standard one (D65 white, the sRGB transfer curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

QUANTILES = 257          # points of the histogram curve (0%, 1/256, ... 100%)
SAMPLE_LIMIT = 1 << 20   # pixels per channel a window's quantiles are computed from (strided)
_WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_RGB_TO_XYZ = torch.tensor([[0.4124564, 0.3575761, 0.1804375],
                            [0.2126729, 0.7151522, 0.0721750],
                            [0.0193339, 0.1191920, 0.9503041]], dtype=torch.float64)
_XYZ_TO_RGB = torch.linalg.inv(_RGB_TO_XYZ)
_DELTA = 6 / 29


def rgb_to_lab(video: torch.Tensor) -> torch.Tensor:
    """[3, ...] RGB in [-1, 1] -> [3, ...] CIE Lab (L 0..100, a and b about -128..127), float32."""
    c = ((video.float() + 1) / 2).clamp(0, 1)
    linear = torch.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,j...->i...", _RGB_TO_XYZ.float(), linear)
    t = xyz / _WHITE.float().view(3, *([1] * (xyz.dim() - 1)))
    f = torch.where(t > _DELTA ** 3, t.clamp_min(1e-12) ** (1 / 3), t / (3 * _DELTA ** 2) + 4 / 29)
    return torch.stack([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_lab`: [3, ...] Lab -> RGB in [-1, 1] (clamped), float32."""
    fy = (lab[0] + 16) / 116
    f = torch.stack([fy + lab[1] / 500, fy, fy - lab[2] / 200])
    t = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29))
    xyz = t * _WHITE.float().view(3, *([1] * (t.dim() - 1)))
    linear = torch.einsum("ij,j...->i...", _XYZ_TO_RGB.float(), xyz).clamp(0, 1)
    c = torch.where(linear <= 0.0031308, linear * 12.92, 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055)
    return (c * 2 - 1).clamp(-1, 1)


CHUNK_FRAMES = 8         # frames converted to Lab at a time (bounds the memory of a long window)


@dataclass(frozen=True)
class ColorStats:
    """What a window's colours are, per Lab channel: mean, standard deviation and quantiles."""

    mean: torch.Tensor       # [3]
    std: torch.Tensor        # [3]
    quantiles: torch.Tensor  # [3, QUANTILES], ascending

    @classmethod
    def of(cls, video: torch.Tensor) -> "ColorStats":
        """Statistics of the frames ``[3, T, H, W]`` in [-1, 1], a few frames at a time (quantiles
        from at most about SAMPLE_LIMIT pixels per channel, evenly strided)."""
        t = video.shape[1]
        step = max(1, video[0].numel() // SAMPLE_LIMIT)
        total, squares, count, samples = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), 0, []
        offset = 0  # where the stride continues in the next chunk
        for a in range(0, t, CHUNK_FRAMES):
            flat = rgb_to_lab(video[:, a:a + CHUNK_FRAMES]).reshape(3, -1)
            total += flat.sum(dim=1, dtype=torch.float64)
            squares += (flat.double() ** 2).sum(dim=1)
            count += flat.shape[1]
            samples.append(flat[:, offset::step])
            offset = (offset - flat.shape[1]) % step
        mean = total / count
        std = (squares / count - mean ** 2).clamp_min(0).sqrt() * (count / max(count - 1, 1)) ** 0.5
        sample = torch.cat(samples, dim=1)
        quantiles = torch.quantile(sample, torch.linspace(0, 1, QUANTILES), dim=1).T.contiguous()  # [3, Q]
        return cls(mean.float(), std.float(), quantiles)


def match_colors(video: torch.Tensor, reference: ColorStats, mode: str, strength: float) -> torch.Tensor:
    """``video`` [3, T, H, W] in [-1, 1] with its colours moved towards ``reference`` (a new tensor).

    Args:
        mode: "off", "mean_std" or "histogram" (see the module's text).
        strength: 0 (the video as it is) .. 1 (fully matched); blended in RGB.
    """
    if mode == "off" or strength <= 0:
        return video
    if mode not in ("mean_std", "histogram"):
        raise ValueError(f"colour correction mode must be off, mean_std or histogram, got {mode!r}")
    own = ColorStats.of(video)
    strength = min(float(strength), 1.0)
    out = torch.empty_like(video)
    for a in range(0, video.shape[1], CHUNK_FRAMES):
        part = video[:, a:a + CHUNK_FRAMES]
        lab = rgb_to_lab(part)
        flat = lab.reshape(3, -1)
        if mode == "mean_std":
            scale = reference.std / own.std.clamp_min(1e-4)
            matched = (flat - own.mean[:, None]) * scale[:, None] + reference.mean[:, None]
        else:
            matched = torch.stack([_interp(flat[c], own.quantiles[c], reference.quantiles[c]) for c in range(3)])
        fixed = lab_to_rgb(matched.reshape(lab.shape))
        out[:, a:a + CHUNK_FRAMES] = fixed if strength >= 1 else (1 - strength) * part.float() + strength * fixed
    return out


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear ``y(x)`` through the points (xp, fp), xp ascending (numpy's ``interp``;
    flat runs of xp take their first point, values outside take the end points)."""
    i = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, xp.numel() - 1)
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-6)).clamp(0, 1)
    return y0 + w * (y1 - y0)
