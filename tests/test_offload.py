"""Block streaming: a streamed DiT computes exactly what a loaded one does, holds no block beyond
its budget between forwards, reads ahead on its thread, stops that thread, and reports read errors.

Checkpoints are written by the tests in the official layout (fp32), as a ComfyUI fp8 scaled file,
and as a VACE model. Width 256 = two heads of 128, so the head count is inferred as for real files.
"""

import faulthandler
import gc
import os
import threading

import pytest
import torch
from safetensors.torch import save_file

import wan
from helpers import randomize_
from wan.loading import files
from wan.loading.files import CheckpointError
from wan.models.dit import DiTConfig, WanDiT
from wan.optim.offload import load_transformer_streamed, stream_blocks_

CFG = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=4, freq_dim=32, text_dim=16)
VACE_CFG = DiTConfig(dim=256, ffn_dim=64, num_heads=2, num_layers=4, freq_dim=32, text_dim=16,
                     vace_layers=(0, 2), vace_in_dim=32)


def _state(cfg, seed):
    return {k: v.contiguous() for k, v in randomize_(WanDiT(cfg), seed=seed, std=0.1).state_dict().items()}


@pytest.fixture(scope="module")
def t2v_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t2v") / "diffusion_pytorch_model.safetensors"
    save_file(_state(CFG, 1), path)
    return path


@pytest.fixture(scope="module")
def fp8_scaled_file(tmp_path_factory):
    """ComfyUI's fp8 scaled layout: prefixed keys, e4m3 matrices with a per-tensor scale_weight."""
    state = {}
    for k, v in _state(CFG, 2).items():
        key = "model.diffusion_model." + k
        if v.ndim == 2 and k.endswith(".weight") and "norm" not in k:
            scale = v.abs().max() / 448.0
            state[key] = (v / scale).to(torch.float8_e4m3fn)
            state[key[: -len(".weight")] + ".scale_weight"] = scale.reshape(1)
        else:
            state[key] = v.to(torch.bfloat16)
    state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    path = tmp_path_factory.mktemp("fp8") / "wan2.1_t2v_fp8_e4m3fn_scaled.safetensors"
    save_file(state, path)
    return path


@pytest.fixture(scope="module")
def vace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vace") / "diffusion_pytorch_model.safetensors"
    save_file(_state(VACE_CFG, 3), path)
    return path


def probes(n=3):
    g = torch.Generator().manual_seed(7)
    return [(torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([900.0 - 300 * i]), torch.randn(1, 5, 16, generator=g))
            for i in range(n)]


def forward_all(dit, inputs, **kw):
    with torch.inference_mode():
        return [dit(x, t, ctx, **kw) for x, t, ctx in inputs]


def resident_blocks(dit):
    """Names of blocks that hold real (non-meta) weights in their attention/FFN layers."""
    blocks = [(f"blocks.{i}", b) for i, b in enumerate(dit.blocks)]
    blocks += [(f"vace_blocks.{i}", b) for i, b in enumerate(getattr(dit, "vace_blocks", []))]
    return [n for n, b in blocks if not b.ffn[0].weight.is_meta]


def assert_no_block_weights(dit, keep):
    for name, p in dit.named_parameters():
        inside = name.startswith(("blocks.", "vace_blocks."))
        in_budget = any(name.startswith(k + ".") for k in keep)
        outside_forward = ".before_proj." in name or ".after_proj." in name
        assert p.is_meta == (inside and not in_budget and not outside_forward), name


@pytest.mark.parametrize("prefetch, budget", [(0, None), (1, None), (2, None), (1, 2), (0, 3), (2, 4)])
def test_streamed_equals_loaded(t2v_file, prefetch, budget):
    inputs = probes()
    expected = forward_all(wan.load_transformer(t2v_file), inputs)
    dit, handle = load_transformer_streamed(t2v_file, prefetch=prefetch, budget_blocks=budget)
    try:
        keep = handle.resident
        assert len(keep) == (budget or 0)
        assert_no_block_weights(dit, keep)  # nothing streamed was ever read before the forward
        for round_ in range(2):
            got = forward_all(dit, inputs)
            for e, o in zip(expected, got):
                assert torch.equal(e, o)
            assert resident_blocks(dit) == keep
            assert_no_block_weights(dit, keep)
    finally:
        handle.close()


def test_streaming_a_loaded_model_drops_its_blocks(t2v_file):
    dit = wan.load_transformer(t2v_file)
    inputs = probes(2)
    expected = forward_all(dit, inputs)
    handle = stream_blocks_(dit, t2v_file, prefetch=1, budget_blocks=1)
    with handle:
        assert handle.resident == ["blocks.0"] and resident_blocks(dit) == ["blocks.0"]
        assert handle.largest_block_bytes == sum(p.numel() * 4 for p in dit.blocks[1].parameters())
        for e, o in zip(expected, forward_all(dit, inputs)):
            assert torch.equal(e, o)
        assert resident_blocks(dit) == ["blocks.0"]


def test_fp8_scaled_file_streams_like_it_loads(fp8_scaled_file):
    inputs = probes(2)
    expected = forward_all(wan.load_transformer(fp8_scaled_file), inputs)  # bf16 + float32 islands
    dit, handle = load_transformer_streamed(fp8_scaled_file, prefetch=1)
    with handle:
        assert handle.dtype == torch.bfloat16
        assert dit.blocks[0].ffn[0].weight.dtype == torch.bfloat16 and dit.blocks[0].modulation.dtype == torch.float32
        for e, o in zip(expected, forward_all(dit, inputs)):
            assert torch.equal(e, o)


@pytest.mark.parametrize("prefetch", [0, 2])
def test_fp8_layers_stay_fp8_when_streamed_and_compute_what_the_kept_fp8_load_does(fp8_scaled_file, prefetch):
    """keep_fp8 while streaming: each block's quantised layers hold the file's fp8 bytes (resident
    or streamed in), so a block takes about half the bytes of bf16, and the outputs are bit for bit
    those of ``load_transformer(keep_fp8=True)``."""
    from wan.layers.quant import QuantLinear
    inputs = probes(2)
    expected = forward_all(wan.load_transformer(fp8_scaled_file, keep_fp8=True), inputs)
    dit, handle = load_transformer_streamed(fp8_scaled_file, prefetch=prefetch, budget_blocks=1, keep_fp8=True)
    plain, plain_handle = load_transformer_streamed(fp8_scaled_file, prefetch=prefetch, budget_blocks=1)
    seen = []

    def record(module, args):
        q = module.ffn[0]
        seen.append((isinstance(q, QuantLinear) and q.qweight.dtype == torch.float8_e4m3fn and not q.qweight.is_meta,
                     q.weight_scale.dtype))
    hooks = [b.register_forward_pre_hook(record) for b in dit.blocks]
    with handle, plain_handle:
        assert isinstance(dit.text_embedding[0], QuantLinear) and not dit.text_embedding[0].qweight.is_meta
        for e, o in zip(expected, forward_all(dit, inputs)):
            assert torch.equal(e, o)
        assert seen and all(ok and scale == torch.float32 for ok, scale in seen)  # fp8 in every block as it ran
        assert resident_blocks(dit) == ["blocks.0"] and isinstance(dit.blocks[0].ffn[0], QuantLinear)
        assert 0.5 < handle.largest_block_bytes / plain_handle.largest_block_bytes < 0.6  # fp8 + float32 islands
    for h in hooks:
        h.remove()


def test_vace_model_with_and_without_control(vace_file):
    g = torch.Generator().manual_seed(9)
    control = torch.randn(1, 32, 2, 4, 4, generator=g)
    inputs = probes(2)
    ref = wan.load_transformer(vace_file)
    expected_plain = forward_all(ref, inputs)
    expected_vace = forward_all(ref, inputs, vace_context=control, vace_scale=0.7)
    dit, handle = load_transformer_streamed(vace_file, prefetch=2)
    with handle:
        assert handle.units[:2] == ["vace_blocks.0", "vace_blocks.1"]
        for _ in range(2):  # alternate: the read-ahead guesses must not change results
            for e, o in zip(expected_vace, forward_all(dit, inputs, vace_context=control, vace_scale=0.7)):
                assert torch.equal(e, o)
            for e, o in zip(expected_plain, forward_all(dit, inputs)):
                assert torch.equal(e, o)
            assert resident_blocks(dit) == []
            assert_no_block_weights(dit, [])


@pytest.mark.parametrize("prefetch", [0, 1])
def test_reads_happen_ahead_on_the_reader_thread(t2v_file, monkeypatch, prefetch):
    threads = []
    real = files._read_tensor

    def spy(path, *args):
        threads.append(threading.current_thread().name)
        return real(path, *args)

    monkeypatch.setattr(files, "_read_tensor", spy)  # before opening: the index binds the reader
    dit, handle = load_transformer_streamed(t2v_file, prefetch=prefetch)
    threads.clear()  # the non-block weights
    with handle:
        forward_all(dit, probes(2))
    # close() joined the thread: every read is counted, the last read-ahead at most once more
    per_block = len(list(dit.blocks[0].parameters()))
    assert len(threads) % per_block == 0
    assert 2 * CFG.num_layers <= len(threads) // per_block <= 2 * CFG.num_layers + prefetch
    worker = {"wan-block-stream"} if prefetch else {threading.current_thread().name}
    assert set(threads) == worker


def test_close_stops_the_thread(t2v_file):
    dit, handle = load_transformer_streamed(t2v_file, prefetch=1)
    forward_all(dit, probes(1))
    assert handle.thread.is_alive()
    handle.close()
    assert not handle.thread.is_alive()
    with pytest.raises(RuntimeError, match="was closed"):
        forward_all(dit, probes(1))


def test_garbage_collection_stops_the_thread(t2v_file):
    dit, handle = load_transformer_streamed(t2v_file, prefetch=2)
    forward_all(dit, probes(1))
    thread = handle.thread
    del dit, handle
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_truncated_file_is_a_checkpoint_error_in_the_caller(t2v_file, tmp_path, prefetch):
    path = tmp_path / "model.safetensors"
    path.write_bytes(t2v_file.read_bytes())
    dit, handle = load_transformer_streamed(path, prefetch=prefetch)
    with handle:
        os.truncate(path, 4096)  # the download "shrinks" after the model was opened
        faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the run instead of blocking it
        try:
            with pytest.raises(CheckpointError, match=r"truncated.*while streaming blocks\.0"):
                forward_all(dit, probes(1))
            with pytest.raises(CheckpointError, match="truncated"):  # and again, no stale state
                forward_all(dit, probes(1))
        finally:
            faulthandler.cancel_dump_traceback_later()
        assert resident_blocks(dit) == []


def test_bad_arguments(t2v_file, vace_file):
    dit = wan.load_transformer(t2v_file)
    with pytest.raises(ValueError, match=r"prefetch=-1"):
        stream_blocks_(dit, t2v_file, prefetch=-1)
    with pytest.raises(ValueError, match=r"budget_blocks=5: expected a whole number from 0 to 4"):
        stream_blocks_(dit, t2v_file, budget_blocks=5)
    with pytest.raises(CheckpointError, match="vace_layers=\\(0, 2\\).*loaded from"):
        stream_blocks_(dit, vace_file)
    assert resident_blocks(dit) == [f"blocks.{i}" for i in range(4)]  # refused before touching it


# -- mmgp: the mapping is pure; mmgp itself is imported only on CUDA --------------------------------


def test_mmgp_arguments_for_a_low_vram_plan():
    from wan.optim.mmgp_backend import MmgpSettings, mmgp_arguments
    settings = MmgpSettings(budgets_mb={"transformer": 100, "*": 3000}, pinned=("transformer",),
                            quantize=("text_encoder",))
    kwargs = mmgp_arguments(settings, ["transformer", "text_encoder", "vae"])
    assert kwargs == {"pinnedMemory": ["transformer"], "budgets": {"transformer": 100, "*": 3000},
                      "asyncTransfers": True, "compile": False, "quantizeTransformer": False,
                      "extraModelsToQuantize": ["text_encoder"], "perc_reserved_mem_max": 0.0}
    assert mmgp_arguments(MmgpSettings(pinned=("*",)), ["transformer"])["pinnedMemory"] is True
    with pytest.raises(ValueError, match="name models clip; the pipeline has transformer"):
        mmgp_arguments(MmgpSettings(pinned=("clip",)), ["transformer"])
    with pytest.raises(ValueError, match="budget for 'transformer': -1"):
        MmgpSettings(budgets_mb={"transformer": -1})


def test_apply_mmgp_without_cuda_is_a_clear_error_and_imports_nothing(monkeypatch):
    import sys
    from wan.optim.mmgp_backend import MmgpSettings, apply_mmgp
    monkeypatch.delitem(sys.modules, "mmgp", raising=False)
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*stream_blocks_"):
        apply_mmgp({"transformer": torch.nn.Linear(2, 2)}, MmgpSettings())
    assert "mmgp" not in sys.modules


def test_apply_mmgp_passes_only_arguments_mmgp_takes(monkeypatch):
    import sys
    import types
    from wan.optim.mmgp_backend import MmgpSettings, apply_mmgp
    calls = {}

    def fake_all(pipe, pinnedMemory=False, budgets=0, asyncTransfers=True, verboseLevel=-1):  # an older mmgp
        calls.update(pipe=pipe, pinnedMemory=pinnedMemory, budgets=budgets, asyncTransfers=asyncTransfers)
        return "offloaded"

    offload = types.SimpleNamespace(all=fake_all)
    monkeypatch.setitem(sys.modules, "mmgp", types.SimpleNamespace(offload=offload))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = torch.nn.Linear(2, 2)
    out = apply_mmgp({"transformer": model}, MmgpSettings(budgets_mb={"transformer": 400}, async_transfers=False))
    assert out == "offloaded"
    assert calls == {"pipe": {"transformer": model}, "pinnedMemory": False, "budgets": {"transformer": 400},
                     "asyncTransfers": False}


def test_attention_backend_on_a_streamed_dit(t2v_file, monkeypatch):
    from wan.optim import attention
    seen = []

    def spy(pref, device, dtype):
        seen.append((device, dtype))
        return attention.Selection("sdpa", attention.sdpa_attention)

    monkeypatch.setattr(attention, "select_attention", spy)
    dit, handle = load_transformer_streamed(t2v_file, prefetch=0)
    with handle:
        attention.apply_attention(dit, ["sdpa"])
    assert seen == [(torch.device("cpu"), torch.float32)]  # read off the resident weights, not the meta ones


@pytest.mark.parametrize("mode", ["fp8", "fp8_scaled", "int8"])
def test_a_float_file_streams_quantised_as_its_blocks_are_read(t2v_file, mode):
    """``quantize`` while streaming: every layer ``quantize_`` would quantise is quantised as its
    block is read (the resident one once), non-block layers too; the outputs are bit for bit those
    of the whole load followed by ``quantize_``, and a streamed block takes a little over half the
    bytes of bf16 (8-bit weights, their scales and the float32 islands)."""
    from wan.layers.quant import QuantLinear
    from wan.optim.quant import quantize_
    inputs = probes(2)
    whole = wan.load_transformer(t2v_file, dtype=torch.bfloat16)
    quantize_(whole, mode, keep=WanDiT.keep_in_fp32)
    expected = forward_all(whole, inputs)
    dit, handle = load_transformer_streamed(t2v_file, dtype=torch.bfloat16, prefetch=1, budget_blocks=1,
                                            quantize=mode)
    plain, plain_handle = load_transformer_streamed(t2v_file, dtype=torch.bfloat16, prefetch=1, budget_blocks=1)
    with handle, plain_handle:
        assert isinstance(dit.text_embedding[0], QuantLinear) and dit.text_embedding[0].mode == mode
        assert isinstance(dit.blocks[1].ffn[0], QuantLinear) and dit.blocks[1].ffn[0].qweight.is_meta  # streamed
        for e, o in zip(expected, forward_all(dit, inputs)):
            assert torch.equal(e, o)
        assert resident_blocks(dit) == ["blocks.0"]
        assert 0.5 < handle.largest_block_bytes / plain_handle.largest_block_bytes < 0.65


def test_stream_blocks_of_a_loaded_quantised_dit(fp8_scaled_file, t2v_file):
    """``stream_blocks_`` on a DiT loaded kept fp8, and on one quantised with ``quantize_`` after
    loading: the same outputs as before streaming, and the quantised layers' storage is streamed."""
    from wan.optim.quant import quantize_
    inputs = probes(1)
    kept = wan.load_transformer(fp8_scaled_file, keep_fp8=True)
    int8 = wan.load_transformer(t2v_file, dtype=torch.bfloat16)
    quantize_(int8, "int8", keep=WanDiT.keep_in_fp32)
    for dit, path in ((kept, fp8_scaled_file), (int8, t2v_file)):
        expected = forward_all(dit, inputs)
        with stream_blocks_(dit, path, prefetch=1):
            assert dit.blocks[0].ffn[0].qweight.is_meta  # released between forwards
            for e, o in zip(expected, forward_all(dit, inputs)):
                assert torch.equal(e, o)
