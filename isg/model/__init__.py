"""Slide-level models: the Dual Attention network (ISG-N-k, Eqs. 3-8), its plus variant and ViTs on global features.

``create_model(name, d, local_grid, n_outputs, **kw)`` builds one by name,
``list_models()`` names them, ``save_model`` / ``load_model`` store a model with
the arguments that rebuild it, :class:`SlideModel` is a trained fold model.
Every model of :mod:`isg.model` is called as
``model(features [B, N, d], local [B, N, S, S, d] or None, coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``
and declares ``uses_local`` and ``batch_inputs``.

The names below load on first use, so ``isg.model.names`` (and the CLI's help)
does not import torch.
"""

import importlib

from isg.model.names import DEFAULT_MODEL

_EXPORTS = {
    "checkpoint": ["SlideModel", "Standardizer", "explain_batch", "forward_batch", "load_fold_models", "load_model",
                   "model_inputs", "save_fold_model", "save_model"],
    "dual_attention": ["DualAttentionNet", "FusionBlock", "FusionBlockPlus", "GlobalUpdater", "GlobalUpdaterPlus",
                       "GlobalViT", "LocalUpdater", "LocalUpdaterPlus"],
    "layers": ["CycleFC", "CycleMLPBlock", "FactorAttention", "MBConv", "MPViTBlock"],
    "local_vit": ["LocalBlocksViT", "MeanPoolProbe"],
    "registry": ["create_model", "list_models", "model_class", "parse_model_name", "register_model"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = ["DEFAULT_MODEL", *_MODULE_OF]


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'isg.model' has no attribute {name!r}")
    return getattr(importlib.import_module(f"isg.model.{_MODULE_OF[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)
