"""Damaged tiles: found in the file, reported as failures, never handed out as pixels.

A slide whose download was interrupted keeps intact headers over broken tile data. Decoders differ in
what they do with it: OpenSlide raises, cuCIM prints ``ERROR ... while decompressing JPEG image`` on the
terminal and returns grey or garbage blocks, imagecodecs decodes garbage without a word. Selection by
information content would then prefer the garbage. So isg checks the compressed tiles themselves:

* :class:`TiffSegments`: the tile (or strip) index of a TIFF pyramid. A segment is damaged when its
  data lies past the end of the file or is empty (truncated file), is all zero bytes (zeroed), or does
  not decode cleanly: JPEG tiles are decoded by libjpeg-turbo with its warnings treated as errors
  (:func:`decode_jpeg`: ``Corrupt JPEG data: premature end of data segment``, ``Unsupported marker
  type``, ...), other codecs by tifffile/imagecodecs, which raise on corrupt streams. Each segment is
  checked once per slide (results cached), whichever backend decodes its pixels; the tifffile backend's
  own strict decode is that check (:meth:`TiffSegments.record`), so its tiles are decoded once.
* :class:`DamagedTileError`: what :meth:`isg.io.Slide.read_region` raises for a region touching a
  damaged tile; :class:`DamagedTiles` collects the damaged tiles of a stream
  (:func:`isg.io.iter_tiles` with ``damaged=``) so that callers can skip them.
* :func:`quiet_native_output`: decoder libraries (cuCIM, libtiff, nvImageCodec) print on the process's
  C-level stdout/stderr; inside this context those lines are captured, counted
  (:func:`native_messages`) and logged at DEBUG level on the ``isg.io`` logger, while Python's own
  ``sys.stderr`` (progress bars, warnings) still reaches the terminal.

Corruption that leaves a JPEG stream decodable without any error (random bytes that happen to form
valid Huffman codes) cannot be told from image data by any decoder; every other case above is caught.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from isg.utils import quiet_native_output  # noqa: F401 - re-exported: decoder output of every reader

DAMAGED_LIMIT = 0.05  # default: a slide with a larger fraction of damaged patches (or level tiles) fails

log = logging.getLogger("isg.io")


class SlideError(ValueError):
    """A slide that cannot be used: the message names the file and the problem."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DamagedTileError(SlideError):
    """A read touched a damaged tile: ``level``, ``index`` (segment of that level, -1 if unknown), ``reason``."""

    def __init__(self, path, level: int, index: int, reason: str):
        self.level, self.index, self.reason = level, index, reason
        where = f"tile {index} of level {level}" if index >= 0 else f"a tile of level {level}"
        super().__init__(path, f"corrupt {where}: {reason}")


class DamagedSlideError(SlideError):
    """Too many damaged tiles (``n_damaged`` of ``n_total``) for the slide to be used."""

    def __init__(self, path, problem: str, n_damaged: int, n_total: int):
        self.n_damaged, self.n_total = n_damaged, n_total
        super().__init__(path, problem)


class DamagedTiles:
    """Damaged tiles met by a tile stream: level-0 ``coords`` int64 [D, 2] and one ``reasons`` string each."""

    def __init__(self):
        self._coords: list[tuple[int, int]] = []
        self.reasons: list[str] = []
        self._lock = threading.Lock()

    def add(self, xy, reason: str) -> None:
        with self._lock:
            self._coords.append((int(xy[0]), int(xy[1])))
            self.reasons.append(reason)

    @property
    def coords(self) -> np.ndarray:
        return np.asarray(self._coords, np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._coords)

    def summary(self, limit: int = 3) -> str:
        """``(x, y): reason`` of the first ``limit`` tiles."""
        shown = "; ".join(f"({x}, {y}): {r}" for (x, y), r in zip(self._coords[:limit], self.reasons[:limit]))
        return shown + (f"; ... {len(self) - limit} more" if len(self) > limit else "")


# ----------------------------------------------------------------------------- strict decoding

ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # APP14, transform 0: the components are R, G, B


def decode_jpeg(stream, out: np.ndarray | None = None, gray: bool = False) -> np.ndarray:
    """Decode the complete JPEG ``stream`` with libjpeg-turbo (simplejpeg; the GIL is released), strictly:
    its errors *and* warnings raise ``ValueError`` with libjpeg's message. RGB uint8 [h, w, 3] (grey [h, w, 1]
    with ``gray``), into ``out`` when given (C-contiguous, that shape)."""
    import simplejpeg  # lazily: isg.io imports without it

    return simplejpeg.decode_jpeg(stream, colorspace="GRAY" if gray else "RGB", buffer=out, strict=True)


def jpeg_error(stream: bytes) -> str | None:
    """None when the JPEG ``stream`` decodes cleanly, else libjpeg-turbo's message: errors and warnings alike.

    libjpeg reports corrupt data mostly as *warnings* (``Corrupt JPEG data: premature end of data segment``,
    ``bad Huffman code``, ``extraneous bytes``) while decoding goes on with garbage; :func:`decode_jpeg`
    turns them into errors of this call (nothing is printed, threads do not mix their messages).
    """
    try:
        decode_jpeg(stream, gray=True)
    except ValueError as exc:
        return str(exc).strip() or "undecodable JPEG"
    return None


class TiffSegments:
    """The compressed segments (tiles or strips) of the levels of a TIFF pyramid, and their damage.

    ``pages``: tifffile pages, finest first (one per level). The file is read with ``os.pread`` on its
    own descriptor (thread-safe); :meth:`close` releases it.
    """

    def __init__(self, path, pages):
        self.path = Path(path)
        self.size = os.path.getsize(path)
        self.fd = os.open(path, os.O_RDONLY)
        self.pages = list(pages)
        self._checked: dict[tuple[int, int], str | None] = {}
        self._heads: dict[int, bytes] = {}
        self.structural: list[dict[int, str]] = []  # per level: index -> reason (found from the index alone)
        for level, page in enumerate(self.pages):
            damaged = {}
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                if count == 0 or offset == 0:
                    damaged[index] = "no data (empty tile)"
                elif offset + count > self.size:
                    damaged[index] = f"data past the end of the file (bytes {offset}..{offset + count}, file has {self.size})"
            listed = min(len(page.dataoffsets), len(page.databytecounts))
            for index in range(listed, self.count(level)):  # a tile index cut short (truncated file)
                damaged[index] = f"not in the file's tile index ({listed} of {self.count(level)} tiles listed)"
            self.structural.append(damaged)

    def shape(self, level: int) -> tuple[int, int]:
        """(th, tw) of the segments of ``level``."""
        page = self.pages[level]
        if page.is_tiled:
            return page.tilelength, page.tilewidth
        return (page.rowsperstrip or page.imagelength), page.imagewidth

    def count(self, level: int) -> int:
        """Segments of ``level`` by its geometry (a truncated file may list fewer)."""
        th, tw = self.shape(level)
        page = self.pages[level]
        return -(-page.imagelength // th) * -(-page.imagewidth // tw)

    def indices(self, level: int, x: int, y: int, w: int, h: int) -> list[int]:
        """Segments of ``level`` that the in-bounds rectangle (x, y, w, h) at that level touches."""
        th, tw = self.shape(level)
        cols = -(-self.pages[level].imagewidth // tw)
        return [row * cols + col for row in range(y // th, (y + h - 1) // th + 1)
                for col in range(x // tw, (x + w - 1) // tw + 1)]

    def read(self, level: int, index: int) -> bytes:
        page = self.pages[level]
        return os.pread(self.fd, page.databytecounts[index], page.dataoffsets[index])

    def jpeg_head(self, level: int) -> bytes:
        """What precedes a JPEG segment's own markers (after its SOI) in a complete, self-describing stream:
        SOI, an Adobe marker saying "RGB" for RGB-coded tiles (Aperio writes them without one, and
        decoders would read them as YCbCr), and the shared JPEGTables of the page."""
        head = self._heads.get(level)
        if head is None:
            page = self.pages[level]
            tables = bytes(page.jpegtables)[2:-2] if page.jpegtables else b""  # without their SOI / EOI
            head = b"\xff\xd8" + (ADOBE_RGB if page.photometric == 2 and not page.is_jfif else b"") + tables
            self._heads[level] = head
        return head

    def jpeg_stream(self, level: int, index: int, data: bytes | None = None) -> bytes:
        """Complete JPEG stream of a segment: :meth:`jpeg_head` + the segment's markers and data."""
        data = self.read(level, index) if data is None else data
        return self.jpeg_head(level) + data[2:] if data[:2] == b"\xff\xd8" else data

    def record(self, level: int, index: int, reason: str | None) -> None:
        """Record what a decode of segment ``index`` found (None: clean), so that it is not checked again."""
        self._checked[(level, index)] = reason

    def known(self, level: int, index: int) -> str | None:
        """The damage of segment ``index`` found so far without decoding it: recorded, or in the file's index."""
        return self._checked.get((level, index)) or self.structural[level].get(index)

    def damage(self, level: int, index: int) -> str | None:
        """Why segment ``index`` of ``level`` is damaged, or None when it decodes cleanly (checked once)."""
        key = (level, index)
        if key in self._checked:
            return self._checked[key]
        reason = self.structural[level].get(index)
        if reason is None:
            reason = self._check_data(level, index)
        self._checked[key] = reason
        return reason

    def _check_data(self, level: int, index: int) -> str | None:
        page = self.pages[level]
        data = self.read(level, index)
        if len(data) < page.databytecounts[index]:
            return f"data past the end of the file ({len(data)} of {page.databytecounts[index]} bytes)"
        if not data.strip(b"\x00"):
            return "zeroed (all bytes 0)"
        if page.compression == 7:  # JPEG
            error = jpeg_error(self.jpeg_stream(level, index, data))
            return f"corrupt JPEG data ({error})" if error else None
        if page.compression == 1:  # uncompressed: nothing more to check
            return None
        try:
            page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as exc:  # noqa: BLE001 - any codec error means the segment is unusable
            return f"corrupt {page.compression.name if hasattr(page.compression, 'name') else page.compression} data ({exc})"
        return None

    def region_damage(self, level: int, x: int, y: int, w: int, h: int) -> tuple[int, str] | None:
        """(index, reason) of the first damaged segment under the in-bounds rectangle, or None."""
        for index in self.indices(level, x, y, w, h):
            reason = self.damage(level, index)
            if reason is not None:
                return index, reason
        return None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
