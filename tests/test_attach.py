"""Attaching a job to loaded networks (``wan.engine.attach``): everything a job sets is restored on a
normal exit, on an error and on cancel, and every expert's notices are kept."""

import pytest
import torch

import wan.optim.attention as attn
from wan.engine import Cancelled, CancelToken, Engine, GenerationRequest, LoraChoice, resolve_request
from wan.engine.attach import AttentionKernel, SetOnNetworks, attach_job
from wan.optim.attention import Backend, register_backend
from wan.optim.guidance import GuidanceSettings, SkipLayerGuidance
from wan.optim.step_cache import StepRunner
from wan.optim.step_savers import StepSavers
from wan.testing.tiny_family import ensure_tiny_checkpoints
from golden_cases import write_lora


class Recorder:
    """A part that logs its calls; ``fail`` makes its attach raise after changing nothing."""

    def __init__(self, name, log, fail=False, notices=()):
        self.name, self.log, self.fail, self.notices = name, log, fail, list(notices)

    def attach(self, networks):
        if self.fail:
            raise RuntimeError(f"{self.name} cannot attach")
        self.log.append(f"+{self.name}")
        return self.notices

    def detach(self, networks):
        self.log.append(f"-{self.name}")


def test_parts_attach_in_order_and_detach_in_reverse_on_error():
    log = []
    with pytest.raises(ValueError, match="in the loop"):
        with attach_job({}, [Recorder("a", log, notices=["n"]), None, Recorder("b", log, notices=["n", "m"])]) as notes:
            assert notes == ["n", "m"]  # said once each
            raise ValueError("in the loop")
    assert log == ["+a", "+b", "-b", "-a"]


def test_a_part_failing_to_attach_detaches_the_earlier_ones():
    log = []
    with pytest.raises(RuntimeError, match="b cannot attach"):
        with attach_job({}, [Recorder("a", log), Recorder("b", log, fail=True), Recorder("c", log)]):
            pass
    assert log == ["+a", "-a"]


def test_set_on_networks_restores_each_previous_value():
    class Net:
        riflex = None
    one, two = Net(), Net()
    two.riflex = (4, 9)
    with attach_job({"high_noise": one, "low_noise": two}, [SetOnNetworks("riflex", (6, 21))]):
        assert one.riflex == two.riflex == (6, 21)
    assert one.riflex is None and two.riflex == (4, 9)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    root = tmp_path_factory.mktemp("attach")
    ensure_tiny_checkpoints(root / "ckpts")
    (root / "loras").mkdir()
    write_lora(root / "loras" / "l.safetensors")
    return Engine(checkpoint_dir=root / "ckpts", device="cpu", dtype=torch.float32, lora_dir=root / "loras")


def _state(dit):
    """What a job may change on a DiT: kernel, RIFLEx, runner, hooks, and the weights."""
    return (dit.attention, dit.riflex, dit.block_runner, sum(len(m._forward_hooks) for m in dit.modules()),
            {k: v.clone() for k, v in dit.state_dict().items()})


def _same(a, b):
    return a[:4] == b[:4] and all(torch.equal(a[4][k], b[4][k]) for k in a[4])


@pytest.mark.parametrize("lora_mode", ["hooks", "merge"])
def test_cancel_restores_kernel_riflex_runner_and_loras(engine, lora_mode):
    """A cancel in the middle of a job with every part attached (the skip-layer runner, RIFLEx on, a
    LoRA hooked or merged) leaves each expert as it was before the job."""
    req = GenerationRequest(model="test-tiny-t2v-a14b", prompt="x", steps=4, seed=1,
                            loras=[LoraChoice("l.safetensors", "0.8")],
                            profile_overrides={"lora.mode": lora_mode})
    nets = engine.models.get(engine.registry.get(req.model))
    before = {e: _state(d) for e, d in nets.dits.items()}
    token, seen = CancelToken(), {}

    def progress(info):
        dit = nets.dits[info.expert]
        seen["during"] = (dit.riflex, dit.block_runner, dit.attention)
        if info.step == 2:
            token.cancel()
    with pytest.raises(Cancelled):
        engine.generate(req, progress=progress, cancel=token, write=False,
                        savers=StepSavers(GuidanceSettings(slg=SkipLayerGuidance(mode="uncond", layers=(1,))), riflex="on"))
    riflex, runner, _ = seen["during"]
    assert riflex is not None and runner is not None  # they were attached while the loop ran
    after = {e: _state(d) for e, d in nets.dits.items()}
    assert all(_same(before[e], after[e]) for e in before)


def test_every_experts_attention_notice_is_kept(engine):
    """A backend usable for the first expert only: the second expert's fallback is reported (the
    loop used to keep the last expert's notices only, so the other order is checked too)."""
    for usable_first in (True, False):
        calls = []

        def check(device, dtype, calls=calls, usable_first=usable_first):
            calls.append(1)
            return (len(calls) == 1) == usable_first, "works for one expert only"
        register_backend(Backend("flaky", check, lambda: attn.sdpa_attention))
        try:
            req, spec = resolve_request(GenerationRequest(model="test-tiny-t2v-a14b", prompt="x", steps=2, seed=1),
                                        engine.registry)
            nets = engine.models.get(spec)
            notices = []
            engine.denoise(req, nets, attention=("flaky", "sdpa"), notices=notices)
        finally:
            attn.unregister_backend("flaky")
        assert len(calls) == 2
        notices = [n for n in notices if not n.startswith("text encoder:")]  # the text cache may speak too
        assert len(notices) == 1 and "'flaky' is not usable here, using 'sdpa'" in notices[0]


def test_the_kernel_is_restored_after_an_error_in_the_loop(engine):
    req, spec = resolve_request(GenerationRequest(model="test-tiny-t2v", prompt="x", steps=2, seed=1), engine.registry)
    nets = engine.models.get(spec)
    dit = nets.dit
    kernel = dit.attention

    class Broken(StepRunner):
        def begin(self, *args, **kwargs):
            raise RuntimeError("runner broke")

    class WithBroken(StepSavers):
        def runner(self, networks, sampler, start):
            return Broken()
    with pytest.raises(RuntimeError, match="runner broke"):
        engine.denoise(req, nets, attention=("sdpa",), savers=WithBroken())
    assert dit.attention is kernel and dit.block_runner is None and dit.riflex is None
    with attach_job(nets.dits, [AttentionKernel("sdpa")]):
        pass
    assert dit.attention is kernel
