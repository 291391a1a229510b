"""``isg demo``: the whole pipeline on built-in sample data (a synthetic cohort), step by step.

Each step is the ``isg`` command a user would run on their own data, printed
before it runs: synth -> preprocess -> extract fit -> extract run -> train ->
predict on new slides. Sizes are chosen to finish in a few minutes on a laptop
CPU; ``--quick`` shrinks everything further (smoke test).
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run the whole pipeline on a synthetic cohort (minutes on a CPU)")
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out); a rerun resumes")
    parser.add_argument("--slides", type=int, default=16, help="training slides (default 16)")
    parser.add_argument("--size", type=int, default=2048, help="slide side in pixels at 0.5 um/px (default 2048)")
    parser.add_argument("--model", default="isg-4-2", help="slide model (default isg-4-2; isg-10-2 is the paper's best)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps: a smoke test")
    parser.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> None:
    from isg.cli import CLIError, main

    print(f"\n== {title}\n$ isg {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    if code != 0:
        raise CLIError(f"demo step '{title}' failed with exit code {code}")
    print(f"   ({time.perf_counter() - start:.1f} s)", flush=True)


def run(args) -> int:
    from isg.cli import CLIError

    if args.slides < 6:
        raise CLIError(f"--slides must be >= 6 (5-fold cross-validation by patient), got {args.slides}")
    out = Path(args.out)
    quick = args.quick
    size = 1024 if quick else args.size
    steps = "60" if quick else "400"
    epochs = "3" if quick else "30"
    folds = "3" if quick else "5"
    model_kwargs = json.dumps({"embed_dim": 32 if quick else 64, "depth": 1 if quick else 2, "num_heads": 2 if quick else 4})
    ae = ["--global-resolution", "32", "--local-resolution", "32", "--global-d", "32" if quick else "64",
          "--local-d", "32" if quick else "64", "--channel-base", "512" if quick else "2048", "--channel-max", "32" if quick else "64"]
    device = ["--device", args.device]

    _step("1/6 synthetic cohort: pyramidal TIFFs, manifest, expression, MSI",
          ["synth", "--out", str(out / "cohort"), "--slides", str(args.slides), "--size", str(size), "--genes", "20", "--seed", "0"])
    _step("2/6 Shannon selection of informative patches",
          ["preprocess", "--manifest", str(out / "cohort" / "manifest.csv"), "--out", str(out / "patches"),
           "--patch-size", "128", "--local-size", "32", "--quiet", *device])
    _step("3/6 train the global and local StyleGAN2 autoencoders",
          ["extract", "fit", "--h5-dir", str(out / "patches"), "--out", str(out / "extractors"), "--steps", steps,
           "--batch-size", "16", "--quiet", *ae, *device])
    _step("4/6 features of the selected patches",
          ["extract", "run", "--h5-dir", str(out / "patches"), "--global", str(out / "extractors" / "global"),
           "--local", str(out / "extractors" / "local"), "--quiet", *device])
    _step(f"5/6 {folds}-fold patient-level cross-validation of {args.model}",
          ["train", "--manifest", str(out / "cohort" / "manifest.csv"), "--expression", str(out / "cohort" / "expression.tsv"),
           "--features", str(out / "patches"), "--out", str(out / "train"), "--model", args.model, "--model-kwargs", model_kwargs,
           "--folds", folds, "--epochs", epochs, "--patience", "8", *device])
    _step("6/6 predict new slides end to end (read -> select -> extract -> predict)",
          ["synth", "--out", str(out / "new"), "--slides", "2", "--size", str(size), "--genes", "20", "--seed", "1"])
    _step("   ...", ["predict", str(out / "new" / "slides"), "--model", str(out / "train"), "--out", str(out / "predictions"),
                     "--quiet", *device])

    summary = json.loads((out / "train" / "summary.json").read_text())
    print(f"\nDone. Cross-validated {args.model}: mean Pearson r {summary['mean_r']:.3f} over {summary['n_genes']} genes, "
          f"{summary['n_significant']} significantly predicted (r > 0, FDR < 0.05), {summary['n_samples']} samples.")
    print(f"Results: {out / 'train'} (genes.csv, summary.json, gene_correlations.png, pred_vs_true.png)")
    print(f"Predictions for new slides: {out / 'predictions' / 'predictions.csv'} (stage seconds in timings.csv)")
    sys.stdout.flush()
    return 0
