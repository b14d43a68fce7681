"""Dataset export: N images per plane x sampler into a folder with metadata.csv; resumable.

Layout: ``OUT/<plane>/<sampler>/<plane>_<sampler>_<index:05d>.png``; image ``index`` uses seed
``base_seed + index`` for every sampler, so samplers are compared on the same starting noise.
Each PNG is written atomically and its metadata.csv row appended (and fsynced) right after, so a
run that is killed or cancelled resumes with the next missing file. ``dataset.json`` records the
settings; resuming with different settings is refused instead of silently mixing two datasets, and
a second export into a folder that one is writing is refused (the folder's lock).

Several processes (``accelerate launch``, see ``fetalstudio.distributed``): the main process
holds the lock, checks or writes dataset.json and plans the batches left to make; each process makes
every N-th batch and appends its rows to its own ``metadata.part-<i>-of-<N>.csv``; at the end the main
process merges them into metadata.csv (plan order, one row per file). Batches and seeds are planned
as one process plans them, so a PNG's pixels do not depend on the number of processes; a rerun, with
any number of processes, first merges the part tables an interrupted run left.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import LOCK_FILE, folder_lock
from fetalstudio.distributed import ProcessShare, merge_parts
from fetalstudio.pipelines.metadata import save_png, settings_from_png, read_png_text, JSON_KEY
from fetalstudio.pipelines.runners import TextToImageRunner
from fetalstudio.pipelines.samplers import parse_sampler
from fetalstudio.pipelines.settings import GeneratedImage, GenerationSettings, LoraSpec
from fetalstudio.vocabulary import HEAD_SUBJECT, prompt_for

METADATA_COLUMNS = [
    "file", "plane", "prompt", "negative_prompt", "sampler", "steps", "guidance_scale", "width", "height",
    "seed", "lora", "lora_weight", "model", "model_hash",
]

#: (images done, images total, last file written or "")
DatasetProgress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class DatasetRequest:
    out_dir: Path
    model: str
    planes: tuple[str, ...]
    samplers: tuple[str, ...] = ("euler",)
    images_per_plane: int = 1
    steps: int = 20
    guidance_scale: float = 7.5
    width: int = 512
    height: int = 512
    seed: int = 0
    batch_size: int = 1
    negative_prompt: str = ""
    prompt: str | None = None  # overrides the plane captions (the folder still says the plane)
    trimester: str | None = None  # for the "head" subject
    loras: tuple[LoraSpec, ...] = field(default_factory=tuple)
    color: str = "auto"  # auto (the model's declaration) | grayscale | rgb; dataset.json records the resolved one

    def prompt_for(self, plane: str) -> str:
        return self.prompt if self.prompt else prompt_for(plane, self.trimester)

    def folder_name(self, plane: str) -> str:
        return f"head_{self.trimester}" if plane == HEAD_SUBJECT and self.trimester else plane

    def fingerprint(self) -> dict:
        data = asdict(self)
        data.pop("out_dir")
        data.pop("images_per_plane")  # asking for more images later is fine
        data.pop("batch_size")  # batching changes pixels only in the last bits; each PNG records its batch
        data["loras"] = [asdict(l) for l in self.loras]
        return json.loads(json.dumps(data))  # tuples -> lists, as read back from dataset.json


@dataclass(frozen=True)
class DatasetJob:
    plane: str
    sampler: str
    index: int
    path: Path


@dataclass
class DatasetReport:
    out_dir: Path
    generated: int
    skipped: int
    total: int
    cancelled: bool


def plan_jobs(request: DatasetRequest) -> list[DatasetJob]:
    jobs = []
    for plane in request.planes:
        for sampler_name in request.samplers:
            sampler = parse_sampler(sampler_name).key
            folder = request.out_dir / request.folder_name(plane) / sampler
            for index in range(request.images_per_plane):
                name = f"{request.folder_name(plane)}_{sampler}_{index:05d}.png"
                jobs.append(DatasetJob(plane, sampler, index, folder / name))
    return jobs


class DatasetWriter:
    """Owns metadata.csv and dataset.json of one export folder; with several processes, each process
    appends its rows to its own part of metadata.csv and the main process merges them."""

    def __init__(self, request: DatasetRequest, share: ProcessShare | None = None) -> None:
        self.request = request
        self.share = share or ProcessShare()
        self.csv_path = request.out_dir / "metadata.csv"
        self.rows_path = self.share.part_path(self.csv_path) if self.share.is_distributed else self.csv_path
        self.recorded: set[str] = set()
        self._lock = threading.Lock()

    def open(self, jobs: list[DatasetJob], holder: ExitStack) -> None:
        """On the main process: lock the folder (held until ``holder`` closes), check or write dataset.json,
        merge metadata.csv with the part tables an interrupted run left, recover PNGs written without their row."""
        self.check_settings(write=False)  # before anything is written: a foreign folder is left as it was
        self.request.out_dir.mkdir(parents=True, exist_ok=True)
        try:
            holder.enter_context(folder_lock(self.request.out_dir).hold(blocking=False))
        except BlockingIOError:
            raise FetalStudioError(f"Another dataset export is writing into {self.request.out_dir} right now. Wait for it "
                                   "to finish (then run the same export again to resume), or pick another folder.") from None
        self.check_settings(write=True)
        self.merge(jobs)
        for job in jobs:
            self.recover_unrecorded(job)

    def merge(self, jobs: list[DatasetJob]) -> None:
        """metadata.csv and its part tables into metadata.csv, in plan order, one row per file."""
        rows = merge_parts(self.csv_path, METADATA_COLUMNS, "file", [self.relative(job.path) for job in jobs],
                           lineterminator="\r\n")  # csv's own line end, as record() appends
        self.recorded = {row["file"] for row in rows}

    def check_settings(self, write: bool) -> None:
        """dataset.json against this request; ``write``: record it in a new or empty folder."""
        settings_path = self.request.out_dir / "dataset.json"
        wanted = self.request.fingerprint()
        if settings_path.exists():
            recorded = json.loads(settings_path.read_text(encoding="utf-8"))
            recorded.setdefault("color", "rgb")  # datasets from before the colour was recorded are RGB
            if recorded != wanted:
                changed = sorted(k for k in set(recorded) | set(wanted) if recorded.get(k) != wanted.get(k))
                raise FetalStudioError(
                    f"{self.request.out_dir} already holds a dataset made with other settings "
                    f"({', '.join(changed)} differ). Use the same settings to resume it, or pick a new folder."
                )
            return
        if self.request.out_dir.is_dir() and any(path.name != LOCK_FILE for path in self.request.out_dir.iterdir()):
            raise FetalStudioError(
                f"{self.request.out_dir} is not empty and is not a FetalStudio dataset folder. Pick an empty or new folder."
            )
        if write:
            temporary = settings_path.with_suffix(".json.part")
            temporary.write_text(json.dumps(wanted, indent=2), encoding="utf-8")
            temporary.replace(settings_path)

    def relative(self, path: Path) -> str:
        return path.relative_to(self.request.out_dir).as_posix()

    def is_done(self, job: DatasetJob) -> bool:
        return job.path.exists() and self.relative(job.path) in self.recorded

    def record(self, job: DatasetJob, metadata: dict, settings: GenerationSettings, seed: int) -> None:
        loras = metadata.get("loras", [])
        row = {
            "file": self.relative(job.path),
            "plane": job.plane if job.plane != HEAD_SUBJECT else self.request.folder_name(job.plane),
            "prompt": settings.prompt,
            "negative_prompt": settings.negative_prompt,
            "sampler": job.sampler,
            "steps": settings.steps,
            "guidance_scale": settings.guidance_scale,
            "width": settings.width,
            "height": settings.height,
            "seed": seed,
            "lora": ";".join(l["name"] for l in loras),
            "lora_weight": ";".join(f"{l['weight']:g}" for l in loras),
            "model": metadata["model"]["id"],
            "model_hash": metadata["model"]["hash"],
        }
        with self._lock, self.rows_path.open("a", newline="", encoding="utf-8") as handle:
            if handle.tell() == 0:  # a new table (a process's part)
                csv.DictWriter(handle, METADATA_COLUMNS).writeheader()
            csv.DictWriter(handle, METADATA_COLUMNS).writerow(row)
            handle.flush()
            os.fsync(handle.fileno())
            self.recorded.add(row["file"])

    def recover_unrecorded(self, job: DatasetJob) -> bool:
        """A PNG written just before a crash, before its row: add the row from the PNG itself."""
        if not job.path.exists() or self.relative(job.path) in self.recorded:
            return False
        text = read_png_text(job.path)
        if JSON_KEY not in text:
            job.path.unlink()
            return False
        metadata = json.loads(text[JSON_KEY])
        self.record(job, metadata, settings_from_png(job.path), metadata["seed"])
        return True


def _contiguous_chunks(jobs: list[DatasetJob], size: int) -> Iterator[list[DatasetJob]]:
    chunk: list[DatasetJob] = []
    for job in jobs:
        if chunk and (job.index != chunk[-1].index + 1 or len(chunk) == size):
            yield chunk
            chunk = []
        chunk.append(job)
    if chunk:
        yield chunk


def plan_batches(request: DatasetRequest, pending: list[DatasetJob]) -> list[list[DatasetJob]]:
    """The batches that make ``pending``: each of one plane and sampler, of consecutive indices, at most
    ``batch_size`` long (a batch starts at the first pending index), in plan order."""
    groups: dict[tuple[str, str], list[DatasetJob]] = {}
    for job in pending:
        groups.setdefault((job.plane, job.sampler), []).append(job)
    return [chunk for group in groups.values() for chunk in _contiguous_chunks(group, request.batch_size)]


def export_dataset(
    engine: TextToImageRunner,
    request: DatasetRequest,
    on_progress: DatasetProgress | None = None,
    cancel: threading.Event | None = None,
    share: ProcessShare | None = None,
) -> DatasetReport:
    """Make the images of ``request`` that are not there yet. ``share``: this process's share of a run of
    several processes (see the module docstring); the main process's report counts every process's
    images, the others' their own; progress counts this process's images."""
    share = share or ProcessShare()
    request = replace(request, color=engine.output_color(request.model, request.color))
    writer = DatasetWriter(request, share)
    jobs = plan_jobs(request)
    with ExitStack() as holder:

        def prepare() -> tuple[int, list[list[DatasetJob]]]:
            writer.open(jobs, holder)
            pending = [job for job in jobs if not writer.is_done(job)]
            return len(jobs) - len(pending), plan_batches(request, pending)

        skipped, batches = share.agree(prepare)
        if not share.is_main:
            writer.check_settings(write=False)
        mine = share.take(batches)
        done = 0 if share.is_distributed else skipped
        total = done + sum(len(batch) for batch in mine)
        made, cancelled = _make_batches(engine, request, writer, mine, (done, total), on_progress, cancel)
        share.wait()
        if share.is_main and share.is_distributed:
            writer.merge(jobs)
            made = sum(1 for batch in batches for job in batch if writer.relative(job.path) in writer.recorded)
    return DatasetReport(request.out_dir, made, skipped, len(jobs), cancelled=cancelled)


def _make_batches(engine: TextToImageRunner, request: DatasetRequest, writer: DatasetWriter, batches: list[list[DatasetJob]],
                  progress: tuple[int, int], on_progress: DatasetProgress | None,
                  cancel: threading.Event | None) -> tuple[int, bool]:
    """Generate ``batches``, each PNG saved and its row recorded as it comes; (images made, cancelled)."""
    done, total = progress
    made = 0
    if on_progress:
        on_progress(done, total, "")
    for batch in batches:
        plane, sampler = batch[0].plane, batch[0].sampler
        settings = GenerationSettings(
            model=request.model, prompt=request.prompt_for(plane), negative_prompt=request.negative_prompt,
            sampler=sampler, steps=request.steps, guidance_scale=request.guidance_scale,
            width=request.width, height=request.height, seed=request.seed + batch[0].index,
            batch_size=len(batch), batch_count=1, loras=request.loras, color=request.color,
        )

        def save(generated: GeneratedImage, batch=batch) -> None:
            nonlocal done, made
            job = batch[generated.index]
            save_png(generated.image, job.path, generated.settings, generated.seed, generated.metadata)
            writer.record(job, generated.metadata, generated.settings, generated.seed)
            done, made = done + 1, made + 1
            if on_progress:
                on_progress(done, total, writer.relative(job.path))

        if engine.generate(settings, cancel=cancel, on_image=save).cancelled:
            return made, True
    return made, False
