"""Where per-slide work runs, for every cohort command (preprocess, extract run, predict): argparse only;
:func:`isg.pipeline.cohort.run_cohort` runs it."""

from __future__ import annotations


def add_scheduler_arguments(group, workers_help: str) -> None:
    group.add_argument("--workers", type=int, help=workers_help)
    group.add_argument("--scheduler", default="threads",
                       help="threads (default, in-process), processes, or a Dask scheduler address (tcp://host:8786): "
                            "one task per slide; every worker must see the slides and outputs under the same paths")
    group.add_argument("--resources", help="Dask worker resources each slide asks for, e.g. GPU=1 (default: GPU=1 "
                                           "with --device cuda on Dask, none otherwise)")


def parse_resources(text: str | None) -> dict | None:
    """``"GPU=1,MEM=2"`` -> ``{"GPU": 1.0, "MEM": 2.0}``; None or empty -> None."""
    from isg.cli import CLIError

    if not text:
        return None
    resources = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        try:
            resources[name.strip()] = float(value)
        except ValueError:
            raise CLIError(f"--resources {text!r}: expected NAME=NUMBER[,NAME=NUMBER], e.g. GPU=1") from None
        if not name.strip():
            raise CLIError(f"--resources {text!r}: empty resource name")
    return resources


def scheduler_from_args(args) -> tuple:
    """``(scheduler, workers, resources)`` for ``run_cohort``. On Dask, a ``cuda`` device asks each slide for
    one ``GPU`` unless ``--resources`` says otherwise; in-process, a ``cuda`` device must exist here."""
    from isg.cli import CLIError

    if args.workers is not None and args.workers < 1:
        raise CLIError(f"--workers must be >= 1, got {args.workers}")
    local = args.scheduler in ("threads", "processes")
    device = str(getattr(args, "device", "cpu"))
    if device.startswith("cuda") and local:
        import torch

        if not torch.cuda.is_available():
            raise CLIError(f"--device {device}: no CUDA device is available here")
    resources = parse_resources(args.resources)
    if resources is None and args.resources is None and device.startswith("cuda") and not local:
        resources = {"GPU": 1.0}
    scheduler = None if args.scheduler == "threads" else args.scheduler
    return scheduler, args.workers, resources
