"""``isg predict``: expression (or MSI) of new slides with a model trained by ``isg train``.

Exit code 0 when every slide is predicted, 1 when some failed (listed; the others
are finished), 2 on bad arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

from isg.cli._cluster import add_scheduler_arguments, scheduler_from_args
from isg.cli._slides import add_slide_arguments, slides_from_args


def register(subparsers) -> None:
    from isg.cli import add_quiet, defaults_of
    from isg.pipeline.predict import Predictor

    default = defaults_of(Predictor)
    parser = subparsers.add_parser(
        "predict", help="read -> select -> extract -> predict on new slides with a trained model",
        description="Run the whole pipeline on slides: Shannon selection with the training run's settings, autoencoder "
                    "features, and the average of the fold models of `isg train`. Writes predictions.csv (per gene the "
                    "ensemble mean and <gene>_std, the std across fold models), timings.csv (seconds per stage) and "
                    "summary.json; a rerun skips finished slides; progress.log gets a line per slide at least every 2 s. "
                    "--heatmaps and --attention-maps explain each prediction.")
    add_slide_arguments(parser)
    parser.add_argument("--model", required=True, help="output folder of `isg train` (fold models + pipeline.json)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--global-ae", help="global autoencoder checkpoint (default: the one recorded at training)")
    parser.add_argument("--local-ae", help="local autoencoder checkpoint (default: the one recorded at training)")
    parser.add_argument("--work-dir", help="where per-slide patches/features go (default OUT/patches; reused when present)")
    parser.add_argument("--heatmaps", metavar="GENE[,GENE...]",
                        help="per-patch expression maps of these genes: OUT/heatmaps/<slide>/<gene>.png over the slide "
                             "thumbnail and patches.csv (x, y, size, value per gene); the value of a patch is the model's "
                             "output head applied to that patch's token, averaged over the fold models")
    parser.add_argument("--attention-maps", action="store_true",
                        help="save the fusion blocks' local gate A and global weights Z per patch and fold model to "
                             "OUT/attention/<slide>.h5 (ISG models)")
    parser.add_argument("--device", default=default["device"], help="cpu or cuda[:i]")
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="patches per batch (reading and encoding)")
    parser.add_argument("--num-workers", type=int, default=default["num_workers"], help="tile reader threads per slide")
    parser.add_argument("--tile-memory-mb", type=float, default=default["tile_memory_mb"],
                        help="per slide: memory for the best-scored tiles kept from the scoring pass so selected patches "
                             "are read once (those that do not fit are read again, ahead of the encoders; 0 reads them "
                             "all again)")
    parser.add_argument("--amp", action="store_true",
                        help="bfloat16 encoders where the device runs bf16 natively (CUDA; CPUs with AVX512-BF16 or AMX): "
                             "~1.8x faster on such a CPU, features within 2e-2 of float32 (docs/features.md)")
    add_scheduler_arguments(parser.add_argument_group("execution"), "slides in parallel in-process (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="redo slides already predicted")
    add_quiet(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from isg.cli import CLIError
    from isg.pipeline.predict import Predictor, predict_slides

    slides = slides_from_args(args)
    if args.tile_memory_mb < 0:
        raise CLIError(f"--tile-memory-mb must be >= 0 (0: read the selected patches again), got {args.tile_memory_mb}")
    scheduler, workers, resources = scheduler_from_args(args)
    for name in ("batch_size", "num_workers"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model}: no such folder (the output folder of `isg train`)")
    try:
        predictor = Predictor.from_train_dir(args.model, args.global_ae, args.local_ae, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError(str(exc)) from None
    predictor.batch_size, predictor.num_workers, predictor.tile_memory_mb = args.batch_size, args.num_workers, args.tile_memory_mb
    predictor.amp = args.amp
    genes = [g.strip() for g in args.heatmaps.split(",") if g.strip()] if args.heatmaps else []
    try:
        predictions, timings, summary = predict_slides(
            slides, predictor, args.out, work_dir=args.work_dir, scheduler=scheduler, workers=workers or 1,
            resources=resources, overwrite=args.overwrite, progress=not args.quiet, heatmaps=genes, attention_maps=args.attention_maps)
    except ValueError as exc:  # unknown heatmap gene, maps asked of a model without them
        raise CLIError(str(exc)) from None
    except ConnectionError as exc:
        raise CLIError(f"--scheduler: {exc}") from None
    if not args.quiet and len(timings):
        stages = timings[["read", "select", "features", "predict", "total"]].mean()
        print("mean seconds per slide: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()), file=sys.stderr)
        if "n_reread" in timings and timings["n_reread"].sum():
            print(f"{int(timings['n_reread'].sum())} of {int(timings['n_patches'].sum())} selected patches read again, "
                  f"the others kept from the scoring pass (--tile-memory-mb {args.tile_memory_mb:g})", file=sys.stderr)
    print(f"{len(predictions)} slide(s) predicted -> {Path(args.out) / 'predictions.csv'}")
    if genes or args.attention_maps:
        made = [str(Path(args.out) / "heatmaps")] * bool(genes) + [str(Path(args.out) / "attention")] * args.attention_maps
        print(f"explanations -> {', '.join(made)}")
    if summary.failed:
        print(f"isg predict: {len(summary.failed)} of {len(slides)} slide(s) failed:", file=sys.stderr)
        for result in summary.failed:
            print(f"  {result.name}: {result.error_type}: {result.error}", file=sys.stderr)
        return 1
    return 0
