"""Mask review tab: generate or import image+mask pairs, review every mask, correct it, export.

Every action goes through ``fetalstudio.review.store`` and is on disk before the page updates;
the per-browser state is only *which* session and item are shown. Reloading the page reopens the
last session at its saved cursor.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError, disk_full_error, is_disk_full
from fetalstudio.imaging.ellipse import Ellipse
from fetalstudio.imaging.extract import fit_label
from fetalstudio.imaging.files import atomic_write_bytes
from fetalstudio.imaging.masks import ADD_COLOUR, REMOVE_COLOUR
from fetalstudio.models.entries import ModelKind
from fetalstudio.pipelines.samplers import SAMPLERS
from fetalstudio.review import corrections, navigation
from fetalstudio.review.export import export_session, zip_export
from fetalstudio.review.pairs import (PAPER_LORA_WEIGHT, PAPER_SAMPLER, PAPER_STEPS, PairRequest, find_pairs, generate_pairs,
                                      import_pairs, next_seed)
from fetalstudio.review.store import ReviewItem, ReviewSession
from fetalstudio.review.view import item_pictures
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, server_source, user_errors
from fetalstudio.ui.tab import Handler, Sender, TabLinks
from fetalstudio.vocabulary import TRIMESTERS

TITLE = "Mask review"
ID = "review"

SESSIONS_FOLDER = "review"
EXPORTS_FOLDER = "review-exports"
LAST_SESSION_FILE = ".last_session"
BUNDLED_LORA = "bundled LoRA of the trimester"
EXPORT_FORMATS = [("images + masks + metadata.csv", "folder"), ("nnU-Net v2", "nnunet"), ("COCO JSON", "coco")]
REVIEWER = "reviewer"
NO_SESSION = "No session open: generate pairs (a session is created) or open one."

#: Keyboard shortcuts of the review view (ignored while typing in a field, and when the tab is hidden), and
#: the ellipse fields' saving: Enter in a number box, or letting go of a slider (mouse or arrow keys), presses
#: "Save ellipse", which saves all five values as they are at that moment. Gradio's own slider events cannot
#: do this: ``release`` also fires when a number box loses focus (Tab), which saved a half-typed ellipse.
SHORTCUTS_JS = """
() => {
  const keys = {a: 'review-accept', r: 'review-reject', n: 'review-next', ArrowRight: 'review-next',
                p: 'review-prev', ArrowLeft: 'review-prev', u: 'review-undo', y: 'review-redo'};
  const sliderKeys = ['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown', 'Home', 'End', 'PageUp', 'PageDown'];
  const saveEllipse = () => setTimeout(() => document.getElementById('review-save-ellipse')?.click(), 0);
  const ellipseField = (target, type) => target && target.tagName === 'INPUT' && target.type === type
                                         && target.closest('#review-ellipse-fields');
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && ellipseField(event.target, 'number')) {
      event.preventDefault();
      saveEllipse();
    }
  });
  document.addEventListener('keyup', (event) => {
    if (sliderKeys.includes(event.key) && ellipseField(event.target, 'range')) saveEllipse();
  });
  document.addEventListener('pointerup', (event) => {
    if (ellipseField(event.target, 'range')) saveEllipse();
  });
  document.addEventListener('keydown', (event) => {
    const target = event.target;
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
    const id = keys[event.key];
    const button = id && document.getElementById(id);
    if (!button || button.offsetParent === null) return;  // the Mask review tab is not shown
    event.preventDefault();
    button.click();
  });
}
"""


@dataclass
class View:
    """What one browser shows: a session folder, an item, a filter. Kept in gr.State."""

    folder: str | None = None
    item: str | None = None
    filter: str = navigation.ALL
    brush_open: bool = False  # the brush editor is loaded only while its tab is shown (one PNG less per click)


def sessions_root(context: AppContext) -> Path:
    return context.outputs_dir / SESSIONS_FOLDER


def session_folder(context: AppContext, name: str) -> Path:
    """A session lives under outputs/review/<name>: names are plain (no paths), so the UI never writes elsewhere."""
    cleaned = (name or "").strip()
    if not cleaned or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", cleaned):
        raise FetalStudioError("A session name must be a plain name (letters, digits, '.', '-' or '_'), e.g. heads-2026-11-25.")
    return sessions_root(context) / cleaned


def session_names(context: AppContext) -> list[str]:
    root = sessions_root(context)
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if (p / "session.json").is_file()]
    return [p.name for p in sorted(folders, key=lambda p: p.stat().st_mtime, reverse=True)]


def remember_session(context: AppContext, folder: Path) -> None:
    root = sessions_root(context)
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(root / LAST_SESSION_FILE, folder.name.encode("utf-8"))
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise disk_full_error(root, f"The session {folder.name} is unchanged; only that it was the last one open was not remembered.") from error


def last_session(context: AppContext) -> str | None:
    path = sessions_root(context) / LAST_SESSION_FILE
    name = path.read_text(encoding="utf-8").strip() if path.is_file() else ""
    if name and (sessions_root(context) / name / "session.json").is_file():
        return name
    names = session_names(context)
    return names[0] if names else None


def default_session_name() -> str:
    return time.strftime("heads-%Y%m%d-%H%M%S")


def _session(view: View) -> ReviewSession:
    """The shown session, opened without the crash clean-up scan (done once when it is opened in the tab)."""
    return ReviewSession.open(view.folder, recover=False)


def _counts_line(session: ReviewSession) -> str:
    counts = session.counts()
    return " · ".join(f"{name} {counts.get(name, 0)}" for name in ("pending", "accepted", "rejected", "edited"))


def _item_line(session: ReviewSession, item: ReviewItem, view: View) -> str:
    position, size = navigation.position_of(session, item.id, view.filter)
    where = f"Item {position} of {size}" if position else f"Item {item.id} (not in the '{view.filter}' filter, {size} are)"
    source = item.source or {}
    details = [f"**{where}** — `{item.id}`, decision **{item.decision}**"]
    if item.decided_at:
        details.append(f"by {item.decided_by} at {item.decided_at}")
    if source.get("origin") == "generated":
        details.append(f"{source.get('trimester')} trimester, seed {source.get('seed')}, {source.get('sampler')} {source.get('steps')} steps, "
                       f"LoRA {source.get('lora')} @ {source.get('lora_weight')}")
    elif source.get("image_file"):
        details.append(f"imported from {Path(source['image_file']).name}")
    if item.ellipse is not None:
        extraction = f"ellipse from {item.how or 'extractor'}" + (f", {fit_label(item.quality)}" if item.quality is not None else "")
    else:
        extraction = f"**no ellipse**: {item.reason}" if item.reason else "no ellipse"

    details.append(extraction)
    biometry = item.biometry or {}
    if biometry.get("hc_px"):
        hc = f"HC {biometry['hc_mm']:.1f} mm" if biometry.get("hc_mm") else f"HC {biometry['hc_px']:.0f} px"
        details.append(hc)
    return " · ".join(details) + f"\n\n{_counts_line(session)} · total {len(session)}"


@dataclass
class ReviewComponents:
    session_name: gr.Dropdown
    open_session: gr.Button
    banner: gr.Markdown
    trimester: gr.Radio
    count: gr.Number
    sampler: gr.Dropdown
    steps: gr.Slider
    seed: gr.Number
    lora: gr.Dropdown
    lora_weight: gr.Slider
    threshold_generate: gr.Slider
    generate: gr.Button
    cancel: gr.Button
    import_source: gr.Textbox
    import_button: gr.Button
    decision_filter: gr.Radio
    item_info: gr.Markdown
    picture: gr.Image
    show_mask: gr.Checkbox
    show_ellipse: gr.Checkbox
    opacity: gr.Slider
    raw_mask: gr.Image
    previous: gr.Button
    accept: gr.Button
    reject: gr.Button
    following: gr.Button
    undo: gr.Button
    redo: gr.Button
    send: gr.Button
    send_anatomy: gr.Button
    ellipse_tab: gr.Tab
    center_x: gr.Slider
    center_y: gr.Slider
    axis_a: gr.Slider
    axis_b: gr.Slider
    angle: gr.Slider
    save_ellipse: gr.Button
    reextract_tab: gr.Tab
    threshold: gr.Slider
    reextract: gr.Button
    brush_tab: gr.Tab
    editor: gr.ImageEditor
    save_brush: gr.Button
    segmenter_tab: gr.Tab
    segment: gr.Button
    export_tab: gr.Tab
    formats: gr.CheckboxGroup
    export: gr.Button
    export_status: gr.Markdown
    export_file: gr.File
    view_state: gr.State

    @property
    def looks(self) -> list:
        """How the item is drawn: every re-render reads these (opacity, mask on, ellipse on)."""
        return [self.opacity, self.show_mask, self.show_ellipse]

    @property
    def ellipse_fields(self) -> list:
        return [self.center_x, self.center_y, self.axis_a, self.axis_b, self.angle]

    @property
    def display(self) -> list:
        """Everything a re-render of the shown item sets."""
        return [self.view_state, self.banner, self.session_name, self.item_info, self.picture, self.raw_mask,
                *self.ellipse_fields, self.threshold, self.editor, self.decision_filter]


def build(context: AppContext) -> ReviewComponents:
    with gr.Row():
        session_name = gr.Dropdown(session_names(context), value=None, allow_custom_value=True, label="Review session",
                                   info="Pick one, or type a new name (created under outputs/review/)", elem_id="review-session", scale=3)
        open_session = gr.Button("Open / create", elem_id="review-open", scale=1)
    banner = gr.Markdown(NO_SESSION, elem_id="review-banner")
    with gr.Accordion("Generate image+mask pairs", open=True, elem_id="review-generate-panel"):
        with gr.Row():
            trimester = gr.Radio([t.value for t in TRIMESTERS], value="second", label="Trimester", elem_id="review-trimester")
            count = gr.Number(4, label="Pairs", precision=0, minimum=1, maximum=1000, elem_id="review-count")
            sampler = gr.Dropdown([(s.label, s.key) for s in SAMPLERS.values()], value=PAPER_SAMPLER, label="Sampler")
            steps = gr.Slider(1, 100, value=PAPER_STEPS, step=1, label="Steps", elem_id="review-steps")
        with gr.Row():
            seed = gr.Number(None, label="Seed (pair i uses seed+i)", precision=0, minimum=0, elem_id="review-seed",
                             info="Filled with the seed after this session's last pair; a pair already in the session is skipped")
            lora = gr.Dropdown([BUNDLED_LORA, *context.manager.ids(ModelKind.LORA)], value=BUNDLED_LORA, allow_custom_value=True,
                               label="Image+mask LoRA", elem_id="review-lora")
            lora_weight = gr.Slider(0, 1.5, value=PAPER_LORA_WEIGHT, step=0.05, label="LoRA weight")
            threshold_generate = gr.Slider(0, 255, value=127, step=1, label="Extractor threshold")
        with gr.Row():
            generate = gr.Button("Generate pairs", variant="primary", elem_id="review-generate")
            cancel = gr.Button("Cancel", variant="stop", elem_id="review-cancel")
        with gr.Row():
            import_source = gr.Textbox(label="Import pairs from a CSV (image, mask columns) or a folder with images/ + masks/",
                                       placeholder="/data/hc18/pairs.csv", elem_id="review-import-path", scale=3)
            import_button = gr.Button("Import", elem_id="review-import", scale=1)

    with gr.Row():
        decision_filter = gr.Radio(list(navigation.FILTERS), value=navigation.ALL, label="Show", elem_id="review-filter")
    item_info = gr.Markdown("", elem_id="review-item-info")
    with gr.Row():
        with gr.Column(scale=3):
            picture = gr.Image(label="Image with mask and ellipse", type="filepath", interactive=False,
                               elem_id="review-picture", height=420)
            with gr.Row():
                show_mask = gr.Checkbox(True, label="Mask")
                show_ellipse = gr.Checkbox(True, label="Ellipse")
                opacity = gr.Slider(0, 1, value=0.4, step=0.05, label="Mask opacity")
        with gr.Column(scale=2):
            raw_mask = gr.Image(label="Raw mask channel", type="filepath", interactive=False,
                                elem_id="review-raw-mask", height=300)
    with gr.Row():
        previous = gr.Button("◀ Previous (p)", elem_id="review-prev")
        accept = gr.Button("Accept (a)", variant="primary", elem_id="review-accept")
        reject = gr.Button("Reject (r)", variant="stop", elem_id="review-reject")
        following = gr.Button("Next (n) ▶", elem_id="review-next")
        undo = gr.Button("Undo (u)", elem_id="review-undo")
        redo = gr.Button("Redo (y)", elem_id="review-redo")
        send = gr.Button("Send to Analysis", elem_id="review-send-analysis")
        send_anatomy = gr.Button("Send to Anatomy editor", elem_id="review-send-anatomy")
    with gr.Tabs():
        with gr.Tab("Ellipse") as ellipse_tab:
            with gr.Row(elem_id="review-ellipse-fields"):
                center_x = gr.Slider(0, 1024, value=0, step=0.5, label="Centre x (px)", elem_id="review-cx")
                center_y = gr.Slider(0, 1024, value=0, step=0.5, label="Centre y (px)", elem_id="review-cy")
                axis_a = gr.Slider(0, 1024, value=0, step=0.5, label="Semi-axis a (px)", elem_id="review-a")
                axis_b = gr.Slider(0, 1024, value=0, step=0.5, label="Semi-axis b (px)", elem_id="review-b")
                angle = gr.Slider(0, 180, value=0, step=0.5, label="Angle (deg)", elem_id="review-angle")
            gr.Markdown("Type the values (Tab moves on), then press **Enter** or **Save ellipse**: all five are saved "
                        "together. Letting go of a slider saves too.")
            save_ellipse = gr.Button("Save ellipse", elem_id="review-save-ellipse")
        with gr.Tab("Re-extract") as reextract_tab:
            threshold = gr.Slider(0, 255, value=127, step=1, label="Threshold on the raw mask channel", elem_id="review-threshold")
            reextract = gr.Button("Re-extract with this threshold", elem_id="review-reextract")
        with gr.Tab("Brush") as brush_tab:
            gr.Markdown("Paint **red** to add to the mask, **blue** to cut it away (the eraser takes back strokes); then save.")
            editor = gr.ImageEditor(type="filepath", format="png", image_mode="RGBA", sources=(), layers=False, label="Paint the mask",
                                    brush=gr.Brush(colors=[ADD_COLOUR, REMOVE_COLOUR], default_color=ADD_COLOUR, default_size=12, color_mode="fixed"),
                                    eraser=gr.Eraser(default_size=16), elem_id="review-editor", height=420)
            save_brush = gr.Button("Save painted mask", elem_id="review-save-brush")
        with gr.Tab("Segmenter") as segmenter_tab:
            gr.Markdown("The default segmenter predicts a new mask from a box around the current ellipse (or mask).")
            segment = gr.Button("Ask the segmenter", elem_id="review-segment")
        with gr.Tab("Export") as export_tab:
            formats = gr.CheckboxGroup(EXPORT_FORMATS, value=["folder"], label="Formats", elem_id="review-formats")
            export = gr.Button("Export accepted and edited pairs", elem_id="review-export")
            export_status = gr.Markdown("", elem_id="review-export-status")
            export_file = gr.File(label="Download (zip)", elem_id="review-export-file")
    view_state = gr.State(View())
    return ReviewComponents(
        session_name, open_session, banner, trimester, count, sampler, steps, seed, lora, lora_weight, threshold_generate,
        generate, cancel, import_source, import_button, decision_filter, item_info, picture, show_mask, show_ellipse, opacity,
        raw_mask, previous, accept, reject, following, undo, redo, send, send_anatomy, ellipse_tab, center_x, center_y, axis_a, axis_b, angle,
        save_ellipse, reextract_tab, threshold, reextract, brush_tab, editor, save_brush, segmenter_tab, segment, export_tab,
        formats, export, export_status, export_file, view_state)


Looks = tuple[float, bool, bool]  # the values of ReviewComponents.looks


def show(c: ReviewComponents, view: View, looks: Looks, saved: str | None = None, ellipse_values: bool = True,
         session: ReviewSession | None = None) -> dict:
    """Every display output for ``view`` (the item is re-read from disk: what you see is what is saved).

    ``session``: the shown session when the handler has it open already (opened once per click).
    ``ellipse_values=False`` leaves the ellipse fields as they are on the page: after saving them (they
    hold what was saved) and after a change of looks, a value typed meanwhile must not be overwritten.
    """
    if not view.folder:
        return {c.view_state: view, c.banner: NO_SESSION}
    session = session or _session(view)
    if view.item is None or view.item not in session:
        view.item = navigation.neighbour(session, None, view.filter, 1) or navigation.neighbour(session, None, navigation.ALL, 1)
    banner_text = f"Session **{Path(view.folder).name}** — `{view.folder}`"
    if saved:
        banner_text += f" — ✔ saved {time.strftime('%H:%M:%S')}: {saved}"
    if view.item is None:
        empty = {c.view_state: view, c.banner: banner_text + " — empty: generate or import pairs.",
                 c.session_name: Path(view.folder).name, c.item_info: "No items yet.", c.picture: None, c.raw_mask: None,
                 c.threshold: 127, c.editor: None, c.decision_filter: view.filter}
        return {**empty, c.angle: 0} if ellipse_values else empty
    item = session.get(view.item)
    opacity_, mask_on, ellipse_on = looks
    pictures = item_pictures(session, item, opacity=float(opacity_), show_mask=bool(mask_on), show_ellipse=bool(ellipse_on),
                             editor=view.brush_open)
    shown = {c.view_state: view, c.banner: banner_text, c.session_name: Path(view.folder).name,
             c.item_info: _item_line(session, item, view), c.picture: str(pictures.overlay), c.raw_mask: str(pictures.raw_mask),
             c.threshold: int(item.threshold if item.threshold is not None else 127), c.decision_filter: view.filter}
    if ellipse_values:
        shown.update(_ellipse_values(c, item))
    if pictures.editor_background is not None:
        shown[c.editor] = _editor_value(pictures)
    return shown


def _ellipse_values(c: ReviewComponents, item: ReviewItem) -> dict:
    """The ellipse fields for ``item`` (a box-sized guess without an ellipse); the sliders' ranges follow the image."""
    ellipse = item.ellipse
    rows, cols = item.height, item.width
    fields = {
        c.center_x: (ellipse.center_x if ellipse else cols / 2, cols), c.center_y: (ellipse.center_y if ellipse else rows / 2, rows),
        c.axis_a: (ellipse.axis_a if ellipse else cols / 4, max(rows, cols)), c.axis_b: (ellipse.axis_b if ellipse else rows / 4, max(rows, cols)),
    }
    values = {field: gr.update(value=round(value, 1), maximum=limit) for field, (value, limit) in fields.items()}
    values[c.angle] = round((ellipse.angle_deg if ellipse else 0.0) % 180, 1)
    return values


def _editor_value(pictures) -> dict:
    return {"background": str(pictures.editor_background), "layers": [], "composite": None}


def wire(context: AppContext, c: ReviewComponents) -> TabLinks:
    cancel_flags = CancelFlags()
    manager = context.manager
    segmenter = SharedSegmenter()

    def opened(folder: Path, session: ReviewSession) -> View:
        remember_session(context, folder)
        cursor_item, cursor_filter = session.cursor()
        return View(str(folder), cursor_item, cursor_filter or navigation.ALL)

    def with_session_list(shown: dict, view: View, session: ReviewSession | None) -> dict:
        """After opening a session: the list of sessions refreshed, and the seed its next run uses."""
        shown[c.session_name] = gr.update(choices=session_names(context), value=Path(view.folder).name if view.folder else None)
        shown[c.seed] = _seed_to_use(session)
        return shown

    @user_errors
    def on_load(view: View, *looks):
        name = last_session(context)
        session = None
        if name:
            session = ReviewSession.open(sessions_root(context) / name)
            view = opened(session.folder, session)
        return with_session_list(show(c, view, looks, session=session), view, session)

    @user_errors
    def on_open(name: str, view: View, *looks):
        folder = session_folder(context, name)
        if (folder / "session.json").is_file():
            session, note = ReviewSession.open(folder), "opened"
        else:
            session, note = ReviewSession.create(folder, name=folder.name), "new session created"
        view = opened(folder, session)
        return with_session_list(show(c, view, looks, saved=note, session=session), view, session)

    def session_for_new_pairs(view: View, name: str) -> ReviewSession:
        if view.folder:
            return _session(view)
        folder = session_folder(context, (name or "").strip() or default_session_name())
        session = ReviewSession.open_or_create(folder, name=folder.name)
        remember_session(context, folder)
        view.folder = str(folder)
        return session

    @user_errors
    def on_generate(trimester_, count_, sampler_, steps_, seed_, lora_, weight_, threshold_, name, view: View,
                    opacity_, mask_on, ellipse_on, request: gr.Request, progress=gr.Progress()):
        session = session_for_new_pairs(view, name)
        pair_request = PairRequest(
            trimester=trimester_, count=int(count_ or 0), lora=None if lora_ in (None, "", BUNDLED_LORA) else lora_,
            lora_weight=float(weight_), sampler=sampler_, steps=int(steps_), seed=None if seed_ in (None, "") else int(seed_),
            threshold=int(threshold_),
        )
        progress((0, pair_request.count), desc="Loading models…")
        run = generate_pairs(context.synthesis, session, pair_request, cancel=cancel_flags.fresh(request),
                             on_progress=lambda done, total: progress((done, total), desc=f"Pair {done}/{total}", unit="pairs"))
        if run.added:
            _move_to(view, run.added[0].id, session)
        failed = sum(1 for item in run.added if not item.ellipse)
        note = (f"{len(run.added)} new pair(s) stored" + (f", {failed} without an ellipse (see the reason)" if failed else "")
                + (f"; {run.skipped_note()}" if run.skipped else ""))
        shown = show(c, view, (opacity_, mask_on, ellipse_on), saved=note, session=session)
        return {**shown, c.seed: _seed_to_use(session)}

    @user_errors
    def on_import(source: str, threshold_, name, view: View, opacity_, mask_on, ellipse_on, request: gr.Request,
                  progress=gr.Progress()):
        if not (source or "").strip():
            raise FetalStudioError("Type the path of a pairs CSV or of a folder with images/ and masks/ to import.")
        source_path = server_source(context, source, "a pairs CSV or a folder with images/ and masks/", listed=lambda path: [
            file for pair in find_pairs(path) for file in (pair.image, pair.mask)])
        session = session_for_new_pairs(view, name)
        added = import_pairs(session, source_path, int(threshold_), cancel=cancel_flags.fresh(request),
                             on_progress=lambda done, total: progress((done, total), desc=f"Pair {done}/{total}", unit="pairs"))
        if added:
            _move_to(view, added[0].id, session)
        shown = show(c, view, (opacity_, mask_on, ellipse_on), saved=f"{len(added)} pair(s) imported", session=session)
        return {**shown, c.seed: _seed_to_use(session)}

    def deciding(decision: str):
        @user_errors
        def on_decide(view: View, *looks):
            session, item = _require_item(view)
            session.decide(item.id, decision, user=REVIEWER)
            _move_to(view, navigation.neighbour(session, item.id, view.filter, 1), session)
            return show(c, view, looks, saved=f"{item.id} {decision}", session=session)

        return on_decide

    def stepping(step: int):
        @user_errors
        def on_step(view: View, *looks):
            if not view.folder:
                raise FetalStudioError("No session is open.")
            session = _session(view)
            _move_to(view, navigation.neighbour(session, view.item, view.filter, step), session)
            return show(c, view, looks, session=session)

        return on_step

    def going_back(direction: str):
        @user_errors
        def on_history(view: View, *looks):
            session, item = _require_item(view)
            (session.undo if direction == "undo" else session.redo)(item.id)
            return show(c, view, looks, saved=f"{direction} on {item.id}", session=session)

        return on_history

    @user_errors
    def on_filter(chosen: str, view: View, *looks):
        view.filter = chosen or navigation.ALL
        session = None
        if view.folder:
            session = _session(view)
            if view.item not in navigation.filtered_ids(session, view.filter):
                view.item = navigation.neighbour(session, view.item, view.filter, 1)
            _move_to(view, view.item, session)
        return show(c, view, looks, session=session)

    @user_errors
    def on_save_ellipse(cx, cy, a, b, angle_, view: View, *looks):
        session, item = _require_item(view)
        if any(v is None for v in (cx, cy, a, b, angle_)):
            raise FetalStudioError("Fill in the centre, both semi-axes and the angle of the ellipse.")
        saved = corrections.save_ellipse(session, item.id, Ellipse(float(cx), float(cy), float(a), float(b), float(angle_)))
        note = f"ellipse of {item.id}" if saved.revision != item.revision else f"ellipse of {item.id} unchanged, nothing to save"
        return show(c, view, looks, saved=note, ellipse_values=False, session=session)

    @user_errors
    def on_reextract(threshold_, view: View, *looks):
        session, item = _require_item(view)
        corrections.reextract(session, item.id, int(threshold_))
        return show(c, view, looks, saved=f"re-extracted {item.id} at {int(threshold_)}", session=session)

    @user_errors
    def on_save_brush(value, view: View, *looks):
        session, item = _require_item(view)
        corrections.save_brush(session, item.id, (value or {}).get("layers") or [])
        return show(c, view, looks, saved=f"painted mask of {item.id}", session=session)

    @user_errors
    def on_segment(view: View, *looks):
        session, item = _require_item(view)
        score = segmenter.ask(manager, session, item.id)
        return show(c, view, looks, saved=f"segmenter mask of {item.id} (score {score:.2f})", session=session)

    @user_errors
    def on_export(chosen, view: View, progress=gr.Progress()) -> dict:
        if not view.folder:
            raise FetalStudioError("Open a session before exporting.")
        if not chosen:
            raise FetalStudioError("Pick at least one export format.")
        out = context.outputs_dir / EXPORTS_FOLDER / f"{Path(view.folder).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        result = export_session(_session(view), out, formats=tuple(chosen),
                                progress=lambda done, total: progress((done, total), desc="Exporting", unit="pairs"))
        archive = zip_export(out)
        return {c.export_status: f"Exported {result.exported} pair(s) ({', '.join(chosen)}) to `{out}`; zip beside it.",
                c.export_file: str(archive)}

    def look_change(view: View, *looks):
        return show(c, view, looks, ellipse_values=False) if view.folder else gr.skip()

    @user_errors
    def brush_opened(view: View) -> dict:
        """Load the editor for the shown item (only this output: unsaved ellipse values elsewhere stay)."""
        view.brush_open = True
        if not view.folder or not view.item:
            return {c.view_state: view}
        session = _session(view)
        return {c.view_state: view, c.editor: _editor_value(item_pictures(session, session.get(view.item), editor=True))}

    def brush_closed(view: View) -> View:
        view.brush_open = False
        return view

    def cancel_job(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    view_and_looks = [c.view_state, *c.looks]
    session_display = [*c.display, c.seed]  # opening a session or adding pairs also shows the seed the next run uses
    c.cancel.click(cancel_job, None, None, concurrency_limit=None)
    c.open_session.click(on_open, [c.session_name, *view_and_looks], session_display)
    c.generate.click(on_generate, [c.trimester, c.count, c.sampler, c.steps, c.seed, c.lora, c.lora_weight, c.threshold_generate,
                                   c.session_name, *view_and_looks], session_display, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    c.import_button.click(on_import, [c.import_source, c.threshold_generate, c.session_name, *view_and_looks], session_display)
    for button, handler in ((c.accept, deciding("accepted")), (c.reject, deciding("rejected")), (c.previous, stepping(-1)),
                            (c.following, stepping(1)), (c.undo, going_back("undo")), (c.redo, going_back("redo"))):
        button.click(handler, view_and_looks, c.display)
    c.decision_filter.input(on_filter, [c.decision_filter, *view_and_looks], c.display)
    # Enter in a number box and letting go of a slider press this button (SHORTCUTS_JS); "multiple": a save
    # pressed while the previous one runs is queued with its own values, never dropped.
    c.save_ellipse.click(on_save_ellipse, [*c.ellipse_fields, *view_and_looks], c.display, trigger_mode="multiple")
    c.reextract.click(on_reextract, [c.threshold, *view_and_looks], c.display)
    c.save_brush.click(on_save_brush, [c.editor, *view_and_looks], c.display)
    c.segment.click(on_segment, view_and_looks, c.display, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    c.export.click(on_export, [c.formats, c.view_state], [c.export_status, c.export_file])
    c.brush_tab.select(brush_opened, c.view_state, [c.view_state, c.editor])
    for other in (c.ellipse_tab, c.reextract_tab, c.segmenter_tab, c.export_tab):
        other.select(brush_closed, c.view_state, c.view_state)
    for control in c.looks:
        control.input(look_change, view_and_looks, c.display)
    return TabLinks(senders=[Sender("analysis", c.send, shown_image_path, [c.view_state]),
                             Sender("anatomy", c.send_anatomy, partial(shown_image_path, target="the Anatomy editor"), [c.view_state])],
                    on_page_load=[Handler(on_load, view_and_looks, session_display)], page_js=SHORTCUTS_JS)


class SharedSegmenter:
    """One predictor for the tab, its image embeddings cached: asking again about an item (after moving
    its ellipse) skips the image encoder. Each ask sets its own image under the lock, so users sharing
    it cannot see each other's image."""

    def __init__(self) -> None:
        self._predictor = None
        self._lock = threading.Lock()

    def ask(self, manager, session: ReviewSession, item_id: str) -> float:
        """Save the segmenter's mask for the item; returns the model's predicted IoU score."""
        from fetalstudio.analysis.segment import CachedPredictor
        from fetalstudio.segmentation.predictor import BoxPromptPredictor

        with self._lock, manager.use(manager.default_id(ModelKind.SEGMENTER)) as model:
            if self._predictor is None or self._predictor.predictor.model is not model:
                self._predictor = CachedPredictor(BoxPromptPredictor(model), manager=manager)
            _, score = corrections.ask_segmenter(self._predictor, session, item_id)
        return score


def _require_item(view: View) -> tuple[ReviewSession, ReviewItem]:
    if not view.folder or not view.item:
        raise FetalStudioError("No item is shown: open a session with pairs first.")
    session = _session(view)
    return session, session.get(view.item)


def _move_to(view: View, item_id: str | None, session: ReviewSession) -> View:
    view.item = item_id
    if item_id:
        session.set_cursor(item_id, None if view.filter == navigation.ALL else view.filter)
    return view


def _seed_to_use(session: ReviewSession | None):
    """The Seed box: where the shown session's next run starts (empty without a session)."""
    return gr.update(value=next_seed(session) if session is not None else None)


def shown_image_path(view: View, target: str = "Analysis") -> str:
    """The image of the item on screen, to send to another tab (``target`` names it in the error)."""
    if not view.folder or not view.item:
        raise FetalStudioError(f"Open a session and show an item first, then send it to {target}.")
    session = _session(view)
    return str(session.image_path(session.get(view.item)))
