"""Evaluation as in the ISG and HE2RNA papers.

Per gene: Pearson r between true and predicted expression over the test
samples, its two-sided p-value, and the Benjamini-Hochberg FDR-corrected
p-value (q). A gene is *significantly predicted* when r > 0 and q < alpha
(0.05). Per table: the L2 error (mean squared error over samples and genes, in the
units of the inputs). Also: ROC AUC (e.g. MSI-H vs MSS) via the Mann-Whitney rank statistic,
writers for CSV/JSON results and two matplotlib figures.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import special, stats

from isg.utils import atomic_path, write_text_atomic


def _as_matrix(y, name: str) -> np.ndarray:
    if hasattr(y, "detach"):  # torch tensor
        y = y.detach().cpu().numpy()
    y = np.asarray(y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2:
        raise ValueError(f"{name} must be [n_samples, n_genes], got shape {y.shape}")
    return y


def _aligned(y_true, y_pred, genes: Sequence[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Both as [n_samples, n_genes] float64; DataFrames are aligned by sample and gene labels."""
    if isinstance(y_true, pd.DataFrame) and isinstance(y_pred, pd.DataFrame):
        if set(y_true.index) != set(y_pred.index) or set(y_true.columns) != set(y_pred.columns):
            raise ValueError("y_true and y_pred DataFrames must have the same samples (index) and genes (columns)")
        y_pred = y_pred.loc[y_true.index, y_true.columns]
        genes = list(map(str, y_true.columns)) if genes is None else genes
    true, pred = _as_matrix(y_true, "y_true"), _as_matrix(y_pred, "y_pred")
    if true.shape != pred.shape:
        raise ValueError(f"y_true {true.shape} and y_pred {pred.shape} differ in shape")
    genes = [f"gene_{i}" for i in range(true.shape[1])] if genes is None else list(map(str, genes))
    if len(genes) != true.shape[1]:
        raise ValueError(f"{len(genes)} gene names for {true.shape[1]} columns")
    return true, pred, genes


def pearson_per_gene(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    """Pearson r and two-sided p-value per column of [n_samples, n_genes] inputs.

    Same values as ``scipy.stats.pearsonr`` column by column; a constant column
    gives r = p = NaN.
    """
    true, pred, _ = _aligned(y_true, y_pred, None)
    n = len(true)
    if n < 3:
        raise ValueError(f"Pearson p-values need at least 3 samples, got {n}")
    true, pred = true - true.mean(0), pred - pred.mean(0)  # [n, G]
    norm = np.sqrt((true**2).sum(0) * (pred**2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.clip((true * pred).sum(0) / norm, -1.0, 1.0)
    r[norm == 0] = np.nan
    # r follows a Beta(n/2 - 1, n/2 - 1) law on [-1, 1] under independence
    half = n / 2 - 1
    p = 2 * special.betainc(half, half, (1 - np.abs(r)) / 2)
    return r, np.minimum(p, 1.0)


def benjamini_hochberg(p_values) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same order as the input; NaNs stay NaN and do not count."""
    p = np.asarray(p_values, dtype=np.float64)
    q = np.full(p.shape, np.nan)
    valid = np.flatnonzero(~np.isnan(p.ravel()))
    if len(valid) == 0:
        return q
    order = valid[np.argsort(p.ravel()[valid], kind="stable")]
    m = len(order)
    scaled = p.ravel()[order] * m / np.arange(1, m + 1)
    q.ravel()[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q


def gene_correlations(y_true, y_pred, genes: Sequence[str] | None = None, alpha: float = 0.05) -> pd.DataFrame:
    """Per-gene table: ``gene, r, p, q, significant`` (r > 0 and BH q < alpha), sorted by r descending."""
    true, pred, genes = _aligned(y_true, y_pred, genes)
    r, p = pearson_per_gene(true, pred)
    q = benjamini_hochberg(p)
    table = pd.DataFrame({"gene": genes, "r": r, "p": p, "q": q})
    table["significant"] = (table["r"] > 0) & (table["q"] < alpha)
    return table.sort_values("r", ascending=False, na_position="last", kind="stable").reset_index(drop=True)


def summarize(results: pd.DataFrame, alpha: float = 0.05) -> dict:
    """Headline numbers of a :func:`gene_correlations` table."""
    r = results["r"].dropna()
    return {
        "n_genes": int(len(results)),
        "n_constant": int(results["r"].isna().sum()),
        "mean_r": float(r.mean()) if len(r) else math.nan,
        "median_r": float(r.median()) if len(r) else math.nan,
        "n_significant": int(results["significant"].sum()),
        "alpha": alpha,
    }


def l2_error(y_true, y_pred) -> float:
    """Mean squared error over every sample and gene of [n_samples, n_genes] inputs (DataFrames aligned by label).

    The paper's "L2" column next to PCC; in ``isg train`` units, log10(1 + x) expression.
    """
    true, pred, _ = _aligned(y_true, y_pred, None)
    if true.size == 0:
        raise ValueError("L2 error of no samples")
    return float(np.mean((true - pred) ** 2))


def roc_auc(labels, scores, positive=1) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties counting 1/2.

    ``labels`` equal to ``positive`` (e.g. ``"MSI-H"``) are positives, all others negatives.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} differ in shape")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    is_positive = labels == positive
    n_pos, n_neg = int(is_positive.sum()), int((~is_positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes; got {n_pos} positive ({positive!r}) and {n_neg} negative labels")
    ranks = stats.rankdata(scores)  # average ranks: ties count 1/2
    return float((ranks[is_positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _json_value(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def save_results(path: str | os.PathLike, results: pd.DataFrame, summary: dict | None = None) -> None:
    """Write a per-gene table atomically: ``.csv`` (table only) or ``.json`` (``{"summary", "genes"}``)."""
    path = Path(path)
    if path.suffix == ".csv":
        with atomic_path(path) as tmp:
            results.to_csv(tmp, index=False)
    elif path.suffix == ".json":
        records = [{k: _json_value(v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in results.to_dict("records")]
        summary = {k: _json_value(v) for k, v in (summary or summarize(results)).items()}
        write_text_atomic(path, json.dumps({"summary": summary, "genes": records}, indent=1))
    else:
        raise ValueError(f"results path {path}: expected a .csv or .json suffix")


def save_figure(figure, path: str | os.PathLike) -> None:
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(figure)


def plot_gene_correlations(results: pd.DataFrame, path: str | os.PathLike) -> None:
    """Sorted per-gene Pearson r as bars, significantly predicted genes highlighted."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    ordered = results.dropna(subset=["r"]).sort_values("r", ascending=False)
    figure, axis = plt.subplots(figsize=(8, 3.5))
    colors = np.where(ordered["significant"], "tab:red", "tab:gray")
    axis.bar(np.arange(len(ordered)), ordered["r"], width=1.0, color=colors, linewidth=0)
    axis.axhline(0, color="black", linewidth=0.6)
    axis.set(xlabel="genes (sorted by r)", ylabel="Pearson r", xlim=(-0.5, max(len(ordered), 1) - 0.5))
    axis.set_title(f"mean r = {ordered['r'].mean():.3f}; {int(ordered['significant'].sum())} / {len(results)} genes significant (red)")
    save_figure(figure, path)


def plot_pred_vs_true(y_true, y_pred, genes: Sequence[str], path: str | os.PathLike, columns: int = 4) -> None:
    """Scatter of predicted vs true expression for the named genes (one panel each, r in the title)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = list(y_true.columns) if isinstance(y_true, pd.DataFrame) else None
    true, pred, all_genes = _aligned(y_true, y_pred, names)
    missing = [g for g in genes if g not in all_genes]
    if missing:
        raise ValueError(f"genes not in the data: {missing}")
    rows = math.ceil(len(genes) / columns)
    figure, axes = plt.subplots(rows, min(columns, len(genes)), figsize=(3 * min(columns, len(genes)), 3 * rows), squeeze=False)
    for axis in axes.ravel()[len(genes):]:
        axis.set_visible(False)
    for axis, gene in zip(axes.ravel(), genes):
        j = all_genes.index(gene)
        r = np.corrcoef(true[:, j], pred[:, j])[0, 1]
        axis.scatter(true[:, j], pred[:, j], s=8, alpha=0.7)
        low, high = min(true[:, j].min(), pred[:, j].min()), max(true[:, j].max(), pred[:, j].max())
        axis.plot([low, high], [low, high], color="gray", linewidth=0.6, linestyle="--")
        axis.set(title=f"{gene} (r = {r:.2f})", xlabel="true", ylabel="predicted")
    figure.tight_layout()
    save_figure(figure, path)
