"""Bulk RNA-seq tables: read, validate, select genes, log-transform.

The result is always a samples x genes ``float32`` DataFrame (index
``sample_id``, columns ``gene``). Inputs are raw counts or FPKM-UQ in a
CSV/TSV file, either with samples as rows or, as TCGA/GDC tables are, with
genes as rows. Values are normalised to ``log10(1 + x)`` as HE2RNA does.

Default gene selection (``genes=None``): genes expressed (value > 0) in fewer
than ``min_samples`` samples are dropped, then, when ``top_n`` is given, the
``top_n`` genes with the largest ``select`` statistic ("variance" or "mean" of
the transformed values; ties broken by gene name) are kept, in that order.
Explicitly requested genes are never dropped: a missing one is an error.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from isg.utils import list_some, table_separator

ORIENTATIONS = ("auto", "samples_x_genes", "genes_x_samples")
TRANSFORMS = ("log10p", None)
_ENSEMBL = re.compile(r"^(ENS[A-Z]*G\d+)(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)
ANNOTATION_COLUMNS = ("gene", "gene_id", "gene_name")  # written by isg manifest beside its table
_GENE_ID = re.compile(r"^(ENS[A-Z]*G\d+(\.\d+)?|[A-Z0-9][A-Za-z0-9\-\.]*\|\d+)$")  # Ensembl ids, TCGA "SYMBOL|entrez"


class ExpressionError(ValueError):
    """An expression table (or gene list) that cannot be used; the message names the file."""


def read_gene_list(genes: str | os.PathLike | Iterable[str]) -> list[str]:
    """Gene names from a list, or from a file: one per line, or the first column of a CSV/TSV with a header."""
    if isinstance(genes, (str, os.PathLike)):
        path = Path(genes)
        if not path.is_file():
            raise FileNotFoundError(f"gene list {path}: no such file")
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
        if lines and any(sep in lines[0] for sep in ("\t", ",")):
            lines = pd.read_csv(path, sep=table_separator(path), comment="#").iloc[:, 0].astype(str).str.strip().tolist()
        names, source = lines, str(path)
    else:
        names, source = [str(gene) for gene in genes], "genes argument"
    if not names:
        raise ExpressionError(f"{source}: the gene list is empty")
    duplicated = pd.Index(names)[pd.Index(names).duplicated()].unique()
    if len(duplicated):
        raise ExpressionError(f"{source}: {len(duplicated)} duplicated gene name(s): {list_some(duplicated)}")
    return names


def load_expression(
    path: str | os.PathLike,
    genes: str | os.PathLike | Iterable[str] | None = None,
    *,
    min_samples: int = 1,
    top_n: int | None = None,
    select: str = "variance",
    transform: str | None = "log10p",
    orientation: str = "auto",
    samples: Iterable[str] | None = None,
    annotation: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Read an expression table as a samples x genes float32 DataFrame.

    Args:
        path: CSV/TSV file (optionally ``.gz``); first column holds the row ids.
        genes: genes to keep (list or file, see :func:`read_gene_list`), in that order;
            None applies the default rule (module docstring).
        min_samples: default rule: keep genes expressed (> 0) in at least this many samples.
        top_n: default rule: then keep the ``top_n`` genes with the largest ``select`` statistic.
        select: ``"variance"`` or ``"mean"`` (of the transformed values).
        transform: ``"log10p"`` for ``log10(1 + x)`` on raw counts / FPKM-UQ (must be >= 0);
            None keeps values as they are (already normalised; must be finite).
        orientation: ``"samples_x_genes"``, ``"genes_x_samples"`` (TCGA style) or ``"auto"``:
            with ``samples`` (e.g. ``manifest.sample_id``) the axis that matches more of
            them holds the samples; without, rows are genes when they look like gene ids
            (Ensembl ``ENSG...`` or ``SYMBOL|entrez``) and columns do not.
        samples: known sample ids, used only by ``orientation="auto"``.
        annotation: gene annotation (columns gene, gene_id, gene_name) that lets ``genes`` name
            the table's genes by Ensembl id or by name (:func:`resolve_genes`); default: the
            ``<table>.genes.tsv`` written beside the table by ``isg manifest``, if present.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"expression table {path}: no such file")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if select not in ("variance", "mean"):
        raise ValueError(f"select must be 'variance' or 'mean', got {select!r}")
    try:
        sep = table_separator(path)
        table = pd.read_csv(path, sep=sep, index_col=0)
        header = pd.read_csv(path, sep=sep, header=None, nrows=1, dtype=str).iloc[0, 1:]  # names before pandas de-duplicates them
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ExpressionError(f"{path}: cannot be read as a CSV/TSV table ({exc})") from exc
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ExpressionError(f"{path}: the table is empty (shape {table.shape})")
    table.index = table.index.map(str).str.strip()
    table.columns = header.fillna("").str.strip().to_numpy()

    if orientation == "auto":
        orientation = _detect_orientation(table, samples, path)
    if orientation == "genes_x_samples":
        table = table.T
    table.index.name, table.columns.name = "sample_id", "gene"

    _check_unique(table.index, "sample id", path)
    _check_unique(table.columns, "gene name", path)
    if genes is not None:  # only the requested genes are validated
        annotation = gene_annotation_of(path) if annotation is None else annotation
        table = table[resolve_genes(read_gene_list(genes), table.columns, annotation, source=path)]
    values = _numeric_values(table, path)
    _check_values(values, table, path, nonnegative=transform == "log10p")
    if transform == "log10p":
        values = np.log10(1.0 + values)
    expression = pd.DataFrame(values.astype(np.float32), index=table.index, columns=table.columns)
    return expression if genes is not None else _default_genes(expression, min_samples, top_n, select, path)


def gene_annotation_of(table_path: str | os.PathLike) -> pd.DataFrame | None:
    """The gene annotation written beside an expression table (``X.tsv`` -> ``X.genes.tsv``), or None."""
    path = Path(table_path)
    base = path.name[: -len("".join(path.suffixes))] if path.suffixes else path.name
    annotation = path.with_name(f"{base}.genes.tsv")
    if not annotation.is_file():
        return None
    genes = pd.read_csv(annotation, sep="\t", dtype=str, keep_default_na=False)
    if not set(ANNOTATION_COLUMNS) <= set(genes.columns):
        raise ExpressionError(f"{annotation}: not a gene annotation: needs columns {', '.join(ANNOTATION_COLUMNS)} "
                              f"(has: {list_some(genes.columns)})")
    return genes


def _unversioned(gene: str) -> str | None:
    match = _ENSEMBL.match(gene)
    return match.group(1) if match else None


def resolve_genes(wanted: list[str], columns: Iterable[str], annotation: pd.DataFrame | None = None,
                  source: str | os.PathLike = "expression table") -> list[str]:
    """The table columns of the requested genes, in order.

    A requested gene is found as a column name; else, case-insensitively, as an Ensembl id with or
    without its version (``ENSG00000141510`` finds ``ENSG00000141510.17``), as the name part of a
    ``NAME|GENE_ID`` column, or through ``annotation`` (gene -> gene_id, gene_name) as the id or name of
    a column. Genes found nowhere, or found as several columns, are an :class:`ExpressionError` listing them.
    """
    columns = pd.Index(columns)
    aliases: dict[str, set[str]] = {}

    def alias(key: str | None, column: str) -> None:
        if key:
            aliases.setdefault(key.upper(), set()).add(column)
            alias(_unversioned(key) if _unversioned(key) != key else None, column)

    for column in columns:
        alias(column, column)
        name, _, gene_id = column.partition("|")
        alias(name if gene_id else None, column)
        alias(gene_id or None, column)
    if annotation is not None:
        for gene, gene_id, name in annotation[list(ANNOTATION_COLUMNS)].itertuples(index=False):
            if gene in columns:
                alias(gene_id, gene)
                alias(name, gene)
    resolved, unknown, ambiguous = [], [], []
    for gene in wanted:
        hits = {gene} if gene in columns else aliases.get(gene.upper(), set()) or aliases.get(str(_unversioned(gene)).upper(), set())
        if len(hits) == 1:
            resolved.append(next(iter(hits)))
        elif hits:
            ambiguous.append(f"{gene} ({' or '.join(sorted(hits))})")
        else:
            unknown.append(gene)
    if unknown:
        raise ExpressionError(f"{source}: {len(unknown)} requested gene(s) not in the table: {list_some(unknown)} "
                              f"(the table has {len(columns)} genes, e.g. {list_some(columns[:3])})")
    if ambiguous:
        raise ExpressionError(f"{source}: {len(ambiguous)} requested gene(s) name several genes of the table: "
                              f"{list_some(ambiguous)}; request them by Ensembl id")
    twice = pd.Index(resolved)[pd.Index(resolved).duplicated()].unique()
    if len(twice):
        raise ExpressionError(f"{source}: gene(s) requested twice under different names: {list_some(twice)}")
    return resolved


def _detect_orientation(table: pd.DataFrame, samples: Iterable[str] | None, path: Path) -> str:
    if samples is not None:
        known = set(map(str, samples))
        in_rows, in_columns = table.index.isin(known).sum(), table.columns.isin(known).sum()
        if in_rows == 0 and in_columns == 0:
            raise ExpressionError(
                f"{path}: none of the {len(known)} manifest sample ids (e.g. {list_some(sorted(known), 3)}) is a row "
                f"or column id of the table: do the manifest and the table use the same ids? (table rows start "
                f"{list_some(table.index[:3])}, columns {list_some(table.columns[:3])})"
            )
        return "samples_x_genes" if in_rows >= in_columns else "genes_x_samples"
    rows_are_genes = table.index.str.match(_GENE_ID).mean() > 0.5
    columns_are_genes = table.columns.str.match(_GENE_ID).mean() > 0.5
    return "genes_x_samples" if rows_are_genes and not columns_are_genes else "samples_x_genes"


def _check_unique(ids: pd.Index, what: str, path: Path) -> None:
    duplicated = ids[ids.duplicated()].unique()
    if len(duplicated):
        raise ExpressionError(f"{path}: {len(duplicated)} duplicated {what}(s): {list_some(duplicated)}")


def _numeric_values(table: pd.DataFrame, path: Path) -> np.ndarray:
    text = [column for column, dtype in enumerate(table.dtypes) if not pd.api.types.is_numeric_dtype(dtype)]
    if not text:
        return table.to_numpy(dtype=np.float64)
    numeric = table.apply(pd.to_numeric, errors="coerce")
    bad = numeric.isna() & table.notna()
    if bad.values.any():
        # a column (gene) of text is usually a misplaced annotation column; name it
        bad_genes = table.columns[bad.any(axis=0)]
        row, col = np.argwhere(bad.values)[0]
        raise ExpressionError(
            f"{path}: {len(bad_genes)} gene(s) hold non-numeric values: {list_some(bad_genes)} "
            f"(e.g. sample {table.index[row]!r}, gene {table.columns[col]!r}: {table.iat[row, col]!r}); "
            "annotation columns must be removed, or the orientation is wrong"
        )
    return numeric.to_numpy(dtype=np.float64)


def _check_values(values: np.ndarray, table: pd.DataFrame, path: Path, nonnegative: bool) -> None:
    for problem, bad in (("NaN or infinite", ~np.isfinite(values)), ("negative", nonnegative & (values < 0))):
        if bad.any():
            cells = [f"{table.index[r]}/{table.columns[c]}" for r, c in np.argwhere(bad)]
            samples = table.index[bad.any(axis=1)]
            genes = table.columns[bad.any(axis=0)]
            hint = "; raw counts or FPKM-UQ are expected (use transform=None for normalised values)" if problem == "negative" else ""
            raise ExpressionError(
                f"{path}: {len(cells)} {problem} value(s) in {len(samples)} sample(s) x {len(genes)} gene(s): "
                f"samples {list_some(samples)}; genes {list_some(genes)}; cells (sample/gene) {list_some(cells)}{hint}"
            )


def _default_genes(expression: pd.DataFrame, min_samples: int, top_n: int | None, select: str, path: Path) -> pd.DataFrame:
    expressed = (expression > 0).sum(axis=0)
    kept = expression.loc[:, expressed >= min_samples]
    if kept.shape[1] == 0:
        raise ExpressionError(f"{path}: no gene is expressed in at least min_samples={min_samples} samples")
    if top_n is None:
        return kept
    statistic = kept.var(axis=0, ddof=0) if select == "variance" else kept.mean(axis=0)
    order = pd.DataFrame({"stat": statistic.to_numpy(), "gene": kept.columns}).sort_values(
        ["stat", "gene"], ascending=[False, True], kind="mergesort"
    )
    return kept[order["gene"].iloc[:top_n].tolist()]
