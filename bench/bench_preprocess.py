"""Per-slide preprocessing time: ``isg.pipeline.preprocess_slide`` vs a CLAM-style OpenSlide + Otsu pass.

Run: ``python3 -m pytest bench/bench_preprocess.py --benchmark-enable -s`` (with
``ISG_EXT_PATH=build/<dir>`` to use a development build of the native scorer).

Both contenders process the same synthetic slides (``isg.io.synth.make_cohort``) with
256 px patches at level 0:

* ``clam-style``: the classic pass, one thread: Otsu threshold of the thumbnail's HSV
  saturation (CLAM's segmentation), then for EVERY grid tile ``OpenSlide.read_region``
  at level 0, RGBA -> RGB, HSV, tissue fraction = share of pixels above the threshold,
  keep tiles with >= 50 % tissue;
* ``isg``: :func:`preprocess_slide` (tissue prefilter on the thumbnail, batched tile
  stream, Shannon scores, mean + 1 sigma selection, h5 written; no thumbnail PNG),
  with one reader thread and one torch/OpenMP thread, then with all cores.

Goal (asserted): ``preprocess_slide`` on one thread is >= ``GOAL_SPEEDUP`` (2x) faster than CLAM-style.

Value: median seconds per slide (lower is better); ``tiles_per_s`` counts the tiles
each contender read. Sizes: ``ISG_BENCH_PREPROCESS_SIZE`` (default 4096 px per side),
``ISG_BENCH_PREPROCESS_SLIDES`` (default 2).
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from isg.io import PATCH_SIZE as PATCH

TABLE = "preprocess"
GOAL_SPEEDUP = 2.0  # isg on one thread vs the CLAM-style pass (which reads every tile)
SIZE = int(os.environ.get("ISG_BENCH_PREPROCESS_SIZE", 4096))
N_SLIDES = int(os.environ.get("ISG_BENCH_PREPROCESS_SLIDES", 2))


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from isg.io.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("bench_preprocess"), n_slides=N_SLIDES, size=SIZE, tile=256, seed=0).slides


def clam_style(path, patch: int = PATCH, min_tissue: float = 0.5) -> tuple[int, int]:
    """CLAM-style pass over one slide: (tiles read, tiles kept)."""
    import cv2
    import openslide
    from skimage.filters import threshold_otsu

    slide = openslide.OpenSlide(str(path))
    try:
        thumb = np.asarray(slide.get_thumbnail((1024, 1024)).convert("RGB"))
        saturation = cv2.medianBlur(cv2.cvtColor(thumb, cv2.COLOR_RGB2HSV)[..., 1], 7)
        threshold = threshold_otsu(saturation)
        width, height = slide.dimensions
        n_read = n_kept = 0
        for y in range(0, height - patch + 1, patch):
            for x in range(0, width - patch + 1, patch):
                tile = np.asarray(slide.read_region((x, y), 0, (patch, patch)).convert("RGB"))
                tissue = (cv2.cvtColor(tile, cv2.COLOR_RGB2HSV)[..., 1] > threshold).mean()
                n_read += 1
                n_kept += bool(tissue >= min_tissue)
        return n_read, n_kept
    finally:
        slide.close()


def per_slide_seconds(fn, slides, repeat: int = 3) -> tuple[float, list]:
    """Median over ``repeat`` rounds of the mean seconds per slide; and the last round's outputs."""
    rounds, outputs = [], []
    fn(slides[0])  # warm-up (imports, page caches)
    for _ in range(repeat):
        outputs = []
        start = time.perf_counter()
        for path in slides:
            outputs.append(fn(path))
        rounds.append((time.perf_counter() - start) / len(slides))
    return float(np.median(rounds)), outputs


def test_preprocess_vs_clam_style(slides, tmp_path, report):
    pytest.importorskip("openslide")
    from isg import _ext
    from isg.pipeline.preprocess import preprocess_slide

    native = _ext.has("shannon_histogram_cpu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        seconds, outputs = per_slide_seconds(clam_style, slides)
        measured = {"clam": seconds}
        n_read = np.mean([o[0] for o in outputs])
        report.add(TABLE, "clam-style openslide+otsu (1 thread)", seconds, unit="s/slide", baseline=True,
                   higher_is_better=False, tiles_per_s=round(n_read / seconds, 1), tiles=int(n_read),
                   kept=int(np.mean([o[1] for o in outputs])), native_scorer="-", stages="-")

        for name, workers, n_threads in (("isg preprocess (1 thread)", 1, 1),
                                         (f"isg preprocess ({os.cpu_count()} threads)", os.cpu_count(), threads)):
            torch.set_num_threads(n_threads)

            def ours(path):
                return preprocess_slide(path, tmp_path, patch_size=PATCH, num_workers=workers, thumbnail=False)

            seconds, outputs = per_slide_seconds(ours, slides)
            measured[name] = seconds
            n_tissue = np.mean([o["n_tissue"] for o in outputs])
            stages = {k[len("seconds_"):]: round(float(np.mean([o[k] for o in outputs])), 3)
                      for k in outputs[0] if k.startswith("seconds_") and k != "seconds_total"}
            report.add(TABLE, name, seconds, unit="s/slide", higher_is_better=False,
                       tiles_per_s=round(n_tissue / seconds, 1), tiles=int(n_tissue),
                       kept=int(np.mean([o["n_kept"] for o in outputs])), native_scorer=native, stages=stages)
    finally:
        torch.set_num_threads(threads)
    speedup = measured["clam"] / measured["isg preprocess (1 thread)"]
    assert speedup >= GOAL_SPEEDUP, f"isg preprocess (1 thread) is {speedup:.2f}x CLAM-style, goal >= {GOAL_SPEEDUP}x: {measured}"
