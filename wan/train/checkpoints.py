"""What a training run writes to resume from, and the names and retention of its saves (musubi-tuner's
``utils/train_utils.py``).

Names, in ``--output_dir`` (musubi's):

==========================  =====================================  ==================================
save                        LoRA file                              state folder
==========================  =====================================  ==================================
every N steps               ``<name>-step00000500.safetensors``    ``<name>-step00000500-state``
every N epochs              ``<name>-000002.safetensors``          ``<name>-000002-state``
end of training             ``<name>.safetensors``                 ``<name>-state``
==========================  =====================================  ==================================

Retention (musubi's arithmetic): ``--save_last_n_steps N`` removes, at step s, the step save of
``r = s - N - 1`` rounded down to a multiple of ``--save_every_n_steps`` (so N counts *steps*);
``--save_last_n_epochs N`` removes the epoch save ``e - every * N`` (N counts saves). The state
variants use ``--save_last_n_*_state`` when given, else the same N.

A state folder (our layout; musubi writes accelerate's) holds everything the next step depends on, so
that a resumed run continues bit for bit on the CPU:

- ``lora.safetensors``: the network's ``state_dict()`` in its training dtype (musubi's key names);
- ``optimizer.pt``, ``scheduler.pt`` (and ``scaler.pt`` with fp16): their ``state_dict()``;
- ``rng.pt``: torch's global generator (CUDA's too), Python's ``random``, numpy's, the trainer's own
  generator (noise and timesteps) and the timestep-bucket pool;
- ``progress.json``: step, epoch, position in the epoch, seed, the recent losses and the settings.

Everything is read back with ``torch.load(weights_only=True)``: a state folder cannot run code. A folder
is written aside and renamed into place, so a crash never leaves a half-written state under its name.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FORMAT = "wan-studio-train-state"
STATE_VERSION = 1
STATE_FILES = ("lora.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "progress.json")


class StateError(ValueError):
    """A state folder that cannot be resumed from; the message names the folder and the reason."""


# ----------------------------------------------------------------------------- names and retention


def step_name(output_name: str, step: int) -> str:
    return f"{output_name}-step{step:08d}"


def epoch_name(output_name: str, epoch: int) -> str:
    return f"{output_name}-{epoch:06d}"


def lora_file(base: str) -> str:
    return f"{base}.safetensors"


def state_folder(base: str) -> str:
    return f"{base}-state"


def step_to_remove(step: int, every: int | None, last_n: int | None) -> int | None:
    """The step whose save goes when step ``step`` is saved (musubi's ``get_remove_step_no``)."""
    if last_n is None or not every:
        return None
    remove = step - last_n - 1
    remove -= remove % every
    return remove if remove > 0 else None


def epoch_to_remove(epoch: int, every: int | None, last_n: int | None) -> int | None:
    """The epoch whose save goes when epoch ``epoch`` is saved (musubi's ``get_remove_epoch_no``)."""
    if last_n is None or not every:
        return None
    remove = epoch - every * last_n
    return remove if remove > 0 else None


# ----------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Where a run is: ``step`` optimizer steps done; ``epoch`` (1-based) being trained with ``position``
    of its batches consumed; the ``seed`` that fixes noise, timesteps and every epoch's batch order."""

    step: int = 0
    epoch: int = 1
    position: int = 0
    seed: int = 0
    recent_losses: list[float] = field(default_factory=list)

    def normalised(self, batches_per_epoch: int) -> Progress:
        """An epoch whose batches are all consumed is the next epoch's start."""
        if self.position >= batches_per_epoch:
            return Progress(self.step, self.epoch + 1, 0, self.seed, list(self.recent_losses))
        return self


# ----------------------------------------------------------------------------- random states


def capture_rng(generator: torch.Generator, pool_left: list[int] | None) -> dict[str, Any]:
    """Every random state a training step reads, in types ``torch.load(weights_only=True)`` accepts."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "python": [version, list(mt), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "pool_left": None if pool_left is None else list(pool_left),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> list[int] | None:
    """Sets every random state from :func:`capture_rng`'s dict; returns the bucket pool's list."""
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    return state.get("pool_left")


# ----------------------------------------------------------------------------- saving and loading


def save_state(folder: str | os.PathLike, *, network: torch.nn.Module, optimizer: torch.optim.Optimizer,
               scheduler: Any, rng: dict[str, Any], progress: Progress, settings: dict[str, Any],
               scaler: Any = None, extra: dict[str, Any] | None = None) -> Path:
    """Writes a state folder (see the module docstring) atomically; an existing one is replaced."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()},
                  str(tmp / "lora.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng, tmp / "rng.pt")
        if scaler is not None:
            torch.save(scaler.state_dict(), tmp / "scaler.pt")
        info = {"format": STATE_FORMAT, "version": STATE_VERSION, **asdict(progress), "settings": settings,
                **(extra or {})}
        (tmp / "progress.json").write_text(json.dumps(info, indent=1, default=str))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


@dataclass
class SavedState:
    """A state folder read back (tensors on the CPU)."""

    folder: Path
    progress: Progress
    info: dict[str, Any]
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] | None


def read_progress(folder: str | os.PathLike) -> tuple[Progress, dict[str, Any]]:
    """The progress and the whole ``progress.json`` of a state folder (checks it is one)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise StateError(f"--resume {folder}: not a folder (a state folder is <output_name>-...-state)")
    missing = [name for name in STATE_FILES if not (folder / name).exists()]
    if missing:
        raise StateError(f"--resume {folder}: not a training state of this trainer; missing {', '.join(missing)}"
                         + (" (musubi-tuner's accelerate states cannot be resumed here)"
                            if (folder / "random_states_0.pkl").exists() else ""))
    try:
        info = json.loads((folder / "progress.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StateError(f"--resume {folder}: progress.json unreadable ({exc})") from None
    if info.get("format") != STATE_FORMAT or info.get("version") != STATE_VERSION:
        raise StateError(f"--resume {folder}: format {info.get('format')!r} version {info.get('version')!r}, "
                         f"expected {STATE_FORMAT!r} version {STATE_VERSION}")
    keys = ("step", "epoch", "position", "seed", "recent_losses")
    return Progress(**{k: info[k] for k in keys if k in info}), info


def load_state(folder: str | os.PathLike) -> SavedState:
    """Reads a state folder written by :func:`save_state`."""
    folder = Path(folder)
    progress, info = read_progress(folder)
    try:
        def read(name: str) -> Any:
            return torch.load(folder / name, map_location="cpu", weights_only=True)
        scaler = read("scaler.pt") if (folder / "scaler.pt").exists() else None
        return SavedState(folder, progress, info, load_file(str(folder / "lora.safetensors")), read("optimizer.pt"),
                          read("scheduler.pt"), read("rng.pt"), scaler)
    except (OSError, RuntimeError, ValueError) as exc:
        raise StateError(f"--resume {folder}: cannot read the state ({exc})") from None
