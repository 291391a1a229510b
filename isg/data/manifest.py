"""Slide manifests: which slide belongs to which sample and patient.

A manifest is a CSV/TSV with (at least) the columns ``slide_path``,
``sample_id`` and ``patient_id``; other columns (e.g. ``msi_status``) are kept.
A sample may have several slides and a patient several samples (TCGA), which is
why splits are made by patient (:mod:`isg.data.splits`). Without a ``patient_id`` column, TCGA
sample ids give it (their first 12 characters).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd

from isg.data.tcga import patient_ids
from isg.utils import list_some, read_text_table

REQUIRED_COLUMNS = ("slide_path", "sample_id", "patient_id")


class ManifestError(ValueError):
    """A manifest that cannot be used; the message names the file."""


def slide_id_of(path: str | os.PathLike) -> str:
    """Slide id = file name without its extension (``a.svs`` -> ``a``, ``a.ome.tif`` -> ``a``)."""
    name = Path(path).name
    for suffix in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def load_manifest(path: str | os.PathLike, check_files: bool = True) -> pd.DataFrame:
    """Read a manifest; returns its rows with ``slide_path`` made absolute and ``slide_id`` added.

    Relative slide paths are resolved against the manifest's folder. Raises
    :class:`ManifestError` for missing columns, empty ids, duplicated slides (same
    path or same slide id) and, with ``check_files``, slides that do not exist.
    """
    path = Path(path)
    table = read_text_table(path, "manifest", ManifestError)
    if "patient_id" not in table.columns and "sample_id" in table.columns:
        patients = patient_ids(table["sample_id"].str.strip())  # TCGA: patient = first 12 characters of the sample id
        if patients is not None:
            table["patient_id"] = patients
    missing = [column for column in REQUIRED_COLUMNS if column not in table.columns]
    if missing:
        raise ManifestError(
            f"manifest {path}: missing column(s) {', '.join(missing)} (has: {list_some(table.columns)}); "
            f"required: {', '.join(REQUIRED_COLUMNS)}"
        )
    if table.empty:
        raise ManifestError(f"manifest {path}: no rows")
    for column in REQUIRED_COLUMNS:
        table[column] = table[column].str.strip()
        empty = table.index[table[column] == ""] + 2  # 1-based line numbers, after the header
        if len(empty):
            raise ManifestError(f"manifest {path}: empty {column} on {len(empty)} line(s): {list_some(empty)}")

    base = path.resolve().parent
    table["slide_path"] = [str(p if p.is_absolute() else (base / p).resolve()) for p in map(Path, table["slide_path"])]
    table.insert(0, "slide_id", [slide_id_of(p) for p in table["slide_path"]])
    for column in ("slide_path", "slide_id"):
        duplicated = table[column][table[column].duplicated()].unique()
        if len(duplicated):
            raise ManifestError(f"manifest {path}: {len(duplicated)} duplicated slide(s) by {column}: {list_some(duplicated)}")
    if check_files:
        absent = [p for p in table["slide_path"] if not os.path.exists(p)]
        if absent:
            raise ManifestError(f"manifest {path}: {len(absent)} slide file(s) not found: {list_some(absent)}")
    return table.reset_index(drop=True)


def match_samples(manifest: pd.DataFrame, expression: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Keep the samples that have both slides and expression.

    Returns ``(manifest rows, expression rows)`` restricted to the common samples;
    expression rows are in order of first appearance in the manifest. Samples
    present on one side only are listed in a warning; no overlap is an error.
    """
    slide_samples = pd.Index(manifest["sample_id"].astype(str).unique())
    table_samples = expression.index.astype(str)
    without_expression = slide_samples.difference(table_samples)
    without_slides = table_samples.difference(slide_samples)
    common = slide_samples[slide_samples.isin(table_samples)]
    if len(common) == 0:
        raise ManifestError(
            f"no sample has both slides and expression: manifest samples {list_some(slide_samples, 5)}; "
            f"expression samples {list_some(table_samples, 5)} (is the expression table transposed?)"
        )
    if len(without_expression):
        warnings.warn(
            f"dropping {len(without_expression)} sample(s) with slides but no expression: {list_some(without_expression)}",
            stacklevel=2,
        )
    if len(without_slides):
        warnings.warn(
            f"dropping {len(without_slides)} sample(s) with expression but no slides: {list_some(without_slides)}",
            stacklevel=2,
        )
    kept = manifest[manifest["sample_id"].astype(str).isin(common)].reset_index(drop=True)
    return kept, expression.loc[common]
