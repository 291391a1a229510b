"""A model folder that travels: ``isg train``'s output holds everything ``isg predict`` needs, and says what it is.

Layout (written by :func:`write_model_folder` at the end of :func:`isg.train.expression.cross_validate`)::

    model_fold<k>.pt          the fold models (an ensemble at prediction time)
    extractors/global.pt      copies of the autoencoders the training features were made with
    extractors/local.pt       (local only for models that read local features)
    model.json                the model card: what predict needs and what the model is (below)
    README.md                 the same card in words

``model.json`` (``format`` = ``"isg-model-folder"``, ``version`` 1): ``isg_version``; ``model``, ``task``,
``outputs`` (genes, or the MSI class); ``cohort`` (slides, samples, patients trained on); ``metrics`` (the
cross-validated summary: mean r, significant genes, the training-mean floor, or AUC); ``folds`` and ``extractors``
(file names inside the folder with their SHA-256; an extractor also its size, resolution, training options and
final losses); ``patch_file_schema``, ``preprocess`` (the preprocess options and the frozen selection rule, a
:class:`~isg.select.SelectionRule` as ``to_dict()``) and ``geometry`` (read level, patch sizes, mpp), as the patch
files hold them (:mod:`isg.data.patch_file`); ``training`` (the training options). Paths inside are relative to the
folder, so it predicts from any directory and after it is copied elsewhere. :func:`read_model_folder` checks every
file against its checksum and names a missing or altered one (:class:`~isg.features.ExtractorError`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from isg.checkpoint import CheckpointError
from isg.features.extractors import ExtractorError, ExtractorRef
from isg.utils import atomic_path, file_sha256, write_text_atomic

log = logging.getLogger(__name__)

CARD = "model.json"
README = "README.md"
EXTRACTORS = "extractors"
FORMAT = "isg-model-folder"
VERSION = 1
ROLES = ("global", "local")
FINAL_STEPS = 10  # an extractor's final losses: the mean over its last steps


@dataclass
class ModelFolder:
    """A model folder read by :func:`read_model_folder`: its ``path`` and ``card`` (model.json), files checked."""

    path: Path
    card: dict

    @property
    def fold_paths(self) -> list[Path]:
        return [self.path / fold["file"] for fold in self.card["folds"]]

    def extractor(self, role: str) -> ExtractorRef | None:
        """The folder's copy of the ``role`` extractor (None when the card has none)."""
        entry = self.card.get("extractors", {}).get(role)
        if not entry or not entry.get("file"):
            return None
        return ExtractorRef(str(self.path / entry["file"]), entry["sha256"], role)

    def preprocess_record(self) -> dict:
        """How new slides' patches are made, as :func:`isg.pipeline.predict.new_slide_options` reads it."""
        return {key: self.card[key] for key in ("patch_file_schema", "preprocess", "geometry") if key in self.card}


def write_model_folder(out_dir: str | os.PathLike, patches, *, model: str, task: str, outputs: list[str], uses_local: bool,
                       cohort: dict, metrics: dict, training: dict) -> dict:
    """Copy the extractors into ``out_dir``, checksum the fold models there, write model.json and README.md.

    ``patches``: one training slide's :class:`~isg.data.patch_file.SlidePatches` (its options, rule, geometry and
    feature attrs say how every training patch was made). An extractor whose checkpoint is gone, or changed since
    the features were extracted, is left out with a warning (``isg predict`` then names it and wants ``--global-ae``).
    Returns the card.
    """
    import isg
    from isg.data.patch_file import SCHEMA_VERSION, geometry_dict
    from isg.select import SelectionRule

    out_dir = Path(out_dir)
    folds = sorted(out_dir.glob("model_fold*.pt"), key=lambda p: int(p.stem.removeprefix("model_fold") or 0))
    preprocess = dict(patches.options)
    if patches.rule is not None:  # the rule alone (the per-slide cut is not part of it; a cohort cut is)
        preprocess["rule"] = SelectionRule.from_dict(patches.rule).to_dict()
    extractors = {}
    for role, attrs in zip(ROLES, (patches.feature_attrs, patches.local_feature_attrs)):
        if role == "local" and not uses_local:
            continue
        extractors[role] = _copy_extractor(out_dir, role, attrs)
    card = {"format": FORMAT, "version": VERSION, "isg_version": isg.__version__, "model": model, "task": task,
            "outputs": [str(name) for name in outputs], "cohort": cohort, "metrics": _scalars(metrics),
            "folds": [{"file": p.name, "sha256": file_sha256(p)} for p in folds], "extractors": extractors,
            "patch_file_schema": SCHEMA_VERSION, "preprocess": preprocess, "geometry": geometry_dict(patches.geometry),
            "training": training}
    write_text_atomic(out_dir / CARD, json.dumps(card, indent=2, default=str) + "\n")
    write_text_atomic(out_dir / README, model_card_text(card))
    return card


def _copy_extractor(out_dir: Path, role: str, attrs: dict) -> dict:
    """``extractors/<role>.pt`` copied from the checkpoint the features record, and its card entry."""
    entry = {key: attrs[key] for key in ("d", "resolution") if key in attrs}
    source = attrs.get("checkpoint")
    if not source:
        log.warning("model folder %s: the %s features record no extractor checkpoint; isg predict will need one given",
                    out_dir, role)
        return {**entry, "file": None, "missing": "the features record no checkpoint"}
    source = Path(source)
    recorded = attrs.get("checkpoint_sha256")
    found = file_sha256(source) if source.is_file() else None
    if found is None or (recorded and recorded != found):
        why = "no such file" if found is None else "changed since the features were extracted"
        log.warning("model folder %s: %s extractor %s: %s; it is not copied, and isg predict will need one given",
                    out_dir, role, source, why)
        return {**entry, "file": None, "missing": f"{source}: {why}"}
    target = out_dir / EXTRACTORS / f"{role}.pt"
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return {**entry, "file": f"{EXTRACTORS}/{role}.pt", "sha256": found, "source": str(source), **_extractor_record(source)}


def _extractor_record(checkpoint: Path) -> dict:
    """The extractor's size, training options and final losses (from the checkpoint and its history.json)."""
    from isg.checkpoint import load_checkpoint

    record = {}
    try:
        saved = load_checkpoint(checkpoint, "autoencoder")
    except (CheckpointError, OSError):
        return record
    record["config"] = saved.config
    train = saved.extra.get("train_config", {})
    keep = ("kind", "lpips_weight", "adv_weight", "r1_gamma", "lpips_impl", "batch_size", "lr", "sampler")
    record["training"] = {key: train[key] for key in keep if key in train}
    for key in ("steps", "n_tiles", "objective"):
        if key in saved.extra:
            record[key] = saved.extra[key]
    history_path = checkpoint.parent / "history.json"
    try:
        history = json.loads(history_path.read_text()) if history_path.is_file() else {}
    except (OSError, ValueError):
        history = {}
    final = {name: sum(values[-FINAL_STEPS:]) / len(values[-FINAL_STEPS:]) for name, values in history.items()
             if name != "step" and values}
    if final:
        record["final_losses"] = {name: round(value, 6) for name, value in final.items()}
    return record


def _scalars(summary: dict) -> dict:
    """The headline numbers of a cross-validation summary (and the training-mean floor's mean r)."""
    out = {key: value for key, value in summary.items() if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
    floor = summary.get("train_mean_floor")
    if isinstance(floor, dict) and "mean_r" in floor:
        out["train_mean_floor_mean_r"] = floor["mean_r"]
    return {key: (None if isinstance(value, float) and not math.isfinite(value) else value) for key, value in out.items()}


def read_model_folder(path: str | os.PathLike, *, check: bool = True) -> ModelFolder:
    """The model folder at ``path`` (its model.json); with ``check`` every fold model and extractor it names
    must be there with its checksum, else :class:`~isg.features.ExtractorError` (or CheckpointError) names it."""
    path = Path(path)
    card_path = path / CARD
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{card_path}: no such file (not a model folder of this isg version)") from None
    except ValueError as exc:
        raise CheckpointError(f"{card_path}: not valid JSON ({exc})") from None
    if card.get("format") != FORMAT:
        raise CheckpointError(f"{card_path}: not an isg model card (format {card.get('format')!r})")
    if card.get("version", 0) > VERSION:
        raise CheckpointError(f"{card_path}: model card version {card['version']} is newer than this isg reads ({VERSION})")
    folder = ModelFolder(path, card)
    if check:
        for fold in card["folds"]:
            fold_path = path / fold["file"]
            if not fold_path.is_file():
                raise CheckpointError(f"model folder {path}: fold model {fold_path}: no such file")
            if file_sha256(fold_path) != fold["sha256"]:
                raise CheckpointError(f"model folder {path}: fold model {fold_path}: altered since it was trained")
        for role in ROLES:
            ref = folder.extractor(role)
            if ref is not None:
                ref.verify()
    return folder


def extractor_missing(folder: ModelFolder, role: str) -> ExtractorError:
    """The error for a model folder without its ``role`` extractor."""
    why = folder.card.get("extractors", {}).get(role, {}).get("missing", "none recorded")
    option = "--global-ae" if role == "global" else "--local-ae"
    return ExtractorError(f"model folder {folder.path}: no {role} extractor inside ({why}); give one with {option}")


def model_card_text(card: dict) -> str:
    """README.md of a model folder: the card in words."""
    metrics = card.get("metrics", {})
    if "auc" in metrics:
        result = f"cross-validated AUC {metrics['auc']}"
    else:
        result = (f"cross-validated mean Pearson r {metrics.get('mean_r')} over {metrics.get('n_genes')} genes, "
                  f"{metrics.get('n_significant')} significant; predicting each fold's training mean scores "
                  f"{metrics.get('train_mean_floor_mean_r')}")
    cohort = card.get("cohort", {})
    rule = card.get("preprocess", {}).get("rule") or {}
    outputs = card.get("outputs", [])
    rule_text = ", ".join(f"{k} {v}" for k, v in rule.items() if v is not None and k != "rule")
    lines = [f"# isg model: {card.get('model')} ({card.get('task')})", "",
             f"Trained with isg {card.get('isg_version')} on {cohort.get('slides')} slides ({cohort.get('samples')} "
             f"samples, {cohort.get('patients')} patients), {len(card.get('folds', []))} patient-level folds: {result}.", "",
             f"Outputs ({len(outputs)}): {', '.join(outputs[:20])}{', ...' if len(outputs) > 20 else ''}.", "",
             f"Patches: {card.get('preprocess', {}).get('selector')} selector, rule {rule.get('rule')}"
             f"{f' ({rule_text})' if rule_text else ''}, "
             f"{card.get('geometry', {}).get('patch_size')} px patches at {card.get('geometry', {}).get('mpp')} um/px.", ""]
    for role, entry in card.get("extractors", {}).items():
        if not entry.get("file"):
            lines.append(f"{role.capitalize()} extractor: not inside ({entry.get('missing')}).")
            continue
        losses = ", ".join(f"{k} {v:.4g}" for k, v in entry.get("final_losses", {}).items())
        lines.append(f"{role.capitalize()} extractor: `{entry['file']}` (SHA-256 {entry['sha256'][:12]}...), "
                     f"d {entry.get('d')}, {entry.get('resolution')} px, {entry.get('steps', '?')} training steps"
                     + (f"; final losses {losses}" if losses else "") + ".")
    lines += ["", "Predict from any directory, also after copying this folder:", "",
              "    isg predict SLIDES --model THIS_FOLDER --out predictions", "",
              "model.json holds the same card for programs (isg.model.folder).", ""]
    return "\n".join(lines)


__all__ = ["CARD", "EXTRACTORS", "FORMAT", "README", "VERSION", "ModelFolder", "extractor_missing", "model_card_text",
           "read_model_folder", "write_model_folder"]
