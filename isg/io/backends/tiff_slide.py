"""The ``tifffile`` backend: tiled or stripped (pyramidal) TIFF, SVS and OME-TIFF read with tifffile.

Compressed segments are read with ``os.pread`` on the slide's own descriptor (thread-safe). JPEG tiles
(8-bit RGB or YCbCr, the tiles of Aperio SVS and most TIFF pyramids) are decoded by libjpeg-turbo
straight into the caller's buffer with the GIL released, strictly (:func:`isg.io.damage.decode_jpeg`):
that one decode is also the damaged-tile check of the tile, so each tile is decoded once. Other
codecs are decoded by tifffile / imagecodecs after the segment check of :mod:`isg.io.damage`.

Tiles that are whole file tiles (the streaming case) are decoded in a tight loop into the batch; other
regions are cut from decoded segments kept in a small LRU cache (:attr:`TiffSlide.cache_bytes`, 64 MiB),
which helps reads that overlap file tiles (a 224 px grid over 256 px tiles decodes each file tile
about once). A new slide object starts with an empty cache.
"""

from __future__ import annotations

import collections
import os
import threading

import numpy as np

from isg.io.damage import DAMAGED_LIMIT, DamagedSlideError, DamagedTileError, SlideError, TiffSegments, decode_jpeg
from isg.io.metadata import TIFF_MAGIC, quiet_logger, tiff_page_mpp
from isg.io.registry import register_backend
from isg.io.slide import Slide, aligned_empty


def tiff_levels(tif) -> list:
    """Pages of the pyramid, finest first: tifffile's levels for known layouts (SVS, NDPI, OME, ...),
    else page 0 followed by the reduced-resolution pages (``subfiletype & 1``) that shrink."""
    series = tif.series[0] if tif.series else None
    pages = [level.keyframe for level in series.levels] if series is not None else []
    if len(pages) > 1 or not tif.pages:
        return pages
    base = tif.pages.first
    pages = [base]
    for page in tif.pages[1:]:
        if (getattr(page, "is_reduced", False) and page.samplesperpixel == base.samplesperpixel
                and page.imagewidth < pages[-1].imagewidth and page.imagelength < pages[-1].imagelength):
            pages.append(page)
    return pages


def strict_jpeg(page) -> bool:
    """Whether the segments of ``page`` are 8-bit, 3-sample, interleaved RGB / YCbCr JPEG: decoded by
    :func:`isg.io.damage.decode_jpeg` (one strict decode is pixels and damage check at once)."""
    return (page.compression == 7 and page.bitspersample == 8 and page.samplesperpixel == 3
            and page.planarconfig == 1 and page.photometric in (2, 6))


def _tiff_accepts(path, kind: str) -> bool:
    return kind == "tiff"


@register_backend("tifffile", suffixes=(".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff", ".bif", ".scn"),
                  probe=lambda: True, accepts=_tiff_accepts, auto_rank=30)
class TiffSlide(Slide):
    """Tiled or stripped (pyramidal) TIFF via tifffile; concurrent reads are safe."""

    backend = "tifffile"
    cache_bytes = 64 << 20  # decoded segments kept for reads that do not match the file's tiles

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT):
        super().__init__(path, mpp)
        self._cache: collections.OrderedDict = collections.OrderedDict()  # (level, index) -> [th, tw, 3]
        self._cache_lock = threading.Lock()
        self._cached = 0
        import tifffile

        with quiet_logger("tifffile"):
            try:
                self._tif = tifffile.TiffFile(str(path))
                pages = tiff_levels(self._tif)
            except Exception as exc:
                raise SlideError(path, f"corrupt or not a TIFF ({type(exc).__name__}: {exc})") from exc
        if not pages:
            raise SlideError(path, f"corrupt or truncated: no readable image directory (IFD) in the TIFF "
                                   f"({os.path.getsize(path)} bytes)")
        self._pages = []
        for page in pages:
            if page.dtype is None or page.dtype != np.uint8 or page.samplesperpixel not in (1, 3, 4) or page.imagedepth > 1:
                break
            self._pages.append(page)
        if not self._pages:
            raise SlideError(path, f"unsupported TIFF layout: {pages[0]!r} (need 8-bit gray/RGB images)")
        self.segments = TiffSegments(path, self._pages)
        for level, missing in enumerate(self.segments.structural):
            total = self.segments.count(level)
            if len(missing) > max_damaged * total:
                problem = (f"truncated or damaged: {len(missing)} of {total} tiles of level {level} have no data in the "
                           f"file ({self.segments.size} bytes), more than {max_damaged:.0%}; e.g. {next(iter(missing.values()))}")
                self.close()
                raise DamagedSlideError(path, problem, len(missing), total)
        W0, H0 = self._pages[0].imagewidth, self._pages[0].imagelength
        self.level_dimensions = [(p.imagewidth, p.imagelength) for p in self._pages]
        self.level_downsamples = [float((W0 / w + H0 / h) / 2) for w, h in self.level_dimensions]
        self._mpp_meta = tiff_page_mpp(self._pages[0])
        self._fd = os.open(str(path), os.O_RDONLY)
        self._strict = [strict_jpeg(page) for page in self._pages]
        for level, page in enumerate(self._pages):  # everything lazy is loaded now: reader threads only pread + decode
            _ = page.decode
            if self._strict[level]:
                self.segments.jpeg_head(level)
        if any(self._strict):
            import simplejpeg  # noqa: F401 - the decoder's import is not part of the first read
        try:
            self._finish_init()
        except SlideError:
            self.close()
            raise

    @staticmethod
    def _segment_shape(page) -> tuple[int, int]:
        if page.is_tiled:
            return page.tilelength, page.tilewidth
        return page.rowsperstrip if page.rowsperstrip else page.imagelength, page.imagewidth

    @property
    def compression(self) -> int:
        """TIFF compression code of level 0 (7 = JPEG, 8 = deflate, 33003/33005 = Aperio JPEG 2000, ...)."""
        return int(self._pages[0].compression)

    def page(self, level: int):
        """The tifffile page of ``level``."""
        return self._pages[level]

    def _decode(self, level: int, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Segment ``index`` of ``level`` as uint8 [th, tw, 3] (into ``out`` when given: C-contiguous, that shape);
        raises :class:`DamagedTileError` for a damaged segment (``out`` then holds no pixels to use)."""
        page, segments = self._pages[level], self.segments
        reason = segments.known(level, index) if self._strict[level] else segments.damage(level, index)
        if reason is not None:
            raise DamagedTileError(self.path, level, index, reason)
        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        try:
            if self._strict[level]:
                decoded = decode_jpeg(segments.jpeg_head(level) + data[2:], out=out)
                segments.record(level, index, None)
                return decoded
            segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:  # noqa: BLE001 - a decoder error is a damaged segment
            reason = segments.damage(level, index) or f"{type(exc).__name__}: {exc}"
            segments.record(level, index, reason)
            raise DamagedTileError(self.path, level, index, reason) from exc
        segment = segment.reshape(segment.shape[-3:])  # [th, tw, C]
        segment = np.repeat(segment, 3, axis=-1) if segment.shape[-1] == 1 else segment[..., :3]
        if out is not None:
            out[...] = segment
            return out
        return segment

    def _cached_segment(self, level: int, index: int) -> np.ndarray:
        """Decoded segment [th, tw, 3] from an LRU cache (``cache_bytes``): tiles that do not match the
        file's tiles (other sizes, offsets or levels) share segments with their neighbours."""
        key = (level, index)
        with self._cache_lock:
            segment = self._cache.get(key)
            if segment is not None:
                self._cache.move_to_end(key)
                return segment
        page = self._pages[level]
        out = aligned_empty((*self._segment_shape(page), 3)) if self._strict[level] else None
        segment = self._decode(level, index, out=out)
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = segment
                self._cached += segment.nbytes
                while self._cached > self.cache_bytes and self._cache:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
        return segment

    def read_segment(self, level: int, row: int, col: int) -> np.ndarray:
        """Decoded tile (row, col) of ``level`` [th, tw, 3] (edge tiles keep their padding)."""
        th, tw = self._segment_shape(self._pages[level])
        cols = -(-self._pages[level].imagewidth // tw)
        return self._decode(level, row * cols + col)

    def tile_shape(self, level: int) -> tuple[int, int]:
        """(th, tw) of the compressed segments of ``level``."""
        return self._segment_shape(self._pages[level])

    def check_damage(self, level, x, y, w, h):
        if not self._strict[level]:
            return super().check_damage(level, x, y, w, h)
        for index in self.segments.indices(level, x, y, w, h):  # known damage only: the decode checks the rest
            reason = self.segments.known(level, index)
            if reason is not None:
                raise DamagedTileError(self.path, level, index, reason)

    def read_tiles(self, coords, level, size, out):
        """As :meth:`Slide.read_tiles`; tiles that are whole JPEG tiles of the file are decoded straight into
        ``out`` in a tight loop: per tile one ``os.pread`` and one strict decode (pixels and damage check)."""
        page = self._pages[level]
        th, tw = self._segment_shape(page)
        if not self._strict[level] or (th, tw) != (size, size) or not out.flags.c_contiguous:
            return super().read_tiles(coords, level, size, out)
        factor = self.level_downsamples[level]
        gx, gy = np.round(coords[:, 0] / factor).astype(np.int64), np.round(coords[:, 1] / factor).astype(np.int64)
        lw, lh = self.level_dimensions[level]
        whole = (gx % tw == 0) & (gy % th == 0) & (gx >= 0) & (gy >= 0) & (gx + tw <= lw) & (gy + th <= lh)  # [B]
        index = (gy // th) * -(-lw // tw) + gx // tw
        offsets, counts, fd, segments = page.dataoffsets, page.databytecounts, self._fd, self.segments
        head, known, record = segments.jpeg_head(level), segments.known, segments.record
        damaged: list[str | None] = [None] * len(coords)
        for i, (is_whole, k) in enumerate(zip(whole.tolist(), index.tolist())):
            if not is_whole:
                try:
                    self.read_region(tuple(coords[i].tolist()), level, (size, size), out=out[i])
                except DamagedTileError as exc:
                    out[i] = 255
                    damaged[i] = exc.problem
                continue
            reason = known(level, k)
            if reason is None:
                try:
                    decode_jpeg(head + os.pread(fd, counts[k], offsets[k])[2:], out=out[i])
                    record(level, k, None)
                    continue
                except Exception as exc:  # noqa: BLE001 - a decoder error or warning: a damaged tile
                    reason = segments.damage(level, k) or f"{type(exc).__name__}: {exc}"
                    record(level, k, reason)
            out[i] = 255
            damaged[i] = DamagedTileError(self.path, level, k, reason).problem
        return damaged

    def _read(self, x, y, level, w, h, out):
        page = self._pages[level]
        th, tw = self._segment_shape(page)
        cols = -(-page.imagewidth // tw)
        if x % tw == 0 and y % th == 0 and (w, h) == (tw, th) and out.flags.c_contiguous:
            self._decode(level, (y // th) * cols + x // tw, out=out)  # one whole tile: decode in place
            return
        for row in range(y // th, (y + h - 1) // th + 1):
            for col in range(x // tw, (x + w - 1) // tw + 1):
                segment = self._cached_segment(level, row * cols + col)
                sy0, sx0 = row * th, col * tw
                ya, yb = max(y, sy0), min(y + h, sy0 + th)
                xa, xb = max(x, sx0), min(x + w, sx0 + tw)
                out[ya - y:yb - y, xa - x:xb - x] = segment[ya - sy0:yb - sy0, xa - sx0:xb - sx0]

    def take_segments(self) -> TiffSegments:
        """Hand the segment index to another backend opened on the same file (this slide no longer closes it)."""
        segments, self.segments = self.segments, None
        return segments

    def close(self):
        super().close()
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None
        if getattr(self, "_tif", None) is not None:
            self._tif.close()


def tiff_segments(path, mpp=None, max_damaged: float = DAMAGED_LIMIT) -> tuple[TiffSegments, int] | tuple[None, None]:
    """For a TIFF file (NDPI aside): its segment index and level-0 compression, parsed and validated by tifffile
    (corrupt / truncated files fail here, cheaply), for another backend that decodes its pixels: the index then
    checks every tile that backend decodes (cuCIM returns garbage for damaged tiles). (None, None) otherwise."""
    with open(path, "rb") as handle:
        if handle.read(4) not in TIFF_MAGIC or str(path).lower().endswith(".ndpi"):
            return None, None
    tiff = TiffSlide(path, mpp=mpp, max_damaged=max_damaged)
    compression = tiff.compression
    segments = tiff.take_segments()
    tiff.close()
    return segments, compression
