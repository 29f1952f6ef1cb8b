"""The trainable LoRA network for Wan DiTs, built and attached from outside the network.

It follows musubi-tuner's ``networks/lora.py`` with ``networks/lora_wan.py``:

* Targets: every linear layer inside the repeated transformer blocks (musubi: class
  ``WanAttentionBlock``, here :class:`wan.models.dit.Block`), that is ``self_attn.{q,k,v,o}``,
  ``cross_attn.{q,k,v,o}`` (plus ``k_img``/``v_img`` on Wan 2.1 i2v/flf2v) and ``ffn.0``/``ffn.2``:
  400 modules on a 14B t2v model. The VACE branch (``VaceBlock``) is not a target, as musubi's class
  match leaves it out (musubi has no VACE).
* Filter: names full-matching :data:`DEFAULT_EXCLUDE` or a user ``exclude_patterns`` regex are
  dropped unless they full-match an ``include_patterns`` regex (include overrides exclude; it does
  not restrict the targets by itself).
* One adapter per target: ``lora_down`` [r, in] (Kaiming-uniform, a=sqrt(5)) and ``lora_up``
  [out, r] (zeros), ``scale = alpha / r`` with ``network_alpha`` 1 by default (0 means alpha = r).
  ``out = base(x) + up(dropout(down(x))) * multiplier * scale``; in training mode the optional
  ``network_dropout`` (on the down output), ``rank_dropout`` (whole ranks per sample, rescaled) and
  ``module_dropout`` (the adapter skipped for a step) apply, as musubi's ``LoRAModule.forward``.
* Child modules are named ``lora_unet_<module path with _>``, so ``state_dict()`` has musubi's keys.

Attaching (an engine part, see :mod:`wan.engine.attach`): each target gets a forward hook that
adds the adapter's output, and every parameter of the DiT is frozen; detaching removes the hooks
and restores each ``requires_grad`` flag. The DiT's weights are never written, so its outputs come
back bit for bit. A hook (rather than musubi's replaced ``forward``) also reaches layers the DiT
calls through fused kernels (``linear_gelu_tanh`` takes the plain path when a layer has hooks) and
quantised :class:`~wan.layers.quant.QuantLinear` bases (``--fp8_base``): only the adapters train.
The same network may be attached to several DiTs at once (the two Wan 2.2 experts): they then
share one LoRA, as musubi trains one LoRA for both experts.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from wan.layers.quant import QuantLinear

# lora_wan.py appends this to the user's exclude patterns; it is matched against whole names.
DEFAULT_EXCLUDE = r".*(patch_embedding|text_embedding|time_embedding|time_projection|norm|head).*"
# Class names of the blocks whose linear layers are targets (musubi: WAN_TARGET_REPLACE_MODULES).
TARGET_BLOCKS = ("Block",)
PREFIX = "lora_unet"
NETWORK_MODULE = "networks.lora_wan"  # what musubi's --network_module names; written to ss_network_module
DEFAULT_DIM = 4  # musubi's create_network uses rank 4 when --network_dim is not given
# network_args keys this network understands (musubi: --network_args key=value).
NETWORK_ARG_KEYS = ("exclude_patterns", "include_patterns", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
                    "verbose")


def lora_name(module_name: str) -> str:
    """``blocks.0.self_attn.q`` -> ``lora_unet_blocks_0_self_attn_q`` (musubi's module key)."""
    return f"{PREFIX}.{module_name}".replace(".", "_")


def _is_linear(module: nn.Module) -> bool:
    """A plain or quantised linear layer (musubi matches the class name ``Linear``; its fp8 base
    keeps that class, ours swaps in QuantLinear)."""
    return type(module) is nn.Linear or isinstance(module, QuantLinear)


def _compile(patterns: Sequence[str] | str | None, what: str) -> list[re.Pattern]:
    """Regexes from a list of strings, or from musubi's network_args form (a Python list literal)."""
    if patterns is None:
        return []
    if isinstance(patterns, str):
        try:
            patterns = ast.literal_eval(patterns)
        except (ValueError, SyntaxError):
            raise ValueError(f"{what} {patterns!r} is not allowed; a list of regular expressions, "
                             "e.g. [\"blocks\\.0\\..*\"]") from None
        if isinstance(patterns, str):
            patterns = [patterns]
    compiled = []
    for p in patterns:
        try:
            compiled.append(re.compile(p))
        except (re.error, TypeError) as e:
            raise ValueError(f"{what} {p!r} is not allowed; a valid regular expression ({e})") from None
    return compiled


def target_modules(dit: nn.Module, include_patterns: Sequence[str] | str | None = None,
                   exclude_patterns: Sequence[str] | str | None = None) -> list[tuple[str, nn.Module]]:
    """(module name, linear layer) of every LoRA target of ``dit``, in module order.

    Exclusion: :data:`DEFAULT_EXCLUDE` plus ``exclude_patterns``; a name full-matching any
    ``include_patterns`` regex is kept even when excluded. Patterns are regexes (or musubi's string
    form of a list) matched against the whole dotted name, e.g. ``blocks.3.cross_attn.k``.
    """
    exclude = _compile(exclude_patterns, "exclude_patterns") + [re.compile(DEFAULT_EXCLUDE)]
    include = _compile(include_patterns, "include_patterns")
    found = []
    for block_name, block in dit.named_modules():
        if type(block).__name__ not in TARGET_BLOCKS:
            continue
        for child_name, child in block.named_modules():
            if not _is_linear(child):
                continue
            name = f"{block_name}.{child_name}" if block_name else child_name
            excluded = any(p.fullmatch(name) for p in exclude)
            if excluded and not any(p.fullmatch(name) for p in include):
                continue
            found.append((name, child))
    return found


def parse_network_args(args: Sequence[str] | None) -> dict[str, Any]:
    """musubi's ``--network_args key=value ...`` -> keyword arguments of :class:`LoraNetwork`.

    Raises ValueError for a malformed item or an unknown key (naming the allowed ones).
    """
    out: dict[str, Any] = {}
    for item in args or ():
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"network_args item {item!r} is not allowed; key=value")
        if key not in NETWORK_ARG_KEYS:
            raise ValueError(f"network_args key {key!r} is not allowed; one of {', '.join(NETWORK_ARG_KEYS)}")
        if key in ("exclude_patterns", "include_patterns"):
            _compile(value, key)  # fail here, naming the key, rather than when the network is built
            out[key] = value
        elif key == "verbose":
            continue  # musubi only logs with it
        else:
            try:
                out[key] = float(value)
            except ValueError:
                raise ValueError(f"network_args {key}={value!r} is not allowed; a number") from None
    return out


# ---------------------------------------------------------------------------------------------
# One adapter


class LoraModule(nn.Module):
    """The low-rank adapter of one linear layer [out, in]: ``lora_down`` [r, in], ``lora_up`` [out, r],
    and the ``alpha`` buffer (a float32 scalar, saved with the weights)."""

    def __init__(self, name: str, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float | None = None, rank_dropout: float | None = None,
                 module_dropout: float | None = None):
        super().__init__()
        self.lora_name, self.lora_dim = name, rank
        # Built and initialised in musubi's order (both Linear constructors draw their own init,
        # then down is drawn again), so one seed gives musubi's initial weights.
        self.lora_down = nn.Linear(in_features, rank, bias=False)
        self.lora_up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        alpha = rank if not alpha else float(alpha)
        self.scale = alpha / rank
        self.register_buffer("alpha", torch.tensor(alpha, dtype=torch.float32))
        self.multiplier = 1.0
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout

    def set_alpha(self, alpha: float | None) -> None:
        """Sets alpha (None or 0: alpha = rank, i.e. scale 1) and the scale it implies."""
        alpha = self.lora_dim if not alpha else float(alpha)
        self.alpha.fill_(alpha)
        self.scale = alpha / self.lora_dim

    def _lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapter's dtype, except under autocast (which picks the matmul dtype itself)."""
        dtype = self.lora_down.weight.dtype
        if x.is_floating_point() and x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
            return x.to(dtype)
        return x

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """``lora_down(x)``. Under autocast the weight is cast here rather than by autocast, whose cache would
        keep every adapter's cast weight until the whole forward ends."""
        if x.is_floating_point() and torch.is_autocast_enabled(x.device.type):
            dtype = torch.get_autocast_dtype(x.device.type)
            return F.linear(x.to(dtype), self.lora_down.weight.to(dtype))
        return self.lora_down(self._lora_input(x))

    def add_to(self, x: torch.Tensor, base_out: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``base_out`` [..., out] plus the adapter's output on x [..., in], in base_out's dtype.

        With one dtype (or under autocast) the adapter's product, scale and sum are one ``addmm``, done in
        ``base_out`` itself with ``inplace`` (the hook's case: the layer's fresh output, which the layer's
        backward does not need; autograd's version check would refuse otherwise);
        otherwise the sum is taken in the wider dtype and rounded once (an fp32 adapter on a bf16 base).
        """
        if self.module_dropout is not None and self.training and torch.rand(1) < self.module_dropout:
            return base_out
        lx = self._down(x)  # [..., r]
        if self.dropout is not None and self.training:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.rank_dropout is not None and self.training:
            # one keep/drop draw per (sample, rank), shared by the sample's tokens
            mask = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            lx = lx * mask.view(lx.size(0), *([1] * (lx.dim() - 2)), self.lora_dim)
            scale = self.scale * (1.0 / (1.0 - self.rank_dropout))  # as if the rank were smaller
        scale = self.multiplier * scale
        if lx.dtype == base_out.dtype or torch.is_autocast_enabled(lx.device.type):
            # base_out + scale * lx @ up^T as one GEMM (alpha, beta=1): no [..., out] temporaries for the
            # product and the scaling, one rounding instead of three; in place, not even one for the sum
            up = self.lora_up.weight.to(base_out.dtype)  # (in-place ops are not autocast)
            lx = lx.reshape(-1, self.lora_dim).to(base_out.dtype)
            if inplace and base_out.is_contiguous():
                base_out.view(-1, base_out.shape[-1]).addmm_(lx, up.t(), alpha=scale)
                return base_out
            return torch.addmm(base_out.reshape(-1, base_out.shape[-1]), lx, up.t(), alpha=scale).view(base_out.shape)
        out = base_out + self.lora_up(lx) * scale
        return out.to(base_out.dtype) if out.dtype != base_out.dtype else out

    def extra_repr(self) -> str:
        return f"{self.lora_name}, rank={self.lora_dim}, alpha={float(self.alpha):g}"


# ---------------------------------------------------------------------------------------------
# The network


@dataclass
class LoadReport:
    """What :meth:`LoraNetwork.load_weights` did.

    loaded: modules whose weights came from the file. missing: network modules the file has no
    adapter for (they keep their initial weights, up = 0: no effect until trained). alpha_changed:
    (module, file alpha, previous alpha) where the file's alpha was adopted.
    """

    path: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    alpha_changed: list[tuple[str, float, float]] = field(default_factory=list)

    def notices(self) -> list[str]:
        lines = [f"network weights {self.path} ({self.format}): {len(self.loaded)} modules loaded"]
        if self.missing:
            lines.append(f"network weights {self.path}: {len(self.missing)} modules not in the file keep their "
                         f"initial weights (e.g. {self.missing[0]})")
        if self.alpha_changed:
            name, new, old = self.alpha_changed[0]
            lines.append(f"network weights {self.path}: alpha taken from the file for {len(self.alpha_changed)} "
                         f"modules (e.g. {name}: {new:g} instead of {old:g})")
        return lines


class LoraNetwork(nn.Module):
    """Trainable LoRA adapters for the target linear layers of a Wan DiT (see the module docstring).

    Args:
        dit: the DiT whose module names and shapes the adapters are built for (not modified).
        network_dim: rank r of every adapter (musubi's default 4).
        network_alpha: scale = alpha / r; musubi's default 1; None means 1, 0 means alpha = r.
        network_dropout: dropout probability on the down projection's output (training only).
        rank_dropout, module_dropout: musubi's network_args of the same names (training only).
        include_patterns, exclude_patterns: regexes matched against whole module names.
        loraplus_lr_ratio: LoRA+: the up weights get ``lr * ratio`` in :meth:`prepare_optimizer_params`.
        multiplier: strength of the adapters in the forward.
    """

    def __init__(self, dit: nn.Module, network_dim: int | None = DEFAULT_DIM, network_alpha: float | None = 1.0,
                 network_dropout: float | None = None, *, rank_dropout: float | None = None,
                 module_dropout: float | None = None, include_patterns: Sequence[str] | str | None = None,
                 exclude_patterns: Sequence[str] | str | None = None, loraplus_lr_ratio: float | None = None,
                 multiplier: float = 1.0):
        super().__init__()
        network_dim = DEFAULT_DIM if network_dim is None else network_dim
        if not isinstance(network_dim, int) or isinstance(network_dim, bool) or network_dim < 1:
            raise ValueError(f"network_dim {network_dim!r} is not allowed; a positive integer (the LoRA rank)")
        for what, p in (("network_dropout", network_dropout), ("rank_dropout", rank_dropout),
                        ("module_dropout", module_dropout)):
            if p is not None and not 0 <= p < 1:
                raise ValueError(f"{what} {p!r} is not allowed; a probability in [0, 1)")
        if loraplus_lr_ratio is not None and loraplus_lr_ratio <= 0:
            raise ValueError(f"loraplus_lr_ratio {loraplus_lr_ratio!r} is not allowed; a positive number")
        self.lora_dim = network_dim
        self.alpha = 1.0 if network_alpha is None else network_alpha
        self.dropout, self.rank_dropout, self.module_dropout = network_dropout, rank_dropout, module_dropout
        self.include_patterns, self.exclude_patterns = include_patterns, exclude_patterns
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.multiplier = multiplier
        self.names: list[str] = []  # official module names, in module order
        for name, layer in target_modules(dit, include_patterns, exclude_patterns):
            module = LoraModule(lora_name(name), layer.in_features, layer.out_features, network_dim, self.alpha,
                                network_dropout, rank_dropout, module_dropout)
            module.multiplier = multiplier
            self.add_module(module.lora_name, module)  # child name = musubi key: state_dict() is musubi's layout
            self.names.append(name)
        if not self.names:
            raise ValueError("LoRA network: no target module; the include/exclude patterns left nothing "
                             f"(include {include_patterns!r}, exclude {exclude_patterns!r})")
        self._attached: dict[str, tuple[list, list]] = {}  # network key -> (hook handles, (param, requires_grad))

    # -- the adapters ----------------------------------------------------------------------------

    def lora_module(self, name: str) -> LoraModule:
        """The adapter of official module ``name`` (``blocks.0.self_attn.q``)."""
        return getattr(self, lora_name(name))

    def lora_modules(self) -> list[tuple[str, LoraModule]]:
        """(official module name, adapter) in module order."""
        return [(n, self.lora_module(n)) for n in self.names]

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = multiplier
        for _, m in self.lora_modules():
            m.multiplier = multiplier

    def network_args(self) -> dict[str, str]:
        """The non-default settings in musubi's ``--network_args`` form (values as strings), for the
        ``ss_network_args`` metadata."""
        args: dict[str, str] = {}
        for key in ("exclude_patterns", "include_patterns"):
            value = getattr(self, key)
            if value is not None:
                args[key] = value if isinstance(value, str) else repr(list(value))
        for key in ("rank_dropout", "module_dropout", "loraplus_lr_ratio"):
            if getattr(self, key) is not None:
                args[key] = str(getattr(self, key))
        return args

    # -- attaching (wan.engine.attach part) ------------------------------------------------------

    def attach(self, networks: Mapping[str, nn.Module] | nn.Module) -> list[str]:
        """Hooks the adapters into every DiT of ``networks`` (expert name -> DiT, or one DiT) and
        freezes the DiTs' parameters. Fails, leaving nothing behind, when a DiT lacks a target or has
        it with another shape."""
        networks = _as_mapping(networks)
        if self._attached:
            raise RuntimeError("LoraNetwork.attach: already attached; detach first")
        layers = {key: self._layers_of(key, dit) for key, dit in networks.items()}  # checks before any change
        try:
            for key, dit in networks.items():
                frozen = [(p, p.requires_grad) for p in dit.parameters()]
                self._attached[key] = ([], frozen)
                for p, _ in frozen:
                    p.requires_grad_(False)
                for name, layer in layers[key]:
                    self._attached[key][0].append(layer.register_forward_hook(_hook(self.lora_module(name))))
        except Exception:
            self.detach(networks)
            raise
        return [f"LoRA training: {len(self.names)} modules, rank {self.lora_dim}, alpha {self.alpha:g} "
                f"(scale {self.lora_module(self.names[0]).scale:g})"]

    def detach(self, networks: Mapping[str, nn.Module] | nn.Module | None = None) -> None:
        """Removes the hooks and restores each DiT parameter's ``requires_grad``."""
        for handles, frozen in self._attached.values():
            for h in handles:
                h.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
        self._attached.clear()

    @property
    def attached(self) -> bool:
        return bool(self._attached)

    def _layers_of(self, key: str, dit: nn.Module) -> list[tuple[str, nn.Module]]:
        """(name, layer) of each target in ``dit``; ValueError naming the first that is absent or misfits."""
        mods = dict(dit.named_modules())
        out = []
        for name, lora in self.lora_modules():
            layer = mods.get(name)
            want = (lora.lora_up.out_features, lora.lora_down.in_features)
            if layer is None or not _is_linear(layer):
                raise ValueError(f"LoRA network: network {key!r} has no linear layer {name}; "
                                 "the network was built for another model")
            if (layer.out_features, layer.in_features) != want:
                raise ValueError(f"LoRA network: {key!r} {name} is [{layer.out_features}, {layer.in_features}], "
                                 f"the adapter was built for {list(want)}")
            out.append((name, layer))
        return out

    # -- optimiser -------------------------------------------------------------------------------

    def prepare_optimizer_params(self, unet_lr: float = 1e-4, **kwargs) -> tuple[list[dict], list[str]]:
        """Optimizer parameter groups and their descriptions, as musubi's.

        One group ``{"params": [...], "lr": unet_lr}`` with every adapter weight (description
        ``"unet"``); with ``loraplus_lr_ratio`` the up weights form a second group at
        ``unet_lr * ratio`` (``"unet plus"``). Groups whose lr is 0 are left out (nothing to train).
        Sets ``requires_grad`` on every adapter weight.
        """
        self.requires_grad_(True)
        groups: dict[str, list[nn.Parameter]] = {"lora": [], "plus": []}
        for _, lora in self.lora_modules():
            for pname, p in lora.named_parameters():
                plus = self.loraplus_lr_ratio is not None and "lora_up" in pname
                groups["plus" if plus else "lora"].append(p)
        params, descriptions = [], []
        for key, ps in groups.items():
            if not ps:
                continue
            lr = unet_lr * self.loraplus_lr_ratio if key == "plus" else unet_lr
            if not lr:
                continue
            params.append({"params": ps, "lr": lr})
            descriptions.append("unet plus" if key == "plus" else "unet")
        return params, descriptions

    def get_trainable_params(self) -> list[nn.Parameter]:
        return list(self.parameters())

    # -- weights in and out ----------------------------------------------------------------------

    def load_weights(self, path) -> LoadReport:
        """Loads ``--network_weights``: a LoRA file in any layout :func:`wan.lora.formats.load_lora`
        reads (musubi, ComfyUI, diffusers/PEFT). Each file adapter must be a plain LoRA for one of
        this network's modules with this network's rank and shapes; the file's alpha is adopted
        (musubi keeps its network_alpha scale but saves the file's alpha, which would change the
        LoRA's strength between training and use).

        Raises:
            ValueError: keys the network cannot take (named), rank or shape mismatches.
            wan.loading.files.CheckpointError: unreadable file.
        """
        from wan.lora.formats import load_lora
        lora = load_lora(path)
        mine = set(self.names)
        unmatched = [k for k in lora.dropped]
        unmatched += [f"{name}: no such target in this network" for name in lora.targets if name not in mine]
        unmatched += [f"{name}: a {w.kind} adapter{' with diff/DoRA tensors' if w.kind == 'lora' else ''}, "
                      "not a plain LoRA" for name, w in lora.targets.items()
                      if name in mine and (w.kind != "lora" or w.diff is not None or w.diff_b is not None
                                           or w.dora_scale is not None)]
        if unmatched:
            shown = "; ".join(unmatched[:5]) + (f"; and {len(unmatched) - 5} more" if len(unmatched) > 5 else "")
            raise ValueError(f"network weights {path}: {len(unmatched)} keys do not fit this network: {shown}")
        report = LoadReport(path=str(path), format=lora.format)
        updates = []
        for name in (n for n in self.names if n in lora.targets):  # in module order
            m, w = self.lora_module(name), lora.targets[name]
            need_down, need_up = list(m.lora_down.weight.shape), list(m.lora_up.weight.shape)
            if list(w.down.shape) != need_down or list(w.up.shape) != need_up:
                raise ValueError(f"network weights {path}: {name} has down {list(w.down.shape)} / up "
                                 f"{list(w.up.shape)}, the network needs {need_down} / {need_up} "
                                 f"(rank {self.lora_dim})")
            updates.append((name, m, w))
        with torch.no_grad():  # every check passed: now write
            for name, m, w in updates:
                m.lora_down.weight.copy_(w.down)
                m.lora_up.weight.copy_(w.up)
                old = float(m.alpha)
                m.set_alpha(w.alpha)
                if float(m.alpha) != old:
                    report.alpha_changed.append((name, float(m.alpha), old))
                report.loaded.append(name)
        report.missing = [n for n in self.names if n not in lora.targets]
        alphas = {float(m.alpha) for _, m in self.lora_modules()}
        if len(alphas) == 1:  # the file's alpha is now the network's (ss_network_alpha says so)
            self.alpha = alphas.pop()
        return report

    def to_lora_file(self, dtype: torch.dtype | None = torch.float32):
        """The adapters as a :class:`wan.lora.formats.LoraFile` (CPU copies in ``dtype``; None keeps
        each tensor's dtype), for the converters of :mod:`wan.lora.convert`."""
        from wan.lora.formats import LoraFile, LoraWeights
        targets = {}
        for name, m in self.lora_modules():
            d = dtype or m.lora_down.weight.dtype
            targets[name] = LoraWeights(kind="lora", down=m.lora_down.weight.detach().to("cpu", d).clone(),
                                        up=m.lora_up.weight.detach().to("cpu", d).clone(),
                                        alpha=float(m.alpha), alpha_dtype=d)
        return LoraFile(path="<training>", format="musubi", targets=targets, naming="musubi")


def _as_mapping(networks) -> Mapping[str, nn.Module]:
    return {"transformer": networks} if isinstance(networks, nn.Module) else networks


def _hook(lora: LoraModule):
    """A forward hook adding ``lora``'s output to its layer's output."""
    def hook(module, args, out):
        return lora.add_to(args[0], out, inplace=True)
    return hook
