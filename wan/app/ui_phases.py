"""The guidance phases and few-step recipes of the Generate form: which phase fields show for a run's
number of phases (:func:`phase_updates`), and what a recipe profile (``sampling:``) puts in the form
(:func:`recipe_updates`). Split out of :mod:`wan.app.ui_generate`, which lays the form out."""

from __future__ import annotations

import gradio as gr

PHASE_INFO = {
    "guidance_phases": "empty: 2 on Wan 2.2 A14B (its expert switch), else 1; a few-step profile may set 3",
    "switch_threshold": "timestep 0-1000; on A14B leave the expert switch's threshold empty: the expert switch sets it",
    "switch_threshold2": "timestep 0-1000, at most the phase 2 threshold",
    "guidance2_scale": "empty: the guidance of the expert that runs the phase",
    "model_switch_phase": "A14B with 3 phases: 1 or 2 (2: Lightning 3 phases)",
}
PHASE_FIELDS = ("switch_threshold", "guidance2_scale", "switch_threshold2", "guidance3_scale", "model_switch_phase")
PHASE_THRESHOLDS = ("switch_threshold", "switch_threshold2")  # where phases 2 and 3 start


def phase_updates(phases, model_id) -> dict:
    """Which phase fields show for ``phases`` guidance phases on ``model_id``: those of phase 2 from
    2 phases on, those of phase 3 with 3, the expert-switch phase on a two-expert model with 3."""
    from wan.registry import RegistryError, get_model
    try:
        two = get_model(model_id).is_two_expert
    except (RegistryError, TypeError):
        two = False
    n = int(phases) if isinstance(phases, (int, float)) and not isinstance(phases, bool) else (2 if two else 1)
    shown = {"switch_threshold": n >= 2, "guidance2_scale": n >= 2, "switch_threshold2": n >= 3,
             "guidance3_scale": n >= 3, "model_switch_phase": two and n >= 3}
    return {k: gr.update(visible=v) for k, v in shown.items()}


RECIPE_FIELDS = ("steps", "guidance", "guidance_high_noise", "boundary", "guidance_phases", *PHASE_FIELDS, "shift",
                 "sampler")


def recipe_updates(profile_name, model_id) -> dict:
    """A profile with a few-step recipe (``sampling:``, e.g. lightning-4step) picked: the form's
    settings become the recipe's, since a value in the form wins over the profile's (its LoRAs are
    added to the job when it runs). Nothing changes for a profile without one."""
    from wan.optim.profile_files import load_profiles
    from wan.optim.profiles import ProfileError
    from wan.registry import RegistryError, get_model
    try:
        sampling = load_profiles().get(profile_name).sampling
        two = get_model(model_id).is_two_expert
    except (ProfileError, RegistryError, TypeError, ValueError):
        return {}
    values = {k: getattr(sampling, k, None) for k in RECIPE_FIELDS if getattr(sampling, k, None) is not None}
    if not values:
        return {}
    if not two:
        values.pop("guidance_high_noise", None)
        values.pop("model_switch_phase", None)
    else:  # the expert switch is the recipe's threshold at its switch phase, if it gives one
        expert_threshold = values.get(PHASE_THRESHOLDS[values.get("model_switch_phase", 1) - 1])
        if expert_threshold is not None:
            values["boundary"] = expert_threshold / 1000
    updates = {k: gr.update(value=v) for k, v in values.items()}
    if "guidance_phases" in values:
        for k, u in phase_updates(values["guidance_phases"], model_id).items():
            updates[k] = {**updates.get(k, gr.update()), **u}
    return updates
