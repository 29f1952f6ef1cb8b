"""umT5 text encoder: parity with transformers, every load format, prompt handling, errors.

The tiny weights are written once in the official Wan layout. The reference ``UMT5EncoderModel``
gets them through the conversion table below (written from the reference doc, §4.2), not through
the loader's own key map.
"""
import json
import re

import pytest
import torch
from safetensors.torch import save_file
from transformers import UMT5Config, UMT5EncoderModel

import wan
from tests.helpers import rel_err
from wan.loading.files import CheckpointError
from wan.models.text_encoder import TokenizerNotFound, clean_prompt
from wan.testing.tiny_encoders import TINY_T5, tiny_clip_state_dict, tiny_t5_state_dict, write_tiny_tokenizer

TOL = 1e-4  # max |ours - ref| / max |ref|, float32

# Official block key -> transformers key inside encoder.block.i (reference doc §4.2).
_BLOCK_TABLE = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def official_to_hf(sd: dict) -> dict:
    """Official Wan umT5 keys -> transformers UMT5EncoderModel keys (both embedding names)."""
    out = {}
    for key, t in sd.items():
        if key == "token_embedding.weight":
            out["shared.weight"] = t.clone()
            out["encoder.embed_tokens.weight"] = t.clone()
        elif key == "norm.weight":
            out["encoder.final_layer_norm.weight"] = t.clone()
        else:
            i, rest = re.fullmatch(r"blocks\.(\d+)\.(.+)", key).groups()
            out[f"encoder.block.{i}.{_BLOCK_TABLE[rest]}"] = t.clone()
    return out


def hf_config() -> UMT5Config:
    c = TINY_T5
    return UMT5Config(vocab_size=c["vocab"], d_model=c["dim"], d_kv=c["dim_attn"] // c["heads"], d_ff=c["ffn"],
                      num_layers=c["layers"], num_heads=c["heads"], relative_attention_num_buckets=c["buckets"],
                      relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
                      layer_norm_epsilon=1e-6)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The official .pth with the tokenizer beside it (official layout), written once."""
    root = tmp_path_factory.mktemp("t5")
    sd = tiny_t5_state_dict(seed=1)
    torch.save(sd, root / "models_t5_umt5-xxl-enc-bf16.pth")
    tok = write_tiny_tokenizer(root / "google" / "umt5-xxl")
    return {"root": root, "pth": root / "models_t5_umt5-xxl-enc-bf16.pth", "sd": sd, "tokenizer": tok}


@pytest.fixture(scope="module")
def reference(files):
    ref = UMT5EncoderModel(hf_config()).eval()
    ref.load_state_dict(official_to_hf(files["sd"]), strict=True)
    return ref


@pytest.fixture(scope="module")
def encoder(files):
    return wan.load_text_encoder(files["pth"], device="cpu", dtype=torch.float32)


def _inputs(length=40):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, TINY_T5["vocab"], (2, length), generator=g)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, 23:] = 0  # padded second prompt
    ids[1, 23:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------
# Parity and structure


def test_hidden_states_match_transformers_with_padding_mask(encoder, reference):
    # 40 tokens: relative distances reach the logarithmic buckets (exact ones stop at 8).
    ids, mask = _inputs(40)
    with torch.no_grad():
        ours = encoder(ids, mask)
        ref = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    assert ours.shape == (2, 40, TINY_T5["dim"])
    err = rel_err(ours, ref)
    assert err <= TOL, f"rel err {err:.2e}"
    # The mask matters: the padded row's real tokens differ from an unmasked run.
    with torch.no_grad():
        unmasked = encoder(ids, torch.ones_like(mask))
    assert rel_err(unmasked[1, :23], ours[1, :23]) > 1e-3


def test_loaded_model_is_ready_for_inference(encoder):
    assert encoder.dims.layers == TINY_T5["layers"] and encoder.dims.heads == TINY_T5["heads"]
    assert encoder.dims.buckets == 32 and encoder.dims.max_distance == 128
    assert not encoder.training and not encoder.model.training
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight  # one tied tensor
    for name, t in list(encoder.named_parameters()) + list(encoder.named_buffers()):
        assert not t.is_meta, name
        assert not t.requires_grad, name
        assert t.dtype == torch.float32, name


def test_bf16_official_file_loads_in_float32_and_bf16(tmp_path, files):
    sd = tiny_t5_state_dict(seed=1, dtype=torch.bfloat16)  # the real file's dtype
    torch.save(sd, tmp_path / "t5.pth")
    te = wan.load_text_encoder(tmp_path / "t5.pth")  # dtype None -> float32
    assert te.model.shared.weight.dtype == torch.float32
    assert torch.equal(te.model.shared.weight, sd["token_embedding.weight"].float())
    te16 = wan.load_text_encoder(tmp_path / "t5.pth", dtype=torch.bfloat16)
    ids, mask = _inputs(16)
    with torch.no_grad():
        out16, out32 = te16(ids, mask), te(ids, mask)
    assert out16.dtype == torch.bfloat16
    assert rel_err(out16.float(), out32) < 5e-2


# ---------------------------------------------------------------------------------------------
# Formats


def _hf_keys(sd, prefix="", embeddings=("shared.weight",)):
    hf = official_to_hf(sd)
    out = {prefix + k: v for k, v in hf.items() if not k.endswith(("shared.weight", "embed_tokens.weight"))}
    for name in embeddings:
        out[prefix + name] = hf["shared.weight"].clone()
    return out


def _to_fp8(sd, scaled: bool):
    """ComfyUI fp8 storage of every 2-D weight but the position biases; returns (file, dequantised)."""
    stored, dequant = {}, {}
    for k, t in sd.items():
        if t.ndim == 2 and "relative_attention_bias" not in k:
            scale = t.abs().max() / 448.0 if scaled else torch.tensor(1.0)
            q = (t / scale).to(torch.float8_e4m3fn)
            stored[k] = q
            dequant[k] = q.float() * scale
            if scaled:
                stored[k.rsplit(".", 1)[0] + ".scale_weight"] = scale.reshape(())
        else:
            stored[k] = dequant[k] = t
    if scaled:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return stored, dequant


@pytest.mark.parametrize("variant", [
    "hf_shared", "comfy_prefix_embed_tokens_only", "model_prefix_both", "stack_only", "hf_folder_shards",
])
def test_every_lossless_format_gives_the_official_output(tmp_path, files, encoder, variant):
    sd = files["sd"]
    if variant == "hf_shared":
        path = tmp_path / "umt5_xxl_fp32.safetensors"
        save_file(_hf_keys(sd), path)
    elif variant == "comfy_prefix_embed_tokens_only":
        path = tmp_path / "umt5.safetensors"
        save_file(_hf_keys(sd, "text_encoders.umt5xxl.transformer.", ("encoder.embed_tokens.weight",)), path)
    elif variant == "model_prefix_both":
        path = tmp_path / "umt5.safetensors"
        state = _hf_keys(sd, "model.", ("shared.weight", "encoder.embed_tokens.weight"))
        state["model.decoder.final_layer_norm.weight"] = torch.ones(TINY_T5["dim"])  # ignored
        save_file(state, path)
    elif variant == "stack_only":  # the encoder stack saved on its own
        path = tmp_path / "stack.safetensors"
        save_file({k.removeprefix("encoder."): v for k, v in _hf_keys(sd, "", ("encoder.embed_tokens.weight",)).items()},
                  path)
    else:
        path = tmp_path / "umt5-xxl"
        path.mkdir()
        hf_config().save_pretrained(path)
        state = _hf_keys(sd)
        names = sorted(state)
        shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
                  "model-00002-of-00002.safetensors": names[len(names) // 2:]}
        for fname, keys in shards.items():
            save_file({k: state[k] for k in keys}, path / fname)
        (path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    te = wan.load_text_encoder(path)
    ids, mask = _inputs(24)
    with torch.no_grad():
        err = rel_err(te(ids, mask), encoder(ids, mask))
    assert err <= 1e-6, f"{variant}: rel err {err:.2e}"


@pytest.mark.parametrize("scaled", [False, True])
def test_fp8_file_matches_its_dequantised_weights(tmp_path, files, scaled):
    stored, dequant = _to_fp8(_hf_keys(files["sd"]), scaled)
    save_file(stored, tmp_path / "umt5_fp8.safetensors")
    save_file(dequant, tmp_path / "umt5_dequant.safetensors")
    te8 = wan.load_text_encoder(tmp_path / "umt5_fp8.safetensors")
    ref = wan.load_text_encoder(tmp_path / "umt5_dequant.safetensors")
    assert te8.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float32
    ids, mask = _inputs(24)
    with torch.no_grad():
        err = rel_err(te8(ids, mask), ref(ids, mask))
    assert err <= 1e-6, f"rel err {err:.2e}"
    # Fp8 really was lossy: a guard against the test comparing the fp32 weights with themselves.
    full = wan.load_text_encoder(files["pth"])
    assert not torch.equal(te8.model.shared.weight, full.model.shared.weight)


def test_wrong_family_file_is_refused_with_its_name(tmp_path):
    path = tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
    torch.save(tiny_clip_state_dict(0), path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))) as e:
        wan.load_text_encoder(path)
    assert "umT5" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Prompts


def test_clean_prompt_follows_the_reference():
    assert clean_prompt("  a&amp;amp;b \n\t c  ") == "a&b c"
    assert clean_prompt("caf\u00c3\u00a9  &lt;ok&gt;") == "café <ok>"  # ftfy repairs mojibake


def test_encode_prompts_trims_to_real_length_and_matches_forward(encoder, files):
    prompts = ["a cat walks on the grass", "the sun"]
    seen = []
    hook = encoder.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        out = encoder.encode_prompts(prompts)
    finally:
        hook.remove()
    assert seen == [(1, len(out[0])), (1, len(out[1]))]  # each prompt alone, over its own tokens, not 512
    tok = encoder.get_tokenizer()
    assert tok is not None and encoder.tokenizer_path == files["tokenizer"]
    ids, mask = encoder.tokenize(prompts)
    assert ids.shape == (2, 512)  # the official fixed length
    for p, o, row_ids in zip(prompts, out, ids):
        n = len(tok(p)["input_ids"])  # tokens + EOS
        assert o.shape == (n, TINY_T5["dim"])
        assert row_ids[n - 1] == 1 and (row_ids[n:] == 0).all()  # EOS then padding
    with torch.no_grad():
        full = encoder(ids, mask)  # the reference's way: all 512 positions
    for i, o in enumerate(out):  # only the longest prompt's positions were encoded: the same states
        assert rel_err(o, full[i, : len(o)]) <= 1e-6
    # A prompt's states are the same bits whatever it is encoded with.
    assert torch.equal(encoder.encode_prompts(prompts[1])[0], out[1])
    assert torch.equal(encoder.encode_prompts([prompts[1], "a much longer prompt " * 9])[0], out[1])


def test_encode_prompts_cleans_text(encoder):
    messy, clean = encoder.encode_prompts(["  a cat&amp;amp;a dog \n\t walks  ", "a cat&a dog walks"])
    assert torch.equal(messy, clean)


def test_max_length_truncates_keeping_eos(encoder):
    long = "a dog runs along the beach at sunset " * 4
    out = encoder.encode_prompts(long, max_length=6)[0]
    ids, _ = encoder.tokenize(long, max_length=6)
    assert out.shape == (6, TINY_T5["dim"]) and ids[0, -1] == 1


def test_missing_tokenizer_is_reported_only_when_prompts_are_encoded(tmp_path, files):
    torch.save(files["sd"], tmp_path / "t5.pth")
    te = wan.load_text_encoder(tmp_path / "t5.pth")
    ids, mask = _inputs(8)
    assert te(ids, mask).shape == (2, 8, TINY_T5["dim"])  # forward needs no tokenizer
    with pytest.raises(TokenizerNotFound, match="google/umt5-xxl") as e:
        te.encode_prompts("a cat")
    assert str(tmp_path / "google" / "umt5-xxl") in str(e.value) and "tokenizer=" in str(e.value)
    with pytest.raises(TokenizerNotFound, match="not a tokenizer folder"):
        wan.load_text_encoder(tmp_path / "t5.pth", tokenizer=tmp_path / "nowhere")
    te = wan.load_text_encoder(tmp_path / "t5.pth", tokenizer=files["tokenizer"])
    assert len(te.encode_prompts("a cat")) == 1
