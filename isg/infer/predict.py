"""``isg predict`` (wiring): read -> select -> extract -> predict on new slides with a trained model.

A :class:`Predictor` bundles what a trained run needs on new slides: the fold
models of ``isg train`` (averaged as an ensemble), the global/local
autoencoders and the preprocessing options the training features were made
with (``<train_dir>/pipeline.json``). Per slide, :func:`predict_slide`

1. preprocesses it into ``<work_dir>/<slide_id>.h5`` (tissue grid, Shannon
   scores, selection; kept when already there: cached features are reused),
2. writes autoencoder features of the selected patches into that .h5 (skipped
   when present),
3. predicts with every fold model and averages,

and reports seconds per stage: ``read`` (open, tissue grid, tile decoding for
scoring), ``select`` (scoring + rule), ``features`` (reading the selected
patches again + encoders), ``predict``. :func:`predict_slides` runs a cohort
through :func:`isg.infer.cohort.run_cohort` (one JSON per slide, written
atomically: a rerun resumes, a bad slide is reported and skipped) and writes
``predictions.csv`` and ``timings.csv``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import torch

from isg.utils import atomic_path, write_text_atomic
from isg.data.bags import BagDataset, collate_bags
from isg.data.manifest import slide_id_of

STAGES = ("read", "select", "features", "predict")


@dataclass
class Predictor:
    models: list  # [isg.model.SlideModel]
    global_ae: torch.nn.Module
    local_ae: torch.nn.Module | None
    preprocess: dict = field(default_factory=dict)  # keyword arguments of preprocess_slide
    device: str = "cpu"
    batch_size: int = 64
    num_workers: int = 4

    @property
    def outputs(self) -> list[str]:
        return ["msi_h_probability"] if self.models[0].config.task == "msi" else list(self.models[0].outputs)

    @classmethod
    def from_train_dir(cls, train_dir: str | os.PathLike, global_ae: str | os.PathLike | None = None,
                       local_ae: str | os.PathLike | None = None, device: str = "cpu", **preprocess) -> Predictor:
        """Fold models of ``train_dir``; extractors and preprocessing from its pipeline.json unless given."""
        from isg.features import load_autoencoder
        from isg.model import load_fold_models

        train_dir = Path(train_dir)
        models = load_fold_models(train_dir, device)
        pipeline_path = train_dir / "pipeline.json"
        pipeline = json.loads(pipeline_path.read_text()) if pipeline_path.is_file() else {}
        global_ae = global_ae or pipeline.get("global_features", {}).get("checkpoint")
        local_ae = local_ae or pipeline.get("local_features", {}).get("checkpoint")
        if not global_ae:
            raise ValueError(f"{train_dir}: no global autoencoder recorded in pipeline.json; pass one explicitly")
        if models[0].uses_local and not local_ae:
            raise ValueError(f"{train_dir}: model {models[0].config.model} needs local features but no local autoencoder is recorded; pass one")
        for path in (global_ae, local_ae):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"autoencoder checkpoint {path}: no such file")
        options = {**preprocess_options(pipeline.get("preprocess", {})), **preprocess}
        return cls(models, load_autoencoder(global_ae, device), load_autoencoder(local_ae, device) if models[0].uses_local else None,
                   options, device)


def preprocess_options(attrs: dict) -> dict:
    """preprocess_slide keyword arguments that reproduce the patches described by an h5 ``coords`` attrs dict."""
    options = {}
    for key in ("patch_size", "local_size", "selector", "rule", "n_sigma", "tissue_min"):
        if key in attrs:
            options[key] = attrs[key]
    if "mpp" in attrs:
        options["mpp"] = float(attrs["mpp"])
    if attrs.get("rule") in ("threshold", "cohort") and not math.isnan(float(attrs.get("threshold", math.nan))):
        options["threshold"] = float(attrs["threshold"])  # the training cohort's absolute threshold in bits
    if attrs.get("rule") == "topk" and int(attrs.get("k", -1)) > 0:
        options["k"] = int(attrs["k"])
    return options


def predict_slide(slide_path: str | os.PathLike, predictor: Predictor, work_dir: str | os.PathLike) -> tuple[pd.Series, dict]:
    """Prediction (a row over ``predictor.outputs``) and stage seconds for one slide."""
    from isg.infer.extract import extract_slide
    from isg.infer.preprocess import h5_complete, preprocess_slide

    slide_path, work_dir = Path(slide_path), Path(work_dir)
    h5_path = work_dir / f"{slide_id_of(slide_path)}.h5"
    timings = dict.fromkeys(STAGES, 0.0)
    if not h5_complete(h5_path):
        stats = preprocess_slide(slide_path, work_dir, device=predictor.device, batch_size=predictor.batch_size,
                                 num_workers=predictor.num_workers, **predictor.preprocess)
        timings["read"] = sum(stats.get(f"seconds_{k}", 0.0) for k in ("open", "grid", "read", "write"))
        timings["select"] = stats.get("seconds_score", 0.0) + stats.get("seconds_select", 0.0)
    start = time.perf_counter()
    extract_slide(h5_path, slide_path, predictor.global_ae, predictor.local_ae, batch_size=predictor.batch_size,
                  device=predictor.device, num_workers=predictor.num_workers)
    timings["features"] = time.perf_counter() - start
    start = time.perf_counter()
    bag = BagDataset([h5_path], local=predictor.local_ae is not None)[0]
    batch = collate_bags([bag])
    prediction = pd.concat([model.predict(batch) for model in predictor.models]).mean(axis=0)  # ensemble of folds
    timings["predict"] = time.perf_counter() - start
    with h5py.File(h5_path, "r") as f:
        timings["n_patches"] = int(len(f["coords"]))
        timings["n_tissue"] = int(len(f["all_coords"])) if "all_coords" in f else timings["n_patches"]
    timings["total"] = sum(timings[k] for k in STAGES)
    return prediction, timings


def predict_slides(slides, predictor: Predictor, out_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                   scheduler=None, workers: int | None = 1, overwrite: bool = False, progress: bool = True):
    """Predict every slide; returns ``(predictions [slides, outputs], timings [slides, stages], summary)``.

    Per-slide results go to ``<out_dir>/slides/<slide_id>.json`` (atomic; a rerun
    skips them), patches and features to ``work_dir`` (default ``<out_dir>/patches``);
    ``predictions.csv``, ``timings.csv`` and ``summary.json`` are written at the end.
    """
    from isg.infer.cohort import run_cohort

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "patches"
    per_slide = out_dir / "slides"
    slides = [Path(s) for s in slides]

    def process(slide: Path) -> dict:
        prediction, timings = predict_slide(slide, predictor, work_dir)
        record = {"slide_id": slide_id_of(slide), "slide_path": str(slide), "prediction": prediction.to_dict(), "seconds": timings}
        write_text_atomic(per_slide / f"{slide_id_of(slide)}.json", json.dumps(record, default=float))
        return {"n_patches": timings["n_patches"], **{f"seconds_{k}": round(timings[k], 4) for k in STAGES}}

    summary = run_cohort(slides, process, lambda s: per_slide / f"{slide_id_of(s)}.json", scheduler=scheduler,
                         workers=workers, overwrite=overwrite, progress=progress, name_of=slide_id_of,
                         summary_path=out_dir / "summary.json", title="isg predict")
    records = [json.loads((per_slide / f"{slide_id_of(s)}.json").read_text()) for s in slides
               if (per_slide / f"{slide_id_of(s)}.json").is_file()]
    predictions = pd.DataFrame([r["prediction"] for r in records], index=pd.Index([r["slide_id"] for r in records], name="slide_id"))
    timings = pd.DataFrame([r["seconds"] for r in records], index=predictions.index)
    predictions = predictions.reindex(columns=predictor.outputs)
    for name, table in (("predictions.csv", predictions), ("timings.csv", timings)):
        with atomic_path(out_dir / name) as tmp:
            table.to_csv(tmp)
    return predictions, timings, summary
