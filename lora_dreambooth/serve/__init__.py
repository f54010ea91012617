"""Serving trained subjects: the adapter library, a resident pipeline that switches and mixes them, the Gradio app.
Never imports training (a training job started from the app runs the CLI in another process)."""
