"""Per-slide preprocessing: tissue grid -> tile stream -> information scores -> selection -> ``<slide_id>.h5``.

:func:`preprocess_patches` opens a slide, lays a grid of global patches (``patch_size``
pixels at the read level) over the tissue found on a low-resolution thumbnail
(:func:`isg.io.tile_grid`), streams the tiles in batches (:func:`isg.io.iter_tiles`),
scores each with a selector (:func:`isg.select.get_selector`, Shannon by default),
keeps the informative ones (:func:`isg.select.select`) and returns them in memory as a
:class:`isg.data.patch_file.SlidePatches`; :func:`preprocess_slide` also writes, atomically,
``<out>/<slide_id>.h5`` (the patch file, whose layout :mod:`isg.data.patch_file` describes and owns)
and ``<out>/<slide_id>.png``, a thumbnail with kept patches outlined in green and dropped ones in red.

Damaged tiles never reach selection: with ``on_damaged="skip"`` (default) the patches touching them are
left out, listed and counted (``n_damaged``), and a slide with more than ``max_damaged`` (default 5%)
of its tissue patches damaged fails with an error naming the file and the count; ``"fail"`` fails on
the first one.

Every option is a field of :class:`PreprocessOptions` (the one definition of the defaults, which the
CLI reads); those that shape the patches are stored in the patch file (:meth:`PreprocessOptions.patch_options`).
:func:`preprocess_cohort` runs :func:`preprocess_slide` over many slides with the resumable cohort
runner (:func:`isg.pipeline.cohort.run_cohort`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from isg.data.manifest import slide_id_of
from isg.data.patch_file import SlidePatches, is_complete, write_patch_file
from isg.pipeline.cohort import on_dask, run_cohort
from isg.io import BATCH_SIZE, DAMAGED_LIMIT, LOCAL_SIZE, NUM_WORKERS, PATCH_SIZE, READERS, TARGET_MPP
from isg.select import SELECTORS, Selection, SelectionRule, apply_rule, get_selector, kept_record, select
from isg.utils import atomic_path


ON_DAMAGED = ("skip", "fail")
log = logging.getLogger(__name__)
PNG_SIZE = 1024  # longest side of the selection thumbnail (at least)


@dataclass(frozen=True)
class PreprocessOptions:
    """Options of :func:`preprocess_slide`; the one definition of their defaults (``isg preprocess`` reads them)."""

    patch_size: int = PATCH_SIZE  # p: global patch side in pixels (as encoded)
    local_size: int = LOCAL_SIZE  # q: local patch side; must divide p
    mpp: float | None = None  # target um/px of the patches (None: TARGET_MPP unless a level is given)
    level: int | None = None  # or read p px at this level, no resampling (no physical target)
    slide_mpp: float | None = None  # level-0 um/px for slides whose metadata lacks it
    selector: str = "shannon"  # a registered selector (isg.select.SELECTORS)
    rule: SelectionRule | None = None  # None: the selector's natural rule; "cohort" without threshold is
    #                                    frozen by preprocess_cohort over every slide's scores
    tissue_min: float = 0.05  # minimum tissue fraction of a patch on the thumbnail mask
    backend: str = "auto"  # slide reader (isg.io.open_slide)
    reader: str = READERS[0]  # tile decoding: the slide reader in threads, or "dali"
    on_damaged: str = ON_DAMAGED[0]  # "skip": leave out (and list) patches touching damaged tiles; "fail"
    max_damaged: float = DAMAGED_LIMIT  # a slide with a larger fraction of damaged patches fails
    batch_size: int = BATCH_SIZE
    num_workers: int = NUM_WORKERS  # tile reader threads per slide
    device: str = "cpu"  # device of the tile tensors
    thumbnail: bool = True  # write <slide_id>.png

    def __post_init__(self):
        if isinstance(self.rule, str):  # a kind name with its default parameters
            object.__setattr__(self, "rule", SelectionRule(self.rule))
        elif isinstance(self.rule, dict):  # serialised (patch file, pipeline.json)
            object.__setattr__(self, "rule", SelectionRule.from_dict(self.rule))
        elif self.rule is not None and not isinstance(self.rule, SelectionRule):
            raise ValueError(f"rule must be a SelectionRule, a rule name or None, got {self.rule!r}")

    @property
    def target_mpp(self) -> float | None:
        """The um/px patches are resized to: ``mpp``, else :data:`isg.io.TARGET_MPP` unless a ``level`` is given."""
        if self.mpp is not None:
            return self.mpp
        return None if self.level is not None else TARGET_MPP

    def selection_rule(self) -> SelectionRule:
        """The rule applied: :attr:`rule`, or the selector's natural rule; a ``"threshold"`` rule without
        a threshold gets the selector's default cut (Shannon: :func:`isg.select.default_threshold_bits`)."""
        return get_selector(self.selector).rule_for(self.rule, self.patch_size)

    def check(self) -> None:
        """Validate before any slide is opened; raises ValueError naming the option."""
        if not isinstance(self.patch_size, (int, np.integer)) or self.patch_size < 2:
            raise ValueError(f"patch_size must be an integer >= 2, got {self.patch_size!r}")
        if not isinstance(self.local_size, (int, np.integer)) or self.local_size < 1:
            raise ValueError(f"local_size must be a positive integer, got {self.local_size!r}")
        if self.patch_size % self.local_size:
            raise ValueError(f"local_size ({self.local_size}) must divide patch_size ({self.patch_size}) to tile each "
                             f"global patch into an S x S grid of local patches")
        if self.mpp is not None and self.level is not None:
            raise ValueError("give either mpp or level, not both")
        for name in ("mpp", "slide_mpp"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.level is not None and self.level < 0:
            raise ValueError(f"level must be >= 0, got {self.level!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"unknown selector {self.selector!r}; expected one of {', '.join(SELECTORS)}")
        rule = self.selection_rule()
        missing = [] if rule.pending else rule.missing()
        if missing:
            raise ValueError(f"rule {rule.rule!r} needs {', '.join(missing)}")
        if not 0 <= self.tissue_min <= 1:
            raise ValueError(f"tissue_min must be in [0, 1], got {self.tissue_min!r}")
        if self.reader not in READERS:
            raise ValueError(f"unknown reader {self.reader!r}; expected one of {', '.join(READERS)}")
        if self.on_damaged not in ON_DAMAGED:
            raise ValueError(f"on_damaged must be one of {', '.join(ON_DAMAGED)}, got {self.on_damaged!r}")
        if not 0 <= self.max_damaged <= 1:
            raise ValueError(f"max_damaged must be a fraction in [0, 1], got {self.max_damaged!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size!r}")


    def patch_options(self) -> dict:
        """The options that shape the patches (JSON-ready; stored in the patch file, reused by ``isg predict``).
        The rule is stored apart, as applied (:meth:`selection_rule`, with its cut)."""
        return {name: getattr(self, name) for name in PATCH_OPTIONS}


OPTION_NAMES = tuple(field.name for field in dataclasses.fields(PreprocessOptions))
PATCH_OPTIONS = ("patch_size", "local_size", "mpp", "level", "selector", "tissue_min", "on_damaged", "max_damaged")


def check_options(**options) -> None:
    """Validate preprocessing options (fields of :class:`PreprocessOptions`); raises ValueError naming the argument."""
    PreprocessOptions(**options).check()


def mask_size(slide, level0_patch_size: float, px_per_patch: int = 8, smallest: int = 512, largest: int = 2048) -> int:
    """Longest side of the tissue-mask thumbnail: ``px_per_patch`` mask pixels per patch side, within
    [``smallest``, ``largest``] and never above the slide's own size (the mask costs ~ its pixel count)."""
    longest = max(slide.dimensions)
    return int(min(longest, np.clip(math.ceil(px_per_patch * longest / level0_patch_size), smallest, largest)))


# ----------------------------------------------------------------------------- one slide, step by step


class _Clock:
    """Seconds per stage: ``lap(stage)`` adds the time since the previous lap to ``stage``."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self.last
        self.last = now

    def stats(self) -> dict[str, float]:
        return {**{f"seconds_{k}": round(v, 4) for k, v in self.seconds.items()},
                "seconds_total": round(time.perf_counter() - self.start, 4)}


@dataclass
class _Grid:
    """Where patches are read: ``read_size`` px at ``level`` (its ``downsample``) resized to p, and the tissue
    patches ``coords`` [N, 2]."""

    level: int
    read_size: int
    downsample: float
    level0_patch_size: int
    thumb: np.ndarray  # [h, w, 3] the thumbnail the tissue mask came from
    coords: np.ndarray  # [N, 2] level-0 (x, y)


def tissue_grid(slide, opts: PreprocessOptions) -> _Grid:
    """Step 1: the read level and size (:func:`isg.pipeline.scale.read_plan_of`) and the patches with enough tissue on the thumbnail."""
    from isg.io import tile_grid, tissue_mask
    from isg.pipeline.scale import read_plan_of

    level, read_size = read_plan_of(slide, opts)
    downsample = float(slide.level_downsamples[level])
    level0_patch_size = round(read_size * downsample)
    thumb, damaged = slide.thumbnail(mask_size(slide, level0_patch_size), with_damage=True)  # [h, w, 3], [h, w]
    # damaged tiles of the thumbnail count as tissue: their patches are read, found damaged, listed and counted
    mask = tissue_mask(slide, thumbnail=thumb) | damaged  # [h, w] bool
    coords = np.asarray(tile_grid(slide, read_size, level=level, tissue_min=opts.tissue_min, mask=mask),
                        dtype=np.int64).reshape(-1, 2)  # [N, 2] level-0 (x, y)
    if len(coords) == 0:
        raise ValueError(f"{slide.path}: no tissue found (no {read_size} px patch at level {level} "
                         f"has >= {opts.tissue_min:.0%} tissue on the thumbnail)")
    return _Grid(level, read_size, downsample, level0_patch_size, thumb, coords)


def score_patches(slide, grid: _Grid, opts: PreprocessOptions, clock: _Clock, progress=None, on_tiles=None):
    """Step 2: stream the patches and score each with the selector. Patches touching damaged tiles are left
    out and logged. ``on_tiles(coords [B, 2], tiles [B, p, p, 3] uint8, scores [B], most_kept=K)`` sees every
    scored batch (the tiles live in a reused buffer: copy what you keep; K: at most how many of the stream's
    patches the selection rule keeps, :meth:`SelectionRule.most_kept`); ``progress``: a
    :class:`~isg.pipeline.progress.SlideProgress` (or None).
    Returns ``(coords [N', 2] in stream order, scores float64 [N'], damaged log)``."""
    import torch

    from isg.io import DamagedTiles, iter_tiles

    score_fn = get_selector(opts.selector).for_slide(grid.thumb)  # e.g. Otsu's grey threshold of this slide
    damaged = DamagedTiles()
    batches = iter_tiles(slide, grid.coords, grid.read_size, level=grid.level, batch_size=opts.batch_size,
                         device=opts.device, num_workers=opts.num_workers, damaged=damaged, reader=opts.reader,
                         out_size=opts.patch_size)
    if progress is not None:
        progress.stage("read + score", len(grid.coords), "patches")
    # filled in place: small per-batch arrays kept in lists sat between the batches' freed buffers and made
    # the heap grow by ~0.4 MB per batch (0.5 GB over a 10^5 px slide's scoring pass)
    coords = np.empty((len(grid.coords), 2), np.int64)  # [N, 2]
    scores = np.empty(len(grid.coords), np.float64)  # [N]
    done = 0
    most_kept = opts.selection_rule().most_kept(len(grid.coords)) if on_tiles is not None else None
    with torch.inference_mode():
        for batch_coords, tiles in batches:  # [B, 2], [B, p, p, 3] uint8
            clock.lap("read")
            if done + len(batch_coords) > len(grid.coords):
                raise RuntimeError(f"{slide.path}: tile stream returned more tiles than the {len(grid.coords)} coordinates")
            rows = slice(done, done + len(batch_coords))
            scores[rows] = np.asarray(score_fn(tiles), dtype=np.float64).reshape(-1)
            coords[rows] = np.asarray(batch_coords, dtype=np.int64).reshape(-1, 2)
            done += len(batch_coords)
            if on_tiles is not None:  # isg predict keeps the best tiles: selected patches are read once
                on_tiles(coords[rows], tiles, scores[rows], most_kept=most_kept)
            if progress is not None:
                progress.update(len(batch_coords))
            clock.lap("score")
    coords, scores = coords[:done], scores[:done]
    if len(coords) + len(damaged) != len(grid.coords):
        raise RuntimeError(f"{slide.path}: tile stream returned {len(coords)} tiles (+{len(damaged)} damaged) "
                           f"for {len(grid.coords)} coordinates")
    return coords, scores, damaged


def check_damaged(slide, damaged, n_patches: int, opts: PreprocessOptions) -> None:
    """Step 3: fail the slide when damaged patches are not allowed or too many (the error names the file and the count)."""
    from isg.io import DamagedSlideError

    n = len(damaged)
    if n and opts.on_damaged == "fail":
        raise DamagedSlideError(slide.path, f"{n} of {n_patches} tissue patches touch damaged tiles (on_damaged='fail'): "
                                            f"{damaged.summary()}", n, n_patches)
    if n > opts.max_damaged * n_patches:
        raise DamagedSlideError(slide.path, f"{n} of {n_patches} tissue patches ({n / n_patches:.1%}) touch damaged tiles, "
                                            f"more than the {opts.max_damaged:.0%} allowed (max_damaged): "
                                            f"{damaged.summary()}", n, n_patches)
    if n == n_patches:
        raise DamagedSlideError(slide.path, f"all {n} tissue patches touch damaged tiles: {damaged.summary()}", n, n_patches)


def select_patches(scores: np.ndarray, rule: SelectionRule, name: str | None = None) -> Selection:
    """Step 4: the kept patches bool [N] and the cut (None for top-k) of ``rule`` (:meth:`PreprocessOptions.selection_rule`).
    A cohort-wide rule not frozen yet keeps nothing: :func:`preprocess_cohort` freezes it over every slide."""
    if rule.pending:
        return Selection(np.zeros(len(scores), dtype=bool), None)
    return select(scores, rule, name=name)


def write_outputs(out_dir: Path, patches: SlidePatches, thumbnail: bool = True) -> Path:
    """Step 5: ``<slide_id>.png`` (when ``thumbnail`` and the patches carry one) and the patch file
    ``<slide_id>.h5``, each written atomically; returns the patch file's path."""
    out_dir = Path(out_dir)
    if thumbnail and patches.thumbnail is not None:
        with atomic_path(out_dir / f"{patches.slide_id}.png") as tmp:
            save_selection_thumbnail(tmp, patches.thumbnail, patches.dimensions, patches.tissue_coords, patches.selected,
                                     patches.geometry.patch_size_level0, damaged=patches.damaged_coords)
    return write_patch_file(out_dir / f"{patches.slide_id}.h5", patches)


def _preprocess(slide_path, opts: PreprocessOptions, clock: _Clock, progress, on_tiles) -> SlidePatches:
    """Steps 1-4 on one slide (see :func:`preprocess_patches`); ``progress``: True (a bar of its own), a
    :class:`~isg.pipeline.progress.SlideProgress`, or False."""
    from isg.pipeline.progress import SlideProgress

    if progress is True:
        with SlideProgress(slide_id_of(slide_path), bar=True, log=None) as own:
            return _preprocess(slide_path, opts, clock, own, on_tiles)
    return _preprocess_slide(slide_path, opts, clock, progress or None, on_tiles)


def _preprocess_slide(slide_path, opts: PreprocessOptions, clock: _Clock, progress, on_tiles) -> SlidePatches:
    from isg.io import open_slide
    from isg.pipeline.scale import patch_geometry

    import isg

    with open_slide(slide_path, backend=opts.backend, mpp=opts.slide_mpp, max_damaged=opts.max_damaged) as slide:
        clock.lap("open")
        if progress is not None:
            progress.stage("tissue grid")
        grid = tissue_grid(slide, opts)
        clock.lap("grid")
        coords, scores, damaged = score_patches(slide, grid, opts, clock, progress, on_tiles)
        check_damaged(slide, damaged, len(grid.coords), opts)
        if progress is not None:
            progress.stage("select")
        rule = opts.selection_rule()
        selected, cut = select_patches(scores, rule, name=str(slide_path))
        if not rule.pending:
            kept_record(selected, name=str(slide_path))  # a warning names a slide under the floor
        clock.lap("select")
        thumb = grid.thumb
        if opts.thumbnail and max(thumb.shape[:2]) < min(PNG_SIZE, max(slide.dimensions)):
            thumb = slide.thumbnail(PNG_SIZE)  # the selection PNG (and isg predict's heatmaps) draw on it
        geometry = patch_geometry(slide, grid.level, grid.read_size, opts)
        return SlidePatches(
            slide_id=slide_id_of(slide_path),  # the input's name (a DICOM WSI folder opens one of its files)
            slide_path=str(Path(slide_path).resolve()), geometry=geometry, tissue_coords=coords, scores=scores,
            selected=selected, damaged_coords=damaged.coords, damaged_reasons=list(damaged.reasons),
            options=opts.patch_options(), rule=rule.to_dict(), cut=cut, backend=slide.backend, level0_mpp=slide.mpp,
            dimensions=tuple(int(v) for v in slide.dimensions), isg_version=isg.__version__,
            thumbnail=thumb if opts.thumbnail else None)


def _stats(patches: SlidePatches, clock: _Clock) -> dict:
    g = patches.geometry
    pending = patches.rule is not None and SelectionRule.from_dict(patches.rule).pending
    kept = {} if pending else kept_record(patches.selected, warn=False)  # kept_fraction, under_floor (summary.json)
    return {"n_tissue": patches.n_tissue, "n_kept": patches.n_selected, **kept, "n_damaged": len(patches.damaged_coords),
            "level": g.patch_level, "mpp": math.nan if g.mpp is None else float(g.mpp), "read_size": g.size_at_level,
            **clock.stats()}


def preprocess_patches(slide_path: str | os.PathLike, *, progress=False, on_tiles=None,
                       **options) -> tuple[SlidePatches, dict]:
    """One slide's patches in memory (nothing written) and its stats; see :func:`preprocess_slide`.

    The patches carry the display thumbnail (``thumbnail=True``, the default) for the selection PNG and
    ``isg predict``'s heatmaps.
    """
    opts = PreprocessOptions(**options)
    opts.check()
    clock = _Clock()
    patches = _preprocess(slide_path, opts, clock, progress, on_tiles)
    return patches, _stats(patches, clock)


def preprocess_slide(slide_path: str | os.PathLike, out_dir: str | os.PathLike, *, progress=False,
                     on_tiles=None, **options) -> dict:
    """Preprocess one slide into ``<out_dir>/<slide_id>.h5`` (+ ``.png``); returns its stats.

    ``options`` are the fields of :class:`PreprocessOptions`. Patches have one physical size: ``patch_size``
    pixels at ``mpp`` um/px (default :data:`isg.io.TARGET_MPP`, 0.5), read at the coarsest level at least that
    fine and resized on the fly (:func:`isg.io.read_plan`, as TRIDENT and CLAM do); with ``level`` they are
    ``patch_size`` pixels read at that level, not resampled. The patch file records both sizes and the patches'
    um/px (:class:`~isg.data.patch_file.PatchGeometry`). ``slide_mpp`` overrides the slide's level-0 mpp (for
    files without it; such a slide under the default target is read at level 0 unresampled, with a warning).
    ``rule``: a :class:`~isg.select.SelectionRule` (or a kind name), None for the selector's natural rule (Shannon: mean + 1 sigma of the slide's scores; Otsu: tissue
    fraction >= 0.5). ``"cohort"`` is the paper's rule: its ``threshold`` is the frozen cohort cut;
    without it the selection stays empty until :func:`preprocess_cohort` freezes the cut over every
    slide's scores. ``"threshold"`` without a threshold takes the selector's default cut
    (:func:`isg.select.default_threshold_bits` for Shannon). ``progress``: True for a bar of the slide's stages
    (a line at least every 2 s), or a :class:`~isg.pipeline.progress.SlideProgress` to report to.

    The method, step by step: :func:`tissue_grid` -> :func:`score_patches` -> :func:`check_damaged` ->
    :func:`select_patches` -> :func:`write_outputs`. Returns ``n_tissue`` (patches scored), ``n_kept``,
    ``n_damaged`` (patches left out: they touch damaged tiles), ``level``, ``mpp`` (um/px of the patches, NaN
    when unknown), ``read_size`` (pixels read at ``level`` per patch side) and
    ``seconds_<stage>`` for open, grid, read, score, select, write and total. ``on_tiles``: see :func:`score_patches`.
    """
    opts = PreprocessOptions(**options)
    opts.check()
    clock = _Clock()
    patches = _preprocess(slide_path, opts, clock, progress, on_tiles)
    write_outputs(Path(out_dir), patches, opts.thumbnail)
    clock.lap("write")
    return _stats(patches, clock)


def save_selection_thumbnail(path, thumb: np.ndarray, dimensions, coords: np.ndarray, selected: np.ndarray,
                             level0_patch_size: int, damaged: np.ndarray | None = None) -> None:
    """PNG of ``thumb`` [h, w, 3] with kept patches outlined green (tinted), dropped ones red and the patches
    left out for damaged tiles crossed out in magenta."""
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
    for x, y in (damaged if damaged is not None else np.zeros((0, 2))) * scale:
        draw.rectangle((x, y, x + side - 1, y + side - 1), outline=(230, 0, 230, 255))
        draw.line((x, y, x + side - 1, y + side - 1), fill=(230, 0, 230, 255))
        draw.line((x, y + side - 1, x + side - 1, y), fill=(230, 0, 230, 255))
    Image.alpha_composite(image, overlay).convert("RGB").save(path, format="PNG")


# ----------------------------------------------------------------------------- cohorts


def _warn_under_floor(summary) -> None:
    """One warning naming every slide of this run whose selection is under the floor (``under_floor`` in
    summary.json): worker processes' own warnings do not reach the caller."""
    import warnings

    from isg.select import KEEP_FLOOR, KEEP_FLOOR_PATCHES, SelectionWarning
    from isg.utils import list_some

    under = [f"{r.name} ({r.stats['n_kept']} of {r.stats['n_tissue']})" for r in summary.done if r.stats.get("under_floor")]
    if under:
        warnings.warn(f"isg preprocess: {len(under)} slide(s) keep under the floor ({KEEP_FLOOR:.0%} of their tissue "
                      f"patches or {KEEP_FLOOR_PATCHES} patches): {list_some(under)}", SelectionWarning, stacklevel=3)


class _PreprocessOne:
    """``preprocess_slide`` for one slide of a cohort, with its mpp from ``slide_mpps`` (picklable for process pools)."""

    def __init__(self, out_dir: Path, options: dict, slide_mpps: Mapping[str, float], progress: bool):
        self.out_dir, self.options, self.slide_mpps, self.progress = out_dir, options, dict(slide_mpps), progress

    def __call__(self, slide) -> dict:
        options = self.options
        mpp = self.slide_mpps.get(slide_id_of(slide))
        if mpp is not None:
            options = {**options, "slide_mpp": mpp}
        return preprocess_slide(slide, self.out_dir, progress=self.progress, **options)


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
    slide_mpps: Mapping[str, float] | None = None,
    **options,
):
    """:func:`preprocess_slide` for every slide (``options`` are :class:`PreprocessOptions` fields) with
    :func:`isg.pipeline.cohort.run_cohort`: finished slides are skipped, failures recorded, and
    ``<out_dir>/summary.json`` written; ``progress``: cohort bar and summary table,
    ``tile_progress``: a tile bar per slide (for one slide at a time). ``slide_mpps`` ({slide id: mpp},
    see :func:`isg.pipeline.scale.read_mpp_csv`) overrides ``slide_mpp`` per slide. Returns the :class:`~isg.pipeline.cohort.CohortSummary`."""
    from isg.io import native_messages, release_buffers
    from isg.pipeline.scale import scale_mix

    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"preprocess_cohort: unknown option(s) {', '.join(unknown)}; expected {', '.join(OPTION_NAMES)}")
    check_options(**options)
    out_dir = Path(out_dir)
    slides = [Path(s) for s in slides]
    if on_dask(scheduler):  # the workers' working directory may be another one
        out_dir, slides = out_dir.absolute(), [s.absolute() for s in slides]
    process = _PreprocessOne(out_dir, options, slide_mpps or {}, tile_progress)
    messages = native_messages()
    try:
        summary = run_cohort(
            slides, process, lambda s: out_dir / f"{slide_id_of(s)}.h5", scheduler=scheduler, workers=workers,
            resources=resources, overwrite=overwrite, progress=progress, name_of=slide_id_of, is_complete=is_complete,
            summary_path=out_dir / "summary.json", title="isg preprocess",
        )
        mixed = scale_mix({r.name: r.stats.get("mpp") for r in summary.results if r.status != "failed"})
        if mixed:
            log.warning("isg preprocess: %s", mixed)
        rule = PreprocessOptions(**options).selection_rule()
        if rule.pending:
            done = [out_dir / f"{slide_id_of(s)}.h5" for s in slides if is_complete(out_dir / f"{slide_id_of(s)}.h5")]
            if done:  # freeze the cut over the scores of every finished slide (selection.json)
                apply_rule(done, rule)
        _warn_under_floor(summary)
        return summary
    finally:
        release_buffers()  # the pooled tile batch buffers of this run
        if native_messages() > messages:  # decoder output was captured, not printed (in this process)
            log.info("isg preprocess: %d line(s) of decoder output captured; DEBUG logging on 'isg.io' shows them",
                     native_messages() - messages)
