"""Patch selection (paper Sec. 3.1 scorer, Sec. 4.2 rule): score tiles by information content, keep the informative ones.

``score_tiles(tiles)`` gives bits per uint8 tile (:mod:`isg.ops.shannon`);
``get_selector(name)`` returns the Shannon scorer or a baseline (Otsu tissue
fraction, gradient, Canny, DoG, LoG) with the same signature; ``select`` turns
scores into a keep-mask by a :class:`SelectionRule` (per-slide mean + n sigma,
the paper's frozen cohort cut, an absolute threshold, or top-k);
:func:`apply_rule` re-applies a rule to the scores stored by ``isg preprocess``.
"""

from isg.select.rules import (DEFAULT_RULE, N_SIGMA, NATURAL_RULES, PAPER_ABLATION_BITS, PAPER_PATCH_SIZE, PAPER_THRESHOLD_BITS, RANK_SHARE, RULES,
                              SelectionRule, SelectionWarning, cohort_threshold, default_threshold_bits,
                              mean_std_threshold, robust_z_threshold, select)
from isg.select.known_answer import signal_precision, stored_patches
from isg.select.selectors import SELECTORS, get_selector, grey_tiles, otsu_grey_threshold, score_tiles
from isg.select.stored import SELECTION_FILE, apply_rule, read_scores, read_selection, reselect_h5

__all__ = ["signal_precision", "stored_patches", "SELECTORS", "RULES", "RANK_SHARE", "robust_z_threshold", "N_SIGMA", "DEFAULT_RULE", "NATURAL_RULES", "PAPER_PATCH_SIZE", "PAPER_THRESHOLD_BITS", "PAPER_ABLATION_BITS",
           "SELECTION_FILE", "SelectionRule", "SelectionWarning", "score_tiles", "get_selector", "grey_tiles",
           "otsu_grey_threshold", "select", "mean_std_threshold", "cohort_threshold", "default_threshold_bits",
           "apply_rule", "read_scores", "read_selection", "reselect_h5"]
