"""Issue 17: the text-encoder cache and NAG (normalized attention guidance).

The cache: a second job with the same prompts does not run umT5 (counted) and gives the same bits;
the cache is an LRU bounded by bytes, keyed on the encoder's identity and the exact text, and hands
out copies. NAG: the formula against a hand computation on small tensors, where it acts in the
cross-attention, and off (scale 1 or 0, or a negative-prompt pass) equals the plain run exactly.
"""

import math
import threading

import pytest
import torch
import torch.nn.functional as F

from helpers import lora_test_dit, randomize_
from wan.engine import Engine, GenerationRequest, RequestError, resolve_request
from wan.engine.text_cache import TextEncoderCache, cache_notice, encoder_identity
from wan.models.dit import CrossAttention, TextContext
from wan.optim.nag import NagGuidance, nag_combine
from wan.testing.tiny_family import ensure_tiny_checkpoints

BASE = dict(model="test-tiny-t2v", prompt="a red fox", steps=2, seed=7, guidance=1.0, frames=5, width=32, height=32)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    ensure_tiny_checkpoints(root)
    engine = Engine(checkpoint_dir=root, device="cpu", dtype=torch.float32)
    engine.warm = engine.generate(GenerationRequest(**BASE), write=False)  # loads the model and the tokenizer once
    return engine


class CountingEncoder:
    """A stand-in for umT5's ``encode_prompts``: one [len(text), 4] tensor per text, counted."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return [torch.full((len(p) or 1, 4), float(len(p))) for p in prompts]


# -- the text-encoder cache ----------------------------------------------------------------------


def test_cache_counts_hits_and_misses_and_skips_the_encoder():
    cache, enc, ident = TextEncoderCache(2**20), CountingEncoder(), ("enc", 1)
    first = cache.encode(enc, ident, ["a fox", "blurry"])
    assert first.cached == [False, False] and enc.calls == [["a fox"], ["blurry"]]  # each prompt alone
    second = cache.encode(enc, ident, ["a fox", "blurry"])
    assert second.cached == [True, True] and len(enc.calls) == 2
    assert (cache.hits, cache.misses, cache.encoder_calls) == (2, 2, 2)
    assert all(torch.equal(a, b) for a, b in zip(first.tensors, second.tensors))
    third = cache.encode(enc, ident, ["a cat", "blurry"])
    assert third.cached == [False, True] and enc.calls[-1] == ["a cat"]
    # another encoder (other weights, dtype, device or quantisation) never shares entries
    assert cache.encode(enc, ("enc", 2), ["a fox"]).cached == [False]
    assert cache_notice(("prompt", "negative prompt"), third.cached) == \
        "text encoder: negative prompt from the cache (prompt encoded)"
    assert cache_notice(("prompt", "negative prompt"), [True, True]).endswith("(umT5 not run)")
    assert cache_notice(("prompt", "negative prompt"), [False, False]) is None


def test_cache_returns_copies_the_caller_cannot_use_to_change_it():
    cache, enc = TextEncoderCache(2**20), CountingEncoder()
    out = cache.encode(enc, ("e",), ["abc", "abc"])
    assert out.tensors[0] is not out.tensors[1]  # the same text twice: two tensors, one encoder call
    assert len(enc.calls) == 1
    out.tensors[0].fill_(-1)
    again = cache.encode(enc, ("e",), ["abc"]).tensors[0]
    assert torch.equal(again, torch.full((3, 4), 3.0))
    again.fill_(-2)
    assert torch.equal(cache.get(("e",), "abc"), torch.full((3, 4), 3.0))


def test_cache_is_an_lru_bounded_by_bytes():
    entry = 10 * 4 * 4  # a 10-character text: [10, 4] float32
    cache, enc = TextEncoderCache(3 * entry), CountingEncoder()
    texts = [f"text {i:05d}" for i in range(4)]
    for t in texts[:3]:
        cache.encode(enc, ("e",), [t])
    assert len(cache) == 3 and cache.bytes == 3 * entry
    cache.encode(enc, ("e",), [texts[0]])  # used: now the most recent
    cache.encode(enc, ("e",), [texts[3]])  # evicts the least recently used: texts[1]
    assert cache.bytes <= cache.max_bytes and len(cache) == 3
    assert cache.get(("e",), texts[1]) is None
    assert all(cache.get(("e",), t) is not None for t in (texts[0], texts[2], texts[3]))
    cache.encode(enc, ("e",), ["x" * 100])  # larger than the whole cache: used, not kept
    assert cache.get(("e",), "x" * 100) is None and len(cache) == 3
    off = TextEncoderCache(0)
    off.encode(enc, ("e",), ["a"])
    assert off.encode(enc, ("e",), ["a"]).cached == [False] and len(off) == 0
    with pytest.raises(ValueError, match="text cache size"):
        TextEncoderCache(-1)


def test_cache_is_safe_across_threads():
    cache, enc = TextEncoderCache(64 * 4 * 4 * 8), CountingEncoder()
    errors = []

    def work(k):
        try:
            for i in range(50):
                out = cache.encode(enc, ("e",), [f"p{(i * 7 + k) % 16:02d}"])
                assert out.tensors[0].shape == (3, 4)
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and cache.bytes <= cache.max_bytes
    assert cache.hits + cache.misses == 200


def test_encoder_identity_names_file_dtype_device_and_quantisation(tmp_path):
    f = tmp_path / "umt5.safetensors"
    f.write_bytes(b"x" * 10)
    base = encoder_identity(f, dtype=torch.float32, device="cpu")
    assert base == encoder_identity(str(f), dtype=torch.float32, device="cpu")
    others = [encoder_identity(f, dtype=torch.bfloat16, device="cpu"),
              encoder_identity(f, dtype=torch.float32, device="meta"),
              encoder_identity(f, dtype=torch.float32, device="cpu", quantisation="fp8"),
              encoder_identity(f, dtype=torch.float32, device="cpu", runs=("mmgp",)),
              encoder_identity(f, dtype=torch.float32, device="cpu", tokenizer=tmp_path)]
    assert all(o != base for o in others)
    f.write_bytes(b"y" * 11)  # the file was replaced
    assert encoder_identity(f, dtype=torch.float32, device="cpu") != base


def test_a_second_job_with_the_same_prompts_skips_the_encoder_and_gives_the_same_bits(engine, monkeypatch):
    req = GenerationRequest(**BASE)
    nets = engine.models.get(engine.registry.get(req.model))
    engine.text_cache.clear()
    calls = []
    real = nets.text_encoder.encode_prompts
    monkeypatch.setattr(nets.text_encoder, "encode_prompts", lambda prompts, *a, **k: calls.append(list(prompts))
                        or real(prompts, *a, **k))
    first = engine.generate(req, write=False)
    assert len(calls) == 2 and not any("text encoder" in n for n in first.notices)
    second = engine.generate(req, write=False)
    assert len(calls) == 2  # umT5 did not run
    assert "text encoder: prompt and negative prompt from the cache (umT5 not run)" in second.notices
    assert torch.equal(first.latent, second.latent) and torch.equal(first.video, second.video)
    third = engine.generate(req.replace(negative_prompt="another negative"), write=False)
    assert calls[-1] == ["another negative"] and len(calls) == 3
    assert "text encoder: prompt from the cache (negative prompt encoded)" in third.notices
    # the same output as an engine without a cache
    assert engine.models.current.text_encoder_key is not None
    engine.text_cache.max_bytes, saved = 0, engine.text_cache.max_bytes
    try:
        engine.text_cache.clear()
        plain = engine.generate(req, write=False)
    finally:
        engine.text_cache.max_bytes = saved
    assert torch.equal(plain.latent, first.latent)


# -- NAG: the formula ----------------------------------------------------------------------------


def hand_nag(zp: list[float], zn: list[float], phi: float, tau: float, alpha: float) -> list[float]:
    """The formula of the reference, one token, in plain Python floats."""
    guided = [phi * p - (phi - 1) * n for p, n in zip(zp, zn)]
    l1_pos, l1_guided = sum(abs(v) for v in zp), sum(abs(v) for v in guided)
    ratio = l1_guided / l1_pos if l1_pos else math.nan
    if math.isnan(ratio) or ratio > tau:
        guided = [v * tau * l1_pos / (l1_guided + 1e-7) for v in guided]
    return [alpha * g + (1 - alpha) * p for g, p in zip(guided, zp)]


def test_nag_formula_equals_a_hand_computation():
    zp = torch.tensor([[[1.0, -2.0, 0.5, 0.0], [0.1, 0.1, -0.1, 0.2], [0.0, 0.0, 0.0, 0.0]]])
    zn = torch.tensor([[[0.5, -1.0, 1.0, 1.0], [0.1, 0.12, -0.1, 0.2], [1.0, 0.0, 0.0, 0.0]]])
    phi, tau, alpha = 3.0, 2.0, 0.25
    out = nag_combine(zp, zn, phi, tau, alpha)
    for t in range(3):
        expected = hand_nag(zp[0, t].tolist(), zn[0, t].tolist(), phi, tau, alpha)
        assert out[0, t].tolist() == pytest.approx(expected, rel=1e-6, abs=1e-7), t
    # token 0 is clipped (L1 ratio 8.5 / 3.5 > tau): the guided part's L1 norm becomes tau * ||Z+||_1
    guided = phi * zp[0, 0] - (phi - 1) * zn[0, 0]
    assert guided.abs().sum() / zp[0, 0].abs().sum() > tau
    clipped = (out[0, 0] - (1 - alpha) * zp[0, 0]) / alpha
    assert clipped.abs().sum().item() == pytest.approx(tau * zp[0, 0].abs().sum().item(), rel=1e-6)
    # token 1 stays below tau (ratio 0.92): plain extrapolation, blended; token 2 (Z+ = 0) is clipped to 0
    assert out[0, 2].abs().max() == 0
    assert out[0, 1].tolist() == pytest.approx((alpha * (phi * zp[0, 1] - (phi - 1) * zn[0, 1])
                                                + (1 - alpha) * zp[0, 1]).tolist(), rel=1e-6)
    # scale 1 is the identity up to the blend's rounding; bf16 in, bf16 out, float32 inside
    assert torch.allclose(nag_combine(zp, zn, 1.0, tau, alpha), zp, atol=1e-7)
    assert nag_combine(zp.bfloat16(), zn.bfloat16(), phi, tau, alpha).dtype == torch.bfloat16


def test_nag_acts_on_the_text_attention_before_the_output_projection():
    """A cross-attention with image input, guided: the text attention outputs for the prompt and
    the negative prompt, combined by the formula, then the (unguided) image attention added, then
    ``o``; computed here by hand with plain SDPA."""
    torch.manual_seed(0)
    dim, heads = 8, 2
    ca = randomize_(CrossAttention(dim, heads, 1e-6, image_input=True), seed=5).eval()
    x, pos, neg, img = torch.randn(1, 6, dim), torch.randn(1, 3, dim), torch.randn(1, 4, dim), torch.randn(1, 5, dim)
    phi, tau, alpha = 4.0, 1.5, 0.5

    class Guide:
        negative = TextContext(neg, None)

        def __call__(self, zp, zn):
            return nag_combine(zp, zn, phi, tau, alpha)

    def attend(q, k, v):  # [B, L, H, D] -> [B, L, H*D]
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
                                              ).transpose(1, 2).flatten(2)

    def split(t):
        return t.view(1, -1, heads, dim // heads)
    with torch.no_grad():
        out = ca(x, TextContext(pos, None, Guide()), img, lambda q, k, v: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2))
        q = split(ca.norm_q(ca.q(x)))
        z_pos = attend(q, split(ca.norm_k(ca.k(pos))), split(ca.v(pos)))
        z_neg = attend(q, split(ca.norm_k(ca.k(neg))), split(ca.v(neg)))
        z_img = attend(q, split(ca.norm_k_img(ca.k_img(img))), split(ca.v_img(img)))
        ref = torch.stack([torch.tensor(hand_nag(a.tolist(), b.tolist(), phi, tau, alpha)) for a, b in
                           zip(z_pos[0], z_neg[0])])[None]
        expected = ca.o(ref + z_img)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


# -- NAG: in the denoising loop -----------------------------------------------------------------


def probe(dit, pass_name=None, nag=None, step=0):
    g = torch.Generator().manual_seed(1)
    x, t, ctx = torch.randn(1, 16, 2, 4, 4, generator=g), torch.tensor([300.0]), torch.randn(1, 5, 24, generator=g)
    if nag is not None:
        nag.begin(step, pass_name)
    with torch.no_grad():
        return dit(x, t, ctx)


def test_nag_guides_prompt_passes_only_and_its_scale_is_read_per_step():
    dit = lora_test_dit()
    plain = probe(dit)
    negative = torch.randn(1, 3, 24, generator=torch.Generator().manual_seed(2))
    nag = NagGuidance(negative, lambda step: 6.0 if step == 0 else 1.0, tau=2.5, alpha=0.25)
    notices = nag.attach({"transformer": dit})
    try:
        assert notices == ["NAG on the prompt's cross-attention: scale 6 at the first step, tau 2.5, alpha 0.25"]
        guided = probe(dit, "transformer/cond", nag, step=0)
        assert not torch.equal(guided, plain) and (guided - plain).abs().max() > 1e-4
        assert torch.equal(probe(dit, "transformer/uncond", nag, step=0), plain)    # the negative-prompt pass
        assert torch.equal(probe(dit, "transformer/cond", nag, step=1), plain)      # scale 1 at step 1: off
        assert torch.equal(probe(dit, "transformer/cond_skip", nag, step=0), guided)  # a prompt pass too
        assert nag.embeddings == 1 and nag.guided_passes == 2  # the negative embedded once for the job
        with pytest.raises(RuntimeError, match="batched"):
            probe(dit, "transformer/cond+uncond", nag, step=0)
    finally:
        nag.detach({"transformer": dit})
    assert dit.block_runner is None and torch.equal(probe(dit), plain)


def test_nag_wraps_the_step_runner_and_can_embed_the_negative_again_each_step():
    """A step cache's runner stays in charge of the blocks (NAG wraps it and puts it back); with
    LoRAs that may move the text embedding between steps, the negative prompt is embedded per step."""
    from wan.optim.step_cache import StepRunner
    dit = lora_test_dit()
    runner = dit.block_runner = StepRunner()
    nag = NagGuidance(torch.randn(1, 3, 24), 5.0, tau=2.5, alpha=0.25, reembed_each_step=True)
    nag.attach({"transformer": dit})
    try:
        for step in (0, 0, 1):
            runner.begin(step, "transformer/cond")
            probe(dit, "transformer/cond", nag, step=step)
    finally:
        nag.detach({"transformer": dit})
    assert dit.block_runner is runner and runner.computed == 3
    assert nag.embeddings == 2 and nag.guided_passes == 3


@pytest.fixture(scope="module")
def plain(engine):
    return engine.warm  # BASE without NAG


@pytest.mark.parametrize("scale", [0, 1])
def test_nag_off_equals_the_plain_run_exactly(engine, plain, scale):
    off = engine.generate(GenerationRequest(**BASE, nag_scale=scale), write=False)
    assert torch.equal(off.latent, plain.latent) and torch.equal(off.video, plain.video)
    assert not any(n.startswith("NAG") for n in off.notices)


def test_nag_at_guidance_1_steers_and_composes_with_cfg(engine, plain, monkeypatch):
    nets = engine.models.get(engine.registry.get("test-tiny-t2v"))
    dit = nets.dits["transformer"]
    embeds = []
    real = dit.embed_text
    monkeypatch.setattr(dit, "embed_text", lambda c: embeds.append(c.shape) or real(c))
    nag = engine.generate(GenerationRequest(**BASE, nag_scale=9), write=False)
    assert (nag.latent - plain.latent).abs().max() > 1e-3  # the negative prompt acts at guidance 1
    assert "NAG on the prompt's cross-attention: scale 9, tau 2.5, alpha 0.25" in nag.notices
    # one prompt pass per step (guidance 1) plus the negative prompt embedded once for the job
    assert len(embeds) == BASE["steps"] + 1
    assert nag.request.nag_scale == 9.0 and nag.metadata["request"]["nag_alpha"] == 0.25
    cfg = engine.generate(GenerationRequest(**{**BASE, "guidance": 4.0}), write=False)
    both = engine.generate(GenerationRequest(**{**BASE, "guidance": 4.0}, nag_scale=9), write=False)
    assert [s.passes for s in both.steps] == [("cond", "uncond")] * BASE["steps"]
    assert (both.latent - cfg.latent).abs().max() > 1e-3 and (both.latent - nag.latent).abs().max() > 1e-3


def test_nag_per_guidance_phase(engine, plain, monkeypatch):
    """``nag2_scale``: NAG only in phase 2 (the accelerated phase of a recipe); the scale read at each step
    follows the phase of its timestep, and only the steps of phase 2 are guided."""
    made = []
    real_init = NagGuidance.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)
    monkeypatch.setattr(NagGuidance, "__init__", spy)
    ts = [s.timestep for s in plain.steps]
    threshold = (ts[0] + ts[1]) / 2  # phase 2 is the second step
    run = engine.generate(GenerationRequest(**BASE, guidance_phases=2, switch_threshold=threshold, nag2_scale=9),
                          write=False)
    (nag,) = made
    phase2 = [s.timestep < threshold for s in run.steps]
    assert [nag.scale_at(i) for i in range(len(run.steps))] == [9.0 if p else 1.0 for p in phase2]
    assert 0 < sum(phase2) < len(phase2) and nag.guided_passes == sum(phase2)
    assert run.request.nag2_scale == 9.0 and run.request.nag3_scale is None


@pytest.mark.parametrize("changes, field, words", [
    (dict(nag2_scale=9), "nag2_scale", "only with --guidance_phases 2 or 3"),
    (dict(guidance_phases=2, switch_threshold=500, nag2_scale=0.5), "nag2_scale", "between 0 and 1"),
    (dict(nag_scale=0.5), "nag_scale", "between 0 and 1"),
    (dict(nag_scale=51), "nag_scale", "up to 50"),
    (dict(nag_scale=-2), "nag_scale", "1 (off"),
    (dict(nag_scale=float("nan")), "nag_scale", "finite"),
    (dict(nag_scale="9"), "nag_scale", "finite number"),
    (dict(nag_tau=0.5), "nag_tau", "from 1 to 10"),
    (dict(nag_tau=True), "nag_tau", "finite number"),
    (dict(nag_alpha=1.5), "nag_alpha", "from 0 to 1"),
    (dict(nag_alpha=float("inf")), "nag_alpha", "finite"),
])
def test_nag_fields_are_checked_naming_field_value_and_allowed(changes, field, words):
    with pytest.raises(RequestError) as e:
        resolve_request(GenerationRequest(**{**BASE, **changes}), check_files=False)
    assert e.value.field == field and words in str(e.value), str(e.value)


def test_nag_fields_resolve_to_floats_and_round_trip_through_metadata():
    req, _ = resolve_request(GenerationRequest(**BASE, nag_scale=9, nag_tau=3, nag_alpha=1), check_files=False)
    assert (req.nag_scale, req.nag_tau, req.nag_alpha) == (9.0, 3.0, 1.0)
    assert all(type(v) is float for v in (req.nag_scale, req.nag_tau, req.nag_alpha))
    assert GenerationRequest.from_json(req.to_json()) == req
    old = {k: v for k, v in req.to_dict().items() if not k.startswith("nag_")}  # written before NAG existed
    assert GenerationRequest.from_dict(old).nag_scale == 1.0


def test_generate_flags_for_nag_and_the_cache_size():
    from wan.cli_generate import add_arguments, base_request
    from wan.flags import FlagParser
    p = FlagParser(prog="generate")
    add_arguments(p)
    args = p.parse_args(["--model", "m", "--nag_scale", "9", "--nag-tau", "3", "--nag_alpha", "0.5",
                         "--text_cache_mb", "0"])
    req = base_request(args)
    assert (req.nag_scale, req.nag_tau, req.nag_alpha, args.text_cache_mb) == (9.0, 3.0, 0.5, 0.0)
    assert p.parse_args(["--model", "m"]).text_cache_mb == 256
    with pytest.raises(SystemExit):
        p.parse_args(["--model", "m", "--text_cache_mb", "-1"])
    with pytest.raises(ValueError, match="text_cache_mb"):
        Engine(checkpoint_dir="nowhere", device="cpu", text_cache_mb=-5)
