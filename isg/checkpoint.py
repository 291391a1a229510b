"""One checkpoint format for every trained network of isg (autoencoders, slide models, fold models).

A checkpoint is one file written with ``torch.save`` holding only plain data::

    {"format": "isg-checkpoint", "version": 2, "kind": "autoencoder" | "model" | "fold-model",
     "config": "<JSON text>", "extra": "<JSON text>", "state": {name: state dict (tensors)}}

``config`` rebuilds the network (constructor arguments), ``extra`` is free JSON
(training options, history), ``state`` holds the tensors. It is read with
``torch.load(weights_only=True)``: a file that tries to unpickle anything else
(code) is refused with an error naming the file. The three formats before it
(``isg-autoencoder-v1``, ``isg-model/1``, ``isg-slide-model/1``) held the same
content as nested dicts; they are converted when read, with a warning naming the
file (:func:`upgrade_checkpoint` rewrites one in the current format).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from isg.utils import atomic_path

FORMAT = "isg-checkpoint"
VERSION = 2
KINDS = ("autoencoder", "model", "fold-model")
LEGACY_FORMATS = {"isg-autoencoder-v1": "autoencoder", "isg-model/1": "model", "isg-slide-model/1": "fold-model"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: the message names the file and the problem."""


@dataclass
class Checkpoint:
    kind: str
    config: dict  # constructor arguments (JSON)
    state: dict  # name -> state dict / tensors
    extra: dict = field(default_factory=dict)  # free JSON: training options, history, ...
    path: Path | None = None


def save_checkpoint(path: str | os.PathLike, kind: str, config: dict, state: dict, extra: dict | None = None) -> None:
    """Write a checkpoint atomically (``config`` and ``extra`` must be JSON-serialisable)."""
    if kind not in KINDS:
        raise ValueError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    payload = {"format": FORMAT, "version": VERSION, "kind": kind, "config": json.dumps(config),
               "extra": json.dumps(extra or {}), "state": _detached(state)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | os.PathLike, kind: str, map_location="cpu") -> Checkpoint:
    """Read a checkpoint of ``kind`` (never unpickles code; converts the legacy formats with a warning)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{kind} checkpoint {path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for disallowed globals (code), RuntimeError for other bytes
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{kind} checkpoint {path}: refused: it is not a plain-tensor isg checkpoint "
                              f"(weights_only load failed: {first})") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{kind} checkpoint {path}: not an isg {kind} checkpoint (holds a {type(payload).__name__})")
    found = payload.get("format")
    if found in LEGACY_FORMATS:
        checkpoint = _from_legacy(payload, found, path)
    elif found == FORMAT:
        if payload.get("version") != VERSION:
            raise CheckpointError(f"{kind} checkpoint {path}: format version {payload.get('version')} is not supported "
                                  f"(this isg reads version {VERSION})")
        try:
            checkpoint = Checkpoint(payload["kind"], json.loads(payload["config"]), payload["state"],
                                    json.loads(payload.get("extra") or "{}"), path)
        except (KeyError, TypeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{kind} checkpoint {path}: damaged ({type(exc).__name__}: {exc})") from None
    else:
        raise CheckpointError(f"{kind} checkpoint {path}: not an isg {kind} checkpoint "
                              f"(format {found!r}; expected {FORMAT!r})")
    if checkpoint.kind != kind:
        raise CheckpointError(f"{kind} checkpoint {path}: holds a {checkpoint.kind!r} checkpoint, not {kind!r}")
    return checkpoint


def upgrade_checkpoint(path: str | os.PathLike, kind: str) -> None:
    """Rewrite a legacy-format checkpoint in the current format (atomically, in place)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        checkpoint = load_checkpoint(path, kind)
    save_checkpoint(path, checkpoint.kind, checkpoint.config, checkpoint.state, checkpoint.extra)


def _detached(tree):
    if isinstance(tree, torch.Tensor):
        return tree.detach().cpu()
    if isinstance(tree, dict):
        return {k: _detached(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detached(v) for v in tree)
    return tree


def legacy_model_name(name: str) -> str:
    """What a model name of the pre-v2 checkpoints builds today.

    Before v2, ``isg-N-k`` built what is now ``isg-N-k-plus`` (the paper form took the name) and
    ``vit-s`` was the 192-d 4-layer transformer now called ``vit-t4`` (``vit-s`` is ViT-Small).
    """
    if re.fullmatch(r"isg-\d+-\d+", name):
        return f"{name}-plus"
    return {"vit-s": "vit-t4"}.get(name, name)


def _legacy_state(state: dict) -> dict:
    """Slide-model weights before v2: MBConv norms were named bn1..bn3 (now norm1..norm3)."""
    return {re.sub(r"\.bn([123])\.", r".norm\1.", key): value for key, value in state.items()}


def _from_legacy(payload: dict, found: str, path: Path) -> Checkpoint:
    """The three pre-v2 layouts -> :class:`Checkpoint` (same content, new places)."""
    kind = LEGACY_FORMATS[found]
    warnings.warn(f"{path}: old checkpoint format {found!r}, converted while reading; "
                  f"rewrite it with isg.checkpoint.upgrade_checkpoint({str(path)!r}, {kind!r})", FutureWarning, stacklevel=3)
    try:
        if kind == "autoencoder":
            extra = dict(payload.get("extra") or {})
            state = {"model": payload["state_dict"]}
            if "train_state" in payload:
                train_state = dict(payload["train_state"])
                extra.setdefault("history", train_state.pop("history", {}))
                state["train"] = train_state
            return Checkpoint(kind, dict(payload["config"]), state, extra, path)
        if kind == "model":
            extra = {k: v for k, v in payload.items() if k not in ("format", "config", "state_dict")}
            config = dict(payload["config"])
            config["name"] = legacy_model_name(config["name"])
            return Checkpoint(kind, config, {"model": _legacy_state(payload["state_dict"])}, extra, path)
        train = dict(payload["config"])  # isg-slide-model/1: TrainConfig as a dict, the rest beside it
        n_outputs = 1 if train.get("task") == "msi" else len(payload["outputs"])  # that format's own rule (msi: one logit)
        model = {"name": legacy_model_name(train["model"]), "d": payload["d"], "local_grid": payload["local_grid"], "n_outputs": n_outputs,
                 **train.get("model_kwargs", {})}
        state = {"model": _legacy_state(payload["state_dict"])}
        if payload.get("target_mean") is not None:
            state["standardizer"] = {"mean": payload["target_mean"], "std": payload["target_std"]}
        config = {"model": model, "task": train.get("task", "regression"), "outputs": list(payload["outputs"]),
                  "fold": payload["fold"], "train": train}
        return Checkpoint(kind, config, state, {}, path)
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{kind} checkpoint {path}: damaged {found!r} file (missing {exc})") from None


__all__ = ["Checkpoint", "CheckpointError", "FORMAT", "VERSION", "load_checkpoint", "save_checkpoint", "upgrade_checkpoint"]
