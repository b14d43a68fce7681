"""Anatomy projects for the editor (fetalstudio.anatomy.project_files, and project.write_project's extra
files) on a bundled example scan edited with the tiny SD pipeline and tiny ControlNet (3 steps): the list of
projects, reopening one as a document with its undo history, the side-by-side picture and the zip."""

from __future__ import annotations

import errno
import json
import os
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.anatomy import editor, project_files
from fetalstudio.anatomy.edits import Translate
from fetalstudio.anatomy.examples import list_examples
from fetalstudio.anatomy.flex import FlexOptions, flex_settings, run_flex
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.anatomy.project import PROJECT_FILE, read_project, write_project
from fetalstudio.anatomy.project_files import (
    EDITOR_FILE, FOUND_FILE, PAIR_SEPARATOR_PX, found_json, open_project_state, pair_picture, project_folder,
    project_summaries, read_found, write_pair_png, zip_project,
)
from fetalstudio.detection.predict import Detection
from fetalstudio.errors import DiskFullError, FetalStudioError
from fetalstudio.imaging.image_input import load_image
from fetalstudio.models.manager import ModelManager
from tests.synthesis_support import build_flex_model_folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A document on the first example (a preset, an edit, an undone edit waiting for redo, a painted ROI,
    detector scores) and the tiny engine's run of it."""
    models = build_flex_model_folder(tmp_path_factory.mktemp("models"))
    manager = ModelManager(tmp_path_factory.mktemp("checkpoints"), extra_folders=(models,))
    example = list_examples()[0]
    image = load_image(example.image)
    state = editor.open_image(image, example.plane, example.layout(), "file")
    state = editor.set_detected(state, [Detection(b.structure, b.x0, b.y0, b.x1, b.y1, 0.8) for b in state.layout.boxes])
    state = editor.apply_preset(state, load_presets().get("absent_nasal_bone"))
    state = editor.undo(editor.apply_edit(editor.apply_edit(state, Translate("thalami", dx=6)), Translate("thalami", dx=2)))
    roi = editor.roi_mask(state).copy()
    roi[:20, :30] = True
    state = editor.set_roi_mask(state, roi)
    outcome = run_flex(manager, flex_settings(manager, state.layout, steps=3, seed=5), Image.fromarray(image.gray),
                       state.layout, editor.roi_mask(state), FlexOptions(stage="ddim"), before=state.original)
    assert outcome.final is not None and outcome.final.size == (726, 492)
    return state, outcome


def editor_bytes(state: editor.EditorState) -> bytes:
    return json.dumps(editor.state_to_dict(state), indent=1).encode("utf-8")


def save(made, root: Path, name: str, with_editor: bool = True, state: editor.EditorState | None = None) -> Path:
    """The run written as project ``root/name``, as the editor writes it."""
    state = state or made[0]
    presets = [{"name": state.preset.name, "parameters": state.preset.values()}]
    return write_project(made[1], root / name, image_path=state.image.path, roi_source=state.roi.mode,
                         edits=[edit.to_dict() for edit in state.history.applied_edits()], presets=presets,
                         extra_files={EDITOR_FILE: editor_bytes(state)} if with_editor else None)


# --- extra files in a project ------------------------------------------------------------------------------
def test_extra_files_are_written_and_listed(made, tmp_path):
    folder = save(made, tmp_path, "p")
    assert (folder / EDITOR_FILE).read_bytes() == editor_bytes(made[0])
    files = read_project(folder).record["files"]
    assert EDITOR_FILE in files and files[-1] == PROJECT_FILE
    assert sorted(files) == sorted(p.name for p in folder.iterdir())
    assert read_project(folder).file(EDITOR_FILE) == folder / EDITOR_FILE


@pytest.mark.parametrize("name, match", [
    ("result.png", "would replace the project's own result.png"), (PROJECT_FILE, "would replace"),
    ("sub/editor.json", "not a plain file name"), ("../editor.json", "not a plain file name"),
    (".hidden", "not a plain file name"), ("", "not a plain file name"), ("a\\b", "not a plain file name"),
])
def test_bad_extra_file_names_are_refused_before_anything_is_written(made, tmp_path, name, match):
    with pytest.raises(FetalStudioError, match=match):
        write_project(made[1], tmp_path / "p", extra_files={name: b"x"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FetalStudioError, match="must be bytes, not str"):
        write_project(made[1], tmp_path / "p", extra_files={"notes.txt": "text"})
    assert list(tmp_path.iterdir()) == []


# --- the list -------------------------------------------------------------------------------------------------
def test_summaries_are_newest_first_and_broken_folders_are_skipped(made, tmp_path):
    older = save(made, tmp_path, "older", with_editor=False)
    newer = save(made, tmp_path, "newer")
    record = json.loads((older / PROJECT_FILE).read_text())
    record["created_unix"] -= 60
    (older / PROJECT_FILE).write_text(json.dumps(record))
    (tmp_path / ".partial.partial-1234").mkdir()
    (tmp_path / "not-a-project").mkdir()
    (tmp_path / "a-file.txt").write_text("x")
    shutil.copytree(newer, tmp_path / "broken-json")
    (tmp_path / "broken-json" / PROJECT_FILE).write_text("{not json")
    shutil.copytree(newer, tmp_path / "odd-types")
    odd = dict(record, created_unix="yesterday", image=[1], presets="x", seed=1.5, stage=None, created="someday")
    (tmp_path / "odd-types" / PROJECT_FILE).write_text(json.dumps(odd))
    shutil.copytree(newer, tmp_path / "newer-version")
    (tmp_path / "newer-version" / PROJECT_FILE).write_text(json.dumps(dict(record, version=2)))
    summaries = project_summaries(tmp_path)
    assert [s.name for s in summaries] == ["newer", "older", "odd-types"]
    first = summaries[0]
    assert first.folder == newer.resolve() and first.source == Path(made[0].image.path).name
    assert first.preset == "absent_nasal_bone" and first.seed == 5 and first.stage == "ddim"
    assert first.plane == "facial_sagittal" and len(first.created) == 19
    assert first.created in first.title and "seed 5" in first.title and "absent_nasal_bone" in first.title
    odd_one = summaries[2]
    assert (odd_one.created, odd_one.source, odd_one.preset, odd_one.seed) == ("someday", "source.png", None, None)
    assert [s.name for s in project_summaries(tmp_path, limit=1)] == ["newer"]
    assert project_summaries(tmp_path / "missing") == []


# --- reopening a project ------------------------------------------------------------------------------------------
def test_reopening_restores_the_saved_document_with_its_history(made, tmp_path):
    state = made[0]
    folder = save(made, tmp_path, "p")
    opened = open_project_state(folder, tmp_path)
    assert opened == replace(state, project=str(folder.resolve()))
    assert opened.image.path == state.image.path  # the original image is still there
    assert opened.history.can_redo and editor.redo(opened).layout == editor.redo(state).layout
    assert editor.undo(editor.undo(opened)).layout == state.original
    assert np.array_equal(editor.roi_mask(opened), editor.roi_mask(state)) and opened.detections == state.detections


def test_a_gone_original_is_replaced_by_the_projects_source(made, tmp_path):
    copy = tmp_path / "scan.png"
    shutil.copy(made[0].image.path, copy)
    state = replace(made[0], image=replace(made[0].image, path=str(copy)))
    folder = save(made, tmp_path / "projects", "p", state=state)
    copy.unlink()
    opened = open_project_state(folder, tmp_path / "projects")
    assert opened.image.path == str(folder.resolve() / "source.png") and opened.image.sha256 == state.image.sha256
    assert opened.history == state.history and opened.roi == state.roi
    assert editor.pixels_sha256(load_image(opened.image.path).gray) == state.image.sha256
    Image.fromarray(255 - load_image(folder / "source.png").gray).save(copy)  # back, but other pixels
    assert open_project_state(folder, tmp_path / "projects").image.path == str(folder.resolve() / "source.png")


def test_a_project_without_a_readable_editor_file_is_rebuilt_from_its_files(made, tmp_path):
    state = made[0]
    plain = save(made, tmp_path, "plain", with_editor=False)
    rebuilt = open_project_state(plain, tmp_path)
    assert rebuilt.origin == "project" and len(rebuilt.history.steps) == 2 and rebuilt.history.position == 1
    assert rebuilt.original == state.original and rebuilt.layout == state.layout
    assert rebuilt.image.path == str(plain.resolve() / "source.png") and rebuilt.image.sha256 == state.image.sha256
    assert rebuilt.history.applied_edits() == state.history.applied_edits()
    assert rebuilt.preset == state.preset and rebuilt.project == str(plain.resolve())
    assert rebuilt.roi.mode == "mask" and np.array_equal(editor.roi_mask(rebuilt), editor.roi_mask(state))
    broken = save(made, tmp_path, "broken")
    (broken / EDITOR_FILE).write_text('{"image": {"pa')
    assert open_project_state(broken, tmp_path).history == rebuilt.history
    other = save(made, tmp_path, "other-image", state=replace(state, image=replace(state.image, sha256="0" * 64)))
    assert open_project_state(other, tmp_path).origin == "project"  # an editor file of another image is not used


def test_folders_that_are_not_projects_or_lie_elsewhere_are_refused(made, tmp_path):
    root = tmp_path / "projects"
    folder = save(made, root, "p")
    (root / "empty").mkdir()
    with pytest.raises(FetalStudioError, match="is not an anatomy project"):
        open_project_state(root / "empty", root)
    outside = save(made, tmp_path / "elsewhere", "q")
    os.symlink(outside, root / "link")
    for bad in (outside, root / "link", root / ".." / "elsewhere" / "q", root, root / "missing"):
        with pytest.raises(FetalStudioError, match="among the projects in"):
            open_project_state(bad, root)
        with pytest.raises(FetalStudioError, match="among the projects in"):
            zip_project(bad, tmp_path / "out.zip", root)
        with pytest.raises(FetalStudioError, match="among the projects in"):
            pair_picture(bad, root)
    assert project_folder(folder, root) == folder.resolve()
    assert [s.name for s in project_summaries(root)] == ["p"]  # the link leading out is not listed


def test_the_default_root_is_the_outputs_projects_folder(made, tmp_path, monkeypatch):
    monkeypatch.setenv("FETALSTUDIO_OUTPUTS", str(tmp_path / "outputs"))
    folder = save(made, tmp_path / "outputs" / "anatomy" / "projects", "p")
    assert open_project_state(folder).project == str(folder.resolve())
    assert [s.name for s in project_summaries()] == ["p"]
    with pytest.raises(FetalStudioError, match="among the projects in"):
        open_project_state(save(made, tmp_path, "elsewhere"))


# --- downloads -------------------------------------------------------------------------------------------------------
def test_pair_picture_is_source_bar_result(made, tmp_path):
    folder = save(made, tmp_path, "p")
    source = np.asarray(Image.open(folder / "source.png").convert("L"))
    result = np.asarray(Image.open(folder / "result.png").convert("L"))
    pair = pair_picture(folder, tmp_path)
    width = source.shape[1]
    assert pair.dtype == np.uint8 and pair.shape == (492, 2 * width + PAIR_SEPARATOR_PX)
    assert np.array_equal(pair[:, :width], source) and np.array_equal(pair[:, width + PAIR_SEPARATOR_PX:], result)
    assert (pair[:, width:width + PAIR_SEPARATOR_PX] == 255).all()
    written = write_pair_png(folder, tmp_path / "downloads" / "pair.png", tmp_path)
    assert written == tmp_path / "downloads" / "pair.png"
    assert np.array_equal(np.asarray(Image.open(written)), pair)
    with pytest.raises(FetalStudioError, match="never changed"):
        write_pair_png(folder, folder / "pair.png", tmp_path)
    assert not (folder / "pair.png").exists()


def test_zip_holds_every_file_with_identical_bytes(made, tmp_path):
    folder = save(made, tmp_path / "projects", "p")
    out = zip_project(folder, tmp_path / "downloads" / "p.zip", tmp_path / "projects")
    assert out == tmp_path / "downloads" / "p.zip"
    with zipfile.ZipFile(out) as archive:
        assert archive.testzip() is None
        names = sorted(archive.namelist())
        assert names == sorted(p.name for p in folder.iterdir())
        assert all(archive.read(name) == (folder / name).read_bytes() for name in names)
    assert sorted(p.name for p in out.parent.iterdir()) == ["p.zip"]  # no temporary file left
    again = zip_project(folder, out, tmp_path / "projects")  # rewritten in place
    assert zipfile.ZipFile(again).namelist() == zipfile.ZipFile(out).namelist()
    with pytest.raises(FetalStudioError, match="never changed"):
        zip_project(folder, folder / "p.zip", tmp_path / "projects")


def test_a_full_disk_is_reported_and_the_project_kept(made, tmp_path, monkeypatch):
    folder = save(made, tmp_path / "projects", "p")

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(project_files, "atomic_write_bytes", no_space)
    for write in (zip_project, write_pair_png):
        with pytest.raises(DiskFullError, match="The project p itself is complete"):
            write(folder, tmp_path / "downloads" / "out", tmp_path / "projects")
    assert read_project(folder).name == "p" and list((tmp_path / "downloads").iterdir()) == []


def test_a_project_holding_a_symlink_is_not_zipped(made, tmp_path):
    folder = save(made, tmp_path / "projects", "p")
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the zip")
    os.symlink(secret, folder / "notes.txt")
    with pytest.raises(FetalStudioError, match="notes.txt, which is a link"):
        zip_project(folder, tmp_path / "p.zip", tmp_path / "projects")
    assert not (tmp_path / "p.zip").exists()
    (folder / "notes.txt").unlink()
    (folder / "more").mkdir()
    os.symlink(tmp_path, folder / "more" / "up")
    with pytest.raises(FetalStudioError, match="more/up, which is a link"):
        zip_project(folder, tmp_path / "p.zip", tmp_path / "projects")


def test_the_detectors_boxes_on_the_result_are_kept_and_read_back(made, tmp_path):
    found = [Detection("thalami", 10.5, 20, 60, 80, 0.91), Detection("palate", 1, 2, 3, 4, 0.3)]
    state = made[0]
    kept = write_project(made[1], tmp_path / "p", image_path=state.image.path, roi_source=state.roi.mode,
                         extra_files={FOUND_FILE: found_json(found, "fetalstudio-structure-detector")})
    assert read_found(kept, tmp_path) == found
    assert json.loads((kept / FOUND_FILE).read_text())["detector"] == "fetalstudio-structure-detector"
    older = save(made, tmp_path, "older")
    assert read_found(older, tmp_path) is None  # made before found.json was kept: the detector runs again
    (kept / FOUND_FILE).write_text("{not json")
    assert read_found(kept, tmp_path) is None
    with pytest.raises(FetalStudioError, match="There is no project"):
        read_found(tmp_path.parent, tmp_path)
