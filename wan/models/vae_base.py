"""The encode/decode driver shared by the Wan 2.1 and 2.2 VAEs: chunking, the causal cache of one
call, latent normalisation, output clamp, input checks, tiling and 2x2 patchify."""

from __future__ import annotations

import torch
import torch.nn as nn

from wan.models.vae_blocks import CausalCache, CausalConv3d
from wan.models.vae_tiling import TileConfig, run_tiled



class CausalVAE(nn.Module):
    """Public API of a Wan VAE: chunked causal encode/decode with latent normalisation.

    Subclasses build ``encoder``, ``conv1`` (z_dim*2 -> z_dim*2, 1x1x1), ``conv2`` (z_dim -> z_dim,
    1x1x1), ``decoder`` and set ``version``, ``z_dim``, ``stride``, ``patch``, ``latents_mean`` and
    ``latents_std`` (plain Python lists: the model keeps no buffers outside its state dict).
    """

    version: str
    z_dim: int
    stride: tuple[int, int, int]
    patch: int = 1
    latents_mean: list[float]
    latents_std: list[float]
    encoder: nn.Module
    decoder: nn.Module
    conv1: CausalConv3d
    conv2: CausalConv3d

    # -- public ------------------------------------------------------------------------------

    def encode(self, video: torch.Tensor, tile: TileConfig | None = None) -> torch.Tensor:
        """video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of the spatial stride
        -> normalised latents ``(mu - mean) / std`` [B, z_dim, 1 + k, H/s, W/s], float32."""
        st, ss = self.stride[0], self.stride[1]
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[2] % st != 1 \
                or video.shape[3] % ss or video.shape[4] % ss:
            raise ValueError(
                f"Wan {self.version} VAE encode: video has shape {tuple(video.shape)}; expected "
                f"[B, 3, T, H, W] with T = 1 + {st}k and H, W multiples of {ss}")
        x = video.to(self.conv1.weight.dtype)
        if tile is not None:
            mu = run_tiled(self._encode_mu, x, *self._tile_units(tile), in_scale=ss, out_scale=1)
        else:
            mu = self._encode_mu(x)
        mean, inv_std = self._latent_constants(mu.device)
        return (mu.float() - mean) * inv_std

    def decode(self, z: torch.Tensor, tile: TileConfig | None = None) -> torch.Tensor:
        """z [B, z_dim, F, h, w] normalised latents -> video [B, 3, 1 + 4(F-1), h*s, w*s] in
        [-1, 1], float32."""
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"Wan {self.version} VAE decode: latents have shape {tuple(z.shape)}; "
                             f"expected [B, {self.z_dim}, F, h, w]")
        mean, inv_std = self._latent_constants(z.device)
        z = (z.float() / inv_std + mean).to(self.conv2.weight.dtype)
        if tile is not None:
            video = run_tiled(self._decode_frames, z, *self._tile_units(tile), in_scale=1,
                              out_scale=self.stride[1])
        else:
            video = self._decode_frames(z)
        return video.float().clamp_(-1.0, 1.0)

    def prepare_weights_(self) -> CausalVAE:
        """Lays out weights for the fastest inference path after they are loaded (values and state
        dict unchanged); the default is a no-op."""
        return self

    # -- chunked passes ----------------------------------------------------------------------

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, T, H, W] -> raw mu [B, z_dim, F, h, w]: frame 0 alone, then chunks of 4."""
        x = patchify(x, self.patch)
        cache = CausalCache()
        outs = []
        for start in range(0, x.shape[2], self.stride[0]):
            chunk = x[:, :, :1] if start == 0 else x[:, :, start - self.stride[0] + 1:start + 1]
            cache.first_chunk = start == 0
            outs.append(self.encoder(chunk, cache))
        h = torch.cat(outs, dim=2)
        return self.conv1(h)[:, :self.z_dim].contiguous()

    def _decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """[B, z_dim, F, h, w] raw latents -> [B, 3, 1 + 4(F-1), H, W], one latent frame at a time,
        written into one preallocated output (no growing concatenation)."""
        x = self.conv2(z)
        cache = CausalCache()
        out, pos = None, 0
        for i in range(x.shape[2]):
            cache.first_chunk = i == 0
            y = unpatchify(self.decoder(x[:, :, i:i + 1], cache), self.patch)
            if out is None:
                b, c, _, hh, ww = y.shape
                frames = 1 + self.stride[0] * (x.shape[2] - 1)
                out = torch.empty((b, c, frames, hh, ww), dtype=y.dtype, device=y.device)
            out[:, :, pos:pos + y.shape[2]] = y
            pos += y.shape[2]
            del y
        return out

    # -- helpers -----------------------------------------------------------------------------

    def _latent_constants(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, self.z_dim, 1, 1, 1)
        mean = torch.tensor(self.latents_mean, dtype=torch.float32, device=device).view(shape)
        std = torch.tensor(self.latents_std, dtype=torch.float32, device=device).view(shape)
        return mean, 1.0 / std  # the reference multiplies by 1/std and divides by it to undo

    def _tile_units(self, tile: TileConfig) -> tuple[int, int]:
        s = self.stride[1]
        if tile.tile < s:
            raise ValueError(f"TileConfig.tile={tile.tile}: must be at least the spatial stride {s}")
        return tile.tile // s, tile.overlap // s


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, T, H*p, W*p] -> [B, C*p*p, T, H, W], channels ordered (c, w-offset, h-offset)."""
    if p == 1:
        return x
    b, c, t, h, w = x.shape
    x = x.reshape(b, c, t, h // p, p, w // p, p)
    return x.permute(0, 1, 6, 4, 2, 3, 5).reshape(b, c * p * p, t, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``patchify``: [B, C*p*p, T, H, W] -> [B, C, T, H*p, W*p]."""
    if p == 1:
        return x
    b, cpp, t, h, w = x.shape
    c = cpp // (p * p)
    x = x.reshape(b, c, p, p, t, h, w)  # (c, w-offset r, h-offset q)
    return x.permute(0, 1, 4, 5, 3, 6, 2).reshape(b, c, t, h * p, w * p)
