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
    stem = render_name(resolved.name_template, now=datetime(2026, 1, 1), seed=resolved.seed,
                       prompt=resolved.prompt, model=resolved.model, task=resolved.task)
    assert stem and "/" not in stem and "\\" not in stem and stem not in (".", "..")
    assert (Path(resolved.output_dir) / f"{stem}.mp4").resolve().parent == Path(resolved.output_dir).resolve()
