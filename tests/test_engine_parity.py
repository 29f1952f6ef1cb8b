"""End-to-end parity: the engine's final latents against diffusers' Wan pipelines.

Same tiny weights (the TEST family, converted for diffusers with the project's key maps), the same
text embeddings (ours, zero-padded to 512 rows for diffusers, as its own encoder pads), the same
noise, and diffusers' scheduler set to the reference sigma grid linspace(0.999, 0, N+1). Tolerance:
max |ours - ref| / max |ref| <= 1e-4 in float32.
"""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import rel_err
from test_dit_parity import diffusers_model
from test_vae import _diffusers_vae
from wan.engine import Engine, GenerationRequest, draw_noise, resolve_request
from wan.engine.conditioning import build_conditioning
from wan.testing.tiny_family import ensure_tiny_checkpoints

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    return Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)


def reference_scheduler(shift):
    """diffusers' UniPC with its grid replaced by the reference's linspace(0.999, 0, N+1)."""
    from diffusers import UniPCMultistepScheduler
    sch = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                  num_train_timesteps=1000)
    original = sch.set_timesteps

    def set_timesteps(num_inference_steps=None, device=None, **kw):
        return original(sigmas=np.linspace(0.999, 0, num_inference_steps + 1)[:-1], device=device)
    sch.set_timesteps = set_timesteps
    return sch


def diffusers_parts(nets):
    dit_state = {k: v for k, v in nets.dit.state_dict().items()}
    transformer = diffusers_model(nets.dit.config, dit_state)
    vae_state = load_file(str(nets.paths["vae"]))
    vae = _diffusers_vae(nets.vae.version, vae_state)
    return transformer, vae


def our_run(engine, request, noise=None):
    req, spec = resolve_request(request)
    nets = engine.models.get(spec)
    cond = build_conditioning(req, spec, nets, engine.device)
    if noise is None:
        noise = draw_noise(cond.noise_shape, req.seed, engine.device)
    latent, cond = engine.denoise(req, nets, noise=noise)
    ctx, neg = nets.text_encoder.encode_prompts([req.prompt, req.negative_prompt])
    return req, nets, cond, noise, latent, ctx, neg


def pad512(x):
    return torch.nn.functional.pad(x, (0, 0, 0, 512 - x.shape[0]))[None]


def test_t2v_matches_wan_pipeline(engine):
    from diffusers import WanPipeline
    req, nets, cond, noise, ours, ctx, neg = our_run(engine, GenerationRequest(
        model="test-tiny-t2v", prompt="a red fox in snow", seed=7, steps=6))
    transformer, vae = diffusers_parts(nets)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=reference_scheduler(req.shift),
                       transformer=transformer)
    ref = pipe(prompt_embeds=pad512(ctx), negative_prompt_embeds=pad512(neg), height=req.height, width=req.width,
               num_frames=req.frames, num_inference_steps=req.steps, guidance_scale=req.guidance,
               latents=noise[None].clone(), output_type="latent", return_dict=False)[0][0]
    assert rel_err(ours, ref) <= TOL


def test_i2v_matches_image_to_video_pipeline(engine, tmp_path):
    """Wan 2.1 i2v with CLIP. The image is given at the output size, so diffusers' PIL resize and
    the reference's torch resize are both the identity; the CLIP features are ours (diffusers'
    CLIPImageProcessor crops where the reference squashes)."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    g = torch.Generator().manual_seed(3)
    pixels = (torch.rand(64, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "start.png")
    req, nets, cond, noise, ours, ctx, neg = our_run(engine, GenerationRequest(
        model="test-tiny-i2v", prompt="the fox turns its head", image=str(tmp_path / "start.png"),
        width=96, height=64, seed=11, steps=5))
    assert cond.size == (96, 64)
    transformer, vae = diffusers_parts(nets)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=reference_scheduler(req.shift),
                                   image_processor=None, image_encoder=None, transformer=transformer)
    clip = cond.dit_kwargs["clip_fea"]
    pipe.encode_image = lambda image, device=None: clip
    ref = pipe(image=Image.open(tmp_path / "start.png"), prompt_embeds=pad512(ctx), negative_prompt_embeds=pad512(neg),
               height=64, width=96, num_frames=req.frames, num_inference_steps=req.steps,
               guidance_scale=req.guidance, latents=noise[None].clone(), output_type="latent", return_dict=False)[0][0]
    assert rel_err(ours, ref) <= TOL


def test_ti2v_text_mode_matches_expand_timesteps_pipeline(engine):
    """Wan 2.2 TI2V-5B style (48 channels, 2.2 VAE): diffusers feeds per-token timesteps."""
    from diffusers import WanPipeline
    req, nets, cond, noise, ours, ctx, neg = our_run(engine, GenerationRequest(
        model="test-tiny-ti2v", prompt="waves at dusk", seed=5, steps=5))
    transformer, vae = diffusers_parts(nets)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=reference_scheduler(req.shift),
                       transformer=transformer, expand_timesteps=True)
    ref = pipe(prompt_embeds=pad512(ctx), negative_prompt_embeds=pad512(neg), height=req.height, width=req.width,
               num_frames=req.frames, num_inference_steps=req.steps, guidance_scale=req.guidance,
               latents=noise[None].clone(), output_type="latent", return_dict=False)[0][0]
    assert rel_err(ours, ref) <= TOL


def test_ti2v_image_mode_matches_pipeline(engine, tmp_path):
    """TI2V with a first image: its latent is kept clean (timestep 0 on its tokens). diffusers
    replaces frame 0 only at the end, the reference at every step; the final latents agree."""
    from diffusers import WanImageToVideoPipeline
    from PIL import Image
    g = torch.Generator().manual_seed(4)
    Image.fromarray((torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()).save(tmp_path / "first.png")
    req, nets, cond, noise, ours, ctx, neg = our_run(engine, GenerationRequest(
        model="test-tiny-ti2v", prompt="a boat", image=str(tmp_path / "first.png"), seed=9, steps=4))
    transformer, vae = diffusers_parts(nets)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=reference_scheduler(req.shift),
                                   transformer=transformer, expand_timesteps=True)
    ref = pipe(image=Image.open(tmp_path / "first.png"), prompt_embeds=pad512(ctx), negative_prompt_embeds=pad512(neg),
               height=64, width=64, num_frames=req.frames, num_inference_steps=req.steps, guidance_scale=req.guidance,
               latents=noise[None].clone(), output_type="latent", return_dict=False)[0][0]
    assert rel_err(ours, ref) <= TOL
