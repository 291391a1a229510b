"""Slide-level models: the Dual Attention network (ISG-N-k) and a ViT on global features (vit-s).

``create_model(name, d, local_grid, n_outputs, **kw)`` builds one by name,
``list_models()`` names them, ``save_model`` / ``load_model`` store a model
with the arguments that rebuild it. Every model is called as
``model(features [B, N, d], local [B, N, S, S, d] or None, coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.
"""

from isg.model.dual_attention import DualAttentionNet, FusionBlock, GlobalUpdater, GlobalViT, LocalUpdater
from isg.model.factory import create_model, list_models, load_model, parse_model_name, save_model
from isg.model.layers import MBConv

__all__ = [
    "create_model", "list_models", "save_model", "load_model", "parse_model_name",
    "DualAttentionNet", "GlobalViT", "FusionBlock", "LocalUpdater", "GlobalUpdater", "MBConv",
]
