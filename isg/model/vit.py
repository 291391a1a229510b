"""Slide-level transformer over patch tokens: 2-D sin-cos position encoding, masked ViT blocks, CLS head."""

from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

from isg.model.layers import DropPath, Mlp


def normalize_coords(coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Patch coordinates [B, N, 2] -> [B, N, 2] in [0, 1] per slide, aspect ratio kept.

    Each slide's valid patches are shifted to start at 0 and divided by the
    larger side of their bounding box; padded entries become 0.
    """
    coords = coords.float()
    valid = mask.unsqueeze(-1)  # [B, N, 1]
    big = torch.finfo(coords.dtype).max
    lo = torch.where(valid, coords, big).amin(1, keepdim=True)  # [B, 1, 2]
    hi = torch.where(valid, coords, -big).amax(1, keepdim=True)  # [B, 1, 2]
    lo = torch.where(lo > hi, 0.0, lo)  # slides without any valid patch
    extent = (hi - lo).amax(-1, keepdim=True).clamp_min(1.0)  # [B, 1, 1]
    return torch.where(valid, (coords - lo) / extent, 0.0)


def sincos_pos_embed_2d(coords01: torch.Tensor, dim: int, scale: float = 100.0, temperature: float = 10000.0) -> torch.Tensor:
    """2-D sin-cos encoding (MAE style) of coordinates in [0, 1]: [B, N, 2] -> [B, N, dim].

    ``scale`` turns the unit square into "positions" (100 = 1 % of the slide's
    extent per unit); a quarter of the channels each for sin x, cos x, sin y, cos y.
    """
    if dim % 4:
        raise ValueError(f"positional encoding needs embed_dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=coords01.device, dtype=torch.float32) / quarter)  # [D/4]
    x = coords01[..., 0:1].float() * scale * omega  # [B, N, D/4]
    y = coords01[..., 1:2].float() * scale * omega  # [B, N, D/4]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=-1)  # [B, N, D]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, H, T, D/H]
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # [B, 1, 1, T] True = attend
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, T, D)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_drop=drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), key_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SlideTransformer(nn.Module):
    """Tokens [B, N, D] + coords [B, N, 2] + mask [B, N] -> [B, n_outputs] through a CLS token."""

    def __init__(self, embed_dim: int, n_outputs: int, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0, pos_scale: float = 100.0):
        super().__init__()
        self.pos_scale = pos_scale
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        rates = [drop_path * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, drop, rate) for rate in rates)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, n_outputs)

    def states(self, tokens: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Normalised outputs of the last block: [B, 1 + N, D] (CLS first)."""
        B, N, D = tokens.shape
        pos = sincos_pos_embed_2d(normalize_coords(coords, mask), D, self.pos_scale).to(tokens.dtype)  # [B, N, D]
        x = torch.where(mask.unsqueeze(-1), tokens + pos, 0.0)  # [B, N, D], padded tokens zeroed
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)  # [B, 1 + N, D]
        key_mask = torch.cat([mask.new_ones(B, 1), mask], dim=1)  # [B, 1 + N]
        for block in self.blocks:
            x = block(x, key_mask)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.states(tokens, coords, mask)[:, 0])  # [B, n_outputs]

    def patch_values(self, tokens: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The head applied to every patch token of the last block: [B, N, n_outputs] (padded patches 0)."""
        values = self.head(self.states(tokens, coords, mask)[:, 1:])  # [B, N, n_outputs]
        return torch.where(mask.unsqueeze(-1), values, 0.0)
