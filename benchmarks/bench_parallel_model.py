"""Parallel generation: what the performance model (``wan.parallel.perf_model``) predicts for the
real Wan sizes on H100s, and, on this CPU, the bytes a 2-process TEST generation actually sent
against the model's prediction for it.

    .venv/bin/python benchmarks/bench_parallel_model.py            # tables + the 2-process check (~1 min)
    .venv/bin/python benchmarks/bench_parallel_model.py --no-run   # tables only (instant)

Tables: per-step compute of 14B at 720p/81 frames and 1.3B at 480p/81 frames (two passes of
classifier-free guidance); the bytes each rank sends per block with Ulysses and per step with CFG
parallel (bf16); the predicted speed-up of the best layout on 2/4/8 H100 over NVLink and PCIe.
The model's assumptions are in the docstring of ``wan/parallel/perf_model.py``. No GPU here: the
speed-ups are predictions, not measurements.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from wan.parallel import perf_model as pm  # noqa: E402

CASES = [  # (label, registry model, width, height, frames)
    ("14B 720p 81f", "wan2.1-t2v-14B", 1280, 720, 81),
    ("1.3B 480p 81f", "wan2.1-t2v-1.3B", 832, 480, 81),
]


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def shapes(arch, width: int, height: int, frames: int) -> tuple[int, tuple[int, int, int, int]]:
    tokens = pm.video_tokens(frames, height, width, patch_size=arch.patch_size)
    latent = (arch.out_dim, (frames - 1) // 4 + 1, height // 8, width // 8)
    return tokens, latent


def tables() -> None:
    from wan.registry import default_registry
    registry = default_registry()
    print("## Per-step compute (2 passes, batch 1)\n")
    print("| case | tokens | TFLOP / step | one H100 (45% of 989 TFLOP/s) |")
    print("|---|---|---|---|")
    for label, model, w, h, f in CASES:
        arch = registry.get(model).arch
        tokens, _ = shapes(arch, w, h, f)
        flops = pm.step_flops(arch, tokens)
        print(f"| {label} | {tokens} | {flops / 1e12:.0f} | {flops / pm.H100_NVLINK.flops:.2f} s |")

    print("\n## Bytes each rank sends (bf16)\n")
    print("| case | Ulysses 2 / block | Ulysses 4 / block | Ulysses 8 / block | CFG parallel / step |")
    print("|---|---|---|---|---|")
    for label, model, w, h, f in CASES:
        arch = registry.get(model).arch
        tokens, latent = shapes(arch, w, h, f)
        cells = [mib(pm.ulysses_block_bytes(arch, tokens, n)) if arch.num_heads % n == 0
                 else f"- ({arch.num_heads} heads)" for n in (2, 4, 8)]
        print(f"| {label} | {' | '.join(cells)} | {mib(pm.cfg_step_bytes(latent, 2, 2))} |")

    print("\n## Predicted speed-up of the best layout (cfg x ulysses)\n")
    print("| case | link | 2 GPUs | 4 GPUs | 8 GPUs |")
    print("|---|---|---|---|---|")
    for label, model, w, h, f in CASES:
        arch = registry.get(model).arch
        tokens, latent = shapes(arch, w, h, f)
        for hw in (pm.H100_NVLINK, pm.H100_PCIE):
            cells = []
            for gpus in (2, 4, 8):
                p = pm.best(arch, tokens, latent, gpus, hw)
                cells.append("-" if p is None else
                             f"{p.speedup:.2f}x ({p.cfg_size}x{p.ulysses_size}, comm {p.comm_s / p.step_s:.0%})")
            print(f"| {label} | {hw.name} | {' | '.join(cells)} |")

    print("\n## The same with Ulysses alone (no --cfg_parallel)\n")
    print("| case | link | 2 GPUs | 4 GPUs | 8 GPUs |")
    print("|---|---|---|---|---|")
    for label, model, w, h, f in CASES:
        arch = registry.get(model).arch
        tokens, latent = shapes(arch, w, h, f)
        for hw in (pm.H100_NVLINK, pm.H100_PCIE):
            cells = []
            for gpus in (2, 4, 8):
                if arch.num_heads % gpus:
                    cells.append(f"- ({arch.num_heads} heads)")
                    continue
                p = pm.predict(arch, tokens, latent, hw, 1, gpus)
                cells.append(f"{p.speedup:.2f}x (comm {p.comm_s / p.step_s:.0%})")
            print(f"| {label} | {hw.name} | {' | '.join(cells)} |")


# ---------------------------------------------------------------------------------------------
# The 2-process TEST run

RUNS = {"ulysses 2": dict(ulysses_size=2), "cfg 2": dict(cfg_parallel=True)}


def worker(out: Path, ckpts: Path) -> None:
    """One rank of the TEST run (under torchrun): each layout's generation, bytes sent."""
    import torch
    from wan.engine import Engine, GenerationRequest
    from wan.parallel import ParallelConfig, parallel_session
    torch.set_num_threads(1)
    rank, res = int(os.environ["RANK"]), {}
    with parallel_session(ParallelConfig(ulysses_size=2)):
        engine = Engine(checkpoint_dir=ckpts, device="cpu")
        for name, config in RUNS.items():
            begin = time.perf_counter()
            result = engine.generate(GenerationRequest(model="test-tiny-t2v", prompt="a fox", steps=4, seed=1),
                                     write=False, parallel=ParallelConfig(**config))
            res[name] = {"comm": result.comm_bytes, "passes": [len(s.passes) for s in result.steps],
                         "latent": tuple(result.latent.shape), "seconds": time.perf_counter() - begin}
    torch.save(res, out / f"rank{rank}.pt")


def counted_vs_predicted() -> None:
    import torch
    from wan.registry import default_registry
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    arch = default_registry().get("test-tiny-t2v").arch
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ensure_tiny_checkpoints(tmp / "ck")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        begin = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(port), __file__, "--worker", str(tmp), str(tmp / "ck")], env=env, cwd=ROOT,
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the 2-process run failed:\n{r.stderr[-3000:]}")
        seconds = time.perf_counter() - begin
        ranks = [torch.load(tmp / f"rank{i}.pt", weights_only=False) for i in range(2)]
    print(f"\n## Counted vs predicted: test-tiny-t2v, 4 steps, 2 CPU processes (gloo, float32), "
          f"launch {seconds:.0f} s\n")
    print("| layout | rank | collective | counted bytes | predicted bytes | equal |")
    print("|---|---|---|---|---|---|")
    for name in RUNS:
        for rank, res in enumerate(ranks):
            run = res[name]
            c, f, h, w = run["latent"]
            if name.startswith("ulysses"):
                tokens = f * (h // arch.patch_size[1]) * (w // arch.patch_size[2])
                per = pm.ulysses_forward_bytes(arch, tokens, 2, elem_bytes=4)
                predicted = {k: v * sum(run["passes"]) for k, v in per.items()}
            else:
                predicted = {"all_gather": sum(pm.cfg_step_bytes((c, f, h, w), 2, p) for p in run["passes"])}
            for kind in sorted(set(predicted) | set(run["comm"])):
                got, want = run["comm"].get(kind, 0), predicted.get(kind, 0)
                print(f"| {name} | {rank} | {kind} | {got} | {want} | {'yes' if got == want else 'NO'} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-run", action="store_true", help="print the model's tables only")
    p.add_argument("--worker", nargs=2, metavar=("OUT", "CKPTS"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(Path(args.worker[0]), Path(args.worker[1]))
        return
    tables()
    if not args.no_run:
        counted_vs_predicted()


if __name__ == "__main__":
    main()
