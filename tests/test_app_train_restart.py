"""Training jobs through a real server (``wgp.py serve`` in a subprocess, TEST t2v model, CPU), driven by
its script endpoints (``/queue_train``, ``/queue_job``, ``/job``):

- a generation queued while a training run holds at step 10 waits, and runs once the run is done;
- a second run with the same settings is killed mid-training (SIGKILL of the server); the state the
  next start loads (``AppState``, in this process) does not start it again by itself but marks it
  interrupted and offers its resumption; resumed from its last saved state (the queue's worker and the
  app's runner), it ends with exactly the LoRA of the uninterrupted run (fixed seed, CPU);
- a run that fails shows its error, and the queue goes on with the LoRA folder as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.app_harness import api_client
from tests.helpers import wait_until
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.app.train_jobs import queue_resume, queue_training, resume_offer
from wan.app.train_live import status_text
from tests.app_train_harness import HeldTrainingServer, write_dataset
from wan.app.train_dataset import DatasetChoice, folder_toml
from wan.testing.tiny_family import ensure_tiny_checkpoints


@pytest.fixture(autouse=True)
def _one_thread():  # as the server's worker (OMP_NUM_THREADS=1): the same arithmetic, bit for bit
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wait_for(condition, what: str = "the condition"):
    return wait_until(condition, 90.0, what, interval=0.1)


def logged_steps(run) -> int:
    try:
        lines = run.read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.strip().endswith("}")]
    return max(steps, default=0)


def test_a_killed_run_is_offered_for_resumption_and_ends_as_an_uninterrupted_run(tmp_path_factory):
    checkpoints = tmp_path_factory.getbasetemp() / "tiny_ckpts"  # shared with the training tests of a session
    ensure_tiny_checkpoints(checkpoints)
    base = tmp_path_factory.mktemp("train_restart")
    clips = write_dataset(base / "datasets" / "clips", {"a": "a red square moving", "b": "a blue square moving"})
    toml = clips / "data.toml"
    toml.write_text(folder_toml(clips, DatasetChoice(32, 32, 9), images=False, videos=True))

    def request(name: str) -> str:
        return json.dumps({"train": {"model": "test-tiny-t2v", "dataset_config": str(toml), "output_name": name,
                                     "network_dim": 4, "network_alpha": 4, "learning_rate": 1e-3,
                                     "max_train_steps": 20, "seed": 3, "save_every_n_steps": 5},
                           "trigger_words": "sqr"})

    def run_log(name: str):
        return base / "outputs" / "train" / name / f"{name}.log.jsonl"

    server = HeldTrainingServer(base, checkpoints).start()
    try:
        client = api_client(server)

        def job(job_id: str) -> dict:
            return client.predict(job_id, api_name="/job")
        server.gate.touch()
        whole = client.predict(request("whole"), api_name="/queue_train")
        wait_for(lambda: logged_steps(run_log("whole")) >= 10, what="step 10 of the first run")
        generation = client.predict(json.dumps({"model": "test-tiny-t2v", "prompt": "a fox", "steps": 2, "frames": 5,
                                                "width": 32, "height": 32}), api_name="/queue_job")
        assert job(generation)["status"] == "queued" and job(whole)["status"] == "running"
        server.gate.unlink()
        wait_for(lambda: job(generation)["status"] == "done", what="the generation")
        saved = {j["id"]: j for j in json.loads((server.state_dir / "queue.json").read_text())["jobs"]}
        assert saved[whole]["status"] == "done" and saved[generation]["started"] >= saved[whole]["finished"]

        # the same run again, killed while it trains (its state saved at step 10)
        server.gate.touch()
        cut = client.predict(request("cut"), api_name="/queue_train")
        wait_for(lambda: logged_steps(run_log("cut")) >= 10, what="step 10 of the second run")
        wait_for(lambda: (run_log("cut").parent / "cut-step00000010-state" / "progress.json").exists())
        server.proc.kill()
        server.proc.wait()
    finally:
        server.stop()
    server.gate.unlink()

    # the server starts again (its state, as AppState loads it): the run is offered, not restarted
    settings = ServerSettings(output_dir=str(server.output_dir), state_dir=str(server.state_dir),
                              lora_dir=str(server.lora_dir), checkpoint_dir=str(checkpoints),
                              datasets_dir=str(base / "datasets"))
    state = AppState(settings)
    interrupted = state.queue.get(cut)
    assert interrupted.status == "failed" and interrupted.error.startswith("interrupted: the server stopped")
    assert [j.id for j in state.queue.jobs(include_finished=False)] == []  # nothing started by itself
    folder, step = resume_offer(state, interrupted)
    assert folder.name == "cut-step00000010-state" and step == 10
    assert "Resume** continues it from step 10" in status_text(state, interrupted)
    resumed = queue_resume(state, cut, "api")
    assert resume_offer(state, state.queue.get(cut)) is None  # offered once: the resumed job has it now
    state.queue.start()
    try:
        assert state.queue.wait_idle(90)
    finally:
        state.queue.stop(timeout=10)
    done = state.queue.get(resumed.id)
    assert done.status == "done", done.error
    # a run that fails shows its error; the queue goes on and the LoRA folder is as it was
    loras = sorted(p.name for p in (base / "loras").rglob("*"))
    broken = queue_training(state, {"train": {"model": "test-tiny-t2v", "dataset_config": str(toml), "seed": 3,
                                              "output_name": "broken", "max_train_steps": 5,
                                              "optimizer_type": "NoSuchOptimizer"}}, "api")
    after = state.queue.add({"model": "test-tiny-t2v", "prompt": "after it", "steps": 1, "frames": 1, "width": 32,
                             "height": 32}, "api")
    state.queue.start()
    try:
        assert state.queue.wait_idle(90)
    finally:
        state.queue.stop(timeout=10)
    failed = state.queue.get(broken.id)
    assert failed.status == "failed" and "NoSuchOptimizer" in failed.error, failed.error
    assert state.queue.get(after.id).status == "done"
    assert sorted(p.name for p in (base / "loras").rglob("*")) == loras
    reference, resumed_lora = (load_file(str(base / "loras" / "test" / f"{n}.safetensors")) for n in ("whole", "cut"))
    assert reference.keys() == resumed_lora.keys()
    assert all((reference[k] == resumed_lora[k]).all() for k in reference), "the resumed LoRA differs"
    assert logged_steps(run_log("cut")) == 20
    with safe_open(str(base / "loras" / "test" / "cut.safetensors"), "pt") as fh:
        assert fh.metadata()["modelspec.trigger_phrase"] == "sqr"
    preset = json.loads((base / "loras" / "presets" / "whole.json").read_text())
    assert preset == {"format": "wan-studio-lora-preset", "version": 1, "prompt": "sqr",
                      "loras": [{"name": "test/whole", "multiplier": "1.0"}]}
