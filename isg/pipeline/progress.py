"""Progress of one slide through its stages: a line at least every few seconds, on a terminal and in a log.

:class:`SlideProgress` reports the stage a slide is in (``read``, ``features``, ``predict``, ...), its
count of done items against the total where there is one, the rate and the time left:

* to a log (``log``, a :class:`logging.Logger`; ``isg predict`` gives each run ``OUT/progress.log``):
  one line every ``interval`` seconds;
* on the terminal (``bar=True``): when stderr is a terminal, in the last column of the live cohort bar
  (:func:`isg.pipeline.cohort.item_status`) or, without one, a tqdm bar per stage; else the same lines as
  the log (a batch job's log file).

A heartbeat thread writes the line (and refreshes the bar) even while one call runs for long (the slide
model over 20k patches, a tissue mask): the user never waits more than ``interval`` seconds for a sign
of life.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from isg.pipeline.cohort import cohort_bar_live, item_status

INTERVAL = 1.0  # seconds between progress lines: a line at least every 2 s even on a loaded machine
log = logging.getLogger("isg.progress")
log.propagate = False  # lines go to the handlers given (a log file), never twice to the terminal
log.setLevel(logging.INFO)


class progress_log:
    """Context manager: the ``isg.progress`` lines of the run also go to ``path`` (appended, timestamped).

    One handler per file and process, however many are open at once: a cohort wraps the run and each slide wraps
    its own call (threads of one worker at once, too), so a slide on a Dask worker (another process, perhaps
    another host sharing ``path``) logs there as well, and every line is written once."""

    _open: dict[str, list] = {}  # absolute path -> [handler, users]
    _lock = threading.Lock()

    def __init__(self, path):
        self.path = os.path.abspath(path)

    def __enter__(self):
        from pathlib import Path

        with self._lock:
            entry = self._open.get(self.path)
            if entry is None:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                handler = logging.FileHandler(self.path)  # appends: one write per line
                handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
                log.addHandler(handler)
                entry = self._open[self.path] = [handler, 0]
            entry[1] += 1
        return self

    def __exit__(self, *exc):
        with self._lock:
            entry = self._open[self.path]
            entry[1] -= 1
            if entry[1] == 0:
                del self._open[self.path]
                log.removeHandler(entry[0])
                entry[0].close()
        return False


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class SlideProgress:
    """``with SlideProgress(slide_id, bar=True) as progress: progress.stage("features", total, "patches"); progress.update(n)``."""

    def __init__(self, slide_id: str, *, bar: bool = False, log: logging.Logger | None = log, interval: float = INTERVAL,
                 stream=None):
        self.slide_id, self.log, self.interval = slide_id, log, float(interval)
        self.stream = stream if stream is not None else sys.stderr
        self.terminal = bar and getattr(self.stream, "isatty", lambda: False)()
        self.echo = bar and not self.terminal  # not a terminal: lines on the stream too
        self.name, self.total, self.unit, self.done = None, None, "", 0
        self.started = self.last_line = time.perf_counter()
        self._bar = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="isg-progress", daemon=True)
        self._thread.start()

    # -- stages
    def stage(self, name: str, total: int | None = None, unit: str = "patches") -> None:
        """Start stage ``name`` with ``total`` items of ``unit`` (None: no count, elapsed time only)."""
        with self._lock:
            self._close_bar()
            self.name, self.total, self.unit, self.done = name, total, unit, 0
            self.started = time.perf_counter()
            if self.terminal and not cohort_bar_live():
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=f"{self.slide_id} {name}", unit=" " + unit if total else "",
                                 file=self.stream, leave=False, dynamic_ncols=True, mininterval=0.5)
        self._line()

    def update(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
        if time.perf_counter() - self.last_line >= self.interval:
            self._line()

    def text(self) -> str:
        """The progress line of the current stage."""
        elapsed = time.perf_counter() - self.started
        head = f"{self.slide_id} {self.name}:"
        if not self.total:
            return f"{head} {_clock(elapsed)} elapsed" + (f", {self.done} {self.unit}" if self.done else "")
        rate = self.done / elapsed if elapsed > 0 else 0.0
        left = f", ~{_clock((self.total - self.done) / rate)} left" if rate > 0 else ""
        return (f"{head} {self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%), "
                f"{_clock(elapsed)} elapsed, {rate:.1f} {self.unit}/s{left}")

    # -- output
    def _line(self) -> None:
        with self._lock:
            if self.name is None:
                return
            self.last_line = time.perf_counter()
            line = self.text()
            if self.log is not None:
                self.log.info(line)
            if self.echo:
                print(line, file=self.stream, flush=True)
            elif self._bar is not None:
                self._bar.refresh()
            elif self.terminal:
                item_status(self.slide_id, line[len(self.slide_id) + 1:])

    def _beat(self) -> None:
        while not self._stop.wait(min(0.25, self.interval / 4)):
            if time.perf_counter() - self.last_line >= self.interval:
                self._line()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        with self._lock:
            self._close_bar()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
