"""``isg synth``: write a synthetic cohort (pyramidal JPEG TIFFs + manifest + expression + truth)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("synth", help="generate a synthetic cohort of H&E-like slides with known ground truth",
                                   description="Write slides/*.tif, manifest.csv, expression.tsv, msi.csv, truth.json and signal/*.png "
                                               "(where the signal regions are) into --out.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--slides", type=int, default=8, help="number of slides (default 8)")
    parser.add_argument("--patients", type=int, default=None, help="number of patients (default ceil(0.75 * slides); 1 or 2 slides each)")
    parser.add_argument("--size", type=int, default=4096, help="level-0 side in pixels (default 4096); sides above 8192 are rendered in "
                        "2048 px blocks and streamed tile by tile (bounded memory, e.g. --size 100000)")
    parser.add_argument("--tile", type=int, default=256, help="TIFF tile size (default 256)")
    parser.add_argument("--genes", type=int, default=50, help="number of genes (default 50)")
    parser.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0 (default 0.5)")
    parser.add_argument("--quality", type=int, default=80, help="JPEG quality (default 80)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--slide-wide-signal", action="store_true",
                        help="the latent nuclei density and size in all cellular tissue (the earlier design) instead of in "
                             "small nuclei-rich signal regions (default; their masks go to OUT/signal)")
    parser.add_argument("--bad", action="store_true", help="also write broken files (corrupt, truncated, ...) into OUT/bad")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    from isg.cli import CLIError
    from isg.io.synth import make_bad_slides, make_cohort

    try:
        cohort = make_cohort(args.out, n_slides=args.slides, n_patients=args.patients, size=args.size, tile=args.tile,
                             seed=args.seed, genes=args.genes, mpp=args.mpp, quality=args.quality, progress=not args.quiet,
                             local_signal=not args.slide_wide_signal)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    print(f"wrote {len(cohort.slides)} slides to {cohort.out_dir / 'slides'}; manifest {cohort.manifest}; "
          f"expression {cohort.expression}; truth {cohort.truth}")
    if args.bad:
        bad = make_bad_slides(cohort.out_dir / "bad", seed=args.seed)
        print(f"wrote broken inputs: {', '.join(str(p) for p in bad.values())}")
    return 0
