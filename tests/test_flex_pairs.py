"""``python -m fetalstudio flex pairs`` (``fetalstudio.anatomy.pairs``): counterfactual normal/abnormal
pairs from real first-trimester scans, tiny models (64 px, 2 steps) through $FETALSTUDIO_MODELS."""

import csv
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.anatomy import pairs as pairs_module
from fetalstudio.cli import main
from fetalstudio.imaging.files import folder_lock
from tests.anatomy_support import write_structures_folder
from tests.data_support import DATA
from tests.synthesis_support import MODEL_ID, build_flex_model_folder, use_models_folder

STRUCTURES = DATA / "first_trimester_structures"
pytestmark = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")
FAST = ["--steps", "2", "--stage", "ddim"]
SCANS = ("images/0.png", "images/2.png")  # fully annotated
NO_NASAL_BONE = "images/0.png"  # copied as images/no_nb.png with its nasal bone box left out


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_flex_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def structures(tmp_path_factory) -> Path:
    """Two real annotated scans, then a third (a copy of the first) whose nasal bone is not annotated."""
    folder = tmp_path_factory.mktemp("structures") / "ft"
    with (STRUCTURES / "images.csv").open(newline="", encoding="utf-8") as handle:
        rows = {row["image"]: row for row in csv.DictReader(handle)}
    with (STRUCTURES / "boxes.csv").open(newline="", encoding="utf-8") as handle:
        boxes = list(csv.DictReader(handle))
    images = [rows[name] for name in SCANS] + [{**rows[NO_NASAL_BONE], "image": "images/no_nb.png"}]
    kept = [b for b in boxes if b["image"] in SCANS]
    kept += [{**b, "image": "images/no_nb.png"} for b in boxes if b["image"] == NO_NASAL_BONE and b["structure"] != "nasal_bone"]
    copies = {name: STRUCTURES / name for name in SCANS} | {"images/no_nb.png": STRUCTURES / NO_NASAL_BONE}
    return write_structures_folder(folder, images, kept, copies)


@pytest.fixture()
def env(models_root, tmp_path, monkeypatch):
    (tmp_path / "presets").mkdir()
    monkeypatch.setenv("FETALSTUDIO_PRESETS", str(tmp_path / "presets"))
    return use_models_folder(monkeypatch, tmp_path, models_root)


def pairs_command(data: Path, out: Path, *extra: str) -> list[str]:
    return ["flex", "pairs", "--data", str(data), "--preset", "absent_nasal_bone", "--out", str(out), *FAST, *extra]


def metadata(out: Path) -> list[dict]:
    with (out / "metadata.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def gray(path: Path) -> np.ndarray:
    with Image.open(path) as opened:
        return np.asarray(opened.convert("L"))


def mtimes(out: Path) -> dict[str, int]:
    return {p.relative_to(out).as_posix(): p.stat().st_mtime_ns for p in out.rglob("*.png")}


@pytest.fixture(scope="module")
def made(models_root, structures, tmp_path_factory):
    """One run over the folder (seed 5), shared by the tests that only read what it wrote."""
    out = tmp_path_factory.mktemp("made") / "pairs"
    with pytest.MonkeyPatch.context() as patch:
        for name, value in (("FETALSTUDIO_CHECKPOINTS", tmp_path_factory.mktemp("ck")), ("FETALSTUDIO_MODELS", models_root),
                            ("FETALSTUDIO_PRESETS", tmp_path_factory.mktemp("presets")), ("FETALSTUDIO_DEVICE", "cpu")):
            patch.setenv(name, str(value))
        assert main(pairs_command(structures, out, "--seed", "5")) == 0
    return out


def test_each_pair_is_identical_outside_the_roi_and_differs_inside(made, structures):
    rows = metadata(made)
    assert [row["source"] for row in rows] == list(SCANS)
    assert [int(row["seed"]) for row in rows] == [5, 6]  # scan i gets seed + i
    for row in rows:
        source = gray(structures / row["source"])
        normal, abnormal = gray(made / row["normal"]), gray(made / row["abnormal"])
        roi = gray(made / row["roi"]) > 0
        assert normal.shape == abnormal.shape == source.shape == (int(row["height"]), int(row["width"]))
        assert np.array_equal(normal[~roi], source[~roi]) and np.array_equal(abnormal[~roi], source[~roi])
        assert (normal[roi] != abnormal[roi]).any()  # only the layout differs, and it shows
        assert (normal[roi] != source[roi]).any()  # the normal side is synthetic inside the ROI too
        ys, xs = np.nonzero(roi)
        assert (int(row["roi_x0"]), int(row["roi_y0"]), int(row["roi_x1"]), int(row["roi_y1"])) == (
            xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_metadata_records_the_edit_seed_stage_and_models(made):
    rows = metadata(made)
    assert set(pairs_module.METADATA_COLUMNS) <= set(rows[0])
    for row in rows:
        assert row["preset"] == "absent_nasal_bone" and row["plane"] == "facial_sagittal" and row["stage"] == "ddim"
        assert row["normal"].startswith("normal/") and row["abnormal"].startswith("abnormal/")
        (edit,) = json.loads(row["edits"])
        assert (edit["op"], edit["structure"]) == ("remove", "nasal_bone") and json.loads(row["parameters"]) == {}
        assert row["generator"] == MODEL_ID and row["generator_hash"]
        assert row["controlnet"] == "controlnets/tiny_layout" and row["controlnet_hash"]
    settings = json.loads((made / "pairs.json").read_text())
    assert settings["preset"] == "absent_nasal_bone" and settings["seed"] == 5 and settings["options"]["stage"] == "ddim"
    png = Image.open(made / rows[0]["abnormal"])
    assert "Seed: 5" in png.text["parameters"] and json.loads(png.text["fetalstudio"])["flex_pair"]["side"] == "abnormal"


def test_a_scan_without_the_structure_is_skipped_and_reported(made):
    with (made / "skipped.csv").open(newline="", encoding="utf-8") as handle:
        skipped = list(csv.DictReader(handle))
    assert [row["source"] for row in skipped] == ["images/no_nb.png"] and "nasal_bone" in skipped[0]["reason"]
    assert "images/no_nb.png" not in {row["source"] for row in metadata(made)}


def test_the_cli_reports_progress_and_skips_on_stderr(env, structures, capsys):
    assert main(pairs_command(structures, env / "out", "--limit", "1")) == 0
    captured = capsys.readouterr()
    assert "[1/1] images/0.png -> normal/00000_images_0.png, abnormal/00000_images_0.png" in captured.err
    assert len(metadata(env / "out")) == 1 and "1 pair(s)" in captured.out
    assert main(pairs_command(structures, env / "out")) == 0  # more pairs asked for later: the same folder goes on
    captured = capsys.readouterr()
    assert "skipped 1 scan(s)" in captured.err and "images/no_nb.png" in captured.err and "1 new, 1 already there" in captured.out
    assert [row["source"] for row in metadata(env / "out")] == list(SCANS)


def test_a_rerun_skips_finished_pairs_and_regenerates_nothing(env, structures, monkeypatch, capsys):
    out = env / "out"
    assert main(pairs_command(structures, out)) == 0
    rows, times = metadata(out), mtimes(out)
    calls = []
    monkeypatch.setattr(pairs_module, "run_flex", lambda *args, **kwargs: calls.append(args))
    assert main(pairs_command(structures, out)) == 0
    assert calls == [] and metadata(out) == rows and mtimes(out) == times
    assert "0 new, 2 already there" in capsys.readouterr().out


def test_an_interrupted_run_leaves_a_consistent_folder_that_resumes(env, structures, monkeypatch, capsys):
    out = env / "out"
    real_run_flex, calls = pairs_module.run_flex, []

    def interrupted(*args, **kwargs):  # Ctrl-C while the second pair's abnormal image is being made
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_run_flex(*args, **kwargs)

    monkeypatch.setattr(pairs_module, "run_flex", interrupted)
    assert main(pairs_command(structures, out)) == 130
    assert [row["source"] for row in metadata(out)] == ["images/0.png"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == [
        "abnormal/00000_images_0.png", "normal/00000_images_0.png", "roi/00000_images_0.png"]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    # a crash can also cut the last row short or leave an image without its row: both are cleared
    with (out / "metadata.csv").open("a", encoding="utf-8") as handle:
        handle.write("normal/00001_images_2.png,abnormal/000")
    Image.new("L", (8, 8)).save(out / "normal" / "00001_images_2.png")
    monkeypatch.setattr(pairs_module, "run_flex", real_run_flex)
    assert main(pairs_command(structures, out)) == 0
    rows = metadata(out)
    assert [row["source"] for row in rows] == list(SCANS) and all(row["controlnet_hash"] for row in rows)
    assert gray(out / rows[1]["normal"]).shape == (467, 721)


def test_cancel_stops_between_steps_and_writes_no_half_pair(env, structures):
    import threading

    from fetalstudio.anatomy.flex import FlexOptions
    from fetalstudio.app_context import build_manager

    cancel = threading.Event()
    request = pairs_module.PairsRequest(data=structures, out=env / "out", preset="absent_nasal_bone", steps=2,
                                        options=FlexOptions(stage="ddim"))
    report = pairs_module.export_pairs(build_manager(), request, lambda *args: cancel.set(), cancel)
    assert report.cancelled and report.written == 1
    assert len(metadata(env / "out")) == 1 and len(list((env / "out" / "normal").iterdir())) == 1


def test_a_changed_command_into_the_folder_is_refused(env, structures, capsys):
    out = env / "out"
    assert main(pairs_command(structures, out, "--limit", "1")) == 0
    rows, times = metadata(out), mtimes(out)
    capsys.readouterr()
    assert main(pairs_command(structures, out, "--limit", "1", "--seed", "9")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "another command (seed differ)" in err and "new (or empty) --out" in err
    assert main(["flex", "pairs", "--data", str(structures), "--preset", "increased_nt", "--out", str(out), *FAST]) == 2
    assert "parameters, preset differ" in capsys.readouterr().err
    assert metadata(out) == rows and mtimes(out) == times


def test_a_folder_in_use_by_another_run_is_refused(env, structures, capsys):
    import threading

    out = env / "out"
    out.mkdir()
    held, release = threading.Event(), threading.Event()

    def other_run():  # holds the folder's lock as a running export does
        with folder_lock(out).hold():
            held.set()
            release.wait(60)

    thread = threading.Thread(target=other_run)
    thread.start()
    try:
        held.wait(60)
        assert main(pairs_command(structures, out)) == 2
    finally:
        release.set()
        thread.join()
    assert "in use by another `flex pairs` run" in capsys.readouterr().err
    assert not (out / "metadata.csv").exists()


def test_layouts_found_by_the_detector_for_a_csv_of_images(env, structures, monkeypatch, capsys):
    from fetalstudio.detection.predict import Detection, StructureDetector
    from fetalstudio.models.detector import CenterNetDetector, DetectorConfig, save_detector
    from fetalstudio.vocabulary import structures_for

    classes = tuple(s.name for s in structures_for("facial_sagittal"))
    save_detector(CenterNetDetector(DetectorConfig(classes, backbone="resnet10t", input_size=64, width=8)),
                  env / "checkpoints" / "detector.safetensors")

    def detect(self, image, *args, **kwargs):  # the tiny detector is untrained: a nasal bone on the first scan only
        found = [Detection("thalami", 200, 150, 280, 210, 0.8)]
        return found + [Detection("nasal_bone", 400, 100, 440, 112, 0.9)] if image.shape == (480, 697) else found

    monkeypatch.setattr(StructureDetector, "detect", detect)
    table = env / "scans.csv"
    table.write_text(f"image\n{structures / SCANS[0]}\n{structures / SCANS[1]}\n")
    assert main(pairs_command(table, env / "out")) == 0
    (row,) = metadata(env / "out")
    assert row["source"] == str(structures / SCANS[0]) and int(row["roi_x0"]) == 400 - 16 and int(row["roi_y1"]) == 112 + 16
    assert "nasal_bone" in capsys.readouterr().err  # the second scan: no nasal bone detected


def _other_plane_preset(folder: Path) -> None:
    (folder / "bigger_skull.json").write_text(json.dumps({
        "schema": "fetalstudio.preset", "version": 1, "name": "bigger_skull", "title": "Bigger skull",
        "plane": "trans_thalamic", "clinical_meaning": "macrocephaly", "marker": "large head",
        "edits": [{"op": "scale", "structure": "skull", "sx": 1.2, "sy": 1.2}]}))


@pytest.mark.parametrize("case, args, message", [
    ("unknown preset", ["--preset", "no_such"], "Unknown preset 'no_such'"),
    ("preset of another plane", ["--preset", "bigger_skull"], "is for the trans_thalamic plane"),
    ("unknown parameter", ["--preset", "absent_nasal_bone", "--param", "factor=3"], "has no parameter factor"),
    ("data without images", ["--preset", "absent_nasal_bone", "--data", "{empty}"], "holds no images"),
    ("data missing", ["--preset", "absent_nasal_bone", "--data", "{missing}"], "does not exist"),
    ("csv without an image column", ["--preset", "absent_nasal_bone", "--data", "{table}"], "needs an 'image' column"),
    ("limit 0", ["--preset", "absent_nasal_bone", "--limit", "0"], "--limit"),
    ("out is a file", ["--preset", "absent_nasal_bone", "--out", "{file}"], "is a file"),
    ("out not a pairs folder", ["--preset", "absent_nasal_bone", "--out", "{full}"], "holds no counterfactual pairs"),
    ("bad ssa step", ["--preset", "absent_nasal_bone", "--ssa-delta", "0.3"], "delta must be above 0 and at most 0.25"),
])
def test_bad_input_exits_2_with_a_message(env, structures, capsys, case, args, message):
    _other_plane_preset(env / "presets")
    (env / "empty").mkdir()
    (env / "table.csv").write_text("path\nx.png\n")
    (env / "file").write_text("x")
    (env / "full").mkdir()
    (env / "full" / "notes.txt").write_text("mine")
    paths = {"empty": env / "empty", "missing": env / "missing", "table": env / "table.csv", "file": env / "file",
             "full": env / "full"}
    values = [str(paths[a[1:-1]]) if a[1:-1] in paths else a for a in args]
    command = ["flex", "pairs", "--data", str(structures), "--out", str(env / "out"), *FAST, *values]
    with pytest.raises(SystemExit) if case in ("limit 0", "out is a file") else nullcontext() as raised:
        assert main(command) == 2, case
    if raised is not None:
        assert raised.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and message.lower() in err.lower() and "Traceback" not in err, err
    assert not (env / "out" / "metadata.csv").exists()
    assert sorted(p.name for p in (env / "full").iterdir()) == ["notes.txt"]



def test_two_stage_pairs_keep_the_scan_outside_the_roi(env, structures):
    out = env / "out"
    assert main(["flex", "pairs", "--data", str(structures), "--preset", "increased_nt", "--out", str(out), "--steps", "2",
                 "--limit", "1", "--seed", "3"]) == 0
    (row,) = metadata(out)
    source, roi = gray(structures / row["source"]), gray(out / row["roi"]) > 0
    normal, abnormal = gray(out / row["normal"]), gray(out / row["abnormal"])
    assert row["stage"] == "ssa+osm" and json.loads(row["parameters"]) == {"factor": 2.0, "thickness_mm": 4.0}
    assert np.array_equal(normal[~roi], source[~roi]) and np.array_equal(abnormal[~roi], source[~roi])
    assert (normal[roi] != abnormal[roi]).any()
