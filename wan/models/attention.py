"""The default attention kernel the networks call, and the signature every backend follows.

Backends (sage, flash, xformers...) live in ``wan.optim``; a network only ever calls the function
it was given (``WanDiT.attention``), so a profile can swap it from outside.
"""

from typing import Callable

import torch
import torch.nn.functional as F

# q [B, Lq, heads, head_dim], k and v [B, Lk, heads, head_dim] -> [B, Lq, heads, head_dim].
# No mask, scale 1/sqrt(head_dim): every Wan attention call has this form.
AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention; q and k are cast to v's dtype first.

    The reference casts q, k, v to the compute dtype before its attention kernel; v already is in
    it, while q and k come out of the float32 RMSNorm/RoPE.
    """
    dt = v.dtype
    out = F.scaled_dot_product_attention(
        q.to(dt).transpose(1, 2), k.to(dt).transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention_with_key_counts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              log_counts: torch.Tensor) -> torch.Tensor:
    """Attention where key j stands for several identical keys: its score gets ``log(count_j)``.

    Softmax over n copies of one key equals softmax over that key alone with ``log n`` added to
    its score, so attending to deduplicated keys is exact. Computed in float32 (the keys are few:
    the text tokens plus one padding row), so the bias is not rounded to bf16.

    Args:
        q [B, Lq, h, d], k and v [B, Lk, h, d]; log_counts [Lk] float32.
    Returns:
        [B, Lq, h, d] in v's dtype.
    """
    out = F.scaled_dot_product_attention(
        q.float().transpose(1, 2), k.float().transpose(1, 2), v.float().transpose(1, 2),
        attn_mask=log_counts.to(torch.float32)[None, None, None, :])
    return out.transpose(1, 2).to(v.dtype)
