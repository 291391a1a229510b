"""`isg demo --quick`: the README's main job, end to end on CPU (smoke test, ~30 s)."""

from __future__ import annotations

import json

import pandas as pd
import pytest


@pytest.mark.filterwarnings("ignore:LPIPS:UserWarning")  # no AlexNet weights on CI: random backbone, warned
def test_demo_quick_runs_every_step(tmp_path, capsys):
    from isg.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"== {step}" in printed
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["n_genes"] == 20 and summary["n_samples"] == 16
    predictions = pd.read_csv(out / "predictions" / "predictions.csv", index_col="slide_id")
    timings = pd.read_csv(out / "predictions" / "timings.csv", index_col="slide_id")
    assert predictions.shape == (2, 20) and predictions.notna().all().all()
    assert list(timings.index) == list(predictions.index) and (timings["total"] > 0).all()


def test_demo_rejects_too_few_slides(tmp_path, capsys):
    from isg.cli import main

    assert main(["demo", "--out", str(tmp_path), "--slides", "3"]) == 2
    assert "--slides must be >= 6" in capsys.readouterr().err
