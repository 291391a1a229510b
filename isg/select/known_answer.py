"""Known-answer selection scores on a synthetic cohort: a rule applied to the scores ``isg preprocess`` stored,
against the cohort's signal masks (:func:`isg.io.synth.read_signal_truth`).

``signal_precision(h5_paths, cohort_dir, rule)`` returns per-slide :func:`isg.eval.selection_precision`
rows and their cohort summary; the rows of the known-answer table in docs/selection.md (selector x rule
-> precision, recall, share kept) are this function over each selector's stored scores.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import numpy as np

from isg.select.rules import SelectionRule, SelectionWarning, cohort_threshold, select

__all__ = ["stored_patches", "signal_precision"]


def stored_patches(h5_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores float64 [N], tissue coords int64 [N, 2] level 0, level-0 patch side) of one ``isg preprocess`` output."""
    from isg.select.stored import read_scored

    patches = read_scored(h5_path)
    if patches.geometry is None:
        raise ValueError(f"{h5_path}: no patch geometry (not an isg preprocess output)")
    return patches.scores, patches.tissue_coords, int(patches.geometry.patch_size_level0)


def signal_precision(h5_paths: Iterable[str | os.PathLike], cohort_dir: str | os.PathLike, rule: SelectionRule,
                     min_fraction: float | None = None) -> dict:
    """Apply ``rule`` to each file's stored scores and score the kept patches against the signal masks of the
    synthetic cohort in ``cohort_dir`` (files are matched to slides by name: ``<slide_id>.h5``).

    A ``"cohort"`` rule without a threshold is frozen first over all the files' scores. Returns
    ``{"rule": rule dict, "slides": {slide_id: row}, "summary": :func:`isg.eval.mean_precision` of the rows}``;
    rules that keep nothing on a slide keep nothing here (``min_keep`` is ignored: the score is of the rule).
    """
    from isg.eval import SIGNAL_MIN_FRACTION, mean_precision, selection_precision
    from isg.io.synth import read_signal_truth

    truth = read_signal_truth(cohort_dir)
    paths = sorted(Path(p) for p in h5_paths)
    if not paths:
        raise ValueError("signal_precision: no .h5 files given")
    missing = [p.name for p in paths if p.stem not in truth]
    if missing:
        raise ValueError(f"signal_precision: {', '.join(missing)} not slides of the cohort in {cohort_dir}")
    stored = {p.stem: stored_patches(p) for p in paths}
    if rule.rule == "cohort" and rule.threshold is None:
        rule = rule.with_threshold(cohort_threshold([s for s, _, _ in stored.values()], rule.n_sigma))
    rows = {}
    for slide_id, (scores, coords, size) in stored.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SelectionWarning)
            keep = select(scores, replace(rule, min_keep=0)).keep
        fraction = truth[slide_id].patch_fraction(coords, size)
        rows[slide_id] = selection_precision(keep, fraction, min_fraction if min_fraction is not None else SIGNAL_MIN_FRACTION)
    return {"rule": rule.to_dict(), "slides": rows, "summary": mean_precision(list(rows.values()))}
