"""Cold reader throughput, measured the way a user's first pass over a slide runs, and its physical ceiling.

* :func:`cold_tiles_per_s`: tiles/s of one reader over passes that each open a **fresh** slide object (setup,
  not timed: no decoded-tile cache, no warm reader state carries over) and read **distinct** tiles, each once
  (:func:`split_passes`: disjoint subsets of tiles spread over the tissue). The median pass is reported.
* :func:`ceiling_tiles_per_s`: libjpeg-turbo decoding the same compressed tiles from bytes already in
  memory, one thread, into one reused buffer (the complete streams are built first, untimed: JPEGTables
  spliced in, Aperio's RGB-coded tiles marked RGB). Both of the installed libjpeg-turbo bindings are timed
  (imagecodecs' ``jpeg8_decode``, simplejpeg) and the faster one is the ceiling.
* The OS page cache is stated, never implied: ``page_cache="warm"`` reads the file once before measuring
  (:func:`warm_page_cache`; realistic for a slide read twice, and when the file fits in memory),
  ``"dropped"`` evicts its pages before every pass (:func:`evict_page_cache`, ``posix_fadvise``): the
  storage is then part of the figure.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PAGE_CACHE = ("warm", "dropped")


def _files(path) -> list[Path]:
    """The file, or the files of a folder (a DICOM WSI)."""
    path = Path(path)
    return sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]


def warm_page_cache(path) -> None:
    """Read the whole file (every file of a folder) once so that its pages are in the OS page cache."""
    for file in _files(path):
        with open(file, "rb", buffering=0) as handle:
            while handle.read(16 << 20):
                pass


def evict_page_cache(path) -> None:
    """Ask the OS to drop the file's (folder's files') pages from its page cache (clean pages go; the next
    read hits storage)."""
    for file in _files(path):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def split_passes(coords: np.ndarray, passes: int) -> list[np.ndarray]:
    """``passes`` disjoint subsets of ``coords`` [N, 2] (every ``passes``-th tile from a different start), each
    spread over all of them; with fewer tiles than passes, the subsets repeat."""
    passes = max(1, passes)
    if len(coords) < passes:
        return [coords] * passes
    return [coords[start::passes] for start in range(passes)]


def cold_tiles_per_s(open_reader: Callable, read: Callable, passes: list[np.ndarray], path=None,
                     page_cache: str = "warm", sync: Callable | None = None, time_open: bool = False) -> dict:
    """Median tiles/s of ``read(reader, coords)`` over ``passes`` (coords [n, 2] each), a fresh
    ``open_reader()`` per pass (closed after it; timed only with ``time_open``, for readers that decode the
    whole file when they open it). ``path``: the file whose pages ``page_cache`` concerns. Returns
    ``{"tiles_per_s", "passes" (tiles/s of each), "open_seconds" (median), "cpu_us_per_tile" (process CPU
    time per tile, median: robust to other load on the machine for one-thread readers)}``."""
    if page_cache not in PAGE_CACHE:
        raise ValueError(f"page_cache must be one of {', '.join(PAGE_CACHE)}, got {page_cache!r}")
    if page_cache == "warm" and path is not None:
        warm_page_cache(path)
    rates, opens, cpu = [], [], []
    for coords in passes:
        if page_cache == "dropped" and path is not None:
            evict_page_cache(path)
        opened, opened_cpu = time.perf_counter(), time.process_time()
        reader = open_reader()
        opens.append(time.perf_counter() - opened)
        try:
            start, start_cpu = (opened, opened_cpu) if time_open else (time.perf_counter(), time.process_time())
            read(reader, coords)
            if sync is not None:
                sync()
            rates.append(len(coords) / (time.perf_counter() - start))
            cpu.append((time.process_time() - start_cpu) / max(1, len(coords)) * 1e6)
        finally:
            close = getattr(reader, "close", None)
            if close is not None:
                close()
    return {"tiles_per_s": statistics.median(rates), "passes": [round(r, 1) for r in rates],
            "open_seconds": statistics.median(opens), "cpu_us_per_tile": round(statistics.median(cpu), 1)}


def tile_streams(slide, coords: np.ndarray, level: int) -> list[bytes] | None:
    """Complete JPEG streams of the file tiles under the level-0 ``coords`` (each tile once), or None when
    ``level`` of the slide is not made of 8-bit RGB/YCbCr JPEG tiles with a segment index."""
    segments = getattr(slide, "segments", None)
    if segments is None:
        return None
    page = segments.pages[level]
    if page.compression != 7 or page.bitspersample != 8 or page.samplesperpixel != 3 or page.photometric not in (2, 6):
        return None
    th, tw = segments.shape(level)
    lw, lh = slide.level_dimensions[level]
    indices: dict[int, None] = {}
    for x, y in (slide.to_level(xy, level) for xy in coords.tolist()):
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + tw, lw), min(y + th, lh)
        if x0 < x1 and y0 < y1:
            indices.update(dict.fromkeys(segments.indices(level, x0, y0, x1 - x0, y1 - y0)))
    return [segments.jpeg_stream(level, index) for index in indices]


def ceiling_tiles_per_s(slide, passes: list[np.ndarray], level: int) -> dict | None:
    """The physical ceiling of reading the tiles of ``passes``: libjpeg-turbo decoding their file tiles' streams
    from memory, one thread, each once, median over the passes as for the readers, in requested tiles per
    second. None when the tiles are not JPEG (see :func:`tile_streams`)."""
    import imagecodecs
    import simplejpeg

    from isg.io.slide import aligned_empty

    streams = [tile_streams(slide, coords, level) for coords in passes]
    if not all(streams):
        return None
    th, tw = slide.segments.shape(level)
    out = aligned_empty((th, tw, 3))  # the layout the readers decode into
    decoders = {
        "imagecodecs.jpeg8_decode": lambda stream: imagecodecs.jpeg8_decode(stream, out=out),
        "simplejpeg.decode_jpeg": lambda stream: simplejpeg.decode_jpeg(stream, buffer=out, strict=False),
    }
    rates: dict[str, float] = {}
    cpu: dict[str, float] = {}
    for name, decode in decoders.items():
        decode(streams[0][0])  # lazy initialisation
        per_pass, per_pass_cpu = [], []
        for coords, pass_streams in zip(passes, streams):
            start, start_cpu = time.perf_counter(), time.process_time()
            for stream in pass_streams:
                decode(stream)
            per_pass.append(len(coords) / (time.perf_counter() - start))
            per_pass_cpu.append((time.process_time() - start_cpu) / len(coords) * 1e6)
        rates[name], cpu[name] = statistics.median(per_pass), statistics.median(per_pass_cpu)
    name = max(rates, key=rates.get)
    files_per_tile = sum(len(p) for p in streams) / sum(len(c) for c in passes)
    return {"tiles_per_s": rates[name], "decoder": f"libjpeg-turbo ({name}), 1 thread, from memory",
            "cpu_us_per_tile": round(cpu[name], 1), "file_tiles_per_tile": round(files_per_tile, 3),
            "bindings": {k: round(v, 1) for k, v in rates.items()}}
