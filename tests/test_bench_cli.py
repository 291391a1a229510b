"""``isg bench`` on synthetic slides: every contender measured on the same tiles, JSON + table, bad slides reported."""

from __future__ import annotations

import json

import numpy as np
import pytest

from isg.cli import main
from isg.pipeline.bench import BenchOptions, bench_readers, sample_tissue_coords
from isg.pipeline.preprocess import preprocess_slide
from isg.io import PATCH_SIZE, open_slide, tile_grid

TILES = 12


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    assert main(["synth", "--out", str(root / "cohort"), "--slides", "2", "--size", "1536", "--genes", "3", "--seed", "3"]) == 0
    return sorted((root / "cohort" / "slides").glob("*.tif"))


def test_sample_is_spread_over_the_tissue_grid(slides):
    with open_slide(slides[0]) as slide:
        grid = tile_grid(slide, PATCH_SIZE)  # [N, 2]
        sample = sample_tissue_coords(slide, 5)
        everything = sample_tissue_coords(slide, 10_000)
    assert len(grid) > 5
    assert len(sample) == 5 and len(np.unique(sample, axis=0)) == 5
    assert {tuple(xy) for xy in sample} <= {tuple(xy) for xy in grid}
    assert np.array_equal(sample[0], grid[0]) and np.array_equal(sample[-1], grid[-1])  # first to last tissue tile
    np.testing.assert_array_equal(everything, grid)


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_scored_tiles_are_the_sampled_tiles(slides, batch_size):
    with open_slide(slides[1]) as slide:
        coords = sample_tissue_coords(slide, 11)
        expected = np.stack([slide.read_region(xy, 0, (PATCH_SIZE, PATCH_SIZE)) for xy in coords])  # [11, p, p, 3]
    options = BenchOptions(repeats=1, batch_size=batch_size, num_workers=2, readers=("tifffile", "openslide"))
    results, tiles = bench_readers(slides[1], coords, options, "cpu")
    np.testing.assert_array_equal(tiles.numpy(), expected)  # batch buffers are reused: tiles must be copies
    assert results["tifffile"]["tiles_per_s"] > 0 and results["tifffile"]["open_seconds"] >= 0
    assert results["tifffile"]["tiles_per_s_threads"] > 0 and results["tifffile"]["threads"] == 2
    assert results["ceiling"]["tiles_per_s"] > 0 and "libjpeg-turbo" in results["ceiling"]["decoder"]  # 256 px JPEG tiles
    assert results["tifffile"]["pct_of_ceiling"] == pytest.approx(
        100 * results["tifffile"]["tiles_per_s"] / results["ceiling"]["tiles_per_s"], abs=0.1)


def test_bench_measures_every_stage_side_by_side(slides, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", *map(str, slides), "--tiles", str(TILES), "--repeats", "1", "--readers", "tifffile,openslide,dali",
                 "--device", "cpu", "--out", str(out), "--quiet", "--page-cache", "dropped"])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["environment"]["device"] == "cpu" and "ext" in report["environment"]["backends"]
    assert report["options"]["page_cache"] == "dropped"
    assert [s["slide_id"] for s in report["slides"]] == [p.stem for p in slides]
    for path, entry in zip(slides, report["slides"]):
        assert entry["n_tiles"] == TILES and entry["tiles_per_pass"] == [TILES]  # one pass of every tile
        assert entry["readers"]["tifffile"]["tiles_per_s"] > 0
        assert entry["readers"]["dali"]["tiles_per_s"] is None and "CUDA" in entry["readers"]["dali"]["note"]  # never estimated
        openslide = entry["readers"]["openslide"]
        assert openslide["tiles_per_s"] is None or openslide["tiles_per_s"] > 0
        assert list(entry["shannon"]) == ["cpu"] and entry["shannon"]["cpu"]["gb_per_s"] > 0
        assert entry["shannon"]["cpu"]["kernel"] == "native"  # the test environment has isg._C
        pipeline = entry["pipeline"]
        assert set(pipeline["preprocess"]) >= {"open", "grid", "read", "score", "select", "write", "total"}
        stats = preprocess_slide(path, tmp_path / "direct", thumbnail=False)  # the same selection as isg preprocess
        assert (pipeline["n_tissue"], pipeline["n_kept"]) == (stats["n_tissue"], stats["n_kept"])
        assert "extract_patches_per_s" not in pipeline  # no --model
    table = capsys.readouterr().out
    assert "tifffile tiles/s" in table and "shannon cpu GB/s" in table and slides[0].stem in table
    assert "dali: needs nvidia-dali and a CUDA device" in table and "OS page cache dropped" in table
    assert f"{TILES} distinct tissue tiles per pass (asked {TILES})" in table


def test_bad_slide_is_reported_and_the_others_finish(slides, tmp_path, capsys):
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00" + b"\x00" * 64)  # a TIFF header and nothing else
    out = tmp_path / "bench.json"
    code = main(["bench", str(bad), str(slides[0]), "--tiles", "4", "--repeats", "1", "--readers", "tifffile",
                 "--out", str(out), "--quiet"])
    assert code == 1
    first, second = json.loads(out.read_text())["slides"]
    assert "broken.tif" in first["error"] and "readers" not in first
    assert second["readers"]["tifffile"]["tiles_per_s"] > 0
    assert "broken: error: " in capsys.readouterr().out


def test_bad_arguments_exit_2(slides, tmp_path, capsys):
    assert main(["bench", str(slides[0]), "--readers", "tifffile,nope", "--out", str(tmp_path / "b.json")]) == 2
    assert "nope" in capsys.readouterr().err
    assert main(["bench", str(slides[0]), "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "b.json")]) == 2
    assert not (tmp_path / "b.json").exists()


def test_bench_with_a_model_times_extract_and_predict(tmp_path, capsys):
    import torch

    from isg.data import load_expression, load_manifest
    from isg.features import Autoencoder, load_autoencoder, save_autoencoder
    from isg.pipeline.extract import extract_cohort
    from isg.pipeline.preprocess import preprocess_cohort
    from isg.train.expression import TrainConfig, cross_validate

    assert main(["synth", "--out", str(tmp_path / "cohort"), "--slides", "6", "--size", "1024", "--genes", "3", "--seed", "1"]) == 0
    slides = sorted((tmp_path / "cohort" / "slides").glob("*.tif"))
    preprocess_cohort(slides, tmp_path / "patches", patch_size=128, local_size=32, progress=False)
    torch.manual_seed(0)
    save_autoencoder(tmp_path / "global.pt", Autoencoder(resolution=32, d=16, channel_base=512, channel_max=32))
    extract_cohort(sorted((tmp_path / "patches").glob("*.h5")), load_autoencoder(tmp_path / "global.pt"), None, progress=False)
    cross_validate(load_manifest(tmp_path / "cohort" / "manifest.csv"), tmp_path / "patches",
                   load_expression(tmp_path / "cohort" / "expression.tsv"), tmp_path / "train",
                   TrainConfig(model="vit-s", epochs=1, n_splits=3, model_kwargs={"embed_dim": 32, "depth": 1, "num_heads": 2}))
    assert json.loads((tmp_path / "train" / "pipeline.json").read_text())["preprocess"]["patch_size"] == 128

    out = tmp_path / "bench.json"
    assert main(["bench", str(slides[0]), "--model", str(tmp_path / "train"), "--tiles", "4", "--repeats", "1",
                 "--readers", "tifffile", "--out", str(out), "--quiet"]) == 0
    pipeline = json.loads(out.read_text())["slides"][0]["pipeline"]
    stats = preprocess_slide(slides[0], tmp_path / "direct", patch_size=128, local_size=32, thumbnail=False)
    assert (pipeline["n_tissue"], pipeline["n_kept"]) == (stats["n_tissue"], stats["n_kept"])  # the model's patch size
    assert pipeline["extract_patches_per_s"] > 0 and pipeline["predict_patches_per_s"] > 0
    assert "extract p/s" in capsys.readouterr().out
