"""LoRAs through the engine and the CLI on the TEST family."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from wan.engine import Engine, GenerationRequest, LoraChoice, RequestError
from wan.testing.tiny_family import ensure_tiny_checkpoints

ROOT = Path(__file__).resolve().parent.parent


def musubi_lora(path, dim, layers=(0, 1), rank=4, seed=0):
    """A LoRA in musubi-tuner's key layout on the self-attention q of the given blocks."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for b in layers:
        key = f"lora_unet_blocks_{b}_self_attn_q"
        state[f"{key}.lora_down.weight"] = torch.randn(rank, dim, generator=g) * 0.2
        state[f"{key}.lora_up.weight"] = torch.randn(dim, rank, generator=g) * 0.2
        state[f"{key}.alpha"] = torch.tensor(float(rank))
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    loras = tmp_path_factory.mktemp("loras")
    musubi_lora(loras / "style.safetensors", 256)
    musubi_lora(loras / "partial.safetensors", 256, layers=(0, 7))
    musubi_lora(loras / "big.safetensors", 512)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32, lora_dir=loras), root, loras


def test_lora_changes_the_output_and_zero_restores_it(setup):
    engine, _, loras = setup
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=3, seed=4)
    plain = engine.generate(req, write=False)
    styled = engine.generate(req.replace(loras=[LoraChoice("style.safetensors", "1.0")]), write=False)
    assert not torch.equal(plain.latent, styled.latent)
    zero = engine.generate(req.replace(loras=[LoraChoice(str(loras / "style.safetensors"), "0")]), write=False)
    assert torch.equal(plain.latent, zero.latent)
    dit = engine.models.current.dit
    assert not any(m._forward_hooks for m in dit.modules())  # detached after the job
    again = engine.generate(req, write=False)
    assert torch.equal(plain.latent, again.latent)  # no reload needed, no trace left


def test_incompatible_and_partial_loras(setup):
    engine, _, _ = setup
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=2, seed=4)
    with pytest.raises(RequestError, match="big.safetensors.*matches none.*512"):
        engine.generate(req.replace(loras=[LoraChoice("big.safetensors")]), write=False)
    partial = engine.generate(req.replace(loras=[LoraChoice("partial.safetensors")]), write=False)
    assert any("1 of 2" in n for n in partial.notices)
    with pytest.raises(RequestError, match="loras: '../style.safetensors'"):
        engine.generate(req.replace(loras=[LoraChoice("../style.safetensors")]), write=False)


def test_include_and_exclude_patterns(setup):
    """musubi's patterns: a LoRA limited to block 0 differs from the whole LoRA and from none;
    excluding every module it targets gives the base exactly; a bad regex names the field."""
    engine, _, _ = setup
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=2, seed=4)
    plain = engine.generate(req, write=False).latent

    def run(**kw):
        return engine.generate(req.replace(loras=[LoraChoice("style.safetensors", "1.0", **kw)]), write=False).latent
    whole, block0 = run(), run(include=[r"^blocks\.0\."])
    assert not torch.equal(block0, plain) and not torch.equal(block0, whole)
    assert torch.equal(run(exclude=["self_attn"]), plain)
    assert torch.equal(run(include=[r"^blocks\.0\."], exclude=[r"\.0\."]), plain)
    with pytest.raises(RequestError, match="loras.*not a valid regular expression"):
        run(include=["blocks[0"])


def test_cli_lora_flag(setup, tmp_path):
    _, root, loras = setup
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    base = [sys.executable, str(ROOT / "wgp.py"), "generate", "--model", "test-tiny-t2v", "--prompt", "x", "--steps", "2",
            "--checkpoint_dir", str(root), "--lora_dir", str(loras), "--output_dir", str(tmp_path), "--quiet"]
    ok = subprocess.run(base + ["--lora", "style.safetensors:0.7"], capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(base + ["--lora", "big.safetensors"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "matches none" in bad.stderr and "Traceback" not in bad.stderr
    two = ["--lora_weight", "style.safetensors", "partial.safetensors"]
    miscount = subprocess.run(base + two + ["--include_patterns", "blocks"], capture_output=True, text=True,
                              env=env, timeout=300)
    assert miscount.returncode == 2 and "include_patterns" in miscount.stderr and "one pattern per LoRA" in miscount.stderr
    patterned = subprocess.run(base + two + ["--exclude_patterns", "blocks.1", "blocks.0"], capture_output=True,
                               text=True, env=env, timeout=300)
    assert patterned.returncode == 0, patterned.stderr


def test_per_expert_strengths_on_a_two_expert_model(setup):
    """'1;0' acts on the high-noise steps only, '0;1' on the low-noise ones; '0;0' is the base."""
    engine, _, _ = setup
    req = GenerationRequest(model="test-tiny-t2v-a14b", prompt="a fox", steps=4, seed=5)
    runs = {m: engine.generate(req.replace(loras=[LoraChoice("style.safetensors", m)]), write=False).latent
            for m in ("0;0", "1;0", "0;1", "1;1", "1,0.5;0")}
    plain = engine.generate(req, write=False).latent
    assert torch.equal(runs["0;0"], plain)
    assert len({tuple(v.flatten()[:8].tolist()) for v in runs.values()}) == 5  # all differ from one another
    with pytest.raises(RequestError, match="loras"):
        engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=2,
                                          loras=[LoraChoice("style.safetensors", "1;0")]), write=False)


def test_cli_lora_check_convert_and_list(setup, tmp_path):
    _, _, loras = setup
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def wgp(*args):
        return subprocess.run([sys.executable, str(ROOT / "wgp.py"), "lora", *map(str, args)], capture_output=True,
                              text=True, env=env, timeout=120)
    ok = wgp("check", loras / "style.safetensors", "--model", "test-tiny-t2v")
    assert ok.returncode == 0 and "full" in ok.stdout
    bad = wgp("check", loras / "big.safetensors", "--model", "test-tiny-t2v")
    assert bad.returncode == 2 and "none" in bad.stdout
    real = wgp("check", loras / "style.safetensors", "--model", "wan2.1-t2v-1.3B")
    assert real.returncode == 2 and "none" in real.stdout  # a 256-wide LoRA does not fit the 1536-wide 1.3B
    conv = wgp("convert", loras / "style.safetensors", tmp_path / "comfy.safetensors", "--to", "comfy")
    assert conv.returncode == 0, conv.stderr
    back = wgp("convert", tmp_path / "comfy.safetensors", tmp_path / "musubi.safetensors", "--to", "musubi")
    assert back.returncode == 0
    from safetensors.torch import load_file
    a, b = load_file(str(loras / "style.safetensors")), load_file(str(tmp_path / "musubi.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    family = tmp_path / "loras" / "wan2.1-t2v-1.3B"
    family.mkdir(parents=True)
    (family / "style.safetensors").write_bytes((loras / "style.safetensors").read_bytes())
    listed = wgp("list", "--lora_dir", tmp_path / "loras")
    assert listed.returncode == 0 and "wan2.1-t2v-1.3B/style  rank 4" in listed.stdout
    missing = wgp("check", tmp_path / "nope.safetensors", "--model", "test-tiny-t2v")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
