"""Run isg cohort commands on a SLURM cluster through dask-jobqueue: one Dask worker per GPU job.

Copy this file and ``jobqueue.yaml`` beside it, adjust the yaml, then, on the login node::

    python isg_slurm.py --jobs 8 -- preprocess --manifest cohort/manifest.csv --out /shared/patches --device cuda \\
                              -- extract run --h5-dir /shared/patches --global ext/global --local ext/local --device cuda \\
                              -- predict /shared/new_slides --model /shared/run --out /shared/pred --device cuda

Each command after a ``--`` is an ``isg`` command; it gets ``--scheduler`` (the cluster's address) and runs one
task per slide on the workers (with ``--device cuda`` each slide asks for one ``GPU``). A command that fails on
arguments (exit code 2) stops the list; slides that fail are reported by their command, which the next one
follows. Every slide path and output folder must be on a file system the jobs see under the same path. A rerun
of the same line resumes: finished slides are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONFIG = Path(__file__).with_name("jobqueue.yaml")


def slurm_cluster(config: str | Path | None = CONFIG, **overrides):
    """A ``dask_jobqueue.SLURMCluster`` configured by ``config`` (a jobqueue yaml, over dask-jobqueue's defaults;
    None: your dask config alone); ``overrides`` are SLURMCluster arguments (e.g. ``queue="gpu-long"``)."""
    import dask
    import yaml
    from dask_jobqueue import SLURMCluster

    if config is not None:
        dask.config.update(dask.config.config, yaml.safe_load(Path(config).read_text()), priority="new")
    return SLURMCluster(**overrides)


def run_commands(address: str, commands: list[list[str]]) -> int:
    """Run each ``isg`` command with ``--scheduler address``; the highest exit code (stops at a 2: bad arguments)."""
    from isg.cli import main

    worst = 0
    for command in commands:
        print(f"isg {' '.join(command)} --scheduler {address}", file=sys.stderr, flush=True)
        code = main([*command, "--scheduler", address])
        worst = max(worst, code)
        if code == 2:
            break
    return worst


def split_commands(argv: list[str]) -> tuple[list[str], list[list[str]]]:
    """``[options..., "--", cmd1..., "--", cmd2...]`` -> (options, [cmd1, cmd2])."""
    parts, current = [], []
    for arg in argv:
        if arg == "--":
            parts.append(current)
            current = []
        else:
            current.append(arg)
    parts.append(current)
    return parts[0], [part for part in parts[1:] if part]


def main(argv: list[str] | None = None) -> int:
    options, commands = split_commands(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=4, help="worker jobs to start (one GPU each)")
    parser.add_argument("--adapt", type=int, metavar="MAX", help="scale between 1 and MAX jobs with the work instead")
    parser.add_argument("--config", default=str(CONFIG), help="the jobqueue yaml; 'none': your dask config alone")
    args = parser.parse_args(options)
    if not commands:
        parser.error("no isg command given: add -- COMMAND [ARGS] (e.g. -- preprocess --manifest m.csv --out patches)")
    from distributed import Client

    with slurm_cluster(None if args.config == "none" else args.config) as cluster, Client(cluster) as client:
        if args.adapt:
            cluster.adapt(minimum_jobs=1, maximum_jobs=args.adapt)
        else:
            cluster.scale(jobs=args.jobs)
        print(cluster.job_script(), file=sys.stderr)
        client.wait_for_workers(1)
        return run_commands(cluster.scheduler_address, commands)


if __name__ == "__main__":
    sys.exit(main())
