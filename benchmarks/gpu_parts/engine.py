"""Part 8: whole TEST-model generations through the engine's one entry (``Engine.generate``) on CUDA,
against the same requests on the CPU.

Two models of the TEST family (tiny random Wan networks, written under the scratch folder on first
use, nothing downloaded): ``test-tiny-t2v`` (Wan 2.1 t2v) and ``test-tiny-t2v-a14b`` (a Wan 2.2
A14B-style pair of high- and low-noise experts switching inside the run). Every request sets
``cpu_noise``, so both devices start from the same latents: what differs is the arithmetic only.

For each model: the CPU in float32 (the reference), then CUDA with the DiT in float32 and with the
engine's CUDA default (bf16). Each row gives the first call's time (the models load in it) and a
second call's (loaded), the largest difference of the final latents and of the decoded frames
([-1, 1]) from the CPU's, and the experts that ran. Outputs stay in memory (``write=False``): the
MP4 writer needs imageio-ffmpeg, which the GPU machine lacks.

Dry run: the "CUDA" engines are CPU engines too (the float32 row must then show 0 differences; the
engines are called once and the bf16 row is left out). Nothing is asserted: the table reports.
"""

from __future__ import annotations

import importlib.util
import time

import torch

from gpu_parts.common import Ctx, case_error, free_memory, gib, measured, ms, sync

MODELS = ("test-tiny-t2v", "test-tiny-t2v-a14b")
PROMPT = "a red fox running through fresh snow at dawn"


def checkpoint_dir(ctx: Ctx):
    """The TEST family's folder (train_parallel uses the same one)."""
    return ctx.work / "tiny_ckpts"


def request(ctx: Ctx, model: str):
    from wan.engine import GenerationRequest
    # the A14B-style pair (shift 12, boundary 0.875) switches experts inside either run: after step 6
    # of 8, after step 3 of 4 (dry run: smaller, as the CPU's time goes into the VAE decode)
    if ctx.dry:
        return GenerationRequest(model=model, prompt=PROMPT, seed=11, steps=4, cpu_noise=True,
                                 width=64, height=64, frames=5)
    return GenerationRequest(model=model, prompt=PROMPT, seed=11, steps=8, cpu_noise=True,
                             width=96, height=64, frames=9)


def generate_twice(engine, req, device: torch.device, twice: bool = True) -> dict:
    """Runs ``req`` twice (``twice``): the first call loads the models. Returns times, the last
    result's latent and frames on the CPU, the experts that ran and the CUDA peak of the last call."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    result = engine.generate(req, write=False)
    sync(device)
    first, again = time.perf_counter() - t0, None
    if twice:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        result = engine.generate(req, write=False)
        sync(device)
        again = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    experts = []
    for s in result.steps:
        if not experts or experts[-1][0] != s.expert:
            experts.append([s.expert, 0])
        experts[-1][1] += 1
    return {"first": first, "again": again, "latent": result.latent.detach().float().cpu(),
            "video": result.video.detach().float().cpu(), "experts": " → ".join(f"{e} x{n}" for e, n in experts),
            "peak": peak, "notices": list(result.notices)}


def diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that over max |b|)."""
    d = (a - b).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-12)


def run(ctx: Ctx) -> dict:
    from wan.engine import Engine
    ckpts = checkpoint_dir(ctx)
    target = ctx.device  # cuda on the lent machine, cpu in the dry run
    cases = [("cpu", "float32", torch.device("cpu"), torch.float32),
             (target.type, "float32", target, torch.float32)]
    if ctx.cuda:  # the engine's CUDA default (the dry run leaves it out: the CPU's time goes into the VAE)
        cases.append(("cuda", "default (bf16)", target, None))
    columns = ["model", "device", "DiT dtype", "first call (loads)", "second call", "max |Δ latent| (rel)",
               "max |Δ frames|", "peak allocated", "experts run"]
    rows, data = [], {}
    for model in MODELS:
        req = request(ctx, model)
        ref = None
        for device_name, dtype_name, device, dtype in cases:
            key = f"{model}/{device_name}/{dtype_name}"
            try:
                engine = Engine(checkpoint_dir=ckpts, device=device, dtype=dtype, lora_dir=None)
                out = generate_twice(engine, req, device, twice=not ctx.dry)
                del engine
                free_memory()
            except Exception as e:  # one case failing is a row; the others still run
                rows.append([model, device_name, dtype_name, case_error(e), "–", "–", "–", "–", "–"])
                data[key] = {"error": f"{type(e).__name__}: {e}"}
                if ref is None and device_name == "cpu":
                    ref = False  # no reference: the other rows cannot compare
                continue
            if ref is None:
                ref, d_lat, d_vid = out, "reference", "reference"
                entry = {}
            elif ref is False:
                d_lat = d_vid = "– (no CPU reference)"
                entry = {}
            else:
                (dl, rl), (dv, _) = diff(out["latent"], ref["latent"]), diff(out["video"], ref["video"])
                d_lat, d_vid = f"{dl:.3g} ({rl:.2g})", f"{dv:.3g}"
                entry = {"max_abs_latent": dl, "rel_latent": rl, "max_abs_frames": dv}
            entry.update(first_s=out["first"], again_s=out["again"], peak_allocated=out["peak"], experts=out["experts"],
                         latent_shape=list(out["latent"].shape), notices=out["notices"])
            data[key] = entry
            again = ms(out["again"]) if out["again"] is not None else "– (dry run: one call)"
            rows.append([model, device_name, dtype_name, ms(out["first"]), again, d_lat, d_vid,
                         gib(out["peak"]) if out["peak"] is not None else "–", out["experts"]])
    r = request(ctx, MODELS[0])
    notes = [f"request: {r.width}x{r.height}, {r.frames} frames, {r.steps} steps, seed {r.seed}, cpu_noise; the "
             "models' own shift, guidance and (A14B) boundary; write=False (latents and frames stay in memory).",
             "Δ: against the CPU float32 run of the same request; frames are the VAE's output in [-1, 1]. The text "
             "encoder runs in bf16 on CUDA whatever the DiT's dtype (ModelManager), and cuDNN's TF32 convolutions are "
             "torch's default, so the float32 CUDA row is not bit-comparable with the CPU.",
             "peak allocated: torch.cuda.max_memory_allocated over the second call."]
    if importlib.util.find_spec("sentencepiece") is None:
        notes.append("sentencepiece is not importable here: the TEST family's tokenizer is written with it on first "
                     "use (wan.testing.tiny_encoders), so a fresh checkpoint folder cannot be made.")
    if ctx.dry:
        notes.append("dry run: both engines run on the CPU, so the float32 row's differences must be 0; one call "
                     "each, and no bf16 row (on the GPU: the engine's default dtype, bf16).")
    return measured(columns, rows, notes=notes, data=data)
