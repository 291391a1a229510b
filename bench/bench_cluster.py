"""A cohort on a local Dask cluster: preprocess -> extract -> predict, slides per hour per stage and peak RSS per worker;
and the cohort runner's own cost on 100,000 items.

Run (the full size, about an hour of CPU on 2 cores; the figures in docs/preprocess.md):
``python3 -m pytest bench/bench_cluster.py --benchmark-enable -s``

Sizes: ``ISG_BENCH_CLUSTER_SLIDES`` (default 1000 slides), ``ISG_BENCH_CLUSTER_SIZE`` (px per side, default 1024),
``ISG_BENCH_CLUSTER_WORKERS`` (worker processes, default 2, one thread each). The cohort is
``ISG_BENCH_CLUSTER_DISTINCT`` (default 16) distinct synthetic slides (``isg.io.synth.make_cohort``) repeated under
new names (hard links) up to the cohort size: small slides, so the figures measure the per-slide cost of each
stage and the runner, not one large slide. Every stage runs on a ``LocalCluster`` on 127.0.0.1 through
:func:`isg.pipeline.cohort.run_cohort`, one task per slide:

* ``preprocess``: :func:`isg.pipeline.preprocess.preprocess_cohort` (Shannon, 128 px patches, 32 px local);
* ``extract``: :func:`isg.pipeline.extract.extract_cohort` with the compact extractor (untrained weights: the
  cost is the same; global 64 px, local 32 px, d 512), loaded once per worker from its checkpoint;
* ``predict``: :func:`isg.pipeline.predict.predict_slides` of a model folder trained on the distinct slides
  (isg-2-1-plus, 3 folds), on new slide names: the whole read -> select -> extract -> predict per slide.

Goals (asserted): every slide done in every stage, and no worker's peak resident memory above
``MAX_WORKER_RSS_MB`` whatever the cohort size (a worker holds one slide at a time).
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict

import pytest

TABLE = "cluster"
N_SLIDES = int(os.environ.get("ISG_BENCH_CLUSTER_SLIDES", 1000))
SIZE = int(os.environ.get("ISG_BENCH_CLUSTER_SIZE", 1024))
N_WORKERS = int(os.environ.get("ISG_BENCH_CLUSTER_WORKERS", 2))
N_DISTINCT = min(N_SLIDES, int(os.environ.get("ISG_BENCH_CLUSTER_DISTINCT", 16)))
MAX_WORKER_RSS_MB = 2048
PATCH, LOCAL = 128, 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """(distinct SynthCohort, all N_SLIDES slide paths, root folder)."""
    from isg.io.synth import make_cohort

    root = tmp_path_factory.mktemp("bench_cluster")
    synth = make_cohort(root / "distinct", n_slides=N_DISTINCT, size=SIZE, tile=256, genes=5, seed=0)
    (root / "slides").mkdir()
    slides = []
    for i in range(N_SLIDES):
        path = root / "slides" / f"c{i:05d}.tif"
        os.link(synth.slides[i % N_DISTINCT], path)
        slides.append(path)
    return synth, slides, root


@pytest.fixture(scope="module")
def client():
    distributed = pytest.importorskip("distributed")
    with distributed.LocalCluster(host="127.0.0.1", protocol="tcp", n_workers=N_WORKERS, threads_per_worker=1,
                                  processes=True, dashboard_address=None, silence_logs=40) as cluster:
        with distributed.Client(cluster) as client:
            yield client


def stage_row(report, stage: str, results: list, seconds: float, problems: list) -> None:
    """One row per stage: slides per hour over the stage's wall time, peak RSS per worker, RSS growth."""
    done = [r for r in results if r.status == "done"]
    if len(done) != len(results):
        problems.append(f"{stage}: {len(results) - len(done)} of {len(results)} slide(s) not done: "
                        f"{[(r.name, r.error) for r in results if r.status != 'done'][:3]}")
    per_worker = defaultdict(list)
    for r in done:
        per_worker[r.worker].append(r)
    peak = {w: max(r.peak_rss_mb for r in rs) for w, rs in per_worker.items()}
    growth = {w: round(rs[-1].rss_mb - rs[min(2, len(rs) - 1)].rss_mb, 1) for w, rs in per_worker.items()}
    if peak and max(peak.values()) > MAX_WORKER_RSS_MB:
        problems.append(f"{stage}: a worker peaked at {max(peak.values()):.0f} MB > {MAX_WORKER_RSS_MB} MB")
    report.add(TABLE, stage, len(done) / seconds * 3600, unit="slides/hour", slides=len(results), seconds=round(seconds, 1),
               workers=len(per_worker), peak_rss_mb=sorted(peak.values()), rss_growth_mb=sorted(growth.values()))
    print(f"{stage}: {len(done)} slides in {seconds:.1f} s = {len(done) / seconds * 3600:.0f} slides/hour on "
          f"{N_WORKERS} workers; peak RSS per worker {sorted(peak.values())} MB, growth after 3 slides "
          f"{sorted(growth.values())} MB")


def test_cohort_on_local_cluster(cohort, client, report, tmp_path):
    import torch

    from isg.data import load_expression, load_manifest
    from isg.pipeline.cohort import ItemResult
    from isg.features import Autoencoder, save_autoencoder
    from isg.pipeline.extract import extract_cohort
    from isg.pipeline.predict import Predictor, predict_slides
    from isg.pipeline.preprocess import preprocess_cohort
    from isg.train.config import AutoencoderTrainConfig, TrainConfig
    from isg.train.expression import cross_validate

    synth, slides, root = cohort
    problems: list[str] = []
    patches = tmp_path / "patches"
    start = time.perf_counter()
    summary = preprocess_cohort(slides, patches, scheduler=client, patch_size=PATCH, local_size=LOCAL, progress=False,
                                num_workers=1)
    stage_row(report, "preprocess", summary.results, time.perf_counter() - start, problems)

    torch.manual_seed(0)
    for kind in ("global", "local"):
        config = AutoencoderTrainConfig(kind=kind)
        save_autoencoder(tmp_path / f"{kind}.pt", Autoencoder(**config.model_kwargs()))
    start = time.perf_counter()
    results = extract_cohort(sorted(patches.glob("*.h5")), tmp_path / "global.pt", tmp_path / "local.pt",
                             scheduler=client, progress=False, num_workers=1, summary_path=tmp_path / "extract.json")
    items = json.loads((tmp_path / "extract.json").read_text())["items"]
    stage_row(report, "extract", [ItemResult(**item) for item in items], time.perf_counter() - start, problems)
    assert all(r.status == "done" for r in results) or problems

    # a model folder trained on the distinct slides (not timed), then every slide predicted from scratch
    train_patches = tmp_path / "train_patches"
    preprocess_cohort(synth.slides, train_patches, patch_size=PATCH, local_size=LOCAL, progress=False)
    extract_cohort(sorted(train_patches.glob("*.h5")), tmp_path / "global.pt", tmp_path / "local.pt", progress=False)
    cross_validate(load_manifest(synth.manifest), train_patches, load_expression(synth.expression), tmp_path / "model",
                   TrainConfig(model="isg-2-1-plus", epochs=2, n_splits=3, model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}))
    predictor = Predictor.from_train_dir(tmp_path / "model")
    predictor.num_workers = 1
    start = time.perf_counter()
    _, _, summary = predict_slides(slides, predictor, tmp_path / "predict", scheduler=client, progress=False)
    stage_row(report, "predict", summary.results, time.perf_counter() - start, problems)
    assert not problems, "\n".join(problems)


def test_runner_cost_on_100000_items(report, tmp_path):
    """``run_cohort``'s own work per item: the duplicate-output check (one pass) and the resume scan, on 100,000
    items that are all finished; beside it the former check (``outputs.count(o)`` per item) on 10,000."""
    from isg.pipeline.cohort import duplicate_outputs, run_cohort

    outputs = [f"/cohort/out/slide{i:06d}.h5" for i in range(100_000)]
    seconds = {}
    for n in (10_000, 100_000):
        assert duplicate_outputs(outputs[:n]) == []
        seconds[n] = report.measure(lambda n=n: duplicate_outputs(outputs[:n]), repeat=5)
        report.add("cohort_runner", f"duplicate check, {n} items", seconds[n], unit="s", higher_is_better=False,
                   baseline=n == 10_000)
    start = time.perf_counter()
    assert sorted({o for o in outputs[:10_000] if outputs[:10_000].count(o) > 1}) == []
    quadratic = time.perf_counter() - start
    report.add("cohort_runner", "former count() check, 10000 items", quadratic, unit="s", higher_is_better=False)
    start = time.perf_counter()
    summary = run_cohort(range(100_000), print, lambda i: outputs[i], is_complete=lambda path: True, progress=False)
    whole = time.perf_counter() - start
    report.add("cohort_runner", "run_cohort, 100000 finished items", whole, unit="s", higher_is_better=False)
    assert len(summary.skipped) == 100_000
    small, large = seconds[10_000], seconds[100_000]
    print(f"duplicate check: 10k {small:.4f} s, 100k {large:.4f} s ({large / small:.1f}x for 10x the items); "
          f"former check on 10k: {quadratic:.2f} s; run_cohort over 100k finished items: {whole:.2f} s")
    assert large < 1.0 and large / small < 30, "the duplicate check is not linear in the cohort size"
    assert whole < 30.0, "the runner's per-item work on a finished cohort is too slow"
