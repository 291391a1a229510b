"""Baselines the ISG paper compares with: HE2RNA (:mod:`isg.baselines.he2rna`)."""

from isg.baselines.he2rna import (
    HE2RNA,
    cached_weights,
    he2rna_features,
    load_resnet50,
    otsu_tissue_mask,
    supertiles,
    tissue_tile_coords,
    topk_mean,
)

__all__ = ["HE2RNA", "cached_weights", "he2rna_features", "load_resnet50", "otsu_tissue_mask", "supertiles", "tissue_tile_coords", "topk_mean"]
