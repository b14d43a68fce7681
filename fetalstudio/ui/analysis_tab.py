"""Analysis tab: plane prediction, box/point-prompted head segmentation with biometry, batch runs.

Each browser session gets its own ``AnalysisSession`` and cached predictor (segment-anything's
predictor holds one "current image" and must not be shared between users). The image is encoded
as soon as it is loaded, so drawing a box or clicking a point only runs the mask decoder.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator

from fetalstudio.analysis.batch import BatchInput, inputs_from_files, read_batch_inputs, run_batch, zip_folder
from fetalstudio.analysis.head import HeadResult, measurement_warnings
from fetalstudio.analysis.mask_export import MASK_FORMATS
from fetalstudio.analysis.models import (batch_models, classifier_choices, classifier_ids, load_plane_classifier,
                                         segmenter_choices, segmenter_id)
from fetalstudio.analysis.segment import CachedPredictor
from fetalstudio.analysis.session import AnalysisSession, checked_pixel_size
from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError, ModelNotFoundError
from fetalstudio.imaging.extract import fit_label
from fetalstudio.imaging.files import atomic_write_bytes, write_png
from fetalstudio.imaging.image_input import load_image, model_view, supported_suffixes
from fetalstudio.paths import app_file
from fetalstudio.segmentation.predictor import BoxPromptPredictor
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, server_source, user_errors
from fetalstudio.ui.tab import Handler, Receiver, Sender, TabLinks

TITLE = "Analysis"
ID = "analysis"

ANALYSIS_FOLDER = "analysis"
#: The longest side of the pictures sent to the browser; coordinates are scaled back to the file's pixels.
DISPLAY_SIDE = 1024
NO_IMAGE = "No image loaded: upload one to start."
POSITIVE, NEGATIVE = "Positive point (on the head)", "Negative point (not head)"
MAX_USERS = 32
#: The annotator reports a box as soon as the mouse goes down; smaller ones (display pixels) are not prompts yet.
MIN_DRAWN_BOX_PX = 4


@dataclass
class UserAnalysis:
    """One browser session's analysis and its cached predictor (one segmenter's embeddings at a time)."""

    session: AnalysisSession = field(default_factory=AnalysisSession)
    predictor: CachedPredictor | None = None
    segmenter: str | None = None
    display_factor: float = 1.0  # original pixels per displayed pixel


@dataclass(frozen=True)
class AnalysedImage:
    """The file (and frame) the tab analyses, kept per browser (a server-side state) to send it to another tab."""

    path: str
    frame: int = 0
    frame_count: int = 1


class UserAnalyses:
    """Per-browser-session state, the least recently used dropped beyond ``capacity`` users."""

    def __init__(self, capacity: int = MAX_USERS) -> None:
        self.capacity = capacity
        self._users: OrderedDict[str, UserAnalysis] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, request: gr.Request | None) -> UserAnalysis:
        key = getattr(request, "session_hash", None) or "default"
        with self._lock:
            user = self._users.get(key)
            if user is None:
                user = self._users[key] = UserAnalysis()
            self._users.move_to_end(key)
            while len(self._users) > self.capacity:
                self._users.popitem(last=False)
            return user


def _fmt(value: float | None, unit: str, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f} {unit}"


def measurement_text(session: AnalysisSession) -> str:
    result = session.result
    if session.image is None:
        return ""
    if result is None:
        return "Draw a box around the head, click on it, or press **Find the head automatically**."
    head = result.measurement
    lines = [f"**Mask**: predicted IoU {result.score:.3f} · box from {'the automatic mode' if result.box_source == 'auto' else 'your prompt'}"
             + (" · edge refined with the head U-Net" if result.fused_with_head_unet else "")
             + (f" · candidate {result.selected + 1} of {len(result.candidates)}" if len(result.candidates) > 1 else "")]
    if head.biometry is None:
        lines.append(f"No ellipse: {head.reason}.")
        return "\n\n".join(lines)
    bio = head.biometry
    if bio.pixel_size_mm is not None:
        source = {"dicom": "from the DICOM header", "typed": "typed in"}.get(session.pixel_size_source or "", "")
        lines.append(f"**HC {_fmt(bio.hc_mm, 'mm')}** · BPD {_fmt(bio.bpd_mm, 'mm')} · OFD {_fmt(bio.ofd_mm, 'mm')} "
                     f"(pixel size {bio.pixel_size_mm:.4g} mm {source})")
    else:
        lines.append(f"**HC {bio.hc_px:.1f} px** · BPD {bio.bpd_px:.1f} px · OFD {bio.ofd_px:.1f} px — "
                     "type the pixel size (mm per pixel) to get millimetres.")
    warnings = measurement_warnings(dict(session.planes) if session.planes else None, head)
    lines.extend(f"⚠ **{warning}**" for warning in warnings)
    if head.quality is not None and not warnings:
        lines.append(f"Ellipse {fit_label(head.quality)}")
    return "\n\n".join(lines)


def image_text(session: AnalysisSession) -> str:
    image = session.image
    if image is None:
        return ""
    parts = [f"**{image.path.name}** · {image.size[0]}×{image.size[1]} px · {image.kind}"]
    if image.frame_count > 1:
        parts.append(f"frame {image.frame + 1} of {image.frame_count}")
    if image.bit_depth > 8:
        parts.append(f"{image.bit_depth}-bit, scaled to 8-bit")
    source = {"dicom": "DICOM", "typed": "typed in"}.get(session.pixel_size_source or "", "")
    parts.append(f"pixel size {session.pixel_size_mm:.4g} mm ({source})" if session.pixel_size_mm else "pixel size unknown")
    return " · ".join(parts)


def default_models(manager) -> tuple[list[str], str | None]:
    """The classifier and segmenter that run when none is chosen (the manifest's defaults), shown
    in the dropdowns so the user sees which models ran; nothing when none is installed."""
    try:
        classifiers = classifier_ids(manager)
    except ModelNotFoundError:
        classifiers = []
    try:
        segmenter = segmenter_id(manager)
    except ModelNotFoundError:
        segmenter = None
    return classifiers, segmenter


@dataclass
class AnalysisComponents:
    upload: gr.File
    inbox_path: gr.State
    analysed: gr.State
    image_info: gr.Markdown
    send_anatomy: gr.Button
    frame: gr.Number
    annotator: image_annotator
    picture: gr.Image
    point_kind: gr.Radio
    clear: gr.Button
    status: gr.Markdown
    planes: gr.Label
    classifier: gr.Dropdown
    segmenter: gr.Dropdown
    saliency_button: gr.Button
    saliency: gr.Image
    auto: gr.Button
    multimask: gr.Checkbox
    candidate: gr.Radio
    box_x0: gr.Number
    box_y0: gr.Number
    box_x1: gr.Number
    box_y1: gr.Number
    coords: gr.Button
    pixel_size: gr.Number
    measurements: gr.Markdown
    downloads: gr.File
    batch_source: gr.Textbox
    batch_files: gr.File
    batch_name: gr.Textbox
    batch_tasks: gr.CheckboxGroup
    batch_pixel: gr.Number
    batch_formats: gr.CheckboxGroup
    batch_heads_only: gr.Checkbox
    batch_run: gr.Button
    batch_cancel: gr.Button
    batch_status: gr.Markdown
    batch_table: gr.Dataframe
    batch_downloads: gr.File

    @property
    def box_fields(self) -> list:
        return [self.box_x0, self.box_y0, self.box_x1, self.box_y1]

    @property
    def result_components(self) -> list:
        """What a new segmentation result sets."""
        return [self.picture, self.measurements, self.downloads, self.candidate, *self.box_fields]

    @property
    def load_outputs(self) -> list:
        """What loading an image sets (and clearing the upload empties)."""
        return [self.analysed, self.annotator, self.image_info, self.frame, self.pixel_size, self.status, self.planes, self.saliency,
                *self.result_components]


def build(context: AppContext) -> AnalysisComponents:
    manager = context.manager
    default_classifiers, default_segmenter = default_models(manager)
    gr.Markdown("Which standard plane is this, where is the fetal head, how big is it. "
                "Research use only — not for diagnosis.")
    with gr.Row():
        with gr.Column(scale=3):
            upload = gr.File(label=f"Image ({', '.join(supported_suffixes())})", type="filepath", elem_id="analysis-upload",
                             file_types=list(supported_suffixes()), height=110)
            inbox_path = gr.State(None)
            analysed = gr.State(None)  # AnalysedImage of the loaded image
            image_info = gr.Markdown("", elem_id="analysis-image-info")
            send_anatomy = gr.Button("Send this image to the Anatomy editor", size="sm", elem_id="analysis-send-anatomy")
            frame = gr.Number(0, label="Frame (multi-frame DICOM)", precision=0, minimum=0, visible=False, elem_id="analysis-frame")
            annotator = image_annotator(label="Draw a box around the head", label_list=["head"], label_colors=[(0, 200, 255)],
                                        single_box=True, use_default_label=True, sources=[], image_type="filepath", show_clear_button=False,
                                        elem_id="analysis-annotator", height=460)
            picture = gr.Image(label="Result — click to add a point", type="filepath", interactive=False,
                               elem_id="analysis-picture", height=460)
            with gr.Row():
                point_kind = gr.Radio([POSITIVE, NEGATIVE], value=POSITIVE, label="A click on the result adds", elem_id="analysis-point-kind")
                clear = gr.Button("Clear box and points", size="sm", elem_id="analysis-clear")
        with gr.Column(scale=2):
            status = gr.Markdown("Load an image to start.", elem_id="analysis-status")
            planes = gr.Label(label="Plane", num_top_classes=3, elem_id="analysis-planes")
            with gr.Row():
                classifier = gr.Dropdown(classifier_choices(manager), value=default_classifiers, multiselect=True,
                                         allow_custom_value=True, label="Classifier(s) — several are averaged", elem_id="analysis-classifier")
                segmenter = gr.Dropdown(segmenter_choices(manager), value=default_segmenter, allow_custom_value=True,
                                        label="Segmenter (or SAM checkpoint)", elem_id="analysis-segmenter")
            saliency_button = gr.Button("Show saliency (Grad-CAM)", size="sm", elem_id="analysis-saliency-run")
            saliency = gr.Image(label="Saliency for the predicted plane", type="filepath", interactive=False, visible=False,
                                elem_id="analysis-saliency", height=260)
            auto = gr.Button("Find the head automatically", variant="primary", elem_id="analysis-auto")
            multimask = gr.Checkbox(False, label="Multimask: three candidate masks (SAM checkpoints)", elem_id="analysis-multimask")
            candidate = gr.Radio([], label="Candidate mask", visible=False, elem_id="analysis-candidate")
            with gr.Accordion("Box by coordinates (pixels of the file)", open=False):
                with gr.Row():
                    box_x0 = gr.Number(label="x min", elem_id="analysis-x0")
                    box_y0 = gr.Number(label="y min", elem_id="analysis-y0")
                    box_x1 = gr.Number(label="x max", elem_id="analysis-x1")
                    box_y1 = gr.Number(label="y max", elem_id="analysis-y1")
                coords = gr.Button("Segment with this box", size="sm", elem_id="analysis-coords")
            pixel_size = gr.Number(0, label="Pixel size (mm per pixel; 0 = unknown)", minimum=0, elem_id="analysis-pixel-size")
            measurements = gr.Markdown("", elem_id="analysis-measurements")
            downloads = gr.File(label="Mask PNG and measurements JSON", file_count="multiple", interactive=False, elem_id="analysis-downloads")

    with gr.Accordion("Batch: a folder or CSV of images → report", open=False, elem_id="analysis-batch"):
        with gr.Row():
            batch_source = gr.Textbox(label="Folder or CSV on this computer (CSV: image[, mask, pixel_size_mm, hc_mm])",
                                      placeholder="/data/hc18/pairs.csv", elem_id="analysis-batch-source", scale=3)
            batch_files = gr.File(label="…or upload images", file_count="multiple", type="filepath", elem_id="analysis-batch-files", scale=2)
        with gr.Row():
            batch_name = gr.Textbox("batch-1", label=f"Run name (folder under outputs/{ANALYSIS_FOLDER}/batches/; the same name resumes)",
                                    elem_id="analysis-batch-name")
            batch_tasks = gr.CheckboxGroup(["classify", "segment"], value=["classify", "segment"], label="Run", elem_id="analysis-batch-tasks")
            batch_pixel = gr.Number(0, label="Pixel size for images without one (mm; 0 = unknown)", minimum=0)
            batch_formats = gr.CheckboxGroup(list(MASK_FORMATS), value=[], label="Mask exports", elem_id="analysis-batch-formats")
            batch_heads_only = gr.Checkbox(False, label="Measure heads only on head planes (skip abdomen, femur, thorax, other)",
                                           info="Needs both classify and segment", elem_id="analysis-batch-heads-only")
        with gr.Row():
            batch_run = gr.Button("Run batch", variant="primary", elem_id="analysis-batch-run")
            batch_cancel = gr.Button("Cancel", variant="stop", elem_id="analysis-batch-cancel")
        batch_status = gr.Markdown("", elem_id="analysis-batch-status")
        batch_table = gr.Dataframe(label="Report", interactive=False, elem_id="analysis-batch-table", max_height=320)
        batch_downloads = gr.File(label="Report CSV, overlays and exports (zip)", file_count="multiple", interactive=False,
                                  elem_id="analysis-batch-downloads")
    return AnalysisComponents(
        upload, inbox_path, analysed, image_info, send_anatomy, frame, annotator, picture, point_kind, clear, status, planes, classifier,
        segmenter, saliency_button, saliency, auto, multimask, candidate, box_x0, box_y0, box_x1, box_y1, coords,
        pixel_size, measurements, downloads, batch_source, batch_files, batch_name, batch_tasks, batch_pixel,
        batch_formats, batch_heads_only, batch_run, batch_cancel, batch_status, batch_table, batch_downloads)


def wire(context: AppContext, c: AnalysisComponents) -> TabLinks:
    manager = context.manager
    users = UserAnalyses()
    cancel_flags = CancelFlags()
    root = context.outputs_dir / ANALYSIS_FOLDER

    # --- helpers ---------------------------------------------------------------------------
    def predictor_for(user: UserAnalysis, chosen: str | None) -> CachedPredictor:
        model_id = segmenter_id(manager, chosen or None)
        model = manager.get(model_id)
        if user.predictor is None or user.segmenter != model_id or user.predictor.predictor.model is not model:
            user.predictor, user.segmenter = CachedPredictor(BoxPromptPredictor(model), manager=manager), model_id
        user.session.model_ids["segmenter"] = model_id
        return user.predictor

    def result_outputs(user: UserAnalysis, request: gr.Request | None) -> dict:
        """The result panel (picture, measurements, files, candidates, box) for the user's session."""
        session = user.session
        result: HeadResult | None = session.result
        files = None
        if result is not None:
            key = (getattr(request, "session_hash", None) or "default")[:12]
            files = [str(p) for p in session.save_outputs(root / "results" / re.sub(r"[^A-Za-z0-9_-]", "_", key))]
        box = session.box or (None, None, None, None)
        choices = [] if result is None else [f"{i + 1}: IoU {c_.score:.3f}" for i, c_ in enumerate(result.candidates)]
        candidate_update = gr.update(choices=choices, value=choices[result.selected] if choices else None, visible=len(choices) > 1)
        return {c.picture: display_file(root, session.picture(), "result")[0], c.measurements: measurement_text(session),
                c.downloads: files, c.candidate: candidate_update,
                **{field: None if v is None else round(v, 1) for field, v in zip(c.box_fields, box)}}

    # --- loading ---------------------------------------------------------------------------
    @user_errors
    def load(path: str | None, frame_number, request: gr.Request) -> dict:
        if not path:
            raise FetalStudioError("Choose an image file to analyse.")
        user = users.get(request)
        image = user.session.load(app_file(path), int(frame_number or 0))
        view_path, user.display_factor = display_file(root, image.gray, "image")
        return {c.analysed: AnalysedImage(str(image.path), image.frame, image.frame_count),
                c.annotator: {"image": view_path, "boxes": []}, c.image_info: image_text(user.session),
                c.frame: gr.update(visible=image.frame_count > 1, maximum=image.frame_count - 1, value=image.frame),
                c.pixel_size: image.pixel_size_mm or 0, c.status: "⏳ Encoding the image…", c.planes: None,
                c.saliency: gr.update(visible=False), **result_outputs(user, request)}

    def on_upload_cleared(request: gr.Request) -> dict:
        """The upload's ✕: forget the image and everything computed from it, and say so."""
        users.get(request).session = AnalysisSession()
        return {c.analysed: None, c.annotator: None, c.image_info: "", c.frame: gr.update(visible=False, value=0), c.pixel_size: 0,
                c.status: NO_IMAGE, c.planes: None, c.saliency: gr.update(value=None, visible=False), c.picture: None,
                c.measurements: "", c.downloads: None, c.candidate: gr.update(choices=[], value=None, visible=False),
                **dict.fromkeys(c.box_fields)}

    @user_errors
    def encode_and_classify(chosen_classifiers, chosen_segmenter, request: gr.Request) -> dict:
        user = users.get(request)
        session = user.session
        if session.image is None:
            return {c.status: NO_IMAGE, c.planes: None, c.measurements: ""}
        started = time.perf_counter()
        encoded = session.encode(predictor_for(user, chosen_segmenter))
        encode_seconds = time.perf_counter() - started
        ids = classifier_ids(manager, chosen_classifiers or [])
        session.model_ids["classifier"] = ",".join(ids)
        ranking = session.classify(load_plane_classifier(manager, ids), k=5)
        if user.session is not session:  # the upload was cleared meanwhile
            return {c.status: NO_IMAGE, c.planes: None, c.measurements: ""}
        note = f"encoded in {encode_seconds:.2f} s" if encoded else "embedding reused from the cache"
        # the measurement's warnings depend on the plane (a head measured before a classifier change)
        return {c.status: f"✔ Ready ({note}): draw a box around the head, click on it, or find it automatically.",
                c.planes: dict(ranking), c.measurements: measurement_text(session)}

    def receive(path: str, request: gr.Request) -> dict:
        return load(path, 0, request)

    # --- prompts ---------------------------------------------------------------------------
    def segment(user: UserAnalysis, chosen_segmenter, multimask_on: bool, auto_mode: bool = False) -> None:
        user.session.segment(predictor_for(user, chosen_segmenter), multimask=bool(multimask_on), auto=auto_mode)

    @user_errors
    def on_box(value, chosen_segmenter, multimask_on, request: gr.Request):
        user = users.get(request)
        boxes = (value or {}).get("boxes") or []
        if user.session.image is None or not boxes:
            return gr.skip()
        box = boxes[-1]
        if min(box["xmax"] - box["xmin"], box["ymax"] - box["ymin"]) < MIN_DRAWN_BOX_PX:
            return gr.skip()  # a box being started, not drawn yet
        factor = user.display_factor
        user.session.set_box([box["xmin"] * factor, box["ymin"] * factor, box["xmax"] * factor, box["ymax"] * factor])
        segment(user, chosen_segmenter, multimask_on)
        return result_outputs(user, request)

    @user_errors
    def on_click(kind: str, chosen_segmenter, multimask_on, event: gr.SelectData, request: gr.Request):
        user = users.get(request)
        user.session.require_image()
        x, y = event.index
        user.session.add_point(x * user.display_factor, y * user.display_factor, positive=(kind != NEGATIVE))
        segment(user, chosen_segmenter, multimask_on)
        return result_outputs(user, request)

    @user_errors
    def on_auto(chosen_segmenter, multimask_on, request: gr.Request):
        user = users.get(request)
        user.session.require_image()
        segment(user, chosen_segmenter, multimask_on, auto_mode=True)
        return result_outputs(user, request)

    @user_errors
    def on_coords(x0, y0, x1, y1, chosen_segmenter, multimask_on, request: gr.Request):
        user = users.get(request)
        if any(v is None for v in (x0, y0, x1, y1)):
            raise FetalStudioError("Fill in all four box coordinates (x min, y min, x max, y max) in the file's pixels.")
        user.session.set_box([x0, y0, x1, y1])
        segment(user, chosen_segmenter, multimask_on)
        return result_outputs(user, request)

    @user_errors
    def on_multimask(chosen_segmenter, multimask_on, request: gr.Request):
        user = users.get(request)
        if user.session.result is None:
            return gr.skip()
        if multimask_on and not predictor_for(user, chosen_segmenter).predictor.multimask_trained:
            gr.Info("This segmenter was trained with one mask output: it gives one candidate. SAM checkpoints give three.")
        segment(user, chosen_segmenter, multimask_on, auto_mode=user.session.result.box_source == "auto" and not user.session.points)
        return result_outputs(user, request)

    @user_errors
    def on_candidate(choice: str | None, request: gr.Request):
        user = users.get(request)
        if not choice or user.session.result is None:
            return gr.skip()
        user.session.choose_candidate(int(choice.split(":")[0]) - 1)
        return result_outputs(user, request)

    @user_errors
    def on_clear(request: gr.Request):
        user = users.get(request)
        user.session.clear_prompts()
        if user.session.image is None:
            return gr.skip()
        return result_outputs(user, request)

    @user_errors
    def on_pixel_size(value, request: gr.Request):
        user = users.get(request)
        user.session.set_pixel_size(value)
        if user.session.image is None:
            return gr.skip()
        return {c.image_info: image_text(user.session), **result_outputs(user, request)}

    @user_errors
    def on_saliency(chosen_classifiers, request: gr.Request):
        from fetalstudio.analysis.saliency import grad_cam, saliency_overlay

        user = users.get(request)
        image = user.session.require_image()
        classifier_model = load_plane_classifier(manager, classifier_ids(manager, chosen_classifiers or []))
        cam = grad_cam(classifier_model, image.gray)
        path, _ = display_file(root, saliency_overlay(image.gray, cam.heatmap), "saliency")
        return gr.update(value=path, visible=True, label=f"Saliency for {cam.plane} ({cam.probability:.2f})")

    # --- batch -----------------------------------------------------------------------------
    def batch_inputs(source: str, files: list[str] | None) -> list[BatchInput]:
        if files:
            return inputs_from_files([Path(p) for p in files])
        if not (source or "").strip():
            raise FetalStudioError("Give a folder or CSV path, or upload images, to run a batch.")
        return read_batch_inputs(server_source(context, source, "a folder or CSV of images", listed=lambda path: [
            file for item in read_batch_inputs(path) for file in (item.image, item.mask) if file is not None]))

    @user_errors
    def on_batch(source, files, name, tasks, pixel, formats, heads_only, chosen_classifiers, chosen_segmenter,
                 request: gr.Request, progress=gr.Progress()) -> dict:
        import pandas as pd

        inputs = batch_inputs(source, files)
        out = _batch_folder(root, name)
        tasks = tasks or []
        settings, classifier_model, predictor = batch_models(
            manager, classify="classify" in tasks, segment="segment" in tasks, classifiers=chosen_classifiers or [],
            segmenter=chosen_segmenter or None, pixel_size_mm=checked_pixel_size(pixel), formats=formats or (),
            measure_heads_only=bool(heads_only))
        flag = cancel_flags.fresh(request)
        progress(0, desc=f"0 of {len(inputs)} images")

        def step(done: int, total: int, item: str) -> None:
            progress(done / total, desc=f"{done} of {total}: {item}")

        summary = run_batch(inputs, out, settings, classifier_model, predictor, progress=step, cancel=flag)
        table = pd.read_csv(out / "report.csv", keep_default_na=False)
        shown = [column for column in BATCH_COLUMNS if column in table.columns]
        files_out = [str(out / "report.csv")]
        if any((out / "overlays").iterdir()):
            files_out.append(str(zip_folder(out / "overlays", out / "overlays.zip")))
        if summary.exports:
            files_out.append(str(zip_folder(out / "exports", out / "exports.zip")))
        return {c.batch_status: _batch_summary(summary, out), c.batch_table: table[shown], c.batch_downloads: files_out}

    def on_cancel(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    gpu = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
    results = c.result_components
    load_outputs = c.load_outputs
    follow_up = Handler(encode_and_classify, [c.classifier, c.segmenter], [c.status, c.planes, c.measurements], gpu=True)
    c.upload.upload(load, [c.upload, c.frame], load_outputs).success(**follow_up.listener())
    c.upload.clear(on_upload_cleared, None, load_outputs)
    c.frame.submit(load, [c.upload, c.frame], load_outputs).success(**follow_up.listener())
    c.classifier.change(**follow_up.listener())
    c.segmenter.change(**follow_up.listener())  # encode the image for the newly chosen segmenter
    c.annotator.change(on_box, [c.annotator, c.segmenter, c.multimask], results, **gpu)
    c.picture.select(on_click, [c.point_kind, c.segmenter, c.multimask], results, **gpu)
    c.auto.click(on_auto, [c.segmenter, c.multimask], results, **gpu)
    for trigger in (c.coords.click, *(box_field.submit for box_field in c.box_fields)):  # the button, or Enter in a field
        trigger(on_coords, [*c.box_fields, c.segmenter, c.multimask], results, **gpu)
    c.multimask.change(on_multimask, [c.segmenter, c.multimask], results, **gpu)
    c.candidate.input(on_candidate, [c.candidate], results)
    c.clear.click(on_clear, None, results)
    c.pixel_size.input(on_pixel_size, [c.pixel_size], [c.image_info, *results])
    c.saliency_button.click(on_saliency, [c.classifier], [c.saliency], **gpu)
    c.batch_run.click(on_batch, [c.batch_source, c.batch_files, c.batch_name, c.batch_tasks, c.batch_pixel, c.batch_formats,
                                 c.batch_heads_only, c.classifier, c.segmenter], [c.batch_status, c.batch_table, c.batch_downloads], **gpu)
    c.batch_cancel.click(on_cancel, None, None, concurrency_limit=None)
    return TabLinks(senders=[Sender("anatomy", c.send_anatomy, lambda analysed: analysed_image_path(analysed, root), [c.analysed])],
                    receiver=Receiver(c.inbox_path, receive, load_outputs, follow_up=follow_up))


def analysed_image_path(analysed: AnalysedImage | None, root: Path) -> str:
    """The analysed image as a file another tab opens: the file itself, or, for one frame of a multi-frame
    DICOM, a PNG of that frame under ``root``/sent (a receiving tab opens a file's first frame)."""
    if analysed is None:
        raise FetalStudioError("Load an image first (upload one, or send one from another tab), then send it to the Anatomy editor.")
    if analysed.frame_count == 1:
        return analysed.path
    frame = load_image(analysed.path, analysed.frame)
    digest = hashlib.sha256(analysed.path.encode("utf-8")).hexdigest()[:12]  # two users' files of one name stay apart
    out = root / "sent" / f"{Path(analysed.path).stem}_{digest}_frame{analysed.frame}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_png(out, frame.gray)
    return str(out)


BATCH_COLUMNS = ("name", "status", "plane", "plane_probability", "hc_mm", "bpd_mm", "ofd_mm", "hc_px", "warning",
                 "score", "dice", "hc_error_mm", "error")


def display_file(root: Path, rgb_or_gray: np.ndarray, kind: str) -> tuple[str, float]:
    """A PNG of the picture at display size under outputs/analysis/.view (served to the browser),
    and the factor from its pixels back to the picture's."""
    view, factor = model_view(rgb_or_gray, DISPLAY_SIDE)
    folder = root / ".view"
    folder.mkdir(parents=True, exist_ok=True)
    image = cv2.cvtColor(view, cv2.COLOR_RGB2BGR) if view.ndim == 3 else view
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    data = encoded.tobytes()
    path = folder / f"{kind}-{hashlib.blake2b(data, digest_size=10).hexdigest()}.png"
    if not path.exists():
        atomic_write_bytes(path, data)
    return str(path), factor


def _batch_folder(root: Path, name: str) -> Path:
    cleaned = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,80}", cleaned):
        raise FetalStudioError("A run name must be a plain name (letters, digits, '.', '-' or '_'), e.g. clinic-2026-11.")
    return root / "batches" / cleaned


def _batch_summary(summary, out: Path) -> str:
    lines = [f"{'Cancelled' if summary.cancelled else 'Done'}: {summary.done} analysed, {summary.skipped} from an earlier run, "
             f"{summary.errors} unreadable, of {summary.images} · `{out}`"]
    if summary.warned:
        skipped = f", {summary.heads_not_measured} of them not measured (not a head plane)" if summary.heads_not_measured else ""
        lines.append(f"⚠ {summary.warned} with a warning in the report's warning column{skipped}")
    if summary.mean_dice is not None:
        lines.append(f"Mean Dice vs the given masks {summary.mean_dice:.3f} (median {summary.median_dice:.3f}, n={summary.dice_count})")
    if summary.hc_mae_mm is not None:
        lines.append(f"HC mean absolute error {summary.hc_mae_mm:.2f} mm (n={summary.hc_count})")
    return "\n\n".join(lines)
