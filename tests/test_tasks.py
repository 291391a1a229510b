"""Task registry (isg.model.tasks): the registered tasks, and a toy task added with one decorator."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from isg.model import load_fold_models
from isg.model import tasks as task_registry
from isg.model.tasks import Task, get_task, list_tasks, register_task
from isg.train.expression import TrainConfig, cross_validate
from test_train import _cohort


def test_registered_tasks_and_errors():
    assert {"regression", "msi"} <= set(list_tasks())
    assert get_task("msi").columns(["msi"]) == ["msi_h_probability"] and get_task("msi").n_outputs(1) == 1
    assert get_task("regression").columns(["a", "b"]) == ["a", "b"] and get_task("regression").n_outputs(2) == 2
    with pytest.raises(ValueError, match="unknown task 'nope'; registered: .*msi.*regression"):
        get_task("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_task("msi")(type("Again", (Task,), {}))


@pytest.mark.parametrize("rows", [1, 3, 7])
def test_msi_task_units_and_loss(rows):
    out = torch.randn(rows, 1)
    target = (torch.rand(rows, 1) > 0.5).float()
    msi = get_task("msi")
    torch.testing.assert_close(msi.to_units(out, None), torch.sigmoid(out))
    torch.testing.assert_close(msi.loss(out, target), torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], target[:, 0]))


@pytest.fixture
def l1_task():
    @register_task("toy-l1")
    class L1(Task):
        description = "toy: expression with an L1 loss, scored by mean absolute error"

        def loss(self, out, target):
            return (out - target).abs().mean()

        def score(self, truth, pred, out_dir=None):
            return {"mae": float(np.abs(truth.to_numpy() - pred.to_numpy()).mean()), "n_samples": len(pred)}

    yield get_task("toy-l1")
    task_registry._TASKS.pop("toy-l1")


def test_a_toy_task_trains_with_one_decorator(tmp_path, l1_task):
    manifest, feature_dir, targets = _cohort(tmp_path, n_slides=12, genes=3)
    config = TrainConfig(model="he2rna", task="toy-l1", epochs=3, patience=3, n_splits=3,
                         model_kwargs={"hidden": (8,), "ks": (1, 2)})
    summary = cross_validate(manifest, feature_dir, targets, tmp_path / "out", config)
    assert summary["task"] == "toy-l1" and summary["n_samples"] == 12 and np.isfinite(summary["mae"])
    assert "train_mean_floor" in summary  # an expression task: the floor is reported beside it
    oof = pd.read_csv(tmp_path / "out" / "predictions_oof.csv", index_col="slide_id")
    assert sorted(oof.index) == sorted(manifest.slide_id)
    models = load_fold_models(tmp_path / "out")
    assert models[0].task == "toy-l1" and models[0].columns == list(targets.columns)


# ----------------------------------------------------------------------------- a toy model, registered once


@pytest.fixture
def mean_pool_model():
    import torch.nn as nn

    from isg.model import registry

    class MeanPool(nn.Module):
        """Mean of the patch features, then a linear head: global features only."""

        uses_local = False
        batch_inputs = ("features", "mask")

        def __init__(self, d: int, n_outputs: int):
            super().__init__()
            self.head = nn.Linear(d, n_outputs)
            self.config = {"name": "toy-mean-pool", "d": d, "n_outputs": n_outputs}

        def forward(self, features, mask):  # [B, N, d], [B, N] -> [B, n_outputs]
            weights = mask.float().unsqueeze(-1)
            return self.head((features * weights).sum(1) / weights.sum(1).clamp(min=1))

    @registry.register_model("toy-mean-pool", MeanPool)
    def build(d, local_grid, n_outputs, **options):
        return MeanPool(d, n_outputs)

    yield "toy-mean-pool"
    registry._BUILDERS.pop("toy-mean-pool")


def test_a_toy_model_trains_and_predicts_with_one_decorator(tmp_path, mean_pool_model):
    manifest, feature_dir, targets = _cohort(tmp_path, genes=2)
    config = TrainConfig(model=mean_pool_model, epochs=60, patience=60, lr=1e-2, n_splits=3)
    summary = cross_validate(manifest, feature_dir, targets, tmp_path / "out", config)
    assert summary["model"] == mean_pool_model and summary["mean_r"] > 0.5  # linear in the mean feature: learnable
    models = load_fold_models(tmp_path / "out")
    assert models[0].config.model == mean_pool_model and not models[0].uses_local
