"""Synthesis tab: prompt builder, sampler/steps/seed/LoRA controls, gallery, dataset export."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from fetalstudio.app_context import AppContext
from fetalstudio.errors import FetalStudioError
from fetalstudio.models.entries import ModelKind
from fetalstudio.synthesis.dataset import DatasetRequest, export_dataset
from fetalstudio.synthesis.gallery import save_generated
from fetalstudio.pipelines.metadata import reproduction_from_png
from fetalstudio.pipelines.samplers import SAMPLERS, parse_sampler
from fetalstudio.pipelines.settings import GenerationSettings, LoraSpec
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, user_errors
from fetalstudio.ui.tab import Sender, TabLinks
from fetalstudio.vocabulary import HEAD_SUBJECT, PLANES, TRIMESTERS, prompt_for, subject_choices

LORA_SLOTS = 3
COLOR_CHOICES = [("Model default", "auto"), ("Grayscale", "grayscale"), ("RGB", "rgb")]
CUSTOM = "custom"
NO_LORA = ""
DATASETS_FOLDER = "datasets"


TITLE = "Synthesis"
ID = "synthesis"


@dataclass
class Controls:
    """The inputs that make up GenerationSettings."""

    model: gr.Dropdown
    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    sampler: gr.Dropdown
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    seed: gr.Number
    batch_size: gr.Slider
    batch_count: gr.Slider
    color: gr.Radio
    loras: list[gr.Dropdown]
    lora_weights: list[gr.Slider]

    def as_inputs(self) -> set:
        """The inputs of a handler that takes their values as one dict (see ``settings``)."""
        return {self.model, self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance, self.width,
                self.height, self.seed, self.batch_size, self.batch_count, self.color, *self.loras, *self.lora_weights}

    def settings(self, values: dict, default_prompt: str = "") -> GenerationSettings:
        """The settings from a handler's values keyed by component."""
        model = values[self.model]
        if not model:
            raise FetalStudioError("No generator model is selected. Install one (see the Models tab) and pick it.")
        seed = values[self.seed]
        specs = tuple(LoraSpec(values[lora], float(values[weight]))
                      for lora, weight in zip(self.loras, self.lora_weights) if values[lora])
        return GenerationSettings(
            model=model, prompt=values[self.prompt] or default_prompt, negative_prompt=values[self.negative_prompt] or "",
            sampler=values[self.sampler], steps=int(values[self.steps]), guidance_scale=float(values[self.guidance]),
            width=int(values[self.width]), height=int(values[self.height]), seed=int(seed) if seed is not None else -1,
            batch_size=int(values[self.batch_size]), batch_count=int(values[self.batch_count]), loras=specs,
            color=values[self.color] or "auto",
        )


@dataclass
class SynthesisComponents:
    controls: Controls
    rescan: gr.Button
    subject: gr.Dropdown
    trimester: gr.Dropdown
    generate: gr.Button
    cancel: gr.Button
    random_seed: gr.Button
    reuse_seed: gr.Button
    lora_accordion: gr.Accordion
    lora_rows: list[gr.Row]
    shown_slots: gr.State
    add_lora: gr.Button
    params_png: gr.File
    gallery: gr.Gallery
    status: gr.Markdown
    send: gr.Button
    send_anatomy: gr.Button
    last_seed: gr.State
    selected: gr.State
    export_planes: gr.CheckboxGroup
    export_samplers: gr.CheckboxGroup
    export_count: gr.Number
    export_seed: gr.Number
    export_name: gr.Textbox
    export: gr.Button
    export_status: gr.Markdown


def _sampler_choices() -> list[tuple[str, str]]:
    return [(s.label, s.key) for s in SAMPLERS.values()]


def picked_image(images, index, target: str = "Analysis") -> str:
    """The gallery image to send to another tab (``target`` names it in the error): the selected one, else the first."""
    if not images:
        raise FetalStudioError(f"Generate an image first, then select it in the gallery and send it to {target}.")
    entry = images[index] if isinstance(index, int) and 0 <= index < len(images) else images[0]
    return str(entry[0] if isinstance(entry, (list, tuple)) else entry)


def build(context: AppContext) -> SynthesisComponents:
    manager = context.manager
    generators = manager.ids(ModelKind.SD_PIPELINE)
    lora_ids = manager.ids(ModelKind.LORA)
    with gr.Row():
        with gr.Column(scale=2):
            gr.Markdown(_no_generator_note(context), visible=not generators, elem_id="no-generator-note")
            default_model = _default_generator(manager, generators)
            native_size = (manager.native_image_size(default_model) if default_model else None) or 512
            model = gr.Dropdown(generators, value=default_model, label="Generator model",
                                elem_id="synthesis-model", allow_custom_value=True,
                                info="An SD 1.x model id, or a path to a diffusers folder / .safetensors file")
            rescan = gr.Button("Rescan models", size="sm", elem_id="synthesis-rescan")
            with gr.Row():
                subject = gr.Dropdown([*subject_choices(), CUSTOM], value=PLANES[0].value, label="Subject", elem_id="synthesis-subject")
                trimester = gr.Dropdown([t.value for t in TRIMESTERS], value="second", label="Trimester", visible=False)
            prompt = gr.Textbox(prompt_for(PLANES[0].value), label="Prompt", lines=2, elem_id="synthesis-prompt")
            negative_prompt = gr.Textbox("", label="Negative prompt", lines=1)
            with gr.Row():  # right under the prompt: visible without scrolling on a 1366x768 screen
                generate = gr.Button("Generate", variant="primary", elem_id="synthesis-generate")
                cancel = gr.Button("Cancel", variant="stop", elem_id="synthesis-cancel")
            with gr.Row():
                sampler = gr.Dropdown(_sampler_choices(), value="euler", label="Sampler", elem_id="synthesis-sampler")
                steps = gr.Slider(1, 150, value=20, step=1, label="Steps")
                guidance = gr.Slider(0, 30, value=7.5, step=0.5, label="Guidance scale")
            with gr.Row():
                width = gr.Slider(64, 2048, value=native_size, step=8, label="Width", elem_id="synthesis-width")
                height = gr.Slider(64, 2048, value=native_size, step=8, label="Height", elem_id="synthesis-height")
            with gr.Row():
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="synthesis-seed")
                random_seed = gr.Button("Random seed", size="sm")
                reuse_seed = gr.Button("Reuse last seed", size="sm")
                batch_size = gr.Slider(1, 16, value=1, step=1, label="Batch size")
                batch_count = gr.Slider(1, 100, value=1, step=1, label="Batch count")
            color = gr.Radio(COLOR_CHOICES, value="auto", label="Output colour", elem_id="synthesis-color",
                             info="Model default: grey for models declared grayscale (the bundled fetalstudio-tiny), "
                                  "RGB otherwise. An image+mask LoRA's mask channel is always kept.")
            with gr.Accordion("LoRA", open=bool(lora_ids), elem_id="synthesis-lora-accordion") as lora_accordion:
                lora_dropdowns, lora_weights, lora_rows = [], [], []
                for slot in range(LORA_SLOTS):
                    with gr.Row(visible=slot == 0) as row:  # one slot; "Add a LoRA" shows the next
                        lora_dropdowns.append(gr.Dropdown([NO_LORA, *lora_ids], value=NO_LORA, label=f"LoRA {slot + 1}",
                                                          allow_custom_value=True, elem_id=f"synthesis-lora-{slot}"))
                        lora_weights.append(gr.Slider(0, 1.5, value=1.0, step=0.05, label="Weight"))
                    lora_rows.append(row)
                shown_slots = gr.State(1)
                add_lora = gr.Button("Add a LoRA", size="sm", elem_id="synthesis-add-lora")
            params_png = gr.File(label="Load parameters from PNG", file_types=[".png"], type="filepath", elem_id="synthesis-params-png")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Results", columns=4, height=520, format="png", type="filepath", interactive=False,
                                 buttons=["download", "fullscreen"], elem_id="synthesis-gallery")
            status = gr.Markdown("", elem_id="synthesis-status")
            with gr.Row():
                send = gr.Button("Send the selected image to Analysis", size="sm", elem_id="synthesis-send-analysis")
                send_anatomy = gr.Button("Send the selected image to the Anatomy editor", size="sm",
                                         elem_id="synthesis-send-anatomy")
            last_seed = gr.State(-1)
            selected = gr.State(0)
            with gr.Accordion("Dataset export", open=False, elem_id="dataset-export"):
                export_planes = gr.CheckboxGroup([p.value for p in PLANES], value=[p.value for p in PLANES], label="Planes")
                export_samplers = gr.CheckboxGroup(_sampler_choices(), value=["euler", "unipc"], label="Samplers")
                with gr.Row():
                    export_count = gr.Number(10, label="Images per plane and sampler", precision=0, minimum=1)
                    export_seed = gr.Number(0, label="Base seed (image i uses seed+i)", precision=0)
                    export_name = gr.Textbox("fu-lora-synthetic", label=f"Folder (under outputs/{DATASETS_FOLDER}/)")
                export = gr.Button("Export dataset", elem_id="dataset-export-run")
                export_status = gr.Markdown("", elem_id="dataset-export-status")

    controls = Controls(model, prompt, negative_prompt, sampler, steps, guidance, width, height, seed,
                        batch_size, batch_count, color, lora_dropdowns, lora_weights)
    return SynthesisComponents(
        controls, rescan, subject, trimester, generate, cancel, random_seed, reuse_seed, lora_accordion, lora_rows,
        shown_slots, add_lora, params_png, gallery, status, send, send_anatomy, last_seed, selected, export_planes, export_samplers,
        export_count, export_seed, export_name, export, export_status)


def wire(context: AppContext, c: SynthesisComponents) -> TabLinks:
    manager = context.manager
    controls = c.controls
    cancel_flags = CancelFlags()

    def on_add_lora(shown: int) -> dict:
        shown = min(int(shown) + 1, LORA_SLOTS)
        return {c.shown_slots: shown, **_lora_rows_shown(c, shown), c.add_lora: gr.update(visible=shown < LORA_SLOTS)}

    def on_subject(subject_value: str, trimester_value: str, current_prompt: str) -> dict:
        if subject_value == CUSTOM:
            return {c.trimester: gr.update(visible=False)}
        return {c.trimester: gr.update(visible=subject_value == HEAD_SUBJECT),
                controls.prompt: prompt_for(subject_value, trimester_value)}

    def on_rescan(current_model: str) -> dict:
        manager.refresh()
        models = manager.ids(ModelKind.SD_PIPELINE)
        loras = [NO_LORA, *manager.ids(ModelKind.LORA)]
        return {controls.model: gr.update(choices=models, value=current_model or (models[0] if models else None)),
                **{dropdown: gr.update(choices=loras) for dropdown in controls.loras}}

    def on_model(model_value: str) -> dict:
        """Switch the size to the one the chosen generator was trained at (when its configs say)."""
        size = manager.native_image_size(model_value) if model_value else None
        return {controls.width: size, controls.height: size} if size else gr.skip()

    def fetch_models(settings: GenerationSettings) -> None:
        for source in (settings.model, *(lora.source for lora in settings.loras)):
            manager.local_path(manager.entry(source))

    @user_errors
    def run_generation(values: dict, request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        settings = controls.settings(values).validated()
        fetch_models(settings)  # hub downloads happen here, where their tqdm bars reach the page
        events = _start_generation(context, settings, cancel_flags.fresh(request))
        paths: list[str] = []
        progress((0, settings.total_images), desc="Loading model…")
        while True:
            kind, *payload = events.get()
            if kind == "progress":
                done, total, step, steps_ = payload
                progress(done + step / steps_, total=total, desc=f"Image {done + 1}/{total}, step {step}/{steps_}", unit="images")
            elif kind == "image":
                paths.append(str(payload[0]))
                yield {c.gallery: paths, c.status: f"Generated {len(paths)}/{settings.total_images}…", c.last_seed: settings.seed}
            elif kind == "error":
                raise payload[0]
            else:
                yield {c.gallery: paths, c.status: _finished_line(settings, payload[0]), c.last_seed: settings.seed}
                return

    def on_select(event: gr.SelectData) -> int:
        return int(event.index)

    def cancel_job(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    @user_errors
    def load_parameters(path: str | None) -> dict:
        if not path:
            return {c.status: "Pick a PNG made by FetalStudio (or A1111)."}
        return _loaded_parameters(c, reproduction_from_png(Path(path)), set(manager.ids(ModelKind.SD_PIPELINE)))

    @user_errors
    def run_export(values: dict, request: gr.Request, progress=gr.Progress()) -> str:
        settings = controls.settings(values, default_prompt="dataset")
        planes, samplers = values[c.export_planes], values[c.export_samplers]
        if not planes or not samplers:
            raise FetalStudioError("Pick at least one plane and one sampler to export.")
        dataset = DatasetRequest(
            out_dir=_dataset_folder(context.outputs_dir, values[c.export_name]), model=settings.model,
            planes=tuple(planes), samplers=tuple(samplers), images_per_plane=int(values[c.export_count] or 0),
            steps=settings.steps, guidance_scale=settings.guidance_scale, width=settings.width, height=settings.height,
            seed=int(values[c.export_seed] or 0), batch_size=settings.batch_size, negative_prompt=settings.negative_prompt,
            loras=settings.loras, color=settings.color,
        )
        if dataset.images_per_plane < 1:
            raise FetalStudioError("Images per plane must be at least 1.")
        report = export_dataset(
            context.synthesis, dataset, cancel=cancel_flags.fresh(request),
            on_progress=lambda done, total, last: progress((done, total), desc=last or "Starting…", unit="images"),
        )
        state = "Cancelled" if report.cancelled else "Finished"
        return (f"{state}: {report.generated} new, {report.skipped} already there, {report.total} planned, in "
                f"`{report.out_dir}` (metadata.csv beside the images). Export again with the same settings to resume.")

    gpu = dict(concurrency_id=GPU_QUEUE, concurrency_limit=1)
    c.add_lora.click(on_add_lora, c.shown_slots, [c.shown_slots, *c.lora_rows, c.add_lora])
    c.rescan.click(on_rescan, controls.model, [controls.model, *controls.loras])
    # user picks only: loading PNG parameters keeps their size
    controls.model.input(on_model, controls.model, [controls.width, controls.height])
    c.subject.change(on_subject, [c.subject, c.trimester, controls.prompt], [c.trimester, controls.prompt])
    c.trimester.change(on_subject, [c.subject, c.trimester, controls.prompt], [c.trimester, controls.prompt])
    c.random_seed.click(lambda: -1, None, controls.seed)
    c.reuse_seed.click(lambda s: s, c.last_seed, controls.seed)
    c.generate.click(run_generation, controls.as_inputs(), [c.gallery, c.status, c.last_seed], **gpu)
    c.gallery.select(on_select, None, c.selected)
    c.cancel.click(cancel_job, None, None, concurrency_limit=None)
    c.params_png.upload(load_parameters, c.params_png, _parameter_outputs(c))
    export_inputs = {c.export_planes, c.export_samplers, c.export_count, c.export_seed, c.export_name, *controls.as_inputs()}
    c.export.click(run_export, export_inputs, c.export_status, **gpu)
    picked = [c.gallery, c.selected]
    return TabLinks(senders=[Sender("analysis", c.send, picked_image, picked),
                             Sender("anatomy", c.send_anatomy, partial(picked_image, target="the Anatomy editor"), picked)])


def _start_generation(context: AppContext, settings: GenerationSettings, cancel: threading.Event) -> queue.Queue:
    """Run the generation in a thread; its progress, images, result or error arrive on the returned queue
    as ("progress", done, total, step, steps), ("image", path), ("done", result) or ("error", exception)."""
    events: queue.Queue = queue.Queue()

    def work() -> None:
        try:
            result = context.synthesis.generate(
                settings, cancel=cancel,
                on_progress=lambda done, total, step, steps: events.put(("progress", done, total, step, steps)),
                on_image=lambda image: events.put(("image", save_generated(image, context.outputs_dir))),
            )
            events.put(("done", result))
        except Exception as error:  # re-raised in the handler thread
            events.put(("error", error))

    threading.Thread(target=work, daemon=True).start()
    return events


def _finished_line(settings: GenerationSettings, result) -> str:
    word = "Cancelled after" if result.cancelled else "Done:"
    return (f"{word} {len(result.images)} image(s) in {result.seconds:.1f} s — seeds {settings.seed}"
            f"…{settings.seed_for(max(len(result.images) - 1, 0))}, {parse_sampler(settings.sampler).label}, "
            f"{settings.steps} steps, {_color_word(result)}. Saved under outputs/synthesis/.")


def _lora_rows_shown(c: SynthesisComponents, shown: int) -> dict:
    return {row: gr.update(visible=slot < shown) for slot, row in enumerate(c.lora_rows)}


def _parameter_outputs(c: SynthesisComponents) -> list:
    """What loading parameters from a PNG sets."""
    controls = c.controls
    return [controls.model, c.subject, controls.prompt, controls.negative_prompt, controls.sampler, controls.steps,
            controls.guidance, controls.width, controls.height, controls.seed, controls.batch_size, controls.batch_count,
            controls.color, *controls.loras, *controls.lora_weights, *c.lora_rows, c.shown_slots, c.lora_accordion, c.status]


def _loaded_parameters(c: SynthesisComponents, reproduction, installed: set[str]) -> dict:
    """The controls set to a PNG's parameters: the image's whole batch (its seeds and size), because batched
    arithmetic differs from a lone image in the last bits."""
    controls = c.controls
    loaded = reproduction.settings
    shown = max(1, min(len(loaded.loras), LORA_SLOTS))
    values = {
        c.subject: CUSTOM, controls.prompt: loaded.prompt, controls.negative_prompt: loaded.negative_prompt,
        controls.sampler: loaded.sampler, controls.steps: loaded.steps, controls.guidance: loaded.guidance_scale,
        controls.width: loaded.width, controls.height: loaded.height, controls.seed: loaded.seed,
        controls.batch_size: loaded.batch_size, controls.batch_count: 1, controls.color: loaded.color,
        **_lora_rows_shown(c, shown), c.shown_slots: shown, c.lora_accordion: gr.update(open=bool(loaded.loras)),
    }
    if loaded.model in installed:
        values[controls.model] = loaded.model
    for slot, (lora, weight) in enumerate(zip(controls.loras, controls.lora_weights)):
        spec = loaded.loras[slot] if slot < len(loaded.loras) else None
        values[lora] = spec.source if spec else NO_LORA
        values[weight] = spec.weight if spec else 1.0
    note = "Parameters loaded" if loaded.model in installed else f"Parameters loaded; model {loaded.model!r} is not installed here, keep or pick another"
    if loaded.batch_size > 1:
        note += (f". The image was number {reproduction.index + 1} of a batch of {loaded.batch_size}: Generate remakes "
                 f"that batch, and its image {reproduction.index + 1} has the PNG's pixels exactly.")
    else:
        note += ": Generate gives the PNG's pixels exactly."
    values[c.status] = note
    return values


def _color_word(result) -> str:
    """The colour the engine resolved to (grey for models declared grayscale), as the status line says it."""
    if not result.images:
        return "no image"
    settings = result.images[0].settings
    if settings.color != "grayscale":
        return "RGB"
    return "grayscale" if settings.mask_channel is None else "grayscale image channels, mask channel kept"


def _dataset_folder(outputs_dir: Path, name: str) -> Path:
    """Datasets stay under outputs/datasets/: the UI never writes elsewhere on the machine."""
    cleaned = (name or "").strip()
    if not cleaned or "/" in cleaned or "\\" in cleaned or cleaned.startswith("."):
        raise FetalStudioError("The dataset folder must be a plain name (letters, digits, - or _), created under outputs/datasets/.")
    return outputs_dir / DATASETS_FOLDER / cleaned


def _default_generator(manager, generators: list[str]) -> str | None:
    """The manifest's default generator on disk; else the first known one (e.g. a hub entry to download)."""
    try:
        return manager.default_id(ModelKind.SD_PIPELINE)
    except FetalStudioError:
        return generators[0] if generators else None


def _no_generator_note(context: AppContext) -> str:
    try:
        context.manager.default_id(ModelKind.SD_PIPELINE)
        return ""
    except FetalStudioError as error:
        return f"**No generator installed.** {error}"
