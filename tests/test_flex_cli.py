"""``python -m fetalstudio flex`` end to end: tiny models found through $FETALSTUDIO_MODELS, a real
697 x 480 first-trimester scan, projects under $FETALSTUDIO_OUTPUTS; every refused input exits 2 with
``error: ...`` and leaves no project folder."""

import json

import numpy as np
import pytest
from PIL import Image

from fetalstudio.anatomy.layout import Layout
from fetalstudio.cli import build_parser, main
from fetalstudio.data.structures import read_structures
from fetalstudio.pipelines.metadata import read_png_text
from tests.data_support import DATA
from tests.synthesis_support import MODEL_ID, build_flex_model_folder, use_models_folder

STRUCTURES = DATA / "first_trimester_structures"
IMAGE = STRUCTURES / "images" / "0.png"
pytestmark = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")
FAST = ["--steps", "3", "--seed", "4"]


@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    return build_flex_model_folder(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def layout_file(tmp_path_factory):
    item = next(i for i in read_structures(STRUCTURES, include_more=False) if i.path.name == "0.png")
    return Layout.from_annotated_image(item).write(tmp_path_factory.mktemp("layout") / "layout.json")


@pytest.fixture()
def env(models_root, tmp_path, monkeypatch):
    return use_models_folder(monkeypatch, tmp_path, models_root)


def projects(env):
    folder = env / "outputs" / "anatomy" / "projects"
    return sorted(folder.iterdir()) if folder.is_dir() else []


def test_flex_help_shows_the_edit_and_presets(capsys):
    with pytest.raises(SystemExit):
        main(["flex", "--help"])
    text = capsys.readouterr().out
    assert "presets" in text and "--image" in text and "--detect" in text and "ssa+osm" in text
    parser = build_parser()
    assert parser.parse_args(["flex", "--image", "x.png"]).handler.__name__ == "run_edit"
    assert parser.parse_args(["flex", "presets", "--json"]).handler.__name__ == "run_presets"


def test_flex_presets_still_lists_them(capsys):
    assert main(["flex", "presets", "--json"]) == 0
    assert "absent_nasal_bone" in {p["name"] for p in json.loads(capsys.readouterr().out)}


def test_an_edit_writes_a_project_and_a_json_summary(env, layout_file, capsys):
    assert main(["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--preset", "absent_nasal_bone",
                 "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary) >= {"project", "files", "stage", "seed", "seeds", "models", "timings", "roi_pixels"}
    (project,) = projects(env)
    assert summary["project"] == str(project) and summary["stage"] == "ssa+osm" and summary["seed"] == 4
    assert summary["models"]["generator"]["id"] == MODEL_ID and summary["models"]["controlnet"]["id"] == "controlnets/tiny_layout"
    assert sorted(summary["files"]) == sorted(p.name for p in project.iterdir())
    assert {"result.png", "stage1.png", "osm_mask.png", "roi.png", "project.json", "edits.json"} <= set(summary["files"])
    with Image.open(IMAGE) as opened:
        original = np.asarray(opened.convert("L"))
    result = np.asarray(Image.open(project / "result.png"))
    roi = np.asarray(Image.open(project / "roi.png")) > 0
    assert result.shape == original.shape and np.array_equal(result[~roi], original[~roi])
    assert "Seed: 4" in read_png_text(project / "result.png")["parameters"]
    edits = json.loads((project / "edits.json").read_text())
    assert edits["presets"] == [{"name": "absent_nasal_bone", "parameters": {}}] and edits["edits"][0]["op"] == "remove"


def test_sampling_options_reach_the_run_and_the_project(env, layout_file, capsys):
    assert main(["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--preset", "absent_nasal_bone", "--stage", "ssa",
                 "--ssa-k", "0.5", "--ssa-delta", "0.05", "--ssa-iterations", "2", "--controlnet-scale", "0.8", "--json", *FAST]) == 0
    (project,) = projects(env)
    options = json.loads((project / "project.json").read_text())["options"]
    assert options["ssa"] == {**options["ssa"], "k": 0.5, "delta": 0.05, "iterations": 2}
    assert options["conditioning_scale"] == 0.8


def test_out_is_used_when_empty_and_a_finished_project_is_never_overwritten(env, layout_file, capsys):
    out = env / "mine"
    args = ["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--stage", "ddim", "--edit",
            '{"op": "translate", "structure": "thalami", "dx": 8}', "--out", str(out), *FAST]
    assert main(args) == 0 and (out / "result.png").is_file() and not (out / "osm_mask.png").exists()
    before = sorted(p.name for p in out.iterdir())
    assert main(args) == 2
    assert "is a finished anatomy project" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_mask_roi_without_edits_regenerates_that_region(env, layout_file, tmp_path, capsys):
    mask = np.zeros((480, 697), np.uint8)
    mask[100:160, 300:380] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--roi", str(tmp_path / "mask.png"),
                 "--stage", "ssa", "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["roi_pixels"] == 60 * 80 and summary["edits"] == 0


def test_detect_builds_the_layout_with_the_structure_detector(env, monkeypatch, capsys):
    from fetalstudio.detection.predict import Detection, StructureDetector
    from fetalstudio.models.detector import CenterNetDetector, DetectorConfig, save_detector
    from fetalstudio.vocabulary import structures_for

    classes = tuple(s.name for s in structures_for("facial_sagittal"))
    save_detector(CenterNetDetector(DetectorConfig(classes, backbone="resnet10t", input_size=64, width=8)),
                  env / "checkpoints" / "detector.safetensors")
    seen = []

    def detect(self, image, *args, **kwargs):  # the tiny detector is untrained: fixed boxes, after loading it
        seen.append((type(self.model).__name__, image.shape))
        return [Detection("nasal_bone", 400, 100, 440, 112, 0.9), Detection("thalami", 200, 150, 280, 210, 0.8)]

    monkeypatch.setattr(StructureDetector, "detect", detect)
    assert main(["flex", "--image", str(IMAGE), "--detect", "--preset", "absent_nasal_bone", "--stage", "ddim",
                 "--json", *FAST]) == 0
    assert seen == [("CenterNetDetector", (480, 697))]
    project = projects(env)[0]
    detected = Layout.read(project / "layout_before.json")
    assert detected.structure_names() == ["thalami", "nasal_bone"] and detected.source == "detected by detector"
    assert Layout.read(project / "layout_after.json").structure_names() == ["thalami"]


def _layout_text(width=697, height=480, x0=400.0, x1=440.0):
    return json.dumps({"schema": "fetalstudio.layout", "version": 1, "plane": "facial_sagittal",
                       "image_size": {"width": width, "height": height},
                       "boxes": [{"structure": "nasal_bone", "x0": x0, "y0": 100, "x1": x1, "y1": 112}]})


@pytest.mark.parametrize("case, extra, message", [
    ("no layout", [], "give --layout FILE"),
    ("layout outside", ["--layout", "{outside}", "--preset", "absent_nasal_bone"], "outside the 697x480 image"),
    ("layout of another image", ["--layout", "{small}", "--preset", "absent_nasal_bone"], "is for a 300x200 image"),
    ("unknown structure", ["--layout", "{layout}", "--edit", '{"op": "remove", "structure": "spleen"}'], "spleen"),
    ("empty roi", ["--layout", "{layout}"], "no region to regenerate"),
    ("mask of another size", ["--layout", "{layout}", "--roi", "{mask}"], "the image is 697x480"),
    ("not a controlnet", ["--layout", "{layout}", "--preset", "absent_nasal_bone", "--controlnet", MODEL_ID],
     "not a ControlNet"),
    ("unknown preset", ["--layout", "{layout}", "--preset", "no_such"], "Unknown preset 'no_such'"),
    ("parameter without its preset", ["--layout", "{layout}", "--preset", "absent_nasal_bone", "--param", "factor=3"],
     "no chosen preset has the parameter factor"),
    ("bad edit json", ["--layout", "{layout}", "--edit", "{not json"], "not valid JSON"),
    ("margin with a mask", ["--layout", "{layout}", "--roi", "{mask}", "--roi-margin", "3"], "--roi auto only"),
    ("unstable ssa step", ["--layout", "{layout}", "--preset", "absent_nasal_bone", "--ssa-delta", "0.3"], "delta must be above 0 and at most 0.25"),
    ("controlnet scale", ["--layout", "{layout}", "--preset", "absent_nasal_bone", "--controlnet-scale", "3"], "conditioning scale must be between 0 and 2"),
])
def test_bad_input_exits_2_and_writes_nothing(env, layout_file, tmp_path, capsys, case, extra, message):
    (tmp_path / "outside.json").write_text(_layout_text(x1=760))
    (tmp_path / "small.json").write_text(_layout_text(300, 200, x0=250, x1=290))
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    paths = {"outside": tmp_path / "outside.json", "small": tmp_path / "small.json", "layout": layout_file,
             "mask": tmp_path / "mask.png"}
    args = [str(paths[value[1:-1]]) if value[1:-1] in paths else value for value in extra]
    out = tmp_path / "project"
    assert main(["flex", "--image", str(IMAGE), *args, "--out", str(out), *FAST]) == 2, case
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message.lower() in err.lower(), err
    assert "Traceback" not in err and not out.exists() and projects(env) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_controlnet_installed_says_how_to_get_one(env, models_root, tmp_path, layout_file, monkeypatch, capsys):
    generator_only = tmp_path / "generator-only"
    generator_only.mkdir()
    (generator_only / MODEL_ID).symlink_to(models_root / MODEL_ID, target_is_directory=True)
    monkeypatch.setenv("FETALSTUDIO_MODELS", str(generator_only))
    assert main(["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--preset", "absent_nasal_bone", *FAST]) == 2
    err = capsys.readouterr().err
    assert "No layout ControlNet is installed" in err and "train controlnet" in err and projects(env) == []


def test_an_edge_condition_regenerates_the_whole_scan_when_nothing_is_edited(env, layout_file, capsys):
    assert main(["flex", "--image", str(IMAGE), "--layout", str(layout_file), "--condition", "canny", "--stage", "ddim",
                 "--json", *FAST]) == 0
    summary = json.loads(capsys.readouterr().out)
    project = projects(env)[0]
    record = json.loads((project / "project.json").read_text())
    assert summary["roi_pixels"] == 697 * 480 and record["options"]["condition"] == "canny"
    edges = np.asarray(Image.open(project / "condition.png").convert("L"))
    assert set(np.unique(edges)) <= {0, 255} and 0 < (edges > 0).mean() < 0.5  # a Canny map, not the layout's colours
