"""The app shell: header and one tab per workflow. Tabs for later workflows are added here."""

from __future__ import annotations

import gradio as gr

import fetalstudio
from fetalstudio.app_context import AppContext
from fetalstudio.ui import analysis_tab, models_tab, review_tab, synthesis_tab
from fetalstudio.paths import app_file
from fetalstudio.ui.common import GPU_QUEUE, SendToAnalysis, hide_internal_events, user_errors

#: System fonts only: the page must render with no request leaving the machine.
THEME = gr.themes.Default(
    primary_hue="teal",
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "Consolas", "monospace"],
)

CSS = "#no-generator-note { border-left: 4px solid #d97706; padding-left: 0.75em; }"
#: Page-level script: the Mask review tab's keyboard shortcuts.
JS = review_tab.SHORTCUTS_JS


def build_ui(context: AppContext) -> gr.Blocks:
    with gr.Blocks(title="FetalStudio", analytics_enabled=False) as blocks:
        gr.Markdown(
            f"# FetalStudio <small>{fetalstudio.__version__}</small>\n"
            "Synthesis and annotation of fetal ultrasound images. Research use only — not for diagnosis."
        )
        with gr.Tabs() as tabs:
            with gr.Tab("Synthesis", id="synthesis"):
                from_synthesis = synthesis_tab.render(context)
            with gr.Tab("Mask review", id="review"):
                review_load, review_inputs, review_outputs, from_review = review_tab.render(context)
            with gr.Tab("Analysis", id="analysis"):
                inbox = analysis_tab.render(context)
            with gr.Tab("Models", id="models") as models_page:
                models_tab.render(context, models_page)
        blocks.load(review_load, review_inputs, review_outputs)
        for sender in (from_synthesis, from_review):
            _wire_send_to_analysis(sender, inbox, tabs)
    hide_internal_events(blocks)
    return blocks


def _wire_send_to_analysis(sender: SendToAnalysis, inbox: analysis_tab.AnalysisInbox, tabs: gr.Tabs) -> None:
    """Button -> image path (kept on the server, only files of the app's own folders) -> the Analysis
    tab shown, the image loaded, then encoded and classified."""
    def show_analysis():
        return gr.Tabs(selected="analysis")

    def pick(*values) -> str:
        return str(app_file(sender.pick(*values)))

    (sender.button.click(user_errors(pick), sender.inputs, inbox.path)
     .success(show_analysis, None, tabs)
     .then(inbox.receive, inbox.path, inbox.outputs)
     .success(inbox.follow_up, inbox.follow_up_inputs, inbox.follow_up_outputs, concurrency_id=GPU_QUEUE, concurrency_limit=1))
