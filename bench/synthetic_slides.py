"""Synthetic benchmark slides written once and kept: ``isg synth --slides 1 --size N`` into ``ISG_BENCH_CACHE``.

The scale and efficiency benchmarks share them (``$TMPDIR/isg-bench-cache/scale/synth<N>-<generator>/slides/*.tif``,
``<generator>``: :data:`GENERATOR`, so slides of an earlier generator are never reused); the 100,000 px one is
written in 25 strip rows of 4096 px, each ~1 min and 1.9 GB peak on a loaded 2-core VM (docs/data.md).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("ISG_BENCH_CACHE", Path(tempfile.gettempdir()) / "isg-bench-cache")) / "scale"
_SYNTH = Path(__file__).resolve().parents[1] / "isg" / "io" / "synth"
# the generator's source: a changed generator writes new slides (and the models trained on them) instead of reusing
GENERATOR = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(_SYNTH.glob("*.py")))).hexdigest()[:10]


def isg(*args, cwd=None) -> None:
    """``isg ARGS`` in a fresh process (output hidden; a failure raises)."""
    subprocess.run([sys.executable, "-m", "isg", *map(str, args)], check=True, cwd=cwd, stdout=subprocess.DEVNULL)


def synthetic_slide(size: int, mpp: float = 0.5) -> Path:
    """The cached ``size`` px synthetic slide (``mpp`` um/px at level 0, levels 4x apart as in an Aperio SVS, 256 px
    JPEG tiles, seed 0), written on first use."""
    folder = CACHE / (f"synth{size}-{GENERATOR}" if mpp == 0.5 else f"synth{size}-mpp{mpp:g}-{GENERATOR}")
    slides = sorted((folder / "slides").glob("*.tif")) if (folder / "slides").is_dir() else []
    if not slides:
        isg("synth", "--out", folder, "--slides", 1, "--size", size, "--mpp", mpp, "--quiet")
        slides = sorted((folder / "slides").glob("*.tif"))
    return slides[0]
