"""HE2RNA baseline (Schmauch et al., Nat. Commun. 2020), the reference method of the ISG paper (Tab. 1-2).

Pipeline, as in HE2RNA's public code:

1. 224 px tiles at 0.5 um/px on tissue found by Otsu thresholding of a
   thumbnail (:func:`otsu_tissue_mask`, :func:`tissue_tile_coords`; reading the
   tiles is :mod:`isg.io`'s job);
2. an ImageNet ResNet50 turns each tile into a 2048-d vector
   (:func:`load_resnet50`, :func:`he2rna_features`);
3. optionally, tiles are grouped into "super-tiles" by k-means on their
   coordinates and features averaged per cluster (:func:`supertiles`);
4. a per-tile MLP made of 1x1 convolutions scores every tile for every gene and
   the slide prediction is the mean of the top-k tile scores, k drawn at random
   from ``ks`` at each training step and averaged over all ``ks`` at inference
   (:class:`HE2RNA`). The last layer's bias starts at the mean training
   expression. Padded tiles (``mask`` False) never enter the top-k.
"""

from __future__ import annotations

import glob
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from isg.io import BATCH_SIZE

TILE_PX = 224
TILE_MPP = 0.5
DEFAULT_KS = (1, 2, 5, 10, 20, 50, 100)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_ARCHS = ("resnet18", "resnet34", "resnet50")


# ----------------------------------------------------------------------------- tissue and tiles


def otsu_tissue_mask(thumbnail: np.ndarray) -> np.ndarray:
    """Tissue mask [H, W] bool of an RGB thumbnail [H, W, 3]: pixels at or below the Otsu threshold of its grey
    levels (:func:`isg.select.otsu_grey_threshold`, the same threshold as the ``otsu`` selector)."""
    from isg.select import grey_tiles, otsu_grey_threshold

    thumbnail = np.asarray(thumbnail)
    if thumbnail.ndim != 3 or thumbnail.shape[-1] not in (3, 4) or thumbnail.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 RGB [H, W, 3], got {thumbnail.dtype} {thumbnail.shape}")
    return grey_tiles(thumbnail[None])[0] <= otsu_grey_threshold(thumbnail)


def tissue_tile_coords(
    mask: np.ndarray, mask_mpp: float, tile_px: int = TILE_PX, tile_mpp: float = TILE_MPP, min_tissue: float = 0.5
) -> np.ndarray:
    """Top-left (x, y) [N, 2] int64, in pixels at ``tile_mpp``, of the grid tiles whose tissue fraction is >= ``min_tissue``.

    ``mask`` is a tissue mask at ``mask_mpp`` um/px (e.g. from :func:`otsu_tissue_mask` on a thumbnail).
    """
    mask = np.asarray(mask, dtype=bool)
    step = tile_px * tile_mpp / mask_mpp  # tile side in mask pixels (may be fractional)
    n_rows, n_cols = int(mask.shape[0] // step), int(mask.shape[1] // step)
    if n_rows == 0 or n_cols == 0:
        return np.zeros((0, 2), dtype=np.int64)
    from isg.io import box_fraction

    ys = np.round(np.arange(n_rows + 1) * step).astype(np.int64)
    xs = np.round(np.arange(n_cols + 1) * step).astype(np.int64)
    rows, cols = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")  # row-major tiles
    rows, cols = rows.ravel(), cols.ravel()
    boxes = np.stack([xs[cols], ys[rows], xs[cols + 1], ys[rows + 1]], axis=1)  # [n_rows * n_cols, 4] in mask px
    tissue = box_fraction(mask, boxes) >= min_tissue
    return np.stack([cols[tissue], rows[tissue]], axis=1).astype(np.int64) * tile_px


# ----------------------------------------------------------------------------- ResNet features


def cached_weights(arch: str = "resnet50") -> str | None:
    """Path of torchvision's ImageNet ``arch`` weights in the local torch hub cache, or None."""
    found = sorted(glob.glob(os.path.join(torch.hub.get_dir(), "checkpoints", f"{arch}-*.pth")))
    return found[-1] if found else None


def load_resnet50(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu", arch: str = "resnet50") -> nn.Module:
    """ImageNet ResNet (torchvision) without its classifier, in eval mode; ``model.num_features`` is 2048 for resnet50.

    Weights come from ``weights`` (a state-dict file) or else the local torch hub
    cache (``torch.hub.get_dir()/checkpoints/<arch>-*.pth``, as torchvision saves
    them); nothing is downloaded. With neither, the weights stay random and a
    warning says so: usable for tests only. ``arch`` allows a smaller ResNet.
    """
    try:
        import torchvision
    except ImportError as exc:
        raise ImportError("the HE2RNA baseline needs torchvision: pip install 'isg[he2rna]' "
                          "(or the torchvision build that matches your torch)") from exc

    if arch not in _ARCHS:
        raise ValueError(f"arch must be one of {_ARCHS}, got {arch!r}")
    model = getattr(torchvision.models, arch)(weights=None)
    path = Path(weights) if weights is not None else cached_weights(arch)
    if path is None:
        warnings.warn(
            f"no {arch} ImageNet weights in {os.path.join(torch.hub.get_dir(), 'checkpoints')} and none given: "
            "using RANDOM weights (HE2RNA features are meaningless; for tests only)",
            stacklevel=2,
        )
    else:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{arch} weights {path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise ValueError(f"{arch} weights {path}: not a torchvision {arch} state dict ({str(exc).splitlines()[0]})") from exc
    model.num_features = model.fc.in_features
    model.fc = nn.Identity()
    return model.eval().to(device, memory_format=torch.channels_last)  # 1.3x on a CPU, as isg's own encoders


@torch.no_grad()
def he2rna_features(tiles: np.ndarray | torch.Tensor, backbone: nn.Module, batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """ResNet features [B, num_features] float32 (on CPU) of uint8 RGB tiles [B, H, W, 3] (224 px in HE2RNA)."""
    tiles = torch.as_tensor(tiles)
    if tiles.dtype != torch.uint8 or tiles.ndim != 4 or tiles.shape[-1] != 3:
        raise ValueError(f"tiles must be uint8 [B, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    device = next(backbone.parameters()).device
    mean = torch.tensor(_IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGENET_STD, device=device).view(1, 3, 1, 1)
    out = []
    for chunk in tiles.split(batch_size):
        x = chunk.to(device).permute(0, 3, 1, 2).float().div_(255)  # [b, 3, H, W], channels-last memory
        out.append(backbone((x - mean) / std).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "num_features", 2048))


# ----------------------------------------------------------------------------- super-tiles


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, iters: int = 50) -> np.ndarray:
    """Cluster labels [N] of ``points`` [N, 2]: k-means++ seeding, then Lloyd iterations."""
    centers = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d2 = ((points[:, None] - np.array(centers)[None]) ** 2).sum(-1).min(1)
        centers.append(points[rng.choice(len(points), p=d2 / d2.sum())] if d2.sum() > 0 else points[rng.integers(len(points))])
    centers = np.array(centers, dtype=np.float64)  # [k, 2]
    labels = np.full(len(points), -1)
    for _ in range(iters):
        new = ((points[:, None] - centers[None]) ** 2).sum(-1).argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centers[c] = points[labels == c].mean(0)
    return labels


def supertiles(coords, features, n_clusters: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group tiles into ``n_clusters`` spatial clusters (k-means on ``coords`` [N, 2]) and average within each.

    Returns ``(features [K, d], coords [K, 2] (cluster means), labels [N])`` with
    K <= n_clusters non-empty clusters, renumbered 0..K-1. Bags with at most
    ``n_clusters`` tiles are returned unchanged (one tile per cluster).
    """
    coords_np = np.asarray(torch.as_tensor(coords).cpu(), dtype=np.float64)
    features = torch.as_tensor(features).float()
    if coords_np.ndim != 2 or coords_np.shape[1] != 2 or len(coords_np) != len(features):
        raise ValueError(f"coords must be [N, 2] matching features [N, d]; got {coords_np.shape} and {tuple(features.shape)}")
    if len(coords_np) <= n_clusters:
        return features, torch.as_tensor(coords_np, dtype=torch.float32), torch.arange(len(coords_np))
    raw = _kmeans(coords_np, n_clusters, np.random.default_rng(seed))
    labels = torch.as_tensor(np.unique(raw, return_inverse=True)[1].ravel())  # drop empty clusters
    k = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=k).float()[:, None]  # [K, 1]
    pooled = torch.zeros(k, features.shape[1]).index_add_(0, labels, features) / counts
    centers = torch.zeros(k, 2, dtype=torch.float64).index_add_(0, labels, torch.as_tensor(coords_np)) / counts.double()
    return pooled, centers.float(), labels


# ----------------------------------------------------------------------------- model


def topk_mean(scores: torch.Tensor, mask: torch.Tensor | None, k: int) -> torch.Tensor:
    """Mean of the k largest tile scores per gene: [B, G, N] -> [B, G]; padded tiles (mask False) are ignored.

    A bag with fewer than k real tiles averages all of them.
    """
    k = min(int(k), scores.shape[-1])
    if mask is None:
        return scores.topk(k, dim=-1).values.mean(-1)
    top = scores.masked_fill(~mask[:, None, :], float("-inf")).topk(k, dim=-1).values  # [B, G, k]
    count = mask.sum(-1).clamp(max=k)  # [B] real tiles among the top k
    real = torch.arange(k, device=scores.device)[None, :] < count[:, None]  # [B, k]
    return top.masked_fill(~real[:, None, :], 0.0).sum(-1) / count.clamp(min=1)[:, None].to(scores.dtype)


class HE2RNA(nn.Module):
    """Per-tile MLP (1x1 convolutions) + top-k mean pooling over tiles.

    Args:
        in_dim: tile feature size (2048 for ResNet50).
        n_genes: number of predicted genes.
        hidden: hidden layer widths (HE2RNA: one layer of 256).
        ks: top-k values; training draws one per step, inference averages over all.
        dropout: after each hidden layer.
        bias_init: [n_genes] initial bias of the last layer, i.e. the mean training expression.
    """

    def __init__(
        self,
        in_dim: int = 2048,
        n_genes: int = 1,
        hidden: Sequence[int] = (256,),
        ks: Sequence[int] = DEFAULT_KS,
        dropout: float = 0.25,
        bias_init: torch.Tensor | np.ndarray | None = None,
    ):
        super().__init__()
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {ks}")
        widths = (in_dim, *hidden)
        layers = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv1d(a, b, kernel_size=1), nn.ReLU(inplace=True), nn.Dropout(dropout)]
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Conv1d(widths[-1], n_genes, kernel_size=1)
        self.ks = tuple(int(k) for k in ks)
        if bias_init is not None:
            self.init_bias(bias_init)

    @torch.no_grad()
    def init_bias(self, mean_expression: torch.Tensor | np.ndarray) -> None:
        """Start the last layer's bias at the mean training expression [n_genes]."""
        mean_expression = torch.tensor(np.asarray(mean_expression), dtype=self.head.bias.dtype).flatten()
        if mean_expression.numel() != self.head.bias.numel():
            raise ValueError(f"bias_init has {mean_expression.numel()} values for {self.head.bias.numel()} genes")
        self.head.bias.copy_(mean_expression)

    def tile_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Per-tile gene scores: [B, N, in_dim] -> [B, G, N]."""
        return self.head(self.mlp(x.transpose(1, 2)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """Slide predictions [B, G] from tile features ``x`` [B, N, in_dim] and ``mask`` [B, N] (True = real tile)."""
        scores = self.tile_scores(x)  # [B, G, N]
        if k is None and self.training:
            k = self.ks[int(torch.randint(len(self.ks), ()))]
        if k is not None:
            return topk_mean(scores, mask, k)
        return torch.stack([topk_mean(scores, mask, k) for k in self.ks]).mean(0)
