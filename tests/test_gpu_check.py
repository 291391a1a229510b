"""bench/gpu_check.sh, the first script to run on a GPU, in its dry mode (collects every step on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "ISG_BENCH_OUT": str(tmp_path)}
    run = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert summary["dry"] is True
    assert [s["step"] for s in summary["steps"]] == ["cuda", "tests", "attention", "shannon", "decode", "preprocess",
                                                      "efficiency"]
    assert all(s["exit"] == 0 for s in summary["steps"]), summary
