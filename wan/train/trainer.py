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

Wan 2.2 A14B: both experts are loaded and share one LoRA (the network is attached to both); each
batch's first timestep picks the expert and the other items are redrawn onto the same side of
``--timestep_boundary`` (musubi). ``--offload_inactive_dit`` keeps the idle expert in CPU memory. With one
``--dit`` only, that one DiT trains (limit it to its expert's range with ``--min_timestep``/``--max_timestep``).

Extension points for what comes later: :meth:`Trainer.sample` is the sample hook (musubi's rules for
when; it calls the ``sampler`` given to the trainer); :meth:`Trainer._parallel` is where the DiTs will be
wrapped for data parallelism (DDP) and :meth:`Trainer._all_reduce` where gradients will be averaged.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from wan.engine.attach import attach_job
from wan.models.dit import compute_dtype
from wan.optim.planner import GiB, gb
from wan.train import checkpoints as ckpt
from wan.train.config import TrainConfig, TrainConfigError, check_for_training
from wan.train.data import Batch, BatchSource, CacheBatches, DataError
from wan.train.loss import flow_loss, flow_target, noisy_input, ti2v_token_timesteps
from wan.train.lora_save import modelspec_metadata, save_network, training_metadata
from wan.train.network import LoraNetwork
from wan.train.optimizers import build_optimizer, build_scheduler, check_optimizer
from wan.train.timesteps import (BucketPool, TimestepSample, loss_weighting, sample_for_expert, sample_sigmas,
                                 weighting_sigmas)

SINGLE = "transformer"
EXPERTS = ("high_noise", "low_noise")
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp32": torch.float32, "fp16": torch.float16,
               "bf16": torch.bfloat16}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OOM_ADVICE = ("--gradient_checkpointing (and --gradient_checkpointing_cpu_offload), --fp8_base (with "
              "--fp8_scaled), --mixed_precision bf16, a smaller resolution or fewer frames in the dataset "
              "(re-cache), a smaller batch_size, --offload_inactive_dit for Wan 2.2 A14B; --blocks_to_swap "
              "will help once training supports it")


class TrainingError(RuntimeError):
    """A run failed for a reason that is not a bad setting (the message says what to do)."""


class TrainingOutOfMemory(TrainingError):
    """The device ran out of memory; the message names the flags that lower it."""


# ----------------------------------------------------------------------------- models


def resolve_dit_files(cfg: TrainConfig) -> tuple[Any, dict[str, str]]:
    """(registry spec or None, expert -> checkpoint path): ``transformer``, or ``high_noise`` and
    ``low_noise`` for a Wan 2.2 A14B pair. Registry files are fetched (TEST models are generated)."""
    from wan.loading.download import ensure_files
    from wan.registry import get_model
    if cfg.task and not cfg.model and not cfg.dit:
        raise TrainConfigError("--task: the command line maps musubi task names to registry models; in code, "
                               "give model= (a registry id) or dit=")
    spec = get_model(cfg.model) if cfg.model else None
    if cfg.dit and cfg.dit_high_noise:
        return spec, {"high_noise": cfg.dit_high_noise, "low_noise": cfg.dit}
    if cfg.dit:
        return spec, {SINGLE: cfg.dit}
    if spec is None:
        raise TrainConfigError("--dit: required: give --dit (a DiT checkpoint) or --model (a registry model)")
    variant = {"fp16": "fp16"}.get(cfg.precision, "bf16")
    paths = ensure_files(spec, cfg.checkpoint_dir, variant=variant, components=["transformer"])
    if spec.is_two_expert:
        files = {e: str(paths[f"transformer_{e}"]) for e in EXPERTS}
        if cfg.dit_high_noise:
            files["high_noise"] = cfg.dit_high_noise
        return spec, files
    if cfg.dit_high_noise:
        raise TrainConfigError(f"--dit_high_noise: model {spec.id} has one DiT, not two experts")
    return spec, {SINGLE: str(paths["transformer"])}


def conditioning(batch: Batch, dit_cfg: Any, device: torch.device) -> dict[str, torch.Tensor]:
    """The DiT's ``y`` and ``clip_fea`` for a batch, as musubi's ``call_dit`` builds them.

    ``in_dim`` tells what ``y`` is: latents only (t2v, TI2V); + 4 + C i2v/flf2v/Fun-InP (the cached
    ``latents_image``: first-frame mask and image latent); + 2C Fun-Control (control latents, then the
    image latent's first frame, zeros elsewhere or when there is none). CLIP features go to models with
    an image embedding (Wan 2.1 i2v, flf2v)."""
    c = batch.latents.shape[1]
    if c != dit_cfg.out_dim:
        raise DataError(f"the DiT predicts {dit_cfg.out_dim} latent channels; the caches of {batch.names[:3]} have {c} "
                        "(made with another model's VAE?)")
    extra, out = dit_cfg.in_dim - c, {}
    if extra == c + 4:
        if batch.image_latents is None:
            raise DataError(f"the DiT takes image conditioning (in_dim {dit_cfg.in_dim}); the caches of "
                                f"{batch.names[:3]} have no latents_image: cache them for i2v")
        out["y"] = batch.image_latents.to(device)
    elif extra == 2 * c:
        if batch.control_latents is None:
            raise DataError(f"the DiT is a Fun-Control model (in_dim {dit_cfg.in_dim}); the caches of "
                                f"{batch.names[:3]} have no latents_control")
        image = torch.zeros_like(batch.control_latents)
        if batch.image_latents is not None:
            image = batch.image_latents[:, 4:].clone()
            image[:, :, 1:] = 0
        out["y"] = torch.cat([batch.control_latents, image.to(batch.control_latents.dtype)], dim=1).to(device)
    elif extra != 0:
        raise DataError(f"the DiT takes {dit_cfg.in_dim} input channels; latents of {c} channels do not fit "
                            "(were the caches made with this model's VAE?)")
    if dit_cfg.image_dim:
        if batch.clip is not None:
            out["clip_fea"] = batch.clip.to(device)
        elif extra == c + 4 and dit_cfg.model_type in ("i2v", "flf2v"):
            raise DataError(f"the DiT takes CLIP features (Wan 2.1 i2v/flf2v); the caches of {batch.names[:3]} "
                                "have no clip_*: cache them with the CLIP model")
    return out


class GradientCheckpointing:
    """Recomputes each DiT block in the backward pass (``torch.utils.checkpoint``, non-reentrant), put
    on from outside the network by replacing each block's ``forward`` on the instance; detach restores it.
    Random draws inside a block (LoRA dropout) are replayed identically in the recomputation."""

    def __init__(self):
        self._blocks: list[nn.Module] = []

    def attach(self, networks: Mapping[str, nn.Module]) -> list[str]:
        from torch.utils.checkpoint import checkpoint
        for dit in networks.values():
            for name in ("blocks", "vace_blocks"):
                for block in getattr(dit, name, ()):
                    original = block.forward

                    def run(*args, _forward=original, **kwargs):
                        if not torch.is_grad_enabled():
                            return _forward(*args, **kwargs)
                        return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
                    block.forward = run
                    self._blocks.append(block)
        return [f"gradient checkpointing: {len(self._blocks)} blocks recomputed in the backward pass"]

    def detach(self, networks: Mapping[str, nn.Module]) -> None:
        for block in self._blocks:
            block.__dict__.pop("forward", None)
        self._blocks.clear()


def _size(n: float) -> str:
    return gb(n) if n >= GiB / 10 else f"{n / 2 ** 20:.1f} MB"


def memory_estimate(experts: Mapping[str, nn.Module], network: LoraNetwork, optimizer_name: str,
                    latent_shape: tuple[int, ...], activation_bytes: int, checkpointing: bool,
                    device: torch.device, offload_inactive: bool) -> list[str]:
    """A rough memory budget in words: weights, LoRA, its gradients and optimizer states, activations.

    Activations per DiT block and token are counted as (14 * dim + 2 * ffn_dim) values in the compute
    dtype plus 4 float32 copies of the residual stream; with gradient checkpointing only each block's
    float32 input is kept, plus one block's worth while it is recomputed."""
    dit = next(iter(experts.values()))
    weight_bytes = [sum(t.numel() * t.element_size() for t in [*d.parameters(), *d.buffers()])
                    for d in experts.values()]
    lora_params = sum(p.numel() for p in network.parameters())
    states = 0 if "sgd" in optimizer_name.lower() else 2
    states_bytes = lora_params * (2 if "8bit" in optimizer_name.lower() else 4 * states) if states else 0
    cfg = dit.config
    b, _, f, h, w = latent_shape if len(latent_shape) == 5 else (1, 0, 1, 1, 1)
    tokens = b * (f // cfg.patch_size[0]) * (h // cfg.patch_size[1]) * (w // cfg.patch_size[2])
    per_block = tokens * ((14 * cfg.dim + 2 * cfg.ffn_dim) * activation_bytes + 4 * cfg.dim * 4)
    blocks = len(dit.blocks)
    activations = tokens * cfg.dim * 4 * blocks + per_block if checkpointing else per_block * blocks
    resident = weight_bytes[:1] if offload_inactive and device.type == "cuda" else weight_bytes
    total = sum(resident) + lora_params * 8 + states_bytes + activations
    experts_words = " + ".join(_size(x) for x in weight_bytes)
    return [
        "memory estimate (rough):",
        f"  DiT weights: {experts_words}" + (" (the idle expert in CPU memory)" if len(resident) < len(weight_bytes)
                                             else ""),
        f"  LoRA: {lora_params / 1e6:.2f}M parameters, {_size(lora_params * 4)} + gradients {_size(lora_params * 4)} + "
        f"optimizer states {_size(states_bytes)}",
        f"  activations: ~{_size(activations)} for a batch of latents {list(latent_shape)} ({tokens} tokens)"
        + (", gradient checkpointing" if checkpointing else ", without gradient checkpointing"),
        f"  total on {device.type}: ~{_size(total)}",
    ]


# ----------------------------------------------------------------------------- logging


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


def _tensorboard_dir(cfg: TrainConfig) -> Path | None:
    if cfg.logging_dir is None:
        return None
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:  # torch.utils.tensorboard needs it
        raise TrainConfigError("--log_with tensorboard (or --logging_dir) needs the tensorboard package: "
                               "pip install tensorboard")
    return Path(cfg.logging_dir) / f"{cfg.log_prefix or ''}{time.strftime('%Y%m%d%H%M%S')}" / "network_train"


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
            raise TrainConfigError("--sample_prompts: sampling during training is not available yet; remove the "
                                   "flag (sample the saved LoRAs with: wgp.py generate --lora ...)")
        for flag in ("max_data_loader_n_workers", "persistent_data_loader_workers"):
            if getattr(cfg, flag):
                self.say(f"--{flag}: caches are read in the training process; the setting has no effect")
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and cfg.cuda_allow_tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        if self.device.type == "cuda" and cfg.cuda_cudnn_benchmark:
            torch.backends.cudnn.benchmark = True
        tb_dir = _tensorboard_dir(cfg)  # before loading: a missing package fails fast
        check_optimizer(cfg.optimizer_type, cfg.optimizer_kwargs, cfg.lr_warmup_steps, self.device)

        resumed = ckpt.load_state(cfg.resume) if cfg.resume else None
        self.seed = resumed.progress.seed if resumed else (cfg.seed if cfg.seed is not None
                                                           else random.randint(0, 2 ** 32 - 1))
        if resumed and cfg.seed is not None and cfg.seed != self.seed:
            self.say(f"--seed {cfg.seed} is replaced by the resumed state's seed {self.seed}")
        _seed_everything(self.seed)

        self.data = self._given_data or CacheBatches(_load_dataset(cfg), self.seed)
        self.spec, self.experts, self.paths = self._load_dits()
        self.dit_cfg = next(iter(self.experts.values())).config
        self.ti2v = self.dit_cfg.model_type == "ti2v"
        self.boundary = self._boundary()
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
        self.wrapped = {key: self._parallel(dit) for key, dit in self.experts.items()}

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
        self.recent = deque(self.progress.recent_losses, maxlen=self.steps_per_epoch)
        self.expert_batches: Counter[str] = Counter()
        self.session_id, self.started_at = uuid.uuid4().int % 2 ** 32, time.time()
        out = Path(cfg.output_dir) if cfg.output_dir else None
        self.log = TrainLog(out / f"{cfg.output_name}.log.jsonl", tb_dir) if out and cfg.output_name else None
        if self.log:
            self._stack.callback(self.log.close)
        for line in self.data.describe() + self._plan_lines():
            self.say(line)
        self.ready = True
        return self

    def _load_dits(self) -> tuple[Any, dict[str, nn.Module], dict[str, str]]:
        cfg = self.cfg
        if self._given_dits is not None:
            return None, self._given_dits, {}
        spec, paths = resolve_dit_files(cfg)
        import wan
        from wan.models.dit import WanDiT
        dtype = AUTOCAST_DTYPES.get(cfg.precision)  # None keeps the file's dtype, as musubi's dit_dtype
        experts = {}
        for key, path in paths.items():
            idle = cfg.offload_inactive_dit and key == "high_noise"  # musubi starts on the low-noise expert
            self.say(f"loading DiT {key}: {path}")
            # quantised in CPU memory first, so the device never holds the full-precision weights
            dit = wan.load_transformer(path, device="cpu" if idle or cfg.fp8_base else self.device, dtype=dtype,
                                       keep_fp8=cfg.fp8_base)
            if cfg.fp8_base:
                from wan.optim.quant import quantize_
                mode = "fp8_scaled" if cfg.fp8_scaled else "fp8"
                report = quantize_(dit, mode, keep=lambda n: not n.startswith("blocks.") or WanDiT.keep_in_fp32(n))
                self.say(f"--fp8_base: {report.summary()}")
                if not idle:
                    dit.to(self.device)
            experts[key] = dit.requires_grad_(False)
        if len(experts) == 2:
            a, b = (experts[e].config for e in EXPERTS)
            if a != b:
                raise TrainConfigError(f"--dit_high_noise: the two experts differ ({a} vs {b})")
        return spec, experts, paths

    def _boundary(self) -> float | None:
        cfg = self.cfg
        if len(self.experts) == 1:
            if cfg.timestep_boundary is not None:
                self.say("--timestep_boundary is used with two experts only (give --dit_high_noise too)")
            return None
        boundary = cfg.timestep_boundary
        if boundary is None:
            boundary = self.spec.defaults.boundary if self.spec is not None else None
        if boundary is None:
            raise TrainConfigError("--timestep_boundary: required to train two experts (the model gives none)")
        return boundary / 1000 if boundary > 1 else boundary

    def _parallel(self, dit: nn.Module) -> nn.Module:
        """The DiT as the loop calls it. Data-parallel training will wrap it here (DDP, one process per
        GPU); single-process training calls it as it is."""
        return dit

    def _plan_lines(self) -> list[str]:
        cfg = self.cfg
        dtype = self.autocast or compute_dtype(next(iter(self.experts.values())).blocks[0].ffn[0])
        act = torch.finfo(dtype).bits // 8
        lines = memory_estimate(self.experts, self.network, self.choice.name, self.data.largest_latent_shape, act,
                                cfg.gradient_checkpointing, self.device, cfg.offload_inactive_dit)
        if self.device.type == "cuda":
            total = torch.cuda.mem_get_info(self.device)[1]
            lines.append(f"  the GPU has {gb(total)}; if the estimate is near or above it, see "
                         "--gradient_checkpointing and --fp8_base")
        lines.append(f"training: {self.max_steps} steps, {self.num_epochs} epoch(s) of {self.steps_per_epoch} "
                     f"steps, {self.choice.name}, lr {cfg.learning_rate:g} ({cfg.lr_scheduler}), seed {self.seed}, "
                     f"{self.device}" + (f", from step {self.progress.step}" if self.progress.step else ""))
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
        """Noise levels for a batch and the expert they belong to."""
        shape = batch.latents.shape
        if self.boundary is None:
            return sample_sigmas(self.cfg.timestep, len(batch), self.generator, shape, self.pool), self.active
        sample, high = sample_for_expert(self.cfg.timestep, len(batch), self.boundary, self.generator, shape,
                                         self.pool)
        return sample, "high_noise" if high else "low_noise"

    def activate(self, expert: str) -> nn.Module:
        """The DiT of ``expert``; with --offload_inactive_dit on a GPU, the other one goes to CPU memory."""
        if expert != self.active and self.cfg.offload_inactive_dit and self.device.type == "cuda":
            self.experts[self.active].to("cpu")
            self.experts[expert].to(self.device)
        self.active = expert
        return self.wrapped[expert]

    def forward_loss(self, batch: Batch, noise: torch.Tensor | None = None,
                     sample: TimestepSample | None = None, expert: str | None = None) -> tuple[torch.Tensor, str]:
        """The flow-matching loss of one batch (before accumulation scaling) and the expert used.
        ``noise``/``sample`` replace the draws (tests, evaluation); ``expert`` then picks the DiT."""
        x0 = batch.latents.to(self.device, torch.float32)
        if noise is None:
            noise = torch.randn(x0.shape, generator=self.generator)
        if sample is None:
            sample, expert = self.draw(batch)
        expert = expert or self.active
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
        with self._autocast(), self._offload_activations():
            pred = dit(x_t, timesteps, context, **kwargs)
        loss = flow_loss(pred, flow_target(x0, noise), weighting, first_frame_clean=clean_first)
        return loss, expert

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def _offload_activations(self):
        if not self.cfg.gradient_checkpointing_cpu_offload:
            return contextlib.nullcontext()
        return torch.autograd.graph.save_on_cpu(pin_memory=self.device.type == "cuda")

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss / gradient_accumulation_steps`` (accelerate's scaling, as musubi)."""
        loss = loss / self.cfg.gradient_accumulation_steps
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def optimizer_step(self) -> float | None:
        """Clip the LoRA's gradient norm (``--max_grad_norm``), step the optimizer and the schedule, zero the
        gradients. Returns the gradient norm before clipping (None without clipping)."""
        self._all_reduce()
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

    def _all_reduce(self) -> None:
        """Data-parallel training will average the LoRA's gradients across processes here (musubi reduces
        them by hand after DDP); a single process has nothing to do."""

    # -- the loop -----------------------------------------------------------------------------

    def train(self, until_step: int | None = None) -> TrainResult:
        """Trains to ``max_train_steps`` (or stops after ``until_step``, e.g. to pause), saving as configured.
        An out-of-memory error is raised again as :class:`TrainingOutOfMemory` naming the flags that help."""
        if not self.ready:
            self.setup()
        try:
            return self._loop(until_step)
        except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
            raise TrainingOutOfMemory(f"out of memory on {self.device} ({str(exc).splitlines()[0][:200]}). "
                                      f"Settings that use less: {OOM_ADVICE}") from exc

    def _loop(self, until_step: int | None) -> TrainResult:
        cfg, p = self.cfg, self.progress
        stop = min(self.max_steps, until_step) if until_step is not None else self.max_steps
        bar = self._bar()
        losses: list[float] = []
        if p.step == 0:
            self.sample(0, 0)
        self.choice.train_mode()
        while p.step < stop:
            group: list[float] = []
            for batch in self.data.batches(p.epoch, p.position):
                loss, expert = self.forward_loss(batch)
                self.backward(loss)
                group.append(float(loss.detach()))
                self.expert_batches[expert] += 1
                p.position += 1
                if p.position % cfg.gradient_accumulation_steps and p.position < self.batches_per_epoch:
                    continue  # accumulate; the epoch's last batch always steps (accelerate's rule)
                norm = self.optimizer_step()
                p.step += 1
                losses.append(sum(group) / len(group))
                self._after_step(losses[-1], norm, expert, bar)
                group = []
                if p.step >= stop:
                    break
            if p.position >= self.batches_per_epoch:
                self._end_epoch()
        if bar is not None:
            bar.close()
        finished = p.step >= self.max_steps
        lora_path = state_path = None
        if finished:
            lora_path, state_path = self._save_final()
        return TrainResult(p.step, p.epoch, lora_path, state_path, losses, dict(self.expert_batches))

    def _after_step(self, loss: float, norm: float | None, expert: str, bar) -> None:
        cfg, p = self.cfg, self.progress
        self.recent.append(loss)
        avr = sum(self.recent) / len(self.recent)
        lrs = {name: float(lr) for name, lr in zip(self.lr_names, self.scheduler.get_last_lr())}
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", avr_loss=f"{avr:.4f}",
                            lr=" ".join(f"{v:.2e}" for v in lrs.values()))
        if self.log is not None:
            record = {"step": p.step, "epoch": p.epoch, "loss": loss, "avr_loss": avr, "lr": lrs,
                      "time": round(time.time() - self.started_at, 3)}
            if len(self.experts) == 2:
                record["expert"] = expert
            if norm is not None:
                record["grad_norm"] = norm
            self.log.step(record)
        if cfg.save_every_n_steps and p.step % cfg.save_every_n_steps == 0:
            self.choice.eval_mode()
            base = ckpt.step_name(cfg.output_name, p.step)
            self.save_lora(ckpt.lora_file(base))
            self._remove(ckpt.step_to_remove(p.step, cfg.save_every_n_steps, cfg.save_last_n_steps), ckpt.step_name,
                         lora=True)
            if cfg.save_state:
                self.save_state(ckpt.state_folder(base))
                keep = cfg.save_last_n_steps_state or cfg.save_last_n_steps
                self._remove(ckpt.step_to_remove(p.step, cfg.save_every_n_steps, keep), ckpt.step_name, lora=False)
            self.choice.train_mode()
        if should_sample(cfg, p.step, None):
            self.sample(p.step, None)

    def _end_epoch(self) -> None:
        cfg, p = self.cfg, self.progress
        epoch = p.epoch
        p.epoch, p.position = epoch + 1, 0
        if cfg.save_every_n_epochs and epoch % cfg.save_every_n_epochs == 0 and epoch < self.num_epochs:
            self.choice.eval_mode()
            base = ckpt.epoch_name(cfg.output_name, epoch)
            self.save_lora(ckpt.lora_file(base), epoch=epoch)
            self._remove(ckpt.epoch_to_remove(epoch, cfg.save_every_n_epochs, cfg.save_last_n_epochs),
                         ckpt.epoch_name, lora=True)
            if cfg.save_state:
                self.save_state(ckpt.state_folder(base))
                keep = cfg.save_last_n_epochs_state or cfg.save_last_n_epochs
                self._remove(ckpt.epoch_to_remove(epoch, cfg.save_every_n_epochs, keep), ckpt.epoch_name, lora=False)
            self.choice.train_mode()
        if should_sample(cfg, p.step, epoch):
            self.sample(p.step, epoch)

    def _save_final(self) -> tuple[Path, Path | None]:
        cfg = self.cfg
        self.choice.eval_mode()
        lora = self.save_lora(ckpt.lora_file(cfg.output_name), epoch=self.num_epochs)
        state = None
        if cfg.save_state or cfg.save_state_on_train_end:
            state = self.save_state(ckpt.state_folder(cfg.output_name))
        self.say(f"saved {lora}")
        return lora, state

    def _bar(self):
        if not self.show_progress:
            return None
        from tqdm import tqdm
        return tqdm(total=self.max_steps, initial=self.progress.step, desc="steps", smoothing=0)

    # -- saving -------------------------------------------------------------------------------

    def save_lora(self, name: str, epoch: int | None = None) -> Path:
        """Writes the LoRA to ``output_dir/name`` with musubi's metadata."""
        cfg = self.cfg
        path = Path(cfg.output_dir) / name
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

    def save_state(self, name: str) -> Path:
        """Writes the training state folder ``output_dir/name`` (see :mod:`wan.train.checkpoints`)."""
        p = self.progress
        p.recent_losses = list(self.recent)
        rng = ckpt.capture_rng(self.generator, None if self.pool is None else self.pool._left)
        return ckpt.save_state(Path(self.cfg.output_dir) / name, network=self.network, optimizer=self.optimizer,
                               scheduler=self.scheduler, rng=rng, progress=p, settings=self.cfg.to_flat(),
                               scaler=self.scaler, extra={"batches_per_epoch": self.batches_per_epoch})

    def _remove(self, number: int | None, naming: Callable[[str, int], str], *, lora: bool) -> None:
        if number is None:
            return
        base = naming(self.cfg.output_name, number)
        target = Path(self.cfg.output_dir) / (ckpt.lora_file(base) if lora else ckpt.state_folder(base))
        if lora and target.is_file():
            target.unlink()
        elif not lora and target.is_dir():
            import shutil
            shutil.rmtree(target)

    # -- samples --------------------------------------------------------------------------------

    def sample(self, step: int, epoch: int | None) -> None:
        """The sample hook, at step 0 (``--sample_at_first``), every N steps and at epoch ends, by musubi's
        rules (:func:`should_sample`). It calls the trainer's ``sampler`` (none yet: sampling will go through
        the engine) with the optimizer in eval mode, and restores every random state afterwards, so that
        sampling never changes the training run."""
        if self.sampler is None or not should_sample(self.cfg, step, epoch):
            return
        rng = ckpt.capture_rng(self.generator, None)
        self.choice.eval_mode()
        was_training = self.network.training
        try:
            with torch.no_grad():
                self.sampler(self, step, epoch)
        finally:
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
        """Detaches the LoRA (and checkpointing) from the DiTs and closes the log."""
        self._stack.close()
        self.ready = False

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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


__all__ = ["Trainer", "TrainResult", "TrainingError", "TrainingOutOfMemory", "GradientCheckpointing",
           "conditioning", "memory_estimate", "resolve_dit_files", "show_timesteps", "should_sample"]
