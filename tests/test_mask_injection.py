"""In-channel mask injection (METHODS section 2) on real HC18 heads: pack/unpack and outline filling."""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.pipelines.mask_injection import (
    channel_order_name,
    fill_outline_opencv,
    filled_mask,
    pack,
    parse_channel_order,
    unpack,
)

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
HC18 = DATA / "hc18_heads"

pytestmark = pytest.mark.skipif(not (HC18 / "pairs.csv").is_file(), reason="shared data not available")


def _rows() -> dict[str, dict]:
    with (HC18 / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        return {Path(r["image"]).stem: r for r in csv.DictReader(handle)}


def _load(name: str) -> tuple[np.ndarray, np.ndarray, dict]:
    row = _rows()[name]
    return np.asarray(Image.open(HC18 / row["image"])), np.asarray(Image.open(HC18 / row["mask"])), row


@pytest.mark.parametrize("mask_channel", [0, 1, 2])
def test_pack_unpack_round_trip_is_exact_on_a_real_head(mask_channel):
    gray, outline, _ = _load("000_HC")
    mask = filled_mask(outline)
    rgb = pack(gray, mask, mask_channel)
    assert rgb.shape == (*gray.shape, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., mask_channel], mask)
    for other in {0, 1, 2} - {mask_channel}:
        assert np.array_equal(rgb[..., other], gray)
    gray_back, mask_back = unpack(rgb, mask_channel)
    assert np.array_equal(gray_back, gray) and np.array_equal(mask_back, mask)
    # and through a PNG file, as training images and generated images travel
    assert np.array_equal(np.asarray(Image.fromarray(rgb)), rgb)


def test_bool_and_zero_one_masks_become_0_255():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    binary = np.zeros((3, 4), bool)
    binary[1, 1:3] = True
    for mask in (binary, binary.astype(np.uint8)):
        _, back = unpack(pack(gray, mask, 1), 1)
        assert set(np.unique(back)) == {0, 255} and np.array_equal(back > 0, binary)


def test_unpack_of_a_generated_image_averages_the_two_image_channels():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 100, 103, 200  # mask in blue, image channels disagree slightly
    gray, mask = unpack(rgb, 2)
    assert (gray == 102).all() and (mask == 200).all()


def test_shape_mismatch_and_bad_channel_are_clear_errors():
    with pytest.raises(ValueError, match="differ in size"):
        pack(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8))
    with pytest.raises(ValueError, match="mask_channel must be 0, 1 or 2"):
        pack(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8), 3)


def test_channel_order_names_and_aliases():
    assert [parse_channel_order(v) for v in ("mask,gray,gray", "gray-mask-gray", "b", "0", 2)] == [0, 1, 2, 0, 2]
    assert channel_order_name(1) == "gray,mask,gray"
    with pytest.raises(ValueError, match="Unknown channel order"):
        parse_channel_order("mask,mask,gray")


def test_closed_outline_fills_like_the_tables_hole_fill():
    _, outline, row = _load("000_HC")
    filled = fill_outline_opencv(outline)
    assert int((filled > 0).sum()) == int(row["filled_pixels_after_hole_fill"])
    assert np.array_equal(fill_outline_opencv(filled), filled)  # an already filled mask stays as it is


@pytest.mark.parametrize("name", ["186_HC", "787_HC"])
def test_outline_leaving_the_frame_gets_a_fitted_ellipse(name):
    _, outline, row = _load(name)
    assert row["outline_closed_in_frame"] == "0"
    filled = fill_outline_opencv(outline) > 0
    ring = outline > 127
    assert filled.sum() > 20 * ring.sum()  # a region, not just the ring
    assert filled[ring].all()
    edges = np.concatenate([filled[0], filled[-1], filled[:, 0], filled[:, -1]])
    assert edges.any()  # the ellipse runs out of the frame like the outline does


def test_filled_mask_uses_the_segmentation_helper_when_installed(monkeypatch):
    calls = []
    fake = types.ModuleType("fetalstudio.imaging.ellipse")
    fake.fill_outline = lambda mask: calls.append(mask.shape) or np.ones(mask.shape, bool)
    monkeypatch.setitem(sys.modules, "fetalstudio.imaging.ellipse", fake)
    result = filled_mask(np.zeros((5, 6), np.uint8))
    assert calls == [(5, 6)] and result.dtype == np.uint8 and (result == 255).all()
