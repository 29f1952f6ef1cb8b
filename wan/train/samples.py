"""Sample videos during LoRA training, made through the engine with the LoRA as it is at that step.

musubi-tuner's ``--sample_prompts`` behaviour: a text file of prompt lines with inline options
(``a fox --w 64 --h 64 --f 9 --d 42 --s 20 --g 5 --fs 3 --n blurry``, read by
:mod:`wan.engine.prompt_lines`, as ``generate --from_file``), sampled at step 0
(``--sample_at_first``), every N steps and every N epochs (:func:`wan.train.trainer.should_sample`).

Each line becomes a :class:`~wan.engine.request.GenerationRequest` of the training's model: what the
line leaves unset is the model's default, as in ``generate``, and the seed is the line's ``--d`` or
else the training seed. The request runs through :meth:`wan.engine.engine.Engine.generate` on the
networks the trainer holds: its DiT(s) with the trainable LoRA attached (multiplier 1, dropout off),
never a second copy. The engine gets them from :class:`LiveModels`, a model manager that hands out
those networks; the VAE (and CLIP for Wan 2.1 i2v) is loaded once, on first use, from ``--vae`` /
``--clip`` or the model's registry files, and kept in CPU memory between samples; the prompts are
encoded once with umT5 (``--t5``, or the registry's), which is then released, as musubi encodes its
sample prompts once and drops the text encoder.

Files go to ``<output_dir>/sample/``, named as musubi's ``sample_image_inference`` names them:
``<output_name>_<step:06d>_<index:02d>_<YYYYmmddHHMMSS>_<seed>.mp4`` (``e<epoch:06d>`` instead of the
step at epoch ends and at the first sample), a PNG for one frame; the generation's metadata (the
resolved request, plus the training step) is embedded as in every output. The trainer's
:meth:`~wan.train.trainer.Trainer.sample` restores train mode, random states and the LoRA multiplier.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from wan.engine.model_manager import ModelManager, ModelSet
from wan.engine.prompt_lines import parse_prompt_line, read_prompt_file
from wan.engine.request import GenerationRequest, RequestError, resolve_request
from wan.train.config import TrainConfig, TrainConfigError

SAMPLE_FOLDER = "sample"
TRAINING_SEED = -1  # a line without --d: the run's seed


@dataclass(frozen=True)
class SamplePrompt:
    """One line of the prompt file: its position (musubi's ``enum``, in file names), line number and
    request (``seed`` :data:`TRAINING_SEED` when the line gives none)."""

    index: int
    line: int
    request: GenerationRequest


def read_sample_prompts(path: str, model: str) -> list[SamplePrompt]:
    """The prompts of ``--sample_prompts`` as requests for ``model``, each checked as ``generate``
    checks it (sizes, frames, input files) before anything loads.

    Raises:
        TrainConfigError: an unreadable file, an empty one, or a line (named by number) that is not allowed.
    """
    if Path(path).suffix.lower() in (".toml", ".json"):
        raise TrainConfigError(f"--sample_prompts: {path}: musubi's TOML and JSON prompt files are not read; give a "
                               "text file, one prompt per line with inline options (--w --h --f --d --s --g --fs --n)")
    try:
        lines = read_prompt_file(path, flag="sample_prompts")
    except RequestError as e:
        raise TrainConfigError(f"--sample_prompts: {e.value!r} is not allowed; {e.allowed}") from None
    if not lines:
        raise TrainConfigError(f"--sample_prompts: {path} has no prompt line (blank lines and # comments are skipped)")
    base = GenerationRequest(model=model, seed=TRAINING_SEED)
    prompts = []
    for index, (number, text) in enumerate(lines):
        try:
            request = parse_prompt_line(text, base)
            resolve_request(request.replace(seed=0) if request.seed == TRAINING_SEED else request)
        except RequestError as e:
            raise TrainConfigError(f"--sample_prompts: {path} line {number}: {e}") from None
        prompts.append(SamplePrompt(index, number, request))
    return prompts


def sample_stem(output_name: str | None, step: int, epoch: int | None, index: int, seed: int,
                now: float | None = None) -> str:
    """musubi's sample file name without suffix: ``<output_name>_<step:06d>|e<epoch:06d>_<index:02d>_<time>_<seed>``."""
    number = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    stamp = time.strftime("%Y%m%d%H%M%S", time.localtime(now))
    return f"{'' if output_name is None else output_name + '_'}{number}_{index:02d}_{stamp}_{seed}"


class EncodedPrompts:
    """Stands in for the text encoder in the engine's model set: the umT5 outputs of the sample
    prompts, computed once (:meth:`TrainingSampler.prepare`)."""

    def __init__(self, encoded: dict[str, torch.Tensor]):
        self.encoded = encoded

    def encode_prompts(self, prompts: str | Sequence[str], max_length: int | None = None) -> list[torch.Tensor]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        missing = [p for p in prompts if p not in self.encoded]
        if missing:
            raise KeyError(f"sample prompt {missing[0][:80]!r} was not encoded before training")
        return [self.encoded[p] for p in prompts]


class LiveModels(ModelManager):
    """The engine's model manager while training: :meth:`get` hands out the trainer's networks (its
    DiTs, with the LoRA attached) with the sampler's VAE, CLIP and encoded prompts, whatever the
    request's profile or files say (nothing is loaded, quantised or streamed for a sample)."""

    def __init__(self, models: ModelSet, device: torch.device):
        super().__init__(checkpoint_dir=".", device=device)
        self._current = models

    def get(self, spec, profile=None, files=None, **_ignored) -> ModelSet:  # sharding: samples run on rank 0
        if spec.id != self._current.spec.id:
            raise ValueError(f"sampling during training runs model {self._current.spec.id}, not {spec.id}")
        return self._current

    def release(self) -> None:
        """Nothing to release: the trainer owns the networks."""


class TrainingSampler:
    """The trainer's ``sampler(trainer, step, epoch)``: one sample per prompt line, through the engine.

    Built from the run's config (the prompt file is read and checked here, before any model loads);
    :meth:`prepare` encodes the prompts (called by the first sample if not before) and loads the VAE.
    """

    def __init__(self, cfg: TrainConfig, say: Callable[[str], None] = print):
        if not cfg.sample_prompts:
            raise TrainConfigError("--sample_prompts: required for sampling during training")
        if cfg.model is None:
            raise TrainConfigError("--sample_prompts: needs --model (or --task) to make samples with the model's "
                                   "defaults and files")
        self.cfg, self.say = cfg, say
        self.prompts = read_sample_prompts(cfg.sample_prompts, cfg.model)
        from wan.registry import get_model
        self.spec = get_model(cfg.model)
        self.given = self._given_files()
        self._models: ModelSet | None = None
        self._engine = None
        self._skip_reason: str | None = None
        self.written: list[Path] = []

    # -- files and networks --------------------------------------------------------------------

    def _given_files(self) -> dict[str, str]:
        """Role -> the path a flag gives (``--vae``, ``--t5``, ``--clip``, ``--tokenizer``), checked to exist."""
        flags = {"vae": "vae", "text_encoder": "t5", "clip": "clip", "tokenizer": "tokenizer"}
        files = {}
        for role, flag in flags.items():
            path = getattr(self.cfg, flag, None)
            if path is None or role not in self.spec.files:
                continue
            if not Path(path).exists():
                raise TrainConfigError(f"--{flag}: {path!r} is not an existing file or folder")
            files[role] = path
        return files

    def _files(self, roles: list[str]) -> dict[str, str]:
        """Role -> path for ``roles``: the flags' files, else the registry's (downloaded or generated)."""
        needed = [r for r in roles if r not in self.given and r in self.spec.files]
        paths = dict(self.given)
        if needed:
            from wan.loading.download import ensure_files
            variant = "fp32" if self.spec.test_model else "bf16"
            paths.update({r: str(p) for r, p in ensure_files(self.spec, self.cfg.checkpoint_dir, variant=variant,
                                                            components=needed).items()})
        return {r: paths[r] for r in roles if r in paths}

    def prepare(self, device: torch.device | str) -> None:
        """Encodes every sample prompt and negative prompt with umT5 on ``device`` (then releases the
        encoder), and loads the VAE (and CLIP) into CPU memory. Call it before the DiTs load to keep
        the text encoder and the DiT apart in memory, as musubi does; otherwise the first sample calls it."""
        if self._models is not None:
            return
        import wan
        device = torch.device(device)
        roles = ["text_encoder", "tokenizer", "vae"] + (["clip"] if self.spec.needs_clip else [])
        files = self._files(roles)
        texts = []
        for p in self.prompts:
            req, _ = resolve_request(self._seeded(p.request, 0))
            texts += [t for t in (req.prompt, req.negative_prompt) if t not in texts]
        self.say(f"sample prompts: encoding {len(texts)} texts with {files['text_encoder']}")
        te = wan.load_text_encoder(files["text_encoder"], device=device,
                                   dtype=torch.float32 if device.type == "cpu" else torch.bfloat16,
                                   tokenizer=files.get("tokenizer"))
        with torch.no_grad():
            encoded = {t: e.detach().to("cpu") for t, e in zip(texts, te.encode_prompts(texts))}
        del te
        if device.type == "cuda":
            torch.cuda.empty_cache()
        vae = wan.load_vae(files["vae"], device="cpu", dtype=torch.float32)
        clip = None
        if self.spec.needs_clip:
            clip = wan.load_clip(files["clip"], device="cpu",
                                 dtype=torch.float32 if device.type == "cpu" else torch.float16)
        self._models = ModelSet(self.spec, {}, vae, EncodedPrompts(encoded), clip,
                                paths={r: Path(p) for r, p in files.items()}, given=frozenset(self.given))

    def _model_set(self, trainer: Any) -> ModelSet | None:
        """The model set of this sample: the trainer's DiTs with the sampler's other networks; None
        (said once) when the trained networks cannot make the model's samples."""
        experts = dict(trainer.experts)
        if sorted(experts) != sorted(_expert_names(self.spec)):
            if self._skip_reason is None:
                self._skip_reason = (f"samples skipped: model {self.spec.id} runs experts "
                                     f"{', '.join(_expert_names(self.spec))}, the run trains {', '.join(experts)}"
                                     + (" (give --dit_high_noise too)" if self.spec.is_two_expert else ""))
                self.say(self._skip_reason)
            return None
        self.prepare(trainer.device)
        models = self._models
        paths = {**models.paths, **{_role(e): Path(p) for e, p in getattr(trainer, "paths", {}).items()}}
        return ModelSet(self.spec, experts, models.vae, models.text_encoder, models.clip, paths,
                        given=models.given)

    # -- the hook ------------------------------------------------------------------------------

    def __call__(self, trainer: Any, step: int, epoch: int | None) -> list[Path]:
        """Writes one sample per prompt to ``<output_dir>/sample/``; returns the files written."""
        from wan.engine.engine import Engine
        from wan.engine.media import OutputOptions, save_outputs, to_uint8_frames
        nets = self._model_set(trainer)
        if nets is None:
            return []
        device = torch.device(trainer.device)
        if self._engine is None or self._engine.device != device:
            self._engine = Engine(checkpoint_dir=self.cfg.checkpoint_dir, device=device, lora_dir=None)
        engine = self._engine
        engine.models = LiveModels(nets, device)
        folder = Path(self.cfg.output_dir or ".") / SAMPLE_FOLDER
        trainer.network.set_multiplier(1.0)
        on_device = [m for m in (nets.vae, nets.clip) if m is not None and device.type != "cpu"]
        for m in on_device:
            m.to(device)
        written = []
        swap = _ExpertsOnDemand(trainer.experts, device, getattr(trainer, "active", None))
        try:
            swap.attach()
            for p in self.prompts:
                request = self._seeded(p.request, trainer.seed).replace(output_dir=str(folder))
                result = engine.generate(request, write=False)
                req = result.request
                metadata = {**result.metadata, "training": {"output_name": self.cfg.output_name, "step": step,
                                                            "epoch": epoch, "prompt_index": p.index}}
                stem = sample_stem(self.cfg.output_name, step, epoch, p.index, req.seed)
                options = OutputOptions(folder=str(folder), name_template=_literal(stem), video_quality=req.quality,
                                        trim_tail_frames=req.trim_tail, sidecar_json=False)
                files = save_outputs(to_uint8_frames(result.video), req.fps, metadata, options, seed=req.seed,
                                     prompt=req.prompt, model=req.model, task=req.task)
                written += files
                self.say(f"sample {p.index + 1}/{len(self.prompts)} at step {step}: {files[0]}")
        finally:
            swap.detach()
            for m in on_device:
                m.to("cpu")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        self.written += written
        return written

    @staticmethod
    def _seeded(request: GenerationRequest, seed: int) -> GenerationRequest:
        return request.replace(seed=seed) if request.seed == TRAINING_SEED else request


class _ExpertsOnDemand:
    """Two experts of which one is kept in CPU memory (``--offload_inactive_dit``): while sampling, the expert the
    engine calls is brought to the device and the other sent to CPU memory (the engine switches experts once per
    sample); afterwards the trainer's active expert is on the device again. Nothing to do when every expert already
    sits on the device (one DiT, or both experts resident)."""

    def __init__(self, experts: dict, device: torch.device, active: str | None):
        self.experts, self.device, self.active = experts, device, active
        self._handles: list = []

    def _on_device(self, dit) -> bool:
        where = next(dit.parameters()).device
        return where.type == self.device.type and (where.index or 0) == (self.device.index or 0)

    def attach(self) -> None:
        if all(self._on_device(d) for d in self.experts.values()):
            return

        def bring(module, args):
            if not self._on_device(module):
                for other in self.experts.values():
                    if other is not module:
                        other.to("cpu")
                module.to(self.device)
        self._handles = [d.register_forward_pre_hook(bring) for d in self.experts.values()]

    def detach(self) -> None:
        if not self._handles:
            return
        for h in self._handles:
            h.remove()
        self._handles = []
        for name, dit in self.experts.items():  # the idle expert out first, so that two never share the device
            if name != self.active:
                dit.to("cpu")
        if self.active in self.experts:
            self.experts[self.active].to(self.device)


def _expert_names(spec) -> list[str]:
    return [r.removeprefix("transformer_") if r != "transformer" else r for r in spec.transformer_roles]


def _role(expert: str) -> str:
    return expert if expert == "transformer" else f"transformer_{expert}"


def _literal(stem: str) -> str:
    """A name template that renders as ``stem`` (characters a template cannot hold are dropped)."""
    from wan.engine.media_out import sanitize_name_part, template_problem
    template = stem.replace("{", "{{").replace("}", "}}")
    if template_problem(template) is None:
        return template
    return "_".join(sanitize_name_part(part, max_chars=120, fallback="") for part in stem.split("_")).strip("_")
