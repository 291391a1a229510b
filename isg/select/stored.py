"""Re-apply a selection rule to the scores stored by ``isg preprocess``, without reading slides again.

A patch file (:mod:`isg.data.patch_file`) holds the score of every tissue patch and the selection.
:func:`reselect_h5` rewrites one file under a new rule (atomically): features are kept, as the matching
rows, when the new selection is a subset of the old one, and dropped otherwise (``isg extract`` then
recomputes them). :func:`apply_rule` does it for a cohort and, for a cohort-wide rule (``"cohort"``),
first freezes the cut over all files' scores; it writes ``selection.json`` (:data:`SELECTION_FILE`)
beside the files.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from isg.data.patch_file import SlidePatches, read_patch_file, write_patch_file
from isg.select.rules import SelectionRule, kept_record, select
from isg.select.selectors import SELECTORS
from isg.utils import write_text_atomic

SELECTION_FILE = "selection.json"

__all__ = ["SELECTION_FILE", "read_scored", "reselect", "reselect_h5", "apply_rule"]


def read_scored(h5_path: str | os.PathLike, features: bool = False) -> SlidePatches:
    """The patches of a preprocess output that stores its scores (ValueError naming the file otherwise)."""
    patches = read_patch_file(h5_path, features=features)
    if patches.scores is None:
        raise ValueError(f"{h5_path}: not an `isg preprocess` output with stored scores (no 'scores' dataset)")
    return patches


def reselect(patches: SlidePatches, rule: SelectionRule, name: str | None = None) -> tuple[SlidePatches, str]:
    """``patches`` with ``rule`` applied to their stored scores (the rule and its cut recorded); see
    :meth:`~isg.data.patch_file.SlidePatches.reselected` for the features (``"kept"``, ``"dropped"``, ``"none"``)."""
    keep, cut = select(patches.scores, rule, name=name or patches.slide_id)  # [N], the cut (None: top-k)
    return patches.reselected(keep, rule.to_dict(), cut)


def reselect_h5(src: str | os.PathLike, rule: SelectionRule, dst: str | os.PathLike | None = None) -> dict:
    """Write the patch file ``src`` with ``rule`` applied to its stored scores to ``dst`` (default: over ``src``).

    Returns ``slide_id``, ``n_tissue``, ``n_kept``, ``kept_fraction``, ``under_floor``
    (:func:`isg.select.kept_record`) and ``features``: ``"kept"`` (subset of the old selection),
    ``"dropped"`` or ``"none"``.
    """
    src = Path(src)
    patches, features = reselect(read_scored(src, features=True), rule, name=str(src))
    write_patch_file(Path(dst) if dst is not None else src, patches)
    kept = kept_record(patches.selected, name=str(src))  # kept_fraction, under_floor (warns under the floor)
    return {"slide_id": patches.slide_id, "n_tissue": patches.n_tissue, "n_kept": patches.n_selected, **kept, "features": features}


def apply_rule(h5_paths: Iterable[str | os.PathLike], rule: SelectionRule | None = None,
               out_dir: str | os.PathLike | None = None) -> dict:
    """Apply ``rule`` to every preprocess output in ``h5_paths``; returns (and writes) the selection record.

    ``rule`` None applies the natural rule of the files' selector (:meth:`isg.select.Selector.rule_for`).
    A cohort-wide rule without its cut (``"cohort"`` without ``threshold``) is frozen first over the
    scores of all files (:meth:`SelectionRule.frozen_over`; for ``"cohort"`` mean + n_sigma std,
    :func:`isg.select.cohort_threshold`): it must be computed once over the training cohort and then
    reused (``threshold=``) for new slides. Files go to ``out_dir`` (default: rewritten in place);
    ``<folder>/selection.json`` records the rule, the frozen cut, and the patches kept per slide. All
    files must share selector and patch size.
    """
    paths = sorted(Path(p) for p in h5_paths)
    if not paths:
        raise ValueError("apply_rule: no .h5 files given")
    stored = [read_scored(p) for p in paths]
    scales = [(p.selector, None if p.geometry is None else p.geometry.patch_size) for p in stored]
    for i, key in enumerate(("selector", "patch_size")):
        values = {str(scale[i]) for scale in scales}
        if len(values) > 1:
            odd = next(j for j, scale in enumerate(scales) if scale[i] != scales[0][i])
            raise ValueError(f"apply_rule: the files mix {key}s {sorted(values)} ({paths[odd]} has {scales[odd][i]}); "
                             f"one rule needs one scale")
    selector, patch_size = scales[0]
    if selector in SELECTORS:
        rule = SELECTORS[selector].rule_for(rule, patch_size or 0)
    elif rule is None:
        raise ValueError(f"apply_rule: {paths[0]} names no known selector ({selector!r}): give the rule")
    scores = [p.scores for p in stored]
    rule = rule.frozen_over(scores)  # a cohort-wide kind freezes its cut over every file's scores
    del stored
    out_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    slides = {}
    for path in paths:
        result = reselect_h5(path, rule, out_dir / path.name)
        slides[result.pop("slide_id")] = result
    kept = np.array([s["n_kept"] for s in slides.values()])
    record = {
        "selector": selector, "patch_size": int(patch_size or 0),
        "rule": rule.to_dict(), "threshold": rule.threshold,
        "threshold_unit": SELECTORS[selector].unit if selector in SELECTORS else "score",
        "n_slides": len(paths), "n_scored": int(sum(len(s) for s in scores)), "n_kept": int(kept.sum()),
        "kept_per_slide": {"mean": float(kept.mean()), "min": int(kept.min()), "max": int(kept.max())},
        "features_dropped": sorted(k for k, s in slides.items() if s["features"] == "dropped"),
        "slides": slides,
    }
    write_text_atomic(out_dir / SELECTION_FILE, json.dumps(record, indent=2))
    if record["features_dropped"]:
        warnings.warn(f"{len(record['features_dropped'])} slide(s) now select patches without features; "
                      f"run `isg extract` on {out_dir} again", stacklevel=2)
    return record
