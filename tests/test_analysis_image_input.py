"""Image input for the analysis workflow: every supported format to grayscale uint8 in original
pixels, DICOM pixel spacing honoured and identifying fields kept out, clear errors otherwise."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.image_input import (
    DEFAULT_MAX_PIXELS,
    MAX_PIXELS_ENV,
    load_image,
    max_pixels,
    model_view,
    set_max_pixels,
    to_uint8,
)

try:
    from tests.bomb_support import write_huge_jpeg_header, write_png_bomb, write_tiff_bomb
    from tests.data_support import DATA, needs_data, pairs_rows
    from tests.dicom_support import write_deflated_dicom_bomb, write_ultrasound_dicom
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from bomb_support import write_huge_jpeg_header, write_png_bomb, write_tiff_bomb
    from data_support import DATA, needs_data, pairs_rows
    from dicom_support import write_deflated_dicom_bomb, write_ultrasound_dicom

#: A refused bomb must cost almost nothing; decoding any of the bombs below would take >= 64 MB.
BOMB_MEMORY_MB, BOMB_SECONDS = 32, 20.0


@pytest.fixture(autouse=True)
def default_pixel_limit(monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    set_max_pixels(None)
    yield
    set_max_pixels(None)


def _refused(path, **kwargs) -> tuple[str, float, float]:
    """load_image's FetalStudioError for ``path``, the seconds it took and the peak of Python/numpy
    allocations (MB) meanwhile; fails when the file is loaded."""
    import time
    import tracemalloc

    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(FetalStudioError) as refused:
            load_image(path, **kwargs)
        return str(refused.value), time.perf_counter() - started, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


@needs_data
def test_a_real_png_is_read_unchanged():
    row = pairs_rows("hc18_heads")[0]
    loaded = load_image(DATA / "hc18_heads" / row["image"])
    expected = np.asarray(Image.open(DATA / "hc18_heads" / row["image"]).convert("L"))
    np.testing.assert_array_equal(loaded.gray, expected)
    assert loaded.kind == "raster" and loaded.size == (800, 540) and loaded.pixel_size_mm is None


def test_sixteen_bit_png_uses_its_own_range(tmp_path):
    twelve_bit = (np.arange(64 * 32).reshape(32, 64) % 4096).astype(np.uint16)
    Image.fromarray(twelve_bit).save(tmp_path / "deep.png")
    loaded = load_image(tmp_path / "deep.png")
    assert loaded.bit_depth == 16 and loaded.gray.dtype == np.uint8
    assert loaded.gray.max() == 255 and loaded.gray.min() == 0  # not a black image from dividing by 65535
    assert loaded.gray[0, 1] < loaded.gray[0, 63]


def test_rgba_is_composited_over_black_and_colour_becomes_luminance(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :15, 3] = 255  # left half opaque grey 200, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    gray = load_image(tmp_path / "a.png").gray
    assert gray.shape == (20, 30) and (gray[:, :15] == 200).all() and (gray[:, 15:] == 0).all()
    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[..., 0] = 255
    Image.fromarray(rgb).save(tmp_path / "red.bmp")
    assert (load_image(tmp_path / "red.bmp").gray == 76).all()  # 0.299 * 255


def test_a_large_image_keeps_its_pixels_and_the_model_view_maps_back(tmp_path):
    big = np.zeros((4000, 6000), np.uint8)
    big[1000:3000, 2000:5000] = 180
    Image.fromarray(big).save(tmp_path / "big.png")
    loaded = load_image(tmp_path / "big.png")
    assert loaded.size == (6000, 4000)
    view, factor = model_view(loaded.gray, 1024)
    assert max(view.shape) == 1024 and factor == pytest.approx(6000 / 1024)
    ys, xs = np.nonzero(view > 90)
    assert xs.min() * factor == pytest.approx(2000, abs=2 * factor) and ys.max() * factor == pytest.approx(3000, abs=2 * factor)
    small, one = model_view(loaded.gray[:100, :200], 1024)
    assert one == 1.0 and small.shape == (100, 200)


def test_truncated_and_fake_images_give_clear_errors(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200), np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(FetalStudioError, match="truncated or corrupt"):
        load_image(tmp_path / "cut.png")
    (tmp_path / "notes.png").write_text("this is not an image")
    with pytest.raises(FetalStudioError, match="not an image"):
        load_image(tmp_path / "notes.png")
    (tmp_path / "scan.gif").write_bytes(b"GIF89a")
    with pytest.raises(FetalStudioError, match="unsupported file type .gif"):
        load_image(tmp_path / "scan.gif")
    with pytest.raises(FetalStudioError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_dicom_single_and_multi_frame_with_pixel_spacing(tmp_path):
    pytest.importorskip("pydicom")
    image = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    single = load_image(write_ultrasound_dicom(tmp_path / "one.dcm", image, spacing=0.2))
    np.testing.assert_array_equal(single.gray, image)
    assert single.kind == "dicom" and single.pixel_size_mm == pytest.approx(0.2) and single.frame_count == 1
    cine = np.stack([image, 255 - image, image // 2])
    second = load_image(write_ultrasound_dicom(tmp_path / "cine", cine, us_delta_cm=0.015), frame=1)  # no suffix: found by the DICM preamble
    np.testing.assert_array_equal(second.gray, 255 - image)
    assert second.frame_count == 3 and second.pixel_size_mm == pytest.approx(0.15)
    assert "Doe" not in repr(second) and "SECRET" not in repr(second)  # identifying fields never read into the result
    assert second.details["Modality"] == "US"
    with pytest.raises(FetalStudioError, match="has 3 frames"):
        load_image(tmp_path / "cine", frame=5)
    inverted = load_image(write_ultrasound_dicom(tmp_path / "m1.dcm", image, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted.gray, 255 - image)
    deep = load_image(write_ultrasound_dicom(tmp_path / "deep.dcm", (image.astype(np.uint16) * 16)))
    assert deep.gray.max() == 255 and deep.bit_depth == 16


def test_to_uint8_ranges():
    assert to_uint8(np.array([[0.0, 1.0]])).tolist() == [[0, 255]]
    assert to_uint8(np.array([[0, 100]], np.uint16)).tolist() == [[0, 100]]  # already in 0..255: kept
    assert to_uint8(np.zeros((2, 2), np.uint16)).max() == 0


# --- the pixel limit (issue 11, item 5) and tiny images (item 7) -------------------------------

def test_a_deflated_dicom_bomb_is_refused_from_its_header(tmp_path):
    """The issue's bomb: 0.9 MB on disk, 30000 x 30000 declared (0.9 GB inflated): refused before the
    pixel data is inflated (it used to take 2.6 GB and 15 s, and 15.9 GB in the app)."""
    pytest.importorskip("pydicom")
    bomb = write_deflated_dicom_bomb(tmp_path / "bomb.dcm", 30000, 30000)
    assert bomb.stat().st_size < 1_000_000
    message, seconds, peak_mb = _refused(bomb)
    assert "bomb.dcm declares 30000 x 30000 pixels = 900,000,000 pixel values" in message
    assert f"limit of {DEFAULT_MAX_PIXELS:,}" in message and "--max-pixels" in message and MAX_PIXELS_ENV in message
    assert peak_mb < BOMB_MEMORY_MB and seconds < BOMB_SECONDS
    colour_cine = write_deflated_dicom_bomb(tmp_path / "cine.dcm", 3000, 4000, frames=2, samples=3)
    message, _, peak_mb = _refused(colour_cine)  # 72 M values: every frame of a deflated file is inflated
    assert "4000 x 3000 pixels x 3 samples x 2 frames = 72,000,000" in message and peak_mb < BOMB_MEMORY_MB


def test_png_tiff_and_jpeg_bombs_are_refused_before_decoding(tmp_path):
    cases = {
        write_png_bomb(tmp_path / "ihdr.png", 8000, 8000): "declares 8000 x 8000 pixels = 64,000,000",
        write_png_bomb(tmp_path / "huge.png", 14000, 14000): "Pillow: Image size \\(196000000 pixels\\)",  # Pillow's own refusal
        write_tiff_bomb(tmp_path / "deflate.tif", 8000, 8000): "declares 8000 x 8000 pixels",
        write_tiff_bomb(tmp_path / "header.tif", 60000, 60000, data=False): "3600000000 pixels",
        write_huge_jpeg_header(tmp_path / "header.jpg"): "3600000000 pixels",
    }
    for path, expected in cases.items():
        message, seconds, peak_mb = _refused(path)
        assert re.search(expected, message) and "--max-pixels" in message, message
        assert peak_mb < BOMB_MEMORY_MB and seconds < BOMB_SECONDS, path.name


@needs_data
def test_the_pixel_limit_can_be_raised_and_lowered(tmp_path, monkeypatch):
    row = pairs_rows("hc18_heads")[0]
    image = DATA / "hc18_heads" / row["image"]  # 800 x 540 = 432,000 pixels
    assert max_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv(MAX_PIXELS_ENV, "400_000")
    with pytest.raises(FetalStudioError, match="declares 800 x 540 pixels = 432,000 pixel values, more than the limit of 400,000"):
        load_image(image)
    assert load_image(image, pixel_limit=500_000).size == (800, 540)
    set_max_pixels(432_000)  # --max-pixels wins over the environment
    assert load_image(image).size == (800, 540)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    set_max_pixels(None)
    with pytest.raises(FetalStudioError, match=f"environment variable {MAX_PIXELS_ENV} is the most pixel values.*'lots' is not"):
        load_image(image)
    with pytest.raises(FetalStudioError, match="--max-pixels"):
        set_max_pixels(0)
    monkeypatch.delenv(MAX_PIXELS_ENV)
    bomb = write_png_bomb(tmp_path / "big.png", 8000, 8000)  # refused by default, loaded once the limit allows it
    set_max_pixels(64_000_000)
    assert load_image(bomb).size == (8000, 8000)


def test_dicom_decodes_only_the_requested_frame_and_deflated_files_read_in_bounded_steps(tmp_path):
    pytest.importorskip("pydicom")
    image = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))
    cine = np.stack([image, 255 - image, image // 2])
    one_frame = 64 * 48
    plain = write_ultrasound_dicom(tmp_path / "plain.dcm", cine, spacing=0.3)
    loaded = load_image(plain, frame=1, pixel_limit=one_frame)  # one frame is decoded: one frame must fit
    np.testing.assert_array_equal(loaded.gray, 255 - image)
    assert loaded.frame_count == 3 and loaded.pixel_size_mm == pytest.approx(0.3)
    deflated = write_ultrasound_dicom(tmp_path / "deflated.dcm", cine, us_delta_cm=0.02, deflated=True)
    loaded = load_image(deflated, frame=2)
    np.testing.assert_array_equal(loaded.gray, image // 2)
    assert loaded.frame_count == 3 and loaded.pixel_size_mm == pytest.approx(0.2) and "Doe" not in repr(loaded)
    with pytest.raises(FetalStudioError, match="x 3 frames = 9,216 pixel values, more than the limit of 3,072"):
        load_image(deflated, pixel_limit=one_frame)  # a deflated file is inflated whole: all frames count
    with pytest.raises(FetalStudioError, match="has 3 frames"):
        load_image(deflated, frame=3)


def test_ybr_dicom_is_converted_to_luminance_once(tmp_path):
    pytest.importorskip("pydicom")
    ybr = np.zeros((20, 24, 3), np.uint8)
    ybr[..., 0], ybr[..., 1], ybr[..., 2] = 100, 128, 180  # Y = 100 (RGB 173, 63, 100): luminance 100
    gray = load_image(write_ultrasound_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")).gray
    assert gray.shape == (20, 24) and (np.abs(gray.astype(int) - 100) <= 1).all()  # converted twice it was R, 173


@pytest.mark.parametrize("side", [1, 2, 15])
def test_tiny_images_are_refused_with_a_minimum_size(tmp_path, side):
    Image.fromarray(np.full((side, side), 128, np.uint8)).save(tmp_path / "tiny.png")
    with pytest.raises(FetalStudioError, match=f"tiny.png is {side}x{side} pixels: too small to analyse \\(at least 16x16"):
        load_image(tmp_path / "tiny.png")
    if side == 1:
        pytest.importorskip("pydicom")
        with pytest.raises(FetalStudioError, match="1x1 pixels: too small"):
            load_image(write_ultrasound_dicom(tmp_path / "tiny.dcm", np.zeros((1, 1), np.uint8)))


def test_the_smallest_image_allowed_loads(tmp_path):
    Image.fromarray(np.full((16, 16), 128, np.uint8)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").size == (16, 16)


def test_segmenting_a_tiny_array_says_it_is_too_small_not_an_inverted_box():
    """Arrays given to the segmenter directly (not through load_image) are checked too; a 1x1 image
    used to end in 'A box is ... got [0.06, 0.0, -0.33, -0.39]' from the automatic mode."""
    import torch

    from fetalstudio.analysis.head import segment_head
    from fetalstudio.analysis.segment import CachedPredictor
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    manager = ModelManager(Path(__file__).resolve().parents[1] / "checkpoints", placement=DevicePlacement(torch.device("cpu"), torch.float32))
    predictor = CachedPredictor(BoxPromptPredictor(manager.get(manager.default_id(ModelKind.SEGMENTER))))
    for side in (1, 2, 8):
        with pytest.raises(FetalStudioError, match=f"The image is {side}x{side} pixels: too small to analyse"):
            segment_head(predictor, np.full((side, side), 120, np.uint8), auto=True)
