"""The browser demo of a trained run (`python -m src.app`): condition preparation, examples, the Gradio app."""
