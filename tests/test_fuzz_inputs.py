"""Fuzz-style input tests (issue 11, "Done when"): generated bad files (decompression bombs made small
on disk, truncations, wrong types, tiny and unusual images) and bad CSV cells are fed to every reader
— ``load_image``, the Mask review import (``import_pairs``), the ``extract`` CLI and the batch
(``read_batch_inputs`` + ``run_batch``) — and each must give an error row or a clear
FetalStudioError (CLI: ``error: ...``, exit 2), never a traceback, in bounded memory and time.

Memory is measured with tracemalloc (numpy arrays and Python bytes are traced, so decoding a bomb
shows), and once as the peak RSS of a fresh process reading the largest bombs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.image_input import MAX_PIXELS_ENV, load_image, set_max_pixels

try:
    from tests.bomb_support import write_huge_bmp_header, write_huge_jpeg_header, write_png_bomb, write_tiff_bomb
    from tests.dicom_support import write_deflated_dicom_bomb, write_ultrasound_dicom
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from bomb_support import write_huge_bmp_header, write_huge_jpeg_header, write_png_bomb, write_tiff_bomb
    from dicom_support import write_deflated_dicom_bomb, write_ultrasound_dicom

CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
#: Generous bounds: a refused bomb costs a few MB and milliseconds; decoding one costs >= 64 MB.
CASE_MEMORY_MB, CASE_SECONDS = 48, 20.0
BATCH_MEMORY_MB = 256
PROCESS_RSS_MB = 600
LIMIT = r"more than the limit of|far more pixels than the limit"


@dataclass(frozen=True)
class Case:
    make: Callable[[Path], object]  # writes the file (or folder) at the given path
    error: str | None  # a regex every reader's message must match; None: a valid image that must load


def _noise(rows: int, cols: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(rows * cols).integers(0, 200, (rows, cols)).astype(dtype)


def _save(array: np.ndarray, mode: str | None = None, fmt: str | None = None, **options):
    def make(path: Path) -> None:
        image = Image.fromarray(array, mode) if mode else Image.fromarray(array)
        image.save(path, fmt, **options)
    return make


def _palette(transparent: bool):
    def make(path: Path) -> None:
        image = Image.fromarray(_noise(40, 50)).convert("P")
        image.save(path, transparency=0) if transparent else image.save(path)
    return make


def _truncated(write: Callable[[Path], object], keep: float = 0.5):
    def make(path: Path) -> None:
        scratch = path.with_name("full_" + path.name)
        write(scratch)
        data = scratch.read_bytes()
        scratch.unlink()
        path.write_bytes(data[: int(len(data) * keep)])
    return make


def _bytes(data: bytes):
    return lambda path: path.write_bytes(data)


def _renamed(write: Callable[[Path], object], real_suffix: str):
    def make(path: Path) -> None:
        scratch = path.with_name("real" + real_suffix)
        write(scratch)
        scratch.rename(path)
    return make


def _dicom(pixels: np.ndarray, **options):
    return lambda path: write_ultrasound_dicom(path, pixels, **options)


def _dicom_without_pixels(path: Path) -> None:
    import pydicom

    dataset = pydicom.dcmread(write_ultrasound_dicom(path, _noise(40, 50)))
    del dataset.PixelData
    del dataset.Rows, dataset.Columns
    dataset.save_as(str(path), enforce_file_format=True)


def _dicom_declaring(rows: int, cols: int):
    """A plain (not deflated) DICOM whose header declares ``rows x cols`` but holds 40 x 50 pixels."""
    def make(path: Path) -> None:
        import pydicom

        dataset = pydicom.dcmread(write_ultrasound_dicom(path, _noise(40, 50)))
        dataset.Rows, dataset.Columns = rows, cols
        dataset.save_as(str(path), enforce_file_format=True)
    return make


GOOD_PNG = _save(_noise(48, 64))
CASES: dict[str, Case] = {
    # decompression bombs, small on disk
    "bomb_deflated.dcm": Case(lambda p: write_deflated_dicom_bomb(p, 20000, 20000), r"declares 20000 x 20000 pixels"),
    "bomb_declared_only.dcm": Case(_dicom_declaring(30000, 30000), r"declares 30000 x 30000 pixels"),
    "bomb.png": Case(lambda p: write_png_bomb(p, 9000, 9000), r"declares 9000 x 9000 pixels"),
    "bomb_ihdr.png": Case(lambda p: write_png_bomb(p, 65535, 65535, data=False), r"Image size \(4294836225 pixels\)"),
    "bomb.tif": Case(lambda p: write_tiff_bomb(p, 9000, 9000), r"declares 9000 x 9000 pixels"),
    "bomb_header.tif": Case(lambda p: write_tiff_bomb(p, 60000, 60000, data=False), r"3600000000 pixels"),
    "bomb_header.jpg": Case(write_huge_jpeg_header, r"3600000000 pixels"),
    "bomb_header.bmp": Case(write_huge_bmp_header, r"3600000000 pixels"),
    # truncations and corruptions
    "truncated.png": Case(_truncated(_save(_noise(200, 200))), r"truncated or corrupt"),
    "truncated.jpg": Case(_truncated(_save(_noise(200, 200), fmt="JPEG")), r"truncated or corrupt"),
    "truncated.tif": Case(_truncated(_save(_noise(200, 200), fmt="TIFF")), r"truncated or corrupt"),
    "truncated.dcm": Case(_truncated(_dicom(_noise(200, 200))), r"DICOM pixels cannot be decoded.*truncated or corrupt"),
    "header_only.dcm": Case(_truncated(_dicom(_noise(200, 200)), keep=0.01), r"DICOM|truncated"),
    "bad_crc.png": Case(lambda p: p.write_bytes(_corrupt_crc()), r"truncated or corrupt|not an image Pillow can read"),
    # wrong types and empty files
    "text.png": Case(lambda p: p.write_text("image,mask\nthis is not an image\n"), r"not an image Pillow can read"),
    "random.jpg": Case(_bytes(np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()), r"not an image Pillow can read"),
    "png_named.dcm": Case(_renamed(GOOD_PNG, ".png"), r"not a valid DICOM file"),
    "empty.png": Case(_bytes(b""), r"not an image Pillow can read"),
    "empty.jpg": Case(_bytes(b""), r"not an image Pillow can read"),
    "empty.tif": Case(_bytes(b""), r"not an image Pillow can read"),
    "empty.dcm": Case(_bytes(b""), r"not a valid DICOM file"),
    "no_pixels.dcm": Case(_dicom_without_pixels, r"DICOM file without image pixels"),
    "folder.png": Case(lambda p: p.mkdir(), r"does not exist"),
    # tiny images
    "one_pixel.png": Case(_save(np.full((1, 1), 90, np.uint8)), r"1x1 pixels: too small to analyse"),
    "two_pixels.bmp": Case(_save(np.full((2, 2), 90, np.uint8)), r"2x2 pixels: too small to analyse"),
    "one_pixel.dcm": Case(_dicom(np.full((1, 1), 90, np.uint8)), r"1x1 pixels: too small to analyse"),
    "sliver.png": Case(_save(np.full((1, 300), 90, np.uint8)), r"300x1 pixels: too small to analyse"),
    # unusual but valid images: must load
    "sixteen_bit.tif": Case(_save(_noise(48, 64, np.uint16) * 300, fmt="TIFF"), None),
    "float.tif": Case(_save(_noise(48, 64, np.float32) / 200, "F", fmt="TIFF"), None),
    "palette.png": Case(_palette(False), None),
    "palette_alpha.png": Case(_palette(True), None),
    "gray_alpha.png": Case(_save(np.dstack([_noise(40, 50), np.full((40, 50), 128, np.uint8)]), "LA"), None),
    "cmyk.jpg": Case(lambda p: Image.fromarray(_noise(40, 50)).convert("CMYK").save(p, "JPEG"), None),
    "smallest.png": Case(_save(np.full((16, 16), 90, np.uint8)), None),
    "deflated.dcm": Case(_dicom(_noise(40, 50), deflated=True), None),
}
BAD = sorted(name for name, case in CASES.items() if case.error)
VALID = sorted(name for name, case in CASES.items() if case.error is None)


def _corrupt_crc() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_noise(40, 50)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[29] ^= 0xFF  # the IHDR chunk's CRC
    return bytes(data)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    pytest.importorskip("pydicom")
    folder = tmp_path_factory.mktemp("fuzz") / "files"
    folder.mkdir()
    for name, case in CASES.items():
        case.make(folder / name)
    return folder


@pytest.fixture(autouse=True)
def default_pixel_limit(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    set_max_pixels(None)
    yield
    set_max_pixels(None)  # `analyze --max-pixels` sets the process-wide limit


class Bounded:
    """Time and the peak of traced allocations (MB) of the block."""

    def __enter__(self):
        tracemalloc.start()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.started
        self.peak_mb = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()

    def check(self, limit_mb: float = CASE_MEMORY_MB) -> None:
        assert self.peak_mb < limit_mb and self.seconds < CASE_SECONDS, (self.peak_mb, self.seconds)


def _write_csv(path: Path, header: list[str], rows: list[list[str]], encoding: str = "utf-8") -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_bytes(buffer.getvalue().encode(encoding))
    return path


# --- load_image -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD)
def test_load_image_refuses_each_bad_file_clearly(files, name):
    with Bounded() as bounded, pytest.raises(FetalStudioError) as refused:
        load_image(files / name)
    assert re.search(CASES[name].error, str(refused.value)), str(refused.value)
    if name.startswith("bomb"):
        assert re.search(LIMIT, str(refused.value)) and "--max-pixels" in str(refused.value)
    bounded.check()


@pytest.mark.parametrize("name", VALID)
def test_load_image_reads_each_unusual_valid_file(files, name):
    with Bounded() as bounded:
        loaded = load_image(files / name)
    assert loaded.gray.dtype == np.uint8 and loaded.gray.ndim == 2 and min(loaded.gray.shape) >= 16
    bounded.check()


def test_a_fresh_process_reading_the_bombs_stays_small(files):
    """Peak RSS of a new Python reading every bomb (not only what tracemalloc sees: Pillow's and
    zlib's own buffers too). Today's code took 2.6 GB and 15 s on the DICOM bomb alone."""
    bombs = [str(files / name) for name in BAD if name.startswith("bomb")]
    script = (
        "import json, sys\n"
        "from fetalstudio.imaging.image_input import load_image\n"
        "from fetalstudio.errors import FetalStudioError\n"
        "refused = 0\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_image(path)\n"
        "    except FetalStudioError:\n"
        "        refused += 1\n"
        # VmHWM: this process's own peak; ru_maxrss would also count the forking parent (pytest, GBs)
        "hwm_kb = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "print(json.dumps({'refused': refused, 'rss_mb': hwm_kb / 1024}))\n"
    )
    cap = "import resource; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))"  # never take the machine down
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", f"{cap}\n{script}", *bombs], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["refused"] == len(bombs)
    assert record["rss_mb"] < PROCESS_RSS_MB and time.perf_counter() - started < 60, record


# --- Mask review import -----------------------------------------------------------------------

@pytest.mark.parametrize("name", BAD + VALID)
def test_mask_review_import_refuses_each_bad_file_clearly(files, name, tmp_path):
    from fetalstudio.review.pairs import import_pairs
    from fetalstudio.review.store import ReviewSession

    path = str(files / name)
    source = _write_csv(tmp_path / "pairs.csv", ["image", "mask"], [[path, path]])  # the file as image and as its own mask
    session = ReviewSession.create(tmp_path / "session")
    with Bounded() as bounded:
        try:
            items = import_pairs(session, source)
        except FetalStudioError as error:
            items, message = None, str(error)
    bounded.check()
    if CASES[name].error is None:
        assert items is not None and len(items) == 1
    else:
        assert items is None and re.search(CASES[name].error, message), message


# --- extract CLI (masks are read with OpenCV; the pixel limit is checked first) -------------------

def _extract(tmp_path: Path, source: Path) -> tuple[int, str, list[dict]]:
    import contextlib

    from fetalstudio.cli import main

    out, stderr = tmp_path / "extracted", io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["extract", "--csv", str(source), "--out", str(out)])
    table = out / "ellipses.csv"
    rows = list(csv.DictReader(table.open(encoding="utf-8"))) if code == 0 and table.is_file() else []
    return code, stderr.getvalue(), rows


@pytest.mark.parametrize("name", BAD + VALID)
def test_extract_cli_gives_a_row_or_a_clear_error_for_each_file(files, name, tmp_path):
    path = str(files / name)
    source = _write_csv(tmp_path / "pairs.csv", ["image", "mask"], [[path, path]])
    with Bounded() as bounded:
        code, stderr, rows = _extract(tmp_path, source)
    bounded.check()
    assert code in (0, 2) and "Traceback" not in stderr
    if code == 2:
        assert stderr.startswith("error: ") and (name in stderr or "does not exist" in stderr), stderr
    else:
        assert len(rows) == 1 and rows[0]["ok"] in ("0", "1") and (rows[0]["ok"] == "1" or rows[0]["reason"])
    if name.startswith("bomb") and not name.endswith(".dcm"):  # OpenCV reads no DICOM: those are "not an image"
        assert code == 2 and re.search(LIMIT, stderr), stderr


# --- batch (folder) ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def plane_classifier():
    import torch

    from fetalstudio.analysis.models import batch_models
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager

    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    settings, classifier, _ = batch_models(manager, classify=True, segment=False)
    return settings, classifier


def _report(out: Path) -> dict[str, dict]:
    return {row["name"]: row for row in csv.DictReader((out / "report.csv").open(encoding="utf-8"))}


@pytest.mark.usefixtures("one_torch_thread")
def test_a_batch_over_every_bad_file_gives_error_rows_and_finishes(files, plane_classifier, tmp_path):
    from fetalstudio.analysis.batch import read_batch_inputs, run_batch

    settings, classifier = plane_classifier
    inputs = read_batch_inputs(files)
    assert "folder" not in {item.name for item in inputs}  # a folder named x.png is not an image
    with Bounded() as bounded:
        summary = run_batch(inputs, tmp_path / "out", settings, classifier)
    assert bounded.peak_mb < BATCH_MEMORY_MB and bounded.seconds < CASE_SECONDS * 3, (bounded.peak_mb, bounded.seconds)
    rows = {Path(row["file"]).name: row for row in _report(tmp_path / "out").values()}
    for name, case in CASES.items():
        if name == "folder.png":
            continue
        row = rows[name]
        if case.error is None:
            assert row["status"] == "ok" and row["plane"], row
        else:
            assert row["status"] == "error" and re.search(case.error, row["error"]), (name, row["error"])
    assert summary.errors == len(BAD) - 1 and not summary.cancelled
    again = run_batch(read_batch_inputs(files), tmp_path / "out", settings, classifier)  # a rerun does not stop at a bad file
    assert again.skipped == len(inputs) and again.done == 0


# --- bad CSV cells ----------------------------------------------------------------------------

BAD_PIXEL_SIZES = ["-1", "0", "inf", "nan", "abc"]


def _cells_csv(folder: Path, good: Path, encoding: str = "utf-8") -> Path:
    """A CSV with a good row first, then one row per bad cell (rows 3 ...)."""
    rows = [[str(good), str(good), "0.1"], ["", str(good), "0.1"], [str(folder / "missing.png"), str(good), "0.1"]]
    rows += [[str(good), str(good), value] for value in BAD_PIXEL_SIZES]
    rows += [[str(good)], [str(good), str(good), "0.1", "extra", "cells"]]
    return _write_csv(folder / "cells.csv", ["image", "mask", "pixel_size_mm"], rows, encoding)


BAD_CELL_ROWS = {3: "the image cell is empty", 4: "missing.png does not exist"} | {
    5 + index: "pixel_size_mm" for index in range(len(BAD_PIXEL_SIZES))}


def _non_utf8_csv(folder: Path, good: Path) -> Path:
    path = folder / "latin1.csv"
    path.write_bytes(f"image,mask,pixel_size_mm\n{good},{good},0.1\n".encode() + "caf\xe9.png,x.png,0.1\n".encode("latin-1"))
    return path


@pytest.mark.usefixtures("one_torch_thread")
def test_batch_csv_bad_cells_become_error_rows(files, plane_classifier, tmp_path):
    from fetalstudio.analysis.batch import read_batch_inputs, run_batch

    settings, classifier = plane_classifier
    good = files / "palette.png"
    inputs = read_batch_inputs(_cells_csv(tmp_path, good))
    summary = run_batch(inputs, tmp_path / "out", settings, classifier)
    rows = list(_report(tmp_path / "out").values())
    assert len(rows) == len(inputs) == 10 and not summary.cancelled
    assert rows[0]["status"] == "ok"
    for number, expected in BAD_CELL_ROWS.items():
        row = rows[number - 2]
        assert row["status"] == "error" and f"row {number}" in row["error"] and expected in row["error"], row
    assert {rows[8]["status"], rows[9]["status"]} <= {"ok", "error"}  # too few / too many cells: a row, no crash
    with pytest.raises(FetalStudioError, match=r"latin1.csv is not UTF-8 text: byte \d+ \(line 3\)"):
        read_batch_inputs(_non_utf8_csv(tmp_path, good))


def test_mask_review_import_bad_csv_cells_are_refused_or_ignored_never_stored(files, tmp_path):
    from fetalstudio.review.pairs import import_pairs
    from fetalstudio.review.store import ReviewSession

    good = files / "palette.png"
    source = _cells_csv(tmp_path, good)
    lines = source.read_text().splitlines()
    for number in range(3, len(lines) + 1):  # the good row with each bad row on its own
        single = tmp_path / f"row{number}.csv"
        single.write_text("\n".join([lines[0], lines[1], lines[number - 1]]) + "\n")
        session = ReviewSession.create(tmp_path / f"session{number}")
        try:
            items = import_pairs(session, single)
        except FetalStudioError as error:
            assert str(error), number
            continue
        for item in items:  # imported: a bad pixel size is dropped, never kept as -1, 0, inf or nan
            size = item.source.get("pixel_size_mm")
            assert size is None or (np.isfinite(size) and size > 0), (number, size)
    with pytest.raises(FetalStudioError, match="not UTF-8"):
        import_pairs(ReviewSession.create(tmp_path / "latin1"), _non_utf8_csv(tmp_path, good))


def test_extract_cli_bad_csv_cells_give_a_clear_error_or_a_sound_row(files, tmp_path):
    good = files / "palette.png"
    source = _cells_csv(tmp_path, good)
    lines = source.read_text().splitlines()
    for number in range(3, len(lines) + 1):
        single = tmp_path / f"row{number}.csv"
        single.write_text("\n".join([lines[0], lines[1], lines[number - 1]]) + "\n")
        code, stderr, rows = _extract(tmp_path / f"run{number}", single)
        assert code in (0, 2) and "Traceback" not in stderr, (number, stderr)
        if code == 2:
            assert stderr.startswith("error: "), (number, stderr)
        else:  # extracted: no HC from a pixel size of -1, 0, inf or nan
            assert all(row["hc_mm"] in ("",) or np.isfinite(float(row["hc_mm"])) and float(row["hc_mm"]) > 0 for row in rows), (number, rows)
    code, stderr, _ = _extract(tmp_path / "latin1", _non_utf8_csv(tmp_path, good))
    assert code == 2 and "not UTF-8" in stderr


@pytest.mark.usefixtures("one_torch_thread")
def test_analyze_max_pixels_sets_the_limit_for_the_run(files, tmp_path):
    import contextlib

    from fetalstudio.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_noise(60, 80)).save(folder / "scan.png")  # 4,800 pixels
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["analyze", "--in", str(folder), "--out", str(tmp_path / "out"), "--classify", "--max-pixels", "4000"])
    row = next(iter(_report(tmp_path / "out").values()))
    assert code == 0 and row["status"] == "error" and "more than the limit of 4,000" in row["error"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit):
        main(["analyze", "--in", str(folder), "--out", str(tmp_path / "out2"), "--max-pixels", "0"])
    assert "--max-pixels" in stderr.getvalue()
