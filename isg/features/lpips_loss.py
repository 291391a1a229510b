"""LPIPS(AlexNet) perceptual distance from the ``lpips`` package, built without any download.

* The calibrated linear layers ship inside the ``lpips`` package (``weights/v0.1/alex.pth``)
  and are loaded by ``lpips.LPIPS(pretrained=True)`` from that local file.
* The AlexNet backbone is created random (``pnet_rand=True``, so torchvision never fetches
  it) and then filled from a torchvision AlexNet state dict: ``weights`` if given, else the
  torch hub cache ``torch.hub.get_dir()/checkpoints/alexnet-owt-7be5be79.pth`` (where
  torchvision keeps the file it downloads). With neither, a warning says the backbone stays
  RANDOM: the loss still runs (tests) but is not the perceptual metric.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
MIN_SIZE = 64  # AlexNet's pooling needs >= 32 px; smaller inputs are up-sampled to this


def cached_alexnet_weights() -> Path | None:
    """The torchvision AlexNet weights in the torch hub cache, or None."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE
    return path if path.is_file() else None


class LPIPSLoss(nn.Module):
    """Frozen LPIPS(AlexNet): ``loss(x, y) -> [B]`` for images [B, 3, H, W] in [-1, 1].

    Inputs smaller than 64 px are bilinearly up-sampled first. ``pretrained_backbone``
    tells whether ImageNet AlexNet weights were loaded.
    """

    def __init__(self, weights: str | os.PathLike | None = None):
        super().__init__()
        try:
            import lpips
        except ImportError as exc:  # pragma: no cover - lpips is a declared dependency
            raise ImportError("LPIPS needs the 'lpips' package (pip install lpips --no-deps)") from exc
        with warnings.catch_warnings():  # torchvision's 'pretrained' deprecation inside lpips
            warnings.simplefilter("ignore", UserWarning)
            self.net = lpips.LPIPS(pretrained=True, net="alex", pnet_rand=True, verbose=False)
        path = Path(weights) if weights is not None else cached_alexnet_weights()
        self.pretrained_backbone = path is not None
        if path is None:
            warnings.warn(
                f"LPIPS: no ImageNet AlexNet weights ({ALEXNET_FILE}) in {Path(torch.hub.get_dir()) / 'checkpoints'}: "
                "its AlexNet is RANDOM, so the LPIPS term is not a perceptual distance and features will be weaker. "
                "Copy torchvision's AlexNet weights there, pass --lpips-weights FILE, or use --lpips-weight 0.",
                stacklevel=3,
            )
        else:
            self._load_backbone(path)
        self.net.eval().requires_grad_(False)

    def _load_backbone(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"LPIPS AlexNet weights {path}: no such file")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
        # lpips keeps torchvision's features[i] as slice<k>.<i>: map 'sliceK.i.weight' <- 'features.i.weight'
        target = self.net.net.state_dict()
        try:
            mapped = {key: state["features." + key.split(".", 1)[1]] for key in target}
            self.net.net.load_state_dict(mapped)
        except (KeyError, RuntimeError) as exc:
            raise ValueError(f"LPIPS AlexNet weights {path}: not a torchvision alexnet state dict ({exc})") from exc

    def train(self, mode: bool = True) -> LPIPSLoss:  # always frozen / eval (dropout off)
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # [B, 3, H, W] x2 -> [B]
        if min(x.shape[-2:]) < MIN_SIZE:
            size = (max(MIN_SIZE, x.shape[-2]), max(MIN_SIZE, x.shape[-1]))
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return self.net(x.float(), y.float()).reshape(x.shape[0])


def load_lpips(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> LPIPSLoss:
    """LPIPS(AlexNet) on ``device``; see the module docstring for where weights come from."""
    return LPIPSLoss(weights).to(device)
