"""Step savers against the plain sampling loop, side by side, on a 1.3B-shape DiT (bf16, CPU).

    .venv/bin/python benchmarks/bench_savers.py [--steps 10] [--frames 3] [--size 96]

The denoising loop runs with random text states and noise (no text encoder or VAE: they cost the
same with or without a saver), once plain and once per saver, each a fresh sampler. Reported:
the time ratio against the plain run, the number of model passes, and the output difference
max |ours - plain| / max |plain| of the final latent. Uses the checkpoint of bench_dit.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_dit import denoising_setup  # noqa: E402


def main() -> None:
    from wan.engine.conditioning import Conditioning
    from wan.engine.attach import SetOnNetworks, attach_job
    from wan.engine.loop import Denoising, denoise
    from wan.engine.phases import expert_plan
    from wan.optim.step_savers import StepSavers
    from wan.engine.samplers import make_sampler
    from wan.optim.guidance import GuidanceSettings, SkipLayerGuidance, StepGuidance
    from wan.optim.step_cache import MagnitudeRecorder, TEACACHE_COEFFICIENTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--frames", type=int, default=3, help="latent frames")
    ap.add_argument("--size", type=int, default=96, help="pixels (latent = size / 8)")
    args = ap.parse_args()
    dit, noise, cond, uncond = denoising_setup(args.frames, args.size)
    lat = args.size // 8
    shape = tuple(noise.shape)
    plan = expert_plan(None, 5.0)

    def run(savers: StepSavers, runner_override=None):
        sampler = make_sampler("unipc", args.steps, 5.0)
        passes = []
        if runner_override is not None:
            class Recording(StepSavers):
                def runner(self, networks, sampler, start):
                    return runner_override
            savers = Recording()
        runner = savers.runner({"transformer": dit}, sampler, 0)
        run = Denoising({"transformer": dit}, sampler, cond, uncond, plan, Conditioning(shape, (args.size, args.size)),
                        StepGuidance(savers.guidance, args.steps), runner=runner, batched_cfg=savers.batched_cfg)
        t0 = time.perf_counter()
        with attach_job({"transformer": dit}, [SetOnNetworks("block_runner", runner) if runner else None]):
            out = denoise(run, noise.clone(), progress=lambda s: passes.append(len(s.passes)))
        return out, time.perf_counter() - t0, sum(passes)

    recorder = MagnitudeRecorder()
    plain, t_plain, n_plain = run(StepSavers(), recorder)
    ratios = tuple(recorder.ratios("transformer/cond"))
    cases = {
        "TeaCache 2x (1.3B coefficients)": StepSavers(teacache_speedup=2.0,
                                                       teacache_coefficients=TEACACHE_COEFFICIENTS["t2v-1.3B"]),
        "MagCache 2x (ratios of this model)": StepSavers(magcache_ratios=ratios, magcache_speedup=2.0),
        "CFG skip late 0.6": StepSavers(GuidanceSettings(cfg_skip_mode="late", cfg_skip_ratio=0.6)),
        "CFG skip alternate 0.6": StepSavers(GuidanceSettings(cfg_skip_mode="alternate", cfg_skip_ratio=0.6)),
        "SLG uncond, layer 9": StepSavers(GuidanceSettings(slg=SkipLayerGuidance(mode="uncond"))),
        "SLG original, layer 9": StepSavers(GuidanceSettings(slg=SkipLayerGuidance(mode="original"))),
        "CFG-Zero*, 1 zero-init step": StepSavers(GuidanceSettings(cfg_zero_star=True, zero_init_steps=1)),
        "batched cond/uncond": StepSavers(batched_cfg=True),
    }
    rows = []
    for name, savers in cases.items():
        # plain again right before each case: ratios of neighbours cancel the machine's drift
        _, t_ref, _ = run(StepSavers())
        out, t, n = run(savers)
        diff = ((out.float() - plain.float()).abs().max() / plain.float().abs().max()).item()
        rows.append((name, t / t_ref, n, diff))
    print(f"\nStep savers, DiT 1.3B shape bf16, latent 16x{args.frames}x{lat}x{lat}, {args.steps} steps, "
          f"guidance 5, {torch.get_num_threads()} threads; plain run {t_plain:.1f} s, {n_plain} passes\n")
    print("| saver | time / plain | model passes | output difference |\n|---|---|---|---|")
    for name, ratio, n, diff in rows:
        print(f"| {name} | {ratio:.2f} | {n} of {n_plain} | {diff:.3g} |")
    print("\nTeaCache and MagCache skip the blocks (passes still counted); the difference is measured "
          "on random weights, where caches err more than on trained ones.")


if __name__ == "__main__":
    main()
