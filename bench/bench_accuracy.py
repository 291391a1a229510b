"""Per-gene Pearson r of ISG (each selector), ViT-S and HE2RNA on a synthetic cohort with known biology.

The slide generator (:mod:`isg.io.synth`) makes every gene a known function of
three tissue-texture parameters (nuclei density, nuclei size, stain), genes 0-2
being pure markers and a fraction of the others unpredictable by construction.
All models see the same slides, the same 5-fold patient-level splits and the
same training loop (:func:`isg.train.expression.cross_validate`):

* ISG-<selector> (paper Tab. 2): patches chosen by each selector (Shannon,
  Otsu, image gradient, Canny, DoG, LoG), one pair of global/local autoencoders
  (trained once on Shannon-selected patches), Dual Attention ISG-4-2;
* ViT-S (paper Tab. 1): global features of the Shannon patches only;
* HE2RNA: every Otsu tissue tile at 0.5 um/px through ResNet50 (ImageNet
  weights from the torch hub cache when present, else random: said in the
  table), top-k MLP.

Sizes are CPU-sized (``ISG_BENCH_SLIDES``, default 60 slides of 2048 px);
expect ~30 minutes on 2 cores. Run:
``python3 -m pytest bench/bench_accuracy.py --benchmark-enable -s``.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch

SELECTORS = ("shannon", "otsu", "gradient", "canny", "dog", "log")
MODEL_KWARGS = {"embed_dim": 64, "depth": 2, "num_heads": 4}


def _train(manifest, features, expression, out, model, **kw):
    from isg.train.expression import TrainConfig, cross_validate

    config = TrainConfig(model=model, epochs=int(os.environ.get("ISG_BENCH_EPOCHS", "30")), patience=8, lr=3e-4,
                         batch_size=4, n_splits=5, seed=0, model_kwargs=kw)
    summary = cross_validate(manifest, features, expression, out, config)
    genes = pd.read_csv(Path(out) / "genes.csv").set_index("gene")["r"]
    return summary, genes


def _he2rna_bags(slides, out_dir: Path) -> bool:
    """ResNet50 tile features per slide into out_dir/<slide_id>.h5; returns whether ImageNet weights were used."""
    from isg.baselines.he2rna import _cached_weights, load_resnet50
    from isg.infer.he2rna import he2rna_slide_features
    from isg.io import open_slide

    pretrained = _cached_weights("resnet50") is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backbone = load_resnet50()
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in slides:
        with open_slide(path) as slide:
            features, coords = he2rna_slide_features(slide, backbone)
        with h5py.File(out_dir / f"{Path(path).stem}.h5", "w") as f:
            f["features"], f["coords"] = features.numpy(), coords
    return pretrained


def test_synthetic_pcc_table(tmp_path_factory, report):
    from isg.data import load_expression, load_manifest
    from isg.features import load_autoencoder
    from isg.infer.extract import extract_cohort
    from isg.infer.preprocess import preprocess_cohort
    from isg.io.synth import make_cohort
    from isg.train.autoencoder import AutoencoderTrainConfig, train_autoencoder

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("accuracy")
    n = int(os.environ.get("ISG_BENCH_SLIDES", "60"))
    cohort = make_cohort(root / "cohort", n_slides=n, size=int(os.environ.get("ISG_BENCH_SIZE", "2048")), genes=20, seed=7)
    manifest = load_manifest(cohort.manifest)
    expression = load_expression(cohort.expression)

    for selector in SELECTORS:
        preprocess_cohort(cohort.slides, root / selector, patch_size=128, local_size=32, selector=selector, progress=False)
    steps = int(os.environ.get("ISG_BENCH_AE_STEPS", "400"))
    encoders = {}
    for kind, resolution in (("global", 64), ("local", 32)):
        config = AutoencoderTrainConfig(kind=kind, resolution=resolution, d=64, max_steps=steps, batch_size=16, progress=False)
        encoders[kind] = train_autoencoder(sorted((root / "shannon").glob("*.h5")), root / f"ae_{kind}", config)[0]
    for selector in SELECTORS:
        extract_cohort(sorted((root / selector).glob("*.h5")), encoders["global"], encoders["local"], progress=False)

    rows = {}
    for selector in SELECTORS:
        rows[f"ISG-4-2 {selector}"] = _train(manifest, root / selector, expression, root / f"run_{selector}", "isg-4-2", **MODEL_KWARGS)
    rows["ViT-S (global only)"] = _train(manifest, root / "shannon", expression, root / "run_vit", "vit-s", **MODEL_KWARGS)
    pretrained = _he2rna_bags(cohort.slides, root / "he2rna")
    rows[f"HE2RNA ({'ImageNet' if pretrained else 'random'} ResNet50)"] = _train(
        manifest, root / "he2rna", expression, root / "run_he2rna", "he2rna", hidden=(256,))

    markers = list(expression.columns[:3])  # density, nuclei size, stain markers (truth.json)
    table = pd.DataFrame({name: genes for name, (_, genes) in rows.items()}).T[list(expression.columns)]  # [models, genes]
    print("\nper-gene Pearson r (out-of-fold, per sample):\n" + table.round(2).to_string())
    for name, (summary, genes) in rows.items():
        report.add("synthetic_pcc", name, summary["mean_r"], unit="mean Pearson r",  # no ratios: r can be <= 0
                   significant=summary["n_significant"], genes=summary["n_genes"],
                   markers=" ".join(f"{genes.get(g, float('nan')):.2f}" for g in markers))
    assert len(rows) == len(SELECTORS) + 2
