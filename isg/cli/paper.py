"""``isg paper``: the paper's six tables from one command (:func:`isg.paper.run_tables`)."""

from __future__ import annotations

import logging
import shlex

DESCRIPTION = (
    "Regenerate the paper's Tab. 1-6 (models, selectors, MSI AUC, threshold ablation, feature probe, ISG-N-k) on the "
    "built-in synthetic cohort or on your cohort (--manifest, --expression, --labels). Shared stages (preprocess with "
    "every selector, autoencoders, features, HE2RNA's ResNet features) run once and are cached under OUT/work: a rerun "
    "resumes. Each table is written as OUT/tables/tab<N>.md and .json beside the paper's published figures; every row "
    "says patches kept per slide, the train-mean floor, the split-seed spread, seconds, the extractor and its loss terms.")


def register(subparsers) -> None:
    from isg.cli import add_quiet

    parser = subparsers.add_parser("paper", help="the paper's six tables on a cohort (or the synthetic one)", description=DESCRIPTION)
    parser.add_argument("--out", default="paper_out", help="output folder (tables/, work/ cache); a rerun resumes")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tiny sizes: every table and row in a few minutes (a smoke test)")
    size.add_argument("--size", choices=("quick", "default", "cohort"), default=None,
                      help="preset sizes (isg.paper.sizes): default learns on the synthetic cohort; cohort = a real "
                           "cohort's sizes (default with --manifest)")
    parser.add_argument("--manifest", help="your cohort: CSV/TSV with slide_path, sample_id, patient_id")
    parser.add_argument("--expression", help="your cohort: samples x genes table (raw counts or FPKM-UQ)")
    parser.add_argument("--labels", help="your cohort: CSV with sample_id and msi (MSI-H / MSS), for Tab. 3")
    parser.add_argument("--top-n", type=int, default=None, help="your cohort: the N most variable genes")
    parser.add_argument("--genes", help="your cohort: file with the genes to predict, one per line")
    parser.add_argument("--tables", default="1,2,3,4,5,6", help="which tables, e.g. 1,4")
    parser.add_argument("--folds", type=int, default=None, help="patient-level folds (default: the preset's)")
    parser.add_argument("--seeds", default=None, help="split seeds of every row, e.g. 0,1,2 (default: the preset's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    add_quiet(parser)
    parser.set_defaults(func=run)


def _ints(text: str, option: str) -> tuple[int, ...]:
    from isg.cli import CLIError

    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CLIError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{option} is empty")
    return values


def _command(args) -> str:
    """The command line that reproduces this run (printed beside every table)."""
    argv = ["isg", "paper", "--out", args.out] + (["--quick"] if args.quick else ["--size", args.size] if args.size else [])
    for option in ("manifest", "expression", "labels", "top_n", "genes", "folds", "seeds"):
        if getattr(args, option) is not None:
            argv += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
    if args.tables != "1,2,3,4,5,6":
        argv += ["--tables", args.tables]
    return shlex.join(argv + (["--device", args.device] if args.device != "cpu" else []))


def run(args) -> int:
    from isg.cli import CLIError
    from isg.paper import PRESETS, run_tables

    if bool(args.manifest) != bool(args.expression):
        raise CLIError("--manifest and --expression go together (your cohort), or neither (the synthetic cohort)")
    preset = "quick" if args.quick else args.size or ("cohort" if args.manifest else "default")
    tables = _ints(args.tables, "--tables")
    if args.folds is not None and args.folds < 2:
        raise CLIError(f"--folds must be >= 2, got {args.folds}")
    sizes = PRESETS[preset].with_options(args.folds, _ints(args.seeds, "--seeds") if args.seeds else None)
    cohort = None
    if args.manifest:
        from isg.data import ExpressionError, ManifestError
        from isg.data.labels import LabelError
        from isg.paper.workspace import user_cohort

        try:
            cohort = user_cohort(args.manifest, args.expression, args.labels, args.top_n, args.genes)
        except (FileNotFoundError, ExpressionError, ManifestError, LabelError) as exc:
            raise CLIError(str(exc)) from exc
    command = _command(args)
    if not getattr(args, "verbose", False):  # every row prints one line; the folds' result dicts are for -v
        logging.getLogger("isg.train.expression").setLevel(logging.WARNING)
    say = (lambda *a, **k: None) if args.quiet else (lambda text: print(text, flush=True))
    try:
        results = run_tables(args.out, sizes, cohort, tables, args.device, say, command)
    except ValueError as exc:
        raise CLIError(str(exc)) from exc
    failed = [f"tab{n}: {c['claim']} ({c['detail']})" for n, t in results.items() for c in t["checks"] if not c["holds"]]
    print(f"isg paper: {len(results)} table(s) in {args.out}/tables ({preset} size)" +
          (f"; {len(failed)} check(s) do not hold:\n  " + "\n  ".join(failed) if failed else "; every check holds"))
    return 0
