"""One synthetic H&E image: tissue regions, nuclei, colour, artefacts, and the mask of the signal regions.

A slide's tissue is a mosaic of region kinds (labels :data:`REGIONS`), laid on a coarse grid
(:data:`CELL` px per cell) inside smooth tissue islands:

* ``dense``: cellular tissue (epithelium, tumour) with nuclei of the slide's nuisance density and
  size (``bulk_density``, ``bulk_size``): most of the tissue, information-rich;
* ``signal``: small nuclei-rich regions (lymphoid aggregates, tumour nests; 40-110 um radius,
  ``signal_fraction`` of the tissue) whose nuclei density and size are the latent ``density`` and
  ``nuclei_size`` that drive the marker genes;
* ``stroma``: loose fibrous tissue, smooth pink with sparse elongated nuclei (``stroma_fraction``);
* ``fat``: adipocytes, empty cells with thin pink walls (``fat_fraction``).

``stain`` (hematoxylin strength) colours the whole slide. With ``local_signal=False`` there are no
signal regions and the dense tissue takes the latent density and size (slide-wide signal: every
dense patch carries it). Out-of-focus bands and artefacts (pen marks, folds, bubbles, debris blobs,
debris specks on glass) are drawn last; the signal mask keeps only the signal regions they leave visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

BACKGROUND = (244, 243, 246)
INKS = ((35, 60, 150), (30, 115, 65), (25, 25, 30))  # blue, green, black pen
DEBRIS = ((70, 50, 45), (110, 80, 100), (40, 40, 45))
REGIONS = ("background", "dense", "signal", "stroma", "fat")
ARTEFACTS = ("blur", "blob", "pen", "fold", "bubble", "noise")  # kinds listed in truth.json
CELL = 4  # px per cell of the region grid
TRUTH_DOWNSAMPLE = 16  # level-0 px per pixel of the stored signal coverage mask
DEFAULT_NUISANCE = {"signal_fraction": 0.08, "stroma_fraction": 0.18, "fat_fraction": 0.07, "bulk_density": 0.5,
                    "bulk_size": 0.5, "tissue_fraction": 0.45}

# nuclei per 128 x 128 um, radius in um, aspect range, darkness (alpha) range, per region kind;
# "latent" entries are replaced per slide (see _nuclei_kinds)
_STROMA_NUCLEI = dict(per_area=14.0, radius=3.5, aspect=(0.18, 0.35), dark=(110, 200))
_FAT_NUCLEI = dict(per_area=3.0, radius=2.5, aspect=(0.3, 0.6), dark=(110, 190))


@dataclass
class Rendered:
    """One rendered image and what it holds."""

    image: np.ndarray  # uint8 [H, W, 3]
    artefacts: list[dict]  # [{kind, bbox: [x0, y0, x1, y1]}] level-0 boxes
    tissue_fraction: float
    signal: np.ndarray  # float32 [ceil(H / d), ceil(W / d)], d = TRUTH_DOWNSAMPLE: visible signal share per block
    region_shares: dict[str, float]  # share of the tissue per region kind (before artefacts)


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """float32 [h, w] in ~[0, 1]: uniform noise on a (cells) grid, bicubic upsampled to ``shape``."""
    cells = (max(1, int(cells[0])), max(1, int(cells[1])))
    coarse = rng.random((cells[0] + 3, cells[1] + 3), dtype=np.float32)
    big = cv2.resize(coarse, (shape[1] + 3 * shape[1] // cells[1], shape[0] + 3 * shape[0] // cells[0]), interpolation=cv2.INTER_CUBIC)
    oy, ox = shape[0] // cells[0], shape[1] // cells[1]
    return big[oy:oy + shape[0], ox:ox + shape[1]]


def _cells_per(shape: tuple[int, int], px: float) -> tuple[int, int]:
    """Noise grid with one cell per ``px`` (grid) pixels, at least 2 per side."""
    return max(2, round(shape[0] / px)), max(2, round(shape[1] / px))


def _tissue_mask(rng, H, W, fraction: float) -> np.ndarray:
    """bool [H, W]: a few smooth tissue islands covering about ``fraction`` of the slide."""
    h, w = max(8, H // 16), max(8, W // 16)
    field = smooth_noise(rng, (h, w), (max(2, round(3 * H / max(H, W))), max(2, round(3 * W / max(H, W)))))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    window = np.minimum(np.minimum(yy, h - 1 - yy) / h, np.minimum(xx, w - 1 - xx) / w)  # 0 at the border
    field = field * np.clip(window * 8, 0, 1)
    low = (field > np.quantile(field, 1 - fraction)).astype(np.uint8) * 255
    low = cv2.GaussianBlur(low, (0, 0), 1.5)
    return cv2.resize(low, (W, H), interpolation=cv2.INTER_LINEAR) > 127


def _top_share(field: np.ndarray, where: np.ndarray, share: float) -> np.ndarray:
    """bool mask of the ``share`` of ``where`` cells with the highest ``field``."""
    if share <= 0 or not where.any():
        return np.zeros_like(where)
    return where & (field > np.quantile(field[where], 1 - min(share, 1.0)))


def _signal_regions(rng, eligible: np.ndarray, target_cells: float, px_um: float) -> np.ndarray:
    """bool [h, w] grid: nuclei-rich blobs (40-110 um radius, ragged edges) inside ``eligible`` covering ~``target_cells``."""
    h, w = eligible.shape
    blobs = np.zeros((h, w), np.uint8)
    ys, xs = np.nonzero(eligible)
    covered, tries = 0, 0
    while covered < target_cells and len(ys) and tries < 400:
        tries += 1
        i = int(rng.integers(len(ys)))
        radius = rng.uniform(40, 110) / px_um  # grid cells
        axes = (max(1, round(radius)), max(1, round(radius * rng.uniform(0.55, 1.0))))
        cv2.ellipse(blobs, (int(xs[i]), int(ys[i])), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        covered = int((blobs.astype(bool) & eligible).sum())
    rough = cv2.GaussianBlur(blobs.astype(np.float32), (0, 0), 1.5) + 0.45 * (smooth_noise(rng, (h, w), _cells_per((h, w), 6)) - 0.5)
    return (rough > 0.5) & eligible


def region_map(rng, tissue_grid: np.ndarray, params: dict, px_um: float, local_signal: bool) -> np.ndarray:
    """uint8 [h, w] region labels (indices of :data:`REGIONS`) on the grid of ``tissue_grid`` (bool [h, w]);
    ``px_um``: microns per grid cell."""
    h, w = tissue_grid.shape
    labels = np.where(tissue_grid, 1, 0).astype(np.uint8)
    fat = _top_share(smooth_noise(rng, (h, w), _cells_per((h, w), 500 / px_um)), tissue_grid, params["fat_fraction"])
    labels[fat] = 4
    rest = tissue_grid & ~fat
    share = params["stroma_fraction"] / max(1e-6, 1 - params["fat_fraction"])
    stroma = _top_share(smooth_noise(rng, (h, w), _cells_per((h, w), 350 / px_um)), rest, share)
    labels[stroma] = 3
    if local_signal:
        signal = _signal_regions(rng, rest & ~stroma, params["signal_fraction"] * tissue_grid.sum(), px_um)
        labels[signal] = 2
    return labels


def _nuclei_kinds(params: dict, local_signal: bool) -> dict[int, dict]:
    """Nuclei per region label: per_area (per 128 x 128 um), radius (um), aspect and darkness ranges."""
    if local_signal:
        dense = dict(per_area=45 + 90 * params["bulk_density"], radius=2.2 + 2.0 * params["bulk_size"], aspect=(0.6, 1.0), dark=(120, 230))
    else:  # slide-wide signal: the dense tissue carries the latent parameters
        dense = dict(per_area=40 + 160 * params["density"], radius=2.0 + 3.0 * params["nuclei_size"], aspect=(0.55, 1.0), dark=(150, 255))
    signal = dict(per_area=170 + 200 * params["density"], radius=1.6 + 2.4 * params["nuclei_size"], aspect=(0.7, 1.0), dark=(190, 255))
    return {2: signal, 1: dense, 3: _STROMA_NUCLEI, 4: _FAT_NUCLEI}  # signal first: its nuclei do not depend on the nuisance


def _draw_nuclei(rng, labels: np.ndarray, shape: tuple[int, int], kinds: dict[int, dict], mpp: float) -> np.ndarray:
    """uint8 [H, W] nucleus alpha (0 = none): filled ellipses placed uniformly within each region kind."""
    H, W = shape
    nuclei = np.zeros((H, W), np.uint8)
    cell_area_um = (CELL * mpp) ** 2
    # cellular tissue is not uniform: its local nuclei density varies 0.2x..1.6x around the mean (~300 um patches)
    cellularity = 0.2 + 1.4 * smooth_noise(rng, labels.shape, _cells_per(labels.shape, 300 / (CELL * mpp))).ravel() ** 2
    for label, kind in kinds.items():
        cells = np.flatnonzero(labels == label)
        count = rng.poisson(kind["per_area"] * len(cells) * cell_area_um / 128.0**2)
        if not count:
            continue
        if label == 1:
            weights = cellularity[cells]
            pick = cells[np.minimum(np.searchsorted(np.cumsum(weights), rng.random(count) * weights.sum()), len(cells) - 1)]
        else:
            pick = cells[rng.integers(0, len(cells), count)]
        ys = np.minimum(H - 1, (pick // labels.shape[1]) * CELL + rng.integers(0, CELL, count))
        xs = np.minimum(W - 1, (pick % labels.shape[1]) * CELL + rng.integers(0, CELL, count))
        radius = kind["radius"] / mpp * rng.lognormal(0, 0.2, count)
        aspect = rng.uniform(*kind["aspect"], count)
        angles = rng.uniform(0, 180, count)
        darkness = rng.integers(kind["dark"][0], kind["dark"][1] + 1, count)
        for x, y, r, e, angle, dark in zip(xs.tolist(), ys.tolist(), radius.tolist(), aspect.tolist(), angles.tolist(), darkness.tolist()):
            cv2.ellipse(nuclei, (x, y), (max(1, round(r)), max(1, round(r * e))), angle, 0, 360, dark, -1)
    return nuclei


def _lerp(a, b, t):
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


def _color_lut(stain: float) -> np.ndarray:
    """uint8 [256 (eosin level; 0 = background), 256 (nucleus alpha), 3]."""
    pink = _lerp((238, 168, 200), (212, 138, 192), stain)
    nucleus = _lerp((128, 78, 168), (58, 28, 118), stain)
    level = np.arange(256, dtype=np.float32)[:, None, None] / 255
    alpha = np.arange(256, dtype=np.float32)[None, :, None] / 255 * 0.95
    stroma = pink * (0.78 + 0.27 * level)
    lut = stroma * (1 - alpha) + nucleus * alpha - 2  # -2: centres the grain added later
    lut[0] = BACKGROUND
    return np.clip(np.round(lut), 0, 255).astype(np.uint8)


def _eosin_level(rng, labels_full: np.ndarray, H: int, W: int, mpp: float) -> np.ndarray:
    """uint8 [H, W] eosin level (0 = background/glass): granular cytoplasm in cellular tissue, smooth fibres
    in stroma, thin walls between empty cells in fat."""
    small = (max(2, H // 4), max(2, W // 4))
    fibres = 0.55 * smooth_noise(rng, small, _cells_per(small, 256)) + 0.45 * smooth_noise(rng, small, (max(2, small[0] // 4), max(2, small[1] // 24)))
    if rng.random() < 0.5:  # fibre orientation
        fibres = np.ascontiguousarray(cv2.resize(fibres.T, (small[1], small[0])))
    fibres = cv2.resize(fibres * 120 + 95, (W, H), interpolation=cv2.INTER_LINEAR)  # [H, W] float32, 95..215
    noise = np.frombuffer(rng.bytes(H * W), np.uint8).reshape(H, W)
    granular = cv2.GaussianBlur(noise.astype(np.float32), (0, 0), 0.8)  # ~2 px cytoplasm granules, 127.5 +- ~30
    level = cv2.addWeighted(fibres, 1.0, granular, 260 / 255, -130)  # cellular: fibres + 260 * (granular - 0.5)
    stroma = labels_full == 3
    if stroma.any():  # smoother: 60 + 170 * fibres + 120 * (granular - 0.5)
        smooth = cv2.addWeighted(fibres, 170 / 120, granular, 120 / 255, 60 - 95 * 170 / 120 - 60)
        level[stroma] = smooth[stroma]
    level = np.clip(level, 1, 255).astype(np.uint8)
    level[labels_full == 0] = 0
    fat = labels_full == 4
    if fat.any():  # adipocytes: Voronoi cells of ~60 um, walls ~2 px, drawn over the fat's bounding box
        x0, y0, x1, y1 = _bbox(fat)
        h, w = y1 - y0, x1 - x0
        seeds = np.full((h, w), 255, np.uint8)
        n = max(1, int(h * w * mpp * mpp / 60.0**2))
        seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
        _, cell = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 3, labelType=cv2.DIST_LABEL_CCOMP)
        cell = cell.astype(np.float32)
        wall = cv2.dilate(cell, np.ones((3, 3), np.uint8)) != cell
        inside = fat[y0:y1, x0:x1]
        level[y0:y1, x0:x1][inside] = np.where(wall[inside], 200, 0)
    return level


def _band_mask(rng, H: int, W: int, width: float) -> np.ndarray:
    """bool [H, W]: a straight band of ``width`` px across the image at a random angle and offset."""
    angle = rng.uniform(0, np.pi)
    normal = np.array([np.cos(angle), np.sin(angle)])
    centre = rng.uniform(0.2, 0.8) * (W * abs(normal[0]) + H * abs(normal[1])) + min(0.0, W * normal[0]) + min(0.0, H * normal[1])
    along = np.array([-normal[1], normal[0]]) * 2 * (H + W)
    middle = normal * centre
    half = normal * width / 2
    corners = np.array([middle - along - half, middle + along - half, middle + along + half, middle - along + half])
    mask = np.zeros((H, W), np.uint8)
    cv2.fillConvexPoly(mask, np.round(corners * 16).astype(np.int32), 1, cv2.LINE_8, 4)  # 4 fractional bits
    return mask.view(bool)


def _bbox(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1] of the set pixels of bool ``mask`` [H, W], or None."""
    rows, cols = mask.any(axis=1), mask.any(axis=0)
    if not rows.any():
        return None
    y0, y1 = int(rows.argmax()), len(rows) - int(rows[::-1].argmax())
    x0, x1 = int(cols.argmax()), len(cols) - int(cols[::-1].argmax())
    return [x0, y0, x1, y1]


def _out_of_focus(rng, image: np.ndarray, tissue: np.ndarray, mpp: float, obscured: np.ndarray) -> list[dict]:
    """Out-of-focus bands (150-400 um wide) blurred across the tissue, in place."""
    H, W = image.shape[:2]
    found = []
    for _ in range(int(rng.integers(1, 1 + max(1, round(H * W / 4096**2))))):
        width = min(rng.uniform(150, 400) / mpp, rng.uniform(0.03, 0.07) * min(H, W))  # physical, but a slide stays mostly in focus
        band = _band_mask(rng, H, W, width) & cv2.dilate(tissue.view(np.uint8), np.ones((9, 9), np.uint8)).view(bool)
        box = _bbox(band)
        if box is None:
            continue
        x0, y0, x1, y1 = box
        blurred = cv2.GaussianBlur(np.ascontiguousarray(image[y0:y1, x0:x1]), (0, 0), rng.uniform(2.5, 5.0) / mpp)
        region = band[y0:y1, x0:x1]
        image[y0:y1, x0:x1][region] = blurred[region]
        obscured[y0:y1, x0:x1] |= region
        found.append({"kind": "blur", "bbox": box})
    return found


def _box(rng, H, W, bw, bh):
    x0, y0 = int(rng.integers(0, max(1, W - bw))), int(rng.integers(0, max(1, H - bh)))
    return x0, y0, min(W, x0 + bw), min(H, y0 + bh)


def _stroke(rng, H: int, W: int, scale: float, start=None) -> np.ndarray:
    """int32 [n, 2] points of a random polyline (a pen stroke or a fold line)."""
    n = int(rng.integers(3, 7))
    start = rng.uniform(0.05, 0.95, 2) * (W, H) if start is None else np.asarray(start, np.float64)
    steps = rng.normal(0, scale * 0.08, (n, 2)).cumsum(axis=0)
    return np.clip(start + steps, 0, (W - 1, H - 1)).astype(np.int32)


def _add_artefacts(rng, image: np.ndarray, tissue: np.ndarray, mpp: float, obscured: np.ndarray) -> list[dict]:
    """Pen marks, folds, bubbles, debris blobs and debris specks drawn in place; returns their level-0 boxes
    and marks the pixels they cover in ``obscured``."""
    H, W = image.shape[:2]
    scale = min(H, W)
    per_area = max(1, round(H * W / 4096 ** 2))
    found = []
    ty, tx = np.nonzero(tissue[::16, ::16])

    def record(kind: str, mask: np.ndarray) -> None:
        box = _bbox(mask)
        if box is not None:
            obscured[mask] = True
            found.append({"kind": kind, "bbox": box})

    for _ in range(int(rng.integers(1, 2 + per_area))):  # solid blobs (debris, dust)
        ax, ay = int(scale * rng.uniform(0.015, 0.04)) + 4, int(scale * rng.uniform(0.015, 0.04)) + 4
        cx, cy = int(rng.integers(ax, max(ax + 1, W - ax))), int(rng.integers(ay, max(ay + 1, H - ay)))
        mask = np.zeros((H, W), np.uint8)
        cv2.ellipse(mask, (cx, cy), (ax, ay), float(rng.uniform(0, 180)), 0, 360, 1, -1)
        image[mask.view(bool)] = DEBRIS[int(rng.integers(len(DEBRIS)))]
        record("blob", mask.view(bool))
    for _ in range(int(rng.integers(1, 1 + per_area))):  # pen marks
        mask = np.zeros((H, W), np.uint8)
        cv2.polylines(mask, [_stroke(rng, H, W, scale).reshape(-1, 1, 2)], False, 1, max(3, int(scale * rng.uniform(0.004, 0.01))), cv2.LINE_AA)
        image[mask.view(bool)] = INKS[int(rng.integers(len(INKS)))]
        record("pen", mask.view(bool))
    for _ in range(int(rng.integers(1, 1 + per_area))):  # folds: tissue lying twice, darker and more saturated
        start = None
        if len(ty):
            i = int(rng.integers(len(ty)))
            start = (tx[i] * 16, ty[i] * 16)
        mask = np.zeros((H, W), np.uint8)
        width = min(rng.uniform(40, 120) / mpp, rng.uniform(0.01, 0.025) * scale)
        cv2.polylines(mask, [_stroke(rng, H, W, scale, start).reshape(-1, 1, 2)], False, 1, max(4, round(width)))
        fold = mask.view(bool) & tissue
        doubled = image[fold].astype(np.float32)
        image[fold] = np.clip(doubled * doubled / 255 * 0.95, 0, 255).astype(np.uint8)
        record("fold", fold)
    for _ in range(int(rng.integers(1, 1 + per_area))):  # air bubbles: a dark rim, washed-out inside
        radius = max(4, round(min(rng.uniform(100, 300) / mpp, rng.uniform(0.03, 0.07) * scale)))
        cx, cy = int(rng.integers(0, W)), int(rng.integers(0, H))
        inside = np.zeros((H, W), np.uint8)
        cv2.circle(inside, (cx, cy), radius, 1, -1)
        rim = np.zeros((H, W), np.uint8)
        cv2.circle(rim, (cx, cy), radius, 1, max(2, round(3 / mpp)))
        washed = image[inside.view(bool)].astype(np.float32)
        image[inside.view(bool)] = (0.35 * washed + 0.65 * np.float32(BACKGROUND)).astype(np.uint8)
        image[rim.view(bool)] = (90, 90, 100)
        record("bubble", inside.view(bool) | rim.view(bool))
    for _ in range(int(rng.integers(1, 2 + per_area))):  # scattered noise chunks: specks of debris on glass
        bw, bh = int(scale * rng.uniform(0.03, 0.07)) + 8, int(scale * rng.uniform(0.03, 0.07)) + 8
        x0, y0, x1, y1 = _box(rng, H, W, bw, bh)
        region = np.empty((y1 - y0, x1 - x0, 3), np.uint8)
        region[:] = BACKGROUND
        n_specks = max(1, int(0.002 * region.shape[0] * region.shape[1]))  # ~2-3 % of the area covered
        for cx, cy, radius in zip(rng.integers(0, region.shape[1], n_specks), rng.integers(0, region.shape[0], n_specks),
                                  rng.integers(1, 3, n_specks)):
            cv2.circle(region, (int(cx), int(cy)), int(radius), DEBRIS[int(rng.integers(len(DEBRIS)))], -1)
        image[y0:y1, x0:x1] = region
        mask = np.zeros((H, W), bool)
        mask[y0:y1, x0:x1] = True
        record("noise", mask)
    return found


def block_share(mask: np.ndarray, d: int = TRUTH_DOWNSAMPLE) -> np.ndarray:
    """float32 [ceil(H / d), ceil(W / d)]: the share of each d x d block of bool ``mask`` [H, W] that is set
    (blocks cut by the border count their pixels inside the image)."""
    H, W = mask.shape
    h, w = -(-H // d), -(-W // d)
    padded = np.zeros((h * d, w * d), np.float32)
    padded[:H, :W] = mask
    inside = np.zeros_like(padded)
    inside[:H, :W] = 1
    sums = padded.reshape(h, d, w, d).sum(axis=(1, 3))
    return sums / inside.reshape(h, d, w, d).sum(axis=(1, 3))


def render_tissue(rng: np.random.Generator, width: int, height: int, params: dict, mpp: float = 0.5,
                  artefacts: bool = True, local_signal: bool = True) -> Rendered:
    """One level-0 image uint8 [height, width, 3] of tissue with latent ``params`` (``density``,
    ``nuclei_size``, ``stain``; nuisance keys of :data:`DEFAULT_NUISANCE` default to its values)."""
    H, W = height, width
    params = {**DEFAULT_NUISANCE, **params}
    tissue = _tissue_mask(rng, H, W, params["tissue_fraction"])
    grid_shape = (-(-H // CELL), -(-W // CELL))
    tissue_grid = cv2.resize(tissue.view(np.uint8), (grid_shape[1], grid_shape[0]), interpolation=cv2.INTER_NEAREST).view(bool)
    labels = region_map(rng, tissue_grid, params, CELL * mpp, local_signal)
    labels_full = np.repeat(np.repeat(labels, CELL, axis=0), CELL, axis=1)[:H, :W]
    labels_full = np.where(tissue, np.maximum(labels_full, 1), 0).astype(np.uint8)  # the pixel mask decides tissue

    level = _eosin_level(rng, labels_full, H, W, mpp)
    nuclei = _draw_nuclei(rng, labels, (H, W), _nuclei_kinds(params, local_signal), mpp)
    nuclei[~tissue] = 0
    nuclei = cv2.GaussianBlur(nuclei, (3, 3), 0)
    lut = _color_lut(params["stain"]).reshape(-1, 3)
    image = np.take(lut, (level.astype(np.uint16) << 8) | nuclei, axis=0)  # [H, W, 3]
    grain = (np.frombuffer(rng.bytes(H * W * 3), np.uint8).reshape(H, W, 3) & 3)  # sensor grain, 0..3 grey levels
    cv2.add(image, grain, dst=image, mask=tissue.view(np.uint8))

    obscured = np.zeros((H, W), bool)
    found = _out_of_focus(rng, image, tissue, mpp, obscured) if artefacts else []
    if artefacts:
        found += _add_artefacts(rng, image, tissue, mpp, obscured)
    signal_label = 2 if local_signal else 1
    shares = {name: float((labels_full == i).sum() / max(1, tissue.sum())) for i, name in enumerate(REGIONS) if i}
    return Rendered(image, found, float(tissue.mean()), block_share((labels_full == signal_label) & ~obscured), shares)


def render_slide(rng: np.random.Generator, width: int, height: int, params: dict, mpp: float = 0.5,
                 artefacts: bool = True) -> tuple[np.ndarray, list[dict], float]:
    """(image uint8 [height, width, 3], artefact list, tissue fraction) of :func:`render_tissue`."""
    rendered = render_tissue(rng, width, height, params, mpp=mpp, artefacts=artefacts)
    return rendered.image, rendered.artefacts, rendered.tissue_fraction
