"""Image+mask pairs into review sessions (generated with the bundled LoRAs, imported from real data),
moving through a session, and the pictures/masks exchanged with the browser editor."""

from __future__ import annotations

import csv
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import Ellipse, dice, fill_outline
from fetalstudio.imaging.masks import apply_editor_strokes, editor_background, overlay
from fetalstudio.review import navigation
from fetalstudio.review.export import export_session
from fetalstudio.review.pairs import PairRequest, find_pairs, generate_pairs, import_pairs, lora_mask_channel, next_seed
from fetalstudio.review.store import ReviewSession

REPO = Path(__file__).resolve().parents[1]
CHECKPOINTS = REPO / "checkpoints"
HC18 = REPO.parent / "shared" / "data" / "hc18_heads"
needs_data = pytest.mark.skipif(not (HC18 / "pairs.csv").is_file(), reason="shared data not found")
needs_bundled = pytest.mark.skipif(not (CHECKPOINTS / "bundled" / "fetalstudio-tiny" / "model_index.json").is_file(),
                                   reason="bundled generator not trained yet")


def _hc18_rows(count: int) -> list[dict]:
    with (HC18 / "pairs.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))[:count]


def _pairs_csv(folder: Path, count: int) -> Path:
    """A pairs CSV in ``folder`` that points at the shared HC18 files with relative paths."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "mask", "pixel_size_mm", "hc_mm"])
        writer.writeheader()
        for row in _hc18_rows(count):
            writer.writerow({"image": str(HC18 / row["image"]), "mask": str(HC18 / row["mask"]),
                             "pixel_size_mm": row["pixel_size_mm"], "hc_mm": row["hc_mm"]})
    return path


@needs_data
def test_importing_real_outlines_gives_filled_ellipses_and_their_head_circumference(tmp_path):
    session = ReviewSession.create(tmp_path / "session")
    items = import_pairs(session, _pairs_csv(tmp_path / "data", 3))
    assert [item.id for item in items] == [item.id for item in session.items("pending")]
    for item, row in zip(items, _hc18_rows(3)):
        outline = np.asarray(Image.open(HC18 / row["mask"]).convert("L"))
        assert dice(session.load_mask(item), fill_outline(outline)) > 0.99
        assert abs(item.biometry["hc_mm"] - float(row["hc_mm"])) < 0.1
        assert item.source["origin"] == "imported"
        np.testing.assert_array_equal(session.load_raw_mask(item), outline)


@needs_data
def test_import_from_a_folder_pairs_files_by_name(tmp_path):
    folder = tmp_path / "scans"
    (folder / "images").mkdir(parents=True)
    (folder / "annotations").mkdir()
    for row in _hc18_rows(2):
        (folder / "images" / Path(row["image"]).name).write_bytes((HC18 / row["image"]).read_bytes())
        (folder / "annotations" / Path(row["mask"]).name).write_bytes((HC18 / row["mask"]).read_bytes())
    (folder / "images" / "unmatched.png").write_bytes((HC18 / _hc18_rows(1)[0]["image"]).read_bytes())
    pairs = find_pairs(folder)
    assert [p.image.name for p in pairs] == ["000_HC.png", "001_HC.png"]
    assert all(p.mask.name == p.image.stem + "_Annotation.png" for p in pairs)


def test_import_errors_say_what_to_do(tmp_path):
    with pytest.raises(FetalStudioError, match="neither a CSV file nor a folder"):
        find_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FetalStudioError, match="images/ subfolder"):
        find_pairs(tmp_path / "empty")
    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\na.png,b.png\n")
    with pytest.raises(FetalStudioError, match="needs the columns image, mask"):
        find_pairs(bad)
    gone = tmp_path / "gone.csv"
    gone.write_text("image,mask\na.png,b.png\n")
    with pytest.raises(FetalStudioError, match="does not exist"):
        find_pairs(gone)


def test_a_mask_of_another_size_is_refused_on_import(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((40, 60), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "masks" / "a.png")
    session = ReviewSession.create(tmp_path / "session")
    with pytest.raises(FetalStudioError, match="must have its image's size"):
        import_pairs(session, tmp_path)


def test_a_text_file_named_png_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "a.png").write_text("not an image")
    (tmp_path / "masks" / "a.png").write_text("not an image")
    with pytest.raises(FetalStudioError, match="a.png is not an image Pillow can read"):
        import_pairs(ReviewSession.create(tmp_path / "session"), tmp_path)


def test_pair_request_validation():
    with pytest.raises(FetalStudioError, match="trimester"):
        PairRequest("fourth").validated()
    with pytest.raises(FetalStudioError, match="count"):
        PairRequest("first", count=0).validated()
    with pytest.raises(FetalStudioError, match="threshold"):
        PairRequest("first", threshold=300).validated()
    with pytest.raises(FetalStudioError, match="seed must be"):
        PairRequest("first", seed=-1).validated()


def test_the_bundled_loras_record_their_mask_channel():
    for trimester in ("first", "second", "third"):
        path = CHECKPOINTS / "bundled" / "fetalstudio-head-lora" / trimester / f"fetalstudio-head-{trimester}-mask.safetensors"
        assert lora_mask_channel(path) == 0


@needs_bundled
@pytest.mark.usefixtures("one_torch_thread")
def test_generated_pairs_land_in_the_session_one_by_one_with_their_settings(tmp_path):
    import torch

    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.pipelines.runners import TextToImageRunner

    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    session = ReviewSession.create(tmp_path / "session")
    seen: list[int] = []

    def on_progress(done: int, total: int) -> None:
        seen.append(len(session))  # the pair is on disk before progress is reported
        assert total == 2

    items = generate_pairs(TextToImageRunner(manager), session, PairRequest("second", count=2, steps=6, seed=5),
                           on_progress=on_progress).added
    assert seen == [1, 2]
    assert [item.source["seed"] for item in items] == [5, 6]
    for item in items:
        assert item.source["lora"] == "fetalstudio-head-second-mask" and item.source["lora_weight"] == 0.9
        assert item.source["sampler"] == "unipc" and item.source["mask_channel"] == 0
        gray, raw = session.load_image(item), session.load_raw_mask(item)
        assert gray.shape == raw.shape == (256, 256)
        assert item.ellipse is not None or item.reason  # an ellipse, or why not
    cancelled = threading.Event()
    cancelled.set()
    assert generate_pairs(TextToImageRunner(manager), session, PairRequest("first", count=3, steps=4), cancel=cancelled).added == []
    assert len(session) == 2


@needs_bundled
@pytest.mark.usefixtures("one_torch_thread")
def test_generating_again_continues_the_seed_and_skips_pairs_already_in_the_session(tmp_path):
    import torch

    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.pipelines.runners import TextToImageRunner

    engine = TextToImageRunner(ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32)))
    session = ReviewSession.create(tmp_path / "session")
    seeds = lambda run: [item.source["seed"] for item in run.added]  # noqa: E731

    assert next_seed(session) == 0
    first = generate_pairs(engine, session, PairRequest("second", count=2, steps=2))
    second = generate_pairs(engine, session, PairRequest("second", count=2, steps=2))  # pressed again: new seeds
    assert seeds(first) == [0, 1] and seeds(second) == [2, 3] and next_seed(session) == 4
    assert not first.skipped and not second.skipped and second.skipped_note() == ""
    images = [session.load_image(item) for item in (*first.added, *second.added)]
    assert all(not np.array_equal(images[0], image) for image in images[1:])  # four different pairs

    again = generate_pairs(engine, session, PairRequest("second", count=3, steps=2, seed=2))
    assert again.skipped == [2, 3] and seeds(again) == [4]
    assert again.skipped_note().startswith("2 pairs skipped: already in this session (seeds 2-3)")
    other_steps = generate_pairs(engine, session, PairRequest("second", count=1, steps=3, seed=0))
    assert not other_steps.skipped and seeds(other_steps) == [0]  # other settings, other pixels: not a duplicate
    keys = [tuple(sorted((k, v) for k, v in item.source.items() if k != "model_hash")) for item in session.items()]
    assert len(session) == 6 and len(set(keys)) == 6


def _session_with_decisions(tmp_path) -> ReviewSession:
    session = ReviewSession.create(tmp_path / "session")
    mask = Ellipse(20, 15, 8, 6, 0).to_mask((30, 40))
    for _ in range(5):
        session.add_item(np.full((30, 40), 90, np.uint8), mask.astype(np.uint8) * 255, mask=mask,
                         ellipse=Ellipse(20, 15, 8, 6, 0), quality=1.0, reason=None, threshold=127)
    session.decide("000002", "accepted")
    session.decide("000004", "rejected")
    return session


def test_navigation_under_a_filter(tmp_path):
    session = _session_with_decisions(tmp_path)
    assert navigation.filtered_ids(session, "pending") == ["000001", "000003", "000005"]
    assert navigation.neighbour(session, "000001", "pending", 1) == "000003"
    assert navigation.neighbour(session, "000005", "pending", 1) == "000005"  # stays at the end
    assert navigation.neighbour(session, "000002", "pending", 1) == "000003"  # just accepted: the next pending one
    assert navigation.neighbour(session, "000002", "pending", -1) == "000001"
    assert navigation.neighbour(session, None, "all", -1) == "000005"
    assert navigation.neighbour(session, "000001", "edited", 1) is None
    assert navigation.position_of(session, "000003", "pending") == (2, 3)
    assert navigation.position_of(session, "000002", "pending") == (0, 3)
    with pytest.raises(ValueError, match="Unknown filter"):
        navigation.filtered_ids(session, "maybe")


def test_overlay_draws_the_mask_and_the_ellipse():
    gray = np.full((60, 80), 50, np.uint8)
    ellipse = Ellipse(40, 30, 20, 12, 30)
    mask = ellipse.to_mask(gray.shape)
    picture = overlay(gray, mask, ellipse, opacity=0.5, show_ellipse=False)
    assert picture.shape == (60, 80, 3)
    assert picture[30, 40, 0] > picture[30, 40, 1]  # reddish inside
    np.testing.assert_array_equal(picture[0, 0], [50, 50, 50])
    hidden = overlay(gray, mask, ellipse, show_mask=False, show_ellipse=False)
    np.testing.assert_array_equal(hidden, np.repeat(gray[..., None], 3, axis=2))
    outline = overlay(gray, mask, ellipse, show_mask=False)
    assert (outline != 50).any(axis=2).sum() > 50  # the ellipse outline is drawn


def test_editor_strokes_add_and_remove_and_refusals(tmp_path):
    current = Ellipse(40, 30, 20, 12, 30).to_mask((60, 80))
    strokes = np.zeros((60, 80, 4), np.uint8)
    strokes[0:5, 0:5] = (255, 48, 48, 255)  # ADD colour, outside the mask
    strokes[28:33, 38:43] = (32, 128, 255, 200)  # REMOVE colour, inside
    path = tmp_path / "layer_0.png"
    Image.fromarray(strokes, "RGBA").save(path)
    after = apply_editor_strokes(current, [path], current.shape)
    assert after[0:5, 0:5].all() and not after[28:33, 38:43].any()
    assert after.sum() == current.sum() + 25 - current[28:33, 38:43].sum()
    untouched = np.zeros_like(strokes)
    np.testing.assert_array_equal(apply_editor_strokes(current, [untouched], current.shape), current)
    assert apply_editor_strokes(None, [path], current.shape).sum() == 25
    background = editor_background(np.full((60, 80), 50, np.uint8), current)
    assert background.shape == (60, 80, 3) and background[30, 40, 0] > background[30, 40, 2]
    webp = tmp_path / "layer.webp"
    Image.fromarray(strokes, "RGBA").save(webp)
    with pytest.raises(FetalStudioError, match="not PNG"):
        apply_editor_strokes(current, [webp], current.shape)
    with pytest.raises(FetalStudioError, match="resampled"):
        apply_editor_strokes(current, [np.zeros((30, 40, 4), np.uint8)], current.shape)


@needs_data
def test_an_imported_and_accepted_set_exports_for_segmenter_training(tmp_path):
    from fetalstudio.training.segmenter import split_items

    session = ReviewSession.create(tmp_path / "session")
    items = import_pairs(session, _pairs_csv(tmp_path / "data", 3))
    session.decide(items[0].id, "accepted")
    session.decide(items[1].id, "rejected")
    session.set_mask(items[2].id, Ellipse(400, 270, 100, 80, 10).to_mask((540, 800)),
                     ellipse=Ellipse(400, 270, 100, 80, 10), how="ellipse")
    result = export_session(session, tmp_path / "export")
    assert result.exported == 2
    train, val, _ = split_items([result.paths["metadata_csv"]], 0.0, 0, None)
    assert len(train) + len(val) == 2


# --- corrections -----------------------------------------------------------------------------


def test_ellipse_and_threshold_corrections_and_their_refusals(tmp_path):
    from fetalstudio.review import corrections

    session = ReviewSession.create(tmp_path / "session")
    truth = Ellipse(40, 30, 20, 12, 30)
    raw = (truth.to_mask((60, 80)) * 100).astype(np.uint8)  # a faint mask: fails at 127, extracts at 80
    item = session.add_item(np.full((60, 80), 90, np.uint8), raw, mask=None, ellipse=None, quality=None,
                            reason="no pixel above threshold 127", threshold=127)
    with pytest.raises(FetalStudioError, match="Nothing saved: at threshold 127"):
        corrections.reextract(session, item.id, 127)
    assert session.get(item.id).revision == item.revision
    fixed = corrections.reextract(session, item.id, 80)
    assert fixed.decision == "edited" and fixed.how == "threshold" and fixed.threshold == 80
    assert dice(session.load_mask(fixed), truth.to_mask((60, 80))) > 0.95
    with pytest.raises(FetalStudioError, match="at least 1 pixel"):
        corrections.save_ellipse(session, item.id, Ellipse(40, 30, 0.5, 10, 0))
    with pytest.raises(FetalStudioError, match="outside the 80x60 image"):
        corrections.save_ellipse(session, item.id, Ellipse(500, 500, 10, 10, 0))
    typed = corrections.save_ellipse(session, item.id, Ellipse(41, 29, 18, 11, 25))
    assert typed.ellipse.axis_a == 18 and typed.how == "ellipse" and typed.biometry["hc_px"] > 0
    with pytest.raises(FetalStudioError, match="Nothing painted"):
        corrections.save_brush(session, item.id, [])
    undone = session.undo(item.id)
    assert undone.how == "threshold"


@needs_data
@pytest.mark.usefixtures("one_torch_thread")
def test_the_segmenter_correction_segments_a_real_head_from_the_ellipse_box(tmp_path):
    import torch

    from fetalstudio.analysis.segment import CachedPredictor
    from fetalstudio.models.device import DevicePlacement
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.review import corrections
    from fetalstudio.segmentation.predictor import BoxPromptPredictor

    session = ReviewSession.create(tmp_path / "session")
    item = import_pairs(session, _pairs_csv(tmp_path / "data", 1))[0]
    reference = session.load_mask(item)
    rough = Ellipse(item.ellipse.center_x + 8, item.ellipse.center_y - 6, item.ellipse.axis_a * 1.1,
                    item.ellipse.axis_b * 0.9, item.ellipse.angle_deg)  # a reviewer's rough ellipse: its box is the prompt
    corrections.save_ellipse(session, item.id, rough)
    manager = ModelManager(CHECKPOINTS, placement=DevicePlacement(torch.device("cpu"), torch.float32))
    with manager.use(manager.default_id(ModelKind.SEGMENTER)) as model:
        saved, score = corrections.ask_segmenter(BoxPromptPredictor(model), session, item.id)
    assert saved.how == "segmenter" and saved.decision == "edited" and 0 <= score <= 1.5
    assert dice(session.load_mask(saved), reference) > 0.9  # box-prompted: it follows the box, so a rough box stays rough
    with manager.use(manager.default_id(ModelKind.SEGMENTER)) as model:
        cached = CachedPredictor(BoxPromptPredictor(model))
        corrections.save_ellipse(session, item.id, rough)
        again, again_score = corrections.ask_segmenter(cached, session, item.id)  # the same box: the same mask
        moved = Ellipse(rough.center_x - 8, rough.center_y + 6, rough.axis_a, rough.axis_b, rough.angle_deg)
        corrections.save_ellipse(session, item.id, moved)
        third, _ = corrections.ask_segmenter(cached, session, item.id)  # another box, the same image: not encoded again
    assert cached.encoder_runs == 1
    assert again_score == pytest.approx(score, abs=1e-6) and np.array_equal(session.load_mask(again), session.load_mask(saved))
    assert third.revision > again.revision and dice(session.load_mask(third), reference) > 0.9
