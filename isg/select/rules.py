"""Selection rules over per-tile scores (paper Sec. 4.2) and the default bit threshold."""

from __future__ import annotations

import numpy as np

RULES = ("threshold", "topk", "mean_std")
PAPER_THRESHOLD_BITS = 1.6e6   # paper's Shannon threshold ...
PAPER_PATCH_SIZE = 512         # ... assumed to be for its 512 x 512 RGB global patches

__all__ = ["RULES", "PAPER_THRESHOLD_BITS", "PAPER_PATCH_SIZE", "select", "default_threshold_bits"]


def default_threshold_bits(patch_size: int | tuple[int, int]) -> float:
    """Paper's 1.6e6 bits for a 512 x 512 patch, scaled by pixel count: ``1.6e6 * h * w / 512**2``.

    Information grows with area for a given texture, so bits per pixel are kept
    (~6.1 bits per RGB pixel, ~2 bits per subpixel).
    """
    size = (patch_size, patch_size) if np.isscalar(patch_size) else tuple(patch_size)
    if len(size) != 2 or any(not np.isscalar(v) or int(v) != v or v < 1 for v in size):
        raise ValueError(f"patch_size must be a positive int or (h, w), got {patch_size!r}")
    h, w = size
    return PAPER_THRESHOLD_BITS * float(h) * float(w) / PAPER_PATCH_SIZE**2


def select(scores, rule: str = "threshold", threshold: float | None = None, k: int | None = None,
           n_sigma: float = 1.0, min_keep: int = 1) -> np.ndarray:
    """Boolean keep-mask np.bool_ [N] over ``scores`` [N] (higher = more informative).

    * ``"threshold"``: ``scores >= threshold`` (e.g. ``default_threshold_bits(p)``);
    * ``"topk"``: the ``k`` highest scores (ties broken by lower index);
    * ``"mean_std"``: ``scores > mean + n_sigma * std`` (population std; paper: n_sigma = 1).

    When fewer than ``min_keep`` tiles pass, the ``min_keep`` highest-scoring
    tiles are kept instead (so a slide never ends up empty); ``min_keep=0`` disables this.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s)")
    if min_keep < 0:
        raise ValueError(f"min_keep must be >= 0, got {min_keep}")
    order = np.argsort(-scores, kind="stable")  # best first, ties by index
    if rule == "threshold":
        if threshold is None:
            raise ValueError("rule='threshold' needs threshold= (e.g. isg.select.default_threshold_bits(patch_size))")
        keep = scores >= threshold
    elif rule == "topk":
        if k is None or int(k) != k or k < 0:
            raise ValueError(f"rule='topk' needs a non-negative integer k=, got {k!r}")
        keep = np.zeros(scores.shape, dtype=bool)
        keep[order[: int(k)]] = True
    elif rule == "mean_std":
        keep = scores > scores.mean() + n_sigma * scores.std() if scores.size else np.zeros(0, dtype=bool)
    else:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    if keep.sum() < min(min_keep, scores.size):
        keep = np.zeros(scores.shape, dtype=bool)
        keep[order[:min_keep]] = True
    return keep
