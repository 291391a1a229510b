"""Model registry (timm style): named builders, ``create_model(name, ...)``, ``list_models()``.

Every builder takes ``(d, local_grid, n_outputs, **options)`` and returns a
module that declares what it is: ``uses_local`` (whether its bags need local
feature cubes) and ``batch_inputs`` (the keys of a collated batch its
``forward`` takes, in order). Training and inference ask those attributes,
never the model's name or class.

Registered: ``isg-N-k`` (the paper's Dual Attention network, Eqs. 3-8; any
N >= 1, 1 <= k <= N builds, the listed ones are examples) and ``isg-N-k-plus``
(this project's variant), ``vit-s`` (ViT-Small, 384-d, 12 blocks, 6 heads) and
``vit-t4`` (192-d, 4 blocks, 4 heads) on global features only; ``vit-mb``, ``vit-cyclemlp``,
``vit-mpvit`` (ViT-S fed local features through MBConv, CycleMLP or MPViT blocks: the paper's Tab. 1
baselines), ``mlp-probe`` (a two-layer MLP on mean-pooled features: Tab. 5) and ``he2rna`` (the HE2RNA
baseline).
"""

from __future__ import annotations

import fnmatch
import inspect
import re
from collections.abc import Callable

import torch
import torch.nn as nn

from isg.baselines.he2rna import HE2RNA
from isg.model.dual_attention import BATCH_INPUTS, DualAttentionNet, GlobalViT
from isg.model.local_vit import LocalBlocksViT, MeanPoolProbe
from isg.model.names import DEFAULT_MODEL

_ISG_NAME = re.compile(r"^isg-(\d+)-(\d+)(-plus)?$")
_BUILDERS: dict[str, tuple[Callable[..., nn.Module], type]] = {}


def register_model(name: str, cls: type) -> Callable:
    """Decorator: register ``fn(d, local_grid, n_outputs, **options) -> nn.Module`` under ``name``.

    ``cls`` is the class it builds; its keyword arguments are the accepted options.
    """

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = (fn, cls)
        return fn

    return decorate


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching ``pattern`` (fnmatch, e.g. ``"isg-*"``); any other ``isg-N-k[-plus]`` builds too."""
    return sorted(name for name in _BUILDERS if fnmatch.fnmatch(name, pattern))


def parse_model_name(name: str) -> tuple[int, int] | None:
    """``"isg-10-2" -> (10, 2)`` (N MBConv blocks, fusion every k; also for ``-plus``); None for other names."""
    match = _ISG_NAME.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _options(cls: type) -> list[str]:
    skip = {"self", "d", "in_dim", "local_grid", "n_outputs", "n_genes", "fuse_every", "plus", "block"}
    if cls is DualAttentionNet:  # N is in the name isg-N-k
        skip.add("n_blocks")
    return [p.name for p in inspect.signature(cls).parameters.values() if p.name not in skip]


def _lookup(name: str) -> tuple[Callable[..., nn.Module], type]:
    if name in _BUILDERS:
        return _BUILDERS[name]
    match = _ISG_NAME.match(name)
    if match:  # any isg-N-k[-plus], not only the listed ones
        n, k, plus = int(match.group(1)), int(match.group(2)), bool(match.group(3))
        return _isg_builder(n, k, plus), DualAttentionNet
    raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())} (and any isg-N-k[-plus])")


def model_class(name: str) -> type:
    """The class ``name`` builds: ask it what the model declares (``uses_local``, ``batch_inputs``) before building."""
    return _lookup(name)[1]


def create_model(name: str = DEFAULT_MODEL, d: int = 512, local_grid: int | None = None, n_outputs: int = 1, **kw) -> nn.Module:
    """Build a registered slide-level model.

    ``d``: feature size; ``local_grid``: S = p / q (cube side; needed by ISG
    models); ``n_outputs``: genes or classes; ``kw``: options of the built class
    (``embed_dim``, ``depth``, ``num_heads``, ``channels``, ``drop_path``, ...)
    over the name's defaults. The arguments are kept in ``model.config``
    (what :func:`isg.model.save_model` stores to rebuild it).
    """
    builder, cls = _lookup(name)
    accepted = _options(cls)
    unknown = sorted(set(kw) - set(accepted))
    if unknown:
        raise ValueError(f"create_model({name!r}): unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}")
    model = builder(d, local_grid, n_outputs, **kw)
    model.config = {"name": name, "d": d, "local_grid": local_grid, "n_outputs": n_outputs, **kw}
    return model


# ----------------------------------------------------------------------------- builders


def _isg_builder(n_blocks: int, fuse_every: int, plus: bool) -> Callable[..., nn.Module]:
    def build(d, local_grid, n_outputs, **kw):
        return DualAttentionNet(d, local_grid, n_outputs, n_blocks, fuse_every, plus=plus, **kw)

    return build


for _n, _k in ((10, 2), (4, 2), (6, 3)):
    for _plus in (False, True):
        register_model(f"isg-{_n}-{_k}{'-plus' if _plus else ''}", DualAttentionNet)(_isg_builder(_n, _k, _plus))


@register_model("vit-s", GlobalViT)
def vit_s(d, local_grid, n_outputs, **kw):
    """ViT-Small (Dosovitskiy et al.; DeiT-S): 384-d, 12 blocks, 6 heads, on global features only."""
    return GlobalViT(d, n_outputs, **{"embed_dim": 384, "depth": 12, "num_heads": 6, **kw})


@register_model("vit-t4", GlobalViT)
def vit_t4(d, local_grid, n_outputs, **kw):
    """A compact ViT on global features only: ViT-Tiny width (192-d), 4 blocks, 4 heads (the old ``vit-s``)."""
    return GlobalViT(d, n_outputs, **{"embed_dim": 192, "depth": 4, "num_heads": 4, **kw})


def _local_blocks_builder(block: str) -> Callable[..., nn.Module]:
    def build(d, local_grid, n_outputs, **kw):
        return LocalBlocksViT(d, local_grid, n_outputs, block=block, **kw)

    build.__doc__ = f"ViT-S (384-d, 12 blocks, 6 heads) fed local cubes through 10 {block} blocks, pooled per patch (paper Tab. 1)."
    return build


for _name, _block in (("vit-mb", "mbconv"), ("vit-cyclemlp", "cyclemlp"), ("vit-mpvit", "mpvit")):
    register_model(_name, LocalBlocksViT)(_local_blocks_builder(_block))


@register_model("mlp-probe", MeanPoolProbe)
def mlp_probe(d, local_grid, n_outputs, **kw):
    """Two-layer MLP on the mean of a slide's patch features (paper Tab. 5: what the features carry)."""
    return MeanPoolProbe(d, n_outputs, **kw)


class HE2RNASlide(HE2RNA):
    """HE2RNA (Schmauch et al. 2020) with the declarations of a registry model: ``model(features, mask)``."""

    uses_local = False
    batch_inputs = ("features", "mask")

    @torch.no_grad()
    def explain(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"patch_values": [B, N, n_genes]}``: every tile's scores, of which the prediction is a top-k mean."""
        values = self.tile_scores(features).transpose(1, 2)  # [B, N, G]
        return {"patch_values": values if mask is None else torch.where(mask.unsqueeze(-1), values, 0.0)}


@register_model("he2rna", HE2RNASlide)
def he2rna(d, local_grid, n_outputs, **kw):
    """HE2RNA: per-tile MLP + top-k mean over tiles (options ``hidden``, ``ks``, ``dropout``)."""
    return HE2RNASlide(d, n_outputs, **kw)


__all__ = ["DEFAULT_MODEL", "BATCH_INPUTS", "HE2RNASlide", "create_model", "model_class", "list_models", "parse_model_name", "register_model"]
