"""LoRA folder scan (header only) and presets (save/load/delete/list, .lset, unsafe names)."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from wan.lora import library
from wan.lora.library import (
    FAMILY_FOLDERS,
    delete_preset,
    list_presets,
    load_preset,
    resolve_lora,
    save_preset,
    scan_loras,
)


@pytest.fixture(autouse=True)
def _fresh_cache():
    library.clear_cache()
    yield
    library.clear_cache()


def _write_lora(path, rank, metadata=None, layout="musubi"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if layout == "musubi":
        sd = {"lora_unet_blocks_0_self_attn_q.lora_down.weight": torch.zeros(rank, 16),
              "lora_unet_blocks_0_self_attn_q.lora_up.weight": torch.zeros(16, rank),
              "lora_unet_blocks_0_self_attn_q.alpha": torch.tensor(float(rank))}
    else:
        sd = {"diffusion_model.blocks.0.self_attn.q.lora_A.weight": torch.zeros(rank, 16, dtype=torch.bfloat16),
              "diffusion_model.blocks.0.self_attn.q.lora_B.weight": torch.zeros(16, rank, dtype=torch.bfloat16)}
    save_file(sd, str(path), metadata=metadata)


def test_scan_reads_rank_size_and_metadata(tmp_path):
    t2v = tmp_path / FAMILY_FOLDERS["wan2.1-t2v-1.3B"]
    tags = {"ds1": {"neon city": 5, "rain": 2}, "ds2": {"rain": 4, "night": 1}}
    _write_lora(t2v / "style" / "neon.safetensors", 8, {"ss_tag_frequency": json.dumps(tags)})
    _write_lora(t2v / "plain.safetensors", 4, {"modelspec.trigger_phrase": "sks dog, dog",
                                                "description": "A dog."}, layout="comfy")
    _write_lora(tmp_path / FAMILY_FOLDERS["wan2.2-a14b"] / "big.safetensors", 32)
    (t2v / "notes.txt").write_text("ignored")

    infos = scan_loras(tmp_path, "wan2.1-t2v-1.3B")
    assert [i.name for i in infos] == ["plain", "style/neon"]
    plain, neon = infos
    assert plain.rank == 4 and neon.rank == 8
    assert plain.size_bytes == (t2v / "plain.safetensors").stat().st_size
    assert plain.trigger_words == ("sks dog", "dog") and plain.description == "A dog."
    # tag totals over datasets: rain 6, neon city 5, night 1
    assert neon.trigger_words == ("rain", "neon city", "night") and neon.description is None
    assert all(i.family == "wan2.1-t2v-1.3B" and i.error is None for i in infos)

    every = scan_loras(tmp_path)
    assert [(i.family, i.name, i.rank) for i in every] == [
        ("wan2.1-t2v-1.3B", "plain", 4), ("wan2.1-t2v-1.3B", "style/neon", 8), ("wan2.2-a14b", "big", 32)]
    assert scan_loras(tmp_path, "wan2.2-ti2v-5B") == []
    with pytest.raises(ValueError, match="family 'wan9'"):
        scan_loras(tmp_path, "wan9")


def test_scan_lists_corrupt_file_and_refreshes(tmp_path, monkeypatch):
    folder = tmp_path / FAMILY_FOLDERS["wan2.1-t2v-14B"]
    _write_lora(folder / "a.safetensors", 4)
    good = folder / "a.safetensors"
    bad = folder / "broken.safetensors"
    bad.write_bytes(good.read_bytes()[:-10])  # truncated download

    infos = {i.name: i for i in scan_loras(tmp_path, "wan2.1-t2v-14B")}
    assert infos["a"].rank == 4 and infos["a"].error is None
    assert infos["broken"].rank is None and "truncated" in infos["broken"].error

    # A second scan of unchanged files reads no header (cache keyed by path, mtime, size).
    calls = []
    real = library.read_safetensors_header
    monkeypatch.setattr(library, "read_safetensors_header", lambda p: calls.append(p) or real(p))
    scan_loras(tmp_path, "wan2.1-t2v-14B")
    assert calls == []
    # Replacing a file is seen by the next scan (refresh = rescan).
    _write_lora(good, 16)
    os.utime(good, ns=(1, 1))
    infos = {i.name: i for i in scan_loras(tmp_path, "wan2.1-t2v-14B")}
    assert infos["a"].rank == 16 and len(calls) == 1


def test_presets_roundtrip_list_delete(tmp_path):
    assert list_presets(tmp_path) == []
    path = save_preset(tmp_path, "My look", [("style/neon", "1,0.5;0"), ("plain", 0.8)], prompt="a city")
    assert path == (tmp_path / "presets" / "My look.json").resolve()
    save_preset(tmp_path, "second", [])
    assert list_presets(tmp_path) == ["My look", "second"]
    p = load_preset(tmp_path, "My look")
    assert p.loras == (("style/neon", "1,0.5;0"), ("plain", "0.8")) and p.prompt == "a city"
    assert load_preset(tmp_path, "second").prompt is None
    # Overwrite is atomic and leaves no temp file behind.
    save_preset(tmp_path, "My look", [("plain", "0.3")])
    assert load_preset(tmp_path, "My look").loras == (("plain", "0.3"),)
    assert sorted(f.name for f in (tmp_path / "presets").iterdir()) == ["My look.json", "second.json"]
    delete_preset(tmp_path, "second")
    assert list_presets(tmp_path) == ["My look"]
    with pytest.raises(FileNotFoundError, match="'second'"):
        delete_preset(tmp_path, "second")
    with pytest.raises(FileNotFoundError, match="'nope'"):
        load_preset(tmp_path, "nope")
    # A bad multiplier is refused before anything is written.
    with pytest.raises(ValueError, match="LoRA 'plain'.*'x'"):
        save_preset(tmp_path, "bad", [("plain", "x")])
    assert not (tmp_path / "presets" / "bad.json").exists()


def test_lset_is_read(tmp_path):
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "wangp.lset").write_text(json.dumps({
        "loras": ["detail.safetensors", "motion.safetensors", "third.safetensors"],
        "loras_mult": "# strengths\n1.0,0.5\n0;1 |",
        "prompt": "a cat", "full_prompt": "a cat"}))
    p = load_preset(tmp_path, "wangp")
    # the third LoRA has no multiplier: Wan2GP uses 1
    assert p.loras == (("detail", "1.0,0.5"), ("motion", "0;1"), ("third", "1"))
    assert p.prompt == "a cat"
    assert list_presets(tmp_path) == ["wangp"]
    (folder / "broken.lset").write_text("{not json")
    with pytest.raises(ValueError, match="broken.lset.*not valid JSON"):
        load_preset(tmp_path, "broken")


@pytest.mark.parametrize("name", ["../x", "a/b", "/etc/passwd", "", "..", ".hidden", "a\\b", "C:evil",
                                  " padded", "x\x00y"])
def test_unsafe_preset_names_refused(tmp_path, name):
    for call in (lambda: save_preset(tmp_path, name, []), lambda: load_preset(tmp_path, name),
                 lambda: delete_preset(tmp_path, name)):
        with pytest.raises(ValueError) as err:
            call()
        assert repr(name) in str(err.value) and "plain file name" in str(err.value)
    assert not (tmp_path.parent / "x.json").exists()


def test_unsafe_lora_names_refused(tmp_path):
    for bad in ("../other/x", "/abs", "a//b", "./a", "C:x"):
        with pytest.raises(ValueError, match="relative path inside its family folder"):
            save_preset(tmp_path, "p", [(bad, 1)])
        with pytest.raises(ValueError, match="relative path inside its family folder"):
            resolve_lora(tmp_path, "wan2.1-t2v-1.3B", bad)
    # A link the user put in the folder on purpose is a valid LoRA (names, not links, are policed).
    folder = tmp_path / FAMILY_FOLDERS["wan2.1-t2v-1.3B"]
    folder.mkdir()
    outside = tmp_path / "outside.safetensors"
    _write_lora(outside, 2)
    (folder / "link.safetensors").symlink_to(outside)
    assert resolve_lora(tmp_path, "wan2.1-t2v-1.3B", "link") == folder.resolve() / "link.safetensors"
    _write_lora(folder / "sub" / "ok.safetensors", 2)
    assert resolve_lora(tmp_path, "wan2.1-t2v-1.3B", "sub/ok") == folder.resolve() / "sub" / "ok.safetensors"
    with pytest.raises(FileNotFoundError, match="'missing'"):
        resolve_lora(tmp_path, "wan2.1-t2v-1.3B", "missing")
