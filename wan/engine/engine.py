"""The engine's one entry: a request in, written files and their metadata out.

    engine = Engine(checkpoint_dir="checkpoints")
    result = engine.generate(GenerationRequest(model="wan2.1-t2v-1.3B", prompt="a fox"), progress=print)

The UI, the CLI and Python callers all go through :meth:`Engine.generate`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from wan.engine.attach import AttentionKernel, SetOnNetworks, attach_job
from wan.engine.conditioning import Conditioning, build_conditioning
from wan.engine.loop import Cancelled, CancelToken, Denoising, StepInfo, denoise
from wan.engine.phases import PhasePlan, nag_scales, phase_guidances
from wan.engine.model_manager import ModelManager, ModelSet
from wan.engine.out_of_memory import out_of_memory
from wan.optim.apply import load_settings as _load_settings
from wan.engine.request import GenerationRequest, RequestError, resolve_request
from wan.engine.request_checks import Limits
from wan.engine.window_plan import is_windowed
from wan.engine.text_cache import DEFAULT_MB as DEFAULT_TEXT_CACHE_MB
from wan.engine.text_cache import TextEncoderCache, cache_notice
from wan.optim.guidance import StepGuidance
from wan.optim.profiles import ProfileError
from wan.optim.step_savers import StepSavers
from wan.registry import Registry, default_registry

if TYPE_CHECKING:
    from wan.parallel import ParallelConfig

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
    comm_bytes: dict[str, int] = field(default_factory=dict)  # parallel runs: bytes this rank sent, per collective


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
                 limits: Limits | None = None, text_cache_mb: float = DEFAULT_TEXT_CACHE_MB):
        """``text_cache_mb``: the bound of the text-encoder cache in MiB (0: off); see
        :mod:`wan.engine.text_cache`."""
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.limits = limits or Limits()  # what one request may ask (the server's, or the CLI's flags)
        self.lora_dir = lora_dir
        self.lora_names_only = False  # True (the web server): LoRAs only by name inside lora_dir
        self._stage = "loading the models"  # what the running job does, for an out-of-memory error
        # MagCache: per-model magnitude tables, recorded by the first MagCache job of a model
        from wan.optim.magcache_tables import MagnitudeTables
        self.magcache_tables = MagnitudeTables(magcache_dir if magcache_dir is not None
                                               else Path(checkpoint_dir) / "magcache")
        self.registry = registry or default_registry()
        self.models = ModelManager(checkpoint_dir, device, dtype, variant)
        # umT5 outputs of earlier jobs, by encoder and exact text (shared by every job of this engine)
        if not isinstance(text_cache_mb, (int, float)) or isinstance(text_cache_mb, bool) or not text_cache_mb >= 0:
            raise ValueError(f"text_cache_mb: {text_cache_mb!r} is not allowed; a number of MiB >= 0 (0: off)")
        self.text_cache = TextEncoderCache(int(text_cache_mb * 2**20))

    @property
    def device(self) -> torch.device:
        return self.models.device

    def generate(self, request: GenerationRequest, progress: Callable[[StepInfo], None] | None = None,
                 cancel: CancelToken | None = None, write: bool = True,
                 savers: StepSavers | None = None, files: dict[str, str] | None = None,
                 parallel: ParallelConfig | None = None) -> GenerationResult:
        """Runs one request end to end.

        ``files``: role -> a path the caller gives instead of the registry's file (the CLI's
        ``--dit``, ``--vae``, ``--t5``, ``--clip``, ``--tokenizer``); the web server gives none.

        ``parallel``: one generation on the processes of a torchrun launch (``wan.parallel``: Ulysses,
        CFG parallel, FSDP); every process calls ``generate`` with the same arguments. Rank 0's
        request (its seed drawn for ``-1``) is the one every rank runs; only rank 0 reports
        progress, decodes and writes (the others return no files and no video). It is a setting
        of the run, not of the request: the video is the single-process one, up to float
        summation order. Settings that cannot run in parallel are refused before loading, naming
        them (:func:`wan.parallel.check_parallel` and :meth:`_refuse_in_parallel`).

        Raises:
            RequestError: a field of the request is not allowed (nothing was loaded or written).
            ParallelConfigError: a parallel setting that cannot run (nothing was loaded).
            Cancelled: ``cancel`` was set; nothing was written.
            GenerationOutOfMemory: the device or the RAM ran out (single process): where, and what
                uses less; the models are unloaded first (:mod:`wan.engine.out_of_memory`).
        """
        if parallel is None or not parallel.enabled:
            req, spec = resolve_request(request, self.registry, limits=self.limits)
            self._stage = "loading the models"
            try:
                return self._generate(req, spec, progress, cancel, write, savers, files, None)
            except (torch.cuda.OutOfMemoryError, MemoryError) as exc:
                failure = out_of_memory(exc, self._stage, self.device, req.profile)
            self.models.release()  # here, once the failed call's tensors are gone with its exception
            raise failure
        from wan.parallel import SharedCancel, parallel_session
        with parallel_session(parallel, device=self.device) as ps:
            self._check_device(ps)
            req, spec = self._resolve_on_rank0(request, ps)
            try:
                return self._generate(req, spec, progress if ps.is_main else None, SharedCancel(ps, cancel),
                                      write, savers, files, ps)
            finally:
                if ps.owned and (parallel.dit_fsdp or parallel.t5_fsdp):
                    self.models.release()  # sharded over a process group that ends with this call

    def _generate(self, req: GenerationRequest, spec, progress, cancel, write: bool, savers: StepSavers | None,
                  files: dict[str, str] | None, ps) -> GenerationResult:
        """:meth:`generate` for a resolved request; ``ps``: the parallel state, or None."""
        profile, savers = self._profile_and_savers(req, spec, savers)
        sharding = None
        if ps is not None:
            if is_windowed(req):
                field = "continue_video" if req.continue_video else "sliding_window_size"
                raise RequestError(field, getattr(req, field), "a single-process run: sliding windows and "
                                                               "continuation do not run on several processes")
            self._refuse_in_parallel(req, spec, profile, savers, ps)
            sharding, fetched = self._fetch_on_rank0(req, spec, profile, files, ps)
        else:
            fetched = self._fetch_loras(req, spec)
        try:
            # (a manager of another kind, e.g. training's LiveModels, takes the three arguments)
            nets = (self.models.get(spec, profile, files) if sharding is None
                    else self.models.get(spec, profile, files, sharding=sharding))
        except ProfileError as e:
            raise RequestError("profile", req.profile, str(e)) from None
        notices: list[str] = [*fetched, *nets.notes]
        loras = self._loras(req, nets, profile)
        notices += loras.notices
        if ps is not None and ps.config.dit_fsdp:
            _refuse_merged_loras(loras, nets)
        self._stage = "encoding the inputs"
        if is_windowed(req):  # sliding windows / continuation: window by window, one file (wan.engine.windows)
            from wan.engine.windows import run_windows
            return run_windows(self, req, spec, nets, profile, savers, loras, progress, cancel, write, notices)
        steps: list[StepInfo] = []

        def record(info: StepInfo) -> None:
            steps.append(info)
            if progress is not None:
                progress(info)

        latent, cond = self.denoise(req, nets, progress=record, cancel=cancel, savers=savers, loras=loras,
                                    attention=profile.attention if profile else ("sdpa",), notices=notices,
                                    parallel=ps)
        if savers.magcache_source is not None and (ps is None or ps.is_main):  # saves a table this run recorded
            notices += savers.magcache_source.finish()
        _check_cancel(cancel, "before decoding")
        comm = {}
        if ps is not None:
            comm = dict(ps.counter.bytes_sent)
            notices.append(_parallel_notice(ps))
        if ps is not None and not ps.is_main:  # rank 0 decodes and writes
            return GenerationResult([], req, self.metadata(req), latent, None, steps, notices, comm)
        self._stage = "decoding"
        video = nets.vae.decode(latent[None].float(), tile=vae_tiling(profile, cond.size))[0]
        metadata = self.metadata(req, nets)
        files: list[Path] = []
        if write:
            from wan.engine.media import OutputOptions, save_outputs, to_uint8_frames
            options = OutputOptions(folder=req.output_dir, name_template=req.name_template, video_quality=req.quality,
                                    save_latents=req.save_latents, trim_tail_frames=req.trim_tail)
            files = save_outputs(to_uint8_frames(video), req.fps, metadata, options, seed=req.seed, prompt=req.prompt,
                                 latents=latent if req.save_latents else None, model=spec.id, task=req.task)
        return GenerationResult(files, req, metadata, latent, video, steps, notices, comm)

    # -- parallel generation ------------------------------------------------------------------------

    def _check_device(self, ps) -> None:
        """The engine's device must be the one torchrun gave this rank (``cuda:LOCAL_RANK``)."""
        mine = self.device
        if mine.type != ps.device.type or (mine.index is not None and mine != ps.device):
            raise ValueError(f"this Engine runs on {mine}, but rank {ps.rank} of the parallel run has {ps.device}: "
                             f"build the Engine with device={str(ps.device)!r} (or 'cuda' without an index)")

    def _resolve_on_rank0(self, request: GenerationRequest, ps) -> tuple[GenerationRequest, object]:
        """Rank 0 resolves the request (draws the seed of ``-1``) and every rank takes its result,
        or its error: a bad request fails on every rank alike, before anything loads."""
        outcome, failure = None, None
        if ps.is_main:
            try:
                outcome = ("ok", resolve_request(request, self.registry, limits=self.limits)[0])
            except RequestError as e:
                outcome = ("error", (e.field, e.value, e.allowed))
            except Exception as e:  # noqa: BLE001 - the others must not wait for a request that never comes
                outcome, failure = ("failed", f"{type(e).__name__}: {e}"), e
        kind, value = ps.broadcast(outcome)
        if failure is not None:
            raise failure
        if kind == "failed":
            raise RuntimeError(f"rank 0 could not resolve the request: {value}")
        if kind == "error":
            raise RequestError(*value)
        return value, self.registry.get(value.model)

    def _refuse_in_parallel(self, req: GenerationRequest, spec, profile, savers: StepSavers, ps) -> None:
        """Settings that cannot run on several processes, named before any model loads."""
        from wan.parallel import ParallelConfigError, check_parallel
        config = ps.config
        check_parallel(config, num_heads=spec.arch.num_heads, launch=ps.launch,
                       guidance=phase_guidances(req, spec.is_two_expert),
                       skip_layer_guidance=savers.guidance.slg.mode != "none")
        if profile is None:
            return
        try:
            stream, _, _, quant_dit, quant_te, compile_blocks = _load_settings(profile)
        except ProfileError:
            return  # a profile that cannot load at all: models.get says so, as in a single process
        mmgp = self.models._mmgp_settings(spec, profile) is not None
        conflicts = []  # (flag, what the profile sets, on)
        if config.ulysses_size > 1:
            conflicts += [("ulysses_size", "compile (the Ulysses collectives inside compiled blocks are untested)",
                           compile_blocks)]
        if config.dit_fsdp:
            conflicts += [("dit_fsdp", "memory.offload blocks (block streaming owns the parameters FSDP shards)",
                           stream),
                          ("dit_fsdp", f"quantize.transformer={quant_dit} (FSDP2 gathers one dtype per group)",
                           quant_dit != "none"),
                          ("dit_fsdp", "compile (compiled before sharding)", compile_blocks),
                          ("dit_fsdp", f"memory.offload {profile.memory.offload} through mmgp (it moves the "
                                       "parameters FSDP shards)", mmgp)]
        if config.t5_fsdp:
            conflicts += [("t5_fsdp", f"quantize.text_encoder={quant_te} (FSDP2 gathers one dtype per group)",
                           quant_te != "none"),
                          ("t5_fsdp", f"memory.offload {profile.memory.offload} through mmgp", mmgp)]
        for flag, what, on in conflicts:
            if on:
                value = config.ulysses_size if flag == "ulysses_size" else "(on)"
                raise ParallelConfigError(flag, value, f"a profile without it, or no --{flag}",
                                          f"profile {profile.name} sets {what}")

    def _fetch_loras(self, req: GenerationRequest, spec) -> list[str]:
        """Downloads the registry (accelerator) LoRA files the request names and the LoRA folder
        lacks, before any model loads; a notice per entry fetched (:mod:`wan.engine.accelerators`)."""
        from wan.engine.accelerators import fetch_accelerator_loras
        return fetch_accelerator_loras(req, spec, self.registry, self.lora_dir)

    def _fetch_on_rank0(self, req: GenerationRequest, spec, profile, files, ps) -> tuple:
        """Rank 0 makes the model's and the registry LoRAs' files present (downloads) before every
        rank loads them; returns the FSDP sharding every rank loads with, and rank 0's notices."""
        from wan.engine.model_manager import Sharding
        config = ps.config
        sharding = (Sharding(ps.fsdp_mesh, config.dit_fsdp, config.t5_fsdp)
                    if config.dit_fsdp or config.t5_fsdp else None)
        failure, fetched = None, []
        if ps.is_main:
            try:
                fetched = self._fetch_loras(req, spec)
                self.models.fetch(spec, profile, files, sharding)
            except Exception as e:  # noqa: BLE001 - told to the other ranks, raised here as it is
                failure = e
        told = ps.broadcast(None if failure is None else f"{type(failure).__name__}: {failure}")
        if failure is not None:
            raise failure
        if told is not None:
            raise RuntimeError(f"rank 0 could not get the model's files: {told}")
        return sharding, fetched

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
                                 names_only=self.lora_names_only, guidance_phases=req.guidance_phases or 1)
        except LoraError as e:
            raise RequestError("loras", e.value, e.allowed) from None

    def denoise(self, req: GenerationRequest, nets: ModelSet, *, noise: torch.Tensor | None = None,
                progress=None, cancel=None, savers: StepSavers | None = None, loras=None,
                attention: tuple[str, ...] | str = ("sdpa",),
                notices: list[str] | None = None, parallel=None,
                cond: Conditioning | None = None) -> tuple[torch.Tensor, Conditioning]:
        """Conditioning, text, noise and the sampling loop for a resolved request; returns the final
        latent (VACE reference frames removed) and the conditioning (``cond``: one built by the
        caller, e.g. a sliding window's, instead of the request's own).

        The job (attention kernel, RIFLEx, the step savers' block runner, ``loras``: a prepared
        :class:`~wan.lora.job.JobLoras`) is attached to the networks for the loop only; what
        attaching says is appended to ``notices``.

        ``parallel``: this rank's :class:`~wan.parallel.ParallelState` (every rank calls this with
        the same request): rank 0's noise and step-cache schedule for all, Ulysses attached last,
        the passes of a step split over the cfg groups.
        """
        from wan.engine.samplers import make_sampler
        device = self.device
        if cond is None:
            cond = build_conditioning(req, nets.spec, nets, device)
        _check_cancel(cancel, "after encoding the inputs")
        context, context_neg = self.encode_prompts(nets, req, notices, parallel)
        if noise is None:
            noise = draw_noise(cond.noise_shape, req.seed, device, req.cpu_noise)
        if parallel is not None:
            noise = parallel.broadcast_tensor(noise)  # whatever each device draws, rank 0's noise
        sampler = make_sampler(req.sampler, req.steps, req.shift, timesteps=req.timesteps or None, seed=req.seed)
        start, latent = 0, noise
        if cond.init_latent is not None:  # video-to-video: noise the input up to the start step
            start = sampler.start_index(req.strength)
            sigma = sampler.sigmas[start].to(device)
            latent = (1 - sigma) * cond.init_latent + sigma * noise
        if cond.fixed_mask is not None:  # TI2V image mode
            latent = (1 - cond.fixed_mask) * cond.fixed_latent + cond.fixed_mask * latent
        savers = savers or StepSavers()
        if parallel is None:
            runner = savers.runner(nets.dits, sampler, start)
        else:
            runner = _parallel_runner(savers, nets.dits, sampler, start, parallel, notices)
        nag = None
        plan = PhasePlan.of_request(req, "high_noise" in nets.dits)  # guidance and expert of each step
        nag_by_phase = nag_scales(req)[:len(plan.experts)]
        if max(nag_by_phase) > 1:  # the negative prompt inside the prompt's pass (wan.optim.nag)
            from wan.optim.nag import NagGuidance
            timesteps = [float(t) for t in sampler.timesteps]
            scale = (nag_by_phase[0] if len(set(nag_by_phase)) == 1
                     else (lambda step: nag_by_phase[plan.phase_at(timesteps[step])]))  # per guidance phase
            nag = NagGuidance(context_neg[None].to(device), scale, req.nag_tau, req.nag_alpha,
                              reembed_each_step=bool(loras is not None and loras.runtimes))
            if savers.batched_cfg and notices is not None:
                notices.append("NAG: the prompt and negative-prompt passes run one after the other (not batched)")
        riflex = savers.riflex_setting(cond.noise_shape[1], req.frames, req.fps)
        if notices is not None and len(plan.experts) > len(set(plan.experts)):
            notices.append("guidance " + plan.describe([float(t) for t in sampler.timesteps], start))
        cfg_parallel = None
        if parallel is not None and parallel.config.cfg_parallel:
            from wan.parallel import CfgParallel
            cfg_parallel = CfgParallel(parallel.cfg_group, parallel.counter)
        run = Denoising(nets.dits, sampler, {"context": context[None].to(device), **cond.dit_kwargs},
                        {"context": context_neg[None].to(device), **cond.dit_kwargs},
                        plan, cond,
                        StepGuidance(savers.guidance, len(sampler.timesteps)), start=start, runner=runner,
                        batched_cfg=savers.batched_cfg and nag is None,
                        on_step=loras.on_step if loras is not None else None, cfg_parallel=cfg_parallel, nag=nag)
        parts = [AttentionKernel(attention, device),
                 SetOnNetworks("riflex", riflex) if riflex is not None else None,
                 SetOnNetworks("block_runner", runner) if runner is not None else None,
                 nag,  # after the step savers' runner (it wraps it), before Ulysses (which wraps both)
                 loras]
        if parallel is not None:  # last: it wraps the block runner set above
            from wan.parallel import UlyssesParallel
            parts.append(UlyssesParallel(parallel.sp_group, parallel.counter))
        steps = len(sampler.timesteps)

        def step_done(info: StepInfo) -> None:  # the next step is the one that runs now (for an out-of-memory error)
            self._stage = f"denoising (step {min(info.step + 1, steps)} of {steps})"
            if progress is not None:
                progress(info)
        self._stage = f"denoising (step {start + 1} of {steps})"
        with attach_job(nets.dits, parts) as attached:
            if notices is not None:
                notices += attached
            latent = denoise(run, latent, progress=step_done, cancel=cancel)
        return latent[:, cond.drop_front:], cond

    def encode_prompts(self, nets: ModelSet, req: GenerationRequest, notices: list[str] | None = None,
                       parallel=None) -> tuple[torch.Tensor, torch.Tensor]:
        """umT5 states ``[L, dim]`` of the prompt and the negative prompt, through the engine's text
        cache (:mod:`wan.engine.text_cache`); a notice says when the cache served them. Encoders that
        cannot be named (``nets.text_encoder_key`` None) and encoders sharded over the processes of
        a parallel run (which must run on every rank together) always encode."""
        key = getattr(nets, "text_encoder_key", None)
        if parallel is not None and parallel.config.t5_fsdp:
            key = None
        encoded = self.text_cache.encode(nets.text_encoder.encode_prompts, key, [req.prompt, req.negative_prompt])
        notice = cache_notice(("prompt", "negative prompt"), encoded.cached)
        if notice and notices is not None and notice not in notices:  # said once per job (windows encode again)
            notices.append(notice)
        context, context_neg = encoded.tensors  # from an encoder that may run on the CPU (LoadSettings)
        return context.to(self.device), context_neg.to(self.device)

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


def _parallel_notice(ps) -> str:
    """The layout of a parallel run and what this rank sent, in words."""
    c = ps.config
    parts = [f"ulysses {c.ulysses_size}"] + (["cfg 2"] if c.cfg_parallel else []) + \
        [f for f, on in (("DiT FSDP", c.dit_fsdp), ("T5 FSDP", c.t5_fsdp)) if on]
    sent = ", ".join(f"{kind} {n / 2**20:.1f} MiB" for kind, n in sorted(ps.counter.bytes_sent.items()))
    return (f"parallel on {ps.world_size} processes ({', '.join(parts)}); rank {ps.rank} sent "
            f"{sent or 'nothing'}")


def _parallel_runner(savers: StepSavers, dits: dict, sampler, start: int, ps, notices: list[str] | None):
    """The step savers' block runner for a parallel run: rank 0's decisions for every rank.

    TeaCache reads the time embedding outside a forward (gathered first under FSDP); its schedule,
    and MagCache's, are rank 0's, so every rank computes and skips the same steps (ranks that
    disagreed would pair different collectives). MagCache cannot record a table here (each rank
    sees a slice of the tokens, or some of the passes): refused. With FSDP and CFG parallel, the
    two groups run different passes, whose blocks FSDP gathers on every rank together: MagCache's
    per-pass schedules merge into one (a step computes when either pass does).
    """
    from contextlib import ExitStack
    from wan.optim.step_cache import MagnitudeRecorder, StepRunner
    from wan.parallel.fsdp import gathered
    with ExitStack() as stack:
        for dit in dits.values():
            stack.enter_context(gathered(dit))
        runner = savers.runner(dits, sampler, start)
    kind = ("recorder" if isinstance(runner, MagnitudeRecorder) else "step" if isinstance(runner, StepRunner)
            else "other" if runner is not None else None)
    kind, schedule = ps.broadcast((kind, getattr(runner, "schedule", None)))
    if kind == "recorder":
        raise RequestError("profile", "MagCache", "MagCache needs a magnitude table for this model, sampler and "
                           "shift, which a parallel run cannot record (each process sees a slice of the video "
                           "or some of the passes): run it once in a single process to record the table, or "
                           "turn MagCache off (--set step_savers.magcache.enabled=false)")
    if kind == "other":
        raise RequestError("profile", type(runner).__name__, "a block runner the parallel run knows (StepRunner)")
    if kind is None:
        return None
    if isinstance(schedule, dict) and ps.config.dit_fsdp and ps.config.cfg_parallel:
        merged = [any(steps) for steps in zip(*schedule.values())]
        if notices is not None:
            notices.append("MagCache: with --dit_fsdp and --cfg_parallel, a step computes when the prompt or the "
                           "negative-prompt pass does (the processes gather the same blocks together)")
        schedule = merged
    if isinstance(runner, StepRunner):
        runner.schedule = schedule
        return runner
    return StepRunner(schedule=schedule)


def _refuse_merged_loras(loras, nets: ModelSet) -> None:
    """With ``--dit_fsdp``, LoRA targets that would be merged into weights (merge mode, or targets
    that are not linear layers) would write into sharded parameters: refused, naming them."""
    from wan.lora.merge import place_targets
    for expert, rt in loras.runtimes.items():
        merged = [p.name for p in place_targets(nets.dits[expert], rt.uses, rt.mode) if p.how == "merge"]
        if merged:
            from wan.parallel import ParallelConfigError
            raise ParallelConfigError(
                "dit_fsdp", "(on)", "--dit_fsdp with LoRAs applied as hooks (profile lora.mode hooks) on linear "
                "layers only, or no --dit_fsdp",
                f"{len(merged)} LoRA target(s) would be merged into sharded weights (e.g. {merged[0]})")


def request_from_metadata(metadata: dict) -> GenerationRequest:
    """Rebuilds the request an output was made from (see :meth:`Engine.metadata`)."""
    if METADATA_KEY not in metadata or "request" not in metadata:
        raise ValueError("this file's metadata was not written by Wan Studio (no request inside)")
    return GenerationRequest.from_dict(metadata["request"])
