"""Cross-validated training (isg.train.expression) on synthetic feature bags, and label tables."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from isg.data import BagDataset, collate_bags
from isg.data.labels import LabelError, load_labels
from isg.data.splits import Split
from isg.model import load_fold_models
from isg.train.expression import TrainConfig, TrainProgress, cross_validate, train_mean_floor


def _cohort(tmp_path, n_slides=24, d=8, genes=5, seed=0):
    """Bags whose expression is a known linear function of the mean patch feature, plus a 0/1 label."""
    rng = np.random.default_rng(seed)
    feature_dir = tmp_path / "features"
    feature_dir.mkdir()
    weights = rng.normal(size=(d, genes))
    rows, expression = [], {}
    for i in range(n_slides):
        n = int(rng.integers(5, 30))
        centre = rng.normal(size=d)
        features = (centre + 0.3 * rng.normal(size=(n, d))).astype(np.float32)
        with h5py.File(feature_dir / f"s{i}.h5", "w") as f:
            f["features"] = features
            f["coords"] = rng.integers(0, 4096, size=(n, 2))
        expression[f"sample{i}"] = centre @ weights
        rows.append({"slide_path": f"/nowhere/s{i}.tif", "slide_id": f"s{i}", "sample_id": f"sample{i}", "patient_id": f"p{i // 2}"})
    manifest = pd.DataFrame(rows)
    targets = pd.DataFrame.from_dict(expression, orient="index", columns=[f"g{j}" for j in range(genes)]).astype(np.float32)
    return manifest, feature_dir, targets


def test_cross_validate_learns_a_known_function_and_writes_results(tmp_path):
    manifest, feature_dir, targets = _cohort(tmp_path)
    config = TrainConfig(model="he2rna", epochs=30, patience=30, lr=3e-3, n_splits=3, batch_size=4,
                         model_kwargs={"hidden": (16,), "ks": (1, 5)})
    summary = cross_validate(manifest, feature_dir, targets, tmp_path / "out", config)
    out = tmp_path / "out"
    for name in ("splits.json", "predictions_oof.csv", "folds.csv", "genes.csv", "summary.json",
                 "gene_correlations.png", "pred_vs_true.png", "model_fold0.pt", "model_fold2.pt"):
        assert (out / name).is_file(), name
    assert summary["n_samples"] == len(manifest)
    assert summary["mean_r"] > 0.5  # the signal is linear in the mean feature: easy to learn
    assert summary["train_mean_floor"]["mean_r"] < 0.0  # the training-mean predictor on the same folds
    oof = pd.read_csv(out / "predictions_oof.csv", index_col="slide_id")
    assert sorted(oof.index) == sorted(manifest.slide_id)  # every slide predicted exactly once, out of fold
    splits = json.loads((out / "splits.json").read_text())
    assert len(splits["splits"] if isinstance(splits, dict) and "splits" in splits else splits) == 3

    # a reloaded fold model reproduces its out-of-fold predictions
    models = load_fold_models(out)
    assert [m.fold for m in models] == [0, 1, 2] and models[0].outputs == list(targets.columns)
    fold0 = oof[oof["fold"] == 0].drop(columns="fold")
    test = BagDataset([feature_dir / f"{s}.h5" for s in fold0.index], local=False)
    again = models[0].predict(collate_bags([test[i] for i in range(len(test))]))
    np.testing.assert_allclose(again.to_numpy(), fold0.to_numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("n", [3, 7])
def test_train_mean_floor_known_answers(n):
    rng = np.random.default_rng(n)
    samples = [f"S{i}" for i in range(n)]
    manifest = pd.DataFrame({"slide_id": samples, "sample_id": samples, "patient_id": samples})
    targets = pd.DataFrame(rng.normal(size=(n, 4)), index=samples, columns=list("abcd"))
    # leave-one-out: the prediction (sum - y_i) / (n - 1) falls as y_i rises, r = -1 for every gene
    loo = [Split([s for s in samples if s != t], [], [t]) for t in samples]
    assert train_mean_floor(manifest, targets, loo)["mean_r"] == pytest.approx(-1.0)
    # a slide counts once per slide: a sample with two slides weighs twice in its folds' training mean
    two = pd.concat([manifest, manifest.iloc[[0]].assign(slide_id="S0b")], ignore_index=True)
    halves = [Split(samples[: n // 2 + 1], [], samples[n // 2 + 1:]), Split(samples[n // 2 + 1:], [], samples[: n // 2 + 1])]
    pred = {}
    for split in halves:
        rows = targets.loc[[s for s in two["sample_id"] if s in split.train]]
        for t in split.test:
            pred[t] = rows.mean()
    expected = np.mean([np.corrcoef(targets[g], pd.DataFrame(pred).T.loc[samples, g])[0, 1] for g in targets])
    assert train_mean_floor(two, targets, halves)["mean_r"] == pytest.approx(expected)


def test_cross_validate_writes_pipeline_json_and_reports_progress(tmp_path):
    manifest, feature_dir, targets = _cohort(tmp_path, n_slides=12)
    with h5py.File(feature_dir / "s0.h5", "a") as f:  # what preprocess / extract recorded in a schema-1 file
        f["coords"].attrs.update({"patch_size": 128, "patch_level": 0, "local_size": 32, "rule": "mean_std"})
        f["features"].attrs["checkpoint"] = "/ckpt/global/autoencoder.pt"
    reports = []
    config = TrainConfig(model="he2rna", epochs=3, patience=3, n_splits=3, model_kwargs={"hidden": (8,), "ks": (1, 2)})
    cross_validate(manifest, feature_dir, targets, tmp_path / "out", config, progress=reports.append)
    pipeline = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    from isg.select import SelectionRule

    assert pipeline["preprocess"] == {"patch_size": 128, "local_size": 32, "rule": SelectionRule("mean_std").to_dict()}
    assert pipeline["geometry"]["patch_size"] == 128 and pipeline["geometry"]["local_size"] == 32
    assert pipeline["global_features"]["checkpoint"] == "/ckpt/global/autoencoder.pt" and pipeline["local_features"] == {}
    assert pipeline["features_dir"] == str(feature_dir.resolve())
    assert [(r.fold, r.epoch) for r in reports] == [(k, e) for k in range(3) for e in range(3)]
    assert all(isinstance(r, TrainProgress) and r.n_folds == 3 and r.epochs == 3 for r in reports)
    assert all(r.best_val_loss <= r.val_loss + 1e-9 and np.isfinite(r.train_loss) for r in reports)
    assert reports[-1].seconds_left == 0 and reports[0].seconds_left > 0
    assert [r.seconds for r in reports] == sorted(r.seconds for r in reports)


def test_old_fold_model_is_converted_and_predicts_the_same(tmp_path):
    from dataclasses import asdict

    from isg.model import SlideModel, create_model

    torch.manual_seed(0)
    model = create_model("vit-t4", d=8, n_outputs=3, embed_dim=16, depth=1, num_heads=2)
    old = {"format": "isg-slide-model/1", "config": asdict(TrainConfig(model="vit-s", model_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2})),
           "d": 8, "local_grid": None, "outputs": ["a", "b", "c"], "fold": 2, "state_dict": model.state_dict(),
           "target_mean": torch.tensor([1.0, 2.0, 3.0]), "target_std": torch.tensor([0.5, 1.0, 2.0])}
    torch.save(old, tmp_path / "model_fold2.pt")
    with pytest.warns(FutureWarning, match="model_fold2.pt: old checkpoint format 'isg-slide-model/1'"):
        loaded = SlideModel(tmp_path / "model_fold2.pt")
    assert loaded.config.model == "vit-t4" and loaded.fold == 2 and loaded.outputs == ["a", "b", "c"] and not loaded.uses_local
    batch = collate_bags([{"features": torch.randn(4, 8), "coords": torch.randint(0, 999, (4, 2)), "slide_id": "x"}])
    with torch.no_grad():
        expected = model.eval()(batch["features"], None, batch["coords"].float(), batch["mask"]) * old["target_std"] + old["target_mean"]
    np.testing.assert_allclose(loaded.predict(batch).to_numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_cross_validate_msi_reports_auc(tmp_path):
    manifest, feature_dir, targets = _cohort(tmp_path, genes=1, seed=1)
    labels = (targets.iloc[:, :1] > targets.iloc[:, 0].median()).astype(np.float32)
    labels.columns = ["msi"]
    config = TrainConfig(model="he2rna", task="msi", epochs=25, patience=25, lr=3e-3, n_splits=3,
                         model_kwargs={"hidden": (16,), "ks": (1, 5)})
    summary = cross_validate(manifest, feature_dir, labels, tmp_path / "out", config)
    assert summary["auc"] > 0.7


def test_load_labels(tmp_path):
    path = tmp_path / "msi.csv"
    path.write_text("sample_id,msi\na,MSI-H\nb,MSS\nc,MSS\n")
    labels = load_labels(path)
    assert labels["msi"].to_dict() == {"a": 1.0, "b": 0.0, "c": 0.0}


@pytest.mark.parametrize("text, problem", [
    ("sample_id,status\na,MSI-H\n", "missing column"),
    ("sample_id,msi\na,MSI-H\nb,\n", r"line\(s\): 3"),
    ("sample_id,msi\na,MSI-H\na,MSS\n", "duplicated"),
    ("sample_id,msi\na,MSI-H\nb,MSS\nc,MSI-L\n", "exactly two classes"),
])
def test_load_labels_rejects_bad_tables(tmp_path, text, problem):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    with pytest.raises(LabelError, match=problem) as info:
        load_labels(path)
    assert str(path) in str(info.value)


def _cli_inputs(tmp_path):
    manifest, feature_dir, targets = _cohort(tmp_path)
    manifest[["slide_path", "sample_id", "patient_id"]].to_csv(tmp_path / "manifest.csv", index=False)
    counts = (10 ** (targets - targets.min().min()) - 1).round(3)  # raw-count-like, >= 0
    counts.index.name = "sample_id"
    counts.to_csv(tmp_path / "expression.tsv", sep="\t")
    return feature_dir


def test_cli_train_end_to_end(tmp_path, capsys):
    from isg.cli import main

    feature_dir = _cli_inputs(tmp_path)
    code = main(["train", "--manifest", str(tmp_path / "manifest.csv"), "--expression", str(tmp_path / "expression.tsv"),
                 "--features", str(feature_dir), "--out", str(tmp_path / "run"), "--model", "he2rna",
                 "--folds", "3", "--epochs", "3", "--lr", "3e-3"])
    assert code == 0
    assert (tmp_path / "run" / "summary.json").is_file() and (tmp_path / "run" / "pipeline.json").is_file()
    assert "mean Pearson r" in capsys.readouterr().out  # the result sentence (summary.json holds the figures)


def _drop_feature_file(p):
    (p / "features" / "s3.h5").unlink()
    return []


def _nan_expression(p):
    lines = (p / "expression.tsv").read_text().splitlines()
    lines[2] = "\t".join(lines[2].split("\t")[:2] + ["nan"] + lines[2].split("\t")[3:])
    (p / "expression.tsv").write_text("\n".join(lines) + "\n")
    return []


@pytest.mark.parametrize("change, problem", [
    (lambda p: ["--features", str(p / "absent")], "no such folder"),
    (_drop_feature_file, "have no feature file: s3"),
    (_nan_expression, "sample1"),
    (lambda p: ["--folds", "1"], "--folds must be >= 2"),
    (lambda p: ["--task", "msi"], "--labels is required"),
])
def test_cli_train_bad_input_exits_2_with_a_message(tmp_path, capsys, change, problem):
    from isg.cli import main

    feature_dir = _cli_inputs(tmp_path)
    extra = change(tmp_path)
    args = ["train", "--manifest", str(tmp_path / "manifest.csv"), "--expression", str(tmp_path / "expression.tsv"),
            "--features", str(feature_dir), "--out", str(tmp_path / "run"), "--model", "he2rna", "--epochs", "1", "--folds", "3"]
    assert main(args + extra) == 2
    err = capsys.readouterr().err
    assert problem in err, err


def test_l2_error_beside_r_and_its_floor(tmp_path):
    """summary.json's l2 is the mean squared error of the out-of-fold predictions (recomputed here by hand)."""
    manifest, feature_dir, targets = _cohort(tmp_path, n_slides=12, genes=3)
    config = TrainConfig(model="mlp-probe", epochs=3, patience=3, n_splits=3, batch_size=4, model_kwargs={"hidden": 8})
    summary = cross_validate(manifest, feature_dir, targets, tmp_path / "out", config)
    oof = pd.read_csv(tmp_path / "out" / "predictions_oof.csv", index_col="slide_id").drop(columns="fold")
    sample_of = manifest.set_index("slide_id")["sample_id"]
    per_sample = oof.groupby(sample_of.reindex(oof.index).to_numpy()).mean()
    expected = float(((per_sample.to_numpy() - targets.loc[per_sample.index].to_numpy()) ** 2).mean())
    assert summary["l2"] == pytest.approx(expected, rel=1e-5)
    assert summary["train_mean_floor"]["l2"] > 0


def test_fold_clean_run_reads_each_folds_own_features(tmp_path):
    """fold_feature_dirs: fold k trains and tests on folder k; a folder of constant features flattens only its fold."""
    from isg.data.patch_file import read_patch_file, write_patch_file
    from isg.train.expression import cv_folds

    manifest, feature_dir, targets = _cohort(tmp_path, n_slides=12, genes=3)
    config = TrainConfig(model="mlp-probe", epochs=2, patience=2, n_splits=3, batch_size=4, model_kwargs={"hidden": 8})
    folds = cv_folds(manifest, targets, config)
    dirs = []
    for k in range(3):
        folder = tmp_path / f"fold{k}"
        folder.mkdir()
        for slide_id in manifest["slide_id"]:
            patches = read_patch_file(feature_dir / f"{slide_id}.h5")
            features = patches.features if k != 1 else np.ones_like(patches.features)
            write_patch_file(folder / f"{slide_id}.h5", patches.with_features(features, {"extractor_size": f"fold {k}"}))
        dirs.append(folder)
    with pytest.raises(ValueError, match="2 folder"):
        cross_validate(manifest, feature_dir, targets, tmp_path / "bad", config, fold_feature_dirs=dirs[:2])
    cross_validate(manifest, feature_dir, targets, tmp_path / "out", config, fold_feature_dirs=dirs)
    oof = pd.read_csv(tmp_path / "out" / "predictions_oof.csv", index_col="slide_id")
    test_of_fold1 = set(manifest.set_index("sample_id").loc[list(folds[1].test), "slide_id"])
    assert set(oof.index[oof["fold"] == 1]) == test_of_fold1
    spread = oof.drop(columns="fold").groupby(oof["fold"]).std().max(axis=1)  # across a fold's test slides
    assert spread[1] < 1e-5 and (spread.drop(1) > 1e-3).all()  # constant features, constant predictions: fold 1 only
    pipeline = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    assert len(pipeline["fold_clean"]["fold_features_dirs"]) == 3 and pipeline["global_features"]["extractor_size"] == "fold 0"
