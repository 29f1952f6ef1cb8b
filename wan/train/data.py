"""Training batches from the caches of a dataset TOML, in musubi-tuner's way, with an order that a
resumed run can replay exactly.

What musubi does (``dataset/image_video_dataset.py``, ``dataset/bucket.py: BucketBatchManager``), and so
do we: each dataset's cache directory is globbed for ``*_wan.safetensors`` latent caches paired with
their ``*_wan_te.safetensors`` text caches; items are grouped into buckets of one latent shape (musubi:
one bucket resolution and frame count), each item ``num_repeats`` times; every epoch each bucket is
shuffled and cut into batches of the dataset's ``batch_size`` (the last one may be short), and the batches
of all datasets are shuffled together.

The shuffles here are seeded by (seed, epoch) alone, through private ``random.Random`` instances: the
order of epoch ``e`` is a function of the seed and ``e``, and a resumed run that knows its epoch and its
position in it gets exactly the batches the interrupted run would have had. (musubi reseeds Python's
global generator with seed + epoch and lets its DataLoader shuffle with torch's: the same scheme of
reshuffles, not the same draws.)

Buckets are keyed by the shapes of every tensor an item stacks (latents, i2v image latents, control
latents, CLIP features) and the text width, read from the file headers, so a batch always stacks.

Several processes (:mod:`wan.train.distributed`): the dataset's ``batch_size`` is per process. With N
processes a bucket is cut into *global* batches of ``batch_size * N`` items, in exactly the order one process
with that batch size would get, and each rank reads only its contiguous part
(:func:`~wan.train.distributed.shard_range`); a :class:`Batch` knows its ``offset`` in the global batch and
the global batch's size, so the trainer can give each item the noise the one-process run gives it.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import torch
from safetensors import safe_open

from wan.train.cache_files import (CacheFileError, CacheItem, _key_role, find_cache_items, read_latent_cache,
                                   read_text_cache)
from wan.train.dataset_config import DatasetBlueprint, DatasetConfig
from wan.train.distributed import shard_range

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The dataset cannot be trained on (no cache, mixed shapes...); the message names the folder or file."""


@dataclass
class Batch:
    """One training batch, tensors on the CPU as stored (the trainer moves and casts them).

    latents: [B, C, F, H, W]; t5: B tensors [L_i, D] (trimmed text states); image_latents:
    [B, 4 + C, F, H, W] (i2v/flf2v: first-frame mask + image latent); clip: [B, 257 | 514, 1280]
    (flf2v's two frames side by side); control_latents: [B, C, F, H, W] (Fun-Control); names: the items.
    With several processes a batch is one rank's part of a global batch: ``offset`` is the index of its
    first item there and ``global_size`` the global batch's size (None: this batch is the whole of it). A
    rank's part may be empty (B = 0, ``t5`` empty) when a short last batch has fewer items than processes.
    """

    latents: torch.Tensor
    t5: list[torch.Tensor]
    image_latents: torch.Tensor | None = None
    clip: torch.Tensor | None = None
    control_latents: torch.Tensor | None = None
    names: list[str] = field(default_factory=list)
    offset: int = 0
    global_size: int | None = None

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def total(self) -> int:
        """The size of the global batch this batch is part of (its own size with one process)."""
        return len(self) if self.global_size is None else self.global_size

    def shard(self, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s part of this batch taken as a global batch (see :func:`shard_range`)."""
        lo, hi = shard_range(len(self), rank, world_size)

        def part(t):
            return None if t is None else t[lo:hi]
        return Batch(self.latents[lo:hi], self.t5[lo:hi], part(self.image_latents), part(self.clip),
                     part(self.control_latents), self.names[lo:hi], lo, len(self))

    def context(self, device=None, dtype=None) -> torch.Tensor:
        """The text states as one [B, L_max, D] tensor, zero-padded at the end (the DiT pads to 512
        with zeros anyway, so this is exactly what each item alone would get)."""
        longest = max(t.shape[0] for t in self.t5)
        out = torch.zeros(len(self.t5), longest, self.t5[0].shape[1], dtype=dtype or self.t5[0].dtype)
        for i, t in enumerate(self.t5):
            out[i, : t.shape[0]] = t.to(out.dtype)
        return out.to(device) if device is not None else out


class BatchSource(Protocol):
    """What the trainer reads batches from: a fixed number of batches per epoch and an order per epoch."""

    def __len__(self) -> int: ...

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` (1-based) from position ``start`` on."""

    @property
    def num_items(self) -> int: ...

    @property
    def largest_latent_shape(self) -> tuple[int, ...]:
        """[B, C, F, H, W] of the largest batch (for the memory estimate)."""

    def describe(self) -> list[str]: ...


# ----------------------------------------------------------------------------- buckets from caches


@dataclass(frozen=True)
class BatchRef:
    """Where one batch comes from: its dataset, its bucket and its items."""

    dataset: int
    bucket: tuple
    items: tuple[CacheItem, ...]


def _shape_key(item: CacheItem) -> tuple:
    """The bucket key of an item: (role, shape) of each stacked tensor in its latent file, and its text width."""
    try:
        with safe_open(str(item.latent_path), "pt") as fh:
            roles = []
            for key in sorted(fh.keys()):
                parsed = _key_role(key)
                if parsed is not None and parsed[0] == "f_indices":
                    raise DataError(f"{item.latent_path}: a one-frame (fp_1f) cache; one-frame training is not "
                                    "supported by this trainer yet")
                if parsed is not None:
                    roles.append((parsed[0], tuple(fh.get_slice(key).get_shape())))
        with safe_open(str(item.text_path), "pt") as fh:
            widths = [tuple(fh.get_slice(k).get_shape())[-1] for k in fh.keys() if k.startswith("varlen_t5_")]
    except DataError:
        raise
    except Exception as exc:  # safetensors raises its own types for unreadable files
        raise DataError(f"{item.latent_path}: cannot read the cache header ({exc})") from None
    if not any(role == "latents" for role, _ in roles):
        raise DataError(f"{item.latent_path}: no latents_<F>x<H>x<W>_<dtype> key")
    if len(widths) != 1:
        raise DataError(f"{item.text_path}: expected one varlen_t5_<dtype> key")
    return tuple(roles) + (("t5_width", widths[0]),)


@dataclass
class _Dataset:
    blueprint: DatasetBlueprint
    buckets: dict[tuple, list[CacheItem]]  # key -> items, each num_repeats times


class CacheBatches:
    """The batches of a dataset config's caches (see the module docstring).

    Args:
        config: the loaded dataset TOML.
        seed: the run's seed; with the epoch number it fixes every epoch's order.
        rank, world_size: this process's part of each global batch of ``batch_size * world_size`` items.
    """

    def __init__(self, config: DatasetConfig, seed: int, rank: int = 0, world_size: int = 1):
        self.config, self.seed, self.rank, self.world_size = config, seed, rank, world_size
        self.datasets: list[_Dataset] = []
        for bp in config.datasets:
            items = find_cache_items(bp.cache_directory, video=bp.is_video) if bp.cache_directory.is_dir() else []
            if not items:
                raise DataError(f"{config.path}: {bp.key}: no latent caches with their text caches in "
                                f"{bp.cache_directory}; make the caches first (latents and text encoder outputs)")
            buckets: dict[tuple, list[CacheItem]] = {}
            for item in items:
                buckets.setdefault(_shape_key(item), []).extend([item] * bp.num_repeats)
            self.datasets.append(_Dataset(bp, dict(sorted(buckets.items()))))
        self._orders: dict[int, list[BatchRef]] = {}

    def __len__(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        return sum(-(-len(items) // self._global_batch(d)) for d in self.datasets for items in d.buckets.values())

    def _global_batch(self, d: _Dataset) -> int:
        return d.blueprint.batch_size * self.world_size

    @property
    def num_items(self) -> int:
        return sum(len(items) for d in self.datasets for items in d.buckets.values())

    @property
    def largest_latent_shape(self) -> tuple[int, ...]:
        best: tuple[int, ...] = ()
        for d in self.datasets:
            for key, items in d.buckets.items():
                shape = dict(key)["latents"]
                full = (min(d.blueprint.batch_size, len(items)), *shape)
                if not best or _volume(full) > _volume(best):
                    best = full
        return best

    def order(self, epoch: int) -> list[BatchRef]:
        """The global batches of ``epoch`` (1-based) in training order; a function of (seed, epoch, batch size
        times processes) only."""
        if epoch not in self._orders:
            refs = []
            for index, d in enumerate(self.datasets):
                rng = random.Random(f"{self.seed}/dataset{index}/epoch{epoch}")
                size = self._global_batch(d)
                for key, items in d.buckets.items():
                    shuffled = list(items)
                    rng.shuffle(shuffled)
                    refs += [BatchRef(index, key, tuple(shuffled[i:i + size])) for i in range(0, len(shuffled), size)]
            random.Random(f"{self.seed}/order/epoch{epoch}").shuffle(refs)
            self._orders = {epoch: refs}  # one epoch at a time is enough
        return self._orders[epoch]

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """This rank's part of each global batch of ``epoch`` from position ``start`` on."""
        for ref in self.order(epoch)[start:]:
            if self.world_size == 1:
                yield load_batch(ref.items)
                continue
            lo, hi = shard_range(len(ref.items), self.rank, self.world_size)
            if lo == hi:
                yield empty_batch(dict(ref.bucket)["latents"], len(ref.items), lo)
                continue
            batch = load_batch(ref.items[lo:hi])
            batch.offset, batch.global_size = lo, len(ref.items)
            yield batch

    def describe(self) -> list[str]:
        lines = []
        for d in self.datasets:
            bp = d.blueprint
            lines.append(f"{bp.key} ({bp.kind}, {bp.cache_directory}): batch size {bp.batch_size}, "
                         f"{bp.num_repeats} repeat(s)")
            for key, items in d.buckets.items():
                lines.append(f"  bucket latents {list(dict(key)['latents'])}: {len(items)} item(s)")
        per = f" of batch_size x {self.world_size} processes" if self.world_size > 1 else ""
        lines.append(f"{self.num_items} items, {len(self)} batches{per} per epoch")
        return lines


def _volume(shape: Sequence[int]) -> int:
    out = 1
    for n in shape:
        out *= n
    return out


def _stack(name: str, tensors: list[torch.Tensor | None], files: list[Path]) -> torch.Tensor | None:
    present = [t is not None for t in tensors]
    if not any(present):
        return None
    if not all(present):  # cannot happen within a bucket; guards a cache rewritten during training
        raise DataError(f"{files[present.index(False)]}: has no {name}, other items of its batch do")
    return torch.stack(tensors)


def empty_batch(latent_shape: Sequence[int], global_size: int, offset: int) -> Batch:
    """A rank's empty part (at ``offset``) of a global batch of ``global_size`` items with latents
    ``latent_shape`` [C, F, H, W]."""
    return Batch(latents=torch.zeros(0, *latent_shape), t5=[], offset=offset, global_size=global_size)


def load_batch(items: Sequence[CacheItem]) -> Batch:
    """Reads and stacks the caches of ``items`` (one bucket)."""
    latents, texts = [], []
    for item in items:
        try:
            latents.append(read_latent_cache(item.latent_path))
            texts.append(read_text_cache(item.text_path).t5)
        except CacheFileError as exc:
            raise DataError(str(exc)) from None
    files = [c.path for c in latents]
    clip = _stack("clip", [c.clip for c in latents], files)
    if clip is not None:
        if clip.dim() == 4:  # [B, n, 257, D]: one-frame mode (n = 1) or flf2v's two frames side by side
            clip = clip.flatten(1, 2)
    return Batch(
        latents=torch.stack([c.latents for c in latents]),
        t5=texts,
        image_latents=_stack("latents_image", [c.image_latents for c in latents], files),
        clip=clip,
        control_latents=_stack("latents_control", [c.control_latents for c in latents], files),
        names=[item.name.item_key for item in items],
    )


class FixedBatches:
    """Given batches in a fixed order every epoch: for tests and for callers holding tensors already."""

    def __init__(self, batches: Sequence[Batch]):
        if not batches:
            raise DataError("no batches")
        self._batches = list(batches)

    def __len__(self) -> int:
        return len(self._batches)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        yield from self._batches[start:]

    @property
    def num_items(self) -> int:
        return sum(len(b) for b in self._batches)

    @property
    def largest_latent_shape(self) -> tuple[int, ...]:
        return tuple(max((b.latents.shape for b in self._batches), key=_volume))

    def describe(self) -> list[str]:
        return [f"{self.num_items} items, {len(self)} batches per epoch (given in code)"]


class ShardedBatches:
    """Rank ``rank``'s part of each batch of another source, whose batches are taken as the global ones
    (for sources that do not cut per rank themselves, e.g. :class:`FixedBatches`)."""

    def __init__(self, source: BatchSource, rank: int, world_size: int):
        self.source, self.rank, self.world_size = source, rank, world_size

    def __len__(self) -> int:
        return len(self.source)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        for batch in self.source.batches(epoch, start):
            yield batch.shard(self.rank, self.world_size)

    @property
    def num_items(self) -> int:
        return self.source.num_items

    @property
    def largest_latent_shape(self) -> tuple[int, ...]:
        shape = self.source.largest_latent_shape
        return (-(-shape[0] // self.world_size), *shape[1:]) if shape else shape

    def describe(self) -> list[str]:
        return self.source.describe() + [f"each of {self.world_size} processes trains on its part of every batch"]

    def __getattr__(self, name: str):  # datasets etc. of the source (metadata)
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def for_rank(source: BatchSource, rank: int, world_size: int) -> BatchSource:
    """``source`` as rank ``rank`` of ``world_size`` processes reads it: a :class:`CacheBatches` cut for
    them reads its own part; any other source is sharded batch by batch."""
    if world_size == 1 or getattr(source, "world_size", None) == world_size:
        return source
    return ShardedBatches(source, rank, world_size)
