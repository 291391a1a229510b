"""StyleGAN2-based autoencoder (ISG paper, Sec. 3.2): encoder E, decoder D, discriminator C.

* ``Encoder`` E: residual down-sampling network (the StyleGAN2 "resnet" discriminator
  architecture) ending in a fully connected layer that outputs the d-dim style code.
* ``Decoder`` D: StyleGAN2 synthesis network driven by the code through a small mapping
  MLP: learned 4x4 constant, modulated/demodulated 3x3 convolutions with per-pixel noise,
  2x up-sampling per block and toRGB skip connections summed over resolutions.
* ``Discriminator`` C: the same residual network with minibatch standard deviation and a
  single real/fake logit.

All layers use the equalized learning rate of StyleGAN2 (weights ~ N(0, 1) scaled at
run time by 1/sqrt(fan_in)). Channels per resolution are ``min(channel_base // res,
channel_max)``; tiny values give CPU-test-sized models. Written in the spirit of
stylegan2-ada-pytorch (``training/networks.py``), simplified: bilinear up-sampling and
average-pool down-sampling replace the FIR filters.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from isg.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from isg.utils import file_sha256

__all__ = [
    "Autoencoder", "Encoder", "Decoder", "Discriminator", "modulated_conv2d",
    "tiles_to_input", "save_autoencoder", "load_autoencoder", "extractor_size", "LARGE_CHANNEL_BASE",
]

LARGE_CHANNEL_BASE = 8192  # the large extractor (channel_base 8192, channel_max 256, r 128 / 64): the paper's resolution


def extractor_size(config: dict) -> str:
    """What a table names an autoencoder by: ``"paper resolution"`` (the large extractor, channel_base >= 8192)
    or ``"compact"``, with its input resolution r, code size d and channel cap, e.g. ``"compact (r 32, d 32, <= 32 ch)"``."""
    size = "paper resolution" if int(config["channel_base"]) >= LARGE_CHANNEL_BASE else "compact"
    return f"{size} (r {config['resolution']}, d {config['d']}, <= {config['channel_max']} ch)"

_GAIN = math.sqrt(2.0)  # keeps unit variance through lrelu(0.2)


def _in_place(x: torch.Tensor) -> bool:
    """Whether ``x`` (a layer's fresh output) may be overwritten: nothing records it for a backward pass."""
    return not (torch.is_grad_enabled() and x.requires_grad)


def lrelu(x: torch.Tensor) -> torch.Tensor:
    """lrelu(0.2) * sqrt(2) of a layer's fresh output; in place when no graph is recorded (encoding: one
    memory pass fewer per layer, the elementwise ops were a quarter of the encoder's time)."""
    if _in_place(x):
        return F.leaky_relu_(x, 0.2).mul_(_GAIN)
    return F.leaky_relu(x, 0.2) * _GAIN


def _check_resolution(resolution: int) -> int:
    resolution = int(resolution)
    if resolution < 8 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 8, got {resolution}")
    return resolution


# ----------------------------------------------------------------------------- layers


class FullyConnected(nn.Module):
    """Linear layer with equalized learning rate; optional lrelu."""

    def __init__(self, in_features: int, out_features: int, bias_init: float = 0.0, activation: bool = False, lr_multiplier: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_multiplier)
        self.bias = nn.Parameter(torch.full((out_features,), float(bias_init)))
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.lr_multiplier, self.activation = lr_multiplier, activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, in] -> [B, out]
        x = F.linear(x, self.weight * self.weight_gain, self.bias * self.lr_multiplier)
        return lrelu(x) if self.activation else x


class Conv2dLayer(nn.Module):
    """Conv with equalized learning rate; ``down=True`` average-pools 2x first (low-pass, then the conv runs at half resolution)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True, activation: bool = True, down: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding, self.activation, self.down = kernel_size // 2, activation, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, I, H, W] -> [B, O, H', W']
        if self.down:
            x = F.avg_pool2d(x, 2)
        x = F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)
        return lrelu(x) if self.activation else x


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, demodulate: bool = True, padding: int = 0) -> torch.Tensor:
    """StyleGAN2 modulated convolution as one grouped conv.

    x [B, I, H, W], weight [O, I, k, k], styles [B, I] -> [B, O, H', W']. Each sample's
    weights are scaled per input channel by its styles; with ``demodulate`` every output
    filter is then renormalised to unit L2 norm, so unit-variance i.i.d. input gives
    unit-variance output whatever the styles.
    """
    batch, in_channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    w = weight.unsqueeze(0) * styles.reshape(batch, 1, in_channels, 1, 1)  # [B, O, I, k, k]
    if demodulate:
        w = w * torch.rsqrt(w.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
    x = x.reshape(1, batch * in_channels, height, width)
    out = F.conv2d(x, w.reshape(batch * out_channels, in_channels, kh, kw).to(x.dtype), padding=padding, groups=batch)
    return out.reshape(batch, out_channels, *out.shape[2:])


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally after 2x up-sampling) + per-pixel noise + bias + lrelu."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.up, self.resolution = up, resolution
        self.noise_shard = (0, 1)  # (rank, ranks): under data parallelism, the rows of the global batch's noise

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
        x = modulated_conv2d(x, self.weight, self.affine(w), demodulate=True, padding=1)  # [B, O, r, r]
        if noise_mode == "random":
            rank, ranks = self.noise_shard  # draw the whole global batch's noise, keep this rank's rows (shard_noise)
            noise = torch.randn(x.shape[0] * ranks, 1, self.resolution, self.resolution, device=x.device, dtype=x.dtype)
            x = x + noise[rank::ranks] * self.noise_strength
        elif noise_mode == "const":
            x = x + (self.noise_const * self.noise_strength).to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be 'random', 'const' or 'none', got {noise_mode!r}")
        return lrelu(x + self.bias.reshape(1, -1, 1, 1).to(x.dtype))


def shard_noise(module: nn.Module, rank: int, ranks: int) -> None:
    """Make the decoder's random noise that of a global batch split by stride over ``ranks`` processes: each
    layer draws the noise of all ``batch * ranks`` images (so every rank's random stream advances as one process's
    would) and keeps rows ``rank, rank + ranks, ...``, the rows of this rank's images."""
    for layer in module.modules():
        if isinstance(layer, SynthesisLayer):
            layer.noise_shard = (rank, ranks)


class ToRGB(nn.Module):
    """Modulated 1x1 conv to RGB without demodulation."""

    def __init__(self, in_channels: int, w_dim: int):
        super().__init__()
        self.affine = FullyConnected(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(3, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(3))
        self.weight_gain = 1.0 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # [B, I, r, r] -> [B, 3, r, r]
        x = modulated_conv2d(x, self.weight, self.affine(w) * self.weight_gain, demodulate=False)
        return x + self.bias.reshape(1, -1, 1, 1).to(x.dtype)


class SynthesisBlock(nn.Module):
    """One resolution of the decoder: (const | up-conv) -> conv -> toRGB added to the up-sampled image."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int):
        super().__init__()
        self.resolution = resolution
        if resolution == 4:
            self.const = nn.Parameter(torch.randn(out_channels, 4, 4))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution)
        self.torgb = ToRGB(out_channels, w_dim)

    def forward(self, x, img, w, noise_mode: str = "random"):
        if self.resolution == 4:
            x = self.const.unsqueeze(0).expand(w.shape[0], -1, -1, -1)  # [B, C, 4, 4]
        else:
            x = self.conv0(x, w, noise_mode)
        x = self.conv1(x, w, noise_mode)
        y = self.torgb(x, w)
        img = y if img is None else F.interpolate(img, scale_factor=2, mode="bilinear", align_corners=False) + y
        return x, img


def _channels(resolution: int, channel_base: int, channel_max: int) -> int:
    return max(1, min(channel_base // resolution, channel_max))


class Decoder(nn.Module):
    """StyleGAN2 synthesis network D: style code [B, d] -> image [B, 3, r, r] (about [-1, 1])."""

    def __init__(self, resolution: int, d: int, channel_base: int, channel_max: int, mapping_layers: int = 2):
        super().__init__()
        self.resolution, self.d = _check_resolution(resolution), d
        self.mapping = nn.Sequential(*[FullyConnected(d, d, activation=True) for _ in range(mapping_layers)])
        resolutions = [2**i for i in range(2, int(math.log2(resolution)) + 1)]
        self.blocks = nn.ModuleList()
        for res in resolutions:
            in_ch = _channels(res // 2, channel_base, channel_max) if res > 4 else 0
            self.blocks.append(SynthesisBlock(in_ch, _channels(res, channel_base, channel_max), d, res))

    def forward(self, code: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        w = self.mapping(code)  # [B, d]
        x = img = None
        for block in self.blocks:
            x, img = block(x, img, w, noise_mode)
        return img


class MinibatchStd(nn.Module):
    """Appends the std of features over groups of the batch as extra channels (StyleGAN2)."""

    def __init__(self, group_size: int = 4, num_channels: int = 1):
        super().__init__()
        self.group_size, self.num_channels = group_size, num_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = math.gcd(n, self.group_size)  # largest group size <= group_size dividing the batch
        f = self.num_channels
        y = x.reshape(g, -1, f, c // f, h, w)  # [G, n/G, F, c/F, h, w]
        y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt()  # [n/G, F, c/F, h, w]
        y = y.mean(dim=(2, 3, 4)).reshape(-1, f, 1, 1).repeat(g, 1, h, w)  # [n, F, h, w]
        return torch.cat([x, y], dim=1)


class ResidualBlock(nn.Module):
    """conv3x3 -> conv3x3 + 2x down, plus a 1x1 down-sampled skip, scaled by sqrt(1/2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv0 = Conv2dLayer(in_channels, in_channels, 3)
        self.conv1 = Conv2dLayer(in_channels, out_channels, 3, down=True)
        self.skip = Conv2dLayer(in_channels, out_channels, 1, bias=False, activation=False, down=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, I, r, r] -> [B, O, r/2, r/2]
        skip, main = self.skip(x), self.conv1(self.conv0(x))
        if _in_place(skip) and _in_place(main):
            return skip.add_(main).mul_(math.sqrt(0.5))
        return (skip + main) * math.sqrt(0.5)


class ResidualNet(nn.Module):
    """fromRGB -> residual blocks down to 4x4 -> (minibatch std) -> conv -> fc -> fc(out_dim)."""

    def __init__(self, resolution: int, out_dim: int, channel_base: int, channel_max: int, mbstd_group: int = 0):
        super().__init__()
        self.resolution = _check_resolution(resolution)
        ch = lambda res: _channels(res, channel_base, channel_max)  # noqa: E731
        self.from_rgb = Conv2dLayer(3, ch(resolution), 1)
        resolutions = [2**i for i in range(int(math.log2(resolution)), 2, -1)]
        self.blocks = nn.Sequential(*[ResidualBlock(ch(res), ch(res // 2)) for res in resolutions])
        self.mbstd = MinibatchStd(mbstd_group) if mbstd_group else None
        c4 = ch(4)
        self.conv = Conv2dLayer(c4 + (1 if mbstd_group else 0), c4, 3)
        self.fc = FullyConnected(c4 * 16, c4, activation=True)
        self.out = FullyConnected(c4, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, r, r] -> [B, out_dim]
        if x.shape[1:] != (3, self.resolution, self.resolution):
            raise ValueError(f"expected images [B, 3, {self.resolution}, {self.resolution}], got {tuple(x.shape)}")
        x = self.blocks(self.from_rgb(x))  # [B, c4, 4, 4]
        if self.mbstd is not None:
            x = self.mbstd(x)
        x = self.conv(x)
        return self.out(self.fc(x.flatten(1)))


class Encoder(ResidualNet):
    """Encoder E: image [B, 3, r, r] in [-1, 1] -> style code [B, d]."""

    def __init__(self, resolution: int, d: int, channel_base: int, channel_max: int):
        super().__init__(resolution, d, channel_base, channel_max, mbstd_group=0)


class Discriminator(ResidualNet):
    """Residual discriminator C: image [B, 3, r, r] -> real/fake logit [B]."""

    def __init__(self, resolution: int, channel_base: int, channel_max: int, mbstd_group: int = 4):
        super().__init__(resolution, 1, channel_base, channel_max, mbstd_group=mbstd_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).squeeze(1)


# ----------------------------------------------------------------------------- autoencoder


class Autoencoder(nn.Module):
    """E + D of the ISG feature extractor; ``encode`` gives the patch features.

    Args:
        resolution: input/output size r (power of two, >= 8).
        d: style code (feature) dimension.
        channel_base, channel_max: channels at resolution ``res`` are ``min(channel_base // res, channel_max)``.
        mapping_layers: MLP layers from the code to the decoder's w.

    The defaults (the compact extractor) have one definition:
    :class:`isg.train.config.AutoencoderTrainConfig` (``.model_kwargs()``).
    """

    def __init__(self, resolution: int, d: int, channel_base: int, channel_max: int, mapping_layers: int = 2):
        super().__init__()
        self.resolution, self.d = _check_resolution(resolution), int(d)
        self.config = dict(resolution=self.resolution, d=self.d, channel_base=int(channel_base), channel_max=int(channel_max), mapping_layers=int(mapping_layers))
        self.encoder = Encoder(self.resolution, self.d, channel_base, channel_max)
        self.decoder = Decoder(self.resolution, self.d, channel_base, channel_max, mapping_layers)

    def make_discriminator(self, mbstd_group: int = 4) -> Discriminator:
        """A discriminator C matching this autoencoder's resolution and widths."""
        return Discriminator(self.resolution, self.config["channel_base"], self.config["channel_max"], mbstd_group)

    def encode(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, r, r] in [-1, 1] -> [B, d]
        return self.encoder(x)

    def decode(self, code: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:  # [B, d] -> [B, 3, r, r]
        return self.decoder(code, noise_mode)

    def forward(self, x: torch.Tensor, noise_mode: str = "random") -> torch.Tensor:
        return self.decode(self.encode(x), noise_mode)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config.items())


def tiles_to_input(tiles: torch.Tensor | np.ndarray, resolution: int, device: str | torch.device | None = None) -> torch.Tensor:
    """uint8 RGB tiles [B, H, W, 3] -> float32 [B, 3, r, r] in [-1, 1].

    Tiles are resized in uint8 (:func:`isg.io.resize_tiles`, antialiased bilinear: the training bank holds
    its tiles the same way) on ``device``, then scaled; resizing float copies cost ~8x more and their
    batch-sized float buffers page-faulted on every call. The result is in channels-last memory.
    """
    from isg.io import resize_tiles

    tiles = torch.as_tensor(tiles)
    if tiles.ndim != 4 or tiles.shape[-1] != 3 or tiles.dtype != torch.uint8:
        raise ValueError(f"tiles must be uint8 RGB [B, H, W, 3], got {tiles.dtype} {tuple(tiles.shape)}")
    small = resize_tiles(tiles.to(device if device is not None else tiles.device), resolution)  # [B, r, r, 3]
    x = small.permute(0, 3, 1, 2).float()  # [B, 3, r, r], channels-last memory (the encoders' fast layout)
    return x.div_(127.5).sub_(1.0)


def save_autoencoder(path: str | os.PathLike, ae: Autoencoder, extra: dict[str, Any] | None = None) -> None:
    """Write ``ae`` (config + weights, ``extra`` JSON) atomically in the isg checkpoint format (:mod:`isg.checkpoint`)."""
    save_checkpoint(path, "autoencoder", dict(ae.config), {"model": ae.state_dict()}, extra)


def load_autoencoder(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Autoencoder:
    """Rebuild an :class:`Autoencoder` from a checkpoint written by :func:`save_autoencoder`
    or by :func:`isg.train.autoencoder.train_autoencoder`; returned in eval mode, ``.extra`` attached.

    Read with ``weights_only=True``: a file that would unpickle code is refused, naming it.
    """
    checkpoint = load_checkpoint(path, "autoencoder", map_location)
    try:
        ae = Autoencoder(**checkpoint.config)
        ae.load_state_dict(checkpoint.state["model"])
    except (TypeError, KeyError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"autoencoder checkpoint {path}: cannot rebuild the autoencoder ({str(exc).splitlines()[0]})") from None
    ae.extra = checkpoint.extra
    ae.checkpoint_path = str(path)
    ae.checkpoint_sha256 = file_sha256(path)  # features record it; a model folder checks its copy against it
    return ae.to(map_location).eval()
