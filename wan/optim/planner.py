"""The memory planner: where each model's weights live during a generation, decided before
anything loads. Pure arithmetic on sizes: no torch calls, no files read (except the profile
folder when ``auto`` is resolved without a given :class:`ProfileSet`).

Sizes are bytes; printed sizes are GB of 2**30 bytes, one decimal, as memory is labelled (an
"8 GB" card has 8 GB here). Budgets in profiles are MiB (2**20 bytes), as mmgp's.

The plan (:func:`plan`) per model, on a machine with a GPU:

==============  ===============================================================================
offload none    every model stays on the GPU for the whole job (both experts of an A14B model)
offload model   models live in RAM (pinned or not) and move to the GPU whole while used; one at a
                time, so the GPU peak is the largest model of any phase
offload blocks  DiTs and the text encoder / CLIP live in RAM and stream to the GPU block by block:
                ``budget // block`` blocks stay resident while the model is active, the others
                pass through ``prefetch_blocks + 1`` block buffers; the rest of the model
                (embeddings, head) is on the GPU while it is active. ``blocks_to_swap: N`` (musubi)
                keeps all but N blocks resident instead. A budget of null keeps as many blocks
                resident as the free VRAM allows. The VAE moves whole.
                A DiT that is not pinned and not quantised at load is not held in RAM at all: its
                blocks are read from the memory-mapped checkpoint when needed.
offload auto    the first of none, model, blocks, blocks from the checkpoint file that fits
==============  ===============================================================================

On a machine without a GPU the plan is about RAM only: models are held in RAM, except under
``offload: blocks`` where the DiT streams from the memory-mapped checkpoint (peak ~ its embeddings
and head plus the largest block times ``prefetch_blocks + 1``).

The phases of a job run one after another: text encoding (text encoder, CLIP), VAE, denoising (one
phase per expert: only one expert is active at a time, high-noise then low-noise). The GPU peak is
the largest phase; RAM holds everything held in RAM for the whole job. A plan fits when the GPU
peak plus ``vram_reserve_mb`` (activations, CUDA context) is within the VRAM and the RAM held plus
``ram_reserve_mb`` (system, Python) is within the RAM. Pinned memory is capped at half the RAM, as
mmgp does on Linux; beyond it weights stay unpinned (slower transfers, not a failure).

``auto`` (:func:`resolve_auto`): the first of profiles 1, 3, 2, 4, 5 whose plan fits (fastest
first); when none fits, 5 with its shortfalls. Without models: by RAM and VRAM alone (RAM under 30
GB -> 5; 60 GB of RAM or more is high RAM, 23 GB of VRAM or more high VRAM: 1, 2, 3 or 4).

Model sizes (:func:`model_sizes`) come from the registry's architecture; see
:func:`dit_parameter_counts` for the formula.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from wan.optim.profiles import Profile
from wan.optim.profile_files import ProfileSet

GiB = 1 << 30
MiB = 1 << 20
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "fp8_scaled": 1.0, "int8": 1.0}
# fp8_scaled keeps one float32 scale per 64 inputs of each row (4/64 byte a weight); int8's one
# scale per output row is negligible.
QUANT_BYTES = {"fp8": 1.0, "fp8_scaled": 1.0 + 4 / 64, "int8": 1.0}
PIN_LIMIT = 0.5          # share of RAM mmgp pins at most (Linux)
AUTO_ORDER = (1, 3, 2, 4, 5)
DIT_ROLES = ("transformer", "transformer_high_noise", "transformer_low_noise")

GPU = "gpu resident"
CPU = "cpu resident"
MOVED = "cpu resident, moved to gpu when used"
STREAMED = "streamed block by block"
MMAP = "streamed block by block from the memory-mapped checkpoint"


def gb(n: float) -> str:
    return f"{n / GiB:.1f} GB"


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Machine:
    """Memory of the machine a plan is for. ``vram_bytes`` 0 or None: no GPU."""

    ram_bytes: int
    vram_bytes: int | None = None
    gpu_name: str | None = None
    gpu_capability: tuple[int, int] | None = None

    @classmethod
    def from_gb(cls, ram_gb: float, vram_gb: float | None = None, gpu_name: str | None = None) -> Machine:
        return cls(int(ram_gb * GiB), int(vram_gb * GiB) if vram_gb else None,
                   gpu_name or ("simulated GPU" if vram_gb else None))

    @property
    def has_gpu(self) -> bool:
        return bool(self.vram_bytes)

    def __str__(self) -> str:
        gpu = f"{gb(self.vram_bytes)} VRAM ({self.gpu_name or 'GPU'})" if self.has_gpu else "no GPU"
        return f"{gb(self.ram_bytes)} RAM, {gpu}"


@dataclass(frozen=True)
class ModelSize:
    """Weights of one model at one precision.

    Attributes:
        name: role: transformer, transformer_high_noise, transformer_low_noise, text_encoder, clip, vae.
        bytes: all weights at ``precision`` (parts kept in float32 counted at 4 bytes).
        rest_bytes: the part outside the repeated blocks (embeddings, head): it never streams.
        blocks, block_bytes: number of repeated blocks and bytes of the largest (what streams).
        quantisable: whether a weight quantiser applies (DiT, text encoder).
        quant_params, block_quant_params: weights of the block matrices (all blocks / the largest
            block): what quantisation converts to 8 bits; norms, embeddings, head stay.
        prequantized: quantisation schemes the registry ships as files (``fp8``, ``fp8_scaled``).
    """

    name: str
    bytes: int
    precision: str
    rest_bytes: int = 0
    blocks: int = 0
    block_bytes: int = 0
    quantisable: bool = False
    quant_params: int = 0
    block_quant_params: int = 0
    params: int = 0
    prequantized: tuple[str, ...] = ()
    label: str = ""

    @property
    def is_dit(self) -> bool:
        return self.name.startswith("transformer")

    def quantised(self, scheme: str) -> ModelSize:
        """The size after quantising the block matrices to ``scheme`` (unchanged if already 8-bit)."""
        src = BYTES_PER_PARAM[self.precision]
        if scheme == "none" or not self.quantisable or src <= 1:
            return self
        saved = src - QUANT_BYTES[scheme]
        return dataclasses.replace(
            self, precision=scheme, bytes=round(self.bytes - self.quant_params * saved),
            block_bytes=round(self.block_bytes - self.block_quant_params * saved))


# ----------------------------------------------------------------------------- parameter counts


@dataclass(frozen=True)
class ParamCount:
    """Parameters split by how they are stored: ``plain`` at the load precision, ``fp32`` always
    float32 (the DiT's norms, modulation, time embedding, head); ``matrix`` is the quantisable
    part of ``plain``."""

    plain: int = 0
    fp32: int = 0
    matrix: int = 0

    def __add__(self, o: ParamCount) -> ParamCount:
        return ParamCount(self.plain + o.plain, self.fp32 + o.fp32, self.matrix + o.matrix)

    def __mul__(self, k: int) -> ParamCount:
        return ParamCount(self.plain * k, self.fp32 * k, self.matrix * k)

    @property
    def total(self) -> int:
        return self.plain + self.fp32

    def bytes(self, precision: str) -> int:
        return round(self.plain * BYTES_PER_PARAM[precision] + self.fp32 * max(4.0, BYTES_PER_PARAM[precision]))


def _linear(n_in: int, n_out: int, fp32: bool = False) -> ParamCount:
    """A Linear layer with bias (or a conv with ``n_in`` = channels x kernel volume)."""
    return ParamCount(fp32=n_in * n_out + n_out) if fp32 else ParamCount(plain=n_in * n_out + n_out)


def dit_parameter_counts(*, dim: int, ffn_dim: int, num_layers: int, in_dim: int = 16, out_dim: int = 16,
                         patch_size: Sequence[int] = (1, 2, 2), freq_dim: int = 256, text_dim: int = 4096,
                         image_dim: int | None = None, image_pos_tokens: int | None = None,
                         ref_conv_in: int | None = None, vace_layers: Sequence[int] = (), vace_in_dim: int = 96,
                         **_: Any) -> tuple[ParamCount, ParamCount, list[ParamCount]]:
    """Parameters of a Wan DiT, exactly as :class:`wan.models.dit.WanDiT` builds it.

    With d = dim, f = ffn_dim, a block holds: self-attention q, k, v, o (4 d^2 + 4 d) and its two
    RMS norms (2 d); the cross-attention the same, plus k_img, v_img (2 d^2 + 2 d) and a norm (d)
    when the model takes CLIP features; the FFN (2 d f + f + d); norm3 (2 d); modulation (6 d).
    Outside the blocks: patch embedding (in_dim * prod(patch) * d + d), text embedding
    (text_dim * d + d + d^2 + d), time embedding (freq_dim * d + d + d^2 + d), time projection
    (6 d^2 + 6 d), head (d * out_dim * prod(patch) + out_dim * prod(patch), modulation 2 d), and,
    when present, the CLIP projection (LN, c^2 + c, c d + d, LN; flf2v's 514 x c positions), the
    Fun reference conv and the VACE patch embedding. VACE blocks are blocks plus after_proj (and
    before_proj for the first), d^2 + d each. Norms, modulation, time embedding/projection, head
    and CLIP LNs/positions are float32 whatever the load dtype (``WanDiT._keep_in_fp32``).

    Returns:
        (outside the blocks, one main block, [each block, VACE blocks included]).
    """
    d, f, patch = dim, ffn_dim, patch_size[0] * patch_size[1] * patch_size[2]
    norm = ParamCount(fp32=d)

    def attention(image: bool) -> ParamCount:
        qkvo = _linear(d, d) * 4 + norm * 2
        return qkvo + (_linear(d, d) * 2 + norm if image else ParamCount())

    def with_matrix(c: ParamCount, matrix: int) -> ParamCount:
        return dataclasses.replace(c, matrix=matrix)

    block = (attention(False) + attention(image_dim is not None) + _linear(d, f) + _linear(f, d)
             + norm * 2 + ParamCount(fp32=6 * d))
    block = with_matrix(block, 8 * d * d + 2 * d * f + (2 * d * d if image_dim else 0))
    rest = (_linear(in_dim * patch, d) + _linear(text_dim, d) + _linear(d, d)
            + _linear(freq_dim, d, fp32=True) + _linear(d, d, fp32=True) + _linear(d, 6 * d, fp32=True)
            + _linear(d, out_dim * patch, fp32=True) + ParamCount(fp32=2 * d))
    if image_dim:
        c = image_dim
        rest = rest + ParamCount(fp32=2 * c + 2 * d) + _linear(c, c) + _linear(c, d)
        if image_pos_tokens:
            rest = rest + ParamCount(fp32=image_pos_tokens * c)
    if ref_conv_in:
        rest = rest + _linear(ref_conv_in * patch_size[1] * patch_size[2], d)
    blocks = [block] * num_layers
    if vace_layers:
        rest = rest + _linear(vace_in_dim * patch, d)
        proj = with_matrix(_linear(d, d), d * d)
        blocks += [block + proj * (2 if i == 0 else 1) for i in range(len(vace_layers))]
    return rest, block, blocks


# umT5 encoders: vocab, dim, attention width, ffn, heads, layers, relative-position buckets.
TEXT_ENCODER_DIMS = {"umt5-xxl": (256384, 4096, 4096, 10240, 64, 24, 32)}
# CLIP ViT-H/14 image tower as our encoder keeps it: 31 of its 32 blocks (the output is the
# penultimate block's), 1280 wide, MLP 5120: 19,677,440 a block; patch, class and position
# embeddings and the pre-norm 1,085,440.
CLIP_BLOCKS, CLIP_BLOCK_PARAMS, CLIP_REST_PARAMS = 31, 19_677_440, 1_085_440
VAE_PARAMS = {"2.1": 126_892_531, "2.2": 704_688_668}   # counted from wan.models.vae21 / vae22


def text_encoder_parameter_counts(vocab: int, dim: int, dim_attn: int, ffn: int, heads: int, layers: int,
                                  buckets: int) -> tuple[ParamCount, ParamCount]:
    """umT5 encoder: token embedding (vocab x dim) and final norm outside the blocks; a block holds
    q, k, v, o (4 dim dim_attn, no biases), its own relative position table (heads x buckets), the
    gated-GELU FFN (3 dim ffn) and two norms. umt5-xxl: 5,680,910,336. Returns (rest, block)."""
    rest = ParamCount(plain=vocab * dim + dim)
    matrices = 4 * dim * dim_attn + 3 * dim * ffn
    return rest, ParamCount(plain=matrices + heads * buckets + 2 * dim, matrix=matrices)


def _size(name: str, precision: str, rest: ParamCount, blocks: list[ParamCount], quantisable: bool,
          prequantized: tuple[str, ...] = (), label: str = "") -> ModelSize:
    largest = max(blocks, key=lambda b: b.bytes(precision)) if blocks else ParamCount()
    total = sum(blocks, rest)
    return ModelSize(name=name, bytes=total.bytes(precision), precision=precision, rest_bytes=rest.bytes(precision),
                     blocks=len(blocks), block_bytes=largest.bytes(precision), quantisable=quantisable,
                     quant_params=total.matrix, block_quant_params=largest.matrix, params=total.total,
                     prequantized=prequantized, label=label)


_PREQUANT_VARIANTS = {"fp8_e4m3fn": "fp8", "fp8_scaled": "fp8_scaled"}


def _prequantized(spec, role: str) -> tuple[str, ...]:
    comp = spec.files.get(role)
    return tuple(_PREQUANT_VARIANTS[v] for v in (comp.variants if comp else ()) if v in _PREQUANT_VARIANTS)


def model_sizes(spec, precision: str = "bf16", *, text_encoder_precision: str | None = None,
                clip_precision: str | None = None, vae_precision: str = "fp32") -> list[ModelSize]:
    """Sizes of every model a registry ``ModelSpec`` loads, DiTs at ``precision``; the text encoder
    at the same unless given; CLIP in fp16 when the DiT is in half precision; the VAE in float32
    (the engine's choice).

    Raises:
        ValueError: a text encoder whose dimensions are not in :data:`TEXT_ENCODER_DIMS`.
    """
    for p in (precision, text_encoder_precision, clip_precision, vae_precision):
        if p is not None and p not in BYTES_PER_PARAM:
            raise ValueError(f"precision {p!r}: expected one of {', '.join(BYTES_PER_PARAM)}")
    def at(size: ModelSize, p: str) -> ModelSize:  # 8-bit files keep embeddings and biases in bf16
        return size.quantised(p) if p in QUANT_BYTES else size

    def base(p: str) -> str:
        return "bf16" if p in QUANT_BYTES else p

    rest, _, blocks = dit_parameter_counts(**spec.dit_config())
    billions = sum(blocks, rest).total / 1e9
    def dit_label(role: str) -> str:
        expert = role.split("_", 1)[1].replace("_", "-") if "_" in role else ""
        return f"{billions:.1f}B DiT" + (f", {expert} expert" if expert else "")

    sizes = [at(_size(role, base(precision), rest, blocks, True, _prequantized(spec, role), dit_label(role)), precision)
             for role in spec.transformer_roles]
    if spec.text_encoder not in TEXT_ENCODER_DIMS:
        raise ValueError(f"model {spec.id}: text encoder {spec.text_encoder!r} has no known size; "
                         f"known: {', '.join(TEXT_ENCODER_DIMS)}")
    te_rest, te_block = text_encoder_parameter_counts(*TEXT_ENCODER_DIMS[spec.text_encoder])
    te_layers = TEXT_ENCODER_DIMS[spec.text_encoder][5]
    te_precision = text_encoder_precision or precision
    sizes.append(at(_size("text_encoder", base(te_precision), te_rest, [te_block] * te_layers, True,
                          _prequantized(spec, "text_encoder"), spec.text_encoder), te_precision))
    if spec.needs_clip:
        half = precision in ("bf16", "fp16", "fp8", "fp8_scaled", "int8")
        sizes.append(_size("clip", clip_precision or ("fp16" if half else precision),
                           ParamCount(plain=CLIP_REST_PARAMS), [ParamCount(plain=CLIP_BLOCK_PARAMS)] * CLIP_BLOCKS,
                           False, label="CLIP ViT-H/14"))
    sizes.append(_size("vae", vae_precision, ParamCount(plain=VAE_PARAMS[spec.vae.version]), [], False,
                       label=f"VAE {spec.vae.version}"))
    return sizes


# A registry variant name -> the precision its file stores weights in.
_FILE_PRECISION = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp8_e4m3fn": "fp8", "fp8_scaled": "fp8_scaled"}


def file_size_estimates(spec, variant: str = "bf16") -> dict[str, int]:
    """Role -> the byte size of its weights file at the variant the downloader picks for ``variant``,
    counted from the architecture: for files whose size the registry does not state (a download's
    total, the free-disk check). {} for models of unknown dimensions (the TEST family)."""
    from wan.loading.download import select_sources
    chosen = {role: source.variant for role, source in select_sources(spec, variant).items()}

    def precision(role: str, default: str) -> str:
        return _FILE_PRECISION.get(chosen.get(role, ""), default)
    try:
        sizes = model_sizes(spec, precision(spec.transformer_roles[0], "bf16"),
                            text_encoder_precision=precision("text_encoder", "bf16"),
                            clip_precision=precision("clip", "fp16"), vae_precision=precision("vae", "fp32"))
    except (ValueError, KeyError):
        return {}
    return {size.name: size.bytes for size in sizes}


def run_precision(profile: Profile, machine: Machine) -> str:
    """The DiT's precision for a profile on a machine: ``auto`` is float32 without a GPU (the
    engine's CPU choice), fp16 on GPUs older than compute capability 8.0, else bf16."""
    if profile.precision != "auto":
        return profile.precision
    if not machine.has_gpu:
        return "fp32"
    cap = machine.gpu_capability
    return "fp16" if cap is not None and tuple(cap) < (8, 0) else "bf16"


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Placement:
    """Where one model's weights live.

    Attributes:
        mode: one of ``gpu resident``, ``cpu resident``, ``cpu resident, moved to gpu when used``,
            ``streamed block by block`` (from RAM), ``streamed block by block from the
            memory-mapped checkpoint``.
        bytes, precision: the weights as they run (after quantisation); ``source_*`` before it.
        quantised: the scheme applied, or None; ``prequantized_file``: read from a file of the
            registry instead of quantised at load.
        gpu_bytes: VRAM the weights take while the model is used (all the job when gpu resident).
        ram_bytes: RAM held for the whole job; ``pinned_bytes`` the pinned part of it.
        resident_blocks, in_flight_blocks: blocks kept on the GPU while the model is used, and
            block buffers the others pass through; ``budget_bytes`` what the resident blocks may
            take, ``budget_source`` where it came from (profile, blocks_to_swap, free VRAM).
    """

    model: str
    label: str
    mode: str
    precision: str
    bytes: int
    source_precision: str
    source_bytes: int
    quantised: str | None
    prequantized_file: bool
    gpu_bytes: int
    ram_bytes: int
    pinned_bytes: int = 0
    blocks: int = 0
    block_bytes: int = 0
    resident_blocks: int = 0
    in_flight_blocks: int = 0
    budget_bytes: int | None = None
    budget_source: str = ""


@dataclass(frozen=True)
class Shortfall:
    """A budget the plan exceeds: ``needed`` (weights plus reserve) against ``available``."""

    resource: str   # "VRAM" or "RAM"
    needed: int
    available: int
    detail: str

    @property
    def short_by(self) -> int:
        return self.needed - self.available

    def __str__(self) -> str:
        return f"{self.resource} short by {gb(self.short_by)}: {self.detail}"


@dataclass(frozen=True)
class MemoryPlan:
    """A whole plan: placements, the totals per device, and what is short when it does not fit."""

    profile: str
    machine: Machine
    offload: str
    placements: tuple[Placement, ...]
    phases: tuple[tuple[str, int], ...]   # (phase, VRAM its weights take), in run order
    vram_peak: int
    vram_peak_phase: str
    ram_total: int
    pinned_total: int
    vram_reserve: int
    ram_reserve: int
    shortfalls: tuple[Shortfall, ...]
    notes: tuple[str, ...] = ()
    chosen_by: str = ""

    @property
    def fits(self) -> bool:
        return not self.shortfalls

    def placement(self, model: str) -> Placement:
        for p in self.placements:
            if p.model == model:
                return p
        raise KeyError(f"no model {model!r} in this plan; models: {', '.join(p.model for p in self.placements)}")


def _phase(name: str) -> str:
    if name in ("text_encoder", "clip"):
        return "text encoding"
    if name == "vae":
        return "VAE encode/decode"
    if name.startswith("transformer_"):
        return f"denoising ({name.split('_', 1)[1].replace('_', '-')} expert)"
    return "denoising" if name == "transformer" else name


def _place(profile: Profile, m: ModelSize, machine: Machine, offload: str, pin: str, gpu_resident: int) -> Placement:
    """One model's placement, before pinning (decided over all models)."""
    mem = profile.memory
    scheme = (profile.quantize.transformer if m.is_dit else
              profile.quantize.text_encoder if m.name == "text_encoder" else "none")
    run = m.quantised(scheme)
    quantised = scheme if run is not m else None
    prequant = bool(quantised and profile.quantize.prefer_prequantized and scheme in m.prequantized)
    at_load = bool(quantised) and not prequant
    wants_pin = pin == "all" or (pin == "transformer" and m.is_dit)
    streams = offload == "blocks" and run.blocks > 0
    if not machine.has_gpu:
        mode = MMAP if streams and m.is_dit and not at_load else CPU
    elif offload == "none":
        mode = GPU
    elif streams:
        mode = MMAP if m.is_dit and not wants_pin and not at_load else STREAMED
    else:
        mode = MOVED
    base = dict(model=m.name, label=m.label, mode=mode, precision=run.precision, bytes=run.bytes,
                source_precision=m.precision, source_bytes=m.bytes, quantised=quantised,
                prequantized_file=prequant, blocks=run.blocks, block_bytes=run.block_bytes)
    if mode in (GPU, MOVED):
        return Placement(**base, gpu_bytes=run.bytes, ram_bytes=0 if mode == GPU else run.bytes)
    if mode == CPU:
        return Placement(**base, gpu_bytes=0, ram_bytes=run.bytes)
    depth = mem.prefetch_blocks + 1 if mem.async_transfers else 1
    n, block = run.blocks, run.block_bytes
    if not machine.has_gpu:  # streaming on the CPU: blocks are read, used and released
        in_flight = min(depth, n)
        return Placement(**base, gpu_bytes=0, ram_bytes=run.rest_bytes + in_flight * block,
                         in_flight_blocks=in_flight)
    budget_mb = mem.transformer_budget_mb if m.is_dit else mem.other_budget_mb
    if m.is_dit and mem.blocks_to_swap is not None:
        resident, source = max(0, n - mem.blocks_to_swap), "blocks_to_swap"
        budget = resident * block
    elif budget_mb is not None:
        budget, source = budget_mb * MiB, "profile"
        resident = min(n, budget // block) if block else n
    else:  # as many blocks as the VRAM left by the reserve, residents and stream buffers allows
        free = machine.vram_bytes - mem.vram_reserve_mb * MiB - gpu_resident - run.rest_bytes - min(depth, n) * block
        resident = max(0, min(n, free // block)) if block else n
        budget, source = max(0, free), "free VRAM"
    in_flight = 0 if resident >= n else min(depth, n - resident)
    gpu = min(run.bytes, run.rest_bytes + (resident + in_flight) * block)
    ram = run.rest_bytes + in_flight * block if mode == MMAP else run.bytes
    return Placement(**base, gpu_bytes=gpu, ram_bytes=ram, resident_blocks=int(resident),
                     in_flight_blocks=in_flight, budget_bytes=int(budget), budget_source=source)


def _pin(placements: list[Placement], machine: Machine, pin: str) -> tuple[list[Placement], list[str]]:
    """Pins the RAM copies the profile asks for, DiTs first, up to :data:`PIN_LIMIT` of the RAM."""
    notes = []
    if not machine.has_gpu or pin == "none":
        if not machine.has_gpu and pin != "none":
            notes.append("pinning needs a GPU: nothing is pinned")
        return placements, notes
    limit = int(PIN_LIMIT * machine.ram_bytes)
    left, wanted = limit, 0
    out = list(placements)
    order = sorted(range(len(out)), key=lambda i: not out[i].model.startswith("transformer"))
    for i in order:
        p = out[i]
        if p.mode not in (MOVED, STREAMED) or not (pin == "all" or p.model.startswith("transformer")):
            continue
        pinned = min(p.ram_bytes, left)
        left, wanted = left - pinned, wanted + p.ram_bytes
        out[i] = dataclasses.replace(p, pinned_bytes=pinned)
    if wanted > limit:
        notes.append(f"pinning stops at {PIN_LIMIT:.0%} of RAM: {gb(limit)} of the {gb(wanted)} asked for is pinned "
                     f"(transformers first); the rest moves to the GPU more slowly")
    return out, notes


def _plan(profile: Profile, models: Sequence[ModelSize], machine: Machine, offload: str, pin: str) -> MemoryPlan:
    mem = profile.memory
    resident = [m for m in models]
    gpu_resident = 0
    placements = []
    # GPU-resident models first: the free VRAM left to auto budgets depends on them.
    for m in resident:
        p = _place(profile, m, machine, offload, pin, 0)
        if p.mode == GPU:
            gpu_resident += p.gpu_bytes
    for m in models:
        placements.append(_place(profile, m, machine, offload, pin, gpu_resident))
    placements, notes = _pin(placements, machine, pin)

    phases: dict[str, int] = {}
    members: dict[str, list[Placement]] = {}
    always = [p for p in placements if p.mode == GPU]
    if machine.has_gpu:
        for p in placements:
            ph = _phase(p.model)
            members.setdefault(ph, list(always))
            if p.mode != GPU:
                members[ph].append(p)
        for ph, ps in members.items():
            phases[ph] = sum(p.gpu_bytes for p in ps)
    peak_phase = max(phases, key=phases.get) if phases else ""
    vram_peak = phases.get(peak_phase, 0)
    ram_total = sum(p.ram_bytes for p in placements)
    pinned = sum(p.pinned_bytes for p in placements)

    shortfalls = []
    vres, rres = mem.vram_reserve_mb * MiB, mem.ram_reserve_mb * MiB
    if machine.has_gpu and vram_peak + vres > machine.vram_bytes:
        parts = " + ".join(f"{p.model} {gb(p.gpu_bytes)}" for p in members[peak_phase] if p.gpu_bytes)
        shortfalls.append(Shortfall("VRAM", vram_peak + vres, machine.vram_bytes,
                                    f"while {peak_phase}, {parts} = {gb(vram_peak)} > {gb(machine.vram_bytes)} "
                                    f"minus {gb(vres)} reserve"))
    if ram_total + rres > machine.ram_bytes:
        parts = " + ".join(f"{p.model} {p.precision} {gb(p.ram_bytes)}" for p in placements if p.ram_bytes)
        shortfalls.append(Shortfall("RAM", ram_total + rres, machine.ram_bytes,
                                    f"{parts} = {gb(ram_total)} > {gb(machine.ram_bytes)} minus {gb(rres)} reserve"))
    cache = max(0, machine.ram_bytes - ram_total - rres)
    for p in placements:
        if p.mode == MMAP and cache < p.bytes:
            notes.append(f"{p.model}: the {gb(cache)} of RAM left for the page cache is less than its "
                         f"weights ({gb(p.bytes)}), so each step may read the checkpoint from disk again "
                         f"(fast storage helps)")
    return MemoryPlan(profile=profile.label, machine=machine, offload=offload, placements=tuple(placements),
                      phases=tuple(phases.items()), vram_peak=vram_peak, vram_peak_phase=peak_phase,
                      ram_total=ram_total, pinned_total=pinned, vram_reserve=vres, ram_reserve=rres,
                      shortfalls=tuple(shortfalls), notes=tuple(notes))


def _plan_offload(profile: Profile, models: Sequence[ModelSize], machine: Machine) -> MemoryPlan:
    """The plan for the profile's offload mode; ``auto`` tries the modes from fastest to leanest."""
    mem = profile.memory
    if mem.offload != "auto":
        return _plan(profile, models, machine, mem.offload, mem.pin)
    tries = [("none", mem.pin), ("model", mem.pin), ("blocks", mem.pin)] if machine.has_gpu else \
        [("none", mem.pin), ("blocks", mem.pin)]
    if machine.has_gpu and mem.pin != "none":
        tries.append(("blocks", "none"))  # the DiT read from its file instead of held in RAM
    rejected = []
    for offload, pin in tries:
        result = _plan(profile, models, machine, offload, pin)
        if result.fits:
            break
        rejected.append(f"{offload}{' without pinning' if pin != mem.pin else ''}")
    why = f"offload auto: {result.offload}"
    if rejected and result.fits:
        why += f" ({', '.join(rejected)} did not fit)"
    return dataclasses.replace(result, notes=(why, *result.notes))


def _by_machine(machine: Machine) -> tuple[int, str]:
    ram, vram = machine.ram_bytes / GiB, (machine.vram_bytes or 0) / GiB
    if ram < 30:
        return 5, f"RAM {ram:.1f} GB is under 30 GB"
    high_ram, high_vram = ram >= 60, vram >= 23
    number = {(True, True): 1, (True, False): 2, (False, True): 3, (False, False): 4}[(high_ram, high_vram)]
    return number, (f"RAM {ram:.1f} GB is {'high' if high_ram else 'low'} (60 GB or more is high), "
                    f"VRAM {vram:.1f} GB is {'high' if high_vram else 'low'} (23 GB or more is high)")


def resolve_auto(auto: Profile, models: Sequence[ModelSize], machine: Machine,
                 profiles: ProfileSet | None = None) -> tuple[Profile, Profile, str]:
    """Picks the numbered profile ``auto`` stands for (see the module docstring).

    Returns:
        (``auto`` with the chosen profile's memory and quantisation settings, except those ``auto``
        itself sets to other than the defaults, the chosen profile, why it was chosen in words).
    """
    if profiles is None:
        from wan.optim.profile_files import load_profiles
        profiles = load_profiles()
    numbered = [profiles.get(n) for n in AUTO_ORDER if n in profiles]
    if not numbered:
        raise ValueError("auto needs the numbered profiles 1..5, and none is loaded")

    def as_auto(p: Profile) -> Profile:
        """``auto`` with ``p``'s memory and quantisation, except settings ``auto`` itself changed
        from the defaults (in its file or by a per-job override), which it keeps."""
        def mix(own, chosen, default):
            keep = {f.name: getattr(own, f.name) for f in dataclasses.fields(own)
                    if getattr(own, f.name) != getattr(default, f.name)}
            return dataclasses.replace(chosen, **keep)
        return dataclasses.replace(auto, memory=mix(auto.memory, p.memory, type(auto.memory)()),
                                   quantize=mix(auto.quantize, p.quantize, type(auto.quantize)()))

    if not models:
        number, why = _by_machine(machine)
        chosen = profiles.get(number) if number in profiles else numbered[-1]
        return as_auto(chosen), chosen, f"by memory alone: {why}"
    rejected = []
    for p in numbered:
        if _plan_offload(as_auto(p), models, machine).fits:
            why = f"the first of {', '.join(str(n) for n in AUTO_ORDER)} whose plan fits"
            return as_auto(p), p, why + (f" ({', '.join(rejected)} do not)" if rejected else "")
        rejected.append(str(p.number))
    return as_auto(numbered[-1]), numbered[-1], "none of the numbered profiles fits; this one needs the least"


def plan(profile: Profile, models: Sequence[ModelSize], machine: Machine,
         profiles: ProfileSet | None = None) -> MemoryPlan:
    """The memory plan of ``profile`` for ``models`` on ``machine``; ``auto`` is resolved first
    (``profiles`` gives the numbered ones; the built-ins and user folder otherwise)."""
    if profile.is_auto:
        resolved, chosen, why = resolve_auto(profile, models, machine, profiles)
        result = _plan_offload(resolved, models, machine)
        return dataclasses.replace(result, profile=f"auto -> {chosen.label}", chosen_by=why)
    return _plan_offload(profile, models, machine)


# ----------------------------------------------------------------------------- words


def _words(p: Placement) -> str:
    head = f"{p.model} ({p.label + ', ' if p.label else ''}{p.precision} {gb(p.bytes)})"
    parts = []
    if p.quantised:
        how = "read from the pre-quantised file" if p.prequantized_file else "quantised at load"
        parts.append(f"{p.quantised} from {p.source_precision}, {how}: {gb(p.source_bytes)} -> {gb(p.bytes)}")
    pinned = ("" if not p.ram_bytes or p.mode == MMAP else
              " in pinned RAM" if p.pinned_bytes >= p.ram_bytes else
              f" in RAM ({gb(p.pinned_bytes)} pinned)" if p.pinned_bytes else " in RAM, not pinned")
    if p.mode == GPU:
        parts.append("on the GPU for the whole job")
    elif p.mode == CPU:
        parts.append("held in RAM, run on the CPU")
    elif p.mode == MOVED:
        parts.append(f"held{pinned}, moved to the GPU whole when used")
    else:
        source = "read from the memory-mapped checkpoint" if p.mode == MMAP else f"held{pinned}"
        if p.budget_bytes is None:  # CPU streaming
            parts.append(f"{source} block by block: {p.in_flight_blocks} of {p.blocks} blocks "
                         f"({gb(p.block_bytes)} each at most) in RAM at a time; peak {gb(p.ram_bytes)}")
        else:
            budget = {"profile": f"budget {p.budget_bytes // MiB} MB",
                      "blocks_to_swap": f"{p.blocks - p.resident_blocks} blocks swapped",
                      "free VRAM": f"budget {gb(p.budget_bytes)} (the free VRAM)"}[p.budget_source]
            parts.append(f"{source}, streamed to the GPU block by block, {budget}: {p.resident_blocks} of {p.blocks} "
                         f"blocks resident, {p.in_flight_blocks} in flight")
    if p.gpu_bytes and p.mode != GPU:
        parts.append(f"{gb(p.gpu_bytes)} on the GPU while used")
    return f"{head}: " + "; ".join(parts)


def describe(plan: MemoryPlan) -> str:
    """The plan in plain words with sizes, one line per model, then totals and what is short."""
    verdict = "fits" if plan.fits else "does NOT fit"
    lines = [f"Profile {plan.profile} on {plan.machine}: {verdict}"]
    if plan.chosen_by:
        lines.append(f"  chosen: {plan.chosen_by}")
    lines += [f"  {_words(p)}" for p in plan.placements]
    if plan.machine.has_gpu:
        lines.append(f"  GPU: peak {gb(plan.vram_peak)} of weights while {plan.vram_peak_phase or 'idle'} "
                     f"+ {gb(plan.vram_reserve)} reserve, of {gb(plan.machine.vram_bytes)}")
    pinned = f" ({gb(plan.pinned_total)} pinned)" if plan.pinned_total else ""
    lines.append(f"  RAM: {gb(plan.ram_total)} held{pinned} + {gb(plan.ram_reserve)} reserve, "
                 f"of {gb(plan.machine.ram_bytes)}")
    lines += [f"  {s}" for s in plan.shortfalls]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)
