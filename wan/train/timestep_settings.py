"""The settings of timestep sampling (musubi-tuner's flag names), typed and checked; no torch here,
so that building the ``train`` command's flags stays light. The sampling itself, and what each
setting does, is :mod:`wan.train.timesteps`."""

from __future__ import annotations

import dataclasses
import typing

from pydantic import TypeAdapter, ValidationError

from wan.config import Bool, ConfigError, choice, integer, number, reject, section

NUM_TRAIN_TIMESTEPS = 1000

SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift", "qwen_shift", "logsnr",
             "qinglong_flux", "qinglong_qwen")
WEIGHTINGS = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")


class TimestepSettingsError(ConfigError):
    """A timestep setting is not allowed; the message names the field, the value and what is allowed."""


def _setting(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@section
class TimestepSettings:
    """How training draws noise levels, with musubi-tuner's flag names and defaults.

    Field names are the flag names; ``metadata["help"]`` is the flag help. Built in code, each field is
    checked at construction (:class:`TimestepSettingsError`); read from a file with ``wan.config.validate``,
    errors name the file and key.
    """

    timestep_sampling: choice(SAMPLINGS) = _setting(
        "sigma", "how noise levels are drawn: sigma (musubi's default: uniform over the scheduler's 1000-step "
                 "grid; discrete_flow_shift has NO effect), uniform, sigmoid (sigmoid of a normal), shift "
                 "(sigmoid, then shifted by discrete_flow_shift), flux_shift / qwen_shift (shift from the latent "
                 "size), logsnr, qinglong_flux / qinglong_qwen (hybrids)")
    discrete_flow_shift: number(0, None, open=True) = _setting(
        1.0, "shift s for timestep_sampling shift: t' = s*t / (1 + (s-1)*t); larger pushes toward noise. "
             "Ignored by the default sigma mode")
    sigmoid_scale: number(0, None, open=True) = _setting(
        1.0, "scale of the normal before the sigmoid (sigmoid, shift, flux_shift, qwen_shift, qinglong)")
    logit_mean: number() = _setting(
        0.0, "mean of the normal: logit_normal weighting (sigma mode) and logsnr / qinglong log-SNR")
    logit_std: number(0, None, open=True) = _setting(
        1.0, "std of the normal: logit_normal weighting (sigma mode) and logsnr / qinglong log-SNR")
    mode_scale: number() = _setting(1.29, "scale of the mode weighting scheme (sigma mode)")
    weighting_scheme: choice(WEIGHTINGS) = _setting(
        "none", "loss weighting (sigma_sqrt, cosmap); logit_normal and mode only change the sampling "
                "density of the sigma mode")
    min_timestep: integer(0, 999, optional=True) = _setting(None, "lowest timestep trained, 0..999 (default 0)")
    max_timestep: integer(1, 1000, optional=True) = _setting(
        None, "highest timestep trained, 1..1000 (default 1000)")
    preserve_distribution_shape: Bool = _setting(
        False, "keep the distribution's shape inside [min_timestep, max_timestep] by rejection sampling "
               "instead of rescaling [0, 1] onto it (not in sigma mode)")
    num_timestep_buckets: integer(1, None, optional=True) = _setting(
        None, "stratified sampling: each run of N draws takes one uniform from each of N equal strata "
              "(2 or more; not in sigma mode)")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked_field(type(self), f.name, getattr(self, f.name)))
        lo, hi = self.min_timestep, self.max_timestep
        if lo is not None and hi is not None and lo >= hi:
            # reject() reads well both from a file (file: key: value is not allowed; expected ...) and in code
            reject(hi, f"max_timestep above min_timestep ({lo})", "max_timestep")

    @property
    def timestep_range(self) -> tuple[int, int]:
        """(min_timestep, max_timestep) with musubi's defaults (0, 1000)."""
        return (0 if self.min_timestep is None else self.min_timestep,
                NUM_TRAIN_TIMESTEPS if self.max_timestep is None else self.max_timestep)


def _checked_field(cls: type, name: str, value):
    """``value`` checked against the annotated type of field ``name`` and in its stored form."""
    adapter = _FIELD_ADAPTERS.get(name)
    if adapter is None:
        adapter = _FIELD_ADAPTERS[name] = TypeAdapter(typing.get_type_hints(cls, include_extras=True)[name])
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        ctx = exc.errors(include_url=False)[0].get("ctx") or {}
        raise TimestepSettingsError.bad("timestep settings", name, value, ctx.get("allowed", "another value")) from None


_FIELD_ADAPTERS: dict[str, TypeAdapter] = {}
