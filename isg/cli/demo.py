"""``isg demo``: the whole pipeline on built-in sample data (a synthetic cohort), step by step.

Each step is the ``isg`` command a user would run on their own data, printed
before it runs: synth -> preprocess -> extract fit -> extract run -> train ->
predict on new slides (with per-patch heatmaps of a marker gene). Sizes are
chosen to finish within 5 minutes on a 2-core CPU while the model still
learns the synthetic signal (three marker genes driven by nuclei density,
nuclei size and stain); ``--quick`` shrinks everything further (smoke test).
A rerun with the same ``--out`` resumes: finished steps are skipped.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DESCRIPTION = (
    "Run the whole ISG pipeline on a synthetic cohort of pyramidal TIFF slides whose gene expression is driven by "
    "known tissue properties (nuclei density, nuclei size, stain): synthesis, Shannon patch selection, autoencoder "
    "training and features, patient-level cross-validation of the Dual Attention model, then prediction (with "
    "per-patch heatmaps) on two new slides. Each step prints the isg command it runs, so the demo doubles as a "
    "tutorial. A few minutes on a 2-core CPU; the last lines are a summary of the result.")


# The plus form of the Dual Attention network: on 16 slides the paper form (isg-4-2) does not learn the
# synthetic markers within the demo's budget (cross-validated mean r below 0), the plus form does.
DEMO_MODEL = "isg-4-2-plus"


@dataclass(frozen=True)
class ReadmeCheck:
    """The demo result a new user compares with the README (which quotes these values): the stain marker's r.

    The run is deterministic on one machine but not across CPUs (floating-point order differs between
    instruction sets and thread counts). Measured on one commit before the local-signal cohort: mean r 0.254 on
    a 2-core VM and 0.314 on an AVX-512 EPYC VM, the size marker 0.03 vs 0.29, the stain marker 0.75 vs 0.81.
    The stain marker (a slide-wide property: every patch carries it) moved least, so it is the check;
    ``tolerance`` is that spread with room (0.06 measured). ``r`` is this commit's value on the 2-core VM.
    """

    marker: int = 2  # index into the markers [nuclei density, nuclei size, stain]
    r: float = 0.57
    tolerance: float = 0.10

    def line(self, name: str, r: float) -> str:
        matches = abs(r - self.r) <= self.tolerance
        return (f"README check: stain marker {name} r {r:.2f}, README {self.r:.2f} +- {self.tolerance:.2f}: "
                f"matches the README: {'yes' if matches else 'no'}")


README_CHECK = ReadmeCheck()  # the one place the README's demo figure lives


@dataclass(frozen=True)
class DemoSizes:
    """What the demo computes; ``quick`` is the smoke-test version."""

    slide_size: int = 2048  # px at 0.5 um/px
    patch_size: int = 128  # global patch p (px); local patches q = 32 px
    local_size: int = 32
    ae_steps: int = 150  # per autoencoder (global, local)
    ae_d: int = 32
    ae_channel_max: int = 32
    epochs: int = 30
    folds: int = 5
    model_kwargs: str = '{"embed_dim": 64, "depth": 2, "num_heads": 4}'


QUICK = DemoSizes(slide_size=1024, ae_steps=40, ae_d=16, ae_channel_max=16, epochs=3, folds=3,
                  model_kwargs='{"embed_dim": 32, "depth": 1, "num_heads": 2}')


def register(subparsers) -> None:
    from isg.cli import add_quiet

    parser = subparsers.add_parser("demo", help="run the whole pipeline on a synthetic cohort (minutes on a CPU)",
                                   description=DESCRIPTION)
    parser.add_argument("--out", default="demo_out", help="output folder; a rerun resumes")
    parser.add_argument("--slides", type=int, default=16, help="training slides (>= 6)")
    parser.add_argument("--model", default=DEMO_MODEL, help="slide model (isg-10-2 is the paper's best; slower)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--quick", action="store_true", help="8 small slides and few steps: a smoke test (~1 minute)")
    add_quiet(parser)
    parser.set_defaults(func=run)


def _step(title: str, argv: list[str]) -> float:
    from isg.cli import CLIError, main

    print(f"\n== {title}\n$ isg {shlex.join(argv)}", flush=True)
    start = time.perf_counter()
    code = main(argv)
    sys.stdout.flush()
    if code != 0:
        raise CLIError(f"demo step '{title}' failed with exit code {code}")
    seconds = time.perf_counter() - start
    print(f"   ({seconds:.0f} s)", flush=True)
    return seconds


def run(args) -> int:
    from isg.cli import CLIError

    if args.slides < 6:
        raise CLIError(f"--slides must be >= 6 (5-fold cross-validation by patient), got {args.slides}")
    started = time.perf_counter()
    out = Path(args.out)
    sizes = QUICK if args.quick else DemoSizes()
    slides = min(args.slides, 8) if args.quick else args.slides
    device = ["--device", args.device]
    quiet = ["--quiet"] if args.quiet else []
    cohort, new = out / "cohort", out / "new"
    ae = ["--global-resolution", "32", "--local-resolution", "32", "--global-d", str(sizes.ae_d), "--local-d", str(sizes.ae_d),
          "--channel-base", "1024", "--channel-max", str(sizes.ae_channel_max), "--batch-size", "16"]

    _step("1/6 synthetic cohort: pyramidal TIFFs, manifest, expression, MSI",
          ["synth", "--out", str(cohort), "--slides", str(slides), "--size", str(sizes.slide_size), "--genes", "20",
           "--seed", "0", *quiet])
    _step("2/6 Shannon selection of informative patches",
          ["preprocess", "--manifest", str(cohort / "manifest.csv"), "--out", str(out / "patches"),
           "--patch-size", str(sizes.patch_size), "--local-size", str(sizes.local_size), *quiet, *device])
    _step("3/6 train the global and local StyleGAN2 autoencoders",
          ["extract", "fit", "--h5-dir", str(out / "patches"), "--out", str(out / "extractors"), "--steps", str(sizes.ae_steps),
           *ae, *quiet, *device])
    _step("4/6 features of the selected patches",
          ["extract", "run", "--h5-dir", str(out / "patches"), "--global", str(out / "extractors" / "global"),
           "--local", str(out / "extractors" / "local"), *quiet, *device])
    _step(f"5/6 {sizes.folds}-fold patient-level cross-validation of {args.model}",
          ["train", "--manifest", str(cohort / "manifest.csv"), "--expression", str(cohort / "expression.tsv"),
           "--features", str(out / "patches"), "--out", str(out / "train"), "--model", args.model,
           "--model-kwargs", sizes.model_kwargs, "--folds", str(sizes.folds), "--epochs", str(sizes.epochs), "--patience", "8",
           *quiet, *device])
    markers = _markers(cohort / "truth.json")
    shown = _best(out / "train" / "genes.csv", markers)  # heatmaps of the marker the model learned best
    _step("6/6 predict two new slides end to end (read -> select -> extract -> predict), with heatmaps",
          ["synth", "--out", str(new), "--slides", "2", "--size", str(sizes.slide_size), "--genes", "20", "--seed", "1", *quiet])
    _step("   ...", ["predict", str(new / "slides"), "--model", str(out / "train"), "--out", str(out / "predictions"),
                     "--heatmaps", shown, *quiet, *device])
    print(summary_text(out, args.model, markers, shown, time.perf_counter() - started, slides, check=not args.quick and
                       args.slides == 16 and args.model == DEMO_MODEL))
    sys.stdout.flush()
    return 0


def _markers(truth_path: Path) -> list[str]:
    """The synthetic cohort's marker genes: [density, nuclei size, stain]."""
    truth = json.loads(truth_path.read_text())
    return list(truth.get("markers") or truth["genes"][:3])


def _best(genes_csv: Path, names: list[str]) -> str:
    import pandas as pd

    r = pd.read_csv(genes_csv).set_index("gene")["r"].reindex(names)
    return str(r.idxmax()) if r.notna().any() else names[0]


def _extractor_line(out: Path) -> str:
    """What the demo's autoencoders were trained with, from their checkpoint's record."""
    from isg.features import load_autoencoder

    objective = load_autoencoder(out / "extractors" / "global" / "autoencoder.pt").extra.get("objective", {})
    backbone = objective.get("lpips_backbone", "unknown")
    lpips = f", LPIPS AlexNet {backbone}" if backbone not in ("none", "unknown") else ""
    return f"extractor: {objective.get('extractor_size', '?')}, trained with {objective.get('loss_terms', '?')}{lpips}"


def summary_text(out: Path, model: str, markers: list[str], shown: str, seconds: float, slides: int, check: bool = True) -> str:
    """The demo's closing block (the README quotes it); ``check``: end with the README check line (the full demo's
    default settings only: ``--quick``, other slide counts or models are not what the README shows)."""
    import pandas as pd

    summary = json.loads((out / "train" / "summary.json").read_text())
    genes = pd.read_csv(out / "train" / "genes.csv").set_index("gene")["r"]
    marker_r = ", ".join(f"{name} {genes.get(name, float('nan')):.2f}" for name in markers)
    predictions = pd.read_csv(out / "predictions" / "predictions.csv", index_col="slide_id")
    minutes, rest = divmod(int(round(seconds)), 60)
    return "\n".join([
        "",
        f"== isg demo result ({slides} synthetic slides, {model}, {minutes}:{rest:02d} min)",
        f"cross-validated mean Pearson r {summary['mean_r']:.3f} over {summary['n_genes']} genes "
        f"(predicting each fold's training mean: {summary['train_mean_floor']['mean_r']:.3f}), "
        f"{summary['n_significant']} significant (r > 0, FDR < 0.05), {summary['n_samples']} samples",
        f"marker genes (nuclei density, nuclei size, stain): r {marker_r}",
        f"results: {out / 'train'} (genes.csv, summary.json, gene_correlations.png, pred_vs_true.png)",
        f"new slides: {len(predictions)} predicted -> {out / 'predictions' / 'predictions.csv'} "
        f"(mean and fold std per gene); heatmaps of {shown} in {out / 'predictions' / 'heatmaps'}",
        _extractor_line(out),
        README_CHECK.line(markers[README_CHECK.marker], float(genes.get(markers[README_CHECK.marker], float("nan")))) if check else
        "README check: only for the full demo with its defaults (the README's figure is for `isg demo` without --quick)",
    ])
