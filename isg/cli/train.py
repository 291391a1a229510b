"""``isg train``: patient-level cross-validation of a slide-level model on cached features."""

from __future__ import annotations

import json
import logging
from pathlib import Path


def register(subparsers) -> None:
    from isg.cli import add_quiet, defaults_of
    from isg.model.tasks import get_task, list_tasks
    from isg.train.config import TrainConfig

    default = defaults_of(TrainConfig)
    parser = subparsers.add_parser(
        "train", help="cross-validate ISG / ViT-S / HE2RNA on extracted features",
        description="Train with k-fold patient-level CV from per-slide feature .h5 files (written by `isg extract`). "
        "Regression of log10(1 + x) expression (per-gene Pearson r) or MSI-H vs MSS classification (AUC).")
    parser.add_argument("--manifest", required=True, help="CSV/TSV with slide_path, sample_id, patient_id")
    parser.add_argument("--features", required=True, help="folder of <slide_id>.h5 feature files")
    parser.add_argument("--out", required=True, help="output folder (splits, fold models, results, figures)")
    parser.add_argument("--expression", help="samples x genes table (raw counts or FPKM-UQ; TCGA genes x samples accepted)")
    parser.add_argument("--genes", help="file with the genes to predict, one per line: names or Ensembl ids (with or without version; "
                        "unknown ones are listed, see docs/data.md); default: --top-n by variance")
    parser.add_argument("--top-n", type=int, default=None, help="default gene rule: the N most variable expressed genes")
    parser.add_argument("--min-samples", type=int, default=1, help="default gene rule: expressed in at least this many samples")
    parser.add_argument("--task", choices=list_tasks(), default=default["task"],
                        help="; ".join(f"{name}: {get_task(name).description}" for name in list_tasks()))
    parser.add_argument("--labels", help="tasks on labels (msi): CSV with sample_id and the label column")
    parser.add_argument("--label-column", default="msi", help="tasks on labels: column of --labels holding the class")
    parser.add_argument("--positive", default="MSI-H", help="tasks on labels: the positive class")
    parser.add_argument("--model", default=default["model"],
                        help="isg-N-k (the paper's Dual Attention, Eqs. 3-8), isg-N-k-plus (our variant), vit-s / vit-t4 "
                             "(global features only) or he2rna")
    parser.add_argument("--model-kwargs", default="{}", help='JSON of model options, e.g. \'{"embed_dim": 192, "depth": 4}\'')
    parser.add_argument("--folds", type=int, default=default["n_splits"], help="patient-level cross-validation folds")
    parser.add_argument("--epochs", type=int, default=default["epochs"], help="most epochs per fold")
    parser.add_argument("--patience", type=int, default=default["patience"],
                        help="stop a fold after this many epochs without a better validation loss")
    parser.add_argument("--batch-size", type=int, default=default["batch_size"], help="slides per step")
    parser.add_argument("--lr", type=float, default=default["lr"], help="AdamW learning rate")
    parser.add_argument("--weight-decay", type=float, default=default["weight_decay"], help="AdamW weight decay")
    parser.add_argument("--max-patches", type=int, default=default["max_patches"], help="random patches per slide per step while training")
    parser.add_argument("--seed", type=int, default=default["seed"], help="seed of the folds, initialisation and batches")
    parser.add_argument("--device", default=default["device"], help="cpu or cuda[:i] (under torchrun: cuda = one GPU per process)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="train every fold again, even those a previous run with the same options finished")
    add_quiet(parser)
    parser.set_defaults(func=run)


def _positive(name: str, value) -> None:
    from isg.cli import CLIError

    if value is not None and value < 1:
        raise CLIError(f"--{name} must be >= 1, got {value}")


def run(args) -> int:
    from isg.cli import CLIError
    from isg.data import ExpressionError, ManifestError, load_expression, load_manifest, match_samples
    from isg.data.labels import LabelError, load_labels
    from isg.cli._progress import TrainProgress
    from isg.model.tasks import get_task
    from isg.train.config import TrainConfig
    from isg.cli import quiet_other_ranks
    from isg.train.distributed import close_distributed, init_distributed
    from isg.train.expression import cross_validate

    for name in ("folds", "epochs", "patience", "batch_size", "max_patches", "top_n", "min_samples"):
        _positive(name.replace("_", "-"), getattr(args, name))
    if args.folds < 2:
        raise CLIError(f"--folds must be >= 2, got {args.folds}")
    try:
        model_kwargs = json.loads(args.model_kwargs)
        assert isinstance(model_kwargs, dict)
    except (json.JSONDecodeError, AssertionError):
        raise CLIError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}") from None
    features = Path(args.features)
    if not features.is_dir():
        raise CLIError(f"--features {features}: no such folder (run `isg extract` first)")
    task = get_task(args.task)
    if task.targets == "expression" and not args.expression:
        raise CLIError(f"--expression is required for --task {task.name}")
    if task.targets == "labels" and not args.labels:
        raise CLIError(f"--labels is required for --task {task.name}")
    try:
        manifest = load_manifest(args.manifest, check_files=False)  # training reads cached features only
        if task.targets == "labels":
            targets = load_labels(args.labels, column=args.label_column, positive=args.positive)
        else:
            targets = load_expression(args.expression, genes=args.genes, top_n=args.top_n,
                                      min_samples=args.min_samples, samples=manifest["sample_id"])
        manifest, targets = match_samples(manifest, targets)
    except (FileNotFoundError, ExpressionError, ManifestError, LabelError) as exc:
        raise CLIError(str(exc)) from exc
    missing = [sid for sid in manifest["slide_id"] if not (features / f"{sid}.h5").is_file()]
    if missing:
        from isg.utils import list_some

        raise CLIError(f"--features {features}: {len(missing)} slide(s) have no feature file: {list_some(missing)}")
    try:
        ranks, device = init_distributed(args.device)  # under torchrun: one process per rank, rank 0 writes and talks
    except RuntimeError as exc:
        raise CLIError(str(exc)) from None
    quiet_other_ranks(ranks)
    config = TrainConfig(model=args.model, task=args.task, epochs=args.epochs, patience=args.patience,
                         batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         max_patches=args.max_patches, n_splits=args.folds, seed=args.seed, device=device,
                         model_kwargs=model_kwargs)
    progress = TrainProgress()
    if not getattr(args, "verbose", False):  # the bars show each fold; its result dict is for -v
        logging.getLogger("isg.train.expression").setLevel(logging.WARNING)
    try:
        summary = cross_validate(manifest, features, targets, args.out, config,
                                 progress=None if args.quiet or not ranks.is_main else progress, resume=args.resume)
    except (ValueError, TypeError) as exc:  # unknown model name or option, too few patients for the folds, bad feature files
        raise CLIError(str(exc)) from exc
    finally:
        progress.close()
        close_distributed()
    if ranks.is_main:
        print(result_line(summary, args.model, args.out))
    return 0


def result_line(summary: dict, model: str, out) -> str:
    """One line a user reads (and a README can quote): the cross-validated result."""
    if "auc" in summary:
        return f"{model}: MSI-H vs MSS AUC {summary['auc']:.3f} over {summary.get('n_samples')} samples -> {out}"
    floor = summary.get("train_mean_floor")
    against = f" (predicting each fold's training mean: {floor['mean_r']:.3f})" if floor else ""
    return (f"{model}: mean Pearson r {summary['mean_r']:.3f}{against} over {summary['n_genes']} genes, "
            f"{summary['n_significant']} significant (r > 0, FDR < 0.05), {summary.get('n_samples')} samples -> {out}")
