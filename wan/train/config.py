"""The training configuration: one typed config with musubi-tuner's flag names.

:class:`TrainConfig` is the single source of every training setting: its fields are the flag names
(``--learning_rate``), the keys of the ``--config_file`` TOML, and the attribute names the trainer
reads; each field's ``metadata`` holds its help text, its flag group and how a flag value is read.
The timestep settings are the nested :class:`~wan.train.timesteps.TimestepSettings` (``cfg.timestep``);
their flags and TOML keys are flat, as in musubi (``--timestep_sampling``, ``--min_timestep``).

Reading, as musubi does (``training/parser_common.py: read_config_from_file``):

- a TOML file with the flag names as keys; tables are flattened (their keys count as top-level keys);
- flags given on the command line win over the file; defaults fill the rest.

Every value is checked before anything loads (:func:`config_from_sources`, or building a
:class:`TrainConfig` in code): an error names the flag (``--learning_rate``) or the file and key, the
value and what is allowed. :func:`check_for_training` adds the rules between settings (a dataset is
needed, a state is saved only with a save interval...). musubi flags this trainer does not support
are listed in :data:`UNSUPPORTED_FLAGS` with the reason; giving one is an error naming it, never
silently ignored.
"""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path
from typing import Any, Mapping

from pydantic import TypeAdapter, ValidationError

from wan.config import (Bool, ConfigError, Name, Text, choice, did_you_mean, integer, is_int, items, number,
                        read_toml, rule, section)
from wan.train.timestep_settings import SAMPLINGS, WEIGHTINGS, TimestepSettings

COMMAND_LINE = "command line"

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_FORMATS = ("musubi", "comfy")
SAVE_PRECISIONS = ("float", "fp32", "fp16", "bf16")
SHOW_TIMESTEPS = ("image", "console")
LOG_WITH = ("tensorboard",)
NETWORK_MODULE = "networks.lora_wan"
DEFAULT_OUTPUT_NAME = None  # musubi has no default; the trainer asks for one


class TrainConfigError(ConfigError):
    """A training setting that is not allowed. On the command line the key is written as its flag."""

    @classmethod
    def at(cls, where: str, key: str) -> str:
        if where == COMMAND_LINE and key:
            return f"--{key.split('.')[-1]}"
        return super().at(where, key)


# ----------------------------------------------------------------------------- value types

PathText = rule("a path (a non-empty string)", lambda v: isinstance(v, str) and v.strip() != "" and "\0" not in v)
Words = items(Text, min_length=0)


def _is_warmup(v: Any) -> bool:
    if isinstance(v, str) and v.endswith("%"):
        try:
            return 0 <= float(v[:-1]) < 100
        except ValueError:
            return False
    if isinstance(v, float):
        return 0 <= v < 1 or (v >= 1 and v.is_integer())
    return is_int(v) and v >= 0


def _warmup_value(v: Any) -> int | float:
    """musubi's ``_int_or_float``: "10%" -> 0.1, 5.0 -> 5, 0.1 stays a fraction of the training steps."""
    if isinstance(v, str):
        return float(v[:-1]) / 100
    if isinstance(v, float) and v >= 1:
        return int(v)
    return v


Warmup = rule("an integer >= 0 (steps), or a fraction of the training steps in [0, 1) such as 0.1 or '10%'",
              _is_warmup, _warmup_value)


# ----------------------------------------------------------------------------- fields

# How a flag's text becomes a value (the value is then checked by the field's type):
# str, int, float, int_or_float, bool (a switch), list (zero or more words).
FLAG_KINDS = ("str", "int", "float", "int_or_float", "bool", "list")
GROUPS = ("model", "dataset", "network", "optimizer", "schedule", "training", "memory", "timesteps", "saving",
          "logging", "sampling")


def _f(default: Any, help: str, group: str, kind: str = "str", metavar: str | None = None,
       choices: tuple[str, ...] = ()) -> Any:
    return dataclasses.field(default=default, metadata={"help": help, "group": group, "kind": kind,
                                                        "metavar": metavar, "choices": choices})


@section
class TrainConfig:
    """Every setting of a LoRA training run (see the module docstring). Build it in code
    (``TrainConfig(dataset_config="data.toml", dit="wan.safetensors", ...)``, each value checked, or with flat
    timestep settings ``TrainConfig.of(..., timestep_sampling="shift")``), from flags and a TOML file
    (:func:`config_from_sources`), or from a mapping (:meth:`from_mapping`)."""

    # -- model
    task: Name | None = _f(None, "musubi-tuner's task name (t2v-14B, i2v-14B, t2v-A14B, ti2v-5B ...): picks the "
                                 "registry model (--model wins)", "model")
    model: Name | None = _f(None, "registry model id (see: python wgp.py models); its files are used where --dit "
                                  "is not given (TEST models generate tiny checkpoints)", "model")
    dit: PathText | None = _f(None, "the DiT checkpoint to train on (for Wan 2.2 A14B: the low-noise expert)",
                              "model", metavar="PATH")
    dit_high_noise: PathText | None = _f(
        None, "Wan 2.2 A14B: the high-noise expert; with it both experts train one shared LoRA", "model",
        metavar="PATH")
    vae: PathText | None = _f(None, "VAE checkpoint (only for sample prompts; training reads latent caches)",
                              "model", metavar="PATH")
    t5: PathText | None = _f(None, "umT5 checkpoint (only for sample prompts; training reads text caches)",
                             "model", metavar="PATH")
    clip: PathText | None = _f(None, "CLIP checkpoint (only for sample prompts of Wan 2.1 i2v)", "model",
                               metavar="PATH")
    checkpoint_dir: PathText = _f("checkpoints", "folder of the registry's model files", "model", metavar="DIR")
    device: Name | None = _f(None, "torch device (default: cuda when available, else cpu)", "model")
    sdpa: Bool = _f(False, "accepted for musubi command lines: training always uses PyTorch's sdpa attention",
                    "model", "bool")
    network_module: choice((NETWORK_MODULE,), optional=True) = _f(
        None, f"accepted for musubi command lines; the only network is {NETWORK_MODULE}", "model",
        choices=(NETWORK_MODULE,))

    # -- dataset
    dataset_config: PathText | None = _f(None, "the dataset TOML (musubi-tuner's format); its caches must exist",
                                         "dataset", metavar="PATH")
    max_data_loader_n_workers: integer(0, optional=True) = _f(
        None, "accepted for musubi command lines: caches are read in the training process", "dataset", "int")
    persistent_data_loader_workers: Bool = _f(
        False, "accepted for musubi command lines: caches are read in the training process", "dataset", "bool")

    # -- network
    network_dim: integer(1, optional=True) = _f(None, "LoRA rank (default 4, as musubi)", "network", "int")
    network_alpha: number(0) = _f(1.0, "LoRA alpha: scale = alpha / rank (0: alpha = rank)", "network", "float")
    network_dropout: number(0, 1, open=True, optional=True) = _f(
        None, "dropout on the LoRA down projection's output", "network", "float")
    network_args: Words | None = _f(
        None, "key=value: exclude_patterns, include_patterns (lists of regexes), rank_dropout, module_dropout, "
              "loraplus_lr_ratio (LoRA+: the up weights train at lr * ratio)", "network", "list", "KEY=VALUE")
    network_weights: PathText | None = _f(None, "LoRA file to start from", "network", metavar="PATH")

    # -- optimizer
    optimizer_type: Text = _f("AdamW", "AdamW, AdamW8bit (bitsandbytes, CUDA), Adafactor (transformers), "
                                       "Prodigy (prodigyopt), AdamWScheduleFree (schedulefree), any torch.optim "
                                       "class name, or package.module.Class", "optimizer")
    optimizer_args: Words | None = _f(
        None, "key=value with Python literal values: weight_decay=0.01 betas=0.9,0.999", "optimizer", "list",
        "KEY=VALUE")
    learning_rate: number(0, open=True) = _f(2.0e-6, "learning rate (musubi's default 2e-6; LoRAs often use 1e-4)",
                                             "optimizer", "float")
    max_grad_norm: number(0) = _f(1.0, "clip the gradient norm to this; 0: no clipping", "optimizer", "float")

    # -- schedule
    lr_scheduler: choice(LR_SCHEDULERS) = _f("constant", "learning-rate schedule: " + ", ".join(LR_SCHEDULERS)
                                             + " (transformers' definitions)", "schedule", choices=LR_SCHEDULERS)
    lr_warmup_steps: Warmup = _f(0, "warm-up steps, or a fraction of the training steps (0.1 or 10%)",
                                 "schedule", "int_or_float")
    lr_scheduler_num_cycles: integer(1) = _f(1, "restarts of cosine_with_restarts", "schedule", "int")
    lr_scheduler_power: number(0, open=True) = _f(1.0, "power of the polynomial schedule", "schedule", "float")

    # -- training
    max_train_steps: integer(1) = _f(1600, "optimizer steps to train", "training", "int")
    max_train_epochs: integer(1, optional=True) = _f(None, "epochs to train (overrides --max_train_steps)",
                                                     "training", "int")
    gradient_accumulation_steps: integer(1) = _f(1, "batches whose gradients are summed before each optimizer step",
                                                 "training", "int")
    seed: integer(0, optional=True) = _f(None, "random seed (default: a random one, written in the LoRA's "
                                               "metadata and the saved state)", "training", "int")
    mixed_precision: choice(MIXED_PRECISIONS, optional=True) = _f(
        None, "no (default), bf16 or fp16: the DiT's weights and autocast; the LoRA trains in float32",
        "training", choices=MIXED_PRECISIONS)
    gradient_checkpointing: Bool = _f(False, "recompute each DiT block in the backward pass (less memory, slower)",
                                      "training", "bool")
    gradient_checkpointing_cpu_offload: Bool = _f(
        False, "also keep the saved activations in CPU memory (with --gradient_checkpointing)", "training", "bool")
    cuda_allow_tf32: Bool = _f(False, "allow TF32 matmuls on CUDA", "training", "bool")
    cuda_cudnn_benchmark: Bool = _f(False, "cuDNN benchmark mode", "training", "bool")

    # -- memory
    fp8_base: Bool = _f(False, "keep the DiT's block weights in fp8 (e4m3); the LoRA still trains in float32",
                        "memory", "bool")
    fp8_scaled: Bool = _f(False, "with --fp8_base: fp8 with a scale per block of 64 inputs (better accuracy)",
                          "memory", "bool")
    blocks_to_swap: integer(0, optional=True) = _f(
        None, "DiT blocks not kept on the device: each is read from the DiT checkpoint when it runs, in the forward "
              "pass and again for the backward's recomputation (needs --gradient_checkpointing)", "memory", "int")
    offload_inactive_dit: Bool = _f(False, "Wan 2.2 A14B: keep the expert not in use in CPU memory", "memory",
                                    "bool")

    # -- timesteps (flat flags; held in one TimestepSettings)
    timestep: TimestepSettings = dataclasses.field(default_factory=TimestepSettings,
                                                   metadata={"group": "timesteps", "nested": True})
    timestep_boundary: number(0, optional=True) = _f(
        None, "Wan 2.2 A14B: the high-noise expert trains at timesteps >= this (0..1, or 0..1000); default: the "
              "model's boundary", "timesteps", "float")
    show_timesteps: choice(SHOW_TIMESTEPS, optional=True) = _f(
        None, "show the timestep distribution (image: a PNG in --output_dir; console: a text histogram) and stop",
        "timesteps", choices=SHOW_TIMESTEPS)

    # -- saving
    output_dir: PathText | None = _f(None, "folder the LoRA files and states are written to", "saving",
                                     metavar="DIR")
    output_name: Name | None = _f(None, "base name of the LoRA files: <name>.safetensors, <name>-step00000500"
                                        ".safetensors, <name>-000002.safetensors", "saving")
    save_every_n_steps: integer(1, optional=True) = _f(None, "save the LoRA every N steps", "saving", "int")
    save_every_n_epochs: integer(1, optional=True) = _f(None, "save the LoRA every N epochs", "saving", "int")
    save_last_n_steps: integer(1, optional=True) = _f(
        None, "remove step saves older than N steps (musubi: a count of steps, not of files)", "saving", "int")
    save_last_n_epochs: integer(1, optional=True) = _f(None, "keep the last N epoch saves", "saving", "int")
    save_last_n_steps_state: integer(1, optional=True) = _f(
        None, "as --save_last_n_steps for the states (default: that value)", "saving", "int")
    save_last_n_epochs_state: integer(1, optional=True) = _f(
        None, "as --save_last_n_epochs for the states (default: that value)", "saving", "int")
    save_state: Bool = _f(False, "with each save, also save the training state (optimizer, scheduler, random "
                                 "states, data position) to resume from", "saving", "bool")
    save_state_on_train_end: Bool = _f(False, "save the training state at the end", "saving", "bool")
    resume: PathText | None = _f(None, "a saved state folder to continue from", "saving", metavar="DIR")
    save_format: choice(SAVE_FORMATS) = _f("musubi", "LoRA layout: musubi (lora_unet_*) or comfy "
                                                     "(diffusion_model.*.lora_A/B)", "saving",
                                           choices=SAVE_FORMATS)
    save_precision: choice(SAVE_PRECISIONS, optional=True) = _f(None, "dtype of the saved LoRA (default fp32)",
                                                                "saving", choices=SAVE_PRECISIONS)
    no_metadata: Bool = _f(False, "write only the minimal ss_* metadata", "saving", "bool")
    training_comment: Text | None = _f(None, "comment stored in the metadata", "saving")
    metadata_title: Text | None = _f(None, "modelspec title (default: output_name)", "saving")
    metadata_author: Text | None = _f(None, "modelspec author", "saving")
    metadata_description: Text | None = _f(None, "modelspec description", "saving")
    metadata_license: Text | None = _f(None, "modelspec license", "saving")
    metadata_tags: Text | None = _f(None, "modelspec tags, comma separated", "saving")
    metadata_reso: Text | None = _f(None, "modelspec resolution, e.g. 1280,720", "saving")
    metadata_arch: Text | None = _f(None, "modelspec architecture instead of wan2.1", "saving")

    # -- logging
    logging_dir: PathText | None = _f(None, "folder for TensorBoard logs (a timestamped subfolder per run)",
                                      "logging", metavar="DIR")
    log_with: choice(LOG_WITH, optional=True) = _f(
        None, "tensorboard (needs the tensorboard package; the default when --logging_dir is given). A JSONL log "
              "is always written next to the LoRA", "logging", choices=LOG_WITH)
    log_prefix: Text | None = _f(None, "prefix of the TensorBoard run folder", "logging")

    # -- sampling (the hook is Trainer.sample; generation comes with the engine's sampler)
    sample_prompts: PathText | None = _f(None, "prompt file for sample videos during training: one prompt per line with musubi's inline options (--w --h --f --d --s --g ...)",
                                         "sampling", metavar="PATH")
    sample_every_n_steps: integer(1, optional=True) = _f(None, "sample every N steps", "sampling", "int")
    sample_every_n_epochs: integer(1, optional=True) = _f(None, "sample every N epochs", "sampling", "int")
    sample_at_first: Bool = _f(False, "sample before training", "sampling", "bool")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _checked_field(type(self), f.name, getattr(self, f.name)))
        self.optimizer_kwargs  # the key=value lists are read here, so a malformed item fails at once
        try:
            self.network_kwargs
        except ValueError as exc:
            raise TrainConfigError(f"--network_args: {exc}") from None

    # -- reading -------------------------------------------------------------------------------

    @classmethod
    def of(cls, **settings: Any) -> TrainConfig:
        """A config from flat settings, the flag names, timestep ones included:
        ``TrainConfig.of(learning_rate=1e-4, timestep_sampling="shift")``."""
        return cls.from_mapping(settings)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "train config") -> TrainConfig:
        """A config from flat keys (flag names, timestep ones included); errors name ``where`` and the key."""
        return config_from_sources(file_data=dict(data), where=where)

    def to_flat(self) -> dict[str, Any]:
        """The settings as flat flag names -> values (lists for tuples), e.g. for a saved state."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("nested"):
                out.update({k.name: getattr(value, k.name) for k in dataclasses.fields(value)})
            else:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    # -- derived values ------------------------------------------------------------------------

    @property
    def optimizer_kwargs(self) -> dict[str, Any]:
        return parse_key_values(self.optimizer_args, "--optimizer_args")

    @property
    def network_kwargs(self) -> dict[str, Any]:
        from wan.train.network import parse_network_args
        return parse_network_args(self.network_args)

    @property
    def precision(self) -> str:
        return self.mixed_precision or "no"


def _checked_field(cls: type, name: str, value: Any, where: str = "train config") -> Any:
    adapter = _FIELD_ADAPTERS.get(name)
    if adapter is None:
        adapter = _FIELD_ADAPTERS[name] = TypeAdapter(typing.get_type_hints(cls, include_extras=True)[name])
    try:
        return adapter.validate_python(value)
    except ValidationError as exc:
        ctx = exc.errors(include_url=False)[0].get("ctx") or {}
        raise TrainConfigError.bad(where, name, value, ctx.get("allowed", "another value")) from None


_FIELD_ADAPTERS: dict[str, TypeAdapter] = {}


# ----------------------------------------------------------------------------- the flags


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: its name (= TOML key), help, group, how its text is read, and its default."""

    name: str
    help: str
    group: str
    kind: str
    default: Any
    metavar: str | None = None
    nested: bool = False  # a field of TrainConfig.timestep
    choices: tuple[str, ...] = ()  # the allowed words of a choice (shown in --help)


def _kind_of(default: Any, name: str) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    return "int" if name in ("min_timestep", "max_timestep", "num_timestep_buckets") else "str"


def flags() -> list[Flag]:
    """Every flag of TrainConfig, in declaration order (the timestep flags where ``timestep`` is)."""
    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("nested"):
            for t in dataclasses.fields(TimestepSettings):
                help_text = t.metadata.get("help", "")
                if t.name == "timestep_sampling":
                    help_text += (". Note: musubi's default sigma mode ignores --discrete_flow_shift (it samples the "
                                  "unshifted 1000-step grid); use --timestep_sampling shift to train with a shift")
                choices = {"timestep_sampling": SAMPLINGS, "weighting_scheme": WEIGHTINGS}.get(t.name, ())
                out.append(Flag(t.name, help_text, "timesteps", _kind_of(t.default, t.name), t.default,
                                nested=True, choices=choices))
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        out.append(Flag(f.name, f.metadata["help"], f.metadata["group"], f.metadata["kind"], default,
                        f.metadata.get("metavar"), choices=f.metadata.get("choices", ())))
    return out


FLAG_NAMES = tuple(flag.name for flag in flags())
TIMESTEP_KEYS = tuple(f.name for f in dataclasses.fields(TimestepSettings))

# musubi-tuner flags this trainer does not take: flag -> why (and what to do instead).
UNSUPPORTED_FLAGS: dict[str, str] = {
    **{name: "other attention kernels are not used in training here; use --sdpa (PyTorch's sdpa, always on)"
       for name in ("flash_attn", "sage_attn", "xformers", "flash3", "split_attn")},
    **{name: "torch.compile is not available in training yet"
       for name in ("compile", "compile_backend", "compile_mode", "compile_dynamic", "compile_fullgraph",
                    "compile_cache_size_limit", "dynamo_backend", "dynamo_mode", "dynamo_fullgraph",
                    "dynamo_dynamic")},
    **{name: "several processes train without DDP's wrapper (the LoRA's gradients are summed by one all_reduce "
             "per optimizer step) and with torch's default process-group timeout; launch with torchrun or "
             "accelerate launch --multi_gpu and leave the flag out"
       for name in ("ddp_timeout", "ddp_gradient_as_bucket_view", "ddp_static_graph")},
    **{name: "uploading to the Hugging Face Hub is not supported; upload the files yourself"
       for name in ("huggingface_repo_id", "huggingface_repo_type", "huggingface_path_in_repo", "huggingface_token",
                    "huggingface_repo_visibility", "save_state_to_huggingface", "resume_from_huggingface",
                    "async_upload")},
    **{name: "only TensorBoard logging is supported (--log_with tensorboard)"
       for name in ("wandb_run_name", "wandb_api_key", "log_tracker_name", "log_tracker_config", "log_config")},
    **{name: "block swap here reads swapped blocks from the checkpoint with one block of read-ahead; it has no such "
             "setting" for name in ("use_pinned_memory_for_block_swap", "block_swap_h2d_only", "block_swap_ring_size")},
    **{name: "not supported when sampling during training (samples use the VAE in float32 and umT5 as generation does)"
       for name in ("vae_dtype", "vae_cache_cpu", "fp8_t5")},
    "one_frame": "one-frame training is not supported",
    **{name: "custom schedulers are not supported; use --lr_scheduler with one of " + ", ".join(LR_SCHEDULERS)
       for name in ("lr_scheduler_type", "lr_scheduler_args", "lr_decay_steps", "lr_scheduler_timescale",
                    "lr_scheduler_min_lr_ratio")},
    "base_weights": "merging LoRAs into the DiT before training is not supported",
    "base_weights_multiplier": "merging LoRAs into the DiT before training is not supported",
    "dim_from_weights": "give --network_dim matching the --network_weights file",
    "scale_weight_norms": "max-norm regularisation is not supported",
    "guidance_scale": "is for HunyuanVideo; Wan training has no embedded guidance",
    "img_in_txt_in_offloading": "is for HunyuanVideo",
    "disable_numpy_memmap": "checkpoints are always memory-mapped here",
    "force_v2_1_time_embedding": "is not supported",
}


# ----------------------------------------------------------------------------- reading


def parse_key_values(items: tuple[str, ...] | list[str] | None, what: str) -> dict[str, Any]:
    """musubi's ``key=value`` list with values read as Python literals (``ast.literal_eval``, never eval):
    ``betas=0.9,0.999`` -> {"betas": (0.9, 0.999)}, ``decouple=True``; a string needs quotes."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise TrainConfigError(f"{what}: {item!r} is not allowed; expected key=value, e.g. weight_decay=0.01")
        try:
            out[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            raise TrainConfigError(f"{what}: {key}={text!r} is not allowed; the value must be a Python literal "
                                   "(a number, True/False, None, a tuple like 0.9,0.999, or a quoted string)") from None
    return out


def flatten_file(data: Mapping[str, Any]) -> dict[str, Any]:
    """musubi's reading of a training TOML: every table's keys are lifted to the top level."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for inner, v in value.items():
                out[inner] = v
        else:
            out[key] = value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The flat keys of a training TOML (``--config_file``; ``.toml`` is added when missing, as musubi)."""
    path = str(path)
    if not path.endswith(".toml") and not Path(path).exists():
        path += ".toml"
    return flatten_file(read_toml(path, TrainConfigError))


def _check_keys(data: Mapping[str, Any], where: str) -> None:
    for key in data:
        if key in FLAG_NAMES:
            continue
        if key in UNSUPPORTED_FLAGS:
            raise TrainConfigError.say(where, key, f"is a musubi-tuner setting this trainer does not support: "
                                                   f"{UNSUPPORTED_FLAGS[key]}")
        raise TrainConfigError(f"{TrainConfigError.at(where, key)}: unknown setting{did_you_mean(key, FLAG_NAMES)}; "
                               "see --help for the settings")


def _build(data: Mapping[str, Any], where: str) -> TrainConfig:
    """A TrainConfig from flat, known keys; the first bad value raises, naming ``where`` and the key."""
    timestep = {k: v for k, v in data.items() if k in TIMESTEP_KEYS}
    rest = {k: v for k, v in data.items() if k not in TIMESTEP_KEYS}
    for key, value in timestep.items():
        _checked_timestep(key, value, where)
    lo, hi = timestep.get("min_timestep"), timestep.get("max_timestep")
    if lo is not None and hi is not None and lo >= hi:
        raise TrainConfigError.bad(where, "max_timestep", hi, f"a value above min_timestep ({lo})")
    for key, value in rest.items():
        _checked_field(TrainConfig, key, value, where)
    return TrainConfig(**rest, timestep=TimestepSettings(**timestep))


def _checked_timestep(key: str, value: Any, where: str) -> None:
    adapter = TypeAdapter(typing.get_type_hints(TimestepSettings, include_extras=True)[key])
    try:
        adapter.validate_python(value)
    except ValidationError as exc:
        ctx = exc.errors(include_url=False)[0].get("ctx") or {}
        raise TrainConfigError.bad(where, key, value, ctx.get("allowed", "another value")) from None


def config_from_sources(flag_data: Mapping[str, Any] | None = None, file_data: Mapping[str, Any] | None = None,
                        where: str = "train config") -> TrainConfig:
    """The config of a file's flat keys (``file_data``, read from ``where``) with the given flags
    (``flag_data``: only flags typed on the command line) winning over it.

    The file alone is checked first, so an error in it names the file; then the merged values, where an
    error can only come from a flag (named ``--flag``) or from a rule between settings.
    """
    file_data = dict(file_data or {})
    flag_data = dict(flag_data or {})
    _check_keys(file_data, where)
    _check_keys(flag_data, COMMAND_LINE)
    if file_data:
        _build(file_data, where)
    return _build({**file_data, **flag_data}, COMMAND_LINE if flag_data else where)


# ----------------------------------------------------------------------------- rules between settings


def check_for_training(cfg: TrainConfig) -> None:
    """The rules a config must meet before a run loads anything (:class:`TrainConfigError` naming the flags)."""
    def need(flag: str, why: str) -> None:
        raise TrainConfigError(f"--{flag}: {why}")

    if cfg.dataset_config is None:
        need("dataset_config", "required: the dataset TOML whose latent and text caches to train on")
    if cfg.dit is None and cfg.model is None and cfg.task is None:
        need("dit", "required: give --dit (a DiT checkpoint), or --model / --task to use the registry's files")
    if cfg.output_dir is None:
        need("output_dir", "required: the folder the LoRA is saved to")
    if cfg.output_name is None:
        need("output_name", "required: the base name of the LoRA files")
    check_settings(cfg)


def check_settings(cfg: TrainConfig) -> None:
    """The rules between settings that hold for any use of the config (show_timesteps included)."""
    def bad(flag: str, why: str) -> None:
        raise TrainConfigError(f"--{flag}: {why}")

    if cfg.fp8_scaled and not cfg.fp8_base:
        bad("fp8_scaled", "needs --fp8_base (as musubi)")
    if cfg.blocks_to_swap and not cfg.gradient_checkpointing:
        bad("blocks_to_swap", "needs --gradient_checkpointing: a swapped block is brought back for the backward "
                              "pass's recomputation, and without it every block's weights would stay for the backward")
    if cfg.blocks_to_swap and cfg.fp8_base:
        bad("blocks_to_swap", "cannot be combined with --fp8_base yet (swapped blocks are read from the checkpoint "
                              "file in its own precision)")
    if cfg.gradient_checkpointing_cpu_offload and not cfg.gradient_checkpointing:
        bad("gradient_checkpointing_cpu_offload", "needs --gradient_checkpointing")
    if cfg.save_last_n_steps is not None and cfg.save_every_n_steps is None:
        bad("save_last_n_steps", "needs --save_every_n_steps")
    if cfg.save_last_n_epochs is not None and cfg.save_every_n_epochs is None:
        bad("save_last_n_epochs", "needs --save_every_n_epochs")
    if cfg.save_last_n_steps_state is not None and cfg.save_every_n_steps is None:
        bad("save_last_n_steps_state", "needs --save_every_n_steps")
    if cfg.save_last_n_epochs_state is not None and cfg.save_every_n_epochs is None:
        bad("save_last_n_epochs_state", "needs --save_every_n_epochs")
    if cfg.log_with == "tensorboard" and cfg.logging_dir is None:
        bad("log_with", "tensorboard needs --logging_dir (as musubi)")
    if cfg.lr_scheduler == "constant" and cfg.lr_warmup_steps:
        bad("lr_warmup_steps", f"{cfg.lr_warmup_steps!r} is not allowed with --lr_scheduler constant (it has no "
                               "warm-up, as in musubi); use --lr_scheduler constant_with_warmup")
    if cfg.offload_inactive_dit and cfg.blocks_to_swap:
        bad("offload_inactive_dit", "cannot be combined with --blocks_to_swap")
