"""The step savers of one generation: TeaCache, MagCache, RIFLEx and the guidance shortcuts.

:class:`StepSavers` gathers what a profile (and per-job overrides) switch on to save steps, and
builds the block runner that skips them (:mod:`wan.optim.step_cache`). The denoising loop
(``wan.engine.loop``) reads it; this module knows nothing of the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from wan.optim.guidance import GuidanceSettings
from wan.optim.profiles import MagCacheSettings, StepSaverSettings, TeaCacheSettings
from wan.optim.step_cache import (StepRunner, calibrate_magcache_passes, calibrate_teacache, magcache_schedule,
                                  teacache_schedule, time_embeddings)

# Defaults are the profile schema's (wan.optim.profiles), written once there.
_TEA, _MAG, _SAVERS = TeaCacheSettings(), MagCacheSettings(), StepSaverSettings()
RIFLEX_K = 6
RIFLEX_AUTO_SECONDS = 6  # Wan was trained on clips of about 5 s; past 6 s RIFLEx keeps motion coherent


@dataclass(frozen=True)
class StepSavers:
    """The step savers of one generation (from the profile, with per-job overrides).

    TeaCache is on when ``teacache_speedup`` (calibrated threshold) or ``teacache_threshold`` is
    set; it is left off for two-expert models, whose residuals change network mid-run.

    MagCache is on when ``magcache_speedup`` or ``magcache_threshold`` is set (TeaCache wins when
    both are). Its ratios come from ``magcache_ratios`` (one table for this step count, used for
    both passes) or else from ``magcache_source``, the job's view of the per-model store
    (:class:`wan.optim.magcache_tables.MagCacheJob`, bound by the engine): per-pass tables for
    the job's steps, or, when it has none yet, a recorder that computes every step.
    """

    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    teacache_speedup: float | None = None
    teacache_threshold: float | None = None
    teacache_start: float = _TEA.start
    teacache_coefficients: tuple | None = None
    magcache_ratios: tuple[float, ...] | None = None  # per-step table for this step count (calibrated)
    magcache_speedup: float | None = None
    magcache_threshold: float | None = None
    magcache_max_skips: int = _MAG.max_skips
    magcache_start: float = _MAG.start
    magcache_source: Any = None       # MagCacheJob: ratios(sampler, start), recorder(sampler, start), not_used(why)
    batched_cfg: bool = _SAVERS.batched_cfg
    riflex: str = _SAVERS.riflex     # "auto": on for clips longer than RIFLEX_AUTO_SECONDS at the model's fps

    @property
    def magcache_on(self) -> bool:
        return self.magcache_speedup is not None or self.magcache_threshold is not None

    def riflex_setting(self, latent_frames: int, frames: int, fps: int) -> tuple[int, int] | None:
        """(k, latent frames) when RIFLEx applies, k = 6 as for Wan in the RIFLEx paper and Wan2GP."""
        if self.riflex == "on" or (self.riflex == "auto" and frames > RIFLEX_AUTO_SECONDS * fps + 1):
            return (RIFLEX_K, latent_frames)
        if self.riflex not in ("auto", "on", "off"):
            raise ValueError(f"riflex: {self.riflex!r} is not allowed; auto, on or off")
        return None

    def runner(self, networks: Mapping, sampler, start: int):
        """The block runner of this generation (a StepRunner, a MagCache recorder), or None."""
        needs_runner = self.guidance.slg.mode != "none"
        schedule = None
        teacache_on = self.teacache_speedup is not None or self.teacache_threshold is not None
        if teacache_on and len(networks) == 1:
            dit = next(iter(networks.values()))
            emb = time_embeddings(dit, sampler.timesteps[start:])
            first = max(1, int(self.teacache_start * len(emb)))
            if self.teacache_threshold is not None:
                part = teacache_schedule(emb, self.teacache_threshold, self.teacache_coefficients, first)
            else:
                _, part = calibrate_teacache(emb, self.teacache_speedup, self.teacache_coefficients, first)
            schedule = [True] * start + part
            if self.magcache_on and self.magcache_source is not None:
                self.magcache_source.not_used("TeaCache is on as well, and the two do not combine")
        elif self.magcache_on:
            found = self._magcache_tables(sampler, start)
            if found is None:  # no table yet: this run computes every step and records one
                recorder = self.magcache_source.recorder(sampler, start)
                return recorder if recorder is not None else (StepRunner() if needs_runner else None)
            schedule = self._magcache_schedule(*found, start)
        if schedule is None and not needs_runner:
            return None
        return StepRunner(schedule=schedule)

    def _magcache_tables(self, sampler, start: int):
        """({pass kind: ratios [steps]}, {pass kind: forced steps}), or None: no table yet."""
        if self.magcache_ratios is not None:
            ratios = list(self.magcache_ratios)
            if len(ratios) != len(sampler.timesteps):
                raise ValueError(f"magcache ratios: {len(ratios)} values for {len(sampler.timesteps)} steps; "
                                 "calibrate for this step count")
            return {"cond": ratios, "uncond": ratios}, {}
        if self.magcache_source is None:
            raise ValueError("MagCache is on but has neither magcache_ratios nor a magcache_source "
                             "(Engine.generate binds one; see wan.optim.magcache_tables)")
        return self.magcache_source.ratios(sampler, start)

    def _magcache_schedule(self, tables: dict[str, list[float]], forced: dict[str, set[int]],
                           start: int) -> dict[str, list[bool]]:
        """Per-pass schedules over the whole run (steps before ``start`` marked computed)."""
        parts = {kind: ratios[start:] for kind, ratios in tables.items()}
        steps = len(next(iter(parts.values())))
        forced_part = {k: {i - start for i in f if i >= start} for k, f in forced.items()}
        first = max(1, int(self.magcache_start * steps))
        if self.magcache_threshold is not None:
            scheds = {k: magcache_schedule(r, self.magcache_threshold, self.magcache_max_skips, first,
                                           forced_part.get(k, ())) for k, r in parts.items()}
        else:
            _, scheds = calibrate_magcache_passes(parts, self.magcache_speedup, self.magcache_max_skips, first,
                                                  forced_part)
        return {k: [True] * start + s for k, s in scheds.items()}
