"""isg.pipeline.progress: a progress line at least every interval, in every stage, on a terminal and in a log."""

from __future__ import annotations

import io
import logging
import re
import threading
import time

import pytest

from isg.pipeline.progress import SlideProgress, progress_log


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("interval", [0.05, 0.12])
def test_lines_keep_coming_while_a_stage_blocks(interval):
    stream, records = io.StringIO(), []
    logger = logging.getLogger(f"isg.test-progress-{interval}")
    logger.propagate, logger.level = False, logging.INFO
    handler = logging.Handler()
    handler.emit = lambda record: records.append((time.perf_counter(), record.getMessage()))
    logger.addHandler(handler)
    with SlideProgress("s1", bar=True, log=logger, interval=interval, stream=stream) as progress:
        progress.stage("tissue grid")
        time.sleep(6 * interval)  # one long call (a tissue mask, a model over 20k patches): no update comes
        progress.stage("features", 7, "patches")
        for _ in range(7):
            progress.update(1)
            time.sleep(interval / 2)
    logger.removeHandler(handler)
    stamps = [t for t, _ in records]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert max(gaps) < 2 * interval + 0.1, gaps  # the heartbeat writes while nothing else does
    assert sum("tissue grid" in m for _, m in records) >= 4
    last = [m for _, m in records if "features" in m][-1]
    assert re.search(r"features: \d/7 patches \(\d+%\), 0:00 elapsed, [\d.]+ patches/s", last)
    echoed = stream.getvalue().splitlines()  # not a terminal (a redirected stderr): the same lines
    assert len(echoed) == len(records) and echoed[0].startswith("s1 tissue grid: 0:00 elapsed")


def test_a_terminal_gets_a_bar_and_a_log_file_gets_lines(tmp_path):
    terminal = _Terminal()
    with progress_log(tmp_path / "run" / "progress.log"):
        with SlideProgress("slide-b", bar=True, interval=0.05, stream=terminal) as progress:
            progress.stage("read + score", 4, "patches")
            for _ in range(4):
                progress.update(1)
                time.sleep(0.03)
    bar = terminal.getvalue()
    assert "slide-b read + score" in bar and "4/4" in bar and "\r" in bar  # tqdm redraws one line
    log = (tmp_path / "run" / "progress.log").read_text().splitlines()
    assert log and all(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ slide-b read \+ score: \d/4 patches", line) for line in log)
    with SlideProgress("quiet", bar=False, interval=0.05, stream=terminal) as progress:  # no terminal output
        progress.stage("predict", 2, "fold models")
    assert "quiet" not in terminal.getvalue()


def test_on_a_terminal_under_a_cohort_bar_the_line_goes_into_the_bar(monkeypatch):
    import isg.pipeline.cohort as cohort

    shown = []
    monkeypatch.setattr(cohort, "_STATUS", [lambda name, text: shown.append((name, text))])
    terminal = _Terminal()
    with SlideProgress("slide-c", bar=True, log=None, interval=0.05, stream=terminal) as progress:
        progress.stage("features", 3, "patches")
        for _ in range(3):
            progress.update(1)
            time.sleep(0.06)
    assert terminal.getvalue() == ""  # no second live display fighting the cohort bar
    assert shown[0] == ("slide-c", "features: 0/3 patches (0%), 0:00 elapsed, 0.0 patches/s")
    assert all(name == "slide-c" for name, _ in shown) and any(text.startswith("features: 3/3") for _, text in shown)


def test_progress_log_nested_for_one_file_writes_each_line_once(tmp_path):
    """A cohort's log and each slide's own (as on a Dask worker, threads at once) for the same file: one handler,
    one line each, removed when the last closes; another file gets its own."""
    from concurrent.futures import ThreadPoolExecutor

    from isg.pipeline.progress import log

    run, other = tmp_path / "run" / "progress.log", tmp_path / "other.log"
    before = list(log.handlers)
    barrier = threading.Barrier(4)

    def slide(i):
        with progress_log(tmp_path / "run" / ".." / "run" / "progress.log"):
            barrier.wait()  # all four open at once
            log.info(f"slide-{i} features: 1/2 patches")
            barrier.wait()

    with progress_log(other):
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(slide, range(4)))
        assert len(log.handlers) == len(before) + 1  # the slides' handler is gone, other's stays
    assert log.handlers == before
    lines = sorted(line.split(" ", 2)[2] for line in run.read_text().splitlines())
    assert lines == [f"slide-{i} features: 1/2 patches" for i in range(4)]
    assert len(other.read_text().splitlines()) == 4


def test_progress_log_outlives_the_first_opener(tmp_path):
    """Slides on a worker's threads close in any order: the file keeps its handler until the last one closes."""
    path = tmp_path / "progress.log"
    first, second = progress_log(path), progress_log(path)
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the one that opened the file ends first
    logging.getLogger("isg.progress").info("slide-e predict: 1/1 fold models")
    second.__exit__(None, None, None)
    logging.getLogger("isg.progress").info("after the last one closed")
    assert [line.split(" ", 2)[2] for line in path.read_text().splitlines()] == ["slide-e predict: 1/1 fold models"]
