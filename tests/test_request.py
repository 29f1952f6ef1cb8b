"""The request: defaults from the registry, validation messages, JSON round trip."""
import pytest

from wan.engine.request import GenerationRequest, LoraChoice, RequestError, resolve_request


def resolve(**kw):
    kw.setdefault("model", "test-tiny-t2v")
    return resolve_request(GenerationRequest(**kw), check_files=False)[0]


def test_defaults_come_from_the_registry():
    r = resolve(prompt="a fox")
    assert (r.task, r.width, r.height, r.frames, r.steps, r.sampler, r.fps) == ("t2v", 64, 64, 9, 4, "unipc", 16)
    assert r.negative_prompt == "test negative prompt"
    assert 0 <= r.seed < 2**32 and r.guidance_high_noise is None


def test_reference_defaults_for_real_models():
    r = resolve(model="wan2.1-t2v-1.3B", prompt="x")
    assert (r.steps, r.shift, r.guidance, r.frames, r.fps) == (50, 5.0, 5.0, 81, 16)
    assert r.negative_prompt.startswith("色调艳丽")
    i2v = resolve(model="wan2.1-i2v-14B-480P", image="a.png", width=832, height=480)
    assert (i2v.steps, i2v.shift) == (40, 3.0) and i2v.negative_prompt.startswith("镜头晃动，")
    a14b = resolve(model="wan2.2-t2v-A14B")
    assert (a14b.boundary, a14b.guidance, a14b.guidance_high_noise, a14b.shift) == (0.875, 3.0, 4.0, 12.0)
    t2i = resolve(model="wan2.1-t2i-14B")
    assert t2i.frames == 1


def test_one_side_given_keeps_the_default_of_the_other():
    assert (resolve(width=96).width, resolve(width=96).height) == (96, 64)


def test_json_round_trip_is_lossless():
    r = resolve(prompt="雪中的狐狸 \"quoted\"", seed=42).replace(loras=[LoraChoice("a.safetensors", "1,0.5;0")])
    again = GenerationRequest.from_json(r.to_json())
    assert again == r and again.loras[0].multiplier == "1,0.5;0"


@pytest.mark.parametrize("kw,field,hint", [
    (dict(model="wan9-nope"), "model", "known models"),
    (dict(task="vace"), "task", "supports"),
    (dict(width=70, height=64), "width", "multiple of 16"),
    (dict(frames=10), "frames", "4k+1"),
    (dict(steps=0), "steps", "> 0"),
    (dict(sampler="ddim"), "sampler", "unipc"),
    (dict(seed=-5), "seed", "random"),
    (dict(image="x.png"), "image", "takes"),
    (dict(guidance=-1.0), "guidance", ">= 0"),
    (dict(boundary=0.9), "boundary", "two-expert"),
    (dict(trim_tail=9), "trim_tail", "0..8"),
    (dict(loras=[LoraChoice("a.safetensors", "1,x")]), "loras", "1,x"),
    (dict(profile="nope"), "profile", "nope"),
    (dict(profile="4", profile_overrides={"step_savers.teacache.colour": 1}), "profile", "colour"),
])
def test_bad_fields_are_named(kw, field, hint):
    with pytest.raises(RequestError) as e:
        resolve(**kw)
    assert e.value.field == field and hint in str(e.value)
    assert str(e.value).startswith(f"{field}: ")


def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(RequestError, match="image: None .* needs an input"):
        resolve_request(GenerationRequest(model="test-tiny-i2v"))
    with pytest.raises(RequestError, match="image: '.*nope.png' .* existing, readable file"):
        resolve_request(GenerationRequest(model="test-tiny-i2v", image=str(tmp_path / "nope.png")))


def test_unknown_field_in_json():
    with pytest.raises(RequestError, match="colour: .*not a request field"):
        GenerationRequest.from_dict({"model": "test-tiny-t2v", "colour": "red"})


def test_profiles_by_number_and_name_resolve_the_same():
    from wan.optim.apply import resolve_profile
    assert resolve_profile("4") == resolve_profile("LowRAM_LowVRAM")
    assert resolve(profile="4").profile == "4"
    over = resolve_profile("quality", {"step_savers.teacache.enabled": True})
    assert over.step_savers.teacache.enabled
