"""The README's accuracy tables: ``isg paper`` at its default size (:func:`isg.paper.run_tables`), goals asserted.

The tables, their rows and what every row records are the library's (:mod:`isg.paper`); this file only runs
them on the built-in synthetic cohort and asserts the goals, each a statement about the results that can be
false:

* the paper's best model learns: ISG-10-2's PCC on Shannon patches clears its train-mean floor by more than
  ``MIN_MARGIN`` (Tab. 1);
* every ISG and ViT row clears its train-mean floor on the same folds (Tab. 1, 2, 6);
* no per-slide rule keeps nothing on a slide (Tab. 2);
* the paper's cut (1.6e6 bits = the cohort's mean + 1 sigma) clears the floor on every split seed (Tab. 4);
* the library's default extractor (LPIPS on or off without ImageNet AlexNet weights) is not beaten by the
  other on every split seed (Tab. 5's probe): the default was chosen by this measurement.

Results: ``bench/results/paper/tab<N>.md`` and ``.json`` (the command's own files). Sizes: ``ISG_BENCH_SLIDES``
(48) slides of ``ISG_BENCH_SIZE`` (2048) px, ``ISG_BENCH_EPOCHS`` (12), ``ISG_BENCH_FOLDS`` (3),
``ISG_BENCH_AE_STEPS`` (150); ``ISG_BENCH_TABLES`` (1,2,3,4,5,6). The same tables without pytest:
``isg paper --out paper_out``. Run: ``python3 -m pytest bench/bench_accuracy.py --benchmark-enable -s``.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

# goal: ISG-10-2 learns the synthetic signal: PCC - floor > MIN_MARGIN (measured 0.10 - (-0.23) = 0.33 on the
# local-signal cohort at split seed 0, docs/paper.md; the pooled out-of-fold PCC itself is small there)
MIN_MARGIN = 0.2


def _sizes():
    from isg.paper import DEFAULT

    env = {name: int(os.environ[f"ISG_BENCH_{name.upper()}"]) for name in ("slides", "size", "epochs", "folds", "ae_steps")
           if f"ISG_BENCH_{name.upper()}" in os.environ}
    renamed = {"slide_size" if k == "size" else k: v for k, v in env.items()}
    return replace(DEFAULT, **renamed)


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict:
    from isg.paper import run_tables

    numbers = tuple(int(n) for n in os.environ.get("ISG_BENCH_TABLES", "1,2,3,4,5,6").split(","))
    out = tmp_path_factory.mktemp("paper")
    results = run_tables(out, _sizes(), tables=numbers, command="python3 -m pytest bench/bench_accuracy.py --benchmark-enable -s")
    kept = Path(os.environ.get("ISG_BENCH_OUT", Path(__file__).parent / "results")) / "paper"
    kept.mkdir(parents=True, exist_ok=True)
    for path in (out / "tables").iterdir():
        shutil.copy2(path, kept / path.name)
    return {table["id"]: table for table in results.values()}


def _check(tables: dict, table_id: str, claim_start: str) -> None:
    if table_id not in tables:
        pytest.skip(f"{table_id} not built (ISG_BENCH_TABLES)")
    check = next(c for c in tables[table_id]["checks"] if c["claim"].startswith(claim_start))
    assert check["holds"], f"{table_id}: {check['claim']}: {check['detail']}"


def test_isg_10_2_learns(tables):
    if "tab1" not in tables:
        pytest.skip("tab1 not built (ISG_BENCH_TABLES)")
    row = next(r for r in tables["tab1"]["rows"] if r["name"] == "ISG-10-2")
    assert row["pcc"] - row["floor"] > MIN_MARGIN, (f"ISG-10-2 on Shannon patches: PCC {row['pcc']:.3f} clears its floor "
                                                    f"{row['floor']:.3f} by {row['pcc'] - row['floor']:.3f} <= {MIN_MARGIN}")


@pytest.mark.parametrize("table_id,claim", [("tab1", "every ISG / ViT row clears"), ("tab2", "every ISG row clears"),
                                            ("tab2", "no per-slide rule keeps nothing"), ("tab6", "every trained row clears")])
def test_rows_clear_their_floor_and_keep_patches(tables, table_id, claim):
    _check(tables, table_id, claim)


def test_tab4_the_papers_cut_clears_the_floor_on_every_seed(tables):
    _check(tables, "tab4", "the paper's cut")


def test_tab5_default_extractor_is_not_beaten_on_every_seed(tables):
    _check(tables, "tab5", "the library's default extractor")
