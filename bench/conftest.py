"""Benchmark helpers: side-by-side timings printed as ratio tables.

Run with ``python3 -m pytest bench --benchmark-enable -s``. Each benchmark
module measures its contenders in the same process, one after the other on the
same inputs, and adds rows to a named table with :func:`report`; the tables
(with ratios to a named baseline row) are printed at the end of the session and
written to ``bench/results/<table>.json`` so figures can be recorded in the repo.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test fixtures (tissue_samples) for benchmarks

_TABLES: dict[str, dict] = defaultdict(lambda: {"rows": [], "baseline": None, "unit": "", "higher_is_better": True})


def measure(fn, *, repeat: int = 5, warmup: int = 1, min_time: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class Report:
    """Collects rows of named tables: ``report.add("shannon", "zlib-9", 35.2, unit="MB/s", baseline=True)``.

    ``report.measure(fn, repeat=5)`` is :func:`measure` (median seconds).
    """

    measure = staticmethod(measure)

    def add(self, table: str, name: str, value: float, *, unit: str = "", baseline: bool = False,
            higher_is_better: bool = True, **extra) -> None:
        entry = _TABLES[table]
        entry["unit"] = unit or entry["unit"]
        entry["higher_is_better"] = higher_is_better
        entry["rows"] = [r for r in entry["rows"] if r["name"] != name] + [{"name": name, "value": float(value), **extra}]
        if baseline:
            entry["baseline"] = name


def pytest_collection_modifyitems(config, items):
    from markers import skip_gpu_without_cuda  # tests/markers.py (tests/ is on sys.path above)

    skip_gpu_without_cuda(items)


@pytest.fixture(scope="session")
def report() -> Report:
    return Report()


def _ratio(table: dict, value: float) -> float | None:
    base = next((r["value"] for r in table["rows"] if r["name"] == table["baseline"]), None)
    if not base or not value:
        return None
    return value / base


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _TABLES:
        return
    out_dir = Path(os.environ.get("ISG_BENCH_OUT", Path(__file__).parent / "results"))
    out_dir.mkdir(parents=True, exist_ok=True)
    write = terminalreporter.write_line
    for name, table in _TABLES.items():
        write("")
        write(f"== {name} ({table['unit']}; ratio vs {table['baseline'] or '-'}) ==")
        extra_keys = sorted({k for r in table["rows"] for k in r if k not in ("name", "value")})
        write(f"{'contender':<34}{'value':>14}{'ratio':>10}  " + "  ".join(extra_keys))
        for row in table["rows"]:
            ratio = _ratio(table, row["value"])
            ratio_s = f"{ratio:10.2f}" if ratio is not None else f"{'-':>10}"
            extras = "  ".join(f"{row[k]}" for k in extra_keys if k in row)
            write(f"{row['name']:<34}{row['value']:14.4g}{ratio_s}  {extras}")
        payload = {"table": name, "machine": platform.node(), "processor": platform.processor(),
                   "cpu_count": os.cpu_count(), **table,
                   "ratios": {r["name"]: _ratio(table, r["value"]) for r in table["rows"]}}
        (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
