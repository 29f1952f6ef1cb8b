"""The Train tab's form as data: its keys (musubi-tuner's flag names where a flag exists), the models it
offers, the memory presets with their estimate, the Wan 2.2 A14B choice between one LoRA and two, and
the form's values turned into checked training requests, every refusal naming the field the user sees.
No gradio here (:mod:`wan.app.ui_train` renders it)."""

from __future__ import annotations

from wan.app.train_request import (TRAIN_KEY, TrainRequestError, check_limits, check_model, checked_config,
                                   parse_advanced, run_folder, untrainable)

# Form keys that make a TrainConfig setting of the same name.
CONFIG_KEYS = ("output_name", "network_dim", "network_alpha", "learning_rate", "max_train_steps", "max_train_epochs",
               "timestep_sampling", "discrete_flow_shift", "seed", "sample_every_n_steps", "save_every_n_steps")
DATASET_KEYS = ("dataset", "width", "height", "frames", "frame_extraction", "frame_stride", "frame_sample",
                "num_repeats")
OTHER_KEYS = ("model", "lora_mode", "memory", "trigger_words", "sample_prompts", "advanced")
FORM_KEYS = DATASET_KEYS + CONFIG_KEYS + OTHER_KEYS
# what a refusal calls each field: the words on the page, then the key
LABELS = {
    "dataset": "Dataset", "width": "Width", "height": "Height", "frames": "Frames per clip",
    "frame_extraction": "Frame extraction", "frame_stride": "Frame stride", "frame_sample": "Clips per video",
    "num_repeats": "Repeats", "model": "Model", "lora_mode": "LoRAs", "output_name": "LoRA name",
    "network_dim": "Rank", "network_alpha": "Alpha", "learning_rate": "Learning rate",
    "max_train_steps": "Steps", "max_train_epochs": "Epochs", "timestep_sampling": "Timestep sampling",
    "discrete_flow_shift": "Shift", "seed": "Seed", "memory": "Memory", "trigger_words": "Trigger words",
    "sample_prompts": "Sample prompts", "sample_every_n_steps": "Sample every N steps",
    "save_every_n_steps": "Save every N steps", "advanced": "Advanced flags",
}
LORA_MODES = {"one": "one LoRA for both experts (recommended)", "two": "two LoRAs, one per expert"}
A14B_ADVICE = (
    "**Wan 2.2 A14B: one LoRA or two?** *One LoRA* (recommended to start): both experts train one shared LoRA, "
    "each step on the expert its noise level picks, as musubi-tuner does: one run, one file, and with the low "
    "memory preset the idle expert waits in CPU memory. *Two LoRAs*: one run per expert, each on its own noise "
    "range (high noise: composition and motion; low noise: detail), twice the runs; at generation each can be "
    "weighted on its own (multipliers `1;0` and `0;1`, written into their preset).")
# memory presets: the flags each sets (block swap is not offered: the trainer does not have it yet)
MEMORY_PRESETS = {
    "standard": {},
    "checkpointing": {"gradient_checkpointing": True},
    "low": {"gradient_checkpointing": True, "fp8_base": True, "mixed_precision": "bf16"},
}
MEMORY_LABELS = {"standard": "standard (full precision weights, fastest)",
                 "checkpointing": "gradient checkpointing (far less activation memory, ~30% slower)",
                 "low": "low: fp8 base weights + gradient checkpointing + bf16"}
DEFAULTS = {"width": 64, "height": 64, "frames": 9, "frame_extraction": "head", "frame_stride": 1, "frame_sample": 1,
            "num_repeats": 1, "network_dim": 16, "network_alpha": 16, "learning_rate": 1e-4, "max_train_steps": 1000,
            "max_train_epochs": None, "timestep_sampling": "shift", "discrete_flow_shift": 3.0, "seed": 42,
            "memory": "standard", "lora_mode": "one", "sample_every_n_steps": 100, "save_every_n_steps": 100}


def label(field: str) -> str:
    """``network_dim`` -> ``Rank (network_dim)``; a request field without a control as it is."""
    key = field.removeprefix("train.")
    return f"{LABELS[key]} ({key})" if key in LABELS else field


def model_choices(state) -> list[tuple[str, str]]:
    """(label, id) of the models that can be trained here: ready on this machine, of a kind the tab trains."""
    from wan.registry import list_models
    out = []
    for spec in list_models(include_test=True):
        if untrainable(spec) is not None or not state.readiness(spec).ready:
            continue
        out.append((f"{spec.display_name} [test model]" if spec.test_model else spec.display_name, spec.id))
    return out


def is_two_expert(model_id) -> bool:
    from wan.registry import RegistryError, get_model
    try:
        return get_model(model_id).is_two_expert
    except (RegistryError, TypeError):
        return False


# ---------------------------------------------------------------------------------------------
# The form -> requests


def _number(value):
    """A number box's value: floats that are whole numbers as ints (gradio sends 16.0 for 16)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def flat_settings(values: dict) -> tuple[dict, dict]:
    """(settings from the form's controls and memory preset, settings from the advanced text); the
    advanced text wins where both name a flag."""
    flat: dict = {}
    for key in CONFIG_KEYS:
        value = values.get(key)
        if isinstance(value, str):
            value = value.strip()
        if value is None or value == "" or (key in ("max_train_epochs", "sample_every_n_steps",
                                                    "save_every_n_steps", "seed") and value == 0):
            continue
        flat[key] = _number(value)
    if flat.get("max_train_epochs") is not None:
        flat.pop("max_train_steps", None)
    memory = values.get("memory") or "standard"
    if memory not in MEMORY_PRESETS:
        raise TrainRequestError.bad("memory", memory, f"one of {', '.join(MEMORY_PRESETS)}")
    flat.update(MEMORY_PRESETS[memory])
    return flat, parse_advanced(values.get("advanced"))


def _form_error(e: TrainRequestError, advanced: dict) -> TrainRequestError:
    """A request-level refusal in the form's words: ``train.network_dim`` -> ``Rank (network_dim)``."""
    key = e.field.removeprefix("train.")
    if key in advanced:
        return TrainRequestError(f"{LABELS['advanced']}: --{key}", e.message)
    return TrainRequestError(label(e.field), e.message)


def build_requests(state, values: dict):
    """The training requests of the form's ``values`` (two for Wan 2.2 A14B with two LoRAs) and the
    dataset preview they train on; the dataset's TOML is saved beside it (a folder). Raises
    TrainRequestError naming the field in the page's words."""
    from wan.app.train_dataset import preview, require_usable, save_toml
    from wan.fileio import write_text_atomic
    try:
        dataset = preview(values.get("dataset"), values, state.settings)
        require_usable(dataset)
    except TrainRequestError as e:
        raise TrainRequestError(label(e.field), e.message) from None
    try:
        spec = check_model(values.get("model"), state, where="model")
    except TrainRequestError as e:
        raise TrainRequestError(label(e.field), e.message) from None
    flat, advanced = flat_settings(values)
    if spec.is_two_expert and values.get("memory") == "low":
        flat["offload_inactive_dit"] = True  # the idle expert waits in CPU memory
    flat.update(advanced)
    flat["model"] = spec.id
    if not isinstance(flat.get("output_name"), str) or not flat.get("output_name"):
        raise TrainRequestError(label("output_name"), "required: the LoRA's name (its file name in the LoRA folder)")
    # the TOML: beside the dataset (a folder's), the file itself (a TOML), else in the run's folder
    flat["dataset_config"] = str(dataset.source) if dataset.from_toml else str(dataset.source / "x.toml")
    try:
        cfg = checked_config({k: v for k, v in flat.items()})
        check_limits(cfg, state.settings)
    except TrainRequestError as e:
        raise _form_error(e, advanced) from None
    two = spec.is_two_expert and values.get("lora_mode") == "two"
    if values.get("lora_mode") not in (None, "", *LORA_MODES):
        raise TrainRequestError.bad(label("lora_mode"), values.get("lora_mode"), f"one of {', '.join(LORA_MODES)}")
    if not dataset.from_toml:
        saved = save_toml(dataset) or write_text_atomic(run_folder(state.settings, cfg.output_name) / "dataset.toml",
                                                        dataset.toml_text)
        flat["dataset_config"] = str(saved)
    common = {"trigger_words": values.get("trigger_words") or "", "sample_prompts": values.get("sample_prompts") or ""}
    if not two:
        return dataset, [{TRAIN_KEY: flat, "expert": None, **common}]
    return dataset, [{TRAIN_KEY: {**flat, "output_name": f"{cfg.output_name}_{expert}"}, "expert": expert, **common}
                     for expert in ("high_noise", "low_noise")]


def start(state, values: dict, session: str) -> list:
    """Queues the form's run(s) for ``session``; returns the jobs. Raises TrainRequestError (a field
    in the page's words) or ValueError (the queue is full...)."""
    from wan.app.train_jobs import queue_training
    _, requests = build_requests(state, values)
    jobs = []
    for request in requests:
        try:
            jobs.append(queue_training(state, request, session))
        except TrainRequestError as e:
            raise _form_error(e, parse_advanced(values.get("advanced"))) from None
    return jobs


# ---------------------------------------------------------------------------------------------
# The memory estimate of a preset


def memory_text(model_id, values: dict) -> str:
    """The trainer's rough memory estimate (:func:`wan.train.memory.memory_estimate`) for the model, the
    preset, the rank and one batch at the form's size and frames; built on torch's meta device: no
    weight is read or allocated. Never raises (the estimate is information)."""
    try:
        return "\n".join(f"- {line.strip()}" if i else f"**{line}**" for i, line in
                         enumerate(_estimate(model_id, values)))
    except Exception as e:  # noqa: BLE001 - a missing value or an odd model: say so, never break the form
        return f"Memory estimate unavailable: {e}"


def _estimate(model_id, values: dict) -> list[str]:
    import torch
    from torch import nn

    from wan.models.dit import DiTConfig, WanDiT
    from wan.registry import get_model
    from wan.train.memory import memory_estimate
    from wan.train.network import LoraNetwork
    spec = get_model(model_id)
    preset = MEMORY_PRESETS.get(values.get("memory") or "standard", {})
    rank = int(_number(values.get("network_dim")) or 4)
    alpha = float(values.get("network_alpha") or rank)
    width, height, frames = (int(_number(values.get(k)) or DEFAULTS[k]) for k in ("width", "height", "frames"))
    two = spec.is_two_expert and values.get("lora_mode") != "two"
    with torch.device("meta"):
        dits = {}
        for name in (("high_noise", "low_noise") if two else ("transformer",)):
            dit = WanDiT(DiTConfig(**spec.dit_config())).to(torch.bfloat16)
            if preset.get("fp8_base"):
                for module in dit.blocks.modules():
                    if isinstance(module, nn.Linear):
                        module.weight.data = module.weight.data.to(torch.float8_e4m3fn)
            dits[name] = dit
        network = LoraNetwork(next(iter(dits.values())), rank, alpha)
    (st, sh, sw), channels = spec.vae.stride, spec.vae.z_dim
    shape = (1, channels, (frames - 1) // st + 1, height // sh, width // sw)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lines = memory_estimate(dits, network, "AdamW", shape, 2, bool(preset.get("gradient_checkpointing")), device,
                            offload_inactive=two and values.get("memory") == "low")
    lines[0] = f"Memory estimate (rough), {width}x{height}, {frames} frames, rank {rank}:"
    if device.type == "cuda":
        total = torch.cuda.mem_get_info()[1]
        lines.append(f"this GPU has {total / 2**30:.1f} GB")
    return lines


def recommendation(model_id) -> str:
    """The words under the model picker: the A14B choice, or nothing."""
    return A14B_ADVICE if is_two_expert(model_id) else ""

