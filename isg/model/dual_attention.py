"""Dual Attention network (ISG paper, Sec. 3.3, Fig. 3) and the global-only ViT baseline.

Per patch i the network sees a global feature f_i in R^d (whole p x p patch)
and a local cube R_i in R^{S x S x d} (the S x S = (p/q)^2 sub-patches). The
cube runs through N MBConv blocks; after every k-th block an attention-fusion
block exchanges information between f_i and R_i (ISG-N-k):

* local updater (Eq. 3-5), f -> R:  Q = W_q f [M, C, 1], K = R W_k, V = R W_v [M, C, L],
  A = sigmoid(Q (.) K), R' = R + (A (.) V) W_r            (fused: ``gated_hadamard``)
* global updater (Eq. 6-8), R -> f: Z = softmax_space(reshape(W_z f)) [M, C, L], P = R W_p,
  f' = f + sum_space(Z (.) P) W_f                         (fused: ``softmax_spatial_sum``)

W_z maps f to C * L logits (one per channel and position, reshaped to
[C, L]), as in the paper; the spatial weights thus depend on f alone and the
cube enters through P. Each cube is then average-pooled and added to its
patch's global feature, ``token_i = f_i + W_t LN(mean_space R_i)``, and a small
ViT with a CLS token and 2-D sin-cos position encoding of the patch
coordinates reads the tokens of a slide (padded patches masked out).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from isg.model.layers import DropPath, LayerNorm2d, MBConv
from isg.model.vit import SlideTransformer
from isg.ops.attention import gated_hadamard, softmax_spatial_sum


class LocalUpdater(nn.Module):
    """Eq. 3-5: the global feature gates the local cube. f [M, D], R [M, C, S, S] -> R' [M, C, S, S]."""

    def __init__(self, channels: int, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm_f = nn.LayerNorm(dim)
        self.norm_r = LayerNorm2d(channels)
        self.to_q = nn.Linear(dim, channels)  # W_q
        self.to_k = nn.Conv2d(channels, channels, 1)  # W_k
        self.to_v = nn.Conv2d(channels, channels, 1)  # W_v
        self.proj = nn.Conv2d(channels, channels, 1)  # W_r
        self.drop_path = DropPath(drop_path)

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        M, C, S, _ = R.shape
        r = self.norm_r(R)
        q = self.to_q(self.norm_f(f))  # Q: [M, C] (broadcast over L as [M, C, 1])
        k = self.to_k(r).flatten(2)  # K: [M, C, L]
        v = self.to_v(r).flatten(2)  # V: [M, C, L]
        gated = gated_hadamard(q, k, v)  # A (.) V = sigmoid(Q (.) K) (.) V: [M, C, L]
        return R + self.drop_path(self.proj(gated.view(M, C, S, S)))  # R': [M, C, S, S]


class GlobalUpdater(nn.Module):
    """Eq. 6-8: the local cube updates the global feature. f [M, D], R [M, C, S, S] -> f' [M, D]."""

    def __init__(self, channels: int, dim: int, grid: int, drop_path: float = 0.0):
        super().__init__()
        self.channels, self.length = channels, grid * grid
        self.norm_f = nn.LayerNorm(dim)
        self.norm_r = LayerNorm2d(channels)
        self.to_z = nn.Linear(dim, channels * self.length)  # W_z
        self.to_p = nn.Conv2d(channels, channels, 1)  # W_p
        self.proj = nn.Linear(channels, dim)  # W_f
        self.drop_path = DropPath(drop_path)

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        M = f.shape[0]
        if R.shape[2] * R.shape[3] != self.length:
            raise ValueError(f"GlobalUpdater built for {self.length} positions, got a cube of {tuple(R.shape[2:])}")
        z = self.to_z(self.norm_f(f)).view(M, self.channels, self.length)  # logits of Z: [M, C, L]
        p = self.to_p(self.norm_r(R)).flatten(2)  # P: [M, C, L]
        pooled = softmax_spatial_sum(z, p)  # sum_space(softmax_space(Z) (.) P): [M, C]
        return f + self.drop_path(self.proj(pooled))  # f': [M, D]


class FusionBlock(nn.Module):
    """Attention fusion: local updater (f -> R), then global updater (R' -> f)."""

    def __init__(self, channels: int, dim: int, grid: int, drop_path: float = 0.0):
        super().__init__()
        self.local_updater = LocalUpdater(channels, dim, drop_path)
        self.global_updater = GlobalUpdater(channels, dim, grid, drop_path)

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = self.local_updater(f, R)
        f = self.global_updater(f, R)
        return f, R


def _check_inputs(features, local, coords, mask, d, local_d=None, grid=None):
    if features.dim() != 3 or features.shape[-1] != d:
        raise ValueError(f"features: expected [B, N, {d}], got {tuple(features.shape)}")
    B, N = features.shape[:2]
    if coords is None or tuple(coords.shape) != (B, N, 2):
        raise ValueError(f"coords: expected [B, N, 2] = [{B}, {N}, 2], got {None if coords is None else tuple(coords.shape)}")
    if mask is None:
        mask = torch.ones(B, N, dtype=torch.bool, device=features.device)
    elif tuple(mask.shape) != (B, N):
        raise ValueError(f"mask: expected [B, N] = [{B}, {N}], got {tuple(mask.shape)}")
    if local_d is not None:
        if local is None:
            raise ValueError("local: the Dual Attention network needs local feature cubes [B, N, S, S, d] (got None)")
        if tuple(local.shape) != (B, N, grid, grid, local_d):
            raise ValueError(f"local: expected [B, N, S, S, d] = [{B}, {N}, {grid}, {grid}, {local_d}], got {tuple(local.shape)}")
    return mask.bool()


class DualAttentionNet(nn.Module):
    """ISG-N-k: ``model(features [B, N, d], local [B, N, S, S, d], coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.

    Only valid patches (``mask`` True) run through the per-patch cube network,
    in chunks of ``chunk_size`` patches (``grad_checkpoint=True`` recomputes
    each chunk in backward to bound activation memory).
    """

    def __init__(self, d: int, local_grid: int, n_outputs: int, n_blocks: int = 10, fuse_every: int = 2, *,
                 local_d: int | None = None, channels: int = 64, exp_ratio: float = 4.0, se_ratio: float = 0.25,
                 embed_dim: int = 192, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, drop: float = 0.0,
                 drop_path: float = 0.0, pos_scale: float = 100.0, chunk_size: int = 1024, grad_checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1 or not 1 <= fuse_every <= n_blocks:
            raise ValueError(f"ISG-N-k needs N >= 1 and 1 <= k <= N, got N={n_blocks}, k={fuse_every}")
        if local_grid is None or local_grid < 1:
            raise ValueError(f"local_grid (S = p / q) must be a positive int for the Dual Attention network, got {local_grid}")
        self.d, self.local_d, self.grid = d, local_d or d, local_grid
        self.chunk_size, self.grad_checkpoint = chunk_size, grad_checkpoint
        self.stem_global = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))  # f: d -> D
        self.stem_local = nn.Sequential(nn.LayerNorm(self.local_d), nn.Linear(self.local_d, channels))  # R: d -> C
        n_fusions = n_blocks // fuse_every
        rates = torch.linspace(0, drop_path, n_blocks + n_fusions).tolist()
        blocks: list[nn.Module] = []
        for i in range(n_blocks):
            blocks.append(MBConv(channels, exp_ratio, se_ratio, rates[len(blocks)]))
            if (i + 1) % fuse_every == 0:
                blocks.append(FusionBlock(channels, embed_dim, local_grid, rates[len(blocks)]))
        self.blocks = nn.ModuleList(blocks)
        self.token_norm = nn.LayerNorm(channels)
        self.token_proj = nn.Linear(channels, embed_dim)  # W_t
        self.transformer = SlideTransformer(embed_dim, n_outputs, depth, num_heads, mlp_ratio, drop, drop_path, pos_scale)

    @property
    def n_mbconv(self) -> int:
        return sum(isinstance(b, MBConv) for b in self.blocks)

    @property
    def n_fusion(self) -> int:
        return sum(isinstance(b, FusionBlock) for b in self.blocks)

    def init_bias(self, mean: torch.Tensor) -> None:
        """Start the head's bias at ``mean`` [n_outputs] (e.g. the training mean target)."""
        with torch.no_grad():
            self.transformer.head.bias.copy_(mean)

    def encode_patches(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Valid patches only: f [M, d], R [M, S, S, d] -> tokens [M, D]."""
        f = self.stem_global(f)  # [M, D]
        R = self.stem_local(R).permute(0, 3, 1, 2).contiguous()  # [M, C, S, S]
        for block in self.blocks:
            if isinstance(block, FusionBlock):
                f, R = block(f, R)
            else:
                R = block(R)
        return f + self.token_proj(self.token_norm(R.mean((2, 3))))  # [M, D]

    def forward(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check_inputs(features, local, coords, mask, self.d, self.local_d, self.grid)
        B, N = mask.shape
        dtype = self.stem_global[1].weight.dtype
        valid = mask.flatten().nonzero().squeeze(1)  # [M] indices into B * N
        f = features.flatten(0, 1).index_select(0, valid).to(dtype)  # [M, d]
        R = local.flatten(0, 1).index_select(0, valid).to(dtype)  # [M, S, S, d]
        chunks = []
        for start in range(0, len(valid), self.chunk_size):
            f_c, R_c = f[start:start + self.chunk_size], R[start:start + self.chunk_size]
            if self.grad_checkpoint and torch.is_grad_enabled():
                chunks.append(checkpoint(self.encode_patches, f_c, R_c, use_reentrant=False))
            else:
                chunks.append(self.encode_patches(f_c, R_c))
        D = self.token_proj.out_features
        if chunks:
            tokens_valid = torch.cat(chunks)  # [M, D]
        else:
            tokens_valid = f.new_zeros(0, D)
        tokens = tokens_valid.new_zeros(B * N, D).index_copy(0, valid, tokens_valid).view(B, N, D)
        return self.transformer(tokens, coords, mask)  # [B, n_outputs]


class GlobalViT(nn.Module):
    """"vit-s": the slide transformer on global features only.

    ``model(features [B, N, d], local (ignored, may be None), coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.
    """

    def __init__(self, d: int, n_outputs: int, *, embed_dim: int = 192, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0, pos_scale: float = 100.0):
        super().__init__()
        self.d = d
        self.stem = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))
        self.transformer = SlideTransformer(embed_dim, n_outputs, depth, num_heads, mlp_ratio, drop, drop_path, pos_scale)

    def init_bias(self, mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.transformer.head.bias.copy_(mean)

    def forward(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = _check_inputs(features, None, coords, mask, self.d)
        tokens = self.stem(features.to(self.stem[1].weight.dtype))  # [B, N, D]
        return self.transformer(tokens, coords, mask)
