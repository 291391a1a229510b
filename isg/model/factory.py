"""Model registry and checkpoints that rebuild a model from the file alone."""

from __future__ import annotations

import inspect
import os
import re

import torch
import torch.nn as nn

from isg.model.dual_attention import DualAttentionNet, GlobalViT

DEFAULT_MODEL = "isg-10-2"
_ISG_NAME = re.compile(r"^isg-(\d+)-(\d+)$")
_CHECKPOINT_FORMAT = "isg-model/1"


def list_models() -> list[str]:
    """Named models: ``isg-N-k`` (any N >= 1, 1 <= k <= N; the paper's default is ``isg-10-2``) and ``vit-s``."""
    return [DEFAULT_MODEL, "isg-4-2", "isg-6-3", "vit-s"]


def parse_model_name(name: str) -> tuple[int, int] | None:
    """``"isg-10-2" -> (10, 2)`` (N MBConv blocks, fusion every k); None for other names."""
    match = _ISG_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def create_model(name: str = DEFAULT_MODEL, d: int = 512, local_grid: int | None = None, n_outputs: int = 1, **kw) -> nn.Module:
    """Build a slide-level model by name.

    ``d``: feature size; ``local_grid``: S = p / q (cube side; needed by ISG
    models); ``n_outputs``: genes or classes; ``kw``: architecture options of
    :class:`DualAttentionNet` / :class:`GlobalViT` (``embed_dim``, ``depth``,
    ``num_heads``, ``channels``, ``drop_path``, ...). The arguments are kept in
    ``model.config`` for :func:`save_model`.
    """
    parsed = parse_model_name(name)
    if parsed is None and name != "vit-s":
        raise ValueError(f"unknown model {name!r}; expected 'isg-N-k' (e.g. {DEFAULT_MODEL}) or 'vit-s'")
    cls = DualAttentionNet if parsed is not None else GlobalViT
    options = [p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(kw) - set(options))
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; accepted: {', '.join(options)}")
    if parsed is not None:
        model = DualAttentionNet(d, local_grid, n_outputs, parsed[0], parsed[1], **kw)
    else:
        model = GlobalViT(d, n_outputs, **kw)
    model.config = {"name": name, "d": d, "local_grid": local_grid, "n_outputs": n_outputs, **kw}
    return model


def save_model(path: str | os.PathLike, model: nn.Module, config: dict | None = None, **extra) -> None:
    """Write ``{config, state_dict, **extra}`` atomically; ``config`` defaults to ``model.config``."""
    from isg.utils import atomic_path

    config = dict(config if config is not None else getattr(model, "config", None) or {})
    if "name" not in config:
        raise ValueError(f"save_model({path}): config must hold the create_model arguments (name, d, local_grid, n_outputs, ...)")
    payload = {"format": _CHECKPOINT_FORMAT, "config": config, "state_dict": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """Rebuild the model saved by :func:`save_model` and load its weights (eval mode)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_model: no such checkpoint: {path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or "config" not in payload or "state_dict" not in payload:
        raise ValueError(f"load_model({path}): not an isg model checkpoint (needs 'config' and 'state_dict')")
    config = dict(payload["config"])
    model = create_model(config.pop("name"), **config)
    model.load_state_dict(payload["state_dict"])
    return model.to(map_location if isinstance(map_location, (str, torch.device)) else "cpu").eval()
