"""Sample videos during training (wan/train/samples.py, Trainer.sample) on the TEST t2v model, CPU: the prompt
file checked before anything loads, samples at first / every N steps / at epoch ends named as musubi names them,
a sample equal to what ``generate`` makes with the LoRA saved at that step, a run left unchanged by sampling
(losses and LoRA bit for bit), the LoRA's multiplier, train mode and random states restored; plus the LoRA
folder rule of wan/train/lora_save.py and the prompt-line parser's move into the engine."""

import re

import av
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wan.engine.media import read_metadata
from wan.testing.tiny_family import TINY_T5
from wan.train.cache_files import text_cache_name, video_latent_cache_name, write_latent_cache, write_text_cache
from wan.train.config import TrainConfig, TrainConfigError
from wan.train.samples import TrainingSampler, read_sample_prompts, sample_stem
from wan.train.trainer import Trainer
from tests.train_harness import family, one_thread  # noqa: F401 (fixtures)

MODEL = "test-tiny-t2v"
# musubi's sample names: <output_name>_<step:06d> or e<epoch:06d>_<prompt index:02d>_<YYYYmmddHHMMSS>_<seed>.mp4
NAME = re.compile(r"^(?P<name>.+)_(?P<number>e?\d{6})_(?P<index>\d{2})_\d{14}_(?P<seed>\d+)\.mp4$")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Caches of two 5-frame 64x64 clips (random latents [16, 2, 8, 8], random text) and their TOML."""
    root = tmp_path_factory.mktemp("sample_data")
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        name = f"clip{i}.mp4"
        write_latent_cache(root / "cache" / video_latent_cache_name(name, 0, 5, (64, 64)),
                           torch.randn(16, 2, 8, 8, generator=g), original_size=(64, 64), frame_count=5)
        write_text_cache(root / "cache" / text_cache_name(name), torch.randn(4, TINY_T5["dim"], generator=g),
                         caption=f"clip {i}")
    (root / "videos").mkdir()
    toml = root / "data.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\ncaption_extension = ".txt"\nbatch_size = 1\n\n[[datasets]]\n'
                    f'video_directory = "{root / "videos"}"\ncache_directory = "{root / "cache"}"\n'
                    'target_frames = [5]\n')
    return toml


def config(family, dataset, out, prompts=None, **kw) -> TrainConfig:
    settings = dict(dataset_config=str(dataset), model=MODEL, checkpoint_dir=str(family), output_dir=str(out),
                    output_name="samp", network_dim=4, network_alpha=4, learning_rate=1e-2, max_train_steps=4, seed=5)
    if prompts is not None:
        settings["sample_prompts"] = str(prompts)
    return TrainConfig.of(**{**settings, **kw})


def prompt_file(folder, text, name="prompts.txt"):
    path = folder / name
    path.write_text(text)
    return path


def frames_of(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def quiet(cfg, lines=None, **kw) -> Trainer:
    return Trainer(cfg, progress=False, say=(lines.append if lines is not None else lambda line: None), **kw)


# ---------------------------------------------------------------------------------------------


def test_prompt_lines_live_in_the_engine_and_generate_reads_them_from_there():
    import wan.cli_generate as cli
    import wan.engine.prompt_lines as lines
    assert cli.parse_prompt_line is lines.parse_prompt_line and cli.INLINE_OPTIONS is lines.INLINE_OPTIONS
    assert cli.read_prompt_file is lines.read_prompt_file


def test_the_prompt_file_is_checked_before_anything_loads(family, dataset, tmp_path):
    good = prompt_file(tmp_path, "# a comment\n\na fox --w 96 --h 64 --f 5 --d 3\na cat --s 2 --n dull\n", "good.txt")
    prompts = read_sample_prompts(str(good), MODEL)
    assert [(p.index, p.line, p.request.prompt) for p in prompts] == [(0, 3, "a fox"), (1, 4, "a cat")]
    assert (prompts[0].request.width, prompts[0].request.frames, prompts[0].request.seed) == (96, 5, 3)
    assert prompts[1].request.seed == -1 and prompts[1].request.negative_prompt == "dull"  # -1: the training seed
    cases = [("a fox\n--w 64\n", "line 2: prompt"), ("a fox --w 65\n", "line 1: width: 65"),
             ("a fox --q 3\n", "line 1: --q"), ("a fox --i missing.png\n", "line 1: image"), ("# only\n", "no prompt")]
    for text, words in cases:
        path = prompt_file(tmp_path, text)
        with pytest.raises(TrainConfigError, match=re.escape(words)):
            TrainingSampler(config(family, dataset, tmp_path / "out", path))
    with pytest.raises(TrainConfigError, match="TOML and JSON prompt files are not read"):
        TrainingSampler(config(family, dataset, tmp_path / "out", prompt_file(tmp_path, "[prompt]\n", "p.toml")))
    with pytest.raises(TrainConfigError, match="--sample_prompts: .*nowhere.txt"):
        TrainingSampler(config(family, dataset, tmp_path / "out", tmp_path / "nowhere.txt"))
    with pytest.raises(TrainConfigError, match="--sample_prompts: needs --model"):
        TrainingSampler(TrainConfig.of(dit="x.safetensors", sample_prompts=str(good)))
    with pytest.raises(TrainConfigError, match="--vae: 'nowhere.safetensors'"):
        TrainingSampler(config(family, dataset, tmp_path / "out", good, vae="nowhere.safetensors"))


def test_samples_at_first_every_n_steps_and_each_epoch_are_named_like_musubi(family, dataset, tmp_path):
    prompts = prompt_file(tmp_path, "red fox --d 7 --s 2\nblue cat --s 2 --f 5\n")
    cfg = config(family, dataset, tmp_path / "out", prompts, sample_at_first=True, sample_every_n_steps=3,
                 sample_every_n_epochs=1)  # 2 batches per epoch: epochs end at steps 2 and 4
    lines: list[str] = []
    quiet(cfg, lines, sampler=TrainingSampler(cfg, say=lines.append)).run()
    files = sorted((tmp_path / "out" / "sample").iterdir())
    found = sorted((m["number"], m["index"], m["seed"]) for m in map(NAME.match, (f.name for f in files)) if m)
    assert len(found) == len(files) == 8, [f.name for f in files]
    expected = [(n, i, s) for n in ("000003", "e000000", "e000001", "e000002") for i, s in (("00", "7"), ("01", "5"))]
    assert found == sorted(expected)  # line 2 has no --d: the training seed (5)
    assert all(f.name.startswith("samp_") for f in files)
    assert any("sample 2/2 at step 3" in line for line in lines)

    first = next(f for f in files if f.name.startswith("samp_e000000_01_"))
    meta = read_metadata(first)
    assert meta["request"]["prompt"] == "blue cat" and meta["request"]["seed"] == 5 and meta["request"]["steps"] == 2
    assert meta["training"] == {"output_name": "samp", "step": 0, "epoch": 0, "prompt_index": 1}
    assert frames_of(first).shape == (5, 64, 64, 3)  # --f 5; the other line has the model's 9 frames
    assert frames_of(next(f for f in files if f.name.startswith("samp_000003_00_"))).shape[0] == 9
    assert sample_stem("x", 12, None, 3, 9, now=0).startswith("x_000012_03_19") and sample_stem(None, 0, 2, 0, 1) \
        .startswith("e000002_00_")


def test_sampling_leaves_the_run_unchanged_bit_for_bit(family, dataset, tmp_path):
    prompts = prompt_file(tmp_path, "a fox --s 2 --f 5\n")
    plain = quiet(config(family, dataset, tmp_path / "plain")).run()
    cfg = config(family, dataset, tmp_path / "sampled", prompts, sample_at_first=True, sample_every_n_steps=1)
    sampled = quiet(cfg, sampler=TrainingSampler(cfg, say=lambda line: None)).run()
    assert len(list((tmp_path / "sampled" / "sample").glob("*.mp4"))) == 5
    assert sampled.losses == plain.losses
    a, b = load_file(str(plain.lora_path)), load_file(str(sampled.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_sample_is_what_generate_makes_with_the_lora_saved_at_that_step(family, dataset, tmp_path):
    from wan.engine import Engine, GenerationRequest, LoraChoice
    prompts = prompt_file(tmp_path, "a red fox --d 11 --s 3 --f 5\n")
    cfg = config(family, dataset, tmp_path / "out", prompts, sample_every_n_steps=2, save_every_n_steps=2)
    sampler = TrainingSampler(cfg, say=lambda line: None)
    trainer = quiet(cfg, sampler=sampler).setup()
    seen = []

    def spy(tr, step, epoch):
        files = sampler(tr, step, epoch)
        seen.append((tr.network.multiplier, tr.network.training, step))
        return files
    trainer.sampler = spy
    trainer.train(until_step=2)
    assert seen == [(1.0, False, 2)]  # the LoRA as trained (multiplier 1, no dropout)
    (sample,) = sampler.written
    saved = tmp_path / "out" / "samp-step00000002.safetensors"
    request = GenerationRequest(model=MODEL, prompt="a red fox", seed=11, steps=3, frames=5,
                                loras=[LoraChoice(str(saved))], output_dir=str(tmp_path / "gen"))
    made = Engine(checkpoint_dir=family, device="cpu").generate(request)
    assert np.array_equal(frames_of(sample), frames_of(made.files[0]))

    # the hook restores what it changed: multiplier, train mode, every random state
    trainer.network.set_multiplier(0.5)
    torch_state, gen_state = torch.get_rng_state(), trainer.generator.get_state()
    trainer.sample(4, None)
    assert seen[-1] == (1.0, False, 4) and len(sampler.written) == 2
    assert trainer.network.multiplier == 0.5 and trainer.network.training
    assert all(m.multiplier == 0.5 for _, m in trainer.network.lora_modules())
    assert torch.equal(torch.get_rng_state(), torch_state) and torch.equal(trainer.generator.get_state(), gen_state)
    trainer.close()


def test_a_model_the_trained_networks_cannot_run_is_skipped_with_a_reason(family, dataset, tmp_path):
    prompts = prompt_file(tmp_path, "a fox\n")
    lines: list[str] = []
    sampler = TrainingSampler(config(family, dataset, tmp_path, prompts, model="test-tiny-t2v-a14b"), say=lines.append)

    class OneExpert:  # a Wan 2.2 A14B run given one DiT (--dit without --dit_high_noise)
        experts, device, seed = {"transformer": None}, torch.device("cpu"), 0
    assert sampler(OneExpert(), 0, 0) == [] and sampler(OneExpert(), 2, None) == []
    assert lines == ["samples skipped: model test-tiny-t2v-a14b runs experts high_noise, low_noise, the run trains "
                     "transformer (give --dit_high_noise too)"]


def test_the_lora_root_puts_a_run_s_loras_in_its_family_folder(tmp_path):
    from wan.registry import get_model
    from wan.train.lora_save import is_lora_root, lora_folder
    spec = get_model(MODEL)
    plain, root, used = tmp_path / "runs", tmp_path / "loras", tmp_path / "my_loras"
    plain.mkdir()
    (used / "wan2.1-t2v-1.3B").mkdir(parents=True)
    assert not is_lora_root(plain) and is_lora_root(root) and is_lora_root(used)
    assert lora_folder(plain, spec) == plain and lora_folder(root / "test", spec) == root / "test"
    assert lora_folder(root, spec) == root / "test" and lora_folder(used, spec) == used / "test"
    assert lora_folder(root, None) == root  # no registry model: no family to choose
    assert lora_folder(root, get_model("wan2.1-t2v-1.3B")) == root / "wan2.1-t2v-1.3B"
