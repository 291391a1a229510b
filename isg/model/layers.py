"""Building blocks (timm style): LayerNorm2d, DropPath, SqueezeExcite, MBConv, Mlp, and the cube blocks of the
paper's Tab. 1 baselines: CycleFC / CycleMLPBlock (CycleMLP) and FactorAttention / MPViTBlock (MPViT).

Every cube block maps [B, C, S, S] -> [B, C, S, S] and takes ``act_layer`` / ``norm_layer`` types; norms are
per-position channel norms (``LayerNorm2d``) so that a patch's output never depends on the other patches of
the batch (the reason MBConv uses them too; docs/model.md).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of a [B, C, H, W] map (per position, as timm's LayerNorm2d).

    Per-sample normalisation keeps each patch's cube independent of the other
    patches of the batch, so chunking and padding never change the output
    (BatchNorm would mix the patches of different slides).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # [B, H, W, C]
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (first axis)."""
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask / keep


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class SqueezeExcite(nn.Module):
    """Channel attention: global average pool -> reduce -> act -> expand -> sigmoid gate."""

    def __init__(self, channels: int, rd_channels: int, act_layer=nn.SiLU):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1)
        self.act = act_layer()
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(x.mean((2, 3)))[:, :, None, None]  # [B, C, H, W]

    def gate(self, pooled: torch.Tensor) -> torch.Tensor:
        """[B, C] channel means -> [B, C] gates in (0, 1)."""
        reduced = self.act(F.linear(pooled, self.conv_reduce.weight.flatten(1), self.conv_reduce.bias))
        return torch.sigmoid(F.linear(reduced, self.conv_expand.weight.flatten(1), self.conv_expand.bias))


class MBConv(nn.Module):
    """Inverted residual block (MobileNetV2/EfficientNet, timm ``InvertedResidual``).

    1x1 expand -> norm -> act -> depthwise 3x3 -> norm -> act -> SE -> 1x1 project -> norm,
    plus the residual with stochastic depth. [B, C, S, S] -> [B, C, S, S].

    ``forward`` computes the block channels-last (the 1x1 convolutions as matmuls over the last
    axis, LayerNorm without permuted copies, the depthwise convolution on an NHWC view): on the
    model's tiny S x S grids (S = 4) this is ~1.4x faster forward + backward on CPU than
    ``forward_reference``, the plain NCHW convolutions, which stays as its oracle (same weights).
    """

    def __init__(self, channels: int, exp_ratio: float = 4.0, se_ratio: float = 0.25, drop_path: float = 0.0,
                 act_layer=nn.SiLU, norm_layer=LayerNorm2d):
        super().__init__()
        mid = int(round(channels * exp_ratio))
        self.conv_pw = nn.Conv2d(channels, mid, 1, bias=False)
        self.norm1 = norm_layer(mid)
        self.act1 = act_layer()
        self.conv_dw = nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False)
        self.norm2 = norm_layer(mid)
        self.act2 = act_layer()
        self.se = SqueezeExcite(mid, max(1, int(channels * se_ratio)), act_layer) if se_ratio > 0 else nn.Identity()
        self.conv_pwl = nn.Conv2d(mid, channels, 1, bias=False)
        self.norm3 = norm_layer(channels)
        self.drop_path = DropPath(drop_path)
        self.channels_last = all(type(n) is LayerNorm2d for n in (self.norm1, self.norm2, self.norm3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.channels_last:
            return self.forward_reference(x)
        h = F.linear(x.permute(0, 2, 3, 1), self.conv_pw.weight.flatten(1))  # [B, S, S, mid]
        h = self.act1(_layer_norm(self.norm1, h))
        h = F.conv2d(h.permute(0, 3, 1, 2), self.conv_dw.weight, padding=1, groups=h.shape[-1])  # NHWC memory
        h = self.act2(_layer_norm(self.norm2, h.permute(0, 2, 3, 1)))  # [B, S, S, mid]
        if isinstance(self.se, SqueezeExcite):
            h = h * self.se.gate(h.mean((1, 2)))[:, None, None, :]
        h = _layer_norm(self.norm3, F.linear(h, self.conv_pwl.weight.flatten(1)))  # [B, S, S, C]
        return x + self.drop_path(h.permute(0, 3, 1, 2))

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.act1(self.norm1(self.conv_pw(x)))  # [B, mid, S, S]
        x = self.act2(self.norm2(self.conv_dw(x)))  # [B, mid, S, S]
        x = self.se(x)
        x = self.norm3(self.conv_pwl(x))  # [B, C, S, S]
        return shortcut + self.drop_path(x)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``norm`` (a LayerNorm2d) applied over the last axis of a channels-last tensor."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0, act_layer=nn.GELU):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ----------------------------------------------------------------------------- CycleMLP (Chen et al., ICLR 2022)


def cycle_offsets(channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Per input channel c the (dy, dx) a Cycle FC samples from: ``(c + k // 2) % k - k // 2`` along the
    kernel's long axis (k = kh * kw; one of kh, kw is 1), 0 along the other. int64 [C, 2]."""
    kh, kw = kernel_size
    if kh != 1 and kw != 1:
        raise ValueError(f"a Cycle FC pseudo-kernel is 1 x k or k x 1, got {kernel_size}")
    c = torch.arange(channels)
    step = (c + (kh * kw) // 2) % (kh * kw) - (kh * kw) // 2
    zero = torch.zeros_like(step)
    return torch.stack([step, zero] if kw == 1 else [zero, step], dim=1)


def shift_channels(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[:, c, i, j] = x[:, c, i + dy_c, j + dx_c], 0 outside the map. x [B, C, H, W], offsets [C, 2]."""
    H, W = x.shape[-2:]
    out = torch.zeros_like(x)
    for dy, dx in offsets.unique(dim=0).tolist():
        channels = ((offsets[:, 0] == dy) & (offsets[:, 1] == dx)).nonzero().squeeze(1)
        ys, yd = slice(max(dy, 0), H + min(dy, 0)), slice(max(-dy, 0), H + min(-dy, 0))  # source, destination rows
        xs, xd = slice(max(dx, 0), W + min(dx, 0)), slice(max(-dx, 0), W + min(-dx, 0))
        out[:, channels, yd, xd] = x[:, channels, ys, xs]
    return out


class CycleFC(nn.Module):
    """Cycle fully-connected layer: a 1 x 1 channel projection whose input channel c is read at a cyclic
    offset along one axis (``cycle_offsets``), so a layer mixes channels and a 1 x k (or k x 1) neighbourhood
    at the cost of a channel FC. [B, C_in, H, W] -> [B, C_out, H, W]; equal to a deformable 1 x 1
    convolution with those fixed offsets (tested against ``torchvision.ops.deform_conv2d``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int] = (1, 3), bias: bool = True):
        super().__init__()
        self.kernel_size = tuple(kernel_size)
        self.register_buffer("offsets", cycle_offsets(in_channels, self.kernel_size), persistent=False)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # as nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shifted = shift_channels(x, self.offsets)  # [B, C_in, H, W]
        out = torch.einsum("bchw,oc->bohw", shifted, self.weight)
        return out if self.bias is None else out + self.bias[:, None, None]


class CycleMLP(nn.Module):
    """CycleMLP token mixer: a 1 x 3 Cycle FC, a 3 x 1 Cycle FC and a channel FC, mixed per channel by softmax
    weights computed from their pooled sum (split attention), then a projection. [B, C, H, W] -> same."""

    def __init__(self, channels: int, act_layer=nn.GELU):
        super().__init__()
        self.fc_channel = nn.Conv2d(channels, channels, 1, bias=False)
        self.fc_h = CycleFC(channels, channels, (1, 3))
        self.fc_w = CycleFC(channels, channels, (3, 1))
        self.reweight = nn.Sequential(nn.Linear(channels, max(1, channels // 4)), act_layer(), nn.Linear(max(1, channels // 4), 3 * channels))
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        h, w, c = self.fc_h(x), self.fc_w(x), self.fc_channel(x)  # [B, C, H, W] each
        weights = self.reweight((h + w + c).mean((2, 3))).view(B, C, 3).softmax(-1)  # [B, C, 3]
        mixed = h * weights[..., 0, None, None] + w * weights[..., 1, None, None] + c * weights[..., 2, None, None]
        return self.proj(mixed)


class CycleMLPBlock(nn.Module):
    """x + DropPath(CycleMLP(norm(x))), then x + DropPath(MLP(norm(x))) (MLP ratio ``mlp_ratio``). [B, C, S, S]."""

    def __init__(self, channels: int, mlp_ratio: float = 4.0, drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=LayerNorm2d):
        super().__init__()
        hidden = int(round(channels * mlp_ratio))
        self.norm1, self.mixer = norm_layer(channels), CycleMLP(channels, act_layer)
        self.norm2 = norm_layer(channels)
        self.mlp = nn.Sequential(nn.Conv2d(channels, hidden, 1), act_layer(), nn.Conv2d(hidden, channels, 1))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ----------------------------------------------------------------------------- MPViT (Lee et al., CVPR 2022)


class FactorAttention(nn.Module):
    """Factorised attention with a convolutional relative position term (CoaT, used by MPViT's paths):

    per head, out = (q / sqrt(d)) (softmax_N(k)^T v) + q (.) DWConv3x3(v), then a projection. Linear in the
    number of positions N = H W. [B, C, H, W] -> [B, C, H, W]; ``num_heads`` divides C.
    """

    def __init__(self, channels: int, num_heads: int = 2):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"FactorAttention: channels {channels} not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.rel_pos = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)  # conv relative position encoding
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=1)  # [B, C, H, W] each
        heads = lambda t: t.reshape(B, self.num_heads, C // self.num_heads, H * W)  # noqa: E731  [B, h, d, N]
        kv = torch.einsum("bhdn,bhen->bhde", heads(k).softmax(-1), heads(v))  # softmax over positions: [B, h, d, d]
        out = torch.einsum("bhdn,bhde->bhen", heads(q), kv) * (C // self.num_heads) ** -0.5  # [B, h, d, N]
        out = out.reshape(B, C, H, W) + q * self.rel_pos(v)
        return self.proj(out)


class MPViTBlock(nn.Module):
    """One multi-path stage of MPViT at a fixed resolution. [B, C, S, S] -> [B, C, S, S].

    Multi-scale embeddings e_1..e_P (depthwise-separable 3 x 3 convolutions applied 1..P times: receptive
    fields 3, 5, 7), one transformer encoder per path (depthwise-conv position encoding, FactorAttention,
    MLP, each pre-norm residual), a local path (1 x 1 -> depthwise 3 x 3 -> 1 x 1 residual bottleneck), and
    the aggregation of all P + 1 paths by a 1 x 1 convolution, as MPViT's stage output.
    """

    def __init__(self, channels: int, num_paths: int = 3, num_heads: int = 2, mlp_ratio: float = 2.0, drop_path: float = 0.0,
                 act_layer=nn.Hardswish, norm_layer=LayerNorm2d):
        super().__init__()
        self.embed = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
                                                 nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels), act_layer())
                                   for _ in range(num_paths))
        self.pos = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1, groups=channels) for _ in range(num_paths))
        self.norm_attn = nn.ModuleList(norm_layer(channels) for _ in range(num_paths))
        self.attn = nn.ModuleList(FactorAttention(channels, num_heads) for _ in range(num_paths))
        self.norm_mlp = nn.ModuleList(norm_layer(channels) for _ in range(num_paths))
        hidden = int(round(channels * mlp_ratio))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, hidden, 1), nn.GELU(), nn.Conv2d(hidden, channels, 1))
                                 for _ in range(num_paths))
        self.local = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels), act_layer(),
                                   nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), norm_layer(channels),
                                   act_layer(), nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels))
        self.aggregate = nn.Sequential(nn.Conv2d(channels * (num_paths + 1), channels, 1, bias=False), norm_layer(channels),
                                       act_layer())
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        paths, e = [x + self.drop_path(self.local(x))], x  # the local (convolutional) path
        for embed, pos, norm_attn, attn, norm_mlp, mlp in zip(self.embed, self.pos, self.norm_attn, self.attn, self.norm_mlp, self.mlp):
            e = embed(e)  # one more depthwise-separable 3 x 3: the next scale
            t = e + pos(e)
            t = t + self.drop_path(attn(norm_attn(t)))
            paths.append(t + self.drop_path(mlp(norm_mlp(t))))
        return self.aggregate(torch.cat(paths, dim=1))  # [B, C, S, S]
