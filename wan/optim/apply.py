"""From a profile to what one generation uses: the profile itself (with per-job overrides), its
step savers (TeaCache, MagCache, RIFLEx, the guidance shortcuts) and, on CUDA, mmgp's settings.

The memory side of a profile (offload, quantisation) is applied when models are loaded
(``wan.engine.model_manager``); the attention backend is attached per job by the engine
(``wan.engine.attach``).
"""

from __future__ import annotations

from wan.optim.step_savers import StepSavers
from wan.optim.guidance import GuidanceSettings, SkipLayerGuidance
from wan.optim.profiles import Profile, apply_overrides
from wan.optim.profile_files import load_profiles
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


def mmgp_settings_from_profile(profile: Profile, model_ids: list[str]):
    """What a profile's memory section asks of mmgp on a CUDA machine, for these models; None
    when the profile keeps everything on the GPU (offload "none").

    Budgets: with block offload, the transformer(s) get ``transformer_budget_mb`` and the other
    models ``other_budget_mb`` (0, mmgp's "no limit", when unset); with model offload every model
    moves whole (budget 0). Pinning: all models, the transformer(s) only, or none.
    """
    from wan.optim.mmgp_backend import MmgpSettings
    mem = profile.memory
    if mem.offload == "none":
        return None
    transformers = [m for m in model_ids if m.startswith("transformer")]
    budgets: dict[str, int] = {}
    if mem.offload in ("blocks", "auto"):
        budgets = {m: mem.transformer_budget_mb or 0 for m in transformers}
        budgets["*"] = mem.other_budget_mb or 0
    pinned = {"all": ("*",), "transformer": tuple(transformers), "none": ()}[mem.pin]
    return MmgpSettings(budgets_mb=budgets, pinned=pinned, async_transfers=mem.async_transfers,
                        compile=tuple(transformers) if profile.compile else ())
