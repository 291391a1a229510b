"""What a trained slide model is, how it is stored and loaded (format: :mod:`isg.checkpoint`).

* :func:`save_model` / :func:`load_model`: a model of the registry (``kind="model"``).
* :func:`save_fold_model` / :class:`SlideModel` / :func:`load_fold_models`: a model
  trained on one fold by :func:`isg.train.expression.cross_validate`, with
  everything needed to use it alone: the ``create_model`` arguments, the task,
  the output names (genes or the MSI column), the fold and the target
  :class:`Standardizer` (``kind="fold-model"``).
* :func:`forward_batch`: any slide model on a collated batch of bags
  (:func:`isg.data.collate_bags`), by the inputs the model declares.

Nothing here unpickles: files are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch
import torch.nn as nn

from isg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from isg.model.registry import create_model
from isg.model.tasks import get_task


class Standardizer:
    """Per-output z-scoring with a training fold's statistics: ``mean``, ``std`` [G]."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = torch.as_tensor(mean).float(), torch.as_tensor(std).float()

    @classmethod
    def fit(cls, targets: torch.Tensor) -> Standardizer:
        """From training targets [n, G] (std clamped at 1e-6)."""
        return cls(targets.mean(0), targets.std(0).clamp_min(1e-6))

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean.to(y.device)) / self.std.to(y.device)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "std": self.std}


# ----------------------------------------------------------------------------- registry models


def save_model(path: str | os.PathLike, model: nn.Module, config: dict | None = None, **extra) -> None:
    """Write a registry model (``config`` defaults to ``model.config``; ``extra``: JSON values) atomically."""
    config = dict(config if config is not None else getattr(model, "config", None) or {})
    if "name" not in config:
        raise ValueError(f"save_model({path}): config must hold the create_model arguments (name, d, local_grid, n_outputs, ...)")
    save_checkpoint(path, "model", config, {"model": model.state_dict()}, extra)


def load_model(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_model` and load its weights (eval mode; ``.extra`` attached)."""
    checkpoint = load_checkpoint(path, "model", map_location)
    model = _rebuild(checkpoint.config, checkpoint.state["model"], path)
    model.extra = checkpoint.extra
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()


def _rebuild(config: dict, state: dict, path) -> nn.Module:
    config = dict(config)
    try:
        model = create_model(config.pop("name"), **config)
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the stored model cannot be rebuilt ({str(exc).splitlines()[0]})") from None
    return model


# ----------------------------------------------------------------------------- batches


def model_inputs(model: nn.Module, batch: dict, device: torch.device | str = "cpu") -> list:
    """The arguments of ``model`` from a collated batch: the keys it declares (``batch_inputs``), on ``device``."""
    args = []
    for key in model.batch_inputs:
        value = batch.get(key)
        if value is not None:
            value = value.to(device, torch.float32) if key == "coords" else value.to(device)  # coords: level-0 pixels
        args.append(value)
    return args


def forward_batch(model: nn.Module, batch: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, n_outputs] of any slide model for a collated batch of bags."""
    return model(*model_inputs(model, batch, device))


def explain_batch(model: nn.Module, batch: dict, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """``model.explain`` on a collated batch (see :meth:`isg.model.DualAttentionNet.explain`)."""
    if not hasattr(model, "explain"):
        raise ValueError(f"{type(model).__name__} has no per-patch explanation")
    return model.explain(*model_inputs(model, batch, device))


# ----------------------------------------------------------------------------- fold models


def save_fold_model(path: str | os.PathLike, model: nn.Module, train_config, *, outputs: list[str], fold: int,
                    standardizer: Standardizer | None = None) -> None:
    """A fold's model with everything needed to rebuild and use it alone (written atomically).

    ``model`` comes from :func:`isg.model.create_model` (its ``config``); ``train_config``
    is the training configuration (a dataclass or dict with ``task``), ``outputs`` the
    target names, ``standardizer`` the regression targets' scaling (None for MSI).
    """
    train = asdict(train_config) if is_dataclass(train_config) else dict(train_config)
    config = {"model": dict(model.config), "task": train.get("task", "regression"),
              "outputs": [str(name) for name in outputs], "fold": int(fold), "train": train}
    state = {"model": model.state_dict()}
    if standardizer is not None:
        state["standardizer"] = standardizer.state_dict()
    save_checkpoint(path, "fold-model", config, state)


class SlideModel:
    """A trained fold model ready for inference: ``predict(batch) -> DataFrame`` in target units.

    Attributes: ``model`` (eval mode), ``task`` (a name in :mod:`isg.model.tasks`), ``outputs``,
    ``fold``, ``standardizer``, ``uses_local``, ``config`` (the training options,
    e.g. ``config.model``, ``config.task``), ``path``.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        checkpoint = load_checkpoint(path, "fold-model")
        config = checkpoint.config
        self.path, self.device = Path(path), torch.device(device)
        self.task, self.outputs, self.fold = config["task"], list(config["outputs"]), config["fold"]
        self.config = SimpleNamespace(**{**config["train"], "model": config["model"]["name"], "task": self.task, "device": device})
        self.model = _rebuild(config["model"], checkpoint.state["model"], path).to(device).eval()
        scale = checkpoint.state.get("standardizer")
        self.standardizer = None if scale is None else Standardizer(scale["mean"], scale["std"])
        if get_task(self.task).standardized and self.standardizer is None:
            raise CheckpointError(f"{path}: regression fold model without target statistics (standardizer)")

    @property
    def uses_local(self) -> bool:
        return self.model.uses_local

    def _to_units(self, out: torch.Tensor) -> torch.Tensor:
        return get_task(self.task).to_units(out, self.standardizer)

    @property
    def columns(self) -> list[str]:
        return get_task(self.task).columns(self.outputs)

    @torch.no_grad()
    def predict(self, batch: dict) -> pd.DataFrame:
        """Per-slide predictions (rows ``batch["slide_id"]``) for a collated batch of bags."""
        out = forward_batch(self.model, batch, self.device).float().cpu()
        return pd.DataFrame(self._to_units(out).numpy(), index=batch["slide_id"], columns=self.columns)

    @torch.no_grad()
    def explain(self, batch: dict) -> dict[str, torch.Tensor]:
        """The model's per-patch views (:func:`explain_batch`), ``patch_values`` in target units (padded patches 0)."""
        views = {k: v.float().cpu() for k, v in explain_batch(self.model, batch, self.device).items()}
        mask = batch["mask"].cpu().unsqueeze(-1)
        views["patch_values"] = torch.where(mask, self._to_units(views["patch_values"]), 0.0)
        return views


def load_fold_models(train_dir: str | os.PathLike, device: str = "cpu") -> list[SlideModel]:
    """Every fold model saved by ``cross_validate`` in ``train_dir`` (an ensemble for inference)."""
    paths = sorted(Path(train_dir).glob("model_fold*.pt"))
    if not paths:
        raise FileNotFoundError(f"{train_dir}: no model_fold*.pt checkpoints (train a model with `isg train` first)")
    return [SlideModel(path, device) for path in paths]
