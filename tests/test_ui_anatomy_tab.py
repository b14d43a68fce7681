"""The Anatomy editor tab's pure helpers (no browser): the engine options its controls make, the region a run
regenerates, the keyboard script, and the pairs section's checks."""

import numpy as np
import pytest

from fetalstudio.anatomy import editor
from fetalstudio.anatomy.examples import list_examples
from fetalstudio.anatomy.presets import load_presets
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.image_input import load_image
from fetalstudio.ui.anatomy_pairs import pairs_folder_name, staged_uploads, whole_number
from fetalstudio.ui.anatomy_tab import KEYS_JS, PAGE_JS, SESSION_COOKIE_JS, flex_options, run_description, run_roi, stages_of

DEFAULTS = dict(k=1.0, delta=0.03, iterations=1, osm_strength=0.6, osm_margin=4, controlnet_scale=1.0,
                condition="layout", edge_detector="canny")


def options(ssa=True, osm=True, **changes):
    return flex_options(ssa, osm, **{**DEFAULTS, **changes})


def test_the_two_stage_switches_map_to_the_engine_stages():
    assert [stages_of(True, True), stages_of(True, False), stages_of(False, False)] == ["ssa+osm", "ssa", "ddim"]
    with pytest.raises(FetalStudioError, match="turn SSA on, or turn OSM off"):
        stages_of(False, True)


def test_the_controls_become_the_engine_options_and_bad_values_are_named():
    made = options(k=2.0, delta=0.05, iterations=3.0, osm_strength=0.5, osm_margin=6, controlnet_scale=0.8)
    assert (made.stage, made.ssa.k, made.ssa.delta, made.ssa.iterations) == ("ssa+osm", 2.0, 0.05, 3)
    assert (made.osm_strength, made.osm_margin_px, made.conditioning_scale, made.condition) == (0.5, 6, 0.8, "layout")
    assert options(condition="edges", edge_detector="canny").condition == "canny"
    with pytest.raises(FetalStudioError, match="Fill in SSA k, delta and iterations"):
        options(delta=None)
    with pytest.raises(FetalStudioError, match="iterations must be a whole number"):
        options(iterations=1.5)
    with pytest.raises(FetalStudioError, match="delta must be above 0 and at most"):
        options(delta=0.9)
    with pytest.raises(FetalStudioError, match="Choose an edge detector"):
        options(condition="edges", edge_detector=None)


def _opened():
    example = list_examples()[0]
    return editor.open_image(load_image(example.image), example.plane, example.layout(), "file")


def test_a_run_regenerates_the_edit_region_and_edge_mode_without_an_edit_the_whole_scan():
    state = _opened()
    with pytest.raises(FetalStudioError, match="equals the original"):
        run_roi(state, options())
    whole = run_roi(state, options(condition="edges"))
    assert whole.shape == (state.image.height, state.image.width) and whole.all()
    edited = editor.apply_preset(state, load_presets().presets["absent_nasal_bone"])
    roi = run_roi(edited, options(condition="edges"))
    nasal = next(b for b in state.layout.boxes if b.structure == "nasal_bone")
    assert roi[int(nasal.center[1]), int(nasal.center[0])] and 0 < roi.mean() < 0.2
    np.testing.assert_array_equal(roi, run_roi(edited, options()))


def test_the_status_says_what_a_run_regenerated_and_from_what():
    state = _opened()
    edited = editor.apply_preset(state, load_presets().presets["absent_nasal_bone"])
    assert run_description(state, options(condition="edges"), "cn") == "the whole image from the scan's canny edges, ControlNet cn"
    assert run_description(edited, options(condition="edges"), "cn") == "the edited region from the scan's canny edges, ControlNet cn"
    assert run_description(edited, options(), "cn") == "the edited region from the layout, ControlNet cn"


def test_the_page_script_sets_the_cookie_and_binds_undo_keys_only_outside_text_fields():
    assert SESSION_COOKIE_JS.strip() in PAGE_JS and KEYS_JS.strip() in PAGE_JS
    assert "anatomy-undo" in KEYS_JS and "anatomy-redo" in KEYS_JS and "'INPUT', 'TEXTAREA'" in KEYS_JS
    assert "offsetParent === null" in KEYS_JS  # nothing happens while another tab is shown


def test_pairs_folder_names_and_numbers_are_checked():
    assert pairs_folder_name(" nasal-bone_2.pairs ") == "nasal-bone_2.pairs"
    for bad in ("", "../up", "a/b", ".hidden", "x" * 65):
        with pytest.raises(FetalStudioError, match="not usable"):
            pairs_folder_name(bad)
    assert whole_number(3.0, "The number of pairs", 1, 10) == 3
    for bad in (None, 0, 2.5, 11):
        with pytest.raises(FetalStudioError, match="The number of pairs must be a whole number from 1 to 10"):
            whole_number(bad, "The number of pairs", 1, 10)


def test_uploaded_images_are_staged_into_a_fresh_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FETALSTUDIO_OUTPUTS", str(tmp_path))
    first = tmp_path / "a.png"
    first.write_bytes(list_examples()[0].image.read_bytes())
    folder = tmp_path / "anatomy" / "pair-inputs" / "run"
    staged_uploads([str(first)], folder)
    staged_uploads([str(first), str(first)], folder)  # a second run replaces the set
    assert sorted(p.name for p in folder.iterdir()) == ["0000_a.png", "0001_a.png"]
    with pytest.raises(FetalStudioError, match="Upload the images first"):
        staged_uploads([], folder)


def test_a_refused_click_becomes_a_warning_and_a_status_note_not_an_error():
    import gradio as gr

    from fetalstudio.ui.common import refusals_as_warnings

    status = gr.Markdown()

    @refusals_as_warnings(status)
    def handler(value):
        if value < 0:
            raise FetalStudioError("Type a positive number.")
        if value == 0:
            raise ValueError("a bug")
        return {status: "fine"}

    assert handler(1) == {status: "fine"}
    with pytest.warns(UserWarning, match="Type a positive number"):
        assert handler(-1) == {status: "⚠ Type a positive number."}
    with pytest.raises(ValueError):
        handler(0)
