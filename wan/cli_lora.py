"""``python wgp.py lora list|check|convert``: the LoRA folder, compatibility, format conversion.

    python wgp.py lora list [--lora_dir loras] [--family wan2.1-t2v-1.3B]
    python wgp.py lora check FILE --model wan2.1-t2v-14B      exit 2 when it matches nothing
    python wgp.py lora convert IN OUT --to musubi|comfy|diffusers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", required=True)
    ls = sub.add_parser("list", help="the LoRAs of the folder, with rank, size and trigger words")
    ls.add_argument("--lora_dir", default="loras")
    ls.add_argument("--family", default=None)
    ck = sub.add_parser("check", help="does a LoRA fit a model? (full / partial / none)")
    ck.add_argument("file")
    ck.add_argument("--model", required=True, help="model id (python wgp.py models)")
    cv = sub.add_parser("convert", help="rewrite a LoRA in another key layout")
    cv.add_argument("input")
    cv.add_argument("output")
    cv.add_argument("--to", required=True, choices=("musubi", "comfy", "diffusers"))


def run(args: argparse.Namespace) -> int:
    try:
        return {"list": _list, "check": _check, "convert": _convert}[args.lora_command](args)
    except (ValueError, OSError) as e:  # bad file, name or model: one clear line
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT


def _list(args) -> int:
    from wan.lora.library import scan_loras
    infos = scan_loras(Path(args.lora_dir), args.family)
    if not infos:
        print(f"no LoRAs in {args.lora_dir} (one subfolder per model family: see loras/README.md)")
    for i in infos:
        if i.error:
            print(f"{i.family}/{i.name}: unreadable ({i.error})")
            continue
        words = f"  triggers: {', '.join(i.trigger_words)}" if i.trigger_words else ""
        print(f"{i.family}/{i.name}  rank {i.rank}  {i.size_bytes / 2**20:.1f} MB{words}")
    return EXIT_OK


def _check(args) -> int:
    from wan.lora.compat import check_lora, model_linear_shapes
    from wan.lora.formats import load_lora
    from wan.registry import RegistryError, get_model
    try:
        shapes = model_linear_shapes(get_model(args.model))
    except RegistryError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    compat = check_lora(load_lora(args.file), shapes)
    print(compat.summary())
    return EXIT_BAD_INPUT if compat.status == "none" else EXIT_OK


def _convert(args) -> int:
    from wan.lora.convert import save_lora, to_comfy, to_diffusers, to_musubi
    from wan.lora.formats import load_lora
    lora = load_lora(args.input)
    state = {"musubi": to_musubi, "comfy": to_comfy, "diffusers": to_diffusers}[args.to](lora)
    save_lora(state, args.output, lora.metadata)
    print(f"{args.output}: {len(state)} tensors in the {args.to} layout")
    return EXIT_OK
