"""The :class:`Slide` interface every backend implements, and :class:`TileReader`, how batches of tiles are read.

A backend is one module of :mod:`isg.io.backends` holding one :class:`Slide` subclass, registered with
:func:`isg.io.registry.register_backend` (name, suffixes, availability probe); :func:`isg.io.open_slide`
is the one factory. Every backend returns the same pixels: RGB uint8, and regions reaching past the slide
border are padded white (255). Damaged tiles (see :mod:`isg.io.damage`) are failures on every backend: a
region touching one raises :class:`DamagedTileError`, never pixels.

Batches of tiles (:func:`isg.io.iter_tiles`) are read through ``slide.tile_reader(level, size, device,
num_workers)``: a :class:`TileReader` that fills a batch buffer on its ``device``. The default,
:class:`HostTileReader`, calls :meth:`Slide.read_tiles` on parts of the batch from the stream's threads;
a backend with its own batch reader (cuCIM's, nvImageCodec's device decode) returns its own reader.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from isg.io.damage import DamagedTileError, SlideError, TiffSegments

MIN_SLIDE_SIZE = 64  # px per side at level 0; smaller files are rejected as "too small"
THUMBNAIL_DIRECT_BYTES = 64 << 20  # a thumbnail's source level larger than this is streamed in blocks
# Scales within this relative difference are one scale: a 20x Aperio level at 0.499 or 0.504 um/px is the level
# for 0.5 um/px and read as is (no 257 -> 256 px resampling), and a cohort mixing them is one scale
# (isg.pipeline.scale.scale_mix).
MPP_TOLERANCE = 0.02


def aligned_empty(shape: tuple, offset: int = 16) -> np.ndarray:
    """Empty uint8 array starting ``offset`` bytes past a 64-byte boundary.

    libjpeg-turbo decodes into 32-byte-aligned rows of 256 px tiles about 2x slower than into rows 16 bytes
    off (measured here: 210 vs 113 us per 256 px tile); decode targets are laid out accordingly.
    """
    nbytes = int(np.prod(shape))
    raw = np.empty(nbytes + 64, np.uint8)
    start = (offset - raw.ctypes.data) % 64
    return raw[start:start + nbytes].reshape(shape)


class TileReader:
    """Reads batches of ``size`` px tiles of one level of a slide into buffers on :attr:`device`.

    ``read(coords int64 [B, 2] level-0, out torch.uint8 [B, size, size, 3] on device)`` fills ``out`` (each
    tile exactly ``slide.read_region(coords[i], level, (size, size))``) and returns, per tile, None or why it
    is damaged (its pixels are then not to be used). With :attr:`parallel` the stream may call ``read`` on
    parts of one batch from several threads at once; otherwise the reader parallelises itself.
    """

    device = "cpu"
    parallel = False

    def __init__(self, slide: "Slide", level: int, size: int):
        self.slide, self.level, self.size = slide, level, size

    def read(self, coords: np.ndarray, out) -> list[str | None]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostTileReader(TileReader):
    """Tiles decoded on the host by :meth:`Slide.read_tiles`, thread-safe: the stream's threads share a batch."""

    parallel = True

    def read(self, coords, out):
        return self.slide.read_tiles(coords, self.level, self.size, out.numpy())


class Slide:
    """A multi-resolution slide. Subclasses fill the attributes and implement ``_read``.

    Attributes: ``path``, ``backend``, ``dimensions`` (W, H) at level 0, ``level_count``,
    ``level_dimensions`` [(W, H)], ``level_downsamples`` [float], ``mpp`` (um/px at level 0, None when
    unknown: only slides whose class does not ``require_mpp``), ``segments`` (the
    :class:`~isg.io.damage.TiffSegments` of a TIFF file, whose damage every read checks; None otherwise).
    """

    backend = ""
    require_mpp = True  # whole-slide formats must carry a calibration (or be given one)
    decodes_at_open = False  # True: opening decodes the whole file (its cost belongs to every read figure)

    def __init__(self, path, mpp: float | None = None):
        self.path = Path(path)
        self._mpp_override = mpp
        self.level_dimensions: list[tuple[int, int]] = []
        self.level_downsamples: list[float] = []
        self._mpp_meta: float | None = None
        self.segments: TiffSegments | None = None

    # -- filled by subclasses
    def tile_reader(self, level: int, size: int, device="cpu", num_workers: int = 0) -> TileReader:
        """How :func:`isg.io.iter_tiles` reads batches of this slide for ``device`` (see :class:`TileReader`)."""
        return HostTileReader(self, level, size)

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
        """The coarsest level whose resolution is at least as fine as ``mpp`` (within :data:`MPP_TOLERANCE`); 0 if none."""
        if self.mpp is None:
            raise SlideError(self.path, f"reading at {mpp} um/px needs the slide's mpp, which its metadata lacks; "
                                        "give it (--slide-mpp or --mpp-csv) or read by --level")
        best = 0
        for level in range(self.level_count):
            if self.level_mpp(level) <= mpp * (1 + MPP_TOLERANCE):
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

        Pixels outside the slide are white (255). ``out`` (uint8 [h, w, 3]) is filled in place when given (and
        holds nothing to use when a :class:`DamagedTileError` is raised).
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
                    out[y0 - y:y1 - y, x0 - x:x1 - x] = 255  # a failed decode may have written part of it
                    if damaged is not None:
                        damaged[y0 - y:y1 - y, x0 - x:x1 - x] = True
        return out

    def thumbnail(self, max_size: int = 1024, with_damage: bool = False):
        """RGB uint8 [h, w, 3] of the whole slide, longest side ``max_size`` (never upscaled), box-filtered
        from the coarsest level that is at least that fine. Damaged tiles are painted white; ``with_damage``
        returns ``(thumbnail, damaged bool [h, w])`` marking them.

        A level larger than :data:`THUMBNAIL_DIRECT_BYTES` (a single-level 10^5 px TIFF: 28 GiB) is streamed:
        the thumbnail is made block by block of output pixels, each from the level pixels under it
        (:meth:`_boxed_level`), so memory is one block and the thumbnail, and the pixels are the direct ones.
        """
        from PIL import Image

        W, H = self.dimensions
        scale = min(1.0, max_size / max(W, H))
        tw, th = max(1, round(W * scale)), max(1, round(H * scale))
        level = self.best_level_for_downsample(1.0 / scale)
        lw, lh = self.level_dimensions[level]
        if lw * lh * 3 > THUMBNAIL_DIRECT_BYTES and (lw, lh) != (tw, th):
            region, damaged = self._boxed_level(level, tw, th)
        else:
            damaged = np.zeros((lh, lw), bool)
            region = self.read_region_tolerant((0, 0), level, (lw, lh), damaged=damaged)
        if region.shape[:2] != (th, tw):
            region = np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
            if damaged.any():
                damaged = np.asarray(Image.fromarray(damaged).resize((tw, th), Image.Resampling.NEAREST))
            else:
                damaged = np.zeros((th, tw), bool)
        return (region, damaged) if with_damage else region

    def _boxed_level(self, level: int, tw: int, th: int, block: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """``level`` box-filtered to (th, tw), made in blocks of output pixels about ``block`` level pixels wide:
        each block reads the level pixels under it (and one more at fractional edges) and is resized with
        Pillow's ``box=`` (the fractional source window), the filter a whole-level resize applies to the same
        output pixels. Returns (uint8 [th, tw, 3], damaged bool [th, tw])."""
        from PIL import Image

        lw, lh = self.level_dimensions[level]
        sx, sy = lw / tw, lh / th  # level pixels per output pixel
        out = np.empty((th, tw, 3), np.uint8)
        damaged = np.zeros((th, tw), bool)
        step_x, step_y = max(1, int(block / sx)), max(1, int(block / sy))  # output pixels per block
        downsample = self.level_downsamples[level]
        for i0 in range(0, th, step_y):
            i1 = min(th, i0 + step_y)
            y0, y1 = i0 * sy, i1 * sy
            top, bottom = int(math.floor(y0)), min(lh, int(math.ceil(y1)))
            for j0 in range(0, tw, step_x):
                j1 = min(tw, j0 + step_x)
                x0, x1 = j0 * sx, j1 * sx
                left, right = int(math.floor(x0)), min(lw, int(math.ceil(x1)))
                hit = np.zeros((bottom - top, right - left), bool)
                region = self.read_region_tolerant((round(left * downsample), round(top * downsample)), level,
                                                   (right - left, bottom - top), damaged=hit)
                box = (x0 - left, y0 - top, x1 - left, y1 - top)  # the fractional window in this region
                out[i0:i1, j0:j1] = np.asarray(Image.fromarray(region).resize((j1 - j0, i1 - i0), Image.Resampling.BOX, box=box))
                if hit.any():
                    damaged[i0:i1, j0:j1] = np.asarray(Image.fromarray(hit).resize((j1 - j0, i1 - i0), Image.Resampling.NEAREST,
                                                                                    box=box))
        return out, damaged

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
