"""Whole-slide image readers behind one :class:`Slide` interface.

Backends (``open_slide(path, backend=...)``):

* ``"cucim"``: cuCIM (generic tiled TIFF, SVS); imported lazily, its cuFile log is silenced.
* ``"openslide"``: OpenSlide (NDPI, MRXS, SCN, SVS, VMS, BIF, generic tiled TIFF, ...).
* ``"tifffile"``: pure-Python tiled/stripped TIFF reader (tifffile + imagecodecs). It reads the
  compressed tiles with ``os.pread`` and decodes them with the GIL released, so it is thread-safe
  and the fastest path for tile streaming.
* ``"image"``: PNG / JPEG / BMP via Pillow, one level, for small inputs.

``"auto"`` picks tifffile for TIFF-based files (``.tif/.tiff/.svs``, OME-TIFF, ...; fastest on real
Aperio SVS, see ``docs/io.md``), OpenSlide for the other vendor formats (NDPI, MRXS, DICOM, ...),
then image. Every backend returns the same pixels: RGB uint8, and regions reaching past the slide
border are padded white (255).

Damaged tiles (see :mod:`isg.io.damage`) are failures on every backend: a region touching one raises
:class:`DamagedTileError`, never pixels. For TIFF files the compressed tiles are checked by
:class:`isg.io.damage.TiffSegments` whichever backend decodes them; OpenSlide raises on its own for
the other formats. A file with more than ``max_damaged`` (default 5%) of the tiles of a level missing
(truncated) is rejected when opened.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import re
import threading
from pathlib import Path

import numpy as np

from isg.io.damage import (DAMAGED_LIMIT, DamagedSlideError, DamagedTileError, SlideError, TiffSegments, jpeg_error,
                           quiet_native_output)

BACKENDS = ("cucim", "openslide", "tifffile", "image")
CUCIM_SUFFIXES = (".tif", ".tiff", ".svs")
CUCIM_COMPRESSIONS = (1, 7, 33003, 33005)  # none, JPEG, Aperio JPEG 2000: TIFF codecs cuCIM decodes
OPENSLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MIN_SLIDE_SIZE = 64  # px per side at level 0; smaller files are rejected as "too small"
MAX_IMAGE_PIXELS = 30000 * 30000  # the "image" backend decodes the whole file in memory
_PLAUSIBLE_MPP = (0.01, 50.0)  # um/px; a dpi outside this range is a screen default, not a calibration


# ----------------------------------------------------------------------------- metadata


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
    return _plausible(float(size.group(1)) * factor) if factor else None


def _plausible(mpp: float | None) -> float | None:
    return mpp if mpp is not None and _PLAUSIBLE_MPP[0] <= mpp <= _PLAUSIBLE_MPP[1] else None


def _tiff_mpp(page) -> float | None:
    """mpp of a tifffile page: Aperio ``MPP =`` first, then the resolution tags."""
    tags = page.tags
    description = tags["ImageDescription"].value if "ImageDescription" in tags else None
    mpp = mpp_from_description(description if isinstance(description, str) else None)
    if mpp is None and isinstance(description, str):
        mpp = mpp_from_ome(description)
    if mpp is None and "XResolution" in tags:
        unit = tags["ResolutionUnit"].value if "ResolutionUnit" in tags else 2
        mpp = _plausible(mpp_from_resolution(tags["XResolution"].value, unit))
    return mpp


def _tiff_file_mpp(path) -> float | None:
    """mpp of a TIFF's first page read with tifffile (None for other files): the fallback when OpenSlide /
    cuCIM do not parse an ``MPP =`` description outside their vendor formats."""
    try:
        with open(path, "rb") as handle:
            if handle.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
                return None
        import tifffile

        with _quiet_logger("tifffile"), tifffile.TiffFile(str(path)) as tif:
            return _tiff_mpp(tif.pages.first)
    except Exception:
        return None


# ----------------------------------------------------------------------------- base class


class Slide:
    """A multi-resolution slide. Subclasses fill the attributes and implement ``_read``.

    Attributes: ``path``, ``backend``, ``dimensions`` (W, H) at level 0, ``level_count``,
    ``level_dimensions`` [(W, H)], ``level_downsamples`` [float], ``mpp`` (um/px at level 0, None when
    unknown: only slides whose class does not ``require_mpp``), ``segments`` (the
    :class:`~isg.io.damage.TiffSegments` of a TIFF file, whose damage every read checks; None otherwise).
    """

    backend = ""
    require_mpp = True  # whole-slide formats must carry a calibration (or be given one)

    def __init__(self, path, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_override = mpp
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self._mpp_meta: float | None = None
        self.segments: TiffSegments | None = None

    # -- filled by subclasses
    def _read(self, x: int, y: int, level: int, w: int, h: int, out: np.ndarray) -> None:
        """Read the in-bounds level-``level`` rectangle (x, y, w, h) into ``out`` [h, w, 3]."""
        raise NotImplementedError

    def _finish_init(self) -> None:
        if not self.level_dimensions:
            raise SlideError(self.path, "no image levels found")
        w, h = self.level_dimensions[0]
        if w < MIN_SLIDE_SIZE or h < MIN_SLIDE_SIZE:
            raise SlideError(self.path, f"too small: {w}x{h} px (at least {MIN_SLIDE_SIZE}x{MIN_SLIDE_SIZE} needed)")
        if self._mpp_override is not None:
            if not (self._mpp_override > 0 and math.isfinite(self._mpp_override)):
                raise SlideError(self.path, f"mpp= must be a positive number, got {self._mpp_override!r}")
        elif self._mpp_meta is None and self.require_mpp:
            raise SlideError(self.path, "no microns-per-pixel (mpp) in the metadata; pass mpp= (e.g. --mpp 0.5) to set it")

    # -- public API
    @property
    def mpp(self) -> float | None:
        mpp = self._mpp_override if self._mpp_override is not None else self._mpp_meta
        return None if mpp is None else float(mpp)

    @property
    def dimensions(self) -> tuple[int, int]:
        return self.level_dimensions[0]

    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def slide_id(self) -> str:
        return self.path.stem

    def level_mpp(self, level: int) -> float | None:
        return None if self.mpp is None else self.mpp * self.level_downsamples[level]

    def best_level_for_mpp(self, mpp: float) -> int:
        """The coarsest level whose resolution is at least as fine as ``mpp`` (1% tolerance); 0 if none."""
        if self.mpp is None:
            raise SlideError(self.path, f"reading at {mpp} um/px needs the slide's mpp, which its metadata lacks; "
                                        "give it (--slide-mpp or --mpp-csv) or read by --level")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * 1.01:
                best = level
        return best

    def best_level_for_downsample(self, downsample: float) -> int:
        best = 0
        for level, factor in enumerate(self.level_downsamples):
            if factor <= downsample * 1.01:
                best = level
        return best

    def to_level(self, location, level: int) -> tuple[int, int]:
        """Level-0 (x, y) -> pixel (x, y) at ``level``: rounded, so ``to_level(round(g * downsample)) == g``."""
        factor = self.level_downsamples[level]
        return int(round(location[0] / factor)), int(round(location[1] / factor))

    def backend_location(self, x: int, y: int, level: int) -> tuple[int, int]:
        """Level-0 location that OpenSlide / cuCIM (which truncate ``location / downsample``) map to (x, y) at ``level``."""
        factor = self.level_downsamples[level]
        return int(math.ceil(x * factor - 1e-9)), int(math.ceil(y * factor - 1e-9))

    def read_region(self, location, level: int, size, out: np.ndarray | None = None) -> np.ndarray:
        """RGB uint8 [h, w, 3] of ``size`` (w, h) pixels at ``level`` whose top-left is ``location`` (x, y) at level 0
        (mapped to the level by :meth:`to_level`: rounded, the same on every backend).

        Pixels outside the slide are white (255). ``out`` (uint8 [h, w, 3]) is filled in place when given.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (slide has {self.level_count} levels)")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {size}")
        if out is None:
            out = np.empty((h, w, 3), np.uint8)
        x, y = self.to_level(location, level)  # top-left at the read level
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, lw), min(y + h, lh)
        if x0 >= x1 or y0 >= y1:
            out.fill(255)
            return out
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            out.fill(255)
        self.check_damage(level, x0, y0, x1 - x0, y1 - y0)
        self._read(x0, y0, level, x1 - x0, y1 - y0, out[y0 - y:y1 - y, x0 - x:x1 - x])
        return out

    def check_damage(self, level: int, x: int, y: int, w: int, h: int) -> None:
        """Raise :class:`DamagedTileError` when the in-bounds rectangle (x, y, w, h) at ``level`` touches a damaged
        tile of the file (TIFF files: checked on the compressed tiles; other formats: their reader raises)."""
        if self.segments is not None:
            found = self.segments.region_damage(level, x, y, w, h)
            if found is not None:
                raise DamagedTileError(self.path, level, *found)

    def read_tiles(self, coords: np.ndarray, level: int, size: int, out: np.ndarray) -> list[str | None]:
        """Fill ``out`` uint8 [B, size, size, 3] with the ``size`` px tiles at level-0 ``coords`` int64 [B, 2]
        (each exactly ``read_region(coords[i], level, (size, size))``). Returns, per tile, None or why it is
        damaged (its rows of ``out`` are then white, not pixels to use)."""
        damaged: list[str | None] = [None] * len(coords)
        for i, (x, y) in enumerate(coords.tolist()):
            try:
                self.read_region((x, y), level, (size, size), out=out[i])
            except DamagedTileError as exc:
                out[i] = 255
                damaged[i] = exc.problem
        return damaged

    def read_region_tolerant(self, location, level: int, size, block: int = 512,
                             damaged: np.ndarray | None = None) -> np.ndarray:
        """:meth:`read_region`, with the parts over damaged tiles left white (for overviews and tissue masks):
        the file's own tiles of ``level`` when the slide has a segment index, else ``block`` px squares.
        ``damaged`` (bool [h, w], optional) is set True over those parts."""
        try:
            return self.read_region(location, level, size)
        except DamagedTileError:
            pass
        w, h = int(size[0]), int(size[1])
        out = np.full((h, w, 3), 255, np.uint8)
        x, y = self.to_level(location, level)  # top-left at the read level
        bh, bw = self.segments.shape(level) if self.segments is not None else (block, block)
        factor = self.level_downsamples[level]
        for gy in range(y - y % bh, y + h, bh):  # blocks aligned with the file's tiles
            for gx in range(x - x % bw, x + w, bw):
                x0, y0, x1, y1 = max(gx, x), max(gy, y), min(gx + bw, x + w), min(gy + bh, y + h)
                try:
                    self.read_region((round(x0 * factor), round(y0 * factor)), level, (x1 - x0, y1 - y0),
                                     out=out[y0 - y:y1 - y, x0 - x:x1 - x])
                except DamagedTileError:
                    if damaged is not None:
                        damaged[y0 - y:y1 - y, x0 - x:x1 - x] = True
        return out

    def thumbnail(self, max_size: int = 1024, with_damage: bool = False):
        """RGB uint8 [h, w, 3] of the whole slide, longest side ``max_size`` (never upscaled), box-filtered
        from the coarsest level that is at least that fine. Damaged tiles are painted white; ``with_damage``
        returns ``(thumbnail, damaged bool [h, w])`` marking them."""
        from PIL import Image

        W, H = self.dimensions
        scale = min(1.0, max_size / max(W, H))
        tw, th = max(1, round(W * scale)), max(1, round(H * scale))
        level = self.best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        damaged = np.zeros((lh, lw), bool)
        region = self.read_region_tolerant((0, 0), level, (lw, lh), damaged=damaged)
        if region.shape[:2] != (th, tw):
            region = np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
            if damaged.any():
                damaged = np.asarray(Image.fromarray(damaged).resize((tw, th), Image.Resampling.NEAREST))
            else:
                damaged = np.zeros((th, tw), bool)
        return (region, damaged) if with_damage else region

    def close(self) -> None:
        if self.segments is not None:
            self.segments.close()
            self.segments = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({str(self.path)!r}, backend={self.backend!r}, dimensions={self.dimensions}, "
                f"levels={self.level_count}, mpp={self.mpp})")


# ----------------------------------------------------------------------------- tifffile


def aligned_empty(shape: tuple, offset: int = 16) -> np.ndarray:
    """Empty uint8 array starting ``offset`` bytes past a 64-byte boundary.

    libjpeg-turbo (imagecodecs' build) decodes into 32-byte-aligned rows about 2x slower than into rows
    16 bytes off (measured here: 210 vs 113 us per 256 px tile); decode targets are laid out accordingly.
    """
    nbytes = int(np.prod(shape))
    raw = np.empty(nbytes + 64, np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return raw[start:start + nbytes].reshape(shape)


@contextlib.contextmanager
def _quiet_logger(name: str):
    """Silence a library's warnings (tifffile logs every broken IFD) while we turn them into SlideErrors."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _tiff_levels(tif) -> list:
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


class TiffSlide(Slide):
    """Tiled or stripped (pyramidal) TIFF via tifffile: compressed segments are read with ``os.pread``
    and decoded by imagecodecs (GIL released), so concurrent ``read_region`` calls are safe."""

    backend = "tifffile"
    cache_bytes = 64 << 20  # decoded segments kept for reads that do not match the file's tiles

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT):
        super().__init__(path, mpp)
        self._cache: collections.OrderedDict = collections.OrderedDict()  # (level, index) -> [th, tw, 3]
        self._cache_lock = threading.Lock()
        self._cached = 0
        import tifffile

        with _quiet_logger("tifffile"):
            try:
                self._tif = tifffile.TiffFile(str(path))
                pages = _tiff_levels(self._tif)
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
        self._mpp_meta = _tiff_mpp(self._pages[0])
        self._fd = os.open(str(path), os.O_RDONLY)
        self._jpeg: dict[int, dict | None] = {}
        for page in self._pages:  # everything lazy is loaded now: reader threads only pread + decode
            self._jpeg_args(page)
            _ = page.decode
        self._finish_init()

    @staticmethod
    def _segment_shape(page) -> tuple[int, int]:
        if page.is_tiled:
            return page.tilelength, page.tilewidth
        return page.rowsperstrip if page.rowsperstrip else page.imagelength, page.imagewidth

    def _jpeg_args(self, page) -> dict | None:
        """imagecodecs.jpeg8_decode arguments for 8-bit 3-sample JPEG pages (decoded straight into the
        caller's buffer), None for other pages (decoded by tifffile)."""
        key = id(page)
        if key not in self._jpeg:
            args = None
            if page.compression == 7 and page.bitspersample == 8 and page.samplesperpixel == 3 and page.planarconfig == 1:
                from tifffile.tifffile import jpeg_decode_colorspace

                colorspace, outcolorspace = jpeg_decode_colorspace(page.photometric, page.planarconfig, page.extrasamples, page.is_jfif)
                args = {"tables": page.jpegtables, "colorspace": colorspace, "outcolorspace": outcolorspace}
            self._jpeg[key] = args
        return self._jpeg[key]

    def _decode(self, page, index: int, out: np.ndarray | None = None) -> np.ndarray:
        """Segment ``index`` of ``page`` as uint8 [th, tw, 3] (into ``out`` when given: C-contiguous, that shape)."""
        data = os.pread(self._fd, page.databytecounts[index], page.dataoffsets[index])
        args = self._jpeg_args(page)
        try:
            if args is not None:
                import imagecodecs

                return imagecodecs.jpeg8_decode(data, out=out, **args)
            segment = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:
            raise DamagedTileError(self.path, self._pages.index(page), index, f"{type(exc).__name__}: {exc}") from exc
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
        out = aligned_empty((*self._segment_shape(page), 3)) if self._jpeg_args(page) is not None else None
        segment = self._decode(page, index, out=out)
        with self._cache_lock:
            if key not in self._cache:
                self._cache[key] = segment
                self._cached += segment.nbytes
                while self._cached > self.cache_bytes and self._cache:
                    self._cached -= self._cache.popitem(last=False)[1].nbytes
        return segment

    def read_segment(self, level: int, row: int, col: int) -> np.ndarray:
        """Decoded tile (row, col) of ``level`` [th, tw, 3] (edge tiles keep their padding)."""
        page = self._pages[level]
        th, tw = self._segment_shape(page)
        cols = -(-page.imagewidth // tw)
        return self._decode(page, row * cols + col)

    def tile_shape(self, level: int) -> tuple[int, int]:
        """(th, tw) of the compressed segments of ``level``."""
        return self._segment_shape(self._pages[level])

    def read_tiles(self, coords, level, size, out):
        """As :meth:`Slide.read_tiles`; tiles that are whole JPEG tiles of the file are decoded straight into
        ``out`` in a tight loop (no per-tile Python beyond the read and the decode call)."""
        page = self._pages[level]
        th, tw = self._segment_shape(page)
        args = self._jpeg_args(page)
        if args is None or (th, tw) != (size, size) or not out.flags.c_contiguous:
            return super().read_tiles(coords, level, size, out)
        factor = self.level_downsamples[level]
        gx, gy = np.round(coords[:, 0] / factor).astype(np.int64), np.round(coords[:, 1] / factor).astype(np.int64)
        lw, lh = self.level_dimensions[level]
        whole = (gx % tw == 0) & (gy % th == 0) & (gx >= 0) & (gy >= 0) & (gx + tw <= lw) & (gy + th <= lh)  # [B]
        index = (gy // th) * -(-lw // tw) + gx // tw
        offsets, counts = page.dataoffsets, page.databytecounts
        import imagecodecs

        decode, fd, damage = imagecodecs.jpeg8_decode, self._fd, self.segments.damage
        damaged: list[str | None] = [None] * len(coords)
        for i, (is_whole, k) in enumerate(zip(whole.tolist(), index.tolist())):
            try:
                if not is_whole:
                    self.read_region(tuple(coords[i].tolist()), level, (size, size), out=out[i])
                    continue
                reason = damage(level, k)  # checked on the compressed tile before its pixels are used
                if reason is not None:
                    raise DamagedTileError(self.path, level, k, reason)
                decode(os.pread(fd, counts[k], offsets[k]), out=out[i], **args)
            except DamagedTileError as exc:
                out[i] = 255
                damaged[i] = exc.problem
            except Exception as exc:  # noqa: BLE001 - a decoder error is a damaged tile
                out[i] = 255
                damaged[i] = DamagedTileError(self.path, level, k, f"{type(exc).__name__}: {exc}").problem
        return damaged

    def _read(self, x, y, level, w, h, out):
        page = self._pages[level]
        th, tw = self._segment_shape(page)
        cols = -(-page.imagewidth // tw)
        if x % tw == 0 and y % th == 0 and (w, h) == (tw, th) and out.flags.c_contiguous:
            self._decode(page, (y // th) * cols + x // tw, out=out)  # one whole tile: decode in place
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


# ----------------------------------------------------------------------------- OpenSlide


class OpenSlideSlide(Slide):
    """OpenSlide 4 (SVS, NDPI, MRXS, DICOM WSI, SCN, BIF, generic tiled TIFF, ...).

    OpenSlide reports a failed decode by raising, and its handle then fails every later read: the handle
    is reopened and the read retried once, so a damaged tile costs one tile, not the slide."""

    backend = "openslide"

    def __init__(self, path, mpp=None):
        super().__init__(path, mpp)
        import openslide

        self._reopen_lock = threading.Lock()
        try:
            with quiet_native_output():
                self._osr = openslide.OpenSlide(str(path))
        except Exception as exc:  # OpenSlideUnsupportedFormatError, OpenSlideError
            raise SlideError(path, f"OpenSlide cannot open it ({type(exc).__name__}: {exc})") from exc
        self.level_dimensions = [tuple(map(int, d)) for d in self._osr.level_dimensions]
        self.level_downsamples = [float(d) for d in self._osr.level_downsamples]
        props = self._osr.properties
        mpp_x = props.get(openslide.PROPERTY_NAME_MPP_X)
        self._mpp_meta = _tiff_file_mpp(path)  # same rule as the other backends for TIFF-based files
        if self._mpp_meta is None and mpp_x:
            self._mpp_meta = float(mpp_x)
        self._finish_init()

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


# ----------------------------------------------------------------------------- cuCIM


@contextlib.contextmanager
def quiet_cucim():
    """Silence cuCIM's cuFile layer while importing cuCIM / opening a file.

    On machines without a CUDA driver cuFile prints libcuda errors on stdout and writes ``cufile.log``
    into the working directory. ``CUFILE_LOGFILE_PATH`` only helps when set before torch loads
    libcufile, so the C-level stdout/stderr are captured for the duration (:func:`quiet_native_output`)
    and a ``cufile.log`` that appeared meanwhile is removed.
    """
    os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
    log = Path("cufile.log")
    had_log = log.exists()
    with quiet_native_output(stdout=True):
        try:
            yield
        finally:
            if not had_log:
                with contextlib.suppress(OSError):
                    log.unlink()


_quiet_cucim = quiet_cucim  # the name isg/__init__.py imports (until it uses the public one)


class CuCIMSlide(Slide):
    backend = "cucim"

    def __init__(self, path, mpp=None, device: str = "cpu"):
        super().__init__(path, mpp)
        try:
            with quiet_cucim():
                from cucim import CuImage

                self._image = CuImage(str(Path(path).resolve()))
        except Exception as exc:
            raise SlideError(path, f"cuCIM cannot open it ({type(exc).__name__}: {exc})") from exc
        resolutions = self._image.resolutions
        self.level_dimensions = [tuple(map(int, d)) for d in resolutions["level_dimensions"]]
        self.level_downsamples = [float(d) for d in resolutions["level_downsamples"]]
        self.device = device
        self._mpp_meta = _tiff_file_mpp(path)  # same rule as the other backends
        if self._mpp_meta is None:
            self._mpp_meta = self._metadata_mpp()
        self._finish_init()

    def _metadata_mpp(self) -> float | None:
        meta = self._image.metadata
        aperio = meta.get("aperio", {}) if isinstance(meta, dict) else {}
        if "MPP" in aperio:
            return float(aperio["MPP"])
        tiff = meta.get("tiff", {}) if isinstance(meta, dict) else {}
        unit = {"inch": 2, "centimeter": 3}.get(str(tiff.get("resolution_unit", "")).lower())
        return _plausible(mpp_from_resolution(tiff.get("x_resolution"), unit)) if unit else None

    @property
    def cuimage(self):
        """The underlying ``cucim.CuImage`` (batch reads: ``read_region(locations, size, level, batch_size, num_workers)``)."""
        return self._image

    def _read(self, x, y, level, w, h, out):
        location = self.backend_location(x, y, level)
        try:
            with quiet_native_output():  # cuCIM prints decoder errors and returns pixels: the segments decide
                region = self._image.read_region(location, (w, h), level)
        except Exception as exc:  # RuntimeError for compressions cuCIM does not decode, ...
            raise SlideError(self.path, f"cuCIM read failed at {location} level {level}: {exc}") from exc
        out[...] = np.asarray(region)[..., :3]

    def close(self):
        super().close()
        self._image.close()


# ----------------------------------------------------------------------------- plain images


class ImageSlide(Slide):
    """PNG / JPEG / ... decoded whole by Pillow: one level, for small inputs."""

    backend = "image"
    require_mpp = False  # read by pixel level; the outputs record an unknown mpp

    def __init__(self, path, mpp=None):
        super().__init__(path, mpp)
        from PIL import Image

        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise SlideError(path, f"{image.width}x{image.height} px is too large for the 'image' backend; "
                                           "convert it to a tiled pyramidal TIFF")
                dpi = image.info.get("dpi")
                if image.format == "JPEG":  # Pillow decodes damaged JPEG data into grey without failing
                    error = jpeg_error(Path(path).read_bytes())
                    if error:
                        raise SlideError(path, f"damaged image: corrupt JPEG data ({error})")
                image.load()
                self._pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        except SlideError:
            raise
        except Exception as exc:  # truncated files, PNG CRC errors, ...
            raise SlideError(path, f"not a readable image or damaged ({type(exc).__name__}: {exc})") from exc
        h, w = self._pixels.shape[:2]
        self.level_dimensions, self.level_downsamples = [(w, h)], [1.0]
        self._mpp_meta = _plausible(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._finish_init()

    def _read(self, x, y, level, w, h, out):
        out[...] = self._pixels[y:y + h, x:x + w]


# ----------------------------------------------------------------------------- entry point


def _cucim_available() -> bool:
    import importlib.util

    if importlib.util.find_spec("cucim") is None:
        return False
    try:
        with quiet_cucim():
            from cucim import CuImage  # noqa: F401
        return True
    except Exception:
        return False


def _openslide_available() -> bool:
    try:
        import openslide  # noqa: F401

        return True
    except Exception:
        return False


def _sniff(path: Path) -> str:
    """'tiff', 'image' or 'unknown' from the magic bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or head[:2] == b"BM" or head[:4] in (b"GIF8", b"RIFF"):
        return "image"
    return "unknown"


_CLASSES = {"cucim": CuCIMSlide, "openslide": OpenSlideSlide, "tifffile": TiffSlide, "image": ImageSlide}
SUPPORTED_SUFFIXES = tuple(sorted(set(OPENSLIDE_SUFFIXES + IMAGE_SUFFIXES + (".ome.tif", ".ome.tiff"))))


def _dicom_file(folder: Path) -> Path | None:
    """The first ``.dcm`` file of a DICOM WSI folder (OpenSlide finds the other instances beside it), else None."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    return files[0] if files else None


def open_slide(path, backend: str = "auto", mpp: float | None = None, max_damaged: float = DAMAGED_LIMIT) -> Slide:
    """Open a whole-slide image (a file, or the folder of a DICOM WSI).

    ``backend``: "auto" | "cucim" | "openslide" | "tifffile" | "image". ``mpp`` (um/px at level 0)
    overrides the metadata; without it a whole-slide file lacking mpp metadata raises :class:`SlideError`
    (plain images do not need one: their ``mpp`` is then None). ``max_damaged``: a TIFF with a larger
    fraction of the tiles of a level missing from the file (truncated) is rejected.
    Missing, corrupt, truncated, unsupported and too-small files raise :class:`SlideError` naming the file.
    """
    path = Path(path)
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"unknown slide backend {backend!r}; expected 'auto' or one of {', '.join(BACKENDS)}")
    if not path.exists():
        raise SlideError(path, "file not found")
    if path.is_dir() and _dicom_file(path) is not None:
        path = _dicom_file(path)
    if not path.is_file():
        raise SlideError(path, "not a file")
    if path.stat().st_size == 0:
        raise SlideError(path, "empty file")
    kind = _sniff(path)
    suffix = path.suffix.lower()
    if backend == "auto":
        if kind != "tiff" and suffix in CUCIM_SUFFIXES:
            raise SlideError(path, f"corrupt: a {suffix} file must start with a TIFF header, got {path.read_bytes()[:4]!r}")
        if kind == "tiff" and suffix != ".ndpi":
            backend = "tifffile"  # fastest reader of TIFF/SVS tiles, measured on real Aperio SVS (docs/io.md)
        elif kind == "image":
            backend = "image"
        elif suffix in OPENSLIDE_SUFFIXES and _openslide_available():
            backend = "openslide"
        elif kind == "tiff":
            backend = "tifffile"
        else:
            raise SlideError(path, f"unsupported format (suffix {suffix or 'none'!r}, not a TIFF or image file; "
                                   f"supported: {', '.join(SUPPORTED_SUFFIXES)})")
    if backend == "tifffile":
        return TiffSlide(path, mpp=mpp, max_damaged=max_damaged)
    if backend in ("cucim", "openslide") and kind == "tiff" and suffix != ".ndpi":
        # tifffile parses the header first: it validates the file (corrupt / truncated data) cheaply and its
        # segment index checks every tile the other backend decodes (cuCIM returns garbage for damaged tiles)
        tiff = TiffSlide(path, mpp=mpp, max_damaged=max_damaged)
        compression = int(tiff._pages[0].compression)
        segments = tiff.take_segments()
        tiff.close()
        if backend == "cucim" and compression not in CUCIM_COMPRESSIONS:  # cuCIM crashes the process on these
            segments.close()
            raise SlideError(path, f"cuCIM cannot decode TIFF compression {compression} (it decodes "
                                   f"{', '.join(map(str, CUCIM_COMPRESSIONS))}); use backend 'tifffile'")
        try:
            slide = _CLASSES[backend](path, mpp=mpp)
        except BaseException:
            segments.close()
            raise
        slide.segments = segments
        return slide
    return _CLASSES[backend](path, mpp=mpp)
