"""From a profile to what one generation uses: the profile itself (with per-job overrides), its
step savers (TeaCache, MagCache, RIFLEx, the guidance shortcuts), how its models load on this
machine (:func:`execution_settings`: ``auto`` resolved and the memory plan executed) and, on CUDA,
mmgp's settings.

The memory side of a profile (offload, quantisation) is applied when models are loaded
(``wan.engine.model_manager``, from :class:`LoadSettings`); the attention backend is attached per
job by the engine (``wan.engine.attach``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from wan.optim.mmgp_backend import MmgpSettings
from wan.optim.planner import (CPU, GPU, MMAP, MOVED, STREAMED, Machine, MemoryPlan, MiB, ModelSize, gb,
                               model_sizes, plan, resolve_auto, run_precision)
from wan.optim.profile_files import ProfileSet, load_profiles
from wan.optim.step_savers import StepSavers
from wan.optim.guidance import GuidanceSettings, SkipLayerGuidance
from wan.optim.profiles import Profile, ProfileError, apply_overrides
from wan.optim.step_cache import teacache_coefficients


def resolve_profile(name: str | int | None, overrides: dict | None = None) -> Profile | None:
    """The named profile (by name or number) with per-job overrides applied; None when no
    profile was asked for and there are no overrides.

    Raises:
        ProfileError: unknown name, or an override naming an unknown key or a bad value.
    """
    if name is None and not overrides:
        return None
    profile = load_profiles().get(name if name is not None else "default")
    return apply_overrides(profile, overrides) if overrides else profile


def savers_from_profile(profile: Profile | None, spec) -> StepSavers:
    """The step savers a profile turns on, for model ``spec`` (TeaCache uses the published
    polynomial of the model when there is one). MagCache's ratio table is not known here: the
    engine binds the model's recorded table, or a recording of one, to the job
    (``wan.optim.magcache_tables.bind_magcache``)."""
    if profile is None:
        return StepSavers()
    s = profile.step_savers
    guidance = GuidanceSettings(
        cfg_skip_mode=s.cfg_skip.mode, cfg_skip_ratio=s.cfg_skip.ratio,
        slg=SkipLayerGuidance(mode=s.slg.mode, layers=tuple(s.slg.layers), scale=s.slg.scale,
                              start=s.slg.start, end=s.slg.end),
        cfg_zero_star=s.cfg_zero_star.enabled, zero_init_steps=s.cfg_zero_star.zero_init_steps)
    tea, mag = s.teacache, s.magcache
    return StepSavers(
        guidance=guidance,
        teacache_speedup=tea.speedup if tea.enabled and tea.threshold is None else None,
        teacache_threshold=tea.threshold if tea.enabled else None,
        teacache_start=tea.start,
        teacache_coefficients=teacache_coefficients(spec.id, spec.arch.dim, spec.arch.model_type),
        magcache_speedup=mag.speedup if mag.enabled and mag.threshold is None else None,
        magcache_threshold=mag.threshold if mag.enabled else None,
        magcache_max_skips=mag.max_skips, magcache_start=mag.start,
        batched_cfg=s.batched_cfg, riflex=s.riflex)


def mmgp_settings_from_profile(profile: Profile, model_ids: list[str], plan=None):
    """What a profile's memory section asks of mmgp on a CUDA machine, for these models; None
    when the profile keeps everything on the GPU (offload "none", or a plan that places every
    model on the GPU).

    Without a plan (a model of unknown sizes): with block offload, the transformer(s) get
    ``transformer_budget_mb`` and the other models ``other_budget_mb`` (0, mmgp's "no limit", when
    unset); with model offload every model moves whole (budget 0).
    With ``plan`` (a :class:`wan.optim.planner.MemoryPlan` of these models): each model's budget is
    its placement's, as MB: a model moved whole gets 0, a streamed one what its resident blocks
    may take (at least 1 MB: 0 would be mmgp's "no limit").
    Pinning: all models, the transformer(s) only, or none; none when the plan pins nothing (offload
    auto that fits only without pinning).
    """
    mem = profile.memory
    transformers = [m for m in model_ids if m.startswith("transformer")]
    pin = mem.pin
    if plan is not None:
        placed = [p for p in plan.placements if p.model in model_ids]
        if all(p.mode == GPU for p in placed):
            return None
        budgets = {p.model: 0 if p.mode in (MOVED, CPU) or p.budget_bytes is None else max(1, p.budget_bytes // MiB)
                   for p in placed}
        pin = pin if plan.pinned_total else "none"
    elif mem.offload == "none":
        return None
    else:
        budgets = {}
        if mem.offload in ("blocks", "auto"):
            budgets = {m: mem.transformer_budget_mb or 0 for m in transformers}
            budgets["*"] = mem.other_budget_mb or 0
    pinned = {"all": ("*",), "transformer": tuple(transformers), "none": ()}[pin]
    return MmgpSettings(budgets_mb=budgets, pinned=pinned, async_transfers=mem.async_transfers,
                        compile=tuple(transformers) if profile.compile else ())


# ----------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class LoadSettings:
    """How one model set loads on one machine: what ``wan.engine.model_manager`` executes of a
    profile and, on a machine with a GPU, of the profile's memory plan (:mod:`wan.optim.planner`).

    Attributes:
        profile: the profile whose quantisation, precision and pinning apply: the one asked for,
            or for ``auto`` the numbered profile it stands for, mixed as ``planner.resolve_auto``
            mixes them (``auto``'s own non-default settings kept).
        stream: the DiTs stream block by block from their checkpoints (``wan.optim.offload``).
        prefetch: blocks read ahead while one computes.
        blocks_to_swap: the profile's musubi count (every block but these stays resident).
        resident_blocks: blocks each streamed DiT keeps on the device for good, from the plan;
            None: ``blocks_to_swap`` decides, or none stays (no plan).
        quant_transformer, quant_text_encoder, compile: what the profile asks.
        text_encoder_on_cpu: the text encoder loads and runs on the CPU (its states then move to the
            device): the own path's choice when the plan does not keep it on the GPU, since that
            path moves no model between phases (umT5-XXL is ~11 GB in bf16).
        mmgp: mmgp's settings when mmgp executes the plan (CUDA with mmgp installed), else None.
        notes: what was decided, in words (they reach the job's notes).
    """

    profile: Profile | None
    stream: bool = False
    prefetch: int = 1
    blocks_to_swap: int | None = None
    resident_blocks: int | None = None
    quant_transformer: str = "none"
    quant_text_encoder: str = "none"
    compile: bool = False
    mmgp: MmgpSettings | None = None
    text_encoder_on_cpu: bool = False
    notes: tuple[str, ...] = ()

    @property
    def key(self) -> tuple:
        """What makes a loaded set reusable under other settings: everything but the notes."""
        prequantized = self.profile.quantize.prefer_prequantized if self.profile is not None else True
        return (self.stream, self.prefetch, self.blocks_to_swap, self.resident_blocks, self.quant_transformer,
                self.quant_text_encoder, self.compile, self.text_encoder_on_cpu, self.mmgp, prequantized)


def load_settings(profile: Profile | None) -> tuple[bool, int, int | None, str, str, bool]:
    """(stream blocks, prefetch, blocks_to_swap, transformer quantisation, text encoder quantisation,
    compile) of a profile as written (no plan): the part of it that decides how models are loaded.

    Raises:
        ProfileError: streaming asked for together with compile.
    """
    if profile is None:
        return (False, 1, None, "none", "none", False)
    mem, quant = profile.memory, profile.quantize
    stream = mem.offload == "blocks" or mem.blocks_to_swap is not None
    if stream and profile.compile:
        raise ProfileError(f"profile {profile.name}: compile with block streaming is not supported yet (the "
                           "streaming hooks around each block break the compiled graph); choose one")
    return (stream, mem.prefetch_blocks, mem.blocks_to_swap, quant.transformer, quant.text_encoder, profile.compile)


def model_ids(spec) -> list[str]:
    """The ids of the models a spec loads, as mmgp and the planner name them."""
    return [*spec.transformer_roles, "text_encoder", "vae", *(["clip"] if spec.needs_clip else [])]


def execution_settings(profile: Profile | None, spec, machine: Machine, profiles: ProfileSet | None = None, *,
                       mmgp: bool = False) -> LoadSettings:
    """How the models of ``spec`` load under ``profile`` on ``machine``: the memory plan executed.

    Without a GPU (or without a profile, or for a model of unknown sizes: the TEST family) the
    profile applies as written: models load whole onto the device unless ``offload: blocks`` or
    ``blocks_to_swap`` streams the DiTs. On a GPU, :func:`wan.optim.planner.plan` decides:
    ``auto`` becomes the numbered profile the planner picks; then, with ``mmgp``, each model's
    budget comes from its placement. Without mmgp (the project's own block streaming) a DiT the
    plan keeps on the GPU loads whole, and a streamed one keeps the plan's resident blocks; this
    path moves nothing between phases, so the text encoder, CLIP and VAE stay on the GPU whole and
    a DiT the plan moves whole loads whole only when all of it fits: else it streams, and the
    resident blocks of every DiT are held to what VRAM is left beside the others (a note says so).
    An explicit ``blocks_to_swap`` is kept exactly.

    ``machine``: the machine planned for (:func:`wan.optim.machine.detect_machine`);
    ``profiles``: where ``auto`` finds the numbered profiles (the built-ins and user folder if None);
    ``mmgp``: mmgp executes the plan (CUDA with mmgp installed).

    Raises:
        ProfileError: the profile as written cannot load (see :func:`load_settings`).
    """
    stream, prefetch, swap, quant_dit, quant_te, compile_ = load_settings(profile)
    ids = model_ids(spec)
    written = LoadSettings(profile, stream=stream, prefetch=prefetch, blocks_to_swap=swap, quant_transformer=quant_dit,
                           quant_text_encoder=quant_te, compile=compile_,
                           mmgp=mmgp_settings_from_profile(profile, ids) if mmgp and profile is not None else None)
    if profile is None or not machine.has_gpu:
        return written
    try:
        sizes = model_sizes(spec, run_precision(profile, machine))
    except ValueError as e:  # the TEST family: a few MB, fits anywhere
        return dataclasses.replace(written, notes=(f"no memory plan ({e}): profile {profile.label} applies as written",))
    notes = []
    executed = profile
    if profile.is_auto:
        profiles = profiles if profiles is not None else load_profiles()  # read once for both calls below
        executed, chosen, why = resolve_auto(profile, sizes, machine, profiles)
        notes.append(f"profile auto -> {chosen.label} on {machine}: {why}")
    result = plan(profile, sizes, machine, profiles)
    notes += [n for n in result.notes if n.startswith("offload auto")]
    notes += [f"the memory plan does not fit: {s}" for s in result.shortfalls]
    mem, quant = executed.memory, executed.quantize
    settings = LoadSettings(executed, prefetch=mem.prefetch_blocks, blocks_to_swap=mem.blocks_to_swap,
                            quant_transformer=quant.transformer, quant_text_encoder=quant.text_encoder,
                            compile=executed.compile)
    if mmgp:  # models load into RAM; mmgp moves them (and compiles) as the plan says
        return dataclasses.replace(settings, mmgp=mmgp_settings_from_profile(executed, ids, result),
                                   notes=tuple(notes))
    # off the GPU as the plan says, unless it only moves there when used and everything fits at once
    te = result.placement("text_encoder")
    fits_all = sum(p.bytes for p in result.placements) + mem.vram_reserve_mb * MiB <= machine.vram_bytes
    te_on_cpu = te.mode != GPU and not (te.mode == MOVED and fits_all)
    if te_on_cpu:
        settings = dataclasses.replace(settings, text_encoder_on_cpu=True)
        notes.append("text encoder: runs on the CPU (the plan keeps it off the GPU, and without mmgp no model is "
                     "moved between phases); its states move to the GPU")
    if mem.blocks_to_swap is not None:
        return dataclasses.replace(settings, stream=True, notes=tuple(notes))
    off_gpu = ("text_encoder",) if te_on_cpu else ()
    resident, own_notes = _own_path_resident(result, sizes, spec.transformer_roles, machine, mem, off_gpu)
    notes += own_notes
    if resident is None:
        return dataclasses.replace(settings, notes=tuple(notes))
    if executed.compile:
        notes.append("the plan streams the DiT: compile is left off (the streaming hooks break the compiled graph)")
    return dataclasses.replace(settings, stream=True, resident_blocks=resident, compile=False, notes=tuple(notes))


def _own_path_resident(result: MemoryPlan, sizes: list[ModelSize], dit_roles, machine: Machine,
                       mem, off_gpu: tuple[str, ...] = ()) -> tuple[int | None, list[str]]:
    """Blocks each DiT keeps on the GPU under the project's own streaming, or None: loaded whole.

    That path keeps every other model (but those in ``off_gpu``, run on the CPU) on the GPU whole
    for the whole job and the resident blocks of every expert at once, with ``prefetch_blocks + 1``
    blocks in flight for the active one."""
    dits = [p for p in result.placements if p.model in dit_roles]
    if not dits or all(p.mode == GPU for p in dits):
        return None, []
    others = [p for p in result.placements if p.model not in dit_roles and p.model not in off_gpu]
    on_gpu = sum(p.bytes for p in others)
    reserve = mem.vram_reserve_mb * MiB
    if all(p.mode in (GPU, MOVED) for p in dits) and on_gpu + sum(p.bytes for p in dits) + reserve <= machine.vram_bytes:
        return None, []
    rest = {m.name: m.rest_bytes for m in sizes}
    block, n = max(p.block_bytes for p in dits), min(p.blocks for p in dits)
    in_flight = min(mem.prefetch_blocks + 1, n) * block
    free = machine.vram_bytes - reserve - on_gpu - sum(rest.get(p.model, 0) for p in dits) - in_flight
    fit = max(0, free // block // len(dits)) if block else n
    planned = min(p.resident_blocks if p.mode in (STREAMED, MMAP) else p.blocks for p in dits)
    resident = int(min(planned, fit, n))
    notes = []
    if resident < planned:
        held = ", ".join(f"{p.model} {gb(p.bytes)}" for p in others)
        planned_words = (f"the plan's {planned}" if all(p.mode in (STREAMED, MMAP) for p in dits)
                         else "all of them (the plan moves the DiT whole)")
        notes.append(f"{resident} of {n} blocks of each DiT resident rather than {planned_words}: without mmgp "
                     f"the other models stay on the GPU whole ({held})")
    return resident, notes
