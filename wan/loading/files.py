"""Read-only, lazy access to the tensors of a checkpoint, whatever its file layout.

A checkpoint is one file (``.safetensors``, ``.pth``/``.pt``/``.bin``/``.ckpt``), a list of shard
files, or a folder (official or diffusers: ``config.json`` + one file or shards + an index json).
Tensors are read one at a time on demand, so a loader can convert and place each tensor before the
next one is read: peak memory stays near the size of the finished model, never two copies.

``.pth`` files are read with ``torch.load(weights_only=True)`` (no arbitrary pickle is ever
executed) and memory-mapped where the file format allows it.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
# Wrapper keys that some training scripts put around the real state dict in a .pth file.
_NESTED_STATE_KEYS = ("state_dict", "model", "module", "model_state_dict")


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and what was expected."""


@dataclass
class Checkpoint:
    """The tensors of one checkpoint, read lazily.

    Attributes:
        files: the files that hold the tensors (one, or the shards).
        root: the folder or file the user named.
        config: the parsed ``config.json`` beside the weights, if any (never trusted over shapes).
        metadata: safetensors ``__metadata__`` of the first file, if any.
    """

    files: list[Path]
    root: Path
    config: dict | None = None
    metadata: dict = field(default_factory=dict)
    _index: dict[str, "_TensorRef"] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self._index)

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._index[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._index[key].dtype

    def file_of(self, key: str) -> Path:
        return self._index[key].file

    def tensor(self, key: str) -> torch.Tensor:
        """Reads one tensor (a fresh CPU tensor, or a memory-mapped one for ``.pth``)."""
        return self._index[key].read()

    def nbytes(self) -> int:
        """Total size of the tensor data."""
        return sum(r.nbytes for r in self._index.values())


@dataclass
class _TensorRef:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Opening


def open_checkpoint(path: str | os.PathLike | Sequence[str | os.PathLike],
                    subfolder: str | None = None) -> Checkpoint:
    """Opens a checkpoint given as a file, a list of shard files, or a folder.

    Args:
        path: file, folder, or list of files.
        subfolder: for folders, a subfolder to prefer when it exists (``"transformer"`` for a
            diffusers pipeline folder, ``"vae"``, ...).
    """
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        if not files:
            raise CheckpointError("checkpoint: an empty list of files was given")
        return _open_files(files, root=files[0].parent)
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint {root}: no such file or folder")
    if root.is_dir():
        return _open_folder(root, subfolder)
    return _open_files([root], root=root)


def _open_folder(folder: Path, subfolder: str | None) -> Checkpoint:
    if subfolder and (folder / subfolder).is_dir():
        folder = folder / subfolder
    config = _read_json(folder / "config.json") if (folder / "config.json").exists() else None
    indexes = sorted(folder.glob("*.index.json"))
    if indexes:
        files = files_from_index(indexes[0])
    else:
        files = sorted(p for p in folder.iterdir() if p.suffix in SAFETENSORS_SUFFIXES)
        if not files:
            files = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files:
        raise CheckpointError(
            f"checkpoint folder {folder}: no weights found (expected .safetensors files, shards with "
            f"an *.index.json, or a .pth file)")
    ckpt = _open_files(files, root=folder)
    ckpt.config = config
    return ckpt


def files_from_index(index_path: Path) -> list[Path]:
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"shard index {index_path}: no 'weight_map' table inside")
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (index_path.parent / n).exists()]
    if missing:
        raise CheckpointError(
            f"shard index {index_path} lists {len(names)} shard files; missing: {', '.join(missing)} "
            f"(expected beside the index in {index_path.parent})")
    return [index_path.parent / n for n in names]


def _open_files(files: list[Path], root: Path) -> Checkpoint:
    ckpt = Checkpoint(files=files, root=root)
    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint shard {f}: no such file")
        if f.suffix in SAFETENSORS_SUFFIXES:
            refs, meta = _index_safetensors(f)
            if not ckpt.metadata and meta:
                ckpt.metadata = meta
        elif f.suffix in PICKLE_SUFFIXES:
            refs = _index_pickle(f)
        else:
            raise CheckpointError(
                f"checkpoint {f}: unknown file type '{f.suffix}' (allowed: "
                f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)})")
        dup = set(refs) & set(ckpt._index)
        if dup:
            raise CheckpointError(f"checkpoint shard {f}: tensor {sorted(dup)[0]} is also in another shard")
        ckpt._index.update(refs)
    return ckpt


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# safetensors

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Bits per element of every dtype the safetensors format names (for byte counts; the ones torch
# cannot hold are refused when read, in ``_index_safetensors``).
_ST_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6,
    "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # the official library's limit; real headers are a few MB at most


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """Returns the parsed header and the byte offset where tensor data starts.

    The header is checked as the official library checks it, before anything is allocated for the
    data: its length within the file and 100 MB, a JSON object without duplicate names, every entry
    with a known dtype, a shape of non-negative integers and data_offsets whose byte count is
    dtype x shape, the tensors' data packed back to back from the start with no overlap or gap, and
    exactly filling the rest of the file (a truncated download is reported before anything is read).
    Every problem is a CheckpointError naming the file (and the tensor).
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"checkpoint {path}: file is {size} bytes, too short for a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"checkpoint {path}: not a safetensors file (its first 8 bytes announce a header of {n} bytes, "
                f"more than the {MAX_HEADER_BYTES} a safetensors header may have)")
        if n > size - 8:
            raise CheckpointError(
                f"checkpoint {path}: not a safetensors file or truncated (header of {n} bytes announced, "
                f"file has {size} bytes)")
        header = _parse_header(path, fh.read(n))
    data_start = 8 + n
    end = _check_entries(path, header)
    if data_start + end > size:
        raise CheckpointError(
            f"checkpoint {path}: truncated: the header announces {data_start + end} bytes, the file has "
            f"{size} (re-download it)")
    if data_start + end < size:
        raise CheckpointError(
            f"checkpoint {path}: {size - data_start - end} bytes after the last tensor's data (the header "
            f"accounts for {data_start + end} of {size} bytes): corrupted file")
    return header, data_start


class _DuplicateName(Exception):
    pass


def _object(pairs: list) -> dict:
    """json object hook: refuses a name given twice (the second would hide the first's bytes)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set = set()
        raise _DuplicateName(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return obj


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"checkpoint {path}: safetensors header is not UTF-8 text (corrupted file?)") from None
    if not text.lstrip().startswith("{"):
        raise CheckpointError(f"checkpoint {path}: safetensors header is not a JSON object (corrupted file, "
                              f"or not a safetensors file)")
    try:
        header = json.loads(text)  # the C parser; names given twice are looked for below
        if isinstance(header, dict) and _may_repeat_a_name(text, header):
            header = json.loads(text, object_pairs_hook=_object)  # finds and names the repeated name
    except RecursionError:
        raise CheckpointError(f"checkpoint {path}: safetensors header is nested too deeply (a real one is "
                              f"3 levels deep): corrupted or crafted file") from None
    except _DuplicateName as e:
        raise CheckpointError(f"checkpoint {path}: safetensors header names {_name(e.args[0])} twice") from None
    except ValueError as e:  # JSONDecodeError, or an integer too long to convert
        raise CheckpointError(
            f"checkpoint {path}: safetensors header is not valid JSON (corrupted file?): {str(e)[:200]}") from None
    if not isinstance(header, dict):  # e.g. "{} []": caught above as extra data; kept for safety
        raise CheckpointError(f"checkpoint {path}: safetensors header is not a JSON object")
    return header


def _may_repeat_a_name(text: str, header: dict) -> bool:
    """False when no JSON object of the header can name a key twice (which ``json.loads`` would hide,
    keeping the last): each entry field appears once per tensor in the raw text, ``__metadata__`` at
    most once, and the metadata object parsed alone has no repeated name. True means "look closely"
    (a metadata value that merely contains ``"dtype"`` also says so). Counting the raw text is much
    faster than a Python hook called for every entry of a ~1,500-tensor header."""
    tensors = len(header) - ("__metadata__" in header)
    if any(text.count(field) != tensors for field in ('"dtype"', '"shape"', '"data_offsets"')):
        return True
    meta_at = text.find('"__metadata__"')
    if meta_at < 0:
        return False
    if text.count('"__metadata__"') != 1:
        return True
    start = text.find("{", meta_at)
    try:
        meta, _ = json.JSONDecoder(object_pairs_hook=_object).raw_decode(text, start)
    except (_DuplicateName, ValueError):
        return True
    return meta != header.get("__metadata__")


def _name(key, limit: int = 80) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _check_entries(path: Path, header: dict) -> int:
    """Checks every entry of a parsed header; returns the byte count of the data section."""
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"checkpoint {path}: safetensors __metadata__ must map names to strings, "
                              f"got {_name(meta)}")
    end = _well_formed_end(header)
    if end is not None:
        return end
    return _checked_entries_end(path, header)


_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}


def _well_formed_end(header: dict) -> int | None:
    """The data section's byte count when every entry is well formed and the tensors lie back to
    back from 0; None at the first doubt, for :func:`_checked_entries_end` to find and name the
    problem. The common case in few passes over flat lists: a folder scan reads hundreds of headers
    of ~1,500 entries each. Types are checked before any arithmetic (a crafted shape of strings
    must never be multiplied out)."""
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if type(info) is not dict or not _ENTRY_FIELDS <= info.keys():
            return None
        shape, offsets = info["shape"], info["data_offsets"]
        if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
            return None
        entries.append((info["dtype"], shape, offsets))
    ints = [v for _, shape, offsets in entries for v in (*offsets, *shape)]
    if ints and (set(map(type, ints)) != {int} or min(ints) < 0):
        return None
    spans = []
    for dtype, shape, (start, end) in entries:
        bits = _ST_DTYPE_BITS.get(dtype) if type(dtype) is str else None
        if bits is None:
            return None
        for d in shape:
            bits *= d
        if bits % 8 or end - start != bits // 8:
            return None
        spans.append((start, end))
    spans.sort()
    pos = 0
    for start, end in spans:
        if start != pos:
            return None
        pos = end
    return pos


def _checked_entries_end(path: Path, header: dict) -> int:
    """Checks each entry in turn and raises a CheckpointError naming the first bad one; returns the
    byte count of the data section."""
    spans = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        where = f"checkpoint {path}: tensor {_name(key)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: its header entry is {_name(info)}, not an object with dtype, "
                                  f"shape and data_offsets")
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        if missing:
            raise CheckpointError(f"{where}: its header entry has no {', '.join(missing)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ST_DTYPE_BITS:
            raise CheckpointError(f"{where}: unknown dtype {_name(dtype)} (safetensors dtypes: "
                                  f"{', '.join(_ST_DTYPE_BITS)})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CheckpointError(f"{where}: shape {_name(shape)} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {_name(offsets)} is not a pair of non-negative integers")
        start, end = offsets
        if end < start:
            raise CheckpointError(f"{where}: data_offsets [{start}, {end}] end before they start")
        bits = _ST_DTYPE_BITS[dtype]
        for d in shape:
            bits *= d
        if bits % 8 or end - start != bits // 8:
            need = f"{bits // 8} bytes" if bits % 8 == 0 else f"{bits} bits, not a whole number of bytes"
            raise CheckpointError(f"{where}: data_offsets [{start}, {end}] hold {end - start} bytes; "
                                  f"{dtype} of shape {tuple(shape)} needs {need}")
        spans.append((start, end, key))
    spans.sort()
    pos, prev = 0, None
    for start, end, key in spans:  # back to back from 0, as the official library requires
        if start < pos:
            raise CheckpointError(f"checkpoint {path}: tensor {_name(key)}: data_offsets [{start}, {end}] overlap "
                                  f"those of tensor {_name(prev)} (which end at {pos}): corrupted or crafted file")
        if start > pos:
            after = f"tensor {_name(prev)}" if prev is not None else "the start of the data"
            raise CheckpointError(f"checkpoint {path}: tensor {_name(key)}: data_offsets [{start}, {end}] leave "
                                  f"{start - pos} bytes unaccounted for after {after}: corrupted file")
        pos, prev = end, key
    return pos


def _index_safetensors(path: Path) -> tuple[dict[str, _TensorRef], dict]:
    header, data_start = read_safetensors_header(path)
    meta = header.pop("__metadata__", None) or {}
    refs: dict[str, _TensorRef] = {}
    for key, info in header.items():
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"checkpoint {path}: tensor {key} has dtype {info['dtype']}, which this loader "
                                  f"does not read (it reads {', '.join(ST_DTYPES)})")
        start, end = info["data_offsets"]
        refs[key] = _TensorRef(path, tuple(info["shape"]), dtype,
                               functools.partial(_read_tensor, path, data_start + start, end - start,
                                                 tuple(info["shape"]), dtype))
    return refs, meta


def _read_tensor(path: Path, offset: int, nbytes: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Reads one tensor with a positioned read into a fresh buffer.

    Not memory-mapped on purpose: pages of a mapped file count in the process's resident memory
    for as long as the mapping lives, so mapping a checkpoint while building the model from it
    would hold the weights twice. A plain read leaves them in the page cache only.
    """
    out = torch.empty(shape, dtype=dtype)
    buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else bytearray(0)
    if len(buf) != nbytes:
        raise CheckpointError(f"checkpoint {path}: tensor at offset {offset} has {nbytes} bytes, its shape needs {len(buf)}")
    with open(path, "rb", buffering=0) as fh:
        fh.seek(offset)
        view, done = memoryview(buf), 0
        while done < nbytes:
            n = fh.readinto(view[done:])
            if not n:
                raise CheckpointError(f"checkpoint {path}: truncated while reading (re-download it)")
            done += n
    return out


# ---------------------------------------------------------------------------------------------
# .pth (weights_only pickle)


def _index_pickle(path: Path) -> dict[str, _TensorRef]:
    state = load_pickle_weights(path)
    refs = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue  # plain values (step counters, version strings) carry no weights
        if not isinstance(key, str):
            raise CheckpointError(f"checkpoint {path}: a tensor is stored under {_name(key)}, not a name")
        refs[key] = _TensorRef(path, tuple(t.shape), t.dtype, (lambda t=t: t))
    if not refs:
        raise CheckpointError(f"checkpoint {path}: holds no tensors")
    return refs


def load_pickle_weights(path: Path) -> dict[str, torch.Tensor]:
    """Loads a ``.pth`` state dict safely: ``weights_only=True``, memory-mapped if possible.

    A file that needs arbitrary Python objects to unpickle is refused, never executed. Whatever a
    damaged file makes torch raise (KeyError, IndexError, struct.error, ... from deep inside) comes
    out as a CheckpointError naming the file.
    """
    try:
        is_zip = zipfile.is_zipfile(path)
        # mmap needs the zip format of torch.save (the default since torch 1.6).
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as e:
        # the weights-only unpickler's refusal (a global other than the tensor types, or an opcode it
        # does not run: a crafted or a damaged pickle alike); nothing of the file was executed
        raise CheckpointError(
            f"checkpoint {path}: refused: it contains Python objects other than tensors, which could run "
            f"code when loaded, or it is damaged; it was not executed ({_unpickling_reason(e)})") from None
    except Exception as e:  # noqa: BLE001  any other failure inside torch.load is a damaged file
        raise CheckpointError(
            f"checkpoint {path}: not a readable PyTorch file, or truncated "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'no details'})") from None
    return _unwrap_state(state, path)


def _unpickling_reason(e: Exception) -> str:
    """The one informative line of torch's weights-only refusal (its message is mostly advice)."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in str(e).splitlines():
        if "WeightsUnpickler error:" in line:
            line = line.split("WeightsUnpickler error:", 1)[1]
        line = line.strip()
        if line and not line.startswith(boiler):
            return line[:200]
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def _unwrap_state(state, path: Path) -> dict:
    """The state dict, out of the wrapper keys training scripts put around it (a few levels at most)."""
    for _ in range(8):
        if not isinstance(state, dict):
            raise CheckpointError(f"checkpoint {path}: expected a dict of tensors, found {type(state).__name__}")
        inner = next((state[k] for k in _NESTED_STATE_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None or any(isinstance(v, torch.Tensor) for v in state.values()):
            return state
        state = inner
    raise CheckpointError(f"checkpoint {path}: the state dict is wrapped in more than 8 levels of "
                          f"{'/'.join(_NESTED_STATE_KEYS)}: not a checkpoint this loader reads")


# ---------------------------------------------------------------------------------------------
# Building a module from tensors without a second copy


def weight_reader(ckpt: Checkpoint, key: str,
                  transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Callable[[], torch.Tensor]:
    """A reader for one tensor that undoes ComfyUI fp8 storage, then applies ``transform``.

    fp8 tensors are upcast to float32; a ``<layer>.weight`` is multiplied by ``<layer>.scale_weight``
    when that exists (the scale belongs to the weight only, never to the bias).
    """
    scale_key = key[: -len(".weight")] + ".scale_weight" if key.endswith(".weight") else None

    def read() -> torch.Tensor:
        t = ckpt.tensor(key)
        if t.dtype in FP8_DTYPES:
            t = t.float()
        if scale_key and scale_key in ckpt:
            t = t.float() * ckpt.tensor(scale_key).float()
        return transform(t) if transform else t
    return read


def check_materialized(module: torch.nn.Module, source: str) -> None:
    """Fails clearly if a tensor was left on the meta device (a buffer transformers keeps outside
    the state dict that the model's ``init_constants`` does not rebuild yet)."""
    left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{source}: tensors without values after loading: {', '.join(left[:5])} "
                           f"(a transformers buffer outside the state dict; rebuild it after loading)")




def materialize(factory: Callable[[], torch.nn.Module],
                tensors: Iterable[tuple[str, Callable[[], torch.Tensor]]],
                *, device: str | torch.device, dtype: torch.dtype,
                keep_fp32: Callable[[str], bool] = lambda name: False,
                keep_dtype: Callable[[str], bool] = lambda name: False,
                source: str = "checkpoint") -> torch.nn.Module:
    """Builds a module on the meta device and fills it tensor by tensor.

    Each tensor is read, converted to its target dtype and device, and assigned before the next
    one is read, so peak memory is the finished model plus one tensor.

    Args:
        factory: builds the module (called under ``torch.device("meta")``; the module must keep no
            buffers that are absent from its state dict).
        tensors: ``(module key, reader)`` pairs, readers return tensors already in module layout.
        device, dtype: placement and floating dtype of the result.
        keep_fp32: names of parameters that stay float32 whatever ``dtype`` is.
        keep_dtype: names of tensors kept in the dtype they are read in (fp8 weights kept quantised).
        source: the checkpoint's name, for error messages.
    """
    with torch.device("meta"):
        module = factory()
    expected = dict(module.state_dict(keep_vars=True))
    seen: set[str] = set()
    for name, read in tensors:
        if name not in expected:
            raise CheckpointError(f"{source}: unexpected tensor '{name}' for {type(module).__name__}")
        t = read()
        want = expected[name]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(t.shape)}, the model expects {tuple(want.shape)}")
        if keep_dtype(name):
            t = t.to(device=device)
        elif t.is_floating_point():
            t = t.to(device=device, dtype=torch.float32 if keep_fp32(name) else dtype)
        else:
            t = t.to(device=device)
        _assign(module, name, t)
        seen.add(name)
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{source}: missing {len(missing)} tensors for {type(module).__name__}: {', '.join(missing[:5])}{more}")
    module.eval()
    module.requires_grad_(False)
    return module


def _assign(module: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


# ---------------------------------------------------------------------------------------------
# Recognising a file again


FINGERPRINT_BYTES = 1 << 20  # read from each end of a file


def file_fingerprint(path: str | os.PathLike) -> dict:
    """``{"path", "size", "fingerprint"}`` of a checkpoint file or folder, cheap whatever its size:
    BLAKE2b of the size and the first and last MiB of each file (a folder's files in name order).
    Enough to tell that a file was replaced or rewritten since an output was made; not a checksum
    of every byte. A missing path gives ``size`` and ``fingerprint`` None."""
    import hashlib
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    digest = hashlib.blake2b(digest_size=16)
    total = 0
    try:
        for f in files:
            size = f.stat().st_size
            total += size
            digest.update(f"{f.relative_to(root) if root.is_dir() else f.name}:{size};".encode("utf-8", "replace"))
            with open(f, "rb") as fh:
                digest.update(fh.read(FINGERPRINT_BYTES))
                if size > 2 * FINGERPRINT_BYTES:
                    fh.seek(size - FINGERPRINT_BYTES)
                    digest.update(fh.read(FINGERPRINT_BYTES))
    except OSError:
        return {"path": str(path), "size": None, "fingerprint": None}
    return {"path": str(path), "size": total, "fingerprint": digest.hexdigest()}


def changed_files(recorded: dict) -> list[str]:
    """The roles of ``recorded`` (role -> ``file_fingerprint`` dict, from an output's metadata)
    whose file is missing now or differs, each in words: ``"vae: /x/vae.safetensors changed"``."""
    out = []
    for role, entry in sorted((recorded or {}).items()):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        now = file_fingerprint(entry["path"])
        if now["size"] is None:
            out.append(f"{role}: {entry['path']} is missing")
        elif (now["size"], now["fingerprint"]) != (entry.get("size"), entry.get("fingerprint")):
            out.append(f"{role}: {entry['path']} changed since the output was made")
    return out
