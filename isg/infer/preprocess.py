"""Per-slide preprocessing: tissue grid -> tile stream -> information scores -> selection -> ``<slide_id>.h5``.

:func:`preprocess_slide` opens a slide, lays a grid of global patches (``patch_size``
pixels at the read level) over the tissue found on a low-resolution thumbnail
(:func:`isg.io.tile_grid`), streams the tiles in batches (:func:`isg.io.iter_tiles`),
scores each with a selector (:func:`isg.select.get_selector`, Shannon by default),
keeps the informative ones (:func:`isg.select.select`) and writes, atomically,

``<out>/<slide_id>.h5``
    ``coords`` int64 [M, 2]   level-0 (x, y) of the selected patches (CLAM/TRIDENT layout), attrs
                              ``patch_size`` (p, px at the read level), ``patch_level``, ``level0_patch_size``,
                              ``downsample``, ``level_dim``, ``mpp`` (at the read level), ``local_size`` (q),
                              ``selector``, ``rule``, ``threshold`` (effective cut, NaN for top-k), ``k``, ``n_sigma``
    ``all_coords`` int64 [N, 2]  every tissue patch scored; ``scores`` float64 [N]; ``selected`` bool [N]
    root attrs ``slide_id``, ``slide_path``, ``isg_version``, ``backend``, ``level0_mpp``, ``dimensions``

and ``<out>/<slide_id>.png``, a thumbnail with kept patches outlined in green and dropped ones in red.

Local patches are not stored: they are implied by ``coords`` and ``local_size``. The
selected global patch at level-0 (x, y) holds S x S local patches (S = p / q), local
patch (i, j) (row i, column j) having its top-left at level 0
``(x + j * q * downsample, y + i * q * downsample)`` and size q at ``patch_level``
(:func:`isg.io.local_grid` computes them).

:func:`preprocess_cohort` runs :func:`preprocess_slide` over many slides with the
resumable cohort runner (:func:`isg.infer.cohort.run_cohort`).
"""

from __future__ import annotations

import functools
import inspect
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from isg.utils import atomic_path
from isg.data.manifest import slide_id_of
from isg.infer.cohort import run_cohort
from isg.select.rules import DEFAULT_RULE, RULES, SelectionRule, mean_std_threshold
PNG_SIZE = 1024  # longest side of the selection thumbnail (at least)


def check_options(*, patch_size: int, local_size: int, mpp: float | None = None, level: int | None = None,
                  selector: str = "shannon", rule: str = DEFAULT_RULE.rule, threshold: float | None = None,
                  k: int | None = None, n_sigma: float = DEFAULT_RULE.n_sigma, batch_size: int = 64) -> None:
    """Validate preprocessing options before any slide is opened; raises ValueError naming the argument."""
    from isg.select import SELECTORS

    if not isinstance(patch_size, (int, np.integer)) or patch_size < 2:
        raise ValueError(f"patch_size must be an integer >= 2, got {patch_size!r}")
    if not isinstance(local_size, (int, np.integer)) or local_size < 1:
        raise ValueError(f"local_size must be a positive integer, got {local_size!r}")
    if patch_size % local_size:
        raise ValueError(f"local_size ({local_size}) must divide patch_size ({patch_size}) to tile each global patch "
                         f"into an S x S grid of local patches")
    if mpp is not None and level is not None:
        raise ValueError("give either mpp or level, not both")
    if mpp is not None and not (mpp > 0 and math.isfinite(mpp)):
        raise ValueError(f"mpp must be a positive number, got {mpp!r}")
    if level is not None and level < 0:
        raise ValueError(f"level must be >= 0, got {level!r}")
    if selector not in SELECTORS:
        raise ValueError(f"unknown selector {selector!r}; expected one of {', '.join(SELECTORS)}")
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    if rule == "threshold" and threshold is None and selector != "shannon":
        raise ValueError(f"rule 'threshold' with selector {selector!r} needs an explicit threshold "
                         f"(the default threshold is in bits, for the shannon selector only)")
    if rule == "topk" and (k is None or k < 1):
        raise ValueError(f"rule 'topk' needs k >= 1, got k={k!r}")
    if not n_sigma == n_sigma:  # NaN
        raise ValueError("n_sigma must be a number")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


def resolve_threshold(scores: np.ndarray, *, selector: str, rule: str, patch_size: int,
                      threshold: float | None, n_sigma: float) -> float | None:
    """The absolute cut a rule applies (None for top-k).

    ``threshold``: the given value, else :func:`isg.select.default_threshold_bits` (Shannon bits);
    ``mean_std``: mean + n_sigma * std of this slide's scores; ``cohort``: the frozen cohort cut
    ``threshold`` (NaN while it is pending: :func:`preprocess_cohort` sets it once every slide is scored).
    """
    if rule == "threshold":
        if threshold is not None:
            return float(threshold)
        from isg.select import default_threshold_bits

        return float(default_threshold_bits(patch_size))
    if rule == "mean_std":
        return mean_std_threshold(scores, n_sigma) if len(scores) else math.nan
    if rule == "cohort":
        return float(threshold) if threshold is not None else math.nan
    return None


def mask_size(slide, level0_patch_size: float, px_per_patch: int = 8, smallest: int = 512, largest: int = 2048) -> int:
    """Longest side of the tissue-mask thumbnail: ``px_per_patch`` mask pixels per patch side, within
    [``smallest``, ``largest``] and never above the slide's own size (the mask costs ~ its pixel count)."""
    longest = max(slide.dimensions)
    return int(min(longest, np.clip(math.ceil(px_per_patch * longest / level0_patch_size), smallest, largest)))


def h5_complete(path: str | os.PathLike) -> bool:
    """True for a finished preprocess output (an .h5 that opens and holds ``coords`` and ``selected``)."""
    import h5py

    path = Path(path)
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            return "coords" in f and "selected" in f and "patch_size" in f["coords"].attrs
    except OSError:  # not an HDF5 file (foreign or damaged): redo it
        return False


def preprocess_slide(
    slide_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    patch_size: int = 256,
    local_size: int = 64,
    mpp: float | None = None,
    level: int | None = None,
    slide_mpp: float | None = None,
    selector: str = "shannon",
    rule: str = DEFAULT_RULE.rule,
    threshold: float | None = None,
    k: int | None = None,
    n_sigma: float = DEFAULT_RULE.n_sigma,
    tissue_min: float = 0.05,
    backend: str = "auto",
    batch_size: int = 64,
    num_workers: int = 4,
    device: str = "cpu",
    thumbnail: bool = True,
    progress: bool = False,
) -> dict:
    """Preprocess one slide into ``<out_dir>/<slide_id>.h5`` (+ ``.png``); returns its stats.

    Patches are ``patch_size`` pixels at ``level`` (default 0) or at the level chosen for
    ``mpp`` (``slide.best_level_for_mpp``: the coarsest level at least as fine, no
    resampling; the h5 records the actual mpp). ``slide_mpp`` overrides the slide's
    level-0 mpp (for files without it). ``rule``: ``"mean_std"`` (paper: keep patches
    above mean + ``n_sigma`` std of the slide's scores), ``"threshold"`` (``threshold``,
    default :func:`isg.select.default_threshold_bits`), ``"topk"`` (``k`` best) or ``"cohort"`` (the paper's
    rule: ``threshold`` is the frozen cohort cut; without it the selection is left empty until
    :func:`preprocess_cohort` freezes the cut over every slide's scores).

    Returns ``n_tissue`` (patches scored), ``n_kept``, ``level``, ``mpp`` and
    ``seconds_<stage>`` for open, grid, read, score, select, write and total.
    """
    import h5py
    import torch

    import isg
    from isg.io import iter_tiles, open_slide, tile_grid, tissue_mask
    from isg.select import get_selector, otsu_grey_threshold, select

    check_options(patch_size=patch_size, local_size=local_size, mpp=mpp, level=level, selector=selector, rule=rule,
                  threshold=threshold, k=k, n_sigma=n_sigma, batch_size=batch_size)
    slide_path, out_dir = Path(slide_path), Path(out_dir)
    slide_id = slide_id_of(slide_path)
    seconds: dict[str, float] = {}
    clock = [time.perf_counter()]
    start = clock[0]

    def lap(stage: str) -> None:
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock[0]
        clock[0] = now

    with open_slide(slide_path, backend=backend, mpp=slide_mpp) as slide:
        read_level = slide.best_level_for_mpp(mpp) if mpp is not None else (level or 0)
        if read_level >= slide.level_count:
            raise ValueError(f"{slide_path}: level {read_level} out of range (slide has {slide.level_count} levels)")
        downsample = float(slide.level_downsamples[read_level])
        read_mpp = float(slide.level_mpp(read_level))
        lap("open")

        level0_patch_size = round(patch_size * downsample)
        thumb = slide.thumbnail(mask_size(slide, level0_patch_size))  # [h, w, 3]
        mask = tissue_mask(slide, thumbnail=thumb)  # [h, w] bool
        all_coords = np.asarray(tile_grid(slide, patch_size, level=read_level, tissue_min=tissue_min, mask=mask),
                                dtype=np.int64).reshape(-1, 2)  # [N, 2] level-0 (x, y)
        if len(all_coords) == 0:
            raise ValueError(f"{slide_path}: no tissue found (no {patch_size} px patch at level {read_level} "
                             f"has >= {tissue_min:.0%} tissue on the thumbnail)")
        lap("grid")

        # Otsu (HE2RNA-style tissue fraction) needs one grey threshold per slide, not per batch
        score_fn = get_selector(selector, threshold=otsu_grey_threshold(thumb)) if selector == "otsu" else get_selector(selector)
        scores = np.empty(len(all_coords), np.float64)
        order = []  # [N] rows of all_coords in stream order
        filled = 0
        tiles_iter = iter_tiles(slide, all_coords, patch_size, level=read_level, batch_size=batch_size,
                                device=device, num_workers=num_workers)
        if progress:
            from tqdm.auto import tqdm

            tiles_iter = tqdm(tiles_iter, total=math.ceil(len(all_coords) / batch_size), desc=slide_id,
                              unit="batch", leave=False)
        with torch.inference_mode():
            for batch_coords, tiles in tiles_iter:  # [B, 2], [B, p, p, 3] uint8
                lap("read")
                batch_scores = np.asarray(score_fn(tiles), dtype=np.float64).reshape(-1)  # [B]
                scores[filled:filled + len(batch_scores)] = batch_scores
                order.append(np.asarray(batch_coords, dtype=np.int64).reshape(-1, 2))
                filled += len(batch_scores)
                lap("score")
        if filled != len(all_coords):
            raise RuntimeError(f"{slide_path}: tile stream returned {filled} tiles for {len(all_coords)} coordinates")
        all_coords = np.concatenate(order)  # the stream's order (== grid order for in-order readers)

        cut = resolve_threshold(scores, selector=selector, rule=rule, patch_size=patch_size,
                                threshold=threshold, n_sigma=n_sigma)
        if rule == "cohort" and threshold is None:  # pending: the cut is frozen over the whole cohort
            selected = np.zeros(len(scores), dtype=bool)
        else:
            selected = np.asarray(select(scores, rule=rule, threshold=cut if rule in ("threshold", "cohort") else None,
                                         k=k, n_sigma=n_sigma, name=str(slide_path)), dtype=bool)
        lap("select")

        if thumbnail:
            if max(thumb.shape[:2]) < min(PNG_SIZE, max(slide.dimensions)):
                thumb = slide.thumbnail(PNG_SIZE)
            with atomic_path(out_dir / f"{slide_id}.png") as tmp:
                save_selection_thumbnail(tmp, thumb, slide.dimensions, all_coords, selected, level0_patch_size)
        with atomic_path(out_dir / f"{slide_id}.h5") as tmp, h5py.File(tmp, "w") as f:
            f.attrs.update(slide_id=slide_id, slide_path=str(slide_path.resolve()), isg_version=isg.__version__,
                           backend=slide.backend, level0_mpp=slide.mpp, dimensions=np.asarray(slide.dimensions))
            coords = f.create_dataset("coords", data=all_coords[selected])  # [M, 2]
            coords.attrs.update(
                patch_size=patch_size, patch_level=read_level, level0_patch_size=level0_patch_size,
                downsample=np.asarray([downsample, downsample]), level_dim=np.asarray(slide.level_dimensions[read_level]),
                mpp=read_mpp, local_size=local_size, selector=selector, rule=rule,
                threshold=math.nan if cut is None else cut, k=-1 if k is None else k, n_sigma=n_sigma,
                tissue_min=tissue_min, name=slide_id,
            )
            f.create_dataset("all_coords", data=all_coords)  # [N, 2]
            f.create_dataset("scores", data=scores)  # [N]
            f.create_dataset("selected", data=selected)  # [N]
        lap("write")

    seconds["total"] = time.perf_counter() - start
    return {"n_tissue": int(len(all_coords)), "n_kept": int(selected.sum()), "level": read_level,
            "mpp": read_mpp, **{f"seconds_{stage}": round(value, 4) for stage, value in seconds.items()}}


def save_selection_thumbnail(path, thumb: np.ndarray, dimensions, coords: np.ndarray, selected: np.ndarray,
                             level0_patch_size: int) -> None:
    """PNG of ``thumb`` [h, w, 3] with kept patches outlined green (tinted) and dropped ones red."""
    from PIL import Image, ImageDraw

    image = Image.fromarray(np.ascontiguousarray(thumb)).convert("RGBA")
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    scale = image.size[0] / dimensions[0]
    side = max(1.0, level0_patch_size * scale)
    for (x, y), keep in zip(coords * scale, selected):
        box = (x, y, x + side - 1, y + side - 1)
        if keep:
            draw.rectangle(box, fill=(0, 200, 0, 60), outline=(0, 160, 0, 255))
        else:
            draw.rectangle(box, outline=(220, 0, 0, 200))
    Image.alpha_composite(image, overlay).convert("RGB").save(path, format="PNG")


def preprocess_cohort(
    slides: Iterable[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    scheduler=None,
    workers: int | None = None,
    resources: dict | None = None,
    overwrite: bool = False,
    progress: bool = True,
    tile_progress: bool = False,
    **options,
):
    """:func:`preprocess_slide` for every slide (``options`` are its keyword arguments) with
    :func:`isg.infer.cohort.run_cohort`: finished slides are skipped, failures recorded, and
    ``<out_dir>/summary.json`` written; ``progress``: cohort bar and summary table,
    ``tile_progress``: a tile bar per slide (for one slide at a time). Returns the :class:`~isg.infer.cohort.CohortSummary`."""

    slide_options = set(inspect.signature(preprocess_slide).parameters) - {"slide_path", "out_dir", "progress"}
    unknown = sorted(set(options) - slide_options)
    if unknown:
        raise TypeError(f"preprocess_cohort: unknown option(s) {', '.join(unknown)}; expected {', '.join(sorted(slide_options))}")
    checked = inspect.signature(check_options).parameters
    check_options(**{k: v for k, v in {"patch_size": 256, "local_size": 64, **options}.items() if k in checked})
    out_dir = Path(out_dir)
    slides = [Path(s) for s in slides]
    process = functools.partial(preprocess_slide, out_dir=out_dir, progress=tile_progress, **options)
    summary = run_cohort(
        slides, process, lambda s: out_dir / f"{slide_id_of(s)}.h5", scheduler=scheduler, workers=workers,
        resources=resources, overwrite=overwrite, progress=progress, name_of=slide_id_of, is_complete=h5_complete,
        summary_path=out_dir / "summary.json", title="isg preprocess",
    )
    if options.get("rule") == "cohort" and options.get("threshold") is None:
        from isg.select import apply_rule

        done = [out_dir / f"{slide_id_of(s)}.h5" for s in slides if h5_complete(out_dir / f"{slide_id_of(s)}.h5")]
        if done:  # freeze mean + n_sigma std over the scores of every finished slide (selection.json)
            apply_rule(done, SelectionRule("cohort", n_sigma=options.get("n_sigma", DEFAULT_RULE.n_sigma)))
    return summary
