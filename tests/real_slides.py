"""Real slide files for the tests (tests/data/README.md) and damaged copies of them.

``aperio_ihc_svs`` writes an Aperio-layout SVS (JPEG tiles, ``MPP =`` description, a strip thumbnail)
from scikit-image's real IHC micrograph; ``damage`` breaks one tile of a copy the way interrupted or
corrupted downloads do: random bytes inside the tile data, the file truncated inside the tile, or
the tile's bytes zeroed.
"""

from __future__ import annotations

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
