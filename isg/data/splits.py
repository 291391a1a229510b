"""Patient-level k-fold cross-validation splits.

Patients, not samples or slides, are dealt into folds, so no patient appears in
two parts of a split. Fold ``k`` is the test set of split ``k``; a validation
set (``val_fraction`` of the remaining patients) is carved from its training
patients. Assignment is greedy as in group k-fold: patients, shuffled by
``seed``, go one by one (largest first) to the fold holding the fewest samples
so far; with ``stratify`` this is done per class, which balances classes
(e.g. MSI-H / MSS) across folds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from isg.utils import list_some, write_text_atomic


class Split(NamedTuple):
    """Sample ids of one cross-validation split (sorted lists)."""

    train: list[str]
    val: list[str]
    test: list[str]


def patient_kfold(
    manifest: pd.DataFrame,
    n_splits: int = 5,
    seed: int = 0,
    stratify: str | pd.Series | None = None,
    val_fraction: float = 0.2,
) -> list[Split]:
    """Split the samples of ``manifest`` (columns ``sample_id``, ``patient_id``) into ``n_splits`` folds by patient.

    Args:
        stratify: a manifest column name, or a Series of labels indexed by sample_id
            (e.g. MSI status); a patient's class is the most frequent label of its samples.
        val_fraction: fraction of each split's training patients moved to validation
            (per class when stratified); 0 leaves validation empty.

    Returns one :class:`Split` ``(train, val, test)`` of sample ids per fold.
    """
    for column in ("sample_id", "patient_id"):
        if column not in manifest.columns:
            raise ValueError(f"manifest has no {column!r} column")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    samples = manifest[["sample_id", "patient_id"]].astype(str).drop_duplicates()
    twice = samples["sample_id"][samples["sample_id"].duplicated()].unique()
    if len(twice):
        raise ValueError(f"{len(twice)} sample(s) belong to more than one patient: {list_some(twice)}")
    patients = np.array(sorted(samples["patient_id"].unique()))
    if not 2 <= n_splits <= len(patients):
        raise ValueError(f"n_splits must be between 2 and the number of patients ({len(patients)}), got {n_splits}")

    sizes = samples.groupby("patient_id").size().reindex(patients).to_numpy()
    classes = _patient_classes(manifest, samples, patients, stratify)
    rng = np.random.default_rng(seed)
    fold_of = _assign(sizes, classes, n_splits, rng)

    samples_of = samples.groupby("patient_id")["sample_id"].apply(sorted).to_dict()
    splits = []
    for fold in range(n_splits):
        train = np.flatnonzero(fold_of != fold)
        val = _carve(train, classes, val_fraction, rng)
        train = np.setdiff1d(train, val)
        splits.append(Split(*(sorted(s for p in patients[part] for s in samples_of[p]) for part in (train, val, fold_of == fold))))
    return splits


def _patient_classes(manifest, samples, patients, stratify) -> np.ndarray:
    if stratify is None:
        return np.zeros(len(patients), dtype=np.int64)
    if isinstance(stratify, str):
        if stratify not in manifest.columns:
            raise ValueError(f"stratify column {stratify!r} is not in the manifest (columns: {list_some(manifest.columns)})")
        labels = manifest.assign(sample_id=manifest["sample_id"].astype(str)).drop_duplicates("sample_id").set_index("sample_id")[stratify]
    else:
        labels = pd.Series(stratify)
        labels.index = labels.index.astype(str)
    per_sample = labels.reindex(samples["sample_id"].to_numpy())
    missing = samples["sample_id"][(per_sample.isna() | (per_sample.astype(str).str.strip() == "")).to_numpy()]
    if len(missing):
        raise ValueError(f"no stratification label for {len(missing)} sample(s): {list_some(missing)}")
    per_patient = per_sample.astype(str).groupby(samples["patient_id"].to_numpy()).agg(lambda x: x.value_counts().index[0])
    return pd.factorize(per_patient.reindex(patients), sort=True)[0]


def _assign(sizes: np.ndarray, classes: np.ndarray, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin of every patient: largest first, each to the bin with the fewest of its class, then fewest samples."""
    order = rng.permutation(len(sizes))
    order = order[np.argsort(-sizes[order], kind="stable")]
    class_count = np.zeros((classes.max() + 1, n_bins), dtype=np.int64)
    sample_count = np.zeros(n_bins, dtype=np.int64)
    bins = np.empty(len(sizes), dtype=np.int64)
    for patient in order:
        c = classes[patient]
        best = np.lexsort((rng.random(n_bins), sample_count, class_count[c]))[0]
        bins[patient] = best
        class_count[c, best] += 1
        sample_count[best] += sizes[patient]
    return bins


def _carve(train: np.ndarray, classes: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Random ``fraction`` of the patients ``train``, per class (at least one when fraction > 0)."""
    if fraction == 0 or len(train) < 2:
        return np.empty(0, dtype=np.int64)
    picked = []
    for c in np.unique(classes[train]):
        members = rng.permutation(train[classes[train] == c])
        picked.append(members[: int(round(fraction * len(members)))])
    picked = np.concatenate(picked)
    return picked if len(picked) else rng.permutation(train)[:1]


def save_splits(path: str | os.PathLike, splits: list[Split], **meta) -> None:
    """Write splits as JSON (atomically); ``meta`` (e.g. seed, n_splits) is stored alongside."""
    document = {"meta": meta, "splits": [dict(zip(Split._fields, split)) for split in splits]}
    write_text_atomic(path, json.dumps(document, indent=1))


def load_splits(path: str | os.PathLike) -> list[Split]:
    """Read splits written by :func:`save_splits`; checks that train / val / test are disjoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"splits file {path}: no such file")
    try:
        document = json.loads(path.read_text())
        splits = [Split(*(list(map(str, entry[part])) for part in Split._fields)) for entry in document["splits"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"splits file {path}: not a splits document ({type(exc).__name__}: {exc})") from exc
    for number, split in enumerate(splits):
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            shared = set(getattr(split, a)) & set(getattr(split, b))
            if shared:
                raise ValueError(f"splits file {path}: split {number} has {len(shared)} sample(s) in both {a} and {b}: {list_some(sorted(shared))}")
    return splits
