"""umT5-XXL text encoder (Wan 2.1 / 2.2), a thin module around transformers' ``UMT5EncoderModel``.

The official network (``wan/modules/t5.py``) is the encoder half of umT5: every block has its own
relative-position bias (32 buckets, bidirectional, max distance 128), attention is *not* scaled by
1/sqrt(head_dim), the feed-forward is gated with tanh-GELU, and the norms are T5 RMS norms
(eps 1e-6). ``UMT5EncoderModel`` with ``feed_forward_proj="gated-gelu"`` is the same network
(parity is tested on random weights), so we use it rather than a second hand-written copy.

Two entry points:
  - ``forward(ids, mask)``: token ids -> hidden states for every position, ``[B, L, dim]``.
  - ``encode_prompts(prompts)``: what the official pipeline does with text: clean, tokenize to a
    fixed length (512), encode with the mask, and trim each output to its real length (each
    prompt is encoded alone over its own tokens: the padding changes no real token's state).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import UMT5Config, UMT5EncoderModel

try:  # the official cleaner uses the `regex` module; its \s is the Unicode whitespace class
    import regex as _re
except ImportError:  # pragma: no cover - transformers depends on regex, so it is normally there
    import re as _re

TEXT_LEN = 512
"""Token length the official pipeline pads and truncates every prompt to."""


def clean_prompt(text: str) -> str:
    """The official prompt cleaning: fix mojibake, unescape HTML twice, collapse whitespace.

    ``"  a&amp;amp;b \\n c "`` -> ``"a&b c"``.
    """
    import ftfy  # imported here: only prompt encoding needs it

    text = ftfy.fix_text(text)
    # Twice, because prompts scraped from the web are often escaped twice ("&amp;amp;").
    text = html.unescape(html.unescape(text)).strip()
    return _re.sub(r"\s+", " ", text).strip()


class TokenizerNotFound(FileNotFoundError):
    """No tokenizer is available for prompt encoding; the message says where to put one."""


@dataclass(frozen=True)
class T5Dims:
    """Hyperparameters of a umT5 encoder (all visible in the tensor shapes except the last two).

    ``umt5-xxl``: vocab 256384, dim 4096, dim_attn 4096, ffn 10240, heads 64, layers 24, buckets 32.
    """

    vocab: int
    dim: int
    dim_attn: int
    ffn: int
    heads: int
    layers: int
    buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    def hf_config(self) -> UMT5Config:
        if self.dim_attn % self.heads:
            raise ValueError(f"T5 attention width {self.dim_attn} is not a multiple of {self.heads} heads")
        return UMT5Config(
            vocab_size=self.vocab, d_model=self.dim, d_kv=self.dim_attn // self.heads, d_ff=self.ffn,
            num_layers=self.layers, num_heads=self.heads, relative_attention_num_buckets=self.buckets,
            relative_attention_max_distance=self.max_distance, feed_forward_proj="gated-gelu",
            layer_norm_epsilon=self.eps, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
            decoder_start_token_id=0, use_cache=False, is_encoder_decoder=False)


class UMT5TextEncoder(nn.Module):
    """umT5 encoder plus the official prompt handling.

    The weights live in ``self.model`` (a ``UMT5EncoderModel``, whose ``shared`` and
    ``encoder.embed_tokens`` are one tied tensor). The tokenizer is not a module: it is either given
    or loaded on first use from ``tokenizer_path``, so ``forward`` never needs one.
    """

    def __init__(self, dims: T5Dims, text_len: int = TEXT_LEN):
        super().__init__()
        self.dims = dims
        self.text_len = text_len
        self.model = UMT5EncoderModel(dims.hf_config())
        self.tokenizer = None
        self.tokenizer_path: Path | None = None
        self.tokenizer_hint = "pass tokenizer=<folder with the google/umt5-xxl tokenizer files>"

    @property
    def dim(self) -> int:
        return self.dims.dim

    def tie_embeddings(self) -> None:
        """Makes ``encoder.embed_tokens`` use the very tensor of ``shared`` (one copy in memory)."""
        self.model.encoder.embed_tokens.weight = self.model.shared.weight

    def set_tokenizer(self, tokenizer=None, path: str | Path | None = None, hint: str | None = None) -> None:
        """Gives a tokenizer object, or a folder to load one from on first use (``AutoTokenizer``)."""
        self.tokenizer = tokenizer
        self.tokenizer_path = Path(path) if path is not None else None
        if hint:
            self.tokenizer_hint = hint

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Encodes token ids.

        Args:
            ids: [B, L] int64 token ids.
            mask: [B, L] 1 for real tokens, 0 for padding (None: all real).
        Returns:
            [B, L, dim] hidden states after the final norm, for every position (padding included:
            the caller trims, as ``encode_prompts`` does).
        """
        if ids.ndim != 2:
            raise ValueError(f"text encoder: ids must be [B, L], got shape {tuple(ids.shape)}")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"text encoder: mask shape {tuple(mask.shape)} != ids shape {tuple(ids.shape)}")
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    # -- prompts ---------------------------------------------------------------------------------

    def get_tokenizer(self):
        if self.tokenizer is None:
            if self.tokenizer_path is None:
                raise TokenizerNotFound(f"text encoder: no umT5 tokenizer found; {self.tokenizer_hint}")
            from transformers import AutoTokenizer
            try:
                self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_path))
            except (OSError, ValueError) as e:
                raise TokenizerNotFound(
                    f"text encoder: the tokenizer folder {self.tokenizer_path} could not be loaded "
                    f"({str(e).splitlines()[0][:200]}); {self.tokenizer_hint}") from None
        return self.tokenizer

    def tokenize(self, prompts: str | Sequence[str], max_length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cleans and tokenizes prompts to a fixed length.

        Returns ``ids, mask``, both [B, max_length] int64 on the model's device; EOS (id 1) ends
        every prompt and padding is id 0 with mask 0.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.get_tokenizer()
        out = tok([clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
                  max_length=max_length or self.text_len, add_special_tokens=True, return_tensors="pt")
        device = self.model.shared.weight.device
        return out["input_ids"].to(device), out["attention_mask"].to(device)

    @torch.no_grad()
    def encode_prompts(self, prompts: str | Sequence[str], max_length: int | None = None) -> list[torch.Tensor]:
        """The official prompt encoding: one ``[L_i, dim]`` tensor per prompt.

        ``L_i`` is the prompt's real token count (EOS included), at most ``max_length`` (default
        ``text_len`` = 512). The DiT pads these back to 512 rows with zeros.

        The reference encodes all ``max_length`` positions; here each prompt is encoded alone, over
        its own tokens. The padding is masked out of every attention, and each other layer works
        token by token, so no real token's state depends on it (equal up to the order of float
        sums; ``tests/test_text_encoder.py``); a typical prompt of ~100 tokens costs a fifth of
        the work (``benchmarks/bench_text_encoder.py``). Alone, a prompt's states are the same bits
        whatever it is encoded with (a batch padded to its longest prompt would change the shapes
        of the products, and so the last bits, with the other prompts).
        """
        ids, mask = self.tokenize(prompts, max_length)
        lengths = mask.gt(0).sum(dim=1).tolist()
        return [self(ids[i:i + 1, :n], mask[i:i + 1, :n])[0] for i, n in enumerate(lengths)]
