"""Slide metadata shared by every backend: microns per pixel from Aperio descriptions, OME-XML and TIFF
resolution tags, and the file kind read from the magic bytes."""

from __future__ import annotations

import contextlib
import logging
import re
from pathlib import Path

PLAUSIBLE_MPP = (0.01, 50.0)  # um/px; a dpi outside this range is a screen default, not a calibration
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def mpp_from_description(description: str | None) -> float | None:
    """``MPP = 0.25`` (Aperio ImageDescription) -> 0.25, else None."""
    if not description:
        return None
    match = re.search(r"\bMPP\s*=\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", description)
    return float(match.group(1)) if match else None


def mpp_from_resolution(x_resolution, unit) -> float | None:
    """TIFF XResolution (pixels per unit; rational or float) + ResolutionUnit -> um/px, else None."""
    if x_resolution is None:
        return None
    if isinstance(x_resolution, tuple):
        num, den = x_resolution
        if not num or not den:
            return None
        x_resolution = num / den
    if not x_resolution or x_resolution <= 0:
        return None
    unit = int(unit) if unit is not None else 2
    um_per_unit = {2: 25400.0, 3: 10000.0}.get(unit)  # 2 = inch (TIFF default), 3 = centimeter, 1 = none
    return um_per_unit / float(x_resolution) if um_per_unit else None


def mpp_from_ome(xml: str | None) -> float | None:
    """OME-XML ``<Pixels PhysicalSizeX="0.25" PhysicalSizeXUnit="µm">`` -> 0.25 (um/px; nm and mm converted), else None."""
    if not xml or "<OME" not in xml:
        return None
    pixels = re.search(r"<(?:\w+:)?Pixels\b[^>]*>", xml)
    size = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', pixels.group(0)) if pixels else None
    if size is None:
        return None
    unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', pixels.group(0))
    factor = {"µm": 1.0, "um": 1.0, "\u03bcm": 1.0, "nm": 1e-3, "mm": 1e3}.get(unit.group(1) if unit else "µm")
    return plausible_mpp(float(size.group(1)) * factor) if factor else None


def plausible_mpp(mpp: float | None) -> float | None:
    """``mpp`` when it is a microscope calibration (0.01-50 um/px), else None."""
    return mpp if mpp is not None and PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1] else None


def tiff_page_mpp(page) -> float | None:
    """mpp of a tifffile page: Aperio ``MPP =`` first, then OME-XML, then the resolution tags."""
    tags = page.tags
    description = tags["ImageDescription"].value if "ImageDescription" in tags else None
    mpp = mpp_from_description(description if isinstance(description, str) else None)
    if mpp is None and isinstance(description, str):
        mpp = mpp_from_ome(description)
    if mpp is None and "XResolution" in tags:
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        mpp = plausible_mpp(mpp_from_resolution(tags["XResolution"].value, unit))
    return mpp


def tiff_file_mpp(path) -> float | None:
    """mpp of a TIFF's first page read with tifffile (None for other files): the same rule for every backend,
    also where OpenSlide / cuCIM do not parse an ``MPP =`` description outside their vendor formats."""
    try:
        if sniff(Path(path)) != "tiff":
            return None
        import tifffile

        with quiet_logger("tifffile"), tifffile.TiffFile(str(path)) as tif:
            return tiff_page_mpp(tif.pages.first)
    except Exception:
        return None


def sniff(path: Path) -> str:
    """'tiff', 'image' or 'unknown' from the magic bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] in TIFF_MAGIC:
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:2] == b"BM" or head[:4] in (b"GIF8", b"RIFF"):
        return "image"
    return "unknown"


@contextlib.contextmanager
def quiet_logger(name: str):
    """Silence a library's warnings (tifffile logs every broken IFD) while we turn them into SlideErrors."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
