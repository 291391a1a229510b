"""``isg predict``: expression (or MSI) of new slides with a model trained by ``isg train``.

Exit code 0 when every slide is predicted, 1 when some failed (listed; the others
are finished), 2 on bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

from isg.cli._slides import add_slide_arguments, slides_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="read -> select -> extract -> predict on new slides with a trained model",
        description="Run the whole pipeline on slides: Shannon selection with the training run's settings, autoencoder "
                    "features, and the average of the fold models of `isg train`. Writes predictions.csv, timings.csv "
                    "(seconds per stage) and summary.json; a rerun skips finished slides.")
    add_slide_arguments(parser)
    parser.add_argument("--model", required=True, help="output folder of `isg train` (fold models + pipeline.json)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--global-ae", help="global autoencoder checkpoint (default: the one recorded at training)")
    parser.add_argument("--local-ae", help="local autoencoder checkpoint (default: the one recorded at training)")
    parser.add_argument("--work-dir", help="where per-slide patches/features go (default OUT/patches; reused when present)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=4, help="tile reader threads per slide")
    parser.add_argument("--workers", type=int, default=1, help="slides in parallel (threads)")
    parser.add_argument("--scheduler", default="threads", help="threads or a Dask scheduler address")
    parser.add_argument("--overwrite", action="store_true", help="redo slides already predicted")
    parser.add_argument("--quiet", action="store_true")
    parser.set_defaults(func=run)


def run(args) -> int:
    from isg.cli import CLIError
    from isg.infer.predict import Predictor, predict_slides

    slides = slides_from_args(args)
    for name in ("batch_size", "num_workers", "workers"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model}: no such folder (the output folder of `isg train`)")
    try:
        predictor = Predictor.from_train_dir(args.model, args.global_ae, args.local_ae, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    predictor.batch_size, predictor.num_workers = args.batch_size, args.num_workers
    scheduler = None if args.scheduler == "threads" else args.scheduler
    predictions, timings, summary = predict_slides(slides, predictor, args.out, work_dir=args.work_dir, scheduler=scheduler,
                                                   workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    if not args.quiet and len(timings):
        stages = timings[["read", "select", "features", "predict", "total"]].mean()
        print("mean seconds per slide: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), file=sys.stderr)
    print(f"{len(predictions)} slide(s) predicted -> {Path(args.out) / 'predictions.csv'}")
    if summary.failed:
        print(f"isg predict: {len(summary.failed)} of {len(slides)} slide(s) failed:", file=sys.stderr)
        for result in summary.failed:
            print(f"  {result.name}: {result.error_type}: {result.error}", file=sys.stderr)
        return 1
    return 0
