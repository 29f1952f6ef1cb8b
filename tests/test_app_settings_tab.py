"""The Settings tab as a user study found it wanting: plain labels with a description and the flag,
grouped; the model, profile and attention as pickers; values checked before they are saved (a
profile that does not exist used to be saved, and the next start showed an empty profile picker);
relative folders shown resolved while the value is saved as typed."""
from __future__ import annotations

import dataclasses
import os

import gradio as gr
import pytest
import yaml

from wan.app import ui_settings
from wan.app.settings import (ServerSettings, SettingsError, add_server_arguments, check_references, load_settings)
from wan.app.state import AppState
from wan.flags import FlagParser
from wan.optim.profile_files import load_profiles
from wan.optim.profiles import ATTENTION_BACKENDS
from wan.registry import list_models

SHOWN = [f for f in dataclasses.fields(ServerSettings) if f.name not in ui_settings.HIDDEN]


def make_state(tmp_path, **settings) -> AppState:
    return AppState(ServerSettings(output_dir=str(tmp_path / "o"), state_dir=str(tmp_path / "s"), **settings),
                    engine_factory=lambda: None)


def render(state, config_path=None):
    """The tab built in its own page; returns the page and the tab's controls."""
    with gr.Blocks() as demo:
        ui = ui_settings.render(state)
        ui_settings.listen(state, ui, config_path or "unused.yaml")
    return demo, ui


def inside(block) -> list:
    """The components inside a layout block (gradio wraps form controls in a Form)."""
    children = getattr(block, "children", None)
    return [block] if children is None else [c for child in children for c in inside(child)]


def handler(demo, name: str):
    return next(f.fn for f in demo.fns.values() if getattr(f.fn, "__name__", "") == name)


def test_each_setting_has_a_plain_label_a_description_with_its_flag_and_a_section(tmp_path):
    demo, ui = render(make_state(tmp_path))
    fields = ui["fields"]
    assert set(fields) == {f.name for f in SHOWN}
    for f in SHOWN:
        control = fields[f.name]
        assert "_" not in control.label and control.label[0].isupper(), control.label  # words, not the key
        assert f"(--{f.name})" in control.info and control.info[0].isupper(), control.info
        assert f.metadata["help"][1:] in control.info  # the flag's help is the description
    assert fields["listen"].label == "Listen on all network interfaces"
    assert fields["listen"].info.endswith("instead of --server_name (--listen)")
    # sections with headings, each setting in exactly one of them, in the order of GROUPS
    sections = [b for b in demo.blocks.values() if isinstance(b, gr.Accordion)]
    assert [s.label for s in sections] == ["Network & access", "Models & folders", "Generation defaults",
                                           "Limits for browser clients", "Start-up and log"]
    placed = [c for s in sections for c in inside(s)]
    assert sorted(c.elem_id for c in placed) == sorted(ui_settings.element_id(f.name) for f in SHOWN)
    limits = sections[3]
    assert {fields[n] for n in ("max_frames", "max_pixels", "max_upload_mb")} <= set(inside(limits))


def test_model_profile_and_attention_are_pickers_of_what_exists(tmp_path):
    _, ui = render(make_state(tmp_path, model="test-tiny-t2v", profile="4", attention="sdpa"))
    model, profile, attention = (ui["fields"][k] for k in ("model", "profile", "attention"))
    assert all(isinstance(c, gr.Dropdown) for c in (model, profile, attention))
    assert model.choices[0] == ("(first model)", "")
    assert [v for _, v in model.choices[1:]] == [m.id for m in list_models(include_test=True)]
    assert ("Wan 2.1 Text-to-Video 1.3B", "wan2.1-t2v-1.3B") in model.choices
    assert ("TEST tiny Wan 2.1 t2v [test model]", "test-tiny-t2v") in model.choices and model.value == "test-tiny-t2v"
    assert profile.choices == [("(default)", "")] + [(p.label, p.name) for p in load_profiles()]
    assert ("4 LowRAM_LowVRAM", "LowRAM_LowVRAM") in profile.choices
    assert profile.value == "LowRAM_LowVRAM"  # the running "4", shown as the choice it is
    assert [v for _, v in attention.choices] == ["", "auto", *ATTENTION_BACKENDS] and attention.value == "sdpa"
    # a running setting naming nothing known stays visible (not an empty picker) and marked
    _, ui = render(make_state(tmp_path, profile="gone"))
    assert ui["fields"]["profile"].value == "gone" and ("gone (not a known profile)", "gone") in \
        ui["fields"]["profile"].choices
    assert ui["fields"]["model"].value == ""  # unset: the first model


def test_the_pickers_values_map_back_to_settings(tmp_path):
    state = make_state(tmp_path, profile="4", model="test-tiny-t2v")
    names = ["profile", "model", "attention"]
    # the picker shows "4" as LowRAM_LowVRAM: unchanged, nothing to write
    assert ui_settings.changed_settings(state, names, ["LowRAM_LowVRAM", "test-tiny-t2v", ""]) == {}
    assert ui_settings.changed_settings(state, names, ["", "", "auto"]) == {"profile": None, "model": None,
                                                                            "attention": "auto"}
    assert ui_settings.changed_settings(state, names, ["quality", "test-tiny-i2v", ""]) == {
        "profile": "quality", "model": "test-tiny-i2v"}


def test_saving_refuses_a_profile_or_model_that_does_not_exist(tmp_path):
    config = tmp_path / "wan_studio.yaml"
    config.write_text("lora_dir: my_loras\n")
    state = make_state(tmp_path)
    for key, value, allowed in (("profile", "no_such_profile", "4 LowRAM_LowVRAM, 5 VeryLowRAM_LowVRAM"),
                                ("profile", "9", "quality"),
                                ("model", "wan2.1-t2v-1.3b", "wan2.1-t2v-1.3B")):
        with pytest.raises(SettingsError) as e:
            ui_settings.save_changes(state, {key: value}, config)
        msg = str(e.value)
        assert msg.startswith(f"Settings tab: {key}: {value!r} is not allowed; expected ") and allowed in msg, msg
        assert config.read_text() == "lora_dir: my_loras\n"  # nothing written
    # names and numbers that load_profiles().get accepts are saved as given
    ui_settings.save_changes(state, {"profile": "5", "model": "test-tiny-i2v"}, config)
    assert yaml.safe_load(config.read_text()) == {"lora_dir": "my_loras", "profile": "5", "model": "test-tiny-i2v"}
    # the button's handler says which setting and what is allowed, and saves a good one
    demo, ui = render(state, config)
    names = list(ui["fields"])
    values = [ui["fields"][n].value for n in names]
    save = handler(demo, "save")
    assert save(*values) == "Nothing changed."
    values[names.index("profile")] = "nope"  # what a page could send past its picker
    message = save(*values)
    assert message.startswith("⚠️ Settings tab: profile: 'nope' is not allowed") and "fast_preview" in message
    values[names.index("profile")] = "quality"
    assert save(*values).startswith("Saved profile to")
    assert yaml.safe_load(config.read_text())["profile"] == "quality"


def parse(*argv):
    return add_server_arguments(FlagParser(prog="wgp.py")).parse_args(list(argv))


def test_check_references():
    assert check_references(ServerSettings(profile="4")).profile == "LowRAM_LowVRAM"
    assert check_references(ServerSettings(profile="QUALITY", model="test-tiny-t2v")).profile == "quality"
    assert check_references(ServerSettings()) == ServerSettings()
    with pytest.raises(SettingsError, match=r"^here: profile: 'qualty' is not allowed; expected a profile name or "
                                            r"number \(did you mean quality\?\): 1 HighRAM_HighVRAM, "):
        check_references(ServerSettings(profile="qualty"), "here")
    with pytest.raises(SettingsError, match=r"--model: 'nope' is not allowed; expected a model id: wan2.1-t2v-1.3B"):
        check_references(ServerSettings(model="nope"), "flag")
    assert check_references(ServerSettings(model="nope"), keys=("profile",)).model == "nope"  # only the keys asked


def test_a_bad_profile_in_the_file_warns_and_the_server_starts_with_a_usable_picker(tmp_path):
    from wan.app.server import build_app
    config = tmp_path / "wan_studio.yaml"
    config.write_text("profile: no_such_profile\nmodel: removed-finetune\nverbose: true\n")
    warnings = []
    settings = load_settings(parse("--config", str(config), "--output-dir", str(tmp_path / "o"),
                                   "--state-dir", str(tmp_path / "s")), warn=warnings.append)
    assert (settings.profile, settings.model, settings.verbose) == (None, None, True)  # the rest still applies
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{config}: profile: 'no_such_profile' is not allowed; expected a profile name")
    assert "ignored at this start (the default profile is used instead)" in warnings[0]
    assert warnings[1].startswith(f"{config}: model: 'removed-finetune' is not allowed; expected a model id")
    # the page builds, and the Generate tab's profile picker holds one of its choices
    state = AppState(settings, engine_factory=lambda: None)
    demo = build_app(state, config)
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "profile")
    assert picker.value and picker.value in [v for _, v in picker.choices]
    # a profile number from the file is kept under its name, which the picker lists (it refused "4")
    config.write_text("profile: 4\n")
    settings = load_settings(parse("--config", str(config), "--output-dir", str(tmp_path / "o"),
                                   "--state-dir", str(tmp_path / "s")), warn=warnings.append)
    assert settings.profile == "LowRAM_LowVRAM" and len(warnings) == 2
    demo = build_app(AppState(settings, engine_factory=lambda: None), config)
    picker = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "profile")
    assert picker.value in [v for _, v in picker.choices]
    # a flag was just typed: naming nothing is an error, not a warning
    with pytest.raises(SettingsError, match=r"^--profile: 'nope' is not allowed"):
        load_settings(parse("--config", str(config), "--profile", "nope"), warn=warnings.append)


def test_relative_folders_are_shown_resolved_and_saved_as_typed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.path.realpath(tmp_path)
    config = tmp_path / "wan_studio.yaml"
    state = make_state(tmp_path, lora_dir="my_loras", checkpoint_dir="~/ckpt", models_dir=("a", "../b"))
    demo, ui = render(state, config)
    f = ui["fields"]
    assert f["lora_dir"].value == "my_loras" and f["lora_dir"].info.endswith(f" · now: {here}/my_loras")
    assert f["checkpoint_dir"].info.endswith(f" · now: {os.path.realpath(os.path.expanduser('~/ckpt'))}")
    assert f["models_dir"].info.endswith(f" · now: {here}/a; {os.path.dirname(here)}/b")
    assert f["output_dir"].info.endswith(f"now: {here}/o") and f["state_dir"].info.endswith(f"now: {here}/s")
    assert "now:" not in f["server_name"].info and "now:" not in f["auth_file"].info
    # a value typed in the box shows where it is once the box is left
    show = handler(demo, "show")
    assert show(" out/videos ")["info"].endswith(f"now: {here}/out/videos")
    # saving keeps the value as typed, not the resolved folder
    changed = ui_settings.changed_settings(state, ["lora_dir", "models_dir"], ["other_loras", "a\n../b\n"])
    assert changed == {"lora_dir": "other_loras"}
    ui_settings.save_changes(state, changed, config)
    assert yaml.safe_load(config.read_text()) == {"lora_dir": "other_loras"}


def test_an_exposed_server_keeps_its_folders_and_network_read_only(tmp_path):
    state = make_state(tmp_path, share=True, lora_dir="my_loras")
    demo, ui = render(state)
    for name in ui_settings.GUARDED:
        assert ui["fields"][name].interactive is False, name
    for name in ("profile", "model", "attention", "verbose"):
        assert ui["fields"][name].interactive is not False, name
    assert not any(getattr(f.fn, "__name__", "") == "show" for f in demo.fns.values())  # no folder probing
    with pytest.raises(ValueError, match="lora_dir: cannot be changed from the page"):
        ui_settings.changed_settings(state, ["lora_dir"], ["/"])
