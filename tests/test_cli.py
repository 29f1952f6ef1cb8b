"""The real entry point, run as a subprocess: exit codes and messages scripts can rely on."""
import os
import subprocess
import sys
from pathlib import Path

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


def test_download_generates_the_test_family(tmp_path):
    r = wgp("download", "test-tiny-t2v", "--variant", "fp32", "--checkpoint-dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "tiny" / "t2v" / "transformer.safetensors").exists()


def test_bad_input_exits_2_without_traceback():
    for args in (("download", "wan9-nope"), ("download", "wan2.1-t2v-1.3B", "--variant", "fp9")):
        r = wgp(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and "error:" in r.stderr
