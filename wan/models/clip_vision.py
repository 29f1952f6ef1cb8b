"""CLIP vision encoder (Wan 2.1 i2v / flf2v), a thin module around transformers' ``CLIPVisionModel``.

The official code (``wan/modules/clip.py``) runs the ViT-H/14 image tower of open-clip
xlm-roberta-large-vit-huge-14 and keeps the hidden states after the *penultimate* block
(``use_31_block=True``): no last block, no post-norm, no projection head. That is exactly the
``last_hidden_state`` of a ``CLIPVisionModel`` built with one layer fewer, so this module builds
only those layers: the last block, the post-norm and the head are never allocated nor loaded.

Layers: patch conv without bias, class token, learned positions, pre-norm, pre-norm blocks with
exact GELU and LayerNorm eps 1e-5, plain 1/sqrt(head_dim) softmax attention without a mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel

# OpenAI CLIP normalisation, used by the official preprocessing.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipDims:
    """Hyperparameters of the image tower as stored (``layers`` counts every stored block).

    ViT-H/14 (Wan): dim 1280, heads 16, layers 32, mlp 5120, patch 14, image 224 -> 257 tokens.
    """

    dim: int
    heads: int
    layers: int
    mlp: int
    patch: int
    image_size: int
    eps: float = 1e-5
    act: str = "gelu"

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2 + 1

    def hf_config(self) -> CLIPVisionConfig:
        """Config of the *truncated* tower: one block fewer than stored."""
        if self.layers < 2:
            raise ValueError(f"CLIP vision: {self.layers} block(s) stored; the penultimate output needs 2 or more")
        if self.dim % self.heads:
            raise ValueError(f"CLIP vision: width {self.dim} is not a multiple of {self.heads} heads")
        return CLIPVisionConfig(
            hidden_size=self.dim, intermediate_size=self.mlp, num_hidden_layers=self.layers - 1,
            num_attention_heads=self.heads, num_channels=3, image_size=self.image_size,
            patch_size=self.patch, hidden_act=self.act, layer_norm_eps=self.eps,
            attention_dropout=0.0)


def preprocess_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """The official CLIP preprocessing.

    Args:
        images: [B, 3, H, W] in [-1, 1].
        size: the model's square input size (224 for ViT-H/14).
    Returns:
        [B, 3, size, size] float32, normalised with the CLIP mean and std.
    """
    # A squash resize: bicubic, no crop, no antialias, computed in float32 like the reference.
    x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipVisionEncoder(nn.Module):
    """Images -> the penultimate block's hidden states (``[B, 257, 1280]`` for ViT-H/14).

    ``self.model`` is a ``CLIPVisionModel`` of ``dims.layers - 1`` blocks whose post-norm is an
    identity (it only touched the pooled output, which nobody reads here).
    """

    def __init__(self, dims: ClipDims):
        super().__init__()
        self.dims = dims
        self.model = CLIPVisionModel(dims.hf_config())
        self.model.post_layernorm = nn.Identity()

    @property
    def image_size(self) -> int:
        return self.dims.image_size

    def init_constants(self) -> None:
        """Recreates the non-weight buffers (``position_ids``) on the weights' device.

        transformers keeps the position indices as a non-persistent buffer; a model built on the
        meta device and filled from a checkpoint has no values for it, so it is rebuilt here.
        """
        emb = self.model.embeddings
        device = emb.position_embedding.weight.device
        emb.position_ids = torch.arange(emb.num_positions, device=device).expand(1, -1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Encodes images.

        Args:
            images: [B, 3, H, W] in [-1, 1], any size (resized to ``image_size``). flf2v passes the
                first and last frames as B=2 and concatenates the two outputs along tokens.
        Returns:
            [B, tokens, dim] in the weights' dtype; tokens = (image_size/patch)^2 + 1.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP vision: images must be [B, 3, H, W] in [-1, 1], got shape {tuple(images.shape)}")
        weight = self.model.embeddings.patch_embedding.weight
        pixels = preprocess_images(images, self.image_size).to(device=weight.device, dtype=weight.dtype)
        return self.model(pixel_values=pixels).last_hidden_state
