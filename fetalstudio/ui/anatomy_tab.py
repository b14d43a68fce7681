"""Anatomy editor tab: open a scan (example or upload), edit its layout (mouse, table, presets, undo/redo),
regenerate the edited region with FetalFlex and show before | after | difference.

A thin shell over ``fetalstudio.anatomy``: the document is an ``EditorState`` saved after every change in
an ``EditorSession`` keyed by the browser (a random id in a cookie, ``SESSION_COOKIE``), so two browsers
never share a layout, a reload reopens the document with its undo history, and a refused input leaves
the saved document as it was.
"""

from __future__ import annotations

import re

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator
from PIL import Image

from fetalstudio.anatomy import editor
from fetalstudio.anatomy.editor_boxes import (TABLE_COLUMNS, annotator_labels, annotator_value, apply_annotator_value,
                                              apply_table, table_rows)
from fetalstudio.anatomy.editor_store import EditorSession
from fetalstudio.anatomy.examples import list_examples
from fetalstudio.anatomy.flex import STAGES, FlexOptions, flex_settings, run_flex
from fetalstudio.anatomy.flex_cli import detect_layout
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.anatomy.project import write_project
from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import atomic_write_bytes, png_bytes
from fetalstudio.imaging.image_input import load_image, supported_suffixes
from fetalstudio.paths import app_file
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, user_errors
from fetalstudio.ui.tab import Handler, Receiver, TabLinks
from fetalstudio.vocabulary import ANATOMY_PLANES, FACIAL_SAGITTAL

TITLE = "Anatomy editor"
ID = "anatomy"

NO_DOCUMENT = "No image open: pick an example or upload a scan."
#: The difference view: pixels changed by more than this (of 255) are tinted red.
CHANGED_LEVEL = 8


@dataclass
class AnatomyComponents:
    example: gr.Dropdown
    open_example: gr.Button
    upload: gr.File
    plane: gr.Dropdown
    detect: gr.Button
    annotator: image_annotator
    table: gr.Dataframe
    apply_table: gr.Button
    undo: gr.Button
    redo: gr.Button
    preset: gr.Dropdown
    preset_meaning: gr.Markdown
    apply_preset: gr.Button
    margin: gr.Slider
    steps: gr.Slider
    seed: gr.Number
    stage: gr.Radio
    generate: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    before: gr.Image
    after: gr.Image
    difference: gr.Image
    inbox_path: gr.State

    @property
    def document(self) -> list:
        """What showing the document sets."""
        return [self.annotator, self.table, self.status, self.margin]


def build(context: AppContext) -> AnatomyComponents:
    presets = load_presets().presets
    gr.Markdown("Edit a scan's anatomy (boxes of its structures), then regenerate the edited region. "
                "Research use only — not for diagnosis.")
    with gr.Row():
        with gr.Column(scale=1):
            titles = [e.title for e in list_examples()]
            example = gr.Dropdown(titles, value=titles[0] if titles else None, label="Example",
                                  elem_id="anatomy-example")
            open_example = gr.Button("Open example", elem_id="anatomy-open-example")
            upload = gr.File(label=f"…or upload an image ({', '.join(supported_suffixes())})", type="filepath",
                             file_types=list(supported_suffixes()), elem_id="anatomy-upload", height=110)
            plane = gr.Dropdown(list(ANATOMY_PLANES), value=FACIAL_SAGITTAL, label="Plane (uploads)",
                                elem_id="anatomy-plane")
            detect = gr.Button("Detect structures", elem_id="anatomy-detect")
            preset = gr.Dropdown([(p.title, p.name) for p in presets.values()], value=None, label="Preset",
                                 elem_id="anatomy-preset")
            preset_meaning = gr.Markdown("", elem_id="anatomy-preset-meaning")
            apply_preset = gr.Button("Apply preset", elem_id="anatomy-apply-preset")
            margin = gr.Slider(0, 64, value=editor.DEFAULT_MARGIN_PX, step=1, label="ROI margin (pixels)",
                               elem_id="anatomy-margin")
        with gr.Column(scale=3):
            labels, colors = annotator_labels(FACIAL_SAGITTAL)
            annotator = image_annotator(label="Layout — move, resize, draw or delete boxes", label_list=labels,
                                        label_colors=colors, sources=[], image_type="filepath",
                                        show_clear_button=False, elem_id="anatomy-annotator", height=460)
            with gr.Row():
                undo = gr.Button("Undo", elem_id="anatomy-undo")
                redo = gr.Button("Redo", elem_id="anatomy-redo")
            status = gr.Markdown(NO_DOCUMENT, elem_id="anatomy-status")
            table = gr.Dataframe(headers=list(TABLE_COLUMNS), datatype=["str"] + ["number"] * 5, column_count=(6, "fixed"),
                                 interactive=True, label="Boxes (pixels, degrees)", elem_id="anatomy-table")
            apply_table_button = gr.Button("Apply table", elem_id="anatomy-apply-table")
    with gr.Row():
        steps = gr.Slider(1, 50, value=20, step=1, label="Steps", elem_id="anatomy-steps")
        seed = gr.Number(0, precision=0, label="Seed", elem_id="anatomy-seed")
        stage = gr.Radio(list(STAGES), value="ssa+osm", label="Stages", elem_id="anatomy-stage")
        generate = gr.Button("Generate", variant="primary", elem_id="anatomy-generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id="anatomy-cancel")
    with gr.Row():
        before = gr.Image(label="Before", type="filepath", interactive=False, elem_id="anatomy-before")
        after = gr.Image(label="After", type="filepath", interactive=False, elem_id="anatomy-after")
        difference = gr.Image(label="Difference (changed pixels in red)", type="filepath", interactive=False,
                              elem_id="anatomy-difference")
    inbox_path = gr.State(None)  # an image sent from another tab (a checked server path)
    return AnatomyComponents(example, open_example, upload, plane, detect, annotator, table, apply_table_button, undo,
                             redo, preset, preset_meaning, apply_preset, margin, steps, seed, stage, generate, cancel,
                             status, before, after, difference, inbox_path)


#: The editor's document is kept per browser: a random id in this cookie (set once by SESSION_COOKIE_JS,
#: sent with every event, kept across reloads); two browsers never share one. Without it (the very first
#: event of a first visit, cookies off) Gradio's per-page session hash is used.
SESSION_COOKIE = "fetalstudio_anatomy_session"
SESSION_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{8,80}")
SESSION_COOKIE_JS = (
    "() => { if (!document.cookie.split('; ').some(c => c.startsWith('" + SESSION_COOKIE + "='))) {"
    " const id = (window.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2) + Date.now());"
    " document.cookie = '" + SESSION_COOKIE + "=' + id.replace(/[^A-Za-z0-9_-]/g, '') + '; path=/; max-age=31536000; SameSite=Strict'; } }"
)


def editor_session_id(request: gr.Request | None) -> str:
    """The browser's editor id (its cookie, when well formed), else the page's session hash."""
    cookies = getattr(request, "cookies", None) if request is not None else None
    cookie = cookies.get(SESSION_COOKIE) if cookies is not None else None
    if isinstance(cookie, str) and SESSION_ID_PATTERN.fullmatch(cookie):
        return cookie
    return getattr(request, "session_hash", None) or "default"


def difference_picture(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The result in gray with the pixels that changed by more than :data:`CHANGED_LEVEL` tinted red (RGB)."""
    changed = np.abs(before.astype(np.int16) - after.astype(np.int16)) > CHANGED_LEVEL
    picture = np.repeat(after[..., None], 3, axis=2)
    picture[changed] = (picture[changed] // 2 + np.array([127, 0, 0], np.uint8))
    return picture


def _write_png(path: Path, pixels: np.ndarray, what: str) -> str:
    """Write gray or RGB ``pixels`` (png_bytes encodes OpenCV's BGR order, so RGB is swapped first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(pixels[..., ::-1].copy() if pixels.ndim == 3 else pixels, what))
    return str(path)


def wire(context: AppContext, c: AnatomyComponents) -> TabLinks:
    manager = context.manager
    presets = load_presets().presets
    examples = {example.title: example for example in list_examples()}
    views = Path(context.outputs_dir) / "anatomy" / "view"
    cancel_flags = CancelFlags()

    def session_of(request: gr.Request | None) -> EditorSession:
        return EditorSession.open(editor_session_id(request), Path(context.outputs_dir) / "anatomy" / "sessions")

    @user_errors
    def on_show(request: gr.Request) -> dict:
        """The browser's document when the tab is opened (after a reload too). Not on page load: the annotator
        must be on screen to take a value, or it echoes the box colours back in a form it cannot read."""
        state = session_of(request).load().state
        if state is None:
            return {component: gr.skip() for component in c.document}
        return shown(state, "Restored your last document (with its undo history).")

    def current(request: gr.Request | None) -> tuple[EditorSession, editor.EditorState]:
        session = session_of(request)
        state = session.load().state
        if state is None:
            raise FetalStudioError(NO_DOCUMENT)
        return session, state

    def view_of(state: editor.EditorState) -> str:
        """The source as a PNG under outputs (the only folder the page may read), named by its pixels."""
        path = views / f"{state.image.sha256[:16]}.png"
        if not path.is_file():
            _write_png(path, load_image(state.image.path).gray, "the editor's view of the image")
        return str(path)

    def shown(state: editor.EditorState, note: str, with_annotator: bool = True) -> dict:
        history = state.history
        line = (f"**{Path(state.image.path).name}** · {state.plane} · {len(state.layout.boxes)} boxes · "
                f"step {history.position} of {len(history.steps) - 1}: {history.steps[history.position].action}")
        result = {c.table: table_rows(state.layout), c.status: f"{note}\n\n{line}" if note else line,
                  c.margin: state.roi.margin_px}
        if with_annotator:
            labels, colors = annotator_labels(state.plane)
            result[c.annotator] = gr.update(value=annotator_value(state, view_of(state)), label_list=labels,
                                            label_colors=colors)
        return result

    def saved(session: EditorSession, state: editor.EditorState, note: str, with_annotator: bool = True) -> dict:
        session.save(state)
        return shown(state, note, with_annotator)

    def change(transition, note: str, with_annotator: bool = True, takes_value: bool = True):
        """A handler applying ``transition(state[, value])``; a refusal is a warning and the state is kept."""
        def apply(value, request: gr.Request | None) -> dict:
            session, state = current(request)
            try:
                changed = transition(state, value) if takes_value else transition(state)
            except FetalStudioError as error:
                gr.Warning(str(error))
                return shown(state, f"⚠ {error}")
            if changed is state:  # nothing changed (e.g. the annotator echoing the value it was given): no save, no note
                return {component: gr.skip() for component in c.document}
            return saved(session, changed, note, with_annotator)

        def with_value(value, request: gr.Request) -> dict:
            return apply(value, request)

        def without_value(request: gr.Request) -> dict:
            return apply(None, request)
        return user_errors(with_value if takes_value else without_value)

    @user_errors
    def on_open_example(title: str | None, request: gr.Request) -> dict:
        if not title or title not in examples:
            raise FetalStudioError("Pick an example in the list first.")
        example = examples[title]
        state = editor.open_image(load_image(example.image), example.plane, example.layout(), "file")
        return saved(session_of(request), state, f"Opened the example {title}.")

    @user_errors
    def on_upload(path: str | None, plane: str, request: gr.Request) -> dict:
        if not path:
            raise FetalStudioError("Choose an image file to open.")
        state = editor.open_image(load_image(app_file(path)), plane)
        return saved(session_of(request), state, "Opened with no boxes: detect structures, or draw them.")

    @user_errors
    def on_received(path: str | None, request: gr.Request) -> dict:
        if not path:
            raise FetalStudioError("Nothing was sent: pick an image in the other tab first.")
        state = editor.open_image(load_image(app_file(path)), FACIAL_SAGITTAL)
        return saved(session_of(request), state, "Opened the image sent from another tab, with no boxes: detect "
                                                 "structures, or draw them.")

    @user_errors
    def on_detect(request: gr.Request) -> dict:
        session, state = current(request)
        image = load_image(state.image.path)
        layout = detect_layout(manager, image)
        layout = editor.layout_from_detections(state.plane, state.image.size, layout.boxes, state.image.pixel_size_mm,
                                               layout.source)
        changed = editor.set_boxes(state, layout.boxes, "detected structures")
        return saved(session, changed, f"The detector found {len(layout.boxes)} structures.")

    def on_preset_chosen(name: str | None) -> str:
        preset = presets.get(name or "")
        return f"**{preset.title}** ({preset.marker}): {preset.clinical_meaning}" if preset else ""

    def with_preset(state: editor.EditorState, name: str | None) -> editor.EditorState:
        if not name or name not in presets:
            raise FetalStudioError("Pick a preset in the list first.")
        return editor.apply_preset(state, presets[name])

    @user_errors
    def on_generate(steps: float, seed: float, stage: str, request: gr.Request, progress=gr.Progress()) -> dict:
        session, state = current(request)
        roi = editor.roi_mask(state)
        flag = cancel_flags.fresh(request)
        progress((0, int(steps)), desc="Loading models…")
        source = Image.fromarray(load_image(state.image.path).gray)
        settings = flex_settings(manager, state.layout, steps=int(steps), seed=int(seed or 0))
        outcome = run_flex(manager, settings, source, state.layout, roi, FlexOptions(stage=stage),
                           lambda done, total, step, steps_: progress((step, steps_), desc="Generating", unit="steps"),
                           flag, before=state.original)
        if outcome.cancelled:
            return {c.status: "Cancelled: nothing was written; the layout is kept."}
        presets_used = [] if state.preset is None else [{"name": state.preset.name, "parameters": state.preset.values()}]
        folder = write_project(outcome, image_path=state.image.path, roi_source=state.roi.mode,
                               edits=[edit.to_dict() for edit in state.history.applied_edits()], presets=presets_used)
        session.save(editor.set_project(state, folder))
        before = np.asarray(outcome.source.convert("L"))
        after = np.asarray(outcome.final.convert("L"))
        return {c.before: str(folder / "source.png"), c.after: str(folder / "result.png"),
                c.difference: _write_png(folder.parent / ".view" / f"{folder.name}-difference.png",
                                         difference_picture(before, after), "the difference picture"),
                c.status: f"Generated with seed {outcome.seed}; saved as the project {folder.name}."}

    def on_cancel(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    document = c.document
    gpu = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
    c.open_example.click(on_open_example, [c.example], document)
    c.upload.upload(on_upload, [c.upload, c.plane], document)
    c.detect.click(on_detect, None, document, **gpu)
    c.annotator.change(change(apply_annotator_value, "Boxes moved with the mouse.", with_annotator=False),
                       [c.annotator], document)
    c.apply_table.click(change(apply_table, "Table applied."), [c.table], document)
    c.undo.click(change(editor.undo, "Undone.", takes_value=False), None, document)
    c.redo.click(change(editor.redo, "Redone.", takes_value=False), None, document)
    c.preset.change(on_preset_chosen, [c.preset], [c.preset_meaning])
    c.apply_preset.click(change(with_preset, "Preset applied."), [c.preset], document)
    c.margin.release(change(editor.set_roi_margin, "ROI margin set."), [c.margin], document)
    c.generate.click(on_generate, [c.steps, c.seed, c.stage], [c.before, c.after, c.difference, c.status], **gpu)
    c.cancel.click(on_cancel, None, None, concurrency_limit=None)
    return TabLinks(receiver=Receiver(c.inbox_path, on_received, document), on_show=[Handler(on_show, [], c.document)],
                    page_js=SESSION_COOKIE_JS)
