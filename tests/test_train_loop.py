"""The LoRA training loop (wan.train.trainer with data, checkpoints and optimizers) on tiny DiTs, CPU, float32:
one step against a hand computation (merged-LoRA reference loss, AdamW written out), gradients reaching only
the LoRA, a resumed run bit-identical to an uninterrupted one, and short runs that must cut the loss on the
TEST t2v, TI2V and two-expert models."""

import copy
import json
import math

import pytest
import torch
from safetensors import safe_open

from wan.models.dit import DiTConfig, WanDiT
from wan.testing.tiny_family import TINY_DIT, TINY_T5, tiny_dit_state_dict
from wan.train import checkpoints as ckpt
from wan.train.cache_files import text_cache_name, video_latent_cache_name, write_latent_cache, write_text_cache
from wan.train.config import TrainConfig
from wan.train.data import Batch, FixedBatches
from wan.train.timesteps import TimestepSample
from wan.train.trainer import Trainer, TrainingOutOfMemory
from tests.train_harness import family, one_thread  # noqa: F401 (fixtures)

TEXT_DIM = TINY_T5["dim"]


def write_dataset(root, latents: list[torch.Tensor], seed=0, batch_size=1, frames=5, size=(64, 64)):
    """musubi caches of one video clip per latent tensor [C, F, H, W] (with a random text embedding each)
    and the dataset TOML that points at them; returns the TOML's path."""
    g = torch.Generator().manual_seed(seed)
    cache, videos = root / "cache", root / "videos"
    videos.mkdir(parents=True, exist_ok=True)
    for i, lat in enumerate(latents):
        name = f"clip{i}.mp4"
        write_latent_cache(cache / video_latent_cache_name(name, 0, frames, size), lat, original_size=size,
                           frame_count=frames)
        write_text_cache(cache / text_cache_name(name), torch.randn(4 + i, TEXT_DIM, generator=g), caption=f"clip {i}")
    toml = root / "data.toml"
    toml.write_text(f'[general]\nresolution = [{size[0]}, {size[1]}]\ncaption_extension = ".txt"\n'
                    f'batch_size = {batch_size}\n\n[[datasets]]\nvideo_directory = "{videos}"\n'
                    f'cache_directory = "{cache}"\ntarget_frames = [{frames}]\n')
    return toml


def clips(n, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def quiet(cfg, **kw) -> Trainer:
    return Trainer(cfg, progress=False, say=lambda line: None, **kw)


# ---------------------------------------------------------------------------------------------
# One step by hand


def tiny_dit(seed=11) -> WanDiT:
    dit = WanDiT(DiTConfig(**TINY_DIT))
    dit.load_state_dict(tiny_dit_state_dict("t2v", seed))
    return dit.eval()


def fixed_batch(seed=2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(latents=torch.randn(2, 16, 2, 4, 4, generator=g),
                 t5=[torch.randn(5, TEXT_DIM, generator=g), torch.randn(3, TEXT_DIM, generator=g)])


def merged_by_hand(dit: WanDiT, network) -> WanDiT:
    """A copy of ``dit`` whose target Linear weights are W + alpha/r * up @ down (float64 maths)."""
    merged = copy.deepcopy(dit)
    modules = dict(merged.named_modules())
    with torch.no_grad():
        for name, m in network.lora_modules():
            delta = m.lora_up.weight.double() @ m.lora_down.weight.double() * (float(m.alpha) / m.lora_dim)
            modules[name].weight.copy_((modules[name].weight.double() + delta).float())
    return merged


def test_one_step_matches_a_merged_lora_reference_and_adamw_by_hand():
    lr, wd, betas, eps, max_norm = 2e-3, 0.05, (0.9, 0.99), 1e-8, 0.05
    dit = tiny_dit()
    reference = copy.deepcopy(dit)
    cfg = TrainConfig.of(network_dim=4, network_alpha=2.0, learning_rate=lr, max_grad_norm=max_norm, max_train_steps=5,
                      optimizer_args=(f"weight_decay={wd}", f"betas={betas}"), seed=0,
                      timestep_sampling="uniform", weighting_scheme="cosmap")
    trainer = quiet(cfg, dits={"transformer": dit}, data=FixedBatches([fixed_batch()])).setup()
    net = trainer.network
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a nonzero up: otherwise the down weights get no gradient at the first step
        for _, m in net.lora_modules():
            m.lora_down.weight.copy_(torch.randn(m.lora_down.weight.shape, generator=g) * 0.1)
            m.lora_up.weight.copy_(torch.randn(m.lora_up.weight.shape, generator=g) * 0.1)

    batch = fixed_batch()
    noise = torch.randn(batch.latents.shape, generator=g)
    sigmas = torch.tensor([0.3, 0.7])
    sample = TimestepSample(sigmas, torch.tensor([301.0, 701.0]))  # 1000 sigma + 1, as the non-sigma modes feed

    # the reference: merged weights, no hooks, the flow-matching loss written out
    context = torch.zeros(2, 5, TEXT_DIM)
    context[0], context[1, :3] = batch.t5[0], batch.t5[1]
    x0 = batch.latents
    x_t = (1 - sigmas.view(2, 1, 1, 1, 1)) * x0 + sigmas.view(2, 1, 1, 1, 1) * noise
    with torch.no_grad():
        pred = merged_by_hand(reference, net)(x_t, sample.timesteps, context)
    s = torch.tensor([0.301, 0.701])  # musubi weighs with the sigma of the timestep fed, on the 1000-step grid
    weight = 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
    expected = (weight.view(2, 1, 1, 1, 1) * (pred - (noise - x0)) ** 2).mean()

    loss, expert = trainer.forward_loss(batch, noise, sample)
    assert expert == "transformer"
    assert abs(float(loss.detach()) - float(expected)) <= 1e-5 * abs(float(expected))

    params = dict(net.named_parameters())
    before = {k: p.detach().clone().double() for k, p in params.items()}
    trainer.backward(loss)
    grads = {k: p.grad.detach().clone().double() for k, p in params.items()}
    assert all(p.grad is None and not p.requires_grad for p in dit.parameters())
    assert all(float(gr.abs().sum()) > 0 for gr in grads.values()), "every LoRA weight gets a gradient"
    norm = trainer.optimizer_step()

    # AdamW by hand: clip to max_norm, then p <- p (1 - lr wd) - lr * m_hat / (sqrt(v_hat) + eps), step 1
    total = math.sqrt(sum(float((gr ** 2).sum()) for gr in grads.values()))
    assert norm == pytest.approx(total, rel=1e-5)
    clip = min(1.0, max_norm / (total + 1e-6))
    for k, p in params.items():
        gr = grads[k] * clip
        m_hat = (1 - betas[0]) * gr / (1 - betas[0])
        v_hat = (1 - betas[1]) * gr ** 2 / (1 - betas[1])
        want = before[k] * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-8)
    trainer.close()
    assert not net.attached and all(p.requires_grad for p in dit.parameters())


def test_gradient_checkpointing_gives_the_same_gradients_and_comes_off():
    def grads(checkpointing):
        dit = tiny_dit()
        cfg = TrainConfig.of(network_dim=4, learning_rate=1e-3, seed=0, network_dropout=0.2,
                          gradient_checkpointing=checkpointing)
        trainer = quiet(cfg, dits={"transformer": dit}, data=FixedBatches([fixed_batch()])).setup()
        for _, m in trainer.network.lora_modules():
            torch.nn.init.normal_(m.lora_up.weight, std=0.05, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(5)  # the LoRA dropout's draws: replayed in the recomputation
        loss, _ = trainer.forward_loss(fixed_batch(), torch.ones(2, 16, 2, 4, 4) * 0.5,
                                       TimestepSample(torch.tensor([0.4, 0.6]), torch.tensor([400.0, 600.0])))
        trainer.backward(loss)
        out = {k: p.grad.clone() for k, p in trainer.network.named_parameters()}
        trainer.close()
        assert all("forward" not in block.__dict__ for block in dit.blocks)
        return float(loss.detach()), out

    plain_loss, plain = grads(False)
    ckpt_loss, checkpointed = grads(True)
    assert ckpt_loss == plain_loss
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], rtol=1e-6, atol=0)


def test_out_of_memory_names_the_flags_that_help(monkeypatch):
    trainer = quiet(TrainConfig.of(seed=0, max_train_steps=2), dits={"transformer": tiny_dit()},
                    data=FixedBatches([fixed_batch()])).setup()

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    monkeypatch.setattr(trainer, "forward_loss", oom)
    with pytest.raises(TrainingOutOfMemory, match="--gradient_checkpointing.*--fp8_base.*--mixed_precision bf16"):
        trainer.train()
    trainer.close()


def test_a_sample_that_runs_out_of_memory_is_named_as_a_sample(monkeypatch):
    """The engine's GenerationOutOfMemory inside a training run's sample becomes the training's own
    error, naming the sample, its stage and the settings that use less."""
    from wan.engine.out_of_memory import out_of_memory
    trainer = quiet(TrainConfig.of(seed=0, max_train_steps=2, sample_every_n_steps=1),
                    dits={"transformer": tiny_dit()}, data=FixedBatches([fixed_batch()])).setup()

    def sampler(trainer, step, epoch):  # the sampler's engine ran out while decoding
        raise out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), "decoding",
                            "cuda:0", None)
    trainer.sampler = sampler
    with pytest.raises(TrainingOutOfMemory, match=r"while making a sample \(decoding: CUDA out of memory. Tried to "
                                                  r"allocate 2 GiB\)\. Settings that use less: fewer or smaller "
                                                  r"samples \(--sample_prompts\), --gradient_checkpointing"):
        trainer.train()
    trainer.close()


# ---------------------------------------------------------------------------------------------
# Resume


def test_resumed_run_is_bit_identical_to_an_uninterrupted_one(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(3, (16, 2, 8, 8)))
    base = dict(dataset_config=str(data), model="test-tiny-t2v", checkpoint_dir=str(family), output_name="lora",
                network_dim=4, learning_rate=5e-3, max_train_steps=6, seed=7, gradient_accumulation_steps=2,
                lr_scheduler="cosine", lr_warmup_steps=2, network_dropout=0.1, timestep_sampling="shift",
                discrete_flow_shift=3.0, num_timestep_buckets=4, save_every_n_steps=3, save_state=True)
    whole = quiet(TrainConfig.of(**base, output_dir=str(tmp_path / "whole"))).run()
    assert whole.step == 6 and len(whole.losses) == 6

    first = quiet(TrainConfig.of(**base, output_dir=str(tmp_path / "part")))
    stopped = first.train(until_step=3)
    first.close()
    assert stopped.step == 3 and stopped.lora_path is None  # stopped: no final save
    state = tmp_path / "part" / "lora-step00000003-state"
    progress, _ = ckpt.read_progress(state)
    # 3 batches per epoch, 2 per step: steps 1-2 are epoch 1 (2 + 1 batches), step 3 ends mid-epoch 2
    assert (progress.step, progress.epoch, progress.position, progress.seed) == (3, 2, 2, 7)

    resumed = quiet(TrainConfig.of(**{**base, "seed": None}, output_dir=str(tmp_path / "part"),
                                   resume=str(state))).run()
    assert resumed.step == 6
    assert stopped.losses + resumed.losses == whole.losses
    with safe_open(str(whole.lora_path), "pt") as a, safe_open(str(resumed.lora_path), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert names == ["lora-state", "lora-step00000003-state", "lora-step00000003.safetensors",
                     "lora-step00000006-state", "lora-step00000006.safetensors", "lora.log.jsonl", "lora.safetensors"]
    log = [json.loads(line) for line in (tmp_path / "whole" / "lora.log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6] and log[1]["lr"]["unet"] == pytest.approx(5e-3)


def test_save_retention_follows_musubi():
    # musubi's own example: every 10 steps, last 30 steps: at step 50 the save of step 10 goes
    assert ckpt.step_to_remove(50, 10, 30) == 10 and ckpt.step_to_remove(30, 10, 30) is None
    assert ckpt.step_to_remove(45, 5, 12) == 30
    assert ckpt.epoch_to_remove(5, 1, 2) == 3 and ckpt.epoch_to_remove(4, 2, 2) is None
    assert ckpt.step_name("x", 500) == "x-step00000500" and ckpt.epoch_name("x", 2) == "x-000002"


# ---------------------------------------------------------------------------------------------
# It learns


def fixed_sigma_loss(trainer, batches, sigmas=(0.2, 0.4, 0.6, 0.8), boundary=None) -> float:
    """Mean loss over every batch at fixed noise levels with fixed noise (the right expert per level)."""
    g = torch.Generator().manual_seed(123)
    total = []
    with torch.no_grad():
        for batch in batches:
            for s in sigmas:
                expert = None if boundary is None else ("high_noise" if s >= boundary else "low_noise")
                sample = TimestepSample(torch.full((len(batch),), s), torch.full((len(batch),), 1000 * s + 1))
                noise = torch.randn(batch.latents.shape, generator=g)
                total.append(float(trainer.forward_loss(batch, noise, sample, expert)[0]))
    return sum(total) / len(total)


def train_and_measure(cfg, boundary=None, sigmas=(0.2, 0.4, 0.6, 0.8)):
    trainer = quiet(cfg).setup()
    batches = list(trainer.data.batches(1))
    before = fixed_sigma_loss(trainer, batches, sigmas, boundary)
    result = trainer.train()
    after = fixed_sigma_loss(trainer, batches, sigmas, boundary)
    trainer.close()
    return before, after, result


def test_a_t2v_lora_learns_its_clips(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(2, (16, 2, 8, 8)))
    cfg = TrainConfig.of(dataset_config=str(data), model="test-tiny-t2v", checkpoint_dir=str(family),
                      output_dir=str(tmp_path / "out"), output_name="t2v", network_dim=8, network_alpha=8,
                      learning_rate=1e-2, max_train_steps=150, seed=1, save_format="comfy")
    before, after, result = train_and_measure(cfg)
    assert after < before / 1.3, (before, after)  # measured: 3.26 -> ~2.1
    with safe_open(str(result.lora_path), "pt") as f:
        meta = f.metadata()
        assert "diffusion_model.blocks.0.self_attn.q.lora_A.weight" in f.keys()
    assert meta["ss_network_dim"] == "8" and meta["ss_steps"] == "150" and meta["ss_seed"] == "1"
    assert meta["modelspec.title"] == "t2v" and json.loads(meta["ss_datasets"])[0]["num_repeats"] == 1


def test_ti2v_trains_with_a_clean_first_frame(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(2, (48, 3, 4, 4)), frames=9)  # Wan 2.2 VAE: 48 channels
    cfg = TrainConfig.of(dataset_config=str(data), model="test-tiny-ti2v", checkpoint_dir=str(family),
                      output_dir=str(tmp_path / "out"), output_name="ti2v", network_dim=8, network_alpha=8,
                      learning_rate=1e-2, max_train_steps=80, seed=2)
    seen = []
    trainer = quiet(cfg).setup()
    dit = trainer.experts["transformer"]
    handle = dit.register_forward_pre_hook(lambda m, args: seen.append((args[0].detach(), args[1].detach())))
    batch = next(trainer.data.batches(1))
    trainer.forward_loss(batch)
    handle.remove()
    x_t, timesteps = seen[0]
    assert torch.equal(x_t[:, :, 0], batch.latents[:, :, 0].float())  # frame 0 is the clean image
    tokens_per_frame = 2 * 2  # 4x4 latents, 2x2 patches
    assert timesteps.shape == (1, 3 * tokens_per_frame)
    assert torch.all(timesteps[:, :tokens_per_frame] == 0) and torch.all(timesteps[:, tokens_per_frame:] > 0)
    trainer.close()
    before, after, _ = train_and_measure(cfg)
    assert after < before / 1.2, (before, after)


def test_two_experts_share_one_lora_and_both_learn(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(2, (16, 2, 8, 8)))
    cfg = TrainConfig.of(dataset_config=str(data), model="test-tiny-t2v-a14b", checkpoint_dir=str(family),
                      output_dir=str(tmp_path / "out"), output_name="a14b", network_dim=8, network_alpha=8,
                      learning_rate=1e-2, max_train_steps=100, seed=3, timestep_boundary=500,
                      offload_inactive_dit=True)
    trainer = quiet(cfg).setup()
    assert trainer.boundary == 0.5 and set(trainer.experts) == {"high_noise", "low_noise"}
    assert set(trainer.network._attached) == {"high_noise", "low_noise"}  # one network on both experts
    trainer.close()
    sigmas = (0.2, 0.4, 0.6, 0.8)
    before, after, result = train_and_measure(cfg, boundary=0.5, sigmas=sigmas)
    assert result.expert_batches["high_noise"] >= 20 and result.expert_batches["low_noise"] >= 20, result.expert_batches
    assert after < before / 1.2, (before, after)


def test_the_registry_boundary_is_the_default_and_a_batch_stays_on_one_side(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(4, (16, 1, 4, 4)), frames=1, size=(32, 32), batch_size=4)
    cfg = TrainConfig.of(dataset_config=str(data), model="test-tiny-t2v-a14b", checkpoint_dir=str(family),
                      output_dir=str(tmp_path / "out"), output_name="b", max_train_steps=1, seed=0)
    trainer = quiet(cfg).setup()
    assert trainer.boundary == 0.875  # the registry's boundary for the model
    batch = next(trainer.data.batches(1))
    for _ in range(20):
        sample, expert = trainer.draw(batch)
        high = sample.timesteps / 1000 >= 0.875
        assert bool(high.all()) if expert == "high_noise" else not bool(high.any())
    trainer.close()


def test_fp8_base_bf16_and_checkpointing_run(family, tmp_path):
    data = write_dataset(tmp_path / "data", clips(2, (16, 1, 4, 4)), frames=1, size=(32, 32))
    cfg = TrainConfig.of(dataset_config=str(data), model="test-tiny-t2v", checkpoint_dir=str(family),
                      output_dir=str(tmp_path / "out"), output_name="m", max_train_steps=2, seed=0, fp8_base=True,
                      fp8_scaled=True, mixed_precision="bf16", gradient_checkpointing=True,
                      gradient_checkpointing_cpu_offload=True, optimizer_type="torch.optim.SGD")
    lines = []
    result = Trainer(cfg, progress=False, say=lines.append).run()
    assert result.step == 2 and all(math.isfinite(x) for x in result.losses)
    text = "\n".join(lines)
    assert "--fp8_base: fp8_scaled: 20 linear layers" in text
    assert "memory estimate (rough):" in text and "gradient checkpointing" in text


# ---------------------------------------------------------------------------------------------
# Data and conditioning


def test_batches_group_by_shape_repeat_items_and_replay_their_order(tmp_path):
    from wan.train.data import CacheBatches
    from wan.train.dataset_config import load_dataset_config
    g = torch.Generator().manual_seed(0)
    cache, videos = tmp_path / "cache", tmp_path / "videos"
    videos.mkdir()
    for i in range(5):
        size, lat = ((64, 64), (16, 2, 8, 8)) if i < 3 else ((32, 32), (16, 2, 4, 4))
        write_latent_cache(cache / video_latent_cache_name(f"v{i}.mp4", 0, 5, size), torch.randn(*lat, generator=g),
                           original_size=size, frame_count=5)
        write_text_cache(cache / text_cache_name(f"v{i}.mp4"), torch.randn(3 + i, TEXT_DIM, generator=g), caption="c")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\ncaption_extension = ".txt"\nbatch_size = 2\nnum_repeats = 2\n\n[[datasets]]\n'
                    f'video_directory = "{videos}"\ncache_directory = "{cache}"\ntarget_frames = [5]\n')
    config = load_dataset_config(toml)
    data = CacheBatches(config, seed=4)
    assert len(data) == 3 + 2 and data.num_items == 10 and data.largest_latent_shape == (2, 16, 2, 8, 8)
    epoch1 = list(data.batches(1))
    seen = sorted(name for b in epoch1 for name in b.names)
    assert seen == sorted(["v0", "v1", "v2", "v3", "v4"] * 2)  # every item num_repeats times per epoch
    for b in epoch1:
        assert b.latents.shape[0] in (1, 2) and b.context().shape == (len(b), max(t.shape[0] for t in b.t5), TEXT_DIM)
    order = [[n for n in b.names] for b in epoch1]
    again = CacheBatches(config, seed=4)
    assert [[n for n in b.names] for b in again.batches(1)] == order  # a function of (seed, epoch)
    assert [[n for n in b.names] for b in again.batches(1, start=3)] == order[3:]
    assert [[n for n in b.names] for b in again.batches(2)] != order


@pytest.mark.parametrize("variant", ["i2v", "flf2v", "fun_control"])
def test_image_and_control_caches_condition_the_dit(tmp_path, variant):
    from wan.testing.tiny_family import TINY_CLIP, TINY_CLIP_TOKENS, TINY_DIT_VARIANTS
    from wan.train.data import CacheBatches
    from wan.train.dataset_config import load_dataset_config
    from wan.train.data import DataError
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(16, 2, 4, 4, generator=g)
    image = torch.randn(20, 2, 4, 4, generator=g)
    clip = torch.randn(*((2,) if variant == "flf2v" else ()), TINY_CLIP_TOKENS, TINY_CLIP["dim"], generator=g)
    control = torch.randn(16, 2, 4, 4, generator=g) if variant == "fun_control" else None
    root = tmp_path / "d"
    toml = write_dataset(root, [latents], size=(32, 32))
    write_latent_cache(next((root / "cache").glob("*_wan.safetensors")), latents, original_size=(32, 32),
                       frame_count=5, image_latents=image, clip=clip, control_latents=control)
    dit = WanDiT(DiTConfig(**TINY_DIT, **TINY_DIT_VARIANTS[variant]))
    dit.load_state_dict(tiny_dit_state_dict(variant, 1))
    trainer = quiet(TrainConfig.of(seed=0), dits={"transformer": dit},
                    data=CacheBatches(load_dataset_config(toml), 0)).setup()
    seen = {}
    handle = dit.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    batch = next(trainer.data.batches(1))
    loss, _ = trainer.forward_loss(batch)
    handle.remove()
    assert math.isfinite(float(loss.detach()))
    y, clip_fea = seen["y"], seen["clip_fea"]
    assert clip_fea.shape == (1, clip.numel() // TINY_CLIP["dim"], TINY_CLIP["dim"])  # flf2v: both frames' tokens
    if variant == "fun_control":  # control latents, then the image latent's first frame only
        assert torch.equal(y[0, :16], control.float()) and torch.equal(y[0, 16:, 0], image[4:, 0].float())
        assert not y[0, 16:, 1:].any()
    else:  # the cached first-frame mask and image latent
        assert torch.equal(y[0], image.float())
    if variant == "i2v":
        batch.clip = None
        with pytest.raises(DataError, match="takes CLIP features"):
            trainer.forward_loss(batch)
    trainer.close()


def test_tensorboard_without_its_package_is_named(tmp_path):
    import importlib.util
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    from wan.train.config import TrainConfigError
    trainer = quiet(TrainConfig.of(seed=0, logging_dir=str(tmp_path)), dits={"transformer": tiny_dit()},
                    data=FixedBatches([fixed_batch()]))
    with pytest.raises(TrainConfigError, match="needs the tensorboard package: pip install tensorboard"):
        trainer.setup()


def test_block_swap_reads_blocks_through_forward_and_backward_with_the_same_result(family, tmp_path):
    """--blocks_to_swap 1 with gradient checkpointing: one block is read from the checkpoint when it runs
    (its weights are meta placeholders between runs), in the forward pass and again in the backward
    pass's recomputation; the LoRA is the one training without the swap gives, bit for bit."""
    data = write_dataset(tmp_path / "data", clips(2, (16, 2, 8, 8)))
    base = dict(dataset_config=str(data), model="test-tiny-t2v", checkpoint_dir=str(family), output_name="lora",
                network_dim=4, learning_rate=5e-3, max_train_steps=3, seed=3, gradient_checkpointing=True)
    plain = quiet(TrainConfig.of(**base, output_dir=str(tmp_path / "plain"))).run()
    lines = []
    trainer = Trainer(TrainConfig.of(**base, output_dir=str(tmp_path / "swap"), blocks_to_swap=1), progress=False,
                      say=lines.append)
    swapped = trainer.run()
    assert any("--blocks_to_swap 1: 1 of 2 blocks read from" in line for line in lines)
    dit = trainer.experts["transformer"]
    assert sum(p.is_meta for p in dit.blocks.parameters()) > 0  # one block is not held between runs
    assert swapped.losses == plain.losses
    with safe_open(str(plain.lora_path), "pt") as a, safe_open(str(swapped.lora_path), "pt") as b:
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    with pytest.raises(Exception, match="--blocks_to_swap: needs --gradient_checkpointing"):
        quiet(TrainConfig.of(**{**base, "gradient_checkpointing": False}, output_dir=str(tmp_path / "x"),
                             blocks_to_swap=1)).run()
