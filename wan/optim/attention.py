"""The attention backend registry: which kernel the DiT's attention calls use.

A network calls one function, ``dit.attention(q, k, v)`` with q [B, Lq, H, D] and k, v
[B, Lk, H, D], returning [B, Lq, H, D] with the softmax scale 1/sqrt(D) and no mask. Every backend
here follows that contract, casting q and k to v's dtype as :func:`sdpa_attention` does (q and k
leave the float32 RMSNorm/RoPE while v is already in the compute dtype).

A profile names an order of preference; :func:`select_attention` takes the first backend whose
requirements hold on the device and dtype, and says why each one before it was passed over. A
fallback is logged once per process for each (requested, chosen) pair and returned in
``Selection.notices`` every time, so a UI can show it; it is never silent.

The text cross-attention with folded padding (``attention_with_key_counts``) needs an additive
bias, which these kernels do not take; it stays on SDPA whatever is selected here.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from wan.models.attention import AttentionFn, sdpa_attention

log = logging.getLogger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)
# "auto" stands for this order: the fastest kernels first, sdpa last (it always works).
AUTO_ORDER = ("sage2", "sage", "flash3", "flash2", "xformers", "sdpa")

Check = Callable[[torch.device, torch.dtype], "tuple[bool, str]"]


@dataclass(frozen=True)
class Backend:
    """One attention kernel.

    Attributes:
        name: the name profiles use.
        check: (device, dtype) -> (ok, reason); reason says what is missing when not ok. It must
            not raise, and should import nothing heavy before the cheap checks passed.
        build: returns the :data:`AttentionFn`; called only after ``check`` said ok.
    """

    name: str
    check: Check
    build: Callable[[], AttentionFn]
    description: str = ""


@dataclass
class Selection:
    """What :func:`select_attention` chose.

    Attributes:
        name: the chosen backend.
        fn: its attention function.
        notices: plain sentences for the user about backends passed over (empty when the first
            preference was used or the preference was "auto").
        reasons: backend name -> why it was passed over.
    """

    name: str
    fn: AttentionFn
    notices: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)


_REGISTRY: dict[str, Backend] = {}
# (requested, chosen) pairs already logged in this process: a fallback is announced once.
_ANNOUNCED: set[tuple[str, str]] = set()
_ANNOUNCED_LOCK = threading.Lock()


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Adds a backend (new kernels, or fakes in tests). A name is registered once unless
    ``replace`` is given."""
    if backend.name == "auto":
        raise ValueError("attention backend name 'auto' is reserved (it stands for the default order)")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"attention backend '{backend.name}' is already registered (pass replace=True)")
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    """Removes a backend registered with :func:`register_backend` (sdpa stays)."""
    if name == "sdpa":
        raise ValueError("attention backend 'sdpa' cannot be removed: it is the fallback")
    _REGISTRY.pop(name, None)


def backend_names() -> list[str]:
    return list(_REGISTRY)


def check_backend(name: str, device: str | torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Whether backend ``name`` can run on ``device`` with ``dtype``, and why not."""
    backend = _lookup(name)
    try:
        return backend.check(torch.device(device), dtype)
    except Exception as e:  # a broken install must not take the app down: report it instead
        return False, f"its requirement check failed ({type(e).__name__}: {e})"


def select_attention(preference: Sequence[str] | str, device: str | torch.device,
                     dtype: torch.dtype) -> Selection:
    """Picks the first usable backend in ``preference``; sdpa when none is.

    Args:
        preference: backend names in order ("auto" expands to :data:`AUTO_ORDER`), or one name.
        device, dtype: where and in which compute dtype the attention will run.
    Raises:
        ValueError: an unknown name (the message lists the allowed ones).
    """
    given = [preference] if isinstance(preference, str) else list(preference)
    names = _expand(given)
    requested = names[0] if names else "sdpa"
    auto = given[:1] == ["auto"]
    reasons: dict[str, str] = {}
    chosen, fn = None, None
    for name in names:
        ok, reason = check_backend(name, device, dtype)
        if ok:
            try:
                chosen, fn = name, _REGISTRY[name].build()
                break
            except Exception as e:  # importable but broken (missing triton, ABI mismatch...)
                reason = f"it failed to load ({type(e).__name__}: {e})"
        reasons[name] = reason
    if fn is None:
        chosen, fn = "sdpa", sdpa_attention
    notices = [] if auto or chosen == requested else [_fallback_notice(requested, chosen, reasons, names)]
    _announce(requested, chosen, notices, reasons, auto)
    return Selection(chosen, fn, notices, reasons)


def apply_attention(dit: nn.Module, preference: Sequence[str] | str,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Selection:
    """Selects a backend and installs it as ``dit.attention`` (the VACE blocks share it).

    ``device`` and ``dtype`` default to those of the DiT's block weights (its compute dtype).
    """
    if not hasattr(dit, "attention"):
        raise TypeError(f"{type(dit).__name__} has no 'attention' attribute to set; expected a WanDiT")
    if dtype is None:  # a streamed block's meta placeholder still has the right dtype; a quantised
        from wan.models.dit import compute_dtype  # layer states its compute dtype
        dtype = compute_dtype(dit.blocks[0].ffn[0])
    if device is None:  # the resident weights tell, when the blocks are streamed
        device = next((p.device for p in dit.parameters() if not p.is_meta), torch.device("cpu"))
    selection = select_attention(preference, device, dtype)
    dit.attention = selection.fn
    return selection


def reset_announcements() -> None:
    """Forgets which fallbacks were logged (tests; a long-lived app never needs it)."""
    with _ANNOUNCED_LOCK:
        _ANNOUNCED.clear()


# ---------------------------------------------------------------------------------------------
# Selection helpers


def _lookup(name: str) -> Backend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend '{name}'; allowed: auto, {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _expand(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        for n in (AUTO_ORDER if name == "auto" else (name,)):
            _lookup(n)
            if n not in out:
                out.append(n)
    return out


def _fallback_notice(requested: str, chosen: str, reasons: dict[str, str], names: list[str]) -> str:
    skipped = "; ".join(f"{n}: {reasons[n]}" for n in names if n in reasons)
    tail = "" if chosen in names else " (none of the preferred backends can run; sdpa always can)"
    return f"attention: '{requested}' is not usable here, using '{chosen}'{tail} ({skipped})"


def _announce(requested: str, chosen: str, notices: list[str], reasons: dict[str, str], auto: bool) -> None:
    key = ("auto" if auto else requested, chosen)
    with _ANNOUNCED_LOCK:
        if key in _ANNOUNCED:
            return
        _ANNOUNCED.add(key)
    for notice in notices:
        log.warning(notice)
    if auto:
        log.info("attention: auto chose '%s' (%s)", chosen,
                 "; ".join(f"{n}: {r}" for n, r in reasons.items()) or "first choice")


# ---------------------------------------------------------------------------------------------
# Requirement checks


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _version_major(dist: str, module) -> int | None:
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version(dist)
        except Exception:
            return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def cuda_requirements(min_capability: tuple[int, int] = (0, 0), max_capability: tuple[int, int] | None = None,
                      dtypes: tuple[torch.dtype, ...] = HALF_DTYPES) -> Check:
    """A check for a CUDA kernel: a CUDA device, its compute capability in range, a dtype it takes."""
    def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if device.type != "cuda":
            return False, f"needs a CUDA device, the model runs on {device.type}"
        if not torch.cuda.is_available():
            return False, "CUDA is not available in this PyTorch build or machine"
        cap = torch.cuda.get_device_capability(device)
        if cap < min_capability or (max_capability is not None and cap > max_capability):
            want = f"sm{min_capability[0]}{min_capability[1]}" + (
                f" to sm{max_capability[0]}{max_capability[1]}" if max_capability else " or newer")
            return False, f"needs a GPU of compute capability {want}, this one is sm{cap[0]}{cap[1]}"
        if dtype not in dtypes:
            return False, f"runs in {', '.join(str(d).replace('torch.', '') for d in dtypes)}, not {str(dtype).replace('torch.', '')}"
        return True, "ok"
    return check


def _requires(module: str, pip_name: str, device_check: Check) -> Check:
    def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        if not _installed(module):
            return False, f"not installed (no module '{module}'; pip package {pip_name})"
        return device_check(device, dtype)
    return check


def _sage_check(major_ok: Callable[[int | None], bool], want: str) -> Check:
    base = _requires("sageattention", "sageattention", cuda_requirements((8, 0)))

    def check(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
        ok, reason = base(device, dtype)
        if not ok:
            return ok, reason
        major = _version_major("sageattention", importlib.import_module("sageattention"))
        if not major_ok(major):
            return False, f"needs sageattention {want}, version {major}.x is installed"
        return True, "ok"
    return check


# ---------------------------------------------------------------------------------------------
# Backend functions: each takes and returns [B, L, H, D] tensors


def _sage_fn() -> AttentionFn:
    from sageattention import sageattn

    def sage_attention(q, k, v):
        dt = v.dtype
        return sageattn(q.to(dt), k.to(dt), v, tensor_layout="NHD", is_causal=False)
    return sage_attention


def _flash2_fn() -> AttentionFn:
    from flash_attn import flash_attn_func

    def flash2_attention(q, k, v):
        dt = v.dtype
        return flash_attn_func(q.to(dt), k.to(dt), v, dropout_p=0.0, causal=False)
    return flash2_attention


def _flash3_fn() -> AttentionFn:
    from flash_attn_interface import flash_attn_func

    def flash3_attention(q, k, v):
        dt = v.dtype
        out = flash_attn_func(q.to(dt), k.to(dt), v, causal=False)
        return out[0] if isinstance(out, tuple) else out  # some releases also return the LSE
    return flash3_attention


def _xformers_fn() -> AttentionFn:
    from xformers.ops import memory_efficient_attention

    def xformers_attention(q, k, v):
        dt = v.dtype
        return memory_efficient_attention(q.to(dt), k.to(dt), v)
    return xformers_attention


def _register_builtins() -> None:
    register_backend(Backend("sdpa", lambda device, dtype: (True, "ok"), lambda: sdpa_attention,
                             "torch scaled_dot_product_attention; every device and dtype"))
    register_backend(Backend("sage", _sage_check(lambda m: m == 1, "1.x"), _sage_fn,
                             "SageAttention 1 (int8 QK, Triton); CUDA sm80+"))
    register_backend(Backend("sage2", _sage_check(lambda m: m is not None and m >= 2, "2.x or newer"), _sage_fn,
                             "SageAttention 2 (int8 QK, fp8 PV); CUDA sm80+"))
    register_backend(Backend("flash2", _requires("flash_attn", "flash-attn", cuda_requirements((8, 0))),
                             _flash2_fn, "FlashAttention 2; CUDA sm80+"))
    register_backend(Backend("flash3", _requires("flash_attn_interface", "flash-attn 3 (hopper build)",
                                                 cuda_requirements((9, 0), (9, 0))),
                             _flash3_fn, "FlashAttention 3; Hopper (sm90) only"))
    register_backend(Backend("xformers", _requires("xformers", "xformers", cuda_requirements(
        (5, 0), dtypes=HALF_DTYPES + (torch.float32,))), _xformers_fn, "xformers memory-efficient attention; CUDA"))


_register_builtins()
