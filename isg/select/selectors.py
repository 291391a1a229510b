"""Tile scorers behind one interface: uint8 tiles [B, H, W, C] -> float64 [B], higher = more informative.

``shannon`` is the paper's scorer (bits of a two-part code, :mod:`isg.ops.shannon`);
the others are the baselines of the paper's comparison, on the grey image
(ITU-R 601 luma, as ``cv2.COLOR_RGB2GRAY``):

* ``otsu``: HE2RNA-style tissue fraction: share of pixels darker than the Otsu
  threshold of the grey levels pooled over the whole batch (the slide's tiles),
  capped at ``OTSU_MAX_GREY`` so a batch of background alone is not split in two;
* ``gradient``: mean Sobel gradient magnitude (3x3);
* ``canny``: edge density, share of Canny edge pixels (hysteresis 50/100);
* ``dog``: mean |Gaussian(sigma=1) - Gaussian(sigma=2)|;
* ``log``: mean |Laplacian of Gaussian(sigma=1.5)|.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from isg.ops.shannon import prepare_tiles, shannon_bits

SELECTORS = ("shannon", "otsu", "gradient", "canny", "dog", "log")
OTSU_MAX_GREY = 220  # white slide background is brighter than this (0..255)

__all__ = ["SELECTORS", "OTSU_MAX_GREY", "score_tiles", "get_selector", "grey_tiles"]


def score_tiles(tiles) -> np.ndarray:
    """Information content in bits, float64 [B], of uint8 tiles [B, H, W, C] (numpy or torch; C = 1, 3, or 4 = RGBA
    whose alpha is dropped). Uses the native C++/CUDA scorer when built, else the numpy reference."""
    return shannon_bits(tiles)


def grey_tiles(tiles) -> np.ndarray:
    """uint8 grey tiles [B, H, W] of uint8 tiles [B, H, W, C] (numpy or torch)."""
    import cv2

    tiles = prepare_tiles(tiles)
    if isinstance(tiles, torch.Tensor):
        tiles = tiles.detach().cpu().numpy()
    if tiles.shape[-1] == 1:
        return np.ascontiguousarray(tiles[..., 0])
    return np.stack([cv2.cvtColor(np.ascontiguousarray(tile), cv2.COLOR_RGB2GRAY) for tile in tiles])


def _otsu(tiles) -> np.ndarray:
    from skimage.filters import threshold_otsu

    grey = grey_tiles(tiles)
    if grey.size == 0 or np.ptp(grey) == 0:
        threshold = min(int(grey.flat[0]) if grey.size else 0, OTSU_MAX_GREY)
    else:
        threshold = min(threshold_otsu(grey), OTSU_MAX_GREY)
    return (grey < threshold).mean(axis=(1, 2), dtype=np.float64)


def _per_tile(fn: Callable[[np.ndarray], float]) -> Callable:
    def score(tiles) -> np.ndarray:
        return np.array([fn(tile) for tile in grey_tiles(tiles)], dtype=np.float64)
    return score


def _gradient(grey: np.ndarray) -> float:
    import cv2

    x = grey.astype(np.float32)
    gx, gy = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.sqrt(gx * gx + gy * gy).mean(dtype=np.float64))


def _canny(grey: np.ndarray) -> float:
    import cv2

    return float((cv2.Canny(np.ascontiguousarray(grey), 50, 100) > 0).mean())


def _dog(grey: np.ndarray) -> float:
    import cv2

    x = grey.astype(np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    coarse = cv2.GaussianBlur(x, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)
    return float(np.abs(fine - coarse).mean(dtype=np.float64))


def _log(grey: np.ndarray) -> float:
    import cv2

    x = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    return float(np.abs(cv2.Laplacian(x, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)).mean(dtype=np.float64))


_REGISTRY: dict[str, Callable] = {
    "shannon": score_tiles,
    "otsu": _otsu,
    "gradient": _per_tile(_gradient),
    "canny": _per_tile(_canny),
    "dog": _per_tile(_dog),
    "log": _per_tile(_log),
}


def get_selector(name: str) -> Callable:
    """Scorer ``tiles -> np.float64 [B]`` (higher = more informative) for ``name`` in :data:`SELECTORS`."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; expected one of {', '.join(SELECTORS)}") from None
