"""HE2RNA inference on one slide (wiring): Otsu tissue -> 224 px tiles at 0.5 um/px -> ResNet50 -> MLP.

The baseline side of the efficiency benchmark (the paper's timing comparison: ISG 246 s vs HE2RNA
302 s per slide). HE2RNA selects no patches beyond the Otsu tissue mask: every tissue tile goes through
the ResNet50. ``HE2RNA-Shannon`` (paper Tab. 2: +7.5 % over HE2RNA) is the same pipeline on the tiles
kept by a Shannon selection rule: tiles are scored first (:func:`he2rna_tile_scores`) and only the
selected ones go through the ResNet50 (``selection=`` of :func:`he2rna_predict_slide`). Stage seconds
are reported as ``read`` (tile decoding), ``select`` (thumbnail + Otsu, and Shannon scoring),
``features`` (ResNet) and ``predict`` (MLP + top-k pooling).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from isg.baselines.he2rna import TILE_MPP, TILE_PX, HE2RNA, he2rna_features, otsu_tissue_mask, supertiles, tissue_tile_coords
from isg.io import BATCH_SIZE, NUM_WORKERS


@dataclass
class TileGrid:
    """Where HE2RNA's tiles lie: level-0 ``coords`` [N, 2], read ``size`` px at ``level``, resized to ``tile_px``."""

    coords: np.ndarray
    level: int
    size: int
    tile_px: int

    def subset(self, keep: np.ndarray) -> TileGrid:
        """The tiles where ``keep`` [N] bool is True."""
        return TileGrid(self.coords[np.asarray(keep, dtype=bool)], self.level, self.size, self.tile_px)


def _iter_resized(slide, grid: TileGrid, batch_size: int, device, num_workers: int):
    """(level-0 coords [B, 2], uint8 tiles [B, tile_px, tile_px, 3]) over ``grid``, resized to ``tile_px``."""
    from isg.io.tiles import iter_tiles

    for batch_coords, tiles in iter_tiles(slide, grid.coords, grid.size, level=grid.level, batch_size=batch_size,
                                          device=device, num_workers=num_workers):
        if grid.size != grid.tile_px:  # [B, s, s, 3] -> [B, 224, 224, 3]
            x = F.interpolate(tiles.permute(0, 3, 1, 2).float(), size=(grid.tile_px, grid.tile_px), mode="bilinear",
                              antialias=True, align_corners=False)
            tiles = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        yield batch_coords, tiles


def he2rna_tile_scores(slide, grid: TileGrid, selector: str = "shannon", *, batch_size: int = BATCH_SIZE, device="cpu",
                       num_workers: int = NUM_WORKERS) -> np.ndarray:
    """Scores float64 [N] of the grid's tiles as the ResNet sees them (``tile_px`` px) by ``selector``."""
    from isg.select import get_selector

    score = get_selector(selector)
    row_of = {(int(x), int(y)): i for i, (x, y) in enumerate(grid.coords)}
    scores = np.full(len(grid.coords), np.nan)
    for batch_coords, tiles in _iter_resized(slide, grid, batch_size, device, num_workers):
        rows = [row_of[int(x), int(y)] for x, y in np.asarray(batch_coords).reshape(-1, 2)]  # stream order -> grid order
        scores[rows] = np.asarray(score(tiles), dtype=np.float64)
    if np.isnan(scores).any():
        raise RuntimeError(f"{slide.path}: the tile reader skipped {int(np.isnan(scores).sum())} of {len(scores)} tiles")
    return scores


def he2rna_tile_grid(slide, tile_px: int = TILE_PX, tile_mpp: float = TILE_MPP, min_tissue: float = 0.5, thumbnail_size: int = 2048) -> TileGrid:
    """Tissue tiles of ``tile_px`` at ``tile_mpp`` um/px on an Otsu mask of the slide's thumbnail."""
    thumbnail = slide.thumbnail(thumbnail_size)  # [h, w, 3]
    mask_mpp = slide.mpp * slide.dimensions[0] / thumbnail.shape[1]
    coords = tissue_tile_coords(otsu_tissue_mask(thumbnail), mask_mpp, tile_px, tile_mpp, min_tissue)  # at tile_mpp
    level0 = np.round(coords * (tile_mpp / slide.mpp)).astype(np.int64)
    level = slide.best_level_for_mpp(tile_mpp)
    size = max(1, int(round(tile_px * tile_mpp / slide.level_mpp(level))))
    return TileGrid(level0, level, size, tile_px)


def he2rna_slide_features(slide, backbone: torch.nn.Module, grid: TileGrid | None = None, *, batch_size: int = BATCH_SIZE,
                          num_workers: int = NUM_WORKERS, timings: dict | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """ResNet features [N, 2048] (CPU float32) and level-0 coords [N, 2] of every tissue tile of ``slide``."""
    timings = timings if timings is not None else defaultdict(float)
    if grid is None:
        start = time.perf_counter()
        grid = he2rna_tile_grid(slide)
        timings["select"] += time.perf_counter() - start
    device = next(backbone.parameters()).device
    features, coords = [], []
    start = time.perf_counter()
    for batch_coords, tiles in _iter_resized(slide, grid, batch_size, device, num_workers):
        timings["read"] += time.perf_counter() - start
        start = time.perf_counter()
        features.append(he2rna_features(tiles, backbone, batch_size))
        coords.append(batch_coords)
        timings["features"] += time.perf_counter() - start
        start = time.perf_counter()
    if not features:
        return torch.zeros(0, getattr(backbone, "num_features", 2048)), np.zeros((0, 2), np.int64)
    return torch.cat(features), np.concatenate(coords)


@torch.no_grad()
def he2rna_predict_slide(slide, backbone: torch.nn.Module, model: HE2RNA, *, n_supertiles: int | None = None,
                         selection=None, selector: str = "shannon", batch_size: int = BATCH_SIZE,
                         num_workers: int = NUM_WORKERS) -> tuple[np.ndarray, dict]:
    """One slide's prediction [G] and its stage seconds (read, select, features, predict).

    ``selection``: an :class:`isg.select.SelectionRule` applied to the ``selector`` scores of the tissue
    tiles before the ResNet (HE2RNA-Shannon); None keeps every tissue tile (HE2RNA).
    """
    from isg.select import select

    timings: dict = defaultdict(float)
    start = time.perf_counter()
    grid = he2rna_tile_grid(slide)
    if selection is not None and len(grid.coords):
        keep = select(he2rna_tile_scores(slide, grid, selector, batch_size=batch_size, num_workers=num_workers),
                      selection, name=str(slide.path)).keep
        timings["n_scored"] = len(grid.coords)
        grid = grid.subset(keep)
    timings["select"] += time.perf_counter() - start
    features, coords = he2rna_slide_features(slide, backbone, grid, batch_size=batch_size, num_workers=num_workers, timings=timings)
    if len(features) == 0:
        raise ValueError(f"{slide.path}: no tissue tiles found for HE2RNA (Otsu mask is empty)")
    start = time.perf_counter()
    if n_supertiles:
        features, _, _ = supertiles(coords, features, n_supertiles)
    model.eval()
    device = next(model.parameters()).device
    prediction = model(features[None].to(device)).float().cpu()[0].numpy()  # [G]
    timings["predict"] += time.perf_counter() - start
    timings["n_tiles"] = len(coords)
    return prediction, dict(timings)
