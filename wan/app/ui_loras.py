"""The LoRA browser: the LoRAs of the folder with a mark saying whether each fits the selected
model, a multi-select, the multiplier string, and named presets (save, load, delete).

A LoRA is chosen by its path inside the LoRA folder (``test/style.safetensors``): that is what a
request holds, and the engine refuses any name that would leave the folder. The mark compares the
LoRA's family folder with the model's; the full shape check runs with "Check" and again, always,
when the job starts.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from wan.app.state import AppState
from wan.app.words import literal


def lora_rows(state: AppState, model_id: str) -> tuple[list[tuple[str, str]], str]:
    """(choices for the multi-select, a markdown table) of every LoRA in the folder."""
    from wan.lora.library import clear_cache, family_for_model, scan_loras
    from wan.registry import get_model
    root = Path(state.settings.lora_dir)
    clear_cache()
    model_family = family_for_model(get_model(model_id))
    infos = scan_loras(root)
    infos.sort(key=lambda i: (i.family != model_family, i.family, i.name))
    choices, lines = [], ["| | LoRA | family | rank | size | trigger words |", "|---|---|---|---|---|---|"]
    for i in infos:
        rel = i.path.relative_to(root).as_posix()
        mark = "✗" if i.error else ("✓" if i.family == model_family else "·")
        words = i.error or ", ".join(i.trigger_words) or (i.description or "")
        lines.append(f"| {mark} | {i.name} | {i.family} | {i.rank or ''} | {i.size_bytes / 2**20:.1f} MB | {words} |")
        if not i.error:
            choices.append((f"{mark} {i.name} ({i.family})", rel))
    if not infos:
        return [], f"No LoRAs in `{root}`: put them in `{root}/<family>/` (this model's family: `{model_family}`)."
    legend = f"\n\n✓ made for this model's family ({model_family}) · other family · ✗ unreadable"
    return choices, "\n".join(lines) + legend


def check_selected(state: AppState, model_id: str, selected: list[str]) -> str:
    """The full compatibility check of the selected LoRAs against the model's layer shapes."""
    from wan.lora.compat import check_lora, model_linear_shapes
    from wan.lora.formats import load_lora
    from wan.registry import get_model
    if not selected:
        return "Select LoRAs to check."
    shapes = model_linear_shapes(get_model(model_id))
    out = []
    for rel in selected:
        try:
            detail = check_lora(load_lora(Path(state.settings.lora_dir) / rel), shapes).summary()
        except Exception as e:  # one unreadable file must not hide the others' results
            detail = f"unreadable: {e}"
        out.append(f"- **{rel}**: {detail}")
    return "\n".join(out)


def preset_entries(selected: list[str], mults: str) -> list[tuple[str, str]]:
    """Selected LoRA paths (``family/name.safetensors``) -> preset entries (``family/name``, multiplier)."""
    from wan.lora.library import LORA_SUFFIXES
    values = (mults or "").split() or ["1.0"] * len(selected or [])
    if len(values) != len(selected or []):
        raise ValueError(f"lora_multipliers: {mults!r}: one entry per selected LoRA ({len(selected)} selected)")
    out = []
    for rel, m in zip(selected, values):
        for suffix in LORA_SUFFIXES:
            rel = rel[: -len(suffix)] if rel.lower().endswith(suffix) else rel
        out.append((rel, m))
    return out


def preset_paths(root: Path, names, model_family: str | None) -> list[str]:
    """Preset LoRA names -> paths inside the LoRA folder. Our presets name ``family/name``; a Wan2GP
    ``.lset`` names files of one family folder, looked up in the selected model's family."""
    from wan.lora.library import FAMILY_FOLDERS, resolve_lora
    out = []
    for name in names:
        family, _, rest = name.partition("/")
        if not (rest and family in FAMILY_FOLDERS):
            if model_family is None:
                raise ValueError(f"LoRA {name!r}: no LoRA family folder for this model")
            family, rest = model_family, name
        out.append(resolve_lora(root, family, rest).relative_to(root.resolve()).as_posix())
    return out


def render(state: AppState, c: dict) -> dict:
    """Adds ``loras`` and ``lora_multipliers`` to the form's controls, and the browser's own parts."""
    ui = {}
    with gr.Accordion("LoRAs", open=False, elem_id="lora-browser"):
        with gr.Row():
            c["loras"] = gr.Dropdown([], multiselect=True, label="LoRAs", elem_id="loras", scale=4)
            ui["refresh"] = gr.Button("Refresh", elem_id="lora-refresh", scale=1)
            ui["check"] = gr.Button("Check", elem_id="lora-check", scale=1)
        c["lora_multipliers"] = gr.Textbox(label="Multipliers, one per selected LoRA, separated by spaces "
                                                 "(1.0 · per-step schedule 1,0.5 · Wan 2.2 experts high;low 1;0)",
                                           elem_id="lora-multipliers")
        ui["table"] = gr.Markdown("", elem_id="lora-table")
        with gr.Row():
            ui["preset"] = gr.Dropdown([], label="Preset", allow_custom_value=True, elem_id="preset", scale=3)
            ui["load"] = gr.Button("Load preset", scale=1)
            ui["save"] = gr.Button("Save preset", scale=1)
            ui["delete"] = gr.Button("Delete preset", scale=1)
        ui["status"] = gr.Markdown("", elem_id="lora-status")
    return ui


def preset_names(state: AppState) -> list[str]:
    from wan.lora.library import list_presets
    return list_presets(Path(state.settings.lora_dir))


def listen(state: AppState, c: dict, ui: dict) -> None:
    root = Path(state.settings.lora_dir)

    def refresh(model_id, selected):
        choices, table = lora_rows(state, model_id)
        keep = [s for s in selected or [] if s in {v for _, v in choices}]
        return gr.update(choices=choices, value=keep), table, gr.update(choices=preset_names(state))
    # always_last: a click while a refresh is still running (a loaded server) runs again after it,
    # rather than being dropped (gradio's default for a button), so a file just added shows
    ui["refresh"].click(refresh, [c["model"], c["loras"]], [c["loras"], ui["table"], ui["preset"]],
                        trigger_mode="always_last")
    c["model"].change(refresh, [c["model"], c["loras"]], [c["loras"], ui["table"], ui["preset"]])
    ui["check"].click(lambda m, s: check_selected(state, m, s), [c["model"], c["loras"]], ui["status"])

    def save(name, selected, mults, prompt):
        from wan.lora.library import save_preset
        try:
            path = save_preset(root, name or "", preset_entries(selected, mults), prompt or None)
        except ValueError as e:
            return f"⚠️ {literal(str(e))}", gr.update()
        return f"Saved preset **{literal(path.stem)}**.", gr.update(choices=preset_names(state), value=path.stem)

    def load(name, model_id):
        from wan.lora.library import family_for_model, load_preset
        from wan.registry import get_model
        try:
            preset = load_preset(root, name or "")
            picked = preset_paths(root, [n for n, _ in preset.loras], family_for_model(get_model(model_id)))
        except (ValueError, FileNotFoundError) as e:
            return f"⚠️ {literal(str(e))}", gr.update(), gr.update(), gr.update()
        mults = " ".join(m for _, m in preset.loras)
        prompt = gr.update(value=preset.prompt) if preset.prompt else gr.update()
        return f"Loaded preset **{literal(name)}**.", gr.update(value=picked), mults, prompt

    def delete(name):
        from wan.lora.library import delete_preset
        try:
            delete_preset(root, name or "")
        except (ValueError, FileNotFoundError) as e:
            return f"⚠️ {literal(str(e))}", gr.update()
        return f"Deleted preset **{literal(name)}**.", gr.update(choices=preset_names(state), value=None)
    ui["save"].click(save, [ui["preset"], c["loras"], c["lora_multipliers"], c["prompt"]], [ui["status"], ui["preset"]])
    ui["load"].click(load, [ui["preset"], c["model"]], [ui["status"], c["loras"], c["lora_multipliers"], c["prompt"]])
    ui["delete"].click(delete, ui["preset"], [ui["status"], ui["preset"]])
