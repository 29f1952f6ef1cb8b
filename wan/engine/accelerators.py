"""Recipes of few-step accelerator LoRAs: what a profile's ``sampling`` section does to a request.

A profile such as ``lightning-4step`` states the generation settings its LoRAs were made for
(steps, guidance, phases, shift, sampler, timesteps) and names an accelerator recipe. Applied to a
request (:func:`apply_profile_sampling`, the first thing ``resolve_request`` does once it knows the
model), each setting fills the request field of the same name that the request leaves to the
model's default, and the registry's LoRA of that recipe made for the model is added to the job's
LoRAs (once: a request that already holds it, such as one rebuilt from an output, keeps its own).
What the request states itself always wins, so ``--profile lightning-4step --steps 6`` runs 6 steps.

The LoRA files are read from the LoRA folder (``LoraEntry.lora_name``). Like a model's files, a
missing one is downloaded on first use (:func:`fetch_accelerator_loras`, before any model loads):
the engine fetches the registry files a job's LoRAs name, from the authors' repos, into the names
the recipe reads. Offline, the job fails at once naming each file, its source and where to put it.
"""

from __future__ import annotations

from wan.engine.request import GenerationRequest, LoraChoice, RequestError

# The request fields a profile's ``sampling`` section may fill (the section's keys, one name each).
SAMPLING_FIELDS = ("steps", "guidance", "guidance_high_noise", "guidance_phases", "guidance2_scale",
                   "guidance3_scale", "switch_threshold", "switch_threshold2", "model_switch_phase", "shift",
                   "sampler", "timesteps")
# Settings of the phases: a request that chooses its own number of phases takes none of them.
PHASE_FIELDS = ("guidance2_scale", "guidance3_scale", "switch_threshold", "switch_threshold2", "model_switch_phase")
TWO_EXPERT_FIELDS = ("guidance_high_noise", "model_switch_phase")  # left out on a model of one network
DEFAULT_MULTIPLIERS = {"transformer": "1", "high_noise": "1;0", "low_noise": "0;1"}


def apply_profile_sampling(req: GenerationRequest, spec, registry) -> GenerationRequest:
    """``req`` with its profile's recipe applied (see the module docstring); ``req`` itself when
    the profile has none. A profile that does not load is left to the profile check, which names it."""
    if req.profile is None and not req.profile_overrides:
        return req
    from wan.optim.apply import resolve_profile
    from wan.optim.profiles import ProfileError
    try:
        profile = resolve_profile(req.profile, req.profile_overrides)
    except (ProfileError, TypeError, ValueError):
        return req
    if profile is None:
        return req
    s = profile.sampling
    changes: dict = {}
    for name in SAMPLING_FIELDS:
        value = getattr(s, name)
        if value is None or value == () or getattr(req, name) not in (None, []):
            continue
        if (name in TWO_EXPERT_FIELDS and not spec.is_two_expert) or \
                (name in PHASE_FIELDS and req.guidance_phases is not None) or \
                (name == "timesteps" and req.steps is not None and req.steps != len(value)):
            continue  # the request chose its own phases, or its own number of steps
        changes[name] = [float(t) for t in value] if name == "timesteps" else value
    if spec.is_two_expert and req.boundary is not None:
        # the request's own expert switch wins over the profile's threshold at that phase boundary
        m = changes.get("model_switch_phase", req.model_switch_phase) or 1
        changes.pop(("switch_threshold", "switch_threshold2")[m - 1], None)
    if s.accelerator:
        have = {lora.path for lora in req.loras}
        added = [lo for lo in accelerator_loras(s.accelerator, s.lora_multipliers, spec, registry, profile.name)
                 if lo.path not in have]
        if added:
            changes["loras"] = [*req.loras, *added]
    return req.replace(**changes) if changes else req


def accelerator_loras(name: str, multipliers, spec, registry, profile_name: str = "") -> list[LoraChoice]:
    """The LoRAs of accelerator recipe ``name`` for model ``spec``: the registry entry made for it,
    one ``LoraChoice`` per file (named inside the LoRA folder) with the recipe's multiplier."""
    from wan.lora.library import family_for_model
    entry = registry.accelerator(name, spec.id)
    if entry is None:
        made_for = sorted({m for e in registry.loras.values() if e.accelerator == name for m in e.fits})
        raise RequestError("profile", profile_name or name,
                           f"a profile for a model that has a '{name}' accelerator LoRA in the registry: "
                           f"{', '.join(made_for) or 'none'}; {spec.id} has none (pick another profile, or none)")
    family = family_for_model(spec)
    return [LoraChoice(entry.lora_name(role, family), str((multipliers or {}).get(role, DEFAULT_MULTIPLIERS[role])))
            for role in entry.files]


def missing_accelerator_loras(req: GenerationRequest, spec, registry, lora_dir) -> list:
    """The registry LoRA entries (``wan.registry.LoraEntry``) of which a LoRA of ``req`` names a file
    (by its name inside ``lora_dir``: ``<family>/accelerators/<id>[-<role>].safetensors``) that is
    not there. A LoRA given some other way (a path, a name of the user's own) is never looked up."""
    from pathlib import Path

    from wan.lora.library import family_for_model
    family = family_for_model(spec)
    if lora_dir is None or family is None or not req.loras:
        return []
    wanted = {lora.path for lora in req.loras}
    missing = []
    for entry in registry.loras.values():
        names = [entry.lora_name(role, family) for role in entry.files]
        if any(n in wanted and not (Path(lora_dir) / n).is_file() for n in names):
            missing.append(entry)
    return missing


def fetch_accelerator_loras(req: GenerationRequest, spec, registry, lora_dir, progress: bool = True) -> list[str]:
    """Downloads the accelerator LoRA files ``req`` names that are missing from ``lora_dir``
    (:func:`missing_accelerator_loras`); returns a notice per entry fetched.

    Raises:
        wan.loading.download.DownloadError: offline, or a download failed: each file missing, with
            its repo and the path to put it at.
    """
    from wan.loading.download import fetch_lora_entry
    from wan.lora.library import family_for_model
    notices = []
    for entry in missing_accelerator_loras(req, spec, registry, lora_dir):
        paths = fetch_lora_entry(entry, lora_dir, family_for_model(spec), progress=progress)
        notices.append(f"accelerator LoRA {entry.id}: downloaded into the LoRA folder "
                       f"({', '.join(str(p) for p in paths.values())})")
    return notices
