"""The ``cucim`` backend: cuCIM (generic tiled TIFF, SVS; JPEG, Aperio JPEG 2000, raw tiles), imported lazily
with its cuFile messages silenced. Batches are read by cuCIM's own batch reader (:class:`CuCIMTileReader`).

cuCIM decodes damaged tiles into grey or garbage, printing on the terminal, so every tile it decodes is
first checked on the compressed data (:class:`isg.io.damage.TiffSegments`, parsed by tifffile when the
file is opened). TIFF codecs it cannot decode (deflate, LZW: it crashes the process on them) are refused.
"""

from __future__ import annotations

import concurrent.futures as cf
from pathlib import Path

import numpy as np

from isg.io.backends.tiff_slide import tiff_segments
from isg.io.damage import DAMAGED_LIMIT, SlideError
from isg.io.metadata import mpp_from_resolution, plausible_mpp, tiff_file_mpp
from isg.io.registry import register_backend
from isg.io.slide import Slide, TileReader
from isg.utils import quiet_cucim, quiet_native_output

CUCIM_COMPRESSIONS = (1, 7, 33003, 33005)  # none, JPEG, Aperio JPEG 2000: TIFF codecs cuCIM decodes


def _cucim_importable() -> bool:
    import importlib.util

    if importlib.util.find_spec("cucim") is None:
        return False
    with quiet_cucim():
        from cucim import CuImage  # noqa: F401
    return True


@register_backend("cucim", suffixes=(".tif", ".tiff", ".svs"), probe=_cucim_importable)
class CuCIMSlide(Slide):
    """cuCIM's ``CuImage``; never picked by ``auto`` (tifffile reads the same files faster, docs/io.md)."""

    backend = "cucim"

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT, device: str = "cpu"):
        super().__init__(path, mpp)
        segments, compression = tiff_segments(path, mpp=mpp, max_damaged=max_damaged)
        if compression is not None and compression not in CUCIM_COMPRESSIONS:  # cuCIM crashes the process on these
            segments.close()
            raise SlideError(path, f"cuCIM cannot decode TIFF compression {compression} (it decodes "
                                   f"{', '.join(map(str, CUCIM_COMPRESSIONS))}); use backend 'tifffile'")
        try:
            with quiet_cucim():
                from cucim import CuImage

                self._image = CuImage(str(Path(path).resolve()))
        except Exception as exc:
            if segments is not None:
                segments.close()
            raise SlideError(path, f"cuCIM cannot open it ({type(exc).__name__}: {exc})") from exc
        self.segments = segments
        resolutions = self._image.resolutions
        self.level_dimensions = [tuple(map(int, d)) for d in resolutions["level_dimensions"]]
        self.level_downsamples = [float(d) for d in resolutions["level_downsamples"]]
        self.device = device
        self._mpp_meta = tiff_file_mpp(path)  # same rule as the other backends
        if self._mpp_meta is None:
            self._mpp_meta = self._metadata_mpp()
        try:
            self._finish_init()
        except SlideError:
            self.close()
            raise

    def _metadata_mpp(self) -> float | None:
        meta = self._image.metadata
        aperio = meta.get("aperio", {}) if isinstance(meta, dict) else {}
        if "MPP" in aperio:
            return float(aperio["MPP"])
        tiff = meta.get("tiff", {}) if isinstance(meta, dict) else {}
        unit = {"inch": 2, "centimeter": 3}.get(str(tiff.get("resolution_unit", "")).lower())
        return plausible_mpp(mpp_from_resolution(tiff.get("x_resolution"), unit)) if unit else None

    def _read(self, x, y, level, w, h, out):
        location = self.backend_location(x, y, level)
        try:
            with quiet_native_output():  # cuCIM prints decoder errors and returns pixels: the segments decide
                region = self._image.read_region(location, (w, h), level)
        except Exception as exc:  # RuntimeError for compressions cuCIM does not decode, ...
            raise SlideError(self.path, f"cuCIM read failed at {location} level {level}: {exc}") from exc
        out[...] = np.asarray(region)[..., :3]

    def read_batch(self, locations: list[tuple[int, int]], level: int, size: int, num_workers: int):
        """cuCIM's batch reader over level-0 ``locations`` (in cuCIM's own convention, see
        :meth:`Slide.backend_location`): arrays [b, size, size, C] in a buffer cuCIM reuses (copy them out)."""
        for array in self._image.read_region(locations, (size, size), level, num_workers=num_workers,
                                             batch_size=len(locations)):
            array = np.asarray(array)
            yield array.reshape(-1, size, size, array.shape[-1])  # [size, size, C] when b == 1

    def tile_reader(self, level, size, device="cpu", num_workers=0):
        if num_workers <= 0:
            return super().tile_reader(level, size, device, num_workers)
        return CuCIMTileReader(self, level, size, num_workers)

    def close(self):
        super().close()
        if getattr(self, "_image", None) is not None:
            self._image.close()


class CuCIMTileReader(TileReader):
    """Batches decoded by cuCIM's batch reader with ``num_workers`` threads of its own. Tiles crossing the
    border (cuCIM pads them black) and tiles over damaged segments (found by the segment check, run in
    ``num_workers`` threads) go through :meth:`Slide.read_tiles`, which pads white and reports damage."""

    def __init__(self, slide: CuCIMSlide, level: int, size: int, num_workers: int):
        super().__init__(slide, level, size)
        self.num_workers = num_workers
        self._checks = cf.ThreadPoolExecutor(num_workers, thread_name_prefix="isg-check")

    def _suspect(self, xy) -> bool:
        """Whether the in-bounds part of the tile at level (x, y) touches a damaged segment."""
        slide, size = self.slide, self.size
        if slide.segments is None:
            return False
        lw, lh = slide.level_dimensions[self.level]
        x0, y0 = max(xy[0], 0), max(xy[1], 0)
        x1, y1 = min(xy[0] + size, lw), min(xy[1] + size, lh)
        return x0 < x1 and y0 < y1 and slide.segments.region_damage(self.level, x0, y0, x1 - x0, y1 - y0) is not None

    def read(self, coords, out):
        slide, level, size = self.slide, self.level, self.size
        view = out.numpy()  # [B, size, size, 3]
        levels = np.array([slide.to_level(xy, level) for xy in coords.tolist()], np.int64).reshape(-1, 2)  # [B, 2]
        lw, lh = slide.level_dimensions[level]
        crosses = (levels.min(axis=1) < 0) | (levels[:, 0] + size > lw) | (levels[:, 1] + size > lh)  # [B]
        suspect = np.array(list(self._checks.map(self._suspect, levels.tolist())), bool).reshape(-1)
        direct = np.flatnonzero(~crosses & ~suspect)
        if len(direct):
            locations = [slide.backend_location(x, y, level) for x, y in levels[direct].tolist()]
            done = 0
            with quiet_native_output():
                for array in slide.read_batch(locations, level, size, self.num_workers):
                    view[direct[done:done + len(array)]] = array[..., :3]
                    done += len(array)
        reasons: list[str | None] = [None] * len(coords)
        rest = np.setdiff1d(np.arange(len(coords)), direct)
        if len(rest):
            tiles = np.empty((len(rest), size, size, 3), np.uint8)
            for i, reason in zip(rest.tolist(), slide.read_tiles(coords[rest], level, size, tiles)):
                reasons[i] = reason
            view[rest] = tiles
        return reasons

    def close(self):
        self._checks.shutdown(wait=True)
