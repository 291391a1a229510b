"""The ``nvimgcodec`` backend: tiles of JPEG TIFF / Aperio SVS decoded by NVIDIA nvImageCodec straight into
the batch on the GPU (nvJPEG), with no host round trip; ``auto`` picks it where a CUDA device is visible.

The slide is a :class:`~isg.io.backends.tiff_slide.TiffSlide` (levels, mpp, regions and host batches as
tifffile reads them); only batches for a CUDA device go through :class:`NvImgCodecTileReader`.
nvImageCodec parses the TIFF itself (``CodeStream(path)``, one sub-stream per tile region), which gives
Aperio's RGB-coded JPEG tiles their colours (decoding such a tile's stream alone reads RGB as YCbCr).
Every tile's compressed segments are checked first, as on the CPU path (:class:`isg.io.damage.TiffSegments`,
in ``num_workers`` threads); damaged tiles are not decoded and are reported. A tile the decoder returns no
pixels for (its segments passed the check: a decoder limitation) is read by the CPU path instead, with a
warning. ``auto`` picks this backend only where a decoder can be made on the GPU. ``host_decode=True`` makes
host batches go through nvImageCodec's CPU backend too (libjpeg-turbo; the equality tests use it).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools

import numpy as np

from isg.io.backends.tiff_slide import TiffSlide
from isg.io.damage import DAMAGED_LIMIT, DamagedTileError, log
from isg.io.registry import register_backend
from isg.io.slide import TileReader
from isg.utils import quiet_native_output


def _nvimgcodec_importable() -> bool:
    from nvidia import nvimgcodec  # noqa: F401

    return True


def _cuda_visible() -> bool:
    import torch

    return torch.cuda.is_available() and _gpu_decoder_ready()


@functools.lru_cache(maxsize=1)
def _gpu_decoder_ready() -> bool:
    """Whether nvImageCodec can make a decoder on the current GPU (nvJPEG and its other libraries load); once."""
    try:
        from nvidia import nvimgcodec

        with quiet_native_output():
            nvimgcodec.Decoder(max_num_cpu_threads=1)
        return True
    except Exception:  # noqa: BLE001 - a missing library: auto keeps the CPU path
        return False


@register_backend("nvimgcodec", suffixes=(".tif", ".tiff", ".svs", ".ome.tif", ".ome.tiff"), probe=_nvimgcodec_importable,
                  accepts=lambda path, kind: kind == "tiff" and path.suffix.lower() != ".ndpi", auto_rank=10,
                  prefer=_cuda_visible)
class NvImgCodecSlide(TiffSlide):
    """A TIFF slide whose JPEG tiles are decoded on the device by nvImageCodec."""

    backend = "nvimgcodec"

    def __init__(self, path, mpp=None, max_damaged: float = DAMAGED_LIMIT, host_decode: bool = False):
        super().__init__(path, mpp=mpp, max_damaged=max_damaged)
        self.host_decode = host_decode

    def tile_reader(self, level, size, device="cpu", num_workers=0):
        import torch

        device = torch.device(device)
        if self.page(level).compression == 7 and (device.type == "cuda" or self.host_decode):
            return NvImgCodecTileReader(self, level, size, device, num_workers)
        return super().tile_reader(level, size, device, num_workers)


class NvImgCodecTileReader(TileReader):
    """Batches decoded by nvImageCodec into the batch tensor on ``device`` (CUDA: nvJPEG; CPU: its
    libjpeg-turbo backend). Any tile size and position: each tile is a region sub-stream of the level; the
    part past the border is white."""

    def __init__(self, slide: NvImgCodecSlide, level: int, size: int, device, num_workers: int):
        from nvidia import nvimgcodec

        super().__init__(slide, level, size)
        self.device = device
        self._codec = nvimgcodec
        threads = max(1, num_workers)
        with quiet_native_output():  # libtiff warns about tag order on some files
            self._level = nvimgcodec.CodeStream(str(slide.path)).get_sub_code_stream(bitstream_offset=slide.page(level).offset)
            if device.type == "cuda":
                index = device.index if device.index is not None else __import__("torch").cuda.current_device()
                self._decoder = nvimgcodec.Decoder(device_id=index, max_num_cpu_threads=threads)
            else:
                self._decoder = nvimgcodec.Decoder(device_id=nvimgcodec.NVIMGCODEC_DEVICE_CPU_ONLY, max_num_cpu_threads=threads,
                                                   backends=[nvimgcodec.Backend(nvimgcodec.BackendKind.CPU_ONLY)])
        self._checks = cf.ThreadPoolExecutor(threads, thread_name_prefix="isg-check")
        self._warned = False

    def _damage(self, box) -> tuple[int, str] | None:
        x0, y0, x1, y1 = box
        if x0 >= x1 or y0 >= y1 or self.slide.segments is None:
            return None
        return self.slide.segments.region_damage(self.level, x0, y0, x1 - x0, y1 - y0)

    def read(self, coords, out):
        import torch

        slide, level, size, codec = self.slide, self.level, self.size, self._codec
        lw, lh = slide.level_dimensions[level]
        starts = [slide.to_level(xy, level) for xy in coords.tolist()]  # level (x, y) per tile
        boxes = [(max(x, 0), max(y, 0), min(x + size, lw), min(y + size, lh)) for x, y in starts]  # in-bounds part
        found = list(self._checks.map(self._damage, boxes))  # the CPU path's segment check, every segment once
        reasons: list[str | None] = [None] * len(coords)
        white, streams, images, rows = [], [], [], []
        host = out.numpy() if out.device.type == "cpu" else None
        stream = torch.cuda.current_stream(out.device).cuda_stream if out.device.type == "cuda" else 0
        for i, ((x, y), (x0, y0, x1, y1), damage) in enumerate(zip(starts, boxes, found)):
            if damage is not None:
                reasons[i] = DamagedTileError(slide.path, level, *damage).problem
            if damage is not None or x0 >= x1 or y0 >= y1 or (x0, y0, x1, y1) != (x, y, x + size, y + size):
                white.append(i)  # damaged, outside the slide, or crossing its border: white first
            if damage is not None or x0 >= x1 or y0 >= y1:
                continue
            target = (host if host is not None else out)[i, y0 - y:y1 - y, x0 - x:x1 - x]  # rows padded to size
            streams.append(self._level.get_sub_code_stream(region=codec.Region(y0, x0, y1, x1)))
            images.append(codec.as_image(target, cuda_stream=stream))
            rows.append(i)
        if white:
            out[torch.tensor(white, device=out.device)] = 255
        if streams:
            with quiet_native_output():
                decoded = self._decoder.decode(streams, images=images, cuda_stream=stream)
            failed = [i for i, image in zip(rows, decoded) if image is None]
            if failed:  # the segments passed the check: a decoder limitation, not damage; the CPU path reads them
                self._cpu_fallback(coords, failed, out, reasons)
        return reasons

    def _cpu_fallback(self, coords, failed: list[int], out, reasons: list) -> None:
        import torch

        if not self._warned:
            log.warning("%s: nvImageCodec returned no pixels for %d tile(s) of level %d; they are decoded on the CPU",
                        self.slide.path, len(failed), self.level)
            self._warned = True
        tiles = np.empty((len(failed), self.size, self.size, 3), np.uint8)
        for i, reason in zip(failed, self.slide.read_tiles(coords[failed], self.level, self.size, tiles)):
            reasons[i] = reason
        out[torch.tensor(failed, device=out.device)] = torch.from_numpy(tiles).to(out.device)

    def close(self):
        self._checks.shutdown(wait=True)
