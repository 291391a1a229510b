"""Tile scorers behind one registry: uint8 tiles [B, H, W, C] -> float64 [B], higher = more informative.

Each selector is registered once, with what the pipeline needs to use it (:func:`register_selector`):
its scoring function, its **natural rule** (the :class:`~isg.select.SelectionRule` it is meant to be
used with), the unit of its scores, an optional per-slide preparation hook (thumbnail -> fixed
scorer options) and an optional default cut for the ``"threshold"`` rule.

``shannon`` is the paper's scorer (bits of a two-part code, :mod:`isg.ops.shannon`; natural rule
the share mean + 1 sigma keeps of normal scores, by rank (:data:`~isg.select.DEFAULT_RULE`), default threshold :func:`~isg.select.default_threshold_bits`);
the others are the baselines of the paper's comparison, on the grey image
(ITU-R 601 luma, as ``cv2.COLOR_RGB2GRAY``):

* ``otsu``: HE2RNA-style tissue fraction: share of pixels at or below a grey
  threshold (tissue is dark; skimage's Otsu puts the background above it). Per slide the threshold
  is the Otsu threshold of the slide's thumbnail (the preparation hook, :func:`otsu_grey_threshold`);
  without one, the Otsu threshold of the grey levels pooled over the batch, capped at
  ``OTSU_MAX_GREY`` so a batch of background alone is not split in two. Natural rule: tissue
  fraction >= 0.5, as HE2RNA (the fractions saturate at 1, so mean + sigma would keep nothing);
* ``gradient``: mean Sobel gradient magnitude (3x3);
* ``canny``: edge density, share of Canny edge pixels (hysteresis 50/100);
* ``dog``: mean |Gaussian(sigma=1) - Gaussian(sigma=2)|;
* ``log``: mean |Laplacian of Gaussian(sigma=1.5)|.

The four edge selectors' natural rule is Shannon's (the paper's mean + 1 sigma share, by rank). Adding a selector is one
decorator on its scoring function (docs/architecture.md, "How to add a selector")::

    @register_selector("mine", natural_rule=SelectionRule("mean_std"), unit="my unit")
    def mine(tiles) -> np.ndarray: ...   # uint8 [B, H, W, C] -> float64 [B]
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from isg.ops.shannon import prepare_tiles, shannon_bits
from isg.select.rules import DEFAULT_RULE, SelectionRule, default_threshold_bits

OTSU_MAX_GREY = 220  # white slide background is brighter than this (0..255)

__all__ = ["SELECTORS", "OTSU_MAX_GREY", "Selector", "register_selector", "get_selector", "grey_tiles",
           "otsu_grey_threshold"]


@dataclass(frozen=True)
class Selector:
    """A registered tile scorer and what the pipeline needs to use it (see :func:`register_selector`)."""

    name: str
    score: Callable[..., np.ndarray]  # uint8 tiles [B, H, W, C] (numpy or torch) -> float64 [B]
    natural_rule: SelectionRule  # the rule it is meant to be used with (isg preprocess without --rule)
    unit: str  # of the scores, e.g. "bits"
    prepare: Callable[[np.ndarray], dict] | None = None  # per slide: thumbnail [h, w, 3] -> fixed score options
    default_threshold: Callable[[int], float] | None = None  # patch size p -> cut of rule "threshold" without one

    def __call__(self, tiles, **options) -> np.ndarray:
        """Scores float64 [B] of uint8 tiles [B, H, W, C]; ``options`` go to the scoring function."""
        return self.score(tiles, **options)

    def for_slide(self, thumbnail: np.ndarray) -> Callable[..., np.ndarray]:
        """The scorer of one slide: the preparation hook's options on its ``thumbnail`` [h, w, 3], fixed."""
        options = self.prepare(thumbnail) if self.prepare is not None else {}
        return functools.partial(self.score, **options) if options else self.score

    def rule_for(self, rule: SelectionRule | None, patch_size: int) -> SelectionRule:
        """The rule applied to this selector's scores of ``patch_size`` px patches: ``rule``, or the natural
        rule when None; a ``"threshold"`` rule without a threshold gets the selector's default cut."""
        rule = self.natural_rule if rule is None else rule
        if rule.rule == "threshold" and rule.threshold is None:
            if self.default_threshold is None:
                has = ", ".join(name for name, s in SELECTORS.items() if s.default_threshold is not None)
                raise ValueError(f"rule 'threshold' with selector {self.name!r} needs an explicit threshold "
                                 f"(a default cut exists for: {has})")
            rule = rule.with_threshold(self.default_threshold(patch_size))
        return rule


SELECTORS: dict[str, Selector] = {}  # name -> Selector, in registration order


def register_selector(name: str, *, natural_rule: SelectionRule, unit: str, prepare: Callable | None = None,
                      default_threshold: Callable | None = None) -> Callable:
    """Decorator registering ``score(tiles [B, H, W, C] uint8) -> float64 [B]`` as the selector ``name``."""
    def decorate(score: Callable) -> Callable:
        if name in SELECTORS:
            raise ValueError(f"selector {name!r} is registered twice")
        SELECTORS[name] = Selector(name, score, natural_rule, unit, prepare, default_threshold)
        return score
    return decorate


def get_selector(name: str) -> Selector:
    """The registered :class:`Selector` ``name`` (callable on tiles: ``get_selector("gradient")(tiles)``)."""
    try:
        return SELECTORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown selector {name!r}; expected one of {', '.join(SELECTORS)}") from None


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


def _per_tile(fn: Callable[[np.ndarray], float]) -> Callable:
    @functools.wraps(fn)
    def score(tiles) -> np.ndarray:
        return np.array([fn(tile) for tile in grey_tiles(tiles)], dtype=np.float64)
    return score


# the share mean + 1 sigma keeps of normal scores, by rank: real scores are skewed (docs/selection.md);
# the paper's literal rule is SelectionRule("mean_std") and its cohort cut SelectionRule("cohort")
_PAPER_SHARE = DEFAULT_RULE

register_selector("shannon", natural_rule=_PAPER_SHARE, unit="bits", default_threshold=default_threshold_bits)(shannon_bits)


@register_selector("otsu", natural_rule=SelectionRule("threshold", threshold=0.5), unit="tissue fraction",
                   prepare=lambda thumbnail: {"threshold": otsu_grey_threshold(thumbnail)})
def otsu_tissue_fraction(tiles, threshold: float | None = None) -> np.ndarray:
    """Share of pixels with grey <= ``threshold`` (default: the Otsu threshold of this batch)."""
    grey = grey_tiles(tiles)
    if threshold is None:
        threshold = otsu_grey_threshold(tiles)
    return (grey <= threshold).mean(axis=(1, 2), dtype=np.float64)


@register_selector("gradient", natural_rule=_PAPER_SHARE, unit="mean Sobel gradient magnitude (grey levels / px)")
@_per_tile
def gradient_magnitude(grey: np.ndarray) -> float:
    import cv2

    x = grey.astype(np.float32)
    gx, gy = cv2.Sobel(x, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(x, cv2.CV_32F, 0, 1, ksize=3)
    return float(np.sqrt(gx * gx + gy * gy).mean(dtype=np.float64))


@register_selector("canny", natural_rule=_PAPER_SHARE, unit="share of Canny edge pixels")
@_per_tile
def canny_edge_density(grey: np.ndarray) -> float:
    import cv2

    return float((cv2.Canny(np.ascontiguousarray(grey), 50, 100) > 0).mean())


@register_selector("dog", natural_rule=_PAPER_SHARE, unit="mean |DoG| (grey levels)")
@_per_tile
def difference_of_gaussians(grey: np.ndarray) -> float:
    import cv2

    x = grey.astype(np.float32)
    fine = cv2.GaussianBlur(x, (0, 0), 1.0, borderType=cv2.BORDER_REFLECT)
    coarse = cv2.GaussianBlur(x, (0, 0), 2.0, borderType=cv2.BORDER_REFLECT)
    return float(np.abs(fine - coarse).mean(dtype=np.float64))


@register_selector("log", natural_rule=_PAPER_SHARE, unit="mean |LoG| (grey levels)")
@_per_tile
def laplacian_of_gaussian(grey: np.ndarray) -> float:
    import cv2

    x = cv2.GaussianBlur(grey.astype(np.float32), (0, 0), 1.5, borderType=cv2.BORDER_REFLECT)
    return float(np.abs(cv2.Laplacian(x, cv2.CV_32F, ksize=1, borderType=cv2.BORDER_REFLECT)).mean(dtype=np.float64))
