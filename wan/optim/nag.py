"""Normalized Attention Guidance (NAG): a negative prompt that works at guidance 1.

Source: D.-Y. Chen, H. Bandyopadhyay, K. Zou, Y.-Z. Song, "Normalized Attention Guidance:
Universal Negative Guidance for Diffusion Models", arXiv:2505.21179 (2025), with the authors'
reference code (github.com/ChenDarYen/Normalized-Attention-Guidance, ``attention_wan_nag.py``) for
the conventions the paper leaves implicit; Wan2GP exposes the same three numbers as ``NAG_scale``,
``NAG_tau``, ``NAG_alpha`` with the same meaning.

Classifier-free guidance extrapolates the *outputs* of two passes, which breaks down in few-step
and distilled models (guidance 1: there is no second pass at all). NAG works inside the prompt's
own pass: every text cross-attention attends with the same queries to the prompt (``Z+``) and to
the negative prompt (``Z-``), and the block continues with

    Z~    = phi * Z+ - (phi - 1) * Z-            extrapolation (= Z+ + (phi - 1) (Z+ - Z-))
    r     = ||Z~||_1 / ||Z+||_1                  per token: L1 over the channels (all heads)
    Z^    = Z~ * tau * ||Z+||_1 / (||Z~||_1 + 1e-7)   where r > tau, else Z~   (r NaN counts as > tau)
    Z_NAG = alpha * Z^ + (1 - alpha) * Z+        blend

where ``phi`` is ``nag_scale``, ``tau`` is ``nag_tau`` and ``alpha`` is ``nag_alpha``. The paper
writes the extrapolation with a scale that starts at 0; its code, its ComfyUI nodes, Wan2GP and
every shared setting use ``phi`` with 1 meaning "no guidance", which is what ``nag_scale`` is here
(``nag_scale`` 9 is the reference's Wan 2.1 example; the paper's ``s`` is ``phi - 1``). The
outputs are the attention results with the heads flattened, before the output projection ``o``;
in image-to-video blocks the CLIP-image attention is added afterwards, unguided (as the reference
does). Every block's cross-attention is guided, VACE blocks included. The arithmetic runs in
float32 whatever the compute dtype (the L1 sums run over up to 5120 channels).

Guidance above 1 composes (the reference's own Wan example runs CFG 5 with NAG 9): the prompt
pass carries NAG, the negative-prompt pass stays plain, and CFG combines them as usual.

``nag_scale <= 1`` is off: the blocks run exactly as without NAG (nothing extra is computed), so
the output equals the plain run bit for bit. The scale is read per step through
``scale_at(step)``: a constant today; guidance phases can hand :class:`NagGuidance` a function of
the step (e.g. NAG only in the first steps) without touching the loop.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """The NAG formula (module docstring) on attention outputs ``[..., C]`` (per token over the
    last dim); float32 inside, returned in ``z_pos``'s dtype."""
    zp, zn = z_pos.float(), z_neg.float()
    guided = zp * scale - zn * (scale - 1)
    norm_pos = zp.abs().sum(-1, keepdim=True)
    norm_guided = guided.abs().sum(-1, keepdim=True)
    ratio = torch.nan_to_num(norm_guided / norm_pos, nan=10.0)  # 0/0: treated as far out, as the reference
    clipped = guided * (norm_pos * tau / (norm_guided + 1e-7))
    guided = torch.where(ratio > tau, clipped, guided)
    return (guided * alpha + zp * (1 - alpha)).to(z_pos.dtype)


@dataclass(frozen=True)
class _Guide:
    """The :class:`~wan.models.dit.TextGuide` of one pass: the negative prompt's embedded rows and
    the step's numbers."""

    negative: Any          # wan.models.dit.TextContext, rows expanded to the pass's batch
    scale: float
    tau: float
    alpha: float

    def __call__(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        return nag_combine(z_pos, z_neg, self.scale, self.tau, self.alpha)


@dataclass
class _State:
    previous_runner: Any
    negative: Any = None   # the negative prompt embedded by this network (TextContext, batch 1)


class NagGuidance:
    """NAG on every network of a job, attached from outside (a part of
    :func:`wan.engine.attach.attach_job`): each DiT's block runner is wrapped so that a pass of the
    prompt (``cond``, ``cond_skip``) gets a text guide in its context; negative-prompt passes run
    untouched. Attach it after any part that sets ``block_runner`` (a step cache: it wraps that
    runner) and before parallel wrappers (Ulysses shards the tokens around it: NAG is per token).

    Args:
        negative_context: the negative prompt's text encoder states ``[1, L, text_dim]`` on the
            device (the same tensor the negative-prompt pass gets).
        scale: ``nag_scale`` (phi), or a function ``step -> phi`` (per-step control; <= 1: off).
        tau, alpha: ``nag_tau``, ``nag_alpha``.
        reembed_each_step: embed the negative prompt again at each step rather than once per job and
            network (needed when LoRAs may move the DiT's text-embedding weights between steps).

    The loop tells it which step and pass run (:meth:`begin`, as it tells a block runner).
    """

    def __init__(self, negative_context: torch.Tensor, scale: float | Callable[[int], float], tau: float,
                 alpha: float, reembed_each_step: bool = False):
        self.negative_context = negative_context
        self._scheduled = callable(scale)
        self.scale_at: Callable[[int], float] = scale if callable(scale) else (lambda step, s=float(scale): s)
        self.tau, self.alpha = float(tau), float(alpha)
        self.reembed_each_step = reembed_each_step
        self.step, self.pass_name = 0, "cond"
        self.guided_passes = 0                      # passes that ran with NAG (for tests and reports)
        self.embeddings = 0                         # times the negative prompt was embedded
        self._states: dict[str, _State] = {}

    def begin(self, step: int, pass_name: str) -> None:
        """The loop's call before each model pass (``pass_name`` as ``StepGuidance`` names it)."""
        if step != self.step and self.reembed_each_step:
            for state in self._states.values():
                state.negative = None
        self.step, self.pass_name = step, pass_name

    # -- attachment ------------------------------------------------------------------------------

    def attach(self, networks: Mapping[str, Any]) -> list[str]:
        for key, dit in networks.items():
            state = _State(dit.block_runner)
            self._states[key] = state
            dit.block_runner = functools.partial(self._run, state)
        at = self.scale_at(0)
        return [f"NAG on the prompt's cross-attention: scale {at:g}{' at the first step' if self._scheduled else ''}, "
                f"tau {self.tau:g}, alpha {self.alpha:g}"]

    def detach(self, networks: Mapping[str, Any]) -> None:
        for key, state in self._states.items():
            networks[key].block_runner = state.previous_runner
        self._states.clear()

    # -- the forward -----------------------------------------------------------------------------

    def _run(self, state: _State, dit, tokens: torch.Tensor, inputs) -> torch.Tensor:
        scale = float(self.scale_at(self.step))
        kind = self.pass_name.rsplit("/", 1)[-1]
        if scale > 1.0 and "+" in kind:
            raise RuntimeError(f"NAG cannot guide the batched pass {self.pass_name!r}: run the prompt and "
                               "negative-prompt passes one after the other (batched_cfg off)")
        if scale > 1.0 and kind.startswith("cond"):
            if state.negative is None:
                state.negative = dit.embed_text(self.negative_context.to(tokens.device))
                self.embeddings += 1
            neg = state.negative
            b = tokens.shape[0]
            negative = dataclasses.replace(neg, rows=neg.rows.expand(b, -1, -1)) if neg.rows.shape[0] != b else neg
            guide = _Guide(negative, scale, self.tau, self.alpha)
            inputs = dataclasses.replace(inputs, context=dataclasses.replace(inputs.context, guide=guide))
            self.guided_passes += 1
        if state.previous_runner is not None:
            return state.previous_runner(dit, tokens, inputs)
        return dit.run_blocks(tokens, inputs)
