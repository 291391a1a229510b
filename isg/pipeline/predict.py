"""``isg predict`` (wiring): read -> select -> extract -> predict on new slides with a trained model.

A :class:`Predictor` bundles what a trained run needs on new slides: the fold
models of ``isg train`` (averaged as an ensemble), the global/local
autoencoders and the preprocessing options and selection rule the training
features were made with, all inside the model folder (``model.json``,
:mod:`isg.model.folder`; folders of earlier versions: ``pipeline.json`` with
paths; :func:`new_slide_options`). Per slide, :func:`predict_slide`

1. preprocesses it (tissue grid, scores, selection) into a
   :class:`~isg.data.patch_file.SlidePatches` in memory (or reads the patch file
   ``<work_dir>/<slide_id>.h5`` a previous run left: cached features are reused),
2. encodes the selected patches (autoencoder features),
3. writes the patch file once, patches and features together (and the selection PNG),
4. predicts with every fold model on the bag made in memory and averages,

and reports seconds per stage: ``read`` (open, tissue grid, tile decoding, the
write), ``select`` (scoring + rule), ``features`` (encoders), ``predict``, and a progress
line at least every 2 s in every stage (:class:`~isg.pipeline.progress.SlideProgress`: a bar on
a terminal, lines in ``OUT/progress.log`` and in a redirected stderr). While scoring, the
best-scored tiles are kept in one preallocated block
(:class:`~isg.pipeline.tile_arena.TileArena`, ``Predictor.tile_memory_mb``) and the selected
ones are encoded from there (the selection keeps the top of the score order, so
they are all kept unless the budget is too small: a 10^5 px slide's 24k selected patches need
4.6 GB at p = 256); the others are read again by reader threads that run ahead of
the encoders (``n_reread`` counts them). :func:`predict_slides` runs a cohort through
:func:`isg.pipeline.cohort.run_cohort` (one JSON per slide, written atomically: a
rerun resumes, a bad slide is reported and skipped) and writes
``predictions.csv`` (per gene the fold-ensemble mean and, in ``<gene>_std``, the
standard deviation across the fold models: their disagreement), ``timings.csv``
and, on request, per-patch expression heatmaps and fusion attention maps
(:func:`explain_slide`, on the patches and thumbnail already in memory).
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

from isg.data.bags import bag_arrays, collate_bags, to_bag
from isg.data.manifest import slide_id_of
from isg.data.patch_file import SlidePatches, is_complete, read_patch_file
from isg.io import BATCH_SIZE, NUM_WORKERS
from isg.model.tasks import get_task
from isg.utils import atomic_path, trim_memory, write_text_atomic

STAGES = ("read", "select", "features", "predict")
HEATMAP_SIZE = 1024  # longest side of the heatmap thumbnail when the slide is read again for it
STD_SUFFIX = "_std"  # column of the std across fold models, beside each prediction


@dataclass
class Predictor:
    models: list  # [isg.model.SlideModel]
    global_ae: torch.nn.Module
    local_ae: torch.nn.Module | None
    preprocess: dict = field(default_factory=dict)  # keyword arguments of preprocess (rule: a SelectionRule)
    device: str = "cpu"
    batch_size: int = BATCH_SIZE
    num_workers: int = NUM_WORKERS
    tile_memory_mb: float = 256.0  # per slide: best-scored tiles kept from the scoring pass (read once)
    amp: bool = False  # bfloat16 encoders where the device runs bf16 natively (docs/features.md)
    source: dict | None = None  # from_train_dir's arguments: a Dask worker rebuilds the predictor from them, once

    @property
    def outputs(self) -> list[str]:
        return self.models[0].columns

    @classmethod
    def from_train_dir(cls, train_dir: str | os.PathLike, global_ae: str | os.PathLike | None = None,
                       local_ae: str | os.PathLike | None = None, device: str = "cpu", **preprocess) -> Predictor:
        """Fold models of the model folder ``train_dir``, and the extractors and preprocessing it holds
        (model.json, :mod:`isg.model.folder`: every file checked against its checksum) unless given. A folder
        of an earlier isg (pipeline.json only) reads its extractors from the paths it recorded."""
        from isg.features import load_autoencoder
        from isg.model import load_fold_models
        from isg.model.folder import CARD, extractor_missing, read_model_folder

        train_dir = Path(train_dir)
        pipeline_path = train_dir / "pipeline.json"
        record = json.loads(pipeline_path.read_text()) if pipeline_path.is_file() else {}
        if record.get("fold_clean") and not (global_ae and local_ae):
            raise ValueError(f"{train_dir}: a fold-clean run (every fold model has its own extractors, pipeline.json: fold_clean); "
                             "predict with a model trained on one set of features, or pass --global-ae and --local-ae")
        if (train_dir / CARD).is_file():
            folder = read_model_folder(train_dir)  # a missing or altered fold model or extractor is named here
            models = load_fold_models(train_dir, device)
            record, extractors = folder.preprocess_record(), {}
            for role, given in (("global", global_ae), ("local", local_ae)):
                ref = folder.extractor(role)
                if given is None and ref is None and (role == "global" or models[0].uses_local):
                    raise extractor_missing(folder, role)
                extractors[role] = given if given is not None else ref and ref.path
            global_ae, local_ae = extractors["global"], extractors["local"]
        else:
            models = load_fold_models(train_dir, device)
            global_ae = global_ae or record.get("global_features", {}).get("checkpoint")
            local_ae = local_ae or record.get("local_features", {}).get("checkpoint")
            if not global_ae:
                raise ValueError(f"{train_dir}: no global autoencoder recorded in pipeline.json; pass one explicitly")
            if models[0].uses_local and not local_ae:
                raise ValueError(f"{train_dir}: model {models[0].config.model} needs local features but no local autoencoder is recorded; pass one")
        for path in (global_ae, local_ae):
            if path and not Path(path).is_file():
                raise FileNotFoundError(f"autoencoder checkpoint {path}: no such file")
        options = {**new_slide_options(record), **preprocess}
        local_ae = local_ae if models[0].uses_local else None
        source = dict(train_dir=str(train_dir.resolve()), global_ae=global_ae and str(Path(global_ae).resolve()),
                      local_ae=local_ae and str(Path(local_ae).resolve()), device=device, **preprocess)
        return cls(models, load_autoencoder(global_ae, device), load_autoencoder(local_ae, device) if local_ae else None,
                   options, device, source=source)


def new_slide_options(pipeline: dict) -> dict:
    """Preprocess keyword arguments that make new slides' patches as the training ones were: the options and
    rule serialised in the patch files (copied into ``pipeline.json`` by ``isg train``), read at the training
    read level's mpp when it is known. A ``pipeline.json`` of an earlier isg holds schema 1's loose attrs."""
    from isg.data.patch_file import schema1_options
    from isg.pipeline.preprocess import OPTION_NAMES
    from isg.select import SelectionRule

    stored = pipeline.get("preprocess", {})
    if "patch_file_schema" in pipeline:
        options, rule = {k: v for k, v in stored.items() if k != "rule"}, stored.get("rule")
        mpp = pipeline.get("geometry", {}).get("mpp")
    else:
        options, rule, _ = schema1_options(stored)
        mpp = stored.get("mpp")
    options = {k: v for k, v in options.items() if k in OPTION_NAMES}
    if rule is not None:
        options["rule"] = SelectionRule.from_dict(rule)  # e.g. the training cohort's frozen cut
    if mpp is not None and math.isfinite(float(mpp)) and float(mpp) > 0:
        options.update(mpp=float(mpp), level=None)  # the resolution the training patches were read at
    return options


@dataclass
class SlidePrediction:
    """One slide through :func:`predict_one`: its prediction, stage seconds, patches and the bag the models read."""

    prediction: pd.Series  # outputs, then <output>_std
    timings: dict
    patches: SlidePatches
    batch: dict  # collated one-slide bag


def predict_one(slide_path: str | os.PathLike, predictor: Predictor, work_dir: str | os.PathLike,
                tile_progress: bool = False) -> SlidePrediction:
    """Preprocess (or reuse ``<work_dir>/<slide_id>.h5``), encode, write the patch file once, predict; see the module.
    ``tile_progress``: progress bars on the terminal (progress lines go to the ``isg.progress`` log anyway)."""
    from isg.pipeline.progress import SlideProgress

    with SlideProgress(slide_id_of(slide_path), bar=tile_progress) as progress:
        return _predict_one(Path(slide_path), predictor, Path(work_dir), progress)


def _predict_one(slide_path: Path, predictor: Predictor, work_dir: Path, progress) -> SlidePrediction:
    from isg.pipeline.extract import encode_patches
    from isg.pipeline.preprocess import preprocess_patches, write_outputs
    from isg.pipeline.tile_arena import TileArena

    h5_path = work_dir / f"{slide_id_of(slide_path)}.h5"
    local = predictor.local_ae is not None
    timings = dict.fromkeys(STAGES, 0.0)
    arena, fresh = None, not is_complete(h5_path)
    if fresh:
        arena = TileArena(predictor.tile_memory_mb * 2**20)  # sized on its first batch, to what the rule can keep
        patches, stats = preprocess_patches(slide_path, device=predictor.device, batch_size=predictor.batch_size,
                                            num_workers=predictor.num_workers, on_tiles=arena, progress=progress,
                                            **predictor.preprocess)
        timings["read"] = sum(stats.get(f"seconds_{k}", 0.0) for k in ("open", "grid", "read"))
        timings["select"] = stats.get("seconds_score", 0.0) + stats.get("seconds_select", 0.0)
        trim_memory()  # the scoring pass's freed buffers, before the features fill theirs
    else:
        progress.stage("read patch file", None)
        patches = read_patch_file(h5_path)
    timings["n_reread"] = 0  # patches read a second time
    start = time.perf_counter()
    if not patches.has_features(local):
        progress.stage("features", patches.n_selected, "patches")
        patches, timings["n_reread"] = encode_patches(
            patches, predictor.global_ae, predictor.local_ae, slide_path=slide_path, batch_size=predictor.batch_size,
            device=predictor.device, num_workers=predictor.num_workers, amp=predictor.amp, tiles=arena,
            progress=progress.update)
        timings["features"] = time.perf_counter() - start
        del arena
        trim_memory()
        progress.stage("write", None)
        start = time.perf_counter()
        write_outputs(work_dir, patches, thumbnail=fresh)  # the one write: patches, features (and the PNG)
        timings["read"] += time.perf_counter() - start
    progress.stage("predict", len(predictor.models), "fold models")
    start = time.perf_counter()
    batch = collate_bags([to_bag(bag_arrays(patches, local, where=str(h5_path)), patches.slide_id)])
    folds = []
    for model in predictor.models:  # attention over the bag: PyTorch's CPU flash kernel, memory O(N) (docs/model.md)
        folds.append(model.predict(batch))  # [1, outputs]
        progress.update(1)
    folds = pd.concat(folds)  # [folds, outputs]
    prediction = pd.concat([folds.mean(axis=0), folds.std(axis=0, ddof=0).add_suffix(STD_SUFFIX)])  # ensemble of folds
    timings["predict"] = time.perf_counter() - start
    timings["n_patches"], timings["n_tissue"] = patches.n_selected, patches.n_tissue
    timings["total"] = sum(timings[k] for k in STAGES)
    return SlidePrediction(prediction, timings, patches, batch)


def predict_slide(slide_path: str | os.PathLike, predictor: Predictor, work_dir: str | os.PathLike,
                  tile_progress: bool = False) -> tuple[pd.Series, dict]:
    """Prediction (a row over ``predictor.outputs``, with the fold std in ``predictor.outputs`` + ``_std``)
    and stage seconds for one slide; ``tile_progress``: a progress bar of its stages on the terminal."""
    result = predict_one(slide_path, predictor, work_dir, tile_progress)
    return result.prediction, result.timings


def predict_slides(slides, predictor: Predictor, out_dir: str | os.PathLike, *, work_dir: str | os.PathLike | None = None,
                   scheduler=None, workers: int | None = 1, resources: dict | None = None, overwrite: bool = False,
                   progress: bool = True, heatmaps: list[str] | None = None, attention_maps: bool = False):
    """Predict every slide; returns ``(predictions [slides, outputs], timings [slides, stages], summary)``.

    Per-slide results go to ``<out_dir>/slides/<slide_id>.json`` (atomic; a rerun
    skips them), patches and features to ``work_dir`` (default ``<out_dir>/patches``), a progress line
    per slide at least every 2 s to ``<out_dir>/progress.log``;
    ``predictions.csv`` (each output followed by its ``_std`` across folds), ``timings.csv``
    and ``summary.json`` are written at the end. ``heatmaps`` (output names) and
    ``attention_maps`` add :func:`explain_slide`'s files under ``<out_dir>/heatmaps`` and
    ``<out_dir>/attention``. The returned ``predictions`` hold the means only.
    """
    from isg.pipeline.cohort import on_dask, run_cohort

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir / "patches"
    slides = [Path(s) for s in slides]
    if on_dask(scheduler):  # the workers' working directory may be another one
        out_dir, work_dir, slides = out_dir.absolute(), work_dir.absolute(), [s.absolute() for s in slides]
    per_slide = out_dir / "slides"
    heatmaps = list(heatmaps or [])
    unknown = [g for g in heatmaps if g not in predictor.outputs]
    if unknown:
        raise ValueError(f"heatmaps: {', '.join(unknown)} not predicted by this model (outputs: {_some(predictor.outputs)})")
    task = get_task(predictor.models[0].task)
    if (heatmaps or attention_maps) and not task.per_patch_maps:
        raise ValueError(f"heatmaps and attention maps are not made for task {task.name!r} ({task.description})")

    def complete(path: Path) -> bool:  # a slide is done when its JSON and the maps asked for exist
        return path.is_file() and _explained(out_dir, path.stem, heatmaps, attention_maps)

    from isg.pipeline.progress import progress_log

    process = _PredictOne(predictor, work_dir, out_dir, heatmaps, attention_maps,
                          tile_progress=progress and workers == 1, ship_source=scheduler not in (None, "threads"))
    with progress_log(out_dir / "progress.log"):  # slides in this process; each slide's call adds it on workers
        summary = run_cohort(slides, process, lambda s: per_slide / f"{slide_id_of(s)}.json", scheduler=scheduler,
                             workers=workers, resources=resources, overwrite=overwrite, progress=progress,
                             name_of=slide_id_of, is_complete=complete, summary_path=out_dir / "summary.json",
                             title="isg predict")
    records = [json.loads((per_slide / f"{slide_id_of(s)}.json").read_text()) for s in slides
               if (per_slide / f"{slide_id_of(s)}.json").is_file()]
    index = pd.Index([r["slide_id"] for r in records], name="slide_id")
    table = pd.DataFrame([r["prediction"] for r in records], index=index)
    spread = [f"{name}{STD_SUFFIX}" for name in predictor.outputs]
    predictions = table.reindex(columns=predictor.outputs)
    interleaved = [c for name, std in zip(predictor.outputs, spread) for c in (name, std)]
    timings = pd.DataFrame([r["seconds"] for r in records], index=index)
    for name, frame in (("predictions.csv", table.reindex(columns=interleaved)), ("timings.csv", timings)):
        with atomic_path(out_dir / name) as tmp:
            frame.to_csv(tmp)
    return predictions, timings, summary


def _explained(out_dir: Path, slide_id: str, heatmaps: list[str], attention_maps: bool) -> bool:
    return (all((out_dir / "heatmaps" / slide_id / f"{_file_name(g)}.png").is_file() for g in heatmaps)
            and (not attention_maps or (out_dir / "attention" / f"{slide_id}.h5").is_file()))


def cached_predictor(source: dict, settings: dict) -> Predictor:
    """The predictor ``Predictor.from_train_dir(**source)``, built once per process (a Dask worker's first slide)
    and reused, with ``settings`` (batch size, reader threads, tile memory, amp) applied."""
    from dataclasses import replace

    from isg.utils import PROCESS_CACHE

    key = ("predictor", json.dumps(source, sort_keys=True, default=str), _folder_fingerprint(source["train_dir"]))
    return replace(PROCESS_CACHE.get(key, lambda: Predictor.from_train_dir(**source)), **settings)


def _folder_fingerprint(train_dir: str) -> tuple:
    """Names, sizes and mtimes of a model folder's files: a folder trained again is loaded again."""
    return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(train_dir).iterdir()) if p.is_file())


class _PredictOne:
    """One slide of :func:`predict_slides` (picklable). With ``ship_source`` only the predictor's
    :attr:`Predictor.source` travels: each Dask worker or process builds the predictor once and reuses it."""

    def __init__(self, predictor: Predictor, work_dir: Path, out_dir: Path, heatmaps: list[str], attention_maps: bool,
                 tile_progress: bool, ship_source: bool):
        ship_source = ship_source and predictor.source is not None
        self.predictor = None if ship_source else predictor
        self.source = predictor.source if ship_source else None
        self.settings = dict(batch_size=predictor.batch_size, num_workers=predictor.num_workers,
                             tile_memory_mb=predictor.tile_memory_mb, amp=predictor.amp)
        self.work_dir, self.out_dir, self.heatmaps, self.attention_maps = work_dir, out_dir, heatmaps, attention_maps
        self.tile_progress = tile_progress

    def __call__(self, slide: Path) -> dict:
        from isg.pipeline.progress import progress_log

        predictor = self.predictor if self.predictor is not None else cached_predictor(self.source, self.settings)
        with progress_log(self.out_dir / "progress.log"):  # on a worker process too (the run's own: a no-op)
            result = predict_one(slide, predictor, self.work_dir, tile_progress=self.tile_progress)
        if self.heatmaps or self.attention_maps:
            explain_slide(slide, result.patches, predictor, self.out_dir, self.heatmaps, self.attention_maps,
                          batch=result.batch)
        timings = result.timings
        record = {"slide_id": slide_id_of(slide), "slide_path": str(slide), "prediction": result.prediction.to_dict(),
                  "seconds": timings}
        write_text_atomic(self.out_dir / "slides" / f"{slide_id_of(slide)}.json", json.dumps(record, default=float))
        return {"n_patches": timings["n_patches"], **{f"seconds_{k}": round(timings[k], 4) for k in STAGES}}


def _some(names, n: int = 8) -> str:
    names = list(names)
    return ", ".join(map(str, names[:n])) + (f", ... ({len(names)} in all)" if len(names) > n else "")


def _file_name(name: str) -> str:
    """A gene name made safe as a file name."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name))


# ----------------------------------------------------------------------------- explanations


def patch_explanations(predictor: Predictor, batch: dict) -> dict:
    """Per-patch values of the fold ensemble for a one-slide batch.

    Returns ``patch_values`` [F, N, outputs] (each fold's head applied to each patch token, in
    target units), ``local_gate`` [F, N, fusion blocks, L] and ``global_weights`` [F, N, blocks, L]
    (the fusion blocks' local gate A and global weights Z), F fold models, N patches.
    """
    values, gates, weights = [], [], []
    for fold in predictor.models:
        if not hasattr(fold, "explain"):
            raise ValueError(f"fold model {fold.path}: this version cannot explain its predictions per patch")
        out = fold.explain(batch)  # patch_values in target units
        values.append(out["patch_values"][0].float().cpu())  # [N, outputs]
        if "local_gate" in out:
            gates.append(out["local_gate"][0].float().cpu())  # [N, blocks, L]
            weights.append(out["global_weights"][0].float().cpu())  # [N, blocks, L]
    result = {"patch_values": torch.stack(values).numpy()}
    if gates:
        result["local_gate"], result["global_weights"] = torch.stack(gates).numpy(), torch.stack(weights).numpy()
    return result


def explain_slide(slide_path: Path, patches: SlidePatches, predictor: Predictor, out_dir: Path, genes: list[str],
                  attention_maps: bool, batch: dict | None = None) -> None:
    """Heatmaps of ``genes`` and/or the fusion attention maps of one slide's ``patches`` (with features).

    ``<out_dir>/heatmaps/<slide_id>/patches.csv``: x, y (level-0 top-left), size (level-0 side)
    and, per gene, the ensemble's per-patch value (mean over folds of the head applied to the
    patch token); ``<gene>.png``: those values over the slide thumbnail (the one preprocess made,
    kept in ``patches``; the slide is read again only for patches loaded from a file).
    ``<out_dir>/attention/<slide_id>.h5``: ``coords`` [N, 2], ``local_gate`` [F, N, fusion blocks, L]
    (A, averaged over channels) and ``global_weights`` [F, N, blocks with a global updater, L] (Z)
    per fold model (L = S x S local positions, row-major). ``batch``: the collated bag of ``patches``.
    """
    slide_id = slide_id_of(slide_path)
    if batch is None:
        batch = collate_bags([to_bag(bag_arrays(patches, predictor.local_ae is not None), patches.slide_id)])
    explained = patch_explanations(predictor, batch)
    n = int(batch["mask"][0].sum())
    coords = patches.coords[:n]  # [N, 2] level-0 (x, y), the bag's order
    side = patches.geometry.patch_size_level0
    if genes:
        values = explained["patch_values"][:, :n].mean(axis=0)  # [N, outputs]
        column = {name: i for i, name in enumerate(predictor.outputs)}
        table = pd.DataFrame({"x": coords[:, 0], "y": coords[:, 1], "size": side})
        for gene in genes:
            table[gene] = values[:, column[gene]]
        folder = out_dir / "heatmaps" / slide_id
        with atomic_path(folder / "patches.csv") as tmp:
            table.to_csv(tmp, index=False)
        from isg.eval.figures import plot_patch_heatmap

        thumb, dimensions = patches.thumbnail, patches.dimensions
        if thumb is None or dimensions is None:
            from isg.io import open_slide

            with open_slide(slide_path) as slide:
                thumb, dimensions = slide.thumbnail(HEATMAP_SIZE), slide.dimensions
        for gene in genes:  # written atomically
            plot_patch_heatmap(folder / f"{_file_name(gene)}.png", thumb, dimensions, coords, side, table[gene].to_numpy(),
                               title=f"{slide_id}: {gene}", label="predicted log10(1 + x) per patch")
    if attention_maps:
        if "local_gate" not in explained:
            raise ValueError(f"model {predictor.models[0].config.model} has no fusion attention (ISG models only)")
        with atomic_path(out_dir / "attention" / f"{slide_id}.h5") as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(slide_id=slide_id, slide_path=str(slide_path), level0_patch_size=side,
                           folds=[str(m.path.name) for m in predictor.models])
            f.create_dataset("coords", data=coords)
            for name in ("local_gate", "global_weights"):
                dset = f.create_dataset(name, data=explained[name][:, :n].astype(np.float32))
                dset.attrs["dims"] = "fold, patch, fusion block, local position (row-major S x S)"
