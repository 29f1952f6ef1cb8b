"""Keeps the networks of the selected model loaded between requests.

One model set (DiT or experts, VAE, text encoder, CLIP) is held at a time; choosing another model
releases the previous set first, so two large models never sit in memory together. Files come
from the checkpoints folder (downloaded on first use, or generated for the TEST family).

How a set loads is the profile's memory plan for this machine (``wan.optim.apply.execution_settings``):
``auto`` becomes the numbered profile the planner picks, and each DiT loads whole or streams block
by block with the plan's resident blocks (or mmgp gets the plan's budgets). On the CPU the plan is
moot: the profile applies as written.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

import wan
from wan.optim.apply import LoadSettings
from wan.optim.planner import Machine
from wan.registry import ModelSpec

log = logging.getLogger(__name__)


@dataclass
class ModelSet:
    """The loaded networks of one model.

    ``dits`` maps the loop's expert names ("transformer", or "high_noise" / "low_noise") to DiTs.
    """

    spec: ModelSpec
    dits: dict
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    clip: torch.nn.Module | None = None
    paths: dict = field(default_factory=dict)
    load_key: tuple = ()                          # the load settings this set was built with
    handles: list = field(default_factory=list)   # block-streaming handles, closed on release
    notes: list[str] = field(default_factory=list)  # what the profile changed at load, in words
    given: frozenset = frozenset()                  # roles whose file the user gave (not the registry's)
    # what names the text encoder for the text cache (wan.engine.text_cache.encoder_identity);
    # None: its outputs are not cached (a sharded encoder, or one that is not a loaded umT5)
    text_encoder_key: tuple | None = None

    @property
    def dit(self):
        """The DiT whose configuration describes the model (any expert: they share it)."""
        return next(iter(self.dits.values()))


@dataclass(frozen=True)
class Sharding:
    """FSDP sharding of a parallel generation (``--dit_fsdp``, ``--t5_fsdp``): the loaded DiTs
    and/or the text encoder sharded over ``mesh`` (every rank), after loading and quantising."""

    mesh: object
    dit: bool = False
    text_encoder: bool = False

    @property
    def key(self) -> tuple:
        """What makes a loaded set reusable: sharded networks only serve the same sharding."""
        return ("fsdp", self.dit, self.text_encoder, self.mesh.size())


class ModelManager:
    """Loads model sets on demand and keeps the last one.

    Args:
        checkpoint_dir: where model files live (``<dir>/<owner>/<repo>/...``, see wan.loading.download).
        device: where the networks run.
        dtype: weights dtype of the DiT; None picks bfloat16 on CUDA and float32 on CPU.
        variant: which weights to fetch (bf16, fp16, fp8_scaled ...); TEST models always use fp32.
        machine: the memory the plan is made for; None: detected on a CUDA device (no plan on the
            CPU). Given, it is planned for whatever the device (tests simulate a GPU this way).
    """

    def __init__(self, checkpoint_dir: str | Path = "checkpoints", device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, variant: str = "bf16", machine=None):
        self.checkpoint_dir = Path(checkpoint_dir)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.variant = variant
        self.machine = machine
        self._machine_notes: tuple[str, ...] = ()
        self._current: ModelSet | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> ModelSet | None:
        return self._current

    def get(self, spec: ModelSpec, profile=None, files: Mapping[str, str] | None = None,
            sharding: Sharding | None = None) -> ModelSet:
        """The loaded set of ``spec`` under ``profile``'s memory settings, loading it (and
        releasing another) when the model, those settings or the files change.

        ``files``: role -> a path given by the user (``--dit``, ``--vae`` ...) used instead of the
        registry's file for that role; nothing is downloaded for those roles.
        ``sharding``: FSDP for a parallel generation (every rank calls this together).
        """
        files = dict(files or {})
        settings = self.settings(spec, profile, sharding)  # planned once for the key and the load
        key = self._key(spec, profile, files, sharding, settings)
        with self._lock:
            if self._current is not None and self._current.load_key == key:
                return self._current
            self.release()
            self._current = self._load(spec, profile, files, sharding, settings)
            self._current.load_key = key
            return self._current

    def _key(self, spec: ModelSpec, profile, files: dict, sharding: Sharding | None,
             settings: LoadSettings | None = None) -> tuple:
        unknown = sorted(set(files) - set(spec.files))
        if unknown:
            raise ValueError(f"files for {unknown[0]!r}: model {spec.id} has no such component; "
                             f"it has {', '.join(spec.files)}")
        settings = settings or self.settings(spec, profile, sharding)
        key = (spec.id, *settings.key, self._dit_dtype(settings.profile), tuple(sorted(files.items())))
        return key + (sharding.key,) if sharding is not None and (sharding.dit or sharding.text_encoder) else key

    def fetch(self, spec: ModelSpec, profile=None, files: Mapping[str, str] | None = None,
              sharding: Sharding | None = None) -> None:
        """Makes the files :meth:`get` would load present (downloads them), unless that set is
        loaded already. A parallel generation runs this on rank 0 before every rank loads, so that
        the ranks do not all download the same files at once."""
        files = dict(files or {})
        settings = self.settings(spec, profile, sharding)
        if self._current is not None and self._current.load_key == self._key(spec, profile, files, sharding, settings):
            return
        self._paths(spec, profile, files, settings)

    def settings(self, spec: ModelSpec, profile, sharding: Sharding | None = None) -> LoadSettings:
        """How ``spec`` loads under ``profile`` here: the profile's memory plan for this machine
        (``auto`` resolved), or the profile as written on the CPU."""
        from wan.optim.apply import execution_settings
        machine = self._planned_machine() if profile is not None else None
        if machine is None:
            return execution_settings(profile, spec, _NO_GPU)
        settings = execution_settings(profile, spec, machine, mmgp=self._mmgp_available())
        settings = dataclasses.replace(settings, notes=self._machine_notes + settings.notes)
        if sharding is not None and sharding.text_encoder and settings.text_encoder_on_cpu:
            # FSDP shards the encoder over the ranks' devices: it runs there
            settings = dataclasses.replace(settings, text_encoder_on_cpu=False)
        if sharding is not None and sharding.dit and settings.resident_blocks is not None:
            # FSDP shards the DiTs over the ranks: it owns their parameters, the plan's streaming cannot
            settings = dataclasses.replace(settings, stream=False, resident_blocks=None,
                                           notes=settings.notes + ("DiTs sharded (FSDP): the plan's block "
                                                                   "streaming is not applied",))
        return settings

    def _planned_machine(self):
        """The machine plans are made for: the given one, the detected one on CUDA, else None."""
        if self.machine is not None or self.device.type != "cuda":
            return self.machine
        from wan.optim.machine import detect_machine, detect_ram_bytes
        try:
            self.machine = detect_machine(self.device.index if self.device.index is not None else 0)
        except Exception as e:  # an unreadable GPU: the profile applies as written, and says why
            log.warning("could not read the GPU's memory for the memory plan: %s", e)
            self.machine = Machine(ram_bytes=detect_ram_bytes())
            self._machine_notes = (f"no memory plan: the GPU's memory could not be read ({type(e).__name__}: {e})",)
        return self.machine

    def _mmgp_available(self) -> bool:
        """mmgp executes plans here: a CUDA device and mmgp installed."""
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return False
        import importlib.util
        return importlib.util.find_spec("mmgp") is not None

    def _paths(self, spec: ModelSpec, profile, files: dict, settings: LoadSettings | None = None) -> dict:
        from wan.loading.download import ensure_files
        settings = settings or self.settings(spec, profile)
        profile, quant_dit = settings.profile, settings.quant_transformer
        variant = "fp32" if spec.test_model else self.variant
        if quant_dit in ("fp8", "fp8_scaled") and profile.quantize.prefer_prequantized and not spec.test_model:
            # a pre-quantised file of the registry, kept in fp8, rather than quantising at load
            variant = {"transformer": "fp8_scaled" if quant_dit == "fp8_scaled" else "fp8_e4m3fn",
                       "text_encoder": self.variant}
        needed = [role for role in spec.files if role not in files]
        paths = ensure_files(spec, self.checkpoint_dir, variant=variant, components=needed) if needed else {}
        paths.update({role: Path(path) for role, path in files.items()})
        return paths

    def release(self) -> None:
        """Drops the loaded set so its memory can be reused."""
        if self._current is not None:
            log.info("releasing model %s", self._current.spec.id)
            for handle in self._current.handles:
                handle.close()
        self._current = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _load(self, spec: ModelSpec, profile=None, files: Mapping[str, str] | None = None,
              sharding: Sharding | None = None, settings: LoadSettings | None = None) -> ModelSet:
        settings = settings or self.settings(spec, profile, sharding)
        profile = settings.profile  # for auto: the numbered profile it stands for
        stream, prefetch, swap, resident = (settings.stream, settings.prefetch, settings.blocks_to_swap,
                                            settings.resident_blocks)
        quant_dit, quant_te, compile_blocks = settings.quant_transformer, settings.quant_text_encoder, settings.compile
        files = dict(files or {})
        paths = self._paths(spec, profile, files, settings)
        log.info("loading model %s", spec.id)
        mmgp = settings.mmgp
        if mmgp is not None:  # on CUDA with mmgp: models load into RAM, mmgp moves them to the GPU
            stream = compile_blocks = False
        device = torch.device("cpu") if mmgp is not None else self.device
        dtype = self._dit_dtype(profile)
        dits, handles, notes = {}, [], list(settings.notes)
        for role in spec.transformer_roles:
            expert = role.removeprefix("transformer_") if role != "transformer" else role
            dits[expert], handle = self._load_dit(paths[role], dtype, stream, prefetch, swap, quant_dit, notes,
                                                  device=device, resident=resident, name=expert)
            if handle is not None:
                handles.append(handle)
            if compile_blocks:
                from wan.optim.compile import compile_blocks_, compile_refusal
                refusal = compile_refusal(device, dtype)
                notes.append(f"{expert}: {refusal}" if refusal else
                             f"{expert}: {compile_blocks_(dits[expert])} blocks compiled with torch.compile "
                             "(the first step pays the compile time)")
        for role in set(spec.transformer_roles) & set(files):
            from wan.loading.identify import size_notice
            expert = role.removeprefix("transformer_") if role != "transformer" else role
            notice = size_notice(dits[expert].config, spec)
            if notice:
                notes.append(f"{expert}: {notice}")
        te_dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        te_device = torch.device("cpu") if settings.text_encoder_on_cpu and mmgp is None else device
        text_encoder = wan.load_text_encoder(paths["text_encoder"], device=te_device, dtype=te_dtype,
                                             tokenizer=paths.get("tokenizer"))
        if quant_te != "none":
            from wan.optim.quant import keep_from_traits, quantize_
            notes.append(f"text encoder: {quantize_(text_encoder, quant_te, keep=keep_from_traits(text_encoder)).summary()}")
        vae = wan.load_vae(paths["vae"], device=device, dtype=torch.float32)
        clip = None
        if spec.needs_clip:
            clip = wan.load_clip(paths["clip"], device=device,
                                 dtype=torch.float32 if self.device.type == "cpu" else torch.float16)
        if mmgp is not None:
            from wan.optim.mmgp_backend import apply_mmgp
            models = {("transformer" if e == "transformer" else f"transformer_{e}"): d for e, d in dits.items()}
            models.update(text_encoder=text_encoder, vae=vae, **({"clip": clip} if clip is not None else {}))
            apply_mmgp(models, mmgp)
            notes.append(f"mmgp offload: budgets {dict(mmgp.budgets_mb) or 'none'}, pinned {list(mmgp.pinned) or 'none'}")
        if sharding is not None:
            notes += _shard(sharding, dits, text_encoder)
        if files:
            notes.append("files given: " + ", ".join(f"{role} {path}" for role, path in sorted(files.items())))
        te_key = None
        if sharding is None or not sharding.text_encoder:  # a sharded encoder must run on every rank together
            from wan.engine.text_cache import encoder_identity
            te_key = encoder_identity(paths["text_encoder"], tokenizer=getattr(text_encoder, "tokenizer_path", None),
                                      dtype=te_dtype, device=te_device, quantisation=quant_te,
                                      runs=("mmgp",) if mmgp is not None else ())
        return ModelSet(spec, dits, vae, text_encoder, clip, dict(paths), handles=handles, notes=notes,
                        given=frozenset(files), text_encoder_key=te_key)

    def _mmgp_settings(self, spec: ModelSpec, profile):
        """mmgp settings when this machine can use it (CUDA and mmgp installed) and the profile's
        plan offloads; None otherwise (then the project's own block streaming executes the plan)."""
        if profile is None or not self._mmgp_available():
            return None
        return self.settings(spec, profile).mmgp

    def _dit_dtype(self, profile) -> torch.dtype:
        """The DiT's weights dtype: the profile's precision, or the manager's default ("auto")."""
        precision = profile.precision if profile is not None else "auto"
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, self.dtype)

    def _load_dit(self, path, dtype, stream: bool, prefetch: int, swap: int | None, quant: str, notes: list[str],
                  device: torch.device | None = None, resident: int | None = None, name: str = "transformer"):
        """One DiT, streamed block by block from its checkpoint or loaded whole, then quantised.

        Streamed, it keeps ``resident`` blocks (the plan's count; at most all of them) on the device
        for good, or with ``resident`` None all but ``swap`` of its main blocks (``blocks_to_swap``),
        or none."""
        device = device or self.device
        if stream:
            from wan.optim.offload import load_transformer_streamed
            from wan.loading.transformer import open_transformer
            cfg = open_transformer(path)[0]
            layers = cfg.num_layers
            if resident is not None:  # the plan counts VACE blocks too, as the streaming does
                layers += len(cfg.vace_layers)
                budget = min(resident, layers)
            else:
                budget = max(0, layers - swap) if swap is not None else None
            # an fp8 file's layers stream as stored (as the whole load keeps them); any other
            # quantisation is made as each block is read, as the whole load would make it
            from wan.loading.transformer import fp8_layers_of
            keep_fp8 = quant in ("fp8", "fp8_scaled") and bool(fp8_layers_of(path))
            made = "none" if keep_fp8 else quant
            dit, handle = load_transformer_streamed(path, device=device, dtype=dtype, prefetch=prefetch,
                                                    budget_blocks=budget, keep_fp8=keep_fp8, quantize=made)
            notes.append(f"{name}: streamed block by block from {Path(path).name}, prefetch {prefetch}"
                         + (", fp8 layers kept fp8" if keep_fp8 else "")
                         + (f", quantised to {made} as each block is read" if made != "none" else "")
                         + (f", {budget} of {layers} blocks resident" if budget else ""))
            return dit, handle
        keep_fp8 = quant in ("fp8", "fp8_scaled")
        dit = wan.load_transformer(path, device=device, dtype=dtype, keep_fp8=keep_fp8)
        from wan.layers.quant import QuantLinear
        if keep_fp8 and any(isinstance(m, QuantLinear) for m in dit.modules()):
            notes.append(f"transformer: fp8 weights of {Path(path).name} kept quantised (no requantisation)")
        elif quant != "none":
            from wan.optim.quant import quantize_
            from wan.models.dit import WanDiT
            notes.append(f"transformer: {quantize_(dit, quant, keep=WanDiT.keep_in_fp32).summary()}")
        return dit, None


def _shard(sharding: Sharding, dits: dict, text_encoder) -> list[str]:
    """FSDP2 over ``sharding.mesh`` (after loading and quantising, before any job attaches)."""
    from wan.parallel.fsdp import shard_dit, shard_text_encoder
    ranks, notes = sharding.mesh.size(), []
    if sharding.dit:
        for expert, dit in dits.items():
            shard_dit(dit, sharding.mesh)
            notes.append(f"{expert}: blocks sharded over {ranks} processes (FSDP)")
    if sharding.text_encoder:
        shard_text_encoder(text_encoder, sharding.mesh)
        notes.append(f"text encoder: blocks sharded over {ranks} processes (FSDP)")
    return notes


_NO_GPU = Machine(ram_bytes=0)  # a run on the CPU: the plan is moot, the profile applies as written
