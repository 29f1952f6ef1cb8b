"""The real entry point, run as a subprocess: exit codes and messages scripts can rely on."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wgp(*args, env_extra=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "wgp.py"), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=120)


def test_models_lists_registry_including_test_family():
    r = wgp("models")
    assert r.returncode == 0, r.stderr
    assert "wan2.1-t2v-1.3B" in r.stdout and "wan2.2-ti2v-5B" in r.stdout and "test-tiny-t2v" in r.stdout


def test_download_offline_names_every_missing_file(tmp_path):
    r = wgp("download", "wan2.1-t2v-1.3B", "--checkpoint-dir", str(tmp_path))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "wan2.1_t2v_1.3B_bf16.safetensors" in r.stderr and "Wan2.1_VAE.pth" in r.stderr
    assert str(tmp_path / "Wan-AI" / "Wan2.1-T2V-1.3B" / "Wan2.1_VAE.pth") in r.stderr


def test_download_refuses_a_full_disk_online_and_notes_it_offline(tmp_path, monkeypatch, capsys):
    """Online, a disk too small is refused before any byte is fetched; offline nothing is fetched, so
    the missing files are named and the disk space follows as a note."""
    from wan import cli
    from wan.loading import download
    monkeypatch.setattr(download, "free_bytes", lambda folder: 2 * 10**9)
    monkeypatch.setattr(download, "ensure_files", lambda *a, **k: pytest.fail("nothing may be fetched"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli.main(["download", "wan2.1-t2v-1.3B", "--checkpoint-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error: not enough free disk space" in err and "14.7 GB needed, 2.0 GB free" in err
    monkeypatch.undo()
    monkeypatch.setattr(download, "free_bytes", lambda folder: 2 * 10**9)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["download", "wan2.1-t2v-1.3B", "--checkpoint-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "Wan2.1_VAE.pth" in err and "note: not enough free disk space" in err


def test_download_generates_the_test_family(tmp_path):
    r = wgp("download", "test-tiny-t2v", "--variant", "fp32", "--checkpoint-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny" / "t2v" / "transformer.safetensors").exists()


def test_bad_input_exits_2_without_traceback():
    for args in (("download", "wan9-nope"), ("download", "wan2.1-t2v-1.3B", "--variant", "fp9")):
        r = wgp(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr


def test_dataset_check_reads_a_musubi_dataset_config(tmp_path):
    """``wgp.py dataset check``: the items, buckets and cache state of each dataset; a bad key is named."""
    from PIL import Image
    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "a.txt").write_text("a box")
    config = tmp_path / "d.toml"
    config.write_text('[general]\nresolution = [32, 32]\ncaption_extension = ".txt"\n'
                      f'[[datasets]]\nimage_directory = "{tmp_path / "img"}"\ncache_directory = "{tmp_path / "c"}"\n')
    r = wgp("dataset", "check", str(config))
    assert r.returncode == 0, r.stderr
    assert "items: 1; 1 per epoch with num_repeats 1" in r.stdout and "buckets: 32x32: 1" in r.stdout
    assert "cache: 0 of 1 latent files, 0 of 1 text-encoder files present" in r.stdout
    config.write_text(config.read_text().replace("resolution", "resolutoin"))
    r = wgp("dataset", "check", str(config))
    assert r.returncode == 2 and str(config) in r.stderr and "resolutoin" in r.stderr


def test_the_command_table_is_built_without_torch():
    """Every command's flags (train's come from its typed config) are built without importing torch:
    ``wgp.py --help`` and the page's start stay quick."""
    code = "import sys; from wan.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
