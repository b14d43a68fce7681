"""The Anatomy editor's "Counterfactual pairs" section: for a set of scans and a preset, N normal/abnormal pairs
(same seed, same background, only the ROI differs) with metadata.csv — ``anatomy.pairs.export_pairs``, the
same engine and folder format as ``python -m fetalstudio flex pairs``, so a run is resumed by running it again.

Built inside the Anatomy editor tab (``anatomy_tab.build`` / ``wire`` call :func:`build` / :func:`wire`).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from fetalstudio.analysis.batch import zip_folder
from fetalstudio.anatomy.examples import write_examples_folder
from fetalstudio.anatomy.pairs import METADATA_FILE, PairsRequest, export_pairs
from fetalstudio.anatomy.presets import Preset
from fetalstudio.app_context import AppContext
from fetalstudio.data.tables import read_csv_rows
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.image_input import supported_suffixes
from fetalstudio.paths import app_file
from fetalstudio.ui.common import GPU_QUEUE, CancelFlags, refusals_as_warnings, server_source
from fetalstudio.ui.tab import Handler, TabLinks

SOURCES = [("The bundled examples (their annotated layouts)", "examples"),
           ("Uploaded images (layouts from the structure detector)", "upload"),
           ("A folder or CSV on this computer", "path")]
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_PAIRS = 10_000
SHOWN_ROWS = 50


@dataclass
class PairsComponents:
    source: gr.Radio
    files: gr.File
    path: gr.Textbox
    preset: gr.Dropdown
    count: gr.Number
    seed: gr.Number
    steps: gr.Slider
    name: gr.Textbox
    run: gr.Button
    cancel: gr.Button
    status: gr.Markdown
    gallery: gr.Gallery
    table: gr.Dataframe
    download: gr.File


def build(presets: dict[str, Preset]) -> PairsComponents:
    with gr.Accordion("Counterfactual pairs: normal / abnormal images of the same scans", open=False,
                      elem_id="anatomy-pairs"):
        gr.Markdown("For each scan the preset applies to, the ROI is regenerated twice with the same seed: from the "
                    "scan's own layout (**normal**) and from the edited one (**abnormal**). Outside the ROI both are "
                    "the scan's pixels, identical. The folder is `outputs/anatomy/pairs/<name>`; run again with the "
                    "same settings to resume it (CLI: `python -m fetalstudio flex pairs`).")
        with gr.Row():
            source = gr.Radio(SOURCES, value="examples", label="Scans", elem_id="anatomy-pairs-source")
            preset = gr.Dropdown([(p.title, p.name) for p in presets.values()], value=next(iter(presets), None),
                                 label="Preset", elem_id="anatomy-pairs-preset")
        with gr.Row():
            files = gr.File(label="Images (for 'Uploaded images')", file_count="multiple", type="filepath",
                            file_types=list(supported_suffixes()), elem_id="anatomy-pairs-files", height=110)
            path = gr.Textbox(label="Folder or CSV (for 'A folder or CSV'): structures folder, folder of images, "
                                    "or a CSV with an 'image' column", elem_id="anatomy-pairs-path")
        with gr.Row():
            count = gr.Number(2, precision=0, minimum=1, maximum=MAX_PAIRS, label="Pairs (at most)",
                              elem_id="anatomy-pairs-count")
            seed = gr.Number(0, precision=0, minimum=0, label="Seed (scan i gets seed + i)", elem_id="anatomy-pairs-seed")
            steps = gr.Slider(1, 50, value=20, step=1, label="Steps", elem_id="anatomy-pairs-steps")
            name = gr.Textbox("pairs", label="Folder name", elem_id="anatomy-pairs-name")
        with gr.Row():
            run = gr.Button("Make pairs", variant="primary", elem_id="anatomy-pairs-run")
            cancel = gr.Button("Cancel", variant="stop", elem_id="anatomy-pairs-cancel")
        status = gr.Markdown("", elem_id="anatomy-pairs-status")
        gallery = gr.Gallery(label="Pairs (normal, abnormal)", columns=4, height=300, elem_id="anatomy-pairs-gallery")
        table = gr.Dataframe(label=f"metadata.csv (first {SHOWN_ROWS} rows)", interactive=False,
                             elem_id="anatomy-pairs-table")
        download = gr.File(label="The pairs folder (zip)", interactive=False, elem_id="anatomy-pairs-download")
    return PairsComponents(source, files, path, preset, count, seed, steps, name, run, cancel, status, gallery, table,
                           download)


def pairs_folder_name(text: str | None) -> str:
    """The output folder's name, checked: letters, digits, '.', '_' and '-' (no path: it lives under outputs)."""
    name = (text or "").strip()
    if not NAME_PATTERN.fullmatch(name):
        raise FetalStudioError(f"The folder name {name!r} is not usable: use 1-64 letters, digits, '.', '_' or '-' "
                               "(starting with a letter or digit), e.g. nasal-bone-pairs.")
    return name


def whole_number(value: float | None, what: str, low: int, high: int | None = None) -> int:
    if value is None or float(value) != int(value) or value < low or (high is not None and value > high):
        limit = f"from {low} to {high}" if high is not None else f"{low} or more"
        raise FetalStudioError(f"{what} must be a whole number {limit} (got {value}).")
    return int(value)


def staged_uploads(files: list[str] | None, folder: Path) -> Path:
    """The uploaded images copied into ``folder`` (the pairs' input set: a folder of images for the detector)."""
    if not files:
        raise FetalStudioError("Upload the images first (or choose another source of scans).")
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for number, file in enumerate(files):
        path = app_file(file)
        shutil.copyfile(path, folder / f"{number:04d}_{path.name}")
    return folder


def metadata_rows(out: Path) -> list[dict[str, str]]:
    table = out / METADATA_FILE
    return read_csv_rows(table) if table.is_file() else []


def wire(context: AppContext, c: PairsComponents) -> TabLinks:
    manager = context.manager
    root = Path(context.outputs_dir) / "anatomy"
    cancel_flags = CancelFlags()

    def scans(source: str, files: list[str] | None, path: str | None, preset: Preset, name: str) -> Path:
        if source == "examples":
            return write_examples_folder(root / "pair-inputs" / f"examples-{preset.plane}", preset.plane)
        if source == "upload":
            return staged_uploads(files, root / "pair-inputs" / name)
        return server_source(context, path, "a folder or CSV of scans")

    @refusals_as_warnings(c.status)
    def on_run(source: str, files, path: str | None, preset_name: str | None, count: float | None, seed: float | None,
               steps: float, name: str | None, request: gr.Request, progress=gr.Progress()) -> dict:
        from fetalstudio.anatomy.presets import load_presets

        preset = load_presets().presets.get(preset_name or "")
        if preset is None:
            raise FetalStudioError("Pick a preset for the pairs.")
        folder_name = pairs_folder_name(name)
        limit = whole_number(count, "The number of pairs", 1, MAX_PAIRS)
        first_seed = whole_number(seed, "The seed", 0)
        data = scans(source, files, path, preset, folder_name)
        out = root / "pairs" / folder_name
        flag = cancel_flags.fresh(request)
        progress((0, limit), desc="Loading models…")

        def on_pair(done: int, wanted: int | None, row: dict[str, str]) -> None:
            progress((done, wanted or limit), desc=f"Pair {done}: {Path(row.get('source', '')).name}", unit="pairs")

        report = export_pairs(manager, PairsRequest(data=data, out=out, preset=preset.name, limit=limit,
                                                    seed=first_seed, steps=int(steps)), on_pair, flag)
        rows = metadata_rows(out)
        skipped = "".join(f"\n- skipped {Path(source_key).name}: {reason}" for source_key, reason in report.skipped)
        state = "Cancelled after" if report.cancelled else "Done:"
        text = (f"{state} {report.written} pairs made now, {report.existing} already in `{out}` "
                f"({len(rows)} rows in metadata.csv).{skipped}")
        pictures = [(str(out / row[side]), f"{side} · {Path(row['source']).name}") for row in rows[:SHOWN_ROWS]
                    for side in ("normal", "abnormal")]
        shown = [{k: row[k] for k in ("normal", "abnormal", "preset", "roi_x0", "roi_y0", "roi_x1", "roi_y1", "seed",
                                       "source")} for row in rows[:SHOWN_ROWS]]
        import pandas as pd

        archive = str(zip_folder(out, root / "downloads" / f"pairs-{folder_name}.zip")) if rows else None
        return {c.status: text, c.gallery: pictures, c.table: pd.DataFrame(shown), c.download: archive}

    def on_cancel(request: gr.Request) -> None:
        cancel_flags.get(request).set()

    c.run.click(on_run, [c.source, c.files, c.path, c.preset, c.count, c.seed, c.steps, c.name],
                [c.status, c.gallery, c.table, c.download], concurrency_id=GPU_QUEUE, concurrency_limit=1)
    def on_show() -> dict:
        """The preset list as it is now: presets added to the presets folder appear without a restart."""
        from fetalstudio.anatomy.presets import load_presets

        return gr.update(choices=[(p.title, p.name) for p in load_presets().presets.values()])

    c.cancel.click(on_cancel, None, None, concurrency_limit=None)
    return TabLinks(on_show=[Handler(on_show, [], [c.preset])])
