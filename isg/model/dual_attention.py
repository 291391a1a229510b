"""Dual Attention network (ISG paper, Sec. 3.3, Fig. 3, Eqs. 3-8) and the global-only ViT baseline.

Per patch i the network sees a global feature f_i (whole p x p patch) and a
local cube R_i (the S x S = (p/q)^2 sub-patches, L = S^2 positions). The cube
runs through N MBConv blocks; after every k-th block an attention-fusion block
exchanges information between f and R (ISG-N-k). Both updaters of a fusion
block read R^{t-1} and f^{t-1}:

* local updater (Eqs. 3-5), f -> R:
  Q = Reshape(W_q f) [M, 1, L] (one logit per position, shared over channels), K = R W_k, V = R W_v [M, C, L],
  A = sigmoid(Q (.) K), R^t = (A (.) V) W_r                          (fused: ``gated_hadamard``)
* global updater (Eqs. 6-8), R -> f:
  Z = Softmax_L(Reshape(W_z f)) [M, 1, L], P = R W_p [M, C, L],
  f^t = Sum_L(Z (.) P) W_f                                            (fused: ``softmax_spatial_sum``)

The average-pooled cubes are the tokens of a ViT over the slide's patches
(``isg-N-k``, :class:`FusionBlock`). f after the last fusion block is read by
nothing, so that block has no global updater (it would be dead weights).

``isg-N-k-plus`` (:class:`FusionBlockPlus`) is this project's variant: Q is
one logit per channel (shared over positions), Z one weight per channel and
position, both updaters are pre-norm residual blocks applied in sequence (the
global updater reads the updated cube), and the ViT tokens are
f + W_t LN(mean R). docs/model.md says why.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from isg.model.layers import DropPath, LayerNorm2d, MBConv
from isg.model.vit import SlideTransformer
from isg.ops.attention import gated_hadamard, softmax_spatial_sum

BATCH_INPUTS = ("features", "local_features", "coords", "mask")  # what forward(...) takes from a collated batch
# patches per chunk of the per-patch cube network: its activations (~4 MB per layer at C = 64, S = 4) stay in
# cache and in glibc's heap; at 1024 (16 MB) each op's output was mapped and page-faulted anew: 0.3-0.7 M
# faults and ~20 % more time per fold model on a 2,087-patch bag (chunks change no output)
CUBE_CHUNK = 256


def _check_grid(R: torch.Tensor, length: int, who: str) -> None:
    if R.shape[2] * R.shape[3] != length:
        raise ValueError(f"{who} built for {length} positions, got a cube of {tuple(R.shape[2:])}")


# ----------------------------------------------------------------------------- the paper's fusion block (isg-N-k)


class LocalUpdater(nn.Module):
    """Eqs. 3-5: f [M, D], R [M, C, S, S] -> R^t = (sigmoid(Q (.) K) (.) V) W_r [M, C, S, S]."""

    def __init__(self, channels: int, dim: int, grid: int):
        super().__init__()
        self.length = grid * grid
        self.to_q = nn.Linear(dim, self.length, bias=False)  # W_q in R^{L x D}
        self.to_k = nn.Conv2d(channels, channels, 1, bias=False)  # W_k
        self.to_v = nn.Conv2d(channels, channels, 1, bias=False)  # W_v
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)  # W_r

    def qkv(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_grid(R, self.length, "LocalUpdater")
        q = self.to_q(f).unsqueeze(1)  # Q: [M, 1, L]
        return q, self.to_k(R).flatten(2), self.to_v(R).flatten(2)  # K, V: [M, C, L]

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(f, R)
        gated = gated_hadamard(q, k, v)  # A (.) V: [M, C, L]
        return self.proj(gated.view(R.shape))  # R^t: [M, C, S, S]

    def gate(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """A = sigmoid(Q (.) K): [M, C, L]."""
        q, k, _ = self.qkv(f, R)
        return torch.sigmoid(q * k)


class GlobalUpdater(nn.Module):
    """Eqs. 6-8: f [M, D], R [M, C, S, S] -> f^t = Sum_L(Softmax_L(W_z f) (.) R W_p) W_f [M, D]."""

    def __init__(self, channels: int, dim: int, grid: int):
        super().__init__()
        self.length = grid * grid
        self.to_z = nn.Linear(dim, self.length, bias=False)  # W_z in R^{L x D}
        self.to_p = nn.Conv2d(channels, channels, 1, bias=False)  # W_p
        self.proj = nn.Linear(channels, dim, bias=False)  # W_f

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        _check_grid(R, self.length, "GlobalUpdater")
        z = self.to_z(f).unsqueeze(1)  # logits of Z: [M, 1, L]
        p = self.to_p(R).flatten(2)  # P: [M, C, L]
        return self.proj(softmax_spatial_sum(z, p))  # f^t: [M, D]

    def weights(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        """Z = Softmax_L(W_z f): [M, L]."""
        return torch.softmax(self.to_z(f), dim=-1)


class FusionBlock(nn.Module):
    """Eqs. 3-8: (f^{t-1}, R^{t-1}) -> (f^t, R^t), both updaters reading the block's inputs.

    ``with_global=False`` (the last fusion block, whose f nothing reads) keeps f as it is.
    """

    def __init__(self, channels: int, dim: int, grid: int, with_global: bool = True):
        super().__init__()
        self.local_updater = LocalUpdater(channels, dim, grid)
        self.global_updater = GlobalUpdater(channels, dim, grid) if with_global else None

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R_new = self.local_updater(f, R)
        f_new = self.global_updater(f, R) if self.global_updater is not None else f
        return f_new, R_new

    def maps(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(A averaged over channels [M, L], Z [M, L] or None) at this block's inputs."""
        return self.local_updater.gate(f, R).mean(1), None if self.global_updater is None else self.global_updater.weights(f, R)


# ----------------------------------------------------------------------------- the plus variant (isg-N-k-plus)


class LocalUpdaterPlus(nn.Module):
    """Plus form of Eqs. 3-5: Q one logit per channel; R' = R + DropPath((A (.) V) W_r) with pre-norm."""

    def __init__(self, channels: int, dim: int, drop_path: float = 0.0):
        super().__init__()
        self.norm_f = nn.LayerNorm(dim)
        self.norm_r = LayerNorm2d(channels)
        self.to_q = nn.Linear(dim, channels)  # W_q
        self.to_k = nn.Conv2d(channels, channels, 1)  # W_k
        self.to_v = nn.Conv2d(channels, channels, 1)  # W_v
        self.proj = nn.Conv2d(channels, channels, 1)  # W_r
        self.drop_path = DropPath(drop_path)

    def qkv(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        r = self.norm_r(R)
        q = self.to_q(self.norm_f(f)).unsqueeze(-1)  # Q: [M, C, 1] (broadcast over L)
        return q, self.to_k(r).flatten(2), self.to_v(r).flatten(2)  # K, V: [M, C, L]

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(f, R)
        gated = gated_hadamard(q, k, v)  # A (.) V: [M, C, L]
        return R + self.drop_path(self.proj(gated.view(R.shape)))  # R': [M, C, S, S]

    def gate(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        q, k, _ = self.qkv(f, R)
        return torch.sigmoid(q * k)  # [M, C, L]


class GlobalUpdaterPlus(nn.Module):
    """Plus form of Eqs. 6-8: Z one weight per channel and position; f' = f + DropPath(Sum_L(Z (.) P) W_f) with pre-norm."""

    def __init__(self, channels: int, dim: int, grid: int, drop_path: float = 0.0):
        super().__init__()
        self.channels, self.length = channels, grid * grid
        self.norm_f = nn.LayerNorm(dim)
        self.norm_r = LayerNorm2d(channels)
        self.to_z = nn.Linear(dim, channels * self.length)  # W_z
        self.to_p = nn.Conv2d(channels, channels, 1)  # W_p
        self.proj = nn.Linear(channels, dim)  # W_f
        self.drop_path = DropPath(drop_path)

    def logits(self, f: torch.Tensor) -> torch.Tensor:
        return self.to_z(self.norm_f(f)).view(f.shape[0], self.channels, self.length)  # [M, C, L]

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        _check_grid(R, self.length, "GlobalUpdater")
        p = self.to_p(self.norm_r(R)).flatten(2)  # P: [M, C, L]
        pooled = softmax_spatial_sum(self.logits(f), p)  # Sum_L(Softmax_L(Z) (.) P): [M, C]
        return f + self.drop_path(self.proj(pooled))  # f': [M, D]

    def weights(self, f: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(f), dim=-1).mean(1)  # [M, L], averaged over channels


class FusionBlockPlus(FusionBlock):
    """Plus form: local updater, then the global updater on the updated cube."""

    def __init__(self, channels: int, dim: int, grid: int, drop_path: float = 0.0):
        nn.Module.__init__(self)
        self.local_updater = LocalUpdaterPlus(channels, dim, drop_path)
        self.global_updater = GlobalUpdaterPlus(channels, dim, grid, drop_path)

    def forward(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        R = self.local_updater(f, R)
        return self.global_updater(f, R), R

    def maps(self, f: torch.Tensor, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local_updater.gate(f, R).mean(1), self.global_updater.weights(f, R)


# ----------------------------------------------------------------------------- slide models


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


def _scatter(values: torch.Tensor, valid: torch.Tensor, B: int, N: int) -> torch.Tensor:
    """Rows of the valid patches [M, ...] -> [B, N, ...] with zeros for padded slots."""
    out = values.new_zeros(B * N, *values.shape[1:]).index_copy(0, valid, values)
    return out.view(B, N, *values.shape[1:])


class DualAttentionNet(nn.Module):
    """ISG-N-k: ``model(features [B, N, d], local [B, N, S, S, d], coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.

    ``plus=False`` is the paper (Eqs. 3-8, pooled-cube tokens), ``plus=True``
    the isg-N-k-plus variant. Only valid patches (``mask`` True) run through the
    per-patch cube network, in chunks of ``chunk_size`` patches
    (``grad_checkpoint=True`` recomputes each chunk in backward).
    """

    uses_local = True  # bags need local feature cubes
    batch_inputs = BATCH_INPUTS

    def __init__(self, d: int, local_grid: int, n_outputs: int, n_blocks: int = 10, fuse_every: int = 2, *,
                 plus: bool = False, local_d: int | None = None, channels: int = 64, exp_ratio: float = 4.0,
                 se_ratio: float = 0.25, embed_dim: int = 192, depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0,
                 drop: float = 0.0, drop_path: float = 0.0, pos_scale: float = 100.0, chunk_size: int = CUBE_CHUNK,
                 grad_checkpoint: bool = False):
        super().__init__()
        if n_blocks < 1 or not 1 <= fuse_every <= n_blocks:
            raise ValueError(f"ISG-N-k needs N >= 1 and 1 <= k <= N, got N={n_blocks}, k={fuse_every}")
        if local_grid is None or local_grid < 1:
            raise ValueError(f"local_grid (S = p / q) must be a positive int for the Dual Attention network, got {local_grid}")
        self.d, self.local_d, self.grid, self.plus = d, local_d or d, local_grid, plus
        self.chunk_size, self.grad_checkpoint = chunk_size, grad_checkpoint
        self.stem_global = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))  # f: d -> D
        self.stem_local = nn.Sequential(nn.LayerNorm(self.local_d), nn.Linear(self.local_d, channels))  # R: d -> C
        n_fusions = n_blocks // fuse_every
        rates = torch.linspace(0, drop_path, n_blocks + n_fusions).tolist()
        blocks: list[nn.Module] = []
        for i in range(n_blocks):
            blocks.append(MBConv(channels, exp_ratio, se_ratio, rates[len(blocks)]))
            if (i + 1) % fuse_every == 0:
                if plus:
                    blocks.append(FusionBlockPlus(channels, embed_dim, local_grid, rates[len(blocks)]))
                else:  # f of the last fusion block feeds nothing: no global updater there
                    blocks.append(FusionBlock(channels, embed_dim, local_grid, with_global=(i + 1) // fuse_every < n_fusions))
        self.blocks = nn.ModuleList(blocks)
        self.token_norm = nn.LayerNorm(channels)
        self.token_proj = nn.Linear(channels, embed_dim)  # W_t: pooled cube C -> D
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

    def encode_patches(self, f: torch.Tensor, R: torch.Tensor, maps: dict | None = None) -> torch.Tensor:
        """Valid patches only: f [M, d], R [M, S, S, d] -> tokens [M, D].

        ``maps`` (a dict) receives ``local_gate`` and ``global_weights``: lists of [M, L], one per fusion block.
        """
        f = self.stem_global(f)  # [M, D]
        R = self.stem_local(R).permute(0, 3, 1, 2).contiguous()  # [M, C, S, S]
        for block in self.blocks:
            if isinstance(block, FusionBlock):
                if maps is not None:
                    gate, weights = block.maps(f, R)
                    maps.setdefault("local_gate", []).append(gate)
                    if weights is not None:
                        maps.setdefault("global_weights", []).append(weights)
                f, R = block(f, R)
            else:
                R = block(R)
        pooled = self.token_proj(self.token_norm(R.mean((2, 3))))  # W_t LN(mean_L R): [M, D]
        return f + pooled if self.plus else pooled

    def _tokens(self, features, local, coords, mask, maps=None):
        mask = _check_inputs(features, local, coords, mask, self.d, self.local_d, self.grid)
        B, N = mask.shape
        dtype = self.stem_global[1].weight.dtype
        valid = mask.flatten().nonzero().squeeze(1)  # [M] indices into B * N
        features, local = features.flatten(0, 1), local.flatten(0, 1)  # [B * N, d], [B * N, S, S, d] (float16 bags)
        chunks, chunk_maps = [], []
        for start in range(0, len(valid), self.chunk_size):  # a chunk at a time in the model's dtype: a 20k+ bag's
            rows = valid[start:start + self.chunk_size]  # cubes are never all copied at once
            f_c, R_c = features.index_select(0, rows).to(dtype), local.index_select(0, rows).to(dtype)
            if maps is not None:
                chunk_maps.append({})
                chunks.append(self.encode_patches(f_c, R_c, chunk_maps[-1]))
            elif self.grad_checkpoint and torch.is_grad_enabled():
                chunks.append(checkpoint(self.encode_patches, f_c, R_c, use_reentrant=False))
            else:
                chunks.append(self.encode_patches(f_c, R_c))
        D = self.token_proj.out_features
        tokens_valid = torch.cat(chunks) if chunks else features.new_zeros(0, D, dtype=dtype)  # [M, D]
        if maps is not None:
            L = self.grid * self.grid
            for key, count in (("local_gate", self.n_fusion), ("global_weights", self._n_global)):
                per_block = [torch.cat([c[key][b] for c in chunk_maps]) if chunk_maps else features.new_zeros(0, L, dtype=dtype)
                             for b in range(count)]
                stacked = torch.stack(per_block, 1) if per_block else features.new_zeros(len(valid), 0, L, dtype=dtype)  # [M, blocks, L]
                maps[key] = _scatter(stacked, valid, B, N)  # [B, N, blocks, L]
        return _scatter(tokens_valid, valid, B, N), mask  # [B, N, D]

    @property
    def _n_global(self) -> int:
        return sum(isinstance(b, FusionBlock) and b.global_updater is not None for b in self.blocks)

    def forward(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, mask = self._tokens(features, local, coords, mask)
        return self.transformer(tokens, coords, mask)  # [B, n_outputs]

    @torch.no_grad()
    def explain(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Per-patch views of one forward pass (same arguments as ``forward``; padded patches are 0).

        ``patch_values`` [B, N, n_outputs]: the head applied to each patch token
        after the last transformer block; ``local_gate`` [B, N, n_fusion, L]: A
        averaged over channels per fusion block; ``global_weights`` [B, N, n_global, L]:
        Z per fusion block with a global updater (paper form: all but the last).
        L is row-major over the S x S grid.
        """
        maps: dict = {}
        tokens, mask = self._tokens(features, local, coords, mask, maps)
        return {"patch_values": self.transformer.patch_values(tokens, coords, mask), **maps}


class GlobalViT(nn.Module):
    """The slide transformer on global features only (``vit-s``: ViT-Small 384/12/6; ``vit-t4``: 192/4/4).

    ``model(features [B, N, d], local (ignored, may be None), coords [B, N, 2], mask [B, N]) -> [B, n_outputs]``.
    """

    uses_local = False
    batch_inputs = BATCH_INPUTS

    def __init__(self, d: int, n_outputs: int, *, embed_dim: int = 192, depth: int = 4, num_heads: int = 4,
                 mlp_ratio: float = 4.0, drop: float = 0.0, drop_path: float = 0.0, pos_scale: float = 100.0):
        super().__init__()
        self.d = d
        self.stem = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, embed_dim))
        self.transformer = SlideTransformer(embed_dim, n_outputs, depth, num_heads, mlp_ratio, drop, drop_path, pos_scale)

    def init_bias(self, mean: torch.Tensor) -> None:
        with torch.no_grad():
            self.transformer.head.bias.copy_(mean)

    def _tokens(self, features, coords, mask):
        mask = _check_inputs(features, None, coords, mask, self.d)
        return self.stem(features.to(self.stem[1].weight.dtype)), mask  # [B, N, D]

    def forward(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        tokens, mask = self._tokens(features, coords, mask)
        return self.transformer(tokens, coords, mask)

    @torch.no_grad()
    def explain(self, features: torch.Tensor, local: torch.Tensor | None, coords: torch.Tensor,
                mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """``{"patch_values": [B, N, n_outputs]}`` (no fusion blocks, so no attention maps)."""
        tokens, mask = self._tokens(features, coords, mask)
        return {"patch_values": self.transformer.patch_values(tokens, coords, mask)}
