"""Synthesis tab: prompt builder, sampler/steps/seed/LoRA controls, gallery, dataset export."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
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
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, SendToAnalysis, user_errors
from fetalstudio.vocabulary import HEAD_SUBJECT, PLANES, TRIMESTERS, prompt_for, subject_choices

LORA_SLOTS = 3  # the handlers below spell out three (LoRA, weight) pairs
COLOR_CHOICES = [("Model default", "auto"), ("Grayscale", "grayscale"), ("RGB", "rgb")]
CUSTOM = "custom"
NO_LORA = ""
DATASETS_FOLDER = "datasets"


@dataclass
class Controls:
    """The inputs that make up GenerationSettings, in handler argument order."""

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

    def as_inputs(self) -> list:
        lora_pairs = [c for pair in zip(self.loras, self.lora_weights) for c in pair]
        return [self.model, self.prompt, self.negative_prompt, self.sampler, self.steps, self.guidance,
                self.width, self.height, self.seed, self.batch_size, self.batch_count, self.color, *lora_pairs]


def settings_from_inputs(values: tuple) -> GenerationSettings:
    model, prompt, negative, sampler, steps, guidance, width, height, seed, batch_size, batch_count, color, *loras = values
    if not model:
        raise FetalStudioError("No generator model is selected. Install one (see the Models tab) and pick it.")
    specs = tuple(LoraSpec(loras[i], float(loras[i + 1])) for i in range(0, len(loras), 2) if loras[i])
    return GenerationSettings(
        model=model, prompt=prompt or "", negative_prompt=negative or "", sampler=sampler, steps=int(steps),
        guidance_scale=float(guidance), width=int(width), height=int(height),
        seed=int(seed) if seed is not None else -1, batch_size=int(batch_size), batch_count=int(batch_count),
        loras=specs, color=color or "auto",
    )


def _sampler_choices() -> list[tuple[str, str]]:
    return [(s.label, s.key) for s in SAMPLERS.values()]


def picked_image(images, index) -> str:
    """The gallery image to send to Analysis: the selected one, else the first."""
    if not images:
        raise FetalStudioError("Generate an image first, then select it in the gallery and send it to Analysis.")
    entry = images[index] if isinstance(index, int) and 0 <= index < len(images) else images[0]
    return str(entry[0] if isinstance(entry, (list, tuple)) else entry)


def render(context: AppContext) -> SendToAnalysis:
    manager = context.manager
    cancel_flags = CancelFlags()
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
            send = gr.Button("Send the selected image to Analysis", size="sm", elem_id="synthesis-send-analysis")
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

    def on_add_lora(shown: int):
        shown = min(int(shown) + 1, LORA_SLOTS)
        return [shown, *[gr.update(visible=slot < shown) for slot in range(LORA_SLOTS)],
                gr.update(visible=shown < LORA_SLOTS)]

    add_lora.click(on_add_lora, shown_slots, [shown_slots, *lora_rows, add_lora])

    def on_subject(subject_value: str, trimester_value: str, current_prompt: str):
        if subject_value == CUSTOM:
            return gr.update(visible=False), current_prompt
        return gr.update(visible=subject_value == HEAD_SUBJECT), prompt_for(subject_value, trimester_value)

    def on_rescan(current_model: str):
        manager.refresh()
        models = manager.ids(ModelKind.SD_PIPELINE)
        loras = [NO_LORA, *manager.ids(ModelKind.LORA)]
        return [gr.update(choices=models, value=current_model or (models[0] if models else None)),
                *[gr.update(choices=loras) for _ in range(LORA_SLOTS)]]

    def on_model(model_value: str, width_value: int, height_value: int):
        """Switch the size to the one the chosen generator was trained at (when its configs say)."""
        size = manager.native_image_size(model_value) if model_value else None
        return (size, size) if size else (width_value, height_value)

    rescan.click(on_rescan, model, [model, *lora_dropdowns])
    model.input(on_model, [model, width, height], [width, height])  # user picks only: loading PNG parameters keeps their size
    subject.change(on_subject, [subject, trimester, prompt], [trimester, prompt])
    trimester.change(on_subject, [subject, trimester, prompt], [trimester, prompt])
    random_seed.click(lambda: -1, None, seed)
    reuse_seed.click(lambda s: s, last_seed, seed)

    @user_errors
    def run_generation(model_, prompt_, negative_, sampler_, steps_, guidance_, width_, height_, seed_, batch_size_,
                       batch_count_, color_, lora_1, weight_1, lora_2, weight_2, lora_3, weight_3,
                       request: gr.Request, progress=gr.Progress(track_tqdm=True)):
        # Gradio injects request/progress by position, so the inputs are spelled out (no *args).
        settings = settings_from_inputs((model_, prompt_, negative_, sampler_, steps_, guidance_, width_, height_, seed_,
                                         batch_size_, batch_count_, color_, lora_1, weight_1, lora_2, weight_2, lora_3,
                                         weight_3)).validated()
        _fetch_models(settings)  # hub downloads happen here, where their tqdm bars reach the page
        flag = cancel_flags.fresh(request)
        events: queue.Queue = queue.Queue()

        def work():
            try:
                result = context.synthesis.generate(
                    settings, cancel=flag,
                    on_progress=lambda done, total, step, steps_: events.put(("progress", done, total, step, steps_)),
                    on_image=lambda image: events.put(("image", save_generated(image, context.outputs_dir))),
                )
                events.put(("done", result))
            except Exception as error:  # re-raised in the handler thread
                events.put(("error", error))

        threading.Thread(target=work, daemon=True).start()
        paths: list[str] = []
        progress((0, settings.total_images), desc="Loading model…")
        while True:
            event = events.get()
            kind = event[0]
            if kind == "progress":
                _, done, total, step, steps_ = event
                progress(done + step / steps_, total=total, desc=f"Image {done + 1}/{total}, step {step}/{steps_}", unit="images")
            elif kind == "image":
                paths.append(str(event[1]))
                yield paths, f"Generated {len(paths)}/{settings.total_images}…", settings.seed
            elif kind == "error":
                raise event[1]
            else:
                result = event[1]
                word = "Cancelled after" if result.cancelled else "Done:"
                message = (f"{word} {len(result.images)} image(s) in {result.seconds:.1f} s — seeds {settings.seed}"
                           f"…{settings.seed_for(max(len(result.images) - 1, 0))}, {parse_sampler(settings.sampler).label}, "
                           f"{settings.steps} steps, {_color_word(result)}. Saved under outputs/synthesis/.")
                yield paths, message, settings.seed
                return

    generate.click(run_generation, controls.as_inputs(), [gallery, status, last_seed],
                   concurrency_id=GPU_QUEUE, concurrency_limit=1)

    def on_select(event: gr.SelectData) -> int:
        return int(event.index)

    gallery.select(on_select, None, selected)
    def cancel_job(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    cancel.click(cancel_job, None, None, concurrency_limit=None)

    def _fetch_models(settings: GenerationSettings) -> None:
        for source in (settings.model, *(lora.source for lora in settings.loras)):
            manager.local_path(manager.entry(source))

    @user_errors
    def load_parameters(path: str | None):
        if not path:
            return [gr.update()] * (13 + 3 * LORA_SLOTS + 2) + ["Pick a PNG made by FetalStudio (or A1111)."]
        # the image's whole batch (its seeds and size): batched arithmetic differs from a lone image in the last bits
        reproduction = reproduction_from_png(Path(path))
        loaded = reproduction.settings
        known = set(manager.ids(ModelKind.SD_PIPELINE))
        model_update = gr.update(value=loaded.model) if loaded.model in known else gr.update()
        lora_updates, shown = [], max(1, min(len(loaded.loras), LORA_SLOTS))
        for slot in range(LORA_SLOTS):
            spec = loaded.loras[slot] if slot < len(loaded.loras) else None
            lora_updates += [gr.update(value=spec.source if spec else NO_LORA), gr.update(value=spec.weight if spec else 1.0)]
        row_updates = [gr.update(visible=slot < shown) for slot in range(LORA_SLOTS)]
        note = "Parameters loaded" if loaded.model in known else f"Parameters loaded; model {loaded.model!r} is not installed here, keep or pick another"
        if loaded.batch_size > 1:
            note += (f". The image was number {reproduction.index + 1} of a batch of {loaded.batch_size}: Generate remakes "
                     f"that batch, and its image {reproduction.index + 1} has the PNG's pixels exactly.")
        else:
            note += ": Generate gives the PNG's pixels exactly."
        return [model_update, CUSTOM, loaded.prompt, loaded.negative_prompt, loaded.sampler, loaded.steps,
                loaded.guidance_scale, loaded.width, loaded.height, loaded.seed, loaded.batch_size, 1, loaded.color,
                *lora_updates, *row_updates, shown, gr.update(open=bool(loaded.loras)), note]

    params_png.upload(
        load_parameters, params_png,
        [model, subject, prompt, negative_prompt, sampler, steps, guidance, width, height, seed, batch_size, batch_count, color,
         *[c for pair in zip(lora_dropdowns, lora_weights) for c in pair], *lora_rows, shown_slots, lora_accordion, status],
    )

    @user_errors
    def run_export(planes, samplers, count, base_seed, name, model_, prompt_, negative_, sampler_, steps_, guidance_,
                   width_, height_, seed_, batch_size_, batch_count_, color_, lora_1, weight_1, lora_2, weight_2, lora_3,
                   weight_3, request: gr.Request, progress=gr.Progress()):
        settings = settings_from_inputs((model_, prompt_ or "dataset", negative_, sampler_, steps_, guidance_, width_, height_,
                                         seed_, batch_size_, batch_count_, color_, lora_1, weight_1, lora_2, weight_2, lora_3,
                                         weight_3))
        if not planes or not samplers:
            raise FetalStudioError("Pick at least one plane and one sampler to export.")
        folder = _dataset_folder(context.outputs_dir, name)
        request_ = DatasetRequest(
            out_dir=folder, model=settings.model, planes=tuple(planes), samplers=tuple(samplers),
            images_per_plane=int(count or 0), steps=settings.steps, guidance_scale=settings.guidance_scale,
            width=settings.width, height=settings.height, seed=int(base_seed or 0), batch_size=settings.batch_size,
            negative_prompt=settings.negative_prompt, loras=settings.loras, color=settings.color,
        )
        if request_.images_per_plane < 1:
            raise FetalStudioError("Images per plane must be at least 1.")
        flag = cancel_flags.fresh(request)
        report = export_dataset(
            context.synthesis, request_, cancel=flag,
            on_progress=lambda done, total, last: progress((done, total), desc=last or "Starting…", unit="images"),
        )
        state = "Cancelled" if report.cancelled else "Finished"
        return (f"{state}: {report.generated} new, {report.skipped} already there, {report.total} planned, in "
                f"`{report.out_dir}` (metadata.csv beside the images). Export again with the same settings to resume.")

    export.click(run_export, [export_planes, export_samplers, export_count, export_seed, export_name, *controls.as_inputs()],
                 export_status, concurrency_id=GPU_QUEUE, concurrency_limit=1)
    return SendToAnalysis(send, picked_image, [gallery, selected])


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
