"""Anomaly presets applied to real layouts, user preset files, and `flex presets`."""

import json
import subprocess
import sys

import pytest

from anatomy_support import needs_structures, real_layout
from fetalstudio.anatomy.edits import Remove
from fetalstudio.anatomy.presets import load_presets, read_preset
from fetalstudio.cli import main
from fetalstudio.errors import FetalStudioError

pytestmark = needs_structures
BUILT_IN = {"absent_nasal_bone", "increased_nt", "absent_it", "cleft_palate", "displaced_structure", "enlarged_structure"}


@pytest.fixture
def catalog(tmp_path):
    return load_presets(tmp_path / "no-user-presets")


def test_built_in_presets_are_complete(catalog):
    assert set(catalog.presets) == BUILT_IN and catalog.problems == ()
    for preset in catalog.presets.values():
        assert preset.plane == "facial_sagittal" and preset.clinical_meaning and preset.marker and preset.title


def test_absent_nasal_bone_and_absent_it_remove_only_their_structure(catalog):
    layout = real_layout()
    for name, removed in (("absent_nasal_bone", "nasal_bone"), ("absent_it", "intracranial_translucency_4th_ventricle")):
        edited = catalog.get(name).apply(layout)
        assert not edited.has(removed)
        assert set(edited.boxes) == {b for b in layout.boxes if b.structure != removed}


def test_increased_nt_scales_height_by_factor_or_to_a_thickness(catalog):
    layout = real_layout()
    nt = layout.box("nuchal_translucency")
    preset = catalog.get("increased_nt")
    doubled = preset.apply(layout).box("nuchal_translucency")  # no pixel size: the factor
    assert doubled.height == pytest.approx(2 * nt.height) and doubled.width == nt.width
    assert doubled.center == pytest.approx(nt.center)
    assert preset.apply(layout, {"factor": 1.5}).box("nuchal_translucency").height == pytest.approx(1.5 * nt.height)
    with_pixel = type(layout)(layout.plane, layout.width, layout.height, layout.boxes, pixel_size_mm=0.1)
    thick = preset.apply(with_pixel).box("nuchal_translucency")
    assert thick.height * 0.1 == pytest.approx(4.0) and thick.height * 0.1 > 3.5
    by_factor = preset.apply(with_pixel, {"thickness_mm": None, "factor": 1.2}).box("nuchal_translucency")
    assert by_factor.height == pytest.approx(1.2 * nt.height)
    with pytest.raises(FetalStudioError, match="no parameter thickness.*factor, thickness_mm"):
        preset.apply(layout, {"thickness": 3})


def test_cleft_palate_splits_the_palate_with_a_gap(catalog):
    layout = real_layout()
    palate = layout.box("palate")
    pieces = catalog.get("cleft_palate").apply(layout).boxes_of("palate")
    assert len(pieces) == 2
    assert sum(p.area for p in pieces) == pytest.approx(0.7 * palate.area)


def test_displaced_and_enlarged_take_any_structure(catalog):
    layout = real_layout()
    moved = catalog.get("displaced_structure").apply(layout, {"structure": "midbrain", "dx": -0.25, "dy": 0.1})
    before, after = layout.box("midbrain"), moved.box("midbrain")
    assert after.x0 - before.x0 == pytest.approx(-0.25 * before.width)
    assert after.y0 - before.y0 == pytest.approx(0.1 * before.height)
    enlarged = catalog.get("enlarged_structure").apply(layout).box("cisterna_magna")
    assert enlarged.area == pytest.approx(2.25 * layout.box("cisterna_magna").area)
    with pytest.raises(FetalStudioError, match="Unknown structure 'nose'"):
        catalog.get("enlarged_structure").apply(layout, {"structure": "nose"})


def test_preset_needing_a_missing_structure_says_so(catalog):
    layout = Remove("nasal_bone").apply(real_layout())
    with pytest.raises(FetalStudioError, match="absent_nasal_bone needs nasal_bone, which this layout lacks"):
        catalog.get("absent_nasal_bone").apply(layout)
    with pytest.raises(FetalStudioError, match="Unknown preset 'cleft'.*absent_it"):
        catalog.get("cleft")


def _write(folder, name, data):
    path = folder / name
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_user_presets_are_scanned_and_bad_files_named(tmp_path):
    folder = tmp_path / "presets"
    folder.mkdir()
    good = {"schema": "fetalstudio.preset", "version": 1, "name": "small_thalami", "title": "Small thalami",
            "plane": "facial_sagittal", "clinical_meaning": "under-development", "marker": "small thalami",
            "parameters": {"f": {"default": 0.5}}, "edits": [{"op": "scale", "structure": "thalami", "sx": "$f", "sy": "$f"}]}
    _write(folder, "good.json", good)
    _write(folder, "broken.json", "{not json")
    _write(folder, "nose.json", {**good, "name": "big_nose", "edits": [{"op": "remove", "structure": "nose"}]})
    _write(folder, "clash.json", {**good, "name": "cleft_palate"})
    _write(folder, "param.json", {**good, "name": "p", "edits": [{"op": "scale", "structure": "thalami", "sx": "$g"}]})
    _write(folder, "newer.json", {**good, "name": "n", "version": 2})
    catalog = load_presets(folder)
    assert "small_thalami" in catalog.presets and BUILT_IN <= set(catalog.presets)
    problems = "\n".join(catalog.problems)
    assert len(catalog.problems) == 5
    for name, reason in (("broken.json", "could not be read as JSON"), ("nose.json", "Unknown structure 'nose'"),
                         ("clash.json", "already taken by built-in"), ("param.json", "no parameter 'g'"),
                         ("newer.json", "version 2")):
        assert any(str(folder / name) in p and reason in p for p in catalog.problems), (name, problems)
    thalami = real_layout().box("thalami")
    assert catalog.get("small_thalami").apply(real_layout()).box("thalami").width == pytest.approx(thalami.width / 2)
    with pytest.raises(FetalStudioError, match="nose.json"):
        read_preset(folder / "nose.json")


def test_user_folder_from_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FETALSTUDIO_PRESETS", str(tmp_path))
    _write(tmp_path, "bad.json", {"schema": "other"})
    assert main(["flex", "presets"]) == 0
    out, err = capsys.readouterr()
    assert "increased_nt" in out and "facial_sagittal" in out and "3.5 mm" in out
    assert "warning: preset skipped" in err and "bad.json" in err and "not a FetalStudio preset" in err


def test_flex_presets_cli_json(tmp_path):
    result = subprocess.run([sys.executable, "-m", "fetalstudio", "flex", "presets", "--json", "--folder", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    listed = {item["name"]: item for item in json.loads(result.stdout)}
    assert set(listed) == BUILT_IN
    assert listed["absent_nasal_bone"]["edits"] == [{"op": "remove", "structure": "nasal_bone"}]
    assert listed["increased_nt"]["source"] == "built-in" and listed["increased_nt"]["plane"] == "facial_sagittal"
