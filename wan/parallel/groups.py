"""Processes of one parallel generation: the launch, the checks, the process group and its mesh.

A parallel generation is started by torchrun (``torchrun --nproc_per_node 4 wgp.py generate
--ulysses_size 2 --cfg_parallel ...``), which starts one process per GPU with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment. Each process:

1. checks the settings against the launch and the model *before loading anything*
   (:func:`check_parallel`): a wrong setting is named with its flag, its value and what is allowed;
2. joins the process group (:func:`parallel_session`: NCCL on CUDA, each rank on
   ``cuda:LOCAL_RANK``; gloo on the CPU) and builds a 2-D :class:`DeviceMesh` ``(cfg, sp)``:
   ``cfg`` (1, or 2 with ``--cfg_parallel``) splits the prompt and negative-prompt passes,
   ``sp`` (``--ulysses_size``) splits the sequence. Rank ``r`` sits at ``(r // sp, r % sp)``, so a
   sequence group is made of neighbouring ranks (the same NVLink island on a multi-node job);
3. takes rank 0's request (:meth:`ParallelState.broadcast`): the seed drawn for ``--seed -1``,
   the prompt, and any inputs, so every rank generates the same thing;
4. leaves the group on every exit (the session's ``finally``): an undestroyed group can abort the
   interpreter at exit.

Without torchrun (``WORLD_SIZE`` unset or 1) and with every setting off, the session is a plain
single process and every collective is a no-op, so callers need no branch.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, ClassVar, Iterator, Mapping, Sequence

import torch
import torch.distributed as dist

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
MESH_DIMS = ("cfg", "sp")


class ParallelConfigError(ValueError):
    """A parallel setting that cannot run: names the flag, the value and what is allowed."""

    def __init__(self, flag: str, value: Any, allowed: str, reason: str = ""):
        self.flag, self.value, self.allowed, self.reason = flag, value, allowed, reason
        text = f"--{flag} {value}"
        super().__init__(f"{text}: {reason}; allowed: {allowed}" if reason else f"{text}: allowed: {allowed}")


@dataclass(frozen=True)
class ParallelConfig:
    """The parallel settings of a generation; field names are the CLI flags.

    Attributes:
        ulysses_size: ranks sharing each forward's sequence (Ulysses); must divide the heads.
        cfg_parallel: the prompt and negative-prompt passes on two groups of ranks.
        dit_fsdp: DiT blocks sharded over all ranks (FSDP2), gathered block by block.
        t5_fsdp: the umT5 encoder sharded the same way.
        ring_size: ring attention degree (the official flag); only 1 runs: see
            :data:`RING_UNAVAILABLE`.
    """

    ulysses_size: int = 1
    cfg_parallel: bool = False
    dit_fsdp: bool = False
    t5_fsdp: bool = False
    ring_size: int = 1

    @property
    def cfg_size(self) -> int:
        return 2 if self.cfg_parallel else 1

    @property
    def world_size(self) -> int:
        """Processes this configuration runs on: cfg groups x ulysses ranks."""
        return self.cfg_size * self.ulysses_size

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or self.dit_fsdp or self.t5_fsdp


@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch (read from its environment).

    A subclass may name its own error class and launchers (training also takes accelerate's)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    ERROR: ClassVar[type[Exception]] = ValueError
    LAUNCHERS: ClassVar[str] = "torchrun --nproc_per_node {world}"
    SETS_IT: ClassVar[str] = "torchrun sets it"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Launch:
        env = os.environ if env is None else env

        def read(key: str, default: int) -> int:
            text = env.get(key, "")
            if text == "":
                return default
            try:
                return int(text)
            except ValueError:
                raise cls.ERROR(f"{key}={text!r}: not an integer ({cls.SETS_IT})") from None

        world, rank = read("WORLD_SIZE", 1), read("RANK", 0)
        local = read("LOCAL_RANK", rank)
        if world < 1 or not 0 <= rank < world or local < 0:
            raise cls.ERROR(f"RANK={rank}, LOCAL_RANK={local}, WORLD_SIZE={world}: not a valid launch "
                            "(expected 0 <= RANK < WORLD_SIZE)")
        if world > 1:
            missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
            if missing:
                raise cls.ERROR(f"WORLD_SIZE={world} without {' and '.join(missing)}: start the processes with "
                                + cls.LAUNCHERS.format(world=world))
        return cls(rank, world, local)


# ---------------------------------------------------------------------------------------------
# Checks, before any model loads


RING_UNAVAILABLE = (
    "ring attention is not available: no ring kernel here masks the padded keys of an uneven split "
    "(torch's context_parallel takes no mask and reorders tokens head-tail; yunchang's ring was silently "
    "wrong on the CPU), so use --ulysses_size up to the model's heads, times 2 with --cfg_parallel")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def allowed_degrees(num_heads: int) -> str:
    return ", ".join(map(str, divisors(num_heads)))


def _layouts(world: int, num_heads: int | None) -> str:
    """The settings that run on ``world`` processes, in words."""
    out = []
    for cfg in (1, 2):
        if world % cfg:
            continue
        u = world // cfg
        if num_heads is not None and num_heads % u:
            continue
        out.append(f"--ulysses_size {u}" + (" with --cfg_parallel" if cfg == 2 else ""))
    return " or ".join(out) if out else f"none for this model on {world} processes"


def check_parallel(config: ParallelConfig, *, num_heads: int | None = None, launch: Launch | None = None,
                   guidance: Sequence[float | None] = (), skip_layer_guidance: bool = False) -> None:
    """Refuses settings that cannot run, naming the flag, its value and what is allowed.

    Args:
        num_heads: the model's attention heads (``spec.arch.num_heads``: 12 for 1.3B, 40 for 14B,
            24 for TI2V-5B), known from the registry before anything loads.
        launch: this process's launch (default: from the environment).
        guidance: the run's guidance scales (``--guidance`` and, for Wan 2.2 A14B,
            ``--guidance_high_noise``); None entries are ignored.
        skip_layer_guidance: the profile's skip-layer guidance is on. Its passes leave blocks out,
            so the two cfg groups would run different blocks, and FSDP over every rank gathers
            block by block on all of them in step: that pair is refused.
    """
    launch = launch or Launch.from_env()
    if config.ring_size != 1:
        raise ParallelConfigError("ring_size", config.ring_size, "1", RING_UNAVAILABLE)
    u = config.ulysses_size
    if isinstance(u, bool) or not isinstance(u, int) or u < 1:
        raise ParallelConfigError("ulysses_size", u, "a whole number >= 1 (1: no sequence parallelism)")
    if num_heads is not None and num_heads % u:
        raise ParallelConfigError("ulysses_size", u, allowed_degrees(num_heads),
                                  f"must divide the model's {num_heads} attention heads")
    scales = [float(g) for g in guidance if g is not None]
    if config.cfg_parallel and scales and all(g == 1.0 for g in scales):
        raise ParallelConfigError(
            "cfg_parallel", "(on)", "--cfg_parallel with a guidance other than 1, or no --cfg_parallel",
            f"guidance is {scales[0]:g} (--guidance), so there is no negative-prompt pass for the second group")
    if config.dit_fsdp and config.cfg_parallel and skip_layer_guidance:
        raise ParallelConfigError(
            "dit_fsdp", "(on)", "--dit_fsdp without --cfg_parallel, or skip-layer guidance off (the profile's slg)",
            "with --cfg_parallel and skip-layer guidance, the two groups run different blocks, which FSDP "
            "over all processes cannot pair")
    needs = config.world_size
    if launch.world_size == 1:
        wanted = [(f, v) for f, v in (("ulysses_size", u if u > 1 else None),
                                      ("cfg_parallel", "(on)" if config.cfg_parallel else None),
                                      ("dit_fsdp", "(on)" if config.dit_fsdp else None),
                                      ("t5_fsdp", "(on)" if config.t5_fsdp else None)) if v is not None]
        if wanted:
            flag, value = wanted[0]
            raise ParallelConfigError(
                flag, value, "--ulysses_size 1 without --cfg_parallel, --dit_fsdp, --t5_fsdp in a single process",
                f"needs {max(needs, 2)} processes started by torchrun (torchrun --nproc_per_node {max(needs, 2)} "
                "wgp.py generate ...), but this process runs alone (WORLD_SIZE is "
                f"{'1' if os.environ.get('WORLD_SIZE') else 'not set'})")
        return
    if launch.world_size != needs:
        flag, value = ("ulysses_size", u)
        what = f"{config.cfg_size} x {u} = {needs}" if config.cfg_parallel else f"{needs}"
        raise ParallelConfigError(
            flag, value, _layouts(launch.world_size, num_heads) + f" for {launch.world_size} processes",
            f"{'with --cfg_parallel ' if config.cfg_parallel else ''}runs on {what} processes, but torchrun "
            f"started {launch.world_size}")


# ---------------------------------------------------------------------------------------------
# The session


@dataclass
class ParallelState:
    """This process's place in a parallel generation. ``mesh`` is None in a single process.

    Group properties give None for a single process; the collectives of ``wan.parallel.comm``
    treat None there as a group of one.
    """

    config: ParallelConfig
    launch: Launch
    device: torch.device
    mesh: Any = None              # DeviceMesh (cfg, sp)
    owned: bool = False           # this state started torch.distributed and ends it
    counter: Any = field(default=None, repr=False)  # CommCounter: what this rank's Ulysses / CFG parts sent
    _fsdp_mesh: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.counter is None:
            from wan.parallel.comm import CommCounter
            self.counter = CommCounter()

    @property
    def rank(self) -> int:
        return self.launch.rank

    @property
    def world_size(self) -> int:
        return self.launch.world_size

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that writes files and reports progress."""
        return self.launch.rank == 0

    def group(self, dim: str):
        """The process group of mesh dim ``cfg`` or ``sp`` holding this rank (None: single process)."""
        return None if self.mesh is None else self.mesh[dim].get_group()

    @property
    def sp_group(self):
        return self.group("sp")

    @property
    def cfg_group(self):
        return self.group("cfg")

    @property
    def sp_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["sp"].get_local_rank()

    @property
    def cfg_rank(self) -> int:
        return 0 if self.mesh is None else self.mesh["cfg"].get_local_rank()

    @property
    def fsdp_mesh(self):
        """A 1-D mesh of every rank, which FSDP shards over (built on first use)."""
        if self.mesh is None:
            return None
        if self._fsdp_mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            self._fsdp_mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("fsdp",))
        return self._fsdp_mesh

    @property
    def parallel(self) -> bool:
        """More than one process takes part (the collectives do something)."""
        return self.mesh is not None

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (the request with its seed, prompt and inputs); other
        ranks may pass None."""
        return broadcast_object(obj, src=src)

    def broadcast_tensor(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``x`` (same shape and dtype on every rank), e.g. the initial noise, so that
        every rank starts from the same latent whatever its device draws."""
        if self.mesh is None:
            return x
        x = x.contiguous()
        dist.broadcast(x, src=src)
        return x

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on some rank (a collective: all ranks call it)."""
        if self.mesh is None:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


class SharedCancel:
    """A cancel token the ranks of a parallel generation read alike: cancelled on every rank once
    any rank's own ``token`` (or None) is set. Each read of :attr:`cancelled` is a collective, so
    every rank must read it at the same points, as the engine and its loop do (between stages
    and steps): a cancel reaching rank 0 alone (the web UI's button) stops them all at the same
    step instead of leaving the others waiting in a collective."""

    def __init__(self, state: ParallelState, token=None):
        self.state, self.token = state, token

    def cancel(self) -> None:
        if self.token is not None:
            self.token.cancel()

    @property
    def cancelled(self) -> bool:
        return self.state.any(self.token is not None and self.token.cancelled)


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """``obj`` of rank ``src`` (any picklable object), on every rank of ``group``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return obj
    box = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def pick_device(launch: Launch, device: str | torch.device | None = None) -> torch.device:
    """``device`` (default: CUDA when present, else the CPU); several processes on CUDA each take
    ``cuda:LOCAL_RANK``, made the current device."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and launch.world_size > 1:
        count = torch.cuda.device_count()
        if launch.local_rank >= count:
            raise ValueError(f"LOCAL_RANK={launch.local_rank}, but this machine has {count} CUDA device(s): start "
                             "at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", launch.local_rank)
        torch.cuda.set_device(device)
    return device


def init_parallel(config: ParallelConfig, *, launch: Launch | None = None, device: str | torch.device | None = None,
                  timeout: timedelta | None = None) -> ParallelState:
    """Joins the launch (NCCL on CUDA, gloo on the CPU) and builds the ``(cfg, sp)`` mesh; in a
    single process, returns a state without a mesh. Close it with :func:`close_parallel` (or use
    :func:`parallel_session`)."""
    launch = launch or Launch.from_env()
    check_parallel(config, launch=launch)
    dev = pick_device(launch, device)
    if launch.world_size == 1:
        return ParallelState(config, launch, dev)
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        if timeout is not None:
            kwargs["timeout"] = timeout
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size, **kwargs)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(dev.type, (config.cfg_size, config.ulysses_size), mesh_dim_names=MESH_DIMS)
    except BaseException:
        if owned:
            dist.destroy_process_group()
        raise
    return ParallelState(config, launch, dev, mesh, owned)


def close_parallel(state: ParallelState) -> None:
    """Leaves the process group if this state joined it."""
    if state.owned and dist.is_initialized():
        dist.destroy_process_group()
    state.owned = False


@contextmanager
def parallel_session(config: ParallelConfig, *, launch: Launch | None = None,
                     device: str | torch.device | None = None,
                     timeout: timedelta | None = None) -> Iterator[ParallelState]:
    """:func:`init_parallel` for the ``with`` block; the group is destroyed on every exit."""
    state = init_parallel(config, launch=launch, device=device, timeout=timeout)
    try:
        yield state
    finally:
        close_parallel(state)
