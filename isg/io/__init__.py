"""Slides and tiles: readers behind one :class:`Slide` interface (:func:`open_slide`), damaged-tile
detection (:mod:`isg.io.damage`), a tissue prefilter, tile grids, batched tile streaming
(:func:`iter_tiles`, :func:`iter_tiles_dali`), two-level tiling (:func:`local_grid`) and a synthetic
cohort generator (:mod:`isg.io.synth`)."""

from isg.io.dali import dali_available, iter_tiles_dali
from isg.io.damage import DAMAGED_LIMIT, DamagedSlideError, DamagedTileError, DamagedTiles
from isg.io.slide import (BACKENDS, MIN_SLIDE_SIZE, SUPPORTED_SUFFIXES, Slide, SlideError, mpp_from_description,
                          mpp_from_ome, mpp_from_resolution, open_slide)
from isg.io.tiles import (BATCH_SIZE, LOCAL_SIZE, NUM_WORKERS, PATCH_SIZE, READERS, box_fraction, grid_level, iter_tiles, local_grid,
                          otsu_threshold, release_buffers, tile_grid, tissue_mask)
from isg.utils import native_messages, quiet_cucim, quiet_native_output  # C-library output, shared with the root

__all__ = ["BACKENDS", "BATCH_SIZE", "NUM_WORKERS", "DAMAGED_LIMIT", "LOCAL_SIZE", "PATCH_SIZE", "MIN_SLIDE_SIZE", "READERS", "SUPPORTED_SUFFIXES",
           "DamagedSlideError", "DamagedTileError", "DamagedTiles", "Slide", "SlideError", "box_fraction",
           "dali_available", "grid_level", "iter_tiles", "iter_tiles_dali", "local_grid", "mpp_from_description",
           "mpp_from_ome", "mpp_from_resolution", "native_messages", "open_slide", "otsu_threshold",
           "quiet_cucim", "quiet_native_output", "release_buffers", "tile_grid", "tissue_mask"]
