"""Tissue prefilter, tile grids, batched tile streaming and two-level (global/local) tiling.

* :func:`otsu_threshold`: Otsu's threshold of a channel, the one used by every tissue rule of isg
  (this mask, the ``otsu`` selector, the HE2RNA baseline).
* :func:`tissue_mask`: Otsu threshold on the saturation of a low-resolution thumbnail.
* :func:`box_fraction`: fraction of a mask inside boxes, by a summed-area table.
* :func:`grid_level`: the read level for an ``mpp`` or a ``level``; :func:`read_plan`: the level and the
  pixels to read there for patches of one physical size (``mpp``), resized on the fly (:func:`resize_tiles`).
* :func:`tile_grid`: level-0 (x, y) of the ``patch_size`` tiles (at the read level) with enough tissue.
* :func:`iter_tiles`: batches ``(coords [B, 2], tiles torch.uint8 [B, p, p, 3])`` read by the slide's
  tile reader (and resized to ``out_size`` where the tiles are: host or GPU) (host threads; cuCIM's batch reader; nvImageCodec on the GPU; DALI with ``reader="dali"``),
  prefetched while the caller works on the previous batch. Damaged tiles raise, or are left out and
  listed (``damaged=``).
* :func:`local_grid`: level-0 coordinates of the (p / q)^2 local patches of each global patch.

Tiles reaching past the slide border are padded white (255), as :meth:`Slide.read_region` does.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import sys
import threading
from collections.abc import Iterator

import numpy as np
import torch

from isg.io.damage import DamagedTileError, DamagedTiles, quiet_native_output
from isg.io.slide import MPP_TOLERANCE, Slide, aligned_empty

# Two-level tiling geometry (Sec. 3): the one definition of the defaults; every layer and the CLI read these.
PATCH_SIZE = 256  # p: global patch side in pixels at the read level
LOCAL_SIZE = 64  # q: local patch side; must divide p (grid S = p / q)
# Tile streaming: the one definition of the batch size and reader threads of every stage that reads tiles.
BATCH_SIZE = 64  # tiles per batch
NUM_WORKERS = 4  # reader threads per slide

# One physical scale per cohort: patches are read at the best level and resized to this many um/px unless a
# level (no resampling) or another target is given.
TARGET_MPP = 0.5

MIN_SATURATION = 15  # 0..255: an Otsu threshold below this means there is no stained tissue
READERS = ("threads", "dali")  # how iter_tiles decodes: the slide's reader in threads, or NVIDIA DALI


def otsu_threshold(values: np.ndarray, lower: float | None = None, upper: float | None = None) -> float:
    """Otsu's threshold (scikit-image) of ``values`` (any shape, e.g. a grey or saturation image), clipped to
    [``lower``, ``upper``] where given. Constant input has no threshold: its value is returned (clipped)."""
    from skimage.filters import threshold_otsu

    values = np.asarray(values)
    threshold = float(values.flat[0]) if values.size and values.min() == values.max() else float(threshold_otsu(values))
    if lower is not None:
        threshold = max(threshold, float(lower))
    if upper is not None:
        threshold = min(threshold, float(upper))
    return threshold


def box_fraction(mask: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """float64 [N]: fraction of True pixels of ``mask`` bool [h, w] inside each box of ``boxes`` [N, 4]
    (x0, y0, x1, y1 in mask pixels, half-open), from a summed-area table. The part of a box outside the
    mask counts as False (the full box area is the denominator); empty boxes count one pixel."""
    mask = np.asarray(mask, bool)
    boxes = np.asarray(boxes, np.int64).reshape(-1, 4)
    integral = np.pad(mask.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))  # [h+1, w+1]
    x0 = np.clip(boxes[:, 0], 0, mask.shape[1])
    y0 = np.clip(boxes[:, 1], 0, mask.shape[0])
    area = np.maximum(boxes[:, 2] - boxes[:, 0], 1) * np.maximum(boxes[:, 3] - boxes[:, 1], 1)
    x1 = np.clip(boxes[:, 2], x0, mask.shape[1])
    y1 = np.clip(boxes[:, 3], y0, mask.shape[0])
    inside = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    return inside / area


def tissue_mask(slide: Slide, max_size: int = 2048, level: int | None = None, min_saturation: int = MIN_SATURATION,
                thumbnail: np.ndarray | None = None) -> np.ndarray:
    """bool [h, w] covering the whole slide: True where the thumbnail looks like stained tissue.

    The thumbnail is ``slide.thumbnail(max_size)``, or the whole of ``level`` when given (or ``thumbnail``
    itself). Pixels are tissue when their HSV saturation exceeds Otsu's threshold (at least
    ``min_saturation``), after a 5 px median filter, followed by a 5 px morphological closing.
    """
    import cv2

    if thumbnail is None:
        thumbnail = slide.read_region((0, 0), level, slide.level_dimensions[level]) if level is not None else slide.thumbnail(max_size)
    rgb = thumbnail.astype(np.int16)
    high, low = rgb.max(axis=-1), rgb.min(axis=-1)
    saturation = np.where(high > 0, (high - low) * 255 // np.maximum(high, 1), 0).astype(np.uint8)  # HSV S, 0..255
    saturation = cv2.medianBlur(saturation, 5)
    if int(saturation.max()) <= min_saturation:
        return np.zeros(saturation.shape, bool)
    threshold = otsu_threshold(saturation, lower=min_saturation)
    mask = (saturation > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    return mask.astype(bool)


def grid_level(slide: Slide, mpp: float | None = None, level: int | None = None) -> int:
    """Read level: ``level`` if given, else the coarsest level at least as fine as ``mpp``, else 0."""
    if level is not None:
        if not 0 <= level < slide.level_count:
            raise ValueError(f"{slide.path}: level {level} out of range (slide has {slide.level_count} levels)")
        return int(level)
    return slide.best_level_for_mpp(mpp) if mpp is not None else 0


def read_plan(slide: Slide, patch_size: int, mpp: float | None = None, level: int | None = None) -> tuple[int, int]:
    """``(level, read_size)``: patches of ``patch_size`` px at ``mpp`` um/px are ``read_size`` px read at ``level``
    (the coarsest level at least as fine as ``mpp``, as :func:`grid_level`) and resized to ``patch_size``, as
    TRIDENT and CLAM do. A ``level`` (or neither), or a level within :data:`MPP_TOLERANCE` of ``mpp``, reads
    ``patch_size`` px there: no resampling."""
    level = grid_level(slide, mpp, level)
    if mpp is None:
        return level, int(patch_size)
    ratio = mpp / slide.level_mpp(level)
    read_size = int(patch_size) if abs(ratio - 1) <= MPP_TOLERANCE else max(1, int(round(patch_size * ratio)))
    return level, read_size


def resize_tiles(tiles: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 tiles [B, s, s, 3] -> uint8 [B, size, size, 3], antialiased bilinear (area-like when shrinking),
    on the tiles' device: torch's uint8 channels-last kernel on the CPU, float32 then rounded on a GPU."""
    import torch.nn.functional as F

    if tiles.shape[1:3] == (size, size):
        return tiles
    x = tiles.permute(0, 3, 1, 2)  # [B, 3, s, s], channels-last memory
    if x.device.type == "cpu":
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    else:
        y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()  # [B, size, size, 3]


def tile_grid(slide: Slide, patch_size: int, mpp: float | None = None, level: int | None = None, tissue_min: float = 0.05,
              mask: np.ndarray | None = None, stride: int | None = None) -> np.ndarray:
    """int64 [N, 2] level-0 (x, y) of the ``patch_size`` tiles at the read level (see :func:`grid_level`) whose
    tissue fraction on ``mask`` (default :func:`tissue_mask`) is at least ``tissue_min``; row-major order.

    ``stride`` (pixels at the read level) defaults to ``patch_size``. The grid covers the slide; the last
    row/column may reach past the border (those tiles are padded white and count outside as no tissue).
    ``tissue_min=0`` keeps every tile of the grid.
    """
    if patch_size < 1:
        raise ValueError(f"patch_size must be positive, got {patch_size}")
    stride = stride or patch_size
    level = grid_level(slide, mpp, level)
    factor = slide.level_downsamples[level]
    lw, lh = slide.level_dimensions[level]
    xs = np.arange(0, lw, stride, dtype=np.int64)
    ys = np.arange(0, lh, stride, dtype=np.int64)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    coords = np.stack([np.round(gx.ravel() * factor), np.round(gy.ravel() * factor)], axis=1).astype(np.int64)  # [N, 2] level 0
    if tissue_min <= 0:
        return coords
    if mask is None:
        mask = tissue_mask(slide)
    mask = np.asarray(mask, bool)
    W, H = slide.dimensions
    sx, sy = mask.shape[1] / W, mask.shape[0] / H  # mask px per level-0 px
    extent = patch_size * factor  # level-0 side of a tile
    x0 = np.clip(np.floor(coords[:, 0] * sx), 0, mask.shape[1]).astype(np.int64)
    y0 = np.clip(np.floor(coords[:, 1] * sy), 0, mask.shape[0]).astype(np.int64)
    x1 = np.maximum(np.ceil((coords[:, 0] + extent) * sx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.ceil((coords[:, 1] + extent) * sy).astype(np.int64), y0 + 1)
    # the full tile is the denominator: the part outside the slide counts as background
    return coords[box_fraction(mask, np.stack([x0, y0, x1, y1], axis=1)) >= tissue_min]


def local_grid(coords, p: int, q: int, downsample: float = 1.0) -> np.ndarray:
    """int64 [N, S, S, 2] level-0 (x, y) of the local patches (q px) of each global patch (p px), S = p / q.

    ``[n, i, j]`` is the local patch in row i, column j (rows ``y + i*q``, columns ``x + j*q`` of the patch's
    pixels, scaled by ``downsample``, the level-0 pixels per patch pixel (``PatchGeometry.level0_scale``), to
    level 0), the order of ``tiles.reshape(B, S, q, S, q, 3)``.
    """
    if p <= 0 or q <= 0 or p % q:
        raise ValueError(f"local size q={q} must be a positive divisor of the patch size p={p}")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    s = p // q
    offsets = np.round(np.arange(s, dtype=np.float64) * q * downsample).astype(np.int64)
    grid = np.zeros((len(coords), s, s, 2), np.int64)
    grid[..., 0] = coords[:, None, None, 0] + offsets[None, None, :]
    grid[..., 1] = coords[:, None, None, 1] + offsets[None, :, None]
    return grid


# ----------------------------------------------------------------------------- streaming


POOL_MAX_BYTES = 128 << 20  # host batch buffers kept for reuse, all iter_tiles calls together
BUFFER_OFFSET = 16  # batch buffers start this many bytes past a 64-byte boundary (see _aligned_batch)


def _aligned_batch(shape: tuple, pin: bool = False):
    """Empty uint8 batch [B, p, p, 3] starting ``BUFFER_OFFSET`` bytes past a 64-byte boundary
    (see :func:`isg.io.slide.aligned_empty`; with p * 3 a multiple of 32 every tile and row shares it)."""
    if not pin:
        return aligned_empty(shape, BUFFER_OFFSET)
    nbytes = int(np.prod(shape))
    raw = torch.empty(nbytes + 64, dtype=torch.uint8, pin_memory=True)
    start = (BUFFER_OFFSET - raw.data_ptr()) % 64
    return raw[start:start + nbytes].view(shape)


class _BatchPool:
    """Host batch buffers [batch_size, size, size, 3] recycled once the caller has dropped every tensor
    and view of them (the reference count of their memory owner back to the pool's own references).

    Decoding into memory touched for the first time costs page faults (on a VM, as much as the JPEG
    decode of a 256 px tile), so streaming reuses buffers, across ``iter_tiles`` calls too: up to
    :data:`POOL_MAX_BYTES` stay allocated (:func:`release_buffers` frees them). Host batches bound for a GPU
    use torch's pinned caching allocator instead, which reuses pinned blocks safely after the async copies;
    batches decoded on the device use its caching allocator.
    """

    _lock = threading.Lock()
    _buffers: dict[tuple, list[np.ndarray]] = {}  # shape -> aligned views (``.base`` owns the memory)

    def __init__(self, batch_size: int, size: int, pin: bool, device=None):
        self.shape = (batch_size, size, size, 3)
        self.pin = pin
        self.device = torch.device(device or "cpu")

    def get(self, n: int) -> torch.Tensor:
        if self.device.type != "cpu":  # a reader that decodes on the device: torch's caching allocator
            return torch.empty((n, *self.shape[1:]), dtype=torch.uint8, device=self.device)
        if self.pin:
            return _aligned_batch(self.shape, pin=True)[:n]
        with self._lock:
            buffers = self._buffers.setdefault(self.shape, [])
            for buffer in buffers:
                if sys.getrefcount(buffer.base) <= 2:  # held by the pool's view and getrefcount's argument only
                    return torch.from_numpy(buffer[:n])  # this view marks it busy until the caller drops it
            buffer = _aligned_batch(self.shape)
            if sum(b.nbytes for bs in self._buffers.values() for b in bs) + buffer.nbytes <= POOL_MAX_BYTES:
                buffers.append(buffer)
            return torch.from_numpy(buffer[:n])


def release_buffers() -> None:
    """Free the pooled host batch buffers that no tensor uses any more."""
    with _BatchPool._lock:
        for shape, buffers in list(_BatchPool._buffers.items()):
            buffers[:] = [b for b in buffers if sys.getrefcount(b.base) > 2]
            if not buffers:
                del _BatchPool._buffers[shape]


def _check_coords(slide: Slide, coords) -> np.ndarray:
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"{slide.path}: coords must be [N, 2] level-0 (x, y), got shape {coords.shape}")
    if coords.size and not np.issubdtype(coords.dtype, np.integer):
        if not np.all(np.isfinite(coords)) or not np.array_equal(coords, np.round(coords)):
            raise ValueError(f"{slide.path}: coords must be whole pixels, got dtype {coords.dtype} with fractions")
    return coords.astype(np.int64, copy=False)


def iter_tiles(slide: Slide, coords, size: int, level: int = 0, batch_size: int = BATCH_SIZE, device="cpu",
               num_workers: int = NUM_WORKERS, prefetch: int = 2, damaged: DamagedTiles | None = None,
               reader: str = "threads", out_size: int | None = None) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Yield ``(coords_batch int64 [B, 2], tiles torch.uint8 [B, out, out, 3])`` on ``device``.

    ``coords`` are level-0 (x, y) top-left corners; tiles are ``size`` px at ``level`` (exactly what
    ``slide.read_region(xy, level, (size, size))`` returns, white past the border), resized to ``out_size``
    (default ``size``) by :func:`resize_tiles` on ``device`` (see :func:`read_plan`). Batches are read by the
    slide's :class:`~isg.io.slide.TileReader` (``slide.tile_reader(level, size, device, num_workers)``):
    its host reader decodes parts of each batch in ``num_workers`` threads (0: the calling thread), a
    backend's own batch reader (cuCIM; nvImageCodec on a GPU) uses ``num_workers`` threads of its own;
    ``reader="dali"`` decodes whole JPEG tiles with NVIDIA DALI (:func:`isg.io.iter_tiles_dali`). Up to
    ``prefetch`` batches are read ahead. Host batches for a CUDA ``device`` are assembled in pinned memory and
    copied with ``non_blocking=True``; a reader that decodes on the device fills the device batch itself.

    Damaged tiles (:mod:`isg.io.damage`) never come out as pixels: without ``damaged`` the first one raises
    :class:`DamagedTileError`; with a :class:`DamagedTiles` log they are left out of the batches (which
    are then shorter) and recorded in it. Decoder messages are captured, not printed.
    """
    if reader not in READERS:
        raise ValueError(f"unknown tile reader {reader!r}; expected one of {', '.join(READERS)}")
    coords = _check_coords(slide, coords)
    if size < 1 or batch_size < 1 or (out_size is not None and out_size < 1):
        raise ValueError(f"size, out_size and batch_size must be positive, got size={size}, out_size={out_size}, "
                         f"batch_size={batch_size}")
    if not 0 <= level < slide.level_count:
        raise ValueError(f"{slide.path}: level {level} out of range (slide has {slide.level_count} levels)")
    device = torch.device(device)
    if reader == "dali":
        from isg.io.dali import DaliTileReader

        tile_reader = DaliTileReader(slide, coords, level, size, batch_size, device, max(1, num_workers))
    else:
        tile_reader = slide.tile_reader(level, size, device, num_workers)
    with tile_reader, quiet_native_output():
        pool = _BatchPool(batch_size, size, pin=device.type == "cuda", device=torch.device(tile_reader.device))
        for chunk, batch, reasons in _read_batches(tile_reader, coords, batch_size, num_workers, prefetch, pool):
            if any(reasons):
                chunk, batch = _drop_damaged(slide, chunk, batch, reasons, damaged, level)
                if not len(chunk):
                    continue
            batch = batch.to(device, non_blocking=batch.device.type == "cpu" and device.type == "cuda")
            yield chunk, batch if out_size is None else resize_tiles(batch, out_size)


def _drop_damaged(slide, chunk, batch, reasons, damaged, level):
    """The batch without its damaged tiles (logged in ``damaged``; raised when there is no log)."""
    bad = [i for i, reason in enumerate(reasons) if reason]
    if damaged is None:
        x, y = chunk[bad[0]].tolist()
        raise DamagedTileError(slide.path, level, -1, f"tile at level-0 ({x}, {y}): {reasons[bad[0]]}")
    for i in bad:
        damaged.add(chunk[i], reasons[i])
    keep = np.array([not reason for reason in reasons])
    return chunk[keep], batch[torch.from_numpy(keep).to(batch.device)]


def _read_batches(reader, coords, batch_size, num_workers, prefetch, pool):
    """``(chunk [B, 2], batch uint8 [B, size, size, 3] on reader.device, damage reasons [B])`` in order, up to
    ``prefetch`` batches read ahead: a parallel reader gets parts of each batch from ``num_workers`` threads,
    another reader whole batches from one thread (it has threads of its own)."""
    starts = range(0, len(coords), batch_size)

    def read(chunk, batch):
        with torch.inference_mode():  # batches may be inference tensors of the caller's thread: no autograd here
            return reader.read(chunk, batch)

    if num_workers <= 0:
        for start in starts:
            chunk = coords[start:start + batch_size]
            batch = pool.get(len(chunk))
            yield chunk, batch, read(chunk, batch)
        return

    threads = num_workers if reader.parallel else 1
    with cf.ThreadPoolExecutor(threads, thread_name_prefix="isg-tiles") as executor:
        pending: collections.deque = collections.deque()

        def submit(start: int) -> None:
            chunk = coords[start:start + batch_size]
            batch = pool.get(len(chunk))
            step = max(1, -(-len(chunk) // (threads * 2))) if reader.parallel else len(chunk)  # a few tiles per task
            futures = [executor.submit(read, chunk[i:i + step], batch[i:i + step]) for i in range(0, len(chunk), step)]
            pending.append((chunk, batch, futures))

        queue = iter(starts)
        try:
            for start in queue:
                submit(start)
                if len(pending) > prefetch:
                    break
            while pending:
                chunk, batch, futures = pending.popleft()
                reasons = [reason for future in futures for reason in future.result()]
                next_start = next(queue, None)
                if next_start is not None:
                    submit(next_start)
                yield chunk, batch, reasons
        finally:
            for _, _, futures in pending:
                for future in futures:
                    future.cancel()
