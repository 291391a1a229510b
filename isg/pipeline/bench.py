"""Throughput of every stage on the user's own slides (``isg bench``), contenders side by side in one run.

Per slide it measures, on the same tissue tiles for every contender:

* each slide reader that can open the file (tifffile, OpenSlide, cuCIM, image; nvImageCodec's device
  decode and DALI where a GPU is present), in tiles/s, **cold**
  (:mod:`isg.io.throughput`): every pass opens a fresh slide object (not timed) and reads distinct tiles
  spread over the tissue, each once (``--tiles`` per pass, ``--repeats`` passes, median reported), one
  thread and ``--num-workers`` threads (default: all cores). Tiles are the file's own tiles (whole tiles of
  a tiled TIFF; ``isg.io.PATCH_SIZE`` px otherwise), delivered on ``--device``. The OS page cache is stated:
  ``--page-cache warm`` (file read once before) or ``dropped`` (evicted before every pass);
* the ceiling: libjpeg-turbo decoding the same compressed tiles from memory, one thread, and each reader
  as a % of it;
* the Shannon scorer (``isg.ops.shannon_bits``) on those tiles, in GB/s of uncompressed RGB,
  on the CPU and on the GPU when one is present;
* ``isg preprocess`` of the whole slide, in seconds per stage;
* with ``--model RUN`` (an ``isg train`` folder), feature extraction and prediction of the
  selected patches, in patches/s.

It prints one table and writes the figures (with versions, device and backends) to ``--out``
as JSON. Absent contenders are listed with the reason and left empty, never estimated.
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from isg.io import BATCH_SIZE

DEVICE_READERS = {"dali": "needs nvidia-dali and a CUDA device", "nvimgcodec": "device decode: needs nvImageCodec and a CUDA device"}


@dataclass
class BenchOptions:
    tiles: int = 256  # distinct tissue tiles per pass, each read once
    repeats: int = 3  # passes (a fresh reader each, other tiles); the median is reported
    batch_size: int = BATCH_SIZE  # tiles per batch
    num_workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # reader threads of the all-cores figure
    device: str = "auto"  # auto: cuda when torch sees a GPU, else cpu
    out: str = "isg_bench.json"
    model: str | None = None  # isg train folder: adds extract and predict
    readers: tuple[str, ...] = field(default_factory=tuple)  # empty: every reader that opens the slide
    page_cache: str = "warm"  # warm: the file is read once before measuring; dropped: evicted before every pass


# ----------------------------------------------------------------------------- measurements


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, repeats: int, device) -> float:
    """Best wall time of ``repeats`` calls of ``fn`` (after one untimed warm-up call)."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def reader_names(requested: tuple[str, ...]) -> list[str]:
    from isg.io import BACKENDS

    known = (*BACKENDS, "dali")
    names = list(requested) if requested else list(known)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"--readers: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    return names


def read_size(slide) -> int:
    """Side of the tiles the reader figures read: the file's own tiles when level 0 is tiled in squares, else PATCH_SIZE."""
    from isg.io import PATCH_SIZE

    shape = slide.tile_shape(0) if hasattr(slide, "tile_shape") else None
    return int(shape[0]) if shape and shape[0] == shape[1] and shape[0] >= 64 and slide.page(0).is_tiled else PATCH_SIZE


def sample_tissue_coords(slide, n: int, size: int | None = None):
    """Up to ``n`` level-0 (x, y) of ``size`` px (default PATCH_SIZE) tissue tiles, evenly spread over the slide's
    tissue grid [n, 2], row-major."""
    import numpy as np

    from isg.io import PATCH_SIZE, tile_grid

    size = size or PATCH_SIZE
    coords = tile_grid(slide, size)  # [N, 2] row-major tissue tiles
    if len(coords) == 0:
        coords = tile_grid(slide, size, tissue_min=0)  # no tissue found: time the whole grid instead
    pick = np.unique(np.linspace(0, len(coords) - 1, min(n, len(coords))).round().astype(np.int64))
    return coords[pick]


def bench_readers(path: Path, coords, options: BenchOptions, device: str, size: int | None = None) -> tuple[dict, object]:
    """Cold tiles/s of each reader on the same passes over ``coords`` (one thread and ``num_workers`` threads), the
    libjpeg-turbo ceiling, and each reader's % of it; also returns the tiles [n, s, s, 3] uint8 of the first
    pass by the first reader (for the scorer)."""
    import torch

    from isg.io import PATCH_SIZE, SlideError, backend_available, dali_available, iter_tiles, open_slide
    from isg.io.throughput import ceiling_tiles_per_s, cold_tiles_per_s, split_passes

    size = size or PATCH_SIZE
    passes = split_passes(coords, options.repeats)
    results: dict[str, dict] = {}
    with open_slide(path) as slide:
        ceiling = ceiling_tiles_per_s(slide, passes, 0) if size == read_size(slide) else None
    results["ceiling"] = ceiling or {"tiles_per_s": None, "note": "no JPEG file tiles under the read tiles"}
    on_gpu = torch.device(device).type == "cuda"
    tiles = None
    for name in reader_names(options.readers):
        if name in DEVICE_READERS and not (on_gpu and (dali_available() if name == "dali" else backend_available(name))):
            results[name] = {"tiles_per_s": None, "note": DEVICE_READERS[name]}
            continue
        backend, reader = ("tifffile", "dali") if name == "dali" else (name, "threads")

        def read(slide, chunk, workers):  # every batch delivered on the device, then dropped
            for _ in iter_tiles(slide, chunk, size, batch_size=options.batch_size, device=device, num_workers=workers,
                                reader=reader):
                pass

        try:
            with open_slide(path, backend=backend) as slide:
                decodes_at_open = slide.decodes_at_open
                if tiles is None:  # the scorer's tiles, untimed; batch buffers are reused: copy each batch
                    tiles = torch.cat([batch.cpu().clone() for _, batch in iter_tiles(
                        slide, passes[0], size, batch_size=options.batch_size, num_workers=0, reader=reader)])
            entry = {"opening_timed": True} if decodes_at_open else {}
            for workers, key in ((0, "tiles_per_s"), (options.num_workers, "tiles_per_s_threads")):
                figure = cold_tiles_per_s(lambda: open_slide(path, backend=backend), lambda s, c: read(s, c, workers),
                                          passes, path=path, page_cache=options.page_cache, sync=lambda: _sync(device),
                                          time_open=decodes_at_open)
                entry[key] = round(figure["tiles_per_s"], 1)
                if not workers:
                    entry.update(open_seconds=round(figure["open_seconds"], 4), passes=figure["passes"],
                                 cpu_us_per_tile=figure["cpu_us_per_tile"])
        except (SlideError, ImportError, OSError, RuntimeError, ValueError) as exc:  # cannot open, or cannot decode
            results[name] = {"tiles_per_s": None, "note": f"cannot read: {str(exc).splitlines()[0]}"}
            continue
        entry["threads"] = options.num_workers
        if ceiling:
            entry["pct_of_ceiling"] = round(100 * entry["tiles_per_s"] / ceiling["tiles_per_s"], 1)
        results[name] = entry
    return results, tiles


def bench_shannon(tiles, options: BenchOptions, devices: list[str]) -> dict:
    """GB/s (uncompressed RGB bytes scored per second) of isg.ops.shannon_bits on each device."""
    import isg
    from isg.ops.shannon import shannon_bits

    results = {}
    for device in devices:
        x = tiles.to(device)
        seconds = _best_seconds(lambda: shannon_bits(x), options.repeats, device)
        native = isg.is_available("cuda") if device.startswith("cuda") else isg.is_available("ext")
        results[device] = {"gb_per_s": round(x.numel() / seconds / 1e9, 3), "seconds": round(seconds, 4),
                           "kernel": "native" if native else "reference"}
    return results


def bench_pipeline(path: Path, work: Path, options: BenchOptions, device: str, predictor) -> dict:
    """Seconds per preprocess stage of the whole slide; with a predictor, extract and predict in patches/s."""
    from isg.pipeline.predict import predict_slide
    from isg.pipeline.preprocess import preprocess_slide

    extra = dict(predictor.preprocess) if predictor is not None else {}
    stats = preprocess_slide(path, work, device=device, batch_size=options.batch_size, num_workers=options.num_workers,
                             thumbnail=False, **extra)
    result = {"preprocess": {key.removeprefix("seconds_"): value for key, value in stats.items() if key.startswith("seconds_")},
              "n_tissue": stats["n_tissue"], "n_kept": stats["n_kept"]}
    if predictor is not None:
        _, timings = predict_slide(path, predictor, work)  # reuses the preprocess output in ``work``
        n = timings.get("n_patches", stats["n_kept"])
        result["extract_patches_per_s"] = round(n / timings["features"], 1) if timings.get("features") else None
        result["predict_patches_per_s"] = round(n / timings["predict"], 1) if timings.get("predict") else None
        result["extract_predict_seconds"] = {key: round(float(timings[key]), 4) for key in ("features", "predict") if key in timings}
    return result


# ----------------------------------------------------------------------------- report


def _environment(device: str) -> dict:
    import torch

    import isg

    env = {"isg": isg.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "device": device,
           "torch_threads": torch.get_num_threads(), "backends": isg.backends(),
           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def _fmt(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def format_table(report: dict) -> str:
    """One row per slide: cold reader tiles/s (one thread; the ceiling beside them), Shannon GB/s per device,
    preprocess s, extract/predict patches/s; then per slide and reader the all-threads figure and the % of
    the ceiling."""
    slides = report["slides"]
    readers = list(dict.fromkeys(name for s in slides for name in s.get("readers", {})))
    devices = list(dict.fromkeys(name for s in slides for name in s.get("shannon", {})))
    header = ["slide", *[f"{r} tiles/s" for r in readers], *[f"shannon {d} GB/s" for d in devices],
              "preprocess s", "tissue/kept", "extract p/s", "predict p/s"]
    rows, errors, details = [], [], []
    for s in slides:
        if "error" in s:
            errors.append(f"{s['slide_id']}: error: {s['error']}")
            continue
        pipe = s.get("pipeline", {})
        rows.append([s["slide_id"],
                     *[_fmt(s["readers"].get(r, {}).get("tiles_per_s")) for r in readers],
                     *[_fmt(s["shannon"].get(d, {}).get("gb_per_s"), 3) for d in devices],
                     _fmt(pipe.get("preprocess", {}).get("total"), 2),
                     f"{pipe.get('n_tissue', '-')}/{pipe.get('n_kept', '-')}",
                     _fmt(pipe.get("extract_patches_per_s")), _fmt(pipe.get("predict_patches_per_s"))])
        for name, r in s["readers"].items():
            if name != "ceiling" and r.get("tiles_per_s") is not None:
                share = f" = {r['pct_of_ceiling']:.0f}% of the ceiling" if "pct_of_ceiling" in r else ""
                details.append(f"  {s['slide_id']} {name}: 1 thread {_fmt(r['tiles_per_s'])} tiles/s{share}; "
                               f"{r['threads']} threads {_fmt(r['tiles_per_s_threads'])} tiles/s")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).rjust(w) if i else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines += errors
    options = report["options"]
    per_pass = [n for s in slides for n in s.get("tiles_per_pass", [])]
    low, high = (min(per_pass), max(per_pass)) if per_pass else (options["tiles"],) * 2
    counts = str(low) if low == high else f"{low}-{high}"
    lines.append(f"readers, cold: a fresh reader per pass, {counts} distinct tissue tiles per pass (asked {options['tiles']}), each read once, "
                 f"median of {options['repeats']} passes; OS page cache {options['page_cache']}; ceiling = libjpeg-turbo "
                 "decoding the same tiles from memory, 1 thread")
    lines += details
    notes = sorted({f"{name}: {r['note']}" for s in slides for name, r in s.get("readers", {}).items() if r.get("note")})
    stages = [s for s in slides if "pipeline" in s]
    if stages:
        keys = list(stages[0]["pipeline"]["preprocess"])
        mean = {k: sum(s["pipeline"]["preprocess"].get(k, 0.0) for s in stages) / len(stages) for k in keys}
        lines.append("preprocess, mean s per slide: " + ", ".join(f"{k} {v:.3f}" for k, v in mean.items()))
    env = report["environment"]
    lines.append(f"device {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, {env['cpus']} CPUs, "
                 f"torch {env['torch']}")
    return "\n".join(lines + [f"  {note}" for note in notes])


def run_bench(slides: list[Path], options: BenchOptions, progress: bool = True) -> dict:
    """Benchmark ``slides``; returns the report dict (also what ``--out`` holds)."""
    import torch
    from tqdm.auto import tqdm

    from isg.data.manifest import slide_id_of
    from isg.io import SlideError, open_slide
    from isg.io.throughput import split_passes

    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    shannon_devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    predictor = None
    if options.model:
        from isg.pipeline.predict import Predictor

        predictor = Predictor.from_train_dir(options.model, device=device)
    report = {"environment": _environment(device), "options": asdict(options), "slides": []}
    steps = tqdm(total=len(slides) * 3, desc="isg bench", unit="step", disable=not progress)
    with tempfile.TemporaryDirectory(prefix="isg-bench-") as tmp:
        for path in slides:
            entry: dict = {"slide_id": slide_id_of(path), "slide_path": str(path)}
            report["slides"].append(entry)
            done = 0

            def step(name: str) -> None:
                nonlocal done
                if done:
                    steps.update()
                steps.set_postfix_str(f"{entry['slide_id']}: {name}")
                done += 1

            try:
                step("readers")
                with open_slide(path) as slide:
                    size = read_size(slide)
                    coords = sample_tissue_coords(slide, options.tiles * options.repeats, size)  # distinct per pass
                    entry["dimensions"] = list(slide.dimensions)
                entry["n_tiles"], entry["tile_size"] = int(len(coords)), size
                entry["tiles_per_pass"] = [len(p) for p in split_passes(coords, options.repeats)]  # as bench_readers reads them
                entry["readers"], tiles = bench_readers(path, coords, options, device, size)
                step("shannon")
                entry["shannon"] = bench_shannon(tiles, options, shannon_devices) if tiles is not None else {}
                step("preprocess")
                entry["pipeline"] = bench_pipeline(path, Path(tmp) / entry["slide_id"], options, device, predictor)
            except (SlideError, ValueError, OSError) as exc:  # a bad slide is reported; the others go on
                entry["error"] = str(exc).splitlines()[0]
            steps.update(3 - done + 1)
    steps.close()
    return report
