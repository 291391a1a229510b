"""Cohort runner: one task per slide, resumable, failure-tolerant, local or on Dask.

``run_cohort(items, process_one, out_path_of)`` calls ``process_one(item)`` for
every item whose output ``out_path_of(item)`` does not exist yet (resume), on

* an in-process thread pool (``scheduler=None`` or ``"threads"``, the default),
* a process pool (``"processes"``; ``process_one`` must be picklable),
* Dask distributed (``scheduler="tcp://host:8786"`` or a ``distributed.Client``),
  one task per item, with worker ``resources`` such as ``{"GPU": 1}``.

``process_one`` must write its output atomically (temp file + rename, see
:func:`isg.utils.atomic_path`): an output that exists is then complete by
construction, so killing a run loses no finished output and a rerun skips it.
Temp files left by a killed run (``.<stem>.*<suffix>`` next to the output) are
never taken for outputs and are removed before their item is processed again.

An item that raises is recorded (error type and message) and skipped; the others
go on. ``process_one`` returns a dict of per-item stats; those named ``n_*`` or
``seconds*`` are summed in :attr:`CohortSummary.totals` (e.g. ``n_tissue`` / ``n_kept`` patches).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from isg.utils import atomic_path, process_memory

log = logging.getLogger(__name__)

DONE, SKIPPED, FAILED = "done", "skipped", "failed"
CONNECT_TIMEOUT = "20s"  # to reach a Dask scheduler given by address


@dataclass
class ItemResult:
    """Outcome of one item (slide)."""

    name: str
    status: str  # "done" | "skipped" | "failed"
    output: str
    seconds: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)
    error_type: str | None = None
    error: str | None = None
    worker: str | None = None  # host:pid of the process that ran it
    rss_mb: float | None = None  # that process's resident memory after the item
    peak_rss_mb: float | None = None  # and its peak so far


@dataclass
class CohortSummary:
    """All item results of a run plus its wall time; ``summary.json`` is ``to_dict()``."""

    results: list[ItemResult]
    seconds: float
    scheduler: str = "threads"
    complete: bool = True  # False while the run is still going (intermediate summary.json)

    def _with(self, status: str) -> list[ItemResult]:
        return [r for r in self.results if r.status == status]

    @property
    def done(self) -> list[ItemResult]:
        return self._with(DONE)

    @property
    def skipped(self) -> list[ItemResult]:
        return self._with(SKIPPED)

    @property
    def failed(self) -> list[ItemResult]:
        return self._with(FAILED)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def totals(self) -> dict[str, float]:
        """Sums of the ``n_*`` and ``seconds*`` stats over the items processed in this run."""
        totals: dict[str, float] = {}
        for result in self.done:
            for key, value in result.stats.items():
                if key.startswith(("n_", "seconds")) and isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals[key] = totals.get(key, 0) + value
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in totals.items()}

    def to_dict(self) -> dict:
        return {
            "complete": self.complete,
            "scheduler": self.scheduler,
            "seconds": round(self.seconds, 3),
            "n_items": len(self.results),
            "n_done": len(self.done),
            "n_skipped": len(self.skipped),
            "n_failed": len(self.failed),
            "totals": self.totals,
            "failed": [{"name": r.name, "error_type": r.error_type, "error": r.error} for r in self.failed],
            "items": [asdict(r) for r in self.results],
        }

    def write(self, path: str | os.PathLike) -> None:
        """Write ``to_dict()`` as JSON atomically (temp file + rename), readable like any new file."""
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def table(self, title: str = "cohort"):
        """A ``rich.table.Table`` with one row per item and a totals caption."""
        from rich.table import Table

        keys = [k for k in ("n_tissue", "n_kept", "n_damaged") if any(k in r.stats for r in self.results)]
        table = Table(title=title, show_lines=False)
        table.add_column("item")
        table.add_column("status")
        for key in keys:
            table.add_column(key, justify="right")
        table.add_column("seconds", justify="right")
        table.add_column("error", overflow="fold")
        style = {DONE: "green", SKIPPED: "dim", FAILED: "red"}
        for r in self.results:
            cells = [str(r.stats.get(k, "")) for k in keys]
            error = f"{r.error_type}: {r.error}" if r.error_type else ""
            table.add_row(r.name, f"[{style[r.status]}]{r.status}[/]", *cells, f"{r.seconds:.2f}", error)
        totals = self.totals
        table.caption = (f"{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed; "
                         + "".join(f"{k} {int(totals[k])}, " for k in keys if k in totals)
                         + f"{self.seconds:.1f} s ({self.scheduler})")
        return table

    def print(self, title: str = "cohort") -> None:
        from rich.console import Console

        Console(stderr=True).print(self.table(title))


def clean_stale_temp(output: str | os.PathLike) -> list[Path]:
    """Remove temp files a killed run left for ``output`` (``.<stem>.*<suffix>``, see ``atomic_path``)."""
    output = Path(output)
    if not output.parent.is_dir():
        return []
    stale = [p for p in output.parent.glob(f".{output.stem}.*{output.suffix}") if p.is_file()]
    for path in stale:
        try:
            path.unlink()
        except FileNotFoundError:  # removed meanwhile
            pass
    return stale


def _run_one(process_one: Callable, item: Any, name: str, output: str) -> ItemResult:
    """Process one item and never raise: failures become a ``failed`` result."""
    start = time.perf_counter()
    try:
        clean_stale_temp(output)
        stats = process_one(item) or {}
        result = ItemResult(name, DONE, output, time.perf_counter() - start, dict(stats))
    except Exception as exc:  # noqa: BLE001 - one bad slide must not stop the cohort
        message = str(exc) or traceback.format_exception_only(type(exc), exc)[-1].strip()
        result = ItemResult(name, FAILED, output, time.perf_counter() - start,
                            error_type=type(exc).__name__, error=message)
    memory = process_memory()
    result.worker, result.rss_mb, result.peak_rss_mb = memory["worker"], memory["rss_mb"], memory["peak_rss_mb"]
    return result


def on_dask(scheduler) -> bool:
    """Whether ``scheduler`` sends items to Dask workers, which may run in another working directory (give
    them absolute paths)."""
    return scheduler is not None and scheduler not in ("threads", "processes")


def duplicate_outputs(outputs: list[str]) -> list[str]:
    """The outputs named more than once, sorted (one pass: O(n) in the cohort size)."""
    return sorted(output for output, n in Counter(outputs).items() if n > 1)


def _scheduler_name(scheduler) -> str:
    if scheduler is None or scheduler == "threads":
        return "threads"
    if scheduler == "processes":
        return "processes"
    if isinstance(scheduler, str):
        return f"dask {scheduler}"
    return f"dask {getattr(scheduler, 'scheduler_info', lambda: {})().get('address', 'client')}"


def run_cohort(
    items: Iterable,
    process_one: Callable[[Any], Mapping | None],
    out_path_of: Callable[[Any], str | os.PathLike],
    *,
    scheduler=None,
    workers: int | None = None,
    resources: Mapping[str, float] | None = None,
    overwrite: bool = False,
    progress: bool = True,
    name_of: Callable[[Any], str] = str,
    is_complete: Callable[[Path], bool] = Path.exists,
    summary_path: str | os.PathLike | None = None,
    title: str = "cohort",
) -> CohortSummary:
    """Run ``process_one`` on every item (see the module docstring); returns the summary.

    ``scheduler``: None / ``"threads"`` (in-process pool of ``workers`` threads,
    default ``min(4, cpus)``), ``"processes"`` (pool of ``workers`` spawned
    processes), a Dask scheduler address, or a ``distributed.Client``.
    ``resources`` is passed to Dask's ``submit`` (e.g. ``{"GPU": 1}``).
    ``overwrite`` reprocesses items whose output exists. The summary is written
    atomically to ``summary_path`` (if given) during the run and at its end, and
    printed as a rich table when ``progress``.
    """
    items = list(items)
    names = [name_of(item) for item in items]
    outputs = [str(out_path_of(item)) for item in items]
    duplicated = duplicate_outputs(outputs)
    if duplicated:
        raise ValueError(f"run_cohort: several items write the same output(s): {', '.join(duplicated[:5])}")

    start = time.perf_counter()
    results: list[ItemResult | None] = [None] * len(items)
    todo = []
    previous = _previous_stats(summary_path)
    for i, output in enumerate(outputs):
        if not overwrite and is_complete(Path(output)):
            results[i] = ItemResult(names[i], SKIPPED, output, stats=previous.get((names[i], output), {}))
        else:
            todo.append(i)

    sched_name = _scheduler_name(scheduler)
    last_write = [0.0]

    def summary(complete: bool) -> CohortSummary:
        pending = [r or ItemResult(names[i], "pending", outputs[i]) for i, r in enumerate(results)]
        return CohortSummary(pending if not complete else results, time.perf_counter() - start, sched_name, complete)

    def record(i: int, result: ItemResult) -> None:
        results[i] = result
        if summary_path is not None and time.perf_counter() - last_write[0] > 2.0:
            summary(False).write(summary_path)
            last_write[0] = time.perf_counter()

    with _progress(progress, len(todo), title) as advance:
        for i, result in _execute(todo, items, names, outputs, process_one, scheduler, workers, resources):
            record(i, result)
            advance(result)

    final = summary(True)
    if summary_path is not None:
        final.write(summary_path)
    if progress:
        final.print(title)
    return final


def _previous_stats(summary_path) -> dict[tuple[str, str], dict]:
    """Stats of the items a previous run finished, from its summary.json ({} if none or unreadable)."""
    if summary_path is None or not Path(summary_path).is_file():
        return {}
    try:
        items = json.loads(Path(summary_path).read_text())["items"]
        return {(r["name"], r["output"]): r.get("stats") or {} for r in items if r["status"] in (DONE, SKIPPED)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _execute(todo, items, names, outputs, process_one, scheduler, workers, resources):
    """Yield ``(index, ItemResult)`` as items finish, on the chosen scheduler."""
    if not todo:
        return
    if scheduler is None or scheduler in ("threads", "processes"):
        n = workers or min(4, os.cpu_count() or 1)
        if scheduler == "processes":
            pool = cf.ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"))
        else:
            pool = cf.ThreadPoolExecutor(n, thread_name_prefix="isg-cohort")
        try:
            futures = {pool.submit(_run_one, process_one, items[i], names[i], outputs[i]): i for i in todo}
            for future in cf.as_completed(futures):
                i = futures[future]
                yield i, _result_of(future, names[i], outputs[i])
        finally:  # on Ctrl-C: drop the queued items, let the running ones finish their (atomic) writes
            pool.shutdown(wait=True, cancel_futures=True)
        return
    yield from _execute_dask(todo, items, names, outputs, process_one, scheduler, resources)


def _result_of(future, name: str, output: str) -> ItemResult:
    """The future's result, or a ``failed`` result if the worker itself died."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - e.g. BrokenProcessPool, KilledWorker
        return ItemResult(name, FAILED, output, error_type=type(exc).__name__, error=str(exc) or repr(exc))


def _execute_dask(todo, items, names, outputs, process_one, scheduler, resources):
    try:
        from distributed import Client, as_completed
    except ImportError as exc:  # pragma: no cover - dask[distributed] is a dependency
        raise RuntimeError("a Dask scheduler was given but dask.distributed is not installed") from exc

    own_client = not isinstance(scheduler, Client)
    if own_client and not isinstance(scheduler, str):
        raise TypeError(f"scheduler must be None, 'threads', 'processes', an address or a dask Client, not {scheduler!r}")
    if own_client:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            raise ConnectionError(f"cannot reach the Dask scheduler at {scheduler!r} within {CONNECT_TIMEOUT} ({exc})") from exc
    else:
        client = scheduler
    try:
        if resources:
            _warn_without_resources(client, resources)
        futures = {}
        for i in todo:
            future = client.submit(_run_one, process_one, items[i], names[i], outputs[i],
                                   key=f"isg-{names[i]}-{os.urandom(4).hex()}", pure=False,
                                   resources=dict(resources) if resources else None)
            futures[future] = i
        for future in as_completed(futures):
            i = futures[future]
            yield i, _result_of(future, names[i], outputs[i])
    finally:
        if own_client:
            client.close()


def _warn_without_resources(client, resources: Mapping[str, float]) -> None:
    """Say so when no worker offers the ``resources`` every task asks for: the tasks wait until one joins."""
    try:
        workers = client.scheduler_info(n_workers=-1).get("workers", {})  # all of them (distributed >= 2025.1)
    except TypeError:
        workers = client.scheduler_info().get("workers", {})
    if not any(all(info.get("resources", {}).get(name, 0) >= amount for name, amount in resources.items())
               for info in workers.values()):
        wanted = ",".join(f"{name}={amount:g}" for name, amount in resources.items())
        log.warning("none of the %d Dask worker(s) offers %s: the tasks wait until a worker started with "
                    "`--resources %s` joins", len(workers), wanted, wanted)


_STATUS: list = []  # the live cohort bar's status sink, while one is shown (see item_status)


def cohort_bar_live() -> bool:
    """Whether a cohort bar of this process is live (:func:`item_status` shows on it)."""
    return bool(_STATUS)


def item_status(name: str, text: str) -> bool:
    """Show ``text`` as what item ``name`` is doing now, on the live cohort bar of this process (threads
    scheduler); False when no bar is live (then the caller shows it its own way)."""
    if not _STATUS:
        return False
    _STATUS[-1](name, text)
    return True


class _progress:
    """Context manager yielding ``advance(result)``: a rich progress bar over items (or nothing); while it is
    live, :func:`item_status` writes into its last column."""

    def __init__(self, enabled: bool, total: int, title: str):
        self.enabled, self.total, self.title = enabled and total > 0, total, title

    def __enter__(self):
        if not self.enabled:
            return lambda result: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[last]}"),
                            transient=False)
        self.bar.__enter__()
        task = self.bar.add_task(self.title, total=self.total, last="")

        def advance(result: ItemResult) -> None:
            mark = "[red]failed[/]" if result.status == FAILED else "[green]ok[/]"
            self.bar.update(task, advance=1, last=f"{result.name} {mark}")

        self.status = lambda name, text: self.bar.update(task, last=f"{name} {text}")
        _STATUS.append(self.status)
        return advance

    def __exit__(self, *exc):
        if self.enabled:
            _STATUS.remove(self.status)
            self.bar.__exit__(*exc)
        return False
