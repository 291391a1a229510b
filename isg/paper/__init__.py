"""The paper's six tables from one call (``isg paper``): :func:`run_tables`.

On a user cohort (manifest + expression table + MSI labels) or the built-in synthetic cohort, it runs what
the tables need once (preprocess with every selector, the autoencoders and features, HE2RNA's ResNet
features; :mod:`isg.paper.workspace`), trains every row over its split seeds (:mod:`isg.paper.rows`,
:mod:`isg.paper.tables`) and writes ``<out>/tables/tab<N>.md`` and ``.json`` beside the paper's published
figures (:mod:`isg.paper.report`). Everything is cached under ``<out>/work``: a rerun resumes.
"""

from __future__ import annotations

import time
from pathlib import Path

from isg.paper.sizes import COHORT, DEFAULT, PRESETS, QUICK, PaperSizes

ALL_TABLES = (1, 2, 3, 4, 5, 6)


def run_tables(out: str | Path, sizes: PaperSizes = DEFAULT, cohort=None, tables=ALL_TABLES, device: str = "cpu", say=print,
               command: str = "") -> dict[int, dict]:
    """Build ``tables`` (numbers 1-6) and write them under ``<out>/tables``; returns {number: table dict}.

    ``cohort``: a :class:`isg.paper.workspace.Cohort` (None: the built-in synthetic cohort at ``sizes``);
    ``command``: the command line to print beside every table.
    """
    from isg.paper.report import machine, write_table
    from isg.paper.tables import TABLES
    from isg.paper.workspace import Workspace, builtin_cohort, main_variant

    out = Path(out)
    unknown = sorted(set(tables) - set(TABLES))
    if unknown:
        raise ValueError(f"unknown table number(s) {unknown}; the paper has tables {sorted(TABLES)}")
    if cohort is None:
        cohort = builtin_cohort(out / "cohort", sizes)
    workspace = Workspace(out / "work", cohort, sizes, device, say)
    results = {}
    for number in sorted(tables):
        started = time.perf_counter()
        table = TABLES[number](workspace)
        main = workspace.extractor(main_variant())
        setting = [f"Cohort: {cohort.description}.", f"Training: {sizes.describe()} ({sizes.name} size).",
                   f"Extractor of the ISG rows: {main.label}.",
                   f"Machine: {machine()}; device {device}. Command: `{command or 'isg.paper.run_tables'}`."]
        seconds = time.perf_counter() - started
        write_table(out / "tables", table, setting, {"seconds": seconds, "sizes": sizes.name, "stage_seconds": dict(workspace.seconds)})
        say(f"[isg paper] table {number} written: {out / 'tables' / table['id']}.md ({seconds:.0f} s)")
        results[number] = table
    return results


__all__ = ["ALL_TABLES", "COHORT", "DEFAULT", "PRESETS", "PaperSizes", "QUICK", "run_tables"]
