"""Autoencoder features of selected patches (isg.pipeline.extract) and the ``isg extract`` CLI."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import pytest
import torch

from isg.features import Autoencoder, tiles_to_input
from isg.pipeline.extract import FAILED, SKIPPED, WRITTEN, extract_cohort, extract_slide
from isg.io import open_slide
from isg.select import SelectionRule
from isg.io.synth import pyramid, render_slide, write_pyramid_tiff

TINY = dict(channel_base=128, channel_max=16, mapping_layers=1)
PARAMS = {"density": 0.7, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.6}


@pytest.fixture(autouse=True)
def _one_thread(tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks: threading only adds synchronisation
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no cached AlexNet: random, warned
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    """A 301 x 257 px slide (odd), 64 px JPEG tiles, levels 301 and 150 px wide, mpp 0.5."""
    image, _, _ = render_slide(np.random.default_rng(3), 301, 257, PARAMS, mpp=0.5)
    path = tmp_path_factory.mktemp("slides") / "slide.tif"
    write_pyramid_tiff(path, pyramid(image, 64, 2), 0.5, tile=64)
    return path


def write_h5(path, slide_path, coords, p: int, q: int, level: int = 0, downsample: int = 1, mpp: float | None = 0.5):
    """A per-slide .h5 as written by ``isg preprocess`` (contract in the shared notes)."""
    with h5py.File(path, "w") as f:
        f.attrs.update(slide_id=path.stem, slide_path=str(slide_path), isg_version="test")
        if mpp is not None:
            f.attrs["level0_mpp"] = mpp
        dset = f.create_dataset("coords", data=np.asarray(coords, np.int64).reshape(-1, 2))
        dset.attrs.update(patch_size=p, patch_level=level, level0_patch_size=p * downsample, mpp=(mpp or 0.5) * downsample,
                          local_size=q, selector="shannon", rule="mean_std", threshold=1.0)
    return path


def reference_tiles(slide_path, coords, p: int, level: int) -> torch.Tensor:
    with open_slide(slide_path) as slide:
        return torch.from_numpy(np.stack([slide.read_region((int(x), int(y)), level, (p, p)) for x, y in coords]))


COORDS = [[0, 0], [37, 101], [150, 64], [213, 171], [90, 20]]


@pytest.mark.parametrize("p,q,level,batch_size", [(32, 16, 0, 2), (30, 10, 0, 3), (24, 8, 1, 64), (20, 20, 0, 1)])
def test_extract_slide_matches_encoder(tmp_path, slide_file, p, q, level, batch_size):
    torch.manual_seed(0)
    global_ae, local_ae = Autoencoder(16, 7, **TINY).eval(), Autoencoder(8, 5, **TINY).eval()
    h5 = write_h5(tmp_path / "slide.h5", slide_file, COORDS, p, q, level, downsample=2**level)
    result = extract_slide(h5, None, global_ae, local_ae, batch_size=batch_size, num_workers=2)
    assert (result.status, result.n_patches) == (WRITTEN, len(COORDS))
    s = p // q
    with h5py.File(h5) as f:
        features, local = f["features"][...], f["local_features"][...]
        assert features.dtype == np.float32 and features.shape == (5, 7)
        assert local.dtype == np.float16 and local.shape == (5, s, s, 5)
        assert f["features"].attrs["d"] == 7 and f["local_features"].attrs["d"] == 5
        np.testing.assert_array_equal(f["coords"][...], COORDS)  # preprocess datasets kept
    tiles = reference_tiles(slide_file, COORDS, p, level)  # [M, p, p, 3]
    with torch.no_grad():
        np.testing.assert_allclose(features, global_ae.encode(tiles_to_input(tiles, 16)).numpy(), rtol=1e-5, atol=1e-5)
        for i, j in [(0, 0), (s - 1, 0), (s - 1, s - 1)]:  # local (i, j): rows i*q.., columns j*q..
            sub = tiles[:, i * q:(i + 1) * q, j * q:(j + 1) * q]
            expected = local_ae.encode(tiles_to_input(sub, 8)).numpy().astype(np.float16)
            np.testing.assert_allclose(local[:, i, j].astype(np.float32), expected.astype(np.float32), rtol=2e-3, atol=2e-3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.h5"]  # no temp file left


def test_rerun_skips_and_overwrite_recomputes(tmp_path, slide_file):
    h5 = write_h5(tmp_path / "s.h5", slide_file, COORDS[:3], 32, 16)
    first, second = Autoencoder(8, 4, **TINY), Autoencoder(8, 4, **TINY)
    assert extract_slide(h5, None, first, first).status == WRITTEN
    with h5py.File(h5) as f:
        before = f["features"][...]
    assert extract_slide(h5, None, second, second).status == SKIPPED
    with h5py.File(h5) as f:
        np.testing.assert_array_equal(f["features"][...], before)
    assert extract_slide(h5, None, second, second, overwrite=True).status == WRITTEN
    with h5py.File(h5) as f:
        assert not np.allclose(f["features"][...], before)
        assert f["local_features"].shape == (3, 2, 2, 4)


def test_global_only_and_empty_selection(tmp_path, slide_file):
    ae = Autoencoder(8, 6, **TINY)
    h5 = write_h5(tmp_path / "g.h5", slide_file, COORDS[:2], 32, 16)
    assert extract_slide(h5, None, ae, None).status == WRITTEN
    with h5py.File(h5) as f:
        assert f["features"].shape == (2, 6) and "local_features" not in f
    empty = write_h5(tmp_path / "e.h5", slide_file, np.zeros((0, 2)), 32, 16)
    assert extract_slide(empty, None, ae, ae).n_patches == 0
    with h5py.File(empty) as f:
        assert f["features"].shape == (0, 6) and f["local_features"].shape == (0, 2, 2, 6)


def test_failure_leaves_h5_untouched(tmp_path, slide_file, monkeypatch):
    import isg.pipeline.extract as extract

    h5 = write_h5(tmp_path / "s.h5", slide_file, COORDS, 32, 16)
    original = h5.read_bytes()
    calls = []

    def failing(ae, tiles, device, max_batch=1024, amp=False):
        calls.append(len(tiles))
        if len(calls) == 3:
            raise RuntimeError("boom")
        return torch.zeros(len(tiles), ae.d)

    monkeypatch.setattr(extract, "encode_tiles", failing)
    ae = Autoencoder(8, 4, **TINY)
    with pytest.raises(RuntimeError, match="boom"):
        extract_slide(h5, None, ae, ae, batch_size=2)
    assert h5.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]


def test_bad_inputs(tmp_path, slide_file):
    ae = Autoencoder(8, 4, **TINY)
    with pytest.raises(ValueError, match="not a positive multiple of local_size"):
        extract_slide(write_h5(tmp_path / "pq.h5", slide_file, COORDS, 30, 16), None, ae, ae)
    with h5py.File(tmp_path / "nocoords.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((2, 3)))
    with pytest.raises(ValueError, match="nocoords.h5: no 'coords' dataset"):
        extract_slide(tmp_path / "nocoords.h5", None, ae, ae)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5: not a readable HDF5"):
        extract_slide(tmp_path / "text.h5", None, ae, ae)


def test_cohort_reports_bad_slides(tmp_path, slide_file):
    good = write_h5(tmp_path / "good.h5", slide_file, COORDS, 32, 16)
    corrupt = tmp_path / "corrupt.tif"
    corrupt.write_bytes(b"II*\x00garbage" * 20)
    bad = write_h5(tmp_path / "bad.h5", corrupt, COORDS, 32, 16)
    missing = write_h5(tmp_path / "missing.h5", tmp_path / "nowhere.tif", COORDS, 32, 16)
    ae = Autoencoder(8, 4, **TINY)
    results = extract_cohort([bad, good, missing, tmp_path / "absent.h5"], ae, ae, progress=False)
    assert [r.status for r in results] == [FAILED, WRITTEN, FAILED, FAILED]
    assert "corrupt.tif" in results[0].error and "nowhere.tif" in results[2].error and "absent.h5" in results[3].error
    with h5py.File(bad) as f:
        assert "features" not in f
    # slide paths can be given per slide id
    results = extract_cohort([missing], ae, ae, slide_paths={"missing": slide_file}, progress=False)
    assert results[0].status == WRITTEN


def test_preprocess_h5_then_extract(tmp_path, slide_file):
    """The .h5 written by the real preprocess step is consumed as is."""
    from isg.pipeline.preprocess import preprocess_slide

    preprocess_slide(slide_file, tmp_path, patch_size=32, local_size=16, selector="shannon", rule=SelectionRule("topk", k=4),
                     tissue_min=0.0, num_workers=0)
    h5 = tmp_path / "slide.h5"
    ae = Autoencoder(8, 3, **TINY)
    result = extract_slide(h5, None, ae, ae)
    with h5py.File(h5) as f:
        m = len(f["coords"])
        assert result.n_patches == m > 0 and f["features"].shape == (m, 3) and f["local_features"].shape == (m, 2, 2, 3)
        assert "scores" in f and "selected" in f


# ----------------------------------------------------------------------------- CLI


def test_cli_errors(tmp_path, capsys):
    from isg.cli import main

    assert main(["extract", "fit", "--h5-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "ck")]) == 2
    assert "--h5-dir" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["extract", "run", "--h5-dir", str(tmp_path / "empty"), "--global", "x.pt"]) == 2
    assert "holds no .h5 files" in capsys.readouterr().err
    write_h5(tmp_path / "h5" / "a.h5" if (tmp_path / "h5").mkdir() is None else None, tmp_path / "a.tif", COORDS, 32, 16)
    assert main(["extract", "run", "--h5-dir", str(tmp_path / "h5"), "--global", str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "ckdir").mkdir()
    assert main(["extract", "run", "--h5-dir", str(tmp_path / "h5"), "--global", str(tmp_path / "ckdir")]) == 2
    assert "holds no autoencoder.pt" in capsys.readouterr().err
    assert main(["extract", "fit", "--h5-dir", str(tmp_path / "h5"), "--out", str(tmp_path / "ck"), "--batch-size", "0"]) == 2
    assert "--batch-size must be positive" in capsys.readouterr().err


def test_cli_fit_then_run(tmp_path, slide_file, capsys):
    from isg.cli import main
    from isg.features import load_autoencoder

    (tmp_path / "h5").mkdir()
    write_h5(tmp_path / "h5" / "a.h5", slide_file, COORDS, 32, 16)
    write_h5(tmp_path / "h5" / "b.h5", tmp_path / "gone.tif", COORDS, 32, 16)  # a bad slide: skipped while training
    common = ["--steps", "2", "--batch-size", "4", "--global-resolution", "16", "--local-resolution", "8", "--global-d", "6",
              "--local-d", "5", "--channel-base", "128", "--channel-max", "16", "--quiet"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert main(["extract", "fit", "--h5-dir", str(tmp_path / "h5"), "--out", str(tmp_path / "ck"), *common]) == 0
    assert load_autoencoder(tmp_path / "ck" / "global" / "autoencoder.pt").d == 6
    assert load_autoencoder(tmp_path / "ck" / "local" / "autoencoder.pt").resolution == 8
    args = ["extract", "run", "--h5-dir", str(tmp_path / "h5"), "--global", str(tmp_path / "ck" / "global"),
            "--local", str(tmp_path / "ck" / "local" / "checkpoint.pt"), "--quiet"]
    assert main(args) == 1  # b.h5's slide is missing: reported, a.h5 written
    captured = capsys.readouterr()
    assert "1 written, 0 skipped, 1 failed" in captured.out and "b.h5" in captured.err
    with h5py.File(tmp_path / "h5" / "a.h5") as f:
        assert f["features"].shape == (5, 6) and f["local_features"].shape == (5, 2, 2, 5)
        assert f["features"].attrs["checkpoint"].endswith("autoencoder.pt")
    (tmp_path / "h5" / "b.h5").unlink()
    assert main(args) == 0
    assert "0 written, 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("kind,max_tiles,expected", [("global", None, 5), ("local", None, 20), ("local", 9, 8), ("global", 3, 3)])
def test_training_tiles_from_h5(tmp_path, slide_file, kind, max_tiles, expected):
    from isg.train.autoencoder import collect_tiles

    h5 = write_h5(tmp_path / "s.h5", slide_file, COORDS, 32, 16)
    write_h5(tmp_path / "bad.h5", tmp_path / "gone.tif", COORDS, 32, 16)  # skipped with a warning
    bank = collect_tiles([h5, tmp_path / "bad.h5"], kind, 16, max_tiles=max_tiles, num_workers=0)
    assert bank.dtype == torch.uint8 and bank.shape == (expected, 16, 16, 3)
    tiles = reference_tiles(slide_file, COORDS, 32, 0)
    if kind == "local":
        tiles = tiles.reshape(5, 2, 16, 2, 16, 3).permute(0, 1, 3, 2, 4, 5).reshape(20, 16, 16, 3)  # row-major sub-patches
    else:
        tiles = ((tiles_to_input(tiles, 16) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    matches = [(bank[i:i + 1] == tiles).flatten(1).all(1).any().item() for i in range(len(bank))]  # each bank tile is one of them
    assert all(matches)
    with pytest.raises(ValueError, match="no global training tiles"):
        collect_tiles([tmp_path / "bad.h5"], "global", 16)


@pytest.mark.gpu
@pytest.mark.parametrize("amp", [False, True])
def test_extract_on_cuda_matches_cpu(tmp_path, slide_file, amp):
    torch.manual_seed(0)
    global_ae, local_ae = Autoencoder(16, 7, **TINY).eval(), Autoencoder(8, 5, **TINY).eval()
    cpu_h5 = write_h5(tmp_path / "cpu.h5", slide_file, COORDS, 32, 16)
    gpu_h5 = write_h5(tmp_path / "gpu.h5", slide_file, COORDS, 32, 16)
    extract_slide(cpu_h5, None, global_ae, local_ae)
    extract_slide(gpu_h5, None, global_ae, local_ae, device="cuda", amp=amp)
    tol = 5e-2 if amp else 1e-2  # bfloat16 / TF32 convolutions
    with h5py.File(cpu_h5) as a, h5py.File(gpu_h5) as b:
        for name in ("features", "local_features"):
            np.testing.assert_allclose(b[name][...].astype(np.float32), a[name][...].astype(np.float32), rtol=tol, atol=tol)


@pytest.mark.parametrize("kind, size, n", [("global", 256, 5), ("local", 64, 9), ("global", 250, 3)])
def test_bf16_encoders_stay_within_the_stated_tolerance_of_fp32(kind, size, n):
    """``amp`` (bfloat16 autocast, CPUs with AVX512-BF16/AMX): each patch's features within 2e-2 relative L2 of
    float32 (measured ~1e-2, docs/features.md), on the compact extractor at its real size."""
    from isg.pipeline.extract import bf16_supported, encode_tiles
    from isg.train.config import AutoencoderTrainConfig

    if not bf16_supported("cpu"):
        pytest.skip("this CPU has no native bfloat16 (AVX512-BF16 / AMX)")
    torch.manual_seed(1)
    ae = Autoencoder(**AutoencoderTrainConfig(kind=kind).model_kwargs()).eval().to(memory_format=torch.channels_last)
    image, _, _ = render_slide(np.random.default_rng(n), size * n, size, PARAMS | {"tissue_fraction": 0.95}, mpp=0.5)
    tiles = torch.from_numpy(np.ascontiguousarray(image.reshape(size, n, size, 3).transpose(1, 0, 2, 3)))
    exact, fast = encode_tiles(ae, tiles, "cpu"), encode_tiles(ae, tiles, "cpu", amp=True)
    rel = (fast - exact).norm(dim=1) / exact.norm(dim=1)  # [n]
    assert exact.dtype == fast.dtype == torch.float32 and rel.max() <= 2e-2 and rel.min() > 1e-4, rel  # bf16 did run


@pytest.mark.parametrize("threads, batch_size", [(2, 5), (3, 2), (4, 3), (7, 5)])
def test_encoders_side_by_side_give_the_same_features(tmp_path, slide_file, threads, batch_size):
    """Each batch split into ``threads`` parts (some empty), encoded side by side with one-thread ops: the same
    features as one encoder, in the same rows; torch's thread count is restored after."""
    from isg.data.patch_file import read_patch_file
    from isg.pipeline.extract import encode_patches

    torch.manual_seed(0)
    global_ae, local_ae = Autoencoder(16, 7, **TINY).eval(), Autoencoder(8, 5, **TINY).eval()
    patches = read_patch_file(write_h5(tmp_path / "slide.h5", slide_file, COORDS, 30, 10))
    one, _ = encode_patches(patches, global_ae, local_ae, batch_size=batch_size, num_workers=0, threads=1)
    torch.set_num_threads(2)
    many, _ = encode_patches(patches, global_ae, local_ae, batch_size=batch_size, num_workers=0, threads=threads)
    assert torch.get_num_threads() == 2
    np.testing.assert_allclose(many.features, one.features, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(many.local_features, one.local_features)
    tiles = reference_tiles(slide_file, COORDS, 30, 0)  # and both are the encoder's own features, row by row
    with torch.no_grad():
        np.testing.assert_allclose(many.features, global_ae.encode(tiles_to_input(tiles, 16)).numpy(), rtol=1e-5, atol=1e-5)
