"""The tab protocol: every tab module looks the same to ``shell.py``, which loops over them.

A tab module exposes

- ``TITLE`` (the tab's label) and ``ID`` (its ``gr.Tab`` id, the name other tabs send to);
- ``build(context) -> Components``: creates the tab's components (inside the shell's ``gr.Tab``) and
  returns them as a dataclass; no events;
- ``wire(context, components) -> TabLinks``: defines the handlers and connects the tab's own events.
  Handlers return dicts keyed by component (``{status: "...", gallery: paths}``); a component left
  out of the dict keeps its value.

``TabLinks`` is what the shell connects across tabs and to the page: each ``Sender`` to the
``Receiver`` of its target tab, page-load handlers, handlers run when the tab is shown, page JS.
Adding a tab is one new module and one line in ``shell.TABS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.ui.common import GPU_QUEUE


@dataclass
class Handler:
    """A handler with the components it reads and writes; ``gpu`` runs it on the GPU queue (one model job at a time)."""

    fn: Callable
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)
    gpu: bool = False

    def listener(self) -> dict[str, Any]:
        """Keyword arguments of a Gradio event listener (``button.click(**handler.listener())``)."""
        queue = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1) if self.gpu else {}
        return dict(fn=self.fn, inputs=self.inputs, outputs=self.outputs, **queue)


@dataclass
class Sender:
    """A button that sends an image to the tab ``target`` (its ID): ``pick(*inputs)`` returns the image's path.

    The shell checks the path with ``paths.app_file`` (only files of the app's own folders) and keeps it
    on the server: no event takes a path from the browser.
    """

    target: str
    button: gr.Button
    pick: Callable[..., str | Path]
    inputs: list


@dataclass
class Receiver:
    """How a tab takes an image sent to it: the shell puts the checked path in ``path`` (a server-side
    gr.State), runs ``load(path, request)`` into ``outputs``, and then, if the load succeeded, ``follow_up``
    (e.g. Analysis encodes and classifies the image on the GPU queue)."""

    path: gr.State
    load: Callable
    outputs: list
    follow_up: Handler | None = None


@dataclass
class TabLinks:
    """What a tab links to the page and to other tabs; the same for every tab, each part optional."""

    senders: list[Sender] = field(default_factory=list)
    receiver: Receiver | None = None
    on_page_load: list[Handler] = field(default_factory=list)  # e.g. Mask review reopens the last session
    on_show: list[Handler] = field(default_factory=list)  # run when the tab is selected (Models re-reads its table)
    page_js: str = ""  # page-level script, run once when the page loads (Mask review's keyboard shortcuts)


class TabModule(Protocol):
    """What ``shell.TABS`` lists: a module with these names."""

    TITLE: str
    ID: str

    def build(self, context: AppContext) -> Any: ...

    def wire(self, context: AppContext, components: Any) -> TabLinks: ...


def join_page_js(scripts: list[str]) -> str | None:
    """One page-load script from the tabs' scripts (each an arrow function), run in tab order."""
    scripts = [script for script in scripts if script.strip()]
    if len(scripts) <= 1:
        return scripts[0] if scripts else None
    return "() => {\n" + "\n".join(f"({script.strip()})();" for script in scripts) + "\n}"
