"""Sample tiles for tests and benchmarks (a test fixture, imported as ``tissue_samples``), built from scikit-image's bundled immunohistochemistry image.

:func:`slide_like_tiles` mimics the tiles of a slide: real histology crops (full
and half resolution) covered by a varying fraction of near-white scanner
background, plus synthetic noise, posterized and blank tiles.
:func:`textureless_tiles` / :func:`textured_tiles` are the two sides of the
paper's Fig. 2.
"""

from __future__ import annotations

import numpy as np

__all__ = ["histology_image", "slide_like_tiles", "textureless_tiles", "textured_tiles"]


def histology_image() -> np.ndarray:
    """uint8 [512, 512, 3] real IHC-stained tissue (``skimage.data.immunohistochemistry``)."""
    import skimage.data

    return skimage.data.immunohistochemistry()


def _background(rng: np.random.Generator, shape, level: float = 238.0, sigma: float = 0.6) -> np.ndarray:
    return np.clip(rng.normal(level, sigma, shape), 0, 255).round().astype(np.uint8)


def slide_like_tiles(p: int = 64, fraction_steps: int = 9, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiles uint8 [N, p, p, 3] and their kind (str [N]: 'tissue', 'partial', 'noise', 'posterized', 'blank')."""
    import cv2

    rng = np.random.default_rng(seed)
    image = histology_image()
    half = cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)
    crops = [src[y:y + p, x:x + p] for src, step in ((image, p // 2), (half, p // 4))
             for y in range(0, src.shape[0] - p + 1, step) for x in range(0, src.shape[1] - p + 1, step)]
    tiles, kinds = [], []
    for i, crop in enumerate(crops):                     # tissue covered from the left by background
        width = int(round(p * (i % fraction_steps) / (fraction_steps - 1)))
        tile = crop.copy()
        tile[:, :width] = _background(rng, (p, width, 3))
        tiles.append(tile)
        kinds.append("tissue" if width == 0 else "partial")
    for sigma in (1, 2, 4, 8, 16, 32, 64):
        tiles.append(np.clip(rng.normal(180, sigma, (p, p, 3)), 0, 255).astype(np.uint8))
        kinds.append("noise")
    for q in (8, 32, 64):
        tiles.append((image[300:300 + p, 100:100 + p] // q * q).astype(np.uint8))
        kinds.append("posterized")
    tiles.append(np.full((p, p, 3), 240, np.uint8))
    kinds.append("blank")
    return np.stack(tiles), np.array(kinds)


def textureless_tiles(p: int = 128, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    """Fig. 2 'textureless' tiles: solid colours, white background, scattered noise chunks on a flat
    background, heavily blurred tissue. uint8 [N, p, p, 3] and names."""
    import cv2

    rng = np.random.default_rng(seed)
    image = histology_image()
    tiles, names = [], []
    for colour in ((240, 240, 240), (232, 180, 210), (120, 60, 140)):
        tiles.append(np.broadcast_to(np.array(colour, np.uint8), (p, p, 3)).copy())
        names.append(f"solid{colour}")
    tiles.append(_background(rng, (p, p, 3), 236, 1.0))
    names.append("background")
    chunks = _background(rng, (p, p, 3), 236, 1.0)
    for _ in range(4):                                   # a few small noisy specks (dust, debris)
        y, x = rng.integers(0, p - p // 8, 2)
        chunks[y:y + p // 8, x:x + p // 8] = rng.integers(0, 256, (p // 8, p // 8, 3), dtype=np.uint8)
    tiles.append(chunks)
    names.append("noise_chunks")
    for y, x in ((0, 0), (256, 300)):
        tiles.append(cv2.GaussianBlur(image[y:y + p, x:x + p], (0, 0), 8.0))
        names.append(f"blur@{y},{x}")
    return np.stack(tiles), names


def textured_tiles(p: int = 128) -> np.ndarray:
    """Fig. 2 'textured' tiles: real tissue crops, uint8 [N, p, p, 3]."""
    image = histology_image()
    return np.stack([image[y:y + p, x:x + p] for y in range(0, 512 - p + 1, p) for x in range(0, 512 - p + 1, p)])
