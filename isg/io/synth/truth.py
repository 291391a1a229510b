"""Where the signal is: per-slide coverage masks of the signal regions, written beside ``truth.json`` and read
back as the share of each patch that carries signal.

``make_cohort`` writes ``signal/<slide_id>.png`` (uint8, 255 = the whole d x d block of level-0 pixels is
visible signal region, d = ``signal_downsample`` in the slide's ``truth.json`` record) for every slide.
:func:`read_signal_truth` loads them; :meth:`SignalTruth.patch_fraction` integrates a mask over level-0
patch boxes exactly (the mask is constant per block, so its integral is bilinear inside a block).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from isg.utils import atomic_path

SIGNAL_DIR = "signal"  # per-slide masks, relative to the cohort folder

__all__ = ["SIGNAL_DIR", "SignalTruth", "read_signal_truth", "write_signal_mask"]


@dataclass
class SignalTruth:
    """Signal coverage of one slide: ``coverage`` float32 [h, w] in [0, 1] per ``downsample`` x ``downsample`` block."""

    coverage: np.ndarray
    downsample: int

    def patch_fraction(self, coords, size) -> np.ndarray:
        """float64 [N]: the share of each level-0 box [x, x + size) x [y, y + size) (``coords`` [N, 2] = (x, y),
        ``size`` the level-0 patch side) covered by signal; parts outside the slide count as no signal."""
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if size <= 0:
            raise ValueError(f"patch size must be positive, got {size}")
        h, w = self.coverage.shape
        table = np.zeros((h + 1, w + 1), np.float64)  # table[j, i] = coverage summed over blocks [0, j) x [0, i)
        table[1:, 1:] = self.coverage.astype(np.float64).cumsum(0).cumsum(1)

        def integral(x, y):  # signal area (in blocks) over [0, x) x [0, y), x and y in level-0 px
            u, v = np.clip(x / self.downsample, 0, w), np.clip(y / self.downsample, 0, h)
            i, j = np.minimum(np.floor(u), w - 1).astype(int), np.minimum(np.floor(v), h - 1).astype(int)
            a, b = u - i, v - j
            return ((1 - a) * (1 - b) * table[j, i] + a * (1 - b) * table[j, i + 1]
                    + (1 - a) * b * table[j + 1, i] + a * b * table[j + 1, i + 1])

        x0, y0 = coords[:, 0], coords[:, 1]
        x1, y1 = x0 + size, y0 + size
        area = integral(x1, y1) - integral(x0, y1) - integral(x1, y0) + integral(x0, y0)
        return np.clip(area * self.downsample**2 / float(size) ** 2, 0.0, 1.0)


def write_signal_mask(path: str | os.PathLike, coverage: np.ndarray) -> None:
    """Write ``coverage`` float [h, w] in [0, 1] as an 8-bit PNG (atomically)."""
    data = np.clip(np.round(np.asarray(coverage, np.float32) * 255), 0, 255).astype(np.uint8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        ok, encoded = cv2.imencode(".png", data)
        if not ok:
            raise ValueError(f"{path}: could not encode the signal mask {data.shape}")
        Path(tmp).write_bytes(encoded.tobytes())


def read_signal_truth(cohort_dir: str | os.PathLike) -> dict[str, SignalTruth]:
    """{slide_id: :class:`SignalTruth`} of a cohort written by ``make_cohort`` (its ``truth.json`` and masks)."""
    cohort_dir = Path(cohort_dir)
    path = cohort_dir / "truth.json"
    if not path.is_file():
        raise ValueError(f"{path}: no truth.json (not a cohort written by isg synth)")
    truth = json.loads(path.read_text())
    out = {}
    for record in truth["slides"]:
        if "signal_mask" not in record:
            raise ValueError(f"{path}: slide {record.get('slide_id')!r} has no signal mask (written by an older isg synth)")
        mask_path = cohort_dir / record["signal_mask"]
        data = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
        if data is None or data.ndim != 2:
            raise ValueError(f"{mask_path}: not a readable single-channel PNG signal mask")
        out[record["slide_id"]] = SignalTruth(data.astype(np.float32) / 255, int(record["signal_downsample"]))
    return out
