"""The TEST model family: generated on first use, loadable through the public API, consistent
with its registry entries, and byte-identical from one machine (or run) to the next."""

import hashlib

import pytest
import torch

import wan
from wan.loading.download import ensure_files
from wan.registry import list_models
from wan.testing.tiny_family import ensure_tiny_checkpoints

TEST_MODELS = [m for m in list_models(include_test=True) if m.test_model]


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_family_is_deterministic_and_idempotent(ckpt_dir, tmp_path):
    again = ensure_tiny_checkpoints(tmp_path / "made", reuse=False)  # written afresh, not copied
    assert _digest(again) == _digest(ckpt_dir / "tiny") == _digest(ensure_tiny_checkpoints(tmp_path / "copied"))
    before = (ckpt_dir / "tiny" / "t2v" / "transformer.safetensors").stat().st_mtime_ns
    ensure_tiny_checkpoints(ckpt_dir)  # already there: nothing rewritten
    assert (ckpt_dir / "tiny" / "t2v" / "transformer.safetensors").stat().st_mtime_ns == before
    assert not [p for p in ckpt_dir.iterdir() if p.name.startswith(".tiny-")]  # no staging left


def test_registry_has_the_test_family():
    ids = {m.id for m in TEST_MODELS}
    assert {"test-tiny-t2v", "test-tiny-i2v", "test-tiny-flf2v", "test-tiny-vace", "test-tiny-ti2v",
            "test-tiny-t2v-a14b"} <= ids
    assert all("TEST" in m.display_name for m in TEST_MODELS)


@pytest.mark.parametrize("spec", TEST_MODELS, ids=lambda m: m.id)
def test_each_test_model_loads_and_matches_its_spec(spec, ckpt_dir):
    paths = ensure_files(spec, ckpt_dir, variant="fp32", progress=False)
    for role in spec.transformer_roles:
        dit = wan.load_transformer(paths[role], dtype=torch.float32)
        cfg, arch = dit.config, spec.arch
        assert (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.in_dim, cfg.out_dim, cfg.text_dim) == (
            arch.dim, arch.ffn_dim, arch.num_heads, arch.num_layers, arch.in_dim, arch.out_dim, arch.text_dim)
        assert cfg.model_type == arch.model_type
        if arch.vace_layers:
            assert cfg.vace_layers == tuple(arch.vace_layers)
    vae = wan.load_vae(paths["vae"])
    assert vae.version == spec.vae.version and vae.z_dim == spec.vae.z_dim and tuple(vae.stride) == spec.vae.stride
    te = wan.load_text_encoder(paths["text_encoder"], tokenizer=paths["tokenizer"])
    (emb,) = te.encode_prompts(["a red fox"])
    assert emb.shape[1] == spec.arch.text_dim
    if spec.needs_clip:
        clip = wan.load_clip(paths["clip"])
        assert clip(torch.zeros(1, 3, 40, 40)).shape[-1] == dit.config.image_dim


def test_a_generated_t2v_model_runs(ckpt_dir):
    dit = wan.load_transformer(ckpt_dir / "tiny" / "t2v" / "transformer.safetensors")
    x = torch.randn(1, 16, 3, 8, 8)
    with torch.no_grad():
        out = dit(x, torch.tensor([900.0]), torch.randn(1, 5, 32))
    assert out.shape == x.shape and torch.isfinite(out).all()
