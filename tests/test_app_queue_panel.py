"""The queue panel, function level (the user study's points; the browser test is
``tests/test_app_browser_queue.py``):

1. a failed job's whole error, line breaks kept, in the picked job's details and by the Add button;
   the queue table stays one short line a row;
2. "Abort running", "Cancel selected" and "Clear finished" do what they say, and a removed or
   cleared job's video stays in its session's gallery (across a restart too);
3. the status marks use only characters that DejaVu Sans has (Debian's Chromium has no emoji font);
4. the job picker never gets a value that is not among its choices, and a stale one is no error;
5. no gradio progress timer on the panel: every queue button and the page's timer are quiet.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from wan.app import server, ui_gallery, ui_queue
from wan.app.jobqueue import JobQueue
from wan.app.jobs import MAX_ERROR_CHARS, RunOutcome, error_message
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.engine.request import GenerationRequest
from wan.loading.files import CheckpointError

TIMEOUT = 10.0
ERROR_LINES = ["the transformer file cannot be used: " + "x" * 80,
               "  missing key blocks.0.self_attn.q.weight",
               "  missing key blocks.1.self_attn.q.weight"]
DEJAVU_SANS_HAS = "▶✓✗■…·"  # checked against the font itself below, where fontconfig is installed


class FakeEngine:
    """Stands for the engine: a "[fail]" prompt fails with a three-line error, a "[hold]" prompt
    runs until ``gate`` is set or it is cancelled, any other writes one video to the output folder."""

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def generate(self, request, progress=None, cancel=None, **kwargs):
        from wan.engine.loop import Cancelled
        if "[fail]" in request.prompt:
            raise CheckpointError("\n".join(ERROR_LINES))
        if "[hold]" in request.prompt:
            self.started.set()
            while not self.gate.wait(0.005):
                if cancel is not None and cancel.cancelled:
                    raise Cancelled("cancelled")
        path = Path(request.output_dir) / f"{uuid.uuid4().hex}.mp4"
        path.write_bytes(b"mp4")
        return SimpleNamespace(files=[str(path)], notices=["a notice about [this] job"])


def make_state(tmp_path, engine=None, **settings) -> AppState:
    settings = ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"), **settings)
    return AppState(settings, engine_factory=lambda: engine)


def req(prompt: str) -> dict:
    return GenerationRequest(model="test-tiny-t2v", prompt=prompt, steps=2).to_dict()


@pytest.fixture
def running(tmp_path):
    """A local server whose "[hold]" job runs, with two jobs waiting behind it."""
    engine = FakeEngine()
    state = make_state(tmp_path, engine)
    state.queue.start()
    ids = SimpleNamespace(running=state.queue.add(req("slow [hold]"), "me").id)
    assert engine.started.wait(TIMEOUT)
    ids.waiting = state.queue.add(req("waiting"), "me").id
    ids.failing = state.queue.add(req("broken [fail]"), "me").id
    yield state, engine, ids
    engine.gate.set()
    state.queue.stop(TIMEOUT, cancel_running=True)


def as_markdown(lines: list[str]) -> str:
    """How the page writes an error's lines: a hard line break after each, indentation as no-break
    spaces (a Markdown box would drop it), Markdown's own characters escaped (of which
    ``ERROR_LINES`` hold only "." and "_")."""
    escaped = [re.sub(r"([._])", r"\\\1", line) for line in lines]
    return "  \n".join("\u00a0" * (len(line) - len(line.lstrip(" "))) + line.lstrip(" ") for line in escaped)


def run_all(state, engine, *prompts, session="me") -> list[str]:
    ids = [state.queue.add(req(p), session).id for p in prompts]
    engine.gate.set()
    state.queue.start()
    assert state.queue.wait_idle(TIMEOUT)
    return ids


# -- 1. errors nobody could read ------------------------------------------------------------------

def test_a_job_error_keeps_its_line_breaks_and_stays_bounded():
    assert error_message(CheckpointError("first\r\n  second\t!   \n\n\n\nthird\n")) == "first\n  second    !\n\nthird"
    assert error_message(RuntimeError("boom\nline")) == "RuntimeError: boom\nline"
    long = error_message(CheckpointError("y" * 100_000))
    assert MAX_ERROR_CHARS >= 4000 and len(long) == MAX_ERROR_CHARS and long.endswith("…")


def test_the_table_shows_one_short_line_and_the_details_the_whole_error(tmp_path):
    engine = FakeEngine()
    state = make_state(tmp_path, engine)
    failed, done = run_all(state, engine, "broken [fail]", "fine")
    status, _, table, _, _ = ui_queue.views(state, "me", None)
    rows = {row[1]: row for row in table}
    cells = [str(c) for row in table for c in row]
    assert all("\n" not in c and len(c) <= ui_queue.MAX_TABLE_CHARS + 2 for c in cells), cells
    assert rows[failed][2] == "✗ failed" and rows[failed][4].startswith(ERROR_LINES[0][:40])
    assert rows[failed][4].endswith("…") and "missing key" not in rows[failed][4]
    detail = ui_queue.detail_text(state, "me", failed)
    assert as_markdown(ERROR_LINES) in detail and "✗ failed" in detail  # whole, line by line
    assert all(word in detail for word in ("queued 20", "started 20", "finished 20", "broken \\[fail\\]"))
    done_detail = ui_queue.detail_text(state, "me", done)
    name = Path(state.queue.get(done).files[0]).name
    assert "✓ done" in done_detail and name.replace(".", "\\.") in done_detail
    assert "a notice about \\[this\\] job" in done_detail and str(state.output_dir) not in done_detail
    assert ui_queue.detail_text(state, "me", None) == ui_queue.PICK_HINT
    assert ui_queue.detail_text(state, "me", "gone") == ui_queue.PICK_HINT
    # the box is not sent again while it shows the same (a person may be selecting the error)
    assert ui_queue.detail_update(state, "me", failed, detail) == {"__type__": "update"}
    assert ui_queue.detail_update(state, "me", failed, "old") == detail


def test_another_sessions_error_and_files_stay_hidden_on_a_shared_server(tmp_path):
    engine = FakeEngine()
    state = make_state(tmp_path, engine, listen=True)
    failed, done = run_all(state, engine, "alice's secret [fail]", "alice's video", session="alice")
    for job in (failed, done):
        detail = ui_queue.detail_text(state, "bob", job)
        assert "another session" in detail and "secret" not in detail and "missing key" not in detail
        assert ".mp4" not in detail and "notice" not in detail
        assert ui_queue.job_outcome_text(state, job, "bob") is None
    assert "missing key" in ui_queue.detail_text(state, "alice", failed)


def test_the_add_message_says_when_the_job_it_named_failed(running):
    state, engine, ids = running
    assert ui_queue.job_outcome_text(state, ids.failing, "me") is None  # still waiting
    queued = f"Queued 1 job: {ids.failing}"
    values = server.refresh(state, "me", None, False, None, None, None, queued)
    assert values[-1] == {"__type__": "update"}
    state.queue.abort(ids.running)
    assert state.queue.wait_finished(ids.failing, TIMEOUT).status == "failed"
    text = ui_queue.job_outcome_text(state, ids.failing, "me")
    assert text == f"⚠️ Job {ids.failing} failed:  \n{as_markdown(ERROR_LINES)}"
    values = server.refresh(state, "me", None, False, None, None, None, queued)
    assert values[-1] == text
    assert server.refresh(state, "me", None, False, None, None, None, text)[-1] == {"__type__": "update"}  # once
    for other in (f"Queued 1 job: {ids.waiting}", "", None, f"Queued 1 job: {ids.failing}0"):
        assert server.refresh(state, "me", None, False, None, None, None, other)[-1] == {"__type__": "update"}
    assert server.refresh(state, "someone else", None, False, None, None, None, queued)[-1] == {"__type__": "update"}
    assert ui_queue.job_outcome_text(state, ids.running, "me") == f"Job {ids.running} was cancelled."


def test_the_details_and_the_message_never_raise():
    broken = SimpleNamespace(queue=SimpleNamespace(jobs=lambda: [object()]), shared=False)
    assert ui_queue.detail_text(broken, "me", "x").startswith("⚠️")
    assert ui_queue.failure_notice(broken, "me", "Queued 1 job: x") is None
    assert ui_queue.job_outcome_text(broken, "x", "me") is None
    odd = SimpleNamespace(id="odd", session="me", label="\ud800" * 500, status="failed", created=float("nan"),
                          started="soon", finished=10**30, error="a\x00b\n" * 5000, notices=[1, "n"], files=None,
                          progress=None, request={})
    state = SimpleNamespace(queue=SimpleNamespace(jobs=lambda: [odd]), shared=False)
    detail = ui_queue.detail_text(state, "me", "odd")
    assert "\ud800" not in detail and "\x00" not in detail and len(detail) < 12_000
    assert ui_queue.failure_notice(state, "me", "Queued 1 job: odd").startswith("⚠️ Job odd failed:")


# -- 2. the buttons ---------------------------------------------------------------------------------

def test_abort_running_stops_the_running_job_whatever_is_picked(running):
    state, engine, ids = running
    assert ui_queue.perform(state, "abort", ids.waiting, "me") == f"Aborting {ids.running}..."
    assert state.queue.wait_finished(ids.running, TIMEOUT).status == "cancelled"
    assert state.queue.get(ids.waiting).status in ("queued", "running", "done")  # the picked one goes on


def test_cancel_selected_cancels_the_picked_waiting_job_only(running):
    state, engine, ids = running
    message = ui_queue.perform(state, "cancel", ids.running, "me")
    assert message.startswith("⚠️") and "Abort running" in message
    assert state.queue.get(ids.running).status == "running"
    assert ui_queue.perform(state, "cancel", ids.waiting, "me") == f"Cancelled {ids.waiting}."
    assert state.queue.get(ids.waiting).status == "cancelled" and state.queue.get(ids.running).status == "running"
    assert ui_queue.perform(state, "cancel", None, "me").startswith("⚠️ pick a job first")
    assert "cancelled" in ui_queue.perform(state, "cancel", ids.waiting, "me")  # not again


def test_on_a_shared_server_abort_and_cancel_touch_only_ones_own_jobs(tmp_path):
    engine = FakeEngine()
    state = make_state(tmp_path, engine, listen=True)
    state.queue.start()
    running = state.queue.add(req("alice [hold]"), "alice").id
    assert engine.started.wait(TIMEOUT)
    waiting, bobs = state.queue.add(req("alice 2"), "alice").id, state.queue.add(req("bob"), "bob").id
    try:
        for what, job in (("abort", bobs), ("cancel", waiting), ("clear", None)):
            message = ui_queue.perform(state, what, job, "bob")
            assert what == "clear" or "another session's job" in message, message
        assert [j.status for j in state.queue.jobs()] == ["running", "queued", "queued"]
        assert ui_queue.perform(state, "cancel", bobs, "bob") == f"Cancelled {bobs}."
        assert ui_queue.perform(state, "abort", None, "alice") == f"Aborting {running}..."
        assert state.queue.wait_finished(running, TIMEOUT).status == "cancelled"
    finally:
        engine.gate.set()
        state.queue.stop(TIMEOUT, cancel_running=True)


def test_clear_finished_and_remove_keep_the_videos_in_the_sessions_gallery(tmp_path):
    engine = FakeEngine()
    state = make_state(tmp_path, engine)
    first, second, failed = run_all(state, engine, "one", "two", "three [fail]")
    others = run_all(state, engine, "someone else's", session="other")
    videos = [state.queue.get(j).files[0] for j in (second, first)]  # newest first
    for age, video in enumerate(videos):  # a second apart, whatever the file system's clock
        os.utime(video, (1e9 - age, 1e9 - age))
    assert ui_gallery.items(state, "me", False) == videos
    assert ui_queue.perform(state, "remove", second, "me") == f"Removed {second}."
    assert ui_gallery.items(state, "me", False) == videos
    message = ui_queue.perform(state, "clear", None, "me")
    assert message.startswith("Cleared 2 finished job(s)") and "gallery" in message
    assert [j.id for j in state.queue.jobs()] == others  # the other session's job stays listed
    assert ui_gallery.items(state, "me", False) == videos and state.queue.jobs(session="me") == []
    assert ui_queue.perform(state, "clear", None, "me").startswith("None of your jobs")
    assert ui_queue.perform(state, "clear", None, "").startswith("⚠️")  # no session: nothing is cleared
    assert state.queue.stop(TIMEOUT)
    restarted = make_state(tmp_path)  # kept in the queue file
    assert ui_gallery.items(restarted, "me", False) == videos and ui_gallery.items(restarted, "x", False) == []
    assert len(ui_gallery.items(restarted, "other", False)) == 1


def test_a_job_pushed_out_of_the_history_keeps_its_video_too(tmp_path):
    def runner(job, progress, cancel):
        path = tmp_path / f"{job.request['prompt']}.mp4"
        path.write_bytes(b"mp4")
        return RunOutcome([str(path)])
    q = JobQueue(tmp_path / "q.json", runner, max_history=1)
    ids = [q.add({"prompt": str(i)}, "me").id for i in range(3)]
    q.start()
    assert q.wait_idle(TIMEOUT) and q.stop(TIMEOUT)
    assert [j.id for j in q.jobs()] == ids[2:]
    assert q.kept_outputs("me") == [str(tmp_path / "1.mp4"), str(tmp_path / "0.mp4")]
    data = json.loads(q.path.read_text())
    assert data["kept_outputs"] == {"me": [str(tmp_path / "1.mp4"), str(tmp_path / "0.mp4")]}
    data["kept_outputs"] = {"me": ["ok.mp4", 5, None], "bad": "not a list", "x" * 1000: ["long.mp4"]}
    q.path.write_text(json.dumps(data))
    again = JobQueue(q.path, runner)  # what cannot be read is left out; the queue loads
    assert again.kept_outputs("me") == ["ok.mp4"] and again.kept_outputs("bad") == [] and len(again.jobs()) == 1


# -- 3. status marks that render ------------------------------------------------------------------

def test_status_marks_use_only_characters_dejavu_sans_has(tmp_path):
    for mark in ui_queue.STATUS_MARK.values():
        assert all(c.isascii() or c in DEJAVU_SANS_HAS for c in mark), mark
    assert set(ui_queue.MARK_SYMBOLS) <= set(DEJAVU_SANS_HAS)
    jobs = [SimpleNamespace(id=s, session="me", label="l", status=s, error=None, progress=None, request={},
                            started=None) for s in ui_queue.STATUS_MARK]
    marks = [row[2] for row in ui_queue.table(jobs, "me")]
    assert marks == ["queued", "▶ running", "✓ done", "✗ failed", "■ cancelled"]


def test_the_allowed_symbols_are_in_the_dejavu_sans_font_itself():
    if not shutil.which("fc-list") or "DejaVu Sans" not in subprocess.run(
            ["fc-list", ":family=DejaVu Sans", "family"], capture_output=True, text=True).stdout:
        pytest.skip("fontconfig or DejaVu Sans is not installed here: the allow-list is checked where they are")
    for c in DEJAVU_SANS_HAS:
        found = subprocess.run(["fc-list", f":family=DejaVu Sans:charset={ord(c):x}", "family"],
                               capture_output=True, text=True).stdout
        assert "DejaVu Sans" in found, f"U+{ord(c):04X} {c} is not in DejaVu Sans"
    assert not subprocess.run(["fc-list", ":family=DejaVu Sans:charset=23f3", "family"],  # the old "⏳"
                              capture_output=True, text=True).stdout.strip()


# -- 4. the job picker ----------------------------------------------------------------------------

CHOICES = [["a · one", "a"], ["b · two", "b"]]


@pytest.mark.parametrize("picked", [None, "", "a", "b", "gone", 5])
@pytest.mark.parametrize("shown", [None, CHOICES, [["gone · x", "gone"], *CHOICES]])
def test_the_picker_never_gets_a_value_outside_its_choices(picked, shown):
    update = ui_queue.pick_update(picked, CHOICES, shown)
    if "choices" in update:  # the choices change: a value that is not among them is cleared at once
        assert update.get("value", picked) in (None, "a", "b") and ("value" in update) == (picked not in ("a", "b"))
    else:
        assert update.get("value", "unchanged") in (None, "unchanged")
        assert ("value" in update) == (picked not in (None, "", "a", "b"))


def test_removing_the_picked_job_clears_the_picker_in_the_same_update(running):
    state, engine, ids = running
    _, _, _, _, shown = ui_queue.views(state, "me", None)
    message, _, _, _, pick, choices, detail = _act(state, "remove", ids.waiting, shown)
    assert message == f"Removed {ids.waiting}." and pick["value"] is None
    assert ids.waiting not in [v for _, v in pick["choices"]] and detail == ui_queue.PICK_HINT
    # a refresh that still sends the removed job (sent before the Remove's answer came) is no error
    values = server.refresh(state, "me", ids.waiting, False, None, choices, detail, "")
    assert values[3] == {"__type__": "update", "value": None} and values[7] == {"__type__": "update"}


def _act(state, what, job_id, shown):
    """What one click of a queue button sends (the handler that ``ui_queue.listen`` wires)."""
    demo = server.build_app(state)
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == BUTTONS[what])
    fn = next(f for f in demo.fns.values() if any(t[0] == button._id for t in f.targets))
    return fn.fn(job_id, "me", shown, "")


BUTTONS = {"up": "job-up", "down": "job-down", "remove": "job-remove", "cancel": "cancel-selected",
           "clear": "clear-finished", "abort": "abort"}


def test_the_picker_takes_a_stale_value_without_an_error(tmp_path):
    demo = server.build_app(make_state(tmp_path))
    pick = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "job-pick")
    assert pick.allow_custom_value and pick.preprocess("a job removed since") == "a job removed since"


# -- 5. no progress timer on the panel ------------------------------------------------------------

def test_every_queue_button_and_the_timer_are_quiet(tmp_path):
    demo = server.build_app(make_state(tmp_path))
    config = demo.get_config_file()
    ids = {c["props"].get("elem_id"): c["id"] for c in config["components"]}
    timer = next(c["id"] for c in config["components"] if c["type"] == "timer")
    wanted = {ids[e]: e for e in BUTTONS.values()} | {ids["job-pick"]: "job-pick", timer: "timer"}
    found = {}
    for dep in config["dependencies"]:
        for target, _ in dep["targets"]:
            if target in wanted:
                found[wanted[target]] = (dep["show_progress"], dep["show_progress_on"])
    assert found == {name: ("hidden", []) for name in wanted.values()}
    labels = {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) in BUTTONS.values()}
    assert labels == {"job-up": "Move up", "job-down": "Move down", "job-remove": "Remove",
                      "cancel-selected": "Cancel selected", "clear-finished": "Clear finished",
                      "abort": "Abort running"}
