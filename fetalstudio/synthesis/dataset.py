"""Dataset export: N images per plane x sampler into a folder with metadata.csv; resumable.

Layout: ``OUT/<plane>/<sampler>/<plane>_<sampler>_<index:05d>.png``; image ``index`` uses seed
``base_seed + index`` for every sampler, so samplers are compared on the same starting noise.
Each PNG is written atomically and its metadata.csv row appended (and fsynced) right after, so a
run that is killed or cancelled resumes with the next missing file. ``dataset.json`` records the
settings; resuming with different settings is refused instead of silently mixing two datasets.
"""

from __future__ import annotations

import csv
import json
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from fetalstudio.errors import FetalStudioError
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
    """Owns metadata.csv and dataset.json of one export folder."""

    def __init__(self, request: DatasetRequest) -> None:
        self.request = request
        self.csv_path = request.out_dir / "metadata.csv"
        self.recorded: set[str] = set()
        self._lock = threading.Lock()

    def open(self) -> None:
        self.request.out_dir.mkdir(parents=True, exist_ok=True)
        self._check_or_write_settings()
        if self.csv_path.exists():
            with self.csv_path.open(newline="", encoding="utf-8") as handle:
                self.recorded = {row["file"] for row in csv.DictReader(handle)}
        else:
            with self.csv_path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerow(METADATA_COLUMNS)

    def _check_or_write_settings(self) -> None:
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
        if any(self.request.out_dir.iterdir()):
            raise FetalStudioError(
                f"{self.request.out_dir} is not empty and is not a FetalStudio dataset folder. Pick an empty or new folder."
            )
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
        with self._lock, self.csv_path.open("a", newline="", encoding="utf-8") as handle:
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


def export_dataset(
    engine: TextToImageRunner,
    request: DatasetRequest,
    on_progress: DatasetProgress | None = None,
    cancel: threading.Event | None = None,
) -> DatasetReport:
    request = replace(request, color=engine.output_color(request.model, request.color))
    writer = DatasetWriter(request)
    writer.open()
    jobs = plan_jobs(request)
    for job in jobs:
        writer.recover_unrecorded(job)
    pending = [job for job in jobs if not writer.is_done(job)]
    done = len(jobs) - len(pending)
    skipped = done
    if on_progress:
        on_progress(done, len(jobs), "")
    groups: dict[tuple[str, str], list[DatasetJob]] = {}
    for job in pending:
        groups.setdefault((job.plane, job.sampler), []).append(job)
    for (plane, sampler), group in groups.items():
        for chunk in _contiguous_chunks(group, request.batch_size):
            settings = GenerationSettings(
                model=request.model, prompt=request.prompt_for(plane), negative_prompt=request.negative_prompt,
                sampler=sampler, steps=request.steps, guidance_scale=request.guidance_scale,
                width=request.width, height=request.height, seed=request.seed + chunk[0].index,
                batch_size=len(chunk), batch_count=1, loras=request.loras, color=request.color,
            )

            def save(generated: GeneratedImage, chunk=chunk) -> None:
                nonlocal done
                job = chunk[generated.index]
                save_png(generated.image, job.path, generated.settings, generated.seed, generated.metadata)
                writer.record(job, generated.metadata, generated.settings, generated.seed)
                done += 1
                if on_progress:
                    on_progress(done, len(jobs), writer.relative(job.path))

            result = engine.generate(settings, cancel=cancel, on_image=save)
            if result.cancelled:
                return DatasetReport(request.out_dir, done - skipped, skipped, len(jobs), cancelled=True)
    return DatasetReport(request.out_dir, done - skipped, skipped, len(jobs), cancelled=False)
