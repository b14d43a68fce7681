"""Layout edits on real boxes, their JSON form, exact undo/redo, and the ROI masks they imply."""

import json

import numpy as np
import pytest
from PIL import Image

from anatomy_support import needs_structures, real_layout
from fetalstudio.anatomy.edits import (
    Add, EditHistory, Remove, Rotate, Scale, Split, Translate, edit_from_dict,
)
from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.anatomy.roi import (
    boxes_roi, changed_boxes, edit_roi, read_user_roi, structures_roi, write_roi,
)
from fetalstudio.errors import FetalStudioError

pytestmark = needs_structures


def test_translate_scale_rotate_on_a_real_box():
    layout = real_layout()
    thalami = layout.box("thalami")
    moved = Translate("thalami", dx=12, dy=-5).apply(layout).box("thalami")
    assert (moved.x0, moved.y0, moved.x1, moved.y1) == (thalami.x0 + 12, thalami.y0 - 5, thalami.x1 + 12, thalami.y1 - 5)
    relative = Translate("thalami", dx=0.5, relative=True).apply(layout).box("thalami")
    assert relative.x0 == thalami.x0 + 0.5 * thalami.width
    scaled = Scale("thalami", sx=1.5, sy=0.5).apply(layout).box("thalami")
    assert scaled.center == pytest.approx(thalami.center)
    assert (scaled.width, scaled.height) == pytest.approx((thalami.width * 1.5, thalami.height * 0.5))
    turned = Rotate("thalami", degrees=200).apply(layout).box("thalami")
    assert turned.rotation_deg == pytest.approx(-160) and turned.center == thalami.center
    others = [b for b in layout.boxes if b.structure != "thalami"]
    assert [b for b in Scale("thalami", 2, 2).apply(layout).boxes if b.structure != "thalami"] == others


def test_remove_add_and_split():
    layout = real_layout()
    without = Remove("nasal_bone").apply(layout)
    assert not without.has("nasal_bone") and len(without.boxes) == 8
    box = layout.box("nasal_bone")
    again = Add("nasal_bone", box.x0, box.y0, box.x1, box.y1).apply(without)
    assert set(again.boxes) == set(layout.boxes)
    palate = layout.box("palate")
    split = Split("palate", gap=0.4).apply(layout)
    left, right = split.boxes_of("palate")
    along = "x" if palate.width >= palate.height else "y"
    if along == "x":
        assert left.x0 == pytest.approx(palate.x0) and right.x1 == pytest.approx(palate.x1)
        assert right.x0 - left.x1 == pytest.approx(0.4 * palate.width)
    assert Remove("palate", index=1).apply(split).boxes_of("palate") == [left]


@pytest.mark.parametrize("edit,message", [
    (Translate("thalami", dx=800), "translate thalami.*outside the 697x480 image"),
    (Scale("thalami", sx=0), "sx must be above 0"),
    (Remove("nasal_bone", index=3), "1 nasal_bone box.*index 3"),
    (Add("nose", 1, 1, 5, 5), "Unknown structure 'nose'"),
    (Add("palate", 50, 50, 40, 60), "is inverted"),
    (Split("palate", gap=0.9, at=0.2), "gap must lie inside"),
])
def test_bad_edits_say_why(edit, message):
    with pytest.raises(FetalStudioError, match=message):
        edit.apply(real_layout())


def test_edit_of_a_missing_structure_names_the_present_ones():
    layout = Remove("nasal_bone").apply(real_layout())
    with pytest.raises(FetalStudioError, match="no nasal_bone box.*thalami, midbrain"):
        Scale("nasal_bone", 2, 2).apply(layout)


def test_edits_round_trip_through_json():
    edits = [Translate("thalami", 3.5, -2, index=0), Scale("nuchal_translucency", 1, 2.5, target_height_mm=4.0),
             Rotate("palate", 15), Remove("nasal_bone"), Split("palate", 0.3, 0.6), Add("nasal_bone", 1, 2, 30, 9, 10)]
    for edit in edits:
        assert edit_from_dict(json.loads(json.dumps(edit.to_dict()))) == edit
    with pytest.raises(FetalStudioError, match="unknown edit op 'shear'"):
        edit_from_dict({"op": "shear", "structure": "thalami"})
    with pytest.raises(FetalStudioError, match="no field factor.*sx, sy"):
        edit_from_dict({"op": "scale", "structure": "thalami", "factor": 2})
    with pytest.raises(FetalStudioError, match="add needs x0"):
        edit_from_dict({"op": "add", "structure": "thalami"})
    with pytest.raises(FetalStudioError, match="dx must be a number"):
        edit_from_dict({"op": "translate", "structure": "thalami", "dx": "left"})


def test_undo_redo_are_exact():
    original = real_layout()
    history = EditHistory(original)
    steps = [Translate("thalami", 7.3, 2.1), Scale("midbrain", 1.1, 0.9), Rotate("palate", 33), Remove("nasal_bone")]
    states = [original]
    for edit in steps:
        states.append(history.apply(edit))
    for expected in reversed(states[:-1]):
        assert history.undo() == expected
    assert history.current is original and not history.can_undo
    with pytest.raises(FetalStudioError, match="Nothing to undo"):
        history.undo()
    for expected in states[1:]:
        assert history.redo() == expected
    with pytest.raises(FetalStudioError, match="Nothing to redo"):
        history.redo()
    history.undo()
    history.apply(Remove("cisterna_magna"))  # a new edit drops the undone one
    assert not history.can_redo and history.current.has("nasal_bone") and not history.current.has("cisterna_magna")
    restored = EditHistory.from_dict(json.loads(json.dumps(history.to_dict())))
    assert restored.current == history.current and restored.applied == history.applied


def test_a_failing_batch_leaves_the_history_unchanged():
    history = EditHistory(real_layout())
    with pytest.raises(FetalStudioError):
        history.apply_all([Remove("nasal_bone"), Remove("nasal_bone")])
    assert history.current == real_layout() and not history.can_undo


def test_edit_roi_is_old_and_new_box_with_margin():
    before = real_layout()
    after = Translate("thalami", dx=40).apply(before)
    old, new = before.box("thalami"), after.box("thalami")
    assert set(changed_boxes(before, after)) == {old, new}
    roi = edit_roi(before, after, margin_px=5)
    assert roi.shape == (480, 697)
    ys, xs = np.nonzero(roi)
    assert xs.min() == round(old.x0) - 5 and xs.max() == round(new.x1) - 1 + 5
    assert ys.min() == round(old.y0) - 5 and ys.max() == round(old.y1) - 1 + 5
    assert roi.sum() == (new.x1 - old.x0 + 10) * (old.height + 10)  # one rectangle: the boxes overlap
    untouched = before.box("nuchal_translucency")
    assert not roi[int(untouched.center[1]), int(untouched.center[0])]
    removed = edit_roi(before, Remove("nasal_bone").apply(before), margin_px=0)
    bone = before.box("nasal_bone")
    assert removed.sum() == bone.width * bone.height
    small = edit_roi(before, after, margin_px=5, size=(256, 256))
    assert small.shape == (256, 256) and small.mean() == pytest.approx(roi.mean(), abs=0.01)


def test_empty_roi_refused():
    layout = real_layout()
    with pytest.raises(FetalStudioError, match="equals the original"):
        edit_roi(layout, layout)
    assert structures_roi(layout, ["nasal_bone"], 0).sum() > 0
    with pytest.raises(FetalStudioError, match="is empty"):
        structures_roi(Layout("facial_sagittal", 10, 10), [], 3)
    assert boxes_roi([StructureBox("palate", 2, 2, 4, 4)], (10, 10), margin_px=1).sum() == 16


def test_user_mask_sizes_formats_and_emptiness(tmp_path):
    mask = np.zeros((480, 697), bool)
    mask[100:150, 200:260] = True
    path = write_roi(tmp_path / "roi.png", mask)
    assert (read_user_roi(path, (697, 480)) == mask).all()
    rgba = np.zeros((480, 697, 4), np.uint8)
    rgba[10:20, 10:20] = (255, 0, 0, 255)
    Image.fromarray(rgba).save(tmp_path / "painted.png")
    assert read_user_roi(tmp_path / "painted.png", (697, 480)).sum() == 100
    with pytest.raises(FetalStudioError, match="is 697x480 pixels but the image is 384x248"):
        read_user_roi(path, (384, 248))
    Image.fromarray(np.zeros((480, 697), np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(FetalStudioError, match="empty.png is empty"):
        read_user_roi(tmp_path / "empty.png", (697, 480))
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "roi.jpg")
    with pytest.raises(FetalStudioError, match="not a PNG"):
        read_user_roi(tmp_path / "roi.jpg", (697, 480))
    with pytest.raises(FetalStudioError, match="does not exist"):
        read_user_roi(tmp_path / "none.png", (697, 480))
