"""Few-step generation against the model's own recipe, side by side, on a 1.3B-shape DiT (bf16, CPU).

    .venv/bin/python benchmarks/bench_accelerator.py [--profile lightx2v-4step] [--frames 3] [--size 96]

The same denoising loop (``wan.engine.loop.denoise``) runs twice on the same noise and random text
states (no text encoder or VAE: they cost the same in both runs):

- the reference recipe: the registry's defaults of ``wan2.1-t2v-1.3B`` (50 steps, guidance 5, so a
  prompt pass and a negative-prompt pass per step, UniPC, shift 5);
- the accelerator profile's recipe (``profiles/<name>.yaml``, its ``sampling:`` section: for
  ``lightx2v-4step`` 4 steps, guidance 1, euler, shift 5), with a random rank-64 LoRA on all 300
  block linears attached as hooks, as the accelerator LoRA runs (its values do not matter for the
  time; the real files are for 14B models, whose shapes this CPU machine cannot hold).

Reported: DiT passes of each run, the time of each, their ratio, and the time of one pass with and
without the LoRA hooks. The accelerated run is repeated ``--repeats`` times (median). Peak memory
against the number of sliding windows is measured by ``bench_windows.py``. Uses the checkpoint of
bench_dit.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_dit import denoising_setup  # noqa: E402
from bench_lora import lora_path, prepare, write_lora  # noqa: E402

REFERENCE_MODEL = "wan2.1-t2v-1.3B"


def run_recipe(dit, steps: int, guidance: float, shift: float, sampler_name: str, noise, cond, uncond, size):
    """One denoising run: (final latent, seconds, DiT passes)."""
    from wan.engine.conditioning import Conditioning
    from wan.engine.loop import Denoising, denoise
    from wan.engine.phases import expert_plan
    from wan.engine.samplers import make_sampler
    from wan.optim.guidance import GuidanceSettings, StepGuidance

    sampler = make_sampler(sampler_name, steps, shift)
    passes: list[int] = []
    run = Denoising({"transformer": dit}, sampler, cond, uncond, expert_plan(None, guidance),
                    Conditioning(tuple(noise.shape), (size, size)), StepGuidance(GuidanceSettings(), steps))
    t0 = time.perf_counter()
    out = denoise(run, noise.clone(), progress=lambda s: passes.append(len(s.passes)))
    return out, time.perf_counter() - t0, sum(passes)


def one_pass(dit, noise, cond, repeats: int = 3) -> float:
    """Median seconds of one DiT pass (a step without CFG) on the run's inputs."""
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            dit(noise[None], torch.tensor([500.0]), **cond)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    from wan.optim.profile_files import get_profile
    from wan.registry import get_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--profile", default="lightx2v-4step")
    ap.add_argument("--frames", type=int, default=3, help="latent frames")
    ap.add_argument("--size", type=int, default=96, help="pixels (latent = size / 8)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the accelerated recipe (median)")
    args = ap.parse_args()

    lora = lora_path(64, "accelerator")
    if not lora.exists():
        write_lora(lora, 64, seed=3)
    dit, noise, cond, uncond = denoising_setup(args.frames, args.size)
    lat = args.size // 8

    d = get_model(REFERENCE_MODEL).defaults
    fast = get_profile(args.profile).sampling
    reference = (d.steps, d.guidance, d.shift, d.sampler)
    accelerated = (fast.steps, fast.guidance, fast.shift if fast.shift is not None else d.shift,
                   fast.sampler or d.sampler)
    tokens = args.frames * (lat // 2) ** 2
    print(f"1.3B-shape DiT, bf16, {torch.get_num_threads()} threads; latent 16x{args.frames}x{lat}x{lat} "
          f"({tokens} tokens), 24 / 40 text tokens")
    print(f"reference: {REFERENCE_MODEL} defaults: {d.steps} steps, guidance {d.guidance:g}, {d.sampler}, "
          f"shift {d.shift:g}")
    print(f"accelerated: profile {args.profile}: {fast.steps} steps, guidance {accelerated[1]:g}, {accelerated[3]}, "
          f"shift {accelerated[2]:g}, rank-64 LoRA as hooks on 300 linears")

    t_plain_pass = one_pass(dit, noise, cond)
    _, t_ref, n_ref = run_recipe(dit, *reference, noise, cond, uncond, args.size)
    job = prepare(lora, dit, "hooks")
    job.attach({"transformer": dit})
    try:
        t_lora_pass = one_pass(dit, noise, cond)
        fast_runs = [run_recipe(dit, *accelerated, noise, cond, uncond, args.size) for _ in range(args.repeats)]
    finally:
        job.detach({"transformer": dit})
    t_fast = statistics.median(r[1] for r in fast_runs)
    n_fast = fast_runs[0][2]

    print("\n| measure | reference recipe | accelerator profile | ratio |\n|---|---|---|---|")
    print(f"| DiT passes | {n_ref} | {n_fast} | **{n_ref / n_fast:.1f}x fewer** |")
    print(f"| denoising time (s) | {t_ref:.1f} | {t_fast:.2f} (median of {args.repeats}) | **{t_ref / t_fast:.1f}x faster** |")
    print(f"| one DiT pass (s) | {t_plain_pass:.3f} (no LoRA) | {t_lora_pass:.3f} (LoRA hooks) | "
          f"{t_lora_pass / t_plain_pass:.2f} |")


if __name__ == "__main__":
    main()
