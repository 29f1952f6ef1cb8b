"""The settings tab: the server's settings under the same names as the flags and the config file,
saved to the config file. Flags given at start override the file, so the tab says which settings
take effect at the next start.
"""

from __future__ import annotations

import dataclasses

import gradio as gr

from wan.app.state import AppState

HIDDEN = ("auth",)  # passwords belong in --auth-file, never in the config file


def render(state: AppState) -> dict:
    ui = {"fields": {}}
    gr.Markdown("Settings are saved to the config file and used at the next start "
                "(flags given on the command line still win). Passwords go in `--auth-file`.")
    for f in dataclasses.fields(state.settings):
        if f.name in HIDDEN:
            continue
        value = getattr(state.settings, f.name)
        label = f"{f.name}  (--{f.name.replace('_', '-')})"
        if isinstance(value, bool) or f.type in ("bool", bool):
            ui["fields"][f.name] = gr.Checkbox(bool(value), label=label)
        elif isinstance(value, int) or f.type in ("int", int):
            ui["fields"][f.name] = gr.Number(value, label=label, precision=0)
        else:
            ui["fields"][f.name] = gr.Textbox("" if value is None else str(value), label=label)
    ui["save"] = gr.Button("Save settings", elem_id="save-settings")
    ui["message"] = gr.Markdown("", elem_id="settings-message")
    return ui


def listen(state: AppState, ui: dict, config_path) -> None:
    names = list(ui["fields"])

    def save(*values):
        from wan.app.settings import SettingsError, save_settings, settings_from_dict, settings_to_dict
        data = settings_to_dict(state.settings)
        for name, v in zip(names, values):
            data[name] = None if v == "" else (int(v) if isinstance(v, float) and v.is_integer() else v)
        try:
            new = settings_from_dict(data, where="settings tab")
            save_settings(new, config_path)
        except (SettingsError, ValueError) as e:
            return f"⚠️ {e}"
        return f"Saved to `{config_path}`; restart the server to apply."
    ui["save"].click(save, [ui["fields"][n] for n in names], ui["message"])
