"""Prompt encoding: each prompt encoded over its own tokens (ours) against all 512 positions (the
reference's fixed length), umT5-XXL shape.

    .venv/bin/python benchmarks/bench_text_encoder.py [--layers 1] [--repeats 3]

A umT5 encoder at umT5-XXL's width (dim 4096, 64 heads, FFN 10240; ``--layers`` of its 24 layers:
the time per layer is the same in every layer, so the ratio is that of the whole encoder) with
random weights encodes a prompt and a negative prompt of given token counts, as a job does, two
ways on the same weights and token ids:

- reference: ``encoder(ids, mask)`` over all 512 positions, then each prompt's rows kept (the
  official pipeline: ``wan/modules/t5.py`` pads every prompt to ``text_len`` 512);
- ours: ``encode_prompts`` (``wan.models.text_encoder``), which encodes each prompt alone over its
  own tokens.

For each pair of lengths and dtype (float32, bf16): the median time of ``--repeats`` interleaved
runs of each, the ratio, and the largest difference of the states (relative to the largest
value). In bf16 both ways round differently (other GEMM shapes), so for bf16 each is also compared
with the float32 computation on the same (bf16-rounded) weights: the two errors are of one size. The tokenizer is a stand-in that gives each prompt its token count, so no tokenizer files
are needed; the encoder's work does not depend on which ids they are.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from wan.models.text_encoder import TEXT_LEN, T5Dims, UMT5TextEncoder  # noqa: E402

# (prompt tokens, negative prompt tokens): a short prompt, a long one, a very long one; Wan's default
# negative prompt is about 120 umT5 tokens
LENGTHS = ((25, 120), (120, 120), (300, 120))


class CountTokenizer:
    """Stands in for the umT5 tokenizer: a prompt ``"<n>"`` becomes n ids (the last one EOS), padded
    to ``max_length`` as the real one pads."""

    def __call__(self, prompts, padding, truncation, max_length, add_special_tokens, return_tensors):
        g = torch.Generator().manual_seed(0)
        ids = torch.zeros(len(prompts), max_length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            n = min(int(p), max_length)
            ids[i, :n - 1] = torch.randint(3, 1000, (n - 1,), generator=g)
            ids[i, n - 1] = 1
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask}


def encoder(layers: int, dtype: torch.dtype) -> UMT5TextEncoder:
    torch.manual_seed(0)
    enc = UMT5TextEncoder(T5Dims(vocab=1024, dim=4096, dim_attn=4096, ffn=10240, heads=64, layers=layers))
    enc.set_tokenizer(CountTokenizer())
    return enc.to(dtype).eval()


def reference(enc: UMT5TextEncoder, prompts: list[str]) -> list[torch.Tensor]:
    """The official way: every prompt encoded over all 512 positions, then trimmed."""
    ids, mask = enc.tokenize(prompts, TEXT_LEN)
    with torch.no_grad():
        hidden = enc(ids, mask)
    return [h[:n] for h, n in zip(hidden, mask.sum(1).tolist())]


def rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest |a - b| over the prompts, relative to the largest |b|."""
    return max((x.float() - y.float()).abs().max().item() / y.float().abs().max().item() for x, y in zip(a, b))


def timed(fn) -> tuple[float, list[torch.Tensor]]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; umT5-XXL width, {args.layers} of 24 "
          f"layers; median of {args.repeats} interleaved runs\n")
    print("| dtype | prompt + negative tokens | reference (512 positions) | ours | speed-up | max rel. diff | "
          "bf16 vs float32: reference / ours |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        enc = encoder(args.layers, dtype)
        exact = copy.deepcopy(enc).float() if dtype != torch.float32 else None
        for lengths in LENGTHS:
            prompts = [str(n) for n in lengths]
            ref_t, ours_t = [], []
            for _ in range(args.repeats):
                t, ref = timed(lambda: reference(enc, prompts))
                ref_t.append(t)
                t, ours = timed(lambda: enc.encode_prompts(prompts))
                ours_t.append(t)
            rounding = "-"
            if exact is not None:
                truth = reference(exact, prompts)
                rounding = f"{rel_diff(ref, truth):.1e} / {rel_diff(ours, truth):.1e}"
            r, o = statistics.median(ref_t), statistics.median(ours_t)
            print(f"| {str(dtype).removeprefix('torch.')} | {lengths[0]} + {lengths[1]} | {r:.2f} s | {o:.2f} s | "
                  f"{r / o:.1f}x | {rel_diff(ours, ref):.1e} | {rounding} |", flush=True)


if __name__ == "__main__":
    main()
