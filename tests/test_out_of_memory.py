"""A generation that runs out of memory (on the device, or the machine's RAM) fails with where it
happened and the settings that use less there, unloads its models, and the next job runs as if
nothing had happened. The out-of-memory errors are raised by stand-ins of the model calls (a CPU
has no CUDA allocator to exhaust)."""

import pytest
import torch

from wan.engine import Engine, GenerationRequest
from wan.engine.out_of_memory import GenerationOutOfMemory
from wan.testing.tiny_family import ensure_tiny_checkpoints

REQUEST = GenerationRequest(model="test-tiny-t2v", prompt="a fox", seed=3, steps=3, frames=5, guidance=1.0)
CUDA_OOM = "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 11.99 GiB"


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)


def test_out_of_memory_while_decoding_names_vae_tiling_and_the_next_job_runs(engine, monkeypatch):
    expected = engine.generate(REQUEST, write=False)
    vae_type = type(engine.models.current.vae)

    def full(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError(CUDA_OOM)
    monkeypatch.setattr(vae_type, "decode", full)
    with pytest.raises(GenerationOutOfMemory) as e:
        engine.generate(REQUEST.replace(profile="default"), write=False)
    text = str(e.value)
    assert text.startswith("out of memory on cpu while decoding under profile default (CUDA out of memory. Tried")
    assert "--set vae.tiling=on" in text and "The models were unloaded" in text and e.value.stage == "decoding"
    assert engine.models.current is None  # unloaded: the next job starts from a clean device
    monkeypatch.undo()
    again = engine.generate(REQUEST, write=False)
    assert torch.equal(again.latent, expected.latent) and torch.equal(again.video, expected.video)


def test_out_of_memory_while_denoising_names_the_step_and_what_uses_less(engine, monkeypatch):
    engine.generate(REQUEST.replace(steps=1), write=False)  # loaded
    dit = engine.models.current.dit
    calls = []

    def forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.cuda.OutOfMemoryError(CUDA_OOM)
        return type(dit).forward(dit, *args, **kwargs)
    monkeypatch.setattr(dit, "forward", forward)
    with pytest.raises(GenerationOutOfMemory) as e:
        engine.generate(REQUEST, write=False)
    assert "while denoising (step 2 of 3)" in str(e.value) and "--sliding_window_size" in str(e.value)
    assert "LowRAM_LowVRAM" in str(e.value)


def test_running_out_of_ram_while_loading_names_the_profiles_that_stream(engine, monkeypatch):
    engine.models.release()

    def no_ram(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(engine.models, "_load", no_ram)
    with pytest.raises(GenerationOutOfMemory) as e:
        engine.generate(REQUEST, write=False)
    assert str(e.value).startswith("out of memory on the machine's RAM while loading the models (MemoryError)")
    assert "quantize.transformer=fp8" in str(e.value)


def test_the_app_and_the_cli_show_the_message_without_a_class_name(engine, monkeypatch, capsys, tmp_path):
    from wan import cli
    from wan.app.jobs import error_message, expected_failure
    from wan.engine.out_of_memory import out_of_memory
    error = out_of_memory(torch.cuda.OutOfMemoryError(CUDA_OOM), "decoding", "cuda:0", None)
    assert error_message(error).startswith("out of memory on cuda:0 while decoding (CUDA out of memory")
    assert expected_failure(error)  # one line in the server log, not a traceback

    def fails(self, *args, **kwargs):
        raise error
    monkeypatch.setattr(Engine, "generate", fails)
    code = cli.main(["generate", "--model", "test-tiny-t2v", "--prompt", "a fox", "--checkpoint_dir",
                     str(engine.models.checkpoint_dir), "--output_dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "error: out of memory on cuda:0 while decoding" in err and "GenerationOutOfMemory" not in err
