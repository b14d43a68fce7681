"""Structure-box datasets (fetalstudio.data.structures): the shared first_trimester_structures
folder read as the README counts it, a stable disjoint validation split, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
