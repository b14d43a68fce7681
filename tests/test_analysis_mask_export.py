"""Mask export of a batch analysis: real HC18 heads (one from a JPEG, one running out of the frame)
plus an image with no head, written as png / COCO (polygons and RLE) / YOLO-seg / nnU-Net v2 and
read back to the same pixels."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from PIL import Image

from fetalstudio.analysis.mask_export import MASK_FORMATS, MaskRecord, export_masks
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.ellipse import dice, fill_outline, fit_outline
from fetalstudio.imaging.files import LOCK_FILE
from fetalstudio.imaging.image_input import load_image

try:
    from tests.data_support import DATA, OUT_OF_FRAME, needs_data, pairs_rows
except ImportError:  # run as plain `pytest`: tests/ itself is on sys.path
    from data_support import DATA, OUT_OF_FRAME, needs_data, pairs_rows

pytestmark = needs_data
HEADS = ("000_HC", "001_HC", sorted(OUT_OF_FRAME["hc18_heads"])[0])  # 001 goes through a JPEG, the last runs out of the frame


def _save(path, array):
    Image.fromarray(array).save(path)
    return path


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    rows = {row["image"].split("/")[-1][:-4]: row for row in pairs_rows("hc18_heads")}
    result = []
    for number, name in enumerate(HEADS):
        row = rows[name]
        outline = np.asarray(Image.open(DATA / "hc18_heads" / row["mask"]).convert("L"))
        mask = _save(folder / f"{name}_mask.png", fill_outline(outline).astype(np.uint8) * 255)
        image = DATA / "hc18_heads" / row["image"]
        if number == 1:
            image = folder / f"{name}.jpg"
            Image.open(DATA / "hc18_heads" / row["image"]).convert("RGB").save(image, quality=90)
        ellipse = None if number == 1 else fit_outline(outline)  # None: the export fits one to the mask
        result.append(MaskRecord(f"head-{name}", image, mask, ellipse))
    colour = np.dstack([np.tile(np.arange(80, dtype=np.uint8), (60, 1))] * 3)
    colour[..., 0] = 200
    empty = MaskRecord("no_head.1", _save(folder / "nothing.png", colour), _save(folder / "nothing_mask.png", np.zeros((60, 80), np.uint8)))
    return result + [empty]


@pytest.fixture(scope="module")
def export(records, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "run1"
    calls = []
    paths = export_masks(records, out, MASK_FORMATS, progress=lambda done, total: calls.append((done, total)))
    return out, paths, calls


def _mask(record):
    return cv2.imread(str(record.mask_path), cv2.IMREAD_GRAYSCALE) > 0


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def _fill(points_xy, shape):
    canvas = np.zeros(shape, np.uint8)
    cv2.fillPoly(canvas, [np.round(points_xy).astype(np.int32)], 1)
    return canvas.astype(bool)


def test_paths_progress_and_no_leftovers(export, records):
    out, paths, calls = export
    assert paths == {
        "png": out / "png", "png_images": out / "png" / "images", "png_masks": out / "png" / "masks",
        "coco": out / "coco", "coco_polygons": out / "coco" / "annotations_polygons.json",
        "coco_rle": out / "coco" / "annotations_rle.json", "yolo": out / "yolo", "yolo_data": out / "yolo" / "data.yaml",
        "nnunet": out / "nnunet" / "Dataset501_FetalStudioAnalysis",
        "nnunet_dataset_json": out / "nnunet" / "Dataset501_FetalStudioAnalysis" / "dataset.json",
    }
    assert all(path.exists() for path in paths.values())
    assert calls == [(n, 16) for n in range(1, 17)]
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_FILE) == ["coco", "mask_export.json", "nnunet", "png", "yolo"]
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and p.name != LOCK_FILE]  # no partial folder or temporary file


def test_png_images_are_grayscale_and_masks_identical(export, records):
    out, _, _ = export
    for record in records:
        image = _read(out / "png" / "images" / f"{record.name}.png")
        np.testing.assert_array_equal(image, load_image(record.image_path).gray)  # JPEG and RGB converted, 2-D uint8
        mask = _read(out / "png" / "masks" / f"{record.name}.png")
        assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask > 0, _mask(record))


def test_coco_rle_and_polygons_round_trip(export, records):
    from pycocotools import mask as coco_mask

    out, _, _ = export
    rle_file = json.loads((out / "coco" / "annotations_rle.json").read_text())
    polygon_file = json.loads((out / "coco" / "annotations_polygons.json").read_text())
    assert rle_file["images"] == polygon_file["images"] and len(rle_file["images"]) == len(records)
    assert rle_file["categories"] == [{"id": 1, "name": "fetal_head", "supercategory": "anatomy"}]
    images = {image["file_name"]: image for image in rle_file["images"]}
    assert set(images) == {f"{record.name}.png" for record in records}
    assert len(rle_file["annotations"]) == len(polygon_file["annotations"]) == len(records) - 1  # no annotation without a head
    rles = {a["image_id"]: a for a in rle_file["annotations"]}
    polygons = {a["image_id"]: a for a in polygon_file["annotations"]}
    for record in records:
        image = images[f"{record.name}.png"]
        mask = _mask(record)
        assert (image["height"], image["width"]) == mask.shape
        np.testing.assert_array_equal(_read(out / "coco" / "images" / image["file_name"]), load_image(record.image_path).gray)
        if not mask.any():
            assert image["id"] not in rles and image["id"] not in polygons
            continue
        rle, polygon = rles[image["id"]], polygons[image["id"]]
        assert isinstance(rle["segmentation"]["counts"], str) and rle["iscrowd"] == 0 and rle["category_id"] == 1
        decoded = coco_mask.decode({"size": rle["segmentation"]["size"], "counts": rle["segmentation"]["counts"].encode()})
        np.testing.assert_array_equal(decoded.astype(bool), mask)
        ys, xs = np.nonzero(mask)
        box = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert rle["area"] == polygon["area"] == mask.sum() and rle["bbox"] == polygon["bbox"] == box
        filled = np.zeros(mask.shape, bool)
        for points in polygon["segmentation"]:
            filled |= _fill(np.reshape(points, (-1, 2)) - 0.5, mask.shape)  # COCO pixel centres lie at +0.5
        assert dice(filled, mask) > 0.97


def test_yolo_labels_round_trip(export, records):
    import yaml

    out, _, _ = export
    data = yaml.safe_load((out / "yolo" / "data.yaml").read_text())
    assert data == {"path": str((out / "yolo").resolve()), "train": "images", "val": "images", "names": {0: "fetal_head"}}
    for record in records:
        assert _read(out / "yolo" / "images" / f"{record.name}.png").ndim == 2
        text = (out / "yolo" / "labels" / f"{record.name}.txt").read_text()
        mask = _mask(record)
        if not mask.any():
            assert text == ""
            continue
        lines = text.splitlines()
        assert len(lines) == 1
        values = lines[0].split()
        assert values[0] == "0" and len(values[1:]) % 2 == 0 and len(values[1:]) >= 6
        points = np.array(values[1:], float).reshape(-1, 2)
        assert points.min() >= 0 and points.max() <= 1
        height, width = mask.shape
        assert dice(_fill(points * (width, height) - 0.5, mask.shape), mask) > 0.97
        inside = record.name != f"head-{HEADS[-1]}"
        assert (len(points) == 90) == inside  # the ellipse polygon, or the contour of a head cut by the frame


def test_nnunet_labels_and_dataset_json(export, records):
    out, _, _ = export
    dataset = out / "nnunet" / "Dataset501_FetalStudioAnalysis"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "ultrasound"} and meta["labels"] == {"background": 0, "fetal_head": 1}
    assert meta["numTraining"] == len(records) and meta["file_ending"] == ".png"
    assert len(list((dataset / "imagesTr").iterdir())) == len(list((dataset / "labelsTr").iterdir())) == len(records)
    for record in records:
        label = _read(dataset / "labelsTr" / f"{record.name}.png")
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1}
        np.testing.assert_array_equal(label == 1, _mask(record))
        np.testing.assert_array_equal(_read(dataset / "imagesTr" / f"{record.name}_0000.png"), load_image(record.image_path).gray)


def test_rerun_replaces_only_the_formats_asked_for(records, tmp_path):
    out = tmp_path / "run"
    export_masks(records, out, ("png", "coco"), dataset_id=7, dataset_name="x")
    (out / "results.csv").write_text("kept\n")
    export_masks(records[:2], out, ["png", "png", "nnunet"], dataset_id=7, dataset_name="my run")
    assert sorted(p.name for p in (out / "png" / "masks").iterdir()) == sorted(f"{r.name}.png" for r in records[:2])
    assert len(json.loads((out / "coco" / "annotations_rle.json").read_text())["images"]) == len(records)  # untouched
    assert (out / "nnunet" / "Dataset007_my_run" / "dataset.json").is_file() and (out / "results.csv").read_text() == "kept\n"
    assert json.loads((out / "mask_export.json").read_text())["formats"] == ["coco", "nnunet", "png"]
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]

    (out / "yolo").mkdir()
    (out / "yolo" / "mine.txt").write_text("not ours")
    with pytest.raises(FetalStudioError, match="yolo already exists and is not a FetalStudio mask export"):
        export_masks(records, out, ("png", "yolo"))
    assert (out / "yolo" / "mine.txt").read_text() == "not ours"
    assert sorted(p.name for p in (out / "png" / "masks").iterdir()) == sorted(f"{r.name}.png" for r in records[:2])


def test_errors_name_the_problem_and_write_nothing(records, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FetalStudioError, match="Unknown mask export format 'voc'; choose from: png, coco, yolo, nnunet"):
        export_masks(records, out, ("png", "voc"))
    with pytest.raises(FetalStudioError, match=r"Two images would be exported as HEAD-000_HC\.png"):
        export_masks(records + [MaskRecord("HEAD-000_HC", records[1].image_path, records[1].mask_path)], out, ("png",))
    for bad in ("../up", "a b", ".hidden", ""):
        with pytest.raises(FetalStudioError, match="not a safe file name"):
            export_masks([MaskRecord(bad, records[0].image_path, records[0].mask_path)], out, ("png",))
    with pytest.raises(FetalStudioError, match="No masks to export"):
        export_masks([], out, ("png",))
    with pytest.raises(FetalStudioError, match="dataset id must be 1-999"):
        export_masks(records, out, ("nnunet",), dataset_id=1000)
    assert not out.exists()

    small = _save(tmp_path / "small_mask.png", np.zeros((54, 80), np.uint8))
    mismatched = records[:1] + [MaskRecord("wrong_size", records[0].image_path, small)]
    with pytest.raises(FetalStudioError, match=r"small_mask\.png is 80 x 54 pixels but its image .*000_HC\.png is 800 x 540"):
        export_masks(mismatched, out, MASK_FORMATS)
    grey = _save(tmp_path / "grey_mask.png", np.full((60, 80), 128, np.uint8))
    with pytest.raises(FetalStudioError, match=r"grey_mask\.png is not binary"):
        export_masks([MaskRecord("grey", records[-1].image_path, grey)], out, ("yolo",))
    with pytest.raises(FetalStudioError, match="does not exist"):
        export_masks([MaskRecord("gone", tmp_path / "gone.png", small)], out, ("coco",))
    assert [p.name for p in out.iterdir() if p.name != LOCK_FILE] == []  # nothing half-written


def test_a_killed_export_leaves_nothing_after_the_next_one_and_is_never_zipped(records, tmp_path):
    from fetalstudio.analysis.batch import zip_folder
    from fetalstudio.analysis.mask_export import PARTIAL_PREFIX

    out = tmp_path / "exports"
    export_masks(records[:1], out, ("png",))
    # what a kill -9 in the middle of the next export leaves: its build folder and a swapped-out png
    dead = out / f"{PARTIAL_PREFIX}deadbeef"
    (dead / "png" / "masks").mkdir(parents=True)
    (dead / "png" / "masks" / "half.png").write_bytes(b"\x89PNG half")
    swapped = out / ".png.previous-0badf00d"
    (swapped / "images").mkdir(parents=True)
    (out / "png" / "masks" / ".head-000_HC.png.1234.tmp").write_bytes(b"temporary")
    archive = zip_folder(out, tmp_path / "exports.zip")
    import zipfile

    names = zipfile.ZipFile(archive).namelist()
    assert names and not [n for n in names if "/." in n]  # no partial folder, temporary file or lock
    assert "exports/png/masks/head-000_HC.png" in names

    export_masks(records[:2], out, ("png", "coco"))
    assert not dead.exists() and not swapped.exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FILE]
