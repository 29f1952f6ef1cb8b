"""The attention backend registry: selection, fallback notices, and the backend contract.

No accelerated kernel runs on this CPU machine, so the wrappers of flash/sage/xformers are checked
against stand-in modules (put in sys.modules) that compute with SDPA and assert the layout and
dtypes the real kernels require, with CUDA reported present by monkeypatching.
"""

import importlib.machinery
import logging
import math
import sys
import types

import pytest
import torch

from helpers import randomize_, rel_err
from wan.models.attention import sdpa_attention
from wan.models.dit import DiTConfig, WanDiT
from wan.optim import attention as attn
from wan.optim.attention import Backend, apply_attention, check_backend, register_backend, select_attention

CFG = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=16)


@pytest.fixture(autouse=True)
def _fresh_announcements():
    attn.reset_announcements()
    yield
    attn.reset_announcements()


def qkv(dtype=torch.float32, lq=7, lk=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, lq, 3, 16, generator=g)  # [B, L, H, D]
    k = torch.randn(2, lk, 3, 16, generator=g)
    v = torch.randn(2, lk, 3, 16, generator=g).to(dtype)
    return q, k, v


def explicit_attention(q, k, v):
    """softmax(q k^T / sqrt(D)) v written out, in float64: the contract every backend meets."""
    qd, kd, vd = (t.double().transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return (w @ vd).transpose(1, 2)


def test_sdpa_is_selected_on_cpu():
    sel = select_attention(["sdpa"], "cpu", torch.float32)
    assert sel.name == "sdpa" and sel.fn is sdpa_attention and sel.notices == []
    q, k, v = qkv()
    assert rel_err(sel.fn(q, k, v), explicit_attention(q, k, v)) <= 1e-6


def test_fallback_to_sdpa_on_cpu_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger="wan.optim.attention"):
        sel = select_attention(["sage2", "flash2", "sdpa"], "cpu", torch.bfloat16)
    assert sel.name == "sdpa" and sel.fn is sdpa_attention
    for name in ("sage2", "flash2"):
        assert "not installed" in sel.reasons[name] or "CUDA" in sel.reasons[name], sel.reasons
    assert len(sel.notices) == 1
    assert "'sage2'" in sel.notices[0] and "'sdpa'" in sel.notices[0] and "flash2" in sel.notices[0]


def test_fallback_is_logged_once_but_returned_each_time(caplog):
    with caplog.at_level(logging.WARNING, logger="wan.optim.attention"):
        first = select_attention(["flash2", "sdpa"], "cpu", torch.float16)
        second = select_attention(["flash2", "sdpa"], "cpu", torch.float16)
    logged = [r for r in caplog.records if r.levelno == logging.WARNING and "flash2" in r.getMessage()]
    assert len(logged) == 1
    assert first.notices == second.notices and len(first.notices) == 1


def test_no_usable_preference_still_runs_sdpa():
    sel = select_attention(["xformers"], "cpu", torch.float32)
    assert sel.name == "sdpa" and "sdpa always can" in sel.notices[0]


def test_auto_expands_without_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="wan.optim.attention"):
        sel = select_attention("auto", "cpu", torch.bfloat16)
    assert sel.name == "sdpa" and sel.notices == [] and not caplog.records
    assert set(sel.reasons) == set(attn.AUTO_ORDER) - {"sdpa"}


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match=r"'flash4'.*allowed: auto, sdpa, sage, sage2, flash2, flash3, xformers"):
        select_attention(["flash4", "sdpa"], "cpu", torch.float32)
    with pytest.raises(ValueError, match="already registered"):
        register_backend(Backend("sdpa", lambda d, t: (True, "ok"), lambda: sdpa_attention))


def test_registered_backend_matches_sdpa_and_drives_the_dit():
    calls = []

    def fake(q, k, v):
        calls.append(tuple(q.shape))
        return explicit_attention(q.to(v.dtype), k.to(v.dtype), v).to(v.dtype)

    register_backend(Backend("fake", lambda device, dtype: (True, "ok"), lambda: fake))
    try:
        q, k, v = qkv()
        assert rel_err(fake(q, k, v), sdpa_attention(q, k, v)) <= 1e-6
        calls.clear()

        dit = randomize_(WanDiT(CFG), seed=3, std=0.1).eval()
        g = torch.Generator().manual_seed(4)
        x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 16, generator=g)
        with torch.no_grad():
            ref = dit(x, t, ctx)
            sel = apply_attention(dit, ["fake", "sdpa"])
            assert sel.name == "fake" and dit.attention is fake and sel.notices == []
            out = dit(x, t, ctx)
        # one self-attention per block (the folded text cross-attention stays on SDPA)
        assert calls == [(1, 2 * 2 * 2, 2, 128)] * CFG.num_layers
        assert rel_err(out, ref) <= 1e-5
    finally:
        attn.unregister_backend("fake")


# -- the wrappers of the CUDA kernels, against stand-in modules -----------------------------------


def _stand_in(monkeypatch, name, version=None, **funcs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
    if version:
        mod.__version__ = version
    for k, f in funcs.items():
        setattr(mod, k, f)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


def _nhd_kernel(tuple_out=False):
    """A kernel stand-in taking [B, L, H, D] like flash/sage/xformers; insists on one dtype."""
    def kernel(q, k, v, *args, **kwargs):
        assert q.dtype == k.dtype == v.dtype, "the wrapper must cast q, k to v's dtype"
        assert kwargs.get("tensor_layout", "NHD") == "NHD" and not kwargs.get("causal") and not kwargs.get("is_causal")
        out = explicit_attention(q, k, v).to(v.dtype)
        return (out, None) if tuple_out else out
    return kernel


@pytest.fixture
def fake_gpu(monkeypatch):
    caps = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps["value"])
    return caps


def test_kernel_wrappers_follow_the_contract(monkeypatch, fake_gpu):
    _stand_in(monkeypatch, "flash_attn", "2.7.4", flash_attn_func=_nhd_kernel())
    _stand_in(monkeypatch, "flash_attn_interface", flash_attn_func=_nhd_kernel(tuple_out=True))
    _stand_in(monkeypatch, "sageattention", "2.2.0", sageattn=_nhd_kernel())
    ops = _stand_in(monkeypatch, "xformers.ops", memory_efficient_attention=_nhd_kernel())
    _stand_in(monkeypatch, "xformers", ops=ops)
    q, k, v = qkv(torch.bfloat16)
    ref = sdpa_attention(q, k, v)
    for name in ("flash2", "flash3", "sage2", "xformers"):
        sel = select_attention([name], "cuda", torch.bfloat16)
        assert sel.name == name and sel.notices == [], sel.reasons
        out = sel.fn(q, k, v)
        assert out.shape == ref.shape and out.dtype == torch.bfloat16
        assert rel_err(out, ref) <= 1e-2  # bf16 rounding of the inputs and outputs


def test_requirement_reasons(monkeypatch, fake_gpu):
    _stand_in(monkeypatch, "flash_attn", "2.7.4", flash_attn_func=_nhd_kernel())
    _stand_in(monkeypatch, "sageattention", "2.2.0", sageattn=_nhd_kernel())
    assert check_backend("flash2", "cuda", torch.float32) == (False, "runs in float16, bfloat16, not float32")
    ok, reason = check_backend("sage", "cuda", torch.float16)
    assert not ok and "needs sageattention 1.x, version 2.x" in reason
    ok, reason = check_backend("flash2", "cpu", torch.float16)
    assert not ok and "CUDA device" in reason
    fake_gpu["value"] = (7, 5)
    ok, reason = check_backend("flash2", "cuda", torch.float16)
    assert not ok and "sm80" in reason and "sm75" in reason
    fake_gpu["value"] = (8, 9)
    ok, reason = check_backend("flash3", "cuda", torch.float16)
    assert not ok and "not installed" in reason


def test_a_kernel_that_fails_to_import_falls_back(monkeypatch, fake_gpu):
    _stand_in(monkeypatch, "flash_attn", "2.7.4")  # importable, but without flash_attn_func
    sel = select_attention(["flash2"], "cuda", torch.float16)
    assert sel.name == "sdpa" and "failed to load" in sel.reasons["flash2"]
