"""The caching commands of LoRA training, with musubi-tuner's flags, and ``dataset check``:

    python wgp.py cache_latents --dataset_config D.toml (--vae PATH | --model ID) [--i2v] [--clip PATH]
                                [--vae_tiling] [--vae_dtype bfloat16] [--batch_size N] [--skip_existing]
                                [--keep_cache] [--device cuda] [--checkpoint_dir DIR] [--models_dir DIR]
    python wgp.py cache_text_encoder_outputs --dataset_config D.toml (--t5 PATH | --model ID)
                                [--tokenizer DIR] [--fp8_t5] [--batch_size N] [--skip_existing] [--keep_cache]
    python wgp.py dataset check D.toml

Files: a path flag (``--vae``, ``--clip``, ``--t5``, ``--tokenizer``, as in ``generate``) wins; the
rest of ``--model``'s files come from the ``--models_dir`` folders, else from the checkpoints folder
(downloaded when missing). With ``--model`` an i2v model turns ``--i2v`` on and, when it takes CLIP
features (Wan 2.1 i2v, Fun), loads its CLIP, so that the cache has what that training needs;
``--clip`` alone turns ``--i2v`` on as in musubi. Dtypes are musubi's: the VAE in bfloat16 unless
``--vae_dtype`` says otherwise, umT5 in bfloat16, CLIP in float16 (float32 on a CPU).

Exit codes: 0 done, 1 an item or a file could not be cached or a model file could not be had,
2 bad input (the message names the flag or file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


class _Bad(Exception):
    """Bad input: the message names the flag or the file."""


class _Failed(Exception):
    """A failure at run time (a model file that cannot be had or loaded)."""


# ----------------------------------------------------------------------------- flags


def _common(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--dataset_config", required=True, metavar="D.toml", help="the dataset TOML (musubi-tuner's format)")
    a("--model", metavar="ID", help="registry model whose files to use (see: wgp.py models); path flags win")
    a("--batch_size", type=int, metavar="N",
      help="at most N items per encoder call (default: each dataset's batch_size)")
    a("--skip_existing", action="store_true", help="keep the cache files that exist and fit this run")
    a("--keep_cache", action="store_true", help="keep cache files that no item of the dataset makes any more")
    a("--device", help="torch device (default: cuda when available, else cpu)")
    a("--checkpoint_dir", default="checkpoints", help="folder of the model checkpoints")
    a("--models_dir", action="append", default=[], metavar="DIR",
      help="a folder of model files you already have, repeatable (as in generate)")
    a("--quiet", action="store_true", help="no progress lines")


def add_cache_latents_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``cache_latents`` (musubi's ``wan_cache_latents.py`` plus ``--model``)."""
    _common(p)
    a = p.add_argument
    a("--vae", metavar="PATH", help="the VAE checkpoint (Wan 2.1 or 2.2)")
    a("--vae_dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the VAE and the latents "
                                                                      "(default: %(default)s, musubi's)")
    a("--i2v", action="store_true", help="also cache the first-frame conditioning of i2v training")
    a("--clip", metavar="PATH", help="the CLIP vision checkpoint (Wan 2.1 i2v); turns --i2v on")
    a("--vae_tiling", action="store_true", help="encode large frames in tiles (less memory, seams blended)")


def add_cache_text_encoder_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``cache_text_encoder_outputs`` (musubi's ``wan_cache_text_encoder_outputs.py`` plus
    ``--model`` and ``--tokenizer``)."""
    _common(p)
    a = p.add_argument
    a("--t5", metavar="PATH", help="the umT5 text encoder checkpoint")
    a("--tokenizer", metavar="DIR", help="the umT5 tokenizer folder (default: beside --t5, or the model's)")
    a("--fp8_t5", action="store_true", help="run the text encoder with fp8 weights (less memory)")


def add_dataset_check_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``dataset check``."""
    p.add_argument("dataset_config", metavar="D.toml", help="the dataset TOML (musubi-tuner's format)")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N lines per list (default: 50)")


# ----------------------------------------------------------------------------- commands


def run_cache_latents(args: argparse.Namespace) -> int:
    """Caches the VAE latents of a dataset; returns the exit code."""
    try:
        config = _config(args.dataset_config)
        _check_batch_size(args.batch_size)
        spec = _spec(args.model)
        i2v = bool(args.i2v or args.clip or (spec is not None and spec.arch.model_type in ("i2v", "flf2v")))
        roles = ["vae"] + (["clip"] if args.clip or (spec is not None and spec.needs_clip and i2v) else [])
        files = _files(args, spec, {"vae": args.vae, "clip": args.clip}, roles)
        device = _device(args.device)
        import torch
        import wan
        vae = _load("vae", args.vae, lambda: wan.load_vae(files["vae"], device=device,
                                                          dtype=getattr(torch, DTYPES[args.vae_dtype])))
        clip = None
        if "clip" in files:
            clip_dtype = torch.float32 if device.type == "cpu" else torch.float16
            clip = _load("clip", args.clip, lambda: wan.load_clip(files["clip"], device=device, dtype=clip_dtype))
        from wan.train.caching import cache_latents
        report = cache_latents(config, vae, clip=clip, i2v=i2v, vae_tiling=args.vae_tiling,
                               batch_size=args.batch_size, skip_existing=args.skip_existing,
                               keep_cache=args.keep_cache, device=device, progress=_progress(args.quiet))
    except _Bad as e:
        return _say(e, EXIT_BAD_INPUT)
    except _Failed as e:
        return _say(e, EXIT_FAILED)
    print("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


def run_cache_text_encoder_outputs(args: argparse.Namespace) -> int:
    """Caches the umT5 outputs of a dataset's captions; returns the exit code."""
    try:
        config = _config(args.dataset_config)
        _check_batch_size(args.batch_size)
        spec = _spec(args.model)
        given = {"text_encoder": args.t5, "tokenizer": args.tokenizer}
        roles = ["text_encoder"] + (["tokenizer"] if spec is not None else [])
        files = _files(args, spec, given, roles)
        device = _device(args.device)
        import torch
        import wan
        te = _load("t5", args.t5, lambda: wan.load_text_encoder(
            files["text_encoder"], device=device, dtype=torch.bfloat16, tokenizer=files.get("tokenizer")))
        _check_tokenizer(te, args.tokenizer)
        from wan.train.caching import cache_text_encoder_outputs, fp8_text_encoder
        if args.fp8_t5:
            note = fp8_text_encoder(te)
            if not args.quiet:
                print(f"text encoder: {note}", file=sys.stderr)
        report = cache_text_encoder_outputs(config, te, batch_size=args.batch_size,
                                            skip_existing=args.skip_existing, keep_cache=args.keep_cache,
                                            progress=_progress(args.quiet))
    except _Bad as e:
        return _say(e, EXIT_BAD_INPUT)
    except _Failed as e:
        return _say(e, EXIT_FAILED)
    print("\n".join(report.lines()))
    return EXIT_OK if report.ok else EXIT_FAILED


def run_dataset_check(args: argparse.Namespace) -> int:
    """Prints what the dataset holds and which cache files exist; 2 for a file that cannot be read."""
    try:
        config = _config(args.dataset_config)
    except _Bad as e:
        return _say(e, EXIT_BAD_INPUT)
    if args.limit < 1:
        return _say(f"--limit: {args.limit} is not allowed; an integer >= 1", EXIT_BAD_INPUT)
    from wan.train.caching import dataset_check_report
    print(dataset_check_report(config, limit=args.limit))
    return EXIT_OK


# ----------------------------------------------------------------------------- helpers


def _say(message, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _config(path: str):
    from wan.train.dataset_config import DatasetConfigError, load_dataset_config
    if not Path(path).is_file():
        raise _Bad(f"--dataset_config: {path!r} is not an existing file")
    try:
        return load_dataset_config(path)
    except DatasetConfigError as e:
        raise _Bad(str(e)) from None


def _check_batch_size(value: int | None) -> None:
    if value is not None and value < 1:
        raise _Bad(f"--batch_size: {value} is not allowed; an integer >= 1")


def _spec(model: str | None):
    if model is None:
        return None
    from wan.registry import RegistryError, get_model
    try:
        return get_model(model)
    except RegistryError as e:
        raise _Bad(f"--model: {e}") from None


FLAGS = {"vae": "--vae", "clip": "--clip", "text_encoder": "--t5", "tokenizer": "--tokenizer"}  # role -> flag


def _files(args, spec, given: dict[str, str | None], roles: list[str]) -> dict[str, str]:
    """Role -> path for ``roles`` (the first is the one needed without ``--model``): the path flags
    first, then ``--models_dir``, then the checkpoints folder (downloaded or generated when missing)."""
    files = {}
    for role, path in given.items():
        if path is not None:
            if not Path(path).exists():
                raise _Bad(f"{FLAGS[role]}: {path!r} is not an existing file or folder")
            files[role] = path
    if spec is None:
        if roles[0] not in files:
            raise _Bad(f"{FLAGS[roles[0]]}: required (a checkpoint path), or name the model with --model")
        return files
    needed = [role for role in roles if role not in files and role in spec.files]
    if needed and args.models_dir:
        from wan.loading.model_folders import components_found, scan_folder
        from wan.registry import default_registry
        missing = [d for d in args.models_dir if not Path(d).is_dir()]
        if missing:
            raise _Bad(f"--models_dir: {missing[0]!r} is not an existing folder")
        found = components_found(spec, scan_folder(args.models_dir), default_registry())
        files.update({role: found[role] for role in needed if role in found})
        needed = [role for role in needed if role not in files]
    if needed:
        from wan.loading.download import DownloadError, ensure_files
        try:
            paths = ensure_files(spec, args.checkpoint_dir, variant="fp32" if spec.test_model else "bf16",
                                 components=needed, progress=not args.quiet)
        except DownloadError as e:
            raise _Failed(str(e)) from None
        files.update({role: str(paths[role]) for role in needed})
    return files


def _device(name: str | None):
    import torch
    try:
        device = torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise _Bad(f"--device: {name!r} is not a torch device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _Bad(f"--device: {name!r}, but CUDA is not available here")
    return device


def _load(flag: str, given: str | None, load):
    """Runs a loader; a file the user gave that cannot be loaded is bad input naming its flag."""
    try:
        return load()
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if given is not None:
            raise _Bad(f"--{flag}: {given!r} cannot be loaded ({type(e).__name__}: {e})") from None
        raise _Failed(f"{flag}: cannot be loaded ({type(e).__name__}: {e})") from None


def _check_tokenizer(te, given: str | None) -> None:
    from wan.models.text_encoder import TokenizerNotFound
    try:
        te.get_tokenizer()
    except TokenizerNotFound as e:
        raise _Bad(f"--tokenizer: {e}") from None


def _progress(quiet: bool):
    return None if quiet else (lambda line: print(line, file=sys.stderr))
