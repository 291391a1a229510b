"""One table row: its bags (which patches, which features), its cross-validations over split seeds, its record.

A row's bags are written once per run from the workspace's shared features (:func:`isg_bags`,
:func:`he2rna_bags`); :func:`train_row` cross-validates the row's model on them for each split seed
(:func:`isg.train.expression.cross_validate`, reused when the same row was trained before: a rerun
resumes) and returns the record every table prints: PCC and L2 with their split-seed spread, the
train-mean floor on the same folds, patches kept per slide, seconds, the extractor and its loss terms.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from isg.paper.workspace import Workspace

@dataclass
class Bags:
    """A row's bags: ``folder`` of one bag file per slide (or one folder per fold for a fold-clean row)."""

    folder: Path
    selector: str
    rule: str  # in words, e.g. "mean + 1 sigma per slide"
    features: str  # what made the features: the extractor (size, loss terms, LPIPS backbone) or the ResNet
    kept: list[int] = field(default_factory=list)  # patches per slide
    fallback: int = 0  # slides where the rule kept nothing and the best patch was kept instead
    cut_bits: float | None = None
    fold_dirs: list[Path] | None = None  # fold-clean rows: fold k reads fold_dirs[k]
    under_floor: int = 0  # slides kept under the floor (isg.select.kept_record: < 5 % of the tissue or < 8 patches)
    signal: dict | None = None  # synthetic cohorts: precision / recall of signal-bearing patches (isg.eval.mean_precision)

    def stats(self) -> dict:
        known = {key: self.signal[key] for key in ("precision", "recall", "enrichment")} if self.signal else {}
        return {"kept_mean": float(np.mean(self.kept)), "kept_min": int(np.min(self.kept)), "fallback": self.fallback,
                "under_floor": self.under_floor, "selector": self.selector, "rule": self.rule, "cut_bits": self.cut_bits,
                "features": self.features, **known}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def _keep(scores: np.ndarray, rule, name: str) -> tuple[np.ndarray, bool]:
    """(keep mask [N], whether the rule kept nothing and fell back to the best patch)."""
    from isg.select import SelectionWarning, select

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SelectionWarning)
        keep = select(scores, rule, name=name).keep
    return keep, any(issubclass(w.category, SelectionWarning) for w in caught)


def _known_answers(ws: Workspace, keeps: dict[str, np.ndarray]) -> tuple[int, dict | None]:
    """(slides under the keep floor, signal precision summary or None) of one row's selection over the shared grid."""
    from isg.eval import mean_precision, selection_precision
    from isg.select import SelectionWarning, kept_record

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)  # counted in the row instead
        under = sum(kept_record(keep)["under_floor"] for keep in keeps.values())
    fractions = ws.signal_fraction()
    if fractions is None:
        return under, None
    return under, mean_precision([selection_precision(keeps[s], fractions[s]) for s in ws.slide_ids])


def bag_folder(ws: Workspace, name: str, source: str, keeps: dict[str, np.ndarray]) -> Path:
    """Where a row's bags go: named by what they hold (``source``: which features; the kept patches), so rows that
    keep the same patches of the same features share one folder and one training."""
    digest = hashlib.sha1(source.encode())
    for slide_id in ws.slide_ids:
        digest.update(slide_id.encode() + np.packbits(keeps[slide_id]).tobytes() + len(keeps[slide_id]).to_bytes(8, "little"))
    return ws.root / "bags" / f"{slug(name).split('_')[0]}-{digest.hexdigest()[:12]}"


def write_row_bags(ws: Workspace, folder: Path, features: dict, keeps: dict[str, np.ndarray], attrs: dict) -> None:
    """One bag file per slide: the rows ``keeps[slide]`` [N] of the shared ``features[slide]``."""
    from isg.data import write_bag

    folder.mkdir(parents=True, exist_ok=True)
    for slide_id in ws.slide_ids:
        keep = keeps[slide_id]
        write_bag(folder / f"{slide_id}.h5", {name: array[keep] for name, array in features[slide_id].items() if name != "scores"},
                  attrs)


def isg_bags(ws: Workspace, name: str, selector: str, rules, variant: str, rule: str | None = None) -> Bags:
    """Bags of the autoencoder features (``variant``) of the patches ``rules`` keeps on ``selector``'s scores.

    ``rules``: one :class:`~isg.select.SelectionRule` for every slide, or a dict slide_id -> rule (then ``rule``
    says it in words).
    """
    from isg.pipeline.extract import encoder_attrs

    extractor, features, scores = ws.extractor(variant), ws.features(variant), ws.scores(selector)
    keeps, fallback = {}, 0
    for slide_id in ws.slide_ids:
        keeps[slide_id], fell_back = _keep(scores[slide_id], rules[slide_id] if isinstance(rules, dict) else rules, slide_id)
        fallback += fell_back
    coords_attrs = {**ws.preprocess_attrs(), "selector": selector}
    attrs = {"coords": coords_attrs, "features": encoder_attrs(extractor.global_ae, "global"),
             "local_features": encoder_attrs(extractor.local_ae, "local")}
    folder = bag_folder(ws, name, f"isg {variant}", keeps)
    write_row_bags(ws, folder, features, keeps, attrs)
    under, signal = _known_answers(ws, keeps)
    return Bags(folder, selector, rule or rule_text(rules), extractor.label, [int(k.sum()) for k in keeps.values()], fallback,
                under_floor=under, signal=signal)


def he2rna_bags(ws: Workspace, name: str, rule=None) -> Bags:
    """HE2RNA's ResNet features of every Otsu tissue tile (``rule`` None) or of the tiles ``rule`` keeps on their Shannon scores."""
    he2rna = ws.he2rna()
    keeps, fallback = {}, 0
    for slide_id, slide in he2rna["slides"].items():
        if rule is None:
            keeps[slide_id] = np.ones(len(slide["scores"]), bool)
        else:
            keeps[slide_id], fell_back = _keep(slide["scores"], rule, slide_id)
            fallback += fell_back
    folder = bag_folder(ws, name, f"he2rna {he2rna['label']}", keeps)
    write_row_bags(ws, folder, he2rna["slides"], keeps, {"features": {"encoder": he2rna["label"]}})
    return Bags(folder, "otsu (tissue >= 50 %)" if rule is None else "shannon", "every tissue tile" if rule is None else rule_text(rule),
                he2rna["label"], [int(k.sum()) for k in keeps.values()], fallback)


def fold_clean_bags(ws: Workspace, name: str, training_ids: list[list[str]], variant: str) -> Bags:
    """Per fold k: the cohort cut (mean + 1 sigma of the training slides' Shannon scores) and the autoencoders fitted on
    ``training_ids[k]`` only, applied to every slide; fold k of the cross-validation reads ``fold_dirs[k]``."""
    from isg.pipeline.extract import encoder_attrs
    from isg.select import SelectionRule

    scores, dirs, kept, fallback, cuts, label = ws.scores("shannon"), [], [], 0, [], ""
    for k, ids in enumerate(training_ids):
        extractor, features, cut = ws.fold_clean(k, ids, variant)
        keeps = {}
        for slide_id in ws.slide_ids:
            keeps[slide_id], fell_back = _keep(scores[slide_id], SelectionRule("cohort", threshold=cut), slide_id)
            fallback += fell_back
        attrs = {"coords": {**ws.preprocess_attrs(), "selector": "shannon", "rule": "cohort", "threshold": cut},
                 "features": encoder_attrs(extractor.global_ae, "global"), "local_features": encoder_attrs(extractor.local_ae, "local")}
        folder = bag_folder(ws, name, f"fold-clean {variant} fold {k} of {len(training_ids)}: {sorted(ids)}", keeps)
        write_row_bags(ws, folder, features, keeps, attrs)
        dirs.append(folder)
        kept += [int(k.sum()) for k in keeps.values()]
        cuts.append(cut)
        label = extractor.label
    cut_text = ", ".join(f"{c:.3g}" for c in cuts)
    return Bags(dirs[0], "shannon", f"cohort cut per fold ({cut_text} bits)", f"{label}, per fold", kept, fallback,
                float(np.mean(cuts)), dirs)


def rule_text(rule) -> str:
    if rule.rule == "mean_std":
        return f"mean + {rule.n_sigma:g} sigma per slide"
    if rule.rule == "rank":
        return f"top {rule.share:.2%} per slide (rank)"
    if rule.rule == "robust_z":
        return f"median + {rule.n_sigma:g} x 1.4826 MAD per slide"
    if rule.rule == "topk":
        return f"top-{rule.k}"
    if rule.rule == "cohort":
        return f"cohort cut {rule.threshold:.3g}"
    return f"score >= {rule.threshold:g}"


@dataclass
class RowSpec:
    """What a row trains: ``model`` (a registry name) with ``model_kwargs`` on ``bags``, once per split seed."""

    name: str
    model: str
    bags: Bags
    seeds: tuple[int, ...]
    task: str = "regression"
    model_kwargs: dict = field(default_factory=dict)
    note: str = ""
    train: dict = field(default_factory=dict)  # TrainConfig fields over the run's (e.g. a probe's epochs and lr)


def _run_dir(ws: Workspace, spec: RowSpec, seed: int) -> tuple[Path, dict]:
    """The run folder of ``spec`` at ``seed`` and the key stored beside it: equal keys share one cross-validation."""
    sizes = ws.sizes
    key = {"bags": spec.bags.folder.name, "fold_dirs": [d.name for d in spec.bags.fold_dirs or []], "model": spec.model,
           "model_kwargs": spec.model_kwargs, "task": spec.task, "seed": seed, "epochs": sizes.epochs, "patience": sizes.patience,
           "folds": sizes.folds, "max_patches": sizes.max_patches, "lr": sizes.lr, "batch_size": sizes.batch_size, **spec.train}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return ws.root / "runs" / f"{spec.bags.folder.name}-{spec.model}-{digest}", key


def _cross_validate(ws: Workspace, spec: RowSpec, seed: int) -> dict:
    from isg.train.config import TrainConfig
    from isg.train.expression import cross_validate

    folder, key = _run_dir(ws, spec, seed)
    summary_path = folder / "summary.json"
    if summary_path.is_file() and (folder / "row.json").is_file() and json.loads((folder / "row.json").read_text()) == json.loads(
            json.dumps(key, default=str)):
        return json.loads(summary_path.read_text())  # trained before with the same key: reused
    s = ws.sizes
    options = {"epochs": s.epochs, "patience": s.patience, "max_patches": s.max_patches, "lr": s.lr, "batch_size": s.batch_size,
               **spec.train}
    config = TrainConfig(model=spec.model, task=spec.task, n_splits=s.folds, seed=seed, device=ws.device,
                         model_kwargs=dict(spec.model_kwargs), **options)
    targets = ws.cohort.expression if spec.task == "regression" else ws.cohort.labels
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "row.json").unlink(missing_ok=True)
    summary = cross_validate(ws.cohort.manifest, spec.bags.folder, targets, folder, config, fold_feature_dirs=spec.bags.fold_dirs)
    (folder / "row.json").write_text(json.dumps(key, indent=1, default=str))
    return summary


def _mean_sd(values: list[float]) -> tuple[float, float | None]:
    values = [float(v) for v in values]
    return float(np.mean(values)), (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def train_row(ws: Workspace, spec: RowSpec) -> dict:
    """Cross-validate ``spec`` once per split seed; the row's record (metrics mean and sd over seeds, per-seed values)."""
    summaries = [_cross_validate(ws, spec, seed) for seed in spec.seeds]
    record = {"name": spec.name, "model": spec.model, "task": spec.task, "seeds": list(spec.seeds), **spec.bags.stats(),
              "seconds": round(sum(sum(f["seconds"] for f in s["folds"]) for s in summaries), 1), "note": spec.note}
    if spec.task == "msi":
        record["auc"], record["auc_sd"] = _mean_sd([s["auc"] for s in summaries])
        record["auc_seeds"] = [s["auc"] for s in summaries]
    else:
        record["pcc"], record["pcc_sd"] = _mean_sd([s["mean_r"] for s in summaries])
        record["l2"], record["l2_sd"] = _mean_sd([s["l2"] for s in summaries])
        record["floor"], _ = _mean_sd([s["train_mean_floor"]["mean_r"] for s in summaries])
        record["floor_l2"], _ = _mean_sd([s["train_mean_floor"]["l2"] for s in summaries])
        record["significant"] = float(np.mean([s["n_significant"] for s in summaries]))
        record["pcc_seeds"] = [float(s["mean_r"]) for s in summaries]
        record["floor_seeds"] = [float(s["train_mean_floor"]["mean_r"]) for s in summaries]
    ws.say(f"[isg paper] {spec.name}: " + (f"AUC {record['auc']:.3f}" if spec.task == "msi" else
                                           f"PCC {record['pcc']:.3f} (floor {record['floor']:.3f}), L2 {record['l2']:.4f}")
           + f", {record['kept_mean']:.1f} patches per slide, {record['seconds']:.0f} s")
    return record


def skipped_row(name: str, reason: str, **fields) -> dict:
    """A row that could not run here (e.g. DexiNed without its pretrained weights), saying why."""
    return {"name": name, "note": reason, "skipped": True, **fields}


__all__ = ["Bags", "RowSpec", "fold_clean_bags", "he2rna_bags", "isg_bags", "rule_text", "skipped_row", "slug", "train_row", "write_row_bags"]
