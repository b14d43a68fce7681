"""Image input for the analysis workflow: every supported format to grayscale uint8 in original
pixels, DICOM pixel spacing honoured and identifying fields kept out, clear errors otherwise."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from fetalstudio.analysis.image_input import load_image, model_view, to_uint8
from fetalstudio.errors import FetalStudioError

try:
    from tests.data_support import DATA, needs_data, pairs_rows
    from tests.dicom_support import write_ultrasound_dicom
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, needs_data, pairs_rows
    from dicom_support import write_ultrasound_dicom


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
