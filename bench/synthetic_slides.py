"""Synthetic benchmark slides written once and kept: ``isg synth --slides 1 --size N`` into ``ISG_BENCH_CACHE``.

The scale and efficiency benchmarks share them (``$TMPDIR/isg-bench-cache/scale/synth<N>/slides/*.tif``); the
100,000 px one takes ~7 minutes and 1.9 GB to write, 2.4 GB on disk.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("ISG_BENCH_CACHE", Path(tempfile.gettempdir()) / "isg-bench-cache")) / "scale"


def isg(*args, cwd=None) -> None:
    """``isg ARGS`` in a fresh process (output hidden; a failure raises)."""
    subprocess.run([sys.executable, "-m", "isg", *map(str, args)], check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def synthetic_slide(size: int) -> Path:
    """The cached ``size`` px synthetic slide (0.5 um/px, 256 px JPEG tiles, seed 0), written on first use."""
    folder = CACHE / f"synth{size}"
    slides = sorted((folder / "slides").glob("*.tif")) if (folder / "slides").is_dir() else []
    if not slides:
        isg("synth", "--out", folder, "--slides", 1, "--size", size, "--quiet")
        slides = sorted((folder / "slides").glob("*.tif"))
    return slides[0]
