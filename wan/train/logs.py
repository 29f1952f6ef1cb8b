"""What a training run reports after each optimizer step: a progress bar, one JSON line per step (always,
next to the LoRA: ``<output_name>.log.jsonl``, appended on resume) and TensorBoard scalars when asked
(``--logging_dir``). With several processes only rank 0 reports (the trainer gives the others none)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from wan.train.config import TrainConfig, TrainConfigError


class TrainLog:
    """One JSON line per optimizer step (always, appended on resume), and TensorBoard scalars when asked."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self._file = path, open(path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(tensorboard_dir))

    def step(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            self._tb.add_scalar("loss/current", record["loss"], step)
            self._tb.add_scalar("loss/average", record["avr_loss"], step)
            for name, lr in record["lr"].items():
                self._tb.add_scalar(f"lr/{name}", lr, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def tensorboard_dir(cfg: TrainConfig) -> Path | None:
    """The TensorBoard run folder of ``--logging_dir`` (None without it); a missing package fails here, before
    anything loads."""
    if cfg.logging_dir is None:
        return None
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:  # torch.utils.tensorboard needs it
        raise TrainConfigError("--log_with tensorboard (or --logging_dir) needs the tensorboard package: "
                               "pip install tensorboard")
    return Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}" / "network_train"


class StepReport:
    """The progress bar (tqdm, when ``show``) and the :class:`TrainLog` (when given), fed one record per step.

    A record: ``step``, ``epoch``, ``loss`` (the step's, mean over its accumulated batches and over all
    processes), ``avr_loss`` (mean of the recent steps), ``lr`` (group name -> rate), ``time`` (seconds since
    the start), and ``expert`` (two experts) and ``grad_norm`` (with clipping) when they apply."""

    def __init__(self, log: TrainLog | None, show: bool, total: int, initial: int):
        self.log, self.bar = log, None
        if show:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, desc="steps", smoothing=0)

    def step(self, record: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", avr_loss=f"{record['avr_loss']:.4f}",
                                 lr=" ".join(f"{v:.2e}" for v in record["lr"].values()))
        if self.log is not None:
            self.log.step(record)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
