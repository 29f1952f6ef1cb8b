"""GPU worker processes of the web app (``--gpus``, ``--gpu_mode``), run as CPU workers
(``--gpus cpu:2``: gloo, one thread each) on the TEST model:

- the settings and their messages, the split layout, the job's placement in the queue file;
- split mode: the app (``wgp.py serve --gpus cpu:2``) finishes a job whose video equals the
  single-process one; a worker process killed mid-job is restarted and the job completes;
- per_job mode (``AppState`` in this process): two workers run two jobs at once, and the queue
  panel says which runs which;
- a worker that cannot start fails its job with the reason.

A job is caught mid-run by a gate: the server's ``tests/gated_wgp.py``, or a worker engine whose
rank 0 waits after each step while a file exists (``gpu_worker_harness.held_engine``, handed to
the workers as ``AppState(worker_engine=...)``).
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

from app_harness import StudioServer, api_client
from gpu_worker_harness import broken_engine, held_engine
from helpers import wait_until
from test_app_server import wait_job
from test_parallel_generate import read_video
from wan.app import ui_queue
from wan.app.gpu_workers import check_devices, child_environment, split_layout
from wan.app.jobqueue import JobQueue
from wan.app.jobs import Job, WorkerLost, placement_text
from wan.app.settings import DEFAULTS, ServerSettings, SettingsError, load_settings, parse_gpus, settings_from_dict
from wan.engine.request import GenerationRequest

TIMEOUT = 240.0
PROMPT = "a fox in the snow"


def request(**fields) -> dict:
    return GenerationRequest(**{"model": "test-tiny-t2v", "prompt": PROMPT, "steps": 2, "seed": 5, "frames": 5,
                                **fields}).to_dict()


def make_state(base: Path, ckpts: Path, gpus: str, mode: str, factory):
    from wan.app.state import AppState
    settings = ServerSettings(checkpoint_dir=str(ckpts), output_dir=str(base / "out"), state_dir=str(base / "state"),
                              lora_dir=str(base / "loras"), gpus=gpus, gpu_mode=mode)
    state = AppState(settings, engine_factory=lambda: pytest.fail("no generation may run in the server process"),
                     worker_engine=factory)
    state.queue.start()
    return state


def stepping(state, job_id: str) -> bool:
    job = state.queue.get(job_id)
    return job.status == "running" and job.progress is not None and job.progress.step >= 1


def stopped(pids) -> bool:
    def gone(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return all(gone(p) for p in pids)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return root


# -- settings, layout, placement (no processes) -------------------------------------------------

def test_gpus_settings_are_checked_and_named_with_what_is_allowed(tmp_path):
    assert (DEFAULTS.gpus, DEFAULTS.gpu_mode) == (None, "split")  # no workers: generations in the server
    s = settings_from_dict({"gpus": " 0, 2", "gpu_mode": "per_job"})
    assert (s.gpus, s.gpu_mode) == ("0,2", "per_job")
    assert settings_from_dict({"gpus": [0, 1]}).gpus == "0,1" and settings_from_dict({"gpus": "CPU:2"}).gpus == "cpu:2"
    assert parse_gpus("cpu:2") == ("cpu0", "cpu1") and parse_gpus("cpu") == ("cpu0",) and parse_gpus(3) == ("3",)
    config = tmp_path / "wan_studio.yaml"
    for value in ("0,0", "a,b", "cpu:0", -1, "0;1"):
        config.write_text(f"gpus: {json.dumps(value)}\n")
        with pytest.raises(SettingsError) as e:
            load_settings(_args(config=str(config)))
        msg = str(e.value)
        assert str(config) in msg and "gpus" in msg and repr(value) in msg and "cpu:N" in msg, msg
    with pytest.raises(SettingsError, match=r"--gpu_mode: 'both' is not allowed; expected one of split, per_job"):
        load_settings(_args(gpu_mode="both"))
    # at the start: a GPU this machine lacks, or GPUs on a machine without CUDA
    with pytest.raises(SettingsError, match=r"--gpus: '0,3' is not allowed; expected GPU indices this machine has: "
                                            r"0, 1 \(2 CUDA device\(s\); GPU 3 is not one of them\)"):
        check_devices(("0", "3"), count=2)
    with pytest.raises(SettingsError, match=r"--gpus: '0' .*cpu:N .*no CUDA device"):
        check_devices(("0",), count=0)
    check_devices(("cpu0", "cpu1"), count=0)
    check_devices(("1", "0"), count=2)


def _args(**values):
    import argparse
    return argparse.Namespace(config=values.pop("config", None), **values)


def test_split_layout_and_the_environment_of_each_rank():
    from wan.parallel import ParallelConfig, ParallelConfigError
    assert split_layout(1, 12) == ParallelConfig()
    assert split_layout(2, 2) == ParallelConfig(ulysses_size=2)
    assert split_layout(4, 40, (5.0,)) == ParallelConfig(ulysses_size=4)
    assert split_layout(8, 12, (5.0, None)) == ParallelConfig(ulysses_size=4, cfg_parallel=True)
    with pytest.raises(ParallelConfigError, match=r"--gpus 0,1,2,3,4,5,6,7: .*12 attention heads among 8"):
        split_layout(8, 12, (1.0,), "0,1,2,3,4,5,6,7")  # guidance 1: no second pass to split
    with pytest.raises(ParallelConfigError, match="--gpu_mode per_job"):
        split_layout(3, 40, (5.0,))
    # rank 1 of GPUs 1,3: torchrun's variables, and those GPUs (the server's numbering) as cuda:0, cuda:1
    assert child_environment(("1", "3"), 1, {}) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1",
                                                    "MASTER_ADDR": "127.0.0.1", "CUDA_VISIBLE_DEVICES": "1,3"}
    assert child_environment(("1", "3"), 0, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"})["CUDA_VISIBLE_DEVICES"] == "5,7"
    assert child_environment(("cpu0", "cpu1"), 0, {})["CUDA_VISIBLE_DEVICES"] == ""


def test_placement_is_saved_and_old_queue_files_still_load(tmp_path):
    old = {"id": "a1", "session": "s", "request": {"prompt": "x"}, "label": "t2v: x", "status": "done"}
    assert Job.from_dict(old).gpus == [] and "gpus" not in Job.from_dict(old).to_dict()  # readable by older versions
    placed = Job.from_dict({**old, "gpus": ["0", "1"]})
    assert placed.to_dict()["gpus"] == ["0", "1"]
    with pytest.raises(ValueError, match="'gpus'"):
        Job.from_dict({**old, "gpus": "0,1"})
    assert [placement_text(g) for g in (["0", "1"], ["2"], ["cpu0", "cpu1"], ["cpu1"], [])] == \
        ["GPUs 0,1", "GPU 2", "CPU ×2", "CPU 1", ""]


def test_a_lost_worker_requeues_its_job_until_max_restarts(tmp_path):
    def runner(job, progress, cancel):
        raise WorkerLost("the worker process on GPU 1 (rank 0, pid 7) was killed by SIGKILL while it ran the job")
    q = JobQueue(tmp_path / "q.json", runner, max_restarts=1)
    heard = []
    q.subscribe(lambda event, job: heard.append((event, job.restarts)))
    job = q.add({"prompt": "x"}, "s").id
    q.start()
    done = q.wait_finished(job, 30)
    q.stop(30)
    assert done.status == "failed" and done.restarts == 1
    assert "died, 2 times; not restarted again" in done.error and "SIGKILL" in done.error
    assert ("restarted", 1) in heard
    assert json.loads(q.path.read_text())["jobs"][0]["restarts"] == 1


# -- split: the app started with two CPU workers -----------------------------------------------

READY = re.compile(r"the worker on CPU ×2 is ready \(pids (\d+), (\d+)\)")


@pytest.fixture(scope="module")
def split(ckpts, tmp_path_factory):
    """``wgp.py serve --gpus cpu:2`` (split is the default mode), through ``tests/gated_wgp.py``:
    ``spawn`` runs the server's main script in each worker (as ``__mp_main__``), so the script's
    gate holds a "[hold]" job on rank 0 of the workers too."""
    server = StudioServer(tmp_path_factory.mktemp("split"), ckpts, "--gpus", "cpu:2", gated=True).start()
    yield server, api_client(server)
    server.gate.unlink(missing_ok=True)
    server.stop()
    pids = [int(p) for m in READY.finditer(server.log()) for p in m.groups()]
    assert pids and wait_until(lambda: stopped(pids), 30, "the workers to stop with the server")


def saved_job(server, job_id: str) -> dict:
    jobs = json.loads((server.state_dir / "queue.json").read_text())["jobs"]
    return next(j for j in jobs if j["id"] == job_id)


def test_the_app_with_split_workers_finishes_a_job_equal_to_the_single_process_one(split, ckpts, tmp_path):
    from wan.engine import Engine
    server, client = split
    job_id = client.predict(json.dumps(request()), api_name="/queue_job")
    # the single-process reference, made here while the workers start
    single = Engine(checkpoint_dir=ckpts, device="cpu").generate(
        GenerationRequest.from_dict({**request(), "output_dir": str(tmp_path)}))
    expected = read_video(next(p for p in single.files if p.suffix == ".mp4"))
    job = wait_job(client, job_id)
    assert job["status"] == "done", job["error"]
    assert any("parallel on 2 processes (ulysses 2)" in n for n in job["notices"]), job["notices"]
    videos = [f for f in job["files"] if f.endswith(".mp4")]
    assert len(videos) == 1 and Path(videos[0]).parent == server.output_dir  # rank 0 alone writes
    frames = read_video(videos[0])
    assert frames.shape == expected.shape and np.abs(frames.astype(int) - expected.astype(int)).max() <= 1
    saved = saved_job(server, job_id)
    assert saved["gpus"] == ["cpu0", "cpu1"] and saved["restarts"] == 0
    print(f"split over 2 CPU workers, first job (the workers starting): {saved['finished'] - saved['started']:.1f} s")


def test_a_worker_killed_mid_job_is_restarted_and_the_job_completes(split):
    server, client = split
    before = [int(p) for p in wait_until(lambda: READY.findall(server.log()), TIMEOUT, what="the workers")[-1]]
    server.gate.touch()  # a "[hold]" job waits on rank 0 after each step: it is caught running
    job_id = client.predict(json.dumps(request(prompt="cut short [hold]", steps=3)), api_name="/queue_job")
    wait_job(client, job_id, ("running",))
    os.kill(before[1], signal.SIGKILL)  # rank 1, in its job
    wait_until(lambda: saved_job(server, job_id)["restarts"] == 1, TIMEOUT, what="the job to be queued again")
    server.gate.unlink()
    job = wait_job(client, job_id)
    assert job["status"] == "done", job["error"]
    assert [f for f in job["files"] if f.endswith(".mp4")]
    assert saved_job(server, job_id)["restarts"] == 1 and stopped(before)
    after = [int(p) for p in READY.findall(server.log())[-1]]
    assert not set(after) & set(before)  # a fresh group ran it
    lost = [line for line in server.log().splitlines() if "lost its worker" in line]
    assert len(lost) == 1 and f"job {job_id} lost its worker (CPU ×2) (the worker process on CPU ×2 (rank 1, pid " \
        f"{before[1]}) was killed by SIGKILL while it ran the job); queued again first" in lost[0], server.log()


# -- per_job: one job per worker --------------------------------------------------------------

def test_per_job_workers_run_two_jobs_at_once_and_the_queue_shows_where(ckpts, tmp_path):
    gate = tmp_path / "hold"
    gate.touch()
    state = make_state(tmp_path, ckpts, "cpu:2", "per_job", functools.partial(held_engine, gate))
    try:
        ids = [state.queue.add(request(seed=s), "me").id for s in (1, 2)]
        wait_until(lambda: all(stepping(state, i) for i in ids), TIMEOUT, what="both jobs running")  # at once
        jobs = [state.queue.get(i) for i in ids]
        assert sorted(j.gpus[0] for j in jobs) == ["cpu0", "cpu1"] and all(len(j.gpus) == 1 for j in jobs)
        status, _, table, _, _ = ui_queue.views(state, "me", None)
        rows = {row[1]: row for row in table}
        for job in jobs:
            where = placement_text(job.gpus)
            assert rows[job.id][4].startswith(f"{where} · step "), rows[job.id]
            assert f"({job.id}): {where} · step" in status
        # "Abort running" stops the picked running job, not the other; its worker takes the next job
        assert ui_queue.perform(state, "abort", ids[1], "me") == f"Aborting {ids[1]}..."
        assert state.queue.wait_finished(ids[1], TIMEOUT).status == "cancelled"
        assert state.queue.get(ids[0]).status == "running"
        gate.unlink()
        ids.append(state.queue.add(request(seed=3), "me").id)
        done = [state.queue.wait_finished(i, TIMEOUT) for i in (ids[0], ids[2])]
        assert [j.status for j in done] == ["done", "done"], [j.error for j in done]
        assert len({f for j in done for f in j.files if f.endswith(".mp4")}) == 2
    finally:
        gate.unlink(missing_ok=True)
        pids = [p for w in state.workers.workers for p in w.pids]
        state.close(timeout=30)
    assert len(pids) == 2 and stopped(pids)  # the workers end with the app


def test_a_worker_that_cannot_start_fails_its_job_with_the_reason(ckpts, tmp_path):
    state = make_state(tmp_path, ckpts, "cpu:1", "per_job", broken_engine)
    try:
        job = state.queue.wait_finished(state.queue.add(request(), "me").id, TIMEOUT)
        assert job.status == "failed" and job.restarts == 0
        assert job.error.startswith("the worker on CPU 0 could not start: RuntimeError: no engine here"), job.error
        assert state.queue.wait_idle(5)  # the queue goes on
    finally:
        state.close(timeout=30)
