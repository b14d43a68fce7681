"""The app shell: header and one tab per module of ``TABS``, linked to each other by their ``TabLinks``.

Adding a tab: write a module following ``fetalstudio.ui.tab`` and add it to ``TABS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

import fetalstudio
from fetalstudio.app_context import AppContext
from fetalstudio.paths import app_file
from fetalstudio.ui import anatomy_tab, analysis_tab, models_tab, review_tab, synthesis_tab
from fetalstudio.ui.common import hide_internal_events, user_errors
from fetalstudio.ui.tab import Receiver, Sender, TabLinks, TabModule, join_page_js

#: The tabs, in the order they are shown.
TABS: list[TabModule] = [synthesis_tab, review_tab, analysis_tab, anatomy_tab, models_tab]

#: System fonts only: the page must render with no request leaving the machine.
THEME = gr.themes.Default(
    primary_hue="teal",
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "Consolas", "monospace"],
)

CSS = "#no-generator-note { border-left: 4px solid #d97706; padding-left: 0.75em; }"


@dataclass
class AppPage:
    """The built page and the page-level script its tabs need (Gradio takes it at launch)."""

    blocks: gr.Blocks
    js: str | None


def build_ui(context: AppContext, tabs: list[TabModule] | None = None) -> AppPage:
    tab_modules = TABS if tabs is None else tabs
    _check_ids(tab_modules)
    with gr.Blocks(title="FetalStudio", analytics_enabled=False) as blocks:
        gr.Markdown(
            f"# FetalStudio <small>{fetalstudio.__version__}</small>\n"
            "Synthesis and annotation of fetal ultrasound images. Research use only — not for diagnosis."
        )
        links: dict[str, TabLinks] = {}
        with gr.Tabs() as tab_strip:
            for tab in tab_modules:
                with gr.Tab(tab.TITLE, id=tab.ID) as page:
                    components = tab.build(context)
                links[tab.ID] = tab.wire(context, components)
                for handler in links[tab.ID].on_show:
                    page.select(**handler.listener())
        for tab_links in links.values():
            for sender in tab_links.senders:
                _connect(sender, _receiver_of(links, sender.target), tab_strip)
            for handler in tab_links.on_page_load:
                blocks.load(**handler.listener())
    hide_internal_events(blocks)
    return AppPage(blocks, join_page_js([tab_links.page_js for tab_links in links.values()]))


def _check_ids(tab_modules: list[TabModule]) -> None:
    ids = [tab.ID for tab in tab_modules]
    if len(set(ids)) != len(ids):
        raise ValueError(f"Two tabs share an ID: {ids}")


def _receiver_of(links: dict[str, TabLinks], target: str) -> Receiver:
    receiver = links[target].receiver if target in links else None
    if receiver is None:
        raise ValueError(f"A tab sends to {target!r}, which is not a tab that receives images ({sorted(links)}).")
    return receiver


def _connect(sender: Sender, receiver: Receiver, tab_strip: gr.Tabs) -> None:
    """Button -> image path (kept on the server, only files of the app's own folders) -> the target tab
    shown, the image loaded there, then the target's follow-up (if any)."""

    def pick(*values) -> str:
        return str(app_file(sender.pick(*values)))

    def show_target() -> gr.Tabs:
        return gr.Tabs(selected=sender.target)

    loaded = (sender.button.click(user_errors(pick), sender.inputs, receiver.path)
              .success(show_target, None, tab_strip)
              .then(receiver.load, receiver.path, receiver.outputs))
    if receiver.follow_up is not None:
        loaded.success(**receiver.follow_up.listener())
