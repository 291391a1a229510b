"""End to end on CPU: synth -> preprocess -> extract -> train -> predict, and the HE2RNA slide pipeline."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A tiny preprocessed cohort with features from small (untrained) autoencoders."""
    from isg.features import Autoencoder, load_autoencoder, save_autoencoder
    from isg.infer.extract import extract_cohort
    from isg.infer.preprocess import preprocess_cohort
    from isg.io.synth import make_cohort

    root = tmp_path_factory.mktemp("pipeline")
    synth = make_cohort(root / "cohort", n_slides=6, size=1024, genes=5, seed=0)
    preprocess_cohort(synth.slides, root / "patches", patch_size=128, local_size=32, progress=False)
    torch.manual_seed(0)
    for role in ("global", "local"):
        save_autoencoder(root / f"{role}.pt", Autoencoder(resolution=32, d=16, channel_base=512, channel_max=32))
    extract_cohort(sorted((root / "patches").glob("*.h5")), load_autoencoder(root / "global.pt"),
                   load_autoencoder(root / "local.pt"), progress=False)
    return root, synth


@pytest.mark.parametrize("model", ["isg-2-1", "vit-s"])
def test_train_then_predict_new_slides(cohort, tmp_path, model):
    from isg.cli import main
    from isg.infer.predict import Predictor, predict_slides

    root, synth = cohort
    train_dir = tmp_path / "train"
    args = ["train", "--manifest", str(synth.manifest), "--expression", str(synth.expression), "--features",
            str(root / "patches"), "--out", str(train_dir), "--model", model, "--folds", "3", "--epochs", "2",
            "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}']
    assert main(args) == 0
    pipeline = json.loads((train_dir / "pipeline.json").read_text())
    assert pipeline["preprocess"]["patch_size"] == 128 and pipeline["global_features"]["checkpoint"].endswith("global.pt")

    # predict two slides from scratch (no cached patches) and check against the cached-feature route
    predictor = Predictor.from_train_dir(train_dir)
    assert predictor.preprocess["patch_size"] == 128 and predictor.preprocess["local_size"] == 32
    slides = synth.slides[:2]
    predictions, timings, summary = predict_slides(slides, predictor, tmp_path / "pred", progress=False)
    assert summary.ok and list(predictions.columns) == predictor.outputs
    assert predictions.shape == (2, 5) and np.isfinite(predictions.to_numpy()).all()
    assert set(timings.columns) >= {"read", "select", "features", "predict", "total", "n_patches"}
    assert (timings[["read", "select", "features", "predict"]] >= 0).all().all()
    written = pd.read_csv(tmp_path / "pred" / "predictions.csv", index_col="slide_id")
    np.testing.assert_allclose(written.to_numpy(), predictions.to_numpy(), rtol=1e-5)

    # the preprocessed patches of a new run equal the training ones, so predictions match the cached route
    from isg.data import BagDataset, collate_bags

    cached = collate_bags([BagDataset([root / "patches" / f"{s.stem}.h5"], local=predictor.models[0].uses_local)[0] for s in slides[:1]])
    expected = pd.concat([m.predict(cached) for m in predictor.models]).mean(axis=0)
    np.testing.assert_allclose(predictions.iloc[0].to_numpy(), expected.to_numpy(), rtol=1e-4, atol=1e-5)


def test_predict_skips_bad_slides_and_resumes(cohort, tmp_path):
    from isg.infer.predict import Predictor, predict_slides
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


def test_he2rna_slide_pipeline_matches_manual_route(cohort):
    from isg.baselines.he2rna import HE2RNA, he2rna_features, load_resnet50
    from isg.infer.he2rna import he2rna_predict_slide, he2rna_tile_grid
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
