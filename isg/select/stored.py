"""Re-apply a selection rule to the scores stored by ``isg preprocess``, without reading slides again.

A preprocess output ``<slide_id>.h5`` holds every tissue patch scored (``all_coords`` [N, 2],
``scores`` [N]) and the selection (``selected`` [N], ``coords`` [M, 2] = ``all_coords[selected]``,
with the rule in ``coords.attrs``); ``isg extract`` adds ``features`` [M, d] and ``local_features``
[M, S, S, d], aligned with ``coords``. :func:`reselect_h5` rewrites one file under a new rule (atomically):
features are kept, as the matching rows, when the new selection is a subset of the old one, and
dropped otherwise (``isg extract`` then recomputes them). :func:`apply_rule` does it for a cohort and, for
the ``"cohort"`` rule, first freezes the cut over all files' scores; it writes ``selection.json``
(:data:`SELECTION_FILE`) beside the files.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from isg.select.rules import SelectionRule, kept_record, select
from isg.select.selectors import SELECTORS
from isg.utils import atomic_path, write_text_atomic

SELECTION_FILE = "selection.json"
PER_PATCH = ("features", "local_features")  # datasets aligned with coords
_REWRITTEN = ("coords", "selected", *PER_PATCH)

__all__ = ["SELECTION_FILE", "read_scores", "reselect_h5", "apply_rule"]


def read_scores(h5_path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Scores float64 [N] of every tissue patch and the ``coords`` attrs (selector, patch_size, rule, ...)."""
    import h5py

    h5_path = Path(h5_path)
    try:
        with h5py.File(h5_path, "r") as f:
            missing = [name for name in ("scores", "all_coords", "selected", "coords") if name not in f]
            if missing:
                raise ValueError(f"{h5_path}: not an `isg preprocess` output with stored scores "
                                 f"(missing {', '.join(missing)})")
            scores = np.asarray(f["scores"][()], dtype=np.float64)
            attrs = dict(f["coords"].attrs)
            n = len(f["all_coords"])
    except OSError as exc:
        raise ValueError(f"{h5_path}: not a readable HDF5 file ({exc})") from None
    if scores.ndim != 1 or len(scores) != n or not np.isfinite(scores).all():
        raise ValueError(f"{h5_path}: scores must be finite, one per all_coords row ({n}); got shape {scores.shape}")
    return scores, attrs


def reselect_h5(src: str | os.PathLike, rule: SelectionRule, dst: str | os.PathLike | None = None) -> dict:
    """Write ``src`` with ``rule`` applied to its stored scores to ``dst`` (default: over ``src``).

    The ``coords`` attrs record the rule: ``rule``, ``threshold`` (the absolute cut; NaN for top-k and
    for ``mean_std`` it is this slide's mean + n_sigma std), ``n_sigma``, ``k``. Returns ``n_tissue``,
    ``n_kept`` and ``features``: ``"kept"`` (subset of the old selection), ``"dropped"`` or ``"none"``.
    """
    import h5py

    src = Path(src)
    dst = Path(dst) if dst is not None else src
    scores, attrs = read_scores(src)
    name = str(attrs.get("name", src.stem))
    keep, cut = select(scores, rule, name=str(src))  # [N], the cut this rule applied (None: top-k)
    kept = kept_record(keep, name=str(src))  # kept_fraction, under_floor (warns under the floor)
    cut = math.nan if cut is None else cut
    with h5py.File(src, "r") as f:
        old = np.asarray(f["selected"][()], dtype=bool)
        has_features = [n for n in PER_PATCH if n in f]
        subset = not (keep & ~old).any()
        rows = (np.cumsum(old) - 1)[keep]  # rows of the old coords/features that stay
        with atomic_path(dst) as tmp, h5py.File(tmp, "w") as out:
            out.attrs.update(dict(f.attrs))
            for item in f:
                if item not in _REWRITTEN:
                    f.copy(item, out)
            coords = out.create_dataset("coords", data=np.asarray(f["all_coords"][()], dtype=np.int64)[keep])  # [M, 2]
            coords.attrs.update(attrs)
            coords.attrs.update(rule=rule.rule, threshold=float(cut), n_sigma=float(rule.n_sigma),
                                k=-1 if rule.k is None else int(rule.k), share=float(rule.share), **kept)
            out.create_dataset("selected", data=keep)
            if subset:
                for item in has_features:
                    data = f[item][()][rows]
                    chunks = (min(len(data), 256), *data.shape[1:]) if len(data) else None
                    out.create_dataset(item, data=data, chunks=chunks).attrs.update(dict(f[item].attrs))
    features = "none" if not has_features else "kept" if subset else "dropped"
    return {"slide_id": name, "n_tissue": int(len(scores)), "n_kept": int(keep.sum()), **kept, "features": features}


def apply_rule(h5_paths: Iterable[str | os.PathLike], rule: SelectionRule | None = None,
               out_dir: str | os.PathLike | None = None) -> dict:
    """Apply ``rule`` to every preprocess output in ``h5_paths``; returns (and writes) the selection record.

    A cohort-wide rule without its cut (``"cohort"`` without ``threshold``) is frozen first over the
    scores of all files (:meth:`SelectionRule.frozen_over`; for ``"cohort"`` mean + n_sigma std,
    :func:`isg.select.cohort_threshold`): it must be computed once over the training cohort and then
    reused (``threshold=``) for new slides.
    ``rule`` None applies the natural rule of the files' selector (:meth:`isg.select.Selector.rule_for`). Files go to ``out_dir`` (default: rewritten in place); ``<folder>/selection.json`` records the rule,
    the frozen cut, and the patches kept per slide. All files must share selector and patch size.
    """
    paths = sorted(Path(p) for p in h5_paths)
    if not paths:
        raise ValueError("apply_rule: no .h5 files given")
    scores, attrs = zip(*(read_scores(p) for p in paths))
    for key in ("selector", "patch_size"):
        values = {str(a.get(key)) for a in attrs}
        if len(values) > 1:
            odd = [str(p) for p, a in zip(paths, attrs) if str(a.get(key)) != str(attrs[0].get(key))]
            raise ValueError(f"apply_rule: the files mix {key}s {sorted(values)} ({odd[0]} has {attrs[paths.index(Path(odd[0]))].get(key)}); "
                             f"one rule needs one scale")
    selector = str(attrs[0].get("selector", ""))
    if selector in SELECTORS:
        rule = SELECTORS[selector].rule_for(rule, int(attrs[0].get("patch_size", 0)))
    elif rule is None:
        raise ValueError(f"apply_rule: {paths[0]} names no known selector ({selector!r}): give the rule")
    rule = rule.frozen_over(scores)  # a cohort-wide kind freezes its cut over every file's scores
    out_dir = Path(out_dir) if out_dir is not None else paths[0].parent
    slides = {}
    for path in paths:
        result = reselect_h5(path, rule, out_dir / path.name)
        slides[result.pop("slide_id")] = result
    kept = np.array([s["n_kept"] for s in slides.values()])
    record = {
        "selector": selector, "patch_size": int(attrs[0].get("patch_size", 0)),
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
