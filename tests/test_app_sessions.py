"""Several people on one server: on a shared server (--listen, --share, a non-local --server_name)
a session acts only on its own jobs, sees no other session's prompts and may have only so many
jobs waiting; whatever a job holds, the page still loads and refreshes; old uploads are pruned,
never one a waiting job needs. Function level, plus one run of the real server."""

from __future__ import annotations

import json
import os
import threading
import time
from types import SimpleNamespace

import numpy as np
import orjson
import pytest

from wan.app.jobqueue import FILE_VERSION
from wan.app.settings import ServerSettings
from wan.app.state import AppState, is_shared
from wan.engine.request import GenerationRequest

TIMEOUT = 10.0
SECRET = "alice's secret prompt"


class HeldEngine:
    """Stands for the engine: each job runs until ``gate`` is set or it is cancelled."""

    def __init__(self):
        self.gate, self.started = threading.Event(), threading.Event()

    def generate(self, request, progress=None, cancel=None):
        from wan.engine.loop import Cancelled
        self.started.set()
        while not self.gate.wait(0.005):
            if cancel is not None and cancel.cancelled:
                raise Cancelled("cancelled")
        return SimpleNamespace(files=[], notices=[])


def make_state(tmp_path, engine=None, **settings) -> AppState:
    settings = ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"), **settings)
    return AppState(settings, engine_factory=lambda: engine)


def req(prompt: str) -> dict:
    return GenerationRequest(model="test-tiny-t2v", prompt=prompt, steps=2).to_dict()


@pytest.fixture
def shared(tmp_path):
    """A shared server with alice's job running, then alice's and bob's jobs waiting."""
    engine = HeldEngine()
    state = make_state(tmp_path, engine, listen=True)
    state.queue.start()
    ids = SimpleNamespace(running=state.queue.add(req(SECRET), "alice").id)
    assert engine.started.wait(TIMEOUT)
    ids.alice = state.queue.add(req(SECRET + " 2"), "alice").id
    ids.bob = state.queue.add(req("bob's prompt"), "bob").id
    yield state, ids
    engine.gate.set()
    state.queue.stop(TIMEOUT, cancel_running=True)


def page_text(values) -> str:
    """Everything a page update sends, as the JSON gradio sends (fails as gradio would: orjson
    refuses a lone surrogate)."""
    return orjson.dumps(values, option=orjson.OPT_SERIALIZE_NUMPY).decode()


def test_a_server_is_shared_when_others_can_reach_it(tmp_path):
    assert not is_shared(ServerSettings())
    assert not is_shared(ServerSettings(server_name="localhost"))
    for flags in (dict(listen=True), dict(share=True), dict(server_name="10.0.0.2")):
        assert is_shared(ServerSettings(**flags)), flags
    assert make_state(tmp_path / "a", listen=True, max_queue_per_session=3).queue.max_per_session == 3
    assert make_state(tmp_path / "b").queue.max_per_session is None  # local single-user use as it was


def test_on_a_shared_server_a_session_acts_only_on_its_own_jobs(shared):
    from wan.app.ui_queue import perform
    state, ids = shared
    for what, job_id, named in (("remove", ids.alice, ids.alice), ("up", ids.alice, ids.alice),
                                ("cancel", ids.alice, ids.alice), ("abort", None, ids.running),
                                ("abort", ids.alice, ids.running),  # "Abort running": the running job, whatever is picked
                                ("abort", ids.running, ids.running)):
        msg = perform(state, what, job_id, "bob")
        assert msg.startswith("⚠️") and f"job {named} is another session's job" in msg, (what, msg)
    for session in ("api", "", None):  # a browser cannot claim the API's jobs, nor jobs of no session
        assert "no session" in perform(state, "remove", ids.alice, session)
    assert [(j.id, j.status) for j in state.queue.jobs()] == [
        (ids.running, "running"), (ids.alice, "queued"), (ids.bob, "queued")]
    assert perform(state, "up", ids.bob, "bob") == f"Moved {ids.bob} up."
    assert perform(state, "remove", ids.alice, "alice") == f"Removed {ids.alice}."
    assert perform(state, "abort", None, "alice") == f"Aborting {ids.running}..."
    assert state.queue.wait_finished(ids.running, TIMEOUT).status == "cancelled"


def test_on_a_local_server_any_tab_manages_every_job(tmp_path):
    from wan.app.ui_queue import perform
    state = make_state(tmp_path)
    a, b = state.queue.add(req("one"), "alice").id, state.queue.add(req("two"), "alice").id
    assert perform(state, "down", a, "bob") == f"Moved {a} down."
    assert perform(state, "remove", a, "bob") == f"Removed {a}."
    assert perform(state, "cancel", b, "bob") == f"Cancelled {b}."  # a waiting job: "Cancel selected"


def test_other_sessions_prompts_are_hidden_on_a_shared_server(shared):
    from wan.app import ui_queue
    state, ids = shared
    state.previews[ids.running] = np.zeros((4, 4, 3), np.uint8)  # alice's latent shows what she asked for
    status, preview, table, pick, choices = ui_queue.views(state, "bob", None)
    assert SECRET not in page_text([status, table, pick, choices]) and preview is None
    assert "another session's job" in status
    labels = {row[1]: row[3] for row in table}
    assert labels == {ids.running: "another session's job", ids.alice: "another session's job",
                      ids.bob: "test-tiny-t2v: bob's prompt"}
    assert dict((v, t) for t, v in choices)[ids.alice] == f"{ids.alice} · another session's job"
    status, preview, table, _, _ = ui_queue.views(state, "alice", None)  # alice sees her own
    assert SECRET in status and preview is not None and f"test-tiny-t2v: {SECRET} 2" in [row[3] for row in table]


def test_no_job_breaks_the_page_not_even_after_a_restart(tmp_path):
    """Odd types, missing keys, lone surrogates, a huge label, files outside the output folder:
    the queue file is saved and read back, and the page still loads and refreshes for everyone."""
    from wan.app import server, ui_gallery
    state = make_state(tmp_path)
    surrogate = state.queue.add({"model": "test-tiny-t2v", "prompt": "snow \ud83e fox"}, "alice").id
    state.queue.add({}, "alice")
    state.queue.add({"prompt": ["not", {"a": "string"}], "task": 5}, "alice")
    inside = state.output_dir / "ok.mp4"
    inside.write_bytes(b"mp4")
    odd = [{"id": "odd1", "session": "alice", "request": {"prompt": "x\udc80y" * 10}, "label": "t2v: x\ud800y",
            "status": "failed", "created": 2.0, "error": "prompt: 'x\ud800y' is not allowed\n" * 1000},
           {"id": "odd2", "session": "alice", "request": {}, "label": "L" * 1_000_000, "status": "done",
            "created": 3.0, "finished": float("nan"),
            "files": ["/etc/hostname", str(tmp_path / "elsewhere.mp4"), "x\ud800.mp4", str(inside)]}]
    (tmp_path / "elsewhere.mp4").write_bytes(b"mp4")
    data = json.loads(state.queue.path.read_text())
    data["jobs"] += odd
    state.queue.path.write_text(json.dumps({"version": FILE_VERSION, "jobs": data["jobs"]}))
    state = make_state(tmp_path)  # a restart reads it all back
    assert len(state.queue.jobs()) == 5 and state.queue.get(surrogate).request["prompt"] == "snow \ud83e fox"
    for session, shown in (("alice", None), ("bob", None), ("alice", [["stale", "x"]])):
        values = server.refresh(state, session, "odd1", False, None, shown)
        sent = page_text(values)
        assert "\\ud83e" not in sent and len(sent) < 20_000
        status, preview, table, pick, choices, gallery, items, detail, message = values
        assert len(table) == 5 and items == ([str(inside)] if session == "alice" else [])  # what gradio may serve
        assert "snow \ufffd fox" in sent and "(limit" not in sent
    assert ui_gallery.items(state, "alice", True) == [str(inside)]


def test_uploads_are_pruned_by_age_and_size_but_never_one_a_waiting_job_names(tmp_path):
    state = make_state(tmp_path, uploads_max_age_days=2, uploads_max_mb=1)
    now = time.time()

    def upload(name: str, kb: int, days_old: float):
        path = state.uploads_dir / name
        path.write_bytes(b"x" * kb * 1024)
        os.utime(path, (now - days_old * 86400, now - days_old * 86400))
        return path
    hexname = "{:032x}.png".format
    needed_old = upload(hexname(1), 10, 30)         # old, but a waiting job names it
    old = upload(hexname(2), 10, 3)                 # older than 2 days
    big_older = upload(hexname(3), 600, 1)          # together over 1 MB: the older one goes
    big_newer = upload(hexname(4), 600, 0.5)
    partial = upload(".upload-abc.tmp", 10, 1)      # a copy a crash cut short
    fresh_partial = upload(".upload-def.tmp", 10, 0)  # an upload being copied right now
    foreign = upload("notes.txt", 10, 30)           # not ours: left alone
    job = {**req("uses an old upload"), "ref_images": [str(needed_old)]}
    state.queue.add(job, "alice")
    gone = state.prune_uploads(now)
    assert sorted(gone) == sorted(p.name for p in (old, big_older, partial))
    assert all(p.exists() for p in (needed_old, big_newer, fresh_partial, foreign))
    # and at start: a restart prunes with the same rules
    upload(hexname(5), 10, 3)
    restarted = make_state(tmp_path, uploads_max_age_days=2, uploads_max_mb=1)
    assert not (restarted.uploads_dir / hexname(5)).exists() and needed_old.exists()
    unlimited = make_state(tmp_path, uploads_max_age_days=0, uploads_max_mb=0)
    # no limits: a year on, only the cut-short copy goes
    assert unlimited.prune_uploads(now + 365 * 86400) == [fresh_partial.name] and big_newer.exists()


def test_a_shared_server_limits_each_session_and_refuses_in_one_log_line(tmp_path):
    """The real server with --listen (connected to on 127.0.0.1 only)."""
    from tests.app_harness import StudioServer
    from tests.app_harness import api_client
    from tests.test_app_server import request_json, wait_job
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    checkpoints = tmp_path / "ckpt"
    ensure_tiny_checkpoints(checkpoints)
    server = StudioServer(tmp_path / "studio", checkpoints, "--listen", "--max_queue_per_session", "1",
                          gated=True).start()
    try:
        c = api_client(server)
        with pytest.raises(Exception, match="no-such-job"):
            c.predict("no-such-job", api_name="/job")
        time.sleep(0.5)  # the server's output is read by a thread
        log = server.log()
        refusal = [line for line in log.splitlines() if "no-such-job" in line]
        assert len(refusal) == 1 and "refused an API call" in refusal[0] and "Traceback" not in log
        server.gate.touch()
        held = c.predict(request_json(prompt="[hold]"), api_name="/queue_job")
        wait_job(c, held, ("running",))
        c.predict(request_json(prompt="waits"), api_name="/queue_job")
        with pytest.raises(Exception, match="max_queue_per_session 1"):
            c.predict(request_json(prompt="one too many"), api_name="/queue_job")
    finally:
        server.gate.unlink(missing_ok=True)
        server.stop()
