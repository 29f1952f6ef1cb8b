"""Timestep sampling and the flow-matching loss of LoRA training, against their formulas.

Each sampler is checked statistically: 100k seeded draws, the empirical CDF against the analytic CDF
of musubi-tuner's formula at 199 points, max gap < 0.01 (the 99.9% Kolmogorov band for 100k draws
is about 0.006). Analytic CDFs use the normal CDF (``torch.special.ndtr``) and push points through
the inverse of the (monotone) shift map. The loss pieces are checked against hand computations.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image

from wan.config import ConfigError, validate
from wan.train.loss import flow_loss, flow_target, noisy_input, ti2v_token_timesteps
from wan.train.timesteps import (BucketPool, TimestepSettings, TimestepSettingsError, loss_weighting,
                                 resolution_shift, sample_for_expert, sample_sigmas, timestep_counts,
                                 timestep_histogram, weighting_sigmas)

N = 100_000
CDF_TOL = 0.01
XS = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
WAN_480P_LATENT = (1, 16, 21, 60, 104)  # [B, C, F, H, W] of an 832x480, 81-frame Wan 2.1 video
TOKENS_480P = 30 * 52                   # (H // 2) * (W // 2)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logit(x):
    return torch.log(x / (1 - x))


def ndtr(x):
    return torch.special.ndtr(x)


def sigmoid_cdf(x, scale=1.0, shift=1.0):
    """CDF of shift(sigmoid(scale * z)): the shift map y -> s*y/(1+(s-1)*y) inverts to x/(s-(s-1)*x)."""
    y = x / (shift - (shift - 1) * x)
    return ndtr(logit(y) / scale)


def logsnr_cdf(x, mean, std):
    """t = sigmoid(-L/2), L ~ N(mean, std): t <= x  <=>  L >= -2 logit(x)."""
    return 1 - ndtr((-2 * logit(x) - mean) / std)


def cdf_gap(samples: torch.Tensor, cdf, xs=XS) -> float:
    s = samples.double()
    empirical = (s[None, :] <= xs[:, None]).double().mean(dim=1)
    return float((empirical - cdf(xs)).abs().max())


def flux_shift(tokens):
    return math.exp(0.5 + (tokens - 256) * (1.15 - 0.5) / (4096 - 256))


def qwen_shift(tokens):
    return math.exp(0.5 + (tokens - 256) * (0.9 - 0.5) / (8192 - 256))


# ----------------------------------------------------------------------------- samplers vs formulas

SAMPLERS = {
    "uniform": (dict(timestep_sampling="uniform"), lambda x: x),
    "sigmoid": (dict(timestep_sampling="sigmoid", sigmoid_scale=1.5), lambda x: sigmoid_cdf(x, 1.5)),
    "shift": (dict(timestep_sampling="shift", discrete_flow_shift=3.0), lambda x: sigmoid_cdf(x, 1.0, 3.0)),
    "shift_scaled": (dict(timestep_sampling="shift", discrete_flow_shift=5.0, sigmoid_scale=2.0),
                     lambda x: sigmoid_cdf(x, 2.0, 5.0)),
    "flux_shift": (dict(timestep_sampling="flux_shift"), lambda x: sigmoid_cdf(x, 1.0, flux_shift(TOKENS_480P))),
    "qwen_shift": (dict(timestep_sampling="qwen_shift"), lambda x: sigmoid_cdf(x, 1.0, qwen_shift(TOKENS_480P))),
    "logsnr": (dict(timestep_sampling="logsnr", logit_mean=-6.0, logit_std=2.0), lambda x: logsnr_cdf(x, -6.0, 2.0)),
    "qinglong_flux": (dict(timestep_sampling="qinglong_flux", logit_mean=-6.0, logit_std=2.0),
                      lambda x: 0.79 * sigmoid_cdf(x, 1.0, flux_shift(TOKENS_480P)) + 0.11 * logsnr_cdf(x, -6.0, 2.0)
                      + 0.10 * logsnr_cdf(x, 5.36, 1.0)),
    "qinglong_qwen": (dict(timestep_sampling="qinglong_qwen", logit_mean=-6.0, logit_std=2.0),
                      lambda x: 0.95 * sigmoid_cdf(x, 1.0, qwen_shift(TOKENS_480P)) + 0.05 * logsnr_cdf(x, 5.36, 1.0)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_matches_its_cdf(name):
    fields, cdf = SAMPLERS[name]
    sample = sample_sigmas(TimestepSettings(**fields), N, gen(1), latent_shape=WAN_480P_LATENT)
    assert sample.sigmas.dtype == torch.float32 and sample.sigmas.shape == (N,)
    assert 0 <= float(sample.sigmas.min()) and float(sample.sigmas.max()) <= 1
    assert cdf_gap(sample.sigmas, cdf) < CDF_TOL
    # musubi feeds 1000*t + 1 to the DiT in every mode but sigma
    assert torch.equal(sample.timesteps, sample.sigmas * 1000 + 1)


def test_resolution_shift_follows_the_token_line():
    assert resolution_shift("flux", (32, 32)) == pytest.approx(math.exp(0.5))      # 16 * 16 = 256 tokens
    assert resolution_shift("flux", (128, 128)) == pytest.approx(math.exp(1.15))   # 64 * 64 = 4096 tokens
    assert resolution_shift("qwen", WAN_480P_LATENT) == pytest.approx(qwen_shift(TOKENS_480P))


def test_resolution_modes_need_the_latent_shape():
    with pytest.raises(TimestepSettingsError, match="latent_shape"):
        sample_sigmas(TimestepSettings(timestep_sampling="flux_shift"), 2, gen())


# ----------------------------------------------------------------------------- the default sigma mode

def grid_index(sample) -> torch.Tensor:
    """Index into musubi's grid (timestep 1000 - index); timesteps are 1000 * sigma there, no +1."""
    index = torch.round(1000 - sample.timesteps).long()
    assert torch.allclose(sample.timesteps, sample.sigmas * 1000, atol=1e-3)
    assert torch.allclose(sample.sigmas, 1 - index / 1000, atol=1e-6)
    return index


def index_gap(index: torch.Tensor, cdf_at_grid) -> float:
    """P(index < k) = P(u < k/1000) = F_u(k/1000) exactly, since index = int(1000 u)."""
    ks = torch.arange(5, 1000, 5, dtype=torch.float64)
    empirical = (index[None, :] < ks[:, None]).double().mean(dim=1)
    return float((empirical - cdf_at_grid(ks / 1000)).abs().max())


def test_sigma_mode_is_uniform_on_the_unshifted_grid_and_ignores_the_shift():
    sample = sample_sigmas(TimestepSettings(), N, gen(2))
    index = grid_index(sample)
    assert int(index.min()) >= 0 and int(index.max()) <= 999
    assert 1 <= float(sample.timesteps.min()) and float(sample.timesteps.max()) <= 1000
    assert index_gap(index, lambda x: x) < CDF_TOL
    # the caveat: discrete_flow_shift changes nothing in this mode
    shifted = sample_sigmas(TimestepSettings(discrete_flow_shift=7.0), N, gen(2))
    assert torch.equal(shifted.sigmas, sample.sigmas) and torch.equal(shifted.timesteps, sample.timesteps)


def test_sigma_mode_logit_normal_density():
    settings = TimestepSettings(weighting_scheme="logit_normal", logit_mean=0.5, logit_std=1.2)
    index = grid_index(sample_sigmas(settings, N, gen(3)))
    assert index_gap(index, lambda x: ndtr((logit(x) - 0.5) / 1.2)) < CDF_TOL


def test_sigma_mode_mode_density():
    scale = 1.29
    f = lambda v: 1 - v - scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)  # decreasing on [0, 1]

    def cdf(x):  # P(f(V) < x) = P(V > f^-1(x)) = 1 - f^-1(x); invert by bisection
        lo, hi = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            mid = (lo + hi) / 2
            above = f(mid) > x
            lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 1 - (lo + hi) / 2

    index = grid_index(sample_sigmas(TimestepSettings(weighting_scheme="mode"), N, gen(4)))
    assert index_gap(index, cdf) < CDF_TOL


def test_sigma_mode_min_max_select_grid_indices_from_the_noisy_end():
    settings = TimestepSettings(min_timestep=200, max_timestep=600)
    sample = sample_sigmas(settings, N, gen(5))
    index = grid_index(sample)
    assert int(index.min()) == 200 and int(index.max()) == 599
    assert 401 - 1e-3 <= float(sample.timesteps.min()) and float(sample.timesteps.max()) <= 800 + 1e-3
    assert index_gap(index, lambda x: ((x - 0.2) / 0.4).clamp(0, 1)) < CDF_TOL


# ----------------------------------------------------------------------------- min / max timestep

def test_min_max_rescale_maps_linearly():
    settings = TimestepSettings(timestep_sampling="sigmoid", min_timestep=200, max_timestep=600)
    t = sample_sigmas(settings, N, gen(6)).sigmas
    assert 0.2 <= float(t.min()) and float(t.max()) <= 0.6
    xs = torch.linspace(0.202, 0.598, 199, dtype=torch.float64)
    assert cdf_gap(t, lambda x: sigmoid_cdf((x - 0.2) / 0.4), xs) < CDF_TOL


def test_min_max_rejection_keeps_the_conditional_distribution():
    settings = TimestepSettings(timestep_sampling="shift", discrete_flow_shift=3.0, min_timestep=200,
                                max_timestep=600, preserve_distribution_shape=True)
    sample = sample_sigmas(settings, N, gen(7))
    t = sample.sigmas
    assert t.shape == (N,) and 0.2 <= float(t.min()) and float(t.max()) <= 0.6
    cdf = lambda x: sigmoid_cdf(x, 1.0, 3.0)
    lo, hi = cdf(torch.tensor(0.2, dtype=torch.float64)), cdf(torch.tensor(0.6, dtype=torch.float64))
    xs = torch.linspace(0.202, 0.598, 199, dtype=torch.float64)
    assert cdf_gap(t, lambda x: (cdf(x) - lo) / (hi - lo), xs) < CDF_TOL
    assert torch.equal(sample.timesteps, t * 1000 + 1)


def test_rejection_falls_back_to_unconstrained_draws_with_a_warning(caplog):
    # sigmoid(0.1 z) essentially never reaches 0.99
    settings = TimestepSettings(timestep_sampling="sigmoid", sigmoid_scale=0.1, min_timestep=990,
                                max_timestep=1000, preserve_distribution_shape=True)
    with caplog.at_level(logging.WARNING, logger="wan.train.timesteps"):
        sample = sample_sigmas(settings, 3, gen(8))
    assert sample.sigmas.shape == (3,) and float(sample.sigmas.max()) < 0.99
    assert "could not draw 3 timesteps" in caplog.text


# ----------------------------------------------------------------------------- buckets

def test_buckets_give_each_stratum_its_share():
    settings = TimestepSettings(timestep_sampling="uniform", num_timestep_buckets=4)
    pool, g = BucketPool(4), gen(9)
    t = torch.cat([sample_sigmas(settings, 6, g, pool=pool).sigmas for _ in range(1000)])  # 6000 draws
    strata = (t * 4).long()
    assert torch.bincount(strata, minlength=4).tolist() == [1500] * 4
    # every run of 4 consecutive draws covers the 4 strata once
    assert all(sorted(strata[i:i + 4].tolist()) == [0, 1, 2, 3] for i in range(0, len(t), 4))


def test_buckets_stratify_the_uniform_behind_a_shaped_distribution():
    settings = TimestepSettings(timestep_sampling="sigmoid", num_timestep_buckets=5)
    pool, g = BucketPool(5), gen(10)
    t = torch.cat([sample_sigmas(settings, 10, g, pool=pool).sigmas for _ in range(200)]).double()
    edges = torch.sigmoid(torch.special.ndtri(torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)))
    assert torch.bincount(torch.bucketize(t, edges), minlength=5).tolist() == [400] * 5


def test_sigma_mode_ignores_buckets():
    plain = sample_sigmas(TimestepSettings(), 64, gen(11))
    bucketed = sample_sigmas(TimestepSettings(num_timestep_buckets=4), 64, gen(11))
    assert torch.equal(plain.sigmas, bucketed.sigmas)


def test_expert_sampling_keeps_the_batch_on_one_side_of_the_boundary():
    settings = TimestepSettings(timestep_sampling="uniform")
    for seed in range(6):
        sample, high = sample_for_expert(settings, 8, 0.875, gen(seed))
        on_high_side = sample.timesteps / 1000 >= 0.875
        assert sample.sigmas.shape == (8,) and bool(on_high_side.all() if high else (~on_high_side).all())


# ----------------------------------------------------------------------------- loss weighting

def test_loss_weighting_formulas():
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    expect = {"sigma_sqrt": [100.0, 4.0, 1 / 0.81],
              "cosmap": [2 / (math.pi * (1 - 2 * s + 2 * s * s)) for s in (0.1, 0.5, 0.9)],
              "none": [1.0] * 3, "logit_normal": [1.0] * 3, "mode": [1.0] * 3}
    for scheme, values in expect.items():
        w = loss_weighting(TimestepSettings(weighting_scheme=scheme), sigmas)
        assert w.dtype == torch.float32
        assert torch.allclose(w, torch.tensor(values), rtol=1e-6), scheme


def test_weighting_sigmas_look_the_timestep_up_on_the_grid():
    timesteps = torch.tensor([1.0, 1.4, 500.6, 1000.9, 1001.0])
    assert torch.allclose(weighting_sigmas(timesteps), torch.tensor([0.001, 0.001, 0.501, 1.0, 1.0]))
    grid = sample_sigmas(TimestepSettings(), 256, gen(12))
    assert torch.equal(weighting_sigmas(grid.timesteps), grid.sigmas)


# ----------------------------------------------------------------------------- the loss pieces

def small(seed):
    return torch.randn(2, 3, 3, 2, 2, generator=gen(seed))  # [B, C, F, H, W]


def test_noisy_input_target_and_loss_by_hand():
    x0, noise, sigma = small(20), small(21), torch.tensor([0.25, 0.75])
    x_t, target = noisy_input(x0, noise, sigma), flow_target(x0, noise)
    pred, weighting = small(22), torch.tensor([2.0, 0.5])
    hand_xt, hand_target, total, count = torch.empty_like(x0), torch.empty_like(x0), 0.0, 0
    for index in torch.cartesian_prod(*[torch.arange(n) for n in x0.shape]).tolist():
        b = index[0]
        a, e = float(x0[tuple(index)]), float(noise[tuple(index)])
        hand_xt[tuple(index)] = (1 - float(sigma[b])) * a + float(sigma[b]) * e
        hand_target[tuple(index)] = e - a
        total += float(weighting[b]) * (float(pred[tuple(index)]) - (e - a)) ** 2
        count += 1
    assert x_t.dtype == target.dtype == torch.float32
    assert torch.allclose(x_t, hand_xt, rtol=1e-6, atol=1e-7)
    assert torch.allclose(target, hand_target, rtol=1e-6, atol=1e-7)
    loss = flow_loss(pred, target, weighting)
    assert loss.ndim == 0 and loss.dtype == torch.float32
    assert float(loss) == pytest.approx(total / count, rel=1e-6)
    assert float(flow_loss(pred, target)) == pytest.approx(float(((pred - target) ** 2).mean()), rel=1e-6)


def test_ti2v_first_frame_stays_clean():
    x0, noise, sigma = small(30), small(31), torch.tensor([0.4, 0.9])
    x_t = noisy_input(x0, noise, sigma, first_frame_clean=True)
    assert torch.equal(x_t[:, :, 0], x0[:, :, 0])
    assert torch.allclose(x_t[:, :, 1:], noisy_input(x0, noise, sigma)[:, :, 1:], rtol=1e-6)
    pred, target = small(32), flow_target(x0, noise)
    hand = float(((pred[:, :, 1:] - target[:, :, 1:]) ** 2).mean())
    assert float(flow_loss(pred, target, first_frame_clean=True)) == pytest.approx(hand, rel=1e-6)


def test_ti2v_token_timesteps_match_the_engine():
    from wan.engine.conditioning import Conditioning

    shape = (2, 48, 3, 4, 6)  # [B, C, F, H, W]: 3 * 2 * 3 = 18 tokens, 6 per latent frame
    timesteps = torch.tensor([701.5, 12.0])
    tokens = ti2v_token_timesteps(timesteps, shape)
    assert tokens.shape == (2, 18)
    assert torch.equal(tokens[:, :6], torch.zeros(2, 6))
    assert torch.equal(tokens[:, 6:], timesteps[:, None].expand(2, 12))
    mask = torch.ones(shape[1:])
    mask[:, 0] = 0
    cond = Conditioning(shape[1:], (48, 32), fixed_mask=mask)
    for b in range(2):
        assert torch.equal(tokens[b:b + 1], cond.token_timesteps(timesteps[b], (1, 2, 2)))


# ----------------------------------------------------------------------------- histogram, settings

def test_histogram_is_a_png(tmp_path):
    settings = TimestepSettings(timestep_sampling="shift", discrete_flow_shift=3.0, weighting_scheme="cosmap")
    assert int(timestep_counts(settings, 5000, gen(40)).sum()) == 5000
    path = timestep_histogram(settings, 20_000, tmp_path / "sub" / "timesteps.png", gen(41))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 1000


def test_defaults_are_musubis():
    s = TimestepSettings()
    assert (s.timestep_sampling, s.discrete_flow_shift, s.sigmoid_scale, s.logit_mean, s.logit_std, s.mode_scale,
            s.weighting_scheme, s.min_timestep, s.max_timestep, s.preserve_distribution_shape,
            s.num_timestep_buckets) == ("sigma", 1.0, 1.0, 0.0, 1.0, 1.29, "none", None, None, False, None)


def test_bad_values_name_the_field_the_value_and_what_is_allowed():
    with pytest.raises(TimestepSettingsError, match=r"timestep_sampling: 'sigmas' is not allowed; expected one "
                                                    r"of sigma, uniform, sigmoid, shift, flux_shift"):
        TimestepSettings(timestep_sampling="sigmas")
    with pytest.raises(TimestepSettingsError, match=r"weighting_scheme: 'snr' .*none, logit_normal, mode, cosmap"):
        TimestepSettings(weighting_scheme="snr")
    with pytest.raises(TimestepSettingsError, match=r"discrete_flow_shift: 0 is not allowed; expected a number > 0"):
        TimestepSettings(discrete_flow_shift=0)
    with pytest.raises(TimestepSettingsError, match=r"max_timestep: 1001 .*<= 1000"):
        TimestepSettings(max_timestep=1001)
    with pytest.raises(ValueError, match="above min_timestep"):
        TimestepSettings(min_timestep=600, max_timestep=600)
    with pytest.raises(ConfigError, match=r"train\.toml: max_timestep: 100 is not allowed; expected .*min_timestep"):
        validate(TimestepSettings, {"min_timestep": 500, "max_timestep": 100}, "train.toml")
    with pytest.raises(ConfigError, match=r"train\.toml: timestep_samplin: unknown key"):
        validate(TimestepSettings, {"timestep_samplin": "shift"}, "train.toml")
    read = validate(TimestepSettings, {"timestep_sampling": "shift", "discrete_flow_shift": 3}, "train.toml")
    assert read.discrete_flow_shift == 3.0 and isinstance(read.discrete_flow_shift, float)
