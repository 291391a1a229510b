"""Known-answer scores of a patch selection: how much of what it keeps carries the signal, and how much of the
signal it keeps.

The ground truth is a share per patch (``signal_fraction`` [N] in [0, 1], e.g.
:meth:`isg.io.synth.SignalTruth.patch_fraction` of a synthetic slide); a patch *carries the signal* when
at least ``min_fraction`` of it lies in a signal region.
"""

from __future__ import annotations

import numpy as np

SIGNAL_MIN_FRACTION = 0.25  # a patch a quarter covered by a signal region carries it

__all__ = ["SIGNAL_MIN_FRACTION", "selection_precision", "mean_precision"]


def selection_precision(keep, signal_fraction, min_fraction: float = SIGNAL_MIN_FRACTION) -> dict:
    """Precision, recall and share kept of a selection ``keep`` bool [N] over patches whose signal coverage is
    ``signal_fraction`` float [N].

    Returns ``precision`` (signal-bearing patches among those kept; NaN when nothing is kept), ``recall``
    (signal-bearing patches kept among all of them; NaN when the slide has none), ``kept_fraction``,
    ``signal_fraction`` (share of the patches that carry the signal: the precision of a random pick),
    ``enrichment`` (precision / that share), and the counts ``n_patches``, ``n_kept``, ``n_signal``,
    ``n_signal_kept``.
    """
    keep = np.asarray(keep)
    fraction = np.asarray(signal_fraction, dtype=np.float64)
    if keep.dtype != bool or keep.ndim != 1 or fraction.shape != keep.shape:
        raise ValueError(f"keep must be bool [N] and signal_fraction float [N]; got {keep.dtype} {keep.shape}, {fraction.shape}")
    if not 0 < min_fraction <= 1:
        raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
    signal = fraction >= min_fraction  # [N]
    n, n_kept, n_signal, hits = len(keep), int(keep.sum()), int(signal.sum()), int((keep & signal).sum())
    precision = hits / n_kept if n_kept else float("nan")
    base = n_signal / n if n else float("nan")
    return {"precision": precision, "recall": hits / n_signal if n_signal else float("nan"),
            "kept_fraction": n_kept / n if n else float("nan"), "signal_fraction": base,
            "enrichment": precision / base if n_kept and n_signal else float("nan"),
            "n_patches": n, "n_kept": n_kept, "n_signal": n_signal, "n_signal_kept": hits}


def mean_precision(rows: list[dict]) -> dict:
    """Cohort summary of per-slide :func:`selection_precision` rows: the mean of each score over the slides where
    it is defined (``n_slides``, ``slides_without_kept``), and the pooled precision and recall over all patches."""
    out: dict = {"n_slides": len(rows), "slides_without_kept": sum(r["n_kept"] == 0 for r in rows)}
    for key in ("precision", "recall", "kept_fraction", "enrichment"):
        values = [r[key] for r in rows if r[key] == r[key]]
        out[key] = float(np.mean(values)) if values else float("nan")
    kept, signal, hits = (sum(r[k] for r in rows) for k in ("n_kept", "n_signal", "n_signal_kept"))
    out["pooled_precision"] = hits / kept if kept else float("nan")
    out["pooled_recall"] = hits / signal if signal else float("nan")
    return out
