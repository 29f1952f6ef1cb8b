"""The LoRAs of one job: load each file, check it against the model, attach it for the job's
duration, and move the multipliers along the steps and experts.

A LoRA that matches nothing in the model is an error naming the file and the model family it
seems to be for, never a silent no-op; a partial match is a notice with the count.

``mode`` (the profile's ``lora.mode``) chooses hooks or merged weights, see :mod:`wan.lora.merge`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from wan.lora import LoraError
from wan.lora.apply import LoraRuntime, LoraUse


@dataclass
class JobLoras:
    """The runtimes of one job, one per network (expert), and what the checks found."""

    runtimes: dict[str, LoraRuntime] = field(default_factory=dict)
    notices: list[str] = field(default_factory=list)

    def attach(self, dits: dict) -> list[str]:
        """Attaches every expert's LoRAs (a part of ``wan.engine.attach.attach_job``); if one
        fails, those already attached are detached (and their merged weights restored) before the
        error goes on. The notices were given by :func:`prepare_loras`."""
        try:
            for expert, rt in self.runtimes.items():
                rt.attach(dits[expert])
        except Exception:
            self.detach()
            raise
        return []

    def detach(self, dits: dict | None = None) -> None:
        for rt in self.runtimes.values():
            rt.detach()

    def on_step(self, step: int, steps: int, expert: str, switch_step: int | None = None, layout=None) -> None:
        """Moves the multipliers of ``expert``'s LoRAs to ``step`` (``layout``: the run's guidance
        phases, a :class:`wan.lora.schedule.PhaseLayout`, for per-phase values)."""
        rt = self.runtimes.get(expert)
        if rt is not None:
            rt.set_step(step, steps, expert, switch_step, layout)


def resolve_lora_path(path: str, lora_dir: str | Path | None, names_only: bool = False) -> Path:
    """A LoRA given as a file path, or as a name inside the LoRA folder (which it cannot leave).
    ``names_only`` (the web server) accepts names inside the LoRA folder and nothing else: a client
    must not make the server read, say, a checkpoint through a path relative to its working folder."""
    p = Path(path)
    if p.is_file() and not names_only:
        return p
    if lora_dir is not None and not p.is_absolute() and ".." not in p.parts:
        candidate = (Path(lora_dir) / p).resolve()
        if candidate.is_file() and Path(lora_dir).resolve() in candidate.parents:
            return candidate
    hint = ""
    if "accelerators" in p.parts:  # a profile's accelerator LoRA (wan.engine.accelerators): say how to get it
        entry_id = p.stem.removesuffix("-high_noise").removesuffix("-low_noise")
        hint = f" (a registry accelerator LoRA: python wgp.py download {entry_id} --lora_dir {lora_dir})"
    raise LoraError(path, f"an existing LoRA file, or a name inside the LoRA folder {lora_dir}{hint}")


def prepare_loras(choices, dits: dict, lora_dir: str | Path | None = None, mode: str = "hooks",
                  names_only: bool = False, guidance_phases: int = 1) -> JobLoras:
    """Loads and checks the request's LoRAs (``LoraChoice`` list) for the job's networks.

    ``guidance_phases``: the run's guidance phases (1 to 3); a multiplier with ';' must fit them
    and the networks (``Multiplier.check_phases``).

    ``mode``: ``hooks`` | ``merge`` | ``auto`` (= hooks), see :mod:`wan.lora.merge`; the layers a
    merge cannot reach exactly (quantised ones) are listed in the notices. A bad mode is a
    ValueError naming the allowed values.
    """
    from wan.loading.files import CheckpointError
    from wan.lora.compat import check_lora, linear_shapes
    from wan.lora.formats import load_lora
    from wan.lora.merge import resolve_mode
    from wan.lora.schedule import include_exclude, parse_multiplier
    resolve_mode(mode)
    job = JobLoras()
    if not choices:
        return job
    per_expert: dict[str, list[LoraUse]] = {e: [] for e in dits}
    for choice in choices:
        try:
            multiplier = parse_multiplier(choice.multiplier)
            allow = include_exclude(choice.include, choice.exclude)
            # one network: a "high;low" string has nothing to apply to, unless it gives phases
            multiplier.check_phases(max(guidance_phases, 2 if "transformer" not in dits else 1),
                                    "transformer" not in dits)
        except ValueError as e:
            raise LoraError(f"{choice.path}:{choice.multiplier}", str(e)) from None
        path = resolve_lora_path(choice.path, lora_dir, names_only)
        try:
            lora = load_lora(path)
        except (CheckpointError, ValueError, OSError) as e:
            raise LoraError(choice.path, f"a readable LoRA file ({e})") from None
        any_dit = next(iter(dits.values()))
        compat = check_lora(lora, linear_shapes(any_dit))
        if compat.status == "none":
            raise LoraError(choice.path, f"a LoRA for this model; it matches none of its layers "
                                                     f"({compat.guess})")
        if compat.status == "partial":
            job.notices.append(f"LoRA {path.name}: {compat.matched} of {compat.total} tensors match this model")
        if getattr(compat, "dropped_i2v", None):
            job.notices.append(f"LoRA {path.name}: {len(compat.dropped_i2v)} image cross-attention tensors dropped "
                               "(trained on i2v, this model has no image input)")
        for expert in dits:
            per_expert[expert].append(LoraUse(lora, multiplier, allow))
    job.runtimes = {e: LoraRuntime(uses, mode) for e, uses in per_expert.items()}
    for expert, rt in job.runtimes.items():
        for line in rt.notices(dits[expert]):
            if line not in job.notices:  # experts share their layout: say it once
                job.notices.append(line)
    return job
