"""``python wgp.py generate``: headless generation, one prompt, a prompt file, or interactive.

Flags are the request's field names (``--guidance``), plus the musubi-tuner spellings users know
(``--task t2v-14B``, ``--video_size H W``, ``--video_length``, ``--infer_steps``,
``--guidance_scale``, ``--flow_shift``, ``--save_path``, ``--image_path``, ``--end_image_path``,
``--control_path`` ...). Each request field's flag, help, default and other spellings come from its
declaration in :mod:`wan.engine.request`; only the flags that are not request fields are written
here. Flags are shown with underscores; the parser (a :class:`wan.flags.FlagParser`) also reads
them with hyphens (``--negative-prompt``).

Prompt files and interactive mode take one prompt per line with inline options:
``a fox in snow --w 832 --h 480 --f 33 --d 42 --s 30 --g 5 --fs 3 --n blurry --i img.png``.

Several GPUs: start one process per GPU with torchrun and give the official Wan flags::

    torchrun --nproc_per_node 4 wgp.py generate --model wan2.1-t2v-14B --prompt "..." \
        --ulysses_size 2 --cfg_parallel --dit_fsdp --t5_fsdp

(``--ulysses_size`` x 2 with ``--cfg_parallel`` must equal the processes started). A setting that
cannot run is named before any model loads; only rank 0 prints the output paths.

Exit codes: 0 all done, 1 a generation failed at run time, 2 bad input (named field, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wan.engine.prompt_lines import INLINE_OPTIONS, parse_prompt_line, read_prompt_file  # noqa: F401 (re-exported)
from wan.engine.request import (
    REQUEST_FIELDS,
    GenerationRequest,
    LoraChoice,
    RequestError,
    RequestField,
    request_default,
)
from wan.engine.request_checks import Limits
from wan.engine.text_cache import DEFAULT_MB as TEXT_CACHE_MB

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# musubi-tuner task names -> registry model ids.
MUSUBI_TASKS = {
    "t2v-1.3B": "wan2.1-t2v-1.3B", "t2v-14B": "wan2.1-t2v-14B", "t2i-14B": "wan2.1-t2i-14B",
    "i2v-14B": "wan2.1-i2v-14B-480P", "flf2v-14B": "wan2.1-flf2v-14B-720P",
    "t2v-1.3B-FC": "wan2.1-fun-control-1.3B", "t2v-14B-FC": "wan2.1-fun-control-14B",
    "i2v-14B-FC": "wan2.1-fun-control-14B", "t2v-A14B": "wan2.2-t2v-A14B", "i2v-A14B": "wan2.2-i2v-A14B",
    "ti2v-5B": "wan2.2-ti2v-5B",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``generate``: one per request field, as the field declares it (``dest`` is the
    field name, the default is the request's), then the flags that are not request fields."""
    for f in REQUEST_FIELDS.values():
        if f.flag:
            p.add_argument(f"--{f.name}", *f.aliases, dest=f.name, **_flag_kind(f))
    a = p.add_argument
    a("--video_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
      help="musubi-tuner order: height then width")
    a("--lora", action="append", default=[], metavar="FILE[:MULT]", help="repeatable")
    a("--lora_weight", nargs="+", default=[])
    a("--lora_multiplier", nargs="+", default=[])
    a("--include_patterns", nargs="+", default=[], metavar="REGEX",
      help="one per LoRA, in order (--lora files first, then --lora_weight): the LoRA applies only to "
           "modules whose official name matches")
    a("--exclude_patterns", nargs="+", default=[], metavar="REGEX",
      help="one per LoRA, in order: modules whose official name matches are left alone")
    a("--lora_dir", default="loras", help="folder LoRA names are looked up in")
    a("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override one profile setting for this job, e.g. --set step_savers.teacache.enabled=true")
    a("--from_file", help="a text file with one prompt per line and inline options")
    a("--from_output", help="rebuild the request of an earlier output (.mp4, .png or its .json); "
                            "flags given explicitly override its settings")
    a("--interactive", action="store_true", help="read prompts from the terminal")
    a("--checkpoint_dir", default="checkpoints", help="folder of the model checkpoints")
    for flag, (_, words) in FILE_FLAGS.items():
        a(f"--{flag}", metavar="PATH", help=f"{words} to use instead of the registry's (musubi-tuner's flag)")
    a("--models_dir", action="append", default=[], metavar="DIR",
      help="a folder of model files you already have (ComfyUI's models/, Wan2GP's ckpts/, the Hugging Face "
           "cache, any folder), repeatable: files are recognised by their tensors, and one that serves a "
           "component of the model is used instead of downloading it; --dit and the like still win")
    a("--device", default=None, help="torch device, e.g. cuda:1 or cpu (under torchrun: each process takes "
                                     "cuda:LOCAL_RANK)")
    for flag, words in PARALLEL_FLAGS.items():
        if flag in ("ulysses_size", "ring_size"):
            a(f"--{flag}", type=int, default=1, metavar="N", help=words)
        else:
            a(f"--{flag}", action="store_true", help=words)
    a("--text_cache_mb", type=_cache_mb, default=TEXT_CACHE_MB, metavar="MB",
      help="keep the text encoder's outputs of this many MiB of prompts, so that a prompt (or negative prompt) "
           "seen before in this run is not encoded again; 0 turns it off (default: %(default)s)")
    a("--quiet", action="store_true", help="no progress bar")
    for name, words in LIMIT_FLAGS.items():
        a(f"--{name}", type=int, default=getattr(Limits(), name), metavar="N",
          help=f"refuse a request over {words} (default: %(default)s; the web server's limit of the same name); "
               "raise it to allow more")


def _cache_mb(text: str) -> float:
    """``--text_cache_mb``: a number of MiB >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; a number of MiB >= 0 (0 turns the cache off)")
    return value


# Files given on the command line, as musubi-tuner spells them: flag -> (registry role, words).
# For a Wan 2.2 A14B model, --dit is the low-noise expert and --dit_high_noise the high-noise one.
FILE_FLAGS = {
    "dit": ("transformer", "the DiT checkpoint (a file, shards or a folder)"),
    "dit_high_noise": ("transformer_high_noise", "Wan 2.2 A14B: the high-noise expert's checkpoint"),
    "vae": ("vae", "the VAE checkpoint"),
    "t5": ("text_encoder", "the umT5 text encoder checkpoint"),
    "clip": ("clip", "the CLIP vision checkpoint (Wan 2.1 i2v, flf2v, Fun)"),
    "tokenizer": ("tokenizer", "the umT5 tokenizer folder"),
}


def model_of_dit(path: str) -> str:
    """The registry model a DiT file is, from its tensors (``--dit`` without ``--model``). A file that
    fits one network and an expert alike (Wan 2.1 t2v 14B vs Wan 2.2 A14B) is taken as the single
    network; several models of one architecture (i2v 480P/720P) give the first in registry order. A DiT
    of no registry size runs as the first model of its task type (the job then notes it)."""
    from wan.loading.identify import identify, registry_matches, task_type_model
    from wan.registry import default_registry
    identity = identify(path)
    if identity.kind != "dit":
        raise RequestError("dit", path, f"a Wan DiT checkpoint; this file is {identity.summary()}")
    registry = default_registry()
    matches = registry_matches(identity, registry)
    if not matches:  # another size or a finetune: the model of its task type lends defaults and files
        base = task_type_model(identity, registry)
        if base is None:
            raise RequestError("dit", path, f"a DiT of a Wan task type ({identity.summary()}: no registry model "
                                            "takes its inputs); name the model with --model, or add a spec for "
                                            "it in finetunes/")
        return base
    single = [m for m in matches if m.role == "transformer"]
    return (single or matches)[0].model_id


def folder_files(spec, found: list) -> dict[str, str]:
    """Role -> file for ``spec`` from the scanned ``--models_dir`` folders."""
    from wan.loading.model_folders import components_found
    from wan.registry import default_registry
    return components_found(spec, found, default_registry()) if found else {}


def given_files(args: argparse.Namespace, spec, recorded: dict | None = None) -> dict[str, str]:
    """Role -> path of the files the flags give for model ``spec`` (plus, with ``--from_output``, the
    files that output's run was given, where no flag replaces them)."""
    files = {role: entry["path"] for role, entry in (recorded or {}).items()
             if isinstance(entry, dict) and entry.get("given") and isinstance(entry.get("path"), str)}
    for flag, (role, _) in FILE_FLAGS.items():
        path = getattr(args, flag, None)
        if path is None:
            continue
        if role == "transformer" and spec.is_two_expert:
            role = "transformer_low_noise"
        if role not in spec.files:
            raise RequestError(flag, path, f"a file for one of {spec.id}'s components ({', '.join(spec.files)}); "
                                           f"it has no {role}")
        if not Path(path).exists():
            raise RequestError(flag, path, "an existing file or folder")
        files[role] = path
    return files


# Parallel generation under torchrun, with the official Wan scripts' flag names (not request fields:
# they change how a video is computed, not which video).
PARALLEL_FLAGS = {
    "ulysses_size": "processes sharing each forward's sequence (Ulysses; must divide the model's attention "
                    "heads); start them with torchrun --nproc_per_node",
    "ring_size": "ring attention degree: only 1 (ring attention is not available here)",
    "cfg_parallel": "the prompt and negative-prompt passes on two groups of --ulysses_size processes",
    "dit_fsdp": "shard the DiT's blocks over all processes (FSDP)",
    "t5_fsdp": "shard the umT5 text encoder over all processes (FSDP)",
}


def parallel_config(args: argparse.Namespace):
    """The :class:`wan.parallel.ParallelConfig` the flags ask for."""
    from wan.parallel import ParallelConfig
    return ParallelConfig(ulysses_size=args.ulysses_size, cfg_parallel=args.cfg_parallel, dit_fsdp=args.dit_fsdp,
                          t5_fsdp=args.t5_fsdp, ring_size=args.ring_size)


LIMIT_FLAGS = {"max_frames": "this many frames", "max_pixels": "this many pixels (width*height) per frame",
               "max_steps": "this many steps"}


def _flag_kind(f: RequestField) -> dict:
    """argparse keywords for a request field's flag, from its type: a bool is a switch (off by
    default), a list takes one or more values; the help shows a default the request sets itself."""
    shown = f.default not in (None, "", False, [])
    kind = {"default": f.default, "help": f.help + (" (default: %(default)s)" if shown else "")}
    if f.type is bool:
        return {**kind, "action": "store_true"}
    kind["metavar"] = f.metavar
    if f.type is not str:
        kind["type"] = f.type
    if f.many:
        kind["nargs"] = "+"
    return kind


def base_request(args: argparse.Namespace) -> GenerationRequest:
    """The request the flags describe (prompt-file lines override parts of it). With
    ``--from_output``: the request stored in that output, with the fields whose flags were given
    (their value differs from the default) replaced."""
    values = _flag_values(args)
    if args.from_output:
        given = {name: v for name, v in values.items() if v != request_default(name)}
        return _request_from_output(args.from_output).replace(**given)
    if not values["model"] and getattr(args, "dit", None):
        values["model"] = model_of_dit(args.dit)
    if not values["model"]:
        raise RequestError("model", None, "give --model (see: python wgp.py models), a musubi --task name, or --dit")
    return GenerationRequest(**values)


def _flag_values(args: argparse.Namespace) -> dict:
    """Every request field as the flags give it. musubi-tuner's spellings are converted: a task
    name names the model, ``--video_size`` is height then width, a boundary above 1 is a timestep;
    the LoRA flags make ``loras`` and ``--set`` makes ``profile_overrides``."""
    values = {name: getattr(args, name) for name, f in REQUEST_FIELDS.items() if f.flag}
    if values["task"] in MUSUBI_TASKS:
        values["model"], values["task"] = values["model"] or MUSUBI_TASKS[values["task"]], None
    if args.video_size:
        values["height"], values["width"] = args.video_size
    if values["boundary"] is not None and values["boundary"] > 1:
        values["boundary"] /= 1000
    values["loras"], values["profile_overrides"] = _loras(args), _overrides(args.overrides)
    return values


def recorded_files(path: str) -> dict:
    """Role -> {path, size, fingerprint, given?} of the files an output was made with ({} for an
    output written before they were recorded)."""
    from wan.engine.media import read_metadata
    try:
        files = read_metadata(path).get("files")
    except (OSError, ValueError):
        return {}
    return files if isinstance(files, dict) else {}


def _request_from_output(path: str) -> GenerationRequest:
    """The request stored in an output file."""
    from wan.engine import request_from_metadata
    from wan.engine.media import read_metadata
    try:
        return request_from_metadata(read_metadata(path))
    except (OSError, ValueError) as e:
        raise RequestError("from_output", path, f"an output file written by Wan Studio ({e})") from None


def _overrides(items: list[str]) -> dict:
    from wan.optim.profiles import ProfileError, parse_override
    out = {}
    for item in items:
        try:
            key, value = parse_override(item)
        except ProfileError as e:
            raise RequestError("set", item, str(e)) from None
        out[key] = value
    return out


def _loras(args) -> list[LoraChoice]:
    out = []
    for item in args.lora:
        path, sep, mult = item.rpartition(":")
        # "C:\\x.safetensors" or a name without multiplier: keep the whole string as the path
        out.append(LoraChoice(path, mult) if sep and path and not mult.startswith("\\") else LoraChoice(item))
    if args.lora_multiplier and len(args.lora_multiplier) != len(args.lora_weight):
        raise RequestError("lora_multiplier", args.lora_multiplier,
                           f"one multiplier per --lora_weight file ({len(args.lora_weight)} given)")
    mults = args.lora_multiplier or ["1.0"] * len(args.lora_weight)
    out += [LoraChoice(w, m) for w, m in zip(args.lora_weight, mults)]
    for flag, attr in (("include_patterns", "include"), ("exclude_patterns", "exclude")):
        patterns = getattr(args, flag)
        if patterns and len(patterns) != len(out):
            raise RequestError(flag, patterns, f"one pattern per LoRA ({len(out)} given), in the order of the LoRAs")
        for choice, pattern in zip(out, patterns):
            getattr(choice, attr).append(pattern)
    return out


def run(args: argparse.Namespace) -> int:
    """Runs the generate command; returns the exit code."""
    import logging
    # the CLI prints each job's notices itself (a fallback is also logged by the library)
    logging.getLogger("wan.optim.attention").setLevel(logging.ERROR)
    from wan.parallel import Launch, ParallelConfigError, check_parallel, parallel_session
    try:
        base = base_request(args)
        limits = Limits.of(args)
        parallel, launch = parallel_config(args), Launch.from_env()
    except (RequestError, ValueError) as e:
        return _report_bad(str(e))
    parallel_on = parallel.enabled or parallel.ring_size != 1 or launch.world_size > 1
    if parallel_on and args.interactive:
        return _report_bad("interactive: not with several processes (each would read its own prompts); give "
                           "--prompt or --from_file")
    recorded = recorded_files(args.from_output) if args.from_output else {}
    found = []
    if args.models_dir:
        from wan.loading.model_folders import scan_folder
        missing = [d for d in args.models_dir if not Path(d).is_dir()]
        if missing:
            return _report_bad(f"models_dir: {missing[0]!r} is not allowed; an existing folder")
        found = scan_folder(args.models_dir)
    if recorded:
        from wan.loading.files import changed_files
        for line in changed_files(recorded):
            print(f"warning: {line}: the output may not be reproduced exactly", file=sys.stderr)
    engine = None
    from contextlib import ExitStack
    stack = ExitStack()  # the process group of a parallel run, joined on the first generation
    session = None
    main = launch.rank == 0  # rank 0 reports; the other ranks say only what went wrong on them

    def generate_one(req: GenerationRequest, label: str) -> int:
        nonlocal engine, session
        from wan.engine import Cancelled, Engine, resolve_request
        from wan.engine.phases import phase_guidances
        try:
            resolved, spec = resolve_request(req, check_files=True, limits=limits)  # before any model loads
            files = {**folder_files(spec, found), **given_files(args, spec, recorded)}
            if parallel_on:  # before any model loads, with the model's heads and the request's guidance
                check_parallel(parallel, num_heads=spec.arch.num_heads, launch=launch,
                               guidance=phase_guidances(resolved, spec.is_two_expert))
                if session is None:
                    session = stack.enter_context(parallel_session(parallel, launch=launch, device=args.device))
            if engine is None:
                engine = Engine(checkpoint_dir=args.checkpoint_dir, lora_dir=args.lora_dir, limits=limits,
                                device=session.device if session is not None else args.device,
                                text_cache_mb=getattr(args, "text_cache_mb", TEXT_CACHE_MB))
            result = engine.generate(req, progress=None if args.quiet or not main else _progress_bar(label),
                                     files=files, parallel=parallel if parallel_on else None)
        except (RequestError, ParallelConfigError) as e:
            return _report_bad(f"{label}{e}") if main else EXIT_BAD_INPUT
        except Cancelled as e:
            if main:
                print(f"{label}{e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - any other failure: report it, keep the batch going
            from wan.loading.download import DownloadError
            kind = "" if isinstance(e, DownloadError) or getattr(e, "plain_message", False) else f"{type(e).__name__}: "
            where = "" if launch.world_size == 1 else f"rank {launch.rank}: "
            print(f"error: {where}{label}{kind}{e}", file=sys.stderr)
            return EXIT_FAILED
        if main:
            for note in result.notices:
                print(f"note: {label}{note}", file=sys.stderr)
        for f in result.files:  # only rank 0 writes files
            print(f)
        return EXIT_OK

    try:
        with stack:
            if args.from_file:
                return _worst(_run_lines(read_prompt_file(args.from_file), base, generate_one))
            if args.interactive:
                return _worst(_run_interactive(base, generate_one))
            return generate_one(base, "")
    except RequestError as e:
        return _report_bad(str(e))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _run_lines(lines, base, generate_one) -> list[int]:
    codes = []
    for number, line in lines:
        label = f"line {number}: "
        try:
            req = parse_prompt_line(line, base)
        except RequestError as e:
            codes.append(_report_bad(f"{label}{e}"))
            continue
        codes.append(generate_one(req, label))
    return codes


def _run_interactive(base, generate_one) -> list[int]:
    codes = []
    print("Enter a prompt with inline options (--w --h --f --d --s --g --fs --n --i --ei --cn); "
          "an empty line or Ctrl-D ends.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        try:
            req = parse_prompt_line(line, base)
        except RequestError as e:
            codes.append(_report_bad(str(e)))
            continue
        codes.append(generate_one(req, ""))
    return codes


def _worst(codes: list[int]) -> int:
    """Batch exit code: the most serious of the lines' codes (interrupt > bad input > failure)."""
    for code in (EXIT_INTERRUPTED, EXIT_BAD_INPUT, EXIT_FAILED):
        if code in codes:
            return code
    return EXIT_OK


def _report_bad(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _progress_bar(label: str):
    from tqdm import tqdm
    bar = {}

    def update(info) -> None:
        window = (getattr(info, "window", 1), getattr(info, "windows", 1))
        if bar.get("window") != window:  # a new bar for each sliding window ("window 2/3")
            if "bar" in bar:
                bar["bar"].close()
            desc = label.rstrip(": ") or "generating"
            if window[1] > 1:
                desc = f"{desc} · window {window[0]}/{window[1]}"
            bar["bar"] = tqdm(total=info.total, desc=desc, file=sys.stderr, initial=info.step - 1, leave=False)
            bar["window"] = window
        b = bar["bar"]
        b.set_postfix_str(f"t={info.timestep:.0f} {info.expert} cfg={info.guidance:g}")
        b.update(1)
        if info.step == info.total:
            b.close()
    return update
