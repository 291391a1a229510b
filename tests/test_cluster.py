"""Per-slide stages on a local Dask cluster (127.0.0.1, 2 worker processes): extract matches the in-process run and
loads its extractors once per worker; a worker killed mid-write loses nothing; a client killed with -9 resumes; the
workers' memory stays flat over the cohort."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

distributed = pytest.importorskip("distributed")

from isg.data.patch_file import read_patch_file  # noqa: E402
from isg.features import Autoencoder, ExtractorError, ExtractorRef, save_autoencoder  # noqa: E402
from isg.pipeline.cohort import run_cohort  # noqa: E402
from isg.pipeline.extract import _ExtractOne, _HasFeatures, extract_cohort  # noqa: E402
from isg.utils import atomic_path, process_cache_loads  # noqa: E402
from small_cohort import preprocessed_cohort  # noqa: E402

N_SLIDES = 16
WAIT = 240  # seconds: generous, the test machine may be loaded


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """``N_SLIDES`` preprocessed 768 px synthetic slides (64 px patches; manifest, expression) and two small extractors."""
    root = tmp_path_factory.mktemp("cluster")
    synth = preprocessed_cohort(root, n_slides=N_SLIDES, genes=5, k=None)
    torch.manual_seed(0)
    for role in ("global", "local"):
        save_autoencoder(root / f"{role}.pt", Autoencoder(resolution=32, d=16, channel_base=256, channel_max=16, mapping_layers=1))
    assert synth.manifest == root / "cohort" / "manifest.csv"
    return root


def fresh_patches(cohort: Path, out: Path, copies: int = 1) -> list[Path]:
    """Copies of the preprocessed patch files (no features yet); copy k > 0 of ``<id>.h5`` is ``<id>~k.h5``."""
    out.mkdir(parents=True)
    return [Path(shutil.copy(p, out / f"{p.stem}{f'~{k}' if k else ''}.h5"))
            for k in range(copies) for p in sorted((cohort / "patches").glob("*.h5"))]


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(host="127.0.0.1", protocol="tcp", n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None, resources={"GPU": 1}, silence_logs=40) as cluster:
        with distributed.Client(cluster) as client:
            yield cluster, client


@pytest.fixture(scope="module")
def reference(cohort, tmp_path_factory):
    """Features of every slide, extracted in-process (threads)."""
    paths = fresh_patches(cohort, tmp_path_factory.mktemp("reference") / "h5")
    results = extract_cohort(paths, cohort / "global.pt", cohort / "local.pt", progress=False)
    assert all(r.status == "done" for r in results)
    return {p.stem: read_patch_file(p) for p in paths}


def assert_same_features(paths: list[Path], reference: dict) -> None:
    for path in paths:
        got, want = read_patch_file(path), reference[path.stem.split("~")[0]]
        np.testing.assert_array_equal(got.coords, want.coords)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.local_features.astype(np.float32), want.local_features.astype(np.float32), atol=2e-3)


def temporaries(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*"))


def test_extract_on_dask_matches_in_process_and_loads_extractors_once_per_worker(cohort, cluster, reference, tmp_path):
    _, client = cluster
    paths = fresh_patches(cohort, tmp_path / "h5")
    summary_path = tmp_path / "h5" / "extract_summary.json"
    results = extract_cohort(paths, cohort / "global.pt", cohort / "local.pt", scheduler=client, resources={"GPU": 1},
                             progress=False, summary_path=summary_path)
    assert [r.status for r in results] == ["done"] * N_SLIDES
    assert_same_features(paths, reference)
    loads = client.run(process_cache_loads)  # {worker address: {cache key: builds}}
    extractor_loads = [n for per_worker in loads.values() for key, n in per_worker.items() if "autoencoder" in key]
    assert extractor_loads and max(extractor_loads) == 1  # each worker loaded each extractor once
    assert sum(extractor_loads) <= 4  # 2 workers x (global, local), not one load per slide
    assert not temporaries(tmp_path / "h5")


def test_extractor_refs_refuse_missing_and_altered_files(cohort, tmp_path):
    path = Path(shutil.copy(cohort / "global.pt", tmp_path / "g.pt"))
    ref = ExtractorRef.of(path, "global")
    assert ref.load().d == 16
    with open(path, "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ExtractorError, match=r"global extractor .*g\.pt: altered"):
        ref.load()
    path.unlink()
    with pytest.raises(ExtractorError, match=r"g\.pt: no such file"):
        ref.cached()


class Victim:
    """The extract task, except that on its first attempt at slide ``victim`` it starts writing the patch file
    (a half-written temp file), says which process it runs in, and waits to be killed."""

    def __init__(self, process: _ExtractOne, victim: str, marker: Path):
        self.process, self.victim, self.marker = process, victim, marker

    def __call__(self, h5_path: Path) -> dict:
        if h5_path.stem == self.victim and not self.marker.exists():
            with atomic_path(h5_path) as tmp:
                tmp.write_bytes(b"\x89HDF half written")
                self.marker.write_text(str(os.getpid()))
                time.sleep(WAIT)
        return self.process(h5_path)


def test_worker_killed_mid_write_is_rescheduled_and_nothing_is_lost(cohort, cluster, reference, tmp_path):
    import cloudpickle

    _, client = cluster
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this test module
    paths = fresh_patches(cohort, tmp_path / "h5")
    marker = tmp_path / "victim.pid"
    process = _ExtractOne(ExtractorRef.of(cohort / "global.pt", "global"), ExtractorRef.of(cohort / "local.pt", "local"),
                          {}, dict(batch_size=64, device="cpu", num_workers=1, backend="auto", amp=False))
    outcome = {}

    def run() -> None:
        outcome["summary"] = run_cohort(paths, Victim(process, paths[3].stem, marker), lambda p: p, scheduler=client,
                                        name_of=lambda p: p.stem, is_complete=_HasFeatures(True), progress=False,
                                        summary_path=tmp_path / "summary.json")

    runner = threading.Thread(target=run)
    runner.start()
    deadline = time.monotonic() + WAIT
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), "the victim task never started"
    assert temporaries(tmp_path / "h5"), "the victim's half-written temp file"
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the worker process dies mid-write; its nanny restarts it
    runner.join(WAIT)
    assert not runner.is_alive()
    summary = outcome["summary"]
    assert [r.status for r in summary.results] == ["done"] * N_SLIDES, summary.failed
    assert_same_features(paths, reference)  # the rescheduled slide too
    assert not temporaries(tmp_path / "h5")  # its half-written temp file was removed before it was redone


def test_client_killed_then_rerun_resumes(cohort, cluster, reference, tmp_path):
    dask_cluster, _ = cluster
    paths = fresh_patches(cohort, tmp_path / "h5", copies=3)  # enough slides that the kill comes mid-run
    n = len(paths)
    done = _HasFeatures(True)
    command = [sys.executable, "-m", "isg", "extract", "run", "--h5-dir", str(tmp_path / "h5"), "--global",
               str(cohort / "global.pt"), "--local", str(cohort / "local.pt"), "--scheduler",
               dask_cluster.scheduler_address, "--num-workers", "1", "--quiet"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    client = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + WAIT
    while not any(done(p) for p in paths) and time.monotonic() < deadline and client.poll() is None:
        time.sleep(0.02)
    client.kill()  # SIGKILL: no cleanup in the client
    client.wait(30)
    finished = sum(done(p) for p in paths)
    assert 0 < finished < n, f"killed after {finished} of {n} slides: {client.stdout.read().decode()[-2000:]}"
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=WAIT)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    skipped = int(rerun.stdout.split(" skipped")[0].rsplit(" ", 1)[-1])
    assert finished <= skipped < n and f"of {n} slide(s)" in rerun.stdout
    assert all(done(p) for p in paths)
    assert_same_features(paths, reference)
    assert not temporaries(tmp_path / "h5")
    summary = json.loads((tmp_path / "h5" / "extract_summary.json").read_text())
    assert summary["complete"] and summary["n_done"] + summary["n_skipped"] == n and not summary["n_failed"]


def test_worker_memory_stays_flat_over_the_cohort(cohort, cluster, tmp_path):
    """Resident memory of each worker after each slide: after its first slides (imports, extractors, buffers) it
    stays within a few MB, while the cohort streams 4 x 16 slides through it."""
    _, client = cluster
    series: dict[str, list[float]] = {}
    for round_ in range(4):
        paths = fresh_patches(cohort, tmp_path / f"h5-{round_}")
        results = run_cohort(paths, _ExtractOne(ExtractorRef.of(cohort / "global.pt"), ExtractorRef.of(cohort / "local.pt", "local"),
                                                {}, dict(batch_size=64, device="cpu", num_workers=1, backend="auto", amp=False)),
                             lambda p: p, scheduler=client, name_of=lambda p: p.stem, is_complete=_HasFeatures(True),
                             progress=False).results
        for result in results:
            assert result.status == "done" and result.rss_mb > 0
            series.setdefault(result.worker, []).append(result.rss_mb)
    growth = {worker: max(rss[len(rss) // 2:]) - float(np.median(rss[2:6])) for worker, rss in series.items() if len(rss) >= 12}
    assert growth, series
    assert max(growth.values()) < 16, growth  # MB (measured: 2-3 MB over 32 slides per worker)


def slurm_module():
    import importlib.util

    path = Path(__file__).parents[1] / "docs" / "slurm" / "isg_slurm.py"
    spec = importlib.util.spec_from_file_location("isg_slurm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_slurm_config_gives_each_worker_job_one_gpu(tmp_path):
    pytest.importorskip("dask_jobqueue")
    import dask

    saved = copy.deepcopy(dask.config.config)
    try:
        with slurm_module().slurm_cluster(scheduler_options={"host": "127.0.0.1", "dashboard_address": ":0"},
                                          log_directory=str(tmp_path / "logs")) as cluster:
            script = cluster.job_script()  # what sbatch would get; nothing is submitted
    finally:
        dask.config.config.clear()
        dask.config.config.update(saved)  # the yaml was read into the process's dask config
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH -p gpu" in script
    assert "--resources GPU=1" in script and "--nthreads 8" in script and "distributed.cli.dask_worker" in script


def test_slurm_script_runs_the_stages_on_a_local_cluster(cohort, cluster, tmp_path, capsys):
    """isg_slurm.run_commands, as on SLURM but with the LocalCluster: preprocess -> extract run -> predict on the
    workers (each slide asking for a GPU), the model trained in between."""
    from isg.cli import main

    dask_cluster, _ = cluster
    module = slurm_module()
    manifest, expression = cohort / "cohort" / "manifest.csv", cohort / "cohort" / "expression.tsv"
    address, out = dask_cluster.scheduler_address, tmp_path / "out"
    code = module.run_commands(address, [
        ["preprocess", "--manifest", str(manifest), "--out", str(out / "patches"), "--patch-size", "64",
         "--local-size", "32", "--resources", "GPU=1", "--quiet"],
        ["extract", "run", "--h5-dir", str(out / "patches"), "--global", str(cohort / "global.pt"), "--local",
         str(cohort / "local.pt"), "--resources", "GPU=1", "--quiet"]])
    assert code == 0, capsys.readouterr()
    assert main(["train", "--manifest", str(manifest), "--expression", str(expression), "--features",
                 str(out / "patches"), "--out", str(out / "model"), "--model", "vit-s", "--folds", "3", "--epochs", "1",
                 "--model-kwargs", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--quiet"]) == 0
    new = sorted((cohort / "cohort" / "slides").glob("*.tif"))[:3]
    code = module.run_commands(address, [["predict", *map(str, new), "--model", str(out / "model"), "--out",
                                          str(out / "pred"), "--resources", "GPU=1", "--quiet"]])
    assert code == 0, capsys.readouterr()
    import pandas as pd

    predictions = pd.read_csv(out / "pred" / "predictions.csv", index_col="slide_id")
    assert list(predictions.index) == [p.stem for p in new] and np.isfinite(predictions.to_numpy()).all()
    lines = (out / "pred" / "progress.log").read_text().splitlines()  # written by the worker processes
    assert all(any(line.split(" ", 2)[2].startswith(f"{p.stem} ") for line in lines) for p in new)
    assert len(lines) == len(set(lines))  # one handler per process: no line twice
    assert module.split_commands(["--jobs", "2", "--", "a", "b", "--", "c"]) == (["--jobs", "2"], [["a", "b"], ["c"]])


def test_cuda_on_dask_asks_each_slide_for_a_gpu(cluster, caplog):
    from types import SimpleNamespace

    from isg.cli import CLIError
    from isg.cli._cluster import scheduler_from_args
    from isg.pipeline.cohort import _warn_without_resources

    args = SimpleNamespace(workers=None, scheduler="tcp://127.0.0.1:8786", resources=None, device="cuda")
    assert scheduler_from_args(args) == ("tcp://127.0.0.1:8786", None, {"GPU": 1.0})
    args.resources = ""  # asks for none
    assert scheduler_from_args(args)[2] is None
    args.resources, args.workers = "GPU=2,MEM=0.5", 3
    assert scheduler_from_args(args) == ("tcp://127.0.0.1:8786", 3, {"GPU": 2.0, "MEM": 0.5})
    args.device, args.resources = "cpu", None
    assert scheduler_from_args(args)[2] is None
    for bad in ("GPU", "=1", "GPU=one"):
        args.resources = bad
        with pytest.raises(CLIError, match="--resources"):
            scheduler_from_args(args)
    _, client = cluster
    with caplog.at_level("WARNING", logger="isg.pipeline.cohort"):
        _warn_without_resources(client, {"GPU": 1})  # the workers offer one GPU each
        assert not caplog.records
        _warn_without_resources(client, {"GPU": 2})
    assert "none of the 2 Dask worker(s) offers GPU=2" in caplog.text
