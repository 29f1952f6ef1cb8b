"""Pieces shared by the Wan 2.1 and 2.2 VAEs: causal convolutions with a per-call frame cache,
the L2 "RMS_norm", residual / attention / resampling blocks, and the runners that push chunks or
single frames through a stack of them. (The encode/decode drivers are in ``vae_base``, spatial
tiling in ``vae_tiling``.)

Module and parameter names follow the official Wan code (``wan/modules/vae.py``) so official and
ComfyUI checkpoints load without renaming (``residual.0/2/3/6``, ``shortcut``, ``resample.1``,
``time_conv``, ``norm``/``to_qkv``/``proj``).

Causal streaming. Every temporal 3-tap convolution sees, in front of its current input, the last
two input frames of the previous chunk (zeros at the start of the video). Those frames live in a
``CausalCache`` created for one encode/decode call and passed down; no module keeps call state,
so several requests may share one model.

Two exact paths compute the same maths (all reformulations of the reference, equal up to float
rounding order):
- chunk path (encoders, Wan 2.2 decoder): ``norm -> SiLU -> causal conv`` writes the normalised
  activation straight into the conv's input buffer behind the cached frames (one write instead
  of the reference's clone + cat + pad copies); activations are channels-last
  (``channels_last_3d``), the layout the convolution kernels prefer; spatial zero padding is
  done inside the convolution;
- frame path (Wan 2.1 decoder, see "Frame-at-a-time path" below): one frame at a time through
  every stage, each 3-tap causal conv split into its three 2D time slices accumulated into one
  output, so history frames are kept by reference (no copies), the zero frames in front of the
  video are skipped instead of convolved, and residual sums are accumulated in place.
Both use the sub-pixel form of "nearest 2x upsample -> 3x3 conv" (``upsample2x_conv``), which
does the same sums with 2.25x fewer multiplications.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


CACHE_T = 2  # frames of history a 3-tap causal conv needs
CHANNELS_LAST = torch.channels_last_3d


class CausalCache:
    """State of one causal encode/decode pass, keyed by module.

    For each causal conv: its last ``time_pad`` input frames, as one [B, C, 2, H, W] tensor on
    the chunk path or as a pair (frame t-2, frame t-1) of [B, C, H, W] tensors (``None`` for a
    zero frame) on the frame path. For a temporal resampler: a marker that its first chunk has
    been seen. ``first_chunk`` is True while the first chunk (frame 0) goes through the network.
    """

    def __init__(self) -> None:
        self.frames: dict[nn.Module, object] = {}
        self.first_chunk = True
        self._spare: torch.Tensor | None = None

    def recycle(self, t: torch.Tensor | None) -> None:
        """Keeps one dead frame for ``spare``: the frame path then writes new frames into memory
        it already has instead of fresh allocations, which the OS must map and zero page by page.
        Only the latest one is kept (a spare of another stage's shape, idle while this stage
        runs, would only add to the peak memory)."""
        if t is not None:
            self._spare = t

    def spare(self, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The recycled tensor if it has this shape, dtype and device (contents undefined)."""
        t = self._spare
        if t is None or t.shape != torch.Size(shape) or t.dtype != dtype or t.device != device:
            return None
        self._spare = None
        return t

    def seen(self, module: nn.Module) -> bool:
        return module in self.frames

    def get(self, module: nn.Module):
        return self.frames.get(module)

    def put(self, module: nn.Module, frames) -> None:
        self.frames[module] = frames


# ---------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nn.Conv3d):
    """3D convolution that is causal in time: it pads ``2*padding_t`` frames in front only.

    The frames in front are the cached frames of the previous chunk, or zeros. Spatial padding
    is symmetric and done by the convolution itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.time_pad = 2 * self.padding[0]
        self.padding = (0, self.padding[1], self.padding[2])

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C_out, T', H', W']; with a cache, continues the previous chunk."""
        if self.time_pad == 0:
            return super().forward(x)
        history = cache.get(self) if cache is not None else None
        parts = [history if history is not None else _zero_frames(x, self.time_pad), x]
        buf = torch.cat(parts, dim=2)
        if cache is not None:
            cache.put(self, buf[:, :, -self.time_pad:].clone())
        return super().forward(buf)

    def forward_padded(self, buf: torch.Tensor) -> torch.Tensor:
        """Runs on an input that already holds the ``time_pad`` history frames in front."""
        return super().forward(buf)


def _zero_frames(x: torch.Tensor, n: int) -> torch.Tensor:
    b, c, _, h, w = x.shape
    return torch.empty((b, c, n, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST).zero_()


class RMS_norm(nn.Module):  # noqa: N801 (official name)
    """L2 normalisation over channels times sqrt(C) times a learned gain.

    Note: this is ``F.normalize`` (eps 1e-12 on the L2 norm), not a classic RMSNorm with eps.
    ``gamma`` has shape [C, 1, 1, 1] for videos or [C, 1, 1] for images (official layout).
    """

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, ...] -> same shape; ``out`` (same shape) receives the result if given."""
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min_(1e-12)
        y = torch.div(x, norm, out=out) if out is not None else x / norm
        # scale and gamma folded into one [C] multiplier: one pass over the activation, not two.
        return y.mul_(self.gamma * self.scale)


def norm_silu_causal_conv(norm: RMS_norm, conv: CausalConv3d, x: torch.Tensor,
                          cache: CausalCache) -> torch.Tensor:
    """``conv(silu(norm(x)))`` with causal history, writing the activation once.

    The activation is computed straight into the conv's input buffer after the history frames,
    which replaces the reference's clone + cat + pad copies by one write.
    """
    pad = conv.time_pad
    b, c, t, h, w = x.shape
    buf = torch.empty((b, c, pad + t, h, w), dtype=x.dtype, device=x.device, memory_format=CHANNELS_LAST)
    history = cache.get(conv)
    if history is None:
        buf[:, :, :pad].zero_()
    else:
        buf[:, :, :pad].copy_(history)
    body = buf[:, :, pad:]
    norm(x, out=body)
    F.silu(body, inplace=True)
    cache.put(conv, buf[:, :, -pad:].clone())
    return conv.forward_padded(buf)


# ---------------------------------------------------------------------------------------------
# Frame-at-a-time path (decoder)
#
# Pushing one frame at a time through a causal 3-tap conv, frame t gives
#     out_t = bias + W2 * y_t + W1 * y_{t-1} + W0 * y_{t-2}
# where y are the conv's input frames and Wk = weight[:, :, k] is a 2D conv: exactly the sums of
# the 3D conv over [y_{t-2}, y_{t-1}, y_t], grouped by time tap. Done as 2D convs accumulated
# into one output, the history is two references (no copy into a padded buffer), a frame the
# reference pads with zeros (before frame 0) is skipped rather than convolved, and a residual
# sum is accumulated into the residual's own storage.


def _fused_accumulate_ok(acc: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether oneDNN's convolution with an in-place "add" post-op can run on these tensors."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and acc.dtype == torch.float32
            and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise_")
            and acc.is_contiguous(memory_format=torch.channels_last)
            and x.is_contiguous(memory_format=torch.channels_last))


def conv2d_accumulate_(acc: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None, padding: Sequence[int], fused: bool = True) -> torch.Tensor:
    """``acc += conv2d(x, weight, bias, padding)`` in place and returned.

    acc [B, Co, H, W], x [B, Ci, H, W], weight [Co, Ci, kh, kw] (stride 1, padding keeps H, W).
    On CPU float32 oneDNN adds the convolution into ``acc`` as it writes it (the post-op
    inductor uses), which saves the temporary output and the extra pass of ``add_``.
    """
    if fused and _fused_accumulate_ok(acc, x):
        weight = weight.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise_.binary(
            acc, x, weight, bias, list(padding), [1, 1], [1, 1], 1, "add", None, None, [], None)
    return acc.add_(F.conv2d(x, weight, bias, padding=list(padding)))


def _conv_tap(acc: torch.Tensor | None, x: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None, padding: Sequence[int], cache: CausalCache) -> torch.Tensor:
    """``conv2d(x, weight, bias)``, added into ``acc`` when there is one. Without ``acc`` the
    output goes into a recycled frame from ``cache`` if it has one (zeroed, then accumulated)."""
    if acc is None:
        b, _, h, w = x.shape
        acc = cache.spare((b, weight.shape[0], h, w), x.dtype, x.device)
        if acc is None or not _fused_accumulate_ok(acc, x):
            cache.recycle(acc)
            return F.conv2d(x, weight, bias, padding=list(padding))
        acc.zero_()
    return conv2d_accumulate_(acc, x, weight, bias, padding)


def causal_conv_frame(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache,
                      acc: torch.Tensor | None = None, norm: RMS_norm | None = None,
                      norm_in_place: bool = False) -> torch.Tensor:
    """One frame through a causal conv: x [B, Ci, H, W] -> [B, Co, H, W] (channels-last).

    With ``norm`` the conv input is ``silu(norm(x))`` (written into ``x`` itself if
    ``norm_in_place``), otherwise ``x``. The input frame is kept in ``cache`` by reference as
    history, so callers must not write to it afterwards. With ``acc`` [B, Co, H, W] the result is
    added into it in place (a residual sum) and returned.

    Taps run oldest first: the oldest history frame is then dead before the new activation is
    made, and its storage receives it (no new frame-sized allocation). Absent (zero) history
    frames are skipped. The first tap that runs carries the bias.
    """
    if conv.stride != (1, 1, 1) or conv.kernel_size[0] != conv.time_pad + 1:
        raise ValueError(f"causal_conv_frame: needs a stride-1 conv with kernel depth time_pad + 1, "
                         f"got stride {conv.stride}, kernel {conv.kernel_size}")
    w, bias, pad = conv.weight, conv.bias, conv.padding[1:]
    older = old = None
    if conv.time_pad:
        older, old = cache.get(conv) or (None, None)
    for k, frame in ((0, older), (1, old)):
        if frame is not None:
            acc, bias = _conv_tap(acc, frame, w[:, :, k], bias, pad, cache), None
    if norm is not None:
        # ``older`` is dead now (the cache drops it below); it was made here, so no one else
        # holds it: it takes the new activation, or it is recycled if x itself takes it
        if norm_in_place:
            target = x
            cache.recycle(older)
        else:
            target = older
        del older
        x = rms_norm_frame(norm, x, out=target, silu=True)
    if conv.time_pad:
        cache.put(conv, (old, x))
    return _conv_tap(acc, x, w[:, :, -1], bias, pad, cache)


def causal_conv_frame_push(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache,
                           norm: RMS_norm | None = None) -> torch.Tensor:
    """``causal_conv_frame`` for a conv with fewer outputs than inputs (the output head):
    x [B, Ci, H, W] -> [B, Co, H, W]; with ``norm``, x is normalised in place first.

    Instead of the last two input frames (2 x Ci channels) the cache keeps the partial sums of
    the next two outputs (2 x Co channels): frame t contributes W2 * y_t to out_t, W1 * y_t to
    out_{t+1} and W0 * y_t to out_{t+2}, all three from one conv with the time slices stacked as
    3*Co output channels. For the head that is 6 channels of history instead of 192.
    """
    if conv.stride != (1, 1, 1) or conv.kernel_size[0] != 3 or conv.time_pad != 2:
        raise ValueError(f"causal_conv_frame_push: needs a stride-1 causal conv with kernel depth 3, "
                         f"got stride {conv.stride}, kernel {conv.kernel_size}")
    y = rms_norm_frame(norm, x, out=x, silu=True) if norm is not None else x
    co, ci, kt, kh, kw = conv.weight.shape
    stacked = conv.weight.permute(2, 0, 1, 3, 4).reshape(kt * co, ci, kh, kw)  # rows: tap 0, 1, 2
    parts = F.conv2d(y, stacked, None, padding=conv.padding[1:])              # [B, 3Co, H, W]
    now, next1, next2 = parts[:, 2 * co:], parts[:, co:2 * co], parts[:, :co]  # W2, W1, W0 terms
    pending1, pending2 = cache.get(conv) or (None, None)  # partial sums of out_t, out_{t+1}
    out = now + conv.bias.view(1, co, 1, 1) if conv.bias is not None else now.clone()
    if pending1 is not None:
        out.add_(pending1)
    cache.put(conv, (next1 + pending2 if pending2 is not None else next1.clone(), next2.clone()))
    return out


def time_slice_major_(conv: CausalConv3d) -> None:
    """Re-stores ``conv.weight`` [Co, Ci, kt, kh, kw] so that each time slice ``weight[:, :, k]``
    is one channels-last [Co, Ci, kh, kw] block: the frame path then hands the slices to the 2D
    convolution without copying them (a strided slice is copied on every call, which at the
    low-resolution stages costs as much as the convolution). Shape and values are unchanged."""
    with torch.no_grad():
        storage = conv.weight.detach().permute(2, 0, 3, 4, 1).contiguous()  # [kt, Co, kh, kw, Ci]
        conv.weight = nn.Parameter(storage.permute(1, 4, 0, 2, 3), requires_grad=conv.weight.requires_grad)


def rms_norm_frame(norm: RMS_norm, x: torch.Tensor, out: torch.Tensor | None = None,
                   silu: bool = False) -> torch.Tensor:
    """``norm(x)`` (then SiLU) for channels-last frames x [B, C, H, W]; ``out`` may be ``x``.

    Works on the [pixels, C] view of the channels-last storage, where the per-pixel norm and the
    per-channel gain broadcast along rows, in four passes: norm, divide, gain, SiLU. The division
    by ``max(norm, 1e-12)`` is ``F.normalize``'s, so a pixel of zeros stays zero.
    """
    c = x.shape[1]
    x = x.contiguous(memory_format=torch.channels_last)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.channels_last)
    rows, out_rows = x.permute(0, 2, 3, 1).view(-1, c), out.permute(0, 2, 3, 1).view(-1, c)
    inv = torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min_(1e-12)
    torch.div(rows, inv, out=out_rows)
    out_rows.mul_((norm.gamma * norm.scale).reshape(c))
    if silu:
        F.silu(out_rows, inplace=True)
    return out


FrameStage = Callable[[torch.Tensor, "CausalCache"], "torch.Tensor | Iterator[torch.Tensor]"]


def stream_frames(stages: Sequence[FrameStage], x: torch.Tensor, cache: CausalCache,
                  out: list[torch.Tensor]) -> list[torch.Tensor]:
    """Pushes frame ``x`` through ``stages`` and appends the resulting frames to ``out``.

    A stage returns a frame, or an iterator of frames (a temporal upsampler): those go on depth
    first, one after the other, so each conv sees its frames in time order and only one frame
    per stage is alive.
    """
    for i, stage in enumerate(stages):
        x = stage(x, cache)
        if not isinstance(x, torch.Tensor):
            for frame in x:
                stream_frames(stages[i + 1:], frame, cache, out)
            return out
    out.append(x)
    return out


class ResidualBlock(nn.Module):
    """[norm, SiLU, conv3, norm, SiLU, dropout, conv3] + shortcut (1x1x1 conv when dims differ).

    Keys: ``residual.0.gamma``, ``residual.2.*``, ``residual.3.gamma``, ``residual.6.*``,
    ``shortcut.*``.
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0),
            CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """x [B, in_dim, T, H, W] -> [B, out_dim, T, H, W]."""
        r = self.residual
        h = self.shortcut(x)
        y = norm_silu_causal_conv(r[0], r[2], x, cache)
        y = norm_silu_causal_conv(r[3], r[6], y, cache)
        return y.add_(h)  # in place on the fresh conv output: no extra activation

    def forward_frame(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """Frame path: x [B, in_dim, H, W] -> [B, out_dim, H, W]; x's storage may hold the result
        (the second conv is accumulated into the residual), so x must not be used afterwards."""
        r = self.residual
        y = causal_conv_frame(r[2], x, cache, norm=r[0])
        acc = x if isinstance(self.shortcut, nn.Identity) else causal_conv_frame(self.shortcut, x, cache)
        # y is referenced nowhere else: its storage may take its own activation
        return causal_conv_frame(r[6], y, cache, acc=acc, norm=r[3], norm_in_place=True)


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (over h*w positions), plus identity."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """x [B, C, T, H, W] -> same shape."""
        return from_frames(self.forward_frame(to_frames(x)), x.shape[0])

    def forward_frame(self, frames: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        """frames [N, C, H, W] -> same shape (each frame attends within itself)."""
        n, c, h, w = frames.shape
        qkv = self.to_qkv(self.norm(frames))                       # [N, 3C, H, W]
        qkv = qkv.reshape(n, 1, 3 * c, h * w).transpose(-1, -2)    # [N, 1, HW, 3C]
        q, k, v = qkv.contiguous().chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)                 # [N, 1, HW, C]
        y = y.squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return self.proj(y).add_(frames)


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] (a view for channels-last input)."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def from_frames(x: torch.Tensor, b: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W] (a view for channels-last input)."""
    bt, c, h, w = x.shape
    return x.reshape(b, bt // b, c, h, w).transpose(1, 2)


class Upsample(nn.Upsample):
    """Nearest-exact upsampling computed in float32 (the reference's bfloat16 workaround).

    Kept for the official module layout (``resample.0``, no weights); ``Resample`` computes
    upsample + conv together with ``upsample2x_conv``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type_as(x)


# Per output phase (even, odd row), which of the three 3x3 taps land on low-resolution rows
# (i-1, i) for the even phase and (i, i+1) for the odd one (see upsample2x_conv).
_PHASE_TAPS = (((1, 0, 0), (0, 1, 1)),
               ((1, 1, 0), (0, 0, 1)))


def upsample2x_conv(conv: nn.Conv2d, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(nearest_upsample_2x(x))`` for a 3x3, padding-1 conv: x [N, C, h, w] -> [N, Co, 2h, 2w].

    Sub-pixel form. Nearest(-exact) 2x upsampling copies x[i] to rows 2i and 2i+1 (at an exact
    factor 2, "nearest-exact" picks floor((r + 0.5) / 2) = r // 2). So output row 2i (even
    phase) sees upsampled rows 2i-1, 2i, 2i+1 = x rows i-1, i, i: kernel row 0 on x[i-1], rows
    1 + 2 on x[i]; output row 2i+1 (odd phase) sees x rows i, i, i+1: rows 0 + 1 on x[i], row 2
    on x[i+1]. The same holds for columns. Each of the 4 (row, column) phases is therefore a 2x2
    conv on the low-resolution x whose taps are sums of the 3x3 taps: 16 multiplications per
    low-resolution pixel instead of 36, and no upsampled copy of x. The zero padding of the
    upsampled image falls on x's zero padding, so the borders agree too.

    For each row phase, its 2 column-phase kernels run as one conv with 2*Co outputs and padding
    1, giving (h+1) x (w+1) positions; an even phase reads positions [0, h), an odd one [1, h+1).
    These are interleaved into the channels-last result (a pixel shuffle); one row phase at a
    time keeps the temporary at half the output's size. ``out`` (channels-last [N, Co, 2h, 2w],
    contents ignored) receives the result if given.
    """
    n, _, h, w = x.shape
    co = conv.out_channels
    taps = torch.tensor(_PHASE_TAPS, dtype=conv.weight.dtype, device=conv.weight.device)  # [2, 2, 3]
    kernels = torch.einsum("aip,bjq,ocpq->abocij", taps, taps, conv.weight)             # [2, 2, Co, C, 2, 2]
    bias = conv.bias.repeat(2) if conv.bias is not None else None
    x = x.contiguous(memory_format=torch.channels_last)
    if out is None or not out.is_contiguous(memory_format=torch.channels_last):
        out = torch.empty((n, co, 2 * h, 2 * w), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last)
    grid = out.permute(0, 2, 3, 1).view(n, h, 2, w, 2, co)  # [n, row, row phase, col, col phase, c]
    for a in (0, 1):
        phases = F.conv2d(x, kernels[a].reshape(2 * co, -1, 2, 2), bias, padding=1)  # [N, 2Co, h+1, w+1]
        phases = phases.permute(0, 2, 3, 1).view(n, h + 1, w + 1, 2, co)
        for b in (0, 1):
            grid[:, :, a, :, b].copy_(phases[:, a:a + h, b:b + w, b])
        del phases
    return out


class Resample(nn.Module):
    """Spatial x2 up/down sampling, optionally with a temporal x2 (``time_conv``).

    Args:
        dim: input channels.
        mode: ``upsample2d``, ``upsample3d``, ``downsample2d`` or ``downsample3d``.
        out_dim: channels after an upsample conv (``dim // 2`` in Wan 2.1, ``dim`` in Wan 2.2).
    """

    def __init__(self, dim: int, mode: str, out_dim: int | None = None):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"),
                                          nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode.startswith("downsample"):
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        else:
            raise ValueError(f"Resample mode {mode!r}: expected upsample2d/3d or downsample2d/3d")

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """x [B, C, T, H, W] -> [B, C', T', 2H, 2W] or [B, C, T', H/2, W/2]."""
        if self.mode == "upsample3d":
            x = self._double_frames(x, cache)
        b = x.shape[0]
        if self.mode.startswith("upsample"):
            x = from_frames(upsample2x_conv(self.resample[1], to_frames(x)), b)
        else:
            x = from_frames(self.resample(to_frames(x)), b)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, cache)
        return x

    def forward_frame(self, x: torch.Tensor, cache: CausalCache) -> Iterator[torch.Tensor]:
        """Frame path of the upsamplers: x [B, C, H, W] -> 1 or 2 frames [B, C', 2H, 2W], made
        one at a time as the caller takes them."""
        if not self.mode.startswith("upsample"):
            raise ValueError(f"Resample.forward_frame: mode {self.mode!r} has no frame path")
        frames = [x]
        if self.mode == "upsample3d":
            if not cache.seen(self):
                cache.put(self, None)  # first frame: passes through (see _double_frames)
            else:
                y = causal_conv_frame(self.time_conv, x, cache)  # [B, 2C, H, W]
                c = x.shape[1]
                frames = [y[:, :c], y[:, c:]]  # channel halves are frames 2i and 2i+1
        conv = self.resample[1]
        for frame in frames:
            b, _, h, w = frame.shape
            spare = cache.spare((b, conv.out_channels, 2 * h, 2 * w), frame.dtype, frame.device)
            yield upsample2x_conv(conv, frame, out=spare)

    def _double_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # The reference leaves the first chunk (frame 0) alone; from the second chunk on,
        # time_conv runs with zero history and each frame becomes two.
        if not cache.seen(self):
            cache.put(self, None)
            return x
        b, c, t, h, w = x.shape
        y = self.time_conv(x, cache)                                # [B, 2C, T, H, W]
        # channel halves (first C, second C) become frames (2i, 2i+1)
        out = torch.empty((b, c, 2 * t, h, w), dtype=y.dtype, device=y.device, memory_format=CHANNELS_LAST)
        out[:, :, 0::2] = y[:, :c]
        out[:, :, 1::2] = y[:, c:]
        return out

    def _halve_frames(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        # First chunk: passes through, its last frame is kept. Later chunks: stride-2 time conv
        # over [last frame of the previous chunk, x].
        previous = cache.get(self)
        cache.put(self, x[:, :, -1:].clone())
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


class CausalEncoder(nn.Module):
    """The forward both Wan encoders share: ``conv1``, ``downsamples``, ``middle``, ``head``
    (subclasses build those modules under the official names), one chunk at a time."""

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = run_conv_in(self.conv1, x, cache)
        for block in self.downsamples:
            x = block(x, cache)
        for block in self.middle:
            x = block(x, cache)
        return run_head(self.head, x, cache)


def make_head(dim: int, out: int) -> nn.Sequential:
    """Output head of encoders and decoders: [RMS_norm, SiLU, CausalConv3d 3x3x3] (keys head.0/2)."""
    return nn.Sequential(RMS_norm(dim, images=False), nn.SiLU(), CausalConv3d(dim, out, 3, padding=1))


def make_middle(dim: int) -> nn.Sequential:
    """Middle of encoders and decoders: residual block, attention, residual block (keys middle.0/1/2)."""
    return nn.Sequential(ResidualBlock(dim, dim), AttentionBlock(dim), ResidualBlock(dim, dim))


def run_head(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Output head [RMS_norm, SiLU, CausalConv3d]."""
    return norm_silu_causal_conv(head[0], head[2], x, cache)


def run_head_frame(head: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """Frame path of the head: x [B, C, H, W] -> [B, out, H, W]; normalises x in place."""
    return causal_conv_frame_push(head[2], x, cache, norm=head[0])


def run_conv_in(conv: CausalConv3d, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    """First causal conv; switches the activations to the channels-last layout."""
    return conv(x.contiguous(memory_format=CHANNELS_LAST), cache)


# ---------------------------------------------------------------------------------------------
# Streaming through a list of stages

Stage = Callable[[torch.Tensor, CausalCache], torch.Tensor]


def run_streamed(stages: Sequence[Stage], x: torch.Tensor, cache: CausalCache,
                 stream_from: int) -> torch.Tensor:
    """Runs ``stages`` in order; from stage ``stream_from`` on, one frame at a time.

    Every stage is causal with its history in ``cache``, so pushing the frames of a chunk one by
    one through the remaining stages gives the same result as pushing the whole chunk, while only
    one frame of the large high-resolution activations is alive at a time.
    """
    for i, stage in enumerate(stages):
        if i >= stream_from and x.shape[2] > 1:
            outs = [run_streamed(stages[i:], f, cache, 0) for f in x.split(1, dim=2)]
            return torch.cat(outs, dim=2)
        x = stage(x, cache)
    return x
