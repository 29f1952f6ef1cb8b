"""Wan 2.1 VAE decode: Wan Studio vs diffusers' AutoencoderKLWan, same weights, same threads.

Measures the decode of a 17-frame 256x256 video (latents [1, 16, 5, 32, 32]) with the full-size
Wan 2.1 VAE (dim 96) on random weights written once, in the official layout, to a temporary
file. Each implementation runs in its own subprocess under ``torch.inference_mode`` with the same
thread count:

- time: median of ``--runs`` decodes after one warm-up decode, wall clock and process CPU time
  (the CPU time is less sensitive to other programs competing for the cores); the decodes of the
  two implementations alternate so that a change of machine load affects both alike;
- memory: peak resident memory (RSS, sampled every 2 ms from /proc/self/statm by a thread) above
  the baseline measured after the model and the latents are loaded, over all decodes. Both
  workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so every tensor buffer is its own mmap,
  returned to the OS when freed: the RSS then follows the live tensors.

The two outputs are compared (max |ours - diffusers| / max |diffusers|).

Reproduce:  .venv/bin/python benchmarks/bench_vae.py            (about 5 minutes on 2 cores)
            .venv/bin/python benchmarks/bench_vae.py --runs 1 --frames 9   (quick check)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the RSS in a background thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def _load(impl: str, weights: str):
    import torch
    if impl == "ours":
        import wan
        return wan.load_vae(weights).decode
    from diffusers import AutoencoderKLWan
    from safetensors.torch import load_file

    from wan.loading.vae import official_to_diffusers
    sd = load_file(weights)
    names = official_to_diffusers(sd)
    with torch.device("meta"):
        model = AutoencoderKLWan()
    # clone: tensors from load_file may be backed by the file's pages, which would only become
    # resident (and count as decode memory) when the first decode touches them
    model.load_state_dict({names[k]: v.clone() for k, v in sd.items()}, strict=True, assign=True)
    del sd
    model.eval()
    mean = torch.tensor(model.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(model.config.latents_std).view(1, -1, 1, 1, 1)
    # the same normalised-latent contract as ours: de-normalise, decode (diffusers clamps)
    return lambda z: model.decode(z / (1.0 / std) + mean).sample


def worker(args) -> None:
    """One implementation in this process. Loads the model, prints "ready", then decodes once per
    "go" line read from stdin and answers with a JSON line; "done" saves the output and exits."""
    import gc

    import torch
    torch.set_num_threads(args.threads)
    decode = _load(args.impl, args.weights)
    z = torch.load(args.latents)
    gc.collect()
    base = _rss_bytes()
    print("ready", flush=True)
    out = None
    for line in sys.stdin:
        if line.strip() != "go":
            break
        out = None
        with torch.inference_mode(), PeakRSS() as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = decode(z)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        print(json.dumps({"wall": wall, "cpu": cpu, "peak_mb": (mem.peak - base) / 2**20,
                          "threads": torch.get_num_threads()}), flush=True)
    torch.save(out, args.out)


def _start(impl: str, args, weights: str, latents: str, out: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--impl", impl, "--weights", weights, "--latents", latents,
           "--out", out, "--threads", str(args.threads)]
    # Every allocation above 64 KiB gets its own mmap and goes back to the OS when freed, so the
    # sampled RSS follows the live tensors of both implementations alike.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    if proc.stdout.readline().strip() != "ready":
        sys.exit(f"{impl} worker failed to start (exit code {proc.wait()})")
    return proc


def _decode_once(proc: subprocess.Popen) -> dict:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        sys.exit(f"worker exited with code {proc.wait()}")
    return json.loads(line)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=17, help="video frames (1 + 4k)")
    p.add_argument("--size", type=int, default=256, help="video height and width")
    p.add_argument("--runs", type=int, default=2, help="timed decodes per implementation (after a warm-up)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--impl", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--weights", help=argparse.SUPPRESS)
    p.add_argument("--latents", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.impl:
        return worker(args)

    import torch
    from safetensors.torch import save_file

    from wan.testing.tiny_vae import random_vae_state_dict
    impls = ("ours", "diffusers")
    with tempfile.TemporaryDirectory() as tmp:
        weights, latents = f"{tmp}/wan21_vae_random.safetensors", f"{tmp}/z.pt"
        save_file(random_vae_state_dict("2.1", dict(dim=96, z_dim=16), seed=0), weights)
        lat = (1, 16, 1 + (args.frames - 1) // 4, args.size // 8, args.size // 8)
        torch.save(torch.randn(lat, generator=torch.Generator().manual_seed(0)), latents)
        outs = {k: f"{tmp}/{k}.pt" for k in impls}
        procs = {k: _start(k, args, weights, latents, outs[k]) for k in impls}
        # Decodes alternate between the two (one warm-up each first), so that a change in the
        # machine's load during the run affects both alike.
        results = {k: [] for k in impls}
        for i in range(args.runs + 1):
            for k in impls:
                r = _decode_once(procs[k])
                print(f"{k} run {i}: {r}", file=sys.stderr)
                results[k].append(r)
        for k in impls:
            procs[k].stdin.write("done\n")
            procs[k].stdin.flush()
            procs[k].wait()
        ours, ref = torch.load(outs["ours"]), torch.load(outs["diffusers"])
        err = ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()

    def med(k, field):
        return statistics.median(r[field] for r in results[k][1:])

    peak = {k: max(r["peak_mb"] for r in results[k]) for k in impls}
    print(f"\nWan 2.1 VAE decode, latents {list(lat)} -> video [1, 3, {args.frames}, {args.size}, "
          f"{args.size}], float32 CPU, {results['ours'][0]['threads']} threads, median of {args.runs} "
          f"(after one warm-up), decodes alternating between the two\n")
    print("| | Wan Studio | diffusers | ratio (target) |")
    print("|---|---|---|---|")
    for field, name in (("wall", "decode wall time (s)"), ("cpu", "decode CPU time, all threads (s)")):
        a, b = med("ours", field), med("diffusers", field)
        print(f"| {name} | {a:.2f} | {b:.2f} | {a / b:.2f} (<= 0.5) |")
    print(f"| peak RSS above the loaded model (MiB) | {peak['ours']:.0f} | {peak['diffusers']:.0f} | "
          f"{peak['ours'] / peak['diffusers']:.2f} (<= 0.5) |")
    print(f"| output max rel diff vs diffusers | {err:.1e} | | |")
    print(f"\nreproduce: .venv/bin/python benchmarks/bench_vae.py --frames {args.frames} --size {args.size} "
          f"--runs {args.runs} --threads {args.threads}")


if __name__ == "__main__":
    main()
