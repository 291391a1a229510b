"""Small helpers shared by every layer (the bottom of the import graph: imports nothing from isg)."""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import hashlib
import io
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path


def list_some(items: Iterable, limit: int = 10) -> str:
    """``'a, b, c'`` or ``'a, b, ... (+12 more)'``: offenders for an error message."""
    items = [str(item) for item in items]
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... (+{len(items) - limit} more)"


def table_separator(path: str | os.PathLike) -> str:
    """Column separator of a CSV/TSV file: by extension (``.gz`` ignored), else sniffed from its first line."""
    suffixes = [s.lower() for s in Path(path).suffixes if s.lower() not in (".gz", ".bz2", ".xz", ".zip")]
    if suffixes and suffixes[-1] in (".tsv", ".tab"):
        return "\t"
    if suffixes and suffixes[-1] == ".csv":
        return ","
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as handle:
        first_line = handle.readline()
    try:
        return csv.Sniffer().sniff(first_line, delimiters="\t,;").delimiter
    except csv.Error:
        return "\t"


def read_text_table(path: str | os.PathLike, what: str = "table", error: type[Exception] = ValueError):
    """A CSV/TSV file as a pandas DataFrame of stripped-name string columns (nothing parsed as NaN).

    Raises FileNotFoundError for a missing file and ``error`` for one that cannot be read as a table,
    both naming ``what`` and the file.
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path}: no such file")
    try:
        table = pd.read_csv(path, sep=table_separator(path), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise error(f"{what} {path}: cannot be read as a CSV/TSV table ({exc})") from exc
    table.columns = table.columns.str.strip()
    return table


def from_known_fields(cls, values, what: str):
    """The dataclass ``cls(**values)``; keys that are not its fields raise ValueError naming ``what`` and them."""
    import dataclasses

    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(map(str, unknown))}")
    return cls(**values)


def h5_sources(source: str | os.PathLike | list) -> list[Path]:
    """A folder of .h5 files or a list of .h5 paths -> sorted list of paths (error when none).

    Hidden files in the folder (``.name.*.h5``: temporaries of an interrupted atomic write) are skipped.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(p) for p in source]
    else:
        folder = Path(source)
        if not folder.is_dir():
            raise FileNotFoundError(f"h5 folder {folder}: no such directory")
        paths = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if not paths:
        raise ValueError(f"h5 folder {source}: holds no .h5 files")
    return paths


def _umask() -> int:  # read once at import: os.umask is process-wide, not for worker threads
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; it replaces ``path`` only if the block succeeds.

    The result gets the permissions of a newly created file (0666 & ~umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (checkpoints are identified by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


class ProcessCache:
    """Objects built once per process and reused, keyed by what identifies them (e.g. a checkpoint's path and
    SHA-256): a Dask worker or pool process loads a model on its first task and keeps it for the next ones.

    Least-recently-used entries beyond ``max_entries`` are dropped. ``loads`` counts the builds per key.
    Thread-safe: concurrent first uses of one key build it once.
    """

    def __init__(self, max_entries: int = 4):
        self.max_entries = max_entries
        self.lock = threading.Lock()
        self.entries: dict = {}  # key -> object, least recently used first
        self.loads: dict = {}  # key -> number of builds in this process

    def get(self, key, build):
        """The object cached under ``key``, built by ``build()`` on first use."""
        with self.lock:
            if key in self.entries:
                self.entries[key] = self.entries.pop(key)  # most recently used last
                return self.entries[key]
            value = build()
            self.entries[key] = value
            self.loads[key] = self.loads.get(key, 0) + 1
            while len(self.entries) > self.max_entries:
                self.entries.pop(next(iter(self.entries)))
            return value

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()


PROCESS_CACHE = ProcessCache()  # the one cache of this process (extractors, model folders)


def process_cache_loads() -> dict:
    """``{str(key): builds}`` of :data:`PROCESS_CACHE` in this process (``client.run`` calls it on Dask workers)."""
    with PROCESS_CACHE.lock:
        return {str(key): n for key, n in PROCESS_CACHE.loads.items()}


def process_memory() -> dict:
    """This process's resident memory now and at its peak, in MB, and its name ``host:pid``."""
    import socket

    import psutil

    info = psutil.Process().memory_info()
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    except ImportError:  # pragma: no cover - Windows
        peak = getattr(info, "peak_wset", info.rss) / 2**20
    return {"worker": f"{socket.gethostname()}:{os.getpid()}", "rss_mb": round(info.rss / 2**20, 1),
            "peak_rss_mb": round(max(peak, info.rss / 2**20), 1)}


# ----------------------------------------------------------------------------- output of C libraries

_native_log = logging.getLogger("isg.native")


class NativeOutput:
    """Process-wide, reference-counted redirection of the C-level stdout (1) / stderr (2) to temp files.

    Nested and concurrent users (threads reading several slides) share one redirection per descriptor;
    the last one to leave restores it, counts the captured lines and logs them.
    """

    lock = threading.RLock()
    depth = {1: 0, 2: 0}
    saved: dict[int, int] = {}
    sinks: dict[int, object] = {}
    python_stderr = None  # sys.stderr before the redirection
    visible_stderr = None  # a text stream on the terminal's stderr, for Python output meanwhile
    messages = 0

    @classmethod
    def enter(cls, fd: int) -> None:
        with cls.lock:
            if cls.depth[fd] == 0:
                stream = sys.stdout if fd == 1 else sys.stderr
                if stream is not None:
                    stream.flush()
                cls.saved[fd] = os.dup(fd)
                sink = tempfile.TemporaryFile()
                os.dup2(sink.fileno(), fd)
                cls.sinks[fd] = sink
                if fd == 2:
                    cls._keep_python_stderr_visible()
            cls.depth[fd] += 1

    @classmethod
    def _keep_python_stderr_visible(cls) -> None:
        try:
            is_fd2 = sys.stderr is not None and sys.stderr.fileno() == 2
        except (AttributeError, OSError, ValueError):  # pytest's capture and the like: leave it alone
            is_fd2 = False
        if not is_fd2:
            return
        if cls.visible_stderr is None:  # one stream on a duplicate of the terminal, kept for the process
            cls.visible_stderr = io.TextIOWrapper(os.fdopen(os.dup(cls.saved[2]), "wb", buffering=0),
                                                  encoding=sys.stderr.encoding, errors="backslashreplace",
                                                  line_buffering=True, write_through=True)
        cls.python_stderr, sys.stderr = sys.stderr, cls.visible_stderr

    @classmethod
    def stderr_size(cls) -> int:
        """Bytes captured from fd 2 so far in the current redirection (call inside it)."""
        with cls.lock:
            return os.fstat(cls.sinks[2].fileno()).st_size

    @classmethod
    def stderr_since(cls, offset: int) -> str:
        with cls.lock:
            sink = cls.sinks[2].fileno()
            return os.pread(sink, os.fstat(sink).st_size - offset, offset).decode("utf-8", "replace")

    @classmethod
    def leave(cls, fd: int) -> None:
        with cls.lock:
            cls.depth[fd] -= 1
            if cls.depth[fd]:
                return
            if fd == 2 and cls.python_stderr is not None:
                sys.stderr.flush()
                sys.stderr, cls.python_stderr = cls.python_stderr, None
            saved = cls.saved.pop(fd)
            os.dup2(saved, fd)
            os.close(saved)
            sink = cls.sinks.pop(fd)
            sink.seek(0)
            lines = [line for line in sink.read().decode("utf-8", "replace").splitlines() if line.strip()]
            sink.close()
            cls.messages += len(lines)
            for line in lines:
                _native_log.debug("native %s: %s", "stdout" if fd == 1 else "stderr", line)


@contextlib.contextmanager
def quiet_native_output(stdout: bool = False):
    """Capture what C libraries print on stderr (and on stdout when ``stdout``) for the duration.

    Process-wide and reference-counted: safe to nest and to use from several threads at once. Captured
    lines are counted (:func:`native_messages`) and logged at DEBUG level on the ``isg.native`` logger.
    """
    fds = (2, 1) if stdout else (2,)
    for fd in fds:
        NativeOutput.enter(fd)
    try:
        yield
    finally:
        for fd in reversed(fds):
            NativeOutput.leave(fd)


def native_messages() -> int:
    """Lines that C libraries printed inside :func:`quiet_native_output` so far (this process)."""
    return NativeOutput.messages


@contextlib.contextmanager
def quiet_cucim():
    """Silence cuCIM's cuFile layer while importing cuCIM / opening a file.

    On machines without a CUDA driver cuFile prints libcuda errors on stdout and writes ``cufile.log``
    into the working directory. ``CUFILE_LOGFILE_PATH`` only helps when set before torch loads
    libcufile, so the C-level stdout/stderr are captured for the duration (:func:`quiet_native_output`)
    and a ``cufile.log`` that appeared meanwhile is removed.
    """
    os.environ.setdefault("CUFILE_LOGFILE_PATH", os.devnull)
    log = Path("cufile.log")
    had_log = log.exists()
    with quiet_native_output(stdout=True):
        try:
            yield
        finally:
            if not had_log:
                with contextlib.suppress(OSError):
                    log.unlink()


@functools.cache
def _glibc():
    """The C library when it is glibc (it has ``malloc_trim``), else None; ``mallinfo2`` returns its struct
    where glibc has it (>= 2.33). ctypes is imported here, on first use, not with every ``import isg``."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):
        class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
            _fields_ = [(field, ctypes.c_size_t) for field in
                        ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc.mallinfo2.restype = MallInfo2
    return libc


TRIM_MIN_FREE_BYTES = 128 << 20  # trim_memory's default: less freed heap than this stays for reuse


def heap_free_bytes() -> int | None:
    """Bytes freed but still held by the C heap (glibc ``mallinfo2().fordblks``), None where unknown."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return int(libc.mallinfo2().fordblks)


def trim_memory(min_free: int = TRIM_MIN_FREE_BYTES) -> bool:
    """Return the C heap's freed pages to the OS (glibc ``malloc_trim``, as Dask's workers do) when it holds at
    least ``min_free`` bytes of them; True when it trimmed, False otherwise (less free, or not glibc).

    Between the stages of a large slide, freed buffers of one stage (thumbnails, batches) stay in the heap
    below live allocations and count in the process's RSS (300 MB of a 10^5 px slide's scoring pass);
    trimming gives them back. Below ``min_free`` they stay for the next stage to reuse: a 16k px slide freed
    19-67 MB per stage, and trimming them cost 100-150k page faults (a tenth of its CPU time in the kernel)
    when the next stage touched that memory again.
    """
    libc = _glibc()
    if libc is None:
        return False
    free = heap_free_bytes()
    if free is not None and free < min_free:
        return False
    libc.malloc_trim(0)
    return True
