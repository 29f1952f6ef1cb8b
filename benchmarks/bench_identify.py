"""Time to identify a folder of checkpoint files by their headers (``wan.loading.identify``).

    .venv/bin/python benchmarks/bench_identify.py [--files 300] [--repeats 3]

Writes ``--files`` small files of mixed kinds into a temporary folder (ComfyUI-style subfolders):
Wan DiTs of every variant in the official, ComfyUI-prefixed, fp8 scaled and diffusers layouts,
``.pth`` DiTs, DiTs with the key count of a real 14B ComfyUI fp8 file (40 blocks, scale tensors),
Wan 2.1 / 2.2 VAEs (official and diffusers), umT5, CLIP, Wan LoRAs with a real key count (40
blocks), Flux / HunyuanVideo / SD headers, truncated files, text files named .safetensors and
malicious pickles. The data of each tensor is small: identification reads headers only, so its
time depends on the number of tensors, not their size.

It then times ``scan_folder``:
- cold: no identity cache (the files themselves are in the OS page cache, just written);
- cache build: the same, writing the JSON cache;
- cached: a second scan with the cache (a stat per file, no header read).
Medians of ``--repeats`` runs, plus the per-file time of ``identify`` by kind.
"""

from __future__ import annotations

import argparse
import pickle
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from wan.loading.keymaps import DIT_DIFFUSERS  # noqa: E402
from wan.loading.vae import official_to_diffusers  # noqa: E402
from wan.models.dit import DiTConfig, WanDiT  # noqa: E402
from wan.testing.tiny_encoders import tiny_clip_state_dict, tiny_t5_state_dict  # noqa: E402
from wan.testing.tiny_vae import tiny_vae_state_dict  # noqa: E402

VARIANTS = {
    "t2v": {}, "i2v": dict(in_dim=36, image_dim=160), "flf2v": dict(in_dim=36, image_dim=160, image_pos_tokens=34),
    "vace": dict(vace_layers=(0, 1)), "ti2v": dict(in_dim=48, out_dim=48),
    "fun_control": dict(in_dim=48, image_dim=160, ref_conv_in=16), "i2v_a14b": dict(in_dim=36),
}


def dit_state(variant: str, layers: int = 2, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    extra = dict(VARIANTS[variant])
    if "vace_layers" in extra:
        extra["vace_layers"] = tuple(range(0, layers, 2))
    cfg = DiTConfig(dim=128, ffn_dim=128, num_heads=1, num_layers=layers, freq_dim=32, text_dim=32, **extra)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    return {k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()}


def fp8_scaled(sd: dict) -> dict:
    out = {"scaled_fp8": torch.zeros(0, dtype=torch.float8_e4m3fn)}
    for k, v in sd.items():
        if v.ndim == 2 and k.endswith(".weight") and "norm" not in k:
            out[k] = v.to(torch.float8_e4m3fn)
            out[k[:-len(".weight")] + ".scale_weight"] = torch.ones(1)
        else:
            out[k] = v
    return out


def wan_lora(blocks: int = 40, rank: int = 4) -> dict:
    sd = {}
    for i in range(blocks):
        for m in ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                  "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"):
            sd[f"diffusion_model.blocks.{i}.{m}.lora_down.weight"] = torch.zeros(rank, 8, dtype=torch.bfloat16)
            sd[f"diffusion_model.blocks.{i}.{m}.lora_up.weight"] = torch.zeros(8, rank, dtype=torch.bfloat16)
            sd[f"diffusion_model.blocks.{i}.{m}.alpha"] = torch.tensor(float(rank))
    return sd


def other_family(kind: str) -> dict:
    keys = {
        "flux": [f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)] + [
            f"single_blocks.{i}.linear1.weight" for i in range(38)],
        "hunyuan": [f"double_blocks.{i}.img_attn_qkv.weight" for i in range(20)] + [
            "txt_in.individual_token_refiner.blocks.0.norm1.weight"],
        "sd": [f"model.diffusion_model.input_blocks.{i}.0.weight" for i in range(12)],
    }[kind]
    return {k: torch.zeros(2, 2, dtype=torch.float16) for k in keys}


class _Exploit:
    def __reduce__(self):
        return (print, ("executed!",))


def write_corpus(folder: Path, n: int) -> dict[str, list[Path]]:
    """Writes about ``n`` files; returns them by kind."""
    vae21, vae22 = tiny_vae_state_dict("2.1", 0), tiny_vae_state_dict("2.2", 1)
    to_diff = official_to_diffusers(vae22)
    base = {
        "dit official": lambda i: dit_state(list(VARIANTS)[i % len(VARIANTS)]),
        "dit comfyui": lambda i: {"model.diffusion_model." + k: v for k, v in
                                  dit_state(list(VARIANTS)[i % len(VARIANTS)]).items()},
        "dit fp8 scaled": lambda i: fp8_scaled(dit_state(list(VARIANTS)[i % len(VARIANTS)])),
        "dit diffusers": lambda i: {DIT_DIFFUSERS.from_official(k): v for k, v in dit_state("t2v").items()},
        "dit 40 blocks fp8 scaled": lambda i: {"model.diffusion_model." + k: v for k, v in
                                               fp8_scaled(dit_state("t2v", layers=40)).items()},
        "dit .pth": lambda i: dit_state(list(VARIANTS)[i % len(VARIANTS)]),
        "vae": lambda i: vae21 if i % 2 else {to_diff[k]: v for k, v in vae22.items()},
        "umt5": lambda i: tiny_t5_state_dict(i),
        "clip": lambda i: tiny_clip_state_dict(i),
        "lora 40 blocks": lambda i: wan_lora(),
        "other family": lambda i: other_family(("flux", "hunyuan", "sd")[i % 3]),
        "broken": None,
        "malicious pickle": None,
    }
    share = {"dit official": 30, "dit comfyui": 30, "dit fp8 scaled": 30, "dit diffusers": 15,
             "dit 40 blocks fp8 scaled": 10, "dit .pth": 20, "vae": 30, "umt5": 15, "clip": 15,
             "lora 40 blocks": 50, "other family": 30, "broken": 15, "malicious pickle": 10}
    scale = n / sum(share.values())
    out: dict[str, list[Path]] = defaultdict(list)
    cache: dict[tuple, dict] = {}
    for kind, count in share.items():
        sub = folder / ("loras" if "lora" in kind else "diffusion_models" if "dit" in kind else "other")
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(max(1, round(count * scale))):
            stem = f"{kind.replace(' ', '_').replace('.', '')}_{i:03d}"
            if kind == "broken":
                path = sub / f"{stem}.safetensors"
                if i % 2:
                    path.write_text("not a checkpoint\n")
                else:
                    save_file(dit_state("t2v"), str(path))
                    path.write_bytes(path.read_bytes()[:-100])
            elif kind == "malicious pickle":
                path = sub / f"{stem}.pth"
                with open(path, "wb") as fh:
                    pickle.dump({"w": _Exploit()}, fh)
            else:
                key = (kind, i % 7)
                if key not in cache:
                    cache[key] = base[kind](i)
                sd = cache[key]
                if kind == "dit .pth":
                    path = sub / f"{stem}.pth"
                    torch.save(sd, path)
                else:
                    path = sub / f"{stem}.safetensors"
                    save_file(sd, str(path))
            out[kind].append(path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    t0 = time.perf_counter()
    from wan.loading.identify import identify
    from wan.loading.model_folders import scan_folder
    import_s = time.perf_counter() - t0  # torch is already imported by the corpus writer
    with tempfile.TemporaryDirectory(prefix="bench-identify-") as tmp:
        folder = Path(tmp) / "models"
        corpus = write_corpus(folder, args.files)
        n = sum(len(v) for v in corpus.values())
        size_mb = sum(p.stat().st_size for v in corpus.values() for p in v) / 1e6
        cold, build, cached = [], [], []
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}.json"
            t = time.perf_counter()
            found = scan_folder(folder)
            cold.append(time.perf_counter() - t)
            t = time.perf_counter()
            scan_folder(folder, cache=cache)
            build.append(time.perf_counter() - t)
            t = time.perf_counter()
            again = scan_folder(folder, cache=cache)
            cached.append(time.perf_counter() - t)
            assert all(f.cached for f in again) and len(again) == n
        kinds = defaultdict(int)
        for f in found:
            kinds[f.identity.kind] += 1
        print(f"{n} files ({size_mb:.0f} MB) in {folder}; identities: {dict(kinds)}")
        print(f"import wan.loading.identify (torch already loaded): {import_s * 1e3:.0f} ms\n")
        print("| scan of %d files | median | per file |" % n)
        print("|---|---|---|")
        for name, times in (("cold (no cache)", cold), ("cold, writing the cache", build),
                            ("cached", cached)):
            m = statistics.median(times)
            print(f"| {name} | {m * 1e3:.0f} ms | {m / n * 1e6:.0f} us |")
        print("\n| kind | files | identify per file (median) | identified as |")
        print("|---|---|---|---|")
        for kind, paths in corpus.items():
            per = []
            for p in paths:
                t = time.perf_counter()
                ident = identify(p)
                per.append(time.perf_counter() - t)
            print(f"| {kind} | {len(paths)} | {statistics.median(per) * 1e3:.2f} ms | {ident.summary()[:70]} |")


if __name__ == "__main__":
    main()
