"""Small helpers shared by every layer (the bottom of the import graph: imports nothing from isg)."""

from __future__ import annotations

import contextlib
import csv
import gzip
import os
import tempfile
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
