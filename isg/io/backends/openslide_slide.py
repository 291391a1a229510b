"""The ``openslide`` backend: OpenSlide 4 (SVS, NDPI, MRXS, DICOM WSI, SCN, VMS, BIF, generic tiled TIFF, ...).

``auto`` opens the vendor formats that are not plain TIFF with it (NDPI, MRXS, DICOM, VMS, ...). OpenSlide
reports a failed decode by raising, and its handle then fails every later read: the handle is reopened and
the read retried once, so a damaged tile costs one tile, not the slide. For TIFF files the compressed
tiles are also checked by :class:`isg.io.damage.TiffSegments`.
"""

from __future__ import annotations

import threading

import numpy as np

from isg.io.backends.tiff_slide import tiff_segments
from isg.io.damage import DAMAGED_LIMIT, DamagedTileError, SlideError
from isg.io.metadata import tiff_file_mpp
from isg.io.registry import register_backend
from isg.io.slide import Slide
from isg.utils import quiet_native_output

OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


def _openslide_available() -> bool:
    import openslide  # noqa: F401

    return True


def _openslide_accepts(path, kind: str) -> bool:
    """Vendor formats that tifffile does not read as well: anything but plain TIFF, and NDPI."""
    suffix = path.suffix.lower()
    return suffix in OPENSLIDE_SUFFIXES and (kind != "tiff" or suffix == ".ndpi")


@register_backend("openslide", suffixes=OPENSLIDE_SUFFIXES, probe=_openslide_available, accepts=_openslide_accepts,
                  auto_rank=20)
class OpenSlideSlide(Slide):
    """OpenSlide: a failed decode raises; the handle is reopened and the read retried once."""

    backend = "openslide"

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT):
        super().__init__(path, mpp)
        import openslide

        segments, _ = tiff_segments(path, mpp=mpp, max_damaged=max_damaged)
        self._reopen_lock = threading.Lock()
        try:
            with quiet_native_output():
                self._osr = openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
            if segments is not None:
                segments.close()
            raise SlideError(path, f"OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self.segments = segments
        self.level_dimensions = [tuple(map(int, d)) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        mpp_x = self._osr.properties.get(openslide.PROPERTY_NAME_MPP_X)
        self._mpp_meta = tiff_file_mpp(path)  # same rule as the other backends for TIFF-based files
        if self._mpp_meta is None and mpp_x:
            self._mpp_meta = float(mpp_x)
        try:
            self._finish_init()
        except SlideError:
            self.close()
            raise

    def _reopen(self, broken) -> None:
        import openslide

        with self._reopen_lock:
            if self._osr is broken:  # another thread may have reopened it already
                self._osr = openslide.OpenSlide(str(self.path))
                broken.close()

    def _read(self, x, y, level, w, h, out):
        location = self.backend_location(x, y, level)
        for attempt in range(2):
            osr = self._osr
            try:
                rgba = np.asarray(osr.read_region(location, level, (w, h)))  # [h, w, 4], premultiplied alpha
                break
            except Exception as exc:  # OpenSlideError: a decode failed here (or in another thread on this handle)
                self._reopen(osr)
                if attempt:
                    raise DamagedTileError(self.path, level, -1, f"OpenSlide read at {location} failed: {exc}") from exc
        alpha = rgba[..., 3:4]
        if alpha.min() == 255:
            out[...] = rgba[..., :3]
        else:  # transparent (missing) areas -> white
            out[...] = (rgba[..., :3].astype(np.uint16) + (255 - alpha)).clip(0, 255).astype(np.uint8)

    def close(self):
        super().close()
        self._osr.close()
