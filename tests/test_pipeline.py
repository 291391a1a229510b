"""End to end on CPU: synth -> preprocess -> extract -> train -> predict (the model learns the synthetic
signal; predictions carry fold std, heatmaps, attention maps), and the HE2RNA slide pipeline."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """24 synthetic slides (18 patients), preprocessed, with features from small untrained autoencoders
    (random convolutions already separate the synthetic textures: ridge on mean features reaches r 0.6-0.9
    on the three markers)."""
    from isg.features import Autoencoder, load_autoencoder, save_autoencoder
    from isg.pipeline.extract import extract_cohort
    from isg.pipeline.preprocess import preprocess_cohort
    from isg.io.synth import make_cohort

    root = tmp_path_factory.mktemp("pipeline")
    synth = make_cohort(root / "cohort", n_slides=24, size=2048, genes=5, seed=0)
    preprocess_cohort(synth.slides, root / "patches", patch_size=128, local_size=32, progress=False)
    torch.manual_seed(0)
    for role in ("global", "local"):
        save_autoencoder(root / f"{role}.pt", Autoencoder(resolution=32, d=16, channel_base=512, channel_max=32))
    extract_cohort(sorted((root / "patches").glob("*.h5")), load_autoencoder(root / "global.pt"),
                   load_autoencoder(root / "local.pt"), progress=False)
    return root, synth


MARKERS = ["SYN0000", "SYN0001", "SYN0002"]  # expression driven by nuclei density, nuclei size, stain
SMALL = '{"embed_dim": 32, "depth": 1, "num_heads": 2}'


@pytest.fixture(scope="module")
def trained(cohort, tmp_path_factory):
    """isg-2-1-plus cross-validated on the cohort through the CLI (3 folds, 30 epochs, seeded)."""
    from isg.cli import main

    root, synth = cohort
    train_dir = tmp_path_factory.mktemp("train") / "isg"
    assert main(["train", "--manifest", str(synth.manifest), "--expression", str(synth.expression), "--features",
                 str(root / "patches"), "--out", str(train_dir), "--model", "isg-2-1-plus", "--folds", "3",
                 "--epochs", "30", "--patience", "30", "--model-kwargs", SMALL, "--quiet"]) == 0
    return train_dir


def test_isg_learns_the_stain_marker(trained):
    genes = pd.read_csv(trained / "genes.csv").set_index("gene")["r"]
    # measured 0.40 (seed 0; out-of-fold over 24 samples, so noisy): the stain marker is learned. Density
    # and size are not at this scale (r < 0; ridge on mean features gets 0.65 / 0.73): slide models need
    # more slides than a unit test affords (see bench/bench_accuracy.py for the 60-slide figures).
    assert genes["SYN0002"] > 0.2


@pytest.mark.parametrize("model", ["isg-2-1-plus", "vit-s"])
def test_train_then_predict_new_slides(cohort, trained, tmp_path, monkeypatch, model):
    import isg.io
    import isg.pipeline.preprocess
    from isg.cli import main
    from isg.data.patch_file import read_patch_file
    from isg.pipeline.predict import Predictor, predict_slides

    root, synth = cohort
    train_dir = trained
    if model != "isg-2-1-plus":
        train_dir = tmp_path / "train"
        assert main(["train", "--manifest", str(synth.manifest), "--expression", str(synth.expression), "--features",
                     str(root / "patches"), "--out", str(train_dir), "--model", model, "--folds", "3", "--epochs", "2",
                     "--model-kwargs", SMALL, "--quiet"]) == 0
    pipeline = json.loads((train_dir / "pipeline.json").read_text())
    assert pipeline["preprocess"]["patch_size"] == 128 and pipeline["global_features"]["checkpoint"].endswith("global.pt")

    # predict two slides from scratch (no cached patches) and check against the cached-feature route
    predictor = Predictor.from_train_dir(train_dir)
    assert predictor.preprocess["patch_size"] == 128 and predictor.preprocess["local_size"] == 32
    slides = synth.slides[:2]
    heatmaps = MARKERS[2:] if model.startswith("isg") else []
    calls = {"open_slide": 0, "write_patch_file": 0}

    def counted(name, module):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    counted("open_slide", isg.io)
    counted("write_patch_file", isg.pipeline.preprocess)
    predictions, timings, summary = predict_slides(slides, predictor, tmp_path / "pred", progress=False,
                                                   heatmaps=heatmaps, attention_maps=bool(heatmaps))
    # in memory between the stages: each slide is opened once (heatmaps draw on preprocess's thumbnail) and its
    # patch file written once, patches and features together
    assert calls == {"open_slide": 2, "write_patch_file": 2}
    for slide in slides:
        written = read_patch_file(tmp_path / "pred" / "patches" / f"{slide.stem}.h5")
        assert written.has_features(predictor.models[0].uses_local) and written.rule["rule"] == "rank"  # the default rule, frozen in the model
    assert summary.ok and list(predictions.columns) == predictor.outputs == [f"SYN{g:04d}" for g in range(5)]
    assert predictions.shape == (2, 5) and np.isfinite(predictions.to_numpy()).all()
    assert set(timings.columns) >= {"read", "select", "features", "predict", "total", "n_patches"}
    assert (timings[["read", "select", "features", "predict"]] >= 0).all().all()
    assert (timings["n_reread"] == 0).all()  # every selected patch came from the scoring pass (read once)
    written = pd.read_csv(tmp_path / "pred" / "predictions.csv", index_col="slide_id")
    assert list(written.columns) == [c for g in predictor.outputs for c in (g, f"{g}_std")]
    np.testing.assert_allclose(written[predictor.outputs].to_numpy(), predictions.to_numpy(), rtol=1e-5)

    # the preprocessed patches of a new run equal the training ones, so predictions match the cached route
    from isg.data import BagDataset, collate_bags

    cached = collate_bags([BagDataset([root / "patches" / f"{s.stem}.h5"], local=predictor.models[0].uses_local)[0] for s in slides[:1]])
    folds = pd.concat([m.predict(cached) for m in predictor.models])  # [folds, genes]
    np.testing.assert_allclose(predictions.iloc[0].to_numpy(), folds.mean(axis=0).to_numpy(), rtol=1e-4, atol=1e-5)
    spread = written.iloc[0][[f"{g}_std" for g in predictor.outputs]].to_numpy(float)
    np.testing.assert_allclose(spread, folds.std(axis=0, ddof=0).to_numpy(), rtol=1e-3, atol=1e-6)  # fold disagreement
    if not heatmaps:
        return

    # heatmaps: per patch, the fold models' head on that patch's token (their explain()), averaged; attention maps
    sid = slides[0].stem
    patches = pd.read_csv(tmp_path / "pred" / "heatmaps" / sid / "patches.csv")
    with h5py.File(root / "patches" / f"{sid}.h5", "r") as f:
        np.testing.assert_array_equal(patches[["x", "y"]].to_numpy(), f["coords"][:])
        assert (patches["size"] == f["coords"].attrs["patch_size_level0"]).all()
    views = [m.explain(cached) for m in predictor.models]
    expected = torch.stack([v["patch_values"][0] for v in views]).mean(0)[:, predictor.outputs.index("SYN0002")]
    np.testing.assert_allclose(patches["SYN0002"].to_numpy(), expected.numpy(), rtol=1e-4, atol=1e-5)
    assert (tmp_path / "pred" / "heatmaps" / sid / "SYN0002.png").read_bytes()[:4] == b"\x89PNG"
    with h5py.File(tmp_path / "pred" / "attention" / f"{sid}.h5", "r") as f:
        for name in ("local_gate", "global_weights"):
            stacked = torch.stack([v[name][0] for v in views]).numpy()  # [folds, N, blocks, L]
            np.testing.assert_allclose(f[name][:], stacked, rtol=1e-4, atol=1e-6)
        assert f[name].shape[:2] == (3, len(patches)) and f[name].shape[3] == 16  # S x S = (128 / 32)^2


def test_predict_skips_bad_slides_and_resumes(cohort, tmp_path):
    from isg.pipeline.predict import Predictor, predict_slides
    from isg.train.expression import TrainConfig, cross_validate
    from isg.data import load_expression, load_manifest

    root, synth = cohort
    manifest = load_manifest(synth.manifest)
    expression = load_expression(synth.expression)
    cross_validate(manifest, root / "patches", expression, tmp_path / "train",
                   TrainConfig(model="vit-s", epochs=1, n_splits=3, model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}))
    shutil.copy(next((root / "patches").glob("*.h5")), tmp_path / "train" / "unused.h5")
    assert json.loads((tmp_path / "train" / "pipeline.json").read_text())["global_features"]["checkpoint"].endswith("global.pt")
    predictor = Predictor.from_train_dir(tmp_path / "train")
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00 not really a tiff")
    slides = [synth.slides[0], bad, synth.slides[1]]
    predictions, _, summary = predict_slides(slides, predictor, tmp_path / "pred", progress=False)
    assert [r.name for r in summary.failed] == ["broken"] and "broken.tif" in summary.failed[0].error
    assert list(predictions.index) == [synth.slides[0].stem, synth.slides[1].stem]
    again = predict_slides(slides, predictor, tmp_path / "pred", progress=False)[2]
    assert len(again.skipped) == 2 and len(again.failed) == 1  # finished slides are not redone


def test_a_copied_model_folder_predicts_from_anywhere(cohort, trained, tmp_path, monkeypatch, capsys):
    """The trained folder, copied elsewhere, predicts from a third directory with the extractors it carries (the
    originals moved away); an altered or missing extractor is named; a folder of an earlier isg still loads."""
    from isg.cli import main

    root, synth = cohort
    card = json.loads((trained / "model.json").read_text())
    assert card["format"] == "isg-model-folder" and card["isg_version"] and card["model"] == "isg-2-1-plus"
    assert card["outputs"] == [f"SYN{g:04d}" for g in range(5)] and card["cohort"] == {"slides": 24, "samples": 24, "patients": 18}
    from isg.data.patch_file import read_patch_file

    trained_on = read_patch_file(next((root / "patches").glob("*.h5")), features=False)
    assert card["preprocess"]["rule"]["rule"] == trained_on.rule["rule"] and card["geometry"]["patch_size"] == 128
    assert [f["file"] for f in card["folds"]] == [f"model_fold{k}.pt" for k in range(3)]
    assert {role: entry["file"] for role, entry in card["extractors"].items()} == {"global": "extractors/global.pt",
                                                                                "local": "extractors/local.pt"}
    assert "mean_r" in card["metrics"] and "train_mean_floor_mean_r" in card["metrics"]
    readme = (trained / "README.md").read_text()
    assert "isg-2-1-plus" in readme and "SYN0002" in readme and "24 slides" in readme and trained_on.rule["rule"] in readme

    copied = tmp_path / "elsewhere" / "model"
    shutil.copytree(trained, copied)
    third = tmp_path / "third"
    third.mkdir()
    monkeypatch.chdir(third)
    slide = str(synth.slides[0])
    args = ["predict", slide, "--model", "../elsewhere/model", "--out", "pred", "--quiet"]
    away = {name: root / f"{name}.away" for name in ("global.pt", "local.pt")}
    for name, moved in away.items():  # the extractors the training features were made with are gone
        (root / name).rename(moved)
    try:
        assert main(args) == 0, capsys.readouterr().err
    finally:
        for name, moved in away.items():
            moved.rename(root / name)
    assert main(["predict", slide, "--model", str(trained), "--out", str(tmp_path / "original"), "--quiet"]) == 0
    here = pd.read_csv(third / "pred" / "predictions.csv", index_col=0)
    np.testing.assert_allclose(here.to_numpy(), pd.read_csv(tmp_path / "original" / "predictions.csv", index_col=0).to_numpy(),
                               rtol=1e-6, atol=1e-7)
    capsys.readouterr()

    with open(copied / "extractors" / "local.pt", "ab") as handle:
        handle.write(b"\0")
    assert main([*args[:-3], "--out", "again", "--quiet"]) == 2
    assert "local extractor" in (err := capsys.readouterr().err) and "local.pt: altered" in err
    (copied / "extractors" / "local.pt").unlink()
    assert main([*args[:-3], "--out", "again", "--quiet"]) == 2
    assert "local.pt: no such file" in capsys.readouterr().err

    legacy = tmp_path / "legacy"  # a folder of an earlier isg: pipeline.json with the extractor paths, no card
    shutil.copytree(trained, legacy, ignore=shutil.ignore_patterns("model.json", "extractors", "README.md"))
    assert main(["predict", slide, "--model", str(legacy), "--out", str(tmp_path / "legacy_pred"), "--quiet"]) == 0
    np.testing.assert_allclose(pd.read_csv(tmp_path / "legacy_pred" / "predictions.csv", index_col=0).to_numpy(),
                               here.to_numpy(), rtol=1e-6, atol=1e-7)


def test_he2rna_slide_pipeline_matches_manual_route(cohort):
    from isg.baselines.he2rna import HE2RNA, he2rna_features, load_resnet50
    from isg.pipeline.he2rna import he2rna_predict_slide, he2rna_tile_grid
    from isg.io import open_slide

    _, synth = cohort
    with pytest.warns(UserWarning, match="RANDOM weights"):
        backbone = load_resnet50(arch="resnet18")
    model = HE2RNA(backbone.num_features, 5, hidden=(8,), ks=(1, 3)).eval()
    with open_slide(synth.slides[0]) as slide:
        grid = he2rna_tile_grid(slide)
        assert len(grid.coords) > 0 and grid.size == round(224 * 0.5 / slide.level_mpp(grid.level))
        prediction, timings = he2rna_predict_slide(slide, backbone, model, batch_size=16)
        tiles = np.stack([slide.read_region(tuple(c), grid.level, (grid.size, grid.size)) for c in grid.coords])
    assert timings["n_tiles"] == len(grid.coords) and set(timings) >= {"read", "select", "features", "predict"}
    with torch.no_grad():
        expected = model(he2rna_features(tiles, backbone)[None])[0].numpy()
    np.testing.assert_allclose(prediction, expected, rtol=1e-4, atol=1e-5)
