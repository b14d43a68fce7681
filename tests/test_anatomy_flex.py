"""The anatomy engine's run (fetalstudio.anatomy.flex) and its project folders (anatomy.project) on a
real, non-square first-trimester scan (697 x 480) with the tiny SD pipeline and a tiny ControlNet
(64 px square, 3 steps), loaded through the model manager."""

import errno
import threading

import numpy as np
import pytest
from PIL import Image, ImageOps

from fetalstudio.anatomy import flex as flex_module
from fetalstudio.anatomy import project as project_module
from fetalstudio.anatomy.edits import Translate
from fetalstudio.anatomy.flex import (
    BUNDLED_EDGE_CONTROLNET, NO_CONTROLNET_HELP, FlexOptions, flex_settings, layout_condition, organ_mask, resolve_controlnet,
    resolve_lora, run_flex, square_layout,
)
from fetalstudio.anatomy.layout import Layout
from fetalstudio.anatomy.layout_map import box_mask
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.anatomy.project import (
    PROJECT_SCHEMA, check_project_folder, list_projects, read_project, write_project,
)
from fetalstudio.anatomy.roi import edit_roi
from fetalstudio.data.structures import read_structures
from fetalstudio.errors import DiskFullError, FetalStudioError
from fetalstudio.imaging.letterbox import letterbox_geometry, letterbox_image, letterbox_mask, unletterbox_image
from fetalstudio.models.manager import ModelManager
from fetalstudio.pipelines.metadata import read_png_text
from fetalstudio.vocabulary import anatomy_caption
from tests.data_support import DATA
from tests.synthesis_support import CONTROLNET_ID, LORA_ID, MODEL_ID, build_flex_model_folder

STRUCTURES = DATA / "first_trimester_structures"
pytestmark = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_flex_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def manager(models_root, tmp_path_factory):
    return ModelManager(tmp_path_factory.mktemp("checkpoints"), extra_folders=(models_root,))


@pytest.fixture(scope="module")
def scan():
    """images/0.png (697 x 480, gray), its annotated layout, the absent-nasal-bone edit and its ROI."""
    item = next(i for i in read_structures(STRUCTURES, include_more=False) if i.path.name == "0.png")
    with Image.open(item.path) as opened:
        source = opened.convert("L")
    before = Layout.from_annotated_image(item)
    after = load_presets().get("absent_nasal_bone").apply(before)
    roi = edit_roi(before, after, margin_px=10)
    assert source.size == (697, 480) and 0 < roi.sum() < roi.size / 10
    return source, before, after, roi


def settings(manager, layout, **overrides):
    return flex_settings(manager, layout, **{"steps": 3, "seed": 11, **overrides})


@pytest.fixture(scope="module")
def runs(manager, scan):
    """One run per stage with the same seed (shared by the tests below)."""
    source, before, after, roi = scan
    return {stage: run_flex(manager, settings(manager, after), source, after, roi, FlexOptions(stage=stage), before=before)
            for stage in flex_module.STAGES}


def gray(image):
    return np.asarray(image.convert("L")).astype(int)


# --- the shared letterbox ----------------------------------------------------------------------
def _training_letterbox(image, resolution):
    """What train controlnet did before the letterbox moved to imaging/letterbox.py."""
    fitted = ImageOps.contain(image, (resolution, resolution), method=Image.LANCZOS)
    canvas = Image.new("L", (resolution, resolution), 0)
    offset = ((resolution - fitted.width) // 2, (resolution - fitted.height) // 2)
    canvas.paste(fitted, offset)
    return canvas, (fitted.width / image.width, fitted.height / image.height, *offset)


@pytest.mark.parametrize("size", [64, 256])
def test_letterbox_is_the_controlnet_trainings_and_round_trips(scan, size):
    source = scan[0]
    square, box = letterbox_image(source, size)
    expected, (sx, sy, ox, oy) = _training_letterbox(source, size)
    assert np.array_equal(np.asarray(square), np.asarray(expected))
    assert (box.scale_x, box.scale_y, box.pad_x, box.pad_y) == (sx, sy, ox, oy)
    assert box.fitted_width == size and box.pad_x == 0 and box.pad_y > 0  # wide image: bars above and below
    assert np.asarray(square)[:box.pad_y].max() == 0 and np.asarray(square)[box.pad_y + box.fitted_height:].max() == 0
    # boxes: image -> square -> image
    assert box.to_image(*box.to_input(10.0, 20.0, 300.5, 400.25)) == pytest.approx((10.0, 20.0, 300.5, 400.25))
    # an image already at its fitted size comes back exactly
    small = source.resize((box.fitted_width, box.fitted_height))
    assert np.array_equal(np.asarray(unletterbox_image(letterbox_image(small, size)[0], letterbox_geometry(*small.size, size))),
                          np.asarray(small))


def test_letterbox_geometry_is_pillows_contain_for_every_aspect():
    for width in range(33, 700, 37):
        for height in range(29, 700, 41):
            box = letterbox_geometry(width, height, 256)
            fitted = ImageOps.contain(Image.new("L", (width, height)), (256, 256))
            assert (box.fitted_width, box.fitted_height) == fitted.size, (width, height)


def test_letterboxed_mask_covers_every_marked_pixel(scan):
    roi = scan[3]
    square, box = letterbox_mask(roi, 64)
    rows, cols = np.nonzero(roi)
    x = ((cols + 0.5) * box.scale_x + box.pad_x).astype(int)
    y = ((rows + 0.5) * box.scale_y + box.pad_y).astype(int)
    assert square[y, x].all()
    assert not square[:box.pad_y].any() and square.sum() < 3 * roi.sum() * box.scale_x * box.scale_y + 64


def test_condition_is_the_layout_drawn_in_the_letterboxed_square(scan):
    after = scan[2]
    condition, box = layout_condition(after, 64)
    placed = square_layout(after, box)
    assert condition.size == (64, 64) and placed.size == (64, 64)
    thalami = placed.box("thalami")
    assert (thalami.x0, thalami.y0) == pytest.approx(box.to_input(after.box("thalami").x0, after.box("thalami").y0, 0, 0)[:2])
    colours = np.asarray(condition)
    assert colours[:box.pad_y].max() == 0  # nothing is drawn in the bars
    assert not (box_mask(placed.box("palate"), placed.size) & ~colours.any(axis=2)).all()


# --- the run -------------------------------------------------------------------------------------
def test_settings_are_the_generators_square_and_the_layouts_caption(manager, scan):
    after = scan[2]
    made = settings(manager, after)
    assert (made.width, made.height, made.model) == (64, 64, MODEL_ID)
    assert made.prompt == anatomy_caption("facial_sagittal", after.structure_names()) and "nasal bone" not in made.prompt


@pytest.mark.parametrize("stage", flex_module.STAGES)
def test_outside_the_roi_the_result_is_the_source_pixel_for_pixel(runs, scan, stage):
    source, _, _, roi = scan
    outcome = runs[stage]
    assert not outcome.cancelled and outcome.final.size == source.size and outcome.final.mode == "L"
    made, original = gray(outcome.final), gray(source)
    assert np.array_equal(made[~roi], original[~roi])
    assert np.array_equal(gray(outcome.stage1)[~roi], original[~roi])
    assert np.abs(made[roi] - original[roi]).mean() > 5  # the ROI is regenerated


def test_stages_differ_as_expected(runs, scan):
    roi = scan[3]
    ddim, ssa, osm = runs["ddim"], runs["ssa"], runs["ssa+osm"]
    assert ddim.osm_mask is None and ssa.osm_mask is None and ddim.final is ddim.stage1
    assert len(ddim.results) == len(ssa.results) == 1 and len(osm.results) == 2
    assert not np.array_equal(gray(ddim.final)[roi], gray(ssa.final)[roi])  # SSA changes the sampling
    assert np.array_equal(gray(osm.stage1), gray(ssa.final))  # stage 1 of ssa+osm is the ssa run
    mask = osm.osm_mask
    assert mask.any() and not (mask & ~roi).any() and mask.sum() < roi.sum()
    first, final = gray(osm.stage1), gray(osm.final)
    assert np.array_equal(final[~mask], first[~mask])  # stage 2 only touches its organ mask
    assert np.abs(final[mask] - first[mask]).mean() > 1
    task = osm.results[1].images[0].metadata["task"]
    assert task["stage"] == "osm" and task["strength"] == 0.6 and task["ssa"] is None


def test_same_inputs_and_seed_give_the_same_pixels(manager, runs, scan):
    source, before, after, roi = scan
    again = run_flex(manager, settings(manager, after), source, after, roi, FlexOptions(), before=before)
    assert np.array_equal(np.asarray(again.final), np.asarray(runs["ssa+osm"].final))
    assert np.array_equal(np.asarray(again.stage1), np.asarray(runs["ssa+osm"].stage1))
    other = run_flex(manager, settings(manager, after, seed=12), source, after, roi, FlexOptions(stage="ddim"), before=before)
    assert not np.array_equal(np.asarray(other.final), np.asarray(runs["ddim"].final))


def test_cancel_stops_either_stage_and_leaves_no_images(manager, scan, tmp_path):
    source, before, after, roi = scan
    cancel = threading.Event()
    cancel.set()
    stopped = run_flex(manager, settings(manager, after), source, after, roi, FlexOptions(), cancel=cancel, before=before)
    assert stopped.cancelled and stopped.final is None and stopped.stage1 is None
    later, seen = threading.Event(), []

    def progress(done, total, step, steps):
        seen.append((step, steps))
        if step == 3:  # stage 1 done; stage 2 is cancelled before its step
            later.set()

    stopped = run_flex(manager, settings(manager, after), source, after, roi, FlexOptions(), progress, later, before=before)
    assert stopped.cancelled and stopped.final is None and len(stopped.results) == 2 and stopped.results[1].cancelled
    assert seen[:3] == [(1, 4), (2, 4), (3, 4)]  # 3 steps of stage 1 + int(3 * 0.6) of stage 2
    with pytest.raises(FetalStudioError, match="cancelled"):
        write_project(stopped, tmp_path / "project")
    assert not (tmp_path / "project").exists() and list(tmp_path.iterdir()) == []


def test_organ_mask_is_the_new_boxes_or_the_organs_around_a_removal(scan):
    _, before, after, roi = scan
    moved = Translate("thalami", dx=12).apply(before)
    moved_roi = edit_roi(before, moved, 10)
    mask = organ_mask(moved, moved_roi, 4, before)
    assert mask[box_mask(moved.box("thalami"), moved.size) & moved_roi].all()
    assert not mask[box_mask(before.box("palate"), before.size) & ~box_mask(moved.box("thalami"), moved.size)].any()
    # a removal adds no box: the remaining boxes that meet the ROI are stage 2's organs
    around = organ_mask(after, roi, 4, before)
    near = [b for b in after.boxes if (box_mask(b, after.size) & roi).any()]
    assert near and around.any() and not (around & ~roi).any()
    # edge mode: the generator does not see boxes, so without a new box stage 2 re-samples the whole ROI
    assert np.array_equal(organ_mask(after, roi, 4, before, around_gap=False), roi)
    assert np.array_equal(organ_mask(moved, moved_roi, 4, before, around_gap=False), mask)


def test_bad_inputs_are_refused_with_what_to_do(manager, scan, models_root, tmp_path):
    source, before, after, roi = scan
    run = lambda **kw: run_flex(manager, settings(manager, after), kw.pop("source", source), kw.pop("layout", after),
                                kw.pop("roi", roi), FlexOptions(**kw), before=before)
    with pytest.raises(FetalStudioError, match="layout is for a 64x64 image but the image is 697x480"):
        run(layout=Layout("facial_sagittal", 64, 64))
    with pytest.raises(FetalStudioError, match="ROI mask is 10x10"):
        run(roi=np.ones((10, 10), bool))
    with pytest.raises(FetalStudioError, match="ROI is empty"):
        run(roi=np.zeros_like(roi))
    with pytest.raises(FetalStudioError, match="is a sd_pipeline, not a ControlNet"):
        run(controlnet=MODEL_ID)
    with pytest.raises(FetalStudioError, match="stage must be one of ddim, ssa, ssa\\+osm"):
        FlexOptions(stage="osm")
    with pytest.raises(FetalStudioError, match="OSM strength"):
        FlexOptions(osm_strength=0)
    with pytest.raises(FetalStudioError, match="condition must be one of layout, canny"):
        FlexOptions(condition="sobel")
    bare = ModelManager(tmp_path, extra_folders=(models_root / MODEL_ID,))
    with pytest.raises(FetalStudioError) as refused:
        run_flex(bare, settings(manager, after), source, after, roi)
    assert str(refused.value) == NO_CONTROLNET_HELP and "train controlnet" in NO_CONTROLNET_HELP


def test_lora_defaults_to_the_planes_when_listed(manager, monkeypatch):
    assert resolve_lora(manager, "facial_sagittal", None) is None  # the sagittal LoRA is not installed here
    monkeypatch.setitem(flex_module.PLANE_LORAS, "facial_sagittal", LORA_ID)
    assert resolve_lora(manager, "facial_sagittal", None) == LORA_ID
    assert resolve_lora(manager, "facial_sagittal", "") is None
    with pytest.raises(FetalStudioError, match="not a LoRA"):
        resolve_lora(manager, "facial_sagittal", CONTROLNET_ID)


# --- edge mode: ControlNets know their condition -------------------------------------------------------
EDGE_CONTROLNET_ID = "controlnets/tiny_canny"


@pytest.fixture(scope="module")
def edge_manager(models_root, tmp_path_factory):
    """The tiny layout ControlNet, and a copy of it that says it was trained on Canny maps (its fetalstudio_condition.json)."""
    import json
    import shutil

    from fetalstudio.models.entries import CONDITION_FILE

    root = tmp_path_factory.mktemp("edge-models")
    (root / MODEL_ID).symlink_to(models_root / MODEL_ID, target_is_directory=True)
    shutil.copytree(models_root / CONTROLNET_ID, root / CONTROLNET_ID)
    shutil.copytree(models_root / CONTROLNET_ID, root / EDGE_CONTROLNET_ID)
    (root / EDGE_CONTROLNET_ID / CONDITION_FILE).write_text(json.dumps({"condition": "canny"}))
    return ModelManager(tmp_path_factory.mktemp("checkpoints"), extra_folders=(root,))


def test_the_controlnet_is_picked_by_its_condition(edge_manager, manager, caplog):
    assert edge_manager.entry(CONTROLNET_ID).condition == "layout" and edge_manager.entry(EDGE_CONTROLNET_ID).condition == "canny"
    assert resolve_controlnet(edge_manager, None) == CONTROLNET_ID  # the layout one stays the layouts' default
    assert resolve_controlnet(edge_manager, None, "canny") == EDGE_CONTROLNET_ID
    assert resolve_controlnet(edge_manager, EDGE_CONTROLNET_ID, "canny") == EDGE_CONTROLNET_ID
    assert resolve_controlnet(edge_manager, CONTROLNET_ID, "layout") == CONTROLNET_ID
    with caplog.at_level("WARNING", logger="fetalstudio.anatomy.flex"):  # no edge ControlNet installed: the layout one, with a warning
        assert resolve_controlnet(manager, None, "canny") == CONTROLNET_ID
    assert "No ControlNet trained on canny edges is installed" in caplog.text and "--condition canny" in caplog.text


def test_a_controlnet_trained_on_another_condition_is_refused_with_what_to_pick(edge_manager, models_root, tmp_path):
    with pytest.raises(FetalStudioError) as refused:
        resolve_controlnet(edge_manager, CONTROLNET_ID, "canny")
    assert str(refused.value).startswith(
        f"{CONTROLNET_ID} was trained on layout maps; edge mode needs a ControlNet trained on canny edges: pick "
        f"{EDGE_CONTROLNET_ID} or train one with `python -m fetalstudio train controlnet --condition canny ")
    with pytest.raises(FetalStudioError) as refused:
        resolve_controlnet(edge_manager, EDGE_CONTROLNET_ID, "hed")
    assert "trained on canny edges; edge mode needs a ControlNet trained on hed edges: train one with" in str(refused.value)
    with pytest.raises(FetalStudioError) as refused:
        resolve_controlnet(edge_manager, EDGE_CONTROLNET_ID)
    assert (f"{EDGE_CONTROLNET_ID} was trained on canny edges; a layout edit needs a ControlNet trained on layout maps: "
            f"pick {CONTROLNET_ID} or train one") in str(refused.value)
    with pytest.raises(FetalStudioError, match="is a sd_pipeline, not a ControlNet"):
        resolve_controlnet(edge_manager, MODEL_ID, "canny")
    only_edges = tmp_path / "only-edges"
    only_edges.mkdir()
    (only_edges / "tiny_canny").symlink_to(edge_manager.entry(EDGE_CONTROLNET_ID).path, target_is_directory=True)
    with pytest.raises(FetalStudioError) as refused:  # a layout edit never takes an edge ControlNet
        resolve_controlnet(ModelManager(tmp_path / "c1", extra_folders=(only_edges,)), None)
    assert str(refused.value) == NO_CONTROLNET_HELP
    with pytest.raises(FetalStudioError) as refused:
        resolve_controlnet(ModelManager(tmp_path / "c2", extra_folders=(models_root / MODEL_ID,)), None, "canny")
    assert "edge mode needs one trained on canny edges" in str(refused.value) and BUNDLED_EDGE_CONTROLNET in str(refused.value)


def test_edge_mode_with_an_edge_controlnet_keeps_the_pixels_outside_the_roi(edge_manager, scan):
    source, before, after, roi = scan
    outcome = run_flex(edge_manager, settings(edge_manager, after), source, after, roi, FlexOptions(condition="canny"),
                       before=before)
    assert outcome.controlnet["id"] == EDGE_CONTROLNET_ID and not outcome.cancelled and len(outcome.results) == 2
    edges = np.asarray(outcome.condition.convert("L"))
    assert outcome.condition.size == (64, 64) and set(np.unique(edges)) <= {0, 255} and edges.any()
    made, original = gray(outcome.final), gray(source)
    assert outcome.final.size == source.size and np.array_equal(made[~roi], original[~roi])
    assert np.array_equal(gray(outcome.stage1)[~roi], original[~roi])
    assert np.abs(made[roi] - original[roi]).mean() > 5  # the ROI is regenerated
    with pytest.raises(FetalStudioError, match="was trained on layout maps; edge mode needs"):
        run_flex(edge_manager, settings(edge_manager, after), source, after, roi,
                 FlexOptions(condition="canny", controlnet=CONTROLNET_ID), before=before)


# --- project folders -----------------------------------------------------------------------------
def test_project_folder_holds_everything_and_reads_back(runs, scan, tmp_path):
    source, before, after, roi = scan
    outcome = runs["ssa+osm"]
    edits = [{"op": "remove", "structure": "nasal_bone", "index": None}]
    path = write_project(outcome, tmp_path / "p", image_path="images/0.png", roi_source="auto", edits=edits,
                         presets=[{"name": "absent_nasal_bone", "parameters": {}}])
    names = sorted(p.name for p in path.iterdir())
    assert names == sorted(["source.png", "layout_before.json", "layout_before.png", "layout_after.json",
                            "layout_after.png", "condition.png", "roi.png", "osm_mask.png", "stage1.png", "result.png",
                            "edits.json", "project.json"])
    project = read_project(path)
    record = project.record
    assert record["schema"] == PROJECT_SCHEMA and record["version"] == 1 and record["stage"] == "ssa+osm"
    assert record["seed"] == 11 and record["models"]["generator"]["id"] == MODEL_ID
    assert record["models"]["controlnet"]["id"] == CONTROLNET_ID and len(record["models"]["controlnet"]["hash"]) == 10
    assert record["options"]["osm_strength"] == 0.6 and record["settings"]["steps"] == 3
    assert set(record["timings"]) == {"stage1", "stage2", "total"} and record["fetalstudio"]
    assert np.array_equal(np.asarray(project.image("source")), np.asarray(source))
    assert np.array_equal(np.asarray(project.image("result")), np.asarray(outcome.final))
    assert np.array_equal(project.mask("roi"), roi) and np.array_equal(project.mask("osm_mask"), outcome.osm_mask)
    assert project.layout("before") == before and project.layout("after") == after
    assert project.edits()["edits"] == edits
    text = read_png_text(path / "result.png")
    assert "Seed: 11" in text["parameters"] and '"flex"' in text["fetalstudio"]
    assert not list(tmp_path.glob(".*"))  # no partial folder left


def test_projects_are_listed_newest_first_and_never_overwritten(runs, tmp_path, monkeypatch):
    monkeypatch.setenv("FETALSTUDIO_OUTPUTS", str(tmp_path))
    first = write_project(runs["ddim"])
    second = write_project(runs["ssa"])
    assert first.parent == tmp_path / "anatomy" / "projects" and first != second
    (first.parent / ".broken.partial-1234").mkdir()
    (first.parent / "not-a-project").mkdir()
    assert [p.path for p in list_projects()] == [second, first]
    assert "osm_mask.png" not in read_project(first).record["files"]
    with pytest.raises(FetalStudioError, match="is a finished anatomy project"):
        write_project(runs["ddim"], first)
    with pytest.raises(FetalStudioError, match="not an anatomy project"):
        read_project(first.parent / "not-a-project")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_project_folder(empty) == empty and write_project(runs["ddim"], empty) == empty


def test_a_full_disk_leaves_no_half_written_project(runs, tmp_path, monkeypatch):
    calls = []

    def full(path, data):
        calls.append(path)
        if len(calls) == 4:
            raise OSError(errno.ENOSPC, "No space left on device")
        path.write_bytes(data)

    monkeypatch.setattr(project_module, "atomic_write_bytes", full)
    with pytest.raises(DiskFullError, match="No project was written"):
        write_project(runs["ddim"], tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_counterfactual_pairs_in_edge_mode_take_the_edge_controlnet(edge_manager, tmp_path):
    from fetalstudio.anatomy.pairs import PairsRequest, _resolve

    edge = PairsRequest(data=tmp_path, out=tmp_path / "out", preset="absent_nasal_bone", options=FlexOptions(condition="canny"))
    assert _resolve(edge_manager, edge).options.controlnet == EDGE_CONTROLNET_ID
    layout = PairsRequest(data=tmp_path, out=tmp_path / "out", preset="absent_nasal_bone")
    assert _resolve(edge_manager, layout).options.controlnet == CONTROLNET_ID
