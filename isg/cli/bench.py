"""``isg bench`` (wiring): argument parsing and printing; the measurements are :mod:`isg.pipeline.bench`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from isg.cli._slides import add_slide_arguments, slides_from_args
from isg.pipeline.bench import BenchOptions, format_table, reader_names, run_bench

DEFAULTS = BenchOptions()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench", help="throughput of readers, Shannon scorer, preprocess, extract and predict on your slides",
        description="Measure every stage on your slides, contenders side by side in one run: each slide reader "
                    "(tiles/s), the Shannon scorer (GB/s, CPU and GPU), preprocess (s per stage), and with --model "
                    "extraction and prediction (patches/s). Prints a table and writes JSON.")
    add_slide_arguments(parser)
    parser.add_argument("--model", default=DEFAULTS.model, help="isg train folder: also time extract and predict")
    parser.add_argument("--out", default=DEFAULTS.out, help=f"JSON output (default {DEFAULTS.out})")
    parser.add_argument("--tiles", type=int, default=DEFAULTS.tiles,
                        help=f"distinct tissue tiles per reader pass, each read once (default {DEFAULTS.tiles})")
    parser.add_argument("--repeats", type=int, default=DEFAULTS.repeats,
                        help=f"passes per reader, a fresh reader and other tiles each, median kept (default {DEFAULTS.repeats})")
    parser.add_argument("--page-cache", choices=("warm", "dropped"), default=DEFAULTS.page_cache,
                        help="OS page cache of the slide file while readers are timed: warm (read once before) or "
                             f"dropped (evicted before every pass) (default {DEFAULTS.page_cache})")
    parser.add_argument("--readers", help="comma-separated readers to compare (default: all that open the slide)")
    parser.add_argument("--device", default=DEFAULTS.device, help=f"auto, cpu or cuda (default {DEFAULTS.device})")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size, help=f"tiles per batch (default {DEFAULTS.batch_size})")
    parser.add_argument("--num-workers", type=int, default=DEFAULTS.num_workers,
                        help=f"reader threads of the all-cores figure and of preprocess (default: all cores, {DEFAULTS.num_workers})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from isg.cli import CLIError
    from isg.utils import write_text_atomic

    if args.tiles < 1 or args.repeats < 1 or args.batch_size < 1 or args.num_workers < 0:
        raise CLIError("--tiles, --repeats and --batch-size must be positive, --num-workers >= 0")
    if args.model and not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model}: no such folder (an isg train output)")
    options = BenchOptions(tiles=args.tiles, repeats=args.repeats, batch_size=args.batch_size, num_workers=args.num_workers,
                           device=args.device, out=args.out, model=args.model, page_cache=args.page_cache,
                           readers=tuple(r.strip() for r in args.readers.split(",") if r.strip()) if args.readers else ())
    try:
        reader_names(options.readers)  # bad names fail before any work
        report = run_bench(slides_from_args(args), options, progress=not args.quiet)
    except ValueError as exc:  # a bad --readers or --device
        raise CLIError(str(exc)) from None
    write_text_atomic(args.out, json.dumps(report, indent=1, default=float))
    print(format_table(report))
    print(f"figures: {args.out}")
    return 1 if any("error" in s for s in report["slides"]) else 0
