"""Dataset export: layout, metadata.csv, resuming after interruption, refusing mixed settings."""

import csv
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.synthesis.dataset import METADATA_COLUMNS, DatasetRequest, export_dataset
from fetalstudio.pipelines.metadata import settings_from_png
from fetalstudio.pipelines.settings import LoraSpec
from tests.synthesis_support import LORA_ID, MODEL_ID, build_model_folder, make_engine

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine(models_root, tmp_path_factory):
    return make_engine(models_root, tmp_path_factory.mktemp("checkpoints"))


def request_for(out: Path, **overrides) -> DatasetRequest:
    values = dict(out_dir=out, model=MODEL_ID, planes=("brain", "femur"), samplers=("euler", "unipc"),
                  images_per_plane=2, steps=2, width=64, height=64, seed=10, loras=(LoraSpec(LORA_ID, 0.5),))
    values.update(overrides)
    return DatasetRequest(**values)


def rows(out: Path) -> list[dict]:
    with (out / "metadata.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_export_writes_planes_x_samplers_with_metadata(engine, tmp_path):
    progress = []
    report = export_dataset(engine, request_for(tmp_path / "ds"), on_progress=lambda *a: progress.append(a))
    assert (report.generated, report.skipped, report.total, report.cancelled) == (8, 0, 8, False)
    table = rows(tmp_path / "ds")
    assert list(table[0]) == METADATA_COLUMNS
    assert sorted(r["file"] for r in table) == sorted(
        f"{p}/{s}/{p}_{s}_{i:05d}.png" for p in ("brain", "femur") for s in ("euler", "unipc") for i in range(2))
    row = next(r for r in table if r["file"] == "femur/unipc/femur_unipc_00001.png")
    assert (row["plane"], row["prompt"], row["sampler"], row["seed"], row["lora"], row["lora_weight"], row["model"]) == (
        "femur", "a photo of fetal femur", "unipc", "11", "fetal_test_lora", "0.5", MODEL_ID)
    assert len(row["model_hash"]) == 10
    assert settings_from_png(tmp_path / "ds" / row["file"]).seed == 11
    assert progress[-1][:2] == (8, 8)


def test_same_index_uses_the_same_seed_for_every_sampler(engine, tmp_path):
    export_dataset(engine, request_for(tmp_path / "ds", planes=("brain",), samplers=("euler", "ddim"), images_per_plane=1))
    seeds = {r["sampler"]: r["seed"] for r in rows(tmp_path / "ds")}
    assert seeds == {"euler": "10", "ddim": "10"}


def test_rerun_skips_finished_files_and_more_images_extend_the_set(engine, tmp_path):
    out = tmp_path / "ds"
    export_dataset(engine, request_for(out))
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    again = export_dataset(engine, request_for(out))
    assert (again.generated, again.skipped) == (0, 8)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == before
    more = export_dataset(engine, request_for(out, images_per_plane=3, batch_size=2))
    assert (more.generated, more.skipped) == (4, 8)
    assert len(rows(out)) == 12 and len({r["file"] for r in rows(out)}) == 12


def test_resumed_images_equal_an_uninterrupted_run(engine, tmp_path):
    cancel = threading.Event()
    made = []

    def progress(done, total, last):
        if last:
            made.append(last)
            if len(made) == 3:
                cancel.set()

    partial = export_dataset(engine, request_for(tmp_path / "a"), on_progress=progress, cancel=cancel)
    assert partial.cancelled and partial.generated == 3
    export_dataset(engine, request_for(tmp_path / "a"))
    export_dataset(engine, request_for(tmp_path / "b"))
    for path in (tmp_path / "b").rglob("*.png"):
        twin = tmp_path / "a" / path.relative_to(tmp_path / "b")
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(Image.open(twin)))


def test_png_written_before_a_crash_without_its_row_is_recovered(engine, tmp_path):
    out = tmp_path / "ds"
    export_dataset(engine, request_for(out, images_per_plane=1))
    table = rows(out)
    with (out / "metadata.csv").open("w", newline="") as handle:  # simulate: last row never written
        writer = csv.DictWriter(handle, METADATA_COLUMNS)
        writer.writeheader()
        writer.writerows(table[:-1])
    report = export_dataset(engine, request_for(out, images_per_plane=1))
    assert report.generated == 0
    assert sorted(r["file"] for r in rows(out)) == sorted(r["file"] for r in table)


def test_other_settings_in_the_same_folder_are_refused(engine, tmp_path):
    out = tmp_path / "ds"
    export_dataset(engine, request_for(out, images_per_plane=1))
    with pytest.raises(FetalStudioError, match="other settings.*steps"):
        export_dataset(engine, request_for(out, images_per_plane=1, steps=3))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FetalStudioError, match="not empty"):
        export_dataset(engine, request_for(foreign))


def test_killed_cli_run_resumes_with_the_same_command(models_root, tmp_path):
    out = tmp_path / "ds"
    command = [sys.executable, "-m", "fetalstudio", "generate", "--plane", "brain,thorax", "--n", "6", "--sampler", "euler",
               "--out", str(out), "--width", "64", "--height", "64", "--steps", "2", "--seed", "3"]
    env = {**os.environ, "FETALSTUDIO_MODELS": str(models_root), "FETALSTUDIO_CHECKPOINTS": str(tmp_path / "ckpt"), "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(out.rglob("*.png"))) < 3:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = len(rows(out))
    assert 0 < done_before < 12
    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr
    table = rows(out)
    assert len(table) == 12 and len({r["file"] for r in table}) == 12
    for row in table:
        with Image.open(out / row["file"]) as image:
            image.load()  # every file is a complete PNG
            assert image.size == (64, 64)


def test_cli_defaults_to_the_size_the_model_was_trained_at(models_root, tmp_path, monkeypatch):
    from fetalstudio.cli import main

    monkeypatch.setenv("FETALSTUDIO_MODELS", str(models_root))
    monkeypatch.setenv("FETALSTUDIO_CHECKPOINTS", str(tmp_path / "ckpt"))
    out = tmp_path / "native"
    assert main(["generate", "--plane", "brain", "--n", "1", "--out", str(out), "--steps", "1"]) == 0
    (row,) = rows(out)
    assert (row["width"], row["height"]) == ("64", "64")  # tiny U-Net sample_size 8 x VAE scale 8, not SD's 512
