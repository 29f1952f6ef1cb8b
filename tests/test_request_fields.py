"""One source for the request's fields: help, flag spellings and defaults are declared once on
``GenerationRequest``; the ``generate`` flags, the UI form and the output writer read them there."""
import inspect
import re
from functools import reduce
from pathlib import Path

import pytest

from wan.cli_generate import add_arguments, base_request, parse_prompt_line
from wan.engine.request import REQUEST_FIELDS, GenerationRequest, LoraChoice, request_default
from wan.flags import FlagParser

WAN = Path(__file__).resolve().parent.parent / "wan"
# flags of ``generate`` that are not request fields (the LoRA flags make ``loras``, --set makes
# ``profile_overrides``, --video_size sets width and height)
NON_REQUEST_FLAGS = {"help", "video_size", "lora", "lora_weight", "lora_multiplier", "include_patterns",
                     "exclude_patterns", "lora_dir", "overrides", "from_file", "from_output", "interactive",
                     "checkpoint_dir", "device", "quiet", "max_frames", "max_pixels", "max_steps", "text_cache_mb",
                     "dit", "dit_high_noise", "vae", "t5", "clip", "tokenizer", "models_dir",
                     "ulysses_size", "ring_size", "cfg_parallel", "dit_fsdp", "t5_fsdp"}  # how, not which video


def generate_parser() -> FlagParser:
    p = FlagParser(prog="generate")
    add_arguments(p)
    return p


def parse(*argv: str):
    return base_request(generate_parser().parse_args(list(argv)))


def test_every_field_has_help_text():
    for f in REQUEST_FIELDS.values():
        assert len(f.help) > 10, f.name


def test_every_flag_is_a_request_field_or_a_listed_other_flag():
    dests = {a.dest for a in generate_parser()._actions}
    flagged = {name for name, f in REQUEST_FIELDS.items() if f.flag}
    assert dests - flagged == NON_REQUEST_FLAGS
    assert flagged <= dests
    assert {name for name, f in REQUEST_FIELDS.items() if not f.flag} == {"loras", "profile_overrides"}


def test_flags_are_shown_with_underscores_only():
    options = [o for a in generate_parser()._actions for o in a.option_strings if o.startswith("--")]
    assert not [o for o in options if "-" in o[2:]]
    assert len(options) == len(set(options))


def test_cli_defaults_are_the_request_defaults():
    p = generate_parser()
    for name, f in REQUEST_FIELDS.items():
        if f.flag:
            assert p.get_default(name) == request_default(name), name
    assert parse("--model", "m") == GenerationRequest(model="m")


def test_an_empty_form_gives_the_request_defaults():
    from wan.app.form import form_to_requests
    (req,) = form_to_requests({"model": "m", "prompt": "p"})
    assert req == GenerationRequest(model="m", prompt="p")


def test_musubi_and_hyphen_spellings_parse():
    req = parse("--task", "t2v-A14B", "--negative-prompt", "x", "--save-path", "o", "--infer_steps", "3",
                "--video-length", "5", "--video_size", "64", "96", "--timestep_boundary", "875",
                "--guidance_scale", "4", "--flow-shift", "2", "--sample_solver", "euler", "--denoise-strength", "0.5",
                "-p", "a fox")
    assert (req.model, req.task, req.negative_prompt, req.output_dir, req.steps, req.frames) == (
        "wan2.2-t2v-A14B", None, "x", "o", 3, 5)
    assert (req.height, req.width, req.boundary, req.guidance, req.shift, req.sampler, req.strength, req.prompt) == (
        64, 96, 0.875, 4.0, 2.0, "euler", 0.5, "a fox")
    assert parse("--model", "m", "--negative_prompt", "y", "--save_path", "s").output_dir == "s"


def test_every_flag_reaches_its_field_with_its_type():
    """Each request field's own flag, given a value of the field's type, sets just that field."""
    samples = {int: ("7", 7), float: ("0.5", 0.5), str: ("v", "v")}
    for name, f in REQUEST_FIELDS.items():
        if not f.flag or name == "model":
            continue
        if f.type is bool:
            argv, expected = [f"--{name}"], True
        else:
            text, value = samples[f.type]
            argv, expected = ([f"--{name}", text, text], [value, value]) if f.many else ([f"--{name}", text], value)
        req = parse("--model", "m", *argv)
        assert getattr(req, name) == expected and type(getattr(req, name)) is type(expected), name
        assert req.replace(**{name: request_default(name)}) == GenerationRequest(model="m"), name


def test_loras_and_overrides_come_from_their_flags():
    req = parse("--model", "m", "--lora", "a.safetensors:0.5", "--lora_weight", "b.safetensors",
                "--lora-multiplier", "0.3", "--include_patterns", "x", "y", "--set", "step_savers.slg.mode=uncond")
    assert req.loras == [LoraChoice("a.safetensors", "0.5", ["x"]), LoraChoice("b.safetensors", "0.3", ["y"])]
    assert req.profile_overrides == {"step_savers.slg.mode": "uncond"}


def test_from_output_takes_only_the_flags_given(monkeypatch):
    import wan.cli_generate as cli
    saved = GenerationRequest(model="saved", prompt="a fox", steps=9, seed=5, strength=0.5, output_dir="old")
    monkeypatch.setattr(cli, "_request_from_output", lambda path: saved)
    req = parse("--from_output", "x.mp4", "--steps", "3", "--save_path", "new", "--set", "compile=true")
    assert req == saved.replace(steps=3, output_dir="new", profile_overrides={"compile": True})


def test_inline_options_take_the_field_types():
    r = parse_prompt_line("x --fs 3 --d 4 --n 5", GenerationRequest(model="m"))
    assert (type(r.shift), type(r.seed), type(r.negative_prompt)) == (float, int, str)


def render_form(tmp_path):
    import gradio as gr

    from wan.app.settings import ServerSettings
    from wan.app.state import AppState
    from wan.app.ui_generate import render
    state = AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s")),
                     engine_factory=lambda: None)
    with gr.Blocks():
        return render(state)


def test_form_controls_start_at_the_request_and_profile_defaults(tmp_path):
    from wan.app.form import SAVER_NUMBERS, SLG_LAYERS, SUGGESTED_CFG_SKIP_RATIO
    from wan.optim.profiles import Profile
    c = render_form(tmp_path)
    for name in ("seed", "strength", "vace_scale", "quality"):
        assert c[name].value == request_default(name), name
    schema = Profile()
    for key, (_, setting) in SAVER_NUMBERS.items():
        expected = SUGGESTED_CFG_SKIP_RATIO if key == "cfg_skip_ratio" else reduce(getattr, setting.split("."), schema)
        assert c[key].value == expected, key
    key, _, setting = SLG_LAYERS
    assert c[key].value.split() == [str(n) for n in reduce(getattr, setting.split("."), schema)]


def test_a_changed_default_changes_the_flag_and_the_form(monkeypatch, tmp_path):
    from wan.app.form import form_to_requests
    declared = GenerationRequest.__dataclass_fields__
    monkeypatch.setattr(declared["strength"], "default", 0.4)
    monkeypatch.setattr(declared["quality"], "default", 6)
    assert generate_parser().get_default("strength") == 0.4
    assert generate_parser().get_default("quality") == 6
    (req,) = form_to_requests({"model": "m", "prompt": "p"})
    assert (req.strength, req.quality) == (0.4, 6)
    c = render_form(tmp_path)
    assert (c["strength"].value, c["quality"].value) == (0.4, 6)


def test_output_options_default_to_the_request_output_fields():
    from wan.engine.media_out import OutputOptions, encode_mp4, write_video
    o = OutputOptions()
    assert (o.folder, o.name_template, o.video_quality, o.save_latents, o.trim_tail_frames) == tuple(
        request_default(n) for n in ("output_dir", "name_template", "quality", "save_latents", "trim_tail"))
    for fn in (encode_mp4, write_video):
        assert inspect.signature(fn).parameters["quality"].default == request_default("quality")


@pytest.mark.parametrize("pattern", [r"(?<![\d.])0\.75(?!\d)", re.escape('"{time}_seed{seed}_{prompt}"')])
def test_a_default_is_written_once_in_the_package(pattern):
    hits = [f"{p.relative_to(WAN)}:{n}" for p in sorted(WAN.rglob("*.py"))
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if re.search(pattern, line)]
    assert len(hits) == 1 and hits[0].startswith("engine/request.py:"), hits


def test_form_controls_retype_no_default():
    source = (WAN / "app" / "ui_generate.py").read_text(encoding="utf-8")
    assert not re.findall(r"gr\.(?:Number|Textbox)\(\s*-?[\d\"']", source)
    assert not re.findall(r"gr\.Slider\([^,]+,[^,]+,\s*-?\d", source)
