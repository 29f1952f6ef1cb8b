"""Samplers against the diffusers schedulers configured as the official Wan code (CPU, float32).

diffusers' UniPCMultistepScheduler on the official grid was verified identical to Wan's
FlowUniPCMultistepScheduler (reference doc §7.1); diffusers' DPMSolverMultistepScheduler and
FlowMatchEulerDiscreteScheduler carry the same update formulas as Wan's fm_solvers.py and
musubi's FlowMatchDiscreteScheduler. The expected grids are rebuilt here from the formulas.
"""
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

from tests.helpers import rel_err
from wan.engine.samplers import SAMPLERS, make_sampler

SHAPE = (1, 4, 3, 5, 6)            # [B, C, F, H, W], tiny
# The official UniPC grid starts at its float32 training-table σ_max, float32(0.999) read back.
UNIPC_START = float(np.float32(0.999))


class FakeModel:
    """A fixed random affine map of the sample, so the flow depends on the trajectory."""

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(SHAPE[1], SHAPE[1], generator=g) * 0.4
        self.bias = torch.randn(SHAPE, generator=g) * 0.5

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return torch.einsum("oc,bcfhw->bofhw", self.mix, x) * (1 + t / 1000) + self.bias


def noise(seed: int = 1) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def run_ours(name, steps, shift, start=0, x=None):
    sampler, model = make_sampler(name, steps, shift), FakeModel()
    x = noise() if x is None else x
    trace = []
    for i in range(start, steps):
        x = sampler.step(model(x, sampler.timesteps[i].item()), i, x)
        trace.append(x)
    return sampler, trace


def run_diffusers(scheduler, steps, start=0, x=None):
    model = FakeModel()
    x = noise() if x is None else x
    scheduler.set_begin_index(start)
    trace = []
    for t in scheduler.timesteps[start:]:
        x = scheduler.step(model(x, float(t)), t, x, return_dict=False)[0]
        trace.append(x)
    return trace


def diffusers_unipc(steps, shift):
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                  final_sigmas_type="zero", num_train_timesteps=1000)
    sch.set_timesteps(sigmas=np.linspace(UNIPC_START, 0, steps + 1)[:-1])
    return sch


def official_dpm_sigmas(steps, shift):
    sigma = np.linspace(1, 0, steps + 1)[:steps]
    return shift * sigma / (1 + (shift - 1) * sigma)


def diffusers_dpm(steps, shift):
    sch = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                      solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
                                      lower_order_final=True, final_sigmas_type="zero", num_train_timesteps=1000)
    sch.set_timesteps(steps)
    # DPMSolverMultistepScheduler takes no custom sigmas: install the official grid (what Wan's
    # retrieve_timesteps(sigmas=get_sampling_sigmas(...)) leaves in its scheduler).
    sigmas = official_dpm_sigmas(steps, shift)
    sch.sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    sch.timesteps = torch.from_numpy(sigmas * 1000).to(torch.int64)
    return sch


def assert_traces_close(ours, ref, tol):
    assert len(ours) == len(ref)
    errs = [rel_err(a, b) for a, b in zip(ours, ref)]
    assert max(errs) <= tol, f"per-step relative errors {errs}"


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("steps,shift", [(12, 5.0), (20, 3.0), (16, 16.0)])
def test_unipc_matches_diffusers_step_by_step(steps, shift):
    sampler, ours = run_ours("unipc", steps, shift)
    ref_sched = diffusers_unipc(steps, shift)
    assert sampler.timesteps.tolist() == ref_sched.timesteps.float().tolist()
    assert torch.equal(sampler.sigmas, ref_sched.sigmas)
    assert_traces_close(ours, run_diffusers(ref_sched, steps), 1e-5)


@pytest.mark.parametrize("steps,shift", [(12, 5.0), (20, 3.0), (16, 16.0)])
def test_dpmpp_matches_diffusers_step_by_step(steps, shift):
    sampler, ours = run_ours("dpm++", steps, shift)
    ref_sched = diffusers_dpm(steps, shift)
    assert sampler.timesteps.tolist() == ref_sched.timesteps.float().tolist()
    assert sampler.timesteps[0].item() == 1000.0 and sampler.sigmas[0].item() == 1.0
    assert torch.equal(sampler.sigmas, ref_sched.sigmas)
    assert_traces_close(ours, run_diffusers(ref_sched, steps), 1e-5)


@pytest.mark.parametrize("name", ["unipc", "dpm++"])
def test_multistep_from_a_middle_index_matches_diffusers_begin_index(name):
    """video-to-video: the first step at start_index warms up from order 1, like set_begin_index."""
    steps, shift, start = 14, 5.0, 5
    x = noise(7)
    _, ours = run_ours(name, steps, shift, start=start, x=x)
    ref_sched = diffusers_unipc(steps, shift) if name == "unipc" else diffusers_dpm(steps, shift)
    assert_traces_close(ours, run_diffusers(ref_sched, steps, start=start, x=x), 1e-5)


@pytest.mark.parametrize("steps,shift", [(10, 5.0), (25, 12.0)])
def test_euler_matches_diffusers_flow_match_euler(steps, shift):
    sampler, ours = run_ours("euler", steps, shift)
    ref_sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    ref_sched.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:steps])  # shifted by the scheduler
    assert torch.allclose(sampler.timesteps, ref_sched.timesteps, rtol=1e-6, atol=0)
    assert torch.allclose(sampler.sigmas, ref_sched.sigmas, rtol=1e-6, atol=0)
    assert sampler.timesteps[0].item() == 1000.0 and sampler.timesteps.frac().abs().max() > 0
    assert_traces_close(ours, run_diffusers(ref_sched, steps), 1e-6)


def test_solvers_differ_so_the_parity_tests_can_fail():
    finals = {name: run_ours(name, 12, 5.0)[1][-1] for name in SAMPLERS}
    assert rel_err(finals["unipc"], finals["euler"]) > 1e-3
    assert rel_err(finals["dpm++"], finals["euler"]) > 1e-3
    assert rel_err(finals["unipc"], finals["dpm++"]) > 1e-3


# ----------------------------------------------------------------------------- grids


def test_unipc_50_steps_shift_5_integer_timesteps():
    sigma = np.linspace(UNIPC_START, 0.0, 51)[:-1]
    shifted = 5.0 * sigma / (1 + 4.0 * sigma)
    expected = [int(v) for v in shifted * 1000]          # truncation towards zero
    sampler = make_sampler("unipc", 50, 5.0)
    assert sampler.timesteps.dtype == torch.float32 and sampler.timesteps.shape == (50,)
    assert sampler.timesteps.tolist() == [float(v) for v in expected]
    assert expected[-4:] == [302, 241, 172, 92]          # reference doc §7.1
    assert sampler.sigmas.shape == (51,) and sampler.sigmas[-1].item() == 0.0
    assert torch.equal(sampler.sigmas[:-1], torch.from_numpy(shifted.astype(np.float32)))


def test_unipc_grid_starts_at_float32_0999_like_the_reference():
    """Unshifted, 2/3·σ_max·1000 is 666.0000086 from float32(0.999) but 665.99999 from the decimal."""
    assert make_sampler("unipc", 3, 1.0).timesteps.tolist() == [999.0, 666.0, 333.0]


def test_dpmpp_timesteps_are_truncated_integers():
    sampler = make_sampler("dpm++", 50, 5.0)
    expected = [float(int(v)) for v in official_dpm_sigmas(50, 5.0) * 1000]
    assert sampler.timesteps.tolist() == expected
    assert sampler.timesteps.frac().abs().max() == 0


def test_outputs_keep_sample_dtype_and_compute_in_float32():
    x32 = noise().to(torch.bfloat16).float()
    flow = FakeModel()(x32, 500.0).to(torch.bfloat16).float()
    for name in SAMPLERS:
        ref = make_sampler(name, 8, 5.0).step(flow, 0, x32)
        out = make_sampler(name, 8, 5.0).step(flow.bfloat16(), 0, x32.bfloat16())
        assert out.dtype == torch.bfloat16
        assert rel_err(out.float(), ref) <= 1e-2      # only the final bf16 rounding differs
        assert torch.equal(out, ref.bfloat16())


def test_noised_is_the_flow_forward_process():
    sampler = make_sampler("unipc", 10, 5.0)
    clean, eps = noise(3), noise(4)
    sigma = sampler.sigmas[4].item()
    assert torch.allclose(sampler.noised(clean, eps, 4), (1 - sigma) * clean + sigma * eps)


# ----------------------------------------------------------------------------- start_index


@pytest.mark.parametrize("steps,strength,start", [
    (50, 1.0, 0), (50, 0.5, 25), (50, 0.58, 22),   # 50*0.58 = 28.999.. -> 28 (truncation)
    (50, 0.02, 49), (30, 0.7, 9), (40, 0.333, 27), (4, 0.3, 3), (1, 1.0, 0),
])
def test_start_index_table(steps, strength, start):
    for name in SAMPLERS:
        sampler = make_sampler(name, steps, 5.0)
        assert sampler.start_index(strength) == start
        assert start == steps - int(steps * strength)   # the diffusers img2img formula


@pytest.mark.parametrize("strength", [0.0, -0.1, 1.01, float("nan"), "0.5", None, True])
def test_start_index_rejects_bad_strength(strength):
    with pytest.raises(ValueError, match="strength"):
        make_sampler("unipc", 50, 5.0).start_index(strength)


def test_start_index_rejects_strength_leaving_no_step():
    with pytest.raises(ValueError, match=r"strength=0\.01.*steps=50.*0\.02"):
        make_sampler("euler", 50, 5.0).start_index(0.01)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kwargs,pattern", [
    ({"name": "ddim", "steps": 10, "shift": 5.0}, r"name.*'unipc', 'dpm\+\+', 'euler'.*'ddim'"),
    ({"name": "UniPC", "steps": 10, "shift": 5.0}, r"name.*'UniPC'"),
    ({"name": "unipc", "steps": 0, "shift": 5.0}, r"steps.*positive integer.*0"),
    ({"name": "unipc", "steps": -3, "shift": 5.0}, r"steps.*-3"),
    ({"name": "unipc", "steps": 2.5, "shift": 5.0}, r"steps.*2\.5"),
    ({"name": "unipc", "steps": 10, "shift": 0.0}, r"shift.*> 0.*0\.0"),
    ({"name": "dpm++", "steps": 10, "shift": -1}, r"shift.*-1"),
    ({"name": "euler", "steps": 10, "shift": float("inf")}, r"shift.*inf"),
])
def test_make_sampler_rejects_bad_input(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_sampler(**kwargs)


def test_step_rejects_bad_index_shape_and_reuse():
    sampler, x = make_sampler("unipc", 5, 5.0), noise()
    with pytest.raises(ValueError, match=r"index.*\[0, 5\).*5"):
        sampler.step(x, 5, x)
    with pytest.raises(ValueError, match="flow shape"):
        sampler.step(x[:, :2], 0, x)
    x = sampler.step(x, 0, x)
    with pytest.raises(ValueError, match="expected step index 1, got 3"):
        sampler.step(x, 3, x)
