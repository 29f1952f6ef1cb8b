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
