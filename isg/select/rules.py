"""Selection rules over per-tile scores (paper Sec. 4.2, Tab. 4) and the default bit threshold.

A rule turns scores [N] (higher = more informative) into a keep-mask and the cut it used
(:class:`Selection`); :func:`select` is the one place a cut is computed. The registered kinds:

* ``"mean_std"``: keep ``scores > mean + n_sigma * std`` of the slide's own scores;
* ``"cohort"`` (the paper's rule): one absolute cut for every slide, ``mean + n_sigma * std`` over
  the scores of all patches of a cohort (:func:`cohort_threshold`), frozen and reused on new slides;
* ``"threshold"``: keep ``scores >= threshold`` (e.g. :func:`default_threshold_bits`);
* ``"topk"``: the ``k`` highest scores (equal-budget comparisons);
* ``"rank"`` (the default): the ``share`` highest scores of the slide, by default :data:`RANK_SHARE` =
  15.87 %, what mean + 1 sigma keeps of normally distributed scores: the share the paper meant, kept
  whatever the skew (real tissue scores are left-skewed and mean + 1 sigma keeps 0-13 % of them,
  docs/selection.md);
* ``"robust_z"``: ``scores > median + n_sigma * 1.4826 * MAD`` of the slide's scores (the z-score of
  robust statistics; 1.4826 * MAD = sigma for normal scores).

:class:`SelectionRule` holds a kind and its parameters and serialises to JSON (``to_dict`` /
``from_dict``: the patch file, ``selection.json`` and ``pipeline.json`` store it); its field defaults
are the one definition of the default rule. Each selector carries the rule it is meant to be used with
(:func:`isg.select.register_selector`, ``natural_rule=``).

Adding a rule kind is one decorated function here: ``@register_rule("name", needs={"param": "hint"})``
on ``fn(scores float64 [N], rule) -> (keep bool [N], cut float | None)``. :class:`SelectionRule`
validates the name against the registry, :func:`select` dispatches to it (and applies ``min_keep``),
and the CLIs list it. A kind whose cut is frozen over a cohort also gives ``freeze=`` (the cut from
every slide's scores; ``isg preprocess`` and ``isg select`` call it). A new parameter is a new field
of :class:`SelectionRule`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np

from isg.utils import from_known_fields

PAPER_THRESHOLD_BITS = 1.6e6   # paper Sec. 4.2 / Tab. 4: the Shannon threshold ...
PAPER_PATCH_SIZE = 512         # ... assumed to be for 512 x 512 RGB patches (docs/selection.md)
PAPER_ABLATION_BITS = (8e5, 1.6e6, 2.4e6)  # paper Tab. 4
PAPER_SIGMA_BITS = 8e5  # the mapping of the paper's bits to cuts: mean and sigma both ~8e5 bits (paper_cut)
N_SIGMA = 1.0  # paper Sec. 4.2: keep patches "at least one positive standard deviation from the mean"
RANK_SHARE = 0.1587  # P(z > 1) of a normal distribution: the share mean + 1 sigma keeps of normal scores
MAD_TO_SIGMA = 1.4826  # sigma = 1.4826 * MAD for normally distributed scores
KEEP_FLOOR = 0.05  # a slide whose rule keeps under 5 % of its tissue patches ...
KEEP_FLOOR_PATCHES = 8  # ... or under 8 patches is named in a warning (kept_record)

__all__ = ["RULES", "RULE_KINDS", "N_SIGMA", "RANK_SHARE", "MAD_TO_SIGMA", "KEEP_FLOOR", "KEEP_FLOOR_PATCHES", "kept_record",
           "robust_z_threshold", "PAPER_THRESHOLD_BITS", "PAPER_PATCH_SIZE", "PAPER_ABLATION_BITS", "PAPER_SIGMA_BITS",
           "DEFAULT_RULE", "RuleKind", "Selection", "SelectionRule", "SelectionWarning", "register_rule", "select",
           "mean_std_threshold", "cohort_threshold", "default_threshold_bits", "paper_sigmas", "paper_cut"]


class SelectionWarning(UserWarning):
    """A rule kept nothing (and ``min_keep`` stepped in) or its scores saturate."""


class Selection(NamedTuple):
    """What :func:`select` returns: the kept tiles and the absolute cut the rule applied."""

    keep: np.ndarray  # bool [N]
    cut: float | None  # None for rank-based kinds (top-k) and for mean_std over no scores


@dataclass(frozen=True)
class RuleKind:
    """A registered rule kind (see :func:`register_rule`)."""

    name: str
    apply: Callable  # (scores float64 [N], SelectionRule) -> (keep bool [N], cut float | None)
    needs: Mapping[str, str] = field(default_factory=dict)  # SelectionRule field -> hint when it is missing
    freeze: Callable | None = None  # (scores per slide [N_i], SelectionRule) -> the cohort-wide cut
    description: str = ""
    count: Callable | None = None  # (N, SelectionRule) -> how many it keeps, for kinds that keep a fixed count


RULE_KINDS: dict[str, RuleKind] = {}
RULES = RULE_KINDS.keys()  # the registered kind names (a live view)


def register_rule(name: str, *, needs: Mapping[str, str] | None = None, freeze: Callable | None = None,
                  description: str = "", count: Callable | None = None) -> Callable:
    """Decorator registering ``fn(scores [N], rule) -> (keep [N], cut)`` as the rule kind ``name``; ``count(N,
    rule)``: how many of N scores it keeps, for a kind that keeps a fixed count."""
    def decorate(fn: Callable) -> Callable:
        if name in RULE_KINDS:
            raise ValueError(f"rule kind {name!r} is registered twice")
        RULE_KINDS[name] = RuleKind(name, fn, dict(needs or {}), freeze, description or (fn.__doc__ or "").strip(), count)
        return fn
    return decorate


@dataclass(frozen=True)
class SelectionRule:
    """A selection rule kind and its parameters (see the module docstring).

    ``threshold`` is the absolute cut of ``"threshold"`` and, once frozen over a cohort, of
    ``"cohort"`` (bits for the Shannon selector); ``k`` is the budget of ``"topk"``; ``share`` the share
    of ``"rank"``; when fewer than ``min_keep`` tiles pass, the ``min_keep`` best are kept and a
    :class:`SelectionWarning` says so.
    """

    rule: str = "rank"
    n_sigma: float = N_SIGMA
    threshold: float | None = None
    k: int | None = None
    min_keep: int = 1
    share: float = RANK_SHARE

    def __post_init__(self):
        if self.rule not in RULE_KINDS:
            raise ValueError(f"unknown rule {self.rule!r}; expected one of {', '.join(RULE_KINDS)}")
        if not isinstance(self.n_sigma, numbers.Real) or not math.isfinite(self.n_sigma):
            raise ValueError(f"n_sigma must be a finite number, got {self.n_sigma!r}")
        if self.threshold is not None and not (isinstance(self.threshold, numbers.Real) and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must be a finite number, got {self.threshold!r}")
        if self.k is not None and (not isinstance(self.k, numbers.Real) or int(self.k) != self.k or self.k < 0):
            raise ValueError(f"rule {self.rule!r}: k= must be a non-negative integer, got {self.k!r}")
        if self.min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {self.min_keep}")
        if not isinstance(self.share, numbers.Real) or not 0 < self.share <= 1:
            raise ValueError(f"share must be a number in (0, 1], got {self.share!r}")
        object.__setattr__(self, "share", float(self.share))
        # plain Python numbers: the rule serialises to JSON
        object.__setattr__(self, "n_sigma", float(self.n_sigma))
        if self.threshold is not None:
            object.__setattr__(self, "threshold", float(self.threshold))
        if self.k is not None:
            object.__setattr__(self, "k", int(self.k))

    @property
    def kind(self) -> RuleKind:
        return RULE_KINDS[self.rule]

    @property
    def pending(self) -> bool:
        """True for a cohort-wide kind whose cut is not frozen yet (:meth:`frozen_over` freezes it)."""
        return self.kind.freeze is not None and self.threshold is None

    def most_kept(self, n: int) -> int:
        """At most how many of ``n`` scores this rule keeps: the count of a kind that keeps a fixed count (rank,
        topk; at least ``min_keep``), ``n`` for a kind that cuts at a score."""
        if self.kind.count is None:
            return int(n)
        return min(int(n), max(self.min_keep, self.kind.count(int(n), self)))

    def missing(self) -> list[str]:
        """Parameters this kind needs that are not set."""
        return [name for name in self.kind.needs if getattr(self, name) is None]

    def frozen_over(self, scores_per_slide: Sequence) -> SelectionRule:
        """This rule with its cohort-wide cut frozen over every slide's scores (itself when not pending)."""
        return self.with_threshold(self.kind.freeze([_checked(s) for s in scores_per_slide], self)) if self.pending else self

    def with_threshold(self, threshold: float) -> SelectionRule:
        return replace(self, threshold=float(threshold))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict; :meth:`from_dict` reads it back."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> SelectionRule:
        """A rule from :meth:`to_dict` output; unknown keys raise ValueError naming them."""
        return from_known_fields(cls, data, f"selection rule key(s) in {dict(data)!r}")


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


def robust_z_threshold(scores, n_sigma: float = N_SIGMA) -> float:
    """``median + n_sigma * 1.4826 * MAD`` of ``scores`` [N] (MAD: median absolute deviation from the median)."""
    scores = _checked(scores)
    if scores.size == 0:
        raise ValueError("median + n_sigma * MAD of no scores")
    median = float(np.median(scores))
    return median + n_sigma * MAD_TO_SIGMA * float(np.median(np.abs(scores - median)))


def cohort_threshold(scores_per_slide, n_sigma: float = N_SIGMA) -> float:
    """The paper's cohort cut: ``mean + n_sigma * std`` over the pooled scores of every slide (a list of [N_i])."""
    pooled = [_checked(s) for s in scores_per_slide]
    if not pooled or sum(s.size for s in pooled) == 0:
        raise ValueError("cohort threshold: no scores (no slide, or slides without tissue patches)")
    return mean_std_threshold(np.concatenate(pooled), n_sigma)


# ----------------------------------------------------------------------------- the rule kinds


def _above(scores: np.ndarray, cut_of: Callable):
    """(scores > cut_of(scores), the cut); no scores: nothing kept and no cut."""
    if scores.size == 0:
        return np.zeros(0, bool), None
    cut = cut_of(scores)
    return scores > cut, cut


def _best(scores: np.ndarray, count: int):
    """(the ``count`` highest scores, ties broken by lower index; no cut)."""
    keep = np.zeros(scores.shape, dtype=bool)
    keep[np.argsort(-scores, kind="stable")[:count]] = True
    return keep, None


@register_rule("mean_std")
def _mean_std(scores: np.ndarray, rule: SelectionRule):
    """keep scores > mean + n_sigma * std of this slide's scores (paper Sec. 4.2: n_sigma = 1)"""
    return _above(scores, lambda s: mean_std_threshold(s, rule.n_sigma))


@register_rule("cohort", needs={"threshold": "isg.select.cohort_threshold(scores of every slide)"},
               freeze=lambda per_slide, rule: cohort_threshold(per_slide, rule.n_sigma))
def _cohort(scores: np.ndarray, rule: SelectionRule):
    """keep scores >= one cut frozen over the cohort: mean + n_sigma * std of every patch's score (the paper)"""
    return scores >= rule.threshold, float(rule.threshold)


@register_rule("threshold", needs={"threshold": "isg.select.default_threshold_bits(patch_size)"})
def _threshold(scores: np.ndarray, rule: SelectionRule):
    """keep scores >= threshold"""
    return scores >= rule.threshold, float(rule.threshold)


def _topk_count(n: int, rule: SelectionRule) -> int:
    return int(rule.k)


def _rank_count(n: int, rule: SelectionRule) -> int:
    return math.ceil(rule.share * n - 1e-9)


@register_rule("topk", needs={"k": "the number of patches to keep"}, count=_topk_count)
def _topk(scores: np.ndarray, rule: SelectionRule):
    """keep the k highest scores (ties broken by lower index)"""
    return _best(scores, _topk_count(scores.size, rule))


@register_rule("rank", count=_rank_count)
def _rank(scores: np.ndarray, rule: SelectionRule):
    """keep the share highest scores of this slide (default 15.87 %: what mean + 1 sigma keeps of normal scores)"""
    return _best(scores, _rank_count(scores.size, rule))


@register_rule("robust_z")
def _robust_z(scores: np.ndarray, rule: SelectionRule):
    """keep scores > median + n_sigma * 1.4826 * MAD of this slide's scores"""
    return _above(scores, lambda s: robust_z_threshold(s, rule.n_sigma))


DEFAULT_RULE = SelectionRule()  # the default rule of the library (a selector's natural rule may differ)


def select(scores, rule: SelectionRule | str = DEFAULT_RULE, *, name: str | None = None, **params) -> Selection:
    """:class:`Selection` (keep bool [N], cut) of ``scores`` [N] (higher = more informative) under ``rule``.

    ``rule`` is a :class:`SelectionRule`, or a kind name whose parameters are ``params`` (``threshold=``,
    ``k=``, ``n_sigma=``, ``min_keep=``). When fewer than ``min_keep`` tiles pass, the ``min_keep``
    highest-scoring tiles are kept instead and a :class:`SelectionWarning` names ``name`` (e.g. the
    slide), the cut and the score range, and whether the scores saturate; ``min_keep=0`` keeps
    nothing, with the same warning. ``cut`` is the rule's own cut, whatever ``min_keep`` did.
    """
    if not isinstance(rule, SelectionRule):
        rule = SelectionRule(rule, **params)
    elif params:
        raise TypeError(f"select: give the parameters inside the SelectionRule, not as {', '.join(params)}=")
    missing = rule.missing()
    if missing:
        hints = "; ".join(f"{p}= (e.g. {rule.kind.needs[p]})" for p in missing)
        raise ValueError(f"rule {rule.rule!r} needs {hints}")
    scores = _checked(scores)
    keep, cut = rule.kind.apply(scores, rule)
    keep = np.asarray(keep, dtype=bool)
    min_keep = rule.min_keep
    if scores.size and (keep.sum() < min(min_keep, scores.size) or (not keep.any() and cut is not None)):
        _warn_too_few(scores, rule.rule, cut, int(keep.sum()), min_keep, name)
        if min_keep:
            keep = np.zeros(scores.shape, dtype=bool)
            keep[np.argsort(-scores, kind="stable")[:min_keep]] = True
    return Selection(keep, None if cut is None else float(cut))


def kept_record(keep, name: str | None = None, floor: float = KEEP_FLOOR, min_patches: int = KEEP_FLOOR_PATCHES,
                warn: bool = True) -> dict:
    """``{"kept_fraction", "under_floor"}`` of one slide's selection ``keep`` bool [N] (N = its tissue patches).

    A slide is under the floor when its rule keeps fewer than ``floor`` of its tissue patches or fewer than
    ``min_patches`` patches: a :class:`SelectionWarning` names it (``name``), so that a prediction from a
    handful of patches never passes silently. ``isg preprocess`` records both values per slide (h5 attrs and
    summary.json). ``warn=False``: the record only.
    """
    keep = np.asarray(keep, dtype=bool)
    n, kept = keep.size, int(keep.sum())
    fraction = kept / n if n else 0.0
    under = kept < min_patches or fraction < floor
    if under and warn:
        where = f"{name}: " if name else ""
        warnings.warn(f"{where}the selection keeps {kept} of {n} tissue patches ({fraction:.1%}), under the floor "
                      f"({floor:.0%} of the tissue or {min_patches} patches): predictions from it rest on few patches",
                      SelectionWarning, stacklevel=2)
    return {"kept_fraction": float(fraction), "under_floor": bool(under)}


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
