"""Models panel: what is known, what is loaded and where, memory used; load/unload/refresh.

The panel reads the manager's state again whenever it is shown: the other tabs load models
through the same manager, and the panel must not show what was true when the page was built.
A failed action (a hub model on an offline machine, a pinned model) is reported once, in the
panel's message line, and leaves every widget working.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.ui.common import GPU_QUEUE
from fetalstudio.ui.tab import Handler, TabLinks

COLUMNS = ["id", "kind", "format", "loaded", "device", "size MB", "source", "licence", "notes"]
#: Without widths the browser sizes columns by their content: the mostly empty loaded/device/size
#: columns shrank to one character and their headers wrapped letter by letter.
COLUMN_WIDTHS = ["230px", "110px", "170px", "75px", "135px", "80px", "260px", "220px", "320px"]


def _table(context: AppContext) -> list[list]:
    return [[r.id, r.kind, r.format, "yes" if r.loaded else "", r.device, r.size_mb or "", r.source, r.licence, r.notes]
            for r in context.manager.status()]


TITLE = "Models"
ID = "models"


@dataclass
class ModelsComponents:
    summary: gr.Markdown
    message: gr.Markdown
    table: gr.Dataframe
    choice: gr.Dropdown
    load: gr.Button
    unload: gr.Button
    refresh: gr.Button


def build(context: AppContext) -> ModelsComponents:
    manager = context.manager
    summary = gr.Markdown(manager.describe(), elem_id="models-summary")
    message = gr.Markdown("", elem_id="models-message")
    table = gr.Dataframe(_table(context), headers=COLUMNS, interactive=False, wrap=True, column_widths=COLUMN_WIDTHS,
                         elem_id="models-table")
    with gr.Row():
        choice = gr.Dropdown(manager.ids(), label="Model", allow_custom_value=True, elem_id="models-choice",
                             info="A model id, or a path to a checkpoint file or folder")
        load = gr.Button("Load", elem_id="models-load")
        unload = gr.Button("Unload", elem_id="models-unload")
        refresh = gr.Button("Refresh (rescan checkpoints/)", elem_id="models-refresh")
    gr.Markdown(
        f"Models live in `{manager.checkpoints_dir}` (listed in `manifest.toml` or just dropped there) and in the "
        "folders named by `$FETALSTUDIO_MODELS`. Nothing is downloaded unless a manifest entry names a Hugging Face "
        "repository and the machine is online."
    )
    return ModelsComponents(summary, message, table, choice, load, unload, refresh)


def wire(context: AppContext, c: ModelsComponents) -> TabLinks:
    """Load/Unload/Refresh report in the message line; opening the tab shows the manager's current state."""
    manager = context.manager

    def current() -> dict:
        return {c.summary: manager.describe(), c.table: _table(context), c.choice: gr.update(choices=manager.ids())}

    def reported(action: Callable[[str], str], model_id: str | None) -> dict:
        """The action's outcome in the message line, then the panel's state: a library error is a
        message here, not an exception (which Gradio would also paint over every output as "Error")."""
        try:
            text = action((model_id or "").strip())
        except FetalStudioError as error:
            text = f"⚠ {error}"
        return {c.message: text, **current()}

    def loaded(model_id: str) -> str:
        if not model_id:
            raise FetalStudioError("Choose a model id in the list (or type a path to a checkpoint), then press Load.")
        manager.get(model_id)
        return f"✔ Loaded `{model_id}`."

    def unloaded(model_id: str) -> str:
        if not model_id:
            raise FetalStudioError("Choose a loaded model in the list, then press Unload.")
        return f"✔ Unloaded `{model_id}`." if manager.unload(model_id) else f"`{model_id}` was not loaded."

    def rescanned(_: str) -> str:
        manager.refresh()
        return f"✔ Rescanned: {len(manager.ids())} models known."

    def do_load(model_id: str | None, progress=gr.Progress(track_tqdm=True)) -> dict:
        return reported(loaded, model_id)

    def do_unload(model_id: str | None) -> dict:
        return reported(unloaded, model_id)

    def do_refresh() -> dict:
        return reported(rescanned, None)

    outputs = [c.message, c.summary, c.table, c.choice]
    c.load.click(do_load, c.choice, outputs, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    c.unload.click(do_unload, c.choice, outputs)
    c.refresh.click(do_refresh, None, outputs)
    return TabLinks(on_show=[Handler(current, [], [c.summary, c.table, c.choice])])
