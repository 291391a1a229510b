"""Evaluation metrics, result files and figures (:mod:`isg.eval.metrics`); known-answer scores of a patch
selection (:mod:`isg.eval.selection`)."""

from isg.eval.metrics import (
    benjamini_hochberg,
    gene_correlations,
    l2_error,
    pearson_per_gene,
    plot_gene_correlations,
    plot_pred_vs_true,
    roc_auc,
    save_results,
    summarize,
)
from isg.eval.selection import SIGNAL_MIN_FRACTION, mean_precision, selection_precision

__all__ = [
    "SIGNAL_MIN_FRACTION",
    "mean_precision",
    "selection_precision",
    "benjamini_hochberg",
    "gene_correlations",
    "l2_error",
    "pearson_per_gene",
    "plot_gene_correlations",
    "plot_pred_vs_true",
    "roc_auc",
    "save_results",
    "summarize",
]
