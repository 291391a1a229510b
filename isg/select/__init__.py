"""Patch selection (paper Sec. 3.1): score tiles by information content and keep the informative ones.

``score_tiles(tiles)`` gives bits per uint8 tile (:mod:`isg.ops.shannon`);
``get_selector(name)`` returns the Shannon scorer or a baseline (Otsu tissue
fraction, gradient, Canny, DoG, LoG) with the same signature; ``select`` turns
scores into a keep-mask by a threshold, top-k, or mean + n_sigma * std.
"""

from isg.select.rules import PAPER_PATCH_SIZE, PAPER_THRESHOLD_BITS, RULES, default_threshold_bits, select
from isg.select.selectors import SELECTORS, get_selector, grey_tiles, otsu_grey_threshold, score_tiles

__all__ = ["SELECTORS", "RULES", "PAPER_PATCH_SIZE", "PAPER_THRESHOLD_BITS", "score_tiles", "get_selector",
           "grey_tiles", "otsu_grey_threshold", "select", "default_threshold_bits"]
