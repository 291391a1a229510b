"""Cross-validated training of slide-level predictors (wiring only).

One loop serves every slide-level model of the project: the Dual Attention
network (``isg-N-k``), the ViT on global features only (``vit-s``) and the
HE2RNA baseline (``he2rna``). Per patient-level fold: train with L2 loss on
per-gene standardised log10(1 + x) expression (or binary cross-entropy for
MSI-H vs MSS), stop early on the validation loss, keep the best weights,
predict the held-out fold. Out-of-fold predictions are averaged per sample and
scored per gene (Pearson r, BH-FDR, significant genes) or by AUC.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from isg.data import splits as splits_lib
from isg.utils import atomic_path, write_text_atomic
from isg.data.bags import BagDataset, collate_bags
from isg.data.manifest import match_samples
from isg.eval import metrics

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str = "isg-4-2"  # "isg-N-k", "vit-s" or "he2rna"
    task: str = "regression"  # or "msi" (binary classification)
    epochs: int = 40
    patience: int = 8
    batch_size: int = 4
    lr: float = 3e-4
    weight_decay: float = 1e-4
    clip_grad_norm: float = 1.0
    max_patches: int | None = 256  # random subset of patches per bag while training
    n_splits: int = 5
    val_fraction: float = 0.2
    seed: int = 0
    device: str = "cpu"
    model_kwargs: dict = field(default_factory=dict)


def build_model(config: TrainConfig, d: int, local_grid: int | None, n_outputs: int) -> torch.nn.Module:
    """The slide-level model named by ``config.model``."""
    if config.model == "he2rna":
        from isg.baselines.he2rna import HE2RNA

        return HE2RNA(d, n_outputs, **config.model_kwargs)
    from isg.model import create_model

    return create_model(config.model, d=d, local_grid=local_grid, n_outputs=n_outputs, **config.model_kwargs)


def uses_local_features(name: str) -> bool:
    return name.startswith("isg-")


def forward_batch(model: torch.nn.Module, batch: dict, device: torch.device) -> torch.Tensor:
    """[B, n_outputs] predictions of any slide-level model for a collated batch of bags."""
    mask = batch["mask"].to(device)
    features = batch["features"].to(device)
    if model.__class__.__name__ == "HE2RNA":
        return model(features, mask)
    local = batch.get("local_features")
    coords = batch["coords"].to(device, torch.float32)  # [B, N, 2] level-0 pixels
    return model(features, None if local is None else local.to(device), coords, mask)


class _Standardizer:
    """Per-gene z-scoring with the training fold's statistics ([G] mean and std)."""

    def __init__(self, targets: torch.Tensor):
        self.mean = targets.mean(0)
        self.std = targets.std(0).clamp_min(1e-6)

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.mean.to(y.device)) / self.std.to(y.device)

    def invert(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.std.to(z.device) + self.mean.to(z.device)


def _loader(dataset: BagDataset, config: TrainConfig, shuffle: bool) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed)
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=shuffle, collate_fn=collate_bags, generator=generator)


def _predict(model, loader, device) -> tuple[list[str], torch.Tensor]:
    model.eval()
    ids, outputs = [], []
    with torch.no_grad():
        for batch in loader:
            outputs.append(forward_batch(model, batch, device).float().cpu())
            ids.extend(batch["slide_id"])
    return ids, torch.cat(outputs)


def fit_fold(config: TrainConfig, train: BagDataset, val: BagDataset, d: int, local_grid: int | None) -> tuple[torch.nn.Module, dict]:
    """Train one model with early stopping on ``val``; returns the best model and its history."""
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    classify = config.task == "msi"
    n_outputs = 1 if classify else train.targets.shape[1]
    model = build_model(config, d, local_grid, n_outputs).to(device)
    scale = None if classify else _Standardizer(train.targets)
    if hasattr(model, "init_bias") and scale is not None:
        model.init_bias(torch.zeros(n_outputs))  # targets are standardised: the training mean is 0

    def loss_of(batch) -> torch.Tensor:
        out = forward_batch(model, batch, device)
        target = batch["target"].to(device)
        if classify:
            return torch.nn.functional.binary_cross_entropy_with_logits(out[:, 0], target[:, 0])
        return torch.nn.functional.mse_loss(out, scale(target))

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_loader, val_loader = _loader(train, config, True), _loader(val, config, False)
    best, best_state, stale, history = math.inf, None, 0, []
    for epoch in range(config.epochs):
        model.train()
        train_loss = []
        for batch in train_loader:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)  # transformers diverge without it at high lr
            optimizer.step()
            train_loss.append(loss.item())
        model.eval()
        with torch.no_grad():
            val_loss = float(np.mean([loss_of(batch).item() for batch in val_loader]))
        history.append({"epoch": epoch, "train_loss": float(np.mean(train_loss)), "val_loss": val_loss})
        if val_loss < best - 1e-6:
            best, best_state, stale = val_loss, copy.deepcopy(model.state_dict()), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    model.load_state_dict(best_state)
    model.standardizer = scale
    return model, {"history": history, "best_val_loss": best, "epochs_run": len(history)}


def predict_bags(model, dataset: BagDataset, config: TrainConfig) -> pd.DataFrame:
    """Per-slide predictions in target units (expression, or MSI-H probability)."""
    ids, out = _predict(model, _loader(dataset, config, False), torch.device(config.device))
    if config.task == "msi":
        return pd.DataFrame({"msi_h_probability": torch.sigmoid(out[:, 0]).numpy()}, index=ids)
    return pd.DataFrame(model.standardizer.invert(out).numpy(), index=ids)


def _feature_shape(dataset: BagDataset) -> tuple[int, int | None]:
    bag = dataset[0]
    local = bag.get("local_features")
    return bag["features"].shape[-1], None if local is None else local.shape[1]


def cross_validate(
    manifest: pd.DataFrame,
    feature_dir: str | Path,
    targets: pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig,
) -> dict:
    """Patient-level k-fold CV; writes splits, per-fold and overall results, figures and per-fold models.

    Args:
        manifest: slides (columns slide_path, slide_id, sample_id, patient_id).
        targets: samples x genes (log-normalised) or, for ``task="msi"``, one 0/1 column.
    Returns the overall summary dict (also written to ``out_dir/summary.json``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, targets = match_samples(manifest, targets)
    stratify = targets.iloc[:, 0].astype(int).astype(str) if config.task == "msi" else None
    folds = splits_lib.patient_kfold(manifest, config.n_splits, config.seed, stratify=stratify, val_fraction=config.val_fraction)
    splits_lib.save_splits(out_dir / "splits.json", folds, seed=config.seed)
    local = uses_local_features(config.model)

    def bags(sample_ids, **kw) -> BagDataset:
        part = manifest[manifest["sample_id"].astype(str).isin(sample_ids)]
        return BagDataset.from_manifest(part, feature_dir, targets, local=local, **kw)

    predictions, fold_rows = [], []
    for k, split in enumerate(folds):
        started = time.perf_counter()
        train = bags(split.train, max_patches=config.max_patches, cache=True)
        val = bags(split.val or split.train, cache=True)
        test = bags(split.test)
        d, grid = _feature_shape(train)
        model, info = fit_fold(config, train, val, d, grid)
        pred = predict_bags(model, test, config)
        pred.insert(0, "fold", k)
        predictions.append(pred)
        fold_score = _score(pred.drop(columns="fold"), manifest, targets, config)
        fold_rows.append({"fold": k, **fold_score, "epochs_run": info["epochs_run"], "best_val_loss": info["best_val_loss"], "seconds": time.perf_counter() - started})
        save_fold_model(out_dir / f"model_fold{k}.pt", model, config, d=d, local_grid=grid, outputs=list(targets.columns), fold=k)
        log.info("fold %d: %s", k, {key: round(v, 4) if isinstance(v, float) else v for key, v in fold_rows[-1].items()})

    oof = pd.concat(predictions)
    oof.index.name = "slide_id"
    oof.to_csv(out_dir / "predictions_oof.csv")
    per_sample = _per_sample(oof.drop(columns="fold"), manifest)
    summary = _score(per_sample, manifest, targets, config, out_dir=out_dir, aggregated=True)
    summary.update({"model": config.model, "task": config.task, "folds": fold_rows, "config": asdict(config)})
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    pd.DataFrame(fold_rows).to_csv(out_dir / "folds.csv", index=False)
    return summary


def save_fold_model(path: str | Path, model: torch.nn.Module, config: TrainConfig, *, d: int, local_grid: int | None, outputs: list[str], fold: int) -> None:
    """A fold's model with everything needed to rebuild and use it alone (written atomically)."""
    scale = model.standardizer
    checkpoint = {
        "format": "isg-slide-model/1",
        "config": asdict(config),
        "d": d,
        "local_grid": local_grid,
        "outputs": [str(name) for name in outputs],  # gene names, or the MSI column
        "fold": fold,
        "state_dict": model.state_dict(),
        "target_mean": None if scale is None else scale.mean,
        "target_std": None if scale is None else scale.std,
    }
    with atomic_path(path) as tmp:
        torch.save(checkpoint, tmp)


class SlideModel:
    """A trained fold model ready for inference: ``predict(batch) -> DataFrame`` in target units."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        if checkpoint.get("format") != "isg-slide-model/1":
            raise ValueError(f"{path}: not an isg slide-level model checkpoint (written by `isg train`)")
        self.path, self.outputs, self.fold = Path(path), checkpoint["outputs"], checkpoint["fold"]
        self.config = TrainConfig(**{**checkpoint["config"], "device": device})
        self.d, self.local_grid = checkpoint["d"], checkpoint["local_grid"]
        n_outputs = 1 if self.config.task == "msi" else len(self.outputs)
        self.model = build_model(self.config, self.d, self.local_grid, n_outputs)
        self.model.load_state_dict(checkpoint["state_dict"])
        self.model.to(device).eval()
        self.model.standardizer = None
        if checkpoint["target_mean"] is not None:
            self.model.standardizer = _Standardizer.__new__(_Standardizer)
            self.model.standardizer.mean, self.model.standardizer.std = checkpoint["target_mean"], checkpoint["target_std"]

    @property
    def uses_local(self) -> bool:
        return uses_local_features(self.config.model)

    @torch.no_grad()
    def predict(self, batch: dict) -> pd.DataFrame:
        """Per-slide predictions (rows ``batch["slide_id"]``) for a collated batch of bags."""
        out = forward_batch(self.model, batch, torch.device(self.config.device)).float().cpu()
        if self.config.task == "msi":
            return pd.DataFrame({"msi_h_probability": torch.sigmoid(out[:, 0]).numpy()}, index=batch["slide_id"])
        return pd.DataFrame(self.model.standardizer.invert(out).numpy(), index=batch["slide_id"], columns=self.outputs)


def load_fold_models(train_dir: str | Path, device: str = "cpu") -> list[SlideModel]:
    """Every fold model saved by :func:`cross_validate` in ``train_dir`` (an ensemble for inference)."""
    paths = sorted(Path(train_dir).glob("model_fold*.pt"))
    if not paths:
        raise FileNotFoundError(f"{train_dir}: no model_fold*.pt checkpoints (train a model with `isg train` first)")
    return [SlideModel(path, device) for path in paths]


def _per_sample(slide_predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    sample_of = manifest.set_index("slide_id")["sample_id"].astype(str)
    return slide_predictions.groupby(sample_of.reindex(slide_predictions.index).to_numpy()).mean()


def _score(pred: pd.DataFrame, manifest, targets: pd.DataFrame, config: TrainConfig, out_dir: Path | None = None, aggregated: bool = False) -> dict:
    per_sample = pred if aggregated else _per_sample(pred, manifest)
    truth = targets.loc[per_sample.index]
    if config.task == "msi":
        labels = truth.iloc[:, 0].to_numpy()
        auc = metrics.roc_auc(labels, per_sample.iloc[:, 0].to_numpy()) if 0 < labels.sum() < len(labels) else float("nan")
        return {"auc": auc, "n_samples": len(per_sample)}
    if len(per_sample) < 3:
        return {"mean_r": float("nan"), "n_samples": len(per_sample)}
    per_sample.columns = truth.columns
    results = metrics.gene_correlations(truth, per_sample)
    summary = metrics.summarize(results)
    if out_dir is not None:
        metrics.save_results(out_dir / "genes.csv", results, summary)
        metrics.plot_gene_correlations(results, out_dir / "gene_correlations.png")
        top = list(results["gene"][:8])  # results are sorted by r, best first
        metrics.plot_pred_vs_true(truth[top], per_sample[top], top, out_dir / "pred_vs_true.png")
    return {**summary, "n_samples": len(per_sample)}
