"""The physical scale of a cohort's patches: per-slide level-0 mpp tables and the one-scale check.

Patches of one cohort have one physical size by default (:data:`isg.io.TARGET_MPP` um/px, resized on the
fly, :func:`isg.io.read_plan`): :func:`read_plan_of` picks a slide's read level and size for the preprocess
options, :func:`patch_geometry` is what the patch file records of it. :func:`read_mpp_csv` gives slides
without mpp metadata theirs; :func:`scale_mix` says when a cohort's patches would still mix scales
(``--level`` without a target, slides without mpp), naming the scales and their slides.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path

from isg.data.manifest import slide_id_of
from isg.data.patch_file import PatchGeometry
from isg.io import MPP_TOLERANCE, TARGET_MPP

log = logging.getLogger(__name__)


def read_mpp_csv(path: str | os.PathLike) -> dict[str, float]:
    """Per-slide level-0 mpp from a CSV/TSV with columns ``slide`` (file name, path or slide id) and ``mpp``;
    returns {slide id: mpp}. Raises ValueError naming the file and the bad row."""
    from isg.utils import read_text_table

    path = Path(path)
    table = read_text_table(path, "mpp table")
    table.columns = table.columns.str.lower()
    if not {"slide", "mpp"} <= set(table.columns):
        raise ValueError(f"{path}: needs columns slide, mpp (has: {', '.join(table.columns)})")
    mpps: dict[str, float] = {}
    for row, (name, text) in enumerate(zip(table["slide"].str.strip(), table["mpp"].str.strip()), start=2):
        try:
            mpp = float(text)
        except ValueError:
            mpp = math.nan
        if not (mpp > 0 and math.isfinite(mpp)):
            raise ValueError(f"{path}: line {row}: mpp must be a positive number, got {text!r} for {name!r}")
        slide_id = slide_id_of(name)
        if slide_id in mpps and mpps[slide_id] != mpp:
            raise ValueError(f"{path}: line {row}: slide {slide_id!r} is given two mpp values ({mpps[slide_id]}, {mpp})")
        mpps[slide_id] = mpp
    return mpps


def read_plan_of(slide, opts) -> tuple[int, int]:
    """``(level, read_size)`` of :func:`isg.io.read_plan` for the target of ``opts`` (a
    :class:`~isg.pipeline.preprocess.PreprocessOptions`); a slide without mpp under the
    default target is read at level 0 without resampling (logged: its physical scale is unknown)."""
    from isg.io import read_plan

    target = opts.target_mpp
    if target is not None and slide.mpp is None and opts.mpp is None:
        log.warning("%s: no mpp in the metadata, so patches cannot be resized to %g um/px; reading %d px at level 0 "
                    "(give --slide-mpp / --mpp-csv for one physical scale, or --level)", slide.path, target, opts.patch_size)
        target = None
    return read_plan(slide, opts.patch_size, target, opts.level)


def patch_geometry(slide, level: int, read_size: int, opts) -> PatchGeometry:
    """The geometry the patch file records for ``read_size`` px read at ``level`` and resized to
    ``opts.patch_size``: sizes at the level, at level 0 and as encoded, and the patches' um/px."""
    downsample = float(slide.level_downsamples[level])
    level_mpp = slide.level_mpp(level)
    mpp = None if level_mpp is None else level_mpp * read_size / opts.patch_size  # um/px of the patch pixels
    return PatchGeometry(opts.patch_size, level, round(read_size * downsample), downsample,
                         tuple(int(v) for v in slide.level_dimensions[level]), mpp, opts.local_size,
                         None if read_size == opts.patch_size else read_size)


def scale_mix(patch_mpps: Mapping[str, float | None], tolerance: float = MPP_TOLERANCE) -> str | None:
    """None when every slide's patches have one um/px (within ``tolerance``), else a message naming the scales
    and their slides: features and models would mix magnifications (read with a target ``mpp`` instead)."""
    groups: dict[str, list[str]] = {}
    for name, mpp in patch_mpps.items():
        known = mpp is not None and math.isfinite(float(mpp))
        key = "unknown"
        if known:
            key = next((k for k in groups if k != "unknown" and abs(float(k) / float(mpp) - 1) <= tolerance), f"{float(mpp):.4g}")
        groups.setdefault(key, []).append(name)
    if len(groups) <= 1:
        return None
    from isg.utils import list_some

    scales = "; ".join(f"{key} um/px: {list_some(names, 3)}" for key, names in sorted(groups.items()))
    return (f"patches of this cohort have {len(groups)} physical scales ({scales}); read them at one target "
            f"(--mpp, default {TARGET_MPP} um/px without --level; --slide-mpp / --mpp-csv for slides without mpp)")
