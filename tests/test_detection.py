"""Structure-box datasets (fetalstudio.data.structures): the shared first_trimester_structures
folder read as the README counts it, a stable disjoint validation split, and clear errors."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_support import DATA
from fetalstudio.data.structures import read_structures, split_structures, validation_bucket
from fetalstudio.errors import FetalStudioError

STRUCTURES = DATA / "first_trimester_structures"
needs_structures = pytest.mark.skipif(not (STRUCTURES / "boxes.csv").is_file(), reason="shared data not found")


@needs_structures
def test_reader_counts_match_the_data_readme():
    originals = read_structures(STRUCTURES, include_more=False)
    everything = read_structures(STRUCTURES)
    more = everything[len(originals):]
    assert (len(originals), sum(len(item.boxes) for item in originals)) == (120, 1080)
    assert (len(more), sum(len(item.boxes) for item in more)) == (871, 7180)
    first = originals[0]
    assert first.path == STRUCTURES / "images" / "0.png" and (first.width, first.height) == (697, 480)
    assert ("cisterna_magna", 229.0, 336.0, 322.0, 365.0) in first.boxes
    # more/: float boxes in the resized pixels; images with 5-8 structures keep only what is annotated
    assert all(max(item.width, item.height) == 384 for item in more)
    assert min(len(item.boxes) for item in more) == 5 and any(box[1] % 1 for item in more for box in item.boxes)


@needs_structures
def test_split_is_stable_disjoint_and_about_an_eighth():
    items = read_structures(STRUCTURES)
    train, val = split_structures(items, "train"), split_structures(items, "val")
    assert len(train) + len(val) == len(items) and not {i.path for i in train} & {i.path for i in val}
    assert 0.08 < len(val) / len(items) < 0.16
    assert split_structures(list(reversed(items)), "val") == list(reversed(val))  # order-free
    # by file name: the same image read from another folder lands on the same side
    assert validation_bucket(Path("/elsewhere/images/0.png")) == validation_bucket(STRUCTURES / "images" / "0.png")
    assert [i.path.name for i in val[:3]] == [i.path.name for i in split_structures(read_structures(STRUCTURES), "val")[:3]]
    with pytest.raises(FetalStudioError, match="'train' or 'val'"):
        split_structures(items, "test")


def _small_folder(tmp_path: Path, boxes_text: str, images_text: str = "image,width,height\nimages/0.png,697,480\n") -> Path:
    folder = tmp_path / "set"
    (folder / "images").mkdir(parents=True)
    shutil.copy(STRUCTURES / "images" / "0.png", folder / "images" / "0.png")
    (folder / "images.csv").write_text(images_text)
    (folder / "boxes.csv").write_text(boxes_text)
    return folder


HEADER = "image,structure,x_min,y_min,x_max,y_max\n"


@needs_structures
@pytest.mark.parametrize("boxes_text, message", [
    (HEADER + "images/0.png,palate,10,10,20,abc\n", r"boxes.csv, line 2: y_max 'abc' is not a number"),
    (HEADER + "images/0.png,palate,10,10,20,20\nimages/1.png,palate,1,1,2,2\n", r"line 3: image 'images/1.png' is not listed"),
    (HEADER + "images/0.png,palate,30,10,20,20\n", r"line 2: box \(30, 10, 20, 20\) is empty or inverted"),
    (HEADER + "images/0.png,palate,10,10,900,20\n", r"line 2: .* outside the 697x480 image"),
    (HEADER + "images/0.png,,10,10,20,20\n", r"line 2: the structure cell is empty"),
    ("image,structure,x0\nimages/0.png,palate,1\n", r"needs the columns image, structure, x_min"),
])
def test_bad_box_rows_name_file_and_line(tmp_path, boxes_text, message):
    folder = _small_folder(tmp_path, boxes_text)
    with pytest.raises(FetalStudioError, match=message):
        read_structures(folder)


@needs_structures
def test_sizes_come_from_the_file_when_the_table_has_none_and_bad_image_rows_are_refused(tmp_path):
    folder = _small_folder(tmp_path, HEADER + "images/0.png,Palate,10,10,20,20\n", "image\nimages/0.png\n")
    (item,) = read_structures(folder)
    assert (item.width, item.height, item.boxes) == (697, 480, (("palate", 10.0, 10.0, 20.0, 20.0),))
    (folder / "images.csv").write_text("image\nimages/0.png\nimages/missing.png\n")
    with pytest.raises(FetalStudioError, match=r"images.csv, line 3: .*missing.png does not exist"):
        read_structures(folder)
    with pytest.raises(FetalStudioError, match="is not a folder"):
        read_structures(tmp_path / "nowhere")


# --- metrics (fetalstudio.detection.metrics) ---------------------------------------------------
def test_perfect_boxes_give_ap50_and_miou_one_and_shifted_boxes_their_known_iou():
    from fetalstudio.detection.metrics import box_iou, evaluate_detections

    truth = [[("palate", 10, 10, 30, 20), ("thalami", 0, 0, 10, 10)], [("palate", 50, 50, 70, 60)]]
    perfect = [[(*box, 0.9) for box in image] for image in truth]
    result = evaluate_detections(truth, perfect, ("palate", "thalami", "midbrain"))
    assert result["per_structure"]["palate"] == {"boxes": 2, "ap50": 1.0, "mean_iou": 1.0, "detected": 2}
    assert result["map50"] == 1.0 and result["mean_iou"] == 1.0
    assert result["per_structure"]["midbrain"]["boxes"] == 0  # never annotated: left out of the means

    # a 10x10 box shifted by 5 px in x: overlap 5x10 = 50, union 150 -> IoU 1/3 (below 0.5: a miss)
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)
    shifted = evaluate_detections([[("thalami", 0, 0, 10, 10)]], [[("thalami", 5, 0, 15, 10, 0.8)]], ("thalami",))
    assert shifted["per_structure"]["thalami"]["mean_iou"] == pytest.approx(1 / 3)
    assert shifted["per_structure"]["thalami"]["ap50"] == 0.0
    # shifted by 2 px: IoU 80/120 = 2/3, a hit
    near = evaluate_detections([[("thalami", 0, 0, 10, 10)]], [[("thalami", 2, 0, 12, 10, 0.8)]], ("thalami",))
    assert near["per_structure"]["thalami"] == {"boxes": 1, "ap50": 1.0, "mean_iou": pytest.approx(2 / 3), "detected": 1}


def test_ap50_ranks_by_score_and_ignores_structures_that_are_not_annotated():
    from fetalstudio.detection.metrics import evaluate_detections

    truth = [[("nasal_bone", 0, 0, 10, 10)], [("nasal_bone", 0, 0, 10, 10)], [("palate", 0, 0, 5, 5)]]
    # image 0: a hit at 0.9; image 1: a miss at 0.95 (ranked first); image 2: nasal bone not annotated -> ignored
    found = [[("nasal_bone", 0, 0, 10, 10, 0.9)], [("nasal_bone", 50, 50, 60, 60, 0.95)], [("nasal_bone", 0, 0, 5, 5, 0.99)]]
    result = evaluate_detections(truth, found, ("nasal_bone",))["per_structure"]["nasal_bone"]
    # ranked: miss (P 0, R 0), hit (P 1/2, R 1/2) -> AP = 0.5 * 0.5; half the boxes found with IoU 1
    assert result["ap50"] == pytest.approx(0.25) and result["mean_iou"] == pytest.approx(0.5)
    assert result["boxes"] == 2 and result["detected"] == 1
    with pytest.raises(ValueError):
        evaluate_detections(truth, found[:2], ("nasal_bone",))


# --- prediction (fetalstudio.detection.predict) ------------------------------------------------
def _tiny_config(classes=("thalami", "palate")):
    from fetalstudio.models.detector import DetectorConfig

    return DetectorConfig(classes=tuple(classes), backbone="resnet10t", input_size=64, width=8)


def _fixed_detector():
    """A detector whose heads say: thalami centred at input cell (4, 6) + offset 0.5, box 16 x 8 input
    pixels, score sigmoid(3); palate nowhere."""
    from fetalstudio.models.detector import CenterNetDetector

    class FixedOutputs(CenterNetDetector):
        def forward(self, inputs):
            cells = self.config.input_size // 4
            heat = torch.full((len(inputs), 2, cells, cells), -10.0)
            heat[:, 0, 6, 4] = 3.0
            size = torch.zeros((len(inputs), 4, cells, cells))
            size[:, 0], size[:, 1] = math.log(16 / 4), math.log(8 / 4)
            return {"heatmap": heat, "size": size, "offset": torch.full((len(inputs), 2, cells, cells), 0.5)}

    return FixedOutputs(_tiny_config())


def test_detect_returns_boxes_in_the_images_own_pixels():
    from fetalstudio.detection.predict import StructureDetector

    detector = StructureDetector(_fixed_detector())
    # centre in input pixels ((4 + 0.5) * 4, (6 + 0.5) * 4) = (18, 26); box 16 x 8 -> (10, 22)-(26, 30)
    # 200 x 100 image: scale 64/200 = 0.32, resized 64 x 32, 16 rows of padding on top
    (detection,) = detector.detect(np.zeros((100, 200), np.uint8))
    assert detection.structure == "thalami" and detection.score == pytest.approx(1 / (1 + math.exp(-3)))
    assert detection.box == pytest.approx((10 / 0.32, (22 - 16) / 0.32, 26 / 0.32, (30 - 16) / 0.32))
    # an RGB image of another size: 90 x 180 -> scale 32/90 x 64/180, 16 columns of padding on the left;
    # x0 = (10 - 16) / scale < 0 is clipped to the image
    (detection,) = detector.detect(np.zeros((180, 90, 3), np.uint8))
    assert detection.box == pytest.approx((0.0, 22 * 180 / 64, (26 - 16) * 90 / 32, 30 * 180 / 64))
    assert detector.detect(np.zeros((100, 200), np.uint8), score_threshold=0.99) == []


def test_detector_refuses_bad_inputs():
    from fetalstudio.detection.predict import StructureDetector
    from fetalstudio.models.detector import CenterNetDetector

    detector = StructureDetector(CenterNetDetector(_tiny_config()))
    with pytest.raises(FetalStudioError, match="8-bit"):
        detector.detect(np.zeros((50, 50), np.float32))
    with pytest.raises(FetalStudioError, match="shape"):
        detector.detect(np.zeros((50, 50, 2), np.uint8))
    with pytest.raises(FetalStudioError, match="between 0 and 1"):
        detector.detect(np.zeros((50, 50), np.uint8), score_threshold=2)
    with pytest.raises(FetalStudioError, match="kind 'detector'"):
        StructureDetector(torch.nn.Linear(2, 2))


def test_checkpoint_round_trip_through_the_model_manager(tmp_path, tmp_checkpoints, cpu_placement):
    from fetalstudio.errors import ModelLoadError
    from fetalstudio.models.detector import CenterNetDetector, load_detector_file, save_detector
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager

    torch.manual_seed(0)
    model = CenterNetDetector(_tiny_config())
    path = tmp_checkpoints / "detector.safetensors"
    save_detector(model, path, {"steps": 3})
    manager = ModelManager(tmp_checkpoints, placement=cpu_placement)
    entry = manager.entry(path)
    assert entry.kind is ModelKind.DETECTOR and entry.details["classes"] == "thalami,palate"
    assert "detector" in manager.ids(ModelKind.DETECTOR)
    loaded = manager.get(path)
    assert isinstance(loaded, CenterNetDetector) and loaded.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    from safetensors.torch import save_file

    other = tmp_path / "plain.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other))
    with pytest.raises(ModelLoadError, match="not a FetalStudio structure detector"):
        load_detector_file(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="not a readable .safetensors"):
        load_detector_file(broken)


def test_structures_that_are_not_annotated_are_left_out_of_the_loss():
    from fetalstudio.detection.targets import detector_loss, encode

    heatmap, objects = encode([(0, 8.0, 8.0, 24.0, 16.0)], n_classes=2, input_size=64)
    assert heatmap.shape == (2, 16, 16) and heatmap[0].max() == 1.0 and heatmap[1].max() == 0.0
    assert heatmap[0, 3, 4] == 1.0  # centre (16, 12) input px -> cell (4, 3)
    assert objects.tolist() == [[0, 4, 3, pytest.approx(math.log(4)), pytest.approx(math.log(2)), 0.0, 0.0]]
    targets = torch.from_numpy(heatmap)[None]
    rows = torch.cat([torch.zeros(len(objects), 1), torch.from_numpy(objects)], dim=1)
    outputs = {"heatmap": torch.zeros(1, 2, 16, 16), "size": torch.zeros(1, 4, 16, 16), "offset": torch.zeros(1, 2, 16, 16)}
    only_first = torch.tensor([[True, False]])
    loss, _ = detector_loss(outputs, targets, only_first, rows)
    # whatever the network says on the channel of a structure without a box, the loss is the same
    outputs["heatmap"][0, 1] = 5.0
    assert detector_loss(outputs, targets, only_first, rows)[0] == loss
    assert detector_loss(outputs, targets, torch.tensor([[True, True]]), rows)[0] > loss  # taught as absent


def test_evaluate_scores_the_detectors_boxes_against_annotations():
    from fetalstudio.detection.predict import StructureDetector

    detector = StructureDetector(_fixed_detector())
    images = [np.zeros((100, 200), np.uint8)]
    exact = [("thalami", 10 / 0.32, 6 / 0.32, 26 / 0.32, 14 / 0.32), ("palate", 0, 0, 10, 10)]
    result = detector.evaluate(images, [exact])
    assert result["per_structure"]["thalami"]["ap50"] == pytest.approx(1.0)
    assert result["per_structure"]["thalami"]["mean_iou"] == pytest.approx(1.0)
    assert result["per_structure"]["palate"] == {"boxes": 1, "ap50": 0.0, "mean_iou": 0.0, "detected": 0}


CHECKPOINTS = Path(__file__).resolve().parents[1] / "checkpoints"
BUNDLED_DETECTOR = "fetalstudio-structure-detector"


@needs_structures
@pytest.mark.skipif(not (CHECKPOINTS / "bundled" / BUNDLED_DETECTOR).is_dir(), reason="bundled detector not present")
def test_bundled_detector_is_the_default_and_finds_structures_on_held_out_originals(cpu_placement):
    from PIL import Image

    from fetalstudio.detection.predict import StructureDetector
    from fetalstudio.models.entries import ModelKind
    from fetalstudio.models.manager import ModelManager
    from fetalstudio.vocabulary import FACIAL_SAGITTAL, structures_for

    manager = ModelManager(CHECKPOINTS, placement=cpu_placement)
    assert manager.default_id(ModelKind.DETECTOR) == BUNDLED_DETECTOR
    detector = StructureDetector(manager.get(BUNDLED_DETECTOR))
    assert detector.structures == tuple(s.name for s in structures_for(FACIAL_SAGITTAL))
    held_out = split_structures(read_structures(STRUCTURES, include_more=False), "val")  # full-size originals, never trained on
    images = []
    for item in held_out:
        with Image.open(item.path) as image:
            images.append(image.convert("L"))
    result = detector.evaluate(images, [item.boxes for item in held_out])
    # the model card's figures are on all 115 validation images; these 12 originals are a subset
    assert result["mean_iou"] > 0.45 and result["map50"] > 0.4
    for large in ("thalami", "midbrain", "palate"):
        assert result["per_structure"][large]["mean_iou"] > 0.5, large
