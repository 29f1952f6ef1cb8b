"""The LoRA training loop: musubi-tuner's ``wan_train_network.py`` behaviour, read top to bottom.

:meth:`Trainer.setup` turns a :class:`~wan.train.config.TrainConfig` into a run: the DiT(s) loaded and
frozen, the :class:`~wan.train.network.LoraNetwork` attached (with gradient checkpointing, from outside),
the batches of the dataset's caches, the optimizer and its schedule, and a resumed state if asked.
:meth:`Trainer.train` is the loop; one optimizer step is::

    for each batch of the accumulation group:
        noise ~ N(0, 1); sigmas, timesteps = sample_sigmas(...)          (two experts: sample_for_expert)
        x_t = (1 - sigma) x0 + sigma noise                                 (TI2V: latent frame 0 stays x0)
        pred = DiT(x_t, timesteps, context, clip_fea, y)                  (the expert the timesteps pick)
        loss = mean(weighting * (pred - (noise - x0))**2) / accumulation; loss.backward()
    clip the LoRA's gradient norm; optimizer.step(); scheduler.step(); zero the gradients

then logging, saves (every N steps / epochs, keeping the last N), and the sample hook. Noise and
timesteps come from one CPU generator seeded by ``--seed``, the batch order from (seed, epoch): a run
saved with ``--save_state`` and resumed continues bit for bit on the CPU.

Several processes (``torchrun --nproc_per_node N wgp.py train ...``, or ``accelerate launch --multi_gpu``):
each trains on its part of every global batch of ``batch_size * N`` items, draws the noise and timesteps
of the whole global batch from the shared generator and keeps its items' rows, and the LoRA gradients are
summed over the processes at each optimizer step, each weighted by its share of the batch: the run makes
the steps one process makes with ``batch_size * N``. Rank 0 writes files and logs. See
:mod:`wan.train.distributed` (the helpers), and for the parts of a run: :mod:`wan.train.memory` (estimate,
out of memory), :mod:`wan.train.checkpointing` (gradient checkpointing), :mod:`wan.train.logs`.

Wan 2.2 A14B: both experts are loaded and share one LoRA (the network is attached to both); each
batch's first timestep picks the expert and the other items are redrawn onto the same side of
``--timestep_boundary`` (musubi). ``--offload_inactive_dit`` keeps the idle expert in CPU memory. With one
``--dit`` only, that one DiT trains (limit it to its expert's range with ``--min_timestep``/``--max_timestep``).

Extension point: :meth:`Trainer.sample` is the sample hook (musubi's rules for when; it calls the
``sampler`` given to the trainer).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from wan.engine.attach import attach_job
from wan.models.dit import compute_dtype
from wan.train import checkpoints as ckpt
from wan.train.checkpointing import GradientCheckpointing, offload_activations
from wan.train.config import TrainConfig, check_for_training
from wan.train.data import Batch, BatchSource, CacheBatches, for_rank
from wan.train.dits import AUTOCAST_DTYPES, SINGLE, conditioning, expert_boundary, load_dits, resolve_dit_files
from wan.train.distributed import ProcessGroup
from wan.train.errors import TrainingError, TrainingOutOfMemory
from wan.train.logs import StepReport, TrainLog, tensorboard_dir
from wan.train.loss import flow_loss, flow_target, noisy_input, ti2v_token_timesteps
from wan.train.lora_save import lora_folder, modelspec_metadata, save_network, training_metadata
from wan.train.memory import device_note, memory_estimate, out_of_memory
from wan.train.network import LoraNetwork
from wan.train.optimizers import build_optimizer, build_scheduler, check_optimizer
from wan.train.timesteps import (BucketPool, TimestepSample, loss_weighting, sample_for_expert, sample_sigmas,
                                 weighting_sigmas)

SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- the trainer


@dataclass
class TrainResult:
    """What a run did: optimizer steps done, the epoch it stopped in (the next one when it stopped at an
    epoch's end), the files written at the end (None when stopped early), the loss of each step (mean over
    its accumulated batches) and the batches each expert trained on."""

    step: int
    epoch: int
    lora_path: Path | None
    state_path: Path | None
    losses: list[float] = field(default_factory=list)
    expert_batches: dict[str, int] = field(default_factory=dict)


def should_sample(cfg: TrainConfig, step: int, epoch: int | None) -> bool:
    """musubi's ``should_sample_images``: step 0 with --sample_at_first; else every N steps or epochs."""
    if step == 0 and epoch in (None, 0):
        return cfg.sample_at_first
    by_steps = epoch is None and cfg.sample_every_n_steps is not None and step % cfg.sample_every_n_steps == 0
    by_epochs = cfg.sample_every_n_epochs is not None and epoch is not None and epoch % cfg.sample_every_n_epochs == 0
    return by_steps or by_epochs


class Trainer:
    """One LoRA training run (see the module docstring).

    Args:
        config: the settings (checked with :func:`check_for_training` unless ``dits`` and ``data`` are given).
        dits: expert -> DiT to train on instead of loading (``transformer``, or ``high_noise``/``low_noise``).
        data: a :class:`~wan.train.data.BatchSource` instead of the dataset config's caches.
        sampler: ``sampler(trainer, step, epoch)`` makes sample videos (the sample hook; see :meth:`sample`).
        say: where messages go (one line each).
        progress: show a tqdm progress bar.
    """

    def __init__(self, config: TrainConfig, *, dits: Mapping[str, nn.Module] | None = None,
                 data: BatchSource | None = None, sampler: Callable[[Trainer, int, int | None], None] | None = None,
                 say: Callable[[str], None] = print, progress: bool = True):
        self.cfg, self.sampler, self.say, self.show_progress = config, sampler, say, progress
        self._given_dits, self._given_data = dict(dits) if dits else None, data
        self._stack = contextlib.ExitStack()
        self.ready = False

    # -- setup --------------------------------------------------------------------------------

    def setup(self) -> Trainer:
        """Loads and builds everything the loop needs (see the module docstring); returns self. On an error
        nothing stays attached to the DiTs."""
        try:
            return self._setup()
        except BaseException:
            self._stack.close()
            raise

    def _setup(self) -> Trainer:
        cfg = self.cfg
        if self._given_dits is None or self._given_data is None:
            check_for_training(cfg)
        if cfg.sample_prompts and self.sampler is None:
            from wan.train.samples import TrainingSampler
            self.sampler = TrainingSampler(cfg, say=self.say)  # reads and checks the prompt file before any model loads
        tb_dir = tensorboard_dir(cfg)  # before loading: a missing package fails fast
        # one process, or this rank of a torchrun / accelerate launch (left on every exit: see close)
        self.group = ProcessGroup.join(cfg.device)
        self._stack.callback(self.group.close)
        self.device = self.group.device
        if not self.group.is_main:
            self.say = _silent  # rank 0 reports; errors still raise on every rank
        for flag in ("max_data_loader_n_workers", "persistent_data_loader_workers"):
            if getattr(cfg, flag):
                self.say(f"--{flag}: caches are read in the training process; the setting has no effect")
        if self.device.type == "cuda" and cfg.cuda_allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cuda" and cfg.cuda_cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        check_optimizer(cfg.optimizer_type, cfg.optimizer_kwargs, cfg.lr_warmup_steps, self.device)

        resumed = ckpt.load_state(cfg.resume) if cfg.resume else None
        seed = resumed.progress.seed if resumed else cfg.seed
        self.seed = seed if seed is not None else self.group.broadcast_int(random.randint(0, 2 ** 32 - 1))
        if resumed and cfg.seed is not None and cfg.seed != self.seed:
            self.say(f"--seed {cfg.seed} is replaced by the resumed state's seed {self.seed}")
        _seed_everything(self.seed)

        data = self._given_data or CacheBatches(_load_dataset(cfg), self.seed, self.group.rank, self.group.world_size)
        self.data = for_rank(data, self.group.rank, self.group.world_size)
        if self._given_dits is not None:
            self.spec, self.experts, self.paths = None, self._given_dits, {}
        else:
            if self.sampler is not None and self.group.is_main and hasattr(self.sampler, "prepare"):
                self.sampler.prepare(self.device)  # the prompts are encoded before the DiT takes the memory
            self.spec, self.experts, self.paths = load_dits(cfg, self.device, self.say)
        self.dit_cfg = next(iter(self.experts.values())).config
        self.ti2v = self.dit_cfg.model_type == "ti2v"
        self.boundary = expert_boundary(cfg, self.experts, self.spec, self.say)
        self.active = "low_noise" if len(self.experts) == 2 else SINGLE

        self.network = LoraNetwork(next(iter(self.experts.values())), cfg.network_dim, cfg.network_alpha,
                                   cfg.network_dropout, **cfg.network_kwargs)
        parts = [self.network, GradientCheckpointing() if cfg.gradient_checkpointing else None]
        for line in self._stack.enter_context(attach_job(self.experts, parts)):
            self.say(line)
        if cfg.network_weights:
            for line in self.network.load_weights(cfg.network_weights).notices():
                self.say(line)
        self.network.to(self.device).train()
        self.group.seed_rank(self.seed)  # after the network is built: LoRA dropout differs per rank

        params, self.lr_names = self.network.prepare_optimizer_params(unet_lr=cfg.learning_rate)
        self.choice = build_optimizer(cfg.optimizer_type, params, cfg.learning_rate, cfg.optimizer_kwargs,
                                      lr_scheduler=cfg.lr_scheduler, device=self.device)
        for line in self.choice.notes:
            self.say(line)
        self.optimizer = self.choice.optimizer
        self.batches_per_epoch = len(self.data)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / cfg.gradient_accumulation_steps)
        self.max_steps = (cfg.max_train_epochs * self.steps_per_epoch if cfg.max_train_epochs
                          else cfg.max_train_steps)
        self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        self.scheduler = build_scheduler(self.choice, cfg.lr_scheduler, num_training_steps=self.max_steps,
                                         lr_warmup_steps=cfg.lr_warmup_steps,
                                         num_cycles=cfg.lr_scheduler_num_cycles, power=cfg.lr_scheduler_power)
        self.autocast = AUTOCAST_DTYPES.get(cfg.precision)
        self.scaler = (torch.amp.GradScaler("cuda") if cfg.precision == "fp16" and self.device.type == "cuda"
                       else None)

        self.generator = torch.Generator().manual_seed(self.seed)
        buckets = cfg.timestep.num_timestep_buckets
        self.pool = BucketPool(buckets) if buckets and buckets > 1 else None
        self.progress = ckpt.Progress(seed=self.seed)
        if resumed:
            self._restore(resumed)
        self.group.broadcast_module(self.network)  # every rank starts from rank 0's LoRA, as DDP does
        self.recent = deque(self.progress.recent_losses, maxlen=self.steps_per_epoch)
        self.expert_batches: Counter[str] = Counter()
        self.session_id, self.started_at = uuid.uuid4().int % 2 ** 32, time.time()
        out = Path(cfg.output_dir) if cfg.output_dir and self.group.is_main else None
        self.log = TrainLog(out / f"{cfg.output_name}.log.jsonl", tb_dir) if out and cfg.output_name else None
        if self.log:
            self._stack.callback(self.log.close)
        for line in self.data.describe() + self._plan_lines():
            self.say(line)
        self.ready = True
        return self

    def _plan_lines(self) -> list[str]:
        cfg = self.cfg
        dtype = self.autocast or compute_dtype(next(iter(self.experts.values())).blocks[0].ffn[0])
        act = torch.finfo(dtype).bits // 8
        lines = memory_estimate(self.experts, self.network, self.choice.name, self.data.largest_latent_shape, act,
                                cfg.gradient_checkpointing, self.device, cfg.offload_inactive_dit)
        lines += device_note(self.device)
        lines.append(f"training: {self.max_steps} steps, {self.num_epochs} epoch(s) of {self.steps_per_epoch} "
                     f"steps, {self.choice.name}, lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), seed {self.seed}, "
                     f"{self.group.describe()}" + (f", from step {self.progress.step}" if self.progress.step else ""))
        if self.boundary is not None:
            lines.append(f"two experts share one LoRA: high noise at timesteps >= {self.boundary * 1000:g}")
        return lines

    def _restore(self, state: ckpt.SavedState) -> None:
        try:
            self.network.load_state_dict(state.lora)
        except RuntimeError as exc:
            raise ckpt.StateError(f"--resume {state.folder}: the LoRA in the state does not fit this network "
                                  f"(other --network_dim or network_args?): {str(exc).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state.optimizer)
        self.scheduler.load_state_dict(state.scheduler)
        if self.scaler is not None and state.scaler is not None:
            self.scaler.load_state_dict(state.scaler)
        left = ckpt.restore_rng(state.rng, self.generator)
        if not self.group.restore_rank_states(state.rng.get("ranks"), self.seed, state.progress.step):
            self.say("--resume: the state was saved by another number of processes; each rank's own generator "
                     "(LoRA dropout) is reseeded, the noise and timesteps continue as saved")
        if self.pool is not None and left is not None:
            self.pool._left = list(left)
        saved_batches = state.info.get("batches_per_epoch")
        if saved_batches is not None and saved_batches != self.batches_per_epoch:
            self.say(f"--resume: the dataset now has {self.batches_per_epoch} batches per epoch, the state was saved "
                     f"with {saved_batches}: the batch order differs from the interrupted run")
        self.progress = state.progress.normalised(self.batches_per_epoch)
        self.say(f"resumed from {state.folder}: step {self.progress.step}, epoch {self.progress.epoch}")

    # -- one step -----------------------------------------------------------------------------

    def draw(self, batch: Batch) -> tuple[TimestepSample, str]:
        """Noise levels for a batch and the expert they belong to. With several processes they are drawn for
        the whole global batch (the same on every rank) and this rank keeps its items' part."""
        shape = (batch.total, *batch.latents.shape[1:])
        if self.boundary is None:
            sample = sample_sigmas(self.cfg.timestep, batch.total, self.generator, shape, self.pool)
            expert = self.active
        else:
            sample, high = sample_for_expert(self.cfg.timestep, batch.total, self.boundary, self.generator, shape,
                                             self.pool)
            expert = "high_noise" if high else "low_noise"
        if batch.total != len(batch):
            part = slice(batch.offset, batch.offset + len(batch))
            sample = TimestepSample(sample.sigmas[part], sample.timesteps[part])
        return sample, expert

    def draw_noise(self, batch: Batch) -> torch.Tensor:
        """N(0, 1) noise for the batch's latents (CPU, float32): drawn for the whole global batch, this rank's rows."""
        noise = torch.randn((batch.total, *batch.latents.shape[1:]), generator=self.generator)
        return noise if batch.total == len(batch) else noise[batch.offset:batch.offset + len(batch)].clone()

    def activate(self, expert: str) -> nn.Module:
        """The DiT of ``expert``; with --offload_inactive_dit on a GPU, the other one goes to CPU memory."""
        if expert != self.active and self.cfg.offload_inactive_dit and self.device.type == "cuda":
            self.experts[self.active].to("cpu")
            self.experts[expert].to(self.device)
        self.active = expert
        return self.experts[expert]

    def forward_loss(self, batch: Batch, noise: torch.Tensor | None = None,
                     sample: TimestepSample | None = None, expert: str | None = None) -> tuple[torch.Tensor, str]:
        """The flow-matching loss of one batch (mean over its items, before accumulation scaling) and the expert
        used. ``noise``/``sample`` replace the draws (tests, evaluation); ``expert`` then picks the DiT. A rank's
        empty part of a global batch draws (keeping the shared generator in step) and gives a loss of 0."""
        if noise is None:
            noise = self.draw_noise(batch)
        if sample is None:
            sample, expert = self.draw(batch)
        expert = expert or self.active
        if len(batch) == 0:
            return torch.zeros((), device=self.device), expert
        x0 = batch.latents.to(self.device, torch.float32)
        dit, dit_cfg = self.activate(expert), self.experts[expert].config
        clean_first = self.ti2v and x0.shape[2] > 1  # TI2V: the first latent frame is the clean image
        noise = noise.to(self.device, torch.float32)
        x_t = noisy_input(x0, noise, sample.sigmas.to(self.device), first_frame_clean=clean_first)
        timesteps = sample.timesteps.to(self.device)
        if clean_first:
            timesteps = ti2v_token_timesteps(timesteps, x0.shape, dit_cfg.patch_size)
        kwargs = conditioning(batch, dit_cfg, self.device)
        context = batch.context(self.device)
        weighting = None
        if self.cfg.timestep.weighting_scheme in ("sigma_sqrt", "cosmap"):
            weighting = loss_weighting(self.cfg.timestep, weighting_sigmas(sample.timesteps)).to(self.device)
        with self._autocast(), offload_activations(self.cfg.gradient_checkpointing_cpu_offload, self.device):
            pred = dit(x_t, timesteps, context, **kwargs)
        loss = flow_loss(pred, flow_target(x0, noise), weighting, first_frame_clean=clean_first)
        return loss, expert

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def backward(self, loss: torch.Tensor, share: float = 1.0) -> None:
        """Gradients of ``loss * share / gradient_accumulation_steps`` (accelerate's scaling, as musubi).
        ``share``: this rank's part of the global batch (``len(batch) / batch.total``), so that the gradients
        summed over the ranks are those of the global batch's mean loss."""
        if share != 1.0:
            loss = loss * share
        loss = loss / self.cfg.gradient_accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> float | None:
        """Sum the LoRA's gradients over the processes (several only), clip their norm (``--max_grad_norm``),
        step the optimizer and the schedule, zero the gradients. Returns the gradient norm before clipping
        (None without clipping). Every rank then holds the same LoRA."""
        self.group.sum_gradients(self.network.parameters())
        norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(self.network.get_trainable_params(), self.cfg.max_grad_norm))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    # -- the loop -----------------------------------------------------------------------------

    def train(self, until_step: int | None = None) -> TrainResult:
        """Trains to ``max_train_steps`` (or stops after ``until_step``, e.g. to pause), saving as configured.
        An out-of-memory error is raised again as :class:`TrainingOutOfMemory` naming the flags that help."""
        if not self.ready:
            self.setup()
        from wan.engine.out_of_memory import GenerationOutOfMemory  # a sample's generation ran out
        try:
            return self._loop(until_step)
        except (torch.cuda.OutOfMemoryError, MemoryError, GenerationOutOfMemory) as exc:
            raise out_of_memory(exc, self.device) from exc

    def _loop(self, until_step: int | None) -> TrainResult:
        cfg, p = self.cfg, self.progress
        stop = min(self.max_steps, until_step) if until_step is not None else self.max_steps
        self.report = StepReport(self.log, self.show_progress and self.group.is_main, self.max_steps, p.step)
        losses: list[float] = []
        if p.step == 0:
            self._sample_point(0, 0)
        self.choice.train_mode()
        try:
            while p.step < stop:
                accumulated: list[float] = []  # this rank's share of each batch's loss
                for batch in self.data.batches(p.epoch, p.position):
                    loss, expert = self.forward_loss(batch)
                    share = len(batch) / batch.total  # 1 with one process
                    if len(batch):
                        self.backward(loss, share)
                    accumulated.append(float(loss.detach()) * share)
                    self.expert_batches[expert] += 1
                    p.position += 1
                    if p.position % cfg.gradient_accumulation_steps and p.position < self.batches_per_epoch:
                        continue  # accumulate; the epoch's last batch always steps (accelerate's rule)
                    norm = self.optimizer_step()
                    p.step += 1
                    losses.append(self.group.sum_float(sum(accumulated)) / len(accumulated))
                    self._after_step(losses[-1], norm, expert)
                    accumulated = []
                    if p.step >= stop:
                        break
                if p.position >= self.batches_per_epoch:
                    self._end_epoch()
        finally:
            self.report.close_bar()
        lora_path = state_path = None
        if p.step >= self.max_steps:
            lora_path, state_path = self._save_final()
        return TrainResult(p.step, p.epoch, lora_path, state_path, losses, dict(self.expert_batches))

    def _after_step(self, loss: float, norm: float | None, expert: str) -> None:
        cfg, p = self.cfg, self.progress
        self.recent.append(loss)
        lrs = {name: float(lr) for name, lr in zip(self.lr_names, self.scheduler.get_last_lr())}
        record = {"step": p.step, "epoch": p.epoch, "loss": loss, "avr_loss": sum(self.recent) / len(self.recent),
                  "lr": lrs, "time": round(time.time() - self.started_at, 3)}
        if len(self.experts) == 2:
            record["expert"] = expert
        if norm is not None:
            record["grad_norm"] = norm
        if self.device.type == "cuda":  # the peak since the run began, as musubi-tuner's logs show it
            record["vram_peak_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        self.report.step(record)
        every = cfg.save_every_n_steps
        if every and p.step % every == 0:
            self._save(ckpt.step_name(cfg.output_name, p.step), None, ckpt.step_name,
                       ckpt.step_to_remove(p.step, every, cfg.save_last_n_steps),
                       ckpt.step_to_remove(p.step, every, cfg.save_last_n_steps_state or cfg.save_last_n_steps))
        self._sample_point(p.step, None)

    def _end_epoch(self) -> None:
        cfg, p = self.cfg, self.progress
        epoch, every = p.epoch, cfg.save_every_n_epochs
        p.epoch, p.position = epoch + 1, 0
        if every and epoch % every == 0 and epoch < self.num_epochs:
            self._save(ckpt.epoch_name(cfg.output_name, epoch), epoch, ckpt.epoch_name,
                       ckpt.epoch_to_remove(epoch, every, cfg.save_last_n_epochs),
                       ckpt.epoch_to_remove(epoch, every, cfg.save_last_n_epochs_state or cfg.save_last_n_epochs))
        self._sample_point(p.step, epoch)

    def _save_final(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        lora, state = self._save(cfg.output_name, self.num_epochs, ckpt.epoch_name, None, None,
                                 with_state=cfg.save_state or cfg.save_state_on_train_end, then_train=False)
        self.say(f"saved {lora}")
        return lora, state

    def _save(self, base: str, epoch: int | None, naming: Callable[[str, int], str], old_lora: int | None,
              old_state: int | None, *, with_state: bool | None = None,
              then_train: bool = True) -> tuple[Path, Path | None]:
        """A save point, reached by every rank: rank 0 writes the LoRA ``<base>.safetensors`` (and the state
        ``<base>-state`` with ``--save_state``) and removes the saves ``old_lora`` / ``old_state`` (numbers
        named by ``naming``) that retention lets go; the others wait at a barrier. Returns the paths."""
        with_state = self.cfg.save_state if with_state is None else with_state
        self.choice.eval_mode()
        ranks = self.group.rank_states() if with_state else None  # every rank's own generator (collective)
        out = Path(self.cfg.output_dir)
        if self.group.is_main:
            self.save_lora(ckpt.lora_file(base), epoch=epoch)
            self._remove(old_lora, naming, lora=True)
            if with_state:
                self.save_state(ckpt.state_folder(base), ranks)
                self._remove(old_state, naming, lora=False)
        self.group.barrier()
        if then_train:
            self.choice.train_mode()
        return (lora_folder(out, self.spec) / ckpt.lora_file(base),
                out / ckpt.state_folder(base) if with_state else None)

    def _sample_point(self, step: int, epoch: int | None) -> None:
        """The sample hook (:meth:`sample`) when musubi's rules say so: on rank 0 only, the other ranks
        waiting at a barrier (sampling restores every random state, so the ranks stay in step)."""
        if self.sampler is None or not should_sample(self.cfg, step, epoch):
            return
        if self.group.is_main:
            self.sample(step, epoch)
        self.group.barrier()

    # -- saving -------------------------------------------------------------------------------

    def save_lora(self, name: str, epoch: int | None = None) -> Path:
        """Writes the LoRA to ``output_dir/name`` with musubi's metadata."""
        cfg = self.cfg
        path = lora_folder(cfg.output_dir, self.spec) / name
        save_network(self.network, path, save_format=cfg.save_format, dtype=SAVE_DTYPES[cfg.save_precision],
                     metadata=self.metadata(epoch))
        return path

    def metadata(self, epoch: int | None = None) -> dict[str, str]:
        """The ``ss_*`` and ``modelspec.*`` metadata of a save (musubi's keys)."""
        cfg, ts = self.cfg, self.cfg.timestep
        training = {
            "session_id": self.session_id, "training_started_at": self.started_at, "output_name": cfg.output_name,
            "learning_rate": cfg.learning_rate, "num_train_items": self.data.num_items,
            "num_batches_per_epoch": self.batches_per_epoch, "num_epochs": self.num_epochs,
            "gradient_checkpointing": cfg.gradient_checkpointing,
            "gradient_checkpointing_cpu_offload": cfg.gradient_checkpointing_cpu_offload,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "max_train_steps": self.max_steps,
            "lr_warmup_steps": cfg.lr_warmup_steps, "lr_scheduler": cfg.lr_scheduler,
            "mixed_precision": cfg.precision, "seed": self.seed, "training_comment": cfg.training_comment,
            "optimizer": self.choice.name + (f"({self.choice.args})" if self.choice.args else ""),
            "max_grad_norm": cfg.max_grad_norm, "fp8_base": cfg.fp8_base, "full_fp16": False, "full_bf16": False,
            "weighting_scheme": ts.weighting_scheme, "logit_mean": ts.logit_mean, "logit_std": ts.logit_std,
            "mode_scale": ts.mode_scale, "guidance_scale": 1.0, "timestep_sampling": ts.timestep_sampling,
            "sigmoid_scale": ts.sigmoid_scale, "discrete_flow_shift": ts.discrete_flow_shift,
            "datasets": self._datasets_metadata(), "training_finished_at": time.time(),
            "steps": self.progress.step, "epoch": epoch if epoch is not None else self.progress.epoch,
        }
        network_args = dict(item.split("=", 1) for item in cfg.network_args) if cfg.network_args else None
        meta = training_metadata(self.network, training, dit_path=self.paths.get(SINGLE, self.paths.get("low_noise")),
                                 vae_path=cfg.vae, network_args=network_args, minimal=cfg.no_metadata)
        ts_range = None
        if ts.min_timestep is not None or ts.max_timestep is not None:
            ts_range = ts.timestep_range
        meta.update(modelspec_metadata(title=cfg.metadata_title or cfg.output_name, timestamp=time.time(),
                                       resolution=cfg.metadata_reso, author=cfg.metadata_author,
                                       description=cfg.metadata_description, license=cfg.metadata_license,
                                       tags=cfg.metadata_tags, timestep_range=ts_range,
                                       architecture=cfg.metadata_arch))
        return meta

    def _datasets_metadata(self) -> list[dict]:
        datasets = getattr(self.data, "datasets", [])
        return [{"resolution": list(d.blueprint.resolution), "caption_extension": d.blueprint.caption_extension,
                 "batch_size_per_device": d.blueprint.batch_size, "num_repeats": d.blueprint.num_repeats,
                 "enable_bucket": d.blueprint.enable_bucket, "bucket_no_upscale": d.blueprint.bucket_no_upscale}
                for d in datasets]

    def save_state(self, name: str, ranks: list[dict] | None = None) -> Path:
        """Writes the training state folder ``output_dir/name`` (see :mod:`wan.train.checkpoints`);
        ``ranks``: every rank's torch generator states (several processes; see ProcessGroup.rank_states)."""
        p = self.progress
        p.recent_losses = list(self.recent)
        rng = ckpt.capture_rng(self.generator, None if self.pool is None else self.pool._left)
        if ranks is not None:
            rng["ranks"] = ranks
        return ckpt.save_state(Path(self.cfg.output_dir) / name, network=self.network, optimizer=self.optimizer,
                               scheduler=self.scheduler, rng=rng, progress=p, settings=self.cfg.to_flat(),
                               scaler=self.scaler, extra={"batches_per_epoch": self.batches_per_epoch})

    def _remove(self, number: int | None, naming: Callable[[str, int], str], *, lora: bool) -> None:
        if number is None:
            return
        base = naming(self.cfg.output_name, number)
        out = Path(self.cfg.output_dir)
        target = lora_folder(out, self.spec) / ckpt.lora_file(base) if lora else out / ckpt.state_folder(base)
        if lora and target.is_file():
            target.unlink()
        elif not lora and target.is_dir():
            import shutil
            shutil.rmtree(target)

    # -- samples --------------------------------------------------------------------------------

    def sample(self, step: int, epoch: int | None) -> None:
        """The sample hook, at step 0 (``--sample_at_first``), every N steps and at epoch ends, by musubi's
        rules (:func:`should_sample`). It calls the trainer's ``sampler`` (``--sample_prompts``: a
        :class:`wan.train.samples.TrainingSampler`, which generates through the engine on these DiTs with the
        LoRA as it is now) with the optimizer and the LoRA in eval mode, and restores train mode, the LoRA's
        multiplier and every random state afterwards, so that sampling never changes the training run."""
        if self.sampler is None or not should_sample(self.cfg, step, epoch):
            return
        rng = ckpt.capture_rng(self.generator, None)
        self.choice.eval_mode()
        was_training, multiplier = self.network.training, self.network.multiplier
        try:
            self.network.eval()
            with torch.no_grad():
                self.sampler(self, step, epoch)
        finally:
            self.network.set_multiplier(multiplier)
            self.network.train(was_training)
            self.choice.train_mode()
            ckpt.restore_rng(rng, self.generator)

    # -- running and closing --------------------------------------------------------------------

    def run(self) -> TrainResult:
        """setup, train, close."""
        try:
            self.setup()
            return self.train()
        finally:
            self.close()

    def close(self) -> None:
        """Detaches the LoRA (and checkpointing) from the DiTs, closes the log and, when this run joined a
        launch of several processes, leaves its process group. :meth:`run` calls it in a ``finally``: at
        the end, on an error and on Ctrl-C."""
        self._stack.close()
        self.ready = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _silent(line: str) -> None:
    """Where the messages of ranks other than 0 go."""


def _seed_everything(seed: int) -> None:
    """torch (CPU and CUDA), Python and numpy seeded as accelerate's ``set_seed`` does."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _load_dataset(cfg: TrainConfig):
    from wan.train.dataset_config import load_dataset_config
    return load_dataset_config(cfg.dataset_config)


def show_timesteps(cfg: TrainConfig, say: Callable[[str], None] = print, samples: int = 100_000) -> Path | None:
    """``--show_timesteps``: the distribution of the timesteps the settings draw (and the loss weighting),
    as a PNG in ``--output_dir`` (image) or a text histogram (console)."""
    from wan.train.timesteps import timestep_counts, timestep_histogram
    generator = torch.Generator().manual_seed(cfg.seed or 0)
    if cfg.show_timesteps == "image":
        path = Path(cfg.output_dir or ".") / f"{cfg.output_name or 'timesteps'}-timesteps.png"
        timestep_histogram(cfg.timestep, samples, path, generator)
        say(f"timestep distribution written to {path}")
        return path
    counts = timestep_counts(cfg.timestep, samples, generator).view(20, 50).sum(1)
    top = int(counts.max()) or 1
    for i, n in enumerate(counts.tolist()):
        say(f"{i * 50:4d}-{i * 50 + 49:4d} {'#' * round(50 * n / top):<50} {n / samples:6.2%}")
    return None


# re-exported: callers and tests import these from here
__all__ = ["Trainer", "TrainResult", "TrainingError", "TrainingOutOfMemory", "GradientCheckpointing", "TrainLog",
           "conditioning", "memory_estimate", "resolve_dit_files", "show_timesteps", "should_sample"]
