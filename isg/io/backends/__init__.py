"""The built-in slide backends, one module each; importing this package registers them
(:func:`isg.io.registry.register_backend`). ``auto`` order: nvimgcodec (where a CUDA device is visible),
openslide (vendor formats other than plain TIFF), tifffile (TIFF, SVS, OME-TIFF), image (PNG, JPEG, ...)."""

from isg.io.backends import tiff_slide  # noqa: F401 - first: the order of backend_names()
from isg.io.backends import openslide_slide, cucim_slide, image_slide, nvimgcodec_slide  # noqa: F401, I001
from isg.io.backends.cucim_slide import CuCIMSlide
from isg.io.backends.image_slide import ImageSlide
from isg.io.backends.nvimgcodec_slide import NvImgCodecSlide
from isg.io.backends.openslide_slide import OpenSlideSlide
from isg.io.backends.tiff_slide import TiffSlide

__all__ = ["CuCIMSlide", "ImageSlide", "NvImgCodecSlide", "OpenSlideSlide", "TiffSlide"]
