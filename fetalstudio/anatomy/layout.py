"""A layout: the plane, the image size and one box per annotated structure, in image pixels.

Coordinates are continuous pixels (x = column, y = row; pixel (i, j) covers [i, i+1) x [j, j+1)), so
a box ``x0=10, x1=20`` covers the ten columns 10..19. ``rotation_deg`` turns the box about its centre,
measured like OpenCV (clockwise on screen, since rows grow downwards); x0..y1 are its extent before
the turn. A box is valid when that extent lies inside the image (a turned box's corners may leave the
frame; they are clipped when drawn). A structure may have several boxes (e.g. a palate split by a
cleft); a missing structure means "not annotated", not "absent".

Layouts are immutable: every edit returns a new one, so undo is exact. JSON files carry
``{"schema": "fetalstudio.layout", "version": 1, ...}``; other schemas and newer versions are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fetalstudio.data.structures import AnnotatedImage
from fetalstudio.errors import FetalStudioError
from fetalstudio.imaging.files import atomic_write_json, read_json
from fetalstudio.vocabulary import FACIAL_SAGITTAL, Structure, anatomy_plane, structure

LAYOUT_SCHEMA = "fetalstudio.layout"
LAYOUT_VERSION = 1
#: How far (pixels) a box edge may pass the frame: boxes resized from another size round off.
EDGE_TOLERANCE_PX = 1.0


@dataclass(frozen=True)
class StructureBox:
    """One structure's box in image pixels, optionally turned about its centre."""

    structure: str
    x0: float
    y0: float
    x1: float
    y1: float
    rotation_deg: float = 0.0

    @classmethod
    def from_center(cls, structure_name: str, center_x: float, center_y: float, width: float, height: float,
                    rotation_deg: float = 0.0) -> StructureBox:
        return cls(structure_name, center_x - width / 2, center_y - height / 2, center_x + width / 2,
                   center_y + height / 2, rotation_deg)

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    def describe(self) -> str:
        turned = f", turned {self.rotation_deg:g} deg" if self.rotation_deg else ""
        return f"{self.structure} box ({self.x0:g}, {self.y0:g})-({self.x1:g}, {self.y1:g}){turned}"

    def corners(self) -> np.ndarray:
        """The four corners (x, y) after the turn, float64 of shape (4, 2), in OpenCV's order."""
        import cv2

        (cx, cy), size = self.center, (self.width, self.height)
        return cv2.boxPoints(((cx, cy), size, self.rotation_deg)).astype(np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {"structure": self.structure, "x0": self.x0, "y0": self.y0, "x1": self.x1, "y1": self.y1,
                "rotation_deg": self.rotation_deg}

    @classmethod
    def from_dict(cls, data: Any, where: str = "a box") -> StructureBox:
        if not isinstance(data, dict):
            raise FetalStudioError(f"{where} is not an object with structure, x0, y0, x1, y1; got {data!r}.")
        missing = [key for key in ("structure", "x0", "y0", "x1", "y1") if key not in data]
        if missing:
            raise FetalStudioError(f"{where} lacks {', '.join(missing)}; each box needs structure, x0, y0, x1, y1 "
                                   "(pixels) and optionally rotation_deg.")
        try:
            numbers = [float(data[key]) for key in ("x0", "y0", "x1", "y1")]
            rotation = float(data.get("rotation_deg", 0.0) or 0.0)
        except (TypeError, ValueError):
            raise FetalStudioError(f"{where} has a coordinate that is not a number: {data!r}.") from None
        return cls(str(data["structure"]), *numbers, rotation_deg=rotation)


def _normalised_rotation(degrees: float) -> float:
    """An angle in (-180, 180]."""
    angle = math.fmod(degrees, 360.0)
    if angle <= -180.0:
        angle += 360.0
    elif angle > 180.0:
        angle -= 360.0
    return 0.0 if angle == 0 else angle


@dataclass(frozen=True)
class Layout:
    """A plane, the image size (pixels) and the structures' boxes; validated on creation."""

    plane: str
    width: int
    height: int
    boxes: tuple[StructureBox, ...] = ()
    pixel_size_mm: float | None = None  # known for some datasets (hc18); lets presets speak millimetres
    source: str = field(default="", compare=False)  # where it came from (an image path), for the user

    def __post_init__(self) -> None:
        try:
            spec = anatomy_plane(self.plane)
        except ValueError as error:
            raise FetalStudioError(str(error)) from None
        object.__setattr__(self, "plane", spec.name)
        object.__setattr__(self, "boxes", tuple(self.boxes))
        if int(self.width) != self.width or int(self.height) != self.height or self.width < 1 or self.height < 1:
            raise FetalStudioError(f"The layout's image size {self.width}x{self.height} is not a positive whole "
                                   "number of pixels; give the size of the image the boxes were drawn on.")
        object.__setattr__(self, "width", int(self.width))
        object.__setattr__(self, "height", int(self.height))
        if self.pixel_size_mm is not None and not (math.isfinite(self.pixel_size_mm) and self.pixel_size_mm > 0):
            raise FetalStudioError(f"The pixel size {self.pixel_size_mm} mm is not a positive number; leave it "
                                   "out if it is not known.")
        boxes = []
        for box in self.boxes:
            self._check_box(box)
            boxes.append(replace(box, rotation_deg=_normalised_rotation(box.rotation_deg)))
        object.__setattr__(self, "boxes", tuple(boxes))

    def _check_box(self, box: StructureBox) -> None:
        try:
            structure(self.plane, box.structure)
        except ValueError as error:
            raise FetalStudioError(f"{box.describe()}: {error}") from None
        values = (box.x0, box.y0, box.x1, box.y1, box.rotation_deg)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise FetalStudioError(f"{box.describe()} has a coordinate that is not a finite number; give pixels.")
        if box.x1 <= box.x0 or box.y1 <= box.y0:
            kind = "has zero size" if box.x1 == box.x0 or box.y1 == box.y0 else "is inverted"
            raise FetalStudioError(f"{box.describe()} {kind}: x0 must be left of x1 and y0 above y1, with a "
                                   "positive width and height. Swap or correct the corners.")
        tolerance = EDGE_TOLERANCE_PX
        if (box.x0 < -tolerance or box.y0 < -tolerance or box.x1 > self.width + tolerance
                or box.y1 > self.height + tolerance):
            raise FetalStudioError(f"{box.describe()} lies (partly) outside the {self.width}x{self.height} image. "
                                   "Move or shrink it so that it stays inside the image, or check that the "
                                   "layout belongs to an image of this size.")

    # --- queries --------------------------------------------------------------------------------
    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def structure_names(self) -> list[str]:
        """The structures that have a box, in the plane's label order."""
        present = {box.structure for box in self.boxes}
        return [s.name for s in anatomy_plane(self.plane).structures if s.name in present]

    def structure_info(self, name: str) -> Structure:
        return structure(self.plane, name)

    def has(self, name: str) -> bool:
        return any(box.structure == name for box in self.boxes)

    def boxes_of(self, name: str) -> list[StructureBox]:
        """The boxes of structure ``name``; a FetalStudioError naming the present ones if it has none."""
        try:
            structure(self.plane, name)
        except ValueError as error:
            raise FetalStudioError(str(error)) from None
        found = [box for box in self.boxes if box.structure == name]
        if not found:
            present = ", ".join(self.structure_names()) or "none"
            raise FetalStudioError(f"The layout has no {name} box (it has: {present}). Add the box first, or "
                                   "detect the structures of the image.")
        return found

    def box(self, name: str) -> StructureBox:
        """The first box of structure ``name``."""
        return self.boxes_of(name)[0]

    # --- changes (each returns a new layout) ----------------------------------------------------
    def with_boxes(self, boxes: Iterable[StructureBox]) -> Layout:
        return replace(self, boxes=tuple(boxes))

    def resized(self, width: int, height: int) -> Layout:
        """The same layout for the image resized to ``width`` x ``height`` (boxes scaled with it).

        A turned box under a non-uniform resize is kept as a turned box of scaled extent (an
        approximation; maps drawn at another size transform the corners exactly instead)."""
        sx, sy = width / self.width, height / self.height
        boxes = [replace(b, x0=b.x0 * sx, y0=b.y0 * sy, x1=b.x1 * sx, y1=b.y1 * sy) for b in self.boxes]
        pixel = self.pixel_size_mm / sx if self.pixel_size_mm and math.isclose(sx, sy, rel_tol=1e-3) else None
        return replace(self, width=width, height=height, boxes=tuple(boxes), pixel_size_mm=pixel)

    # --- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema": LAYOUT_SCHEMA, "version": LAYOUT_VERSION, "plane": self.plane,
            "image_size": {"width": self.width, "height": self.height},
            "boxes": [box.to_dict() for box in self.boxes],
        }
        if self.pixel_size_mm is not None:
            data["pixel_size_mm"] = self.pixel_size_mm
        if self.source:
            data["source"] = self.source
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = "the layout") -> Layout:
        if not isinstance(data, dict) or data.get("schema") != LAYOUT_SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise FetalStudioError(f"{where} is not a FetalStudio layout (schema {found!r}, expected "
                                   f"{LAYOUT_SCHEMA!r}). Save a layout from FetalStudio, or write one as the "
                                   "README's 'Anatomy (engine)' section shows.")
        version = data.get("version")
        if version != LAYOUT_VERSION:
            newer = isinstance(version, int) and version > LAYOUT_VERSION
            advice = "it was written by a newer FetalStudio; update FetalStudio to read it" if newer else \
                "set \"version\": 1"
            raise FetalStudioError(f"{where} has layout schema version {version!r}; this FetalStudio reads version "
                                   f"{LAYOUT_VERSION} only ({advice}).")
        missing = [key for key in ("plane", "image_size", "boxes") if key not in data]
        if missing:
            raise FetalStudioError(f"{where} lacks {', '.join(missing)}; a layout needs plane, image_size "
                                   "{width, height} and boxes.")
        size = data["image_size"]
        if not isinstance(size, dict) or not {"width", "height"} <= set(size):
            raise FetalStudioError(f"{where}: image_size must be {{\"width\": W, \"height\": H}}, got {size!r}.")
        if not isinstance(data["boxes"], list):
            raise FetalStudioError(f"{where}: boxes must be a list, got {type(data['boxes']).__name__}.")
        boxes = [StructureBox.from_dict(item, f"{where}, box {i + 1}") for i, item in enumerate(data["boxes"])]
        try:
            width, height = int(size["width"]), int(size["height"])
        except (TypeError, ValueError):
            raise FetalStudioError(f"{where}: image_size {size!r} is not whole numbers of pixels.") from None
        pixel = data.get("pixel_size_mm")
        try:
            return cls(str(data["plane"]), width, height, tuple(boxes),
                       None if pixel is None else float(pixel), str(data.get("source", "")))
        except FetalStudioError as error:
            raise FetalStudioError(f"{where}: {error}") from None

    def write(self, path: Path) -> Path:
        """Write the layout as JSON, atomically."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def read(cls, path: Path) -> Layout:
        path = Path(path)
        return cls.from_dict(read_json(path, " (a layout JSON file was expected)"), where=str(path))

    @classmethod
    def from_annotation(cls, plane: str, width: int, height: int,
                        rows: Iterable[tuple[str, float, float, float, float]], source: str = "",
                        pixel_size_mm: float | None = None) -> Layout:
        """A layout from annotated boxes ``(structure, x_min, y_min, x_max, y_max)`` such as the rows of
        a structures folder's boxes.csv for one image (axis-aligned, no rotation)."""
        boxes = [StructureBox(name, float(x0), float(y0), float(x1), float(y1)) for name, x0, y0, x1, y1 in rows]
        where = source or "the annotation"
        try:
            return cls(plane, width, height, tuple(boxes), pixel_size_mm, source)
        except FetalStudioError as error:
            raise FetalStudioError(f"{where}: {error}") from None

    @classmethod
    def from_annotated_image(cls, item: AnnotatedImage, plane: str = FACIAL_SAGITTAL) -> Layout:
        """The layout of one image of a structures folder (``fetalstudio.data.structures.read_structures``)."""
        return cls.from_annotation(plane, item.width, item.height, item.boxes, source=str(item.path))


def skull_box(center_x: float, center_y: float, axis_a: float, axis_b: float, angle_deg: float) -> StructureBox:
    """The skull of a trans-thalamic plane as a turned box: the ellipse's bounding rectangle in its own
    axes (``fetalstudio.imaging.ellipse.Ellipse`` fields: semi-axes, OpenCV angle)."""
    return StructureBox.from_center("skull", center_x, center_y, 2 * axis_a, 2 * axis_b, angle_deg)
