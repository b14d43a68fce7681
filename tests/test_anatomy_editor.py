"""The Anatomy editor's document (fetalstudio.anatomy.editor, editor_boxes, editor_store) on a real
annotated first-trimester scan: transitions, undo/redo, the box table and the annotator's value,
refused inputs that leave the state as it was, and sessions on disk that survive a kill."""

from __future__ import annotations

import errno
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from anatomy_support import STRUCTURES, needs_structures, real_layout
from fetalstudio.anatomy import editor, editor_boxes, editor_store
from fetalstudio.anatomy.edits import Remove, Rotate, Scale, Split, Translate
from fetalstudio.anatomy.layout import Layout, StructureBox
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.anatomy.roi import edit_roi
from fetalstudio.detection.predict import Detection
from fetalstudio.errors import DiskFullError, FetalStudioError
from fetalstudio.imaging.files import TEMP_SUFFIX
from fetalstudio.imaging.image_input import load_image

pytestmark = needs_structures
IMAGE = "images/0.png"


@pytest.fixture(scope="module")
def scan():
    return load_image(STRUCTURES / IMAGE)


@pytest.fixture()
def state(scan):
    return editor.open_image(scan, "facial_sagittal", real_layout(IMAGE))


def refused(transition, state, *args, match: str):
    """Run a transition that must be refused; the state it was given is still intact afterwards."""
    before = editor.state_to_dict(state)
    with pytest.raises(FetalStudioError, match=match):
        transition(state, *args)
    assert editor.state_to_dict(state) == before


def nasal_bone_index(state) -> int:
    return [box.structure for box in state.layout.boxes].index("nasal_bone")


# --- opening ------------------------------------------------------------------------------------------
def test_open_image_records_the_source_and_its_pixel_hash(scan, state):
    assert state.image.size == (697, 480) == state.layout.size
    assert state.image.path == str(STRUCTURES / IMAGE)
    assert state.image.sha256 == editor.pixels_sha256(np.asarray(Image.open(STRUCTURES / IMAGE).convert("L")))
    assert state.origin == "annotation" and len(state.layout.boxes) == 9
    assert not state.history.can_undo and not state.history.can_redo
    empty = editor.open_image(scan, "facial_sagittal")
    assert empty.origin == "empty" and empty.layout.boxes == () and empty.layout.size == scan.size


def test_open_from_detections_clips_boxes_to_the_image(scan):
    found = [Detection("thalami", 250, 180, 330, 240, 0.9), Detection("nasal_bone", 640, 100, 720, 120, 0.8),
             Detection("palate", -30, -5, -1, 10, 0.4)]  # wholly outside: dropped
    layout = editor.layout_from_detections("facial_sagittal", scan.size, found, source="detected")
    state = editor.open_image(scan, "facial_sagittal", layout, origin="detected")
    assert [b.structure for b in state.layout.boxes] == ["thalami", "nasal_bone"]
    assert state.layout.boxes[1].x1 == 697
    with pytest.raises(FetalStudioError, match="Unknown structure 'skull'"):
        editor.layout_from_detections("facial_sagittal", scan.size, [Detection("skull", 1, 1, 9, 9, 0.5)])


def test_open_refuses_a_layout_of_another_size_or_plane(scan):
    with pytest.raises(FetalStudioError, match="697x480"):
        editor.open_image(scan, "facial_sagittal", real_layout(IMAGE).resized(300, 200))
    with pytest.raises(FetalStudioError, match="choose facial_sagittal"):
        editor.open_image(scan, "trans_thalamic", real_layout(IMAGE))
    with pytest.raises(FetalStudioError, match="Unknown layout plane"):
        editor.open_image(scan, "coronal")


# --- edits, presets, undo/redo ----------------------------------------------------------------------------
def test_edits_undo_and_redo_round_trip_exactly(state):
    edits = [Translate("thalami", dx=7, dy=-3), Scale("nuchal_translucency", sy=1.8), Rotate("palate", degrees=12),
             Split("palate", gap=0.3), Remove("nasal_bone")]
    states = [state]
    for edit in edits:
        states.append(editor.apply_edit(states[-1], edit))
    assert states[-1].history.applied_edits() == edits
    assert not states[-1].layout.has("nasal_bone") and len(states[-1].layout.boxes_of("palate")) == 2
    current = states[-1]
    for expected in reversed(states[:-1]):
        current = editor.undo(current)
        assert current.layout == expected.layout
    assert current.layout == state.layout and current.history.applied_edits() == []
    for expected in states[1:]:
        current = editor.redo(current)
        assert current.layout == expected.layout
    branched = editor.apply_edit(editor.undo(editor.undo(current)), {"op": "translate", "structure": "midbrain", "dx": 2})
    assert not branched.history.can_redo and len(branched.history.steps) == len(edits)
    refused(editor.redo, branched, match="Nothing to redo")
    refused(editor.undo, state, match="Nothing to undo")


def test_a_failing_edit_leaves_the_state_unchanged(state):
    refused(editor.apply_edit, state, Translate("thalami", dx=900), match="outside the 697x480 image")
    gone = editor.apply_edit(state, Remove("nasal_bone"))
    refused(editor.apply_edit, gone, Translate("nasal_bone", dx=1), match="has no nasal_bone box")
    refused(editor.apply_edit, state, {"op": "twist", "structure": "thalami"}, match="unknown edit op")


def test_preset_preview_is_what_applying_it_makes(state):
    preset = load_presets().get("increased_nt")
    preview = editor.preview_preset(state, preset, {"factor": 1.5})
    applied = editor.apply_preset(state, preset, {"factor": 1.5})
    assert applied.layout == preview and state.layout != preview
    assert applied.preset.name == "increased_nt" and applied.preset.values()["factor"] == 1.5
    assert applied.history.steps[-1].action == "preset increased_nt"
    nt_before, nt_after = state.layout.box("nuchal_translucency"), applied.layout.box("nuchal_translucency")
    assert nt_after.height == pytest.approx(1.5 * nt_before.height) and nt_after.center == nt_before.center
    assert editor.undo(applied).layout == state.layout
    refused(editor.apply_preset, state, preset, {"size": 3}, match="has no parameter size")
    refused(editor.apply_preset, editor.apply_edit(state, Remove("nasal_bone")), load_presets().get("absent_nasal_bone"),
            match="needs nasal_bone")


def test_unchanged_layouts_make_no_undo_step(state):
    assert editor.apply_edit(state, Translate("thalami", dx=0)) is state
    assert editor.with_layout(state, real_layout(IMAGE), "same") is state


def test_undo_keeps_the_opened_layout_and_the_last_steps(state, monkeypatch):
    monkeypatch.setattr(editor, "UNDO_LIMIT", 3)
    current = state
    for _ in range(5):
        current = editor.apply_edit(current, Translate("thalami", dx=1))
    assert len(current.history.steps) == 4 and current.history.original == state.layout
    assert current.layout.box("thalami").x0 == state.layout.box("thalami").x0 + 5


# --- box by box ---------------------------------------------------------------------------------------------
def test_set_delete_and_add_a_box(state):
    i = nasal_bone_index(state)
    moved = editor.set_box(state, i, StructureBox("nasal_bone", 400, 90, 460, 104, 8))
    assert moved.layout.boxes[i] == StructureBox("nasal_bone", 400, 90, 460, 104, 8)
    deleted = editor.delete_box(moved, i)
    assert not deleted.layout.has("nasal_bone") and len(deleted.layout.boxes) == 8
    added = editor.add_box(deleted, "nasal_bone", 410, 95, 450, 105)
    assert added.layout.box("nasal_bone") == StructureBox("nasal_bone", 410, 95, 450, 105)
    assert editor.undo(editor.undo(editor.undo(added))).layout == state.layout


@pytest.mark.parametrize("box, match", [
    (StructureBox("nasal_bone", 680, 90, 720, 100), "outside the 697x480 image"),
    (StructureBox("nasal_bone", 400, 90, 400, 100), "zero size"),
    (StructureBox("nasal_bone", 460, 90, 400, 100), "inverted"),
    (StructureBox("nose", 400, 90, 460, 100), "Unknown structure 'nose'"),
    (StructureBox("", 400, 90, 460, 100), "no structure label"),
    (StructureBox("skull", 400, 90, 460, 100), "Unknown structure 'skull' for plane 'facial_sagittal'"),
    (StructureBox("thalami", 400, 90, 460, 100), "2 thalami boxes"),
])
def test_bad_boxes_are_refused_and_the_state_kept(state, box, match):
    refused(editor.set_box, state, nasal_bone_index(state), box, match=match)


def test_bad_box_requests_are_refused(state):
    refused(editor.add_box, state, "thalami", 10, 10, 50, 50, match="already has a thalami box")
    refused(editor.add_box, state, "nose", 10, 10, 50, 50, match="Unknown structure")
    refused(editor.add_box, editor.delete_box(state, 0), "cisterna_magna", 10, 10, 10, 50, match="zero size")
    refused(editor.delete_box, state, 9, match="no box 9")
    refused(editor.set_box, state, -1, state.layout.boxes[0], match="no box -1")


# --- the table --------------------------------------------------------------------------------------------
def test_table_round_trip_keeps_exact_boxes(state):
    turned = editor.apply_edit(state, Rotate("palate", degrees=12.345))
    turned = editor.apply_edit(turned, Translate("thalami", dx=0.04))  # sub-pixel: shown rounded
    rows = editor_boxes.table_rows(turned.layout)
    assert editor_boxes.TABLE_COLUMNS == ("structure", "x0", "y0", "x1", "y1", "rotation", "confidence")
    assert [row[0] for row in rows] == [box.structure for box in turned.layout.boxes]
    assert editor_boxes.table_rows(turned) == rows and {row[6] for row in rows} == {""}  # drawn by hand: no confidence
    assert editor_boxes.apply_table(turned, rows) is turned
    frame = pd.DataFrame(rows, columns=editor_boxes.TABLE_COLUMNS)
    assert editor_boxes.apply_table(turned, frame) is turned
    assert editor_boxes.apply_table(turned, rows + [["", None, float("nan"), "", "", "", ""]]) is turned
    six_columns = [row[:6] for row in rows]  # a table saved before the confidence column
    assert editor_boxes.apply_table(turned, six_columns) is turned
    assert editor_boxes.apply_table(turned, pd.DataFrame(six_columns, columns=editor_boxes.TABLE_COLUMNS[:6])) is turned


def test_typed_rows_change_the_layout(state):
    rows = editor_boxes.table_rows(state.layout)
    i = nasal_bone_index(state)
    rows[i] = ["nasal_bone", "401.5", 92, 455, 106, "", ""]
    del rows[0]
    typed = editor_boxes.apply_table(state, pd.DataFrame(rows, columns=editor_boxes.TABLE_COLUMNS))
    assert typed.layout.box("nasal_bone") == StructureBox("nasal_bone", 401.5, 92, 455, 106, 0)
    assert not typed.layout.has(state.layout.boxes[0].structure) and len(typed.layout.boxes) == 8
    assert editor.undo(typed).layout == state.layout


def test_table_problems_name_each_row_and_column(state):
    rows = editor_boxes.table_rows(state.layout)
    rows[1][2] = "abc"
    rows[3][0] = "nose"
    rows[4][3], rows[4][1] = 10, 10  # zero width
    rows[5][5] = "tilted"
    with pytest.raises(FetalStudioError) as error:
        editor_boxes.apply_table(state, rows)
    lines = str(error.value).splitlines()
    assert "layout is unchanged" in lines[0]
    assert lines[1] == "Row 2, column y0: 'abc' is not a number; type pixels (e.g. 120.5)."
    assert lines[2].startswith("Row 4, column structure: Unknown structure 'nose'")
    assert lines[3].startswith("Row 5: ") and "zero size" in lines[3]
    assert lines[4] == "Row 6, column rotation: 'tilted' is not a number; type pixels (e.g. 120.5) or degrees."
    empty_cell = editor_boxes.table_rows(state.layout)
    empty_cell[0][1] = None
    refused(editor_boxes.apply_table, state, empty_cell, match="Row 1, column x0: empty is not a number")
    twice = editor_boxes.table_rows(state.layout) + [["thalami", 1, 1, 20, 20, 0]]
    refused(editor_boxes.apply_table, state, twice, match="2 thalami boxes")
    refused(editor_boxes.apply_table, state, [["thalami", 1, 2]], match="Row 1 has 3 cells")


# --- the detector's boxes and their confidence ----------------------------------------------------------------
DETECTED = [Detection("thalami", 250.25, 180, 330, 240.5, 0.913), Detection("nasal_bone", 640, 100, 720, 120, 0.456),
            Detection("palate", -30, -5, -1, 10, 0.4)]  # nasal bone clipped at the edge; the palate wholly outside


def test_detected_boxes_become_the_layout_with_their_scores(state):
    detected = editor.set_detected(state, DETECTED)
    assert [b.structure for b in detected.layout.boxes] == ["thalami", "nasal_bone"]
    assert detected.layout.box("nasal_bone") == StructureBox("nasal_bone", 640, 100, 697, 120)
    assert detected.detections == (editor.DetectedBox("thalami", 250.25, 180, 330, 240.5, 0.913),
                                   editor.DetectedBox("nasal_bone", 640, 100, 697, 120, 0.456))
    assert detected.history.steps[-1].action == "detected structures" and editor.undo(detected).layout == state.layout
    assert detected.layout == editor.layout_from_detections("facial_sagittal", (697, 480), DETECTED)
    assert editor.set_detected(detected, DETECTED) is detected  # detecting again: no new undo step
    twice = editor.set_detected(state, [Detection("palate", 100, 100, 140, 120, 0.7),
                                        Detection("palate", 150, 100, 190, 120, 0.6)], action="detected again")
    assert len(twice.layout.boxes_of("palate")) == 2 and twice.history.steps[-1].action == "detected again"
    refused(editor.set_detected, state, [Detection("skull", 1, 1, 9, 9, 0.5)], match="Unknown structure 'skull'")


def test_confidence_shows_while_a_box_is_as_detected(state):
    detected = editor.set_detected(state, DETECTED)
    thalami = detected.layout.box("thalami")
    assert editor.box_confidence(detected, thalami) == 0.913
    assert editor.box_confidence(state, thalami) is None  # a document without detections
    nudged = editor.set_box(detected, 0, replace(thalami, x0=thalami.x0 + 0.4))  # within half a pixel
    assert editor.box_confidence(nudged, nudged.layout.box("thalami")) == 0.913
    moved = editor.set_box(detected, 0, replace(thalami, x0=thalami.x0 + 1))
    turned = editor.apply_edit(detected, Rotate("thalami", degrees=5))
    assert editor.box_confidence(moved, moved.layout.box("thalami")) is None
    assert editor.box_confidence(turned, turned.layout.box("thalami")) is None
    assert editor.box_confidence(editor.undo(moved), thalami) == 0.913  # undo brings the detected box back
    added = editor.add_box(moved, "palate", 100, 100, 140, 120)
    rows = editor_boxes.table_rows(added)
    assert [row[6] for row in rows] == ["", 0.46, ""]  # thalami moved, nasal bone as detected, palate drawn
    assert rows[1][:6] == ["nasal_bone", 640.0, 100.0, 697.0, 120.0, 0.0]


def test_detection_is_the_baseline_the_edit_and_its_roi_count_from(state):
    from fetalstudio.anatomy.presets import load_presets

    detected = editor.set_detected(state, DETECTED)
    assert detected.original == detected.layout  # what the scan shows: no edit yet, so no ROI
    refused(editor.roi_mask, detected, match="equals the original")
    edited = editor.apply_edit(detected, Translate("thalami", dx=20))
    assert edited.original == detected.layout and [e.to_dict()["op"] for e in edited.history.applied_edits()] == ["translate"]
    roi = editor.roi_mask(edited)
    nasal = detected.layout.box("nasal_bone")
    assert roi[int(detected.layout.box("thalami").center[1]), 340] and not roi[int(nasal.center[1]), int(nasal.center[0])]
    assert editor.undo(editor.undo(edited)).original == state.layout  # undoing the detection: the opened layout again
    back = editor.state_from_dict(json.loads(json.dumps(editor.state_to_dict(edited))))
    assert back == edited and back.original == detected.layout
    many = detected
    for number in range(editor.UNDO_LIMIT + 5):  # the baseline survives the undo limit
        many = editor.apply_edit(many, Translate("thalami", dx=1 if number % 2 else -1))
    assert many.original == detected.layout and len(many.history.steps) == editor.UNDO_LIMIT + 1
    preset = editor.apply_preset(state, load_presets().presets["absent_nasal_bone"])
    assert preset.original == state.layout  # no detection: the opened layout is the baseline


def test_the_confidence_column_is_ignored_when_the_table_is_applied(state):
    detected = editor.set_detected(state, DETECTED)
    rows = editor_boxes.table_rows(detected)
    assert rows[0][6] == 0.91
    rows[0][6], rows[1][6] = 0.1, "high"  # typed over: shown only, never read
    assert editor_boxes.apply_table(detected, rows) is detected
    rows[1][1] = 600
    typed = editor_boxes.apply_table(detected, rows)
    assert typed.layout.box("nasal_bone").x0 == 600 and typed.detections == detected.detections
    assert [row[6] for row in editor_boxes.table_rows(typed)] == [0.91, ""]


def test_detections_survive_the_json_round_trip_and_old_documents_still_open(state, tmp_path):
    detected = editor.apply_edit(editor.set_detected(state, DETECTED), Translate("thalami", dx=3))
    data = json.loads(json.dumps(editor.state_to_dict(detected)))
    assert data["detections"][0] == {"structure": "thalami", "x0": 250.25, "y0": 180, "x1": 330, "y1": 240.5,
                                     "score": 0.913}
    back = editor.state_from_dict(data)
    assert back == detected and editor.box_confidence(editor.undo(back), editor.undo(back).layout.box("thalami")) == 0.913
    older = {key: value for key, value in editor.state_to_dict(state).items() if key != "detections"}
    assert editor.state_from_dict(older) == state and editor.state_from_dict(older).detections == ()
    session = editor_store.EditorSession.open("detected", tmp_path)
    session.save(detected)
    assert session.load().state == detected
    data["detections"][0]["score"] = "very"
    with pytest.raises(FetalStudioError, match="the editor state is incomplete or damaged"):
        editor.state_from_dict(data)


# --- gradio_image_annotation's value ------------------------------------------------------------------------
def test_annotator_value_round_trip(state):
    labels, colors = editor_boxes.annotator_labels("facial_sagittal")
    assert labels[0] == "thalami" and colors[0] == "#e6194b" and len(labels) == len(colors) == 9
    turned = editor.apply_edit(state, Rotate("palate", degrees=20))
    value = editor_boxes.annotator_value(turned)
    assert value["image"] == state.image.path
    assert set(value["boxes"][0]) == {"xmin", "ymin", "xmax", "ymax", "label", "color"}
    assert all(isinstance(box[k], int) for box in value["boxes"] for k in ("xmin", "ymin", "xmax", "ymax"))
    assert editor_boxes.apply_annotator_value(turned, value) is turned
    from gradio_image_annotation import image_annotator

    component = image_annotator(label_list=labels, label_colors=colors, render=False)
    assert component.postprocess(dict(value, image=np.zeros((480, 697, 3), np.uint8))).boxes == value["boxes"]


def test_boxes_moved_with_the_mouse(state):
    turned = editor.apply_edit(state, Rotate("palate", degrees=20))
    value = editor_boxes.annotator_value(turned)
    palate = next(box for box in value["boxes"] if box["label"] == "palate")
    palate.update(xmin=palate["xmin"] + 10, xmax=palate["xmax"] + 10)
    value["boxes"] = [box for box in value["boxes"] if box["label"] != "nasal_bone"]
    value["boxes"].append({"xmin": 200, "ymin": 60, "xmax": 150, "ymax": 40, "label": "nasal_bone", "color": (0, 0, 0)})
    moved = editor_boxes.apply_annotator_value(turned, value)
    old = turned.layout.box("palate")
    assert moved.layout.box("palate") == replace(old, x0=round(old.x0) + 10, y0=round(old.y0), x1=round(old.x1) + 10,
                                                 y1=round(old.y1))
    assert moved.layout.box("palate").rotation_deg == 20
    assert moved.layout.box("nasal_bone") == StructureBox("nasal_bone", 150, 40, 200, 60)  # corners dragged past
    assert moved.layout.box("thalami") == state.layout.box("thalami")  # untouched boxes keep their exact corners
    assert editor.undo(moved).layout == turned.layout


@pytest.mark.parametrize("change, match", [
    (dict(xmin=680, xmax=720), "dragged partly outside the 697x480 image"),
    (dict(ymin=-40, ymax=-10), "dragged wholly outside the 697x480 image"),
    (dict(xmin=800, xmax=900), "dragged wholly outside"),
    (dict(xmax=None), "no usable xmax"),
    (dict(label=""), "no structure label; choose one of: thalami"),
    (dict(label="nose"), "Unknown structure 'nose'"),
    (dict(label="thalami"), "2 thalami boxes"),
    (dict(ymin=100, ymax=100), "zero size"),
])
def test_bad_mouse_boxes_are_refused_and_the_state_kept(state, change, match):
    value = editor_boxes.annotator_value(state)
    value["boxes"][nasal_bone_index(state)].update(change)
    refused(editor_boxes.apply_annotator_value, state, value, match=match)


def test_a_cleared_annotator_keeps_the_layout(state):
    refused(editor_boxes.apply_annotator_value, state, None, match="Open the image again")
    refused(editor_boxes.apply_annotator_value, state, {"image": None, "boxes": []}, match="Open the image again")


# --- ROI ------------------------------------------------------------------------------------------------------
def test_roi_auto_margin_and_user_mask(state, tmp_path):
    edited = editor.set_roi_margin(editor.apply_edit(state, Translate("thalami", dx=20)), 5)
    assert np.array_equal(editor.roi_mask(edited), edit_roi(state.layout, edited.layout, 5))
    mask = np.zeros((480, 697), bool)
    mask[100:150, 300:420] = True
    painted = editor.set_roi_mask(edited, mask)
    assert painted.roi.mode == "mask" and np.array_equal(editor.roi_mask(painted), mask)
    Image.fromarray(np.where(mask, 200, 0).astype(np.uint8)).save(tmp_path / "roi.png")
    assert np.array_equal(editor.roi_mask(editor.set_roi_mask(edited, tmp_path / "roi.png")), mask)
    assert editor.set_roi_mode(painted, "auto").roi.mask_png == painted.roi.mask_png
    refused(editor.roi_mask, state, match="equals the original")


def test_bad_roi_inputs_are_refused(state, tmp_path):
    refused(editor.set_roi_margin, state, -1, match="0 to 697 pixels")
    refused(editor.set_roi_margin, state, "wide", match="a number of pixels")
    refused(editor.set_roi_mode, state, "mask", match="no ROI mask yet")
    refused(editor.set_roi_mode, state, "lasso", match="Unknown ROI mode")
    refused(editor.set_roi_mask, state, np.ones((480, 696), bool), match="696x480 pixels but the image is 697x480")
    refused(editor.set_roi_mask, state, np.zeros((480, 697), bool), match="empty")
    Image.fromarray(np.full((480, 697), 255, np.uint8)).save(tmp_path / "roi.jpg", quality=90)
    refused(editor.set_roi_mask, state, tmp_path / "roi.jpg", match="not a PNG")
    Image.fromarray(np.full((240, 348), 255, np.uint8)).save(tmp_path / "small.png")
    refused(editor.set_roi_mask, state, tmp_path / "small.png", match="348x240 pixels but the image is 697x480")


# --- sessions on disk -----------------------------------------------------------------------------------------
def rich_state(state):
    edited = editor.apply_preset(editor.apply_edit(state, Rotate("palate", degrees=-7.25)),
                                 load_presets().get("cleft_palate"))
    mask = np.zeros((480, 697), bool)
    mask[10:40, 20:90] = True
    return editor.set_project(editor.undo(editor.set_roi_mask(edited, mask)), "outputs/anatomy/projects/x")


def test_session_round_trip_restores_state_and_undo_history(state, tmp_path):
    document = rich_state(state)
    session = editor_store.EditorSession.open("browser-a", tmp_path)
    assert session.load().state is None
    assert session.save(document) == 1
    loaded = editor_store.EditorSession.open("browser-a", tmp_path).load()
    assert loaded.state == document and loaded.revision == 1 and loaded.problems == ()
    assert loaded.state.history.can_redo and editor.redo(loaded.state).layout == editor.redo(document).layout
    assert editor.undo(loaded.state).layout == state.layout
    assert np.array_equal(loaded.state.roi.mask(), document.roi.mask())


def test_every_save_is_a_new_revision_and_old_ones_are_pruned(state, tmp_path):
    session = editor_store.EditorSession.open("s1", tmp_path)
    current = state
    for step in range(6):
        current = editor.apply_edit(current, Translate("thalami", dx=1))
        assert session.save(current) == step + 1
    names = sorted(p.name for p in (tmp_path / "s1").glob("rev-*"))
    assert names == ["rev-000004.json", "rev-000005.json", "rev-000006.json"]
    assert session.load().state == current


def test_a_kill_mid_write_loses_nothing_saved(state, tmp_path):
    session = editor_store.EditorSession.open("killed", tmp_path)
    saved = editor.apply_edit(state, Remove("nasal_bone"))
    session.save(saved)
    leftover = tmp_path / "killed" / f".rev-000002.json.0123456789ab{TEMP_SUFFIX}"
    leftover.write_text('{"schema": "fetalstudio.anatomy-editor", "version": 1, "state": {"ima')  # cut by the kill
    reopened = editor_store.EditorSession.open("killed", tmp_path)
    assert not leftover.exists()
    assert reopened.load().state == saved


def test_a_corrupt_revision_is_reported_and_the_previous_one_opened(state, tmp_path):
    session = editor_store.EditorSession.open("damaged", tmp_path)
    first = editor.apply_edit(state, Translate("midbrain", dy=4))
    session.save(first)
    session.save(editor.apply_edit(first, Remove("nasal_bone")))
    newest = tmp_path / "damaged" / "rev-000002.json"
    newest.write_text(newest.read_text()[:200])
    loaded = session.load()
    assert loaded.state == first and loaded.revision == 1
    assert len(loaded.problems) == 1 and "rev-000002.json" in loaded.problems[0] and "set aside" in loaded.problems[0]
    assert (tmp_path / "damaged" / "rev-000002.json.corrupt").is_file()
    assert session.save(first) == 3  # never reuses the damaged file's number
    assert session.load().problems == ()
    data = json.loads((tmp_path / "damaged" / "rev-000003.json").read_text())
    data["state"]["history"]["position"] = 7
    (tmp_path / "damaged" / "rev-000003.json").write_text(json.dumps(data))
    assert "undo history does not fit" in session.load().problems[0]


def test_two_sessions_never_share_a_document(state, scan, tmp_path):
    a, b = (editor_store.EditorSession.open(name, tmp_path) for name in ("browser-a", "browser-b"))
    a.save(editor.apply_edit(state, Remove("nasal_bone")))
    b.save(editor.open_image(scan, "facial_sagittal"))
    assert a.load().state.layout.has("thalami") and not a.load().state.layout.has("nasal_bone")
    assert b.load().state.layout.boxes == ()
    assert {p.parent.name for p in tmp_path.glob("*/rev-*.json")} == {"browser-a", "browser-b"}
    listed = editor_store.list_sessions(tmp_path)
    assert [s.id for s in listed] == ["browser-b", "browser-a"]
    assert listed[1].boxes == 8 and listed[1].steps == 1 and listed[0].plane == "facial_sagittal"
    with pytest.raises(FetalStudioError, match="not 1-80 letters"):
        editor_store.EditorSession.open("../browser-a", tmp_path)


def test_a_full_disk_is_reported_and_the_saved_state_kept(state, tmp_path, monkeypatch):
    session = editor_store.EditorSession.open("full", tmp_path)
    session.save(state)

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(editor_store, "atomic_write_json", no_space)
    with pytest.raises(DiskFullError, match="state before it is kept"):
        session.save(editor.apply_edit(state, Remove("nasal_bone")))
    assert session.load().state == state


def test_a_damaged_state_is_refused_by_name():
    with pytest.raises(FetalStudioError, match="the editor state is incomplete or damaged"):
        editor.state_from_dict({"image": {}})
    layout = Layout("facial_sagittal", 10, 10)
    with pytest.raises(FetalStudioError, match="not auto or mask"):
        editor.state_from_dict({**editor.state_to_dict(editor.open_image(editor.SourceImage("x", "0", 10, 10),
                                                                         "facial_sagittal", layout)),
                                "roi": {"mode": "mask", "margin_px": 3, "mask_png": None}})


def test_a_stale_echo_of_a_sent_value_is_recognised_and_a_drag_is_not(state):
    echoes = editor_boxes.PendingEchoes(limit=3, ttl_s=10)
    detected = editor.set_detected(state, DETECTED)
    sent_a, sent_b = editor_boxes.annotator_value(state), editor_boxes.annotator_value(detected)
    echoes.sent("s1", sent_a, now=0)
    echoes.sent("s1", sent_b, now=1)
    assert not echoes.is_echo("s2", sent_a, now=2)  # another browser's values are not this one's
    assert echoes.is_echo("s1", sent_a, now=2)  # undo's value arriving after redo was sent: ignored
    assert not echoes.is_echo("s1", sent_a, now=2)  # each sent value is echoed once
    dragged = json.loads(json.dumps(sent_b))
    dragged["boxes"][0]["xmin"] += 5
    assert not echoes.is_echo("s1", dragged, now=3)
    assert echoes.is_echo("s1", json.loads(json.dumps(sent_b)), now=3)  # order of boxes and floats do not matter
    echoes.sent("s1", sent_a, now=4)
    assert not echoes.is_echo("s1", sent_a, now=20)  # expired: a hidden annotator never echoed it
    for moment in range(5):
        echoes.sent("s1", {"boxes": [{"label": "thalami", "xmin": moment, "ymin": 0, "xmax": 9, "ymax": 9}]}, now=30)
    assert not echoes.is_echo("s1", {"boxes": [{"label": "thalami", "xmin": 0, "ymin": 0, "xmax": 9, "ymax": 9}]}, now=31)
    assert editor_boxes.annotator_key({"boxes": [{"label": "x"}]}) == ("unreadable",)


def test_the_annotators_raw_browser_payload_reads_like_its_preprocessed_value(state):
    """The annotator's change event runs with preprocess=False: corners come at the on-screen scale."""
    sent = editor_boxes.annotator_value(state)
    raw = {"image": {"path": "/tmp/x.png", "url": "http://127.0.0.1/x.png"}, "orientation": 0,
           "boxes": [{**box, "xmin": box["xmin"] * 0.5, "ymin": box["ymin"] * 0.5, "xmax": box["xmax"] * 0.5 + 0.2,
                      "ymax": box["ymax"] * 0.5, "scaleFactor": 0.5, "color": "rgb(1, 2, 3)"} for box in sent["boxes"]]}
    value = editor_boxes.annotator_payload_value(raw)
    assert editor_boxes.annotator_key(value) == editor_boxes.annotator_key(sent)
    assert editor_boxes.apply_annotator_value(state, value) is state  # the same boxes: no step
    raw["boxes"][0]["xmin"] = "left"
    with pytest.raises(FetalStudioError, match="Box 1 has no usable xmin"):
        editor_boxes.apply_annotator_value(state, editor_boxes.annotator_payload_value(raw))
    with pytest.raises(FetalStudioError, match="The image was removed from the editor"):
        editor_boxes.apply_annotator_value(state, editor_boxes.annotator_payload_value({"image": None, "boxes": []}))


def _turned_clockwise(value: dict, width: int, height: int) -> tuple[dict, int, int]:
    """The annotator's own turn of its view: (x, y) -> (height - y, x); the view's size swaps."""
    boxes = [{**box, "xmin": height - box["ymax"], "xmax": height - box["ymin"], "ymin": box["xmin"], "ymax": box["xmax"]}
             for box in value["boxes"]]
    return {**value, "boxes": boxes, "orientation": (value.get("orientation") or 0) + 1}, height, width


def test_boxes_drawn_on_a_turned_view_are_turned_back_to_the_images_pixels(state):
    value, width, height = editor_boxes.annotator_value(state), *state.image.size
    for turns in (1, 2, 3, 4):
        value, width, height = _turned_clockwise(value, width, height)
        assert editor_boxes.apply_annotator_value(state, value) is state, turns  # turning the view changes nothing
    value, width, height = _turned_clockwise(editor_boxes.annotator_value(state), *state.image.size)
    nasal = next(box for box in value["boxes"] if box["label"] == "nasal_bone")
    nasal["ymin"] += 10  # dragged 10 px down on the view turned clockwise: 10 px right in the image
    nasal["ymax"] += 10
    moved = editor_boxes.apply_annotator_value(state, value)
    before, after = state.layout.box("nasal_bone"), moved.layout.box("nasal_bone")
    assert (after.x0, after.y0, after.x1, after.y1) == (round(before.x0) + 10, round(before.y0), round(before.x1) + 10,
                                                       round(before.y1))
    with pytest.raises(FetalStudioError, match="not a whole number of quarter turns"):
        editor_boxes.apply_annotator_value(state, {**value, "orientation": "sideways"})
