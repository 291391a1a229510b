"""Slide figures: per-patch values drawn over the slide thumbnail (``isg predict --heatmaps``)."""

from __future__ import annotations

import os

import numpy as np


def patch_value_image(shape: tuple[int, int], dimensions, coords: np.ndarray, side: float, values: np.ndarray) -> np.ndarray:
    """float [h, w] map of ``values`` [N] painted over each patch's box (NaN where no patch).

    ``coords`` [N, 2] level-0 (x, y) top-left corners, ``side`` the level-0 patch side, ``shape``
    (h, w) of the thumbnail whose width spans ``dimensions[0]`` level-0 pixels.
    """
    image = np.full(shape, np.nan, np.float32)
    scale = shape[1] / dimensions[0]
    for (x, y), value in zip(np.asarray(coords, np.float64) * scale, values):
        x0, y0 = int(round(x)), int(round(y))
        x1, y1 = max(x0 + 1, int(round(x + side * scale))), max(y0 + 1, int(round(y + side * scale)))
        image[y0:y1, x0:x1] = value
    return image


def plot_patch_heatmap(path: str | os.PathLike, thumb: np.ndarray, dimensions, coords: np.ndarray, side: float,
                       values: np.ndarray, title: str = "", label: str = "value", alpha: float = 0.65) -> None:
    """PNG: ``thumb`` [h, w, 3] with each patch box filled by its value (viridis, colour bar ``label``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from isg.eval.metrics import save_figure

    overlay = patch_value_image(thumb.shape[:2], dimensions, coords, side, values)
    height, width = thumb.shape[:2]
    figure, axis = plt.subplots(figsize=(7, 7 * height / width + 0.6))
    axis.imshow(thumb)
    finite = np.asarray(values)[np.isfinite(values)]
    shown = axis.imshow(np.ma.masked_invalid(overlay), cmap="viridis", alpha=alpha, interpolation="nearest",
                        vmin=finite.min() if len(finite) else None, vmax=finite.max() if len(finite) else None)
    figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.02, label=label)
    axis.set_axis_off()
    axis.set_title(title)
    save_figure(figure, path)
