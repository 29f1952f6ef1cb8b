"""Part 5: every shipped profile loading a 14B-shape DiT and running one step under the VRAM budget
it targets, against what the planner predicted for that machine.

The model: the Wan 2.1 14B shape (dim 5120, ffn 13824, 40 heads) with :data:`BLOCKS` of its 40
blocks, as a random bf16 checkpoint in the official layout written once into ``ctx.work`` (the
weights are drawn on the GPU). The planner is asked about the same reduced model, so its figures
and the measured peaks are comparable; its verdict on the whole 40-block model at the same budget
is shown beside them (planned only: the peak of a streamed DiT does not depend on the number of
blocks, the load and step times scale with it).

Each case runs the DiT part of ``ModelManager._load`` as the engine does: ``load_settings`` of the
profile, ``ModelManager._load_dit`` (block streaming through ``wan.optim.offload`` when the profile
offloads blocks), then, on CUDA with mmgp importable, ``apply_mmgp`` with the settings
``ModelManager._mmgp_settings`` derives (the engine then loads into RAM and mmgp moves weights to
the GPU). Where the engine takes the mmgp path, the project's own path (what a machine without mmgp
gets) is measured too. The job's attention backend is attached as the engine attaches it
(``attach_job`` with the profile's ``AttentionKernel``), then two forwards run at 480p, 81 frames
(one forward is one step without CFG): the first (cold) and the second (the step time).

Each case runs in a process of its own with ``torch.cuda.set_per_process_memory_fraction`` set to
its budget, so a budget, an OOM or mmgp's global state cannot reach the next case. Profiles whose
DiT loads the same way under the same budget (same load settings, attention order, precision) share
one measured case. Peak memory covers the load and both forwards: PyTorch's allocated and reserved
peaks; the CUDA context (a few hundred MB) is outside both and inside the planner's reserve. Each
case's output is compared with the whole-model bf16 load (the project's path, the default
attention order): streaming should give it exactly.

In the dry run (CPU, tiny shape, two blocks) no budget is set and mmgp is not run; every case runs
in one child process.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_parts.common import (ROOT, Ctx, Peak, dit_inputs, free_memory, gib, is_oom, measured, ms, rel_diff, sync,
                              tokens_of)

BLOCKS = 8                      # of the 14B shape's 40 (each block is ~0.7 GB in bf16)
MODEL_ID = "wan2.1-t2v-14B"     # the registry spec the reduced model is planned as
# What the numbered profiles' comments say they are for (profiles/*.yaml); the others leave memory
# to the planner and are measured on a 24 GB card.
TARGET_VRAM_GB = {1: 24, 2: 12, 3: 24, 4: 12, 5: 8}
TARGET_RAM_GB = {1: 64, 2: 64, 3: 48, 4: 32, 5: 24}
OTHER_VRAM_GB, OTHER_RAM_GB = 24, 64
# The profiles that leave memory to the planner are also measured on a small card, where its plan
# for them is to stream (does the engine?).
SMALL_CARD = {"default": (8, 32), "auto": (8, 32)}
SOFT_LIMIT_S = {False: 205.0, True: 100.0}   # (dry) no case starts that would end after this
CASE_TIMEOUT_S = 120.0
FIRST_CASE_GUESS_S = {False: 30.0, True: 3.0}   # (dry) a case's time before one has run


# -- the cases -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """Profiles that load the DiT the same way under the same budget and get the same plan."""

    path: str              # "mmgp" or "own" (the project's loader and block streaming)
    key: tuple             # what makes two profiles load alike on this path
    profiles: list[tuple[str, str]]   # (name, label)
    budget_gb: float
    ram_gb: float
    plan: dict             # the planner's figures (see plan_figures)
    load: dict             # what the engine executes (see executed)
    case: int = -1         # index of the measured case

    @property
    def label(self) -> str:
        return ", ".join(label for _, label in self.profiles)


def targets(profile) -> list[tuple[float, float]]:
    """(VRAM GB, RAM GB) of the machines a profile is measured on: the one it is made for."""
    if profile.number in TARGET_VRAM_GB:
        return [(TARGET_VRAM_GB[profile.number], TARGET_RAM_GB[profile.number])]
    return [(OTHER_VRAM_GB, OTHER_RAM_GB)] + ([SMALL_CARD[profile.name]] if profile.name in SMALL_CARD else [])


def reduced_specs(ctx: Ctx, blocks: int):
    """(the registry spec with the measured shape and ``blocks`` blocks, the same with all the
    shape's blocks): the planner's models."""
    from wan.registry import get_model
    base = get_model(MODEL_ID)
    shape = ctx.dit_shape("14b")
    arch = dataclasses.replace(base.arch, dim=shape["dim"], ffn_dim=shape["ffn_dim"], num_heads=shape["num_heads"],
                               num_layers=blocks, text_dim=shape.get("text_dim", base.arch.text_dim))
    full = dataclasses.replace(arch, num_layers=shape["num_layers"])
    return dataclasses.replace(base, arch=arch), dataclasses.replace(base, arch=full)


def _mode_words(p) -> str:
    from wan.optim import planner
    if p.mode == planner.GPU:
        return "resident"
    if p.mode == planner.MOVED:
        return "moved whole"
    if p.mode == planner.CPU:
        return "on the CPU"
    where = "from file" if p.mode == planner.MMAP else "from RAM"
    return f"streamed {where}, {p.resident_blocks}/{p.blocks} resident"


def plan_figures(profile, spec, full_spec, machine, profiles) -> dict:
    """The planner's DiT figures for ``profile`` on ``machine`` (the reduced model and the whole one)."""
    from wan.optim.planner import describe, model_sizes, plan, run_precision
    out = {}
    for name, s in (("reduced", spec), ("full", full_spec)):
        p = plan(profile, model_sizes(s, run_precision(profile, machine)), machine, profiles)
        dit = p.placement("transformer")
        out[name] = {"profile": p.profile, "offload": p.offload, "dit_gpu_bytes": dit.gpu_bytes,
                     "mode": _mode_words(dit),
                     "dit_bytes": dit.bytes, "reserve": p.vram_reserve, "phases": dict(p.phases), "fits": p.fits,
                     "shortfalls": [str(x) for x in p.shortfalls], "describe": describe(p)}
    return out


def simulated_machine(vram_gb: float, ram_gb: float, capability):
    from wan.optim.planner import Machine
    return dataclasses.replace(Machine.from_gb(ram_gb, vram_gb, f"simulated {vram_gb:g} GB card"),
                               gpu_capability=capability)


def executed(profile, spec, machine, path: str) -> dict:
    """What the engine executes of ``profile`` for ``spec`` on ``machine`` on ``path``
    (``wan.optim.apply.execution_settings``, as ``ModelManager.settings`` calls it): the settings
    that decide how the DiT loads, as plain values."""
    from wan.optim.apply import execution_settings
    s = execution_settings(profile, spec, machine, mmgp=path == "mmgp")
    mmgp = s.mmgp
    return {"profile": s.profile.name, "stream": s.stream, "prefetch": s.prefetch, "swap": s.blocks_to_swap,
            "resident": s.resident_blocks, "quant": s.quant_transformer, "compile": s.compile,
            "attention": list(s.profile.attention), "precision": s.profile.precision,
            "mmgp_budget": None if mmgp is None else mmgp.budgets_mb.get("transformer", mmgp.budgets_mb.get("*", 0)),
            "mmgp_pinned": None if mmgp is None else ("*" in mmgp.pinned or "transformer" in mmgp.pinned),
            "notes": list(s.notes)}


def dit_key(load: dict, path: str, budget_gb: float) -> tuple:
    """What decides how the DiT loads and runs on ``path`` (the text encoder's settings do not)."""
    fields = ("stream", "prefetch", "swap", "resident", "compile", "attention", "precision", "quant")
    own = tuple(str(load[f]) for f in fields)
    if path == "mmgp" and load["mmgp_budget"] is not None:
        return ("mmgp", load["mmgp_budget"], load["mmgp_pinned"], budget_gb) + own
    return ("own", budget_gb) + own


def mmgp_calls() -> dict[str, dict | None]:
    """Profile -> the arguments ``apply_mmgp`` gives ``mmgp.offload.all`` for the DiT alone (None:
    the engine would not use mmgp); worked out everywhere, so the dry run checks the mapping."""
    from wan.optim.apply import mmgp_settings_from_profile
    from wan.optim.mmgp_backend import mmgp_arguments
    from wan.optim.profile_files import load_profiles
    profiles = load_profiles()
    out = {}
    for name in profiles.names():
        s = mmgp_settings_from_profile(profiles.get(name), ["transformer", "text_encoder", "vae"])
        out[name] = None if s is None else mmgp_arguments(s, ["transformer"])
    return out


def group_profiles(ctx: Ctx, paths: list[str], blocks: int) -> list[Group]:
    from wan.optim.profile_files import load_profiles
    profiles = load_profiles()
    spec, full = reduced_specs(ctx, blocks)
    cap = torch.cuda.get_device_capability(ctx.device) if ctx.cuda else None
    groups: dict[tuple, Group] = {}
    for name in profiles.names():
        profile = profiles.get(name)
        for vram, ram in targets(profile):
            machine = simulated_machine(vram, ram, cap)
            figures = plan_figures(profile, spec, full, machine, profiles)
            plan_key = tuple((k, v["dit_gpu_bytes"], v["mode"], v["fits"]) for k, v in sorted(figures.items()))
            for path in paths:
                load = executed(profile, spec, machine, path)
                key = dit_key(load, path, vram)
                g = groups.setdefault((key, plan_key), Group("mmgp" if key[0] == "mmgp" else "own", key, [], vram,
                                                             ram, figures, load))
                if (profile.name, profile.label) not in g.profiles:
                    g.profiles.append((profile.name, profile.label))
    return list(groups.values())


# -- the checkpoint ------------------------------------------------------------------------------


def checkpoint(ctx: Ctx, blocks: int) -> Path:
    """The random bf16 checkpoint of the measured shape in the official layout (written once)."""
    from safetensors.torch import save_file
    from wan.models.dit import DiTConfig, WanDiT
    shape = dict(ctx.dit_shape("14b"), num_layers=blocks)
    tag = "dry" if ctx.dry else "14b_shape"
    path = ctx.work / f"dit_{tag}_{blocks}blocks_bf16.safetensors"
    if path.exists():
        return path
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(DiTConfig(**shape)).state_dict().items()}
    g = torch.Generator(device=ctx.device).manual_seed(ctx.seed)
    state = {}
    for k, s in shapes.items():  # drawn on the device (fast on a GPU), written from RAM
        t = torch.empty(s, device=ctx.device, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
        state[k] = t.cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


# -- one case, in a child process ----------------------------------------------------------------


def _fp32_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.dtype == torch.float32)


def run_case(case: dict) -> dict:
    """Loads the DiT of ``case["profile"]`` on ``case["path"]`` and runs two forwards; returns the
    measurements (an OOM is a result, not an exception)."""
    from wan.engine.attach import AttentionKernel, attach_job
    from wan.engine.model_manager import ModelManager
    from wan.optim.apply import execution_settings, resolve_profile
    from wan.optim.attention import select_attention
    device = torch.device(case["device"])
    ctx = Ctx(dry=case["dry"], device=device, work=Path(case["work"]))
    if ctx.dry:  # tiny layers: one thread avoids the sync cost of several on a shared CPU
        torch.set_num_threads(1)
    profile = resolve_profile(case["profile"])
    result: dict = {"profile": case["profile"], "path": case["path"], "notes": []}
    if device.type == "cuda" and not ctx.dry:
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, case["budget_gb"] * 2**30 / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        result["fraction"] = fraction
    manager = ModelManager(device=device)
    spec, _ = reduced_specs(ctx, case["blocks"])
    machine = simulated_machine(case["budget_gb"], case["ram_gb"], tuple(case["capability"]) if case["capability"] else None)
    settings = execution_settings(profile, spec, machine, mmgp=case["path"] == "mmgp")
    result["notes"] += list(settings.notes)
    profile = settings.profile  # auto: the numbered profile it runs as
    stream, prefetch, swap, resident = settings.stream, settings.prefetch, settings.blocks_to_swap, settings.resident_blocks
    quant, compile_, mmgp = settings.quant_transformer, settings.compile, settings.mmgp
    if case["path"] == "mmgp":
        if mmgp is None:
            raise RuntimeError("the engine would not use mmgp here (offload none, or a plan that keeps all on the GPU)")
        stream = compile_ = False  # as ModelManager._load: models load into RAM, mmgp moves them
    load_device = torch.device("cpu") if mmgp is not None else device
    shape = ctx.dit_shape("14b")
    latent = tuple(case["latent"])
    dit = handle = out = None
    with Peak(device) as peak:
        try:
            t0 = time.perf_counter()
            dit, handle = manager._load_dit(case["checkpoint"], manager._dit_dtype(profile), stream, prefetch, swap,
                                            quant, result["notes"], device=load_device, resident=resident)
            if compile_:
                from wan.optim.compile import compile_blocks_
                result["notes"].append(f"{compile_blocks_(dit)} blocks compiled")
            if mmgp is not None:
                from wan.optim.mmgp_backend import apply_mmgp
                result["fp32_params_before"] = _fp32_params(dit)
                apply_mmgp({"transformer": dit}, mmgp)
                result["fp32_params_after"] = _fp32_params(dit)
                result["notes"].append(f"mmgp: budgets {dict(mmgp.budgets_mb)}, pinned {list(mmgp.pinned) or 'none'}")
            sync(device)
            result["load_s"] = time.perf_counter() - t0
            dtype = manager._dit_dtype(profile)
            result["attention"] = select_attention(profile.attention, device, dtype).name
            inputs = dit_inputs(ctx, shape, latent)
            with attach_job({"transformer": dit}, [AttentionKernel(profile.attention, device)]) as notices:
                result["notes"] += notices
                with torch.inference_mode():
                    for name in ("first_step_s", "step_s"):
                        sync(device)
                        t0 = time.perf_counter()
                        out = dit(*inputs)
                        sync(device)
                        result[name] = time.perf_counter() - t0
        except Exception as e:
            if not is_oom(e):
                raise
            result["oom"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
    result["peak_allocated"], result["peak_reserved"] = peak.allocated, peak.reserved
    if out is not None:
        torch.save(out.float().cpu(), case["output"])
        result["output"] = case["output"]
    del out
    if handle is not None:
        handle.close()
    del dit, handle
    free_memory()
    return result


def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=Path, required=True)
    ap.add_argument("--results", type=Path, required=True)
    args = ap.parse_args(argv)
    results = {}
    for case in json.loads(args.cases.read_text()):
        try:
            results[case["id"]] = run_case(case)
        except Exception as e:  # one case failing is a row saying so
            import traceback
            traceback.print_exc()
            results[case["id"]] = {"error": f"{type(e).__name__}: {e}".splitlines()[0][:300]}
        args.results.write_text(json.dumps(results))  # after each case: a crash keeps the earlier ones
    return 0


def run_children(cases: list[dict], batches: list[list[int]], ctx: Ctx, t_start: float) -> dict:
    """Runs each batch of cases in a child process; returns case id -> result."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    results: dict = {}
    durations: list[float] = []
    # no case starts that would end after this (seconds after t_start); less when the driver gave less
    limit = min(SOFT_LIMIT_S[ctx.dry], ctx.time_left() + (time.perf_counter() - t_start) - 35.0)
    for batch in batches:
        elapsed = time.perf_counter() - t_start
        longest = max(durations, default=FIRST_CASE_GUESS_S[ctx.dry])
        if elapsed + longest * len(batch) > limit:
            for i in batch:
                results[i] = {"skipped": f"the part's time limit: {elapsed:.0f} s spent, a case takes ~{longest:.0f} s"}
            continue
        todo = [cases[i] for i in batch]
        cases_file = ctx.work / "profiles_cases.json"
        results_file = ctx.work / "profiles_results.json"
        cases_file.write_text(json.dumps(todo))
        results_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        timeout = max(10.0, min(CASE_TIMEOUT_S * len(batch), limit + 30 - elapsed))
        cmd = [sys.executable, "-m", "gpu_parts.profiles", "--cases", str(cases_file), "--results", str(results_file)]
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=timeout)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = f"timed out after {timeout:.0f} s"
        got = json.loads(results_file.read_text()) if results_file.exists() else {}
        for i in batch:
            results[i] = got.get(str(i)) or {"error": f"the case's process ended ({code}) without a result "
                                                      "(see the log)"}
        durations.append((time.perf_counter() - t0) / len(batch))
    return results


# -- the part ------------------------------------------------------------------------------------


def size(n: float | None) -> str:
    """GiB, or MiB under one GiB (the dry run's sizes)."""
    if n is not None and abs(n) < 2**30:
        return f"{n / 2**20:.1f} MiB"
    return gib(n)


def _how(g: Group, r: dict) -> str:
    how = _load_words(g)
    return f"{how}; {r['attention']} attention" if r.get("attention") else how


def _load_words(g: Group) -> str:
    load = g.load
    if g.path == "mmgp":
        budget = load["mmgp_budget"]
        what = "mmgp, whole model" if not budget else f"mmgp, {budget} MB budget"
        return f"{what}, {'pinned' if load['mmgp_pinned'] else 'not pinned'}"
    if not load["stream"]:
        return "own: loaded whole on the device"
    kept = (f", {load['resident']} resident" if load["resident"] is not None
            else f", {load['swap']} swapped" if load["swap"] is not None else "")
    return f"own: streamed from the file, prefetch {load['prefetch']}{kept}"


def _vs_plan(r: dict, planned: int) -> str:
    if "peak_reserved" not in r:
        return "–"
    d = r["peak_reserved"] - planned
    return f"over by {size(d)}" if d > 0 else f"within ({size(-d)} spare)"


def _full_words(f: dict) -> str:
    verdict = "fits" if f["fits"] else "does NOT fit: " + "; ".join(s.split(":")[0] for s in f["shortfalls"])
    return f"{f['profile']}: DiT {size(f['dit_gpu_bytes'])} {f['mode']}; {verdict}"


def run(ctx: Ctx) -> dict:
    t_start = time.perf_counter()
    blocks = ctx.dit_shape("14b")["num_layers"] if ctx.dry else BLOCKS
    full_blocks = ctx.dit_shape("14b")["num_layers"] if ctx.dry else 40
    has_mmgp = importlib.util.find_spec("mmgp") is not None
    engine_uses_mmgp = ctx.cuda and has_mmgp   # as ModelManager._mmgp_settings decides
    paths = ["mmgp", "own"] if engine_uses_mmgp else ["own"]
    groups = group_profiles(ctx, paths, blocks)

    path = checkpoint(ctx, blocks)
    free_memory()  # the children need the GPU, not this process's cached blocks
    latent = ctx.latent_video(480, 832, 81)
    write_s = time.perf_counter() - t_start

    # one case per distinct load: the reference first (the project's whole-model load with the
    # default attention order: every output is compared with it), then the engine's path (what
    # users get), then the rest of the own path
    from wan.optim.profiles import Profile
    default_attention = tuple(Profile().attention)

    def is_reference(g: Group) -> bool:
        return g.path == "own" and not g.load["stream"] and tuple(g.load["attention"]) == default_attention

    rows_order = sorted(groups, key=lambda g: paths.index(g.path))  # the engine's path first, then profile order
    groups.sort(key=lambda g: (not is_reference(g), paths.index(g.path)))  # stable: profile order within
    cases: list[dict] = []
    by_key: dict[tuple, int] = {}
    for g in groups:
        if g.key not in by_key:
            by_key[g.key] = len(cases)
            cases.append({"id": len(cases), "profile": g.profiles[0][0], "path": g.path, "budget_gb": g.budget_gb,
                          "ram_gb": g.ram_gb, "blocks": blocks,
                          "capability": list(torch.cuda.get_device_capability(ctx.device)) if ctx.cuda else None,
                          "checkpoint": str(path), "latent": list(latent), "device": str(ctx.device), "dry": ctx.dry,
                          "work": str(ctx.work), "output": str(ctx.work / f"profiles_out_{len(cases)}.pt")})
        g.case = by_key[g.key]
    batches = [list(range(len(cases)))] if ctx.dry else [[i] for i in range(len(cases))]
    results = run_children(cases, batches, ctx, t_start)
    ref = next((g.case for g in groups if is_reference(g) and results.get(g.case, {}).get("output")), None)
    ref_out = torch.load(results[ref]["output"]) if ref is not None else None

    rows, data = [], {"blocks": blocks, "full_blocks": full_blocks, "latent": list(latent), "tokens": tokens_of(latent),
                      "checkpoint": str(path), "checkpoint_bytes": path.stat().st_size, "setup_s": write_s,
                      "mmgp": has_mmgp, "mmgp_arguments": mmgp_calls(), "groups": [],
                      "cases": {str(k): v for k, v in results.items()}}
    for g in rows_order:
        r = results.get(g.case, {})
        red, full = g.plan["reduced"], g.plan["full"]
        planned = red["dit_gpu_bytes"] + red["reserve"]
        plan_cell = f"{size(red['dit_gpu_bytes'])} ({red['mode']}) + {size(red['reserve'])}"
        if red["profile"].startswith("auto"):
            plan_cell += f" [{red['profile']}]"
        diff = "–"
        if ref_out is not None and r.get("output"):
            diff = "reference" if g.case == ref else f"{rel_diff(torch.load(r['output']), ref_out):.1e}"
        if "skipped" in r:
            measured_cells = [f"skipped: {r['skipped']}"] + ["–"] * 5
        elif "error" in r:
            measured_cells = [f"failed: {r['error']}"] + ["–"] * 5
        else:
            peak = f"{size(r['peak_allocated'])} / {size(r['peak_reserved'])}"
            if r.get("oom"):
                peak = f"OOM under {g.budget_gb:g} GB after {peak}"
            measured_cells = [peak, _vs_plan(r, planned) if not r.get("oom") else "OOM",
                              ms(r.get("load_s")), ms(r.get("first_step_s")), ms(r.get("step_s")), diff]
        rows.append([g.label, _how(g, r), f"{g.budget_gb:g} GB", plan_cell, *measured_cells, _full_words(full)])
        data["groups"].append({"profiles": [label for _, label in g.profiles], "path": g.path,
                               "key": [str(x) for x in g.key], "case": g.case, "budget_gb": g.budget_gb, "plan": g.plan,
                               "executed": g.load})

    notes = [
        f"DiT: the 14B shape with {blocks} of its {full_blocks} blocks ({size(path.stat().st_size)} bf16 checkpoint, random "
        f"weights); the planner is asked about the same {blocks}-block model (last column: its verdict on all "
        f"{full_blocks} blocks, planned only). Latent {'x'.join(map(str, latent))} ({tokens_of(latent)} tokens), "
        "24 text tokens; a step is one forward (no CFG), the second of two; the first includes what loads lazily.",
        "Budget: torch.cuda.set_per_process_memory_fraction at the VRAM the profile targets (profiles/*.yaml: 1 and 3 "
        "a 24 GB card, 2 and 4 a 12 GB one, 5 a small card, taken as 8 GB; the others 24 GB, default and auto also "
        "8 GB); the planner's machine "
        "has that VRAM and the RAM the profile targets (RAM is not enforced). Peak: PyTorch's allocated / reserved "
        "over the load and both forwards; 'vs plan' sets the reserved peak against the planner's DiT weights on the "
        "GPU plus its VRAM reserve.",
        "Paths: 'mmgp' is what the engine does on CUDA with mmgp installed (ModelManager._load: the DiT loaded into "
        "RAM, then apply_mmgp with the plan's budgets); 'own' is ModelManager._load_dit on the device as the "
        "plan says (loaded whole, or wan.optim.offload block streaming with the plan's resident blocks), what a "
        "machine without mmgp gets. Both come from wan.optim.apply.execution_settings on the simulated machine, "
        "as ModelManager.settings calls it; auto runs as the numbered profile it resolves to. 'out vs ref': max relative difference of the output from "
        "the own whole-model load with the default attention order.",
    ]
    if not engine_uses_mmgp:
        notes.append("mmgp not run: " + ("this is the CPU dry run (mmgp is CUDA-only)" if not ctx.cuda
                                         else "the mmgp package is not importable here"))
    cast = [f"case {i} ({r['profile']}): {r['fp32_params_before']:,} -> {r['fp32_params_after']:,}"
            for i, r in sorted(results.items()) if r.get("fp32_params_before") is not None]
    if cast:
        notes.append("float32 parameters of the DiT before -> after apply_mmgp (mmgp casts float32 weights to bf16 unless "
                     "told not to; wan.optim.mmgp_backend.keep_loaded_dtypes tells it to keep the norms, modulation and "
                     "head float32, as the reference does: equal counts show it held): " + "; ".join(cast))
    columns = ["profiles", "DiT load", "budget", "planned DiT on GPU + reserve", "peak alloc / reserved", "vs plan",
               "load", "first step", "step", "out vs ref", f"planner, {full_blocks} blocks"]
    return measured(columns, rows, notes=notes, data=data)


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
