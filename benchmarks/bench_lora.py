"""LoRAs at Wan 2.1 1.3B shape on CPU: switching LoRAs between jobs against reloading the model,
and the per-step cost of hooks against merged weights.

    .venv/bin/python benchmarks/bench_lora.py                 # markdown tables out
    .venv/bin/python benchmarks/bench_lora.py --frames 2 --size 128 --runs 5 --rank 32

The DiT is bench_dit.py's checkpoint (random bf16 weights in the official layout, written once to
benchmarks/.cache/), loaded with ``wan.load_transformer`` in bf16 as the model manager does. Two
LoRA files of rank ``--rank`` on every attention and FFN linear (self/cross q, k, v, o and
ffn.0/ffn.2 of the 30 blocks: 300 layers) are written next to it in musubi-tuner's layout, bf16.

Everything runs in one process, side by side:

(a) a switch between two jobs: detach the previous job's LoRA, then ``prepare_loras`` (read the
    file, check it against the model) and attach the new one, in hooks and in merge mode, against
    loading the model from its checkpoint file again (the page cache is warm for both): in this
    process after dropping a loaded copy (what the model manager's release + load does; the
    allocator reuses the freed memory) and in a fresh process (new memory pages to fault in);
(b) one DiT forward (a sampling step without CFG) with no LoRA, with the LoRA as hooks and with
    it merged, timed interleaved (none, hooks, merged, none, ...) and compared as medians;
(c) merging (attach in merge mode) and unmerging (detach), with a check that the weights are
    bit-identical afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from bench_dit import CACHE, SHAPE_13B, checkpoint_path, make_inputs, write_checkpoint  # noqa: E402
from memory import run_case  # noqa: E402

DTYPE = torch.bfloat16
MODULES = ("self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o",
           "cross_attn_q", "cross_attn_k", "cross_attn_v", "cross_attn_o", "ffn_0", "ffn_2")


def lora_path(rank: int, which: str) -> Path:
    return CACHE / f"lora_1.3b_shape_r{rank}_{which}.safetensors"


def write_lora(path: Path, rank: int, seed: int) -> None:
    """A rank-``rank`` LoRA on all attention and FFN linears, musubi names, bf16, alpha = rank."""
    from safetensors.torch import save_file
    d, ffn = SHAPE_13B["dim"], SHAPE_13B["ffn_dim"]
    shapes = {m: (d, d) for m in MODULES} | {"ffn_0": (ffn, d), "ffn_2": (d, ffn)}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for b in range(SHAPE_13B["num_layers"]):
        for m, (out_f, in_f) in shapes.items():
            key = f"lora_unet_blocks_{b}_{m}"
            state[f"{key}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).to(DTYPE)
            state[f"{key}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).to(DTYPE)
            state[f"{key}.alpha"] = torch.tensor(float(rank), dtype=DTYPE)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)


def load_model(path: Path):
    import wan
    return wan.load_transformer(path, dtype=DTYPE)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def prepare(path: Path, dit, mode: str):
    from wan.engine.request import LoraChoice
    from wan.lora.job import prepare_loras
    return prepare_loras([LoraChoice(str(path), "1.0")], {"transformer": dit}, mode=mode)


def measure_switch(dit, paths: list[Path], mode: str, runs: int) -> dict:
    """Median times of detach(previous) + prepare(next) + attach(next), and of each part."""
    dits = {"transformer": dit}
    job = prepare(paths[0], dit, mode)
    job.attach(dits)
    parts = {"detach": [], "prepare": [], "attach": [], "switch": []}
    for i in range(runs):
        t0 = time.perf_counter()
        job.detach()
        t1 = time.perf_counter()
        job = prepare(paths[(i + 1) % 2], dit, mode)
        t2 = time.perf_counter()
        job.attach(dits)
        t3 = time.perf_counter()
        for k, v in (("detach", t1 - t0), ("prepare", t2 - t1), ("attach", t3 - t2), ("switch", t3 - t0)):
            parts[k].append(v)
    job.detach()
    return {k: statistics.median(v) for k, v in parts.items()}


def measure_steps(dit, path: Path, inputs, runs: int) -> tuple[dict, dict, dict]:
    """Forward times (none / hooks / merged) interleaved, attach/detach times of both modes, and
    the outputs of the warm-up round."""
    dits = {"transformer": dit}
    jobs = {mode: prepare(path, dit, mode) for mode in ("hooks", "merge")}
    fwd = {"none": [], "hooks": [], "merged": []}
    edges = {"hooks attach": [], "hooks detach": [], "merge": [], "unmerge": []}
    outs = {}

    def forward():
        with torch.inference_mode():
            return dit(*inputs)
    for r in range(runs + 1):  # round 0 warms up
        for case in ("none", "hooks", "merged"):
            job = jobs["hooks" if case == "hooks" else "merge"]
            if case != "none":  # attached outside inference mode, as the engine does
                _, t_on = timed(lambda job=job: job.attach(dits))
            out, t = timed(forward)
            if case != "none":
                _, t_off = timed(job.detach)
                if r:
                    edges["hooks attach" if case == "hooks" else "merge"].append(t_on)
                    edges["hooks detach" if case == "hooks" else "unmerge"].append(t_off)
            if r:
                fwd[case].append(t)
            outs.setdefault(case, out)
        print(f"round {r} done", file=sys.stderr)
    return ({k: statistics.median(v) for k, v in fwd.items()}, {k: statistics.median(v) for k, v in edges.items()},
            outs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=2, help="latent frames")
    ap.add_argument("--size", type=int, default=128, help="video width and height in pixels")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--switches", type=int, default=3)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    ckpt = checkpoint_path()
    if args.case:  # "load": one load in this fresh process
        _, t = timed(lambda: load_model(ckpt))
        print(json.dumps({"load_s": t}))
        return
    if not ckpt.exists():
        print(f"writing {ckpt} ...", file=sys.stderr)
        write_checkpoint(ckpt)
    paths = [lora_path(args.rank, w) for w in ("a", "b")]
    for seed, p in enumerate(paths):
        if not p.exists():
            write_lora(p, args.rank, seed)

    dit = load_model(ckpt)
    loads = []
    for _ in range(args.switches):
        other, t = timed(lambda: load_model(ckpt))
        loads.append(t)
        del other
    load_s = statistics.median(loads)
    fresh_s = statistics.median(run_case(__file__, "load")["load_s"] for _ in range(args.switches))
    print("loads done", file=sys.stderr)

    before = {k: v.clone() for k, v in dit.state_dict().items()}
    switch = {mode: measure_switch(dit, paths, mode, args.switches) for mode in ("hooks", "merge")}
    print("switches done", file=sys.stderr)
    inputs = make_inputs(args.frames, args.size)
    fwd, edges, outs = measure_steps(dit, paths[0], inputs, args.runs)
    identical = all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    tokens = args.frames * (args.size // 16) ** 2
    file_gib = ckpt.stat().st_size / 2**30
    lora_mib = paths[0].stat().st_size / 2**20
    print(f"\nDiT 1.3B shape, bf16 ({file_gib:.2f} GiB checkpoint), LoRA rank {args.rank} on 300 attention/FFN linears "
          f"({lora_mib:.0f} MiB file), latent 16x{args.frames}x{args.size // 8}x{args.size // 8} ({tokens} tokens), "
          f"{torch.get_num_threads()} threads\n")
    print("(a) switching LoRAs between jobs, median of", args.switches)
    print("\n| | time (s) | vs loading the model |\n|---|---|---|")
    print(f"| reload the DiT (`wan.load_transformer`) in this process, freed memory reused | {load_s:.2f} | 1.00 |")
    print(f"| load the DiT in a fresh process | {fresh_s:.2f} | {fresh_s / load_s:.2f} |")
    for mode in ("hooks", "merge"):
        s = switch[mode]
        print(f"| switch, {mode}: detach {s['detach']:.2f} + prepare_loras {s['prepare']:.2f} + "
              f"attach {s['attach']:.2f} | {s['switch']:.2f} | {s['switch'] / load_s:.3f} "
              f"(fresh: {s['switch'] / fresh_s:.3f}) |")
    print(f"\n(b) one DiT forward, median of {args.runs} interleaved\n")
    print("| LoRA | forward (s) | vs no LoRA | output vs hooks |\n|---|---|---|---|")
    for case in ("none", "hooks", "merged"):
        diff = "" if case == "none" else f"{rel(outs[case], outs['hooks']):.2g}"
        print(f"| {case} | {fwd[case]:.3f} | {fwd[case] / fwd['none']:.3f} | {diff} |")
    print(f"\n(c) attach / detach, median of {args.runs}\n")
    print("| | time (s) | vs one forward without LoRA |\n|---|---|---|")
    for k, v in edges.items():
        print(f"| {k} | {v:.3f} | {v / fwd['none']:.2f} |")
    print(f"| merge + unmerge | {edges['merge'] + edges['unmerge']:.3f} | "
          f"{(edges['merge'] + edges['unmerge']) / fwd['none']:.2f} |")
    extra = fwd["hooks"] - fwd["merged"]
    cost = edges["merge"] + edges["unmerge"] - edges["hooks attach"] - edges["hooks detach"]
    if extra > 0:
        print(f"\nmerge mode pays for its merge + unmerge after {cost / extra:.1f} forwards "
              f"(a 50-step job with CFG runs 100)")
    print(f"\nweights bit-identical after every unmerge (torch.equal on the state dict): {identical}")
    print(f"LoRA effect on the output (merged vs none): {rel(outs['merged'], outs['none']):.2g}")
    print(f"\ncommand: .venv/bin/python benchmarks/bench_lora.py --frames {args.frames} --size {args.size} "
          f"--runs {args.runs} --switches {args.switches} --rank {args.rank}")


if __name__ == "__main__":
    main()
