"""The ``image`` backend: PNG / JPEG / BMP / ... decoded whole by Pillow, one level, for small inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from isg.io.damage import DAMAGED_LIMIT, SlideError, jpeg_error
from isg.io.metadata import plausible_mpp
from isg.io.registry import register_backend
from isg.io.slide import Slide

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
MAX_IMAGE_PIXELS = 30000 * 30000  # the whole file is decoded in memory


@register_backend("image", suffixes=IMAGE_SUFFIXES, probe=lambda: True, accepts=lambda path, kind: kind == "image",
                  auto_rank=40)
class ImageSlide(Slide):
    """One level decoded by Pillow; needs no mpp (read by pixel level; the outputs record an unknown mpp)."""

    backend = "image"
    require_mpp = False
    decodes_at_open = True

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT):
        super().__init__(path, mpp)
        from PIL import Image

        try:
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise SlideError(path, f"{image.width}x{image.height} px is too large for the 'image' backend; "
                                           "convert it to a tiled pyramidal TIFF")
                dpi = image.info.get("dpi")
                if image.format == "JPEG":  # Pillow decodes damaged JPEG data into grey without failing
                    error = jpeg_error(Path(path).read_bytes())
                    if error:
                        raise SlideError(path, f"damaged image: corrupt JPEG data ({error})")
                image.load()
                self._pixels = np.ascontiguousarray(np.asarray(image.convert("RGB")))
        except SlideError:
            raise
        except Exception as exc:  # truncated files, PNG CRC errors, ...
            raise SlideError(path, f"not a readable image or damaged ({type(exc).__name__}: {exc})") from exc
        h, w = self._pixels.shape[:2]
        self.level_dimensions, self.level_downsamples = [(w, h)], [1.0]
        self._mpp_meta = plausible_mpp(25400.0 / float(dpi[0])) if dpi and dpi[0] else None
        self._finish_init()

    def _read(self, x, y, level, w, h, out):
        out[...] = self._pixels[y:y + h, x:x + w]
