"""Downloading a model from the page (issue 12): the readiness text under the picker, the disk check
before queueing, the queue job with its byte progress, cancelling (a partial file stays for the next
try), and the token hint for a gated repo. The Hub is replaced by a fake that writes in chunks through
the progress-bar class the downloader gives it, as ``hf_hub_download`` does."""

from pathlib import Path

import pytest

from wan.app.downloads import DOWNLOAD_KEY, queue_download, readiness_text, run_download
from wan.app.settings import ServerSettings
from wan.app.state import AppState
from wan.engine.loop import Cancelled, CancelToken
from wan.loading import download
from wan.registry import get_model

MODEL = "wan2.1-t2v-1.3B"
CHUNK = 400_000


class ChunkedHub:
    """Writes each file in ``chunks`` chunks through ``tqdm_class`` into a side file, renamed at the
    end (as the Hub client does); ``on_chunk(n)`` runs after each chunk."""

    def __init__(self, chunks: int = 3, on_chunk=None, fail=None):
        self.chunks, self.on_chunk, self.fail, self.calls = chunks, on_chunk, fail, []

    def __call__(self, repo_id, filename, local_dir, force_download, progress, tqdm_class=None):
        self.calls.append(filename)
        if self.fail is not None:
            raise self.fail
        target = Path(local_dir) / filename
        side = Path(local_dir) / ".cache" / (filename.replace("/", "_") + ".incomplete")
        side.parent.mkdir(parents=True, exist_ok=True)
        bar = tqdm_class(total=self.chunks * CHUNK, initial=0)
        for i in range(self.chunks):
            with side.open("ab") as f:
                f.write(b"x" * CHUNK)
            bar.update(CHUNK)
            if self.on_chunk is not None:
                self.on_chunk(i)
        bar.close()
        target.parent.mkdir(parents=True, exist_ok=True)
        side.rename(target)
        return str(target)


@pytest.fixture
def state(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(download, "hub_unreachable", lambda: None)
    monkeypatch.setattr(download, "free_bytes", lambda folder: 500 * 10**9)
    settings = ServerSettings(output_dir=str(tmp_path / "out"), state_dir=str(tmp_path / "state"),
                              checkpoint_dir=str(tmp_path / "ckpt"))
    return AppState(settings, engine_factory=lambda: None)


def test_the_readiness_text_lists_each_missing_file_with_its_size_and_place(state, tmp_path):
    text = readiness_text(state, MODEL)
    # 2.9 GB of DiT, 0.5 GB of VAE, 11.4 GB of umT5 (bf16), estimated from the architecture
    assert text.startswith("⬇ **Not on this machine.** Missing, ~14.7 GB in all:")
    assert f"- transformer (~2.9 GB): `{tmp_path / 'ckpt'}" in text and "- text_encoder (~11.4 GB)" in text
    assert "Free disk space there: 500.0 GB." in text and f"python wgp.py download {MODEL}" in text
    assert "HF_TOKEN is not set" in text
    assert readiness_text(state, "test-tiny-t2v").startswith("✓ Ready: transformer (made on first use: `")


def test_a_download_is_refused_before_queueing_when_the_disk_is_too_small(state, monkeypatch):
    monkeypatch.setattr(download, "free_bytes", lambda folder: 2 * 10**9)
    with pytest.raises(ValueError, match=r"not enough free disk space under .*: 14\.7 GB needed, 2\.0 GB free"):
        queue_download(state, MODEL, "s1")
    assert "⚠️ not enough free disk space" in readiness_text(state, MODEL)
    with pytest.raises(ValueError, match="is ready on this machine: nothing to download"):
        queue_download(state, "test-tiny-t2v", "s1")
    assert state.queue.jobs() == []


def test_a_download_job_reports_its_bytes_and_leaves_the_model_ready(state, monkeypatch):
    hub = ChunkedHub()
    monkeypatch.setattr(download, "_hub_download", hub)
    job = queue_download(state, MODEL, "s1")
    assert job.request == {DOWNLOAD_KEY: MODEL} and job.label == "download: Wan 2.1 Text-to-Video 1.3B (~14.7 GB)"
    seen = []
    outcome = run_download(state, job, seen.append, CancelToken())
    files = download.plan_files(get_model(MODEL), state.settings.checkpoint_dir)
    assert len(hub.calls) == len(files) and all(f.is_present() for f in files)
    assert [p.step for p in seen] == sorted(p.step for p in seen) and seen[-1].step == len(files) * 3 * CHUNK // 10**6
    assert {p.expert for p in seen} == {"download"} and seen[0].total == 14_742  # megabytes of the estimate
    assert outcome.notices == ["Wan 2.1 Text-to-Video 1.3B is ready: text_encoder, tokenizer, transformer, vae"]
    assert readiness_text(state, MODEL).startswith("✓ Ready")


def test_the_queue_runs_a_download_job_to_the_end(state, monkeypatch):
    monkeypatch.setattr(download, "_hub_download", ChunkedHub(chunks=1))
    state.queue.start()
    try:
        job = queue_download(state, MODEL, "s1")
        done = state.queue.wait_finished(job.id, timeout=60)
    finally:
        state.queue.stop(timeout=5)
    assert done.status == "done" and done.notices[0].endswith("is ready: text_encoder, tokenizer, transformer, vae")


def test_cancelling_stops_between_chunks_and_keeps_the_partial_file(state, monkeypatch):
    token = CancelToken()
    hub = ChunkedHub(on_chunk=lambda i: token.cancel() if i == 0 else None)
    monkeypatch.setattr(download, "_hub_download", hub)
    job = queue_download(state, MODEL, "s1")
    with pytest.raises(Cancelled, match="starting it again resumes it"):
        run_download(state, job, lambda p: None, token)
    assert len(hub.calls) == 1  # stopped inside the first file
    partial = list(Path(state.settings.checkpoint_dir).rglob("*.incomplete"))
    assert len(partial) == 1 and partial[0].stat().st_size == 2 * CHUNK  # kept for the next try
    assert not download.plan_files(get_model(MODEL), state.settings.checkpoint_dir)[0].is_present()


def test_a_refused_gated_download_says_to_set_hf_token(state, monkeypatch):
    class Refused(Exception):
        response = type("R", (), {"status_code": 401})()
    monkeypatch.setattr(download, "_hub_download", ChunkedHub(fail=Refused("401 Client Error")))
    job = queue_download(state, MODEL, "s1")
    with pytest.raises(download.DownloadError) as err:
        run_download(state, job, lambda p: None, CancelToken())
    assert "this repo needs a Hugging Face token: HF_TOKEN is not set" in str(err.value)
