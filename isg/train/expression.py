"""Cross-validated training of slide-level predictors (wiring only).

One loop serves every slide-level model of the registry (:mod:`isg.model`): the
Dual Attention network (``isg-N-k``, ``isg-N-k-plus``), the ViTs on global
features only (``vit-s``, ``vit-t4``) and the HE2RNA baseline (``he2rna``); it
asks each model what inputs it takes (``uses_local``, ``batch_inputs``). Per patient-level fold: train with L2 loss on
per-gene standardised log10(1 + x) expression (or binary cross-entropy for
MSI-H vs MSS), stop early on the validation loss, keep the best weights,
predict the held-out fold. Out-of-fold predictions are averaged per sample and
scored per gene (Pearson r, BH-FDR, significant genes) or by AUC. The output
folder also gets ``pipeline.json``: how the features were made, so
``isg predict`` can redo it on new slides.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from isg.data import splits as splits_lib
from isg.data.bags import BagDataset, collate_bags
from isg.data.manifest import match_samples
from isg.eval import metrics
from isg.model import Standardizer, create_model, forward_batch, model_class, save_fold_model
from isg.train.config import TrainConfig
from isg.utils import atomic_path, write_text_atomic

log = logging.getLogger(__name__)


def build_model(config: TrainConfig, d: int, local_grid: int | None, n_outputs: int) -> torch.nn.Module:
    """The slide-level model named by ``config.model`` (with ``config.model_kwargs``)."""
    return create_model(config.model, d=d, local_grid=local_grid, n_outputs=n_outputs, **config.model_kwargs)


@dataclass
class TrainProgress:
    """One finished epoch, as :func:`cross_validate` reports it to its ``progress`` callback."""

    fold: int  # 0-based
    n_folds: int
    epoch: int  # 0-based
    epochs: int  # the most this fold runs (early stopping may end it sooner)
    train_loss: float
    val_loss: float
    best_val_loss: float
    seconds: float  # since cross_validate started
    seconds_left: float  # upper bound: every remaining epoch of every fold at the mean epoch time so far


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


def fit_fold(config: TrainConfig, train: BagDataset, val: BagDataset, d: int, local_grid: int | None,
             on_epoch: Callable[[dict], None] | None = None) -> tuple[torch.nn.Module, dict]:
    """Train one model with early stopping on ``val``; returns the best model and its history.

    The model gets ``.standardizer`` (the targets' :class:`Standardizer`, None for MSI);
    ``on_epoch`` receives each epoch's history row.
    """
    device = torch.device(config.device)
    torch.manual_seed(config.seed)
    classify = config.task == "msi"
    n_outputs = 1 if classify else train.targets.shape[1]
    model = build_model(config, d, local_grid, n_outputs).to(device)
    scale = None if classify else Standardizer.fit(train.targets)
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
        if on_epoch is not None:
            on_epoch({**history[-1], "best_val_loss": best})
        if stale >= config.patience:
            break
    if best_state is None:
        raise ValueError(f"no epoch gave a finite validation loss ({history[-1]['val_loss']}): NaN or infinite features or targets?")
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


def cv_folds(manifest: pd.DataFrame, targets: pd.DataFrame, config: TrainConfig) -> list:
    """The patient-level folds :func:`cross_validate` uses for these slides, targets and ``config`` (a function
    of ``config.seed``, ``n_splits``, ``val_fraction`` and, for MSI, the labels it stratifies by)."""
    manifest, targets = match_samples(manifest, targets)
    stratify = targets.iloc[:, 0].astype(int).astype(str) if config.task == "msi" else None
    return splits_lib.patient_kfold(manifest, config.n_splits, config.seed, stratify=stratify, val_fraction=config.val_fraction)


def cross_validate(
    manifest: pd.DataFrame,
    feature_dir: str | Path,
    targets: pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    fold_feature_dirs: list[str | Path] | None = None,
) -> dict:
    """Patient-level k-fold CV; writes splits, per-fold and overall results, figures, per-fold models and pipeline.json.

    Args:
        manifest: slides (columns slide_path, slide_id, sample_id, patient_id).
        targets: samples x genes (log-normalised) or, for ``task="msi"``, one 0/1 column.
        progress: called with a :class:`TrainProgress` after every epoch (None: silent).
        fold_feature_dirs: fold-clean runs: fold k reads every bag (train, validation, test) from
            ``fold_feature_dirs[k]``, features whose selection cut and extractors were fitted on that fold's
            training slides only (folds: :func:`cv_folds`); ``pipeline.json`` then says so (``fold_clean``) and
            ``isg predict`` refuses the folder (each fold model has its own extractors).
    Returns the overall summary dict (also written to ``out_dir/summary.json``).
    """
    clock = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest, targets = match_samples(manifest, targets)
    folds = cv_folds(manifest, targets, config)
    if fold_feature_dirs is not None and len(fold_feature_dirs) != len(folds):
        raise ValueError(f"fold_feature_dirs: {len(fold_feature_dirs)} folder(s) for {len(folds)} folds")
    splits_lib.save_splits(out_dir / "splits.json", folds, seed=config.seed)
    local = model_class(config.model).uses_local  # whether the model reads local cubes, as it declares

    def bags(sample_ids, k: int, **kw) -> BagDataset:
        part = manifest[manifest["sample_id"].astype(str).isin(sample_ids)]
        source = feature_dir if fold_feature_dirs is None else fold_feature_dirs[k]
        return BagDataset.from_manifest(part, source, targets, local=local, **kw)

    predictions, fold_rows, epoch_seconds = [], [], []

    def report(k: int, row: dict) -> None:
        epoch_seconds.append(time.perf_counter() - clock - sum(epoch_seconds))
        left = (config.epochs - row["epoch"] - 1) + (len(folds) - k - 1) * config.epochs
        progress(TrainProgress(fold=k, n_folds=len(folds), epoch=row["epoch"], epochs=config.epochs,
                               train_loss=row["train_loss"], val_loss=row["val_loss"], best_val_loss=row["best_val_loss"],
                               seconds=time.perf_counter() - clock, seconds_left=left * float(np.mean(epoch_seconds))))

    for k, split in enumerate(folds):
        started = time.perf_counter()
        train = bags(split.train, k, max_patches=config.max_patches, cache=True)
        val = bags(split.val or split.train, k, cache=True)
        test = bags(split.test, k)
        d, grid = _feature_shape(train)
        model, info = fit_fold(config, train, val, d, grid, None if progress is None else lambda row, k=k: report(k, row))
        pred = predict_bags(model, test, config)
        pred.insert(0, "fold", k)
        predictions.append(pred)
        fold_score = _score(pred.drop(columns="fold"), manifest, targets, config)
        fold_rows.append({"fold": k, **fold_score, "epochs_run": info["epochs_run"], "best_val_loss": info["best_val_loss"], "seconds": time.perf_counter() - started})
        save_fold_model(out_dir / f"model_fold{k}.pt", model, config, outputs=list(targets.columns), fold=k, standardizer=model.standardizer)
        log.info("fold %d: %s", k, {key: round(v, 4) if isinstance(v, float) else v for key, v in fold_rows[-1].items()})

    oof = pd.concat(predictions)
    oof.index.name = "slide_id"
    with atomic_path(out_dir / "predictions_oof.csv") as tmp:
        oof.to_csv(tmp)
    per_sample = _per_sample(oof.drop(columns="fold"), manifest)
    summary = _score(per_sample, manifest, targets, config, out_dir=out_dir, aggregated=True)
    if config.task != "msi":
        summary["train_mean_floor"] = train_mean_floor(manifest, targets, folds)
    summary.update({"model": config.model, "task": config.task, "folds": fold_rows, "config": asdict(config)})
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    with atomic_path(out_dir / "folds.csv") as tmp:
        pd.DataFrame(fold_rows).to_csv(tmp, index=False)
    write_pipeline(out_dir, feature_dir if fold_feature_dirs is None else fold_feature_dirs[0], manifest["slide_id"].iloc[0],
                   fold_feature_dirs=fold_feature_dirs)
    return summary


def write_pipeline(out_dir: str | Path, feature_dir: str | Path, slide_id: str, fold_feature_dirs: list | None = None) -> None:
    """``out_dir/pipeline.json``: how the features were made, so ``isg predict`` can redo it on new slides.

    Keys, from one slide's patch file (:mod:`isg.data.patch_file`): ``features_dir``; ``patch_file_schema``;
    ``preprocess`` (the preprocess options that made the patches, and ``rule``: the selection rule applied,
    a :class:`~isg.select.SelectionRule` dict with the cohort's frozen cut); ``geometry`` (read level, patch
    sizes, ``mpp`` at the read level); ``global_features`` and ``local_features`` (the encoders' attrs:
    checkpoint, resolution, d, ``extractor_size``, ``loss_terms``, ``lpips_backbone``, ...); ``fold_clean``
    (the per-fold feature folders) for a fold-clean run.
    """
    from isg.data.patch_file import SCHEMA_VERSION, geometry_dict, read_patch_file

    feature_dir = Path(feature_dir)
    patches = read_patch_file(feature_dir / f"{slide_id}.h5", features=False)
    preprocess = dict(patches.options)
    if patches.rule is not None:  # as the current SelectionRule writes it (files of older versions lack new fields)
        from isg.select import SelectionRule

        preprocess["rule"] = SelectionRule.from_dict(patches.rule).to_dict()
    pipeline = {"features_dir": str(feature_dir.resolve()), "patch_file_schema": SCHEMA_VERSION, "preprocess": preprocess,
                "geometry": geometry_dict(patches.geometry), "global_features": patches.feature_attrs,
                "local_features": patches.local_feature_attrs}
    if fold_feature_dirs is not None:
        pipeline["fold_clean"] = {"fold_features_dirs": [str(Path(d).resolve()) for d in fold_feature_dirs],
                                  "note": "each fold model reads features of extractors fitted on its training slides"}
    write_text_atomic(Path(out_dir) / "pipeline.json", json.dumps(pipeline, indent=2, default=str))


def train_mean_floor(manifest: pd.DataFrame, targets: pd.DataFrame, folds: list) -> dict:
    """Score, on the same folds, of predicting each fold's training mean (what every head starts from).

    The line a model must clear on a small cohort: leaving a fold out moves the training mean against it,
    so this pooled out-of-fold r is negative, not 0 (-1 exactly with one sample per fold).
    """
    sample_of_slide = manifest["sample_id"].astype(str)
    predictions = []
    for split in folds:
        train = targets.loc[sample_of_slide[sample_of_slide.isin(split.train)]]  # one row per training slide
        test = sorted(split.test)
        predictions.append(pd.DataFrame(np.tile(train.mean().to_numpy(), (len(test), 1)), index=test, columns=targets.columns))
    pred = pd.concat(predictions)
    truth = targets.loc[pred.index]
    return {**metrics.summarize(metrics.gene_correlations(truth, pred)), "l2": metrics.l2_error(truth, pred)}


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
    summary = {**metrics.summarize(results), "l2": metrics.l2_error(truth, per_sample)}
    if out_dir is not None:
        metrics.save_results(out_dir / "genes.csv", results, summary)
        metrics.plot_gene_correlations(results, out_dir / "gene_correlations.png")
        top = list(results["gene"][:8])  # results are sorted by r, best first
        metrics.plot_pred_vs_true(truth[top], per_sample[top], top, out_dir / "pred_vs_true.png")
    return {**summary, "n_samples": len(per_sample)}
