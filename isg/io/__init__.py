"""Slides and tiles: readers behind one :class:`Slide` interface (:func:`open_slide`), a tissue
prefilter, tile grids, batched tile streaming (:func:`iter_tiles`, :func:`iter_tiles_dali`), two-level
tiling (:func:`local_grid`) and a synthetic cohort generator (:mod:`isg.io.synth`)."""

from isg.io.dali import dali_available, iter_tiles_dali
from isg.io.slide import (BACKENDS, MIN_SLIDE_SIZE, Slide, SlideError, mpp_from_description, mpp_from_resolution,
                          open_slide)
from isg.io.tiles import LOCAL_SIZE, PATCH_SIZE, grid_level, iter_tiles, local_grid, tile_grid, tissue_mask

__all__ = ["BACKENDS", "LOCAL_SIZE", "PATCH_SIZE", "MIN_SLIDE_SIZE", "Slide", "SlideError", "dali_available", "grid_level", "iter_tiles",
           "iter_tiles_dali", "local_grid", "mpp_from_description", "mpp_from_resolution", "open_slide", "tile_grid",
           "tissue_mask"]
