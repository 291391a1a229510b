"""``isg paper --quick``: every table file with every row, what each row records, the Tab. 4 mapping, resume."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

EXPECTED_ROWS = {  # table id -> rows at the quick size (the Tab. 6 grid has 6 pairs)
    "tab1": 8, "tab2": 16, "tab3": 2, "tab4": 6, "tab5": 7, "tab6": 6,
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    from isg.cli import main

    out = tmp_path_factory.mktemp("paper") / "out"
    assert main(["paper", "--quick", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.slow
def test_quick_run_writes_every_table_with_every_row(quick_run):
    from isg.paper.report import published

    paper = published()["tables"]
    for table_id, n_rows in EXPECTED_ROWS.items():
        md, js = quick_run / "tables" / f"{table_id}.md", quick_run / "tables" / f"{table_id}.json"
        table = json.loads(js.read_text())
        assert len(table["rows"]) == n_rows, table_id
        text = md.read_text()
        body = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| name")]
        assert len(body) == n_rows and all(row["name"] in text for row in table["rows"])
        assert "Command: `isg paper --out" in text and "--quick" in text and "Extractor of the ISG rows: compact" in text
        assert table["published"] == paper[table_id]  # the paper's figures travel with the table
        for row in table["rows"]:
            if row.get("skipped"):
                assert row["note"]  # says why it did not run
                continue
            assert row["kept_mean"] > 0 and row["kept_min"] >= 1 and row["seconds"] >= 0 and row["features"]
            if row["task"] == "regression":
                assert np.isfinite([row["pcc"], row["l2"], row["floor"], row["floor_l2"]]).all()
                assert len(row["pcc_seeds"]) == len(row["seeds"])
            else:
                assert 0.0 <= row["auc"] <= 1.0
        named = {row.get("paper_row") for row in table["rows"]}
        assert set(paper[table_id]["rows"]) <= named, f"{table_id}: published rows no table row names"  # a figure always shows
    from isg.paper.workspace import main_variant, paper_variant

    tab1 = json.loads((quick_run / "tables" / "tab1.json").read_text())
    isg = next(r for r in tab1["rows"] if r["name"] == "ISG-10-2")
    assert isg["model"] == "isg-10-2" and re.search(r"compact \(r 32, d 16, <= 16 ch\); l1 \+ (lpips \+ )?adv", isg["features"])
    assert tab1["rows"][-1]["name"].startswith("ISG-10-2 fold-clean") and "per fold" in tab1["rows"][-1]["features"]
    tab5 = json.loads((quick_run / "tables" / "tab5.json").read_text())
    assert {r["features"].split("; ")[1].split(",")[0] for r in tab5["rows"][:2]} == {"l1 + lpips + adv", "l1 + adv"}
    compact, paper = (next(r for r in tab5["rows"] if r["variant"] == v) for v in (main_variant(), paper_variant(main_variant())))
    assert compact["features"].startswith("compact (r 32, d 16, <= 16 ch)")
    assert paper["features"] == compact["features"].replace("compact (r 32, d 16, <= 16 ch)", "paper resolution (r 128, d 16, <= 16 ch)")
    assert any("compact minus paper resolution" in note for note in tab5["notes"])


@pytest.mark.slow
def test_tab4_cuts_are_the_one_mapping_and_the_area_reading(quick_run):
    from isg.data.patch_file import read_patch_file

    table = json.loads((quick_run / "tables" / "tab4.json").read_text())
    pooled = np.concatenate([read_patch_file(p, features=False).scores
                             for p in sorted((quick_run / "work" / "patches" / "shannon").glob("*.h5"))])
    for row in table["rows"]:
        if row["reading"].startswith("the mapping"):
            z = row["paper_bits"] / 8e5 - 1  # 8e5, 1.6e6, 2.4e6 bits -> mean + 0, 1, 2 sigma
            assert row["cut_bits"] == pytest.approx(pooled.mean() + z * pooled.std(), rel=1e-9)
        else:
            assert row["cut_bits"] == pytest.approx(row["paper_bits"] * (128 / 512) ** 2)
        assert row["z"] == pytest.approx((row["cut_bits"] - pooled.mean()) / pooled.std(), rel=1e-9)
        assert len(row["pcc_seeds"]) == 2  # quick: split seeds 0 and 1
    claims = [c["claim"] for c in table["checks"]]
    assert any("clears the train-mean floor on every split seed" in c for c in claims)


@pytest.mark.slow
def test_a_rerun_resumes_from_the_cache(quick_run):
    from isg.cli import main

    summaries = sorted((quick_run / "work" / "runs").glob("*/summary.json"))
    stamps = {p: p.stat().st_mtime_ns for p in summaries}
    assert main(["paper", "--quick", "--out", str(quick_run), "--tables", "6", "--quiet"]) == 0
    assert {p: p.stat().st_mtime_ns for p in summaries} == stamps  # nothing retrained
    assert sorted((quick_run / "work" / "runs").glob("*/summary.json")) == summaries


@pytest.mark.parametrize("preset", ["quick", "default", "cohort"])
@pytest.mark.parametrize("kind", ["global", "local"])
def test_paper_variant_is_the_same_training_at_the_papers_widths_and_each_patchs_own_pixels(tmp_path, preset, kind):
    import pandas as pd

    from isg.paper import PRESETS
    from isg.paper.workspace import Cohort, Workspace, paper_variant

    sizes = PRESETS[preset]
    cohort = Cohort(pd.DataFrame({"slide_id": ["a"], "slide_path": ["a.tif"]}), pd.DataFrame(), None, "one slide")
    ws = Workspace(tmp_path, cohort, sizes, say=lambda *_: None)
    for loss in ("lpips", "no-lpips"):
        compact, paper = ws.ae_config(loss, kind), ws.ae_config(paper_variant(loss), kind)
        assert paper.resolution == (sizes.patch_size if kind == "global" else sizes.local_size)
        assert (paper.channel_base, paper.channel_max) == (sizes.paper_extractor["channel_base"], sizes.paper_extractor["channel_max"])
        assert (compact.channel_base, compact.channel_max) == (sizes.ae_channel_base, sizes.ae_channel_max)
        differs = {"resolution", "channel_base", "channel_max"}
        assert {k: v for k, v in vars(paper).items() if k not in differs} == {k: v for k, v in vars(compact).items() if k not in differs}
    with pytest.raises(ValueError, match="no-lpips-paper"):
        ws.ae_config("lpips-large", kind)


def test_the_cache_refuses_other_stages_and_records_new_ones(tmp_path):
    """One cohort at one set of shared-stage sizes per cache; a cache written before a stage existed gains it."""
    from dataclasses import replace

    import pandas as pd

    from isg.paper import DEFAULT
    from isg.paper.workspace import Cohort, Workspace

    cohort = Cohort(pd.DataFrame({"slide_id": ["a"], "slide_path": ["a.tif"]}), pd.DataFrame(), None, "one slide")
    Workspace(tmp_path, cohort, DEFAULT, say=lambda *_: None)
    stages = tmp_path / "stages.json"
    written = json.loads(stages.read_text())
    assert written["paper_extractor"] == DEFAULT.paper_extractor and written["patch_size"] == DEFAULT.patch_size
    with pytest.raises(ValueError, match=r"differs in paper_extractor, patch_size"):
        Workspace(tmp_path, cohort, replace(DEFAULT, patch_size=256, paper_extractor={"channel_base": 8192, "channel_max": 64}))
    assert json.loads(stages.read_text()) == written  # a refused run leaves the record as it was
    older = {k: v for k, v in written.items() if k != "paper_extractor"}
    stages.write_text(json.dumps(older))
    Workspace(tmp_path, cohort, DEFAULT, say=lambda *_: None)
    assert json.loads(stages.read_text()) == written


def test_paper_mapping_known_answers():
    from isg.select.rules import default_threshold_bits, paper_cut, paper_sigmas

    assert [paper_sigmas(b) for b in (8e5, 1.6e6, 2.4e6)] == [0.0, 1.0, 2.0]
    slides = [np.array([1.0, 3.0]), np.array([5.0, 7.0, 9.0])]  # pooled: mean 5, population sd sqrt(8)
    assert paper_cut(1.6e6, slides) == pytest.approx(5 + 8**0.5) and paper_cut(8e5, slides) == pytest.approx(5.0)
    assert default_threshold_bits(128) == pytest.approx(1e5)  # the area reading, shown beside the mapping only


def test_cli_rejects_half_a_cohort_and_bad_lists(tmp_path, capsys):
    from isg.cli import main

    assert main(["paper", "--out", str(tmp_path), "--manifest", "m.csv"]) == 2
    assert "go together" in capsys.readouterr().err
    assert main(["paper", "--quick", "--out", str(tmp_path), "--tables", "1,x"]) == 2
    assert "--tables" in capsys.readouterr().err
    assert main(["paper", "--quick", "--out", str(tmp_path), "--tables", "7"]) == 2
    assert "unknown table" in capsys.readouterr().err


@pytest.mark.slow
def test_a_user_cohort_runs_from_its_manifest(quick_run, tmp_path):
    """--manifest / --expression / --labels: the same tables on a cohort given as files (no signal masks)."""
    from isg.cli import main

    cohort = quick_run / "cohort"
    argv = ["paper", "--size", "quick", "--out", str(tmp_path / "user"), "--manifest", str(cohort / "manifest.csv"),
            "--expression", str(cohort / "expression.tsv"), "--labels", str(cohort / "msi.csv"), "--tables", "3", "--quiet"]
    assert main(argv) == 0
    table = json.loads((tmp_path / "user" / "tables" / "tab3.json").read_text())
    assert [0.0 <= row["auc"] <= 1.0 for row in table["rows"]] == [True, True]
    assert "manifest.csv: 8 slides" in table["setting"][0] and "--manifest" in table["setting"][-1]
