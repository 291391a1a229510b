"""Selection rules over per-tile scores (paper Sec. 4.2, Tab. 4) and the default bit threshold.

A rule turns scores [N] (higher = more informative) into a keep-mask:

* ``"mean_std"`` (default): keep ``scores > mean + n_sigma * std`` of the slide's own scores;
* ``"cohort"`` (the paper's rule): one absolute cut for every slide, ``mean + n_sigma * std`` over
  the scores of all patches of a cohort (:func:`cohort_threshold`), frozen and reused on new slides;
* ``"threshold"``: keep ``scores >= threshold`` (e.g. :func:`default_threshold_bits`);
* ``"topk"``: the ``k`` highest scores (equal-budget comparisons).

:class:`SelectionRule` holds a rule and its parameters; its field defaults are the one definition
of the default rule (``isg preprocess`` and ``isg select`` read them). :data:`NATURAL_RULES` gives
every selector the rule it is meant to be used with.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, replace

import numpy as np

RULES = ("mean_std", "cohort", "threshold", "topk")
PAPER_THRESHOLD_BITS = 1.6e6   # paper Sec. 4.2 / Tab. 4: the Shannon threshold ...
PAPER_PATCH_SIZE = 512         # ... assumed to be for 512 x 512 RGB patches (docs/selection.md)
PAPER_ABLATION_BITS = (8e5, 1.6e6, 2.4e6)  # paper Tab. 4
PAPER_SIGMA_BITS = 8e5  # the mapping of the paper's bits to cuts: mean and sigma both ~8e5 bits (paper_cut)
N_SIGMA = 1.0  # paper Sec. 4.2: keep patches "at least one positive standard deviation from the mean"

__all__ = ["RULES", "N_SIGMA", "PAPER_THRESHOLD_BITS", "PAPER_PATCH_SIZE", "PAPER_ABLATION_BITS", "PAPER_SIGMA_BITS", "NATURAL_RULES", "DEFAULT_RULE",
           "SelectionRule", "SelectionWarning", "select", "mean_std_threshold", "cohort_threshold",
           "default_threshold_bits", "paper_sigmas", "paper_cut"]


class SelectionWarning(UserWarning):
    """A rule kept nothing (and ``min_keep`` stepped in) or its scores saturate."""


@dataclass(frozen=True)
class SelectionRule:
    """A selection rule and its parameters (see the module docstring).

    ``threshold`` is the absolute cut of ``"threshold"`` and, once frozen over a cohort, of
    ``"cohort"`` (bits for the Shannon selector); ``k`` is the budget of ``"topk"``; when fewer than
    ``min_keep`` tiles pass, the ``min_keep`` best are kept and a :class:`SelectionWarning` says so.
    """

    rule: str = "mean_std"
    n_sigma: float = N_SIGMA
    threshold: float | None = None
    k: int | None = None
    min_keep: int = 1

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULES)}")
        if not np.isfinite(self.n_sigma):
            raise ValueError(f"n_sigma must be a finite number, got {self.n_sigma!r}")
        if self.rule == "topk" and (self.k is None or int(self.k) != self.k or self.k < 0):
            raise ValueError(f"rule 'topk' needs a non-negative integer k=, got {self.k!r}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")

    def with_threshold(self, threshold: float) -> SelectionRule:
        return replace(self, threshold=float(threshold))

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_RULE = SelectionRule()  # the default rule: isg preprocess, isg select and the library read it

# The rule each selector is meant to be used with (paper Tab. 2 comparison). Otsu scores are tissue
# fractions in [0, 1] that saturate at 1.0 for most tissue patches, so mean + sigma would keep nothing;
# HE2RNA keeps tiles with at least half tissue.
NATURAL_RULES: dict[str, SelectionRule] = {
    "shannon": SelectionRule("mean_std", n_sigma=N_SIGMA),
    "otsu": SelectionRule("threshold", threshold=0.5),
    "gradient": SelectionRule("mean_std", n_sigma=N_SIGMA),
    "canny": SelectionRule("mean_std", n_sigma=N_SIGMA),
    "dog": SelectionRule("mean_std", n_sigma=N_SIGMA),
    "log": SelectionRule("mean_std", n_sigma=N_SIGMA),
}


def default_threshold_bits(patch_size: int | tuple[int, int]) -> float:
    """Paper's 1.6e6 bits for a 512 x 512 patch, scaled by pixel count: ``1.6e6 * h * w / 512**2``.

    Information grows with area for a given texture, so bits per pixel are kept
    (~6.1 bits per RGB pixel, ~2 bits per subpixel). Where this falls on real tissue: docs/selection.md.
    """
    size = (patch_size, patch_size) if np.isscalar(patch_size) else tuple(patch_size)
    if len(size) != 2 or any(not np.isscalar(v) or int(v) != v or v < 1 for v in size):
        raise ValueError(f"patch_size must be a positive int or (h, w), got {patch_size!r}")
    h, w = size
    return PAPER_THRESHOLD_BITS * float(h) * float(w) / PAPER_PATCH_SIZE**2


def paper_sigmas(bits: float) -> float:
    """Where the paper's cut of ``bits`` sits in its cohort's score distribution: mean + z sigma, z = bits / 8e5 - 1.

    The one mapping of the paper's Tab. 4 (docs/selection.md): the paper puts 1.6e6 bits at about mean + 1 sigma;
    with evenly spaced cuts 8e5 / 1.6e6 / 2.4e6 that holds when its mean and sigma are both ~8e5 bits, so the
    three cuts are mean + 0 / 1 / 2 sigma. Bits do not transfer between scorers, positions do.
    """
    return float(bits) / PAPER_SIGMA_BITS - 1.0


def paper_cut(bits: float, scores_per_slide, patch_size: int | None = None) -> float:
    """The paper's cut of ``bits`` on this cohort (a list of per-slide scores [N_i]): :func:`cohort_threshold` at
    :func:`paper_sigmas` of ``bits``. ``patch_size`` is not used: the mapping is by position, not by area."""
    return cohort_threshold(scores_per_slide, paper_sigmas(bits))


def _checked(scores) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {scores.shape}")
    if np.isnan(scores).any():
        raise ValueError(f"scores contain {int(np.isnan(scores).sum())} NaN value(s)")
    return scores


def mean_std_threshold(scores, n_sigma: float = N_SIGMA) -> float:
    """``mean + n_sigma * std`` (population std) of ``scores`` [N]: the paper's cut (Sec. 4.2, n_sigma = 1)."""
    scores = _checked(scores)
    if scores.size == 0:
        raise ValueError("mean + n_sigma * std of no scores")
    return float(scores.mean() + n_sigma * scores.std())


def cohort_threshold(scores_per_slide, n_sigma: float = N_SIGMA) -> float:
    """The paper's cohort cut: ``mean + n_sigma * std`` over the pooled scores of every slide (a list of [N_i])."""
    pooled = [_checked(s) for s in scores_per_slide]
    if not pooled or sum(s.size for s in pooled) == 0:
        raise ValueError("cohort threshold: no scores (no slide, or slides without tissue patches)")
    return mean_std_threshold(np.concatenate(pooled), n_sigma)


def select(scores, rule: str | SelectionRule = "mean_std", threshold: float | None = None, k: int | None = None,
           n_sigma: float = N_SIGMA, min_keep: int = 1, name: str | None = None) -> np.ndarray:
    """Boolean keep-mask np.bool_ [N] over ``scores`` [N] (higher = more informative).

    ``rule`` is a :class:`SelectionRule` or a rule name whose parameters are the other arguments:

    * ``"mean_std"``: ``scores > mean + n_sigma * std`` of these scores (paper: n_sigma = 1);
    * ``"threshold"``, ``"cohort"``: ``scores >= threshold`` (``"cohort"`` needs the frozen cohort cut,
      :func:`cohort_threshold`);
    * ``"topk"``: the ``k`` highest scores (ties broken by lower index).

    When fewer than ``min_keep`` tiles pass, the ``min_keep`` highest-scoring tiles are kept instead
    and a :class:`SelectionWarning` names ``name`` (e.g. the slide), the cut and the score range, and
    whether the scores saturate; ``min_keep=0`` keeps nothing, with the same warning.
    """
    if isinstance(rule, SelectionRule):
        rule, threshold, k, n_sigma, min_keep = rule.rule, rule.threshold, rule.k, rule.n_sigma, rule.min_keep
    else:
        SelectionRule(rule, n_sigma=n_sigma, threshold=threshold, k=k, min_keep=min_keep)  # validates
    scores = _checked(scores)
    order = np.argsort(-scores, kind="stable")  # best first, ties by index
    cut = None
    if rule in ("threshold", "cohort"):
        if threshold is None:
            hint = ("isg.select.cohort_threshold(scores of every slide)" if rule == "cohort"
                    else "isg.select.default_threshold_bits(patch_size)")
            raise ValueError(f"rule {rule!r} needs threshold= (e.g. {hint})")
        cut = float(threshold)
        keep = scores >= cut
    elif rule == "topk":
        keep = np.zeros(scores.shape, dtype=bool)
        keep[order[: int(k)]] = True
    else:  # mean_std
        cut = mean_std_threshold(scores, n_sigma) if scores.size else np.inf
        keep = scores > cut
    if scores.size and (keep.sum() < min(min_keep, scores.size) or (not keep.any() and rule != "topk")):
        _warn_too_few(scores, rule, cut, int(keep.sum()), min_keep, name)
        if min_keep:
            keep = np.zeros(scores.shape, dtype=bool)
            keep[order[:min_keep]] = True
    return keep


def _warn_too_few(scores: np.ndarray, rule: str, cut: float | None, passed: int, min_keep: int, name: str | None) -> None:
    top = scores.max()
    at_top = float((scores == top).mean())
    where = f"{name}: " if name else ""
    cut_text = f" (cut {cut:.6g}, scores {scores.min():.6g}..{top:.6g})" if cut is not None else ""
    saturated = (f"; the scores saturate: {at_top:.0%} of the {scores.size} tiles share the maximum {top:.6g}"
                 if at_top >= 0.1 and scores.size > 1 and cut is not None else "")
    action = f"keeping the {min_keep} best instead" if min_keep else "keeping none"
    warnings.warn(f"{where}rule {rule!r} keeps {passed} of {scores.size} tiles{cut_text}{saturated}; {action}",
                  SelectionWarning, stacklevel=3)
