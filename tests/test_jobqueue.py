"""The web app's job queue with fake runners: order, one job at a time, reordering, abort, failures,
progress, and the JSON file that survives a server restart (atomic saves, corrupt files set aside)."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from wan.app.jobqueue import Job, JobQueue, RunOutcome, make_label
from wan.engine.loop import Cancelled, StepInfo
from wan.engine.request import GenerationRequest, RequestError

TIMEOUT = 10.0  # generous: only reached when something is broken


def request(prompt: str, task: str = "t2v") -> dict:
    return GenerationRequest(model="tiny-t2v", prompt=prompt, task=task).to_dict()


class FakeRunner:
    """Runs ``steps`` short steps, reporting real StepInfo objects and honouring the cancel token.

    Prompts steer it: "fail-request" raises a RequestError, "fail-runtime" a RuntimeError, and
    "block..." waits (between steps) until ``gate`` is set or the job is cancelled.
    """

    def __init__(self, steps: int = 3, delay: float = 0.002):
        self.steps, self.delay = steps, delay
        self.calls: list[str] = []
        self.active = self.max_active = 0
        self.gate = threading.Event()
        self.blocked = threading.Event()  # a "block" job has started and waits on the gate
        self._lock = threading.Lock()

    def __call__(self, job: Job, progress, cancel) -> RunOutcome:
        with self._lock:
            self.calls.append(job.id)
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            prompt = job.request["prompt"]
            for i in range(self.steps):
                if cancel.cancelled:
                    raise Cancelled(f"cancelled before step {i + 1}")
                if prompt.startswith("block"):
                    self.blocked.set()
                    while not self.gate.wait(0.002):
                        if cancel.cancelled:
                            raise Cancelled(f"cancelled in step {i + 1}")
                time.sleep(self.delay)
                progress(StepInfo(step=i + 1, total=self.steps, timestep=1000.0 * (1 - i / self.steps),
                                  expert="transformer", guidance=5.0, elapsed=(i + 1) * self.delay,
                                  eta=(self.steps - i - 1) * self.delay))
            if prompt == "fail-request":
                raise RequestError("steps", 0, "a positive whole number")
            if prompt == "fail-runtime":
                raise RuntimeError("boom\nsecond line")
            return RunOutcome(files=[f"outputs/{job.id}.mp4"], notices=[f"ran {job.label}"])
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture
def runner():
    return FakeRunner()


@pytest.fixture
def queue(tmp_path, runner):
    q = JobQueue(tmp_path / "queue.json", runner)
    yield q
    runner.gate.set()
    q.stop(timeout=TIMEOUT, cancel_running=True)


def wait_for(predicate, timeout: float = TIMEOUT) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.002)


def saved(path: Path) -> list[dict]:
    return json.loads(path.read_text())["jobs"]


# -- order and concurrency -------------------------------------------------------------------------


def test_jobs_run_in_order_one_at_a_time(queue, runner):
    ids = [queue.add(request(f"job {i}"), session="s1").id for i in range(6)]
    assert [j.status for j in queue.jobs()] == ["queued"] * 6
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == ids
    assert runner.max_active == 1
    done = queue.jobs()
    assert [j.id for j in done] == ids[::-1]  # finished: newest first
    for job in done:
        assert job.status == "done" and job.error is None
        assert job.files == [f"outputs/{job.id}.mp4"] and job.notices == [f"ran {job.label}"]
        assert job.created <= job.started <= job.finished
        assert job.progress.step == job.progress.total == runner.steps


def test_two_sessions_adding_concurrently_lose_nothing(queue, runner):
    queue.start()  # the worker takes jobs while they are being added
    barrier = threading.Barrier(2)
    added: dict[str, list[str]] = {"a": [], "b": []}

    def add_five(session):
        barrier.wait()
        for i in range(5):
            added[session].append(queue.add(request(f"{session} {i}"), session=session).id)

    threads = [threading.Thread(target=add_five, args=(s,)) for s in added]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert queue.wait_idle(TIMEOUT)
    all_ids = added["a"] + added["b"]
    assert sorted(runner.calls) == sorted(all_ids) and len(set(runner.calls)) == 10
    assert runner.max_active == 1
    for session, ids in added.items():
        mine = queue.jobs(session=session)
        assert sorted(j.id for j in mine) == sorted(ids)
        assert all(j.status == "done" and j.session == session for j in mine)
        # each session's own jobs ran in the order that session added them
        assert [c for c in runner.calls if c in ids] == ids
    assert len(saved(queue.path)) == 10


def test_listing_order_running_then_queued_then_history(queue, runner):
    first = queue.add(request("quick"), "s").id
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    blocker = queue.add(request("block me"), "s").id
    runner.blocked.wait(TIMEOUT)
    later = [queue.add(request(f"later {i}"), "s2").id for i in range(3)]
    listing = queue.jobs()
    assert [j.id for j in listing] == [blocker, *later, first]
    assert [j.status for j in listing] == ["running", "queued", "queued", "queued", "done"]
    assert queue.running().id == blocker
    assert [j.id for j in queue.jobs(include_finished=False)] == [blocker, *later]
    assert [j.id for j in queue.jobs(session="s2")] == later
    runner.gate.set()
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [first, blocker, *later]
    assert queue.running() is None


# -- move, remove, abort ----------------------------------------------------------------------------


def test_move_reorders_queued_jobs_and_clamps(queue, runner):
    a, b, c, d = (queue.add(request(p), "s").id for p in "abcd")
    queue.move(c, -1)
    assert [j.id for j in queue.jobs()] == [a, c, b, d]
    queue.move(a, -5)  # clamped at the top
    queue.move(b, +9)  # clamped at the bottom
    assert [j.id for j in queue.jobs()] == [a, c, d, b]
    assert [j["id"] for j in saved(queue.path)] == [a, c, d, b]
    with pytest.raises(ValueError, match="nope"):
        queue.move("nope", 1)
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [a, c, d, b]
    with pytest.raises(ValueError, match="done"):
        queue.move(a, 1)


def test_move_and_remove_refuse_the_running_job(queue, runner):
    running = queue.add(request("block"), "s").id
    queue.start()
    runner.blocked.wait(TIMEOUT)
    with pytest.raises(ValueError, match="running"):
        queue.move(running, 1)
    with pytest.raises(ValueError, match="abort it first"):
        queue.remove(running)
    assert queue.get(running).status == "running"


def test_remove_queued_and_finished_jobs(queue, runner, tmp_path):
    done_id = queue.add(request("done"), "s").id
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    output = tmp_path / "outputs" / "made.mp4"  # stands for the job's output file
    output.parent.mkdir()
    output.write_bytes(b"video")
    queue.stop(TIMEOUT)
    keep, drop = queue.add(request("keep"), "s").id, queue.add(request("drop"), "s").id
    queue.remove(drop)
    queue.remove(done_id)
    assert [j.id for j in queue.jobs()] == [keep]
    assert queue.get(drop) is None and queue.get(done_id) is None
    assert [j["id"] for j in saved(queue.path)] == [keep]
    assert output.read_bytes() == b"video"  # the queue never touches outputs
    with pytest.raises(ValueError, match="not in the queue"):
        queue.remove(drop)
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [done_id, keep]


def test_abort_running_job_then_the_next_runs(queue, runner):
    blocked = queue.add(request("block"), "s").id
    nxt = queue.add(request("next"), "s").id
    queue.start()
    runner.blocked.wait(TIMEOUT)
    assert queue.abort() is True
    assert queue.wait_idle(TIMEOUT)
    assert queue.get(blocked).status == "cancelled"
    assert queue.get(blocked).error is None and queue.get(blocked).files == []
    assert queue.get(nxt).status == "done"
    assert runner.calls == [blocked, nxt]
    assert queue.abort() is False  # nothing runs
    assert queue.abort(blocked) is False  # already finished
    assert {j["id"]: j["status"] for j in saved(queue.path)} == {blocked: "cancelled", nxt: "done"}


def test_abort_by_id_of_running_and_queued_jobs(queue, runner):
    running = queue.add(request("block"), "s").id
    skipped = queue.add(request("skipped"), "s").id
    last = queue.add(request("last"), "s").id
    queue.start()
    runner.blocked.wait(TIMEOUT)
    assert queue.abort(skipped) is True
    assert queue.get(skipped).status == "cancelled" and queue.get(skipped).finished is not None
    assert queue.abort(running) is True
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [running, last]  # the aborted queued job never ran
    assert [queue.get(i).status for i in (running, skipped, last)] == ["cancelled", "cancelled", "done"]
    with pytest.raises(ValueError, match="unknown"):
        queue.abort("unknown")


# -- failures ---------------------------------------------------------------------------------------


def test_failing_runner_fails_the_job_and_the_next_runs(queue, runner, caplog):
    bad_request = queue.add(request("fail-request"), "s").id
    crash = queue.add(request("fail-runtime"), "s").id
    good = queue.add(request("fine"), "s").id
    with caplog.at_level(logging.ERROR, logger="wan.app.jobqueue"):
        queue.start()
        assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [bad_request, crash, good]
    job = queue.get(bad_request)
    assert job.status == "failed"
    assert job.error == "steps: 0 is not allowed; a positive whole number"
    assert queue.get(crash).error == "RuntimeError: boom\nsecond line"  # its line breaks kept
    assert queue.get(good).status == "done"
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert any("boom" in str(r.exc_info[1]) for r in tracebacks)  # the traceback is logged, not lost


def test_worker_survives_anything_a_runner_raises(tmp_path):
    calls = []

    def runner(job, progress, cancel):
        calls.append(job.request["prompt"])
        if job.request["prompt"] == "exit":
            raise SystemExit(3)
        # falling off the end (None): nothing to report is fine too

    q = JobQueue(tmp_path / "q.json", runner)
    a, b = q.add(request("exit"), "s").id, q.add(request("ok"), "s").id
    q.start()
    assert q.wait_idle(TIMEOUT)
    assert q.get(a).status == "failed" and q.get(a).error == "SystemExit: 3"
    assert q.get(b).status == "done" and q.get(b).files == []
    assert q.stop(TIMEOUT)


def test_queue_limit_and_bad_requests(tmp_path, runner):
    q = JobQueue(tmp_path / "q.json", runner, max_queued=3)
    for i in range(3):
        q.add(request(str(i)), "s")
    with pytest.raises(ValueError, match="limit 3"):
        q.add(request("one too many"), "s")
    with pytest.raises(ValueError, match="request"):
        q.add({"prompt": object()}, "s")
    with pytest.raises(ValueError, match="dict"):
        q.add("a prompt", "s")
    assert len(q.jobs()) == 3


# -- progress, copies, listeners --------------------------------------------------------------------


def test_progress_is_visible_through_get_while_running(tmp_path):
    steps_done = [threading.Event() for _ in range(3)]
    go_on = [threading.Event() for _ in range(3)]

    def runner(job, progress, cancel):
        for i in range(3):
            progress(StepInfo(step=i + 1, total=3, timestep=900.0 - 300 * i, expert="high_noise" if i < 2 else "low_noise",
                              guidance=4.0, elapsed=1.5 * (i + 1), eta=1.5 * (2 - i)),
                     preview=f"previews/{i}.png" if i == 0 else None)
            steps_done[i].set()
            go_on[i].wait(TIMEOUT)
        return RunOutcome(files=["a.mp4"])

    q = JobQueue(tmp_path / "q.json", runner)
    job_id = q.add(request("watch me"), "s").id
    assert q.get(job_id).progress is None
    q.start()
    for i in range(3):
        steps_done[i].wait(TIMEOUT)
        p = q.get(job_id).progress
        assert (p.step, p.total, p.elapsed_s, p.eta_s) == (i + 1, 3, 1.5 * (i + 1), 1.5 * (2 - i))
        assert p.expert == ("high_noise" if i < 2 else "low_noise")
        assert p.preview == "previews/0.png"  # kept until a newer preview comes
        assert q.get(job_id).status == "running"
        go_on[i].set()
    assert q.wait_idle(TIMEOUT)
    assert "progress" not in saved(q.path)[0]  # progress lives in memory only
    q.stop(TIMEOUT)


def test_returned_jobs_are_copies(queue, runner):
    req = request("original")
    job = queue.add(req, "s")
    req["prompt"] = "changed by the caller"
    job.request["prompt"] = job.label = "changed"
    listed = queue.jobs()[0]
    listed.status = "done"
    listed.files.append("x")
    again = queue.get(job.id)
    assert again.request["prompt"] == "original" and again.label == "t2v: original"
    assert again.status == "queued" and again.files == []


def test_listeners_hear_every_change_and_cannot_break_the_queue(queue, runner):
    heard = []
    queue.subscribe(lambda event, job: heard.append((event, job.id, job.status)))
    queue.subscribe(lambda event, job: 1 / 0)  # a broken listener is logged and skipped
    a = queue.add(request("a"), "s").id
    b = queue.add(request("b"), "s").id
    queue.move(b, -1)
    queue.abort(a)
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    assert heard == [("added", a, "queued"), ("added", b, "queued"), ("moved", b, "queued"),
                     ("cancelled", a, "cancelled"), ("started", b, "running"), ("finished", b, "done")]


def test_label_and_dict_round_trip():
    req = request("  a fox\nin the   snow " + "x" * 100, task="i2v")
    label = make_label(req)
    assert label.startswith("i2v: a fox in the snow x") and len(label) == len("i2v: ") + 60
    assert make_label({"model": "m", "prompt": "p"}) == "m: p"
    job = Job(id="abc", session="s", request=req, label=label, created=1.0)
    data = job.to_dict()
    assert "progress" not in data
    assert Job.from_dict(json.loads(json.dumps(data))) == job
    with pytest.raises(ValueError, match="status"):
        Job.from_dict({**data, "status": "exploded"})
    with pytest.raises(ValueError, match="surprise"):
        Job.from_dict({**data, "surprise": 1})


def test_stop_after_the_current_job_and_start_again(queue, runner):
    first = queue.add(request("block"), "s").id
    second = queue.add(request("second"), "s").id
    queue.start()
    runner.blocked.wait(TIMEOUT)
    assert queue.stop(timeout=0.05) is False  # the current job is still running
    runner.gate.set()
    assert queue.stop(timeout=TIMEOUT) is True
    assert queue.get(first).status == "done" and queue.get(second).status == "queued"
    queue.start()
    assert queue.wait_idle(TIMEOUT)
    assert runner.calls == [first, second]
    runner.gate.clear()
    runner.blocked.clear()
    third = queue.add(request("block again"), "s").id
    runner.blocked.wait(TIMEOUT)
    assert queue.stop(timeout=TIMEOUT, cancel_running=True) is True
    assert queue.get(third).status == "cancelled"


# -- persistence ------------------------------------------------------------------------------------


def test_restart_requeues_running_and_queued_jobs_never_finished_ones(tmp_path, runner):
    path = tmp_path / "queue.json"
    q1 = JobQueue(path, runner)
    done = q1.add(request("done before"), "s1").id
    q1.start()
    assert q1.wait_idle(TIMEOUT)
    running = q1.add(request("block: the server dies here"), "s1").id
    runner.blocked.wait(TIMEOUT)
    queued = [q1.add(request(f"waiting {i}"), "s2").id for i in range(2)]
    q1.move(queued[1], -1)
    crashed = tmp_path / "after-crash.json"
    shutil.copy(path, crashed)  # the file as the dying server left it
    runner.gate.set()
    q1.stop(TIMEOUT, cancel_running=True)

    second = FakeRunner()
    second.gate.set()  # the restarted job runs through this time
    q2 = JobQueue(crashed, second)
    listing = q2.jobs()
    assert [j.id for j in listing] == [running, queued[1], queued[0], done]
    assert [j.status for j in listing] == ["queued", "queued", "queued", "done"]
    assert [j.restarts for j in listing] == [1, 0, 0, 0]
    assert [j.session for j in listing] == ["s1", "s2", "s2", "s1"]
    assert saved(crashed)[0]["restarts"] == 1  # the restart is on disk before the job runs again
    q2.start()
    assert q2.wait_idle(TIMEOUT)
    assert second.calls == [running, queued[1], queued[0]]  # the done job was not run again
    assert q2.get(done).files == [f"outputs/{done}.mp4"]
    q2.stop(TIMEOUT)


def test_a_job_that_keeps_killing_the_server_is_failed(tmp_path, runner):
    path = tmp_path / "queue.json"
    job = Job(id="deadly", session="s", request=request("too big"), label="t2v: too big", status="running",
              created=1.0, started=2.0, restarts=3)
    path.write_text(json.dumps({"version": 1, "jobs": [job.to_dict()]}))
    q = JobQueue(path, runner, max_restarts=3)
    got = q.get("deadly")
    assert got.status == "failed" and "4 times" in got.error
    q.start()
    assert q.wait_idle(TIMEOUT)
    assert runner.calls == []
    q.stop(TIMEOUT)


@pytest.mark.parametrize("content", [
    "{ not json",
    json.dumps({"version": 99, "jobs": []}),                      # written by a newer Wan Studio
    json.dumps({"version": 1, "jobs": [{"id": "x"}]}),            # a job without its fields
    json.dumps([1, 2, 3]),
    json.dumps({"version": 1, "jobs": [{"id": "x", "session": "s", "request": {}, "label": "l", "status": "done",
                                        "created": "yesterday"}]}),
])
def test_unreadable_file_is_set_aside_and_the_queue_starts_empty(tmp_path, runner, caplog, content):
    path = tmp_path / "queue.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="wan.app.jobqueue"):
        q = JobQueue(path, runner)
    assert q.jobs() == []
    aside = list(tmp_path.glob("queue.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == content  # kept, not destroyed
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert not path.exists()
    q.add(request("fresh start"), "s")
    assert len(saved(path)) == 1
    path.write_text("garbage again")  # a second bad file gets its own name
    JobQueue(path, runner)
    assert len(list(tmp_path.glob("queue.json.corrupt-*"))) == 2


def test_saves_are_atomic_while_a_reader_reads(tmp_path, runner):
    path = tmp_path / "state" / "queue.json"
    q = JobQueue(path, runner, max_queued=500)
    q.add(request("first"), "s")
    problems, reads = [], [0]
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            try:
                data = json.loads(path.read_text())
                assert data["version"] == 1 and isinstance(data["jobs"], list)
                reads[0] += 1
            except Exception as e:  # noqa: BLE001 - any failure is a finding
                problems.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        ids = [q.add(request(f"job {i} " + "long prompt " * 20), "s").id for i in range(60)]
        for job_id in ids[::3]:
            q.remove(job_id)
        q.move(ids[1], -10)
        q.start()
        assert q.wait_idle(TIMEOUT)
    finally:
        stop.set()
        t.join(TIMEOUT)
    assert problems == [] and reads[0] > 0
    assert not list(path.parent.glob("*.tmp"))  # no temporary files left behind
    data = saved(path)
    assert len(data) == 41 and all(j["status"] == "done" for j in data)
    q.stop(TIMEOUT)


def test_history_is_capped(tmp_path, runner):
    q = JobQueue(tmp_path / "q.json", runner, max_history=4)
    ids = [q.add(request(str(i)), "s").id for i in range(6)]
    q.start()
    assert q.wait_idle(TIMEOUT)
    assert [j.id for j in q.jobs()] == ids[:1:-1]
    assert [j["id"] for j in saved(q.path)] == ids[:1:-1]
    assert q.clear_finished("other") == 0 and q.clear_finished() == 4 and q.jobs() == []
    q.stop(TIMEOUT)


def test_memory_only_queue_writes_nothing(tmp_path, runner):
    q = JobQueue(None, runner)
    q.add(request("x"), "s")
    q.start()
    assert q.wait_idle(TIMEOUT)
    assert q.jobs()[0].status == "done"
    assert list(tmp_path.iterdir()) == []
    q.stop(TIMEOUT)


def test_importing_the_queue_does_not_load_torch():
    # the web app builds its page and its queue before any model code loads
    code = "import sys, wan.app.jobqueue; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_an_engine_that_cannot_be_imported_fails_each_job(tmp_path, runner, monkeypatch):
    monkeypatch.setitem(sys.modules, "wan.engine.loop", None)  # "import wan.engine.loop" now raises
    q = JobQueue(tmp_path / "q.json", runner)
    ids = [q.add(request(str(i)), "s").id for i in range(2)]
    q.start()
    assert q.wait_idle(TIMEOUT)
    assert runner.calls == []
    for job_id in ids:
        job = q.get(job_id)
        assert job.status == "failed" and job.error.startswith("ModuleNotFoundError")
    assert [j["status"] for j in saved(q.path)] == ["failed", "failed"]
    q.stop(TIMEOUT)


def test_a_prompt_with_a_lone_surrogate_is_saved_and_the_queue_goes_on(tmp_path):
    """Some editors paste half a surrogate pair; the file must still be written, and read back."""
    q = JobQueue(tmp_path / "q.json", lambda job, progress, cancel: RunOutcome())
    job = q.add({"prompt": "snow \ud83e fox"}, "s")
    q.add({"prompt": "next"}, "s")
    again = JobQueue(tmp_path / "q.json", lambda job, progress, cancel: RunOutcome())
    assert [j.request["prompt"] for j in again.jobs()] == ["snow \ud83e fox", "next"]
    assert again.get(job.id) is not None


def test_wait_finished_wakes_on_the_jobs_end_without_polling(queue, runner):
    """The API's /generate waits on the queue's change signal: it returns once the job ended, with
    its final state, and a timeout returns the job as it stands."""
    queue.start()
    job = queue.add(request("block until released"), session="s1")
    assert runner.blocked.wait(TIMEOUT)
    still = queue.wait_finished(job.id, timeout=0.05)
    assert still.status == "running"
    threading.Timer(0.05, runner.gate.set).start()
    t0 = time.monotonic()
    done = queue.wait_finished(job.id, timeout=TIMEOUT)
    assert done.status == "done" and done.files == [f"outputs/{job.id}.mp4"]
    assert time.monotonic() - t0 < TIMEOUT / 2
    assert queue.wait_finished("no-such-job", timeout=TIMEOUT) is None


# -- hardening: bad files, sessions, logging ----------------------------------------------------


def good_record(job_id: str, status: str = "queued", **fields) -> dict:
    return {"id": job_id, "session": "s", "request": request(job_id), "label": f"t2v: {job_id}", "status": status,
            "created": 1.0, **fields}


def test_a_deeply_nested_queue_file_is_set_aside_and_the_queue_starts(tmp_path, runner, caplog):
    path = tmp_path / "queue.json"
    path.write_text('{"version": 1, "jobs": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with caplog.at_level(logging.WARNING, logger="wan.app.jobqueue"):
        q = JobQueue(path, runner)  # raised RecursionError before: the server did not start
    assert q.jobs() == [] and len(list(tmp_path.glob("queue.json.corrupt-*"))) == 1


def test_one_bad_job_is_set_aside_and_the_others_load(tmp_path, runner, caplog):
    """A bad job (a wrong field, a request nested deeper than anything we write, a repeated id)
    no longer discards the whole queue: the file is kept aside, the good jobs load and are saved."""
    deep: dict = {}
    node = deep
    for _ in range(600):  # parses, but would make every copy of the queue fail with RecursionError
        node["x"] = {}
        node = node["x"]
    records = [good_record("good1"), good_record("bad-status", status="exploded"),
               good_record("deep", request=deep), good_record("good2", status="done"), good_record("good1")]
    path = tmp_path / "queue.json"
    content = json.dumps({"version": 1, "jobs": records})
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="wan.app.jobqueue"):
        q = JobQueue(path, runner)
    assert [(j.id, j.status) for j in q.jobs()] == [("good1", "queued"), ("good2", "done")]
    assert [j["id"] for j in saved(path)] == ["good1", "good2"]  # saved again at once, without the bad ones
    aside = list(tmp_path.glob("queue.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == content
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "bad-status" in warning and "deep" in warning and "appears earlier" in warning
    q.start()
    assert q.wait_idle(TIMEOUT) and q.get("good1").status == "done"


def test_partial_saves_of_a_crashed_run_are_removed_at_start(tmp_path, runner):
    (tmp_path / ".queue.json.k2j3h4.tmp").write_text('{"version": 1, "jobs": [' + "x" * 1000)
    keep = [tmp_path / "notes.tmp", tmp_path / ".other.json.a.tmp", tmp_path / "queue.json.corrupt-1"]
    for p in keep:
        p.write_text("mine")
    JobQueue(tmp_path / "queue.json", runner)  # no queue file yet: a crash during the first save
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


def test_a_session_may_have_only_so_many_jobs_waiting(tmp_path, runner):
    q = JobQueue(tmp_path / "q.json", runner, max_queued=5, max_per_session=2)
    for i in range(2):
        q.add(request(f"a{i}"), "alice")
    with pytest.raises(ValueError, match=r"2 jobs waiting.*--max_queue_per_session 2"):
        q.add(request("a2"), "alice")
    q.add(request("b0"), "bob")  # another session is not held back by alice's jobs
    with pytest.raises(ValueError, match="session"):
        q.add(request("x"), "s" * 1000)
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested"):  # was a RecursionError
        q.add({"prompt": "x", "extra": deep}, "bob")
    assert [j.session for j in q.jobs()] == ["alice", "alice", "bob"]


def test_an_owner_acts_only_on_its_own_jobs(queue, runner):
    queue.start()
    running = queue.add(request("block"), "alice").id
    assert runner.blocked.wait(TIMEOUT)
    a, b = queue.add(request("a"), "alice").id, queue.add(request("b"), "bob").id
    for act in (lambda: queue.move(a, 1, owner="bob"), lambda: queue.remove(a, owner="bob"),
                lambda: queue.abort(a, owner="bob"), lambda: queue.abort(running, owner="bob"),
                lambda: queue.abort(owner="bob")):
        with pytest.raises(ValueError, match=f"job ({a}|{running}) is another session's job"):
            act()
    assert [(j.id, j.status) for j in queue.jobs()] == [(running, "running"), (a, "queued"), (b, "queued")]
    queue.move(b, -1, owner="bob")
    assert [j.id for j in queue.jobs()] == [running, b, a]
    queue.remove(a, owner="alice")
    assert queue.abort(running, owner="alice")
    assert queue.wait_finished(running, TIMEOUT).status == "cancelled"


def test_a_refused_job_is_logged_as_one_line_and_a_bug_with_its_traceback(queue, runner, caplog):
    refused, crash = queue.add(request("fail-request"), "s").id, queue.add(request("fail-runtime"), "s").id
    with caplog.at_level(logging.DEBUG, logger="wan.app.jobqueue"):
        queue.start()
        assert queue.wait_idle(TIMEOUT)
    lines = [r for r in caplog.records if refused in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING and lines[0].exc_info is None
    assert "steps: 0 is not allowed" in lines[0].getMessage() and "\n" not in lines[0].getMessage()
    crashes = [r for r in caplog.records if crash in r.getMessage() and r.levelno >= logging.ERROR]
    assert len(crashes) == 1 and crashes[0].exc_info is not None


@pytest.mark.parametrize("exclusive", [True, False])
def test_a_job_that_runs_alone_waits_for_the_running_ones_and_holds_back_the_rest(tmp_path, exclusive):
    """Two workers; a job marked exclusive (a training run) starts only once the running job has
    ended, and the job behind it starts only once it has ended. Without the mark, two run at once."""
    runner = FakeRunner()
    q = JobQueue(None, runner, workers=2, exclusive=(lambda r: r["prompt"] == "train") if exclusive else None)
    try:
        first = q.add(request("block first"), "s")
        train = q.add(request("train"), "s")
        last = q.add(request("last"), "s")
        q.start()
        wait_for(runner.blocked.is_set)
        time.sleep(0.2)  # time enough for the idle worker to take a job if it may
        if exclusive:
            assert [j.id for j in q.running_jobs()] == [first.id] and runner.calls == [first.id]
        else:
            assert runner.calls[:2] == [first.id, train.id]
        runner.gate.set()
        assert q.wait_idle(TIMEOUT)
        assert all(q.get(j.id).status == "done" for j in (first, train, last))
        if exclusive:
            assert runner.calls == [first.id, train.id, last.id] and runner.max_active == 1
        else:
            assert runner.max_active == 2
    finally:
        runner.gate.set()
        q.stop(timeout=TIMEOUT, cancel_running=True)
