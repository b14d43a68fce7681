"""Models panel: what is known, what is loaded and where, memory used; load/unload/refresh."""

from __future__ import annotations

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.ui.common import GPU_QUEUE, user_errors

COLUMNS = ["id", "kind", "format", "loaded", "device", "size MB", "source", "licence", "notes"]


def _table(context: AppContext) -> list[list]:
    return [[r.id, r.kind, r.format, "yes" if r.loaded else "", r.device, r.size_mb or "", r.source, r.licence, r.notes]
            for r in context.manager.status()]


def render(context: AppContext) -> None:
    manager = context.manager
    summary = gr.Markdown(manager.describe(), elem_id="models-summary")
    table = gr.Dataframe(_table(context), headers=COLUMNS, interactive=False, wrap=True, elem_id="models-table")
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

    def current():
        return manager.describe(), _table(context), gr.update(choices=manager.ids())

    @user_errors
    def do_load(model_id: str, progress=gr.Progress(track_tqdm=True)):
        manager.get(model_id)
        return current()

    @user_errors
    def do_unload(model_id: str):
        manager.unload(model_id)
        return current()

    @user_errors
    def do_refresh():
        manager.refresh()
        return current()

    outputs = [summary, table, choice]
    load.click(do_load, choice, outputs, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    unload.click(do_unload, choice, outputs)
    refresh.click(do_refresh, None, outputs)
