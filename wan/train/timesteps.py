"""Timestep sampling for flow-matching LoRA training, as musubi-tuner samples it.

Conventions (musubi's ``training/trainer_base.py: get_noisy_model_input_and_timesteps``):

- ``sigma`` in [0, 1] is the noise level: ``x_t = (1 - sigma) * x0 + sigma * noise``; 1 is pure noise.
- The DiT gets ``timesteps`` on the 0..1000 scale. Every mode except ``sigma`` feeds
  ``1000 * sigma + 1`` (range [1, 1001]): musubi adds 1 after noising, so the timestep the model
  sees is one step noisier than the input it gets. The default ``sigma`` mode instead picks an
  entry of the scheduler's unshifted 1000-step grid and feeds ``1000 * sigma`` (range [1, 1000]).
- In ``sigma`` mode the shift (``discrete_flow_shift``) has no effect: the grid is
  ``linspace(1, 0, 1001)``, built without the shift (the shift is only applied by the scheduler's
  ``set_timesteps``, which training never calls). Use ``shift`` to train with a shifted distribution.
- In ``sigma`` mode ``weighting_scheme`` also chooses the sampling density (``logit_normal``, ``mode``,
  else uniform over the grid), ``preserve_distribution_shape`` and ``num_timestep_buckets`` are ignored,
  and ``min_timestep``/``max_timestep`` select grid *indices*, which count from the noisy end: the range
  [a, b) gives timesteps in (1000 - b, 1000 - a].
- The loss weighting (``sigma_sqrt``, ``cosmap``) is computed from the timestep fed to the DiT, looked
  up on that grid (:func:`weighting_sigmas`), not from the exact sigma.

Randomness comes from one ``torch.Generator`` (CPU) so a run is reproducible; musubi mixes torch's
global generator with Python's ``random`` (buckets), so draws match musubi in distribution, not
sample for sample. All results are float32 CPU tensors; callers move them to their device.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Sequence

import torch

from wan.train.timestep_settings import (NUM_TRAIN_TIMESTEPS, SAMPLINGS, WEIGHTINGS, TimestepSettings,  # noqa: F401
                                        TimestepSettingsError)

if TYPE_CHECKING:
    from PIL import ImageDraw

log = logging.getLogger(__name__)

# Resolution-dependent shift: mu is linear in the token count (h//2)*(w//2) of one latent frame through
# these two points (tokens, mu), and shift = exp(mu) (musubi's utils/train_utils.py: get_lin_function).
RESOLUTION_SHIFT_LINES = {"flux": ((256, 0.5), (4096, 1.15)), "qwen": ((256, 0.5), (8192, 0.9))}

# qinglong hybrid: per sample, a uniform "decision" draw picks the sampler (thresholds as in musubi)
QINGLONG_LOGSNR2 = (5.36, 1.0)  # (mean, std) of the low-noise logsnr sampler
REJECTION_ROUNDS = 1000  # musubi's max_loops for preserve_distribution_shape
INVERSE_CDF_EPS = 1e-7   # bucketed uniforms are clamped before the normal inverse CDF, as musubi does

class TimestepSample(NamedTuple):
    """One batch of noise levels.

    sigmas: [B] float32 in [0, 1], the noise level of ``x_t``.
    timesteps: [B] float32 on the 0..1000 scale, what the DiT is given (see the module docstring).
    """

    sigmas: torch.Tensor
    timesteps: torch.Tensor


# ----------------------------------------------------------------------------- building blocks


def shift_sigmas(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The flow shift ``s*t / (1 + (s-1)*t)``: monotone on [0, 1], fixes 0 and 1; s > 1 moves toward noise."""
    return (t * shift) / (1 + (shift - 1) * t)


def resolution_shift(kind: str, latent_shape: Sequence[int]) -> float:
    """exp(mu) with mu linear in the tokens per latent frame, ``(H//2) * (W//2)`` of ``latent_shape``
    (any shape ending in H, W; the 2x2 patch of Wan and FLUX), through ``RESOLUTION_SHIFT_LINES[kind]``."""
    (x1, y1), (x2, y2) = RESOLUTION_SHIFT_LINES[kind]
    h, w = latent_shape[-2:]
    slope = (y2 - y1) / (x2 - x1)
    mu = slope * ((h // 2) * (w // 2)) + (y1 - slope * x1)
    return math.exp(mu)


def _normal_from(u: torch.Tensor | None, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """[n] standard normals: drawn, or from given uniforms ``u`` by the inverse CDF (bucketed sampling)."""
    if u is None:
        return torch.randn(n, generator=generator)
    u = u.clamp(INVERSE_CDF_EPS, 1.0 - INVERSE_CDF_EPS)
    return math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)


def _logsnr_t(u, n, mean, std, generator) -> torch.Tensor:
    """t = sigmoid(-logsnr / 2) with logsnr ~ N(mean, std) (Style-Friendly SNR sampler)."""
    if u is None:
        logsnr = torch.normal(mean, std, (n,), generator=generator)
    else:
        logsnr = mean + std * _normal_from(u, n, None)
    return torch.sigmoid(-logsnr / 2)


def _shifted_sigmoid_t(settings, u, n, shift, generator) -> torch.Tensor:
    """t = shift(sigmoid(sigmoid_scale * z)), z standard normal."""
    t = torch.sigmoid(_normal_from(u, n, generator) * settings.sigmoid_scale)
    return shift_sigmas(t, shift)


def _need_latent_shape(settings, latent_shape):
    if latent_shape is None:
        raise TimestepSettingsError(
            f"timestep settings: timestep_sampling: {settings.timestep_sampling!r} computes its shift from the "
            "latent size; pass latent_shape (a shape ending in the latent H, W)")
    return latent_shape


def _qinglong_t(settings, u, n, latent_shape, generator) -> torch.Tensor:
    """The qinglong hybrid. Per sample a uniform decision d picks: qinglong_flux: d < 0.79 flux_shift,
    0.79 <= d < 0.9 logsnr(logit_mean, logit_std), d >= 0.9 logsnr(5.36, 1); qinglong_qwen: d < 0.95
    qwen_shift, else logsnr(5.36, 1)."""
    flux = settings.timestep_sampling == "qinglong_flux"
    decision = torch.rand(n, generator=generator)
    mid = decision < (0.79 if flux else 0.95)
    mid_logsnr = (decision >= 0.79) & (decision < 0.9) if flux else torch.zeros_like(mid)
    low_noise = decision >= (0.9 if flux else 0.95)
    t = torch.zeros(n)
    if mid.any():
        shift = resolution_shift("flux" if flux else "qwen", _need_latent_shape(settings, latent_shape))
        t[mid] = _shifted_sigmoid_t(settings, None if u is None else u[mid], int(mid.sum()), shift, generator)
    if mid_logsnr.any():
        t[mid_logsnr] = _logsnr_t(None if u is None else u[mid_logsnr], int(mid_logsnr.sum()),
                                  settings.logit_mean, settings.logit_std, generator)
    if low_noise.any():
        t[low_noise] = _logsnr_t(None if u is None else u[low_noise], int(low_noise.sum()),
                                 *QINGLONG_LOGSNR2, generator)
    return t


def draw_t(settings: TimestepSettings, n: int, generator: torch.Generator | None = None,
           latent_shape: Sequence[int] | None = None, u: torch.Tensor | None = None) -> torch.Tensor:
    """[n] noise levels in [0, 1] from the distribution of ``settings.timestep_sampling`` (not ``sigma``),
    before any min/max timestep. ``u`` [n]: stratified uniforms to push through the distribution's
    inverse (bucketed sampling); without it the normals are drawn directly, as musubi does."""
    mode = settings.timestep_sampling
    if mode == "uniform":
        return torch.rand(n, generator=generator) if u is None else u.float()
    if mode == "sigmoid":
        return _shifted_sigmoid_t(settings, u, n, 1.0, generator)
    if mode == "shift":
        return _shifted_sigmoid_t(settings, u, n, settings.discrete_flow_shift, generator)
    if mode in ("flux_shift", "qwen_shift"):
        shift = resolution_shift(mode.removesuffix("_shift"), _need_latent_shape(settings, latent_shape))
        return _shifted_sigmoid_t(settings, u, n, shift, generator)
    if mode == "logsnr":
        return _logsnr_t(u, n, settings.logit_mean, settings.logit_std, generator)
    if mode.startswith("qinglong"):
        return _qinglong_t(settings, u, n, latent_shape, generator)
    raise TimestepSettingsError.bad("timestep settings", "timestep_sampling", mode,
                                    "one of " + ", ".join(s for s in SAMPLINGS if s != "sigma"))


class BucketPool:
    """Stratified uniforms for ``num_timestep_buckets``: the strata [i/N, (i+1)/N) are dealt in a shuffled
    order, one draw each, and re-dealt once all N are used, so every run of N draws covers each stratum
    once (musubi's trainer ``get_bucketed_timestep``; its dataset deals an epoch's pool the same way).
    Keep one pool for a whole training run so the strata balance across steps."""

    def __init__(self, num_buckets: int):
        self.num_buckets = num_buckets
        self._left: list[int] = []

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """[n] float32 uniforms, each from the next stratum of the deal."""
        strata = []
        for _ in range(n):
            if not self._left:
                self._left = torch.randperm(self.num_buckets, generator=generator).tolist()
            strata.append(self._left.pop())
        low = torch.tensor(strata, dtype=torch.float64) / self.num_buckets
        return (low + torch.rand(n, generator=generator, dtype=torch.float64) / self.num_buckets).float()


def schedule_grid() -> tuple[torch.Tensor, torch.Tensor]:
    """The unshifted training grid of musubi's ``FlowMatchDiscreteScheduler``: sigmas [1001] =
    ``linspace(1, 0, 1001)`` and timesteps [1000] = ``1000 * sigmas[:-1]`` (1000 down to 1), float32."""
    sigmas = torch.linspace(1, 0, NUM_TRAIN_TIMESTEPS + 1)
    return sigmas, (sigmas[:-1] * NUM_TRAIN_TIMESTEPS).to(torch.float32)


def density_uniforms(settings: TimestepSettings, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """[n] values in [0, 1] with the SD3 density of ``weighting_scheme`` (musubi's
    ``compute_density_for_timestep_sampling``): logit_normal: sigmoid(N(logit_mean, logit_std)); mode:
    ``1 - u - mode_scale * (cos(pi*u/2)**2 - 1 + u)``, u uniform; otherwise uniform."""
    if settings.weighting_scheme == "logit_normal":
        return torch.sigmoid(torch.normal(settings.logit_mean, settings.logit_std, (n,), generator=generator))
    u = torch.rand(n, generator=generator)
    if settings.weighting_scheme == "mode":
        u = 1 - u - settings.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def _sample_sigma_mode(settings, batch_size, generator) -> TimestepSample:
    """The default mode: an index of the unshifted grid, ``int(u * (max - min) + min)``."""
    lo, hi = settings.timestep_range
    u = density_uniforms(settings, batch_size, generator)
    # musubi indexes with this value unchecked; the clamp only guards u == 1 exactly and mode_scale values
    # large enough to leave [0, 1] (where musubi would fail or wrap around)
    index = (u * (hi - lo) + lo).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
    sigmas, timesteps = schedule_grid()
    return TimestepSample(sigmas[index], timesteps[index])


def _rejection_t(settings, batch_size, generator, latent_shape, pool) -> torch.Tensor:
    """``preserve_distribution_shape``: keep drawing batches and keep the draws inside [min, max] (bounds
    included) until there are ``batch_size``; after ``REJECTION_ROUNDS`` rounds, warn and give an
    unconstrained batch (musubi's fallback)."""
    lo, hi = (x / NUM_TRAIN_TIMESTEPS for x in settings.timestep_range)
    kept: list[torch.Tensor] = []
    count = 0
    for _ in range(REJECTION_ROUNDS):
        u = pool.draw(batch_size, generator) if pool is not None else None
        t = draw_t(settings, batch_size, generator, latent_shape, u)
        inside = t[(t >= lo) & (t <= hi)][:batch_size - count]
        kept.append(inside)
        count += len(inside)
        if count == batch_size:
            return torch.cat(kept)
    log.warning("could not draw %d timesteps inside [%s, %s] in %d rounds; using unconstrained ones",
                batch_size, settings.min_timestep, settings.max_timestep, REJECTION_ROUNDS)
    return t


def _pool_for(settings: TimestepSettings, pool: BucketPool | None) -> BucketPool | None:
    buckets = settings.num_timestep_buckets
    if buckets is None or buckets <= 1:
        return None
    return pool if pool is not None else BucketPool(buckets)


# ----------------------------------------------------------------------------- public


def sample_sigmas(settings: TimestepSettings, batch_size: int, generator: torch.Generator | None = None,
                  latent_shape: Sequence[int] | None = None, pool: BucketPool | None = None) -> TimestepSample:
    """Draw one batch of noise levels and DiT timesteps, as musubi's ``get_noisy_model_input_and_timesteps``.

    Args:
        settings: the timestep settings.
        batch_size: B.
        generator: a CPU ``torch.Generator`` (None: torch's global one).
        latent_shape: shape of the latents, ending in (H, W) of the latent grid: needed by flux_shift,
            qwen_shift and qinglong_*, which compute their shift from (H//2)*(W//2).
        pool: the :class:`BucketPool` of the run when ``num_timestep_buckets`` > 1; without one a fresh pool
            stratifies this batch only.

    Returns:
        :class:`TimestepSample`: sigmas [B] in [0, 1], timesteps [B] (``1000*sigma + 1``, or ``1000*sigma``
        in ``sigma`` mode).

    Non-sigma modes: the draw t in [0, 1] is rescaled onto [min_timestep, max_timestep] / 1000
    (``t * (max - min) + min``) or, with ``preserve_distribution_shape``, rejection-sampled inside it.
    """
    if settings.timestep_sampling == "sigma":
        return _sample_sigma_mode(settings, batch_size, generator)
    pool = _pool_for(settings, pool)
    if settings.preserve_distribution_shape:
        t = _rejection_t(settings, batch_size, generator, latent_shape, pool)
    else:
        lo, hi = (x / NUM_TRAIN_TIMESTEPS for x in settings.timestep_range)
        u = pool.draw(batch_size, generator) if pool is not None else None
        t = draw_t(settings, batch_size, generator, latent_shape, u) * (hi - lo) + lo
    t = t.float()
    return TimestepSample(t, t * NUM_TRAIN_TIMESTEPS + 1)


def sample_for_expert(settings: TimestepSettings, batch_size: int, boundary: float,
                      generator: torch.Generator | None = None, latent_shape: Sequence[int] | None = None,
                      pool: BucketPool | None = None, tries: int = 100) -> tuple[TimestepSample, bool]:
    """Wan 2.2 two-expert training (musubi's ``wan_train_network.get_noisy_model_input_and_timesteps``):
    the first draw picks the expert (high noise when ``timestep / 1000 >= boundary``, boundary in [0, 1]);
    each batch item is then redrawn alone, up to ``tries`` times, until it falls on that side. If an item
    never does, a warning is logged and an unconstrained batch is returned (musubi's fallback).

    Returns:
        (the batch, whether it is for the high-noise expert).
    """
    pool = _pool_for(settings, pool)
    first = sample_sigmas(settings, 1, generator, latent_shape, pool)
    high = bool(first.timesteps[0] / NUM_TRAIN_TIMESTEPS >= boundary)
    picked: list[TimestepSample] = []
    for _ in range(batch_size):
        for _ in range(tries):
            one = sample_sigmas(settings, 1, generator, latent_shape, pool)
            if bool(one.timesteps[0] / NUM_TRAIN_TIMESTEPS >= boundary) == high:
                picked.append(one)
                break
    if len(picked) < batch_size:
        log.warning("no timestep on the %s-noise side of boundary %s in %d tries; batch left unconstrained",
                    "high" if high else "low", boundary, tries)
        return sample_sigmas(settings, batch_size, generator, latent_shape, pool), high
    return TimestepSample(torch.cat([p.sigmas for p in picked]), torch.cat([p.timesteps for p in picked])), high


def weighting_sigmas(timesteps: torch.Tensor) -> torch.Tensor:
    """[B] sigmas musubi weights the loss with: the timestep fed to the DiT looked up on the unshifted
    grid (nearest of 1000..1, ties to the larger), so ``clamp(round(timestep), 1, 1000) / 1000``: with the
    +1 of the non-sigma modes this is about sigma + 0.001 and never 0 (musubi's ``get_sigmas``)."""
    sigmas, grid = schedule_grid()
    index = (grid[None, :] - timesteps.float().reshape(-1, 1)).abs().argmin(dim=1)
    return sigmas[index]


def loss_weighting(settings: TimestepSettings, sigmas: torch.Tensor) -> torch.Tensor:
    """[B] float32 per-item loss weights of ``weighting_scheme`` (musubi's ``compute_loss_weighting_for_sd3``):
    sigma_sqrt: ``sigma**-2``; cosmap: ``2 / (pi * (1 - 2*sigma + 2*sigma**2))``; none, logit_normal, mode:
    ones (musubi applies no weight for them). Pass :func:`weighting_sigmas` of the timesteps to weigh as
    musubi does; sigma_sqrt is infinite at sigma = 0."""
    s = sigmas.float()
    if settings.weighting_scheme == "sigma_sqrt":
        return s ** -2.0
    if settings.weighting_scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    return torch.ones_like(s)


def timestep_counts(settings: TimestepSettings, n: int, generator: torch.Generator | None = None,
                    latent_shape: Sequence[int] | None = None, batch_size: int = 1000) -> torch.Tensor:
    """[1000] int64 counts of ``int(1000 * sigma)`` over ``n`` draws in batches of ``batch_size`` (musubi's
    ``show_timesteps``). ``latent_shape`` defaults to a 1024x1024 image's latent, as musubi's does."""
    latent_shape = latent_shape if latent_shape is not None else (1024 // 8, 1024 // 8)
    pool = _pool_for(settings, None)
    counts = torch.zeros(NUM_TRAIN_TIMESTEPS, dtype=torch.int64)
    for start in range(0, n, batch_size):
        sigmas = sample_sigmas(settings, min(batch_size, n - start), generator, latent_shape, pool).sigmas
        bins = (sigmas * NUM_TRAIN_TIMESTEPS).long().clamp(0, NUM_TRAIN_TIMESTEPS - 1)
        counts += torch.bincount(bins, minlength=NUM_TRAIN_TIMESTEPS)
    return counts


def weighting_curve(settings: TimestepSettings) -> torch.Tensor:
    """[1000] loss weight at timesteps 1..1000 (an infinite weight shown as 1, as musubi shows it)."""
    sigmas, _ = schedule_grid()
    w = loss_weighting(settings, sigmas[:-1].flip(0))
    return torch.where(torch.isinf(w), torch.ones_like(w), w)


def timestep_histogram(settings: TimestepSettings, n: int, path: str | Path,
                       generator: torch.Generator | None = None,
                       latent_shape: Sequence[int] | None = None) -> Path:
    """Write a PNG for ``--show_timesteps``: the histogram of ``n`` sampled timesteps (1000 bins of
    ``1000 * sigma``) beside the loss weighting per timestep. Returns the path."""
    counts = timestep_counts(settings, n, generator, latent_shape).float()
    title = f"sampled timesteps: {settings.timestep_sampling}, n={n}"
    panels = [(title, counts), (f"loss weighting: {settings.weighting_scheme}", weighting_curve(settings))]
    from PIL import Image, ImageDraw  # only here: the trainer imports this module without pillow
    image = Image.new("RGB", (2 * _PANEL_W, _PANEL_H), "white")
    draw = ImageDraw.Draw(image)
    for i, (name, values) in enumerate(panels):
        _draw_bars(draw, i * _PANEL_W, name, values)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    return path


# plot layout: two panels side by side, each with a 1000-pixel plot area (one column per timestep)
_PANEL_W, _PANEL_H = 1100, 420
_LEFT, _TOP, _BOTTOM = 70, 30, 40


def _draw_bars(draw: "ImageDraw.ImageDraw", x0: int, title: str, values: torch.Tensor) -> None:
    """One panel at x offset ``x0``: a bar per value (1 px wide), y axis from 0 to the maximum."""
    height = _PANEL_H - _TOP - _BOTTOM
    base = _PANEL_H - _BOTTOM
    top = float(values.max()) if len(values) and float(values.max()) > 0 else 1.0
    draw.text((x0 + _LEFT, 8), title, fill="black")
    for i, v in enumerate(values.tolist()):
        bar = round(height * v / top)
        if bar > 0:
            draw.line([(x0 + _LEFT + i, base), (x0 + _LEFT + i, base - bar)], fill=(31, 119, 180))
    draw.line([(x0 + _LEFT, base), (x0 + _LEFT + len(values), base)], fill="black")
    draw.line([(x0 + _LEFT - 1, base), (x0 + _LEFT - 1, _TOP)], fill="black")
    draw.text((x0 + 4, _TOP), f"{top:.4g}", fill="black")
    draw.text((x0 + 4, base - 10), "0", fill="black")
    for tick in range(0, len(values) + 1, 200):
        draw.line([(x0 + _LEFT + tick, base), (x0 + _LEFT + tick, base + 4)], fill="black")
        draw.text((x0 + _LEFT + tick - 8, base + 6), str(tick), fill="black")
    draw.text((x0 + _LEFT + len(values) // 2 - 24, base + 22), "timestep", fill="black")
