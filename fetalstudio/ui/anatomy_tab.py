"""Anatomy editor tab: open a scan (example, upload, project, or sent from another tab), edit its layout
(mouse, table, presets, undo/redo with buttons and keys), set the ROI (automatic with a margin, or painted),
regenerate it with FetalFlex and compare before | after | difference, the layouts, and the detector's
boxes on the result; every run is a project folder (reopen, download); counterfactual pairs in bulk.

A thin shell over ``fetalstudio.anatomy``: the document is an ``EditorState`` saved after every change in
an ``EditorSession`` keyed by the browser (a random id in a cookie, ``SESSION_COOKIE``), so two browsers
never share a layout, a reload reopens the document with its undo history, and a refused input leaves
the saved document as it was (a warning and a note in the status line, never an error on the outputs).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator
from PIL import Image

from fetalstudio.anatomy import editor
from fetalstudio.anatomy.editor_boxes import (TABLE_COLUMNS, PendingEchoes, annotator_labels, annotator_payload_value,
                                              annotator_value, apply_annotator_value, apply_table, table_rows)
from fetalstudio.anatomy.editor_store import EditorSession
from fetalstudio.anatomy.examples import list_examples
from fetalstudio.anatomy.flex import CONDITIONS, FlexOptions, flex_settings, run_flex
from fetalstudio.anatomy.flex_cli import detect_structures, detector_planes, structure_detector
from fetalstudio.anatomy.layout import Layout
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.anatomy.roi import changed_boxes
from fetalstudio.anatomy.project import projects_dir, write_project
from fetalstudio.anatomy.project_files import (EDITOR_FILE, FOUND_FILE, found_json, open_project_state,
                                               project_summaries, read_found, write_pair_png, zip_project)
from fetalstudio.anatomy.views import (anatomy_check, detections_picture, difference_picture, layout_picture,
                                       roi_tint_picture)
from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import atomic_write_bytes, png_bytes
from fetalstudio.imaging.image_input import load_image, supported_suffixes
from fetalstudio.imaging.masks import ADD_COLOUR, REMOVE_COLOUR, apply_editor_strokes
from fetalstudio.paths import app_file
from fetalstudio.pipelines.samplers import SAMPLERS
from fetalstudio.pipelines.ssa import SSAParameters
from fetalstudio.ui import anatomy_pairs
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, refusals_as_warnings
from fetalstudio.ui.tab import Handler, Receiver, Sender, TabLinks, join_page_js
from fetalstudio.vocabulary import ANATOMY_PLANES, FACIAL_SAGITTAL

TITLE = "Anatomy editor"
ID = "anatomy"

NO_DOCUMENT = "No image open: pick an example, upload a scan, or reopen a project."
EDGE_LABEL = "Edges: keep this scan's structure"
CONDITION_CHOICES = [("Layout (FetalFlex)", "layout"), (EDGE_LABEL, "edges")]
EDGE_DETECTORS = [name for name in CONDITIONS if name != "layout"]
#: Shown under the ROI controls: what the two ways of making the ROI do.
ROI_HELP = ("The ROI is the region regenerated; every pixel outside it stays the scan's own. **Automatic**: the boxes "
            "the edit changed (before and after) grown by the margin. **Painted**: paint with red to add, blue to "
            "remove, then *Use painted ROI*.")


@dataclass
class AnatomyComponents:
    example: gr.Dropdown
    open_example: gr.Button
    upload: gr.File
    plane: gr.Dropdown
    plane_note: gr.Markdown
    detect: gr.Button
    project: gr.Dropdown
    open_project: gr.Button
    annotator: image_annotator
    undo: gr.Button
    redo: gr.Button
    status: gr.Markdown
    table: gr.Dataframe
    apply_table: gr.Button
    preset: gr.Dropdown
    preset_meaning: gr.Markdown
    preset_preview: gr.Image
    apply_preset: gr.Button
    margin: gr.Slider
    roi_preview: gr.Image
    roi_tab: gr.Tab
    brush: gr.ImageEditor
    use_brush: gr.Button
    auto_roi: gr.Button
    steps: gr.Slider
    seed: gr.Number
    sampler: gr.Dropdown
    ssa: gr.Checkbox
    osm: gr.Checkbox
    ssa_k: gr.Number
    ssa_delta: gr.Number
    ssa_iterations: gr.Number
    osm_strength: gr.Slider
    osm_margin: gr.Slider
    controlnet_scale: gr.Slider
    guidance: gr.Slider
    condition: gr.Radio
    edge_detector: gr.Dropdown
    generate: gr.Button
    cancel: gr.Button
    before: gr.Image
    after: gr.Image
    difference: gr.Image
    layout_before: gr.Image
    layout_after: gr.Image
    found: gr.Image
    check: gr.Dataframe
    downloads: gr.File
    send_analysis: gr.Button
    inbox_path: gr.State
    pairs: anatomy_pairs.PairsComponents

    @property
    def document(self) -> list:
        """What showing the document sets."""
        return [self.annotator, self.table, self.status, self.margin, self.plane, self.roi_preview]

    @property
    def results(self) -> list:
        """What showing a project's results sets."""
        return [self.before, self.after, self.difference, self.layout_before, self.layout_after, self.found, self.check,
                self.downloads, self.project]

    @property
    def sampling(self) -> list:
        return [self.steps, self.seed, self.sampler, self.ssa, self.osm, self.ssa_k, self.ssa_delta, self.ssa_iterations,
                self.osm_strength, self.osm_margin, self.controlnet_scale, self.guidance, self.condition,
                self.edge_detector]


def build(context: AppContext) -> AnatomyComponents:
    presets = load_presets().presets
    gr.Markdown("Edit a scan's anatomy (boxes of its structures), then regenerate the edited region. "
                "Keys: Ctrl+Z undo, Ctrl+Shift+Z or Ctrl+Y redo. Research use only — not for diagnosis.")
    with gr.Row():
        with gr.Column(scale=1, min_width=280):
            titles = [e.title for e in list_examples()]
            example = gr.Dropdown(titles, value=titles[0] if titles else None, label="Example",
                                  elem_id="anatomy-example")
            open_example = gr.Button("Open example", elem_id="anatomy-open-example")
            upload = gr.File(label=f"…or upload an image ({', '.join(supported_suffixes())})", type="filepath",
                             file_types=list(supported_suffixes()), elem_id="anatomy-upload", height=110)
            plane = gr.Dropdown([(p.title, p.name) for p in ANATOMY_PLANES.values()], value=FACIAL_SAGITTAL,
                                label="Plane", elem_id="anatomy-plane")
            plane_note = gr.Markdown("", elem_id="anatomy-plane-note")
            detect = gr.Button("Detect structures", elem_id="anatomy-detect")
            with gr.Accordion("Projects (earlier runs)", open=False):
                project = gr.Dropdown([], value=None, label="Project", elem_id="anatomy-project")
                open_project = gr.Button("Reopen project", elem_id="anatomy-open-project")
            preset = gr.Dropdown([(p.title, p.name) for p in presets.values()], value=None, label="Preset",
                                 elem_id="anatomy-preset")
            preset_meaning = gr.Markdown("", elem_id="anatomy-preset-meaning")
            preset_preview = gr.Image(label="The layout the preset makes (before applying)", type="filepath",
                                      interactive=False, elem_id="anatomy-preset-preview", height=220)
            apply_preset = gr.Button("Apply preset", elem_id="anatomy-apply-preset")
        with gr.Column(scale=3):
            with gr.Tabs():
                with gr.Tab("Layout", id="anatomy-layout-tab"):
                    labels, colors = annotator_labels(FACIAL_SAGITTAL)
                    annotator = image_annotator(label="Layout — move, resize, draw or delete boxes (select a box, "
                                                "then Delete)", label_list=labels, label_colors=colors, sources=[],
                                                image_type="filepath", show_clear_button=False,
                                                elem_id="anatomy-annotator", height=460)
                with gr.Tab("ROI", id="anatomy-roi-tab") as roi_tab:
                    gr.Markdown(ROI_HELP)
                    margin = gr.Slider(0, 64, value=editor.DEFAULT_MARGIN_PX, step=1, label="Automatic ROI margin (pixels)",
                                       elem_id="anatomy-margin")
                    with gr.Row():
                        roi_preview = gr.Image(label="The ROI (tinted)", type="filepath", interactive=False,
                                               elem_id="anatomy-roi-preview", height=380)
                        brush = gr.ImageEditor(type="filepath", format="png", image_mode="RGBA", sources=(), layers=False,
                                               label="Paint the ROI (red adds, blue removes)", transforms=(),
                                               brush=gr.Brush(colors=[ADD_COLOUR, REMOVE_COLOUR], default_color=ADD_COLOUR,
                                                              default_size=16, color_mode="fixed"),
                                               eraser=gr.Eraser(default_size=16), elem_id="anatomy-brush", height=380)
                    with gr.Row():
                        use_brush = gr.Button("Use painted ROI", elem_id="anatomy-use-brush")
                        auto_roi = gr.Button("Back to automatic ROI", elem_id="anatomy-auto-roi")
            with gr.Row():
                undo = gr.Button("Undo", elem_id="anatomy-undo")
                redo = gr.Button("Redo", elem_id="anatomy-redo")
            status = gr.Markdown(NO_DOCUMENT, elem_id="anatomy-status")
            table = gr.Dataframe(headers=list(TABLE_COLUMNS), datatype=["str"] + ["number"] * (len(TABLE_COLUMNS) - 2) + ["str"],
                                 column_count=(len(TABLE_COLUMNS), "fixed"), interactive=True,
                                 label="Boxes (pixels, degrees; confidence: the detector's, while the box is as detected)",
                                 elem_id="anatomy-table")
            apply_table_button = gr.Button("Apply table", elem_id="anatomy-apply-table")
    with gr.Row():
        steps = gr.Slider(1, 50, value=20, step=1, label="Steps", elem_id="anatomy-steps")
        seed = gr.Number(0, precision=0, label="Seed", minimum=0, elem_id="anatomy-seed")
        sampler = gr.Dropdown([(s.label, s.key) for s in SAMPLERS.values()], value="ddim", label="Sampler",
                              elem_id="anatomy-sampler")
        condition = gr.Radio(CONDITION_CHOICES, value="layout", label="Condition", elem_id="anatomy-condition")
    with gr.Accordion("Stages and ControlNet", open=False):
        with gr.Row():
            ssa = gr.Checkbox(True, label="Stage 1: SSA (anisotropic smoothing of the intermediate)", elem_id="anatomy-ssa")
            ssa_k = gr.Number(SSAParameters.k, label="SSA k (edge threshold)", minimum=0.001, elem_id="anatomy-ssa-k")
            ssa_delta = gr.Number(SSAParameters.delta, label="SSA delta (step, at most 0.25)", minimum=0.001, maximum=0.25,
                                  elem_id="anatomy-ssa-delta")
            ssa_iterations = gr.Number(SSAParameters.iterations, precision=0, minimum=1, maximum=100,
                                       label="SSA iterations", elem_id="anatomy-ssa-iterations")
        with gr.Row():
            osm = gr.Checkbox(True, label="Stage 2: OSM (re-sample the edited organs)", elem_id="anatomy-osm")
            osm_strength = gr.Slider(0.1, 1.0, value=FlexOptions.osm_strength, step=0.05, label="OSM strength",
                                     elem_id="anatomy-osm-strength")
            osm_margin = gr.Slider(0, 32, value=FlexOptions.osm_margin_px, step=1, label="OSM mask margin (pixels)",
                                   elem_id="anatomy-osm-margin")
        with gr.Row():
            controlnet_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="ControlNet weight",
                                         elem_id="anatomy-controlnet-scale")
            guidance = gr.Slider(1, 15, value=7.5, step=0.5, label="Guidance scale", elem_id="anatomy-guidance")
            edge_detector = gr.Dropdown(EDGE_DETECTORS, value="canny", label="Edge detector (edge mode)",
                                        elem_id="anatomy-edge-detector")
    with gr.Row():
        generate = gr.Button("Generate", variant="primary", elem_id="anatomy-generate")
        cancel = gr.Button("Cancel", variant="stop", elem_id="anatomy-cancel")
    with gr.Row():
        before = gr.Image(label="Before", type="filepath", interactive=False, elem_id="anatomy-before")
        after = gr.Image(label="After", type="filepath", interactive=False, elem_id="anatomy-after")
        difference = gr.Image(label="Difference (changed pixels in red)", type="filepath", interactive=False,
                              elem_id="anatomy-difference")
    with gr.Row():
        layout_before = gr.Image(label="Layout before", type="filepath", interactive=False, elem_id="anatomy-layout-before")
        layout_after = gr.Image(label="Layout asked for", type="filepath", interactive=False, elem_id="anatomy-layout-after")
        found = gr.Image(label="Detector on the result (solid) vs asked (thin)", type="filepath", interactive=False,
                         elem_id="anatomy-found")
    check = gr.Dataframe(headers=["structure", "verdict", "IoU", "confidence"], interactive=False,
                         label="Does the result show what was asked?", elem_id="anatomy-check")
    with gr.Row():
        downloads = gr.File(label="Downloads: result, before|after pair, whole project (zip)", file_count="multiple",
                            interactive=False, elem_id="anatomy-downloads")
        send_analysis = gr.Button("Send the result to Analysis", elem_id="anatomy-send-analysis")
    pairs = anatomy_pairs.build(presets)
    inbox_path = gr.State(None)  # an image sent from another tab (a checked server path)
    return AnatomyComponents(example, open_example, upload, plane, plane_note, detect, project, open_project, annotator,
                             undo, redo, status, table, apply_table_button, preset, preset_meaning, preset_preview,
                             apply_preset, margin, roi_preview, roi_tab, brush, use_brush, auto_roi, steps, seed, sampler,
                             ssa, osm, ssa_k, ssa_delta, ssa_iterations, osm_strength, osm_margin, controlnet_scale,
                             guidance, condition, edge_detector, generate, cancel, before, after, difference,
                             layout_before, layout_after, found, check, downloads, send_analysis, inbox_path, pairs)


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
#: Ctrl+Z undoes, Ctrl+Shift+Z and Ctrl+Y redo — while the editor is on screen and the focus is not in a text field
#: (there the browser's own undo of the typing is wanted).
KEYS_JS = """
() => {
  document.addEventListener('keydown', (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.altKey) return;
    const target = event.target;
    if (target && (target.isContentEditable || ['INPUT', 'TEXTAREA', 'SELECT'].includes(target.tagName))) return;
    const key = event.key.toLowerCase();
    const id = key === 'y' || (key === 'z' && event.shiftKey) ? 'anatomy-redo' : key === 'z' ? 'anatomy-undo' : null;
    const button = id && document.getElementById(id);
    if (!button || button.offsetParent === null) return;  // the Anatomy editor tab is not shown
    event.preventDefault();
    button.click();
  });
}
"""

PAGE_JS = join_page_js([SESSION_COOKIE_JS, KEYS_JS])


def editor_session_id(request: gr.Request | None) -> str:
    """The browser's editor id (its cookie, when well formed), else the page's session hash."""
    cookies = getattr(request, "cookies", None) if request is not None else None
    cookie = cookies.get(SESSION_COOKIE) if cookies is not None else None
    if isinstance(cookie, str) and SESSION_ID_PATTERN.fullmatch(cookie):
        return cookie
    return getattr(request, "session_hash", None) or "default"


def _write_png(path: Path, pixels: np.ndarray, what: str) -> str:
    """Write gray or RGB ``pixels`` (png_bytes encodes OpenCV's BGR order, so RGB is swapped first)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, png_bytes(pixels[..., ::-1].copy() if pixels.ndim == 3 else pixels, what))
    return str(path)


def stages_of(ssa: bool, osm: bool) -> str:
    """The engine's stage for the two switches; OSM refines stage 1's SSA draft, so it needs SSA."""
    if osm and not ssa:
        raise FetalStudioError("Stage 2 (OSM) re-samples the organs of stage 1's SSA draft: turn SSA on, or turn OSM off.")
    return "ssa+osm" if osm else "ssa" if ssa else "ddim"


def flex_options(ssa: bool, osm: bool, k: float | None, delta: float | None, iterations: float | None,
                 osm_strength: float, osm_margin: float, controlnet_scale: float, condition: str,
                 edge_detector: str | None) -> FlexOptions:
    """The engine's options from the tab's controls (each checked by FlexOptions / SSAParameters with their messages)."""
    if any(value is None for value in (k, delta, iterations)):
        raise FetalStudioError("Fill in SSA k, delta and iterations (Stages and ControlNet), or restore their defaults "
                               f"({SSAParameters.k:g}, {SSAParameters.delta:g}, {SSAParameters.iterations}).")
    if condition == "edges" and edge_detector not in EDGE_DETECTORS:
        raise FetalStudioError(f"Choose an edge detector for edge mode ({', '.join(EDGE_DETECTORS)}).")
    whole = float(iterations)
    if not whole.is_integer():
        raise FetalStudioError(f"SSA iterations must be a whole number (got {iterations}).")
    return FlexOptions(stage=stages_of(bool(ssa), bool(osm)), ssa=SSAParameters(float(k), float(delta), int(whole)),
                       osm_strength=float(osm_strength), osm_margin_px=float(osm_margin),
                       conditioning_scale=float(controlnet_scale),
                       condition="layout" if condition != "edges" else str(edge_detector))


def changed_names(before: Layout, after: Layout) -> set[str]:
    """The structures an edit moved, resized, added or removed (drawn thicker in the layout pictures)."""
    return {box.structure for box in changed_boxes(before, after)}


def editor_json(state: editor.EditorState) -> bytes:
    """The document with its undo history, as the project's editor.json (reopening a project restores it)."""
    return json.dumps(editor.state_to_dict(state), indent=1).encode("utf-8")


def run_roi(state: editor.EditorState, options: FlexOptions) -> np.ndarray:
    """The region a run regenerates: the painted or automatic ROI; in edge mode with no edit and no painted ROI,
    the whole image (the scan is re-synthesised from its own edges)."""
    if options.condition != "layout" and state.roi.mode == "auto" and not changed_boxes(state.original, state.layout):
        return np.ones((state.image.height, state.image.width), bool)
    return editor.roi_mask(state)


def run_description(state: editor.EditorState, options: FlexOptions, controlnet: str) -> str:
    """What a run regenerated, from what, for its status line."""
    if options.condition == "layout":
        region = "the painted ROI" if state.roi.mode == "mask" else "the edited region"
        return f"{region} from the layout, ControlNet {controlnet}"
    whole = state.roi.mode == "auto" and not changed_boxes(state.original, state.layout)
    region = "the whole image" if whole else ("the painted ROI" if state.roi.mode == "mask" else "the edited region")
    return f"{region} from the scan's {options.condition} edges, ControlNet {controlnet}"


def wire(context: AppContext, c: AnatomyComponents) -> TabLinks:
    manager = context.manager
    examples = {example.title: example for example in list_examples()}
    outputs = Path(context.outputs_dir) / "anatomy"
    views = outputs / "view"
    projects = projects_dir()
    cancel_flags = CancelFlags()
    echoes = PendingEchoes()

    def session_of(request: gr.Request | None) -> EditorSession:
        return EditorSession.open(editor_session_id(request), outputs / "sessions")

    answered = refusals_as_warnings(c.status)

    def current(request: gr.Request | None) -> tuple[EditorSession, editor.EditorState]:
        session = session_of(request)
        state = session.load().state
        if state is None:
            raise FetalStudioError(NO_DOCUMENT)
        return session, state

    gray_cache: dict[str, np.ndarray] = {}

    def gray_of(state: editor.EditorState) -> np.ndarray:
        """The source's pixels (a few recent images kept in memory: every click redraws the ROI)."""
        key = state.image.sha256
        if key not in gray_cache:
            if len(gray_cache) >= 8:
                gray_cache.pop(next(iter(gray_cache)))
            gray_cache[key] = load_image(state.image.path).gray
        return gray_cache[key]

    def view_of(state: editor.EditorState) -> str:
        """The source as a PNG under outputs (the only folder the page may read), named by its pixels."""
        path = views / f"{state.image.sha256[:16]}.png"
        if not path.is_file():
            _write_png(path, gray_of(state), "the editor's view of the image")
        return str(path)

    def picture(pixels: np.ndarray, kind: str, what: str) -> str:
        """A view picture named by its content (a browser never shows a stale cached copy of a new picture)."""
        digest = hashlib.sha1(pixels.tobytes()).hexdigest()[:16]
        path = views / f"{kind}-{digest}.png"
        return str(path) if path.is_file() else _write_png(path, pixels, what)

    def current_roi(state: editor.EditorState) -> np.ndarray | None:
        try:
            return editor.roi_mask(state)
        except FetalStudioError:
            return None  # no edit yet: nothing to regenerate

    def roi_picture(state: editor.EditorState) -> str:
        roi = current_roi(state)
        pixels = roi_tint_picture(gray_of(state), roi if roi is not None else np.zeros(gray_of(state).shape, bool))
        return picture(pixels, "roi", "the ROI picture")

    def roi_line(state: editor.EditorState) -> str:
        roi = current_roi(state)
        how = "painted" if state.roi.mode == "mask" else f"automatic, margin {state.roi.margin_px:g} px"
        if roi is None:
            return f"ROI ({how}): none yet — edit a box or apply a preset."
        return f"ROI ({how}): {int(roi.sum())} pixels ({100 * roi.mean():.1f} % of the image)."

    def shown(state: editor.EditorState, note: str, with_annotator: bool = True, session_id: str | None = None) -> dict:
        history = state.history
        line = (f"**{Path(state.image.path).name}** · {state.plane} · {len(state.layout.boxes)} boxes · "
                f"step {history.position} of {len(history.steps) - 1}: {history.steps[history.position].action} · "
                f"{roi_line(state)}")
        result = {c.table: table_rows(state), c.status: f"{note}\n\n{line}" if note else line,
                  c.margin: state.roi.margin_px, c.plane: state.plane, c.roi_preview: roi_picture(state)}
        if with_annotator:
            labels, colors = annotator_labels(state.plane)
            value = annotator_value(state, view_of(state))
            if session_id is not None:
                echoes.sent(session_id, value)
            result[c.annotator] = gr.update(value=value, label_list=labels, label_colors=colors)
        return result

    def saved(session: EditorSession, state: editor.EditorState, note: str, with_annotator: bool = True) -> dict:
        session.save(state)
        return shown(state, note, with_annotator, session.id)

    def unchanged() -> dict:
        return {component: gr.skip() for component in c.document}

    def change(transition, note: str, with_annotator: bool = True, takes_value: bool = True):
        """A handler applying ``transition(state[, value])``; a refusal is a warning and the state is kept
        (the annotator is reset to the kept layout, so a refused drag does not stay on screen)."""
        def apply(value, request: gr.Request | None) -> dict:
            session, state = current(request)
            if transition is apply_annotator_value:
                value = annotator_payload_value(value)
                if echoes.is_echo(session.id, value):
                    return unchanged()  # the annotator showing a value the server sent, not a drag
            try:
                changed = transition(state, value) if takes_value else transition(state)
            except FetalStudioError as error:
                gr.Warning(str(error))
                return shown(state, f"⚠ {error}", session_id=session.id)
            if changed is state:  # nothing changed (e.g. the annotator echoing the value it was given): no save, no note
                return unchanged()
            return saved(session, changed, note, with_annotator)

        def with_value(value, request: gr.Request) -> dict:
            return apply(value, request)

        def without_value(request: gr.Request) -> dict:
            return apply(None, request)
        return answered(with_value if takes_value else without_value)

    # --- results of a project -------------------------------------------------------------------------
    def project_choices() -> list[tuple[str, str]]:
        return [(summary.title, summary.name) for summary in project_summaries(projects)]

    def project_picture(folder: Path, kind: str, make, what: str) -> str:
        """A picture of a project, drawn once (a project never changes after Generate; its name is unique)."""
        path = views / f"{kind}-{folder.name}.png"
        return str(path) if path.is_file() else _write_png(path, make(), what)

    def project_downloads(folder: Path) -> list[str]:
        """The result, the before|after pair and the zip (the last two written once, atomically)."""
        downloads = outputs / "downloads" / folder.name
        pair, archive = downloads / f"{folder.name}-pair.png", downloads / f"{folder.name}.zip"
        if not pair.is_file():
            write_pair_png(folder, pair)
        if not archive.is_file():
            zip_project(folder, archive, projects)
        return [str(folder / "result.png"), str(pair), str(archive)]

    def results_of(state: editor.EditorState, found: list | None = None) -> dict:
        """The last project's pictures, anatomy check and downloads (nothing shown when the document has no
        project). ``found``: the detector's boxes on the result; default the project's found.json."""
        choices = gr.update(choices=project_choices(), value=Path(state.project).name if state.project else None)
        folder = Path(state.project) if state.project else None
        if folder is None or not (folder / "result.png").is_file():
            return {c.project: choices}
        grays = {}

        def gray(name: str) -> np.ndarray:
            if name not in grays:
                grays[name] = np.asarray(Image.open(folder / name).convert("L"))
            return grays[name]

        asked = (Layout.read(folder / "layout_before.json"), Layout.read(folder / "layout_after.json"))
        result = {c.before: str(folder / "source.png"), c.after: str(folder / "result.png"),
                  c.difference: project_picture(folder, "difference", lambda: difference_picture(gray("source.png"),
                                                gray("result.png")), "the difference picture"),
                  c.layout_before: project_picture(folder, "layout-before", lambda: layout_picture(gray("source.png"),
                                                   asked[0]), "the layout before"),
                  c.layout_after: project_picture(folder, "layout-after", lambda: layout_picture(
                      gray("result.png"), asked[1], highlight=changed_names(*asked)), "the layout asked for"),
                  c.downloads: project_downloads(folder), c.project: choices}
        found = read_found(folder, projects) if found is None else found
        if found is not None:
            result[c.found] = project_picture(folder, "found", lambda: detections_picture(gray("result.png"), asked[1],
                                              found), "the detector's boxes")
            result[c.check] = [[row.structure, row.verdict, "" if row.iou is None else round(row.iou, 2),
                                "" if row.score is None else round(row.score, 2)] for row in anatomy_check(asked[1], found)]
        return result

    def detections_on(gray: np.ndarray, plane: str) -> tuple[list | None, str, dict[str, bytes]]:
        """The detector's boxes on a result, when the detector knows the plane's structures, with the note for
        the status and the project file that keeps them."""
        detector, detector_id = structure_detector(manager)
        if plane not in detector_planes(detector):
            return None, f"(the structure detector knows no {plane} structures: no anatomy check)", {}
        found = detector.detect(gray)
        return found, "", {FOUND_FILE: found_json(found, detector_id)}

    def preset_choices() -> dict:
        """The presets as they are now (bundled and the user's presets folder), for the preset list."""
        loaded = load_presets()
        for problem in loaded.problems:
            gr.Warning(str(problem))
        return gr.update(choices=[(p.title, p.name) for p in loaded.presets.values()])

    # --- handlers ---------------------------------------------------------------------------------------
    @answered
    def on_show(shown_value, request: gr.Request) -> dict:
        """The browser's document when the tab is opened after a (re)load. Not on page load: the annotator
        must be on screen to take a value, or it echoes the box colours back in a form it cannot read. When the
        page already shows a document nothing is done (an image sent from another tab is opening right now)."""
        choices = preset_choices()
        if shown_value:
            return {c.preset: choices}
        state = session_of(request).load().state
        if state is None:
            return {**unchanged(), c.project: gr.update(choices=project_choices()), c.preset: choices}
        restored = shown(state, "Restored your last document (with its undo history).", session_id=editor_session_id(request))
        return {**restored, **results_of(state), c.preset: choices}

    def opened(request: gr.Request, state: editor.EditorState, note: str) -> dict:
        session = session_of(request)
        return {**saved(session, state, note), **results_of(state)}

    @answered
    def on_open_example(title: str | None, request: gr.Request) -> dict:
        if not title or title not in examples:
            raise FetalStudioError("Pick an example in the list first.")
        example = examples[title]
        state = editor.open_image(load_image(example.image), example.plane, example.layout(), "file")
        return {**opened(request, state, f"Opened the example {title} with its annotated layout."),
                c.plane_note: ""}

    def open_guessed(path: Path, request: gr.Request, how: str) -> dict:
        from fetalstudio.anatomy.plane_guess import guess_plane

        image = load_image(path)
        guess = guess_plane(manager, image)
        state = editor.open_image(image, guess.plane or FACIAL_SAGITTAL)
        note = guess.reason if guess.plane else f"{guess.reason} Opened as {FACIAL_SAGITTAL}."
        return {**opened(request, state, f"{how} with no boxes: detect structures, or draw them."), c.plane_note: note}

    @answered
    def on_upload(path: str | None, request: gr.Request) -> dict:
        if not path:
            raise FetalStudioError("Choose an image file to open.")
        return open_guessed(app_file(path), request, "Opened the upload")

    @answered
    def on_received(path: str | None, request: gr.Request) -> dict:
        if not path:
            raise FetalStudioError("Nothing was sent: pick an image in the other tab first.")
        return open_guessed(app_file(path), request, "Opened the image sent from another tab")

    @answered
    def on_plane(plane: str, request: gr.Request) -> dict:
        session, state = current(request)
        if plane == state.plane:
            return unchanged()
        if state.layout.boxes:
            raise FetalStudioError(f"This layout has {state.plane} boxes; the plane can change only while there are "
                                   "none. Open the image again (or delete its boxes) to start it as another plane.")
        changed = editor.open_image(state.image, plane)
        return {**saved(session, changed, f"The plane is now {plane}."), c.plane_note: ""}

    @answered
    def on_detect(request: gr.Request) -> dict:
        session, state = current(request)
        detections = detect_structures(manager, load_image(state.image.path), state.plane)
        changed = editor.set_detected(state, detections)
        return saved(session, changed, f"The detector found {len(changed.layout.boxes)} structures (confidence in the table).")

    @answered
    def on_open_project(name: str | None, request: gr.Request) -> dict:
        if not name:
            raise FetalStudioError("Pick a project in the list first (each run of Generate makes one).")
        state = open_project_state(projects / Path(name).name, projects)
        found, note = read_found(state.project, projects), ""
        if found is None:  # a project made before found.json was kept
            found, note, _ = detections_on(load_image(Path(state.project) / "result.png").gray, state.plane)
        return {**saved(session_of(request), state, f"Reopened the project {Path(name).name}. {note}".strip()),
                **results_of(state, found)}

    def on_preset_chosen(name: str | None, request: gr.Request) -> dict:
        preset = load_presets().presets.get(name or "")
        if preset is None:
            return {c.preset_meaning: "", c.preset_preview: None}
        meaning = f"**{preset.title}** ({preset.marker}): {preset.clinical_meaning}"
        state = session_of(request).load().state
        if state is None:
            return {c.preset_meaning: meaning, c.preset_preview: None}
        try:
            layout = editor.preview_preset(state, preset)
        except FetalStudioError as error:
            return {c.preset_meaning: f"{meaning}\n\n⚠ {error}", c.preset_preview: None}
        pixels = layout_picture(gray_of(state), layout, highlight=changed_names(state.layout, layout))
        return {c.preset_meaning: meaning, c.preset_preview: picture(pixels, "preset", "the preset's layout")}

    def with_preset(state: editor.EditorState, name: str | None) -> editor.EditorState:
        presets = load_presets().presets  # read each time: presets added to the presets folder appear
        if not name or name not in presets:
            raise FetalStudioError("Pick a preset in the list first (a preset file that was removed is gone from it).")
        return editor.apply_preset(state, presets[name])

    def brush_background(request: gr.Request) -> dict:
        """The brush editor's background: the image with the current ROI tinted (loaded when the ROI tab opens)."""
        state = session_of(request).load().state
        if state is None:
            return {c.brush: None}
        return {c.brush: {"background": roi_picture(state), "layers": [], "composite": None}}

    def with_strokes(state: editor.EditorState, value) -> editor.EditorState:
        layers = (value or {}).get("layers") or []
        if not layers:
            raise FetalStudioError("Nothing painted: paint the region with red (blue removes), then Use painted ROI.")
        mask = apply_editor_strokes(current_roi(state), layers, (state.image.height, state.image.width))
        return editor.set_roi_mask(state, mask)

    @answered
    def on_use_brush(value, request: gr.Request) -> dict:
        session, state = current(request)
        changed = with_strokes(state, value)
        shown_now = saved(session, changed, "The painted ROI is used.")
        return {**shown_now, c.brush: {"background": shown_now[c.roi_preview], "layers": [], "composite": None}}

    @answered
    def on_generate(steps: float, seed: float | None, sampler: str, ssa: bool, osm: bool, k: float | None,
                    delta: float | None, iterations: float | None, osm_strength: float, osm_margin: float,
                    controlnet_scale: float, guidance: float, condition: str, edge_detector: str | None,
                    request: gr.Request, progress=gr.Progress()) -> dict:
        session, state = current(request)
        options = flex_options(ssa, osm, k, delta, iterations, osm_strength, osm_margin, controlnet_scale, condition,
                               edge_detector)
        if seed is None or seed < 0:
            raise FetalStudioError("Type a seed: a whole number, 0 or more.")
        roi = run_roi(state, options)
        flag = cancel_flags.fresh(request)
        progress((0, int(steps)), desc="Loading models…")
        source = Image.fromarray(load_image(state.image.path).gray)
        settings = flex_settings(manager, state.layout, steps=int(steps), seed=int(seed), sampler=sampler,
                                 guidance_scale=float(guidance))
        outcome = run_flex(manager, settings, source, state.layout, roi, options,
                           lambda done, total, step, steps_: progress((step, steps_), desc="Generating", unit="steps"),
                           flag, before=state.original)
        if outcome.cancelled:
            return {c.status: "Cancelled: nothing was written; the layout is kept."}
        presets_used = [] if state.preset is None else [{"name": state.preset.name, "parameters": state.preset.values()}]
        found, note, found_file = detections_on(np.asarray(outcome.final.convert("L")), state.plane)
        folder = write_project(outcome, image_path=state.image.path, roi_source=state.roi.mode,
                               edits=[edit.to_dict() for edit in state.history.applied_edits()], presets=presets_used,
                               extra_files={EDITOR_FILE: editor_json(state), **found_file})
        state = editor.set_project(state, folder)
        session.save(state)
        regenerated = run_description(state, options, outcome.controlnet.get("id", ""))
        return {**results_of(state, found),
                c.status: f"Generated with seed {outcome.seed} ({regenerated}); saved as the project {folder.name}. "
                          f"{note}".strip()}

    def on_cancel(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    def sent_result(after: str | None) -> str:
        if not after:
            raise FetalStudioError("Generate a result first, then send it to Analysis.")
        return after

    document = c.document
    gpu = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
    opening = [*document, *c.results, c.plane_note]
    c.open_example.click(on_open_example, [c.example], opening)
    c.upload.upload(on_upload, [c.upload], opening, **gpu)
    c.plane.input(on_plane, [c.plane], [*document, c.plane_note])
    c.detect.click(on_detect, None, document, **gpu)
    c.open_project.click(on_open_project, [c.project], [*document, *c.results], **gpu)
    # preprocess=False: the component's preprocess decodes and re-encodes the image on every drag (and echo)
    c.annotator.change(change(apply_annotator_value, "Boxes changed with the mouse.", with_annotator=False),
                       [c.annotator], document, preprocess=False)
    c.apply_table.click(change(apply_table, "Table applied."), [c.table], document)
    c.undo.click(change(editor.undo, "Undone.", takes_value=False), None, document)
    c.redo.click(change(editor.redo, "Redone.", takes_value=False), None, document)
    c.preset.change(on_preset_chosen, [c.preset], [c.preset_meaning, c.preset_preview])
    c.apply_preset.click(change(with_preset, "Preset applied."), [c.preset], document)
    c.margin.release(change(editor.set_roi_margin, "ROI margin set."), [c.margin], document)
    c.roi_tab.select(brush_background, None, [c.brush])
    c.use_brush.click(on_use_brush, [c.brush], [*document, c.brush])
    c.auto_roi.click(change(lambda state, _: editor.set_roi_mode(state, "auto"), "Back to the automatic ROI."), [c.margin],
                     document)
    c.generate.click(on_generate, c.sampling, [*c.results, c.status], **gpu)
    c.cancel.click(on_cancel, None, None, concurrency_limit=None)
    pairs_links = anatomy_pairs.wire(context, c.pairs)
    return TabLinks(senders=[Sender("analysis", c.send_analysis, sent_result, [c.after])],
                    receiver=Receiver(c.inbox_path, on_received, opening),
                    on_show=[Handler(on_show, [c.annotator], [*document, *c.results, c.preset]), *pairs_links.on_show],
                    page_js=PAGE_JS)
