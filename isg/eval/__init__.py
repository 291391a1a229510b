"""Evaluation metrics, result files and figures (:mod:`isg.eval.metrics`)."""

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

__all__ = [
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
