"""Thin Gradio shell: one module per tab, every action a call into the fetalstudio library.

Every tab module follows the protocol in ``ui.tab`` (TITLE, ID, build, wire -> TabLinks); ``shell.TABS`` lists them.

Layer 1 (with ``cli``, which it never imports): may import every library layer below it; nothing in
the library imports ``ui``. ``app.py`` only builds and launches it.
"""
