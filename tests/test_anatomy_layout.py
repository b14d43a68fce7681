"""Layouts: validation, JSON round trip with a versioned schema, and their maps at any size."""

import json

import numpy as np
import pytest

from anatomy_support import needs_structures, real_images, real_layout
from fetalstudio.anatomy.layout import Layout, StructureBox, skull_box
from fetalstudio.anatomy.layout_map import (
    box_mask, drawing_order, layout_color_map, layout_label_map, overlay_layout, render_layout,
)
from fetalstudio.errors import FetalStudioError
from fetalstudio.vocabulary import structure, structures_for

pytestmark = needs_structures


def test_every_real_annotation_is_a_valid_layout():
    originals = [real_layout(image) for image in real_images()]
    assert len(originals) == 120 and all(len(layout.structure_names()) == 9 for layout in originals)
    resized = [real_layout(image, "more") for image in real_images("more")]
    assert len(resized) == 871 and all(max(layout.size) == 384 for layout in resized)
    assert min(len(layout.boxes) for layout in resized) >= 5


def test_json_round_trip_is_exact(tmp_path):
    layout = real_layout()
    turned = layout.with_boxes(layout.boxes + (StructureBox("palate", 10.25, 20.5, 60.75, 40.0, 30.0),))
    path = turned.write(tmp_path / "layout.json")
    data = json.loads(path.read_text())
    assert data["schema"] == "fetalstudio.layout" and data["version"] == 1
    assert data["image_size"] == {"width": 697, "height": 480}
    assert Layout.read(path) == turned
    assert [p.name for p in tmp_path.iterdir()] == ["layout.json"]  # atomic: no temporary left


@pytest.mark.parametrize("change,message", [
    ({"schema": "something.else"}, "is not a FetalStudio layout"),
    ({"version": 2}, "version 2.*newer FetalStudio"),
    ({"version": None}, "version None"),
    ({"boxes": [{"structure": "nose", "x0": 1, "y0": 1, "x1": 5, "y1": 5}]}, "Unknown structure 'nose'.*Valid names: thalami"),
    ({"boxes": [{"structure": "thalami", "x0": 1, "y0": 1}]}, "box 1 lacks x1, y1"),
    ({"boxes": [{"structure": "thalami", "x0": 600, "y0": 1, "x1": 800, "y1": 50}]}, "outside the 697x480 image"),
    ({"boxes": [{"structure": "thalami", "x0": 50, "y0": 1, "x1": 10, "y1": 50}]}, "is inverted"),
    ({"boxes": [{"structure": "thalami", "x0": 10, "y0": 5, "x1": 10, "y1": 50}]}, "has zero size"),
    ({"plane": "coronal"}, "Unknown layout plane 'coronal'"),
    ({"image_size": {"width": 697}}, "image_size must be"),
])
def test_bad_layout_files_are_refused_with_the_reason(tmp_path, change, message):
    data = {**real_layout().to_dict(), **change}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(FetalStudioError, match=message) as caught:
        Layout.read(path)
    assert str(path) in str(caught.value)


def test_box_queries_name_what_is_present():
    layout = real_layout().with_boxes([b for b in real_layout().boxes if b.structure != "nasal_bone"])
    with pytest.raises(FetalStudioError, match="no nasal_bone box.*thalami"):
        layout.box("nasal_bone")
    assert layout.box("thalami").structure == "thalami"


def test_each_structure_has_its_colour_and_label_inside_its_box():
    layout = real_layout()
    maps = render_layout(layout)
    assert maps.color.shape == (480, 697, 3) and maps.labels.dtype == np.uint8
    drawn_last = {}
    for box in drawing_order(layout):
        drawn_last[box.structure] = box
    for box in layout.boxes:
        info = structure("facial_sagittal", box.structure)
        mine = box_mask(box, layout.size)
        later = [other for other in drawing_order(layout)[drawing_order(layout).index(box) + 1:]]
        visible = mine & ~np.any([box_mask(o, layout.size) for o in later] or [np.zeros_like(mine)], axis=0)
        assert visible.sum() > 0.5 * mine.sum(), box.structure  # small structures stay visible
        assert (maps.labels[visible] == info.label).all()
        assert (maps.color[visible] == info.color_rgb).all()
        ys, xs = np.nonzero(mine)  # the drawn pixels are the box's pixels
        assert xs.min() == round(box.x0) and xs.max() == round(box.x1) - 1
        assert ys.min() == round(box.y0) and ys.max() == round(box.y1) - 1
    assert (maps.labels == 0).sum() > 0.5 * maps.labels.size and (maps.color[maps.labels == 0] == 0).all()


def test_overlap_smaller_box_on_top_whatever_the_order():
    big = StructureBox("nasal_skin", 10, 10, 60, 60)
    small = StructureBox("nasal_bone", 20, 20, 30, 30)
    for boxes in ([big, small], [small, big]):
        labels = layout_label_map(Layout("facial_sagittal", 80, 80, boxes))
        assert labels[25, 25] == structure("facial_sagittal", "nasal_bone").label
        assert labels[50, 50] == structure("facial_sagittal", "nasal_skin").label
        assert labels[70, 70] == 0
    same = [StructureBox("palate", 0, 0, 20, 20), StructureBox("thalami", 0, 0, 20, 20)]
    assert layout_label_map(Layout("facial_sagittal", 30, 30, same))[5, 5] == 3  # tie: higher label on top


@pytest.mark.parametrize("size", [(64, 64), (256, 176), (512, 512), (1394, 960)])
def test_maps_at_any_size_keep_geometry_and_every_structure(size):
    layout = real_layout()
    labels = layout_label_map(layout, size)
    assert labels.shape == (size[1], size[0])
    assert set(np.unique(labels)) == {0} | {s.label for s in structures_for("facial_sagittal")}
    for box in layout.boxes:
        cx, cy = box.center
        x, y = int(cx * size[0] / layout.width), int(cy * size[1] / layout.height)
        assert labels[y, x] != 0
    exact = layout_label_map(layout)
    import cv2
    resized = cv2.resize(exact, size, interpolation=cv2.INTER_NEAREST)
    assert (resized == labels).mean() > 0.97


def test_tiny_box_still_drawn_on_a_small_map():
    layout = Layout("facial_sagittal", 400, 400, (StructureBox("nasal_bone", 100, 100, 103, 101),))
    assert (layout_label_map(layout, (32, 32)) == 4).sum() >= 1


def test_outline_style_and_rotation():
    box = StructureBox("palate", 20, 40, 80, 60)
    outline = layout_label_map(Layout("facial_sagittal", 100, 100, (box,)), style="outline", outline_px=1)
    assert outline[40, 50] == 3 and outline[50, 50] == 0 and outline[50, 20] == 3
    turned = layout_label_map(Layout("facial_sagittal", 100, 100, (StructureBox("palate", 20, 40, 80, 60, 90),)))
    ys, xs = np.nonzero(turned)  # 60x20 turned 90 deg about (50, 50) -> 20x60
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (40, 59, 20, 79)
    with pytest.raises(FetalStudioError, match="style"):
        render_layout(Layout("facial_sagittal", 10, 10), style="dotted")


def test_skull_box_from_an_ellipse_and_overlay():
    box = skull_box(100, 80, 60, 40, 30)
    layout = Layout("trans_thalamic", 200, 160, (box,))
    colour = layout_color_map(layout)
    assert tuple(colour[80, 100]) == structure("trans_thalamic", "skull").color_rgb
    shown = overlay_layout(np.full((160, 200), 128, np.uint8), layout, style="filled")
    assert shown.shape == (160, 200, 3) and tuple(shown[0, 0]) == (128, 128, 128) and tuple(shown[80, 100]) != (128, 128, 128)


def test_turned_box_matches_opencv_rotated_rectangle():
    """A turned box covers the pixels of OpenCV's rotated rectangle (cv2.boxPoints + fillPoly)."""
    import cv2
    box = StructureBox("nuchal_translucency", 20, 45, 100, 65, 30)
    mine = layout_label_map(Layout("facial_sagittal", 120, 110, (box,))) > 0
    reference = np.zeros((110, 120), np.uint8)
    cv2.fillPoly(reference, [np.round(cv2.boxPoints((box.center, (80, 20), 30)) - 0.5).astype(np.int32)], 1)
    overlap = (mine & (reference > 0)).sum() / (mine | (reference > 0)).sum()
    assert overlap > 0.9 and abs(mine.sum() - 80 * 20) < 40


def test_layouts_from_the_structures_folder_reader():
    from anatomy_support import STRUCTURES
    from fetalstudio.data.structures import read_structures
    items = read_structures(STRUCTURES)
    layouts = [Layout.from_annotated_image(item) for item in items]
    assert len(layouts) == 991
    first = next(layout for layout in layouts if layout.source.endswith("first_trimester_structures/images/0.png"))
    assert first == real_layout()
