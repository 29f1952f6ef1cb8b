"""``python wgp.py train``: LoRA training from latent and text caches, with musubi-tuner's flags.

Every flag comes from :class:`wan.train.config.TrainConfig` (its fields are the flag names, their help
and groups; one source for flags, the ``--config_file`` TOML and the trainer). Flags are shown with
underscores; the parser (a :class:`wan.flags.FlagParser`) also reads them with hyphens. musubi flags
this trainer does not support are accepted by the parser only to be refused by name with the reason.

Exit codes: 0 done, 1 the run failed (out of memory, a model that cannot load...), 2 bad input (a
setting, a file, a dataset: named, no traceback), 130 interrupted.

Several processes (data parallel, as musubi-tuner with accelerate): ``torchrun --nproc_per_node N wgp.py
train ...`` or ``accelerate launch --multi_gpu --num_processes N wgp.py train ...``; see
:mod:`wan.train.distributed` and :data:`SEVERAL_PROCESSES`.
"""

from __future__ import annotations

import argparse
import sys

from wan.train.config import (COMMAND_LINE, GROUPS, UNSUPPORTED_FLAGS, Flag, TrainConfig, TrainConfigError,
                              check_for_training, check_settings, config_from_sources, flags, read_config_file)

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
SEVERAL_PROCESSES = (
    "Several processes (one per GPU, data parallel): torchrun --nproc_per_node N wgp.py train ... or accelerate "
    "launch --multi_gpu --num_processes N wgp.py train ... . The dataset's batch_size is per process (a step "
    "trains on batch_size x N items, the same steps one process makes with batch_size x N); rank 0 writes the "
    "LoRA files, states and logs. On the CPU (gloo) use torchrun, as the tests do: accelerate launch --cpu "
    "--num_processes N starts one process only.")
_UNSUPPORTED_DEST = "_unsupported_flags"


def _number(kind: str):
    """argparse type for a numeric flag: the number, or the text unchanged so that the config's check
    names the flag, the value and what is allowed (instead of argparse's 'invalid float value')."""
    def convert(text: str):
        try:
            if kind == "int":
                return int(text)
            if kind == "float":
                return float(text)
            if text.endswith("%"):  # int_or_float: musubi's "10%"
                return text
            value = float(text)
            return int(value) if value.is_integer() and "." not in text and "e" not in text.lower() else value
        except ValueError:
            return text
    convert.__name__ = kind
    return convert


def _add_flag(group, flag: Flag) -> None:
    shown = flag.default is not None and flag.default is not False and flag.default not in ("", ())
    help_text = flag.help + (f" (default: {flag.default})" if shown else "")
    kw: dict = {"dest": flag.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if flag.kind == "bool":
        kw["action"] = "store_true"
    elif flag.kind == "list":
        kw.update(nargs="*", metavar=flag.metavar or "VALUE")
    else:
        if flag.kind in ("int", "float", "int_or_float"):
            kw["type"] = _number(flag.kind)
        words = "{" + ",".join(flag.choices) + "}" if flag.choices else None
        kw["metavar"] = flag.metavar or words or ("N" if flag.kind == "int" else "X" if flag.kind != "str" else "TEXT")
    group.add_argument(f"--{flag.name}", **kw)


class _RecordUnsupported(argparse.Action):
    """Records an unsupported musubi flag (with whatever values followed it) to refuse it by name."""

    def __call__(self, parser, namespace, values, option_string=None):
        found = list(getattr(namespace, _UNSUPPORTED_DEST, None) or [])
        found.append(option_string.lstrip("-"))
        setattr(namespace, _UNSUPPORTED_DEST, found)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``train``: ``--config_file``, one per TrainConfig setting, grouped; musubi's flags
    that are not supported are parsed (hidden from --help) and refused by :func:`run`."""
    parser.epilog = SEVERAL_PROCESSES
    parser.add_argument("--config_file", default=None, metavar="PATH",
                        help="a TOML file with these settings as keys (tables are flattened); flags given here win")
    groups = {name: parser.add_argument_group(f"{name} settings") for name in GROUPS}
    for flag in flags():
        _add_flag(groups[flag.group], flag)
    for name in UNSUPPORTED_FLAGS:
        parser.add_argument(f"--{name}", nargs="*", action=_RecordUnsupported, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed flags (and their ``--config_file``); TrainConfigError names what is wrong."""
    refused = getattr(args, _UNSUPPORTED_DEST, None)
    if refused:
        name = refused[0]
        raise TrainConfigError(f"--{name}: a musubi-tuner flag this trainer does not support: "
                               f"{UNSUPPORTED_FLAGS[name]}")
    given = {f.name: getattr(args, f.name) for f in flags() if hasattr(args, f.name)}
    for key, value in given.items():
        if isinstance(value, list):
            given[key] = tuple(value)
    file_data, where = {}, COMMAND_LINE
    if getattr(args, "config_file", None):
        file_data, where = read_config_file(args.config_file), args.config_file
    cfg = config_from_sources(given, file_data, where)
    return _with_model(cfg)


def _with_model(cfg: TrainConfig) -> TrainConfig:
    """``--task`` (musubi's task names) or ``--dit`` alone gives the registry model, for its defaults (the
    expert boundary) and files."""
    import dataclasses

    from wan.cli_generate import MUSUBI_TASKS, model_of_dit
    if cfg.model is not None:
        return cfg
    if cfg.task is not None:
        if cfg.task not in MUSUBI_TASKS:
            raise TrainConfigError(f"--task: {cfg.task!r} is not allowed; expected one of {', '.join(MUSUBI_TASKS)} "
                                   "(or give --model, a registry id)")
        return dataclasses.replace(cfg, model=MUSUBI_TASKS[cfg.task])
    if cfg.dit is not None:
        try:
            return dataclasses.replace(cfg, model=model_of_dit(cfg.dit))
        except Exception:  # an unknown DiT still trains; only the registry's defaults are missing
            return cfg
    return cfg


def run(args: argparse.Namespace) -> int:
    """Trains as the flags say; returns the exit code (messages on stderr)."""
    from wan.train.checkpoints import StateError
    from wan.train.data import DataError
    from wan.train.trainer import Trainer, TrainingError, show_timesteps
    try:
        cfg = config_from_args(args)
        if cfg.show_timesteps:
            check_settings(cfg)
            show_timesteps(cfg)
            return EXIT_OK
        check_for_training(cfg)
    except (TrainConfigError, ValueError) as exc:
        return _bad(str(exc))
    try:
        Trainer(cfg).run()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (TrainConfigError, DataError, StateError) as exc:
        return _bad(str(exc))
    except (TrainingError, OSError, RuntimeError, ValueError) as exc:
        print(f"training failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _bad(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT
