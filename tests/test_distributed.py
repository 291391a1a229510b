"""``isg extract fit`` and ``isg train`` under torchrun (gloo, 2 processes on 127.0.0.1): the same global batch gives
the same losses as one process; a run resumes across process counts; rank 0 alone writes and prints."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from isg.cli import main
from small_cohort import preprocessed_cohort

REPO = Path(__file__).resolve().parents[1]
AE = ["--which", "global", "--batch-size", "8", "--global-resolution", "16", "--global-d", "8", "--channel-base", "128",
      "--channel-max", "16", "--lpips-weight", "0", "--stream-slides", "2", "--stream-patches", "3", "--quiet"]
SMALL = '{"embed_dim": 16, "depth": 1, "num_heads": 2}'


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """6 synthetic slides, 8 selected 64 px patches each, with features of a small untrained extractor."""
    from isg.features import Autoencoder, save_autoencoder
    from isg.pipeline.extract import extract_cohort

    root = tmp_path_factory.mktemp("ddp")
    synth = preprocessed_cohort(root, seed=2, genes=4, k=8)
    torch.manual_seed(0)
    for role in ("global", "local"):
        save_autoencoder(root / f"{role}.pt", Autoencoder(resolution=16, d=8, channel_base=128, channel_max=16, mapping_layers=1))
    extract_cohort(sorted((root / "patches").glob("*.h5")), root / "global.pt", root / "local.pt", progress=False)
    return root, synth


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(n: int, args: list[str]) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node n -m isg ARGS`` on 127.0.0.1 (gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(n),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "isg", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def losses(folder: Path) -> dict:
    history = json.loads((folder / "global" / "history.json").read_text())
    return {key: np.asarray(values) for key, values in history.items()}


def assert_same_losses(got: dict, want: dict) -> None:
    assert list(got["step"]) == list(want["step"])
    for key in ("l1", "adv", "d_loss", "r1"):
        np.testing.assert_allclose(got[key], want[key], rtol=2e-3, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("sampler", ["bank", "stream"])
def test_autoencoder_under_torchrun_matches_one_process(cohort, tmp_path, sampler):
    root, _ = cohort
    common = ["extract", "fit", "--h5-dir", str(root / "patches"), "--sampler", sampler, *AE]
    torch.set_num_threads(1)
    assert main([*common, "--out", str(tmp_path / "one"), "--steps", "5"]) == 0
    result = torchrun(2, [*common, "--out", str(tmp_path / "two"), "--steps", "5"])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one["l1"]) == 5 and one["r1"][0] > 0  # R1 ran at step 0
    assert_same_losses(two, one)
    assert result.stdout.count("global: 5 steps") == 1  # rank 0 alone prints
    from isg.features import load_autoencoder

    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(load_autoencoder(tmp_path / "two" / "global" / "autoencoder.pt").encode(x),
                                   load_autoencoder(tmp_path / "one" / "global" / "autoencoder.pt").encode(x),
                                   rtol=1e-3, atol=1e-4)
    if sampler == "stream":  # a one-process run stopped at step 3, resumed by two processes
        assert main([*common, "--out", str(tmp_path / "resumed"), "--steps", "3"]) == 0
        torchrun(2, [*common, "--out", str(tmp_path / "resumed"), "--steps", "5"])
        assert_same_losses(losses(tmp_path / "resumed"), one)


def test_train_under_torchrun_matches_one_process_and_resumes(cohort, tmp_path):
    root, synth = cohort
    common = ["train", "--manifest", str(synth.manifest), "--expression", str(synth.expression), "--features",
              str(root / "patches"), "--model", "vit-s", "--folds", "3", "--epochs", "3", "--patience", "3",
              "--batch-size", "3", "--max-patches", "5", "--model-kwargs", SMALL, "--quiet"]
    torch.set_num_threads(1)
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    result = torchrun(2, [*common, "--out", str(tmp_path / "two")])
    assert result.stdout.count("mean Pearson r") == 1  # rank 0 alone prints
    for k in range(3):
        one, two = (json.loads((tmp_path / run / "folds" / f"fold{k}.json").read_text()) for run in ("one", "two"))
        for key in ("train_loss", "val_loss"):  # batches of 3 slides: shares of 2 and 1, and 1 and 0 (a stand-in)
            np.testing.assert_allclose([row[key] for row in two["history"]], [row[key] for row in one["history"]],
                                       rtol=1e-4, atol=1e-6, err_msg=f"fold {k} {key}")
    oof = {run: pd.read_csv(tmp_path / run / "predictions_oof.csv", index_col=0) for run in ("one", "two")}
    np.testing.assert_allclose(oof["two"].to_numpy(), oof["one"].to_numpy(), rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").glob("model_fold*.pt")) == [f"model_fold{k}.pt" for k in range(3)]

    # a run killed after fold 1: the rerun trains fold 2 only, and ends where the straight run ended
    (tmp_path / "one" / "folds" / "fold2.json").unlink()
    stamps = {k: (tmp_path / "one" / f"model_fold{k}.pt").stat().st_mtime_ns for k in range(3)}
    assert main([*common, "--out", str(tmp_path / "one")]) == 0
    assert [(tmp_path / "one" / f"model_fold{k}.pt").stat().st_mtime_ns == stamps[k] for k in range(3)] == [True, True, False]
    again = pd.read_csv(tmp_path / "one" / "predictions_oof.csv", index_col=0)
    np.testing.assert_allclose(again.to_numpy(), oof["one"].to_numpy(), rtol=1e-6, atol=1e-7)
