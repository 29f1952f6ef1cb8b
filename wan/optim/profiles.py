"""Profiles: typed memory and speed settings read from YAML files.

A profile decides how a generation uses memory (offload, budgets, pinning, quantisation) and time
(attention backend, compile, VAE tiling, the step savers). It is a frozen dataclass,
:class:`Profile`; its YAML file uses the field names as keys, in the same nested sections::

    # Who this is for
    name: my_profile            # optional: the file name without .yaml
    extends: LowRAM_LowVRAM     # optional: a parent profile, by name or number
    memory:
      prefetch_blocks: 2
    step_savers:
      teacache: {enabled: true, speedup: 2.0}

Defaults live in the dataclasses below, so a file states only what differs. ``extends`` inherits
every setting of the parent (chains are allowed; a cycle or a missing parent is an error);
``name``, ``number``, ``description`` and ``extends`` itself are never inherited.

Where profiles come from (the built-ins, the user's folder) and finding one by name or number is
:mod:`wan.optim.profile_files`.

Files are read and checked by :mod:`wan.config`: every error names the file, the dotted key, the
bad value and what is allowed.
"""

import dataclasses
from collections.abc import Mapping
from dataclasses import field
from typing import Any

import yaml

from wan.config import (Bool, ConfigError, Text, choice, integer, is_int, is_number, merge, number, rule,
                        section, validate)

OFFLOAD_MODES = ("auto", "none", "model", "blocks")
PIN_MODES = ("all", "transformer", "none")
QUANT_MODES = ("none", "fp8", "fp8_scaled", "int8")
PRECISIONS = ("auto", "bf16", "fp16")
ATTENTION_BACKENDS = ("sdpa", "sage", "sage2", "flash2", "flash3", "xformers")
TILING_MODES = ("auto", "on", "off")
SLG_MODES = ("none", "original", "uncond")
CFG_SKIP_MODES = ("none", "early", "late", "middle", "early_late", "alternate")
RIFLEX_MODES = ("auto", "on", "off")
LORA_MODES = ("hooks", "merge", "auto")  # wan.lora.merge.MERGE_MODES; auto means hooks
# Keys of a profile that are about the file itself, not settings: never inherited or overridden.
IDENTITY_KEYS = ("name", "number", "description", "extends")


class ProfileError(ConfigError):
    """A profile file or override is malformed, or a profile name is unknown."""


# ----------------------------------------------------------------------------- the schema


def _as_list(v: Any) -> Any:
    """A single name or index stands for a list of one."""
    return [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v


def _backend_order(v: Any) -> bool:
    names = _as_list(v)
    return (isinstance(names, (list, tuple)) and all(isinstance(x, str) and x in ATTENTION_BACKENDS for x in names)
            and "sdpa" in names and len(set(names)) == len(names))


Fraction = number(0.0, 1.0)
Budget = integer(0, optional=True)
Speedup = number(1.0, 10.0)
Threshold = number(0.0, optional=True)
# a number is a profile's number; YAML reads `extends: 4` as one
ParentRef = rule("a profile name or number", lambda v: is_int(v) or (isinstance(v, str) and v.strip() != ""),
                 lambda v: str(v).strip(), optional=True)
Backends = rule("a list of " + ", ".join(ATTENTION_BACKENDS) + " that contains sdpa (the fallback that always "
                "works), each named once", _backend_order, lambda v: tuple(_as_list(v)))
Layers = rule("a list of block indices (integers >= 0)",
              lambda v: isinstance(_as_list(v), (list, tuple)) and all(is_int(x) and x >= 0 for x in _as_list(v)),
              lambda v: tuple(_as_list(v)))


@section
class MemorySettings:
    """Where weights live. Budgets are MiB of GPU memory for a model's permanently resident blocks
    (see :mod:`wan.optim.planner`); ``None`` lets the planner use what is free."""

    offload: choice(OFFLOAD_MODES) = "auto"
    transformer_budget_mb: Budget = None
    other_budget_mb: Budget = None
    pin: choice(PIN_MODES) = "all"
    async_transfers: Bool = True
    prefetch_blocks: integer(0) = 1
    blocks_to_swap: Budget = None
    vram_reserve_mb: integer(0) = 2048
    ram_reserve_mb: integer(0) = 2048


@section
class QuantizeSettings:
    """Weight quantisation of the DiT(s) and of the text encoder; norms, embeddings, head and
    modulation always stay in high precision."""

    transformer: choice(QUANT_MODES) = "none"
    text_encoder: choice(QUANT_MODES) = "none"
    prefer_prequantized: Bool = True


@section
class VaeSettings:
    tiling: choice(TILING_MODES) = "auto"
    tile_px: integer(16) = 256
    overlap_px: integer(0) = 64


@section
class TeaCacheSettings:
    enabled: Bool = False
    speedup: Speedup = 1.75
    threshold: Threshold = None
    start: Fraction = 0.1


@section
class MagCacheSettings:
    enabled: Bool = False
    speedup: Speedup = 2.0
    threshold: Threshold = None
    max_skips: integer(1) = 2
    start: Fraction = 0.2


@section
class SlgSettings:
    mode: choice(SLG_MODES) = "none"
    layers: Layers = (9,)
    scale: number(0.0) = 3.0
    start: Fraction = 0.1
    end: Fraction = 0.9


@section
class CfgSkipSettings:
    mode: choice(CFG_SKIP_MODES) = "none"
    ratio: Fraction = 1.0


@section
class CfgZeroStarSettings:
    enabled: Bool = False
    zero_init_steps: integer(0) = 0


@section
class StepSaverSettings:
    teacache: TeaCacheSettings = field(default_factory=TeaCacheSettings)
    magcache: MagCacheSettings = field(default_factory=MagCacheSettings)
    slg: SlgSettings = field(default_factory=SlgSettings)
    cfg_skip: CfgSkipSettings = field(default_factory=CfgSkipSettings)
    cfg_zero_star: CfgZeroStarSettings = field(default_factory=CfgZeroStarSettings)
    batched_cfg: Bool = False
    riflex: choice(RIFLEX_MODES) = "auto"


@section
class LoraSettings:
    """How a job's LoRAs are applied (``wan.lora.merge``): ``hooks`` add their output at each
    layer, ``merge`` writes them into the weights for the job and restores them exactly after."""

    mode: choice(LORA_MODES) = "hooks"


SAMPLERS = ("unipc", "dpm++", "euler", "lcm")  # wan.engine.samplers.SAMPLERS (optim imports no engine)
LORA_ROLES = ("transformer", "high_noise", "low_noise")
Multiplier = rule("a LoRA multiplier string such as '1', '1;0' or '0;1;0'",
                  lambda v: isinstance(v, str) and v.strip() != "" or (is_number(v) and not isinstance(v, bool)),
                  str)
Timesteps = rule("a list of timesteps in (0, 1000], strictly decreasing",
                 lambda v: isinstance(v, (list, tuple)) and all(is_number(t) and 0 < t <= 1000 for t in v)
                 and all(a > b for a, b in zip(v, v[1:])), lambda v: tuple(float(t) for t in v))


@section
class SamplingSettings:
    """Generation settings of a recipe (few-step accelerator LoRAs): each fills the request field of
    the same name when the request leaves it to the model's default (null: the profile says
    nothing). ``accelerator`` adds the registry's LoRA of that recipe made for the job's model
    (``loras:`` of the model registry) with ``lora_multipliers`` per file (``transformer``, or
    ``high_noise`` / ``low_noise`` for the two files of a Wan 2.2 A14B pair)."""

    steps: integer(1, optional=True) = None
    guidance: number(0.0, optional=True) = None
    guidance_high_noise: number(0.0, optional=True) = None
    guidance_phases: integer(1, 3, optional=True) = None
    guidance2_scale: number(0.0, optional=True) = None
    guidance3_scale: number(0.0, optional=True) = None
    switch_threshold: number(0.0, 1000.0, optional=True) = None
    switch_threshold2: number(0.0, 1000.0, optional=True) = None
    model_switch_phase: integer(1, 2, optional=True) = None
    shift: number(0.0, open=True, optional=True) = None
    sampler: choice(SAMPLERS, optional=True) = None
    timesteps: Timesteps = ()
    accelerator: Text | None = None
    lora_multipliers: dict[choice(LORA_ROLES), Multiplier] = field(default_factory=dict)


@section
class Profile:
    """One named profile. ``source`` is the file it was read from: set by the loader, not a key."""

    name: Text = ""
    number: integer(1, 5, optional=True) = None
    description: Text = ""
    extends: ParentRef = None
    memory: MemorySettings = field(default_factory=MemorySettings)
    quantize: QuantizeSettings = field(default_factory=QuantizeSettings)
    precision: choice(PRECISIONS) = "auto"
    attention: Backends = ("flash3", "flash2", "sdpa")
    compile: Bool = False
    vae: VaeSettings = field(default_factory=VaeSettings)
    step_savers: StepSaverSettings = field(default_factory=StepSaverSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    source: str = field(default="", init=False, compare=False)

    @property
    def label(self) -> str:
        """``"4 LowRAM_LowVRAM"`` for numbered profiles, else the name."""
        return f"{self.number} {self.name}" if self.number is not None else self.name

    @property
    def is_auto(self) -> bool:
        """The ``auto`` profile: the planner replaces its memory settings by those of 1..5."""
        return self.name.lower() == "auto"


# ----------------------------------------------------------------------------- building


def build_profile(data: Mapping, where: str, source: str = "") -> Profile:
    """A checked profile from raw data (file values, merged sections), with the rules between fields."""
    p = validate(Profile, data, where, ProfileError)
    object.__setattr__(p, "source", source)  # not an init field: no file or override may set it
    slg = p.step_savers.slg
    if slg.start > slg.end:
        raise ProfileError.bad(where, "step_savers.slg.start", slg.start,
                               f"a fraction <= step_savers.slg.end ({slg.end})")
    if p.vae.overlap_px >= p.vae.tile_px:
        raise ProfileError.bad(where, "vae.overlap_px", p.vae.overlap_px, f"an integer < vae.tile_px ({p.vae.tile_px})")
    return p


def profile_to_dict(profile: Profile) -> dict:
    """Plain data (lists, no tuples) with the YAML keys; ``source`` left out."""
    def plain(v):
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v
    data = plain(dataclasses.asdict(profile))
    data.pop("source", None)
    return data


# ----------------------------------------------------------------------------- per-job overrides


def parse_override(text: str) -> tuple[str, Any]:
    """``"step_savers.teacache.speedup=2"`` -> ``("step_savers.teacache.speedup", 2)``; the value
    is read as YAML, so ``true``, ``2.0``, ``[9, 10]`` and ``null`` have their types."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ProfileError(f"override {text!r}: expected KEY=VALUE, e.g. step_savers.teacache.enabled=true")
    if value.strip().lower() in ("on", "off", "yes", "no", "y", "n"):
        # YAML 1.1 would read these as booleans; settings such as vae.tiling=on mean the word (a
        # true/false setting then says it wants true or false, rather than guessing)
        return key.strip(), value.strip()
    return key.strip(), yaml.safe_load(value) if value.strip() else ""


def apply_overrides(profile: Profile, overrides: Mapping[str, Any], where: str = "override") -> Profile:
    """A copy of ``profile`` with dotted settings replaced, checked as a file would be.

    Args:
        overrides: ``{"step_savers.teacache.enabled": True, "memory": {"pin": "none"}, ...}``;
            a value for a section is a partial mapping merged into it.
    """
    data = profile_to_dict(profile)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if parts[0] in IDENTITY_KEYS:
            settings = ", ".join(f.name for f in dataclasses.fields(Profile) if f.init and f.name not in IDENTITY_KEYS)
            raise ProfileError(f"{where}: {dotted}: cannot be overridden per job; allowed: {settings} "
                               f"and the keys inside them")
        for part in reversed(parts):
            value = {part: value}
        data = merge(data, value)
    return build_profile(data, where, profile.source)
