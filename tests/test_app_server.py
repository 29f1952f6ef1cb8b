"""The studio server from the outside: its API through ``gradio_client``, what it refuses to
serve, a restart with jobs in the queue, and the start-up warnings."""
from __future__ import annotations

import hashlib
import json
import time
import urllib.error
import urllib.request

import pytest

from tests.app_harness import StudioServer, api_client, free_port
from wan.engine.engine import request_from_metadata
from wan.engine.media_out import read_metadata
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    ensure_tiny_checkpoints(root)
    return root


@pytest.fixture(scope="module")
def studio(tmp_path_factory, checkpoints):
    server = StudioServer(tmp_path_factory.mktemp("studio"), checkpoints).start()
    yield server
    server.stop()


def request_json(**fields) -> str:
    return json.dumps({"model": "test-tiny-t2v", "prompt": "a fox", "steps": 2, **fields})


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def wait_job(c, job_id: str, statuses=("done", "failed", "cancelled"), timeout=180) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = c.predict(job_id, api_name="/job")
        if job["status"] in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} never reached {statuses}: {job}")


def test_gradio_client_generates_through_the_api(studio):
    c = api_client(studio)
    result = c.predict(request_json(prompt="made through the API", seed=5), api_name="/generate")
    videos = [f for f in result["files"] if f.endswith(".mp4")]
    assert result["status"] == "done" and len(videos) == 1
    req = request_from_metadata(read_metadata(videos[0]))
    assert req.prompt == "made through the API" and req.seed == 5
    with pytest.raises(Exception, match="frames"):
        c.predict(request_json(frames=10), api_name="/generate")


def test_the_server_serves_outputs_and_nothing_else(studio, checkpoints):
    c = api_client(studio)
    out = c.predict(request_json(prompt="to fetch"), api_name="/generate")["files"][0]
    assert out.endswith(".mp4")
    assert http_status(f"{studio.url}gradio_api/file={out}") == 200
    secrets = [next(checkpoints.rglob("*.safetensors")), studio.state_dir / "queue.json",
               studio.base / "wan_studio.yaml", "/etc/passwd",
               f"{studio.output_dir}/../state/queue.json"]
    for path in secrets:
        assert http_status(f"{studio.url}gradio_api/file={path}") in (403, 404), path


def test_names_and_paths_from_a_client_cannot_leave_their_folders(studio):
    from tests.test_app_browser import musubi_lora
    c = api_client(studio)
    evil = [(dict(loras=[{"path": "../../x.safetensors", "multiplier": "1"}]), "loras"),
            (dict(output_dir="/tmp"), "output_dir"), (dict(task="v2v", video="/etc/passwd"), "video")]
    for fields, name in evil:
        with pytest.raises(Exception, match=name):
            c.predict(request_json(**fields), api_name="/queue_job")
    # a real LoRA file beside the server (its working folder), named relative to it: never read
    musubi_lora(studio.base / "stray.safetensors")
    job = c.predict(request_json(loras=[{"path": "stray.safetensors", "multiplier": "1"}]), api_name="/queue_job")
    failed = wait_job(c, job)
    assert failed["status"] == "failed" and "LoRA folder" in failed["error"]


def test_queued_jobs_survive_a_restart_and_finished_outputs_are_never_rewritten(tmp_path, checkpoints):
    base = tmp_path / "studio"
    server = StudioServer(base, checkpoints, gated=True).start()
    try:
        c = api_client(server)
        first = c.predict(request_json(prompt="before the restart"), api_name="/generate")
        done_file = first["files"][0]
        assert done_file.endswith(".mp4")
        digest = hashlib.sha256(open(done_file, "rb").read()).hexdigest()
        server.gate.touch()  # the "[hold]" job is caught running, however fast the machine
        slow = c.predict(request_json(prompt="cut short [hold]", steps=3), api_name="/queue_job")
        waiting = [c.predict(request_json(prompt=f"waiting {i}"), api_name="/queue_job") for i in range(2)]
        wait_job(c, slow, ("running",))
    finally:
        server.proc.kill()  # a crash: no chance to save anything more
        server.proc.wait()
        server.gate.unlink(missing_ok=True)
    server = StudioServer(base, checkpoints, port=free_port(), gated=True).start()
    try:
        c = api_client(server)
        jobs = [wait_job(c, j) for j in (slow, *waiting)]
        assert [j["status"] for j in jobs] == ["done"] * 3
        saved = {j["id"]: j for j in json.loads((base / "state" / "queue.json").read_text())["jobs"]}
        assert saved[slow]["restarts"] == 1 and saved[first["id"]]["files"] == first["files"]
        assert hashlib.sha256(open(done_file, "rb").read()).hexdigest() == digest
        videos = sorted(p.name for p in (base / "outputs").glob("*.mp4"))
        assert len(videos) == 4 and len(set(videos)) == 4  # none overwritten, none lost
    finally:
        server.stop()


def test_share_without_auth_warns_and_a_taken_port_moves_on(tmp_path, checkpoints, studio):
    import os
    import subprocess
    shared = StudioServer(tmp_path / "shared", checkpoints, "--share")
    shared.base.mkdir()
    (shared.base / "wan_studio.yaml").touch()
    proc = subprocess.Popen(shared.command(), cwd=shared.base, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    try:  # the warning comes first, before anything is served (the public link itself cannot be made here)
        line = proc.stdout.readline()
        assert line.startswith("warning:") and "--share" in line and "auth" in line
    finally:
        proc.kill()
        proc.wait()
    taken = StudioServer(tmp_path / "second", checkpoints, port=studio.port).start()
    try:
        assert any(f"port {studio.port} is in use" in line for line in taken.lines)
        served = next(line for line in taken.lines if "serving at" in line)
        assert f":{studio.port}" not in served
    finally:
        taken.stop()


def test_a_job_failing_at_run_time_shows_its_error_and_the_queue_goes_on(studio):
    from tests.test_app_browser import musubi_lora
    musubi_lora(studio.lora_dir / "test" / "too_wide.safetensors", dim=512)  # made for a wider model
    c = api_client(studio)
    bad = c.predict(request_json(loras=[{"path": "test/too_wide.safetensors", "multiplier": "1"}]),
                    api_name="/queue_job")
    good = c.predict(request_json(prompt="after the failure"), api_name="/queue_job")
    failed = wait_job(c, bad)
    assert failed["status"] == "failed" and "loras" in failed["error"] and "too_wide" in failed["error"]
    assert wait_job(c, good)["status"] == "done"


def test_a_job_holding_a_lone_surrogate_survives_save_restart_and_page_load(tmp_path, checkpoints):
    """One such job used to fail the page's load and refresh for every session, across restarts."""
    from wan.app.jobqueue import JobQueue

    def refuse(job, progress, cancel):
        raise ValueError(f"prompt: {job.request['prompt']!r} is not allowed")
    base = tmp_path / "studio"
    q = JobQueue(base / "state" / "queue.json", refuse)  # saved as the server saves it
    q.add({"model": "test-tiny-t2v", "prompt": "snow \ud83e fox"}, "someone")
    q.start()
    assert q.wait_idle(30) and q.stop(30)
    server = StudioServer(base, checkpoints).start()
    try:
        c = api_client(server)
        start = c.predict("my-session", "test-tiny-t2v", None, api_name="/start")
        assert start[0] == "my-session"
        status, _, table, *_ = c.predict("my-session", None, False, api_name="/tick")
        assert [row[3] for row in table["data"]] == ["test-tiny-t2v: snow \ufffd fox"]
    finally:
        server.stop()
