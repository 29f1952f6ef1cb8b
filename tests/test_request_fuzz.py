"""Property-based fuzzing of the request path: random values of every type go into every field of
a JSON request, through the same function the API's ``/queue_job`` calls (``accept_request``).

Whatever comes in, the only exception is ``RequestError`` naming a real request field, and a
request that is accepted resolves inside the output folder, within every limit, with an output
name that is one plain file name inside that folder.
"""

from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wan.app.security import accept_request, allowed_paths, is_inside, limits_of
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.engine.media_out import render_name
from wan.engine.request import INPUT_FIELDS, REQUEST_FIELDS, RequestError, resolve_request

FIELDS = list(REQUEST_FIELDS)
text = st.text(alphabet=st.characters(codec=None), max_size=40) | st.sampled_from(
    ["", "x\ud800y", "../../etc/passwd", "/tmp/x", "{prompt:/>1.0}tmp", "{seed:>300000}", "{time}_{seed}",
     "test-tiny-t2v", "t2v", "vace", "unipc", "1.0,0.5", "a\x00b", "nan", "1e9"])
scalar = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-5, 300)
          | st.floats(allow_nan=True, allow_infinity=True) | text)
value = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=3),
                     max_leaves=8)
lora = st.fixed_dictionaries({"path": value}, optional={"multiplier": value, "include": value, "exclude": value})
field_value = {name: value for name in FIELDS}
field_value["loras"] = st.lists(lora | value, max_size=3) | value
field_value["model"] = st.sampled_from(["test-tiny-t2v", "test-tiny-vace", "test-tiny-t2v-a14b"]) | value
# NAG: typical values beside the edges, so that accepted requests carry them too
field_value["nag_scale"] = st.sampled_from([0, 1, 1.0, 1.5, 9, 50.0, 0.5, 50.5, -1]) | value
field_value["nag2_scale"] = st.sampled_from([1, 9, 0.5, 51]) | value
field_value["nag3_scale"] = st.sampled_from([1, 9, 0.5, 51]) | value
field_value["nag_tau"] = st.sampled_from([1, 2.5, 10.0, 0.99, 10.01]) | value
field_value["nag_alpha"] = st.sampled_from([0, 0.25, 1, 1.01, -0.01]) | value
# sliding windows and continuation: typical values and edges
field_value["sliding_window_size"] = st.sampled_from([0, 5, 9, 81, 129, 4, 10, -9]) | value
field_value["sliding_window_overlap"] = st.sampled_from([1, 4, 5, 9, 0, 81]) | value
field_value["sliding_window_discard_last_frames"] = st.sampled_from([0, 4, 8, -1, 200]) | value
field_value["sliding_window_seam"] = st.sampled_from(["cut", "crossfade", "fade"]) | value
field_value["sliding_window_color_correction"] = st.sampled_from(["off", "mean_std", "histogram", "lab"]) | value
field_value["sliding_window_color_correction_strength"] = st.sampled_from([0, 0.5, 1, 1.01, -0.1]) | value
field_value["sliding_window_overlap_noise"] = st.sampled_from([0, 20, 150, 151, -1, 20.5]) | value
field_value["continue_video"] = st.sampled_from(["/etc/passwd", "../../x.mp4", "x.mp4"]) | value
# guidance phases and explicit timesteps: typical values and edges
field_value["guidance_phases"] = st.sampled_from([1, 2, 3, 0, 4, 2.0]) | value
field_value["guidance2_scale"] = st.sampled_from([1, 1.0, 3.5, 0, 100.5, -1]) | value
field_value["guidance3_scale"] = st.sampled_from([1, 1.0, 3.5, 0, 100.5, -1]) | value
field_value["switch_threshold"] = st.sampled_from([965, 875.0, 1000, 0, 1001, -1]) | value
field_value["switch_threshold2"] = st.sampled_from([800, 500.0, 999, 0, 1001, -1]) | value
field_value["model_switch_phase"] = st.sampled_from([1, 2, 3, 0]) | value
field_value["timesteps"] = st.sampled_from([[1000, 757, 522], [1000.0, 500.0], [500, 1000], [0], [1001], []]) | value
field_value["sampler"] = st.sampled_from(["euler", "lcm", "unipc"]) | value
# a valid request with a few fields replaced (reaches the checks after the first), or any mapping
BASE = {"model": "test-tiny-t2v", "prompt": "a fox", "steps": 4}
change = st.sampled_from(FIELDS).flatmap(lambda name: st.tuples(st.just(name), field_value[name]))
mutated = st.lists(change, max_size=3).map(lambda pairs: {**BASE, **dict(pairs)})
anything = st.fixed_dictionaries({"model": field_value["model"]},
                                 optional={n: v for n, v in field_value.items() if n != "model"})
requests = st.one_of(mutated, mutated, mutated, anything)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    base = tmp_path_factory.mktemp("fuzz")
    s = ServerSettings(output_dir=str(base / "out"), state_dir=str(base / "state"), lora_dir=str(base / "loras"),
                       checkpoint_dir=str(base / "ckpt"), max_frames=81, max_pixels=832 * 480)
    return AppState(s, engine_factory=lambda: None)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=requests)
def test_any_request_is_accepted_within_bounds_or_refused_by_field(state, data):
    try:
        prepared = accept_request(data, state)
    except RequestError as e:
        assert e.field in REQUEST_FIELDS, f"{e.field!r} is not a request field: {e}"
        assert len(str(e)) < 2000  # the value is echoed cut short
        return
    limits = limits_of(state.settings)
    resolved, _ = resolve_request(prepared, limits=limits)
    out = Path(state.settings.output_dir).resolve()
    assert is_inside(resolved.output_dir, out)
    for name in INPUT_FIELDS:
        v = getattr(resolved, name)
        for path in [v] if isinstance(v, str) else v or []:
            assert any(is_inside(path, folder) for folder in allowed_paths(state.settings))
    assert resolved.frames <= limits.max_frames and resolved.steps <= limits.max_steps
    assert resolved.width * resolved.height <= limits.max_pixels
    assert resolved.nag_scale in (0.0, 1.0) or 1.0 < resolved.nag_scale <= 50.0
    assert 1.0 <= resolved.nag_tau <= 10.0 and 0.0 <= resolved.nag_alpha <= 1.0
    assert all(type(getattr(resolved, n)) is float for n in ("nag_scale", "nag_tau", "nag_alpha"))
    for name, need in (("nag2_scale", 2), ("nag3_scale", 3)):  # per phase: only with that many phases, in range
        v = getattr(resolved, name)
        assert v is None or (type(v) is float and resolved.guidance_phases >= need
                             and (v in (0.0, 1.0) or 1.0 < v <= 50.0))
    stem = render_name(resolved.name_template, now=datetime(2026, 1, 1), seed=resolved.seed,
                       prompt=resolved.prompt, model=resolved.model, task=resolved.task)
    assert stem and "/" not in stem and "\\" not in stem and stem not in (".", "..")
    assert (Path(resolved.output_dir) / f"{stem}.mp4").resolve().parent == Path(resolved.output_dir).resolve()


# -- training requests (the Train tab's, and /queue_train's): {"train": {flat settings}, ...} ---------------

from wan.app.train_jobs import accept_train_request  # noqa: E402
from wan.app.train_request import REQUEST_KEYS as TRAIN_KEYS, SERVER_FLAGS, TrainRequestError, run_folder  # noqa: E402
from wan.train.config import FLAG_NAMES  # noqa: E402

TRAIN_FIELDS = {"request", "train", "dataset", *TRAIN_KEYS, *(f"train.{name}" for name in FLAG_NAMES)}
TRAIN_BASE = {"model": "test-tiny-t2v", "dataset_config": "clips/data.toml", "output_name": "fuzz",
              "max_train_steps": 5}
train_value = {name: value for name in FLAG_NAMES}
train_value["model"] = st.sampled_from(["test-tiny-t2v", "test-tiny-t2v-a14b", "test-tiny-vace"]) | value
train_value["dataset_config"] = st.sampled_from(["clips/data.toml", "/etc/hosts", "../../x.toml", "clips",
                                                 "clips/../../../etc/passwd"]) | value
train_value["resume"] = st.sampled_from(["/tmp", "../outputs/train/fuzz/fuzz-state", "x"]) | value
train_value["output_name"] = st.sampled_from(["fuzz", "../x", "a/b", ".hidden", "CON"]) | value
train_value["optimizer_type"] = st.sampled_from(["AdamW", "SGD", "os.system", "bitsandbytes.optim.AdamW8bit"]) | value
for name, typical in {"network_dim": [1, 4, 1024, 1025], "max_train_steps": [1, 100, 101], "seed": [0, 2**63],
                      "max_train_epochs": [1, 50, 10**6], "save_every_n_steps": [1, 5], "network_alpha": [0, 4.0],
                      "learning_rate": [1e-4, 0.0], "gradient_accumulation_steps": [1, 2, 2000],
                      "num_timestep_buckets": [2, 10**6], "timestep_sampling": ["shift", "sigma"]}.items():
    train_value[name] = st.sampled_from(typical) | value
train_change = st.sampled_from(list(FLAG_NAMES)).flatmap(lambda name: st.tuples(st.just(name), train_value[name]))
top_value = {"expert": st.sampled_from([None, "high_noise", "low_noise"]) | value,
             "trigger_words": text | value,
             "sample_prompts": st.sampled_from(["a fox --w 32 --h 32 --f 5 --s 2", "a --i /etc/passwd",
                                                "x --f 100000", "--w 32"]) | text | value}
top_change = st.sampled_from(sorted(top_value)).flatmap(lambda name: st.tuples(st.just(name), top_value[name]))
train_mutated = st.tuples(st.lists(train_change, max_size=3), st.lists(top_change, max_size=2)).map(
    lambda t: {"train": {**TRAIN_BASE, **dict(t[0])}, **dict(t[1])})
train_requests = st.one_of(train_mutated, train_mutated, train_mutated,
                           st.dictionaries(text, value, max_size=3),
                           st.fixed_dictionaries({"train": value}, optional={k: value for k in top_value}))


@pytest.fixture(scope="module")
def train_state(tmp_path_factory):
    from tests.app_train_harness import write_dataset
    from wan.app.train_dataset import DatasetChoice, folder_toml
    base = tmp_path_factory.mktemp("fuzz_train")
    clips = write_dataset(base / "datasets" / "clips", {"a": "a red square"})
    (clips / "data.toml").write_text(folder_toml(clips, DatasetChoice(32, 32, 9), images=False, videos=True))
    s = ServerSettings(output_dir=str(base / "out"), state_dir=str(base / "state"), lora_dir=str(base / "loras"),
                       checkpoint_dir=str(base / "ckpt"), datasets_dir=str(base / "datasets"), max_frames=81,
                       max_pixels=832 * 480, max_train_steps=100)
    return AppState(s, engine_factory=lambda: None)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=train_requests)
def test_any_training_request_is_accepted_within_bounds_or_refused_by_field(train_state, data):
    from wan.app.security import train_roots
    s = train_state.settings
    try:
        prepared = accept_train_request(data, train_state)
    except TrainRequestError as e:
        assert e.field in TRAIN_FIELDS or e.field.startswith("sample_prompts line "), f"{e.field!r}: {e}"
        assert len(str(e)) < 3000
        return
    train = prepared["train"]
    assert set(prepared) == set(TRAIN_KEYS) and not set(train) & set(SERVER_FLAGS)
    assert train["output_dir"] == str(run_folder(s, train["output_name"]))
    assert is_inside(train["output_dir"], Path(s.output_dir).resolve() / "train")
    assert any(is_inside(train["dataset_config"], root) for root in train_roots(s))
    if train.get("resume") is not None:
        assert is_inside(train["resume"], train["output_dir"])
    if not train.get("max_train_epochs"):
        assert train.get("max_train_steps", 1600) <= s.max_train_steps
    assert 1 <= train.get("network_dim", 4) <= 1024
