"""MagCache with tables recorded per model: the first job records (exactly the plain output), the
next ones reuse the table, resampled to their step count; bad files never stop a job."""

import json
import math

import pytest
import torch

from wan.engine import Engine, GenerationRequest
from wan.engine.samplers import make_sampler
from wan.optim.magcache_tables import (
    MagCacheJob,
    MagnitudeTables,
    TableError,
    resample,
    table_file_name,
)
from wan.optim.step_cache import calibrate_magcache_passes
from wan.testing.tiny_family import ensure_tiny_checkpoints

ON = {"step_savers.magcache.enabled": True}          # the profile's defaults: speedup 2, max_skips 2, start 0.2
OFF = {"step_savers.magcache.enabled": False}        # the plain run: same profile, so the same loaded models
RECORDED = "this run computed every step and recorded one"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def shared_engine(root, tmp_path_factory):
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32,
                  magcache_dir=tmp_path_factory.mktemp("magcache"))


@pytest.fixture
def engine(shared_engine, tmp_path):
    """The module's engine (models stay loaded) with an empty table folder of this test's own."""
    shared_engine.magcache_tables = MagnitudeTables(tmp_path / "magcache")
    return shared_engine


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def run_counting(engine, req):
    """(result, block runs per pass kind): the first block's forward runs once per computed pass."""
    dits = engine.models.get(engine.registry.get(req.model)).dits.values()
    runs = {"cond": 0, "uncond": 0}

    def count(dit):
        def hook(module, args, out):
            runs[dit.block_runner.pass_name.rpartition("/")[2]] += 1
        return hook
    hooks = [dit.blocks[0].register_forward_hook(count(dit)) for dit in dits]
    try:
        return engine.generate(req, write=False), runs
    finally:
        for h in hooks:
            h.remove()


def mag_notices(result) -> list[str]:
    return [n for n in result.notices if n.startswith("MagCache")]


def expected_computed(table: dict, req, steps: int, speedup=2.0, max_skips=2, start=0.2) -> dict[str, int]:
    """Computed steps per pass that the stored table gives for ``steps`` steps, worked out here
    from the file (resample + calibration), independently of the loop's wiring."""
    timesteps = [float(t) for t in make_sampler(req.sampler or "unipc", steps, req.shift or 5.0).timesteps]
    experts = [MagCacheJob(None, "", "", 1.0, req.boundary).expert_at(t) for t in timesteps]
    tables, forced = {}, {}
    for kind in ("cond", "uncond"):
        tables[kind], forced[kind] = resample(table["passes"][kind], timesteps, experts)
    _, scheds = calibrate_magcache_passes(tables, speedup, max_skips, max(1, int(start * steps)), forced)
    return {k: sum(s) for k, s in scheds.items()}


def test_first_run_records_exactly_the_plain_output_and_the_next_run_skips_steps(engine):
    steps = 16
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=steps, seed=3)
    plain = engine.generate(req.replace(profile_overrides=OFF), write=False)
    first, runs = run_counting(engine, req.replace(profile_overrides=ON))
    assert torch.equal(first.latent, plain.latent)
    assert runs == {"cond": steps, "uncond": steps}
    assert any("no magnitude table for test-tiny-t2v" in n and RECORDED in n and "next runs use it" in n
               for n in first.notices)
    path = engine.magcache_tables.folder / "test-tiny-t2v.json"
    data = json.loads(path.read_text())
    (table,) = data["tables"]
    assert (table["sampler"], table["shift"], table["steps"], table["model"]) == ("unipc", 5.0, steps, "test-tiny-t2v")
    assert table["frames"] == first.request.frames and table["size"] == [first.request.width, first.request.height]
    for kind in ("cond", "uncond"):
        p = table["passes"][kind]
        assert len(p["ratios"]) == steps and p["ratios"][0] == 1.0 and all(r > 0 for r in p["ratios"])
        assert p["timesteps"] == [float(t) for t in make_sampler("unipc", steps, 5.0).timesteps]
        assert set(p["experts"]) == {"transformer"}
    assert table["passes"]["cond"]["ratios"] != table["passes"]["uncond"]["ratios"]

    second, runs = run_counting(engine, req.replace(profile_overrides=ON))
    assert mag_notices(second) == []
    assert json.loads(path.read_text()) == data                        # used, not recorded again
    assert runs == expected_computed(table, req, steps)
    assert all(abs(n - steps / 2) <= 1 for n in runs.values())         # speed-up 2: 8 of 16 steps per pass
    err = rel_err(second.latent, plain.latent)
    assert 0 < err <= 0.05  # measured 0.031 on the random TEST weights (caches err more than on trained ones)


def test_another_step_count_reuses_the_table_through_interpolation(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=16, seed=4)
    engine.generate(req.replace(profile_overrides=ON), write=False)
    path = engine.magcache_tables.folder / "test-tiny-t2v.json"
    recorded = json.loads(path.read_text())
    table = recorded["tables"][0]

    # 8 unipc steps land on every other of the 16 recorded timesteps: each ratio is the product of two
    r16 = table["passes"]["cond"]["ratios"]
    t8 = [float(t) for t in make_sampler("unipc", 8, 5.0).timesteps]
    r8, forced = resample(table["passes"]["cond"], t8, ["transformer"] * 8)
    assert forced == {0}
    for j in range(1, 8):
        assert r8[j] == pytest.approx(r16[2 * j - 1] * r16[2 * j], rel=1e-9)
    # at the recorded steps the table gives back the recorded ratios
    same, _ = resample(table["passes"]["cond"], table["passes"]["cond"]["timesteps"], ["transformer"] * 16)
    assert same == pytest.approx(r16, rel=1e-9)

    for steps in (8, 12):
        plain = engine.generate(req.replace(steps=steps, profile_overrides=OFF), write=False)
        fast, runs = run_counting(engine, req.replace(steps=steps, profile_overrides=ON))
        assert mag_notices(fast) == [] and json.loads(path.read_text()) == recorded
        assert runs == expected_computed(table, req, steps)
        assert all(abs(n - steps / 2) <= 1 for n in runs.values())
        assert 0 < rel_err(fast.latent, plain.latent) <= 0.1   # measured 0.070 (8 steps), 0.036 (12 steps)


def test_more_steps_than_recorded_compute_the_steps_past_the_recorded_range(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=8, seed=5)
    engine.generate(req.replace(profile_overrides=ON), write=False)
    table = engine.magcache_tables.read("test-tiny-t2v")[0]
    t20 = [float(t) for t in make_sampler("unipc", 20, 5.0).timesteps]
    ratios, forced = resample(table["passes"]["uncond"], t20, ["transformer"] * 20)
    lowest = min(table["passes"]["uncond"]["timesteps"])
    assert forced == {0} | {j for j, t in enumerate(t20) if t < lowest} and max(forced) == 19
    assert all(math.isfinite(r) and r > 0 for r in ratios)


def test_another_sampler_records_anew_and_keeps_both_tables(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=6, seed=6)
    engine.generate(req.replace(profile_overrides=ON), write=False)
    euler = req.replace(sampler="euler")
    plain = engine.generate(euler.replace(profile_overrides=OFF), write=False)
    first = engine.generate(euler.replace(profile_overrides=ON), write=False)
    assert torch.equal(first.latent, plain.latent)
    assert any("(euler, shift 5)" in n and RECORDED in n for n in first.notices)
    tables = engine.magcache_tables.read("test-tiny-t2v")
    assert sorted(t["sampler"] for t in tables) == ["euler", "unipc"]
    assert mag_notices(engine.generate(euler.replace(profile_overrides=ON), write=False)) == []
    other_shift = engine.generate(req.replace(shift=3.0, profile_overrides=ON), write=False)
    assert any("(unipc, shift 3)" in n and RECORDED in n for n in other_shift.notices)
    assert len(engine.magcache_tables.read("test-tiny-t2v")) == 3


def test_threshold_zero_computes_every_step_and_equals_the_plain_output(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=8, seed=7)
    engine.generate(req.replace(profile_overrides=ON), write=False)   # records the table
    plain = engine.generate(req.replace(profile_overrides=OFF), write=False)
    zero, runs = run_counting(engine, req.replace(profile_overrides={**ON, "step_savers.magcache.threshold": 0.0}))
    assert mag_notices(zero) == [] and runs == {"cond": 8, "uncond": 8}
    assert torch.equal(zero.latent, plain.latent)


def test_two_experts_record_across_the_switch_and_compute_each_experts_first_step(engine):
    steps = 16
    req = GenerationRequest(model="test-tiny-t2v-a14b", prompt="a fox", steps=steps, seed=8)
    plain = engine.generate(req.replace(profile_overrides=OFF), write=False)
    first = engine.generate(req.replace(profile_overrides=ON), write=False)
    assert torch.equal(first.latent, plain.latent)
    assert any("test-tiny-t2v-a14b" in n and RECORDED in n for n in first.notices)
    table = engine.magcache_tables.read("test-tiny-t2v-a14b")[0]
    experts = table["passes"]["cond"]["experts"]
    switch = experts.index("low_noise")
    assert 0 < switch < steps and set(experts[switch:]) == {"low_noise"}
    assert table["passes"]["cond"]["ratios"][switch] == 1.0    # no ratio across two networks

    computed = []
    dits = engine.models.get(engine.registry.get(req.model)).dits
    hooks = [dit.blocks[0].register_forward_hook(
        lambda m, a, o, dit=dit: computed.append((dit.block_runner.step, dit.block_runner.pass_name)))
        for dit in dits.values()]
    try:
        second = engine.generate(req.replace(profile_overrides=ON), write=False)
    finally:
        for h in hooks:
            h.remove()
    assert mag_notices(second) == []
    assert (switch, "low_noise/cond") in computed and (switch, "low_noise/uncond") in computed
    per_pass = {k: sum(1 for _, name in computed if name.endswith("/" + k)) for k in ("cond", "uncond")}
    assert per_pass == expected_computed(table, first.request, steps)
    assert all(abs(n - steps / 2) <= 1 for n in per_pass.values())
    err = rel_err(second.latent, plain.latent)
    assert 0 < err <= 0.05  # measured 0.029


def test_file_names_of_hostile_model_ids_stay_in_the_folder(tmp_path):
    assert table_file_name("wan2.1-t2v-1.3B") == "wan2.1-t2v-1.3B.json"
    store = MagnitudeTables(tmp_path / "tables")
    hostile = ["../../etc/passwd", "/abs/path", "a\\..\\b", "..", ".hidden", "", "x" * 500, "nul\x00byte",
               "a/b", "a_b/", "C:\\temp\\x", "\udcff"]
    names = {table_file_name(m) for m in hostile}
    assert len(names) == len(hostile)                      # distinct ids never share a file
    for name in names:
        assert "/" not in name and "\\" not in name and "\x00" not in name and not name.startswith(".")
        assert len(name) <= 120 and name.endswith(".json")
    table = {"sampler": "unipc", "shift": 5.0, "passes": {k: {"timesteps": [999.0, 500.0],
                                                                "experts": ["transformer"] * 2,
                                                                "ratios": [1.0, 0.9]} for k in ("cond", "uncond")}}
    for model_id in hostile:
        path = store.save(model_id, table)
        assert path.parent == store.folder
        assert store.find(model_id, "unipc", 5.0)["passes"] == table["passes"]
    assert not (tmp_path / "etc").exists() and sorted(p.parent for p in tmp_path.rglob("*.json")) == \
        [store.folder] * len(hostile)


@pytest.mark.parametrize("content", [
    "{ not json",
    json.dumps({"format": "wan-studio magcache tables", "version": 1, "model": "test-tiny-t2v",
                "tables": [{"sampler": "unipc", "shift": 5.0,
                            "passes": {k: {"timesteps": [999.0, 500.0], "experts": ["transformer"] * 2,
                                           "ratios": [1.0, -2.0]} for k in ("cond", "uncond")}}]}),
    json.dumps({"format": "wan-studio magcache tables", "version": 1, "model": "another-model", "tables": []}),
])
def test_a_corrupted_table_file_is_set_aside_and_recorded_anew(engine, content):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=4, seed=9)
    store = engine.magcache_tables
    path = store.path("test-tiny-t2v")
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with pytest.raises(TableError, match="test-tiny-t2v.json"):
        store.read("test-tiny-t2v")
    plain = engine.generate(req.replace(profile_overrides=OFF), write=False)
    result = engine.generate(req.replace(profile_overrides=ON), write=False)
    assert torch.equal(result.latent, plain.latent)
    notices = mag_notices(result)
    assert any("unusable" in n and "moved to test-tiny-t2v.json.bad-" in n for n in notices)
    assert any(RECORDED in n for n in notices)
    (aside,) = path.parent.glob("test-tiny-t2v.json.bad-*")
    assert aside.read_text() == content
    assert store.find("test-tiny-t2v", "unipc", 5.0) is not None
    assert mag_notices(engine.generate(req.replace(profile_overrides=ON), write=False)) == []


def test_runs_not_from_pure_noise_do_not_record(tmp_path):
    job = MagCacheJob(MagnitudeTables(tmp_path), "test-tiny-t2v", "unipc", 5.0)
    sampler = make_sampler("unipc", 8, 5.0)
    assert job.ratios(sampler) is None
    assert job.recorder(sampler, start=3) is None
    assert any("run from pure noise" in n for n in job.finish())
    assert not list(tmp_path.iterdir())


def test_profile_settings_reach_the_step_savers(root, tmp_path):
    from wan.optim.apply import resolve_profile, savers_from_profile
    engine = Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)
    assert engine.magcache_tables.folder == root / "magcache"
    spec = engine.registry.get("test-tiny-t2v")
    s = savers_from_profile(resolve_profile(None, {**ON, "step_savers.magcache.max_skips": 3,
                                                   "step_savers.magcache.start": 0.3}), spec)
    assert (s.magcache_speedup, s.magcache_threshold, s.magcache_max_skips, s.magcache_start) == (2.0, None, 3, 0.3)
    s = savers_from_profile(resolve_profile(None, {**ON, "step_savers.magcache.threshold": 0.1}), spec)
    assert (s.magcache_speedup, s.magcache_threshold) == (None, 0.1)
    assert not savers_from_profile(resolve_profile(None, {"step_savers.magcache.enabled": False}), spec).magcache_on


def test_batched_cfg_records_each_pass_of_the_batch(engine):
    """A batched cond+uncond pass is recorded as its two passes: the same table as separate passes
    (the batch differs from separate passes by float rounding only)."""
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=6, seed=10)
    engine.generate(req.replace(profile_overrides=ON), write=False)
    separate = engine.magcache_tables.read("test-tiny-t2v")[0]["passes"]
    engine.magcache_tables = MagnitudeTables(engine.magcache_tables.folder.parent / "batched")
    batched = {**ON, "step_savers.batched_cfg": True}
    plain = engine.generate(req.replace(profile_overrides={**OFF, "step_savers.batched_cfg": True}), write=False)
    first = engine.generate(req.replace(profile_overrides=batched), write=False)
    assert torch.equal(first.latent, plain.latent)
    got = engine.magcache_tables.read("test-tiny-t2v")[0]["passes"]
    for kind in ("cond", "uncond"):
        assert got[kind]["ratios"] == pytest.approx(separate[kind]["ratios"], rel=1e-4)
    second = engine.generate(req.replace(profile_overrides=batched), write=False)
    assert mag_notices(second) == [] and not torch.equal(second.latent, plain.latent)


def test_teacache_and_magcache_together_use_teacache_with_a_notice(engine):
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=4, seed=11)
    result = engine.generate(req.replace(profile_overrides={**ON, "step_savers.teacache.enabled": True}), write=False)
    assert any("MagCache: not used" in n and "TeaCache" in n for n in result.notices)
    assert not engine.magcache_tables.folder.exists()


def test_a_cancelled_recording_saves_nothing(engine):
    from wan.engine.loop import Cancelled, CancelToken
    token = CancelToken()
    req = GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=4, seed=12, profile_overrides=ON)
    with pytest.raises(Cancelled):
        engine.generate(req, write=False, cancel=token, progress=lambda s: token.cancel() if s.step == 2 else None)
    assert not engine.magcache_tables.folder.exists()
    assert engine.models.current.dit.block_runner is None
