"""Command table of ``wgp.py``: one small function per command.

    python wgp.py [serve] [--listen] [--server_port N] [--share] [--auth U:P] [--model ID] ...  the web app
    python wgp.py generate --model ID --prompt TEXT [...]   headless generation (see wan/cli_generate.py)
    python wgp.py models                 list the models of the registry
    python wgp.py profiles [--model ID]  list the profiles and the memory plan each gives here
    python wgp.py lora list|check|convert  the LoRA folder, compatibility, format conversion
    python wgp.py download MODEL [--variant bf16|fp16|fp8] [--checkpoint_dir DIR]
    python wgp.py dataset check D.toml   a musubi-tuner dataset config: items, buckets, frames, caches
    python wgp.py cache_latents --dataset_config D.toml [--model ID | --vae PATH] [--i2v] ...
    python wgp.py cache_text_encoder_outputs --dataset_config D.toml [--model ID | --t5 PATH] ...
    python wgp.py train --dit PATH | --model ID --dataset_config D.toml --output_dir O --output_name N ...

Flags are shown with underscores (``--server_port``); the hyphen spelling (``--server-port``) is
read as the same flag (``wan.flags.FlagParser``).

Exit codes: 0 success, 1 runtime failure, 2 bad input (a clear message, never a traceback).
"""

from __future__ import annotations

import argparse
import os
import sys

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DEFAULT_CHECKPOINT_DIR = "checkpoints"


def _serve(args: argparse.Namespace) -> int:
    from wan.app.settings import SettingsError, load_settings
    try:
        settings = load_settings(args)
        from wan.app.server import serve
        serve(settings, args.config)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130
    return EXIT_OK


def _generate(args: argparse.Namespace) -> int:
    from wan.cli_generate import run
    return run(args)


def _profiles(args: argparse.Namespace) -> int:
    from wan.cli_profiles import run
    return run(args)


def _lora(args: argparse.Namespace) -> int:
    from wan.cli_lora import run
    return run(args)


def _models(args: argparse.Namespace) -> int:
    """Every model with its tasks and whether it is ready here: its files found in --models_dir
    folders or present in the checkpoints folder, or what is still missing, with sizes."""
    from wan.loading.model_folders import components_found, scan_folder
    from wan.loading.readiness import readiness
    from wan.optim.planner import file_size_estimates
    from wan.registry import default_registry, list_models
    missing = [d for d in args.models_dir if not os.path.isdir(d)]
    if missing:
        print(f"error: models_dir: {missing[0]!r} is not an existing folder", file=sys.stderr)
        return EXIT_BAD_INPUT
    found = scan_folder(args.models_dir) if args.models_dir else []
    registry = default_registry()
    for spec in list_models(include_test=True):
        state = readiness(spec, args.checkpoint_dir, components_found(spec, found, registry) if found else {},
                          estimates=file_size_estimates(spec))
        print(f"{spec.id:32s} {spec.display_name:45s} {','.join(spec.tasks):24s} {state.summary()}")
        if args.verbose:
            for c in state.components:
                print(f"    {c.role:24s} {c.source:12s} {c.path or ''}")
    return EXIT_OK


def _download_lora(args: argparse.Namespace, entry) -> int:
    """``download <LoRA id>``: a registry LoRA (an accelerator) into the LoRA folder, under the
    name its profile uses, for each model it fits."""
    from wan.loading.download import DownloadError, fetch_lora_entry
    from wan.lora.library import family_for_model
    from wan.registry import get_model
    families = {family_for_model(get_model(m)) for m in entry.fits}
    try:
        for family in sorted(f for f in families if f):
            for role, path in fetch_lora_entry(entry, args.lora_dir, family).items():
                print(f"{role}: {path}")
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


def _download(args: argparse.Namespace) -> int:
    from wan.loading.download import DownloadError, ensure_files
    from wan.registry import RegistryError, default_registry, get_model
    entry = default_registry().loras.get(args.model)
    if entry is not None:
        return _download_lora(args, entry)
    from wan.loading.download import free_space_problem, is_offline
    from wan.loading.readiness import readiness
    from wan.optim.planner import file_size_estimates
    problem = None
    try:
        spec = get_model(args.model)
        needed = readiness(spec, args.checkpoint_dir, variant=args.variant,
                           estimates=file_size_estimates(spec, args.variant)).missing_bytes
        problem = free_space_problem(args.checkpoint_dir, needed)
        if problem and not is_offline():  # offline nothing is downloaded: the missing files matter more
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_FAILED
        paths = ensure_files(spec, args.checkpoint_dir, variant=args.variant)
    except RegistryError as e:  # unknown model or variant: bad input
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        if problem:
            print(f"note: {problem}", file=sys.stderr)
        return EXIT_FAILED
    for name, path in paths.items():
        print(f"{name}: {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from wan.flags import FlagParser
    parser = FlagParser(prog="wgp.py", description="Wan Studio: Wan 2.1 / 2.2 video generation; flags are "
                                                   "written --like_this, and --like-this works too")
    sub = parser.add_subparsers(dest="command")

    from wan.app.settings import add_server_arguments
    serve = sub.add_parser("serve", help="start the web app (the default command)")
    add_server_arguments(serve)
    serve.set_defaults(func=_serve)

    from wan.cli_generate import add_arguments
    gen = sub.add_parser("generate", help="generate a video or image without the UI")
    add_arguments(gen)
    gen.set_defaults(func=_generate)

    from wan.cli_profiles import add_arguments as add_profile_arguments
    prof = sub.add_parser("profiles", help="list the profiles and the memory plan each gives on this machine")
    add_profile_arguments(prof)
    prof.set_defaults(func=_profiles)

    from wan.cli_lora import add_arguments as add_lora_arguments
    lora = sub.add_parser("lora", help="list, check and convert LoRAs")
    add_lora_arguments(lora)
    lora.set_defaults(func=_lora)

    models = sub.add_parser("models", help="list the models of the registry and whether each is ready here")
    models.add_argument("--checkpoint_dir", default=DEFAULT_CHECKPOINT_DIR)
    models.add_argument("--models_dir", action="append", default=[], metavar="DIR",
                        help="a folder of model files you already have (ComfyUI, Wan2GP, HF cache), repeatable")
    models.add_argument("--verbose", "-v", action="store_true", help="each component: where it comes from")
    models.set_defaults(func=_models)

    dl = sub.add_parser("download", help="download a model's files into the checkpoints folder, or a registry "
                                          "LoRA (an accelerator) into the LoRA folder")
    dl.add_argument("model", help="model id (see: wgp.py models), or the id of a registry LoRA "
                                  "(wan/registry/models/accelerators.yaml)")
    dl.add_argument("--lora_dir", default="loras", help="LoRA folder (for a registry LoRA)")
    dl.add_argument("--variant", default="bf16", help="weights variant: bf16 (default), fp16, fp32, fp8_e4m3fn, fp8_scaled")
    dl.add_argument("--checkpoint_dir", default=DEFAULT_CHECKPOINT_DIR)
    dl.set_defaults(func=_download)
    _add_training_commands(sub)
    return parser


def _add_training_commands(sub) -> None:
    """The dataset and caching commands, with musubi-tuner's names and flags (wan/cli_cache.py)."""
    from wan import cli_cache
    dataset = sub.add_parser("dataset", help="check a musubi-tuner dataset config")
    dataset_sub = dataset.add_subparsers(dest="dataset_command", required=True)
    check = dataset_sub.add_parser("check", help="per dataset: items, buckets, frames, missing captions, "
                                                 "unreadable files and cache state")
    cli_cache.add_dataset_check_arguments(check)
    check.set_defaults(func=cli_cache.run_dataset_check)
    latents = sub.add_parser("cache_latents", help="encode a dataset's media into latent caches (musubi-tuner's layout)")
    cli_cache.add_cache_latents_arguments(latents)
    latents.set_defaults(func=cli_cache.run_cache_latents)
    text = sub.add_parser("cache_text_encoder_outputs", help="encode a dataset's captions with umT5 "
                                                             "(musubi-tuner's layout)")
    cli_cache.add_cache_text_encoder_arguments(text)
    text.set_defaults(func=cli_cache.run_cache_text_encoder_outputs)
    from wan import cli_train
    train = sub.add_parser("train", help="train a LoRA (musubi-tuner's flags and dataset config)")
    cli_train.add_arguments(train)
    train.set_defaults(func=cli_train.run)


def main(argv: list[str]) -> int:
    parser = build_parser()
    commands = {"serve", "generate", "models", "profiles", "lora", "download", "dataset", "cache_latents",
                "cache_text_encoder_outputs", "train", "-h", "--help"}
    if not argv or argv[0] not in commands:
        argv = ["serve", *argv]  # flags alone start the app
    args = parser.parse_args(argv)
    return args.func(args)
