"""``isg predict`` on a TCGA-class slide, end to end: 16k / 32k / 64k / 100k px at p = 256, q = 64, compact extractor,
isg-10-2; the encoders' FLOP rate against the CPU's; a single-level 10^5 px TIFF preprocessed in bounded memory.

    python3 -m pytest bench/bench_predict_scale.py --benchmark-enable -s                                  # 16k, 32k
    ISG_SCALE_SIZES=16384,32768,65536,100000 python3 -m pytest bench/bench_predict_scale.py --benchmark-enable -s

Per size, one synthetic slide (``isg synth --slides 1 --size N``, written once into ``ISG_BENCH_CACHE``, default
``$TMPDIR/isg-bench-cache``, see bench/synthetic_slides.py) goes through ``isg predict`` in a fresh process
with a model folder trained once at p = 256, q = 64 on a small synthetic cohort (``isg preprocess``, ``extract
fit`` for a few steps, ``extract run``, ``isg train --model isg-10-2``: the weights' quality is irrelevant to
throughput). Recorded from the process itself (``os.wait4``): wall seconds, user and system CPU seconds, peak
RSS; from ``timings.csv``: seconds per stage and the patch counts; from ``OUT/progress.log``: the longest gap
between progress lines. ``busy`` is CPU seconds / (wall x cores): reading overlaps encoding when it is high.
Sizes below 10^5 px run ``ISG_SCALE_REPEAT`` (default 3) times and show the median run by system share (every
run's share in ``sys_shares``): on the development VM the same command's page faults varied 2-3x from run
to run, in the same stages (cause not pinned down; that VM's kernel runs DAMON proactive reclaim, ``kdamond``
with action ``pageout``); the 10^5 px run is one run.

Goals (asserted; the table is printed first):

* every size: a progress line at least every 2 s, cost linear in tissue patches (seconds per tissue patch
  within 1.5x of the smallest size's); from 32k px on: system time <= 10% of CPU time (the issue's goal is
  the 10^5 px run's; at 16k px, a 13 s process, importing torch alone is ~0.45 s of system time, 2-3% of
  its CPU time: its share is shown, not held);
* 100k px: <= 10 min wall, <= 2 GB peak RSS, cores busy >= 85% of the wall time (on an idle machine:
  ``ISG_SCALE_IDLE=0`` skips the wall and busy goals on a shared one);
* single-level 10^5 px TIFF (no pyramid, mostly background): ``isg preprocess`` in <= 3 GB peak RSS.

Without the 100k run, the table ends with a row estimated from the largest size measured (seconds per tissue
and per selected patch x that size's counts scaled by area to 10^5 px), marked so. A run is
killed after ``ISG_SCALE_LIMIT_S`` (default 1500 s): a 100k run fits that even on a loaded machine.
``ISG_SCALE_AMP=1`` adds ``--amp`` (bfloat16 encoders).
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic_slides import CACHE, GENERATOR, isg, synthetic_slide

SIZES = [int(s) for s in os.environ.get("ISG_SCALE_SIZES", "16384,32768").split(",")]
LIMIT_S = float(os.environ.get("ISG_SCALE_LIMIT_S", "1500"))
IDLE = os.environ.get("ISG_SCALE_IDLE", "1") != "0"
AMP = os.environ.get("ISG_SCALE_AMP", "0") == "1"
REPEAT = int(os.environ.get("ISG_SCALE_REPEAT", "3"))  # runs per size below 10^5 px; the median by system share is shown
FULL = 100_000
SYS_GOAL_FROM = 32768  # px: shorter runs are much process start-up (importing torch: ~0.45 s of system time)
GOALS = {"wall_s": 600.0, "rss_gb": 2.0, "sys_share": 0.10, "busy": 0.85, "gap_s": 2.0, "flat_rss_gb": 3.0, "linear": 1.5}


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """A model folder of `isg train` at p = 256, q = 64, isg-10-2 (trained once, cached)."""
    root = CACHE / f"model-p256-q64-isg-10-2-{GENERATOR}"
    if (root / "model" / "model.json").is_file():  # the model card: written last by isg train
        return root / "model"
    root.mkdir(parents=True, exist_ok=True)
    cohort = root / "cohort"
    isg("synth", "--out", cohort, "--slides", 10, "--size", 1536, "--genes", 20, "--quiet")
    isg("preprocess", "--manifest", cohort / "manifest.csv", "--out", root / "patches", "--quiet")
    isg("extract", "fit", "--h5-dir", root / "patches", "--out", root / "ext", "--steps", 2, "--lpips-weight", 0, "-q")
    isg("extract", "run", "--h5-dir", root / "patches", "--global", root / "ext" / "global", "--local", root / "ext" / "local", "-q")
    isg("train", "--manifest", cohort / "manifest.csv", "--expression", cohort / "expression.tsv", "--features",
         root / "patches", "--out", root / "model", "--model", "isg-10-2", "--folds", 2, "--epochs", 1, "-q")
    return root / "model"


_CHILD = """import sys
hwm = sys.argv.pop(1)
try:
    from isg.cli import main
    code = main(sys.argv[1:])
finally:  # the peak RSS of this process image (VmHWM): ru_maxrss would count the forked parent's pages too
    with open("/proc/self/status") as status, open(hwm, "w") as out:
        out.write(next(line for line in status if line.startswith("VmHWM")).split()[1])
sys.exit(code)
"""


def run_measured(args: list, limit_s: float = LIMIT_S) -> dict:
    """Run ``isg ARGS`` in a fresh process: wall, user and sys CPU seconds (``os.wait4``), peak RSS in GB (the
    process's own VmHWM), minor page faults."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(hwm), *map(str, args)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        timer = threading.Timer(limit_s, proc.kill)
        timer.start()
        stderr = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"isg {args[0]} failed (exit {proc.returncode}; -9: killed after {limit_s:.0f} s): {stderr[-2000:]}")
        rss_kb = int(hwm.read_text()) if hwm.is_file() else usage.ru_maxrss
    return {"wall_s": wall, "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "rss_gb": rss_kb / 2**20,
            "minor_faults": usage.ru_minflt}


def progress_gap(log: Path) -> float:
    """Longest gap in seconds between consecutive lines of a progress log."""
    stamps = [dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
              for line in log.read_text().splitlines() if line[:4].isdigit()]
    return max(np.diff(stamps), default=0.0)


def _timings(out: Path) -> dict:
    with open(out / "timings.csv") as handle:
        row = next(csv.DictReader(handle))
    return {k: float(v) for k, v in row.items() if k != "slide_id"}


def test_predict_scales_to_a_tcga_class_slide(model_dir, report, tmp_path):
    cores = os.cpu_count() or 1
    rows = []
    for size in SIZES:
        slide = synthetic_slide(size)
        runs = []
        for repeat in range(1 if size >= FULL else max(1, REPEAT)):
            out = tmp_path / f"predict{size}-{repeat}"
            measured = run_measured(["predict", slide, "--model", model_dir, "--out", out, "--quiet", *(["--amp"] if AMP else [])])
            row = {"size": size, **_timings(out), **measured, "gap_s": progress_gap(out / "progress.log")}
            cpu = row["user_s"] + row["sys_s"]
            row.update(sys_share=row["sys_s"] / cpu, busy=cpu / (row["wall_s"] * cores),
                       s_per_1k_tissue=1000 * row["wall_s"] / row["n_tissue"])
            runs.append(row)
        row = sorted(runs, key=lambda r: r["sys_share"])[len(runs) // 2]  # the median run by system share
        row["sys_shares"] = " ".join(f"{r['sys_share']:.3f}" for r in runs)
        rows.append(row)
        report.add("predict_scale", f"{size} px", row["wall_s"], unit="s", higher_is_better=False, cores=cores,
                   amp=AMP, load=round(os.getloadavg()[0], 1),
                   **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items() if k != "size"})
    estimate = None
    if FULL not in SIZES:
        big = rows[-1]
        per_tissue = (big["read"] + big["select"]) / big["n_tissue"]
        per_kept = (big["features"] + big["predict"]) / big["n_patches"]
        counts = tuple(round(big[k] * (FULL / big["size"]) ** 2) for k in ("n_tissue", "n_patches"))  # by area
        estimate = per_tissue * counts[0] + per_kept * counts[1] + (big["wall_s"] - big["total"])
        report.add("predict_scale", "100000 px (estimate)", estimate, unit="s", higher_is_better=False,
                   note=f"projected from {big['size']} px: s per tissue patch x {counts[0]}, s per selected patch x "
                        f"{counts[1]} (its counts scaled by area)")
        estimate = (estimate, counts)
    print("\n" + table(rows, estimate))
    base = rows[0]["s_per_1k_tissue"]
    for row in rows:
        if row["size"] >= SYS_GOAL_FROM:
            assert row["sys_share"] <= GOALS["sys_share"], f"{row['size']} px: system time {row['sys_share']:.0%} of CPU time"
        assert row["gap_s"] <= GOALS["gap_s"] + 0.5, f"{row['size']} px: {row['gap_s']:.1f} s without a progress line"
        assert row["s_per_1k_tissue"] <= GOALS["linear"] * base, f"{row['size']} px: not linear in tissue patches"
        if row["size"] == FULL:
            assert row["rss_gb"] <= GOALS["rss_gb"], f"peak RSS {row['rss_gb']:.2f} GB"
            if IDLE:
                assert row["wall_s"] <= GOALS["wall_s"] and row["busy"] >= GOALS["busy"], table(rows, estimate)


def table(rows: list[dict], estimate: tuple[float, tuple[int, int]] | None) -> str:
    head = (f"{'size':>8} {'tissue':>7} {'kept':>6} {'read':>6} {'select':>6} {'features':>8} {'predict':>7} {'wall':>7} "
            f"{'user':>7} {'sys':>6} {'sys%':>5} {'busy':>5} {'RSS GB':>6} {'gap s':>5}")
    lines = [head]
    for r in rows:
        lines.append(f"{r['size']:>8} {int(r['n_tissue']):>7} {int(r['n_patches']):>6} {r['read']:>6.1f} {r['select']:>6.1f} "
                     f"{r['features']:>8.1f} {r['predict']:>7.1f} {r['wall_s']:>7.1f} {r['user_s']:>7.1f} {r['sys_s']:>6.1f} "
                     f"{r['sys_share']:>5.0%} {r['busy']:>5.0%} {r['rss_gb']:>6.2f} {r['gap_s']:>5.1f}")
    if estimate is not None:
        seconds, (tissue, kept) = estimate
        lines.append(f"{FULL:>8} {tissue:>7} {kept:>6}  estimated wall {seconds:.0f} s (not measured; counts scaled by area)")
    return "\n".join(lines)


def test_encoder_flop_rate_against_the_cpu(report):
    """The compact encoders' FLOP rate per CPU-second (float32 and bfloat16), beside one thread's GEMM rate."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from isg.features import Autoencoder
    from isg.pipeline.extract import bf16_supported, encode_chunk
    from isg.train.config import AutoencoderTrainConfig

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def rate(fn, flop: float, repeat: int = 6) -> float:  # GFLOP per CPU-second: robust to other load
        fn()
        start = cpu()
        for _ in range(repeat):
            fn()
        return flop * repeat / (cpu() - start) / 1e9

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        peaks = {"fp32": rate(lambda: a @ b, 2 * 2048**3)}
        if bf16_supported("cpu"):
            a16, b16 = a.bfloat16(), b.bfloat16()
            peaks["bf16"] = rate(lambda: a16 @ b16, 2 * 2048**3)
        for kind in ("global", "local"):
            ae = Autoencoder(**AutoencoderTrainConfig(kind=kind).model_kwargs()).eval().to(memory_format=torch.channels_last)
            x = torch.randn(encode_chunk(ae), 3, ae.resolution, ae.resolution).contiguous(memory_format=torch.channels_last)
            with FlopCounterMode(display=False) as counter, torch.inference_mode():
                ae.encode(x[:1])
            per_input = counter.get_total_flops()
            for precision, peak in peaks.items():
                with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                    gflops = rate(lambda: ae.encode(x), per_input * len(x))
                report.add("encoder_flops", f"{kind} r={ae.resolution} {precision}", gflops, unit="GFLOP/cpu-s",
                           peak_gemm=round(peak, 1), of_peak=round(gflops / peak, 2), mflop_per_input=round(per_input / 1e6, 1),
                           inputs_per_cpu_s=round(gflops * 1e9 / per_input))
                print(f"{kind} encoder {precision}: {gflops:.0f} GFLOP/s per core ({gflops / peak:.0%} of one core's "
                      f"GEMM {peak:.0f}), {gflops * 1e9 / per_input:.0f} inputs per CPU-second")
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def flat_tiff() -> Path:
    """A single-level (no pyramid) 100,000 x 100,000 tiled JPEG TIFF with mpp, mostly background (written once)."""
    size = int(os.environ.get("ISG_SCALE_FLAT_SIZE", FULL))
    path = CACHE / f"flat{size}.tif"
    if not path.is_file():
        write_flat_tiff(path, size)
    return path


def write_flat_tiff(path: Path, size: int, tile: int = 256, tissue: int = 8192) -> None:
    """Background (242 grey) with a ``tissue`` px square of synthetic tissue in the middle, written tile by tile."""
    import tifffile

    from isg.io.synth import render_slide
    from isg.utils import atomic_path

    image, _, _ = render_slide(np.random.default_rng(7), tissue, tissue, {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5,
                                                                        "tissue_fraction": 0.7}, mpp=0.5, artefacts=False)
    blank = np.full((tile, tile, 3), 242, np.uint8)
    at = (size // 2 // tile) * tile  # the tissue square's top-left, on the tile grid

    def tiles():
        for y in range(0, size, tile):
            for x in range(0, size, tile):
                if at <= x < at + tissue and at <= y < at + tissue:
                    yield np.ascontiguousarray(image[y - at:y - at + tile, x - at:x - at + tile])
                else:
                    yield blank

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tifffile.imwrite(tmp, tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                         compression="jpeg", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", bigtiff=True)


def test_single_level_tiff_preprocesses_in_bounded_memory(flat_tiff, report, tmp_path):
    measured = run_measured(["preprocess", flat_tiff, "--out", tmp_path / "pp", "--quiet"])
    report.add("flat_tiff", f"single-level {flat_tiff.stem}", measured["rss_gb"], unit="GB peak RSS", higher_is_better=False,
               file_mb=round(flat_tiff.stat().st_size / 2**20), **{k: round(v, 2) for k, v in measured.items()})
    print(f"\nsingle-level TIFF {flat_tiff.name} ({flat_tiff.stat().st_size / 2**20:.0f} MB): isg preprocess "
          f"{measured['wall_s']:.0f} s wall, {measured['rss_gb']:.2f} GB peak RSS (goal <= {GOALS['flat_rss_gb']} GB)")
    assert measured["rss_gb"] <= GOALS["flat_rss_gb"]
