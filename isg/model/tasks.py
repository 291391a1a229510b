"""Task registry (timm style, like the models): what a slide model predicts, how it learns and how it is scored.

A task is registered once with :func:`register_task` and owns everything that differs between tasks:
the output columns, the loss, how raw outputs become target units, the split stratification, the
score, and which targets the CLI reads. Training, prediction and the CLI ask the task, never its name.

Registered: ``regression`` (per-gene expression, the paper's task; L2 loss on standardised targets,
per-gene Pearson r) and ``msi`` (MSI-H vs MSS, paper Tab. 3; binary cross-entropy, ROC AUC).

Adding a task: subclass :class:`Task`, decorate it with ``@register_task("name")``; ``isg train --task name``
and ``isg predict`` then serve it. No torch import at module import (the CLI's help lists the tasks).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

DEFAULT_TASK = "regression"
_TASKS: dict[str, Task] = {}


class Task:
    """A prediction task: subclasses set the attributes and override the methods they change."""

    name: str = ""
    description: str = ""
    targets: str = "expression"  # what `isg train` reads: "expression" (a samples x genes table) or "labels" (a class column)
    standardized: bool = True  # targets are standardised per column before the loss (and inverted after)
    per_patch_maps: bool = True  # heatmaps / attention maps of `isg predict` make sense for it

    def columns(self, outputs: list[str]) -> list[str]:
        """Names of the prediction columns of a model trained on target columns ``outputs``."""
        return list(outputs)

    def n_outputs(self, n_targets: int) -> int:
        """Model outputs for ``n_targets`` target columns."""
        return n_targets

    def loss(self, out, target):
        """Training loss of raw outputs ``out`` [B, n_outputs] against (standardised) targets [B, n_outputs]."""
        import torch.nn.functional as F

        return F.mse_loss(out, target)

    def to_units(self, out, standardizer):
        """Raw outputs [B, n_outputs] -> target units."""
        return standardizer.invert(out)

    def stratify(self, targets):
        """Labels to stratify the patient folds by (a Series over samples), or None."""
        return None

    def score(self, truth, pred, out_dir: Path | None = None) -> dict:
        """Summary of per-sample predictions ``pred`` against ``truth`` (DataFrames, same index); ``out_dir``:
        also write the per-output table and figures there."""
        raise NotImplementedError


def register_task(name: str) -> Callable[[type], type]:
    """Class decorator: register a :class:`Task` subclass under ``name`` (one instance serves every call)."""

    def decorate(cls: type) -> type:
        if name in _TASKS:
            raise ValueError(f"task {name!r} is already registered")
        cls.name = name
        _TASKS[name] = cls()
        return cls

    return decorate


def list_tasks() -> list[str]:
    return sorted(_TASKS)


def get_task(name: str) -> Task:
    try:
        return _TASKS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown task {name!r}; registered: {', '.join(list_tasks())}") from None


@register_task("regression")
class Regression(Task):
    description = "per-gene expression (log10(1 + x)), L2 loss, per-gene Pearson r"

    def score(self, truth, pred, out_dir=None) -> dict:
        from isg.eval import metrics

        if len(pred) < 3:
            return {"mean_r": float("nan"), "n_samples": len(pred)}
        pred = pred.set_axis(truth.columns, axis=1)
        results = metrics.gene_correlations(truth, pred)
        summary = {**metrics.summarize(results), "l2": metrics.l2_error(truth, pred)}
        if out_dir is not None:
            metrics.save_results(out_dir / "genes.csv", results, summary)
            metrics.plot_gene_correlations(results, out_dir / "gene_correlations.png")
            top = list(results["gene"][:8])  # results are sorted by r, best first
            metrics.plot_pred_vs_true(truth[top], pred[top], top, out_dir / "pred_vs_true.png")
        return {**summary, "n_samples": len(pred)}


@register_task("msi")
class MSI(Task):
    description = "MSI-H vs MSS classification (paper Tab. 3), binary cross-entropy, ROC AUC"
    targets = "labels"
    standardized = False
    per_patch_maps = False

    def columns(self, outputs):
        return ["msi_h_probability"]

    def n_outputs(self, n_targets):
        return 1

    def loss(self, out, target):
        import torch.nn.functional as F

        return F.binary_cross_entropy_with_logits(out[:, 0], target[:, 0])

    def to_units(self, out, standardizer):
        import torch

        return torch.sigmoid(out)

    def stratify(self, targets):
        return targets.iloc[:, 0].astype(int).astype(str)

    def score(self, truth, pred, out_dir=None) -> dict:
        from isg.eval import metrics

        labels = truth.iloc[:, 0].to_numpy()
        auc = metrics.roc_auc(labels, pred.iloc[:, 0].to_numpy()) if 0 < labels.sum() < len(labels) else float("nan")
        return {"auc": auc, "n_samples": len(pred)}


__all__ = ["DEFAULT_TASK", "Task", "get_task", "list_tasks", "register_task"]
