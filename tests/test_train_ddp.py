"""Training in several processes (wan.train.distributed): ``torchrun --nproc_per_node 2 wgp.py train`` on the
CPU (gloo) against one process with twice the batch size, on the TEST t2v model and tiny caches.

Why the two runs can be compared tensor for tensor: with N processes a global batch is ``batch_size * N``
items, cut and ordered exactly as one process with that batch size cuts them (wan.train.data), and rank r
takes the r-th contiguous part. Noise and timesteps are drawn for the whole global batch from one generator
seeded with ``--seed``, the same on every rank, and each rank keeps its own items' rows: item i of a global
batch gets the same noise and timestep in both runs. Each rank's loss is weighted by its share of the global
batch and the LoRA gradients are summed over the ranks at each optimizer step (not on accumulation
micro-steps), so each step is the one-process step; what remains is float32 rounding (a batch of 2 against
two batches of 1, and the order of a sum). SGD keeps that rounding visible as it is: measured, the LoRAs
differ by at most 4e-9 (AdamW divides each gradient by its own size, so the tiniest gradients' rounding
becomes a visible difference, up to 5e-6 on weights of 1e-3: a property of AdamW, not of the sharding).

Five clips make global batches of 2, 2 and 1: in the last one rank 1 has no item (it still draws, so the
shared generator stays in step, and takes part in the gradient sum with zeros).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_loop import clips, write_dataset
from wan.testing.tiny_family import ensure_tiny_checkpoints
from wan.train.config import TrainConfig
from wan.train.trainer import Trainer
from tests.train_harness import one_thread  # noqa: F401 (fixtures)

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 120  # seconds: a hung collective fails the test instead of the suite

# Runs wgp.py in a torchrun worker and records, per rank, what it wrote under the output folder (Python's
# audit events: open for writing, mkdir, rename, remove) and whether torch.distributed was still
# initialised when the interpreter exited (it must not be: the trainer destroys its process group).
AUDITED_WGP = textwrap.dedent("""
    import atexit, json, os, runpy, sys
    out, rank = os.environ["AUDIT_OUTPUT_DIR"], os.environ.get("RANK", "0")
    writes = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, os.PathLike)):
            mode, flags = args[1], args[2] if len(args) > 2 else 0
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & (os.O_WRONLY | os.O_RDWR))
            if writing and os.fspath(args[0]).startswith(out):
                writes.append(["open", os.fspath(args[0])])
        elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree") and args:
            if isinstance(args[0], (str, os.PathLike)) and os.fspath(args[0]).startswith(out):
                writes.append([event, os.fspath(args[0])])

    @atexit.register
    def report():
        import torch.distributed as dist
        with open(os.environ["AUDIT_REPORT"] + f".rank{rank}.json", "w") as fh:
            json.dump({"writes": writes, "initialized": dist.is_initialized()}, fh)

    sys.addaudithook(hook)
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


def settings(tmp_path) -> dict:
    checkpoints = tmp_path / "ckpt"
    ensure_tiny_checkpoints(checkpoints)
    return dict(model="test-tiny-t2v", checkpoint_dir=str(checkpoints), output_name="lora", network_dim=4,
                network_alpha=4, optimizer_type="SGD", learning_rate=0.5, max_grad_norm=0.5, max_train_steps=4,
                gradient_accumulation_steps=2, seed=5, timestep_sampling="shift", discrete_flow_shift=3.0,
                save_every_n_steps=2, save_state=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, name: str, flags: dict, nproc: int = 2) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """``wgp.py train`` with ``flags`` under torchrun; the output and each rank's audit report."""
    script = tmp_path / "audited_wgp.py"
    script.write_text(AUDITED_WGP)
    argv = []
    for key, value in flags.items():
        argv += [f"--{key}"] + ([] if value is True else [str(value)])
    report = tmp_path / f"{name}-audit"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "PYTHONPATH": str(ROOT), "AUDIT_OUTPUT_DIR": flags["output_dir"], "AUDIT_REPORT": str(report)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), str(script), str(ROOT / "wgp.py"), "train", *argv]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    audits = []
    for rank in range(nproc):
        path = Path(f"{report}.rank{rank}.json")
        audits.append(json.loads(path.read_text()) if path.exists() else None)
    return done, audits


def test_two_processes_train_the_lora_one_process_trains_with_twice_the_batch(tmp_path):
    base = settings(tmp_path)
    latents = clips(5, (16, 2, 4, 4))
    per_rank = write_dataset(tmp_path / "data1", latents, batch_size=1, size=(32, 32))
    doubled = write_dataset(tmp_path / "data2", latents, batch_size=2, size=(32, 32))

    started = time.time()
    one = Trainer(TrainConfig.of(**base, dataset_config=str(doubled), output_dir=str(tmp_path / "one")),
                  progress=False, say=lambda line: None).run()
    assert one.step == 4
    two_dir = tmp_path / "two"
    done, (rank0, rank1) = torchrun(tmp_path, "train", {**base, "dataset_config": str(per_rank),
                                                          "output_dir": str(two_dir)})
    elapsed = time.time() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes (gloo), rank 0 on cpu" in done.stdout + done.stderr

    # the same LoRA: float32 rounding only (see the module docstring), and it did move from its start
    a, b = load_file(str(one.lora_path)), load_file(str(two_dir / "lora.safetensors"))
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7, msg=key)
    assert max(float(a[k].abs().max()) for k in a if "lora_up" in k) > 1e-4  # lora_up starts at zero
    # the same loss at every step: the logged loss of two ranks is the global batch's
    logged = [[json.loads(line)["loss"] for line in (folder / "lora.log.jsonl").read_text().splitlines()]
              for folder in (tmp_path / "one", two_dir)]
    assert len(logged[1]) == 4 and logged[1] == pytest.approx(logged[0], rel=1e-6)
    # rank 0 wrote everything, rank 1 nothing; both left the process group before exiting
    assert rank0["writes"] and rank1["writes"] == [], rank1
    assert rank0["initialized"] is False and rank1["initialized"] is False
    names = sorted(p.name for p in two_dir.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "one").iterdir())
    # a saved state holds every rank's own generator (LoRA dropout), for a resume with 2 processes
    rng = torch.load(two_dir / "lora-state" / "rng.pt", weights_only=True)
    assert len(rng["ranks"]) == 2 and not torch.equal(rng["ranks"][0]["torch"], rng["ranks"][1]["torch"])
    print(f"one process + torchrun x2: {elapsed:.1f} s")


def test_a_failing_run_leaves_the_process_group_on_every_rank(tmp_path):
    flags = {**settings(tmp_path), "dataset_config": str(write_dataset(tmp_path / "d", clips(2, (16, 1, 4, 4)),
                                                                        size=(32, 32), frames=1)),
             "output_dir": str(tmp_path / "out"), "resume": str(tmp_path / "no-such-state")}
    done, audits = torchrun(tmp_path, "fail", flags)
    assert done.returncode != 0 and "--resume" in done.stderr, done.stderr[-2000:]
    assert all(a is not None and a["initialized"] is False for a in audits), audits
    assert all(a["writes"] == [] for a in audits)


def test_rank_parts_put_together_are_the_batches_of_one_process_with_the_global_batch_size(tmp_path):
    from wan.train.data import CacheBatches, FixedBatches, for_rank
    from wan.train.dataset_config import load_dataset_config
    latents = clips(5, (16, 1, 4, 4))
    per_rank = load_dataset_config(write_dataset(tmp_path / "d1", latents, batch_size=2, size=(32, 32), frames=1))
    doubled = load_dataset_config(write_dataset(tmp_path / "d2", latents, batch_size=4, size=(32, 32), frames=1))
    one = CacheBatches(doubled, seed=3)
    ranks = [CacheBatches(per_rank, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2  # global batches of 4 and 1
    for epoch in (1, 2):
        for whole, part0, part1 in zip(one.batches(epoch), ranks[0].batches(epoch), ranks[1].batches(epoch)):
            assert part0.names + part1.names == whole.names
            assert torch.equal(torch.cat([part0.latents, part1.latents]), whole.latents)
            assert (part0.offset, part1.offset, part0.total, part1.total) == (0, len(part0), len(whole), len(whole))
    short = [b for b in ranks[1].batches(1) if len(b) == 0]  # the batch of 1: rank 1 has no item
    assert len(short) == 1 and short[0].total == 1 and short[0].latents.shape == (0, 16, 1, 4, 4)
    # a source that does not cut per rank is sliced batch by batch
    fixed = FixedBatches(list(one.batches(1)))
    assert [b.names for b in for_rank(fixed, 1, 2).batches(1)] == [b.names for b in ranks[1].batches(1)]


def test_the_launch_is_read_from_the_launcher_environment_and_parts_are_balanced():
    from wan.train.distributed import Launch, shard_range
    from wan.train.errors import TrainingError
    assert Launch.from_env({}) == Launch(0, 1, 0)
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert Launch.from_env(env) == Launch(3, 4, 1)
    with pytest.raises(TrainingError, match="without MASTER_ADDR"):
        Launch.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(TrainingError, match="not a valid launch"):
        Launch.from_env({**env, "RANK": "4"})
    assert [shard_range(8, r, 4) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [shard_range(3, r, 2) for r in range(2)] == [(0, 2), (2, 3)]
    assert [shard_range(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
