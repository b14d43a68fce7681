"""Several processes sharing one dataset export or batch analysis: shares, merging the part tables,
resuming, refusing a second run, and `accelerate launch` with 2 CPU processes end to end."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.distributed import (ProcessShare, cpu_threads, current_share, joined_processes, merge_parts,
                                            part_tables, process_device)
from fetalstudio.synthesis.dataset import METADATA_COLUMNS, DatasetRequest, export_dataset
from tests.data_support import DATA, needs_data, pairs_rows, write_pairs_csv
from tests.synthesis_support import MODEL_ID, build_model_folder, make_engine

REPO = Path(__file__).resolve().parent.parent
CHECKPOINTS = REPO / "checkpoints"


class Recorder:
    """A channel that keeps what the main process sends; barriers pass at once."""

    def __init__(self) -> None:
        self.sent: list[object] = []

    def broadcast(self, value: object) -> object:
        self.sent.append(value)
        return value

    def barrier(self) -> None:
        pass


class Replay(Recorder):
    """A channel that gives a process what the main process sent."""

    def __init__(self, message: object) -> None:
        super().__init__()
        self.message = message

    def broadcast(self, value: object) -> object:
        return self.message


class ThreadChannel:
    """Processes as threads of this test: the main thread's value to all, barriers of all."""

    def __init__(self, count: int) -> None:
        self._barrier = threading.Barrier(count, timeout=300)
        self._value: object = None

    def broadcast(self, value: object) -> object:
        if value is not None:  # only the main process sends a value
            self._value = value
        self._barrier.wait()
        value = self._value
        self._barrier.wait()  # everyone has read it before a later broadcast overwrites it
        return value

    def barrier(self) -> None:
        self._barrier.wait()


def run_as_threads(count: int, work) -> list:
    """``work(share)`` for each of ``count`` processes, as threads; their results, or the first error raised."""
    channel = ThreadChannel(count)
    results: list = [None] * count

    def one(index: int) -> None:
        try:
            results[index] = work(ProcessShare(index, count, index, count, channel))
        except BaseException as error:  # noqa: BLE001 - handed to the test
            results[index] = error
            channel._barrier.abort()

    threads = [threading.Thread(target=one, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException) and not isinstance(result, threading.BrokenBarrierError):
            raise result
    return results


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def write_table(path: Path, columns, rows, tail: str = "") -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        handle.write(tail)


# --- shares, devices, agreeing ----------------------------------------------------------------

def test_shares_are_disjoint_complete_and_keep_the_order():
    for length in range(0, 12):
        items = [f"item{i}" for i in range(length)]
        for count in range(1, 5):
            shares = [ProcessShare(index, count, index, count, Recorder()).take(items) for index in range(count)]
            assert sorted(sum(shares, [])) == sorted(items)  # complete, and no item twice
            assert all(share == sorted(share, key=items.index) for share in shares)
            assert max(map(len, shares)) - min(map(len, shares)) <= 1
    share = ProcessShare(1, 4, 1, 2, Recorder())
    assert share.part_path(Path("out/report.csv")) == Path("out/report.part-1-of-4.csv")
    assert share.prefix == "[process 2/4] " and ProcessShare().prefix == "" and not share.is_main
    with pytest.raises(ValueError):
        ProcessShare(2, 2)
    with pytest.raises(ValueError, match="channel"):
        ProcessShare(0, 2)


def test_a_command_started_plainly_is_the_one_process(monkeypatch):
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert current_share() == ProcessShare()
    threads = torch.get_num_threads()
    with joined_processes("cpu") as (share, device):
        assert (share, device) == (ProcessShare(), "cpu")
    assert torch.get_num_threads() == threads  # nothing changed for a plain run


def test_each_process_takes_its_gpu_unless_one_device_is_named(monkeypatch):
    monkeypatch.delenv("FETALSTUDIO_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    third = ProcessShare(2, 4, 2, 4, Recorder())
    assert process_device(third) == "cuda:0" and process_device(ProcessShare(1, 2, 1, 2, Recorder())) == "cuda:1"
    assert process_device(third, "cuda") == "cuda:0"
    assert process_device(third, "cpu") == "cpu" and process_device(third, "cuda:1") == "cuda:1"
    monkeypatch.setenv("FETALSTUDIO_DEVICE", "cpu")
    assert process_device(third) is None  # pick_device reads $FETALSTUDIO_DEVICE
    assert process_device(ProcessShare()) is None
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("FETALSTUDIO_DEVICE")
    assert process_device(third) is None

    cores = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's and accelerate's default
    assert cpu_threads(ProcessShare(0, 2, 0, 2, Recorder())) == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # accelerate launch --num_cpu_threads_per_process 3
    assert cpu_threads(ProcessShare(0, 2, 0, 2, Recorder())) == 3


def test_every_process_gets_the_main_process_result_or_stops_with_its_error():
    channel = Recorder()
    assert ProcessShare(0, 3, 0, 3, channel).agree(lambda: [4, 7]) == [4, 7]
    assert channel.sent == [(False, [4, 7])]
    assert ProcessShare(2, 3, 2, 3, Replay(channel.sent[0])).agree(lambda: pytest.fail("only the main process prepares")) == [4, 7]

    def refused():
        raise FetalStudioError("the folder is busy")

    channel = Recorder()
    with pytest.raises(FetalStudioError, match="the folder is busy"):
        ProcessShare(0, 2, 0, 2, channel).agree(refused)
    with pytest.raises(FetalStudioError, match="the folder is busy"):
        ProcessShare(1, 2, 1, 2, Replay(channel.sent[0])).agree(refused)
    channel = Recorder()
    with pytest.raises(KeyError):
        ProcessShare(0, 2, 0, 2, channel).agree(lambda: {}["x"])
    assert channel.sent == [(True, "KeyError: 'x'")]


def test_merging_keeps_one_complete_row_per_key_in_plan_order(tmp_path):
    columns = ["name", "value"]
    table = tmp_path / "report.csv"
    write_table(table, columns, [{"name": "c", "value": "3"}, {"name": "old", "value": "9"}])
    write_table(tmp_path / "report.part-0-of-2.csv", columns, [{"name": "a", "value": "1"}, {"name": "c", "value": "twice"}],
                tail="d,cut sho")  # the process was killed while writing this row
    write_table(tmp_path / "report.part-1-of-2.csv", columns, [{"name": "b", "value": "2"}, {"name": "e", "value": "skip"}])
    write_table(tmp_path / "report.part-0-of-3.csv", ["other", "header"], [{"other": "x", "header": "y"}])
    merged = merge_parts(table, columns, "name", ["a", "b", "c", "d"], keep=lambda row: row["value"] != "skip")
    assert [(row["name"], row["value"]) for row in merged] == [("a", "1"), ("b", "2"), ("c", "3"), ("old", "9")]
    assert csv_rows(table) == merged and part_tables(table) == []
    assert merge_parts(tmp_path / "new.csv", columns, "name", []) == [] and (tmp_path / "new.csv").read_text() == "name,value\n"


# --- dataset export ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engines(models_root, tmp_path_factory):
    """Two engines (one per simulated process: a pipeline's scheduler is not shared between threads)."""
    return [make_engine(models_root, tmp_path_factory.mktemp("checkpoints")) for _ in range(2)]


def dataset_request(out: Path, **overrides) -> DatasetRequest:
    values = dict(out_dir=out, model=MODEL_ID, planes=("brain", "femur"), samplers=("euler",), images_per_plane=3, steps=2,
                  width=64, height=64, seed=5, batch_size=2)
    values.update(overrides)
    return DatasetRequest(**values)


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def assert_same_dataset(out: Path, reference: Path) -> None:
    rows, expected = csv_rows(out / "metadata.csv"), csv_rows(reference / "metadata.csv")
    assert rows == expected
    for row in rows:
        assert np.array_equal(pixels(out / row["file"]), pixels(reference / row["file"])), row["file"]
    assert part_tables(out / "metadata.csv") == []


@pytest.mark.usefixtures("one_torch_thread")
def test_two_processes_finish_an_interrupted_three_process_export_with_the_same_pixels(engines, tmp_path):
    reference = tmp_path / "one"
    alone = export_dataset(engines[0], dataset_request(reference))
    assert (alone.generated, alone.skipped) == (6, 0)
    rows = csv_rows(reference / "metadata.csv")
    assert [row["file"] for row in rows] == [f"{p}/euler/{p}_euler_{i:05d}.png" for p in ("brain", "femur") for i in range(3)]

    # an interrupted run of 3 processes: 4 images made, their rows only in part tables (some twice, one cut short)
    out = tmp_path / "two"
    export_dataset(engines[0], dataset_request(out, images_per_plane=2))
    kept = csv_rows(out / "metadata.csv")
    with (out / "metadata.csv").open("w", newline="") as handle:
        csv.DictWriter(handle, METADATA_COLUMNS).writeheader()
    write_table(out / "metadata.part-0-of-3.csv", METADATA_COLUMNS, kept[:1])
    write_table(out / "metadata.part-2-of-3.csv", METADATA_COLUMNS, kept, tail="femur/euler/femur_eu")
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*.png")}

    reports = run_as_threads(2, lambda share: export_dataset(engines[share.index], dataset_request(out), share=share))
    assert (reports[0].generated, reports[0].skipped, reports[0].total) == (2, 4, 6)  # the main process counts all
    assert reports[1].generated == 1  # batches left: [brain 2], [femur 2]; the second is process 2's
    assert {path: path.stat().st_mtime_ns for path in before} == before  # the interrupted run's images are kept
    assert_same_dataset(out, reference)

    again = export_dataset(engines[0], dataset_request(out))  # one process now: nothing left
    assert (again.generated, again.skipped) == (0, 6)


def test_a_second_export_into_a_busy_folder_is_refused_in_every_process(engines, tmp_path):
    out = tmp_path / "ds"
    busy = dataset_request(out, planes=("brain",), images_per_plane=2)
    export_dataset(engines[0], dataset_request(out, planes=("brain",), images_per_plane=1))
    before = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
    holder = subprocess.Popen([sys.executable, "-c", (  # another export's main process, holding the folder
        "import fcntl, os, time\n"
        f"fcntl.flock(os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT), fcntl.LOCK_EX)\n"
        "print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FetalStudioError, match="Another dataset export is writing into"):
            export_dataset(engines[0], busy)
        channel = Recorder()
        with pytest.raises(FetalStudioError, match="Another dataset export is writing into"):
            export_dataset(engines[0], busy, share=ProcessShare(0, 2, 0, 2, channel))
        with pytest.raises(FetalStudioError, match="Another dataset export is writing into"):
            export_dataset(engines[1], busy, share=ProcessShare(1, 2, 1, 2, Replay(channel.sent[0])))
    finally:
        holder.kill()
        holder.wait()
    assert {path: path.read_bytes() for path in out.rglob("*") if path.is_file()} == before
    assert export_dataset(engines[0], busy).generated == 1  # free again: the export resumes


# --- batch analysis ---------------------------------------------------------------------------

def hc18_inputs(count: int):
    from fetalstudio.analysis.batch import BatchInput

    rows = pairs_rows("hc18_heads")[:count]
    return [BatchInput(Path(r["image"]).stem, DATA / "hc18_heads" / r["image"], DATA / "hc18_heads" / r["mask"],
                       float(r["pixel_size_mm"]), float(r["hc_mm"])) for r in rows]


@pytest.fixture(scope="module")
def classifier():
    from fetalstudio.analysis.models import load_plane_classifier
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager

    return load_plane_classifier(ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32)))


@needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_a_batch_resumes_from_the_part_tables_of_an_interrupted_run(classifier, tmp_path):
    from fetalstudio.analysis.batch import BatchSettings, run_batch

    inputs = hc18_inputs(4)
    settings = BatchSettings(segment=False, classifier="c")
    reference = tmp_path / "one"
    run_batch(inputs, reference, settings, classifier, None)
    expected = csv_rows(reference / "report.csv")
    assert [row["name"] for row in expected] == [item.name for item in inputs]

    out = tmp_path / "two"
    run_batch(inputs[:3], out, settings, classifier, None)
    rows = csv_rows(out / "report.csv")
    columns = list(rows[0])
    write_table(out / "report.csv", columns, rows[2:])
    write_table(out / "report.part-1-of-2.csv", columns, rows[:2], tail=rows[2]["name"] + ",")
    summaries = run_as_threads(2, lambda share: run_batch(inputs, out, settings, classifier, None, share=share))
    assert (summaries[0].images, summaries[0].skipped, summaries[0].done) == (4, 3, 1)
    assert csv_rows(out / "report.csv") == expected and part_tables(out / "report.csv") == []
    assert json.loads((out / "summary.json").read_text())["planes"] == json.loads((reference / "summary.json").read_text())["planes"]


# --- accelerate launch, 2 CPU processes -------------------------------------------------------

def launch(arguments: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` of 2 processes on this machine (torchrun's launcher: ``--cpu`` would start one)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", "-m", "fetalstudio", *arguments]
    environment = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    environment.update(FETALSTUDIO_DEVICE="cpu", HF_HUB_OFFLINE="1", **env)
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


@pytest.fixture
def launched_threads(monkeypatch):
    """This test's torch threads: as many as each launched process takes, so the pixels can be compared."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # as launch() starts them
    before = torch.get_num_threads()
    torch.set_num_threads(cpu_threads(ProcessShare(0, 2, 0, 2, Recorder())))
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("launched_threads")
def test_accelerate_launch_shares_a_dataset_export_between_two_processes(models_root, engines, tmp_path):
    out = tmp_path / "launched"
    finished = launch(["generate", "--plane", "brain,femur", "--n", "3", "--sampler", "euler", "--model", MODEL_ID,
                       "--steps", "2", "--width", "64", "--height", "64", "--seed", "5", "--batch-size", "2", "--out", str(out)],
                      {"FETALSTUDIO_MODELS": str(models_root), "FETALSTUDIO_CHECKPOINTS": str(tmp_path / "ckpt")})
    assert finished.returncode == 0, finished.stderr[-3000:]
    summaries = [json.loads(line) for line in finished.stdout.splitlines() if line.startswith("{")]
    assert [(s["generated"], s["skipped_existing"], s["total"]) for s in summaries] == [(6, 0, 6)]  # the main process's
    assert "[process 1/2] [" in finished.stderr and "[process 2/2] [" in finished.stderr
    reference = tmp_path / "one"
    export_dataset(engines[0], dataset_request(reference))
    assert_same_dataset(out, reference)


@needs_data
@pytest.mark.usefixtures("launched_threads")
def test_accelerate_launch_shares_a_batch_analysis_between_two_processes(tmp_path, capsys):
    from fetalstudio.cli import main

    table = write_pairs_csv(tmp_path / "pairs.csv", pairs_rows("hc18_heads")[:4])
    out = tmp_path / "launched"
    finished = launch(["analyze", "--in", str(table), "--out", str(out), "--json", str(tmp_path / "summary.json")], {})
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert len([line for line in finished.stdout.splitlines() if line.startswith("{")]) == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["images"], summary["done"], summary["skipped"], summary["errors"], summary["dice_count"]) == (4, 4, 0, 0, 4)
    assert part_tables(out / "report.csv") == []

    reference = tmp_path / "one"
    assert main(["analyze", "--in", str(table), "--out", str(reference), "--device", "cpu"]) == 0
    capsys.readouterr()
    rows, expected = csv_rows(out / "report.csv"), csv_rows(reference / "report.csv")
    assert [row["name"] for row in rows] == [Path(r["image"]).stem for r in pairs_rows("hc18_heads")[:4]]
    assert rows == expected
    for row in rows:
        assert np.array_equal(pixels(out / row["mask"]), pixels(reference / row["mask"]))
