"""Optional NVIDIA DALI path: decode whole JPEG tiles of a tiled TIFF with DALI's image decoder.

The compressed tiles are read with ``os.pread`` (JPEGTables spliced in when the TIFF shares them) and fed
to a DALI pipeline through ``fn.external_source``; ``fn.decoders.image`` decodes them on the CPU
(``device_id=None``: libjpeg-turbo, ``num_threads`` threads) or, for a CUDA ``device``, with nvJPEG
(``device="mixed"``). Requests must be aligned with the TIFF's tile grid (``size`` = tile size,
coordinates on the grid of the level), which is what :func:`isg.io.tile_grid` gives with
``patch_size`` = tile size. Pixels past the slide border are set white, as everywhere in :mod:`isg.io`.

Every tile's compressed stream is checked first (:class:`isg.io.damage.TiffSegments`): damaged tiles
raise :class:`~isg.io.damage.DamagedTileError`, or are left out and logged when a ``damaged`` log is
given, as in :func:`isg.io.iter_tiles` (``reader="dali"`` there, ``--reader dali`` in ``isg preprocess``).

Use :func:`dali_available` to check; without DALI, :func:`iter_tiles_dali` raises ``ImportError``.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import numpy as np
import torch

from isg.io.damage import DamagedTileError, DamagedTiles, quiet_native_output
from isg.io.slide import Slide, TiffSlide
from isg.io.tiles import BATCH_SIZE


def dali_available() -> bool:
    """True when ``nvidia.dali`` imports."""
    if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec("nvidia.dali") is None:
        return False
    try:
        import nvidia.dali  # noqa: F401

        return True
    except Exception:
        return False


def _tile_streams(tiff: TiffSlide, coords: np.ndarray, size: int, level: int,
                  damaged: DamagedTiles | None) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Complete JPEG stream per undamaged tile (uint8 arrays), their level-0 coords [M, 2] and level (x, y) [M, 2]."""
    segments = tiff.segments
    page = segments.pages[level]
    th, tw = tiff.tile_shape(level)
    if page.compression != 7 or not page.is_tiled or page.samplesperpixel != 3 or page.photometric not in (2, 6):
        raise ValueError(f"{tiff.path}: the DALI path needs 8-bit RGB/YCbCr JPEG tiles (level {level} has "
                         f"compression {page.compression}, photometric {page.photometric}, tiled={page.is_tiled})")
    if page.photometric == 2 and not page.is_jfif:
        raise ValueError(f"{tiff.path}: RGB-coded JPEG tiles (Aperio style) are not decoded by DALI correctly; use iter_tiles")
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
    streams, keep = [], []
    for i, (x, y) in enumerate(levels.tolist()):
        index = (y // th) * cols + x // tw
        reason = segments.damage(level, index)
        if reason is not None:
            if damaged is None:
                raise DamagedTileError(tiff.path, level, index, reason)
            damaged.add(coords[i], DamagedTileError(tiff.path, level, index, reason).problem)
            continue
        streams.append(np.frombuffer(segments.jpeg_stream(level, index), np.uint8))  # tables spliced in
        keep.append(i)
    return streams, coords[keep], levels[keep]


def iter_tiles_dali(slide: Slide, coords, size: int, level: int = 0, batch_size: int = BATCH_SIZE, device="cpu",
                    num_threads: int = 2, damaged: DamagedTiles | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Like :func:`isg.io.iter_tiles` (``(coords [B, 2], tiles torch.uint8 [B, size, size, 3])``), decoded by DALI;
    damaged tiles raise :class:`DamagedTileError`, or are left out and logged in ``damaged``.

    ``device`` "cpu" runs the pipeline with ``device_id=None`` (no GPU needed); a CUDA device decodes with
    nvJPEG on that GPU. The slide must be a TIFF (any backend; its tiles are read with tifffile).
    """
    from nvidia.dali import fn, pipeline_def, types

    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    device = torch.device(device)
    tiff = slide if isinstance(slide, TiffSlide) else TiffSlide(slide.path, mpp=slide.mpp)
    try:
        if not len(coords):
            return
        streams, coords, levels = _tile_streams(tiff, coords, size, level, damaged)
        if not streams:
            return
        lw, lh = tiff.level_dimensions[level]
        device_id = (device.index if device.index is not None else torch.cuda.current_device()) if device.type == "cuda" else None

        def batches():
            for start in range(0, len(streams), batch_size):
                yield streams[start:start + batch_size]

        @pipeline_def(batch_size=batch_size, num_threads=max(1, num_threads), device_id=device_id, prefetch_queue_depth=2)
        def pipeline():
            jpegs = fn.external_source(source=batches(), batch=True, dtype=types.UINT8, name="jpegs")
            return fn.decoders.image(jpegs, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)

        pipe = pipeline()
        with quiet_native_output():
            pipe.build()
        start = 0
        while start < len(coords):
            with quiet_native_output():
                (decoded,) = pipe.run()
            n = len(decoded)
            if device_id is None:
                tiles = torch.from_numpy(decoded.as_array())  # [B, size, size, 3]
            else:
                from nvidia.dali.plugin.pytorch import feed_ndarray

                tiles = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
                feed_ndarray(decoded.as_tensor(), tiles, cuda_stream=torch.cuda.current_stream(device))
            chunk_levels = levels[start:start + n]
            for i in np.flatnonzero((chunk_levels[:, 0] + size > lw) | (chunk_levels[:, 1] + size > lh)):
                x, y = chunk_levels[i]
                tiles[i, max(0, lh - y):] = 255  # edge tiles: JPEG padding -> white
                tiles[i, :, max(0, lw - x):] = 255
            yield coords[start:start + n], tiles.to(device)
            start += n
    finally:
        if tiff is not slide:
            tiff.close()
