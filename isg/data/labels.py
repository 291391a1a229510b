"""Slide-level class labels (MSI-H vs MSS, paper Tab. 3) as a 0/1 target table."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from isg.utils import list_some, read_text_table


class LabelError(ValueError):
    """A label table that cannot be used; the message names the file."""


def load_labels(path: str | os.PathLike, column: str = "msi", positive: str = "MSI-H", id_column: str = "sample_id") -> pd.DataFrame:
    """Read ``id_column, column`` from a CSV/TSV into a samples x 1 float32 table: 1 = ``positive``, 0 = the other class.

    Raises :class:`LabelError` for a missing column, empty or duplicated ids,
    missing values, or anything but exactly two classes one of which is ``positive``.
    """
    path = Path(path)
    table = read_text_table(path, "label table", LabelError)
    missing = [name for name in (id_column, column) if name not in table.columns]
    if missing:
        raise LabelError(f"label table {path}: missing column(s) {', '.join(missing)} (has: {list_some(table.columns)})")
    ids, values = table[id_column].str.strip(), table[column].str.strip()
    empty = list(ids[(ids == "") | (values == "") | values.str.lower().isin(["nan", "na", "none"])].index + 2)
    if empty:
        raise LabelError(f"label table {path}: empty id or missing {column} on {len(empty)} line(s): {list_some(empty)}")
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise LabelError(f"label table {path}: {len(duplicated)} duplicated {id_column}(s): {list_some(duplicated)}")
    classes = sorted(values.unique())
    if positive not in classes or len(classes) != 2:
        raise LabelError(f"label table {path}: {column} must hold exactly two classes including {positive!r}; found {list_some(classes)}")
    return pd.DataFrame({column: (values == positive).astype("float32").to_numpy()}, index=pd.Index(ids, name="sample_id"))
