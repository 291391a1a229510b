"""Tile scorers behind one interface: uint8 tiles [B, H, W, C] -> float64 [B], higher = more informative.

``shannon`` is the paper's scorer (bits of a two-part code, :mod:`isg.ops.shannon`);
the others are the baselines of the paper's comparison, on the grey image
(ITU-R 601 luma, as ``cv2.COLOR_RGB2GRAY``):

* ``otsu``: HE2RNA-style tissue fraction: share of pixels at or below a grey
  threshold (tissue is dark; skimage's Otsu puts the background above it), by default the Otsu threshold of the grey levels pooled over the
  batch, capped at ``OTSU_MAX_GREY`` so a batch of background alone is not split
  in two. That default depends on the batch: for scores comparable across
  batches pass the slide's threshold, ``get_selector("otsu",
  threshold=otsu_grey_threshold(thumbnail))``;
* ``gradient``: mean Sobel gradient magnitude (3x3);
* ``canny``: edge density, share of Canny edge pixels (hysteresis 50/100);
* ``dog``: mean |Gaussian(sigma=1) - Gaussian(sigma=2)|;
* ``log``: mean |Laplacian of Gaussian(sigma=1.5)|.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from isg.ops.shannon import prepare_tiles, shannon_bits

SELECTORS = ("shannon", "otsu", "gradient", "canny", "dog", "log")
OTSU_MAX_GREY = 220  # white slide background is brighter than this (0..255)

__all__ = ["SELECTORS", "OTSU_MAX_GREY", "score_tiles", "get_selector", "grey_tiles", "otsu_grey_threshold"]


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


def otsu_grey_threshold(images) -> float:
    """Otsu threshold of the grey levels of uint8 images ([H, W, C] or tiles [B, H, W, C]), capped at
    ``OTSU_MAX_GREY``; a uniform input gives ``min(its level, OTSU_MAX_GREY)``. Tissue: ``grey <= threshold``."""
    from isg.io import otsu_threshold

    images = images[None] if getattr(images, "ndim", 0) == 3 else images
    return otsu_threshold(grey_tiles(images), upper=OTSU_MAX_GREY)


def _otsu(tiles, threshold: float | None = None) -> np.ndarray:
    grey = grey_tiles(tiles)
    if threshold is None:
        threshold = otsu_grey_threshold(tiles)
    return (grey <= threshold).mean(axis=(1, 2), dtype=np.float64)


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


def get_selector(name: str, **options) -> Callable:
    """Scorer ``tiles -> np.float64 [B]`` (higher = more informative) for ``name`` in :data:`SELECTORS`.

    ``options`` are fixed keyword arguments of the scorer; only ``otsu`` takes one (``threshold``: grey level).
    """
    try:
        scorer = _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; expected one of {', '.join(SELECTORS)}") from None
    if not options:
        return scorer
    if name != "otsu" or set(options) != {"threshold"}:
        raise ValueError(f"selector {name!r} takes no options {sorted(options)}"
                         + (" (otsu takes threshold=)" if name == "otsu" else ""))
    return functools.partial(scorer, **options)
