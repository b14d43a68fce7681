"""The Anatomy editor's pictures (fetalstudio.anatomy.views) on the bundled example scans: the difference,
a layout drawn on its scan, the ROI tint, and the check of found against asked anatomy."""

from __future__ import annotations

from dataclasses import replace

import cv2
import numpy as np
import pytest
from PIL import Image

from fetalstudio.anatomy import views
from fetalstudio.anatomy.editor_boxes import annotator_labels
from fetalstudio.anatomy.examples import list_examples
from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.detection.predict import Detection
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.image_input import load_image
from fetalstudio.vocabulary import anatomy_plane, structure


@pytest.fixture(scope="module")
def example():
    """The first bundled example: a 726 x 492 first-trimester scan and its annotated layout (9 boxes)."""
    chosen = list_examples()[0]
    gray, layout = load_image(chosen.image).gray, chosen.layout()
    assert gray.shape == (492, 726) and len(layout.boxes) == 9
    return gray, layout


def colored(picture: np.ndarray, rgb) -> np.ndarray:
    return np.all(picture == np.array(rgb, np.uint8), axis=2)


def is_gray(picture: np.ndarray) -> np.ndarray:
    return (picture[..., 0] == picture[..., 1]) & (picture[..., 1] == picture[..., 2])


def near(mask: np.ndarray, x: float, y: float, radius: int = 3) -> bool:
    """Whether ``mask`` is set within ``radius`` pixels of the continuous point (x, y)."""
    col, row = int(np.floor(x)), int(np.floor(y))
    return bool(mask[max(0, row - radius):row + radius + 1, max(0, col - radius):col + radius + 1].any())


def drawable(shape, boxes, grow: int = 8, label_height: int = 30) -> np.ndarray:
    """Where a picture may draw for ``boxes``: each box's extent grown by ``grow`` and a label strip above and
    inside its top, as wide as the image's right part."""
    mask = np.zeros(shape[:2], bool)
    for box in boxes:
        corners = box.corners()
        (x0, y0), (x1, y1) = np.floor(corners.min(axis=0)).astype(int), np.ceil(corners.max(axis=0)).astype(int)
        mask[max(0, y0 - grow):y1 + grow, max(0, x0 - grow):x1 + grow] = True
        mask[max(0, y0 - label_height):y0 + label_height, max(0, x0 - grow):] = True
    return mask


# --- the difference -------------------------------------------------------------------------------------
def test_changed_pixels_are_tinted_red_in_the_written_picture(tmp_path):
    before = np.full((6, 8), 100, np.uint8)
    after = before.copy()
    after[2:4, 3:5] = 200  # changed
    after[0, 0] = 105  # below the change level: not tinted
    after[5, 0] = 100 + views.CHANGED_LEVEL  # exactly at the level: not tinted
    picture = views.difference_picture(before, after)
    assert picture.dtype == np.uint8 and picture.shape == (6, 8, 3)
    Image.fromarray(picture).save(tmp_path / "difference.png")
    with Image.open(tmp_path / "difference.png") as written:
        pixels = np.asarray(written.convert("RGB")).astype(int)
    red, green, blue = pixels[2, 3]
    assert red > 200 and green == blue == 100
    assert tuple(pixels[0, 0]) == (105, 105, 105) and tuple(pixels[5, 7]) == (100, 100, 100)


def test_difference_of_a_real_scan_is_red_exactly_where_it_changed(example):
    gray = example[0]
    after = gray.copy()
    after[100:140, 200:260] = 255 - after[100:140, 200:260]
    changed = np.abs(gray.astype(int) - after.astype(int)) > views.CHANGED_LEVEL
    picture = views.difference_picture(gray, after)
    assert np.array_equal(~is_gray(picture), changed)
    assert np.array_equal(picture[~changed][:, 0], after[~changed])
    assert np.all(picture[changed][:, 0] > picture[changed][:, 1])


# --- a layout on its scan ----------------------------------------------------------------------------------
def test_layout_boxes_are_drawn_in_the_annotators_colours_and_nothing_else_changes(example):
    gray, layout = example
    apart = layout.with_boxes([layout.box("thalami"), layout.box("nuchal_translucency"), layout.box("nasal_bone")])
    picture = views.layout_picture(gray, apart)
    assert picture.shape == (492, 726, 3) and picture.dtype == np.uint8
    labels, colors = annotator_labels(layout.plane)
    hex_of = dict(zip(labels, colors))
    for box in apart.boxes:
        rgb = structure(layout.plane, box.structure).color_rgb
        assert hex_of[box.structure] == "#{:02x}{:02x}{:02x}".format(*rgb)
        mask = colored(picture, rgb)
        middle = (box.y0 + box.y1) / 2
        assert near(mask, box.x0, middle) and near(mask, box.x1, middle)  # the left and right edges
        assert not near(mask, *box.center, radius=1) or box.height < 6  # an outline, not a filled box
    untouched = ~drawable(picture.shape, apart.boxes)
    assert untouched.mean() > 0.5
    assert np.array_equal(picture[untouched], np.repeat(gray[untouched][:, None], 3, axis=1))


def test_highlighted_structures_are_drawn_thicker(example):
    gray, layout = example
    rgb = structure(layout.plane, "thalami").color_rgb
    plain = colored(views.layout_picture(gray, layout), rgb).sum()
    highlighted = colored(views.layout_picture(gray, layout, highlight={"thalami"}), rgb).sum()
    assert highlighted > 2 * plain
    assert np.array_equal(views.layout_picture(gray, layout, highlight=set()), views.layout_picture(gray, layout))


def test_a_turned_box_is_drawn_turned(example):
    gray, layout = example
    upright = layout.box("thalami")
    turned = replace(upright, rotation_deg=30)
    picture = views.layout_picture(gray, layout.with_boxes([turned]))
    mask = colored(picture, structure(layout.plane, "thalami").color_rgb)
    for x, y in turned.corners():
        assert near(mask, x, y)
    assert not near(mask, upright.x1, upright.y1, radius=4)  # the upright corner (bottom right, away from the label)


def test_a_layout_of_another_size_is_scaled_to_the_picture(example):
    gray, layout = example
    half = layout.with_boxes([layout.box("thalami")]).resized(363, 246)
    assert np.array_equal(views.layout_picture(gray, half), views.layout_picture(gray, half.resized(726, 492)))


def test_a_picture_needs_an_8_bit_image(example):
    with pytest.raises(FetalStudioError, match="8-bit gray or RGB"):
        views.layout_picture(example[0].astype(np.float32), example[1])


# --- the ROI ---------------------------------------------------------------------------------------------------
def test_roi_is_tinted_inside_only_with_its_outline(example):
    gray = example[0]
    roi = np.zeros(gray.shape, bool)
    roi[120:220, 300:420] = True
    cv2.circle(roi.view(np.uint8), (150, 350), 40, 1, -1)
    picture = views.roi_tint_picture(gray, roi)
    assert picture.shape == (492, 726, 3) and picture.dtype == np.uint8
    assert np.array_equal(~is_gray(picture), roi)  # tint and outline exactly inside the ROI
    assert np.array_equal(picture[~roi][:, 0], gray[~roi])
    outline = colored(picture, views.ROI_TINT_RGB)
    edge = roi & ~cv2.erode(roi.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    assert outline[edge].all() and not outline[170, 360] and not outline[350, 150]  # the border, not the middle
    expected = np.round(0.65 * gray[170, 360] + 0.35 * np.array(views.ROI_TINT_RGB))
    assert np.array_equal(picture[170, 360], expected.astype(np.uint8))


def test_no_roi_is_the_scan_itself_and_a_wrong_size_is_refused(example):
    gray = example[0]
    assert np.array_equal(views.roi_tint_picture(gray, np.zeros(gray.shape, bool)), np.repeat(gray[..., None], 3, 2))
    with pytest.raises(FetalStudioError, match="ROI is 725x492 pixels but the image is 726x492"):
        views.roi_tint_picture(gray, np.ones((492, 725), bool))


# --- found against asked -----------------------------------------------------------------------------------------
def detection(box: StructureBox, score: float, dx: float = 0.0, dy: float = 0.0) -> Detection:
    return Detection(box.structure, box.x0 + dx, box.y0 + dy, box.x1 + dx, box.y1 + dy, score)


def test_every_verdict_of_the_anatomy_check(example):
    layout = example[1]
    asked = layout.with_boxes([b for b in layout.boxes if b.structure != "nasal_bone"])  # the nasal bone removed
    thalami, midbrain, palate = (asked.box(name) for name in ("thalami", "midbrain", "palate"))
    found = [detection(thalami, 0.91, dx=2), detection(midbrain, 0.5, dx=300), detection(layout.box("nasal_bone"), 0.87),
             detection(thalami, 0.2, dy=150)]
    rows = {(row.structure, row.verdict): row for row in views.anatomy_check(asked, found)}
    assert rows["thalami", "as asked"].iou == pytest.approx((thalami.width - 2) / (thalami.width + 2))
    assert rows["thalami", "as asked"].score == 0.91 and rows["thalami", "as asked"].asked_box == thalami
    assert rows["thalami", "extra box"].score == 0.2 and rows["thalami", "extra box"].asked_box is None
    assert rows["midbrain", "moved"].iou == 0.0 and rows["midbrain", "moved"].found_box.x0 == midbrain.x0 + 300
    assert rows["nasal_bone", "present though removed"].asked_box is None
    assert rows["nasal_bone", "present though removed"].score == 0.87
    missing = rows["palate", "missing"]
    assert missing.found_box is None and missing.score is None and missing.iou is None and missing.asked_box == palate
    names = [row.structure for row in views.anatomy_check(asked, found)]
    order = [s.name for s in anatomy_plane(asked.plane).structures]
    assert names == sorted(names, key=order.index) and len(names) == 10  # 8 asked + the removed + the extra


def test_the_check_uses_the_match_threshold_and_a_turned_boxs_extent():
    asked = Layout("facial_sagittal", 200, 200, (StructureBox("thalami", 0, 0, 100, 100),
                                                 StructureBox("palate", 50, 90, 150, 110, 90)))
    # IoU 0.3 exactly: a box of 100 x 100 against one of 30 x 100 inside it
    at_threshold = views.anatomy_check(asked, [Detection("thalami", 0, 0, 30, 100, 0.8)])[0]
    assert at_threshold.iou == pytest.approx(0.3) and at_threshold.verdict == "as asked"
    below = views.anatomy_check(asked, [Detection("thalami", 0, 0, 29, 100, 0.8)])[0]
    assert below.verdict == "moved"
    turned = next(row for row in views.anatomy_check(asked, [Detection("palate", 90, 50, 110, 150, 0.6)])
                  if row.structure == "palate")  # the palate turned 90 degrees stands upright: its extent matches
    assert turned.iou == pytest.approx(1.0) and turned.verdict == "as asked"


def test_a_split_structure_found_once_is_half_missing():
    halves = (StructureBox("palate", 10, 10, 40, 20), StructureBox("palate", 60, 10, 90, 20))
    asked = Layout("facial_sagittal", 100, 50, halves)
    rows = views.anatomy_check(asked, [Detection("palate", 61, 10, 90, 20, 0.7)])
    assert [(row.asked_box, row.verdict) for row in rows] == [(halves[1], "as asked"), (halves[0], "missing")]
    assert views.anatomy_check(asked, []) == [views.AnatomyCheckRow("palate", box, None, None, None, "missing")
                                              for box in halves]


def test_detections_picture_draws_asked_dashed_and_found_solid(example):
    gray, layout = example
    asked = layout.with_boxes([layout.box("nuchal_translucency")])
    nt = asked.box("nuchal_translucency")
    found = [detection(nt, 0.87, dy=40)]
    picture = views.detections_picture(gray, asked, found)
    assert picture.shape == (492, 726, 3) and picture.dtype == np.uint8
    mask = colored(picture, structure(layout.plane, "nuchal_translucency").color_rgb)

    def columns_drawn(y: float) -> np.ndarray:
        row = int(np.floor(y))
        return mask[row - 3:row + 4, int(nt.x0) + 4:int(nt.x1) - 4].any(axis=0)
    assert columns_drawn(nt.y1 + 40).all()  # the found box's bottom edge: solid
    assert 0.3 < columns_drawn(nt.y1).mean() < 0.8  # the asked box's bottom edge: dashed
    label = picture[int(nt.y0 + 40) - 20:int(nt.y0 + 40) - 1, int(nt.x0):int(nt.x0) + 150]
    assert colored(label, (0, 0, 0)).mean() > 0.3  # the "nuchal_translucency 0.87" label's dark patch above the box
    untouched = ~drawable(picture.shape, [nt, replace(nt, y0=nt.y0 + 40, y1=nt.y1 + 40)])
    assert np.array_equal(picture[untouched][:, 1], gray[untouched])
