"""`isg demo` and the README's example, run exactly as written (the demo with --quick: tiny data)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> list[str]:
    """The commands of the README block marked ``<!-- example: explain -->`` (continuation lines joined)."""
    text = README.read_text()
    match = re.search(r"<!-- example: explain -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "README.md lost its '<!-- example: explain -->' block"
    joined = match.group(1).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_example_runs_and_explains(tmp_path, monkeypatch, capfd):
    from isg.cli import main

    monkeypatch.chdir(tmp_path)
    commands = readme_example()
    assert commands[0].startswith("isg demo") and any("--heatmaps" in c for c in commands)
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "isg"
        argv = argv[1:] + (["--quick"] if argv[1] == "demo" else [])  # tiny data
        assert main(argv) == 0, command
    transcript = capfd.readouterr()
    printed = transcript.out + transcript.err

    # the demo: every step announced with its command, the closing summary, a clean transcript
    for step in ("1/6", "2/6", "3/6", "4/6", "5/6", "6/6"):
        assert f"== {step}" in printed
    assert "== isg demo result" in printed and "marker genes" in printed
    assert "extractor: compact" in printed and "trained with l1" in printed  # what the autoencoders trained with
    assert "README check: only for the full demo" in printed  # --quick is not what the README shows
    assert "INFO matplotlib" not in printed and "(tests only)" not in printed
    assert not [line for line in printed.splitlines() if line.lstrip().startswith("{")]  # no raw JSON
    warnings = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warnings) == len(set(warnings))

    # what the model folder was trained on is on the record (no ImageNet AlexNet weights here: the LPIPS term is off)
    import json

    from isg.features.lpips_loss import cached_alexnet_weights

    pipeline = json.loads((tmp_path / "demo_out" / "train" / "pipeline.json").read_text())
    for role in ("global_features", "local_features"):
        record = pipeline[role]
        assert record["extractor_size"].startswith("compact (r 32") and record["checkpoint"].endswith("autoencoder.pt")
        if cached_alexnet_weights() is None:
            assert (record["loss_terms"], record["lpips_backbone"]) == ("l1 + adv", "none")

    # the README's predict command: heatmaps, attention maps, fold std beside every prediction
    predict = shlex.split(commands[-1])
    out = Path(predict[predict.index("--out") + 1])
    genes = predict[predict.index("--heatmaps") + 1].split(",")
    table = pd.read_csv(out / "predictions.csv", index_col="slide_id")
    assert len(table) == 2 and len(table.columns) == 40
    assert list(table.columns[:2]) == ["SYN0000", "SYN0000_std"]
    assert (table.filter(like="_std") >= 0).all().all() and table.notna().all().all()
    for slide_id in table.index:
        patches = pd.read_csv(out / "heatmaps" / slide_id / "patches.csv")
        assert list(patches.columns) == ["x", "y", "size", *genes] and len(patches) > 0
        assert np.isfinite(patches[genes].to_numpy()).all()
        for gene in genes:
            assert (out / "heatmaps" / slide_id / f"{gene}.png").read_bytes()[:4] == b"\x89PNG"
        with h5py.File(out / "attention" / f"{slide_id}.h5", "r") as f:
            n, folds = len(patches), 3  # --quick: 3 folds
            assert f["coords"].shape == (n, 2)
            np.testing.assert_array_equal(f["coords"][:], patches[["x", "y"]].to_numpy())
            gate, weights = f["local_gate"][:], f["global_weights"][:]
            assert gate.shape[:2] == weights.shape[:2] == (folds, n) and weights.shape[3] == gate.shape[3]
            assert np.isfinite(gate).all() and np.isfinite(weights).all()
    figure = re.search(r"!\[[^\]]*\]\(([^)]+\.png)\)", README.read_text())
    assert figure and (README.parent / figure.group(1)).is_file(), "README's example picture is missing"


def test_demo_rejects_too_few_slides(tmp_path, capsys):
    from isg.cli import main

    assert main(["demo", "--out", str(tmp_path), "--slides", "3"]) == 2
    assert "--slides must be >= 6" in capsys.readouterr().err


def test_help_describes_demo_and_shows_defaults(capsys):
    from isg.cli import main

    for argv, expected in ((["demo", "--help"], "synthetic cohort"), (["train", "--help"], "(default: 40)"),
                           (["extract", "fit", "--help"], "(default: 0.002)"), (["predict", "--help"], "(default: 64)")):
        with pytest.raises(SystemExit):
            main(argv)
        assert expected in " ".join(capsys.readouterr().out.split())


def test_cli_prefers_passive_openmp_unless_set():
    import os
    import subprocess
    import sys

    code = "import os, isg.cli; print(os.environ['OMP_WAIT_POLICY'])"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "PASSIVE"
    env["OMP_WAIT_POLICY"] = "ACTIVE"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "ACTIVE"


def test_readme_quotes_the_demo_check_from_its_one_place():
    """The README's demo figure is README_CHECK (value and tolerance), and the check line says yes/no by it."""
    from isg.cli.demo import README_CHECK

    text = " ".join(README.read_text().split())
    assert f"r {README_CHECK.r:.2f} +- {README_CHECK.tolerance:.2f}" in text
    assert README_CHECK.line("SYN0002", README_CHECK.r + README_CHECK.tolerance * 0.99).endswith("matches the README: yes")
    assert README_CHECK.line("SYN0002", README_CHECK.r - README_CHECK.tolerance * 1.01).endswith("matches the README: no")
