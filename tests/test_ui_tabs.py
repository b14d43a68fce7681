"""The tab protocol (fetalstudio.ui.tab): the shell loops over tab modules and links them by their TabLinks;
a fifth tab is one module and one line in the list. Browser behaviour is in tests/test_browser_*.py."""

from __future__ import annotations

import types
from pathlib import Path

import gradio as gr
import pytest

from fetalstudio.app_context import build_context
from fetalstudio.review.pairs import import_pairs
from fetalstudio.review.store import ReviewSession
from fetalstudio.errors import FetalStudioError
from fetalstudio.ui import analysis_tab, anatomy_tab, review_tab, synthesis_tab
from fetalstudio.ui.shell import TABS, build_ui, join_page_js
from fetalstudio.ui.tab import Sender, TabLinks

try:
    from tests.data_support import needs_data, pairs_rows, write_pairs_csv
except ImportError:  # run as plain `pytest`
    from data_support import needs_data, pairs_rows, write_pairs_csv

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"


@pytest.fixture
def context(tmp_path):
    return build_context(device="cpu", checkpoints=CHECKPOINTS, outputs=tmp_path / "outputs")


def _toy_tab(target: str = "analysis", tab_id: str = "toy") -> types.ModuleType:
    """A fifth tab as issue 14 adds one: a module with TITLE, ID, build and wire, sending an image to ``target``."""
    module = types.ModuleType("toy_tab")
    module.TITLE, module.ID = "Toy", tab_id

    def build(context):
        return types.SimpleNamespace(path=gr.Textbox(elem_id="toy-path"), send=gr.Button("Send", elem_id="toy-send"))

    def wire(context, components):
        return TabLinks(senders=[Sender(target, components.send, lambda path: path, [components.path])])

    module.build, module.wire = build, wire
    return module


def test_every_tab_module_follows_the_protocol_and_the_shell_joins_their_page_scripts(context):
    assert [tab.ID for tab in TABS] == ["synthesis", "review", "analysis", "anatomy", "models"]
    for tab in TABS:
        assert isinstance(tab.TITLE, str) and callable(tab.build) and callable(tab.wire)
    page = build_ui(context)
    labels = [block.label for block in page.blocks.blocks.values() if isinstance(block, gr.Tab) and block.id in {t.ID for t in TABS}]
    assert labels == ["Synthesis", "Mask review", "Analysis", "Anatomy editor", "Models"]
    from fetalstudio.ui import anatomy_tab

    # the two tabs with a page script (review's shortcuts, the editor's session cookie), joined in tab order
    assert page.js == join_page_js([review_tab.SHORTCUTS_JS, anatomy_tab.PAGE_JS])
    assert all(fn.queue and fn.api_visibility == "private" for fn in page.blocks.fns.values())  # hide_internal_events ran
    joined = join_page_js(["() => { a(); }", "", "() => { b(); }"])
    assert joined == "() => {\n(() => { a(); })();\n(() => { b(); })();\n}"


def test_a_fifth_tab_is_one_module_whose_sender_reaches_the_analysis_tab(context):
    page = build_ui(context, [*TABS, _toy_tab()])
    toy_tab = next(block for block in page.blocks.blocks.values() if isinstance(block, gr.Tab) and block.id == "toy")
    assert toy_tab.label == "Toy"
    send = next(block for block in page.blocks.blocks.values() if getattr(block, "elem_id", None) == "toy-send")
    (pick,) = [fn for fn in page.blocks.fns.values() if any(target_id == send._id for target_id, _ in fn.targets)]
    assert pick.name == "pick" and [type(block) for block in pick.outputs] == [gr.State]  # the path stays on the server
    receive = [fn for fn in page.blocks.fns.values() if fn.name == "receive"]
    # one chain from each sender (Synthesis, Mask review, Anatomy editor, the toy tab), all into Analysis' one path state
    assert len(receive) == 4 and all(fn.inputs == pick.outputs for fn in receive)


def test_a_sender_to_a_tab_that_receives_nothing_and_two_tabs_with_one_id_are_refused(context):
    with pytest.raises(ValueError, match="'models', which is not a tab that receives images"):
        build_ui(context, [analysis_tab, review_tab, anatomy_tab, _toy_tab(target="models"), TABS[-1]])
    with pytest.raises(ValueError, match="Two tabs share an ID"):
        build_ui(context, [analysis_tab, _toy_tab(tab_id="analysis")])


@needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_asking_the_segmenter_opens_the_review_session_once_per_click(context, tmp_path, monkeypatch):
    rows = pairs_rows("hc18_heads")[:1]
    session = ReviewSession.create(context.outputs_dir / review_tab.SESSIONS_FOLDER / "heads")
    (item,) = import_pairs(session, write_pairs_csv(tmp_path / "pairs.csv", rows, columns=("image", "mask")))
    page = build_ui(context, [review_tab, analysis_tab, anatomy_tab])  # both send to the Anatomy editor
    (on_segment,) = [fn for fn in page.blocks.fns.values() if fn.name == "on_segment"]

    original_open = ReviewSession.open.__func__
    opened: list[Path] = []

    def counting_open(cls, folder, recover=True):
        opened.append(Path(folder))
        return original_open(cls, folder, recover)

    monkeypatch.setattr(ReviewSession, "open", classmethod(counting_open))
    for click in (1, 2):
        shown = on_segment.fn(review_tab.View(str(session.folder), item.id), 0.4, True, True)
        assert len(opened) == click  # the handler's session is the one the re-render reads
        banner = next(value for component, value in shown.items() if getattr(component, "elem_id", None) == "review-banner")
        assert f"segmenter mask of {item.id}" in banner
    assert session.get(item.id).how == "segmenter"


SEND_TO_ANATOMY = {"synthesis": "synthesis-send-anatomy", "review": "review-send-anatomy", "analysis": "analysis-send-anatomy"}


def _anatomy_sender(context, tab) -> Sender:
    """The tab's one sender to the Anatomy editor, from its own build and wire (no page, no browser)."""
    with gr.Blocks():
        links = tab.wire(context, tab.build(context))
    (sender,) = [sender for sender in links.senders if sender.target == anatomy_tab.ID]
    assert sender.button.elem_id == SEND_TO_ANATOMY[tab.ID]
    return sender


def test_synthesis_review_and_analysis_each_have_a_button_whose_image_goes_to_the_anatomy_editor(context):
    page = build_ui(context)
    blocks = page.blocks.blocks.values()
    received = [fn for fn in page.blocks.fns.values() if fn.name == "on_received"]  # the editor's receiver, once per chain
    assert len(received) == len(SEND_TO_ANATOMY)
    for elem_id in SEND_TO_ANATOMY.values():
        (button,) = [block for block in blocks if getattr(block, "elem_id", None) == elem_id]
        assert isinstance(button, gr.Button) and "Anatomy editor" in button.value
        (pick,) = [fn for fn in page.blocks.fns.values() if any(target_id == button._id for target_id, _ in fn.targets)]
        assert pick.name == "pick" and [type(block) for block in pick.outputs] == [gr.State]  # the path stays on the server
        assert all(fn.inputs == pick.outputs for fn in received)  # the editor's one path state


def test_the_synthesis_sender_picks_the_selected_gallery_image_or_says_to_generate_one(context):
    sender = _anatomy_sender(context, synthesis_tab)
    images = [("/outputs/a.png", None), ("/outputs/b.png", None)]
    assert sender.pick(images, 1) == "/outputs/b.png"
    assert sender.pick(images, None) == "/outputs/a.png"  # nothing selected: the first
    with pytest.raises(FetalStudioError, match="Generate an image first, then select it in the gallery and send it to the Anatomy editor"):
        sender.pick([], 0)


def test_the_review_sender_picks_the_shown_item_or_says_to_open_a_session(context, tmp_path):
    sender = _anatomy_sender(context, review_tab)
    with pytest.raises(FetalStudioError, match="Open a session and show an item first, then send it to the Anatomy editor"):
        sender.pick(review_tab.View())


@needs_data
def test_the_review_sender_picks_the_image_of_the_item_on_screen(context, tmp_path):
    session = ReviewSession.create(context.outputs_dir / review_tab.SESSIONS_FOLDER / "heads")
    (item,) = import_pairs(session, write_pairs_csv(tmp_path / "pairs.csv", pairs_rows("hc18_heads")[:1], columns=("image", "mask")))
    picked = Path(_anatomy_sender(context, review_tab).pick(review_tab.View(str(session.folder), item.id)))
    assert picked == session.image_path(session.get(item.id)) and picked.is_file()


def test_the_analysis_sender_picks_the_analysed_file_or_frame_or_says_to_load_one(context, tmp_path):
    import numpy as np

    from fetalstudio.imaging.image_input import load_image

    try:
        from tests.dicom_support import write_ultrasound_dicom
    except ImportError:  # run as plain `pytest`
        from dicom_support import write_ultrasound_dicom

    sender = _anatomy_sender(context, analysis_tab)
    with pytest.raises(FetalStudioError, match="Load an image first .*then send it to the Anatomy editor"):
        sender.pick(None)
    assert sender.pick(analysis_tab.AnalysedImage(str(tmp_path / "scan.png"))) == str(tmp_path / "scan.png")
    cine = np.stack([np.full((24, 32), 40 * k, np.uint8) for k in range(3)])
    dicom = write_ultrasound_dicom(tmp_path / "cine.dcm", cine)
    frame = Path(sender.pick(analysis_tab.AnalysedImage(str(dicom), frame=2, frame_count=3)))
    assert frame.suffix == ".png" and frame.is_relative_to(context.outputs_dir / analysis_tab.ANALYSIS_FOLDER)
    np.testing.assert_array_equal(load_image(frame).gray, cine[2])  # the analysed frame, not the file's first
