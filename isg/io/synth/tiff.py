"""Pyramidal JPEG TIFFs of synthetic slides: written whole (:func:`write_pyramid_tiff`) or streamed tile by tile
from level-0 strips in bounded memory (:func:`write_streamed_pyramid`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import cv2
import numpy as np

from isg.utils import atomic_path

__all__ = ["pyramid", "pyramid_shapes", "write_pyramid_tiff", "write_streamed_pyramid"]



def pyramid(image: np.ndarray, tile: int, downsample: int = 4) -> list[np.ndarray]:
    """Levels [image, image/d, image/d^2, ...] (INTER_AREA) while the shorter side stays >= ``tile``."""
    levels = [image]
    while min(levels[-1].shape[:2]) // downsample >= tile:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // downsample, h // downsample), interpolation=cv2.INTER_AREA))
    return levels


def pyramid_shapes(height: int, width: int, tile: int, downsample: int = 4) -> list[tuple[int, int]]:
    """(height, width) of every level :func:`pyramid` makes, without the pixels."""
    shapes = [(height, width)]
    while min(shapes[-1]) // downsample >= tile:
        shapes.append((shapes[-1][0] // downsample, shapes[-1][1] // downsample))
    return shapes


def _page_options(level: int, width: int, shape0: tuple[int, int], mpp: float | None, tile: int, quality: int,
                  description: bool) -> dict:
    """tifffile.write options of one pyramid page (level 0 full resolution, reduced levels subfiletype 1)."""
    H0, W0 = shape0
    options = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                   subfiletype=1 if level else 0, metadata=None)
    if mpp is not None:
        level_mpp = mpp * W0 / width
        options.update(resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
        if description:
            options["description"] = (f"isg-synth {W0}x{H0} [0,0 {W0}x{H0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                                      f"|AppMag = {10 / mpp:g}|MPP = {level_mpp:g}")
    return options


def write_pyramid_tiff(path, levels: list[np.ndarray], mpp: float | None, tile: int = 256, quality: int = 80,
                       description: bool = True, maxworkers: int | None = None) -> None:
    """Write a tiled JPEG pyramid: one top-level page per level, reduced levels flagged ``subfiletype=1``.

    Level-0 mpp is stored as TIFF resolution (pixels per cm) and, with ``description``, as an
    Aperio-style ``ImageDescription`` (``isg-synth ... |AppMag = 20|MPP = 0.5``). It does not start with
    "Aperio": tifffile/tiffslide would then expect the SVS page layout (thumbnail as page 1) and see
    level 0 only. ``mpp=None`` writes no calibration.
    """
    import tifffile

    shape0 = levels[0].shape[:2]
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=sum(l.nbytes for l in levels) > 2**31) as writer:
        for i, level in enumerate(levels):
            writer.write(level, maxworkers=maxworkers, **_page_options(i, level.shape[1], shape0, mpp, tile, quality, description))


def write_streamed_pyramid(path, strips: Iterable[np.ndarray], height: int, width: int, mpp: float | None,
                           tile: int = 256, quality: int = 80, downsample: int = 4, description: bool = True,
                           maxworkers: int | None = None) -> list[tuple[int, int]]:
    """The pyramid of :func:`write_pyramid_tiff`, written tile by tile from level-0 strips in bounded memory.

    ``strips`` yields level 0 top to bottom as uint8 [rows, width, 3] strips whose rows are a multiple of
    ``tile * downsample`` (the last may be shorter). Each level's tiles go to the TIFF as they come, while
    its ``downsample``-fold box average (INTER_AREA) is appended, strip by strip, to a raw scratch file
    that is the next level's source. Memory is one strip per level, whatever the slide size. The pixels
    equal :func:`pyramid`'s when every level's sides are multiples of ``downsample`` (otherwise reduced
    levels average whole ``downsample``-blocks, dropping the last partial row/column of blocks).
    Returns the (height, width) of the levels.
    """
    import tempfile

    import tifffile

    shapes = pyramid_shapes(height, width, tile, downsample)
    step = math.lcm(tile, downsample)
    rows = max(1, 2048 // step) * step  # scratch strips of reduced levels
    bigtiff = sum(h * w * 3 for h, w in shapes) > 2**31
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=".isg-synth-", dir=Path(tmp).parent) as scratch, \
            tifffile.TiffWriter(tmp, bigtiff=bigtiff) as writer:
        source: Iterable[np.ndarray] = strips
        for level, (h, w) in enumerate(shapes):
            below = Path(scratch) / f"level{level + 1}.raw" if level + 1 < len(shapes) else None
            with open(below, "wb") if below else contextlib.nullcontext() as sink:
                writer.write(_tiles(source, h, w, tile, sink, downsample), shape=(h, w, 3), dtype=np.uint8,
                             maxworkers=maxworkers, **_page_options(level, w, shapes[0], mpp, tile, quality, description))
            if below:
                source = _raw_strips(below, *shapes[level + 1], rows)
    return shapes


def _tiles(strips: Iterable[np.ndarray], height: int, width: int, tile: int, sink, downsample: int) -> Iterator[np.ndarray]:
    """Tiles [tile, tile, 3] of the strips in row-major order (edges zero-padded, as tifffile pads arrays);
    each strip's downsampled copy goes to ``sink`` (a binary file) when there is one."""
    done = 0
    for strip in strips:
        n = strip.shape[0]
        if strip.shape[1:] != (width, 3) or (n % tile and done + n != height):
            raise ValueError(f"strip of shape {strip.shape} at row {done}: expected [k * {tile} rows, {width}, 3]")
        if sink is not None:  # before the tiles: the writer stops pulling after the last tile
            whole = strip[: n // downsample * downsample, : width // downsample * downsample]
            sink.write(cv2.resize(whole, (width // downsample, n // downsample), interpolation=cv2.INTER_AREA).tobytes())
        done += n
        for y in range(0, n, tile):
            for x in range(0, width, tile):
                block = strip[y:y + tile, x:x + tile]
                if block.shape[:2] != (tile, tile):
                    block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1]), (0, 0)))
                yield np.ascontiguousarray(block)
        if done >= height:
            break
    if done != height:
        raise ValueError(f"strips hold {done} rows, expected {height}")


def _raw_strips(path: Path, height: int, width: int, rows: int) -> Iterator[np.ndarray]:
    with open(path, "rb") as handle:
        for y in range(0, height, rows):
            n = min(rows, height - y)
            yield np.fromfile(handle, np.uint8, n * width * 3).reshape(n, width, 3)
