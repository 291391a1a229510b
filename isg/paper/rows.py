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
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from isg.paper.workspace import Workspace
from isg.utils import write_text_atomic

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


def _select(scores: dict[str, np.ndarray], rules) -> tuple[dict, int]:
    """Per slide ``(keep [N], cut, rule dict)`` of ``rules`` (one rule or slide_id -> rule) on ``scores``, and the
    number of slides where the rule kept nothing and fell back to the best patch."""
    from isg.select import SelectionWarning, select

    selections, fallback = {}, 0
    for slide_id, values in scores.items():
        rule = rules[slide_id] if isinstance(rules, dict) else rules
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SelectionWarning)
            keep, cut = select(values, rule, name=slide_id)
        selections[slide_id] = (keep, cut, rule.to_dict())
        fallback += any(issubclass(w.category, SelectionWarning) for w in caught)
    return selections, fallback


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


def _write_bags(ws: Workspace, name: str, source: str, bases: dict, scores: dict, selector: str, rules) -> tuple[Path, list, int, dict]:
    """Patch files of one row: the shared ``bases`` (every patch selected, with features) re-selected by ``rules`` on
    ``scores`` (stored with them, ``selector`` named). Returns (folder, patches kept per slide, fallbacks, keeps)."""
    from isg.data.patch_file import write_patch_file

    selections, fallback = _select(scores, rules)
    keeps = {slide_id: keep for slide_id, (keep, _, _) in selections.items()}
    folder = bag_folder(ws, name, source, keeps)
    folder.mkdir(parents=True, exist_ok=True)
    for slide_id in ws.slide_ids:
        keep, cut, rule = selections[slide_id]
        base = replace(bases[slide_id], scores=scores[slide_id], options={**bases[slide_id].options, "selector": selector})
        patches, features = base.reselected(keep, rule, cut)
        if features != "kept":
            raise RuntimeError(f"{folder / slide_id}.h5: features were not carried over ({features})")
        write_patch_file(folder / f"{slide_id}.h5", patches)
    return folder, [int(k.sum()) for k in keeps.values()], fallback, keeps


def isg_bags(ws: Workspace, name: str, selector: str, rules, variant: str, rule: str | None = None) -> Bags:
    """Bags of the autoencoder features (``variant``) of the patches ``rules`` keeps on ``selector``'s scores.

    ``rules``: one :class:`~isg.select.SelectionRule` for every slide, or a dict slide_id -> rule (then ``rule``
    says it in words).
    """
    extractor = ws.extractor(variant)
    folder, kept, fallback, keeps = _write_bags(ws, name, f"isg {variant}", ws.features(variant), ws.scores(selector), selector, rules)
    under, signal = _known_answers(ws, keeps)
    return Bags(folder, selector, rule or rule_text(rules), extractor.label, kept, fallback, under_floor=under, signal=signal)


def he2rna_bags(ws: Workspace, name: str, rule=None) -> Bags:
    """HE2RNA's ResNet features of every Otsu tissue tile (``rule`` None) or of the tiles ``rule`` keeps on their Shannon scores."""
    from isg.select import SelectionRule

    he2rna = ws.he2rna()
    slides = he2rna["slides"]
    rules = rule if rule is not None else {s: SelectionRule("topk", k=patches.n_tissue) for s, patches in slides.items()}
    scores = {s: patches.scores for s, patches in slides.items()}
    folder, kept, fallback, _ = _write_bags(ws, name, f"he2rna {he2rna['label']}", slides, scores, "shannon", rules)
    return Bags(folder, "otsu (tissue >= 50 %)" if rule is None else "shannon", "every tissue tile" if rule is None else rule_text(rule),
                he2rna["label"], kept, fallback)


def fold_clean_bags(ws: Workspace, name: str, training_ids: list[list[str]], variant: str) -> Bags:
    """Per fold k: the cohort cut (mean + 1 sigma of the training slides' Shannon scores) and the autoencoders fitted on
    ``training_ids[k]`` only, applied to every slide; fold k of the cross-validation reads ``fold_dirs[k]``."""
    from isg.select import SelectionRule

    scores, dirs, kept, fallback, cuts, label = ws.scores("shannon"), [], [], 0, [], ""
    for k, ids in enumerate(training_ids):
        extractor, features, cut = ws.fold_clean(k, ids, variant)
        source = f"fold-clean {variant} fold {k} of {len(training_ids)}: {sorted(ids)}"
        folder, fold_kept, fold_fallback, _ = _write_bags(ws, name, source, features, scores, "shannon",
                                                          SelectionRule("cohort", threshold=cut))
        dirs.append(folder)
        kept, fallback, label = kept + fold_kept, fallback + fold_fallback, extractor.label
        cuts.append(cut)
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
    write_text_atomic(folder / "row.json", json.dumps(key, indent=1, default=str))  # the row's done marker, last
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


__all__ = ["Bags", "RowSpec", "bag_folder", "fold_clean_bags", "he2rna_bags", "isg_bags", "rule_text", "skipped_row", "slug", "train_row"]
