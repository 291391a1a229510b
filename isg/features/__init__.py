"""Patch feature extractors: StyleGAN2-based autoencoders (ISG paper, Sec. 3.2).

``Autoencoder(resolution, d, ...)`` holds encoder E and decoder D; ``.encode(x)``
maps float images [B, 3, r, r] in [-1, 1] to features [B, d]. A global and a local
instance are trained with :func:`isg.train.autoencoder.train_autoencoder` and applied
to slides by :mod:`isg.pipeline.extract`.
"""

from isg.features.autoencoder import (
    Autoencoder,
    Decoder,
    Discriminator,
    Encoder,
    load_autoencoder,
    modulated_conv2d,
    save_autoencoder,
    tiles_to_input,
)
from isg.features.extractors import ExtractorError, ExtractorRef
from isg.features.lpips_loss import LPIPSLoss, load_lpips

__all__ = [
    "Autoencoder", "Decoder", "Discriminator", "Encoder", "ExtractorError", "ExtractorRef",
    "LPIPSLoss", "load_autoencoder", "load_lpips", "modulated_conv2d", "save_autoencoder", "tiles_to_input",
]
