"""The settings tab: the server's settings under the same names as the flags and the config file,
saved to the config file for the next start (flags given on the command line still win).

Each setting shows its label in plain words, a one-line description with its flag, and where it
names a folder, the absolute folder it means now (a relative folder is relative to the folder
the server was started in). The model, the profile and the attention backend are picked from
what exists. Saving checks the values (:func:`wan.app.settings.check_references` for the profile
and the model) before anything is written.

Only what the user changed in the tab is written, over what the file already says: flags given at
this start are not turned into file settings by a save. While the server is reachable from other
machines (``--listen``, ``--share`` or a non-local ``--server_name``), the settings that decide its
exposure and its folders are read-only here: a visitor must not be able to open the next start
to the network or point its output folder at the whole disk. Passwords never appear.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import gradio as gr

from wan.app.state import AppState

HIDDEN = ("auth",)  # passwords belong in --auth_file, never in the config file or a page
# settings that decide who can reach the server and what it reads, writes and serves
GUARDED = ("listen", "server_name", "server_port", "share", "auth_file", "checkpoint_dir", "lora_dir", "output_dir",
           "state_dir", "models_dir", "max_frames", "max_pixels", "max_steps", "max_upload_mb", "max_queue",
           "max_queue_per_session", "uploads_max_age_days", "uploads_max_mb",
           "datasets_dir", "max_train_steps",  # the Train tab's
           "gpus", "gpu_mode")  # the processes the server starts, and on which devices
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")
# the tab's sections: heading, settings, open when the page opens; every shown setting is in one
GROUPS = (
    ("Network & access", ("listen", "server_name", "server_port", "share", "auth_file"), True),
    ("Models & folders", ("model", "checkpoint_dir", "models_dir", "lora_dir", "output_dir", "state_dir",
                          "datasets_dir"), True),
    ("Generation defaults", ("profile", "attention", "compile", "gpus", "gpu_mode"), True),
    ("Limits for browser clients", ("max_frames", "max_pixels", "max_steps", "max_upload_mb", "max_queue",
                                    "max_queue_per_session", "uploads_max_age_days", "uploads_max_mb",
                                    "max_train_steps"), False),
    ("Start-up and log", ("open_browser", "verbose"), False),
)
FOLDERS = ("checkpoint_dir", "models_dir", "lora_dir", "output_dir", "state_dir", "datasets_dir")
# the empty choice of a picker: the setting left unset (None)
FIRST_MODEL, DEFAULT_PROFILE, PROFILE_ATTENTION = "(first model)", "(default)", "(the profile's choice)"


def exposed(settings) -> bool:
    """Whether other machines can reach this server."""
    return bool(settings.listen or settings.share or settings.server_name not in LOCAL_NAMES)


def element_id(name: str) -> str:
    return "setting-" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------
# What each control shows


def resolved(value) -> str:
    """The absolute folder(s) a folder setting means now, as the server resolves them."""
    values = value if isinstance(value, (tuple, list)) else (value,)
    values = [v for v in values if v]
    try:
        return "; ".join(os.path.realpath(os.path.expanduser(v)) for v in values) or "none"
    except (ValueError, OSError):  # a NUL byte or another character no path may hold
        return "not a usable folder"


def describe(field: dataclasses.Field, value) -> str:
    """The info line: the setting's description, its flag and, for a folder, where it is now."""
    help_text = field.metadata["help"]
    text = f"{help_text[:1].upper()}{help_text[1:]} (--{field.name})"
    return f"{text} · now: {resolved(value)}" if field.name in FOLDERS else text


def _with_current(choices: list[tuple[str, str]], current, what: str) -> list[tuple[str, str]]:
    """A value the choices lack (a running setting naming nothing known) stays visible and
    selected, marked, instead of leaving the picker empty; saving it is refused."""
    if current and current not in {v for _, v in choices}:
        choices.append((f"{current} (not {what})", current))
    return choices


def model_choices(current: str | None) -> list[tuple[str, str]]:
    """(display name, id) of every registry model, after the empty choice (``None``)."""
    from wan.registry import list_models
    models = [(f"{m.display_name} [test model]" if m.test_model else m.display_name, m.id)
              for m in list_models(include_test=True)]
    return _with_current([(FIRST_MODEL, ""), *models], current, "a known model")


def _profiles():
    from wan.optim.profile_files import load_profiles
    from wan.optim.profiles import ProfileError
    try:
        return load_profiles()
    except ProfileError:
        return None  # the Generate tab's picker says why; this one offers the default only


def profile_name(ref: str | None) -> str | None:
    """A profile name or number as the profile's name; anything else unchanged."""
    profiles = _profiles()
    return profiles.get(ref).name if ref is not None and profiles is not None and ref in profiles else ref


def profile_choices(current: str | None) -> list[tuple[str, str]]:
    """(label, name) of every profile, after the empty choice (``None``: the default profile)."""
    profiles = _profiles()
    listed = [(p.label, p.name) for p in profiles] if profiles is not None else []
    return _with_current([(DEFAULT_PROFILE, ""), *listed], current, "a known profile")


def attention_choices(current: str | None) -> list[tuple[str, str]]:
    from wan.optim.profiles import ATTENTION_BACKENDS
    return _with_current([(PROFILE_ATTENTION, ""), *[(a, a) for a in ("auto", *ATTENTION_BACKENDS)]], current,
                         "a known backend")


def _control(field: dataclasses.Field, value, interactive: bool):
    kwargs = dict(label=field.metadata["label"], info=describe(field, value), interactive=interactive,
                  elem_id=element_id(field.name))
    name = field.name
    if name == "model":
        return gr.Dropdown(model_choices(value), value=value or "", **kwargs)
    if name == "profile":
        value = profile_name(value)
        return gr.Dropdown(profile_choices(value), value=value or "", **kwargs)
    if name == "attention":
        return gr.Dropdown(attention_choices(value), value=value or "", **kwargs)
    if name == "gpu_mode":
        from wan.app.settings import GPU_MODES
        return gr.Dropdown(list(GPU_MODES), value=value, **kwargs)
    if isinstance(value, bool) or field.type in ("bool", bool):
        return gr.Checkbox(bool(value), **kwargs)
    if isinstance(value, int) or field.type in ("int", int):
        return gr.Number(value, precision=0, **kwargs)
    if isinstance(value, tuple):  # a list setting (models_dir): one entry per line
        kwargs["label"] += " (one per line)"
        return gr.Textbox("\n".join(value), lines=2, **kwargs)
    return gr.Textbox("" if value is None else str(value), **kwargs)


def render(state: AppState) -> dict:
    ui = {"fields": {}}
    locked = exposed(state.settings)
    note = (" This server is reachable from other machines, so its network, folder and limit settings are "
            "read-only here: change them in the config file on the server machine." if locked else "")
    gr.Markdown("Settings are saved to the config file and used at the next start "
                f"(flags given on the command line still win). Passwords go in `--auth_file`. "
                f"A relative folder is relative to the folder the server was started in.{note}")
    fields = {f.name: f for f in dataclasses.fields(state.settings)}
    for heading, names, open_ in GROUPS:
        with gr.Accordion(heading, open=open_, elem_id=element_id(heading.split()[0].lower()) + "-group"):
            for name in names:
                ui["fields"][name] = _control(fields[name], getattr(state.settings, name),
                                              interactive=not (locked and name in GUARDED))
    ui["save"] = gr.Button("Save settings", elem_id="save-settings")
    ui["message"] = gr.Markdown("", elem_id="settings-message")
    return ui


# ---------------------------------------------------------------------------------------------
# Saving


def _folders(text) -> tuple[str, ...]:
    return tuple(line.strip() for line in str(text or "").splitlines() if line.strip())


def changed_settings(state: AppState, names: list[str], values) -> dict:
    """The tab's values that differ from the running settings, checked against the guard."""
    changed = {}
    for name, v in zip(names, values):
        current = getattr(state.settings, name)
        if isinstance(current, tuple):
            v = _folders(v)
        v = None if v == "" else (int(v) if isinstance(v, float) and v.is_integer() else v)
        if name == "profile":  # the picker holds names: a running "4" is its name, unchanged
            v, current = profile_name(v), profile_name(current)
        if v != current:
            if name in GUARDED and exposed(state.settings):
                raise ValueError(f"{name}: cannot be changed from the page while the server is reachable from "
                                 "other machines; edit the config file on the server machine")
            changed[name] = v
    return changed


def save_changes(state: AppState, changed: dict, config_path) -> Path:
    """Writes ``changed`` over the config file's current content (checked, atomically).

    The changed values are checked first, in the tab's words: their types, then that a profile or
    a model names one that exists (:func:`check_references`). Values the file already holds and
    the tab did not change are written back as they are (only the start judges those)."""
    from wan.app.settings import REFERENCES, check_references, read_config, save_settings, settings_from_dict
    where = "Settings tab"
    check_references(settings_from_dict(changed, base=state.settings, where=where), where,
                     keys=[k for k in REFERENCES if k in changed])
    path = Path(config_path)
    data = read_config(path) if path.is_file() else {}
    data.update(changed)
    return save_settings(settings_from_dict(data, where=str(path)), path)


def listen(state: AppState, ui: dict, config_path) -> None:
    names = list(ui["fields"])
    fields = {f.name: f for f in dataclasses.fields(state.settings)}

    def save(*values):
        from wan.app.settings import SettingsError
        try:
            changed = changed_settings(state, names, values)
            if not changed:
                return "Nothing changed."
            path = save_changes(state, changed, config_path)
        except (SettingsError, ValueError) as e:
            return f"⚠️ {e}"
        return f"Saved {', '.join(sorted(changed))} to `{path}`; restart the server to apply."
    ui["save"].click(save, [ui["fields"][n] for n in names], ui["message"])

    for name in FOLDERS:  # the folder a typed value means, once the box is left
        box = ui["fields"][name]
        if box.interactive:
            def show(text, f=fields[name]):
                value = _folders(text) if f.name == "models_dir" else str(text or "").strip()
                return gr.update(info=describe(f, value))
            box.blur(show, box, box, show_progress="hidden", api_visibility="private")
