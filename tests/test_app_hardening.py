"""The probe's three high-severity findings, replayed through the real server and ``gradio_client``
as a client would send them (issue 11, items 1-3): each is refused at submit with a message
naming the field, and the server, its queue and its page go on serving."""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from tests.app_harness import StudioServer, api_client, free_port
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    ckpts = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(ckpts)
    return ckpts


@pytest.fixture(scope="module")
def studio(tmp_path_factory, checkpoints):
    server = StudioServer(tmp_path_factory.mktemp("studio"), checkpoints).start()
    yield server
    server.stop()


def refused(c, text: str) -> str:
    """The message of a refused /queue_job call."""
    with pytest.raises(Exception) as e:
        c.predict(text, api_name="/queue_job")
    return str(e.value)


def page_ok(server) -> bool:
    with urllib.request.urlopen(server.url, timeout=30) as r:
        return r.status == 200


def test_a_name_template_cannot_write_outside_the_output_folder(studio, tmp_path):
    """The probe: a first job creates <outputs>/tmp/x, a second pads '/' out of a format spec to
    write /tmp/x/PWNED_<seed>.mp4. Format specs are refused; nothing is written anywhere."""
    c = api_client(studio)
    target = Path("/tmp/x")
    before = set(target.glob("PWNED_*")) if target.is_dir() else set()
    template = "{prompt:/>1.0}tmp{prompt:/>1.0}x{prompt:/>1.0}PWNED_{seed}"
    msg = refused(c, json.dumps({"model": "test-tiny-t2v", "prompt": "a", "steps": 1, "seed": 3,
                                 "output_dir": str(studio.output_dir / "tmp" / "x"), "name_template": template}))
    assert "name_template" in msg and "written plain" in msg
    msg = refused(c, json.dumps({"model": "test-tiny-t2v", "prompt": "a", "name_template": "{seed:>300000}"}))
    assert "name_template" in msg
    after = set(target.glob("PWNED_*")) if target.is_dir() else set()
    assert after == before and not list(studio.output_dir.rglob("PWNED_*"))


def test_a_width_alone_cannot_pass_the_pixel_limit(studio):
    """{"width": 1000000} without a height used to run for minutes at 3.5 GB; the limit is now
    compared on the resolved size (the model's default height filled in)."""
    c = api_client(studio)
    msg = refused(c, json.dumps({"model": "test-tiny-t2v", "prompt": "a", "width": 1_000_000}))
    assert "width" in msg and "--max_pixels" in msg and "1000000x64" in msg
    assert page_ok(studio)  # the server still answers


def test_a_lone_surrogate_is_refused_and_the_page_lives_on(checkpoints, tmp_path):
    """A prompt with a lone surrogate used to break the page for every session, across restarts.
    It is refused at submit, naming the field; the page and the queue keep working, after a
    restart too."""
    studio = StudioServer(tmp_path / "studio", checkpoints).start()
    try:
        c = api_client(studio)
        msg = refused(c, '{"model": "test-tiny-t2v", "prompt": "x\\ud800y"}')
        assert "prompt" in msg and "surrogate" in msg
        assert page_ok(studio)
        good = c.predict(json.dumps({"model": "test-tiny-t2v", "prompt": "fine", "steps": 1}), api_name="/queue_job")
        assert isinstance(good, str) and good
    finally:
        studio.stop()
    again = StudioServer(studio.base, studio.checkpoints, port=free_port()).start()
    try:
        assert page_ok(again)
        queue = json.loads((again.state_dir / "queue.json").read_text())
        assert good in {j["id"] for j in queue["jobs"]}
        assert all("\\ud800" not in json.dumps(j["request"]) for j in queue["jobs"])
    finally:
        again.stop()


def _add_args(c, **by_label):
    """The /add endpoint's arguments: each parameter's default, with some set by their labels."""
    params = c.view_api(return_format="dict", print_info=False)["named_endpoints"]["/add"]["parameters"]
    return [by_label.get(p.get("label"), p.get("parameter_default")) for p in params]


def test_upload_refusals_reach_api_clients_in_the_apps_words(studio, tmp_path):
    """A bad upload through the page's own endpoint used to reach a client as gradio's generic
    'upstream app raised an exception'; it now names the field's label and the file."""
    from gradio_client import handle_file
    c = api_client(studio)
    (tmp_path / "notimage.png").write_bytes(b"this is text, not a PNG")
    result = c.predict(*_add_args(c, **{"Start image": handle_file(str(tmp_path / "notimage.png")),
                                          "Task": "i2v"}), api_name="/add")
    assert result[0] == "⚠️ Start image: notimage.png is not a readable image (PNG, JPEG, WebP…)"


def test_a_bad_input_video_is_named_by_its_label_and_file_name(tmp_path):
    """The form's Add (``collect``, what /add runs): a non-video renamed .mp4 is refused when added,
    not queued to fail in the worker, in the words the user sees."""
    from test_app_form import BASE
    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    from wan.app.ui_generate import collect
    state = AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s")),
                     engine_factory=lambda: None)
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42 but nothing else")
    values = {**BASE, "task": "v2v", "video": str(fake)}
    with pytest.raises(ValueError) as e:
        collect(state, list(values), tuple(values.values()))
    assert str(e.value).startswith("Input video: clip.mp4 is not usable: a readable video file")
