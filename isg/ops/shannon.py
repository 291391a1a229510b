"""Shannon scorer: information content of uint8 tiles in bits (paper Sec. 3.1).

K(x) of a tile is estimated by the length of a simple lossless code, computed
exactly (no entropy coder is run):

1. **Prediction.** Per channel, every pixel ``x[i, j]`` is predicted causally
   from its left ``a = x[i, j-1]``, upper ``b = x[i-1, j]`` and upper-left
   ``c = x[i-1, j-1]`` neighbours with the LOCO-I / JPEG-LS median edge
   detector ``pred = median(a, b, a + b - c)`` (= ``clip(a + b - c, min(a, b),
   max(a, b))``). On the first row ``pred = a`` (left), on the first column
   ``pred = b`` (up), and for pixel (0, 0) ``pred = 0``.
2. **Residuals.** ``e = (x - pred) mod 256``; ``n_s`` counts residual ``s``
   (``s = 0..255``) over the ``N = H * W`` pixels of the channel.
3. **Two-part code length** per channel, summed over channels::

       data  = sum_{s: n_s > 0} n_s * log2(N / n_s)             (empirical entropy * N)
       model = 8 + log2 C(256, K) + log2 C(N - 1, K - 1)         (K = #{s: n_s > 0})
       bits  = sum_c (data_c + model_c)

   The model cost is the exact length of a plain description of the
   histogram given N: 8 bits for K - 1 (1..256 used symbols), the index of the
   set of used symbols among the C(256, K) subsets, and the index of their
   positive counts among the C(N - 1, K - 1) compositions of N into K parts.
   ``log2 C(n, k)`` is evaluated as ``sum_{i=1..k} log2((n - k + i) / i)`` with
   ``k -> min(k, n - k)``, the same double-precision formula in numpy and C++
   (``csrc/shannon/shannon_bits.h``); bits are always computed on the host, also for
   histograms counted on a GPU, so a ranking never depends on the device.

A flat tile costs a few dozen bits per channel, a noise tile ~8 bits per
subpixel. RGBA input: the alpha channel is dropped (it carries no tissue
information); 1-channel (grey) input is scored as one channel.

Functions here: :func:`shannon_histogram_reference` / :func:`shannon_bits_reference`
(numpy oracle and CPU fallback), :func:`shannon_histogram_torch` (pure PyTorch, fallback on
other devices), :func:`bits_from_histogram`, and the public
:func:`shannon_histogram`, :func:`shannon_bits` and :func:`shannon_grid_bits`
which use the native kernels (``isg._C``, CPU OpenMP or CUDA) when available.
"""

from __future__ import annotations

import numpy as np
import torch

from isg.ops import native

__all__ = [
    "prepare_tiles", "shannon_histogram_reference", "shannon_bits_reference", "bits_from_histogram",
    "shannon_grid_histogram_reference", "shannon_histogram_torch", "shannon_histogram", "histogram_bits", "shannon_bits",
    "shannon_grid_histogram", "shannon_grid_bits", "grid_shape", "CHUNK_TILES",
]


def prepare_tiles(tiles, name: str = "tiles") -> torch.Tensor | np.ndarray:
    """Validate a batch of uint8 tiles ``[B, H, W, C]`` (numpy or torch); ``[H, W, C]`` is not accepted.

    ``C`` must be 1, 3 or 4 (RGBA: alpha dropped, as a view). Returns the same kind of array.
    """
    if not isinstance(tiles, (np.ndarray, torch.Tensor)):
        raise ValueError(f"{name}: expected a numpy array or torch tensor of uint8 [B, H, W, C], got {type(tiles).__name__}")
    dtype_ok = tiles.dtype == (torch.uint8 if isinstance(tiles, torch.Tensor) else np.uint8)
    if not dtype_ok:
        raise ValueError(f"{name}: expected dtype uint8, got {tiles.dtype} (convert with .astype(np.uint8) / .to(torch.uint8) "
                         "after scaling to 0..255)")
    if tiles.ndim != 4:
        raise ValueError(f"{name}: expected 4 dims [B, H, W, C], got shape {tuple(tiles.shape)}"
                         + (" (add a batch dim: tiles[None])" if tiles.ndim == 3 else ""))
    channels = tiles.shape[-1]
    if channels not in (1, 3, 4):
        raise ValueError(f"{name}: expected 1 (grey), 3 (RGB) or 4 (RGBA, alpha dropped) channels in the last dim, "
                         f"got shape {tuple(tiles.shape)}")
    if min(tiles.shape[1], tiles.shape[2]) < 1:
        raise ValueError(f"{name}: empty tiles, shape {tuple(tiles.shape)}")
    return tiles[..., :3] if channels == 4 else tiles


def _residuals_reference(x: np.ndarray) -> np.ndarray:
    """MED residuals mod 256 of uint8 ``x`` [B, H, W, C] -> uint8 [B, H, W, C]."""
    x = x.astype(np.int16)
    pred = np.zeros_like(x)
    pred[:, 0, 1:] = x[:, 0, :-1]                               # first row: left
    pred[:, 1:, 0] = x[:, :-1, 0]                               # first column: up
    a, b, c = x[:, 1:, :-1], x[:, :-1, 1:], x[:, :-1, :-1]      # left, up, up-left [B, H-1, W-1, C]
    pred[:, 1:, 1:] = np.clip(a + b - c, np.minimum(a, b), np.maximum(a, b))
    return ((x - pred) & 255).astype(np.uint8)


def shannon_histogram_reference(tiles) -> np.ndarray:
    """Residual histograms int64 [B, C, 256] of uint8 tiles [B, H, W, C] (numpy oracle)."""
    tiles = prepare_tiles(tiles)
    if isinstance(tiles, torch.Tensor):
        tiles = tiles.detach().cpu().numpy()
    batch, height, width, channels = tiles.shape
    residuals = _residuals_reference(np.asarray(tiles)).transpose(0, 3, 1, 2).reshape(batch * channels, height * width)
    index = residuals.astype(np.int64) + 256 * np.arange(batch * channels, dtype=np.int64)[:, None]
    return np.bincount(index.ravel(), minlength=batch * channels * 256).reshape(batch, channels, 256)


def shannon_histogram_torch(tiles: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch residual histograms int64 [B, C, 256] on the tiles' device (fallback for GPU tensors
    when ``isg._C`` has no CUDA kernels); same definition as :func:`shannon_histogram_reference`."""
    x = prepare_tiles(tiles).to(torch.int16)                    # [B, H, W, C]
    batch, height, width, channels = x.shape
    pred = torch.zeros_like(x)
    pred[:, 0, 1:] = x[:, 0, :-1]                               # first row: left
    pred[:, 1:, 0] = x[:, :-1, 0]                               # first column: up
    a, b, c = x[:, 1:, :-1], x[:, :-1, 1:], x[:, :-1, :-1]      # left, up, up-left [B, H-1, W-1, C]
    pred[:, 1:, 1:] = torch.clamp(a + b - c, torch.minimum(a, b), torch.maximum(a, b))
    residuals = ((x - pred) & 255).permute(0, 3, 1, 2).reshape(batch * channels, height * width).long()  # [B*C, N]
    index = residuals + 256 * torch.arange(batch * channels, device=x.device)[:, None]
    return torch.bincount(index.reshape(-1), minlength=batch * channels * 256).reshape(batch, channels, 256)


def _log2_binomial(n, k) -> np.ndarray:
    """log2 C(n, k) = sum_{i=1..k} log2((n - k + i) / i) with k -> min(k, n - k); float64, elementwise (k <= 256)."""
    n = np.asarray(n, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    n, k = np.broadcast_arrays(n, np.minimum(k, n - k))
    i = np.arange(1, 257, dtype=np.int64)                                   # [256]
    take = i <= k[..., None]                                                # [..., 256]
    ratio = np.where(take, (n[..., None] - k[..., None] + i) / i, 1.0)
    return np.log2(ratio).sum(axis=-1)


def bits_from_histogram(hist) -> np.ndarray:
    """Two-part code length in bits, float64 [B], of residual histograms int64 [B, C, 256]."""
    hist = np.asarray(hist.cpu() if isinstance(hist, torch.Tensor) else hist, dtype=np.int64)
    counts = hist.reshape(-1, 256)                                   # [B*C, 256]
    total = counts.sum(axis=1)                                       # N per channel
    used = (counts > 0).sum(axis=1)                                  # K per channel
    safe = np.maximum(counts, 1)
    data = np.where(counts > 0, counts * np.log2(np.maximum(total, 1)[:, None] / safe), 0.0).sum(axis=1)
    model = 8.0 + _log2_binomial(256, used) + _log2_binomial(np.maximum(total - 1, 0), np.maximum(used - 1, 0))
    bits = np.where(total > 0, data + model, 0.0)
    return bits.reshape(hist.shape[0], hist.shape[1]).sum(axis=1)


def shannon_bits_reference(tiles) -> np.ndarray:
    """Information content in bits, float64 [B], of uint8 tiles [B, H, W, C] (numpy oracle)."""
    return bits_from_histogram(shannon_histogram_reference(tiles))


def grid_shape(height: int, width: int, tile: tuple[int, int], stride: tuple[int, int]) -> tuple[int, int]:
    """Number of tiles (rows, cols) of a grid over a region: tile (iy, ix) has its top-left at (ix * sx, iy * sy)."""
    (th, tw), (sy, sx) = tile, stride
    return (height - th) // sy + 1, (width - tw) // sx + 1


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if np.isscalar(value) else tuple(value)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair (h, w) of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _prepare_grid(region, tile, stride):
    """Validate region [H, W] / [H, W, C] and grid args -> (region [H, W, C], (th, tw), (sy, sx))."""
    if isinstance(region, (np.ndarray, torch.Tensor)) and region.ndim == 2:
        region = region[..., None]
    if not isinstance(region, (np.ndarray, torch.Tensor)) or region.ndim != 3:
        shape = tuple(region.shape) if hasattr(region, "shape") else type(region).__name__
        raise ValueError(f"region: expected uint8 [H, W, C] (or [H, W]), got {shape}")
    region = prepare_tiles(region[None], name="region")[0]
    tile = _pair(tile, "tile")
    stride = tile if stride is None else _pair(stride, "stride")
    if tile[0] > region.shape[0] or tile[1] > region.shape[1]:
        raise ValueError(f"tile {tile} is larger than the region {tuple(region.shape[:2])}")
    return region, tile, stride


def shannon_grid_histogram_reference(region, tile, stride=None) -> np.ndarray:
    """Histograms int64 [ny * nx, C, 256] of the tile grid over ``region`` (numpy oracle; copies the tiles)."""
    region, (th, tw), (sy, sx) = _prepare_grid(region, tile, stride)
    region = region.detach().cpu().numpy() if isinstance(region, torch.Tensor) else region
    windows = np.lib.stride_tricks.sliding_window_view(region, (th, tw), axis=(0, 1))[::sy, ::sx]  # [ny, nx, C, th, tw]
    return shannon_histogram_reference(np.ascontiguousarray(windows.transpose(0, 1, 3, 4, 2)).reshape(-1, th, tw, region.shape[2]))


# ----------------------------------------------------------------------------------------------------------------
# Native custom ops: tiles are passed as base pointer + per-tile element offsets + strides (no copies).


def _check_tiles_op(op: str, data: torch.Tensor, dims: int) -> None:
    """Checks inside the registered ops (what torch.compile graphs call), before any pointer is read."""
    if data.dtype != torch.uint8 or data.dim() != dims:
        raise ValueError(f"isg::{op}: expected uint8 with {dims} dims, got {data.dtype} {tuple(data.shape)}")
    if data.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"isg::{op}: no kernel for device {data.device} (cpu or cuda)")
    if not 1 <= data.shape[-1] <= (64 if data.device.type != "cuda" else 4):
        raise ValueError(f"isg::{op}: {data.shape[-1]} channels (1..4 on CUDA, 1..64 on CPU)")


def _launch_histogram(data: torch.Tensor, offsets: torch.Tensor, height: int, width: int, channels: int,
                      strides: tuple[int, int, int]) -> torch.Tensor:
    """Histograms int32 [tiles, channels, 256] of the tiles at data + offsets (element offsets, on data's device)."""
    hist = torch.empty((offsets.numel(), channels, 256), dtype=torch.int32, device=data.device)
    if offsets.numel():
        batch = (data.data_ptr(), offsets.data_ptr(), offsets.numel(), height, width, channels, *strides)
        native.call("shannon_histogram", data.device, batch, hist.data_ptr())
    return hist


@torch.library.custom_op("isg::shannon_histogram", mutates_args=())
def _histogram_op(tiles: torch.Tensor) -> torch.Tensor:
    _check_tiles_op("shannon_histogram", tiles, 4)
    batch, height, width, channels = tiles.shape
    if min(height, width) < 1:
        raise ValueError(f"isg::shannon_histogram: empty tiles {tuple(tiles.shape)}")
    offsets = torch.arange(batch, dtype=torch.int64, device=tiles.device) * tiles.stride(0)
    return _launch_histogram(tiles, offsets, height, width, channels, tiles.stride()[1:])


@_histogram_op.register_fake
def _(tiles):
    _check_tiles_op("shannon_histogram", tiles, 4)
    return tiles.new_empty((tiles.shape[0], tiles.shape[3], 256), dtype=torch.int32)


def _check_grid_op(region: torch.Tensor, tile_h: int, tile_w: int, stride_y: int, stride_x: int) -> None:
    _check_tiles_op("shannon_grid_histogram", region, 3)
    if min(tile_h, tile_w, stride_y, stride_x) < 1 or tile_h > region.shape[0] or tile_w > region.shape[1]:
        raise ValueError(f"isg::shannon_grid_histogram: tile ({tile_h}, {tile_w}) stride ({stride_y}, {stride_x}) "
                         f"do not fit region {tuple(region.shape)}")


@torch.library.custom_op("isg::shannon_grid_histogram", mutates_args=())
def _grid_histogram_op(region: torch.Tensor, tile_h: int, tile_w: int, stride_y: int, stride_x: int) -> torch.Tensor:
    _check_grid_op(region, tile_h, tile_w, stride_y, stride_x)
    height, width, channels = region.shape
    ny, nx = grid_shape(height, width, (tile_h, tile_w), (stride_y, stride_x))
    ys = torch.arange(ny, dtype=torch.int64, device=region.device) * (stride_y * region.stride(0))
    xs = torch.arange(nx, dtype=torch.int64, device=region.device) * (stride_x * region.stride(1))
    offsets = (ys[:, None] + xs[None, :]).reshape(-1)                       # [ny * nx], row-major grid
    return _launch_histogram(region, offsets, tile_h, tile_w, channels, region.stride())


@_grid_histogram_op.register_fake
def _(region, tile_h, tile_w, stride_y, stride_x):
    _check_grid_op(region, tile_h, tile_w, stride_y, stride_x)
    ny, nx = grid_shape(region.shape[0], region.shape[1], (tile_h, tile_w), (stride_y, stride_x))
    return region.new_empty((ny * nx, region.shape[2], 256), dtype=torch.int32)


def _check_bits_op(hist: torch.Tensor) -> None:
    if hist.dtype != torch.int64 or hist.dim() != 3 or hist.shape[2] != 256:
        raise ValueError(f"isg::shannon_bits_from_histogram: expected int64 [B, C, 256], got {hist.dtype} {tuple(hist.shape)}")
    if hist.device.type not in ("cpu", "meta"):
        raise ValueError(f"isg::shannon_bits_from_histogram: bits are computed on the host (identical on every device); "
                         f"got a histogram on {hist.device}: move it with .cpu()")


@torch.library.custom_op("isg::shannon_bits_from_histogram", mutates_args=())
def _bits_op(hist: torch.Tensor) -> torch.Tensor:
    _check_bits_op(hist)
    hist = hist.contiguous()
    bits = torch.empty(hist.shape[0], dtype=torch.float64)
    if hist.shape[0]:
        native.call("shannon_bits", hist.device, hist.data_ptr(), hist.shape[0], hist.shape[1], bits.data_ptr())
    return bits


@_bits_op.register_fake
def _(hist):
    _check_bits_op(hist)
    return hist.new_empty((hist.shape[0],), dtype=torch.float64)


def _native(device: torch.device) -> bool:
    """Whether the histogram kernel serves tensors on ``device``; warns once when it does not on CPU or CUDA."""
    if native.available("shannon_histogram", device):
        return True
    native.warn_fallback("shannon_histogram", "shannon_histogram", device)
    return False


def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.detach()
    if any(s < 0 for s in array.strides):       # torch.from_numpy rejects negative strides
        array = np.ascontiguousarray(array)
    return torch.from_numpy(array)


# ----------------------------------------------------------------------------------------------------------------
# Public functions: native kernels when built for the input's device, else the numpy reference.


def shannon_histogram(tiles) -> np.ndarray | torch.Tensor:
    """Residual histograms int64 [B, C, 256] of uint8 tiles [B, H, W, C] (any strides; C = 1, 3, or 4 with alpha
    dropped). Returns numpy for numpy input, else a tensor on the input's device."""
    tiles = prepare_tiles(tiles)
    is_numpy = isinstance(tiles, np.ndarray)
    x = _as_tensor(tiles)
    if _native(x.device):
        hist = _histogram_op(x).long()
    elif x.device.type != "cpu":
        hist = shannon_histogram_torch(x)
    else:
        hist = torch.from_numpy(shannon_histogram_reference(x.numpy()))
    return hist.numpy() if is_numpy else hist


def histogram_bits(hist) -> np.ndarray:
    """Bits float64 [B] of residual histograms int64 [B, C, 256], computed on the host for histograms from
    any device (native when built, else numpy), so a ranking never depends on the device."""
    x = _as_tensor(np.asarray(hist, dtype=np.int64) if not isinstance(hist, torch.Tensor) else hist)
    if x.dtype != torch.int64 or x.ndim != 3 or x.shape[2] != 256:
        raise ValueError(f"hist: expected int64 [B, C, 256], got {x.dtype} {tuple(x.shape)}")
    x = x.cpu()
    if native.available("shannon_bits", x.device):
        return _bits_op(x).numpy()
    native.warn_fallback("shannon_bits", "shannon_bits", x.device)
    return bits_from_histogram(x.numpy())


CHUNK_TILES = 4096  # bits are computed per chunk of tiles: histograms take C * 2 KiB per tile


def shannon_bits(tiles) -> np.ndarray:
    """Information content in bits, float64 [B], of uint8 tiles [B, H, W, C] (numpy or torch, any device)."""
    tiles = prepare_tiles(tiles)
    if len(tiles) <= CHUNK_TILES:
        return histogram_bits(shannon_histogram(tiles))
    return np.concatenate([histogram_bits(shannon_histogram(tiles[start:start + CHUNK_TILES]))
                           for start in range(0, len(tiles), CHUNK_TILES)])


def shannon_grid_histogram(region, tile, stride=None) -> np.ndarray | torch.Tensor:
    """Histograms int64 [ny * nx, C, 256] of the tile grid over a decoded region [H, W, C] (or [H, W]) without
    copying it: tile (iy, ix) covers rows iy*sy .. iy*sy+th and cols ix*sx .. ix*sx+tw (row-major order).
    ``tile`` and ``stride`` (default: tile) are ints or (h, w) pairs."""
    region, (th, tw), (sy, sx) = _prepare_grid(region, tile, stride)
    is_numpy = isinstance(region, np.ndarray)
    x = _as_tensor(region)
    if _native(x.device):
        hist = _grid_histogram_op(x, th, tw, sy, sx).long()
    elif x.device.type != "cpu":
        hist = shannon_histogram_torch(_grid_tiles_torch(x, (th, tw), (sy, sx)))
    else:
        hist = torch.from_numpy(shannon_grid_histogram_reference(x.cpu().numpy(), (th, tw), (sy, sx))).to(x.device)
    return hist.numpy() if is_numpy else hist


def _grid_tiles_torch(region: torch.Tensor, tile: tuple[int, int], stride: tuple[int, int]) -> torch.Tensor:
    """Tiles [ny * nx, th, tw, C] of the grid over region [H, W, C] (a copy; for the pure-PyTorch fallback)."""
    (th, tw), (sy, sx) = tile, stride
    windows = region.unfold(0, th, sy).unfold(1, tw, sx)                 # [ny, nx, C, th, tw] view
    return windows.permute(0, 1, 3, 4, 2).reshape(-1, th, tw, region.shape[2])


def shannon_grid_bits(region, tile, stride=None) -> np.ndarray:
    """Bits float64 [ny, nx] of the tile grid over ``region`` (see :func:`shannon_grid_histogram`)."""
    region, tile, stride = _prepare_grid(region, tile, stride)
    ny, nx = grid_shape(region.shape[0], region.shape[1], tile, stride)
    rows = max(1, CHUNK_TILES // nx)                     # grid rows per chunk; each chunk is a view of region
    chunks = [histogram_bits(shannon_grid_histogram(region[y0 * stride[0]: (min(y0 + rows, ny) - 1) * stride[0] + tile[0]],
                                                    tile, stride))
              for y0 in range(0, ny, rows)]
    return np.concatenate(chunks).reshape(ny, nx)
