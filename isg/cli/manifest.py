"""``isg manifest``: a manifest (and expression table) from a GDC slide folder + sample sheet(s).

Writes ``OUT/manifest.csv`` (slide_path, sample_id, patient_id, project_id, matched_by) and
``OUT/unmatched.tsv`` (everything left out, and why); with ``--expression-dir`` also
``OUT/expression.tsv`` (samples x genes raw values) and ``OUT/expression.genes.tsv``, ready for
``isg preprocess --manifest`` and ``isg train --manifest ... --expression ...``.
"""

from __future__ import annotations

from pathlib import Path

from isg.cli._slides import SLIDE_SUFFIXES
from isg.data.gdc_options import GDC_DEFAULTS, GENE_KEYS, STAR_VALUE_COLUMNS


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "manifest", help="manifest + expression table from GDC downloads (slides, sample sheets, STAR counts)",
        description="Match GDC-named slides (TCGA-AA-3000-01Z-00-DX1.<uuid>.svs, searched in SLIDE_DIR and its "
                    "subfolders) to expression samples by TCGA barcode (see docs/data.md), join the STAR gene-count "
                    "files of --expression-dir into one samples x genes table, and list what could not be matched.")
    parser.add_argument("slide_dir", metavar="SLIDE_DIR", help="folder of slides (GDC layout: one folder per file id)")
    parser.add_argument("--sample-sheet", action="append", required=True, metavar="TSV",
                        help="GDC sample sheet(s) of the slides and/or the expression files (repeat the option)")
    parser.add_argument("--expression-dir", help="folder of *.rna_seq.augmented_star_gene_counts.tsv files (GDC layout)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--value", choices=STAR_VALUE_COLUMNS, default=GDC_DEFAULTS["value"],
                        help=f"STAR column used as expression (default {GDC_DEFAULTS['value']}, as HE2RNA)")
    parser.add_argument("--gene-type", default=GDC_DEFAULTS["gene_type"],
                        help=f"keep genes of this gene_type; 'all' keeps every gene (default {GDC_DEFAULTS['gene_type']})")
    parser.add_argument("--gene-key", choices=GENE_KEYS, default=GDC_DEFAULTS["gene_key"],
                        help=f"table columns: gene names or versioned Ensembl ids (default {GDC_DEFAULTS['gene_key']})")
    parser.set_defaults(func=run)


def run(args) -> int:
    from isg.cli import CLIError
    from isg.data import ExpressionError, GDCOptions, ManifestError, build_gdc_cohort, write_gdc_cohort

    slide_dir = Path(args.slide_dir)
    if not slide_dir.is_dir():
        raise CLIError(f"SLIDE_DIR {slide_dir}: no such folder")
    slides = sorted(p for p in slide_dir.rglob("*") if p.is_file() and p.suffix.lower() in SLIDE_SUFFIXES)
    if not slides:
        raise CLIError(f"SLIDE_DIR {slide_dir}: no slide files ({', '.join(SLIDE_SUFFIXES)}) in it or its subfolders")
    options = GDCOptions(value=args.value, gene_type=None if args.gene_type == "all" else args.gene_type, gene_key=args.gene_key)
    try:
        cohort = build_gdc_cohort(slides, args.sample_sheet, args.expression_dir, options)
    except (FileNotFoundError, ExpressionError, ManifestError) as exc:
        raise CLIError(str(exc)) from exc
    paths = write_gdc_cohort(cohort, args.out)
    manifest = cohort.manifest
    print(f"manifest {paths['manifest']}: {len(manifest)} slide(s) of {manifest['sample_id'].nunique()} sample(s), "
          f"{manifest['patient_id'].nunique()} patient(s)")
    if cohort.expression is not None:
        print(f"expression {paths['expression']}: {cohort.expression.shape[0]} sample(s) x {cohort.expression.shape[1]} "
              f"gene(s), raw {options.value} (isg train applies log10(1 + x)); genes {paths['genes']}")
    if len(cohort.unmatched):
        counts = cohort.unmatched["kind"].value_counts()
        print(f"left out or noted ({paths['unmatched']}): " + ", ".join(f"{n} {kind}" for kind, n in counts.items()))
        for kind, name, detail in cohort.unmatched.head(10).itertuples(index=False):
            print(f"  {kind}: {name}: {detail}")
        if len(cohort.unmatched) > 10:
            print(f"  ... (+{len(cohort.unmatched) - 10} more in {paths['unmatched']})")
    return 0
