"""wan.parallel without processes: the checks named before any model loads, the slicing and pass
assignment arithmetic, the performance model, and the single-process no-op path."""

import math

import pytest
import torch

from wan.parallel import (CfgParallel, Launch, ParallelConfig, ParallelConfigError, UlyssesParallel, assign_passes,
                          check_parallel, parallel_session)
from wan.parallel import perf_model as pm
from wan.parallel.comm import padded_length, shard, shard_rope
from wan.parallel.ulysses import sequence_slices
from wan.registry import get_model

TORCHRUN_2 = Launch(rank=0, world_size=2, local_rank=0)
TORCHRUN_4 = Launch(rank=1, world_size=4, local_rank=1)


# ---------------------------------------------------------------------------------------------
# Bad configurations, named


@pytest.mark.parametrize("model,size,allowed", [
    ("wan2.1-t2v-14B", 3, "1, 2, 4, 5, 8, 10, 20, 40"),
    ("wan2.1-t2v-1.3B", 8, "1, 2, 3, 4, 6, 12"),
    ("wan2.2-ti2v-5B", 5, "1, 2, 3, 4, 6, 8, 12, 24"),
    ("test-tiny-t2v", 4, "1, 2"),
])
def test_ulysses_size_must_divide_the_heads(model, size, allowed):
    heads = get_model(model).arch.num_heads
    with pytest.raises(ParallelConfigError) as e:
        check_parallel(ParallelConfig(ulysses_size=size), num_heads=heads, launch=Launch(0, size, 0))
    msg = str(e.value)
    assert msg.startswith(f"--ulysses_size {size}: must divide the model's {heads} attention heads")
    assert msg.endswith(f"allowed: {allowed}")
    assert (e.value.flag, e.value.value) == ("ulysses_size", size)


def test_ulysses_without_torchrun_is_refused():
    with pytest.raises(ParallelConfigError) as e:
        check_parallel(ParallelConfig(ulysses_size=2), num_heads=40, launch=Launch())
    msg = str(e.value)
    assert msg.startswith("--ulysses_size 2: needs 2 processes started by torchrun (torchrun --nproc_per_node 2")
    assert "WORLD_SIZE is not set" in msg and "allowed: --ulysses_size 1" in msg


@pytest.mark.parametrize("config,flag", [
    (ParallelConfig(cfg_parallel=True), "cfg_parallel"),
    (ParallelConfig(dit_fsdp=True), "dit_fsdp"),
    (ParallelConfig(t5_fsdp=True), "t5_fsdp"),
])
def test_other_parallel_flags_without_torchrun_are_refused(config, flag):
    with pytest.raises(ParallelConfigError, match=rf"^--{flag} \(on\): needs 2 processes started by torchrun"):
        check_parallel(config, num_heads=40, launch=Launch(), guidance=(5.0,))


def test_world_size_must_be_cfg_times_ulysses():
    with pytest.raises(ParallelConfigError) as e:
        check_parallel(ParallelConfig(ulysses_size=2, cfg_parallel=True), num_heads=40, launch=TORCHRUN_2,
                       guidance=(5.0,))
    assert str(e.value) == ("--ulysses_size 2: with --cfg_parallel runs on 2 x 2 = 4 processes, but torchrun "
                            "started 2; allowed: --ulysses_size 2 or --ulysses_size 1 with --cfg_parallel "
                            "for 2 processes")
    with pytest.raises(ParallelConfigError, match=r"^--ulysses_size 1: runs on 1 processes, but torchrun started 4; "
                                                  r"allowed: --ulysses_size 4 or --ulysses_size 2 with --cfg_parallel"):
        check_parallel(ParallelConfig(), num_heads=40, launch=TORCHRUN_4)
    # 12 heads on 8 GPUs: only cfg 2 x ulysses 4
    with pytest.raises(ParallelConfigError, match=r"allowed: --ulysses_size 4 with --cfg_parallel for 8 processes$"):
        check_parallel(ParallelConfig(ulysses_size=2), num_heads=12, launch=Launch(0, 8, 0))


def test_cfg_parallel_with_guidance_one_is_refused():
    with pytest.raises(ParallelConfigError) as e:
        check_parallel(ParallelConfig(cfg_parallel=True), num_heads=40, launch=TORCHRUN_2, guidance=(1.0, None))
    assert str(e.value) == ("--cfg_parallel (on): guidance is 1 (--guidance), so there is no negative-prompt pass "
                            "for the second group; allowed: --cfg_parallel with a guidance other than 1, or no "
                            "--cfg_parallel")
    # one expert guided is enough (its steps split; the others run on both groups)
    check_parallel(ParallelConfig(cfg_parallel=True), num_heads=40, launch=TORCHRUN_2, guidance=(1.0, 4.0))


def test_fsdp_with_cfg_parallel_and_skip_layer_guidance_is_refused():
    config = ParallelConfig(cfg_parallel=True, dit_fsdp=True)
    with pytest.raises(ParallelConfigError, match=r"^--dit_fsdp \(on\): with --cfg_parallel and skip-layer guidance"):
        check_parallel(config, num_heads=40, launch=TORCHRUN_2, guidance=(5.0,), skip_layer_guidance=True)
    check_parallel(config, num_heads=40, launch=TORCHRUN_2, guidance=(5.0,))


@pytest.mark.parametrize("size", [0, -2, 1.5, True])
def test_ulysses_size_must_be_a_whole_number(size):
    with pytest.raises(ParallelConfigError, match=rf"^--ulysses_size {size}: allowed: a whole number >= 1"):
        check_parallel(ParallelConfig(ulysses_size=size), num_heads=40, launch=TORCHRUN_2)


def test_good_configurations_pass():
    check_parallel(ParallelConfig(), num_heads=40, launch=Launch())
    check_parallel(ParallelConfig(ulysses_size=2, dit_fsdp=True, t5_fsdp=True), num_heads=40, launch=TORCHRUN_2)
    check_parallel(ParallelConfig(ulysses_size=2, cfg_parallel=True), num_heads=12, launch=TORCHRUN_4,
                   guidance=(5.0,))
    check_parallel(ParallelConfig(cfg_parallel=True), num_heads=2, launch=TORCHRUN_2, guidance=(3.0, 4.0))


def test_launch_from_env():
    assert Launch.from_env({}) == Launch()
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert Launch.from_env(env) == Launch(1, 2, 1)
    with pytest.raises(ValueError, match="without MASTER_PORT: start the processes with torchrun"):
        Launch.from_env({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"})
    with pytest.raises(ValueError, match="RANK='x': not an integer"):
        Launch.from_env({"RANK": "x"})


def test_single_process_session_is_a_no_op():
    with parallel_session(ParallelConfig(), launch=Launch(), device="cpu") as ps:
        assert ps.mesh is None and ps.sp_group is None and ps.is_main and ps.fsdp_mesh is None
        assert ps.broadcast({"seed": 3}) == {"seed": 3}
        assert not torch.distributed.is_initialized()
    # the parts do nothing on a group of one
    dit = object()
    assert UlyssesParallel(None).attach({"transformer": dit}) == []
    assert CfgParallel(None).run_passes(("cond", "uncond"), lambda n: torch.tensor(len(n))) == {
        "cond": torch.tensor(4), "uncond": torch.tensor(6)}


# ---------------------------------------------------------------------------------------------
# Slices and pass assignment


def test_shard_pads_and_slices():
    x = torch.arange(9.0).view(1, 9, 1)
    parts = [shard(x, 1, r, 2) for r in range(2)]
    assert [p.flatten().tolist() for p in parts] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 0]]
    assert padded_length(9, 2) == 10 and padded_length(8, 4) == 8 and sequence_slices(9, 2) == [(0, 5), (5, 9)]
    assert sequence_slices(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    assert shard(x, 1, 3, 4).flatten().tolist() == [0.0, 0.0, 0.0]  # a slice made only of padding


def test_rope_padding_is_the_identity_rotation():
    cos, sin = torch.rand(5, 3), torch.rand(5, 3)
    c1, s1 = shard_rope((cos, sin), 1, 2)
    assert torch.equal(c1[:2], cos[3:]) and torch.equal(s1[:2], sin[3:])
    assert torch.equal(c1[2], torch.ones(3)) and torch.equal(s1[2], torch.zeros(3))


def test_passes_split_over_cfg_ranks():
    assert assign_passes(("cond", "uncond"), 0, 2) == [(0, "cond")]
    assert assign_passes(("cond", "uncond"), 1, 2) == [(0, "uncond")]
    # three passes (skip-layer guidance): rank 1 repeats a pass so both ranks run the DiT twice
    assert assign_passes(("cond", "uncond", "cond_skip"), 0, 2) == [(0, "cond"), (1, "cond_skip")]
    assert assign_passes(("cond", "uncond", "cond_skip"), 1, 2) == [(0, "uncond"), (1, "cond")]
    assert assign_passes((), 0, 2) == []


# ---------------------------------------------------------------------------------------------
# Performance model


def test_flops_of_a_known_shape():
    spec = get_model("wan2.1-t2v-14B").arch
    tokens = pm.video_tokens(81, 720, 1280)
    assert tokens == 21 * 45 * 80 == 75600
    d, f, L = 5120, 13824, tokens
    per_block = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * 512 * d * d + 4 * L * 512 * d + 4 * L * d * f
    assert pm.forward_flops(spec, tokens) == 40 * per_block
    assert 6.4e15 < pm.forward_flops(spec, tokens) < 6.7e15      # ~6.5 PFLOP a forward
    assert pm.step_flops(spec, tokens) == 2 * pm.forward_flops(spec, tokens)


def test_ulysses_bytes_follow_the_slices():
    cfg = dict(dim=256, num_layers=2, out_dim=16, patch_size=(1, 2, 2), vace_layers=(0, 1))
    # 9 tokens on 2 ranks: 5 each; 4 all-to-alls of 5 x 256 float32, half of each leaves
    assert pm.ulysses_block_bytes(cfg, 9, 2, elem_bytes=4) == 4 * 5 * 256 * 4 // 2
    assert pm.ulysses_forward_bytes(cfg, 9, 2, elem_bytes=4) == {"all_to_all": 2 * 10240, "all_gather": 5 * 64 * 4}
    assert pm.ulysses_forward_bytes(cfg, 9, 2, elem_bytes=4, vace=True)["all_to_all"] == 4 * 10240
    assert pm.ulysses_forward_calls(cfg, 2, vace=True) == {"all_to_all": 16, "all_gather": 1}
    assert pm.cfg_step_bytes((16, 21, 90, 160)) == 16 * 21 * 90 * 160 * 4


def test_predicted_speedups():
    spec = get_model("wan2.1-t2v-14B").arch
    tokens, latent = pm.video_tokens(81, 720, 1280), (16, 21, 90, 160)
    table = pm.speedup_table(spec, tokens, latent)
    nv = {p.gpus: p for p in table if p.hardware == pm.H100_NVLINK.name}
    pcie = {p.gpus: p for p in table if p.hardware == pm.H100_PCIE.name}
    for n in (2, 4, 8):
        assert 0.9 * n < nv[n].speedup <= n           # NVLink: near linear for 75k tokens
        assert pcie[n].speedup < nv[n].speedup        # PCIe pays for its all-to-alls
    assert nv[2].speedup < nv[4].speedup < nv[8].speedup
    # on two GPUs CFG parallel sends one prediction per step, Ulysses 160 all-to-alls a forward
    assert (nv[2].cfg_size, nv[2].ulysses_size) == (2, 1)
    # 1.3B (12 heads) on 8 GPUs: Ulysses 8 does not divide the heads, cfg 2 x ulysses 4 does
    small = get_model("wan2.1-t2v-1.3B").arch
    assert pm.layouts(8, small.num_heads) == [(2, 4)]
    p = pm.best(small, pm.video_tokens(81, 480, 832), (16, 21, 60, 104), 8, pm.H100_PCIE)
    assert (p.cfg_size, p.ulysses_size) == (2, 4) and 1 < p.speedup < 8
    single = pm.predict(spec, tokens, latent, pm.H100_NVLINK)
    assert single.comm_s == 0 and math.isclose(single.speedup, 1.0)
