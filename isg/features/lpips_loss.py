"""LPIPS(AlexNet, v0.1) perceptual distance, defined here so that no extra package is needed.

LPIPS (Zhang et al., CVPR 2018) compares unit-normalised AlexNet activations of two images
at its five ReLU outputs, weights the squared differences per channel with calibrated
linear layers, averages them over space and sums over layers:

    d(x, y) = sum_l mean_hw( w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2 )

* The calibrated weights ``w_l`` are the 6 kB ``weights/v0.1/alex.pth`` of the ``lpips``
  package (0.1.4, BSD-2-Clause, see ``LPIPS_LICENSE.txt``), shipped inside isg as
  ``lpips_alex_v0.1.pth``. The ``lpips`` package itself is not needed: its declared
  dependencies would replace the user's torch.
* The AlexNet backbone (torchvision's ``features`` layout, so torchvision's state dict loads
  as is) is filled from ``weights`` if given, else from the torch hub cache
  ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth``, where torchvision keeps the
  file it downloads. Nothing is downloaded. Without either, a warning
  says the backbone is random: the loss still trains the autoencoders, but it is not the
  perceptual metric of the paper.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LINEAR_WEIGHTS = Path(__file__).with_name("lpips_alex_v0.1.pth")
MIN_SIZE = 64  # AlexNet's pooling needs >= 32 px; smaller inputs are up-sampled to this
TAPS = (1, 4, 7, 9, 11)  # indices of the ReLUs in AlexNet.features whose outputs LPIPS compares
# LPIPS v0.1 input scaling (inputs in [-1, 1]): (x - shift) / scale
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

def cached_alexnet_weights() -> Path | None:
    """The torchvision AlexNet weights in the torch hub cache, or None."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return path if path.is_file() else None


def alexnet_features() -> nn.Sequential:
    """AlexNet's convolutional part up to conv5 + ReLU, laid out as torchvision's ``features``."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2), nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(),
        nn.MaxPool2d(3, stride=2), nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
    )


def _warn_random_backbone() -> None:  # Python's default filter shows it once per calling line
    where = Path(torch.hub.get_dir()) / "checkpoints"
    warnings.warn(
        f"LPIPS: the ImageNet AlexNet weights ({ALEXNET_FILE}) are not in {where} and no path was given, "
        "so the perceptual loss uses a RANDOM AlexNet. Training still works, but the autoencoders will "
        "not match the paper's quality. Put torchvision's alexnet weights there or pass --lpips-weights PATH.",
        UserWarning,
        stacklevel=4,
    )


class LPIPSLoss(nn.Module):
    """Frozen LPIPS(AlexNet): ``loss(x, y) -> [B]`` for images [B, 3, H, W] in [-1, 1].

    Inputs smaller than 64 px are bilinearly up-sampled first. ``pretrained_backbone``
    tells whether ImageNet AlexNet weights were loaded.
    """

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        self.features = alexnet_features()
        linear = torch.load(LINEAR_WEIGHTS, map_location="cpu", weights_only=True)
        for i in range(len(TAPS)):  # 1x1 conv without bias [1, C, 1, 1] -> channel weights [C]
            self.register_buffer(f"lin{i}", linear[f"lin{i}.model.1.weight"].reshape(-1).float())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        path = Path(weights) if weights is not None else cached_alexnet_weights()
        self.pretrained_backbone = path is not None
        if path is None:
            _warn_random_backbone()
        else:
            self._load_backbone(path)
        self.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS AlexNet weights {path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        features = {key.removeprefix("features."): value for key, value in state.items() if key.startswith("features.")}
        try:
            self.features.load_state_dict(features)
        except RuntimeError as exc:
            raise ValueError(f"LPIPS AlexNet weights {path}: not a torchvision alexnet state dict ({exc})") from exc

    def train(self, mode: bool = True) -> LPIPSLoss:  # always frozen / eval
        return super().train(False)

    def activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised (over channels) AlexNet activations at the five taps: [B, C_l, H_l, W_l]."""
        h = (x - self.shift) / self.scale
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAPS:
                out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] x2 -> [B]
        if min(x.shape[-2:]) < MIN_SIZE:
            size = (max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1]))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        feats_x, feats_y = self.activations(x.float()), self.activations(y.float())
        distance = x.new_zeros(x.shape[0], dtype=torch.float32)
        for i, (fx, fy) in enumerate(zip(feats_x, feats_y)):
            weight = getattr(self, f"lin{i}")  # [C_l]
            distance = distance + torch.einsum("bchw,c->bhw", (fx - fy).pow(2), weight).mean((1, 2))
        return distance


def load_lpips(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LPIPSLoss:
    """LPIPS(AlexNet) on ``device``; see the module docstring for where weights come from."""
    return LPIPSLoss(weights).to(device)
