"""The first ten minutes (issue 13), without a browser: each trap a new user fell into, as a test
that failed on the code before the fix. The browser tour (``test_app_tour.py``) walks them all."""

import pytest

from tests.test_app_form import BASE
from wan.app.form import form_to_requests
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.app.ui_generate import (DEFAULT_PROFILE, BadUpload, collect, form_for_model, plan_text, remember,
                                 remembered_form, task_of, upload_problem)


@pytest.fixture
def state(tmp_path):
    return AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s")),
                    engine_factory=lambda: None)


def test_an_input_the_task_does_not_take_is_neither_sent_nor_checked(state, tmp_path):
    """A start image left from i2v (hidden once t2v is chosen) used to block the t2v job with
    "image: '/…/uploads/….png' is not allowed; task t2v takes: no input files"."""
    left = tmp_path / "gone.png"  # not even a file: it must not be looked at
    request = form_to_requests({**BASE, "task": "t2v", "image": str(left), "video": str(left)})[0]
    assert request.image is None and request.video is None
    values = {**BASE, "task": "t2v", "image": str(left), "control_video": BadUpload("Control video: x")}
    assert [r.task for r in collect(state, list(values), tuple(values.values()))] == ["t2v"]
    vace = form_to_requests({**BASE, "model": "test-tiny-vace", "task": "vace", "video": str(left),
                             "ref_images": [str(left)]})[0]
    assert vace.video is None and vace.ref_images == [str(left)]  # v2v's video dropped, VACE's references kept


def test_a_missing_required_input_is_named_by_its_label(state):
    values = {**BASE, "model": "test-tiny-i2v", "task": "i2v"}
    with pytest.raises(ValueError) as e:
        collect(state, list(values), tuple(values.values()))
    assert str(e.value) == "Start image: task i2v needs an input file; upload one"


@pytest.mark.parametrize("key, name, content, expected", [
    ("image", "notimage.png", b"this is text", "Start image: notimage.png is not a readable image (PNG, JPEG, WebP…)"),
    ("end_image", "empty.png", b"", "End image: empty.png is empty (0 bytes)"),
    ("video", "clip.mp4", b"\x00\x00\x00\x18ftypmp42 nothing else", None),
    ("ref_images", "ref.jpg", b"GIF89a-not-really", "Reference images: ref.jpg is not a readable image (PNG, JPEG, "
                                                    "WebP…)"),
])
def test_uploads_are_checked_when_they_arrive_in_the_users_words(tmp_path, key, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    problem = upload_problem(key, [str(path)] if key == "ref_images" else str(path))
    if expected is None:  # a video: the reason comes from its header
        assert problem.startswith("Input video: clip.mp4 ") and ("no video stream" in problem
                                                                   or "not a readable video" in problem)
    else:
        assert problem == expected


def test_an_audio_file_renamed_mp4_has_no_video_stream(tmp_path):
    import av
    import numpy as np
    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("aac", rate=16000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in [*s.encode(frame), *s.encode(None)]:
            c.mux(packet)
    assert upload_problem("video", str(path)) == "Input video: clip.mp4 has no video stream"


def test_a_stale_task_from_the_previous_model_is_not_taken():
    """A model switch changes the task list while the browser may still send the old task."""
    assert task_of("test-tiny-i2v", "t2v") == "i2v" and task_of("test-tiny-t2v", "t2i") == "t2i"
    assert task_of("no-such-model", "t2v") is None


def test_the_form_is_remembered_per_model_and_restored_only_where_it_still_fits(state):
    keys = ["task", "prompt", "frames", "sampler", "resolution", "teacache"]
    memory = remember({}, "test-tiny-t2v", keys, ["t2i", "a fox", 1, "unipc", "96x64", "on"])
    memory = remember(memory, "test-tiny-i2v", keys, ["i2v", "a cat", 9, "unipc", "64x64", "profile"])
    assert remembered_form("test-tiny-t2v", memory) == dict(zip(keys, ["t2i", "a fox", 1, "unipc", "96x64", "on"]))
    assert memory["model"] == "test-tiny-i2v"
    tampered = {"forms": {"test-tiny-t2v": {"task": "vace", "prompt": ["x"], "frames": True, "sampler": "euler_a",
                                            "resolution": "1x1", "teacache": "maybe", "steps": 3}}}
    assert remembered_form("test-tiny-t2v", tampered) == {"steps": 3}
    updates = form_for_model(state, "test-tiny-t2v", None, memory)
    assert updates["task"]["value"] == "t2i" and updates["prompt"]["value"] == "a fox"
    assert updates["frames"]["value"] == 1 and not updates["image"]["visible"]


def test_the_default_profile_is_auto_and_the_plan_starts_with_a_verdict():
    assert DEFAULT_PROFILE == "auto"
    text = plan_text(None, "wan2.1-t2v-1.3B", "auto")
    assert text.splitlines()[0].startswith("✓ **Fits** on this machine with auto -> ")
    assert "```" not in text  # lines that wrap, not a block that scrolls sideways
    worst = plan_text(None, "wan2.1-t2v-14B", "1")
    first = worst.splitlines()[0]
    assert first.startswith("✓ **Fits**") or first.startswith("✗ **Does not fit** with 1 HighRAM_HighVRAM")


def test_step_savers_explain_themselves_in_the_pages_words():
    from wan.app.form import PICKER_CHOICES, SAVER_NUMBERS
    from wan.app.ui_generate import SAVER_INFO
    assert set(SAVER_INFO) >= set(PICKER_CHOICES) | set(SAVER_NUMBERS) | {"slg_layers"}
    assert all("." not in line.split()[0] and "step_savers" not in line for line in SAVER_INFO.values())
    assert all(len(line) <= 110 for line in SAVER_INFO.values())



def test_messages_keep_backslashes_and_underscores_on_the_page():
    """A preset-name error lost its backslash ("no path separators ('/' or '')") once rendered as
    Markdown; file names with underscores turned italic."""
    from wan.app.words import literal
    from wan.lora.library import PRESET_NAME_RULE
    assert "'\\'" in PRESET_NAME_RULE  # the rule names the backslash
    text = literal(f"{PRESET_NAME_RULE}; my_lora_v2 *x*")
    assert r"'\\'" in text  # escaped: Markdown shows one backslash
    assert r"my\_lora\_v2 \*x\*" in text
    assert literal("line one\n# two\n- three") == "line one  \n\\# two  \n\\- three"


def test_the_expert_switch_says_what_its_number_is():
    import inspect

    from wan.app import ui_generate
    source = inspect.getsource(ui_generate.render)
    assert "fraction of 1000" not in source and 'label="Expert switch (noise level 0-1)"' in source
