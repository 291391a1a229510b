"""Optional NVIDIA DALI tile reader (``iter_tiles(..., reader="dali")``): whole JPEG tiles of a tiled TIFF
decoded by DALI's image decoder.

The compressed tiles are read with ``os.pread`` and made complete, self-describing JPEG streams
(:meth:`isg.io.damage.TiffSegments.jpeg_stream`: shared JPEGTables spliced in, and an Adobe marker for
Aperio's RGB-coded tiles, which DALI would otherwise read as YCbCr), then fed batch by batch to a DALI
pipeline (``fn.external_source`` + ``fn.decoders.image``): on the CPU (``device_id=None``: libjpeg-turbo,
``num_threads`` threads) or, for a CUDA ``device``, with nvJPEG (``device="mixed"``). Requests must be aligned
with the TIFF's tile grid (``size`` = tile size, coordinates on the grid of the level), which is what
:func:`isg.io.tile_grid` gives with ``patch_size`` = tile size. Pixels past the slide border are white.

Every tile's compressed stream is checked first (:class:`isg.io.damage.TiffSegments`): damaged tiles are
reported as in :func:`isg.io.iter_tiles` (raised, or left out and logged with ``damaged=``).
Use :func:`dali_available` to check; without DALI the reader raises ``ImportError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch

from isg.io.backends.tiff_slide import TiffSlide
from isg.io.damage import DamagedTileError, DamagedTiles
from isg.io.slide import Slide, TileReader
from isg.io.tiles import BATCH_SIZE, iter_tiles


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


class DaliTileReader(TileReader):
    """Batches of whole JPEG tiles of a TIFF decoded by a DALI pipeline on ``device`` (see the module)."""

    def __init__(self, slide: Slide, coords: np.ndarray, level: int, size: int, batch_size: int, device, num_threads: int):
        from nvidia.dali import fn, pipeline_def, types

        super().__init__(slide, level, size)
        self.tiff = slide if isinstance(slide, TiffSlide) else TiffSlide(slide.path, mpp=slide.mpp)
        self._check(coords)
        device = torch.device(device)
        self.device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None
        self.device = device if self.device_id is not None else torch.device("cpu")

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=self.device_id, prefetch_queue_depth=1,
                      exec_async=False, exec_pipelined=False)
        def pipeline():
            jpegs = fn.external_source(name="jpegs", dtype=types.UINT8, batch=True)
            return fn.decoders.image(jpegs, device="mixed" if self.device_id is not None else "cpu", output_type=types.RGB)

        self._pipe = pipeline()
        self._pipe.build()

    def _check(self, coords) -> None:
        """Refuse what the DALI path cannot read exactly: other codecs, other sizes, tiles off the file's grid."""
        tiff, level, size = self.tiff, self.level, self.size
        page = tiff.page(level)
        th, tw = tiff.tile_shape(level)
        if page.compression != 7 or not page.is_tiled or page.samplesperpixel != 3 or page.photometric not in (2, 6):
            raise ValueError(f"{tiff.path}: the DALI path needs 8-bit RGB/YCbCr JPEG tiles (level {level} has "
                             f"compression {page.compression}, photometric {page.photometric}, tiled={page.is_tiled})")
        if (th, tw) != (size, size):
            raise ValueError(f"{tiff.path}: the DALI path decodes whole tiles: size must be the tile size {tw}x{th} of level {level}, got {size}")
        levels = np.array([tiff.to_level(xy, level) for xy in coords.tolist()], np.int64).reshape(-1, 2)
        cols, rows = -(-page.imagewidth // tw), -(-page.imagelength // th)
        off_grid = (levels[:, 0] % tw != 0) | (levels[:, 1] % th != 0) | (levels.min(axis=1) < 0) | \
            (levels[:, 0] // tw >= cols) | (levels[:, 1] // th >= rows)
        if off_grid.any():
            bad = coords[np.flatnonzero(off_grid)[:3]].tolist()
            raise ValueError(f"{tiff.path}: the DALI path needs coordinates on the {tw} px tile grid of level {level}; "
                             f"{int(off_grid.sum())} are not, e.g. {bad}")

    def read(self, coords, out):
        tiff, level, size = self.tiff, self.level, self.size
        segments = tiff.segments
        th, tw = tiff.tile_shape(level)
        cols = -(-tiff.level_dimensions[level][0] // tw)
        reasons: list[str | None] = [None] * len(coords)
        streams, rows, starts = [], [], []
        for i, xy in enumerate(coords.tolist()):
            x, y = tiff.to_level(xy, level)
            index = (y // th) * cols + x // tw
            reason = segments.damage(level, index)
            if reason is not None:
                reasons[i] = DamagedTileError(tiff.path, level, index, reason).problem
                out[i] = 255
                continue
            streams.append(np.frombuffer(segments.jpeg_stream(level, index), np.uint8))
            rows.append(i)
            starts.append((x, y))
        if not streams:
            return reasons
        self._pipe.feed_input("jpegs", streams)
        (decoded,) = self._pipe.run()
        index = torch.tensor(rows, device=out.device)
        if self.device_id is None:
            out[index] = torch.from_numpy(decoded.as_array())  # [n, size, size, 3]
        else:
            from nvidia.dali.plugin.pytorch import feed_ndarray

            tiles = torch.empty((len(rows), size, size, 3), dtype=torch.uint8, device=out.device)
            feed_ndarray(decoded.as_tensor(), tiles, cuda_stream=torch.cuda.current_stream(out.device))
            out[index] = tiles
        lw, lh = tiff.level_dimensions[level]
        for i, (x, y) in zip(rows, starts):
            if x + size > lw or y + size > lh:  # edge tiles: JPEG padding -> white
                out[i, max(0, lh - y):] = 255
                out[i, :, max(0, lw - x):] = 255
        return reasons

    def close(self):
        if self.tiff is not self.slide:
            self.tiff.close()


def iter_tiles_dali(slide: Slide, coords, size: int, level: int = 0, batch_size: int = BATCH_SIZE, device="cpu",
                    num_threads: int = 2, damaged: DamagedTiles | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """:func:`isg.io.iter_tiles` with ``reader="dali"``: whole JPEG tiles decoded by DALI; ``device`` "cpu" runs the
    pipeline with ``device_id=None`` (no GPU needed), a CUDA device decodes with nvJPEG on it."""
    yield from iter_tiles(slide, coords, size, level=level, batch_size=batch_size, device=device,
                          num_workers=max(1, num_threads), damaged=damaged, reader="dali")
