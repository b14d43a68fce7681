"""Head biometry from a fitted head ellipse: HC, BPD and OFD.

- HC (head circumference): the ellipse's perimeter (Ramanujan's second approximation), as HC18
  defines its reference ``hc_mm``.
- BPD (biparietal diameter) and OFD (occipito-frontal diameter): the ellipse's minor and major axis
  lengths (full axes, not semi-axes). Clinical BPD is often measured outer-to-inner edge of the
  skull; an ellipse fitted to the skull's centre line gives the centre-to-centre value, which is
  what HC18-style annotations allow.

All values are in pixels; with a pixel size (mm per pixel) also in millimetres.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from fetalstudio.imaging.ellipse import Ellipse, ramanujan_perimeter


@dataclass(frozen=True)
class HeadBiometry:
    hc_px: float
    bpd_px: float
    ofd_px: float
    pixel_size_mm: float | None = None

    @property
    def hc_mm(self) -> float | None:
        return None if self.pixel_size_mm is None else self.hc_px * self.pixel_size_mm

    @property
    def bpd_mm(self) -> float | None:
        return None if self.pixel_size_mm is None else self.bpd_px * self.pixel_size_mm

    @property
    def ofd_mm(self) -> float | None:
        return None if self.pixel_size_mm is None else self.ofd_px * self.pixel_size_mm

    def as_dict(self) -> dict[str, float | None]:
        """Flat, JSON/CSV-ready values (mm ones are None without a pixel size)."""
        values = asdict(self)
        values.update(hc_mm=self.hc_mm, bpd_mm=self.bpd_mm, ofd_mm=self.ofd_mm)
        return values


def head_biometry(ellipse: Ellipse, pixel_size_mm: float | None = None) -> HeadBiometry:
    """HC, BPD and OFD of a head ellipse (``pixel_size_mm`` in mm per pixel, > 0, or None)."""
    if pixel_size_mm is not None:
        pixel_size_mm = float(pixel_size_mm)
        if not pixel_size_mm > 0:
            raise ValueError(f"The pixel size must be a positive number of mm per pixel, not {pixel_size_mm}.")
    major, minor = max(ellipse.axis_a, ellipse.axis_b), min(ellipse.axis_a, ellipse.axis_b)
    return HeadBiometry(
        hc_px=ramanujan_perimeter(ellipse.axis_a, ellipse.axis_b),
        bpd_px=2.0 * minor,
        ofd_px=2.0 * major,
        pixel_size_mm=pixel_size_mm,
    )
