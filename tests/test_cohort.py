"""isg.pipeline.cohort.run_cohort: resume, failures, atomic outputs, thread/process/Dask schedulers."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pytest

from isg.utils import atomic_path
from isg.pipeline.cohort import CohortSummary, clean_stale_temp, run_cohort


def out_of(out_dir: Path, item: int) -> Path:
    return Path(out_dir) / f"item{item}.json"


def square(out_dir: Path, item: int) -> dict:
    """Writes ``item**2`` atomically; items divisible by 5 fail."""
    if item % 5 == 0:
        raise ValueError(f"item {item} is bad")
    with atomic_path(out_of(out_dir, item)) as tmp:
        tmp.write_text(json.dumps({"value": item * item}))
    return {"n_tissue": item, "n_kept": 1}


def run(out_dir, items, **kw):
    return run_cohort(items, functools.partial(square, out_dir), functools.partial(out_of, out_dir),
                      progress=False, summary_path=Path(out_dir) / "summary.json", **kw)


def values(out_dir) -> dict[str, int]:
    return {p.name: json.loads(p.read_text())["value"] for p in sorted(Path(out_dir).glob("item*.json"))}


@pytest.mark.parametrize("workers", [1, 3])
def test_failures_recorded_and_others_finish(tmp_path, workers):
    items = list(range(1, 12))
    summary = run(tmp_path, items, workers=workers)
    bad = [i for i in items if i % 5 == 0]
    assert sorted(r.name for r in summary.failed) == sorted(map(str, bad))
    assert all(r.error_type == "ValueError" and "is bad" in r.error for r in summary.failed)
    assert len(summary.done) == len(items) - len(bad) and not summary.ok
    assert summary.totals == {"n_tissue": sum(i for i in items if i % 5), "n_kept": len(items) - len(bad)}
    assert values(tmp_path) == {f"item{i}.json": i * i for i in items if i % 5}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["complete"] and on_disk["n_done"] == 9 and on_disk["n_failed"] == 2
    assert {f["name"] for f in on_disk["failed"]} == {"5", "10"}
    assert [r.name for r in summary.results] == [str(i) for i in items]  # input order kept


def test_rerun_skips_finished_and_overwrite_redoes(tmp_path):
    run(tmp_path, [1, 2, 3])
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("item*.json")}
    summary = run(tmp_path, [1, 2, 3, 4])
    assert [r.name for r in summary.done] == ["4"] and len(summary.skipped) == 3
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
    summary = run(tmp_path, [1, 2, 3, 4], overwrite=True)
    assert len(summary.done) == 4 and not summary.skipped


def test_stale_temp_of_killed_run_is_ignored_and_cleaned(tmp_path):
    run(tmp_path, [1])
    # a killed run left a half-written temp file for item 2 (and item 1 is finished)
    stale = tmp_path / ".item2.abc123.json"
    stale.write_text('{"val')
    summary = run(tmp_path, [1, 2])
    assert [r.name for r in summary.done] == ["2"] and [r.name for r in summary.skipped] == ["1"]
    assert not stale.exists()
    assert values(tmp_path) == {"item1.json": 1, "item2.json": 4}
    assert not list(tmp_path.glob(".*"))
    assert clean_stale_temp(tmp_path / "missing" / "x.h5") == []


def test_failure_mid_write_leaves_no_output(tmp_path):
    def crash(item):
        with atomic_path(out_of(tmp_path, item)) as tmp:
            tmp.write_text("partial")
            raise OSError("disk full")

    summary = run_cohort([7], crash, functools.partial(out_of, tmp_path), progress=False)
    assert summary.failed[0].error_type == "OSError"
    assert not list(tmp_path.iterdir())


def test_duplicate_outputs_rejected(tmp_path):
    with pytest.raises(ValueError, match="same output"):
        run_cohort([1, 1], print, functools.partial(out_of, tmp_path), progress=False)


def test_summary_table_and_dict(tmp_path):
    summary = run(tmp_path, [1, 5])
    table = summary.table()
    assert table.row_count == 2 and "1 done, 0 skipped, 1 failed" in table.caption
    assert isinstance(summary, CohortSummary) and summary.to_dict()["totals"] == {"n_tissue": 1, "n_kept": 1}


def test_process_pool_same_outputs(tmp_path):
    threads, procs = tmp_path / "t", tmp_path / "p"
    run(threads, [1, 2, 3, 5])
    summary = run(procs, [1, 2, 3, 5], scheduler="processes", workers=2)
    assert summary.scheduler == "processes" and len(summary.failed) == 1
    assert values(threads) == values(procs)


@pytest.mark.parametrize("processes", [False, True])
def test_dask_local_cluster_same_outputs(tmp_path, processes):
    distributed = pytest.importorskip("distributed")
    threads, dask_dir = tmp_path / "t", tmp_path / "d"
    run(threads, [1, 2, 3, 5])
    with distributed.LocalCluster(host="127.0.0.1", n_workers=1, threads_per_worker=1, processes=processes, protocol="tcp",
                                  dashboard_address=None, resources={"GPU": 1}) as cluster:
        with distributed.Client(cluster) as client:
            summary = run(dask_dir, [1, 2, 3, 5], scheduler=client, resources={"GPU": 1})
        assert summary.scheduler.startswith("dask") and [r.name for r in summary.failed] == ["5"]
        assert values(threads) == values(dask_dir)
        # by address: the runner opens (and closes) its own client; everything is already done
        summary = run(dask_dir, [1, 2, 3], scheduler=cluster.scheduler_address)
        assert len(summary.skipped) == 3


def test_bad_scheduler(tmp_path):
    summary_or_error = None
    with pytest.raises(TypeError, match="scheduler"):
        summary_or_error = run(tmp_path, [1], scheduler=42)
    assert summary_or_error is None
    assert os.listdir(tmp_path) == []


def test_skipped_items_keep_stats_of_previous_run(tmp_path):
    run(tmp_path, [1, 2])
    summary = run(tmp_path, [1, 2, 3])
    assert {r.name: r.stats.get("n_tissue") for r in summary.results} == {"1": 1, "2": 2, "3": 3}
    assert summary.totals["n_tissue"] == 3  # totals count this run's work only
    (tmp_path / "summary.json").write_text("{not json")
    assert [r.stats for r in run(tmp_path, [1]).results] == [{}]


def test_interrupt_cancels_queued_items(tmp_path):
    def slow(item):
        if item == 1:
            raise KeyboardInterrupt  # Ctrl-C while the first item runs
        with atomic_path(out_of(tmp_path, item)) as tmp:
            tmp.write_text(json.dumps({"value": item}))

    with pytest.raises(KeyboardInterrupt):
        run_cohort(range(1, 50), slow, functools.partial(out_of, tmp_path), workers=1, progress=False)
    assert len(list(tmp_path.glob("item*.json"))) < 48  # the queue was dropped, not drained


def test_h5_sources_skip_temporaries_of_interrupted_writes(tmp_path):
    from isg.utils import h5_sources

    for name in ("b.h5", "a.h5", ".a.x1y2.h5", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in h5_sources(tmp_path)] == ["a.h5", "b.h5"]
    (tmp_path / "a.h5").unlink()
    (tmp_path / "b.h5").unlink()
    with pytest.raises(ValueError, match="holds no .h5 files"):
        h5_sources(tmp_path)
