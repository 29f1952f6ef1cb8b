"""Files a user already has, given on the command line as musubi-tuner spells them (issue 12):
``--dit``, ``--vae``, ``--t5``, ``--clip``, ``--tokenizer`` replace the registry's files for the job
and give the same frames; the output records every file used, and ``--from_output`` reuses the
given ones and warns when one has changed since."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from wan.loading.download import local_paths
from wan.registry import get_model
from wan.testing.tiny_family import ensure_tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The TEST t2v files, and copies of them under misleading names in a ComfyUI-like tree."""
    ckpts = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(ckpts)
    paths = local_paths(get_model("test-tiny-t2v"), ckpts, "fp32")
    mine = tmp_path_factory.mktemp("comfy")
    copies = {}
    for role, sub, name in (("transformer", "diffusion_models", "wan_fast_v3.safetensors"),
                            ("vae", "vae", "my_vae.safetensors"), ("text_encoder", "text_encoders", "t5.safetensors")):
        (mine / sub).mkdir(exist_ok=True)
        copies[role] = shutil.copy(paths[role], mine / sub / name)
    copies["tokenizer"] = shutil.copytree(paths["tokenizer"], mine / "tok")
    return ckpts, copies


def wgp(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False")
    return subprocess.run([sys.executable, str(ROOT / "wgp.py"), *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)


COMMON = ["--prompt", "a fox", "--seed", "3", "--steps", "3", "--quiet"]


@pytest.fixture(scope="module")
def plain(setup, tmp_path_factory):
    """The frames of the TEST t2v model on the registry's files (COMMON settings), made once."""
    ckpts, _ = setup
    run = wgp("generate", "--model", "test-tiny-t2v", *COMMON, "--checkpoint_dir", ckpts,
              "--output_dir", tmp_path_factory.mktemp("plain"))
    assert run.returncode == 0, run.stderr
    return frames_of(run.stdout.split()[0])


def frames_of(path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_given_files_give_the_frames_of_the_registry_files(setup, plain, tmp_path):
    _, files = setup
    given = wgp("generate", "--model", "test-tiny-t2v", *COMMON, "--checkpoint_dir", tmp_path / "empty",
                "--output_dir", tmp_path / "b", "--dit", files["transformer"], "--vae", files["vae"],
                "--t5", files["text_encoder"], "--tokenizer", files["tokenizer"])
    assert given.returncode == 0, given.stderr
    b = given.stdout.split()[0]
    assert np.array_equal(plain, frames_of(b))
    assert not (tmp_path / "empty").exists()  # nothing was fetched or generated for the given roles
    meta = json.loads(Path(b).with_suffix(".json").read_text())
    recorded = meta["files"]
    assert recorded["transformer"]["path"] == str(files["transformer"]) and recorded["transformer"]["given"]
    assert recorded["transformer"]["size"] == Path(files["transformer"]).stat().st_size
    assert len(recorded["transformer"]["fingerprint"]) == 32


def test_from_output_reuses_given_files_and_warns_when_one_changed(setup, tmp_path):
    ckpts, files = setup
    dit = shutil.copy(files["transformer"], tmp_path / "dit.safetensors")
    first = wgp("generate", "--model", "test-tiny-t2v", "--prompt", "a fox", "--seed", "3", "--steps", "2", "--quiet",
                "--checkpoint_dir", ckpts, "--output_dir", tmp_path / "o", "--dit", dit)
    assert first.returncode == 0, first.stderr
    out = first.stdout.split()[0]
    again = wgp("generate", "--from_output", out, "--checkpoint_dir", ckpts, "--output_dir", tmp_path / "o2", "--quiet")
    assert again.returncode == 0 and "warning" not in again.stderr
    assert json.loads(Path(again.stdout.split()[0]).with_suffix(".json").read_text())["files"]["transformer"]["given"]
    data = bytearray(Path(dit).read_bytes())
    data[-8:] = bytes(8)  # the last weights rewritten
    Path(dit).write_bytes(bytes(data))
    changed = wgp("generate", "--from_output", out, "--checkpoint_dir", ckpts, "--output_dir", tmp_path / "o3",
                  "--quiet")
    assert changed.returncode == 0, changed.stderr
    assert f"warning: transformer: {dit} changed since the output was made" in changed.stderr


def test_a_file_for_a_component_the_model_lacks_is_refused(setup, tmp_path):
    ckpts, files = setup
    r = wgp("generate", "--model", "test-tiny-t2v", "--prompt", "x", "--checkpoint_dir", ckpts,
            "--clip", files["vae"], "--quiet")
    assert r.returncode == 2 and "clip" in r.stderr and "test-tiny-t2v" in r.stderr
    r = wgp("generate", "--model", "test-tiny-t2v", "--prompt", "x", "--checkpoint_dir", ckpts,
            "--dit", tmp_path / "missing.safetensors", "--quiet")
    assert r.returncode == 2 and "dit" in r.stderr and "an existing file" in r.stderr


def test_a_models_folder_serves_a_registry_model_and_a_dit_names_its_model(setup, plain, tmp_path):
    """--models_dir pointing at a ComfyUI-style tree (misleading file names): the model's DiT, VAE
    and umT5 are taken from it, recognised by their tensors, with the frames of the registry files;
    --dit alone names the model."""
    ckpts, files = setup
    tree = Path(files["transformer"]).parent.parent
    common = COMMON
    found = wgp("generate", "--model", "test-tiny-t2v", *common, "--models_dir", tree,
                "--checkpoint_dir", tmp_path / "fresh", "--output_dir", tmp_path / "b")
    assert found.returncode == 0, found.stderr
    b = found.stdout.split()[0]
    assert np.array_equal(plain, frames_of(b))
    used = json.loads(Path(b).with_suffix(".json").read_text())["files"]
    assert {role: used[role]["path"] for role in ("transformer", "vae", "text_encoder")} == {
        "transformer": str(files["transformer"]), "vae": str(files["vae"]), "text_encoder": str(files["text_encoder"])}
    alone = wgp("generate", "--dit", files["transformer"], *common, "--checkpoint_dir", ckpts,
                "--output_dir", tmp_path / "c")
    assert alone.returncode == 0, alone.stderr
    meta = json.loads(Path(alone.stdout.split()[0]).with_suffix(".json").read_text())
    assert meta["request"]["model"] == "test-tiny-t2v" and meta["files"]["transformer"]["given"]
    not_dit = wgp("generate", "--dit", files["vae"], *common, "--checkpoint_dir", ckpts)
    assert not_dit.returncode == 2 and "a Wan DiT checkpoint; this file is vae" in not_dit.stderr


def test_models_lists_what_is_ready_and_what_is_missing(setup, tmp_path):
    """``wgp.py models``: a model served by a models folder is ready, with the roles found there;
    a real model with nothing on this machine lists what is missing, the DiT's size estimated."""
    _, files = setup
    tree = Path(files["transformer"]).parent.parent
    r = wgp("models", "--checkpoint_dir", tmp_path / "fresh", "--models_dir", tree, "--verbose")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("test-tiny-t2v "))
    assert line.endswith("ready (from your folders: transformer, vae, text_encoder)")
    assert any(x.strip().startswith("transformer") and "found" in x and str(files["transformer"]) in x
               for x in r.stdout.splitlines())
    real = next(x for x in r.stdout.splitlines() if x.startswith("wan2.1-t2v-1.3B "))
    assert "missing transformer (~2.9 GB), vae (~0.5 GB), text_encoder (~11.4 GB), tokenizer" in real
    assert not (tmp_path / "fresh").exists()  # listing fetches and generates nothing


def test_a_dit_of_no_registry_size_runs_as_its_task_type_with_a_notice(setup, tmp_path):
    """A t2v DiT of another size (dim 128, 3 layers: no registry model has it) runs on the files and
    defaults of the TEST t2v model, and says so; a DiT whose inputs no model takes is refused."""
    from safetensors.torch import save_file

    from wan.models.dit import DiTConfig, WanDiT
    from wan.testing.tiny_family import TINY_DIT
    import torch
    ckpts, _ = setup
    torch.manual_seed(0)
    custom = tmp_path / "my_finetune.safetensors"
    save_file(WanDiT(DiTConfig(**{**TINY_DIT, "dim": 128, "ffn_dim": 256, "num_layers": 3})).state_dict(), str(custom))
    r = wgp("generate", "--dit", custom, "--prompt", "a fox", "--steps", "2", "--checkpoint_dir", ckpts,
            "--output_dir", tmp_path / "out", "--quiet")
    assert r.returncode == 0, r.stderr
    assert ("note: transformer: this DiT (dim 128, 3 layers) is not a registry model's: it runs with the defaults "
            "of test-tiny-t2v's task type (dim 256, 2 layers there)") in r.stderr
    meta = json.loads(Path(r.stdout.split()[0]).with_suffix(".json").read_text())
    assert meta["request"]["model"] == "test-tiny-t2v" and meta["request"]["steps"] == 2
    odd = tmp_path / "odd.safetensors"  # 20 input channels: no Wan task takes them
    save_file(WanDiT(DiTConfig(**{**TINY_DIT, "in_dim": 20})).state_dict(), str(odd))
    r = wgp("generate", "--dit", odd, "--prompt", "a fox", "--checkpoint_dir", ckpts, "--quiet")
    assert r.returncode == 2 and "no registry model takes its inputs" in r.stderr
