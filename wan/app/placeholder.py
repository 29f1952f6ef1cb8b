"""A first page for the studio while the full UI is being built: it shows the model registry and
where checkpoints go. It is served by the same Gradio server the full app will use."""

from __future__ import annotations


def build():
    import gradio as gr
    from wan.registry import list_models

    rows = [[s.id, s.display_name, ", ".join(s.tasks), "test model" if s.test_model else f"Wan {s.version}"]
            for s in list_models(include_test=True)]
    with gr.Blocks(title="Wan Studio", analytics_enabled=False) as demo:
        gr.Markdown("# Wan Studio\nThe generation UI arrives with the web app milestone. "
                    "Models known to this install are listed below; `python wgp.py download MODEL` fetches one "
                    "into `checkpoints/`.")
        gr.Dataframe(value=rows, headers=["id", "name", "tasks", "version"], interactive=False)
    return demo


def serve(host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    demo = build()
    demo.queue().launch(server_name=host, server_port=port, share=share)
