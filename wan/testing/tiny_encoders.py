"""Tiny, seeded text and image encoders in the official Wan file layouts, for tests.

- ``tiny_t5_state_dict(seed)``: keys of ``models_t5_umt5-xxl-enc-bf16.pth`` (umT5 encoder).
- ``tiny_clip_state_dict(seed)``: keys of ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``
  (``visual.*`` plus a few ``textual.*`` tensors and ``log_scale``, which loaders must ignore).
- ``write_tiny_tokenizer(folder)``: a sentencepiece unigram tokenizer trained offline on a fixed
  corpus, saved like ``google/umt5-xxl`` (pad 0, EOS 1, unk 2, no BOS).

Everything is deterministic: the same seed gives the same tensors, bit for bit.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

TINY_T5 = dict(vocab=64, dim=32, dim_attn=32, ffn=64, heads=4, layers=2, buckets=32)
"""Tiny umT5: head dim 8; 32 buckets like the real model (max distance 128 is implied)."""

TINY_CLIP = dict(dim=160, heads=2, layers=3, mlp=640, patch=8, image_size=32, embed_dim=24)
"""Tiny ViT: 2 heads of 80 (the open-clip convention the loader assumes), 17 tokens, 3 stored blocks
(2 are used: the output is the penultimate block's)."""

TINY_CLIP_TOKENS = (TINY_CLIP["image_size"] // TINY_CLIP["patch"]) ** 2 + 1

_CORPUS = [
    "a cat walks on the grass in the sun",
    "a dog runs along the beach at sunset",
    "the camera pans slowly over a city at night",
    "two people talk in a small kitchen",
    "a red car drives down a long road",
    "waves crash on the rocks near the shore",
    "snow falls on a quiet mountain village",
    "a bird flies over the green forest",
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std + mean


def tiny_t5_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random umT5 encoder weights in the official Wan key layout (the real file is bf16)."""
    c, g = TINY_T5, _gen(seed)
    d, a, f = c["dim"], c["dim_attn"], c["ffn"]
    sd = {"token_embedding.weight": _randn(g, c["vocab"], d)}
    for i in range(c["layers"]):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"] = _randn(g, d, std=0.1, mean=1.0)
        for name in "qkv":
            # No attention scaling in T5: keep q.k products moderate with a small q.
            sd[b + f"attn.{name}.weight"] = _randn(g, a, d, std=(d * (a if name == "q" else 1)) ** -0.5)
        sd[b + "attn.o.weight"] = _randn(g, d, a, std=a ** -0.5)
        sd[b + "norm2.weight"] = _randn(g, d, std=0.1, mean=1.0)
        sd[b + "ffn.gate.0.weight"] = _randn(g, f, d, std=d ** -0.5)
        sd[b + "ffn.fc1.weight"] = _randn(g, f, d, std=d ** -0.5)
        sd[b + "ffn.fc2.weight"] = _randn(g, d, f, std=f ** -0.5)
        sd[b + "pos_embedding.embedding.weight"] = _randn(g, c["buckets"], c["heads"], std=0.5)
    sd["norm.weight"] = _randn(g, d, std=0.1, mean=1.0)
    return {k: v.to(dtype) for k, v in sd.items()}


def tiny_clip_state_dict(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Random open-clip xlm-roberta ViT weights in the official Wan key layout (the real file is fp16).

    Holds the full image tower (post-norm and head included) plus a token embedding, a text head
    and ``log_scale`` standing in for the text tower.
    """
    c, g = TINY_CLIP, _gen(seed)
    d, m, p = c["dim"], c["mlp"], c["patch"]
    n = (c["image_size"] // p) ** 2 + 1
    v = "visual."
    sd = {
        v + "patch_embedding.weight": _randn(g, d, 3, p, p, std=(3 * p * p) ** -0.5),
        v + "cls_embedding": _randn(g, 1, 1, d, std=0.5),
        v + "pos_embedding": _randn(g, 1, n, d, std=0.5),
        v + "pre_norm.weight": _randn(g, d, std=0.1, mean=1.0),
        v + "pre_norm.bias": _randn(g, d, std=0.1),
    }
    for i in range(c["layers"]):
        b = f"{v}transformer.{i}."
        sd[b + "norm1.weight"] = _randn(g, d, std=0.1, mean=1.0)
        sd[b + "norm1.bias"] = _randn(g, d, std=0.1)
        sd[b + "attn.to_qkv.weight"] = _randn(g, 3 * d, d, std=d ** -0.5)
        sd[b + "attn.to_qkv.bias"] = _randn(g, 3 * d, std=0.1)
        sd[b + "attn.proj.weight"] = _randn(g, d, d, std=d ** -0.5)
        sd[b + "attn.proj.bias"] = _randn(g, d, std=0.1)
        sd[b + "norm2.weight"] = _randn(g, d, std=0.1, mean=1.0)
        sd[b + "norm2.bias"] = _randn(g, d, std=0.1)
        sd[b + "mlp.0.weight"] = _randn(g, m, d, std=d ** -0.5)
        sd[b + "mlp.0.bias"] = _randn(g, m, std=0.1)
        sd[b + "mlp.2.weight"] = _randn(g, d, m, std=m ** -0.5)
        sd[b + "mlp.2.bias"] = _randn(g, d, std=0.1)
    sd[v + "post_norm.weight"] = _randn(g, d, std=0.1, mean=1.0)
    sd[v + "post_norm.bias"] = _randn(g, d, std=0.1)
    sd[v + "head"] = _randn(g, d, c["embed_dim"], std=d ** -0.5)
    # Stand-ins for the text tower the real file carries.
    sd["textual.token_embedding.weight"] = _randn(g, 16, 8)
    sd["textual.head.0.weight"] = _randn(g, 12, 8)
    sd["log_scale"] = torch.tensor(2.6592)
    return {k: t.to(dtype) for k, t in sd.items()}


def write_tiny_tokenizer(folder: str | Path) -> Path:
    """Trains a tiny sentencepiece unigram model offline and saves a tokenizer folder.

    The folder loads with ``transformers.AutoTokenizer.from_pretrained`` like google/umt5-xxl:
    ``spiece.model``, ``tokenizer.json``, ``tokenizer_config.json``; pad 0, EOS 1 (appended), unk 2.
    Its vocabulary is smaller than ``TINY_T5["vocab"]``.
    """
    import sentencepiece as spm
    from transformers import AutoTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS), model_writer=model, vocab_size=TINY_T5["vocab"],
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    (folder / "spiece.model").write_bytes(model.getvalue())
    # transformers 5 reads spiece.model only through from_pretrained with this config (see
    # packages.md); saving once more writes tokenizer.json so later loads need no sentencepiece.
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 0}))
    tok = AutoTokenizer.from_pretrained(str(folder))
    if len(tok) > TINY_T5["vocab"]:
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens, more than the tiny T5 vocab {TINY_T5['vocab']}")
    tok.save_pretrained(str(folder))
    return folder
