"""The engine's one entry: a request in, written files and their metadata out.

    engine = Engine(checkpoint_dir="checkpoints")
    result = engine.generate(GenerationRequest(model="wan2.1-t2v-1.3B", prompt="a fox"), progress=print)

The UI, the CLI and Python callers all go through :meth:`Engine.generate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from wan.engine.attach import AttentionKernel, SetOnNetworks, attach_job
from wan.engine.conditioning import Conditioning, build_conditioning
from wan.engine.loop import Cancelled, CancelToken, Denoising, ExpertPlan, StepInfo, denoise
from wan.engine.model_manager import ModelManager, ModelSet
from wan.engine.request import GenerationRequest, RequestError, resolve_request
from wan.engine.request_checks import Limits
from wan.optim.guidance import StepGuidance
from wan.optim.profiles import ProfileError
from wan.optim.step_savers import StepSavers
from wan.registry import Registry, default_registry

log = logging.getLogger(__name__)
METADATA_KEY = "wan_studio"
METADATA_VERSION = 1


@dataclass
class GenerationResult:
    """What one generation produced."""

    files: list[Path]
    request: GenerationRequest          # the resolved request (every default filled, concrete seed)
    metadata: dict
    latent: torch.Tensor | None = None  # final latent [C, F, H, W] (VACE reference frames removed)
    video: torch.Tensor | None = None   # decoded [3, T, H, W] in [-1, 1]
    steps: list[StepInfo] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)  # e.g. an attention backend that fell back


# Frames larger than Wan's largest size (1280x720) are decoded in tiles when tiling is "auto".
AUTO_TILING_PIXELS = 1280 * 720


def vae_tiling(profile, size: tuple[int, int]):
    """The VAE tiling a profile asks for at this output size (None: decode whole frames)."""
    from wan.models.vae_tiling import TileConfig
    if profile is None:
        return None
    v = profile.vae
    if v.tiling == "on" or (v.tiling == "auto" and size[0] * size[1] > AUTO_TILING_PIXELS):
        return TileConfig(tile=v.tile_px, overlap=v.overlap_px)
    return None


def _check_cancel(cancel: CancelToken | None, where: str) -> None:
    """A cancel between the stages of a job (the loop checks between steps): abort takes effect
    within one step or one stage, whichever is shorter."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled(f"cancelled {where}")


def draw_noise(shape, seed: int, device: torch.device, on_cpu: bool = False) -> torch.Tensor:
    """One ``torch.randn`` of the latent shape from a generator seeded with ``seed``, as the official
    scripts draw it (on the device; ``on_cpu`` draws on the CPU for the same noise on every device)."""
    gen_device = torch.device("cpu") if on_cpu else torch.device(device)
    g = torch.Generator(device=gen_device).manual_seed(seed)
    return torch.randn(*shape, dtype=torch.float32, generator=g, device=gen_device).to(device)


class Engine:
    """Turns requests into videos and images. Models stay loaded between requests."""

    def __init__(self, checkpoint_dir: str | Path = "checkpoints", device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, registry: Registry | None = None, variant: str = "bf16",
                 lora_dir: str | Path | None = "loras", magcache_dir: str | Path | None = None,
                 limits: Limits | None = None):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.limits = limits or Limits()  # what one request may ask (the server's, or the CLI's flags)
        self.lora_dir = lora_dir
        self.lora_names_only = False  # True (the web server): LoRAs only by name inside lora_dir
        # MagCache: per-model magnitude tables, recorded by the first MagCache job of a model
        from wan.optim.magcache_tables import MagnitudeTables
        self.magcache_tables = MagnitudeTables(magcache_dir if magcache_dir is not None
                                               else Path(checkpoint_dir) / "magcache")
        self.registry = registry or default_registry()
        self.models = ModelManager(checkpoint_dir, device, dtype, variant)

    @property
    def device(self) -> torch.device:
        return self.models.device

    def generate(self, request: GenerationRequest, progress: Callable[[StepInfo], None] | None = None,
                 cancel: CancelToken | None = None, write: bool = True,
                 savers: StepSavers | None = None, files: dict[str, str] | None = None) -> GenerationResult:
        """Runs one request end to end.

        ``files``: role -> a path the caller gives instead of the registry's file (the CLI's
        ``--dit``, ``--vae``, ``--t5``, ``--clip``, ``--tokenizer``); the web server gives none.

        Raises:
            RequestError: a field of the request is not allowed (nothing was loaded or written).
            Cancelled: ``cancel`` was set; nothing was written.
        """
        req, spec = resolve_request(request, self.registry, limits=self.limits)
        profile, savers = self._profile_and_savers(req, spec, savers)
        try:
            nets = self.models.get(spec, profile, files)
        except ProfileError as e:
            raise RequestError("profile", req.profile, str(e)) from None
        notices: list[str] = list(nets.notes)
        loras = self._loras(req, nets, profile)
        notices += loras.notices
        steps: list[StepInfo] = []

        def record(info: StepInfo) -> None:
            steps.append(info)
            if progress is not None:
                progress(info)

        latent, cond = self.denoise(req, nets, progress=record, cancel=cancel, savers=savers, loras=loras,
                                    attention=profile.attention if profile else ("sdpa",), notices=notices)
        if savers.magcache_source is not None:  # MagCache: saves a table recorded by this run
            notices += savers.magcache_source.finish()
        _check_cancel(cancel, "before decoding")
        video = nets.vae.decode(latent[None].float(), tile=vae_tiling(profile, cond.size))[0]
        metadata = self.metadata(req, nets)
        files: list[Path] = []
        if write:
            from wan.engine.media import OutputOptions, save_outputs, to_uint8_frames
            options = OutputOptions(folder=req.output_dir, name_template=req.name_template, video_quality=req.quality,
                                    save_latents=req.save_latents, trim_tail_frames=req.trim_tail)
            files = save_outputs(to_uint8_frames(video), req.fps, metadata, options, seed=req.seed, prompt=req.prompt,
                                 latents=latent if req.save_latents else None, model=spec.id, task=req.task)
        return GenerationResult(files, req, metadata, latent, video, steps, notices)

    def _profile_and_savers(self, req: GenerationRequest, spec, savers: StepSavers | None):
        """The job's profile (with its overrides) and step savers (MagCache bound to the model's
        table store); a bad profile is a request error on the ``profile`` field."""
        from wan.optim.apply import resolve_profile, savers_from_profile
        from wan.optim.magcache_tables import bind_magcache
        try:
            profile = resolve_profile(req.profile, req.profile_overrides)
            if savers is None:
                savers = savers_from_profile(profile, spec)
            return profile, bind_magcache(savers, self.magcache_tables, req, spec)  # MagCache: table or recording
        except ProfileError as e:
            raise RequestError("profile", req.profile, str(e)) from None

    def _loras(self, req: GenerationRequest, nets: ModelSet, profile):
        """The request's LoRAs loaded and checked against the loaded networks (not yet attached)."""
        from wan.lora import LoraError
        from wan.lora.job import prepare_loras
        try:
            return prepare_loras(req.loras, nets.dits, self.lora_dir, mode=profile.lora.mode if profile else "hooks",
                                 names_only=self.lora_names_only)
        except LoraError as e:
            raise RequestError("loras", e.value, e.allowed) from None

    def denoise(self, req: GenerationRequest, nets: ModelSet, *, noise: torch.Tensor | None = None,
                progress=None, cancel=None, savers: StepSavers | None = None, loras=None,
                attention: tuple[str, ...] | str = ("sdpa",),
                notices: list[str] | None = None) -> tuple[torch.Tensor, Conditioning]:
        """Conditioning, text, noise and the sampling loop for a resolved request; returns the final
        latent (VACE reference frames removed) and the conditioning.

        The job (attention kernel, RIFLEx, the step savers' block runner, ``loras``: a prepared
        :class:`~wan.lora.job.JobLoras`) is attached to the networks for the loop only; what
        attaching says is appended to ``notices``.
        """
        from wan.engine.samplers import make_sampler
        device = self.device
        cond = build_conditioning(req, nets.spec, nets, device)
        _check_cancel(cancel, "after encoding the inputs")
        context, context_neg = nets.text_encoder.encode_prompts([req.prompt, req.negative_prompt])
        if noise is None:
            noise = draw_noise(cond.noise_shape, req.seed, device, req.cpu_noise)
        sampler = make_sampler(req.sampler, req.steps, req.shift)
        start, latent = 0, noise
        if cond.init_latent is not None:  # video-to-video: noise the input up to the start step
            start = sampler.start_index(req.strength)
            sigma = sampler.sigmas[start].to(device)
            latent = (1 - sigma) * cond.init_latent + sigma * noise
        if cond.fixed_mask is not None:  # TI2V image mode
            latent = (1 - cond.fixed_mask) * cond.fixed_latent + cond.fixed_mask * latent
        savers = savers or StepSavers()
        runner = savers.runner(nets.dits, sampler, start)
        riflex = savers.riflex_setting(cond.noise_shape[1], req.frames, req.fps)
        run = Denoising(nets.dits, sampler, {"context": context[None].to(device), **cond.dit_kwargs},
                        {"context": context_neg[None].to(device), **cond.dit_kwargs},
                        ExpertPlan(req.boundary, req.guidance, req.guidance_high_noise), cond,
                        StepGuidance(savers.guidance, len(sampler.timesteps)), start=start, runner=runner,
                        batched_cfg=savers.batched_cfg, on_step=loras.on_step if loras is not None else None)
        parts = [AttentionKernel(attention, device),
                 SetOnNetworks("riflex", riflex) if riflex is not None else None,
                 SetOnNetworks("block_runner", runner) if runner is not None else None,
                 loras]
        with attach_job(nets.dits, parts) as attached:
            if notices is not None:
                notices += attached
            latent = denoise(run, latent, progress=progress, cancel=cancel)
        return latent[:, cond.drop_front:], cond

    @staticmethod
    def metadata(req: GenerationRequest, nets: ModelSet | None = None) -> dict:
        """What is embedded in outputs: the resolved request, enough to reproduce the output, and
        each file the networks were read from (path, size, a fast fingerprint; ``given`` for a file
        the caller named), so that reproducing it can tell when a file has changed since."""
        import wan
        data = {METADATA_KEY: METADATA_VERSION, "version": wan.__version__, "request": req.to_dict()}
        if nets is not None and nets.paths:
            from wan.loading.files import file_fingerprint
            data["files"] = {role: {**file_fingerprint(path), **({"given": True} if role in nets.given else {})}
                             for role, path in sorted(nets.paths.items())}
        return data


def request_from_metadata(metadata: dict) -> GenerationRequest:
    """Rebuilds the request an output was made from (see :meth:`Engine.metadata`)."""
    if METADATA_KEY not in metadata or "request" not in metadata:
        raise ValueError("this file's metadata was not written by Wan Studio (no request inside)")
    return GenerationRequest.from_dict(metadata["request"])
