"""Slides and tiles: one :class:`Slide` interface with one module per backend (:mod:`isg.io.backends`,
registered in :mod:`isg.io.registry`, opened by :func:`open_slide`), slide discovery (:func:`find_slides`),
damaged-tile detection (:mod:`isg.io.damage`), a tissue prefilter, tile grids, batched tile streaming
(:func:`iter_tiles`, :func:`iter_tiles_dali`), two-level tiling (:func:`local_grid`) and a synthetic
cohort generator (:mod:`isg.io.synth`)."""

from isg.io.backends import CuCIMSlide, ImageSlide, NvImgCodecSlide, OpenSlideSlide, TiffSlide
from isg.io.dali import dali_available, iter_tiles_dali
from isg.io.damage import DAMAGED_LIMIT, DamagedSlideError, DamagedTileError, DamagedTiles
from isg.io.discovery import SlideListError, find_slides, is_dicom_folder, slide_suffixes, slides_in
from isg.io.metadata import mpp_from_description, mpp_from_ome, mpp_from_resolution
from isg.io.registry import (backend_available, backend_names, backend_spec, open_slide, register_backend,
                             supported_suffixes, unregister_backend)
from isg.io.slide import MIN_SLIDE_SIZE, MPP_TOLERANCE, HostTileReader, Slide, SlideError, TileReader
from isg.io.tiles import (BATCH_SIZE, LOCAL_SIZE, NUM_WORKERS, PATCH_SIZE, READERS, TARGET_MPP, box_fraction, grid_level,
                          iter_tiles, local_grid, otsu_threshold, read_plan, release_buffers, resize_tiles, tile_grid,
                          tissue_mask)
from isg.utils import native_messages, quiet_cucim, quiet_native_output  # C-library output, shared with the root

BACKENDS = backend_names()  # the built-in backends, registration order
SUPPORTED_SUFFIXES = supported_suffixes()

__all__ = ["BACKENDS", "BATCH_SIZE", "NUM_WORKERS", "DAMAGED_LIMIT", "LOCAL_SIZE", "PATCH_SIZE", "MIN_SLIDE_SIZE", "READERS", "SUPPORTED_SUFFIXES",
           "MPP_TOLERANCE",
           "TARGET_MPP",
           "CuCIMSlide", "DamagedSlideError", "DamagedTileError", "DamagedTiles", "HostTileReader", "ImageSlide",
           "NvImgCodecSlide", "OpenSlideSlide", "Slide", "SlideError", "SlideListError", "TiffSlide", "TileReader",
           "backend_available", "backend_names", "backend_spec", "box_fraction", "dali_available", "find_slides",
           "grid_level", "is_dicom_folder", "iter_tiles", "iter_tiles_dali", "local_grid", "mpp_from_description",
           "mpp_from_ome", "mpp_from_resolution", "native_messages", "open_slide", "otsu_threshold", "quiet_cucim", "read_plan", "resize_tiles",
           "quiet_native_output", "register_backend", "release_buffers", "slide_suffixes", "slides_in",
           "supported_suffixes", "tile_grid", "tissue_mask", "unregister_backend"]
