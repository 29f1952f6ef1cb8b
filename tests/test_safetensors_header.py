"""Malformed checkpoints are refused with a CheckpointError naming the file (and the tensor), never
a raw TypeError/KeyError/RecursionError, and never read: the header is checked as the official
safetensors library checks it (issue 11, item 9). Every file here is built byte by byte."""

from __future__ import annotations

import io
import json
import pickle
import struct

import pytest
import torch
from torch.serialization import MAGIC_NUMBER, PROTOCOL_VERSION

from wan.loading.files import CheckpointError, open_checkpoint, read_safetensors_header


def st_bytes(header, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file: 8-byte little-endian header length, the header (a dict as JSON, or raw
    bytes), the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype="F32", shape=(1,), offsets=(0, 4)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


FOUR = b"\x00" * 4
CASES = {  # name: (file bytes, what the message must say after the file name)
    "absurd header length": (st_bytes({}, length=2**63), "more than the 100000000"),
    "header not a JSON object": (st_bytes(b"[1, 2]"), "not a JSON object"),
    "header a JSON string": (st_bytes(b'"w"'), "not a JSON object"),
    "deeply nested header": (st_bytes(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), "nested too deeply"),
    "integer too long": (st_bytes(b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}',
                                  FOUR), "not valid JSON"),
    "duplicate tensor name": (st_bytes(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, '
                                       b'"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', FOUR * 2),
                              "names 'w' twice"),
    "entry not an object": (st_bytes({"w": 5}), "tensor 'w': its header entry is 5"),
    "entry without dtype": (st_bytes({"w": {"shape": [1], "data_offsets": [0, 4]}}, FOUR),
                            "tensor 'w': its header entry has no dtype"),
    "entry without offsets": (st_bytes({"w": {"dtype": "F32", "shape": [1]}}, FOUR),
                              "tensor 'w': its header entry has no data_offsets"),
    "unknown dtype": (st_bytes({"w": entry(dtype="F33")}, FOUR), "tensor 'w': unknown dtype 'F33'"),
    "dtype not a string": (st_bytes({"w": entry(dtype=4)}, FOUR), "tensor 'w': unknown dtype 4"),
    "shape not a list": (st_bytes({"w": {**entry(), "shape": "1"}}, FOUR), "tensor 'w': shape '1' is not a list"),
    "negative dimension": (st_bytes({"w": entry(shape=(-1,))}, FOUR), "tensor 'w': shape \\[-1\\]"),
    "float dimension": (st_bytes({"w": {**entry(), "shape": [1.0]}}, FOUR), "tensor 'w': shape \\[1.0\\]"),
    "offsets not a pair": (st_bytes({"w": entry(offsets=(4,))}, FOUR),
                           "tensor 'w': data_offsets \\[4\\] is not a pair"),
    "offsets not integers": (st_bytes({"w": {**entry(), "data_offsets": ["0", "4"]}}, FOUR),
                             "not a pair of non-negative"),
    "offsets reversed": (st_bytes({"w": entry(offsets=(4, 0))}, FOUR),
                         "tensor 'w': data_offsets \\[4, 0\\] end before"),
    "bytes not dtype x shape": (st_bytes({"w": entry(shape=(2,), offsets=(0, 4))}, FOUR),
                                "tensor 'w': data_offsets \\[0, 4\\] hold 4 bytes; F32 of shape \\(2,\\) needs 8"),
    "overlapping tensors": (st_bytes({"a": entry(shape=(2,), offsets=(0, 8)), "b": entry(offsets=(4, 8))}, FOUR * 2),
                            "tensor 'b': data_offsets \\[4, 8\\] overlap those of tensor 'a'"),
    "same bytes twice": (st_bytes({"a": entry(), "b": entry()}, FOUR), "tensor '[ab]'.* overlap"),
    "gap between tensors": (st_bytes({"a": entry(), "b": entry(offsets=(8, 12))}, FOUR * 3),
                            "tensor 'b': data_offsets \\[8, 12\\] leave 4 bytes unaccounted for after tensor 'a'"),
    "data not at the start": (st_bytes({"a": entry(offsets=(4, 8))}, FOUR * 2), "after the start of the data"),
    "bytes after the last tensor": (st_bytes({"a": entry()}, FOUR * 2), "4 bytes after the last tensor"),
    "metadata not strings": (st_bytes({"__metadata__": {"n": 1}, "a": entry()}, FOUR), "__metadata__ must map"),
    "metadata not an object": (st_bytes({"__metadata__": [1], "a": entry()}, FOUR), "__metadata__ must map"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, name):
    data, says = CASES[name]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for read in (open_checkpoint, read_safetensors_header):  # the loaders and the LoRA listing
        with pytest.raises(CheckpointError, match=f"bad.safetensors: .*{says}") as e:
            read(path)
        assert type(e.value) is CheckpointError


def test_offsets_must_tile_the_data_exactly(tmp_path):
    """The offsets, not the order of the names, must tile the data (as the official library sorts
    them); zero-size tensors take no bytes. Overlapping ones used to be read; data or a header
    beyond the end of the file were refused already."""
    a, b = torch.arange(3, dtype=torch.float32), torch.tensor([7, 8], dtype=torch.int16)
    header = {"z": entry(shape=(0,), offsets=(0, 0)), "b": entry("I16", (2,), (12, 16)),
              "a": entry("F32", (3,), (0, 12)), "__metadata__": {"k": "v"}}
    path = tmp_path / "ok.safetensors"
    path.write_bytes(st_bytes(header, a.numpy().tobytes() + b.numpy().tobytes()))
    ckpt = open_checkpoint(path)
    assert torch.equal(ckpt.tensor("a"), a) and torch.equal(ckpt.tensor("b"), b) and ckpt.shape("z") == (0,)
    assert ckpt.metadata == {"k": "v"}
    header["b"] = entry("I16", (2,), (10, 14))  # two bytes inside a, two of its own
    path.write_bytes(st_bytes(header, a.numpy().tobytes() + b.numpy().tobytes()[:2]))
    with pytest.raises(CheckpointError, match="ok.safetensors: tensor 'b': .*overlap those of tensor 'a'"):
        open_checkpoint(path)
    path.write_bytes(st_bytes({"a": entry(shape=(1000,), offsets=(0, 4000))}, FOUR))
    with pytest.raises(CheckpointError, match="ok.safetensors: truncated: the header announces 4"):
        open_checkpoint(path)
    path.write_bytes(st_bytes({}, length=1000))
    with pytest.raises(CheckpointError, match="ok.safetensors: not a safetensors file or truncated"):
        open_checkpoint(path)


def _legacy_pth(objects: list) -> bytes:
    """torch's legacy (non-zip) .pth layout: magic, protocol, system info, the object, storage keys."""
    out = io.BytesIO()
    for obj in (MAGIC_NUMBER, PROTOCOL_VERSION, {"protocol_version": PROTOCOL_VERSION, "little_endian": True,
                                                 "type_sizes": {"short": 2, "int": 4, "long": 4}}, *objects):
        pickle.dump(obj, out, protocol=2)
    return out.getvalue()


def test_damaged_pth_is_a_checkpoint_error(tmp_path):
    """What torch.load raises from deep inside on a damaged file (here an AssertionError: a storage
    key without its storage) comes out as a CheckpointError naming the file."""
    path = tmp_path / "damaged.pth"
    path.write_bytes(_legacy_pth([{"w": 1}, ["0"]]))
    with pytest.raises(CheckpointError, match="damaged.pth: not a readable PyTorch file.*storage key"):
        open_checkpoint(path)
    torch.save({1: torch.zeros(2)}, tmp_path / "numbered.pth")  # tensors under numbers, not names
    with pytest.raises(CheckpointError, match="numbered.pth: a tensor is stored under 1, not a name"):
        open_checkpoint(tmp_path / "numbered.pth")


def test_a_name_given_twice_inside_an_entry_or_the_metadata_is_refused(tmp_path):
    """The fast parse hides repeated names; the raw-text counts send such headers to the strict one."""
    from wan.loading.files import CheckpointError, read_safetensors_header
    cases = {
        "entry": b'{"w": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
        "metadata": b'{"__metadata__": {"a": "1", "a": "2"}, "w": {"dtype": "F32", "shape": [1], '
                    b'"data_offsets": [0, 4]}}',
        "metadata key": b'{"__metadata__": {"a": "1"}, "__metadata__": {"b": "2"}, "w": {"dtype": "F32", '
                        b'"shape": [1], "data_offsets": [0, 4]}}',
    }
    for name, header in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
        with pytest.raises(CheckpointError, match="twice"):
            read_safetensors_header(path)
    fine = b'{"__metadata__": {"note": "\\"dtype\\" in a value"}, "w": {"dtype": "F32", "shape": [1], ' \
           b'"data_offsets": [0, 4]}}'
    path = tmp_path / "fine.safetensors"
    path.write_bytes(len(fine).to_bytes(8, "little") + fine + b"\0" * 4)
    assert read_safetensors_header(path)[0]["__metadata__"] == {"note": '"dtype" in a value'}
