"""How each denoising step combines its model passes: CFG skipping, skip-layer guidance, CFG-Zero*.

A step runs some of these passes:
  ``cond``        the prompt
  ``uncond``      the negative prompt
  ``uncond_skip`` the negative prompt with the skip-layer-guidance blocks left out (Wan2GP mode)
  ``cond_skip``   the prompt with those blocks left out (SD3.5 "original" mode)
and :meth:`StepGuidance.combine` turns their flows into one. With every saver off this is plain
classifier-free guidance, ``uncond + g * (cond - uncond)``, as the reference computes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wan.optim.profiles import CFG_SKIP_MODES, SLG_MODES, CfgSkipSettings, CfgZeroStarSettings, SlgSettings

# Defaults are the profile schema's (wan.optim.profiles), written once there.
_SLG, _CFG_SKIP, _CFG_ZERO = SlgSettings(), CfgSkipSettings(), CfgZeroStarSettings()


def cfg_apply_pattern(mode: str, ratio: float, steps: int) -> list[bool]:
    """Which steps apply CFG (True) and which run the prompt pass alone (False).

    ``ratio`` is the share of steps that apply CFG, as in musubi-tuner: ``early`` skips the first
    steps, ``late`` the last, ``early_late`` both ends, ``middle`` the middle; ``alternate`` adds
    ``ratio`` per step and applies when the sum reaches 1 (in floating point, as musubi does:
    at 10 steps and 0.6 that gives SASASAASAS).
    """
    if mode not in CFG_SKIP_MODES:
        raise ValueError(f"cfg_skip.mode: {mode!r} is not allowed; choose one of {', '.join(CFG_SKIP_MODES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"cfg_skip.ratio: {ratio!r} is not allowed; a share of steps between 0 and 1")
    if mode == "none":
        return [True] * steps
    apply_steps = int(steps * ratio)
    if mode == "alternate":
        pattern, w = [], 0.0
        for _ in range(steps):
            w += ratio
            pattern.append(w >= 1.0)
            if w >= 1.0:
                w -= 1.0
        return pattern
    if mode == "middle":
        skip = steps - apply_steps
        lo = (steps - skip) // 2
        return [not lo <= i < lo + skip for i in range(steps)]
    lo = {"early": steps - apply_steps, "late": 0, "early_late": (steps - apply_steps) // 2}[mode]
    return [lo <= i < lo + apply_steps for i in range(steps)]


@dataclass(frozen=True)
class SkipLayerGuidance:
    """Skip-layer guidance: some blocks are left out of one pass between two step fractions.

    ``original`` (SD3.5): an extra prompt pass without the layers, ``flow += scale * (cond - cond_skip)``.
    ``uncond`` (Wan2GP): the negative-prompt pass runs without the layers.
    """

    mode: str = _SLG.mode
    layers: tuple[int, ...] = _SLG.layers
    scale: float = _SLG.scale
    start: float = _SLG.start
    end: float = _SLG.end

    def __post_init__(self):
        if self.mode not in SLG_MODES:
            raise ValueError(f"slg.mode: {self.mode!r} is not allowed; choose one of {', '.join(SLG_MODES)}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(f"slg.start/end: {self.start}, {self.end} are not allowed; 0 <= start <= end <= 1")

    def active(self, step: int, steps: int) -> bool:
        return self.mode != "none" and int(self.start * steps) <= step < int(self.end * steps)


def cfg_zero_star_alpha(cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
    """CFG-Zero*'s optimised scale per batch item: <cond, uncond> / (||uncond||^2 + 1e-8).

    Args: cond, uncond [B, ...]. Returns [B, 1, ..., 1] float32.
    """
    c, u = cond.float().flatten(1), uncond.float().flatten(1)
    alpha = (c * u).sum(1) / ((u * u).sum(1) + 1e-8)
    return alpha.view(-1, *([1] * (cond.dim() - 1)))


@dataclass(frozen=True)
class GuidanceSettings:
    """The guidance part of a profile's step savers."""

    cfg_skip_mode: str = _CFG_SKIP.mode
    cfg_skip_ratio: float = _CFG_SKIP.ratio
    slg: SkipLayerGuidance = field(default_factory=SkipLayerGuidance)
    cfg_zero_star: bool = _CFG_ZERO.enabled
    zero_init_steps: int = _CFG_ZERO.zero_init_steps  # CFG-Zero*: the first N steps predict zero flow


class StepGuidance:
    """The passes of each step of one generation, and how their flows combine."""

    def __init__(self, settings: GuidanceSettings, steps: int):
        self.settings = settings
        self.steps = steps
        self.apply_cfg = cfg_apply_pattern(settings.cfg_skip_mode, settings.cfg_skip_ratio, steps)

    def passes(self, step: int, guidance: float) -> tuple[str, ...]:
        s = self.settings
        if s.cfg_zero_star and step < s.zero_init_steps:
            return ()
        slg = s.slg.active(step, self.steps)
        if not self.apply_cfg[step] or (guidance == 1.0 and not slg):
            return ("cond",)
        if slg and s.slg.mode == "uncond":
            return ("cond", "uncond_skip")
        if slg and s.slg.mode == "original":
            return ("cond", "uncond", "cond_skip")
        return ("cond", "uncond")

    def skip_layers(self, pass_name: str) -> frozenset[int]:
        return frozenset(self.settings.slg.layers) if pass_name.endswith("_skip") else frozenset()

    def combine(self, step: int, flows: dict[str, torch.Tensor], guidance: float, like: torch.Tensor) -> torch.Tensor:
        """One flow from the passes' flows (all [C, F, H, W] or [B, ...] alike)."""
        if not flows:  # CFG-Zero* zero-init step
            return torch.zeros_like(like)
        cond = flows["cond"]
        uncond = flows.get("uncond", flows.get("uncond_skip"))
        if uncond is None:
            return cond
        if self.settings.cfg_zero_star:
            alpha = cfg_zero_star_alpha(cond[None], uncond[None])[0].to(uncond.dtype)
            uncond = uncond * alpha
        flow = uncond + guidance * (cond - uncond)
        if "cond_skip" in flows:
            flow = flow + self.settings.slg.scale * (cond - flows["cond_skip"])
        return flow
