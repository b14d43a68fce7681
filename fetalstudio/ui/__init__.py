"""Thin Gradio shell: one module per tab, every action a call into the fetalstudio library."""
