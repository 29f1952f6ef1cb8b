"""Block streaming: run a DiT whose transformer blocks live in the checkpoint file, not in memory.

Works on any device without mmgp (on CUDA, mmgp executes the same plans with pinned memory and
async copies; see ``wan.optim.mmgp_backend``). The non-block weights (embeddings, head: a few
percent of the model) stay resident; each repeated block (``WanDiT._repeated_blocks``: the main
blocks and the VACE blocks) is read from the checkpoint when it is about to run and released
after, through forward pre/post hooks. A background thread reads the next ``prefetch`` blocks
while the current one computes, so peak memory stays near ``(1 + prefetch)`` blocks plus the
resident part plus activations. ``budget_blocks`` blocks are kept resident for good (musubi-tuner's
``--blocks_to_swap N`` is ``budget_blocks = num_blocks - N``).

Every tensor goes through the same reader and the same conversion as ``wan.load_transformer``
(fp8 files dequantised, float32 islands kept), so a streamed DiT computes bit for bit what a
loaded one does.

Released parameters are replaced by meta placeholders of the same shape and dtype, so code that
only reads a weight's dtype (the DiT reads ``blocks[0].ffn[0].weight.dtype``) keeps working.
Forwards must come from one thread at a time (the hooks keep per-model state).
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import weakref
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from wan.loading.files import CheckpointError
from wan.loading.transformer import open_transformer
from wan.models.dit import DiTConfig, WanDiT

# Submodules of a VACE block that WanDiT calls outside the block's forward (before_proj on the
# control tokens before the first block, after_proj on each block's output): the forward hooks do
# not cover them, so they stay resident (about 7% of a VACE block).
_OUTSIDE_FORWARD = ("before_proj", "after_proj")

Reader = Callable[[], torch.Tensor]


@dataclass
class _Param:
    """One streamed tensor: a parameter, or a buffer of a quantised layer (``qweight``,
    ``weight_scale`` of a :class:`~wan.layers.quant.QuantLinear` kept fp8 from the file)."""
    name: str            # full name in the DiT, e.g. "blocks.3.self_attn.q.weight"
    owner: nn.Module
    leaf: str
    placeholder: torch.Tensor  # meta tensor of the final shape and dtype (an nn.Parameter for a parameter)
    buffer: bool = False

    def current(self) -> torch.Tensor:
        return (self.owner._buffers if self.buffer else self.owner._parameters)[self.leaf]

    def assign(self, tensor: torch.Tensor) -> None:
        if self.buffer:
            self.owner._buffers[self.leaf] = tensor
        else:
            self.owner._parameters[self.leaf] = nn.Parameter(tensor, requires_grad=False)

    def clear(self) -> None:
        (self.owner._buffers if self.buffer else self.owner._parameters)[self.leaf] = self.placeholder


@dataclass
class _Unit:
    """One streamed block."""
    name: str
    params: list[_Param]
    read: Callable[[], dict[str, torch.Tensor]]  # runs on the worker thread; holds no model reference
    nbytes: int
    resident: bool = False


def _convert(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The conversion ``wan.loading.files.materialize`` applies to every tensor it assigns."""
    return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)


def _read_unit(entries: tuple, device: torch.device, source: str, quantized: tuple = ()) -> dict[str, torch.Tensor]:
    """Reads one block: ``entries`` are (name, reader, target dtype, expected shape); ``quantized``
    (layer, mode, block size, scaled_mm) turns each such layer's float weight, once read, into
    its ``qweight`` and ``weight_scale`` as ``QuantLinear.from_linear`` makes them."""
    out = {}
    for name, read, dtype, shape in entries:
        try:
            t = read()
        except CheckpointError:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{source}: reading tensor '{name}' failed ({type(e).__name__}: {e})") from e
        if tuple(t.shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the model expects {shape}")
        out[name] = _convert(t, device, dtype)
    for layer, mode, block_size, scaled_mm in quantized:
        out.update(_quantized(layer, out.pop(f"{layer}.weight"), mode, block_size, scaled_mm))
    return out


def _quantized(layer: str, weight: torch.Tensor, mode: str, block_size: int | None, scaled_mm: bool) -> dict:
    from wan.layers.quant import quantize_weight
    q, scale = quantize_weight(weight, mode, block_size=block_size, scaled_mm=scaled_mm)
    return {f"{layer}.qweight": q, **({f"{layer}.weight_scale": scale} if scale is not None else {})}


# ---------------------------------------------------------------------------------------------
# The reader thread


class _Worker:
    """One daemon thread running read jobs from a queue in order; results come back as Futures.

    The thread holds only the queue and the stop flag, never the handle or the model, so the
    handle can be garbage collected while the thread runs.
    """

    def __init__(self):
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=_work, args=(self.jobs, self.stopped), daemon=True,
                                       name="wan-block-stream")
        self.thread.start()

    def submit(self, fn: Callable[[], object]) -> Future:
        fut: Future = Future()
        self.jobs.put((fut, fn))
        return fut


def _work(jobs: queue.SimpleQueue, stopped: threading.Event) -> None:
    while True:
        job = jobs.get()
        if job is None:
            return
        fut, fn = job
        if stopped.is_set() or not fut.set_running_or_notify_cancel():
            fut.cancel()  # closed, or a read-ahead guess that was dropped
            continue
        try:
            fut.set_result(fn())
        except BaseException as e:  # every failure reaches the caller through the future
            fut.set_exception(e)
        del job, fut, fn  # do not keep the last block's tensors alive while idle


def _stop_worker(jobs: queue.SimpleQueue, stopped: threading.Event) -> None:
    stopped.set()
    jobs.put(None)


def _run_now(fn: Callable[[], object]) -> Future:
    """A finished Future: prefetch 0 reads in the caller's thread through the same path."""
    fut: Future = Future()
    try:
        fut.set_result(fn())
    except Exception as e:
        fut.set_exception(e)
    return fut


# ---------------------------------------------------------------------------------------------
# The handle


class StreamHandle:
    """Block streaming installed on one DiT; returned by :func:`stream_blocks_`.

    Attributes:
        units: names of all repeated blocks, in their first expected run order.
        resident: the blocks kept in memory for good (the budget).
        prefetch, device, dtype, source: as given / resolved.
        largest_block_bytes: size of the largest streamed block after conversion.
        thread: the reader thread (None with prefetch 0).
    """

    def __init__(self, units: list[_Unit], prefetch: int, device: torch.device, dtype: torch.dtype,
                 source: str, modules: list[nn.Module]):
        self._units = units
        self.prefetch = prefetch
        self.device, self.dtype, self.source = device, dtype, source
        self.closed = False
        self._pending: dict[int, Future] = {}
        self._loaded: set[int] = set()
        # run order learned from the forwards: unit -> the unit that ran after it last time
        self._next = {i: (i + 1) % len(units) for i in range(len(units))}
        self._last: int | None = None
        self._worker = _Worker() if prefetch > 0 else None
        self.thread = self._worker.thread if self._worker else None
        self._finalizer = (weakref.finalize(self, _stop_worker, self._worker.jobs, self._worker.stopped)
                           if self._worker else None)
        self._hooks = []
        for i, module in enumerate(modules):
            self._hooks.append(module.register_forward_pre_hook(functools.partial(self._before, i)))
            self._hooks.append(module.register_forward_hook(functools.partial(self._after, i)))

    # -- public ---------------------------------------------------------------------------------

    @property
    def units(self) -> list[str]:
        return [u.name for u in self._units]

    @property
    def resident(self) -> list[str]:
        return [u.name for u in self._units if u.resident]

    @property
    def largest_block_bytes(self) -> int:
        return max((u.nbytes for u in self._units if not u.resident), default=0)

    def close(self) -> None:
        """Stops the reader thread and drops prefetched blocks. The streamed blocks stay empty:
        the DiT cannot run afterwards (load it again)."""
        if self.closed:
            return
        self.closed = True
        self._drop_pending()
        for i in list(self._loaded):
            self._release(i)
        if self._finalizer is not None:
            self._finalizer()  # stops the thread (once)
            if self.thread is not threading.current_thread():
                self.thread.join(timeout=30)

    def __enter__(self) -> "StreamHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- hooks ----------------------------------------------------------------------------------

    def _before(self, i: int, module: nn.Module, args) -> None:
        if self.closed:
            raise RuntimeError(f"block streaming from {self.source} was closed; load the transformer again")
        if self._last is not None and self._last != i:
            self._next[self._last] = i
        self._last = i
        unit = self._units[i]
        if unit.resident or i in self._loaded:
            self._schedule(i)
            return
        for j in list(self._loaded):  # left over by a forward that raised before its post-hook
            self._release(j)
        fut = self._pending.pop(i, None) or self._submit(i)
        self._schedule(i)  # queue the read-ahead behind this block before waiting on it
        try:
            tensors = fut.result()
        except Exception as e:
            self._drop_pending()
            if isinstance(e, CheckpointError):
                raise CheckpointError(f"{e} (while streaming {unit.name})") from e
            raise CheckpointError(f"{self.source}: streaming {unit.name} failed ({type(e).__name__}: {e})") from e
        for p in unit.params:
            p.assign(tensors.pop(p.name))
        self._loaded.add(i)

    def _after(self, i: int, module: nn.Module, args, output) -> None:
        if not self._units[i].resident:
            self._release(i)

    # -- loading and releasing ------------------------------------------------------------------

    def _submit(self, i: int) -> Future:
        read = self._units[i].read
        return self._worker.submit(read) if self._worker else _run_now(read)

    def _upcoming(self, i: int) -> list[int]:
        """The next ``prefetch`` streamed (non-resident) blocks expected after block ``i``."""
        out, j, seen = [], i, {i}
        while len(out) < self.prefetch:
            j = self._next.get(j)
            if j is None or j in seen:
                break
            seen.add(j)
            if not self._units[j].resident:
                out.append(j)
        return out

    def _schedule(self, i: int) -> None:
        if not self._worker:
            return
        wanted = self._upcoming(i)
        for j in [j for j in self._pending if j not in wanted]:
            self._pending.pop(j).cancel()  # a guess that did not come true; freed when it finishes
        for j in wanted:
            if j not in self._pending and j not in self._loaded:
                self._pending[j] = self._submit(j)

    def _release(self, i: int) -> None:
        for p in self._units[i].params:
            p.clear()
        self._loaded.discard(i)

    def _drop_pending(self) -> None:
        for fut in self._pending.values():
            fut.cancel()
        self._pending.clear()


# ---------------------------------------------------------------------------------------------
# Installing


def stream_blocks_(dit: WanDiT, checkpoint_path: str | os.PathLike | Sequence, *, prefetch: int = 1,
                   budget_blocks: int | None = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> StreamHandle:
    """Makes ``dit`` stream its repeated blocks from ``checkpoint_path`` (in place).

    ``dit`` may be loaded (its block weights are dropped) or built on the meta device (its
    non-block weights are read now). The checkpoint must be the one the DiT's weights come from.

    Args:
        prefetch: blocks read ahead on a background thread (0: read when needed, no thread).
        budget_blocks: blocks kept resident for good, spread evenly over the run order
            (None or 0: none).
        device: where streamed tensors go; default: where the DiT's weights are (cpu for meta).
        dtype: compute dtype of the weights; default: the DiT's block dtype if loaded, else the
            dtype ``wan.load_transformer`` picks for the file. Float32 islands stay float32.
    A quantised ``dit`` streams its quantised layers too: as the file stores them when they are all
    the file's fp8 layers, kept (``load_transformer(keep_fp8=True)``), else quantised again from the
    file's weights as ``quantize_`` did (block size 64).

    Returns:
        the handle; the streaming lives as long as the DiT (the hooks hold the handle), and
        ``close()`` stops it.
    """
    from wan.layers.quant import QuantLinear
    from wan.loading.transformer import fp8_layers_of
    quantized = {n: m for n, m in dit.named_modules() if isinstance(m, QuantLinear)}
    fp8 = fp8_layers_of(checkpoint_path) if quantized else {}
    kept = bool(fp8) and all(n in fp8 and m.qweight.dtype == fp8[n][0] for n, m in quantized.items())
    cfg, readers, ckpt, file_dtype = open_transformer(checkpoint_path, keep_fp8=kept)
    return _install(dit, cfg, readers, file_dtype, f"transformer checkpoint {ckpt.root}",
                    prefetch=prefetch, budget_blocks=budget_blocks, device=device, dtype=dtype)


def load_transformer_streamed(path: str | os.PathLike | Sequence, device: str | torch.device = "cpu",
                              dtype: torch.dtype | None = None, *, prefetch: int = 1,
                              budget_blocks: int | None = None, num_heads: int | None = None,
                              keep_fp8: bool = False, quantize: str = "none",
                              block_size: int | None = 64) -> tuple[WanDiT, StreamHandle]:
    """Builds a DiT that streams its blocks, never holding all its weights: the network is built
    on the meta device, only the non-block weights (and the budget blocks) are read.

    Same arguments as ``wan.load_transformer`` plus those of :func:`stream_blocks_`, and:

    - ``keep_fp8``: the linear layers an fp8 file stores in fp8 stay fp8, in resident and streamed
      blocks alike (half the memory and half the bytes read of bf16): the output of
      ``load_transformer(path, keep_fp8=True)``;
    - ``quantize`` (``fp8``, ``fp8_scaled``, ``int8``; with ``block_size`` as ``quantize_``'s), for
      a file of float weights (or an fp8 file without ``keep_fp8``): each layer ``quantize_`` would
      quantise is quantised as its block is read (a resident block once): the output of
      ``load_transformer`` followed by ``quantize_(dit, quantize, keep=WanDiT.keep_in_fp32)``.

    Returns ``(dit, handle)``; the DiT is in eval mode with gradients off.
    """
    from wan.loading.transformer import fp8_layers_of, with_fp8_layers
    fp8 = fp8_layers_of(path) if keep_fp8 else {}
    cfg, readers, ckpt, file_dtype = open_transformer(path, num_heads=num_heads, keep_fp8=bool(fp8))
    with torch.device("meta"):
        dit = WanDiT(cfg)
        if fp8:
            with_fp8_layers(dit, fp8, dtype or file_dtype)
        elif quantize != "none":
            from wan.optim.quant import quantize_
            quantize_(dit, quantize, keep=WanDiT.keep_in_fp32, block_size=block_size,
                      compute_dtype=dtype or file_dtype)
    handle = _install(dit, cfg, readers, file_dtype, f"transformer checkpoint {ckpt.root}",
                      prefetch=prefetch, budget_blocks=budget_blocks, device=device, dtype=dtype,
                      block_size=block_size)
    dit.eval()
    return dit, handle


def _install(dit: WanDiT, cfg: DiTConfig, readers: dict[str, Reader], file_dtype: torch.dtype, source: str, *,
             prefetch: int, budget_blocks: int | None, device, dtype, block_size: int | None = 64) -> StreamHandle:
    if not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch={prefetch!r}: expected a whole number of blocks >= 0")
    if getattr(dit, "config", cfg) != cfg:
        raise CheckpointError(f"{source}: its shapes give {cfg}, but the model was built as {dit.config}; "
                              f"stream a model from the checkpoint it was loaded from")
    named = _repeated_blocks(dit)
    n = len(named)
    if budget_blocks is not None and not (isinstance(budget_blocks, int) and 0 <= budget_blocks <= n):
        raise ValueError(f"budget_blocks={budget_blocks!r}: expected a whole number from 0 to {n} (the model's blocks)")
    probe = dit.blocks[0].ffn[0].weight
    device = torch.device(device) if device is not None else _resident_device(dit)
    dtype = dtype or (file_dtype if probe.is_meta else probe.dtype)
    keep_fp32 = getattr(type(dit), "keep_in_fp32", lambda name: False)

    def target(name: str) -> torch.dtype:
        return torch.float32 if keep_fp32(name) else dtype

    made = _made_here(dit, readers, block_size)  # quantised layers made from the file's float weights
    streamed: set[str] = set()
    units = []
    for prefix, module in named:
        params = _streamed_params(prefix, module, target)
        streamed.update(p.name for p in params)
        entries = [(p.name, _reader(readers, p.name, source), p.placeholder.dtype, tuple(p.placeholder.shape))
                   for p in params if not (p.buffer and p.name.rpartition(".")[0] in made)]
        quantized = tuple((layer, *made[layer][:3]) for layer in made if layer.startswith(prefix + ".")
                          and layer[len(prefix) + 1:].split(".")[0] not in _OUTSIDE_FORWARD)
        entries += [(f"{layer}.weight", _reader(readers, f"{layer}.weight", source), target(f"{layer}.weight"),
                     made[layer][3]) for layer, *_ in quantized]
        nbytes = sum(p.placeholder.numel() * p.placeholder.element_size() for p in params)
        read = functools.partial(_read_unit, tuple(entries), device, source, quantized)
        units.append(_Unit(prefix, params, read, nbytes))

    _fill_meta(dit, readers, streamed, device, target, source, made)
    resident = _spread(n, budget_blocks or 0)
    for i, unit in enumerate(units):
        unit.resident = i in resident
        if unit.resident:
            if any(p.current().is_meta for p in unit.params):
                tensors = unit.read()
                for p in unit.params:
                    p.assign(tensors.pop(p.name))
        else:
            for p in unit.params:
                p.clear()
    dit.requires_grad_(False)
    return StreamHandle(units, prefetch, device, dtype, source, [m for _, m in named])


def _repeated_blocks(dit: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost modules whose class is one of ``dit._repeated_blocks``, in run order.

    WanDiT runs its VACE branch before the main blocks, so VACE blocks come first; the handle
    learns the real order from the forwards anyway (a forward without VACE input skips them).
    """
    kinds = set(getattr(dit, "_repeated_blocks", ()))
    if not kinds:
        raise TypeError(f"{type(dit).__name__} declares no _repeated_blocks: nothing to stream")
    found: list[tuple[str, nn.Module]] = []
    for name, module in dit.named_modules():
        if type(module).__name__ in kinds and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return sorted(found, key=lambda item: not item[0].startswith("vace_blocks."))


def _streamed_params(prefix: str, block: nn.Module, target: Callable[[str], torch.dtype]) -> list[_Param]:
    """The block's parameters (in their target dtype) and its quantised layers' buffers (in the
    dtype they are stored in)."""
    out = []
    for sub_name, sub in block.named_modules():
        if sub_name.split(".")[0] in _OUTSIDE_FORWARD:
            continue
        for leaf, p in sub.named_parameters(recurse=False):
            full = ".".join(x for x in (prefix, sub_name, leaf) if x)
            placeholder = nn.Parameter(torch.empty(p.shape, dtype=target(full) if p.is_floating_point() else p.dtype,
                                                   device="meta"), requires_grad=False)
            out.append(_Param(full, sub, leaf, placeholder))
        for leaf, b in sub.named_buffers(recurse=False):
            if b is not None:
                full = ".".join(x for x in (prefix, sub_name, leaf) if x)
                out.append(_Param(full, sub, leaf, torch.empty(b.shape, dtype=b.dtype, device="meta"), buffer=True))
    return out


def _reader(readers: dict[str, Reader], name: str, source: str) -> Reader:
    if name not in readers:
        raise CheckpointError(f"{source}: tensor '{name}' is missing")
    return readers[name]


def _made_here(dit: nn.Module, readers: dict[str, Reader], block_size: int | None) -> dict[str, tuple]:
    """The quantised layers of ``dit`` whose stored form the file lacks (the network was quantised
    on the meta device, the file holds float weights): layer -> (mode, block size, scaled_mm,
    weight shape)."""
    from wan.layers.quant import QuantLinear
    return {name: (m.mode, block_size, m.scaled_mm, (m.out_features, m.in_features))
            for name, m in dit.named_modules()
            if isinstance(m, QuantLinear) and f"{name}.qweight" not in readers}


def _fill_meta(dit: nn.Module, readers: dict[str, Reader], streamed: set[str], device, target, source: str,
               made: dict[str, tuple] | None = None) -> None:
    """Reads every non-streamed parameter (and quantised layer's buffer) still on the meta device;
    the layers of ``made`` (:func:`_made_here`) are quantised from their float weight."""
    for layer, (mode, block_size, scaled_mm, shape) in (made or {}).items():
        owner = dit.get_submodule(layer)
        if f"{layer}.qweight" in streamed or not owner.qweight.is_meta:
            continue
        weight = _reader(readers, f"{layer}.weight", source)()
        if tuple(weight.shape) != shape:
            raise CheckpointError(f"{source}: tensor '{layer}.weight' has shape {tuple(weight.shape)}, "
                                  f"the model expects {shape}")
        for name, t in _quantized(layer, _convert(weight, device, target(f"{layer}.weight")), mode, block_size,
                                  scaled_mm).items():
            owner._buffers[name.rpartition(".")[2]] = t
    tensors = [(name, p, False) for name, p in dit.named_parameters()]
    tensors += [(name, b, True) for name, b in dit.named_buffers() if b is not None]
    for name, p, buffer in tensors:
        if name in streamed or not p.is_meta:
            continue
        t = _reader(readers, name, source)()
        if tuple(t.shape) != tuple(p.shape):
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the model expects {tuple(p.shape)}")
        owner_name, _, leaf = name.rpartition(".")
        owner = dit.get_submodule(owner_name) if owner_name else dit
        if buffer:  # a quantised layer's storage: the file's dtype, only moved
            owner._buffers[leaf] = _convert(t, device, p.dtype)
        else:
            owner._parameters[leaf] = nn.Parameter(_convert(t, device, target(name)), requires_grad=False)


def _resident_device(dit: nn.Module) -> torch.device:
    for p in dit.parameters():
        if not p.is_meta:
            return p.device
    return torch.device("cpu")


def _spread(n: int, k: int) -> set[int]:
    """``k`` of ``n`` indices spread evenly (resident blocks between streamed ones give the
    reader thread time to catch up, as mmgp's preloading does)."""
    return {j * n // k for j in range(k)} if k else set()
