"""Flow-matching samplers of the generation engine, step for step as the official Wan code.

Conventions (official ``wan/utils/fm_solvers*.py``, used unchanged by Wan 2.1 and 2.2):

- A latent at noise level σ is ``x_σ = (1 - σ)·x0 + σ·ε`` and the model predicts the flow
  ``v = ε - x0``, so the clean estimate is ``x0 = x_σ - σ·v``.
- ``timesteps[i]`` is what the model receives at step ``i`` (0..1000 scale); ``sigmas[i]`` is
  the noise level the solver assumes there; ``sigmas[-1] == 0``.

Sigma grids, each built in float64 NumPy exactly as its reference builds it, then stored in
float32 (the references keep their sigma tables in float32 and do the solver scalars in
float32 too, which we mirror):

- ``unipc``: ``linspace(σ_max, 0, N+1)[:-1]`` with ``σ_max = float32(0.999)`` (the first entry of
  the scheduler's float32 training table, read back as a Python float: 0.9990000128746...),
  shifted by ``s·σ/(1+(s-1)·σ)``; timesteps are ``σ'·1000`` truncated to integers.
- ``dpm++``: ``get_sampling_sigmas``: ``linspace(1, 0, N+1)[:N]`` shifted; it goes through
  ``set_timesteps`` of a scheduler built with shift 1, so timesteps are again ``σ'·1000``
  truncated to integers (the model receives integers there as well; the first one is 1000).
- ``euler``: the same σ grid as dpm++ (starts at exactly σ = 1, i.e. pure noise), with float
  timesteps ``σ'·1000`` not truncated. This is what musubi-tuner's ``vanilla`` sampler
  (HunyuanVideo's FlowMatchDiscreteScheduler: ``linspace(1, 0, N+1)`` shifted, float timesteps)
  and the Wan forks that add an ``euler`` branch (``get_sampling_sigmas`` through diffusers'
  FlowMatchEulerDiscreteScheduler) all feed the model, so a user switching from those tools
  gets the trajectory they know. The UniPC grid's 0.999 start is an artefact of UniPC's
  training table, not a property of the flow; a first-order solver has no reason to skip it.

- ``lcm``: the few-step sampler of consistency / DMD distillation (FastVideo's DMD denoising
  stage, CausVid, LCM): at each step the model's flow gives the clean estimate
  ``x0 = x - σ·v``, and the next latent is ``x0`` noised afresh to the next level,
  ``(1 - σ')·x0 + σ'·ε`` with new noise ``ε``; the last step returns ``x0``. Same σ grid as euler.

Explicit timesteps (the request's ``timesteps``; FastVideo's ``dmd_denoising_steps``): the model
receives them as given and ``σ = t / 1000`` (no shift), then σ = 0. Only the first-order samplers
(euler, lcm) take them: they step between any two noise levels. lightx2v's ``denoising_step_list``
[1000, 750, 500, 250] at shift 5 is the euler grid of 4 steps at shift 5 (its entries index the
unshifted grid), so it needs no explicit list.

A sampler instance holds the multistep history of ONE generation; make a new one per
generation (and per noise batch).
"""
from __future__ import annotations

import math

import numpy as np
import torch

SAMPLERS = ("unipc", "dpm++", "euler", "lcm")
EXPLICIT_TIMESTEP_SAMPLERS = ("euler", "lcm")  # the samplers that take the request's own timesteps

NUM_TRAIN_TIMESTEPS = 1000
# First σ of the schedulers' float32 training table 1 - linspace(1, 1/1000, 1000)[::-1],
# read back through .item(): the UniPC grid starts here, not at the decimal 0.999.
UNIPC_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))


# ----------------------------------------------------------------------------- grids


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """The Wan/SD3 time shift ``s·σ / (1 + (s-1)·σ)`` in float64, same operation order as the reference."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _with_final_zero(shifted: np.ndarray) -> torch.Tensor:
    """[N] float64 -> [N+1] float32 with σ = 0 appended (``final_sigmas_type='zero'``)."""
    return torch.from_numpy(np.concatenate([shifted, [0.0]]).astype(np.float32))


def _truncated_timesteps(shifted: np.ndarray) -> torch.Tensor:
    """σ'·1000 in float64 cut towards zero to integers (the int64 cast of the reference), as float32."""
    return torch.from_numpy(shifted * NUM_TRAIN_TIMESTEPS).to(torch.int64).to(torch.float32)


def unipc_grid(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=shift): (sigmas [N+1], timesteps [N])."""
    shifted = shift_sigmas(np.linspace(UNIPC_SIGMA_MAX, 0.0, steps + 1).copy()[:-1], shift)
    return _with_final_zero(shifted), _truncated_timesteps(shifted)


def sampling_sigmas(steps: int, shift: float) -> np.ndarray:
    """``get_sampling_sigmas``: [N] float64, starting at exactly 1."""
    return shift_sigmas(np.linspace(1, 0, steps + 1)[:steps], shift)


def dpm_grid(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """get_sampling_sigmas + retrieve_timesteps(sigmas=...) on a shift-1 FlowDPMSolver: (sigmas, timesteps)."""
    # The scheduler re-applies its own shift (1) to the given sigmas: an exact identity, skipped.
    shifted = sampling_sigmas(steps, shift)
    return _with_final_zero(shifted), _truncated_timesteps(shifted)


def euler_grid(steps: int, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same σ as dpm++; float timesteps σ·1000 computed from the float32 σ (as diffusers and musubi)."""
    sigmas = _with_final_zero(sampling_sigmas(steps, shift))
    return sigmas, sigmas[:-1] * NUM_TRAIN_TIMESTEPS


def explicit_grid(timesteps) -> tuple[torch.Tensor, torch.Tensor]:
    """Given model timesteps t (descending, in (0, 1000]): σ = t/1000 then 0, as FastVideo's DMD
    stage reads them."""
    t = torch.tensor([float(x) for x in timesteps], dtype=torch.float32)
    return torch.cat([t / NUM_TRAIN_TIMESTEPS, torch.zeros(1)]), t


# ----------------------------------------------------------------------------- base


def _lambda(sigma: torch.Tensor) -> torch.Tensor:
    """Half log-SNR of a flow level, log(α) - log(σ) with α = 1 - σ, in float32 (±inf at σ = 1 / 0)."""
    return torch.log(1 - sigma) - torch.log(sigma)


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float32, or float64 when a caller works in float64 (the references never go below float32)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


class Sampler:
    """One generation's sampler: a fixed (timesteps, sigmas) grid and the solver's state.

    ``timesteps`` [steps] float32 on the 0..1000 scale: what the model receives at each step.
    ``sigmas`` [steps + 1] float32, last is 0: the noise level assumed at each step.
    """

    name = ""

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        self.sigmas = sigmas
        self.timesteps = timesteps
        self.steps = int(timesteps.shape[0])

    def step(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` [any shape] from step ``index`` to ``index + 1``.

        ``flow`` is the model prediction (noise - x0) at ``timesteps[index]``, same shape as
        ``sample``. Returns the next sample with ``sample``'s dtype and device.
        """
        raise NotImplementedError

    def start_index(self, strength: float) -> int:
        """First step index for video-to-video with denoising ``strength`` in (0, 1].

        The diffusers img2img / video2video convention: ``init = int(steps * strength)``
        (truncated, so 50 x 0.58 = 28.999... gives 28), ``start = steps - init``; strength 1
        runs every step. The engine noises the input to ``sigmas[start]`` (see ``noised``) and
        runs steps ``start .. steps-1``.
        """
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) \
                or not (0.0 < float(strength) <= 1.0):
            raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
        init = min(int(self.steps * strength), self.steps)
        if init < 1:
            raise ValueError(
                f"strength={strength!r} with steps={self.steps} leaves no denoising step; "
                f"use strength >= {1 / self.steps:g} or more steps")
        return self.steps - init

    def noised(self, clean: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
        """The flow forward process at ``sigmas[index]``: ``(1 - σ)·clean + σ·noise``, in ``clean``'s dtype."""
        sigma = self.sigmas[self._check_index(index)].item()
        dtype = _compute_dtype(clean, noise)
        return ((1 - sigma) * clean.to(dtype) + sigma * noise.to(dtype)).to(clean.dtype)

    # -- helpers

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.steps:
            raise ValueError(f"{self.name} sampler: step index must be an int in [0, {self.steps}), got {index!r}")
        return int(index)

    def _check_inputs(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> None:
        self._check_index(index)
        if flow.shape != sample.shape:
            raise ValueError(f"{self.name} sampler: flow shape {tuple(flow.shape)} "
                             f"!= sample shape {tuple(sample.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(steps={self.steps})"


class _Multistep(Sampler):
    """Shared bookkeeping of the multistep solvers: x0 history and the expected next index."""

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        super().__init__(sigmas, timesteps)
        self._x0: list[torch.Tensor] = []   # past x0 predictions, oldest first (at most 2 kept)
        self._next: int | None = None

    def _check_order(self, index: int) -> None:
        # The history is only valid for consecutive steps; a gap means a reused sampler.
        if self._next is not None and index != self._next:
            raise ValueError(f"{self.name} sampler: expected step index {self._next}, got {index}; "
                             "a sampler holds one generation's history, make a new one per generation")

    def _begin(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Checks a step's inputs and returns (sample, predicted clean sample x0 = x - sigma * flow)
        in the solver's working dtype."""
        self._check_inputs(flow, index, sample)
        self._check_order(index)
        dtype = _compute_dtype(flow, sample)
        x = sample.to(dtype)
        return x, x - self.sigmas[index] * flow.to(dtype)

    def _push(self, x0: torch.Tensor, index: int) -> None:
        self._x0 = (self._x0 + [x0])[-2:]
        self._next = index + 1


# ----------------------------------------------------------------------------- UniPC


class UniPCSampler(_Multistep):
    """FlowUniPCMultistepScheduler: order 2, bh2, predict_x0, lower_order_final, final σ 0.

    Each step: convert the flow to x0; correct the incoming sample with UniC using the new x0
    (every step but the first); then predict the next sample with UniP. The order is 1 on
    the first step (warm-up) and on the last step, 2 otherwise.
    """

    name = "unipc"

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor):
        super().__init__(sigmas, timesteps)
        self._last_sample: torch.Tensor | None = None  # the predictor's input at the previous step
        self._last_order = 0

    def step(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        x, x0 = self._begin(flow, index, sample)
        if self._last_sample is not None:
            x = self._correct(x0, index)
        order = min(2, self.steps - index, len(self._x0) + 1)
        self._push(x0, index)
        self._last_sample, self._last_order = x, order
        return self._predict(index, x, order).to(sample.dtype)

    def _coefficients(self, s: int, t: int) -> tuple[torch.Tensor, ...]:
        """Scalars of the bh2 update from σ_s to σ_t, in float32 as the reference computes them.

        Returns (σ_t/σ_s, α_t·(e^{-h} - 1), h, -h, e^{-h} - 1). For bh2, B(h) = e^{-h} - 1 too,
        so ``α_t·B(h)`` (the weight of the higher-order terms) equals the second value.
        """
        sigma_t, sigma_s = self.sigmas[t], self.sigmas[s]
        h = _lambda(sigma_t) - _lambda(sigma_s)
        hh = -h                                  # predict_x0 integrates in -h
        h_phi_1 = torch.expm1(hh)
        return sigma_t / sigma_s, (1 - sigma_t) * h_phi_1, h, hh, h_phi_1

    def _rk(self, older: int, s: int, h: torch.Tensor) -> torch.Tensor:
        """Ratio of the previous log-SNR interval to the current one."""
        return (_lambda(self.sigmas[older]) - _lambda(self.sigmas[s])) / h

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from step i to i+1; history is [.., x0_{i-1}, x0_i]."""
        ratio, a_phi, h, _, _ = self._coefficients(i, i + 1)
        m0 = self._x0[-1]
        x_next = ratio * x - a_phi * m0
        if order == 2:
            d1 = (self._x0[-2] - m0) / self._rk(i - 1, i, h)
            x_next = x_next - a_phi * (0.5 * d1)    # rho_p = 1/2: the reference's order-2 shortcut
        return x_next

    def _correct(self, x0_now: torch.Tensor, i: int) -> torch.Tensor:
        """UniC: redo the last step from the previous predictor input, now knowing x0_i.

        The history (x0_i not yet pushed) ends with x0_{i-1}; the predicted x_i itself is only
        used through x0_now, as in the reference.
        """
        order = self._last_order
        ratio, a_phi, h, hh, h_phi_1 = self._coefficients(i - 1, i)
        m0 = self._x0[-1]
        x_corr = ratio * self._last_sample - a_phi * m0
        d1_t = x0_now - m0
        if order == 1:
            return x_corr - a_phi * (0.5 * d1_t)
        rk = self._rk(i - 2, i - 1, h)
        d1 = (self._x0[-2] - m0) / rk
        rhos = torch.linalg.solve(torch.stack([torch.ones(2), torch.stack([rk, torch.ones(())])]),
                                  self._bh2_b(hh, h_phi_1, order))
        return x_corr - a_phi * (rhos[0] * d1 + rhos[1] * d1_t)

    @staticmethod
    def _bh2_b(hh: torch.Tensor, h_phi_1: torch.Tensor, order: int) -> torch.Tensor:
        """Right-hand side b_k = k!·hh·φ_{k+1}(hh) / B(h) of the UniC order conditions, k = 1..order."""
        b, h_phi_k, factorial = [], h_phi_1 / hh - 1, 1
        for k in range(1, order + 1):
            b.append(h_phi_k * factorial / h_phi_1)   # B(h) = expm1(hh) for bh2
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(b)


# ----------------------------------------------------------------------------- DPM-Solver++


class DPMSolverSampler(_Multistep):
    """FlowDPMSolverMultistepScheduler: dpmsolver++, order 2, midpoint, final σ 0.

    First order on the first step (warm-up) and on the last step (``final_sigmas_type='zero'``
    forces it there), second order otherwise. σ_0 = 1 gives log-SNR -inf; the formulas then
    reduce to their limits through IEEE infinities exactly as in the reference.
    """

    name = "dpm++"

    def step(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        x, x0 = self._begin(flow, index, sample)
        first_order = not self._x0 or index == self.steps - 1
        self._push(x0, index)
        sigma_t, sigma_s0 = self.sigmas[index + 1], self.sigmas[index]
        lambda_t, lambda_s0 = _lambda(sigma_t), _lambda(sigma_s0)
        h = lambda_t - lambda_s0
        a_phi = (1 - sigma_t) * (torch.exp(-h) - 1.0)
        x_next = (sigma_t / sigma_s0) * x - a_phi * x0
        if not first_order:
            r0 = (lambda_s0 - _lambda(self.sigmas[index - 1])) / h
            d1 = (1.0 / r0) * (x0 - self._x0[-2])
            x_next = x_next - 0.5 * a_phi * d1   # midpoint
        return x_next.to(sample.dtype)


# ----------------------------------------------------------------------------- Euler


class EulerSampler(Sampler):
    """Plain flow-matching Euler: ``x_{i+1} = x_i + (σ_{i+1} - σ_i)·flow``; stateless."""

    name = "euler"

    def step(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        self._check_inputs(flow, index, sample)
        dtype = _compute_dtype(flow, sample)
        dt = self.sigmas[index + 1] - self.sigmas[index]
        return (sample.to(dtype) + dt * flow.to(dtype)).to(sample.dtype)


# ----------------------------------------------------------------------------- LCM / DMD


class LCMSampler(Sampler):
    """Consistency sampling for flow models: ``x0 = x - σ·v``, then ``x0`` noised afresh to the next
    level, ``(1 - σ')·x0 + σ'·ε``; the last step returns ``x0``.

    The fresh noise comes from a CPU generator seeded with ``seed`` (the request's seed), one draw
    of the sample's shape per step, in step order, then moved to the sample's device: the same on
    every device and in every process of a parallel run.
    """

    name = "lcm"

    def __init__(self, sigmas: torch.Tensor, timesteps: torch.Tensor, seed: int = 0):
        super().__init__(sigmas, timesteps)
        self._generator = torch.Generator(device="cpu").manual_seed(int(seed))
        self._next: int | None = None

    def step(self, flow: torch.Tensor, index: int, sample: torch.Tensor) -> torch.Tensor:
        self._check_inputs(flow, index, sample)
        if self._next is not None and index != self._next:
            raise ValueError(f"lcm sampler: expected step index {self._next}, got {index}; its noise stream belongs "
                             "to one generation, make a new sampler per generation")
        self._next = index + 1
        dtype = _compute_dtype(flow, sample)
        x0 = sample.to(dtype) - self.sigmas[index] * flow.to(dtype)
        if index == self.steps - 1:
            return x0.to(sample.dtype)
        noise = torch.randn(tuple(sample.shape), generator=self._generator, dtype=torch.float32)
        sigma = self.sigmas[index + 1]
        return ((1 - sigma) * x0 + sigma * noise.to(device=sample.device, dtype=dtype)).to(sample.dtype)


# ----------------------------------------------------------------------------- factory

_BUILDERS = {"unipc": (UniPCSampler, unipc_grid), "dpm++": (DPMSolverSampler, dpm_grid),
             "euler": (EulerSampler, euler_grid), "lcm": (LCMSampler, euler_grid)}


def make_sampler(name: str, steps: int, shift: float, timesteps=None, seed: int = 0) -> Sampler:
    """A fresh sampler ``name`` (one of SAMPLERS) with ``steps`` steps at time shift ``shift``, or on
    the given ``timesteps`` (euler and lcm only; ``steps`` must then be their number). ``seed``
    seeds the fresh noise of ``lcm``."""
    if name not in _BUILDERS:
        raise ValueError(f"sampler name must be one of {', '.join(map(repr, SAMPLERS))}; got {name!r}")
    if timesteps is not None:
        if name not in EXPLICIT_TIMESTEP_SAMPLERS:
            raise ValueError(f"explicit timesteps work with the {' and '.join(EXPLICIT_TIMESTEP_SAMPLERS)} samplers, "
                             f"not {name!r}")
        ts = [float(t) for t in timesteps]
        if not ts or len(ts) != steps or any(not 0 < t <= NUM_TRAIN_TIMESTEPS for t in ts) \
                or any(a <= b for a, b in zip(ts, ts[1:])):
            raise ValueError(f"timesteps must be {steps} values in (0, 1000], strictly decreasing; got {ts!r}")
        cls = _BUILDERS[name][0]
        return cls(*explicit_grid(ts), seed=seed) if cls is LCMSampler else cls(*explicit_grid(ts))
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(shift, bool) or not isinstance(shift, (int, float, np.floating)) \
            or not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
    cls, grid = _BUILDERS[name]
    if cls is LCMSampler:
        return cls(*grid(int(steps), float(shift)), seed=seed)
    return cls(*grid(int(steps), float(shift)))
