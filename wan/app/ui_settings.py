"""The settings tab: the server's settings under the same names as the flags and the config file,
saved to the config file for the next start (flags given on the command line still win).

Only what the user changed in the tab is written, over what the file already says: flags given at
this start are not turned into file settings by a save. While the server is reachable from other
machines (``--listen``, ``--share`` or a non-local ``--server_name``), the settings that decide its
exposure and its folders are read-only here: a visitor must not be able to open the next start
to the network or point its output folder at the whole disk. Passwords never appear.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from wan.app.state import AppState

HIDDEN = ("auth",)  # passwords belong in --auth_file, never in the config file or a page
# settings that decide who can reach the server and what it reads, writes and serves
GUARDED = ("listen", "server_name", "server_port", "share", "auth_file", "checkpoint_dir", "lora_dir", "output_dir",
           "state_dir", "models_dir", "max_frames", "max_pixels", "max_steps", "max_upload_mb", "max_queue",
           "max_queue_per_session", "uploads_max_age_days", "uploads_max_mb")
LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def exposed(settings) -> bool:
    """Whether other machines can reach this server."""
    return bool(settings.listen or settings.share or settings.server_name not in LOCAL_NAMES)


def render(state: AppState) -> dict:
    ui = {"fields": {}}
    locked = exposed(state.settings)
    note = (" This server is reachable from other machines, so its network, folder and limit settings are "
            "read-only here: change them in the config file on the server machine." if locked else "")
    gr.Markdown("Settings are saved to the config file and used at the next start "
                f"(flags given on the command line still win). Passwords go in `--auth_file`.{note}")
    for f in dataclasses.fields(state.settings):
        if f.name in HIDDEN:
            continue
        value = getattr(state.settings, f.name)
        kwargs = dict(label=f"{f.name}  (--{f.name})", interactive=not (locked and f.name in GUARDED))
        if isinstance(value, bool) or f.type in ("bool", bool):
            ui["fields"][f.name] = gr.Checkbox(bool(value), **kwargs)
        elif isinstance(value, int) or f.type in ("int", int):
            ui["fields"][f.name] = gr.Number(value, precision=0, **kwargs)
        elif isinstance(value, tuple):  # a list setting (models_dir): one entry per line
            kwargs["label"] += ", one per line"
            ui["fields"][f.name] = gr.Textbox("\n".join(value), lines=2, **kwargs)
        else:
            ui["fields"][f.name] = gr.Textbox("" if value is None else str(value), **kwargs)
    ui["save"] = gr.Button("Save settings", elem_id="save-settings")
    ui["message"] = gr.Markdown("", elem_id="settings-message")
    return ui


def changed_settings(state: AppState, names: list[str], values) -> dict:
    """The tab's values that differ from the running settings, checked against the guard."""
    changed = {}
    for name, v in zip(names, values):
        if isinstance(getattr(state.settings, name), tuple):
            v = tuple(line.strip() for line in str(v or "").splitlines() if line.strip())
        v = None if v == "" else (int(v) if isinstance(v, float) and v.is_integer() else v)
        if v != getattr(state.settings, name):
            if name in GUARDED and exposed(state.settings):
                raise ValueError(f"{name}: cannot be changed from the page while the server is reachable from "
                                 "other machines; edit the config file on the server machine")
            changed[name] = v
    return changed


def save_changes(state: AppState, changed: dict, config_path) -> Path:
    """Writes ``changed`` over the config file's current content (checked, atomically)."""
    from wan.app.settings import read_config, save_settings, settings_from_dict
    path = Path(config_path)
    data = read_config(path) if path.is_file() else {}
    data.update(changed)
    return save_settings(settings_from_dict(data, where=str(path)), path)


def listen(state: AppState, ui: dict, config_path) -> None:
    names = list(ui["fields"])

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
