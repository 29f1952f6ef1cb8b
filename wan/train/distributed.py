"""Several training processes (data parallelism), as musubi-tuner trains with accelerate's DDP.

Launch with ``torchrun --nproc_per_node N wgp.py train ...`` or ``accelerate launch --multi_gpu
--num_processes N wgp.py train ...``. Both start N processes with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT`` in their environment, and that is all this module reads (accelerate is
never imported). Without ``WORLD_SIZE``, or with 1, a run is one process and every method here does nothing.
(``accelerate launch --cpu --num_processes N`` starts one process only: on the CPU use torchrun, as the
tests do.)

What each process does (the trainer calls this module for the collective parts):

- it joins the process group (:meth:`ProcessGroup.join`: NCCL on CUDA, each rank on ``cuda:LOCAL_RANK``;
  gloo on the CPU) and leaves it (:meth:`ProcessGroup.close`, ``destroy_process_group``) on every exit:
  the trainer closes in a ``finally``, at the normal end, on an error and on Ctrl-C;
- it trains on its part of each *global* batch (:mod:`wan.train.data`): the dataset's ``batch_size`` is per
  process, a global batch is ``batch_size * N`` items cut exactly as one process with that batch size cuts
  them, and rank r takes the r-th contiguous part. Every rank therefore sees the same number of batches
  and makes the same number of optimizer steps;
- noise and timesteps: every rank draws them for the *whole* global batch from the same generator (seeded
  with ``--seed``, identical on all ranks) and keeps the rows of its own items. Item i of a global batch
  thus gets the same noise and timestep in a run of N processes as in one process with ``batch_size * N``,
  all ranks agree on the expert (Wan 2.2 A14B) and on the timestep-bucket deal, and a saved state holds
  one generator for all. (A generator seeded ``seed + rank`` would give each rank other noise than the
  one-process run; the draws cost little next to a DiT step);
- torch's own generator, which LoRA dropout (and anything else) draws from, is seeded ``seed + rank``
  once the network is built, so ranks drop different units (accelerate's device-specific seeds). The
  network is built from ``--seed`` alone and broadcast from rank 0, so every rank starts from the same
  LoRA; the per-rank generator states are gathered into a saved state and restored on resume;
- gradients: only the LoRA has any (the DiT is frozen), and they are summed over the ranks once per
  optimizer step (:meth:`ProcessGroup.sum_gradients`, flattened in buckets), never on the accumulation
  micro-steps. Each rank's loss is weighted by its share of the global batch, so the sum is the gradient of
  the global batch's mean loss: the step of one process with ``batch_size * N``;
- LoRA files, states, logs and samples (the sample hook) are written by rank 0 only; the others wait at a
  barrier (timeout 30 minutes, accelerate's default).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar, Iterable

import torch
import torch.distributed as dist
from torch import nn

from wan.parallel.groups import Launch as ParallelLaunch
from wan.train.errors import TrainingError

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
BUCKET_ELEMENTS = 2 ** 24  # gradients summed 64 MiB of float32 at a time (DDP's buckets are 25 MiB)
TIMEOUT = timedelta(minutes=30)  # accelerate's default: rank 0 may save or sample while the others wait


@dataclass(frozen=True)
class Launch(ParallelLaunch):
    """Where this process stands in a launch, read from the launcher's environment variables; the
    launcher's mistakes are :class:`TrainingError` s."""

    ERROR: ClassVar[type[Exception]] = TrainingError
    LAUNCHERS: ClassVar[str] = "torchrun --nproc_per_node {world} or accelerate launch --multi_gpu"
    SETS_IT: ClassVar[str] = "torchrun and accelerate launch set it"


def pick_device(request: str | None, local_rank: int = 0, world_size: int = 1) -> torch.device:
    """The device of this process: ``--device`` (default cuda when there is one, else cpu); with several
    processes on CUDA, ``cuda:LOCAL_RANK`` (made the current device)."""
    device = torch.device(request or ("cuda" if torch.cuda.is_available() else "cpu"))
    if world_size > 1 and device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise TrainingError(f"LOCAL_RANK={local_rank}, but this machine has {count} CUDA device(s): start at "
                                "most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


class ProcessGroup:
    """This process's place among the training processes, and the few collectives training needs.

    With one process (``world_size`` 1) every collective returns at once and :attr:`is_main` is True.
    ``owned``: this object started ``torch.distributed`` and :meth:`close` ends it; a group a caller set up
    before (in-process use) is used and left alone."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0,
                 device: torch.device | str = "cpu", owned: bool = False):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device, self.owned = torch.device(device), owned

    @classmethod
    def join(cls, device_request: str | None = None, launch: Launch | None = None,
             timeout: timedelta = TIMEOUT) -> ProcessGroup:
        """Joins the launch of the environment variables (or ``launch``): the device this rank uses and,
        with several processes, ``torch.distributed`` initialised (NCCL on CUDA, gloo otherwise)."""
        if dist.is_available() and dist.is_initialized():  # a caller's group
            rank, world = dist.get_rank(), dist.get_world_size()
            local = (launch or Launch.from_env()).local_rank if world > 1 else 0
            return cls(rank, world, local, pick_device(device_request, local, world))
        launch = launch or Launch.from_env()
        device = pick_device(device_request, launch.local_rank, launch.world_size)
        if launch.world_size == 1:
            return cls(device=device)
        if not dist.is_available():
            raise TrainingError(f"WORLD_SIZE={launch.world_size}: this torch build has no torch.distributed")
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, timeout=timeout, **kwargs)
        return cls(launch.rank, launch.world_size, launch.local_rank, device, owned=True)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports."""
        return self.rank == 0

    def describe(self) -> str:
        return (f"{self.world_size} processes ({dist.get_backend()}), rank {self.rank} on {self.device}"
                if self.enabled else f"one process on {self.device}")

    def close(self) -> None:
        """Leaves the process group this object started (``destroy_process_group``); safe to call twice."""
        if self.owned and dist.is_initialized():
            dist.destroy_process_group()
        self.owned = False

    # -- collectives ------------------------------------------------------------------------------

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_int(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (the seed when none was given)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def sum_float(self, value: float) -> float:
        """The sum of ``value`` over the ranks (float64)."""
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers of ``module`` on every rank (as DDP does when it wraps a module)."""
        if not self.enabled:
            return
        tensors = [t.data for t in [*module.parameters(), *module.buffers()]]
        for bucket in _buckets(tensors):
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.broadcast(flat, src=0)
            _scatter(flat, bucket)

    def sum_gradients(self, params: Iterable[nn.Parameter]) -> None:
        """Sums the gradients of ``params`` over the ranks, in place. A parameter with a gradient on some
        rank gets one on every rank (zeros where it had none, e.g. a rank with no items in this batch); one
        with none anywhere keeps none, as one process would leave it."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        present = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=self.device)
        dist.all_reduce(present)
        live = [p for p, n in zip(params, present.tolist()) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets([p.grad for p in live]):
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat)
            _scatter(flat, bucket)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` of every rank, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # -- per-rank random states ---------------------------------------------------------------------

    def seed_rank(self, seed: int) -> None:
        """torch's generator (CPU and CUDA) seeded ``seed + rank`` (several processes only: one process
        keeps the stream ``--seed`` started)."""
        if self.enabled:
            torch.manual_seed(seed + self.rank)

    def rank_states(self) -> list[dict[str, torch.Tensor]] | None:
        """torch's generator states (CPU, and this rank's CUDA device) of every rank, for a saved state;
        None with one process (the state's own ``torch`` entry has it)."""
        if not self.enabled:
            return None
        mine = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            mine["cuda"] = torch.cuda.get_rng_state(self.device)
        return self.gather(mine)

    def restore_rank_states(self, states: list[dict[str, torch.Tensor]] | None, seed: int, step: int) -> bool:
        """Restores this rank's generator from a saved state's list; when the state was saved with another
        number of processes, reseeds from (seed, rank, step) instead and returns False."""
        if not self.enabled:
            return True
        if states is not None and len(states) == self.world_size:
            mine = states[self.rank]
            torch.set_rng_state(mine["torch"])
            if "cuda" in mine and self.device.type == "cuda":
                torch.cuda.set_rng_state(mine["cuda"], self.device)
            return True
        torch.manual_seed(seed + self.rank + 1_000_003 * step)
        return False


def _buckets(tensors: list[torch.Tensor]) -> Iterable[list[torch.Tensor]]:
    """Runs of tensors of one dtype and device with at most :data:`BUCKET_ELEMENTS` elements (or one larger)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        other_kind = bool(bucket) and (t.dtype, t.device) != (bucket[0].dtype, bucket[0].device)
        if bucket and (size + t.numel() > BUCKET_ELEMENTS or other_kind):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += t.numel()
    if bucket:
        yield bucket


def _scatter(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def shard_range(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank ``rank``'s part of a global batch of ``size`` items: contiguous parts whose sizes
    differ by at most one, the larger first (a full batch of ``B * N`` gives rank r the items
    ``r*B .. (r+1)*B - 1``; a short last batch may leave a rank none)."""
    base, extra = divmod(size, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


__all__ = ["LAUNCH_VARIABLES", "Launch", "ProcessGroup", "pick_device", "shard_range"]
