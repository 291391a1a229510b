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
   ``k -> min(k, n - k)``, the same double-precision formula in numpy, C++ and
   CUDA (``csrc/shannon/shannon_bits.h``).

A flat tile costs a few dozen bits per channel, a noise tile ~8 bits per
subpixel. RGBA input: the alpha channel is dropped (it carries no tissue
information); 1-channel (grey) input is scored as one channel.

Functions here: :func:`shannon_histogram_reference` / :func:`shannon_bits_reference`
(numpy oracle and fallback), :func:`bits_from_histogram`, and the public
:func:`shannon_histogram`, :func:`shannon_bits` and :func:`shannon_grid_bits`
which use the native kernels (``isg._C``, CPU OpenMP or CUDA) when available.
"""

from __future__ import annotations

import numpy as np
import torch

from isg import _ext

__all__ = [
    "prepare_tiles", "shannon_histogram_reference", "shannon_bits_reference", "bits_from_histogram",
    "shannon_histogram", "shannon_bits", "shannon_grid_histogram", "shannon_grid_bits", "grid_shape",
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
    batch, _, _, channels = tiles.shape
    residuals = _residuals_reference(np.asarray(tiles)).transpose(0, 3, 1, 2).reshape(batch * channels, -1)  # [B*C, N]
    index = residuals.astype(np.int64) + 256 * np.arange(batch * channels, dtype=np.int64)[:, None]
    return np.bincount(index.ravel(), minlength=batch * channels * 256).reshape(batch, channels, 256)


def _log2_binomial(n, k) -> np.ndarray:
    """log2 C(n, k) = sum_{i=1..k} log2((n - k + i) / i) with k -> min(k, n - k); float64, elementwise (k <= 128)."""
    n = np.asarray(n, dtype=np.int64)
    k = np.asarray(k, dtype=np.int64)
    n, k = np.broadcast_arrays(n, np.minimum(k, n - k))
    i = np.arange(1, 129, dtype=np.int64)                                   # [128]
    take = i <= k[..., None]                                                # [..., 128]
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


# Native dispatch is added below (shannon_histogram / shannon_bits / grid).


def shannon_histogram(tiles) -> np.ndarray | torch.Tensor:
    """Residual histograms [B, C, 256] int64 (numpy for numpy input, torch on the input's device otherwise)."""
    tiles = prepare_tiles(tiles)
    hist = shannon_histogram_reference(tiles)
    return torch.from_numpy(hist).to(tiles.device) if isinstance(tiles, torch.Tensor) else hist


def shannon_bits(tiles) -> np.ndarray:
    """Information content in bits, float64 [B], of uint8 tiles [B, H, W, C] (C = 1, 3, or 4 with alpha dropped)."""
    return bits_from_histogram(shannon_histogram(tiles))
