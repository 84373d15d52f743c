"""The resnext-hub web demo (a Gradio app, also a Hugging Face Space): ``python -m space.app`` from the repo root."""
