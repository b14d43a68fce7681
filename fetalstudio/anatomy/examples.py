"""The Anatomy editor's bundled examples: real scans with their layouts in ``assets/anatomy/``
(index ``examples.json``, schema ``fetalstudio.anatomy-examples`` v1; attribution in its README)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fetalstudio.anatomy.layout import Layout
from fetalstudio.errors import FetalStudioError
from fetalstudio.paths import assets_dir

EXAMPLES_INDEX = "examples.json"
SCHEMA = "fetalstudio.anatomy-examples"


@dataclass(frozen=True)
class Example:
    """One example scan: its image file, its layout file, plane, title, and where it comes from."""

    image: Path
    layout_path: Path
    plane: str
    title: str
    source: str
    dataset: str

    def layout(self) -> Layout:
        return Layout.read(self.layout_path)


def examples_folder() -> Path:
    return assets_dir() / "anatomy"


def list_examples(folder: Path | None = None) -> list[Example]:
    """The examples listed in ``folder/examples.json`` (default ``assets/anatomy``), in its order; a
    missing index gives none, a broken one a FetalStudioError naming the file and the entry."""
    folder = Path(folder) if folder is not None else examples_folder()
    index = folder / EXAMPLES_INDEX
    if not index.is_file():
        return []
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FetalStudioError(f"{index} is not readable JSON ({error}); restore it from the repository.") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("version") != 1:
        raise FetalStudioError(f"{index} is not a {SCHEMA} v1 index; restore it from the repository.")
    examples = []
    for number, entry in enumerate(data.get("examples", []), start=1):
        try:
            example = Example(folder / entry["image"], folder / entry["layout"], entry["plane"], entry["title"],
                              entry.get("source", ""), entry.get("dataset", ""))
        except (KeyError, TypeError):
            raise FetalStudioError(f"{index}, example {number}: needs image, layout, plane and title.") from None
        for path in (example.image, example.layout_path):
            if path.resolve().parent != folder.resolve() or not path.is_file():
                raise FetalStudioError(f"{index}, example {number}: {path.name} is not a file of {folder}.")
        examples.append(example)
    return examples


def write_examples_folder(folder: Path, plane: str, examples: list[Example] | None = None) -> Path:
    """A structures folder (``images.csv`` + ``boxes.csv``, the format ``flex pairs --data`` reads) listing the
    examples of ``plane`` in place (absolute paths, nothing copied), so counterfactual pairs can be made from
    them; written atomically. A clear error when no example is of that plane."""
    import csv
    import io

    from fetalstudio.data.structures import BOX_COLUMNS, BOXES_TABLE, IMAGES_TABLE
    from fetalstudio.imaging.files import atomic_write_bytes

    chosen = [example for example in (list_examples() if examples is None else examples) if example.plane == plane]
    if not chosen:
        raise FetalStudioError(f"No bundled example is a {plane} scan: upload images of that plane, or choose a preset "
                               "of another plane.")
    images, boxes = io.StringIO(), io.StringIO()
    image_rows = csv.DictWriter(images, ["image", "width", "height"], lineterminator="\n")
    box_rows = csv.DictWriter(boxes, list(BOX_COLUMNS), lineterminator="\n")
    image_rows.writeheader()
    box_rows.writeheader()
    for example in chosen:
        layout, key = example.layout(), str(example.image.resolve())
        image_rows.writerow({"image": key, "width": layout.width, "height": layout.height})
        for box in layout.boxes:
            box_rows.writerow({"image": key, "structure": box.structure, "x_min": box.x0, "y_min": box.y0,
                               "x_max": box.x1, "y_max": box.y1})
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(folder / IMAGES_TABLE, images.getvalue().encode("utf-8"))
    atomic_write_bytes(folder / BOXES_TABLE, boxes.getvalue().encode("utf-8"))
    return folder
