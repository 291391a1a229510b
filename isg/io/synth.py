"""Synthetic cohort: pyramidal JPEG TIFF "slides" with H&E-like texture and known ground truth.

Every slide has three latent texture parameters in [0, 1] (``truth.json``):

* ``density``: nuclei per tissue area (40 + 160 * density nuclei per 128 x 128 um);
* ``nuclei_size``: nucleus radius (2 + 3 * nuclei_size um, log-normal spread 0.2);
* ``stain``: hematoxylin strength (nuclei and stroma shift from pink/light purple to dark purple).

Samples of one patient share the patient's parameters (+ N(0, 0.05) jitter). With ``c = 2 * z - 1``
(z = [density, nuclei_size, stain]) each gene g has raw counts

    counts[s, g] ~ Poisson(exp(bias[g] + weights[g] . c[s] + eps)),   eps ~ N(0, noise^2)

``bias ~ U(log 20, log 2000)``, ``weights ~ N(0, 1.2^2)``; genes 0, 1, 2 are markers of density,
nuclei_size and stain alone (weight 2), and ``null_fraction`` of the other genes have zero weights
(unpredictable). MSI status is per patient: MSI-H when ``3 c_density - 2 c_size + N(0, 0.3^2) > 1``
(lymphocyte-rich tissue: many small nuclei), with at least one patient of each class.

Slides also carry textureless artefacts (solid blobs, pen marks, blurred tissue, scattered
noise chunks: debris specks on glass); their level-0 boxes are listed in ``truth.json``. Output is deterministic given ``seed``.

Slides with a side above :data:`STREAM_SIDE` (benchmark sizes, up to 100000 px) are rendered in
:data:`BLOCK`-px blocks, each a small slide of its own, and streamed to the TIFF tile by tile
(:func:`write_streamed_pyramid`): memory is one strip of blocks, not the slide.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from isg.utils import atomic_path, write_text_atomic

BACKGROUND = (244, 243, 246)
INKS = ((35, 60, 150), (30, 115, 65), (25, 25, 30))  # blue, green, black pen
DEBRIS = ((70, 50, 45), (110, 80, 100), (40, 40, 45))


@dataclass
class SynthCohort:
    """Paths of a generated cohort."""

    out_dir: Path
    manifest: Path
    expression: Path
    msi: Path
    truth: Path
    slides: list[Path]


# ----------------------------------------------------------------------------- texture


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """float32 [h, w] in ~[0, 1]: uniform noise on a (cells) grid, bicubic upsampled to ``shape``."""
    coarse = rng.random((cells[0] + 3, cells[1] + 3), dtype=np.float32)
    big = cv2.resize(coarse, (shape[1] + 3 * shape[1] // cells[1], shape[0] + 3 * shape[0] // cells[0]), interpolation=cv2.INTER_CUBIC)
    oy, ox = shape[0] // cells[0], shape[1] // cells[1]
    return big[oy:oy + shape[0], ox:ox + shape[1]]


def _tissue_mask(rng, H, W, fraction: float) -> np.ndarray:
    """bool [H, W]: a few smooth tissue islands covering about ``fraction`` of the slide."""
    h, w = max(8, H // 16), max(8, W // 16)
    field = _smooth_noise(rng, (h, w), (max(2, round(4 * H / max(H, W))), max(2, round(4 * W / max(H, W)))))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    window = np.minimum(np.minimum(yy, h - 1 - yy) / h, np.minimum(xx, w - 1 - xx) / w)  # 0 at the border
    field = field * np.clip(window * 8, 0, 1)
    low = (field > np.quantile(field, 1 - fraction)).astype(np.uint8) * 255
    low = cv2.GaussianBlur(low, (0, 0), 1.5)
    return cv2.resize(low, (W, H), interpolation=cv2.INTER_LINEAR) > 127


def _lerp(a, b, t):
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


def _color_lut(stain: float) -> np.ndarray:
    """uint8 [256 (stroma level; 0 = background), 256 (nucleus alpha), 3]."""
    pink = _lerp((238, 168, 200), (212, 138, 192), stain)
    nucleus = _lerp((128, 78, 168), (58, 28, 118), stain)
    level = np.arange(256, dtype=np.float32)[:, None, None] / 255
    alpha = np.arange(256, dtype=np.float32)[None, :, None] / 255 * 0.95
    stroma = pink * (0.78 + 0.27 * level)
    lut = stroma * (1 - alpha) + nucleus * alpha - 2  # -2: centres the grain added later
    lut[0] = BACKGROUND
    return np.clip(np.round(lut), 0, 255).astype(np.uint8)


def render_slide(rng: np.random.Generator, width: int, height: int, params: dict, mpp: float = 0.5,
                 artefacts: bool = True) -> tuple[np.ndarray, list[dict], float]:
    """One level-0 image uint8 [height, width, 3] with tissue of latent ``params``.

    Returns (image, artefact list [{kind, bbox: [x0, y0, x1, y1]}], tissue fraction).
    """
    H, W = height, width
    tissue = _tissue_mask(rng, H, W, params.get("tissue_fraction", 0.45))

    # stroma: coarse eosin variations + fibre streaks, quantised to levels 1..255 (0 = background)
    fibres = 0.55 * _smooth_noise(rng, (H // 4, W // 4), (max(2, H // 512), max(2, W // 512)))
    fibres += 0.45 * _smooth_noise(rng, (H // 4, W // 4), (max(2, H // 16), max(2, W // 96)))
    if rng.random() < 0.5:  # fibre orientation
        fibres = np.ascontiguousarray(cv2.resize(fibres.T, (W // 4, H // 4)))
    level = cv2.resize(np.clip(fibres * 254 + 1, 1, 255).astype(np.uint8), (W, H), interpolation=cv2.INTER_LINEAR)
    level[~tissue] = 0

    # nuclei: filled ellipses, darkness per nucleus, only where there is tissue
    nuclei = np.zeros((H, W), np.uint8)
    per_um2 = (40 + 160 * params["density"]) / (128.0 * 128.0)
    expected = per_um2 * tissue.mean() * H * W * mpp * mpp
    count = rng.poisson(expected * 1.9)
    ys, xs = rng.integers(0, H, count), rng.integers(0, W, count)
    cluster = _smooth_noise(rng, (max(8, H // 32), max(8, W // 32)), (max(2, H // 1024 + 2), max(2, W // 1024 + 2)))
    # nuclei cluster: dense cellular areas next to loose stroma (what makes some patches more informative)
    keep = tissue[ys, xs] & (rng.random(count) < 0.15 + 1.3 * cluster[ys * cluster.shape[0] // H, xs * cluster.shape[1] // W] ** 2)
    ys, xs = ys[keep], xs[keep]
    radius_px = (2.0 + 3.0 * params["nuclei_size"]) / mpp * rng.lognormal(0, 0.2, len(xs))
    aspect = rng.uniform(0.55, 1.0, len(xs))
    angles = rng.uniform(0, 180, len(xs))
    darkness = rng.integers(150, 256, len(xs))
    for x, y, r, e, angle, dark in zip(xs.tolist(), ys.tolist(), radius_px.tolist(), aspect.tolist(), angles.tolist(), darkness.tolist()):
        cv2.ellipse(nuclei, (x, y), (max(1, round(r)), max(1, round(r * e))), angle, 0, 360, dark, -1)
    nuclei = cv2.GaussianBlur(nuclei, (3, 3), 0)

    lut = _color_lut(params["stain"]).reshape(-1, 3)
    index = (level.astype(np.uint16) << 8) | nuclei
    image = np.take(lut, index, axis=0)  # [H, W, 3]
    grain = (np.frombuffer(rng.bytes(H * W * 3), np.uint8).reshape(H, W, 3) & 3)  # sensor grain, 0..3 grey levels
    cv2.add(image, grain, dst=image, mask=tissue.view(np.uint8))

    found: list[dict] = []
    if artefacts:
        found = _add_artefacts(rng, image, tissue, mpp)
    return image, found, float(tissue.mean())


def _box(rng, H, W, bw, bh):
    x0, y0 = int(rng.integers(0, max(1, W - bw))), int(rng.integers(0, max(1, H - bh)))
    return x0, y0, min(W, x0 + bw), min(H, y0 + bh)


def _add_artefacts(rng, image: np.ndarray, tissue: np.ndarray, mpp: float) -> list[dict]:
    """Textureless artefacts drawn in place; returns their level-0 boxes."""
    H, W = image.shape[:2]
    scale = min(H, W)
    per_area = max(1, round(H * W / 4096 ** 2))
    found = []
    for _ in range(int(rng.integers(1, 2 + per_area))):  # solid blobs (debris, dust, bubbles' rims)
        ax, ay = int(scale * rng.uniform(0.02, 0.06)) + 4, int(scale * rng.uniform(0.02, 0.06)) + 4
        cx, cy = int(rng.integers(ax, max(ax + 1, W - ax))), int(rng.integers(ay, max(ay + 1, H - ay)))
        color = DEBRIS[int(rng.integers(len(DEBRIS)))]
        cv2.ellipse(image, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, color, -1)
        found.append({"kind": "blob", "bbox": [max(0, cx - ax), max(0, cy - ay), min(W, cx + ax), min(H, cy + ay)]})
    for _ in range(int(rng.integers(1, 1 + per_area))):  # pen marks
        n = int(rng.integers(3, 7))
        start = rng.uniform(0.05, 0.95, 2) * (W, H)
        steps = rng.normal(0, scale * 0.08, (n, 2)).cumsum(axis=0)
        points = np.clip(start + steps, 0, (W - 1, H - 1)).astype(np.int32)
        thickness = max(3, int(scale * rng.uniform(0.004, 0.01)))
        cv2.polylines(image, [points.reshape(-1, 1, 2)], False, INKS[int(rng.integers(len(INKS)))], thickness, cv2.LINE_AA)
        lo, hi = points.min(axis=0) - thickness, points.max(axis=0) + thickness
        found.append({"kind": "pen", "bbox": [int(max(0, lo[0])), int(max(0, lo[1])), int(min(W, hi[0])), int(min(H, hi[1]))]})
    ty, tx = np.nonzero(tissue[::16, ::16])
    for _ in range(int(rng.integers(1, 1 + per_area))):  # out-of-focus tissue
        size = int(scale * rng.uniform(0.08, 0.15)) + 8
        if len(ty):
            i = int(rng.integers(len(ty)))
            x0, y0 = max(0, tx[i] * 16 - size // 2), max(0, ty[i] * 16 - size // 2)
            x1, y1 = min(W, x0 + size), min(H, y0 + size)
        else:
            x0, y0, x1, y1 = _box(rng, H, W, size, size)
        sigma = float(rng.uniform(6, 12)) * 0.5 / mpp
        image[y0:y1, x0:x1] = cv2.GaussianBlur(np.ascontiguousarray(image[y0:y1, x0:x1]), (0, 0), sigma)
        found.append({"kind": "blur", "bbox": [int(x0), int(y0), int(x1), int(y1)]})
    for _ in range(int(rng.integers(1, 2 + per_area))):  # scattered noise chunks: specks of debris on glass
        bw, bh = int(scale * rng.uniform(0.04, 0.1)) + 8, int(scale * rng.uniform(0.04, 0.1)) + 8
        x0, y0, x1, y1 = _box(rng, H, W, bw, bh)
        region = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        region[:] = BACKGROUND
        n_specks = max(1, int(0.002 * region.shape[0] * region.shape[1]))  # ~2-3 % of the area covered
        for cx, cy, radius in zip(rng.integers(0, region.shape[1], n_specks), rng.integers(0, region.shape[0], n_specks),
                                  rng.integers(1, 3, n_specks)):
            cv2.circle(region, (int(cx), int(cy)), int(radius), DEBRIS[int(rng.integers(len(DEBRIS)))], -1)
        image[y0:y1, x0:x1] = region
        found.append({"kind": "noise", "bbox": [x0, y0, x1, y1]})
    return found


# ----------------------------------------------------------------------------- TIFF writing


def pyramid(image: np.ndarray, tile: int, downsample: int = 4) -> list[np.ndarray]:
    """Levels [image, image/d, image/d^2, ...] (INTER_AREA) while the shorter side stays >= ``tile``."""
    levels = [image]
    while min(levels[-1].shape[:2]) // downsample >= tile:
        h, w = levels[-1].shape[:2]
        levels.append(cv2.resize(levels[-1], (w // downsample, h // downsample), interpolation=cv2.INTER_AREA))
    return levels


def pyramid_shapes(height: int, width: int, tile: int, downsample: int = 4) -> list[tuple[int, int]]:
    """(height, width) of every level :func:`pyramid` makes, without the pixels."""
    shapes = [(height, width)]
    while min(shapes[-1]) // downsample >= tile:
        shapes.append((shapes[-1][0] // downsample, shapes[-1][1] // downsample))
    return shapes


def _page_options(level: int, width: int, shape0: tuple[int, int], mpp: float | None, tile: int, quality: int,
                  description: bool) -> dict:
    """tifffile.write options of one pyramid page (level 0 full resolution, reduced levels subfiletype 1)."""
    H0, W0 = shape0
    options = dict(photometric="rgb", tile=(tile, tile), compression="jpeg", compressionargs={"level": quality},
                   subfiletype=1 if level else 0, metadata=None)
    if mpp is not None:
        level_mpp = mpp * W0 / width
        options.update(resolution=(1e4 / level_mpp, 1e4 / level_mpp), resolutionunit="CENTIMETER")
        if description:
            options["description"] = (f"isg-synth {W0}x{H0} [0,0 {W0}x{H0}] ({tile}x{tile}) JPEG/RGB Q={quality}"
                                      f"|AppMag = {10 / mpp:g}|MPP = {level_mpp:g}")
    return options


def write_pyramid_tiff(path, levels: list[np.ndarray], mpp: float | None, tile: int = 256, quality: int = 80,
                       description: bool = True, maxworkers: int | None = None) -> None:
    """Write a tiled JPEG pyramid: one top-level page per level, reduced levels flagged ``subfiletype=1``.

    Level-0 mpp is stored as TIFF resolution (pixels per cm) and, with ``description``, as an
    Aperio-style ``ImageDescription`` (``isg-synth ... |AppMag = 20|MPP = 0.5``). It does not start with
    "Aperio": tifffile/tiffslide would then expect the SVS page layout (thumbnail as page 1) and see
    level 0 only. ``mpp=None`` writes no calibration.
    """
    import tifffile

    shape0 = levels[0].shape[:2]
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=sum(l.nbytes for l in levels) > 2**31) as writer:
        for i, level in enumerate(levels):
            writer.write(level, maxworkers=maxworkers, **_page_options(i, level.shape[1], shape0, mpp, tile, quality, description))


def write_streamed_pyramid(path, strips: Iterable[np.ndarray], height: int, width: int, mpp: float | None,
                           tile: int = 256, quality: int = 80, downsample: int = 4, description: bool = True,
                           maxworkers: int | None = None) -> list[tuple[int, int]]:
    """The pyramid of :func:`write_pyramid_tiff`, written tile by tile from level-0 strips in bounded memory.

    ``strips`` yields level 0 top to bottom as uint8 [rows, width, 3] strips whose rows are a multiple of
    ``tile * downsample`` (the last may be shorter). Each level's tiles go to the TIFF as they come, while
    its ``downsample``-fold box average (INTER_AREA) is appended, strip by strip, to a raw scratch file
    that is the next level's source. Memory is one strip per level, whatever the slide size. The pixels
    equal :func:`pyramid`'s when every level's sides are multiples of ``downsample`` (otherwise reduced
    levels average whole ``downsample``-blocks, dropping the last partial row/column of blocks).
    Returns the (height, width) of the levels.
    """
    import tempfile

    import tifffile

    shapes = pyramid_shapes(height, width, tile, downsample)
    step = math.lcm(tile, downsample)
    rows = max(1, 2048 // step) * step  # scratch strips of reduced levels
    bigtiff = sum(h * w * 3 for h, w in shapes) > 2**31
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory(prefix=".isg-synth-", dir=Path(tmp).parent) as scratch, \
            tifffile.TiffWriter(tmp, bigtiff=bigtiff) as writer:
        source: Iterable[np.ndarray] = strips
        for level, (h, w) in enumerate(shapes):
            below = Path(scratch) / f"level{level + 1}.raw" if level + 1 < len(shapes) else None
            with open(below, "wb") if below else contextlib.nullcontext() as sink:
                writer.write(_tiles(source, h, w, tile, sink, downsample), shape=(h, w, 3), dtype=np.uint8,
                             maxworkers=maxworkers, **_page_options(level, w, shapes[0], mpp, tile, quality, description))
            if below:
                source = _raw_strips(below, *shapes[level + 1], rows)
    return shapes


def _tiles(strips: Iterable[np.ndarray], height: int, width: int, tile: int, sink, downsample: int) -> Iterator[np.ndarray]:
    """Tiles [tile, tile, 3] of the strips in row-major order (edges zero-padded, as tifffile pads arrays);
    each strip's downsampled copy goes to ``sink`` (a binary file) when there is one."""
    done = 0
    for strip in strips:
        n = strip.shape[0]
        if strip.shape[1:] != (width, 3) or (n % tile and done + n != height):
            raise ValueError(f"strip of shape {strip.shape} at row {done}: expected [k * {tile} rows, {width}, 3]")
        if sink is not None:  # before the tiles: the writer stops pulling after the last tile
            whole = strip[: n // downsample * downsample, : width // downsample * downsample]
            sink.write(cv2.resize(whole, (width // downsample, n // downsample), interpolation=cv2.INTER_AREA).tobytes())
        done += n
        for y in range(0, n, tile):
            for x in range(0, width, tile):
                block = strip[y:y + tile, x:x + tile]
                if block.shape[:2] != (tile, tile):
                    block = np.pad(block, ((0, tile - block.shape[0]), (0, tile - block.shape[1]), (0, 0)))
                yield np.ascontiguousarray(block)
        if done >= height:
            break
    if done != height:
        raise ValueError(f"strips hold {done} rows, expected {height}")


def _raw_strips(path: Path, height: int, width: int, rows: int) -> Iterator[np.ndarray]:
    with open(path, "rb") as handle:
        for y in range(0, height, rows):
            n = min(rows, height - y)
            yield np.fromfile(handle, np.uint8, n * width * 3).reshape(n, width, 3)


# ----------------------------------------------------------------------------- large slides


def _block_edges(size: int, block: int) -> list[int]:
    """Block boundaries 0 = e0 < ... < size: multiples of ``block``; a last block under block / 4 joins its neighbour."""
    edges = list(range(0, size, block)) + [size]
    if len(edges) > 2 and size - edges[-2] < block // 4:
        del edges[-2]
    return edges


def render_blocks(key: list[int], width: int, height: int, params: dict, mpp: float, artefacts: bool, block: int,
                  found: list[dict], tissue: list[float]) -> Iterator[np.ndarray]:
    """Level 0 of a large slide as strips [block rows, width, 3], each block rendered by :func:`render_slide`
    with its own generator ``default_rng(key + [by, bx])``: memory is one strip, the slide a mosaic of
    blocks of tissue. Artefact boxes (level-0 coordinates) go to ``found``; per-block tissue area to ``tissue``."""
    xs = _block_edges(width, block)
    for by, (y0, y1) in enumerate(zip(ys := _block_edges(height, block), ys[1:])):
        strip = np.empty((y1 - y0, width, 3), np.uint8)
        for bx, (x0, x1) in enumerate(zip(xs, xs[1:])):
            rng = np.random.default_rng([*key, by, bx])
            strip[:, x0:x1], block_found, fraction = render_slide(rng, x1 - x0, y1 - y0, params, mpp=mpp, artefacts=artefacts)
            found += [{**a, "bbox": [a["bbox"][0] + x0, a["bbox"][1] + y0, a["bbox"][2] + x0, a["bbox"][3] + y0]} for a in block_found]
            tissue.append(fraction * (x1 - x0) * (y1 - y0))
        yield strip


# ----------------------------------------------------------------------------- cohort


STREAM_SIDE = 8192  # slides with a longer side are rendered in blocks and streamed (bounded memory)
BLOCK = 2048  # block side of streamed slides (rounded up to a multiple of tile * downsample)


def _latents(rng, n_patients: int, slides_per_patient: list[int]):
    patients = rng.uniform(0.1, 0.9, (n_patients, 3))  # density, nuclei_size, stain
    rows = []
    for p, count in enumerate(slides_per_patient):
        for k in range(count):
            z = np.clip(patients[p] + rng.normal(0, 0.05, 3), 0, 1)
            rows.append((p, k, z))
    return patients, rows


def _check_cohort_arguments(n_slides: int, n_patients: int | None, size, genes: int) -> tuple[int, int, int]:
    """(n_patients, width, height), or ValueError."""
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    n_patients = n_patients if n_patients is not None else max(1, math.ceil(0.75 * n_slides))
    if not (n_slides / 2 <= n_patients <= n_slides):
        raise ValueError(f"n_patients={n_patients} must be between n_slides/2 and n_slides ({n_slides}): a patient has 1 or 2 slides")
    width, height = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if min(width, height) < 64:
        raise ValueError(f"size must be at least 64 px per side, got {width}x{height}")
    if genes < 3:
        raise ValueError(f"genes must be >= 3 (three marker genes), got {genes}")
    return n_patients, width, height


def _msi_status(rng, patients: np.ndarray) -> np.ndarray:
    """bool [patients]: MSI-H for lymphocyte-rich tissue (dense, small nuclei); at least one of each class."""
    c_patient = 2 * patients - 1
    msi_logit = 3 * c_patient[:, 0] - 2 * c_patient[:, 1] + rng.normal(0, 0.3, len(patients))
    msi_high = msi_logit > 1.0
    if len(patients) >= 2 and msi_high.all():
        msi_high[np.argmin(msi_logit)] = False
    if len(patients) >= 2 and not msi_high.any():
        msi_high[np.argmax(msi_logit)] = True
    return msi_high


def _gene_model(rng, genes: int, null_fraction: float) -> dict:
    """names, weights [genes, 3] (genes 0-2 markers), null mask, bias (log mean counts)."""
    names = [f"SYN{g:04d}" for g in range(genes)]
    weights = rng.normal(0, 1.2, (genes, 3))
    weights[:3] = 2.0 * np.eye(3)
    null = rng.random(genes) < null_fraction
    null[:3] = False
    weights[null] = 0.0
    bias = rng.uniform(math.log(20), math.log(2000), genes)
    return {"names": names, "weights": weights, "null": null, "bias": bias}


def write_slide(path, slide_key: list[int], width: int, height: int, params: dict, mpp: float, tile: int, quality: int,
                downsample: int, artefacts: bool, progress: bool = False) -> tuple[list[dict], float]:
    """Render and write one slide; returns (artefacts, tissue fraction).

    Up to :data:`STREAM_SIDE` px the slide is rendered whole (``default_rng(slide_key)``); larger ones are
    rendered block by block (:func:`render_blocks`) and streamed to the TIFF (:func:`write_streamed_pyramid`).
    """
    if max(width, height) <= STREAM_SIDE:
        image, found, tissue_fraction = render_slide(np.random.default_rng(slide_key), width, height, params, mpp=mpp, artefacts=artefacts)
        write_pyramid_tiff(path, pyramid(image, tile, downsample), mpp, tile=tile, quality=quality)
        return found, tissue_fraction
    step = math.lcm(tile, downsample)
    found, tissue = [], []
    block = -(-BLOCK // step) * step
    strips = render_blocks(slide_key, width, height, params, mpp, artefacts, block, found, tissue)
    if progress:
        from tqdm import tqdm

        strips = tqdm(strips, total=len(_block_edges(height, block)) - 1, desc=f"  {Path(path).stem} level 0", unit="strip", leave=False)
    write_streamed_pyramid(path, strips, height, width, mpp, tile=tile, quality=quality, downsample=downsample)
    return found, float(sum(tissue) / (width * height))


def _write_tables(out_dir: Path, records: list[dict], names: list[str], counts: list[np.ndarray]) -> None:
    """manifest.csv, msi.csv and expression.tsv (samples x genes raw counts)."""
    header = "slide_path,sample_id,patient_id,msi\n"
    write_text_atomic(out_dir / "manifest.csv", header + "".join(
        f"{r['slide_path']},{r['sample_id']},{r['patient_id']},{r['msi']}\n" for r in records))
    write_text_atomic(out_dir / "msi.csv", "sample_id,msi\n" + "".join(f"{r['sample_id']},{r['msi']}\n" for r in records))
    lines = ["sample_id\t" + "\t".join(names)]
    lines += [r["sample_id"] + "\t" + "\t".join(map(str, row.tolist())) for r, row in zip(records, counts)]
    write_text_atomic(out_dir / "expression.tsv", "\n".join(lines) + "\n")


def make_cohort(out_dir, n_slides: int = 8, n_patients: int | None = None, size=4096, tile: int = 256, seed: int = 0,
                genes: int = 50, mpp: float = 0.5, quality: int = 80, downsample: int = 4, noise: float = 0.15,
                null_fraction: float = 0.2, artefacts: bool = True, progress: bool = False) -> SynthCohort:
    """Write a synthetic cohort into ``out_dir`` (see the module docstring for the ground truth).

    Files: ``slides/<slide_id>.tif`` (pyramidal JPEG TIFFs), ``manifest.csv`` (slide_path relative,
    sample_id, patient_id, msi), ``expression.tsv`` (samples x genes raw counts), ``msi.csv``
    (sample_id, msi) and ``truth.json``. ``size`` is an int or (width, height). Patients get one or two
    slides (one sample per slide); ``n_patients`` defaults to ``ceil(0.75 * n_slides)``. Slides with a
    side above :data:`STREAM_SIDE` are streamed in bounded memory (:func:`write_slide`).
    """
    n_patients, width, height = _check_cohort_arguments(n_slides, n_patients, size, genes)
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)  # one stream, drawn in this order: latents, MSI, genes, then per slide
    patients, rows = _latents(rng, n_patients, [2 if p < n_slides - n_patients else 1 for p in range(n_patients)])
    msi_high = _msi_status(rng, patients)
    model = _gene_model(rng, genes, null_fraction)

    records, counts, slide_paths = [], [], []
    iterator = enumerate(rows)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(rows), desc="synth slides", unit="slide")
    for index, (p, k, z) in iterator:
        patient_id = f"SYN-{p + 1:04d}"
        sample_id = f"{patient_id}-01{'AB'[k]}"
        slide_id = f"{sample_id}-DX1"
        params = {"density": float(z[0]), "nuclei_size": float(z[1]), "stain": float(z[2]),
                  "tissue_fraction": float(rng.uniform(0.3, 0.6))}
        path = out_dir / "slides" / f"{slide_id}.tif"
        found, tissue_fraction = write_slide(path, [seed, index], width, height, params, mpp, tile, quality, downsample,
                                             artefacts, progress)
        log_mean = model["bias"] + model["weights"] @ (2 * z - 1) + rng.normal(0, noise, genes)
        counts.append(rng.poisson(np.exp(log_mean)))
        slide_paths.append(path)
        records.append({"slide_id": slide_id, "slide_path": f"slides/{slide_id}.tif", "sample_id": sample_id,
                        "patient_id": patient_id, "msi": "MSI-H" if msi_high[p] else "MSS",
                        "params": {**params, "tissue_fraction": tissue_fraction}, "artefacts": found})

    _write_tables(out_dir, records, model["names"], counts)
    truth = {
        "seed": seed, "size": [width, height], "tile": tile, "mpp": mpp, "quality": quality, "downsample": downsample,
        "parameters": ["density", "nuclei_size", "stain"],
        "expression_model": "counts ~ Poisson(exp(bias + weights @ (2 z - 1) + N(0, noise^2))), z = [density, nuclei_size, stain]",
        "msi_model": "MSI-H if 3 c_density - 2 c_nuclei_size + N(0, 0.3^2) > 1 (per patient; >= 1 of each class)",
        "noise": noise, "genes": model["names"], "bias": model["bias"].tolist(), "weights": model["weights"].tolist(),
        "null_genes": [n for n, z in zip(model["names"], model["null"]) if z], "slides": records,
    }
    write_text_atomic(out_dir / "truth.json", json.dumps(truth, indent=1))
    return SynthCohort(out_dir, out_dir / "manifest.csv", out_dir / "expression.tsv", out_dir / "msi.csv",
                       out_dir / "truth.json", slide_paths)


def make_bad_slides(out_dir, seed: int = 0) -> dict[str, Path]:
    """Broken inputs for error handling: ``corrupt`` (TIFF header + garbage), ``truncated`` (a valid
    pyramid cut in half), ``unsupported`` (.txt), ``tiny`` (32 x 32 px) and ``no_mpp`` (no calibration).
    Also ``good``: a valid 512 x 512 slide. Returns {case: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.5}
    image, _, _ = render_slide(rng, 512, 512, params, artefacts=False)
    paths = {name: out_dir / f"{name}{suffix}" for name, suffix in
             (("good", ".tif"), ("corrupt", ".tif"), ("truncated", ".tif"), ("unsupported", ".txt"), ("tiny", ".tif"), ("no_mpp", ".tif"))}
    write_pyramid_tiff(paths["good"], pyramid(image, 128, 2), 0.5, tile=128)
    paths["corrupt"].write_bytes(b"II*\x00" + rng.bytes(4096))
    write_pyramid_tiff(paths["truncated"], pyramid(image, 128, 2), 0.5, tile=128)
    data = paths["truncated"].read_bytes()
    paths["truncated"].write_bytes(data[: len(data) // 2])
    paths["unsupported"].write_text("this is not a slide\n")
    write_pyramid_tiff(paths["tiny"], [image[:32, :32]], 0.5, tile=16)
    write_pyramid_tiff(paths["no_mpp"], pyramid(image, 128, 2), None, tile=128)
    return paths

