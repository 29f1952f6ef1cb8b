"""The text-encoder cache: a prompt umT5 has already encoded is not encoded again.

umT5-XXL is the slowest part of a short job after the DiT (and on an offloading profile it must be
moved to the GPU and back first), while prompts repeat: every line of a batch file and every job of
a queue usually shares its negative prompt, and a seed sweep shares both prompts. The engine asks
this cache first; only the prompts it misses reach the encoder.

An entry is keyed on the encoder's identity and the exact text:

- identity (:func:`encoder_identity`): the weights file (resolved path, size, modification time),
  the tokenizer, the weights' dtype, the device it computes on, its quantisation and how it runs
  (mmgp, FSDP), so a cached output is only ever reused where the encoder would compute the same;
- the text exactly as given (cleaning happens inside the encoder, so two spellings that clean to
  the same text are two entries: rare, and never wrong).

It is an LRU bounded by bytes (``max_bytes``; default :data:`DEFAULT_MB` MiB, 0 turns it off);
outputs are kept on the CPU so that they take no GPU memory, and every lookup returns a fresh copy
on the asked device, so a caller that modifies what it got cannot change the cache. Each prompt is
encoded alone (a batch of one, as the official pipeline does), so an output never depends on which
other prompts happened to miss with it: a job gives the same bits whether its prompts came from the
cache or not. One lock guards the table; the app's worker thread and a CLI loop may share it.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Hashable, Sequence

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads DEFAULT_MB before any model code loads
    import torch

DEFAULT_MB = 256
"""Default bound of the cache in MiB: about 64 prompt pairs of umT5-XXL in bfloat16 (a full
512-token prompt is 4 MiB, a typical one much less)."""


def _file_stamp(path: Path) -> tuple:
    """What tells one weights file (or folder of files) from another without reading it."""
    try:
        if path.is_dir():
            return tuple(sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                                for p in path.rglob("*") if p.is_file()))
        st = path.stat()
        return (st.st_size, st.st_mtime_ns)
    except OSError:
        return ("unreadable",)


def encoder_identity(path: str | os.PathLike | None, *, tokenizer: str | os.PathLike | None = None,
                     dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                     quantisation: str = "none", runs: Sequence[Hashable] = ()) -> tuple:
    """The key part naming one loaded text encoder: two encoders with the same identity give the
    same output for the same text. ``runs``: anything else that changes how it computes (mmgp
    offload, FSDP sharding)."""
    import torch
    resolved = Path(path).expanduser().resolve() if path is not None else None
    return ("umt5", str(resolved), _file_stamp(resolved) if resolved is not None else None,
            str(Path(tokenizer).expanduser().resolve()) if tokenizer is not None else None,
            str(dtype), str(torch.device(device)) if device is not None else None, quantisation, tuple(runs))


@dataclass
class Encoded:
    """What :meth:`TextEncoderCache.encode` returns: one tensor per prompt (``[L_i, dim]``, fresh
    copies the caller owns) and which of them came from the cache."""

    tensors: list[torch.Tensor]
    cached: list[bool]


class TextEncoderCache:
    """An in-memory LRU of umT5 outputs, bounded by ``max_bytes`` (see the module docstring).

    ``hits``, ``misses`` and ``encoder_calls`` count lookups and encoder runs since creation.
    """

    def __init__(self, max_bytes: int = DEFAULT_MB * 2**20):
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ValueError(f"text cache size: {max_bytes!r} is not allowed; a whole number of bytes >= 0 "
                             "(0 turns the cache off)")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.encoder_calls = 0

    # -- the table ------------------------------------------------------------------------------

    @property
    def bytes(self) -> int:
        """Bytes held now (at most ``max_bytes``)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, identity: tuple, text: str, device: str | torch.device | None = None) -> torch.Tensor | None:
        """A copy of the cached output for ``text`` on ``device`` (None: the CPU), or None."""
        with self._lock:
            stored = self._entries.get((identity, text))
            if stored is None:
                return None
            self._entries.move_to_end((identity, text))
            return stored.to(device or "cpu", copy=True)

    def put(self, identity: tuple, text: str, tensor: torch.Tensor) -> None:
        """Keeps a CPU copy of ``tensor``, evicting the least recently used entries to stay within
        ``max_bytes``; an output larger than the whole cache is not kept."""
        size = tensor.numel() * tensor.element_size()
        if size > self.max_bytes:
            return
        copy = tensor.detach().to("cpu", copy=True)
        key = (identity, text)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.numel() * old.element_size()
            while self._entries and self._bytes + size > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.numel() * evicted.element_size()
            self._entries[key] = copy
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    # -- what the engine calls ------------------------------------------------------------------

    def encode(self, encode: Callable[[list[str]], Sequence[torch.Tensor]], identity: tuple | None,
               prompts: Sequence[str], device: str | torch.device | None = None) -> Encoded:
        """Each prompt's output, from the cache or from ``encode`` (the encoder's
        ``encode_prompts``: a list of texts in, one ``[L_i, dim]`` tensor per text out), which is
        called once per distinct missing text. ``identity`` None (an encoder that cannot be named,
        e.g. training's pre-encoded prompts, or one sharded over processes that must all run it
        together) bypasses the cache: every prompt is encoded, nothing is kept."""
        import torch
        found: dict[str, torch.Tensor] = {}
        cached: list[bool] = []
        for text in prompts:
            if text in found:
                cached.append(cached[prompts.index(text)])
                continue
            hit = self.get(identity, text, device) if identity is not None and self.max_bytes else None
            if hit is None:
                with torch.no_grad():
                    out = encode([text])[0]
                with self._lock:
                    self.encoder_calls += 1
                    self.misses += identity is not None
                if identity is not None:
                    self.put(identity, text, out)
                found[text] = out if device is None else out.to(device)
                cached.append(False)
            else:
                with self._lock:
                    self.hits += 1
                found[text] = hit
                cached.append(True)
        # a text given twice gets two tensors: the caller owns each
        tensors, seen = [], set()
        for text in prompts:
            t = found[text]
            tensors.append(t.clone() if text in seen else t)
            seen.add(text)
        return Encoded(tensors, cached)


def cache_notice(names: Sequence[str], cached: Sequence[bool]) -> str | None:
    """The job's notice when the cache served some of its texts, e.g. ``"text encoder: prompt and
    negative prompt from the cache"``; None when it served none."""
    hit = [n for n, c in zip(names, cached) if c]
    if not hit:
        return None
    missed = [n for n, c in zip(names, cached) if not c]
    text = f"text encoder: {' and '.join(hit)} from the cache"
    return text + (f" ({' and '.join(missed)} encoded)" if missed else " (umT5 not run)")
