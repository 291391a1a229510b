"""The paper's Tab. 1 baselines: ViT-S fed local features through a stack of cube blocks, and the Tab. 5 probe.

``vit-mb``, ``vit-cyclemlp`` and ``vit-mpvit`` (:class:`LocalBlocksViT`): each patch's local cube R_i
[S, S, d] enters through LayerNorm + Linear (d -> C, as in ISG), runs through ``n_blocks`` MBConv,
CycleMLP or MPViT blocks (:mod:`isg.model.layers`), is downsampled to one vector by average pooling over
the S x S positions and projected to the ViT width: token_i = W_t LN(mean_L R_i). The slide transformer
is the one ISG uses (:class:`isg.model.vit.SlideTransformer`). These are ISG's cube networks without the
fusion blocks and without the global feature: the paper's comparison of how local features are
processed, with the transformer held fixed.

``mlp-probe`` (:class:`MeanPoolProbe`): the mean of a slide's patch features through a two-layer MLP
(Linear -> GELU -> Linear), a linear-probe-style measure of what the features carry (paper Tab. 5).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from isg.model.dual_attention import BATCH_INPUTS, CUBE_CHUNK, _check_inputs, _scatter
from isg.model.layers import CycleMLPBlock, MBConv, MPViTBlock
from isg.model.vit import SlideTransformer

CUBE_BLOCKS = {  # name -> builder(channels, drop_path, num_heads) of a [B, C, S, S] -> [B, C, S, S] block
    "mbconv": lambda channels, drop_path, heads: MBConv(channels, drop_path=drop_path),
    "cyclemlp": lambda channels, drop_path, heads: CycleMLPBlock(channels, drop_path=drop_path),
    "mpvit": lambda channels, drop_path, heads: MPViTBlock(channels, num_heads=heads, drop_path=drop_path),
}


class LocalBlocksViT(nn.Module):
    """``model(features (ignored), local [B, N, S, S, d], coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.

    ``block``: one of :data:`CUBE_BLOCKS`; ``block_heads``: attention heads of MPViT's paths (divides
    ``channels``). Only valid patches run through the cube blocks, in chunks of ``chunk_size``.
    """

    uses_local = True
    batch_inputs = BATCH_INPUTS

    def __init__(self, d: int, local_grid: int, n_outputs: int, *, block: str = "mbconv", n_blocks: int = 10,
                 local_d: int | None = None, channels: int = 64, block_heads: int = 2, embed_dim: int = 384, depth: int = 12,
                 num_heads: int = 6, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0,
                 pos_scale: float = 100.0, chunk_size: int = CUBE_CHUNK):
        super().__init__()
        if block not in CUBE_BLOCKS:
            raise ValueError(f"unknown cube block {block!r}; expected one of {', '.join(CUBE_BLOCKS)}")
        if local_grid is None or local_grid < 1 or n_blocks < 1:
            raise ValueError(f"{block} baseline needs local_grid (S = p / q) >= 1 and n_blocks >= 1, got {local_grid}, {n_blocks}")
        self.d, self.local_d, self.grid, self.chunk_size = d, local_d or d, local_grid, chunk_size
        self.stem_local = nn.Sequential(nn.LayerNorm(self.local_d), nn.Linear(self.local_d, channels))  # R: d -> C
        rates = torch.linspace(0, drop_path, n_blocks).tolist()
        self.blocks = nn.Sequential(*(CUBE_BLOCKS[block](channels, rate, block_heads) for rate in rates))
        self.token_norm = nn.LayerNorm(channels)
        self.token_proj = nn.Linear(channels, embed_dim)  # W_t: pooled cube C -> D
        self.transformer = SlideTransformer(embed_dim, n_outputs, depth, num_heads, mlp_ratio, drop, drop_path, pos_scale)

    def init_bias(self, mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.transformer.head.bias.copy_(mean)

    def encode_patches(self, R: torch.Tensor) -> torch.Tensor:
        """Valid patches only: R [M, S, S, d] -> tokens [M, D]."""
        R = self.stem_local(R).permute(0, 3, 1, 2).contiguous()  # [M, C, S, S]
        pooled = self.blocks(R).mean((2, 3))  # downsampled to one vector per patch: [M, C]
        return self.token_proj(self.token_norm(pooled))  # [M, D]

    def _tokens(self, features, local, coords, mask):
        mask = _check_inputs(features, local, coords, mask, self.d, self.local_d, self.grid)
        B, N = mask.shape
        valid = mask.flatten().nonzero().squeeze(1)  # [M] indices into B * N
        R = local.flatten(0, 1).index_select(0, valid).to(self.token_proj.weight.dtype)  # [M, S, S, d]
        chunks = [self.encode_patches(R[i:i + self.chunk_size]) for i in range(0, len(valid), self.chunk_size)]
        tokens = torch.cat(chunks) if chunks else R.new_zeros(0, self.token_proj.out_features)  # [M, D]
        return _scatter(tokens, valid, B, N), mask  # [B, N, D]

    def forward(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, mask = self._tokens(features, local, coords, mask)
        return self.transformer(tokens, coords, mask)  # [B, n_outputs]

    @torch.no_grad()
    def explain(self, features, local, coords, mask=None) -> dict[str, torch.Tensor]:
        """``{"patch_values": [B, N, n_outputs]}``: the head on every patch token after the last transformer block."""
        tokens, mask = self._tokens(features, local, coords, mask)
        return {"patch_values": self.transformer.patch_values(tokens, coords, mask)}


class MeanPoolProbe(nn.Module):
    """``model(features [B, N, d], mask [B, N]) -> [B, n_outputs]``: MLP(mean of the valid patches' features)."""

    uses_local = False
    batch_inputs = ("features", "mask")

    def __init__(self, d: int, n_outputs: int, *, hidden: int = 256, dropout: float = 0.0):
        super().__init__()
        self.d = d
        self.norm = nn.LayerNorm(d)  # features of any scale train alike
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, n_outputs))

    def init_bias(self, mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.mlp[-1].bias.copy_(mean)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() != 3 or features.shape[-1] != self.d:
            raise ValueError(f"features: expected [B, N, {self.d}], got {tuple(features.shape)}")
        if mask is None:
            mask = torch.ones(features.shape[:2], dtype=torch.bool, device=features.device)
        weights = mask.to(features.dtype).unsqueeze(-1)  # [B, N, 1]
        pooled = (features * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # [B, d]
        return self.mlp(self.norm(pooled))  # [B, n_outputs]

    @torch.no_grad()
    def explain(self, features: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"patch_values": [B, N, n_outputs]}``: the probe applied to each patch alone (padded patches 0)."""
        values = self.mlp(self.norm(features))  # [B, N, n_outputs]
        return {"patch_values": values if mask is None else torch.where(mask.unsqueeze(-1), values, 0.0)}
