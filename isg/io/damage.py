"""Damaged tiles: found in the file, reported as failures, never handed out as pixels.

A slide whose download was interrupted keeps intact headers over broken tile data. Decoders differ in
what they do with it: OpenSlide raises, cuCIM prints ``ERROR ... while decompressing JPEG image`` on the
terminal and returns grey or garbage blocks, imagecodecs decodes garbage without a word. Selection by
information content would then prefer the garbage. So isg checks the compressed tiles themselves:

* :class:`TiffSegments`: the tile (or strip) index of a TIFF pyramid. A segment is damaged when its
  data lies past the end of the file or is empty (truncated file), is all zero bytes (zeroed), or does
  not decode cleanly: JPEG tiles are decoded by libjpeg-turbo with its warnings treated as errors
  (``Corrupt JPEG data: premature end of data segment``, ``Unsupported marker type``, ...), other
  codecs by tifffile/imagecodecs, which raise on corrupt streams. Each segment is checked once per
  slide (results cached), whichever backend decodes its pixels.
* :class:`DamagedTileError`: what :meth:`isg.io.Slide.read_region` raises for a region touching a
  damaged tile; :class:`DamagedTiles` collects the damaged tiles of a stream
  (:func:`isg.io.iter_tiles` with ``damaged=``) so that callers can skip them.
* :func:`quiet_native_output`: decoder libraries (cuCIM, libtiff, libjpeg) print on the process's
  C-level stdout/stderr; inside this context those lines are captured, counted
  (:func:`native_messages`) and logged at DEBUG level on the ``isg.io`` logger, while Python's own
  ``sys.stderr`` (progress bars, warnings) still reaches the terminal.

Corruption that leaves a JPEG stream decodable without any error (random bytes that happen to form
valid Huffman codes) cannot be told from image data by any decoder; every other case above is caught.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

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

def _decode_jpeg(stream: bytes) -> str | None:
    """Decode ``stream`` to grey with torchvision's libjpeg-turbo operator; its error message, or None."""
    import torch
    from torchvision.io import ImageReadMode  # also registers torch.ops.image

    try:  # the operator itself: torchvision's Python face warns that its codecs move to TorchCodec
        torch.ops.image.decode_jpeg(torch.frombuffer(bytearray(stream), dtype=torch.uint8), ImageReadMode.GRAY.value, False)
    except RuntimeError as exc:
        return str(exc).rsplit(", ", 1)[-1].strip() or "undecodable JPEG"
    return None


class _SharedExclusive:
    """A readers-writer lock: many shared holders at once, or one exclusive holder alone."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False

    @contextlib.contextmanager
    def shared(self):
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self):
        with self._cond:
            while self._exclusive:
                self._cond.wait()
            self._exclusive = True
            while self._shared:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


_DECODES = _SharedExclusive()


def jpeg_error(stream: bytes) -> str | None:
    """None when the JPEG ``stream`` decodes cleanly, else libjpeg-turbo's message: errors and warnings alike.

    libjpeg reports corrupt data mostly as *warnings* (``Corrupt JPEG data: premature end of data
    segment``, ``bad Huffman code``, ``extraneous bytes``), printed on stderr while decoding goes on with
    garbage. The decode therefore runs with the C-level stderr captured; decodes run concurrently
    (shared), and when anything was printed meanwhile the stream is decoded again alone (exclusive), so
    that the message is attributed to the stream that caused it.
    """
    with quiet_native_output():
        with _DECODES.shared():
            before = _NativeOutput.stderr_size()
            error = _decode_jpeg(stream)
            printed = _NativeOutput.stderr_size() != before
        if error or not printed:
            return error
        with _DECODES.exclusive():
            before = _NativeOutput.stderr_size()
            error = _decode_jpeg(stream)
            text = _NativeOutput.stderr_since(before).strip()
        return error or (text.splitlines()[0] if text else None)


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
        self.structural: list[dict[int, str]] = []  # per level: index -> reason (found from the index alone)
        for page in self.pages:
            damaged = {}
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                if count == 0 or offset == 0:
                    damaged[index] = "no data (empty tile)"
                elif offset + count > self.size:
                    damaged[index] = f"data past the end of the file (bytes {offset}..{offset + count}, file has {self.size})"
            self.structural.append(damaged)

    def shape(self, level: int) -> tuple[int, int]:
        """(th, tw) of the segments of ``level``."""
        page = self.pages[level]
        if page.is_tiled:
            return page.tilelength, page.tilewidth
        return (page.rowsperstrip or page.imagelength), page.imagewidth

    def count(self, level: int) -> int:
        return len(self.pages[level].dataoffsets)

    def indices(self, level: int, x: int, y: int, w: int, h: int) -> list[int]:
        """Segments of ``level`` that the in-bounds rectangle (x, y, w, h) at that level touches."""
        th, tw = self.shape(level)
        cols = -(-self.pages[level].imagewidth // tw)
        return [row * cols + col for row in range(y // th, (y + h - 1) // th + 1)
                for col in range(x // tw, (x + w - 1) // tw + 1)]

    def read(self, level: int, index: int) -> bytes:
        page = self.pages[level]
        return os.pread(self.fd, page.databytecounts[index], page.dataoffsets[index])

    def jpeg_stream(self, level: int, index: int, data: bytes | None = None) -> bytes:
        """Complete JPEG stream of a segment (shared JPEGTables spliced into abbreviated tile streams)."""
        data = self.read(level, index) if data is None else data
        tables = self.pages[level].jpegtables
        return bytes(tables[:-2]) + data[2:] if tables and data[:2] == b"\xff\xd8" else data

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


# ----------------------------------------------------------------------------- native output


class _NativeOutput:
    """Process-wide, reference-counted redirection of the C-level stdout (1) / stderr (2) to temp files.

    Nested and concurrent users (threads reading several slides) share one redirection per descriptor;
    the last one to leave restores it, counts the captured lines and logs them.
    """

    lock = threading.RLock()
    depth = {1: 0, 2: 0}
    saved: dict[int, int] = {}
    sinks: dict[int, object] = {}
    python_stderr = None  # sys.stderr before the redirection
    visible_stderr = None  # a text stream on the terminal's stderr, for Python output meanwhile
    messages = 0

    @classmethod
    def enter(cls, fd: int) -> None:
        with cls.lock:
            if cls.depth[fd] == 0:
                stream = sys.stdout if fd == 1 else sys.stderr
                if stream is not None:
                    stream.flush()
                cls.saved[fd] = os.dup(fd)
                sink = tempfile.TemporaryFile()
                os.dup2(sink.fileno(), fd)
                cls.sinks[fd] = sink
                if fd == 2:
                    cls._keep_python_stderr_visible()
            cls.depth[fd] += 1

    @classmethod
    def _keep_python_stderr_visible(cls) -> None:
        try:
            is_fd2 = sys.stderr is not None and sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # pytest's capture and the like: leave it alone
            is_fd2 = False
        if not is_fd2:
            return
        if cls.visible_stderr is None:  # one stream on a duplicate of the terminal, kept for the process
            cls.visible_stderr = io.TextIOWrapper(os.fdopen(os.dup(cls.saved[2]), "wb", buffering=0),
                                                  encoding=sys.stderr.encoding, errors="backslashreplace",
                                                  line_buffering=True, write_through=True)
        cls.python_stderr, sys.stderr = sys.stderr, cls.visible_stderr

    @classmethod
    def stderr_size(cls) -> int:
        """Bytes captured from fd 2 so far in the current redirection (call inside it)."""
        with cls.lock:
            return os.fstat(cls.sinks[2].fileno()).st_size

    @classmethod
    def stderr_since(cls, offset: int) -> str:
        with cls.lock:
            sink = cls.sinks[2].fileno()
            return os.pread(sink, os.fstat(sink).st_size - offset, offset).decode("utf-8", "replace")

    @classmethod
    def leave(cls, fd: int) -> None:
        with cls.lock:
            cls.depth[fd] -= 1
            if cls.depth[fd]:
                return
            if fd == 2 and cls.python_stderr is not None:
                sys.stderr.flush()
                sys.stderr, cls.python_stderr = cls.python_stderr, None
            saved = cls.saved.pop(fd)
            os.dup2(saved, fd)
            os.close(saved)
            sink = cls.sinks.pop(fd)
            sink.seek(0)
            lines = [line for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip()]
            sink.close()
            cls.messages += len(lines)
            for line in lines:
                log.debug("native %s: %s", "stdout" if fd == 1 else "stderr", line)


@contextlib.contextmanager
def quiet_native_output(stdout: bool = False):
    """Capture what C libraries print on stderr (and on stdout when ``stdout``) for the duration.

    Process-wide and reference-counted: safe to nest and to use from several threads at once. Captured
    lines are counted (:func:`native_messages`) and logged at DEBUG level on the ``isg.io`` logger.
    """
    fds = (2, 1) if stdout else (2,)
    for fd in fds:
        _NativeOutput.enter(fd)
    try:
        yield
    finally:
        for fd in reversed(fds):
            _NativeOutput.leave(fd)


def native_messages() -> int:
    """Lines that C libraries printed inside :func:`quiet_native_output` so far (this process)."""
    return _NativeOutput.messages
