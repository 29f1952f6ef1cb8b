"""``python wgp.py profiles``: every profile, and the memory plan it gives for one model.

    python wgp.py profiles [--model ID] [--ram_gb N] [--vram_gb N] [--profile_dir DIR]

The machine is detected (RAM by psutil, the GPU by torch.cuda); ``--ram_gb`` / ``--vram_gb``
replace what was detected, to see the plans of another machine (``--vram_gb 0``: no GPU).
Exit codes: 0 listed, 2 bad input (unknown model or profile folder, malformed profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from wan.optim.planner import GiB, Machine, describe, model_sizes, plan, run_precision
from wan.optim.profiles import ProfileError
from wan.optim.profile_files import DEFAULT_USER_DIR, load_profiles

DEFAULT_MODEL = "wan2.1-t2v-14B"
EXIT_OK, EXIT_BAD_INPUT = 0, 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model id to plan for (default {DEFAULT_MODEL})")
    parser.add_argument("--ram_gb", type=float, default=None, help="plan for this much RAM instead of the detected")
    parser.add_argument("--vram_gb", type=float, default=None,
                        help="plan for a GPU with this much memory instead of the detected (0: no GPU)")
    parser.add_argument("--profile_dir", default=None,
                        help=f"folder of user profiles (default {DEFAULT_USER_DIR}, if present)")


def machine_for(args: argparse.Namespace) -> Machine:
    """The detected machine with ``--ram_gb`` / ``--vram_gb`` replacing what they name."""
    from wan.optim.machine import detect_machine
    machine = detect_machine()
    ram_gb, vram_gb = getattr(args, "ram_gb", None), getattr(args, "vram_gb", None)
    if ram_gb is not None:
        machine = dataclasses.replace(machine, ram_bytes=int(ram_gb * GiB))
    if vram_gb is not None:
        name = f"simulated, {machine.gpu_name}" if machine.gpu_name else "simulated GPU"
        machine = (Machine(machine.ram_bytes) if vram_gb <= 0 else
                   dataclasses.replace(machine, vram_bytes=int(vram_gb * GiB), gpu_name=name))
    return machine


def run(args: argparse.Namespace) -> int:
    from wan.registry import RegistryError, get_model
    for flag in ("ram_gb", "vram_gb"):
        value = getattr(args, flag, None)
        if value is not None and value < 0:
            print(f"error: --{flag.replace('_', '-')} {value}: expected a size in GB >= 0", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        spec = get_model(getattr(args, "model", None) or DEFAULT_MODEL)
        user_dir = getattr(args, "profile_dir", None)
        profiles = load_profiles(user_dir if user_dir is not None else DEFAULT_USER_DIR)
    except (RegistryError, ProfileError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    machine = machine_for(args)
    print(f"Model {spec.id} ({spec.display_name}) on {machine}")
    print("Sizes are GB of 2^30 bytes; reserves cover activations (VRAM) and the system (RAM).\n")
    for profile in profiles:
        try:
            sizes = model_sizes(spec, run_precision(profile, machine))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(f"[{profile.label}] {profile.description}")
        print(describe(plan(profile, sizes, machine, profiles)))
        print()
    return EXIT_OK
