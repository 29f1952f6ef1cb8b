"""Downloads with a fake hub (no network): what is fetched, where it lands, and the single error
that lists every missing file with the path where it can be put by hand."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wan.loading import download
from wan.loading.download import DownloadError, ensure_files, local_paths, missing_files
from wan.registry import RegistryError, get_model, load_registry

REPO_ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """Stands in for ``_hub_download``: writes the file where hf_hub_download(local_dir=) would."""

    def __init__(self, fail: set[str] = frozenset(), sizes: dict[str, int] | None = None):
        self.calls: list[tuple[str, str, Path, bool]] = []
        self.fail = set(fail)
        self.sizes = sizes or {}

    def __call__(self, repo_id, filename, local_dir, force_download, progress):
        self.calls.append((repo_id, filename, Path(local_dir), force_download))
        if filename in self.fail:
            raise OSError(f"simulated network error for {filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"x" * self.sizes.get(filename, 8))
        return str(target)


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "hub_unreachable", lambda: None)  # this machine has no route to the Hub
    hub = FakeHub()
    monkeypatch.setattr(download, "_hub_download", hub)
    return hub


def _touch(path: Path, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"y" * size)


def test_missing_files_are_fetched_into_the_documented_layout(tmp_path, online):
    spec = get_model("wan2.1-t2v-1.3B")
    paths = ensure_files(spec, tmp_path, variant="bf16", progress=False)
    fetched = {(repo, name) for repo, name, _, _ in online.calls}
    assert fetched == {
        ("Comfy-Org/Wan_2.1_ComfyUI_repackaged", "split_files/diffusion_models/wan2.1_t2v_1.3B_bf16.safetensors"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "Wan2.1_VAE.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "models_t5_umt5-xxl-enc-bf16.pth"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/special_tokens_map.json"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/spiece.model"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/tokenizer.json"),
        ("Wan-AI/Wan2.1-T2V-1.3B", "google/umt5-xxl/tokenizer_config.json"),
    }
    for repo, _, local_dir, force in online.calls:
        assert local_dir == tmp_path.joinpath(*repo.split("/")) and not force
    assert paths == {
        "transformer": tmp_path / "Comfy-Org/Wan_2.1_ComfyUI_repackaged/split_files/diffusion_models/"
                                  "wan2.1_t2v_1.3B_bf16.safetensors",
        "vae": tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth",
        "text_encoder": tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
        "tokenizer": tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/google/umt5-xxl",
    }
    assert all(p.exists() for p in paths.values())
    assert missing_files(spec, tmp_path, variant="bf16") == []


def test_present_files_are_not_fetched_again(tmp_path, online):
    spec = get_model("wan2.1-t2v-1.3B")
    _touch(tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth")
    _touch(tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")
    ensure_files(spec, tmp_path, progress=False)
    names = [name for _, name, _, _ in online.calls]
    assert len(names) == 5 and "Wan2.1_VAE.pth" not in names
    assert "models_t5_umt5-xxl-enc-bf16.pth" not in names
    online.calls.clear()
    ensure_files(spec, tmp_path, progress=False)
    assert online.calls == []


def test_missing_files_lists_without_downloading(tmp_path, online):
    spec = get_model("wan2.2-t2v-A14B")
    missing = missing_files(spec, tmp_path, variant="fp32", components=["transformer"])
    assert online.calls == []
    assert {f.role for f in missing} == {"transformer_high_noise", "transformer_low_noise"}
    assert len(missing) == 14  # index + 6 shards per expert
    assert missing[0].local_path == tmp_path / "Wan-AI/Wan2.2-T2V-A14B/high_noise_model/" \
                                               "diffusion_pytorch_model.safetensors.index.json"
    assert local_paths(spec, tmp_path, "fp32", ["transformer"]) == {
        "transformer_high_noise": tmp_path / "Wan-AI/Wan2.2-T2V-A14B/high_noise_model",
        "transformer_low_noise": tmp_path / "Wan-AI/Wan2.2-T2V-A14B/low_noise_model"}


def _sized_registry(tmp_path: Path):
    """One model whose transformer file has a known size of 16 bytes."""
    spec = {
        "display_name": "Sized", "version": "2.1", "tasks": ["t2v"],
        "arch": {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2, "in_dim": 16,
                 "out_dim": 16, "model_type": "t2v"},
        "vae": {"version": "2.1", "stride": [4, 8, 8], "z_dim": 16},
        "text_encoder": "umt5-xxl", "needs_clip": False,
        "defaults": {"steps": 4, "shift": 5.0, "guidance": 5.0, "fps": 16, "frames": 9,
                     "sampler": "unipc", "negative_prompt": {"t2v": ""}},
        "sizes": ["64x64"],
        "files": {"transformer": {"variants": {"bf16": {"repo": "me/sized", "file": "w.safetensors",
                                                        "size": 16}}},
                  "vae": "wan2.1-vae", "text_encoder": "umt5-xxl", "tokenizer": "umt5-xxl-tokenizer"},
    }
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "sized.yaml").write_text(yaml.safe_dump({"family": "t", "models": {"sized": spec}}))
    return load_registry([folder]).get("sized")


def test_file_of_the_wrong_size_counts_as_missing_and_is_refetched(tmp_path, online):
    spec = _sized_registry(tmp_path)
    target = tmp_path / "ck/me/sized/w.safetensors"
    _touch(target, size=5)
    assert [f.path_in_repo for f in missing_files(spec, tmp_path / "ck", components=["transformer"])] \
        == ["w.safetensors"]
    online.sizes["w.safetensors"] = 16
    ensure_files(spec, tmp_path / "ck", components=["transformer"], progress=False)
    assert online.calls == [("me/sized", "w.safetensors", tmp_path / "ck/me/sized", True)]
    assert target.stat().st_size == 16
    online.sizes["w.safetensors"] = 3
    target.unlink()
    with pytest.raises(DownloadError, match="has 3 bytes, expected 16"):
        ensure_files(spec, tmp_path / "ck", components=["transformer"], progress=False)


def test_offline_raises_one_error_listing_every_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub = FakeHub()
    monkeypatch.setattr(download, "_hub_download", hub)
    spec = get_model("wan2.1-i2v-14B-480P")
    _touch(tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth")
    with pytest.raises(DownloadError) as err:
        ensure_files(spec, tmp_path, variant="fp8_scaled", progress=False)
    assert hub.calls == []
    message, missing = str(err.value), err.value.missing
    assert "HF_HUB_OFFLINE" in message
    assert {f.role for f in missing} == {"transformer", "text_encoder", "tokenizer", "clip"}
    assert len(missing) == 7
    for f in missing:
        assert f.path_in_repo in message and f.repo in message
        assert f"put it at: {f.local_path}" in message
    assert "Wan2.1_VAE.pth" not in message  # present files are not listed
    assert "wan2.1_i2v_480p_14B_fp8_scaled.safetensors" in message


def test_failed_download_reports_every_file_still_missing(tmp_path, online):
    online.fail = {"Wan2.1_VAE.pth", "google/umt5-xxl/spiece.model"}
    spec = get_model("wan2.1-t2v-1.3B")
    with pytest.raises(DownloadError) as err:
        ensure_files(spec, tmp_path, progress=False)
    assert len(online.calls) == 7  # it kept going after the first failure
    assert {f.path_in_repo for f in err.value.missing} == online.fail
    message = str(err.value)
    assert message.count("simulated network error") == 2
    assert str(tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth") in message
    assert (tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth").is_file()


@pytest.mark.parametrize("interruption", [ConnectionError("connection reset"), KeyboardInterrupt()])
def test_interrupted_download_leaves_no_file_under_the_final_name(tmp_path, monkeypatch, interruption):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(download, "hub_unreachable", lambda: None)

    def half_written(repo_id, filename, local_dir, force_download, progress):
        target = Path(local_dir) / filename  # a downloader writing straight to the final name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"partial")
        raise interruption

    monkeypatch.setattr(download, "_hub_download", half_written)
    spec = get_model("wan2.1-t2v-1.3B")
    expected = (DownloadError,) if isinstance(interruption, Exception) else (KeyboardInterrupt,)
    with pytest.raises(expected):
        ensure_files(spec, tmp_path, components=["vae"], progress=False)
    assert not (tmp_path / "Wan-AI/Wan2.1-T2V-1.3B/Wan2.1_VAE.pth").exists()


def test_variant_choice_fallback_and_unknown_variant(tmp_path, online):
    flf2v = get_model("wan2.1-flf2v-14B-720P")  # has fp32, fp16, fp8_e4m3fn only
    paths = local_paths(flf2v, tmp_path, variant="bf16")
    assert paths["transformer"].name == "wan2.1_flf2v_720p_14B_fp16.safetensors"
    assert paths["vae"].name == "Wan2.1_VAE.pth"  # the VAE keeps its fp32 default
    assert paths["text_encoder"].name == "models_t5_umt5-xxl-enc-bf16.pth"
    fp8 = local_paths(flf2v, tmp_path, variant="fp8_scaled")
    assert fp8["transformer"].name == "wan2.1_flf2v_720p_14B_fp8_e4m3fn.safetensors"
    assert fp8["text_encoder"].name == "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    mixed = local_paths(flf2v, tmp_path, variant={"transformer": "fp32", "vae": "bf16"})
    assert mixed["transformer"] == tmp_path / "Wan-AI/Wan2.1-FLF2V-14B-720P"
    assert mixed["vae"].name == "wan_2.1_vae.safetensors"
    with pytest.raises(RegistryError, match=r"unknown variant 'fp4'; known variants: fp32, bf16"):
        ensure_files(flf2v, tmp_path, variant="fp4", components=["vae"], progress=False)
    with pytest.raises(RegistryError, match="unknown component 'unet'"):
        local_paths(flf2v, tmp_path, variant={"unet": "bf16"})
    with pytest.raises(RegistryError, match="has no component 'clip_vision'"):
        missing_files(flf2v, tmp_path, components=["clip_vision"])
    assert online.calls == []


def test_generated_files_come_from_the_named_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # generated files need no network
    from wan.testing import tiny_family
    calls = []

    def write_all(checkpoint_dir):
        calls.append(Path(checkpoint_dir))
        for name in ["tiny/t2v/transformer.safetensors", "tiny/vae_2.1.safetensors",
                     "tiny/umt5.safetensors", "tiny/tokenizer/spiece.model"]:
            p = Path(checkpoint_dir) / name
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"z")
    # specs may name only the allowed generators (wan.registry.specs.GENERATORS): stand in for one
    monkeypatch.setattr(tiny_family, "ensure_tiny_checkpoints", write_all)
    spec = get_model("test-tiny-t2v")
    assert {f.generator for f in missing_files(spec, tmp_path / "ck")} == \
        {"wan.testing.tiny_family.ensure_tiny_checkpoints"}
    paths = ensure_files(spec, tmp_path / "ck", progress=False)
    assert calls == [tmp_path / "ck"]  # one call for all the files
    assert paths["transformer"] == tmp_path / "ck/tiny/t2v/transformer.safetensors"
    assert paths["tokenizer"] == tmp_path / "ck/tiny/tokenizer"
    # A generator that cannot be found gives the usual single error.
    monkeypatch.delattr(tiny_family, "ensure_tiny_checkpoints")
    with pytest.raises(DownloadError, match=r"generator wan\.testing\.tiny_family\.ensure_tiny_checkpoints is not "
                                            r"available"):
        ensure_files(get_model("test-tiny-i2v"), tmp_path / "ck2", progress=False)


def test_importing_download_fetches_nothing_and_loads_no_hub_client():
    code = ("import sys, wan.loading.download, wan.registry; "
            "print('huggingface_hub' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def _local_spec_registry(tmp_path: Path, transformer: dict):
    """A user spec inheriting the 1.3B model whose transformer entry is ``transformer``."""
    folder = tmp_path / "finetunes"
    folder.mkdir()
    (folder / "local.yaml").write_text(yaml.safe_dump({"models": {"my-local": {
        "inherit": "wan2.1-t2v-1.3B", "files": {"transformer": {"variants": {"bf16": transformer}}}}}}))
    return load_registry([folder]).get("my-local")


def test_a_spec_path_alone_is_opened_where_it_lies_and_never_fetched(tmp_path, online):
    """``path:`` relative to the spec file: used as it is; missing, it is reported at that path
    and no download is tried for it."""
    spec = _local_spec_registry(tmp_path, {"path": "../weights/my_ft.safetensors"})
    mine = tmp_path / "weights" / "my_ft.safetensors"
    assert spec.files["transformer"].variants["bf16"].local == str(mine)
    assert local_paths(spec, tmp_path / "ck", components=["transformer"]) == {"transformer": mine}
    with pytest.raises(DownloadError) as err:
        ensure_files(spec, tmp_path / "ck", components=["transformer"], progress=False)
    assert online.calls == []
    assert f"put it at: {mine}" in str(err.value) and "not found at the path the model's spec names" in str(err.value)
    _touch(mine)
    assert ensure_files(spec, tmp_path / "ck", components=["transformer"], progress=False) == {"transformer": mine}
    assert online.calls == [] and missing_files(spec, tmp_path / "ck", components=["transformer"]) == []


def test_a_spec_path_beside_a_repo_is_preferred_when_present(tmp_path, online):
    entry = {"repo": "me/ft", "file": "ft.safetensors", "path": str(tmp_path / "mine.safetensors")}
    spec = _local_spec_registry(tmp_path, entry)
    got = ensure_files(spec, tmp_path / "ck", components=["transformer"], progress=False)
    assert got == {"transformer": tmp_path / "ck/me/ft/ft.safetensors"} and len(online.calls) == 1
    _touch(tmp_path / "mine.safetensors")
    assert local_paths(spec, tmp_path / "ck", components=["transformer"]) == {"transformer": tmp_path / "mine.safetensors"}


@pytest.mark.parametrize("entry, fragment", [
    ({"path": "x.safetensors", "file": "y.safetensors"}, "with 'path' alone, the path is the file"),
    ({"source": "generated", "generator": "wan.testing.tiny_family.ensure_tiny_checkpoints", "file": "a",
      "path": "x"}, "generated files have no local path"),
    ({"path": ""}, "a path on this machine"),
    ({"file": "y.safetensors"}, "or give 'path', a file on this machine"),
])
def test_bad_spec_paths_are_refused_with_the_key(tmp_path, entry, fragment):
    with pytest.raises(RegistryError) as err:
        _local_spec_registry(tmp_path, entry)
    assert fragment in str(err.value) and "my-local.files.transformer.variants.bf16" in str(err.value)


def test_an_unreachable_hub_fails_at_once_naming_every_missing_file(tmp_path, monkeypatch):
    """No route to the Hub (here: a closed local port as HF_ENDPOINT): one quick connection attempt,
    then the offline report, with no per-file retries."""
    import socket
    import time
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    hub = FakeHub()
    monkeypatch.setattr(download, "_hub_download", hub)
    start = time.monotonic()
    with pytest.raises(DownloadError) as err:
        ensure_files(get_model("wan2.1-t2v-1.3B"), tmp_path, progress=False)
    assert time.monotonic() - start < 5 and hub.calls == []
    message = str(err.value)
    assert f"The Hugging Face Hub is out of reach: cannot reach 127.0.0.1:{port}" in message
    assert err.value.missing == missing_files(get_model("wan2.1-t2v-1.3B"), tmp_path)
    assert all(f"put it at: {f.local_path}" in message for f in err.value.missing)


def test_the_reachability_check_goes_to_the_proxy_when_one_is_set(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.local:3128")
    assert download.hub_address() == ("proxy.local", 3128)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hf-mirror.com")
    assert download.hub_address() == ("hf-mirror.com", 443)
