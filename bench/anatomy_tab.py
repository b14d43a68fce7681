#!/usr/bin/env python
"""Milliseconds of server time per click of the Anatomy editor tab, through the app's real handlers.

The app's page is built as ``app.py`` builds it (``build_context`` + ``shell.build_ui``) with its outputs,
user models, presets and Gradio cache in a temporary folder and the repository's ``checkpoints/`` (the
bundled models). Each click is found by the ``elem_id`` of the component that triggers it and sent
through ``Blocks.process_api`` with the payload a browser sends (values the server sent earlier, edited
as the user would), one ``SessionState`` and a ``gr.Request`` with a fixed session hash and no cookie
(the tab falls back to the session hash). So the time is what the server spends on the click: Gradio's
preprocess (files checked and re-read, the annotator's image re-encoded), the handler, and Gradio's
postprocess (output files copied into its cache). Not timed: the queue, the network, the browser.
``handler ms`` is the handler alone (Gradio's own ``duration`` of the call).

Every answer is checked (its status note, or the picture it must return), so a refused click is an
error, never a time. One untimed round comes first; then ``--repeats`` rounds of:

- open example (the first bundled example, with its layout)
- apply table: one box's row typed 1 px further right each round (a new layout every round)
- preset chosen: its meaning and the preview of the layout it makes (a new preview picture each round)
- apply preset, undo, redo
- annotator echo: the annotator sending back the value the server just set (recognised, nothing done)
- annotator change: a box moved with the mouse (a value the server never sent, so not an echo)
- margin release: the automatic ROI's margin moved
- ROI tab shown: the brush editor's background (image with the ROI tinted)
- use painted ROI: a lossless RGBA PNG layer of the image's size with a red disc, as the editor sends it
- back to auto ROI
- plane change (no boxes): to the other plane and back, after an (untimed) empty table removed the boxes
- reopen project: the project of the one generate made before the first round
- tab shown after a reload: the saved document restored

Model rows (``--model-repeats`` each, after one warm-up): detect structures, generate (``--steps`` steps,
the tab's other defaults) and opening an upload (the plane guess). Target: every click but generation
and detection under 100 ms (``!`` marks a median above it).

    python bench/anatomy_tab.py [--repeats 20] [--model-repeats 3] [--steps 2] [--threads N]
                                [--profile ACTION] [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import json
import os
import platform
import pstats
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from machine import cpu_name, load_average  # noqa: E402  (bench/ is on sys.path when a script runs)

TARGET_MS = 100.0
SESSION_HASH = "anatomybench01"
CLICKS = ("open example", "apply table", "preset chosen", "apply preset", "undo", "redo", "annotator echo",
          "annotator change", "margin release", "ROI tab shown", "use painted ROI", "back to auto ROI",
          "plane change (no boxes)", "reopen project", "tab shown after a reload")
MODEL_ROWS = ("detect structures", "generate", "open an upload (plane guess)")


def use_temporary_folders(root: Path, device: str) -> None:
    """Everything the app writes goes under ``root``; the bundled models are read from the repository.
    Set before Gradio is imported (it reads GRADIO_TEMP_DIR at import time)."""
    folders = {name: root / name for name in ("outputs", "models", "presets", "gradio")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.update(
        FETALSTUDIO_OUTPUTS=str(folders["outputs"]), FETALSTUDIO_MODELS=str(folders["models"]),
        FETALSTUDIO_PRESETS=str(folders["presets"]), FETALSTUDIO_CHECKPOINTS=str(REPO_ROOT / "checkpoints"),
        FETALSTUDIO_DEVICE=device, GRADIO_TEMP_DIR=str(folders["gradio"]), HF_HUB_OFFLINE="1",
        GRADIO_ANALYTICS_ENABLED="False")


@dataclass
class Answer:
    """One click's server time, its handler's time, and its outputs by elem_id (Gradio's postprocessed form)."""

    server_ms: float
    handler_ms: float
    outputs: dict[str, Any]

    def value(self, elem_id: str) -> Any:
        """The output's value (an update's ``value``; None when the output was skipped)."""
        output = self.outputs.get(elem_id)
        if isinstance(output, dict) and output.get("__type__") == "update":
            return output.get("value")
        return output

    def status(self) -> str:
        return self.value("anatomy-status") or ""


class AnatomyPage:
    """The built page seen from one browser: finds a click's handler by its trigger's elem_id and sends it."""

    def __init__(self, blocks: Any) -> None:
        import gradio as gr
        from gradio.state_holder import SessionState

        self.blocks = blocks
        self.request = gr.Request(session_hash=SESSION_HASH)
        self.session = SessionState(blocks)
        self.loop = asyncio.new_event_loop()
        self.names = {block_id: getattr(block, "elem_id", None) or self._tab_id(block)
                      for block_id, block in blocks.blocks.items()}
        self.components = {name: blocks.blocks[block_id] for block_id, name in self.names.items() if name}

    @staticmethod
    def _tab_id(block: Any) -> str | None:
        import gradio as gr

        return block.id if isinstance(block, gr.Tab) and isinstance(block.id, str) else None

    def handler(self, trigger: str, event: str, name: str | None = None) -> Any:
        """The anatomy tab's BlockFunction run by ``event`` of the component ``trigger`` (an elem_id or tab id)."""
        found = [fn for fn in self.blocks.fns.values()
                 if any(self.names.get(target) == trigger and kind == event for target, kind in fn.targets)
                 and getattr(fn.fn, "__module__", "") == "fetalstudio.ui.anatomy_tab"
                 and (name is None or fn.name == name)]
        if len(found) != 1:
            raise RuntimeError(f"expected one anatomy-tab handler for {trigger}.{event}, found {len(found)}")
        return found[0]

    def send(self, trigger: str, event: str, inputs: list[Any], name: str | None = None) -> Answer:
        block_fn = self.handler(trigger, event, name)
        return self.loop.run_until_complete(self._timed(block_fn, inputs))

    async def _timed(self, block_fn: Any, inputs: list[Any]) -> Answer:
        started = time.perf_counter()
        result = await self.blocks.process_api(block_fn, inputs, state=self.session, request=self.request,
                                               session_hash=SESSION_HASH)
        server_ms = (time.perf_counter() - started) * 1000
        outputs = {self.names.get(block._id) or str(block._id): value
                   for block, value in zip(block_fn.outputs, result["data"])}
        return Answer(server_ms, float(result.get("duration") or 0.0) * 1000, outputs)

    def default(self, elem_id: str) -> Any:
        return self.components[elem_id].value

    def upload_file(self, source: Path) -> dict[str, Any]:
        """``source`` copied into Gradio's upload folder, as the FileData a browser's upload sends."""
        from gradio.utils import get_upload_folder

        folder = Path(get_upload_folder()) / f"bench-{time.monotonic_ns()}"
        folder.mkdir(parents=True)
        copy = folder / source.name
        shutil.copyfile(source, copy)
        return {"path": str(copy), "orig_name": source.name, "meta": {"_type": "gradio.FileData"}}


def expect(answer: Answer, action: str, note: str) -> Answer:
    """The answer's status must carry ``note``: a refused or failed click stops the bench."""
    if note not in answer.status():
        raise RuntimeError(f"{action}: expected {note!r} in the status, got {answer.status()!r}")
    return answer


@dataclass
class Document:
    """What the page shows now (the last values the server sent), for building the next payloads."""

    annotator: dict[str, Any] | None = None
    table: dict[str, Any] | None = None
    project: str | None = None

    def take(self, answer: Answer) -> Answer:
        annotator = answer.value("anatomy-annotator")
        if isinstance(annotator, dict):
            self.annotator = as_browser_sends(annotator)
        table = answer.value("anatomy-table")
        if isinstance(table, dict):
            self.table = table
        return answer


def as_browser_sends(value: dict[str, Any]) -> dict[str, Any]:
    """The annotator's value as its browser component sends it back: each box's colour as ``rgb(r, g, b)``
    and its canvas ``scaleFactor`` (1: corners in image pixels)."""
    def sent(box: dict[str, Any]) -> dict[str, Any]:
        color = box.get("color")
        if isinstance(color, (list, tuple)) and len(color) == 3:
            color = "rgb({}, {}, {})".format(*color)
        return {**box, "color": color, "scaleFactor": 1}
    return {**value, "boxes": [sent(box) for box in value.get("boxes") or []]}


def moved_table(table: dict[str, Any], row: int, dx: float) -> dict[str, Any]:
    """The table payload with ``row``'s box typed ``dx`` pixels further right (x0 and x1)."""
    data = [list(cells) for cells in table["data"]]
    data[row][1] = float(data[row][1]) + dx
    data[row][3] = float(data[row][3]) + dx
    return {**table, "data": data}


def moved_annotator(value: dict[str, Any], box: int, dx: int, dy: int) -> dict[str, Any]:
    """The annotator payload with one box dragged by (dx, dy) pixels, as the browser sends it."""
    boxes = [dict(b) for b in value["boxes"]]
    for key, delta in (("xmin", dx), ("xmax", dx), ("ymin", dy), ("ymax", dy)):
        boxes[box][key] = boxes[box][key] + delta
    return {**value, "boxes": boxes}


def painted_layer(path: Path, size: tuple[int, int], center: tuple[int, int], radius: int) -> Path:
    """A brush layer as gr.ImageEditor sends it: a lossless RGBA PNG of the image's size, transparent but
    for a red (adding) disc."""
    import numpy as np
    from PIL import Image

    width, height = size
    rows, cols = np.ogrid[:height, :width]
    disc = (cols - center[0]) ** 2 + (rows - center[1]) ** 2 <= radius ** 2
    layer = np.zeros((height, width, 4), np.uint8)
    layer[disc] = (255, 0, 0, 255)
    Image.fromarray(layer, "RGBA").save(path)
    return path


@dataclass
class Timings:
    server: dict[str, list[float]] = field(default_factory=dict)
    handler: dict[str, list[float]] = field(default_factory=dict)

    def add(self, action: str, answer: Answer) -> Answer:
        self.server.setdefault(action, []).append(answer.server_ms)
        self.handler.setdefault(action, []).append(answer.handler_ms)
        return answer


class ClickProfile:
    """cProfile of one action's timed clicks. Gradio runs the handler and the inputs' preprocess in worker
    threads, which a profiler enabled on the event loop's thread does not see: they get a profiler of their
    own (``worker``: preprocess + handler; ``loop``: the rest of process_api, mostly postprocess)."""

    def __init__(self, action: str) -> None:
        self.action = action
        self.loop, self.worker = cProfile.Profile(), cProfile.Profile()

    def _in_worker(self, call: Callable) -> Callable:
        @functools.wraps(call)
        def profiled(*args, **kwargs):
            self.worker.enable()
            try:
                return call(*args, **kwargs)
            finally:
                self.worker.disable()
        return profiled

    @contextmanager
    def around(self, block_fn: Any) -> Iterator[None]:
        handler = block_fn.fn
        classes = {type(block) for block in block_fn.inputs}
        preprocesses = {cls: cls.__dict__.get("preprocess") for cls in classes}
        block_fn.fn = self._in_worker(handler)
        for cls in classes:
            cls.preprocess = self._in_worker(cls.preprocess)
        self.loop.enable()
        try:
            yield
        finally:
            self.loop.disable()
            block_fn.fn = handler
            for cls, original in preprocesses.items():
                if original is None:
                    del cls.preprocess
                else:
                    cls.preprocess = original

    def print(self, lines: int = 30) -> None:
        for title, profiler in (("worker threads (preprocess + handler)", self.worker),
                                ("event loop thread (process_api without them: postprocess, file moves)", self.loop)):
            print(f"cProfile of '{self.action}', {title}, top {lines} by cumulative time:")
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(lines)


class Bench:
    """The rounds of clicks on one page; ``record`` is None for the warm-up round."""

    def __init__(self, page: AnatomyPage, example_title: str, image_size: tuple[int, int], work: Path) -> None:
        self.page, self.example_title, self.image_size, self.work = page, example_title, image_size, work
        self.document = Document()
        self.profile: ClickProfile | None = None

    def click(self, record: Timings | None, action: str, trigger: str, event: str, inputs: list[Any],
              name: str | None = None) -> Answer:
        if record is not None and self.profile is not None and action == self.profile.action:
            with self.profile.around(self.page.handler(trigger, event, name)):
                answer = self.page.send(trigger, event, inputs, name)
        else:
            answer = self.page.send(trigger, event, inputs, name)
        if record is not None:
            record.add(action, answer)
        return self.document.take(answer)

    def open_example(self, record: Timings | None) -> Answer:
        return expect(self.click(record, "open example", "anatomy-open-example", "click", [self.example_title]),
                      "open example", "Opened the example")

    def generate(self, record: Timings | None, steps: int) -> Answer:
        page = self.page
        values = [page.default(f"anatomy-{name}") for name in (
            "steps", "seed", "sampler", "ssa", "osm", "ssa-k", "ssa-delta", "ssa-iterations", "osm-strength",
            "osm-margin", "controlnet-scale", "guidance", "condition", "edge-detector")]
        values[0] = steps
        answer = expect(self.click(record, "generate", "anatomy-generate", "click", values), "generate", "Generated with seed")
        self.document.project = answer.value("anatomy-project")
        return answer

    def round(self, record: Timings | None, index: int, presets: list[str]) -> None:
        """One round of every quick click (see the module docstring), each answer checked."""
        page = self.page
        self.open_example(record)
        table = moved_table(self.document.table, index % len(self.document.table["data"]), 1.0 + index)
        expect(self.click(record, "apply table", "anatomy-apply-table", "click", [table]), "apply table", "Table applied.")
        preset = presets[index % len(presets)]
        chosen = self.click(record, "preset chosen", "anatomy-preset", "change", [preset])
        if not chosen.value("anatomy-preset-preview") or "⚠" in (chosen.value("anatomy-preset-meaning") or ""):
            raise RuntimeError(f"preset chosen: no preview for {preset}: {chosen.value('anatomy-preset-meaning')!r}")
        expect(self.click(record, "apply preset", "anatomy-apply-preset", "click", [preset]), "apply preset",
               "Preset applied.")
        expect(self.click(record, "undo", "anatomy-undo", "click", []), "undo", "Undone.")
        expect(self.click(record, "redo", "anatomy-redo", "click", []), "redo", "Redone.")
        echo = self.click(record, "annotator echo", "anatomy-annotator", "change", [self.document.annotator])
        if echo.value("anatomy-status") is not None:
            raise RuntimeError(f"annotator echo: taken as an edit ({echo.status()!r})")
        dragged = moved_annotator(self.document.annotator, index % len(self.document.annotator["boxes"]), 2 + index % 5, 1)
        expect(self.click(record, "annotator change", "anatomy-annotator", "change", [dragged]), "annotator change",
               "Boxes changed with the mouse.")
        margin = 8 + index % 24  # never the default margin (16) twice in a row
        margin = margin + 1 if margin == page.default("anatomy-margin") else margin
        expect(self.click(record, "margin release", "anatomy-margin", "release", [margin]), "margin release",
               "ROI margin set.")
        shown = self.click(record, "ROI tab shown", "anatomy-roi-tab", "select", [])
        if not shown.value("anatomy-brush"):
            raise RuntimeError("ROI tab shown: no brush background")
        self.use_painted_roi(record, index)
        expect(self.click(record, "back to auto ROI", "anatomy-auto-roi", "click", [margin]), "back to auto ROI",
               "Back to the automatic ROI.")
        self.change_plane(record)
        expect(self.click(record, "reopen project", "anatomy-open-project", "click", [self.document.project]),
               "reopen project", "Reopened the project")
        expect(self.click(record, "tab shown after a reload", "anatomy", "select", [None], name="on_show"),
               "tab shown after a reload", "Restored your last document")

    def use_painted_roi(self, record: Timings | None, index: int) -> None:
        width, height = self.image_size
        layer = painted_layer(self.work / f"layer-{index}.png", self.image_size,
                              (width // 4 + 7 * index % (width // 2), height // 2), 20 + index % 10)
        value = {"background": None, "layers": [self.page.upload_file(layer)], "composite": None, "id": None}
        expect(self.click(record, "use painted ROI", "anatomy-use-brush", "click", [value]), "use painted ROI",
               "The painted ROI is used.")

    def change_plane(self, record: Timings | None) -> None:
        empty = {**self.document.table, "data": []}
        expect(self.click(None, "empty table", "anatomy-apply-table", "click", [empty]), "empty table", "Table applied.")
        for plane in ("trans_thalamic", "facial_sagittal"):
            expect(self.click(record, "plane change (no boxes)", "anatomy-plane", "input", [plane]),
                   "plane change (no boxes)", f"The plane is now {plane}.")

    def model_round(self, record: Timings | None, steps: int, upload: Path) -> None:
        self.open_example(None)
        expect(self.click(record, "detect structures", "anatomy-detect", "click", []), "detect structures",
               "The detector found")
        expect(self.click(None, "apply preset", "anatomy-apply-preset", "click", ["increased_nt"]), "apply preset",
               "Preset applied.")
        self.generate(record, steps)
        expect(self.click(record, "open an upload (plane guess)", "anatomy-upload", "upload",
                          [self.page.upload_file(upload)]), "open an upload", "Opened the upload")


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def print_table(title: str, timings: Timings, actions: tuple[str, ...], flag_target: bool) -> None:
    print(title)
    print(f"{'action':<28}{'median':>9}{'p95':>9}{'max':>9}{'handler':>9}{'n':>5}")
    for action in actions:
        server = timings.server.get(action)
        if not server:
            continue
        median = statistics.median(server)
        flag = "  ! over the 100 ms target" if flag_target and median >= TARGET_MS else ""
        print(f"{action:<28}{median:9.1f}{percentile(server, 0.95):9.1f}{max(server):9.1f}"
              f"{statistics.median(timings.handler[action]):9.1f}{len(server):5d}{flag}")


def machine(threads: int) -> str:
    import cv2
    import gradio
    import torch

    return (f"{cpu_name()}, {os.cpu_count()} cores, {threads} torch threads, load average {load_average()}, "
            f"Python {platform.python_version()}, gradio {gradio.__version__}, torch {torch.__version__}, "
            f"OpenCV {cv2.__version__}")


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from fetalstudio.anatomy.examples import list_examples
    from fetalstudio.anatomy.presets import load_presets
    from fetalstudio.app_context import build_context
    from fetalstudio.imaging.image_input import load_image
    from fetalstudio.ui.shell import build_ui

    started = time.perf_counter()
    context = build_context()
    context.outputs_dir.mkdir(parents=True, exist_ok=True)
    page = AnatomyPage(build_ui(context).blocks)
    print(f"page built in {time.perf_counter() - started:.1f} s")
    example = list_examples()[0]
    presets = [p.name for p in load_presets().presets.values() if p.plane == example.plane]
    gray = load_image(example.image).gray
    bench = Bench(page, example.title, (gray.shape[1], gray.shape[0]), work)
    bench.profile = ClickProfile(args.profile) if args.profile else None

    models = Timings()
    bench.model_round(None, args.steps, example.image)  # warm-up: loads the detector, generator, classifiers
    for _ in range(args.model_repeats):
        bench.model_round(models, args.steps, example.image)
    clicks = Timings()
    bench.round(None, 0, presets)  # warm-up
    for index in range(1, args.repeats + 1):
        bench.round(clicks, index, presets)
    return {"clicks": clicks, "models": models, "profile": bench.profile}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="rounds of the quick clicks (after one warm-up)")
    parser.add_argument("--model-repeats", type=int, default=3, help="rounds of detect / generate / upload")
    parser.add_argument("--steps", type=int, default=2, help="steps of the timed generate")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="FETALSTUDIO_DEVICE for the app (default cpu)")
    parser.add_argument("--profile", choices=CLICKS + MODEL_ROWS, help="cProfile this action's timed clicks")
    parser.add_argument("--json", type=Path, help="also write the raw times here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="anatomy-bench-") as temp:
        use_temporary_folders(Path(temp), args.device)
        import torch

        load_before = load_average()
        results = run(args, Path(temp))
        line = machine(args.threads or torch.get_num_threads())
    clicks, models = results["clicks"], results["models"]
    print(f"machine: {line} (before: {load_before})")
    print(f"target: under {TARGET_MS:.0f} ms server time per click, except generation and detection")
    print_table("clicks, server ms (Gradio pre/postprocess + handler; handler: the handler alone, median):",
                clicks, CLICKS, flag_target=True)
    print_table(f"model rows, server ms (generate: {args.steps} steps):", models, MODEL_ROWS, flag_target=False)
    if results["profile"] is not None:
        results["profile"].print()
    if args.json:
        args.json.write_text(json.dumps({"machine": line, "target_ms": TARGET_MS, "steps": args.steps,
                                         "clicks": {"server_ms": clicks.server, "handler_ms": clicks.handler},
                                         "models": {"server_ms": models.server, "handler_ms": models.handler}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
