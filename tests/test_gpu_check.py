"""bench/gpu_check.sh, the first script to run on a GPU: its plan (steps, order, time limits) and arguments.

The script itself is rehearsed on a CPU machine by CI (``bash bench/gpu_check.sh --rehearse`` in .ci/run: a clean
venv with the GPU runner's packages, every step that needs no device, an import guard); these tests keep the plan
honest without building anything.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _plan() -> tuple[list[tuple[str, int, str]], int]:
    run = subprocess.run(["bash", str(SCRIPT), "--plan"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    rows = [line.split("|") for line in run.stdout.split()]
    steps = [(name, int(limit), kind) for name, limit, kind in rows if kind != "total"]
    budget = [int(limit) for _, limit, kind in rows if kind == "total"]
    assert len(budget) == 1, run.stdout
    return steps, budget[0]


def test_steps_in_the_order_of_the_first_gpu_minutes():
    """Build, then CUDA usable (both stop the run when they fail), correctness before timings, the tools that may fail
    in a sandbox last but one, the optional device-decode tests last."""
    steps, _ = _plan()
    assert [s[0] for s in steps] == ["build", "cuda", "word-path", "op-tests", "shannon", "attention", "memcheck",
                                     "racecheck", "ncu", "io-device"]
    kinds = {name: kind for name, _, kind in steps}
    assert [name for name, kind in kinds.items() if kind == "required"] == ["build", "cuda"]
    assert {name for name, kind in kinds.items() if kind == "allowed"} == {"memcheck", "racecheck", "ncu"}


def test_budget_fits_six_minutes():
    steps, budget = _plan()
    assert 0 < budget <= 360 - 15            # the tarball and the summary fit in what is left of 6 minutes
    assert all(0 < limit <= budget for _, limit, _ in steps)
    # the steps that must run get their whole limit before the budget runs out
    first = {name: limit for name, limit, _ in steps[:6]}
    assert sum(first.values()) <= budget, first


def test_script_parses_and_refuses_unknown_arguments():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    run = subprocess.run(["bash", str(SCRIPT), "--dry"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "usage" in run.stderr
