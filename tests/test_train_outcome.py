"""LoRA training end to end on the TEST t2v model, through the commands: two short colour clips are cached
(``cache_latents``, ``cache_text_encoder_outputs``), a LoRA is trained on them (``wgp.py train``, a real
subprocess) and ``generate`` with it makes videos closer to the training clips than the base model does, and
closer to the clip of the caption than to the other clip. The saved files follow musubi's layout and metadata
(or ComfyUI's with ``--save_format comfy``), fit the model (``lora check``), convert musubi -> comfy -> musubi
bit for bit, land in the family folder when ``--output_dir`` is the LoRA root, and a run with sample prompts
writes its samples.

Distances are measured on latents (``generate --save_latents`` against the clips' cached VAE latents): the TEST
VAE has random weights, so decoding does not give the clip's pixels back and pixel distances say little."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from wan.cli import main
from wan.testing.tiny_family import ensure_tiny_checkpoints
from wan.train.cache_files import read_latent_cache

ROOT = Path(__file__).resolve().parent.parent
MODEL = "test-tiny-t2v"
CLIPS = {"red": "red stripes moving right", "cyan": "cyan checkerboard moving down"}
STEPS, SEED = 200, 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matmuls on a shared machine run far faster on one thread than on several."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The caches of two 9-frame 64x64 clips and a LoRA trained on them for 200 steps by ``wgp.py train``."""
    ckpt = tmp_path_factory.getbasetemp() / "tiny_ckpts"  # shared with test_train_samples.py in one session
    ensure_tiny_checkpoints(ckpt)
    root = tmp_path_factory.mktemp("outcome")
    videos = root / "videos"
    videos.mkdir()
    y, x = np.mgrid[0:64, 0:64]
    frames = {
        "red": [np.where((((x + 2 * t) // 8) % 2)[..., None] == 0, [250, 20, 20], [180, 0, 40]) for t in range(9)],
        "cyan": [np.where(((x // 16 + (y + 2 * t) // 16) % 2)[..., None] == 0, [0, 240, 240], [40, 200, 255])
                 for t in range(9)],
    }
    for name, clip in frames.items():
        write_video(videos / f"{name}.mp4", [f.astype(np.uint8) for f in clip])
        (videos / f"{name}.txt").write_text(CLIPS[name])
    toml = root / "data.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\n\n[[datasets]]\n'
                    f'video_directory = "{videos}"\ncache_directory = "{root / "cache"}"\ntarget_frames = [9]\n')
    common = ["--dataset_config", str(toml), "--model", MODEL, "--checkpoint_dir", str(ckpt), "--quiet"]
    assert main(["cache_latents", *common, "--vae_dtype", "float32"]) == 0
    assert main(["cache_text_encoder_outputs", *common]) == 0

    loras = root / "loras"  # the LoRA root: the file belongs in its family folder, loras/test/
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    started = time.time()
    run = subprocess.run([sys.executable, "wgp.py", "train", "--model", MODEL, "--checkpoint_dir", str(ckpt),
                          "--dataset_config", str(toml), "--output_dir", str(loras), "--output_name", "colours",
                          "--network_dim", "16", "--network_alpha", "16", "--learning_rate", "1e-2",
                          "--max_train_steps", str(STEPS), "--seed", str(SEED)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    print(f"wgp.py train, {STEPS} steps: {time.time() - started:.1f} s")
    saved = Path(re.search(r"^saved (.+\.safetensors)$", run.stdout, re.M).group(1))
    return {"ckpt": ckpt, "root": root, "toml": toml, "loras": loras, "lora": saved, "stdout": run.stdout}


def write_video(path: Path, frames: list[np.ndarray]) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=16, options={"qscale": "2"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode())


def generate(trained, folder: Path, lora: Path | None, seed: int = 3) -> dict[str, torch.Tensor]:
    """``wgp.py generate --from_file`` (the same entry, in this process) of each clip's caption with the model's
    defaults, with or without the LoRA; clip name -> final latents."""
    prompts = folder / "prompts.txt"
    prompts.write_text("".join(f"{caption} --d {seed}\n" for caption in CLIPS.values()))
    out = folder / ("lora" if lora else "base")
    argv = ["generate", "--model", MODEL, "--checkpoint_dir", str(trained["ckpt"]), "--from_file", str(prompts),
            "--save_latents", "--output_dir", str(out), "--name_template", "{prompt}", "--quiet"]
    assert main(argv + (["--lora", str(lora)] if lora else [])) == 0
    return {name: load_file(str(out / f"{caption.replace(' ', '_')}.latents.safetensors"))["latents"].float()
            for name, caption in CLIPS.items()}


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def colour(z: torch.Tensor) -> torch.Tensor:
    """A latent clip's mean per channel and frame: its colour, where one sample's noise averages out."""
    return z.mean(dim=(-1, -2))


def keys_and_meta(path: Path) -> tuple[set[str], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return set(f.keys()), f.metadata()


# ---------------------------------------------------------------------------------------------


def test_generate_with_the_lora_comes_closer_to_its_training_clips(trained, tmp_path):
    clips = {name: read_latent_cache(trained["root"] / "cache" / f"{name}_00000-009_0064x0064_wan.safetensors")
             .latents.float() for name in CLIPS}
    base, tuned = generate(trained, tmp_path, None), generate(trained, tmp_path, trained["lora"])
    for name in CLIPS:
        other = next(n for n in CLIPS if n != name)
        ratio = mse(tuned[name], clips[name]) / mse(base[name], clips[name])
        near, far = mse(colour(tuned[name]), colour(clips[name])), mse(colour(tuned[name]), colour(clips[other]))
        print(f"{name}: latent MSE to its clip, LoRA / base {ratio:.2f}; colour MSE to its clip {near:.3f}, "
              f"to the other clip {far:.3f}")
        assert ratio <= 0.8, (name, ratio)  # at least 20% lower (measured: 0.45 red, 0.52-0.56 cyan)
        assert near <= 0.8 * far, (name, near, far)  # the caption's clip, not any (measured: 0.46 red, 0.63 cyan)


def test_the_saved_lora_has_musubi_s_keys_and_metadata_and_fits_the_model(trained, capsys):
    keys, meta = keys_and_meta(trained["lora"])
    assert len(keys) == 20 * 3  # 2 blocks x 10 linear layers, each lora_down, lora_up and alpha
    for module in ("blocks_0_self_attn_q", "blocks_1_cross_attn_o", "blocks_1_ffn_2"):
        assert {f"lora_unet_{module}.{k}" for k in ("lora_down.weight", "lora_up.weight", "alpha")} <= keys
    assert meta["ss_network_module"] == "networks.lora_wan" and meta["ss_network_dim"] == "16"
    assert float(meta["ss_network_alpha"]) == 16 and meta["ss_base_model_version"] == "wan"
    assert meta["ss_steps"] == str(STEPS) and meta["ss_seed"] == str(SEED) and meta["ss_output_name"] == "colours"
    assert meta["modelspec.architecture"] == "wan2.1/lora" and meta["sshs_model_hash"]
    capsys.readouterr()
    assert main(["lora", "check", str(trained["lora"]), "--model", MODEL]) == 0
    assert "full (20/20 adapters match)" in capsys.readouterr().out


def test_comfy_saves_fit_and_conversion_round_trips_keep_every_tensor(trained, tmp_path, capsys):
    assert main(["train", "--model", MODEL, "--checkpoint_dir", str(trained["ckpt"]), "--dataset_config",
                 str(trained["toml"]), "--output_dir", str(trained["loras"]), "--output_name", "colours_comfy",
                 "--network_dim", "16", "--network_alpha", "16", "--learning_rate", "1e-2", "--max_train_steps", "2",
                 "--save_format", "comfy", "--seed", str(SEED)]) == 0
    comfy = Path(re.search(r"^saved (.+\.safetensors)$", capsys.readouterr().out, re.M).group(1))
    trained["comfy"] = comfy
    keys, meta = keys_and_meta(comfy)
    assert len(keys) == 60 and all(k.startswith("diffusion_model.blocks.") for k in keys)
    assert {f"diffusion_model.blocks.0.self_attn.q.{k}" for k in ("lora_A.weight", "lora_B.weight", "alpha")} <= keys
    assert meta["ss_network_dim"] == "16" and meta["ss_network_module"] == "networks.lora_wan"
    assert main(["lora", "check", str(comfy), "--model", MODEL]) == 0
    assert "full (20/20 adapters match)" in capsys.readouterr().out

    def convert(src: Path, to: str) -> Path:
        dest = tmp_path / f"{src.stem}.{to}.safetensors"
        assert main(["lora", "convert", str(src), str(dest), "--to", to]) == 0
        return dest

    for original, there, back in ((trained["lora"], "comfy", "musubi"), (comfy, "musubi", "comfy")):
        middle = convert(original, there)
        assert keys_and_meta(middle)[0] == keys_and_meta(comfy if there == "comfy" else trained["lora"])[0]
        a, b = load_file(str(original)), load_file(str(convert(middle, back)))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        assert keys_and_meta(middle)[1]["ss_network_dim"] == "16"  # the metadata travels along


def test_with_the_lora_root_as_output_dir_both_layouts_land_in_the_family_folder(trained, capsys):
    if "comfy" not in trained:
        test_comfy_saves_fit_and_conversion_round_trips_keep_every_tensor(trained, trained["root"], capsys)
    family = trained["loras"] / "test"
    assert trained["lora"] == family / "colours.safetensors"
    assert trained["comfy"] == family / "colours_comfy.safetensors"
    capsys.readouterr()
    assert main(["lora", "list", "--lora_dir", str(trained["loras"])]) == 0
    listed = capsys.readouterr().out
    assert "test/colours  rank 16" in listed and "test/colours_comfy  rank 16" in listed


def test_a_run_with_sample_prompts_writes_its_samples_at_first_and_every_n_steps(trained, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{CLIPS['red']} --d 5 --s 2\n{CLIPS['cyan']} --s 2\n")
    out = tmp_path / "run"
    assert main(["train", "--model", MODEL, "--checkpoint_dir", str(trained["ckpt"]), "--dataset_config",
                 str(trained["toml"]), "--output_dir", str(out), "--output_name", "sampled", "--max_train_steps", "4",
                 "--seed", "9", "--sample_prompts", str(prompts), "--sample_at_first",
                 "--sample_every_n_steps", "2"]) == 0
    names = sorted(p.name for p in (out / "sample").iterdir())
    found = sorted(re.sub(r"_\d{14}_", "_", n) for n in names)
    assert found == sorted(f"sampled_{n}_{i}.mp4" for n in ("e000000", "000002", "000004")
                           for i in ("00_5", "01_9")), names
