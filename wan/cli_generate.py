"""``python wgp.py generate``: headless generation, one prompt, a prompt file, or interactive.

Flags are the request's field names (``--guidance``), plus the musubi-tuner spellings users know
(``--task t2v-14B``, ``--video_size H W``, ``--video_length``, ``--infer_steps``,
``--guidance_scale``, ``--flow_shift``, ``--save_path``, ``--image_path``, ``--end_image_path``,
``--control_path`` ...). Prompt files and interactive mode take one prompt per line with inline
options: ``a fox in snow --w 832 --h 480 --f 33 --d 42 --s 30 --g 5 --fs 3 --n blurry --i img.png``.

Exit codes: 0 all done, 1 a generation failed at run time, 2 bad input (named field, no traceback),
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wan.engine.request import TASKS, GenerationRequest, LoraChoice, RequestError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130

# musubi-tuner task names -> registry model ids.
MUSUBI_TASKS = {
    "t2v-1.3B": "wan2.1-t2v-1.3B", "t2v-14B": "wan2.1-t2v-14B", "t2i-14B": "wan2.1-t2i-14B",
    "i2v-14B": "wan2.1-i2v-14B-480P", "flf2v-14B": "wan2.1-flf2v-14B-720P",
    "t2v-1.3B-FC": "wan2.1-fun-control-1.3B", "t2v-14B-FC": "wan2.1-fun-control-14B",
    "i2v-14B-FC": "wan2.1-fun-control-14B", "t2v-A14B": "wan2.2-t2v-A14B", "i2v-A14B": "wan2.2-i2v-A14B",
    "ti2v-5B": "wan2.2-ti2v-5B",
}
# Inline options of prompt-file lines: option -> (request field, type).
INLINE_OPTIONS = {
    "w": ("width", int), "h": ("height", int), "f": ("frames", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance", float), "l": ("guidance", float), "fs": ("shift", float), "n": ("negative_prompt", str),
    "i": ("image", str), "ei": ("end_image", str), "cn": ("control_video", str),
}


class _BadInput(Exception):
    pass


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``generate``; each ``dest`` is a request field name."""
    a = p.add_argument
    a("--model", help="model id (python wgp.py models); or musubi's --task name, e.g. t2v-1.3B")
    a("--task", help=f"task ({', '.join(TASKS)}) or a musubi-tuner task name (t2v-14B, i2v-A14B, ...)")
    a("--prompt", "-p", default=None)
    a("--negative_prompt", "--negative-prompt", dest="negative_prompt")
    a("--width", type=int)
    a("--height", type=int)
    a("--video_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
      help="musubi-tuner order: height then width")
    a("--frames", "--video_length", dest="frames", type=int)
    a("--steps", "--infer_steps", dest="steps", type=int)
    a("--guidance", "--guidance_scale", dest="guidance", type=float)
    a("--guidance_high_noise", "--guidance_scale_high_noise", dest="guidance_high_noise", type=float)
    a("--boundary", "--timestep_boundary", dest="boundary", type=float,
      help="Wan 2.2 A14B expert switch, fraction of 1000 (musubi's value above 1 is read as a timestep)")
    a("--shift", "--flow_shift", dest="shift", type=float)
    a("--sampler", "--sample_solver", dest="sampler")
    a("--seed", type=int, default=-1)
    a("--image", "--image_path", dest="image")
    a("--end_image", "--end_image_path", dest="end_image")
    a("--video", "--video_path", dest="video")
    a("--strength", "--denoise_strength", dest="strength", type=float, default=0.75)
    a("--control_video", "--control_path", dest="control_video")
    a("--mask_video", "--mask_path", dest="mask_video")
    a("--ref_images", nargs="+", default=[])
    a("--vace_scale", type=float, default=1.0)
    a("--lora", action="append", default=[], metavar="FILE[:MULT]", help="repeatable")
    a("--lora_weight", nargs="+", default=[])
    a("--lora_multiplier", nargs="+", default=[])
    a("--include_patterns", nargs="+", default=[], metavar="REGEX",
      help="one per LoRA, in order (--lora files first, then --lora_weight): the LoRA applies only to "
           "modules whose official name matches")
    a("--exclude_patterns", nargs="+", default=[], metavar="REGEX",
      help="one per LoRA, in order: modules whose official name matches are left alone")
    a("--lora_dir", "--lora-dir", dest="lora_dir", default="loras", help="folder LoRA names are looked up in")
    a("--profile", help="profile name or number (python wgp.py profiles), e.g. 4 or fast_preview")
    a("--set", dest="profile_overrides", action="append", default=[], metavar="KEY=VALUE",
      help="override one profile setting for this job, e.g. --set step_savers.teacache.enabled=true")
    a("--output_dir", "--save_path", dest="output_dir", default="outputs")
    a("--name_template", default="{time}_seed{seed}_{prompt}")
    a("--fps", type=int)
    a("--quality", type=int, default=8)
    a("--save_latents", action="store_true")
    a("--trim_tail", type=int, default=0)
    a("--cpu_noise", action="store_true", help="draw the noise on the CPU (same result on every device)")
    a("--from_file", help="a text file with one prompt per line and inline options")
    a("--from_output", help="rebuild the request of an earlier output (.mp4, .png or its .json); "
                            "flags given explicitly override its settings")
    a("--interactive", action="store_true", help="read prompts from the terminal")
    a("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", default="checkpoints")
    a("--device", default=None)
    a("--quiet", action="store_true", help="no progress bar")


def base_request(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> GenerationRequest:
    """The request the flags describe (prompt-file lines override parts of it)."""
    if args.from_output:
        return _request_from_output(args, parser)
    model, task = args.model, args.task
    if task in MUSUBI_TASKS:
        model, task = model or MUSUBI_TASKS[task], None
    if not model:
        raise RequestError("model", None, "give --model (see: python wgp.py models) or a musubi --task name")
    width, height = args.width, args.height
    if args.video_size:
        height, width = args.video_size
    boundary = args.boundary / 1000 if args.boundary is not None and args.boundary > 1 else args.boundary
    return GenerationRequest(
        model=model, task=task, prompt=args.prompt or "", negative_prompt=args.negative_prompt, width=width,
        height=height, frames=args.frames, steps=args.steps, guidance=args.guidance,
        guidance_high_noise=args.guidance_high_noise, boundary=boundary, shift=args.shift, sampler=args.sampler,
        seed=args.seed, image=args.image, end_image=args.end_image, video=args.video, strength=args.strength,
        control_video=args.control_video, mask_video=args.mask_video, ref_images=list(args.ref_images),
        vace_scale=args.vace_scale, loras=_loras(args), profile=args.profile,
        profile_overrides=_overrides(args.profile_overrides), output_dir=args.output_dir,
        name_template=args.name_template, fps=args.fps, quality=args.quality, save_latents=args.save_latents,
        trim_tail=args.trim_tail, cpu_noise=args.cpu_noise)


def _request_from_output(args: argparse.Namespace, parser) -> GenerationRequest:
    """The request stored in an output file, with the flags that differ from their defaults applied."""
    from wan.engine import request_from_metadata
    from wan.engine.media import read_metadata
    try:
        saved = request_from_metadata(read_metadata(args.from_output))
    except (OSError, ValueError) as e:
        raise RequestError("from_output", args.from_output, f"an output file written by Wan Studio ({e})") from None
    if parser is None:
        return saved
    changes = {}
    for name in saved.to_dict():
        if name in vars(args) and getattr(args, name) != parser.get_default(name):
            changes[name] = getattr(args, name)
    return saved.replace(**changes)


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


def parse_prompt_line(line: str, base: GenerationRequest) -> GenerationRequest:
    """``prompt text --w 832 --h 480 ...`` -> ``base`` with the prompt and those fields replaced."""
    parts = line.split(" --")
    changes: dict = {"prompt": parts[0].strip()}
    for part in parts[1:]:
        option, _, value = part.strip().partition(" ")
        if option not in INLINE_OPTIONS:
            raise RequestError(f"--{option}", value, f"inline options are: {', '.join('--' + o for o in INLINE_OPTIONS)}")
        field, kind = INLINE_OPTIONS[option]
        try:
            changes[field] = kind(value.strip())
        except ValueError:
            raise RequestError(f"--{option}", value, f"a {kind.__name__} value for {field}") from None
    if not changes["prompt"]:
        raise RequestError("prompt", "", "a prompt before the inline options")
    return base.replace(**changes)


def read_prompt_file(path: str) -> list[tuple[int, str]]:
    """(line number, text) of every prompt line; blank lines and # comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RequestError("from_file", path, f"a readable UTF-8 text file ({e})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.strip().startswith("#")]


def run(args: argparse.Namespace, parser: argparse.ArgumentParser | None = None) -> int:
    """Runs the generate command; returns the exit code."""
    import logging
    # the CLI prints each job's notices itself (a fallback is also logged by the library)
    logging.getLogger("wan.optim.attention").setLevel(logging.ERROR)
    try:
        base = base_request(args, parser)
    except RequestError as e:
        return _report_bad(str(e))
    engine = None

    def generate_one(req: GenerationRequest, label: str) -> int:
        nonlocal engine
        from wan.engine import Cancelled, Engine, resolve_request
        try:
            resolve_request(req, check_files=True)  # bad input is reported before any model loads
            if engine is None:
                engine = Engine(checkpoint_dir=args.checkpoint_dir, device=args.device, lora_dir=args.lora_dir)
            result = engine.generate(req, progress=None if args.quiet else _progress_bar(label))
        except RequestError as e:
            return _report_bad(f"{label}{e}")
        except Cancelled as e:
            print(f"{label}{e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - any other failure: report it, keep the batch going
            from wan.loading.download import DownloadError
            kind = "" if isinstance(e, DownloadError) else f"{type(e).__name__}: "
            print(f"error: {label}{kind}{e}", file=sys.stderr)
            return EXIT_FAILED
        for note in result.notices:
            print(f"note: {label}{note}", file=sys.stderr)
        for f in result.files:
            print(f)
        return EXIT_OK

    try:
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
        if "bar" not in bar:
            bar["bar"] = tqdm(total=info.total, desc=label.rstrip(": ") or "generating", file=sys.stderr,
                              initial=info.step - 1, leave=False)
        b = bar["bar"]
        b.set_postfix_str(f"t={info.timestep:.0f} {info.expert} cfg={info.guidance:g}")
        b.update(1)
        if info.step == info.total:
            b.close()
    return update
