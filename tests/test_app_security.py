"""What a browser may make the server read and write: names, uploads, request limits, served paths."""
import os
import re
from pathlib import Path

import pytest

from wan.app.security import (UPLOAD_SUFFIXES, allowed_paths, blocked_paths, check_name, check_request_paths,
                              is_inside, is_stored_upload, limits_of, store_upload, uploads_dir)
from wan.app.settings import ServerSettings
from wan.engine.request import GenerationRequest, LoraChoice, RequestError, resolve_request

EVIL_NAMES = ["../x", "..", ".", "a/b", "a\\b", "/etc/passwd", "C:x", "~root", "a\x00b", "", "x" * 121,
              "a\nb", "\u202egpj.exe", "CON", "nul.txt", ".hidden", "trailing.", " lead", "x?y", "\udc80"]
GOOD_NAMES = ["my lora v2", "style-01.safetensors", "狐狸", "x" * 120, "a.b_c-d (1)", "emoji 🦊"]


@pytest.mark.parametrize("name", EVIL_NAMES)
def test_check_name_refuses_paths_and_odd_characters(name):
    with pytest.raises(ValueError) as e:
        check_name(name, "LoRA name")
    msg = str(e.value)
    assert msg.startswith("LoRA name ") and "expected a plain name" in msg
    assert repr(name)[:60] in msg


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_check_name_accepts_ordinary_names(name):
    assert check_name(name, "preset name") == name


def test_check_name_refuses_non_strings():
    with pytest.raises(ValueError, match="job label None .*not a string"):
        check_name(None, "job label")


def test_is_inside_resolves_symlinks_and_dots(tmp_path):
    folder, outside = tmp_path / "outputs", tmp_path / "secret"
    folder.mkdir()
    outside.mkdir()
    (outside / "key.txt").write_text("k")
    (folder / "a.png").write_text("a")
    assert is_inside(folder / "a.png", folder)
    assert is_inside(folder, folder)
    assert is_inside(folder / "not_yet" / "b.png", folder)  # need not exist
    assert not is_inside(folder / ".." / "secret" / "key.txt", folder)
    assert not is_inside(tmp_path / "outputs_evil" / "x", folder)  # a shared prefix is not a parent
    (folder / "escape").symlink_to(outside, target_is_directory=True)
    (folder / "link.txt").symlink_to(outside / "key.txt")
    assert not is_inside(folder / "escape" / "key.txt", folder)
    assert not is_inside(folder / "link.txt", folder)
    # a folder given through a link is resolved too
    (tmp_path / "alias").symlink_to(folder, target_is_directory=True)
    assert is_inside(folder / "a.png", tmp_path / "alias")


def _file(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return path


UUID_FILE = re.compile(r"^[0-9a-f]{32}\.png$")


@pytest.mark.parametrize("evil", ["../../etc/passwd.png", "a/b/c.png", "..\\..\\win.PNG", "/abs/x.png"])
def test_store_upload_uses_a_random_name_inside_the_folder(tmp_path, evil):
    src = _file(tmp_path / "gradio_tmp" / "upload.bin", 1000)
    uploads = tmp_path / "state" / "uploads"
    out = store_upload(src, uploads, "image", max_bytes=10_000, original_name=evil)
    assert UUID_FILE.match(out.name), out.name
    assert out.parent == uploads.resolve() and is_inside(out, uploads)
    assert out.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in uploads.iterdir()) == [out.name]  # no temp file left
    assert not (tmp_path / "etc").exists()


def test_store_upload_names_by_content(tmp_path):
    """Same content -> the same stored file (no copy per "Add"); other content -> another name."""
    src = _file(tmp_path / "in" / "clip.MP4")
    a = store_upload(src, tmp_path / "up", "video", 100)
    b = store_upload(str(src), tmp_path / "up", "video", 100)
    assert a == b and a.suffix == ".mp4" and len(list((tmp_path / "up").iterdir())) == 1
    other = tmp_path / "in" / "other.mp4"
    other.write_bytes(b"different content")
    assert store_upload(other, tmp_path / "up", "video", 100) != a
    lora = store_upload(_file(tmp_path / "in" / "style.safetensors"), tmp_path / "up", "lora", 100)
    assert lora.suffix == ".safetensors"


def test_store_upload_refusals(tmp_path):
    up = tmp_path / "up"
    src = _file(tmp_path / "in" / "x.png", 3 * 2**20)
    with pytest.raises(ValueError) as e:
        store_upload(src, up, "image", max_bytes=2 * 2**20)
    assert "3.0 MB" in str(e.value) and "2.0 MB" in str(e.value) and "--max_upload_mb" in str(e.value)
    for name, kind in (("payload.exe", "image"), ("movie.png", "video"), ("noext", "image"),
                       ("model.ckpt", "lora"), ("shell.png.sh", "image"), (".png", "image")):
        with pytest.raises(ValueError) as e:
            store_upload(src, up, kind, max_bytes=10 * 2**20, original_name=name)
        msg = str(e.value)
        assert repr(name) in msg and kind in msg and ", ".join(UPLOAD_SUFFIXES[kind]) in msg
    with pytest.raises(ValueError, match="upload kind 'script' is unknown"):
        store_upload(src, up, "script", 10 * 2**20)
    with pytest.raises(ValueError, match="is empty"):
        store_upload(_file(tmp_path / "in" / "empty.png", 0), up, "image", 100)
    with pytest.raises(ValueError, match="not a readable file"):
        store_upload(tmp_path / "in" / "missing.png", up, "image", 100)
    assert not up.exists() or list(up.iterdir()) == []


def test_limits_apply_to_the_resolved_request():
    """Limits are compared after defaults are filled and sizes derived: a width alone, with the
    model's default height, is over the pixel limit too (it used to pass: only given pairs were
    compared). The server's settings set the limits (limits_of)."""
    s = ServerSettings(max_frames=81, max_pixels=832 * 480)
    limits = limits_of(s)
    ok = GenerationRequest(model="test-tiny-t2v", prompt="a fox", frames=81, width=832, height=480, steps=50)
    resolve_request(ok, limits=limits)
    resolve_request(GenerationRequest(model="test-tiny-t2v"), limits=limits)

    def refused(**changes):
        req = ok.replace(**changes)
        with pytest.raises(RequestError) as e:
            resolve_request(req, limits=limits, check_files=False)
        return e.value

    e = refused(frames=85)
    assert (e.field, e.value) == ("frames", 85) and "at most 81 frames (--max_frames)" in str(e)
    e = refused(width=1280, height=720)
    assert e.field == "width" and "1280x720" in str(e) and str(832 * 480) in str(e) and "--max_pixels" in str(e)
    e = refused(width=1_000_000, height=None)  # the model's default height fills in
    assert e.field == "width" and "1000000x64" in str(e)
    e = refused(steps=201)
    assert (e.field, e.value) == ("steps", 201) and "at most 200 steps" in str(e)
    e = refused(prompt="fox " * 2501)
    assert e.field == "prompt" and "10004" in str(e) and len(str(e)) < 400  # the value is echoed cut short
    e = refused(negative_prompt="n" * 10_001)
    assert e.field == "negative_prompt"
    e = refused(model="test-tiny-vace", task="vace", ref_images=[f"r{i}.png" for i in range(17)])
    assert e.field == "ref_images" and "17" in str(e) and "at most 16" in str(e)
    e = refused(loras=[LoraChoice(f"l{i}") for i in range(9)])
    assert e.field == "loras" and "at most 8 LoRAs" in str(e)
    # a value of the wrong type is refused by type, before any arithmetic ("x" * 10**9)
    assert refused(width="x", height=10**9).field == "width"
    assert refused(prompt=["a"]).field == "prompt"


def test_check_request_paths(tmp_path):
    s = ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"),
                       lora_dir=str(tmp_path / "loras"))
    up = store_upload(_file(tmp_path / "g" / "x.png"), uploads_dir(s), "image", 100)
    result = _file(tmp_path / "out" / "old.png")
    ok = GenerationRequest(model="m", image=str(up), end_image=str(result), output_dir=s.output_dir,
                           loras=[LoraChoice("style/anime_v2"), LoraChoice("x.safetensors")])
    check_request_paths(ok, s)
    check_request_paths(ok.replace(output_dir=str(tmp_path / "out" / "sub")), s)
    lora_up = store_upload(_file(tmp_path / "g" / "l.safetensors"), uploads_dir(s), "lora", 100)
    assert is_stored_upload(lora_up, s) and not is_stored_upload(result, s)
    check_request_paths(ok.replace(loras=[LoraChoice(str(lora_up))]), s)
    for field, changes in (("image", {"image": "/etc/passwd"}),
                           ("image", {"image": str(uploads_dir(s) / ".." / ".." / "g" / "x.png")}),
                           ("ref_images", {"ref_images": [str(up), str(tmp_path / "g" / "x.png")]}),
                           ("output_dir", {"output_dir": str(tmp_path)}),
                           ("output_dir", {"output_dir": str(tmp_path / "out" / ".." / "x")}),
                           ("loras", {"loras": [LoraChoice("../../secret")]}),
                           ("loras", {"loras": [LoraChoice("/abs/lora.safetensors")]}),
                           ("loras", {"loras": [LoraChoice(str(tmp_path / "g" / "l.safetensors"))]})):
        with pytest.raises(RequestError) as e:
            check_request_paths(ok.replace(**changes), s)
        assert e.value.field == field, changes


def test_allowed_and_blocked_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = ServerSettings(auth_file="users.txt")
    allowed, blocked = allowed_paths(s), blocked_paths(s)
    assert allowed == [str(tmp_path / "outputs"), str(tmp_path / ".wan_studio" / "uploads")]
    for p in ("checkpoints", "loras", "wan_studio.yaml", "users.txt"):
        assert str(tmp_path / p) in blocked
    assert any(b.endswith("profiles") for b in blocked)
    assert all(os.path.isabs(p) for p in allowed + blocked)
    # nothing allowed lies inside something blocked (gradio's block would win and hide it)
    assert not any(is_inside(a, b) for a in allowed for b in blocked)
    assert str(tmp_path / "my.yaml") in blocked_paths(s, config_path="my.yaml")
