"""The Anatomy editor tab's pure helpers (no browser)."""

import numpy as np
from PIL import Image

from fetalstudio.ui.anatomy_tab import _write_png, difference_picture


def test_changed_pixels_are_tinted_red_in_the_written_picture(tmp_path):
    before = np.full((6, 8), 100, np.uint8)
    after = before.copy()
    after[2:4, 3:5] = 200  # changed
    after[0, 0] = 105  # below the change level: not tinted
    picture = difference_picture(before, after)
    path = _write_png(tmp_path / "difference.png", picture, "the difference picture")
    with Image.open(path) as written:
        pixels = np.asarray(written.convert("RGB")).astype(int)
    red, green, blue = pixels[2, 3]
    assert red > 200 and green == blue == 100  # red, as the label says (was written blue)
    assert tuple(pixels[0, 0]) == (105, 105, 105) and tuple(pixels[5, 7]) == (100, 100, 100)
