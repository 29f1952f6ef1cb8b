"""Fixed runs of the TEST models whose outputs are kept as references (``tests/golden/*.npz``).

The references were made with ``python tests/golden_cases.py`` before the seams refactor
(issue 10) and are committed; ``test_golden_outputs.py`` reruns each case and compares. Their
input files (a still image, a control clip and a hard black-and-white mask clip) are committed
too, so that the decoded inputs do not depend on the encoder of the machine running the test.

Regenerate a reference only for a change that is meant to change outputs, and say so in the
commit. Changes so far: ``vace.npz`` after the VACE mask fix of issue 19 (the codec leaves values of
253 in the mask clip, which now reach the mask channels as 253/255 where 1 was passed before).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parent / "golden"


def write_inputs(folder: Path = GOLDEN) -> None:
    """The cases' input files: a 96x64 start image, a 9-frame 64x64 control clip and a hard mask clip
    (0 or 255 only; issue 19 changes what grey mask values do, not what a hard mask does)."""
    import av
    from PIL import Image
    g = np.random.default_rng(2024)
    Image.fromarray(g.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(folder / "start.png")
    Image.fromarray(g.integers(0, 255, (64, 48, 3), dtype=np.uint8)).save(folder / "ref.png")
    clip = [g.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(9)]
    mask = [np.zeros((64, 64, 3), np.uint8) for _ in range(9)]
    for m in mask:
        m[16:48, 8:40] = 255
    for name, frames in {"control.mp4": clip, "mask.mp4": mask}.items():
        with av.open(str(folder / name), "w") as out:
            stream = out.add_stream("libx264", rate=16)
            stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
            for f in frames:
                out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(stream.encode())


def cases(loras: Path) -> dict:
    """name -> (request fields, step savers or None). ``loras``: the folder holding ``sched.safetensors``."""
    d = str(GOLDEN)
    return {
        "t2v": (dict(model="test-tiny-t2v", prompt="a red fox in snow", steps=4, seed=7), None),
        "i2v": (dict(model="test-tiny-i2v", prompt="the fox turns", image=f"{d}/start.png", width=96, height=64,
                     steps=3, seed=11), None),
        "vace": (dict(model="test-tiny-vace", prompt="a dancer", task="vace", control_video=f"{d}/control.mp4",
                      mask_video=f"{d}/mask.mp4", ref_images=[f"{d}/ref.png"], steps=3, seed=5), None),
        "a14b": (dict(model="test-tiny-t2v-a14b", prompt="waves", steps=6, boundary=0.9, guidance=3.0,
                      guidance_high_noise=4.5, seed=3), None),
        "teacache": (dict(model="test-tiny-t2v", prompt="a fox", steps=8, seed=5, profile="quality",
                          profile_overrides={"step_savers.teacache.enabled": True,
                                             "step_savers.teacache.speedup": 2.0}), None),
        "lora_schedule": (dict(model="test-tiny-t2v", prompt="a fox", steps=4, seed=4,
                               loras=[{"path": str(loras / "sched.safetensors"), "multiplier": "1.0,0.5,0.0"}]),
                          None),
    }


def write_lora(path: Path) -> Path:
    """A musubi-tuner-layout LoRA on the self-attention q and the FFN of both TEST blocks (dim 256)."""
    import torch
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(31)
    state = {}
    for b in (0, 1):
        for name, (din, dout) in {"self_attn_q": (256, 256), "ffn_0": (256, 512)}.items():
            key = f"lora_unet_blocks_{b}_{name}"
            state[f"{key}.lora_down.weight"] = torch.randn(4, din, generator=g) * 0.2
            state[f"{key}.lora_up.weight"] = torch.randn(dout, 4, generator=g) * 0.2
            state[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(state, str(path))
    return path


def run_case(engine, fields: dict, savers=None):
    """(final latent float32 numpy, uint8 frames) of one case."""
    from wan.engine import GenerationRequest
    from wan.engine.media import to_uint8_frames
    req = GenerationRequest.from_dict(fields)
    result = engine.generate(req, write=False, **({"savers": savers} if savers is not None else {}))
    return result.latent.float().numpy(), to_uint8_frames(result.video)


def main() -> None:
    import tempfile

    import torch

    from wan.engine import Engine
    from wan.testing.tiny_family import ensure_tiny_checkpoints
    write_inputs()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ensure_tiny_checkpoints(root / "ckpts")
        (root / "loras").mkdir()
        write_lora(root / "loras" / "sched.safetensors")
        engine = Engine(checkpoint_dir=root / "ckpts", device="cpu", dtype=torch.float32, lora_dir=root / "loras")
        for name, (fields, savers) in cases(root / "loras").items():
            latent, frames = run_case(engine, fields, savers)
            np.savez_compressed(GOLDEN / f"{name}.npz", latent=latent, frames=frames)
            print(name, latent.shape, frames.shape, file=sys.stderr)


if __name__ == "__main__":
    main()
