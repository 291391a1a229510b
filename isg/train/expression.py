"""Cross-validated training of slide-level predictors (wiring only).

One loop serves every slide-level model of the registry (:mod:`isg.model`): the
Dual Attention network (``isg-N-k``, ``isg-N-k-plus``), the ViTs on global
features only (``vit-s``, ``vit-t4``) and the HE2RNA baseline (``he2rna``); it
asks each model what inputs it takes (``uses_local``, ``batch_inputs``). Per patient-level fold: train with L2 loss on
per-gene standardised log10(1 + x) expression (or binary cross-entropy for
MSI-H vs MSS), stop early on the validation loss, keep the best weights,
predict the held-out fold. Out-of-fold predictions are averaged per sample and
scored per gene (Pearson r, BH-FDR, significant genes) or by AUC. The output
folder is a model folder that travels (:mod:`isg.model.folder`: the fold models, copies of the extractors,
``model.json`` with the frozen selection rule, ``README.md``), so ``isg predict`` can redo the features on new
slides from any directory; ``pipeline.json`` records how the features were made, as earlier versions wrote it.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import tempfile
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
from isg.data.patch_file import read_patch_file
from isg.model import Standardizer, create_model, forward_batch, model_class, save_fold_model
from isg.model.folder import write_model_folder
from isg.model.tasks import get_task
from isg.train.config import TrainConfig
from isg.train.distributed import Ranks, barrier, ranks_now, sum_over_ranks, sync_gradients
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
    task = get_task(config.task)
    n_outputs = task.n_outputs(train.targets.shape[1])
    model = build_model(config, d, local_grid, n_outputs).to(device)
    scale = Standardizer.fit(train.targets) if task.standardized else None
    if hasattr(model, "init_bias") and scale is not None:
        model.init_bias(torch.zeros(n_outputs))  # targets are standardised: the training mean is 0

    def loss_of(batch) -> torch.Tensor:
        out = forward_batch(model, batch, device)
        target = batch["target"].to(device)
        return task.loss(out, scale(target) if scale is not None else target)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    train_loader, val_loader = _loader(train, config, True), _loader(val, config, False)
    ranks = ranks_now()  # under torchrun every rank draws each global batch and trains on its share
    best, best_state, stale, history = math.inf, None, 0, []
    for epoch in range(config.epochs):
        model.train()
        train_loss = []
        for batch in train_loader:
            mine, share = rank_share(batch, ranks)
            loss = loss_of(mine) * share  # this rank's part of the global batch's mean loss
            optimizer.zero_grad(set_to_none=True)
            (loss * ranks.world_size).backward()
            sync_gradients(model.parameters(), ranks)  # the mean over ranks: the gradient of the global mean
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)  # transformers diverge without it at high lr
            optimizer.step()
            train_loss.append(sum_over_ranks(loss.detach(), ranks).item())
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


def rank_share(batch: dict, ranks: Ranks) -> tuple[dict, float]:
    """This rank's share of a collated global batch (items rank, rank + N, ...) and the fraction of the batch it
    holds; a rank left without items gets the first one with fraction 0 (it still joins the gradient all-reduce)."""
    if not ranks.enabled:
        return batch, 1.0
    n = len(batch["slide_id"])
    rows = list(range(ranks.rank, n, ranks.world_size))
    share = len(rows) / n
    rows = rows or [0]
    return {key: value[rows] if torch.is_tensor(value) else [value[i] for i in rows] for key, value in batch.items()}, share


def predict_bags(model, dataset: BagDataset, config: TrainConfig) -> pd.DataFrame:
    """Per-slide predictions in target units (expression, or MSI-H probability)."""
    ids, out = _predict(model, _loader(dataset, config, False), torch.device(config.device))
    return pd.DataFrame(get_task(config.task).to_units(out, model.standardizer).numpy(), index=ids)


def _feature_shape(dataset: BagDataset) -> tuple[int, int | None]:
    bag = dataset[0]
    local = bag.get("local_features")
    return bag["features"].shape[-1], None if local is None else local.shape[1]


def cv_folds(manifest: pd.DataFrame, targets: pd.DataFrame, config: TrainConfig) -> list:
    """The patient-level folds :func:`cross_validate` uses for these slides, targets and ``config`` (a function
    of ``config.seed``, ``n_splits``, ``val_fraction`` and, for MSI, the labels it stratifies by)."""
    manifest, targets = match_samples(manifest, targets)
    stratify = get_task(config.task).stratify(targets)
    return splits_lib.patient_kfold(manifest, config.n_splits, config.seed, stratify=stratify, val_fraction=config.val_fraction)


def cross_validate(
    manifest: pd.DataFrame,
    feature_dir: str | Path,
    targets: pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig,
    progress: Callable[[TrainProgress], None] | None = None,
    resume: bool = True,
    fold_feature_dirs: list[str | Path] | None = None,
) -> dict:
    """Patient-level k-fold CV; writes splits, per-fold and overall results, figures, per-fold models and pipeline.json.

    Args:
        manifest: slides (columns slide_path, slide_id, sample_id, patient_id).
        targets: samples x genes (log-normalised) or, for ``task="msi"``, one 0/1 column.
        progress: called with a :class:`TrainProgress` after every epoch (None: silent).
        resume: reuse the folds a previous run with the same config finished (``out_dir/folds/fold<k>.json``
            beside ``model_fold<k>.pt``): a run killed in fold 4 restarts at fold 4.
        fold_feature_dirs: fold-clean runs: fold k reads every bag (train, validation, test) from
            ``fold_feature_dirs[k]``, features whose selection cut and extractors were fitted on that fold's
            training slides only (folds: :func:`cv_folds`); ``pipeline.json`` then says so (``fold_clean``) and
            ``isg predict`` refuses the folder (each fold model has its own extractors).
    Returns the overall summary dict (also written to ``out_dir/summary.json``).

    Under torchrun every rank trains every fold on its share of each global batch (:func:`fit_fold`); rank 0
    alone writes ``out_dir`` (the other ranks write to a scratch folder, dropped at the end).
    """
    clock = time.perf_counter()
    records_dir = out_dir = Path(out_dir)
    if not ranks_now().is_main:
        scratch = tempfile.TemporaryDirectory(prefix="isg-rank-")  # removed when this call returns
        out_dir = Path(scratch.name)
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

    data = data_key(manifest, [feature_dir] if fold_feature_dirs is None else fold_feature_dirs, targets)
    finished = {k: fold_record(records_dir, k, config, split, data) for k, split in enumerate(folds)} if resume else {}
    barrier()  # every rank has read the records before rank 0 writes new ones
    for k, split in enumerate(folds):
        if finished.get(k) is not None:
            record = finished[k]
            predictions.append(pd.DataFrame(**record["predictions"]))
            fold_rows.append(record["row"])
            log.info("fold %d: finished by a previous run (%s)", k, records_dir / FOLD_RECORDS / f"fold{k}.json")
            continue
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
        write_fold_record(out_dir, k, config, split, data, fold_rows[-1], pred, info["history"])
        log.info("fold %d: %s", k, {key: round(v, 4) if isinstance(v, float) else v for key, v in fold_rows[-1].items()})

    oof = pd.concat(predictions)
    oof.index.name = "slide_id"
    with atomic_path(out_dir / "predictions_oof.csv") as tmp:
        oof.to_csv(tmp)
    per_sample = _per_sample(oof.drop(columns="fold"), manifest)
    summary = _score(per_sample, manifest, targets, config, out_dir=out_dir, aggregated=True)
    if get_task(config.task).targets == "expression":  # what predicting each fold's training mean scores on the same folds
        summary["train_mean_floor"] = train_mean_floor(manifest, targets, folds, config.task)
    summary.update({"model": config.model, "task": config.task, "folds": fold_rows, "config": asdict(config)})
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, default=float))
    with atomic_path(out_dir / "folds.csv") as tmp:
        pd.DataFrame(fold_rows).to_csv(tmp, index=False)
    write_pipeline(out_dir, feature_dir if fold_feature_dirs is None else fold_feature_dirs[0], manifest["slide_id"].iloc[0],
                   fold_feature_dirs=fold_feature_dirs)
    if fold_feature_dirs is None:  # a fold-clean run has no one set of extractors to travel with (predict refuses it)
        first = read_patch_file(Path(feature_dir) / f"{manifest['slide_id'].iloc[0]}.h5", features=False)
        cohort = {"slides": len(manifest), "samples": int(manifest["sample_id"].nunique()),
                  "patients": int(manifest["patient_id"].nunique())}
        write_model_folder(out_dir, first, model=config.model, task=config.task, outputs=list(targets.columns),
                           uses_local=local, cohort=cohort, metrics=summary, training=_plain(asdict(config)))
    barrier()
    return summary


FOLD_RECORDS = "folds"  # out_dir/folds/fold<k>.json: a finished fold (a rerun resumes after it)


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def data_key(manifest: pd.DataFrame, feature_dirs: list, targets: pd.DataFrame) -> str:
    """What the folds were trained on: the targets and the feature files (names, sizes, modification times)
    of every folder in ``feature_dirs``."""
    import hashlib

    digest = hashlib.sha256(pd.util.hash_pandas_object(targets, index=True).to_numpy().tobytes())
    digest.update(json.dumps([str(c) for c in targets.columns]).encode())
    for feature_dir in feature_dirs:
        for slide_id in manifest["slide_id"]:
            stat = (Path(feature_dir) / f"{slide_id}.h5").stat()
            digest.update(f"{slide_id}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def write_fold_record(out_dir: Path, k: int, config: TrainConfig, split, data: str, row: dict,
                      predictions: pd.DataFrame, history: list) -> None:
    """``out_dir/folds/fold<k>.json``: what fold k gave (its row, out-of-fold predictions, epoch history), with the
    config, test samples and data (:func:`data_key`) it was made for; written atomically after the fold's model."""
    record = {"config": _plain(asdict(config)), "test": sorted(map(str, split.test)), "data": data, "row": _plain(row),
              "predictions": _plain(predictions.to_dict(orient="split")), "history": _plain(history)}
    write_text_atomic(out_dir / FOLD_RECORDS / f"fold{k}.json", json.dumps(record))


def fold_record(out_dir: Path, k: int, config: TrainConfig, split, data: str) -> dict | None:
    """Fold k's record when a previous run finished it with this config, test samples and data (else None)."""
    path = out_dir / FOLD_RECORDS / f"fold{k}.json"
    if not (path.is_file() and (out_dir / f"model_fold{k}.pt").is_file()):
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = {key: value for key, value in _plain(asdict(config)).items() if key != "device"}  # any device resumes
    if {key: value for key, value in record.get("config", {}).items() if key != "device"} != same:
        return None
    return record if record.get("test") == sorted(map(str, split.test)) and record.get("data") == data else None


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


def train_mean_floor(manifest: pd.DataFrame, targets: pd.DataFrame, folds: list, task: str = "regression") -> dict:
    """Score, on the same folds and by ``task``'s own scorer, of predicting each fold's training mean (what every
    head starts from).

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
    return get_task(task).score(targets.loc[pred.index], pred)


def _per_sample(slide_predictions: pd.DataFrame, manifest: pd.DataFrame) -> pd.DataFrame:
    sample_of = manifest.set_index("slide_id")["sample_id"].astype(str)
    return slide_predictions.groupby(sample_of.reindex(slide_predictions.index).to_numpy()).mean()


def _score(pred: pd.DataFrame, manifest, targets: pd.DataFrame, config: TrainConfig, out_dir: Path | None = None, aggregated: bool = False) -> dict:
    per_sample = pred if aggregated else _per_sample(pred, manifest)
    return get_task(config.task).score(targets.loc[per_sample.index], per_sample, out_dir)
