"""``isg preprocess``: select informative patches of every slide into ``<out>/<slide_id>.h5``.

Exit code 0 when every slide is done (or was already), 1 when some failed (they
are listed; the others are finished), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from isg.cli._cluster import add_scheduler_arguments, scheduler_from_args
from isg.cli._rules import add_rule_arguments, rule_from_args
from isg.cli._slides import add_slide_arguments, slides_from_args


def register(subparsers) -> None:
    from isg.pipeline.preprocess import ON_DAMAGED, PreprocessOptions
    from isg.io import BACKENDS, READERS, TARGET_MPP
    from isg.select import SELECTORS

    defaults = PreprocessOptions()  # the one definition of every default
    parser = subparsers.add_parser(
        "preprocess", help="tissue grid + patch selection per slide -> <out>/<slide_id>.h5",
        description="Score every tissue patch of each slide (Shannon information by default), keep the informative "
                    "ones and write <out>/<slide_id>.h5 (coords, scores, selection) plus a thumbnail PNG. Finished "
                    "slides are skipped on a rerun; failing slides are reported and skipped. Patches touching damaged "
                    "tiles of the file are left out, listed in the h5 and counted (n_damaged).")
    add_slide_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    group = parser.add_argument_group("patches")
    group.add_argument("--patch-size", type=int, default=defaults.patch_size,
                       help=f"global patch size p in pixels as encoded, at --mpp (default {defaults.patch_size})")
    group.add_argument("--local-size", type=int, default=defaults.local_size,
                       help=f"local patch size q; must divide p (default {defaults.local_size})")
    group.add_argument("--mpp", type=float,
                       help=f"one physical scale per cohort: patches of p px at this um/px, read at the coarsest level at "
                            f"least as fine and resized on the fly (default {TARGET_MPP} unless --level is given)")
    group.add_argument("--level", type=int, help="read p px at this pyramid level instead, no resampling (slides of "
                                                 "different magnifications then get patches of different physical sizes)")
    group.add_argument("--slide-mpp", type=float, help="level-0 um/px for slides whose metadata lacks it")
    group.add_argument("--mpp-csv", help="CSV/TSV with columns slide, mpp: level-0 um/px per slide (file name, path or "
                                         "slide id), for slides whose metadata lacks it; overrides --slide-mpp")
    group.add_argument("--tissue-min", type=float, default=defaults.tissue_min,
                       help=f"min tissue fraction of a patch on the thumbnail (default {defaults.tissue_min})")
    group = parser.add_argument_group("selection")
    group.add_argument("--selector", default=defaults.selector,
                       help=f"{', '.join(SELECTORS)} (default {defaults.selector})")
    add_rule_arguments(group)
    group = parser.add_argument_group("damaged tiles")
    group.add_argument("--on-damaged", choices=ON_DAMAGED, default=defaults.on_damaged,
                       help=f"skip: leave out (and list) patches touching damaged tiles; fail: fail the slide "
                            f"(default {defaults.on_damaged})")
    group.add_argument("--max-damaged", type=float, default=defaults.max_damaged,
                       help=f"fail a slide when more than this fraction of its tissue patches touch damaged tiles "
                            f"(default {defaults.max_damaged:g})")
    group = parser.add_argument_group("execution")
    group.add_argument("--backend", default=defaults.backend,
                       help=f"slide reader: auto, {', '.join(BACKENDS)} (default {defaults.backend})")
    group.add_argument("--reader", choices=READERS, default=defaults.reader,
                       help=f"tile decoding: threads (the slide reader) or dali (NVIDIA DALI; whole JPEG tiles of a "
                            f"TIFF, --patch-size = tile size) (default {defaults.reader})")
    group.add_argument("--device", default=defaults.device, help=f"device of the tile tensors (cpu, cuda; default {defaults.device})")
    group.add_argument("--batch-size", type=int, default=defaults.batch_size, help=f"tiles per batch (default {defaults.batch_size})")
    group.add_argument("--num-workers", type=int, default=defaults.num_workers,
                       help=f"tile reader threads per slide (default {defaults.num_workers})")
    add_scheduler_arguments(group, "slides in parallel (threads/processes; default min(4, cpus))")
    group.add_argument("--overwrite", action="store_true", help="redo slides whose output exists")
    group.add_argument("--no-thumbnail", dest="thumbnail", action="store_false", help="skip the thumbnail PNGs")
    group.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from isg.cli import CLIError
    from isg.data.manifest import slide_id_of
    from isg.pipeline.preprocess import check_options, preprocess_cohort
    from isg.pipeline.scale import read_mpp_csv

    slides = slides_from_args(args)
    ids: dict[str, Path] = {}
    for slide in slides:
        slide_id = slide_id_of(slide)
        if slide_id in ids:
            raise CLIError(f"slide id {slide_id!r} given twice ({ids[slide_id]} and {slide}): slide ids (file names "
                           f"without extension) name the outputs and must be unique")
        ids[slide_id] = slide
    options = dict(patch_size=args.patch_size, local_size=args.local_size, mpp=args.mpp, level=args.level,
                   slide_mpp=args.slide_mpp, selector=args.selector, tissue_min=args.tissue_min, backend=args.backend,
                   reader=args.reader, on_damaged=args.on_damaged, max_damaged=args.max_damaged,
                   batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, thumbnail=args.thumbnail)
    try:
        options["rule"] = rule_from_args(args)  # None: the selector's natural rule
        check_options(**options)
        slide_mpps = read_mpp_csv(args.mpp_csv) if args.mpp_csv else None
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    scheduler, workers, resources = scheduler_from_args(args)
    one_at_a_time = scheduler is None and (workers == 1 or len(slides) == 1)
    try:
        summary = preprocess_cohort(slides, args.out, scheduler=scheduler, workers=workers,
                                    resources=resources, overwrite=args.overwrite,
                                    progress=not args.quiet, tile_progress=one_at_a_time and not args.quiet,
                                    slide_mpps=slide_mpps, **options)
    except ConnectionError as exc:
        raise CLIError(f"--scheduler: {exc}") from None
    if summary.failed:
        print(f"isg preprocess: {len(summary.failed)} of {len(slides)} slide(s) failed:", file=sys.stderr)
        for result in summary.failed:
            print(f"  {result.name}: {result.error_type}: {result.error}", file=sys.stderr)
        return 1
    return 0
