"""Does a LoRA fit a model? Matching by official module name and weight shape, and a guess of
the model family the LoRA was trained for when it does not."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from wan.lora.formats import LoraFile

# Modules that exist only in image-conditioned models (Wan 2.1 i2v / flf2v): a LoRA trained on
# such a model carries them, and they are simply not applicable to a t2v model.
_IMAGE_ONLY = re.compile(r"(^|\.)(k_img|v_img|norm_k_img)$|^img_emb\.")

# Width of the DiT -> family (public checkpoints).
FAMILY_BY_DIM = {
    1536: "Wan 2.1 1.3B (t2v / VACE / Fun)",
    5120: "Wan 14B (Wan 2.1 t2v / i2v / flf2v / VACE, Wan 2.2 A14B)",
    3072: "Wan 2.2 TI2V-5B",
}
# patch_embedding input channels -> conditioning type
_IN_DIM_KIND = {16: "t2v", 36: "i2v", 48: "ti2v / Fun", 32: "ti2v"}


@dataclass
class Compatibility:
    """How a LoRA fits a model.

    status: ``full`` (every applicable target matches), ``partial`` or ``none``.
    matched / total: adapters whose module exists with the right shape / applicable adapters
        (image-only adapters dropped on a model without image input are not counted).
    mismatched: (name, shape the LoRA implies, model weight shape).
    missing: targets with no such module in the model.
    dropped_i2v: image cross-attention targets dropped because the model has no image input.
    guess: which model family the LoRA seems to be for, from its shapes.
    """

    status: str
    matched: int
    total: int
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    dropped_i2v: list[str] = field(default_factory=list)
    guess: str = ""
    path: str = ""

    def summary(self) -> str:
        """One human line: what fits, what was dropped, and the family guess."""
        text = f"LoRA {self.path}: {self.status} ({self.matched}/{self.total} adapters match)"
        if self.mismatched:
            name, ls, ms = self.mismatched[0]
            text += f"; {len(self.mismatched)} with other shapes (e.g. {name}: LoRA {ls}, model {ms})"
        if self.missing:
            text += f"; {len(self.missing)} for modules this model lacks (e.g. {self.missing[0]})"
        if self.dropped_i2v:
            text += f"; {len(self.dropped_i2v)} image cross-attention adapters dropped (model has no image input)"
        return text + f"; it seems made for {self.guess}"

    def require(self) -> Compatibility:
        """Raises ValueError when nothing matches: a LoRA that does nothing is never ignored silently."""
        if self.status == "none":
            raise ValueError(f"{self.summary()}: not compatible with this model")
        return self


def linear_shapes(dit: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Official module name -> weight shape, for every module of ``dit`` that owns a ``weight``
    (Linear layers, and also norms and convs, which ``.diff`` LoRAs may target), plus bare
    parameters such as ``blocks.0.modulation`` under their own name. Quantised linear layers
    (``QuantLinear``, whose weight is the ``qweight`` buffer) count with their [out, in] shape, so a
    LoRA on an int8/fp8 model matches as on the plain one. Works on meta tensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in dit.named_parameters():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight":
            shapes[module] = tuple(p.shape)
        elif leaf != "bias":
            shapes[name] = tuple(p.shape)
    for name, module in dit.named_modules():
        if getattr(module, "qweight", None) is not None and hasattr(module, "out_features"):
            shapes[name] = (module.out_features, module.in_features)
    return shapes


def model_linear_shapes(spec) -> dict[str, tuple[int, ...]]:
    """:func:`linear_shapes` of a registry model (``ModelSpec``), from its architecture alone: the
    network is built on the meta device, so no weights are read or needed. The UI's and
    ``wgp.py lora check``'s check of a LoRA against a model that is not loaded."""
    from wan.models.dit import DiTConfig, WanDiT
    with torch.device("meta"):
        return linear_shapes(WanDiT(DiTConfig(**spec.dit_config())))


def check_lora(lora: LoraFile, model_shapes: dict[str, tuple]) -> Compatibility:
    """Matches every adapter of ``lora`` against the model's modules and weight shapes."""
    has_image = any(_IMAGE_ONLY.search(n) for n in model_shapes)
    matched, mismatched, missing, dropped = 0, [], [], []
    for name, w in lora.targets.items():
        if name not in model_shapes:
            (dropped if (_IMAGE_ONLY.search(name) and not has_image) else missing).append(name)
            continue
        model_shape = tuple(model_shapes[name])
        if fits(w, model_shape):
            matched += 1
        else:
            mismatched.append((name, w.weight_shape() or tuple(w.diff_b.shape), model_shape))
    total = len(lora.targets) - len(dropped)
    status = "none" if matched == 0 else ("full" if matched == total else "partial")
    return Compatibility(status=status, matched=matched, total=total, mismatched=mismatched,
                         missing=missing, dropped_i2v=dropped, guess=guess_family(lora), path=lora.path)


def fits(w, model_shape: tuple) -> bool:
    """Whether one adapter (``LoraWeights``) can apply to a weight of ``model_shape``."""
    shape = w.weight_shape()
    if shape is not None:
        if _prod(shape) != _prod(model_shape):
            return False
        # [out, in] must agree for 2-D factors; convs/norms only need the same number of values
        if len(shape) == 2 and len(model_shape) >= 2 and shape[0] != model_shape[0]:
            return False
    if w.diff_b is not None and w.diff_b.numel() != model_shape[0]:
        return False
    return w.dora_scale is None or w.dora_scale.shape[0] == model_shape[0]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def guess_family(lora: LoraFile) -> str:
    """Names the model family the LoRA's shapes point to (width, layers, FFN, input channels)."""
    dim = ffn = in_dim = None
    layers = -1
    for name, w in lora.targets.items():
        shape = w.weight_shape()
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            layers = max(layers, int(m.group(1)))
        if shape is None:
            continue
        if re.search(r"_attn\.[qkvo]$", name):
            dim = dim or shape[0]
        elif name.endswith("ffn.0"):
            ffn, dim = shape[0], dim or shape[1]
        elif name == "patch_embedding" and len(shape) >= 2:
            in_dim = shape[1] if len(shape) > 2 else None
    if dim is None:
        return "an unknown model (no attention or FFN adapter to read the width from)"
    family = FAMILY_BY_DIM.get(dim, f"an unknown Wan-like model of width {dim}")
    details = []
    if layers >= 0:
        details.append(f"{layers + 1}+ blocks")
    if ffn:
        details.append(f"ffn {ffn}")
    if in_dim:
        details.append(f"in_dim {in_dim} ({_IN_DIM_KIND.get(in_dim, '?')})")
    if any(_IMAGE_ONLY.search(n) for n in lora.targets):
        details.append("image cross-attention: i2v")
    return family + (f" [dim {dim}, {', '.join(details)}]" if details else f" [dim {dim}]")
