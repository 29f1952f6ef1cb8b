"""The Gradio web app (components with render() and listen(); no model logic)."""
