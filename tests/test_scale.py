"""One physical scale per cohort: read plans, on-the-fly resizing, the patch file's sizes, mixed 20x/40x cohorts,
TRIDENT-style readers, and thumbnails of single-level slides streamed in bounded memory."""

from __future__ import annotations

import logging
import tracemalloc

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from isg.io import MPP_TOLERANCE, TARGET_MPP, iter_tiles, open_slide, read_plan, resize_tiles
from isg.io.synth import pyramid, render_slide, write_pyramid_tiff
from isg.pipeline.preprocess import preprocess_cohort, preprocess_slide

P, Q = 64, 16
PARAMS = {"density": 0.6, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.6}


def _slide(path, um: float, mpp: float | None, seed: int = 0, downsample: int = 4, tile: int = 64):
    """A slide of ``um`` x (0.8 um) microns of the same synthetic tissue scanned at ``mpp`` um/px."""
    w, h = round(um / mpp), round(0.8 * um / mpp)
    image, _, _ = render_slide(np.random.default_rng(seed), w, h, PARAMS, mpp=mpp, artefacts=False)
    write_pyramid_tiff(path, pyramid(image, tile, downsample), mpp, tile=tile)
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A 40x (0.25 um/px, levels 0.25 / 1.0) and a 20x (0.5 um/px) slide, and a 0.3 um/px one (odd sizes)."""
    root = tmp_path_factory.mktemp("mixed")
    return {"40x": _slide(root / "a40x.tif", 450, 0.25, seed=1), "20x": _slide(root / "b20x.tif", 450, 0.5, seed=2),
            "odd": _slide(root / "c_odd.tif", 333, 0.3, seed=3)}


@pytest.mark.parametrize("mpp, patch, expected", [
    (0.5, 64, (0, 128)),  # 40x read at level 0, 2x the pixels, resized
    (1.0, 64, (1, 64)),  # level 1 is exactly 1 um/px: nothing resampled
    (2.0, 96, (1, 192)),  # coarser than every level: the coarsest, resized
    (0.25, 50, (0, 50)),
    (0.3, 37, (0, 44)),  # round(37 * 0.3 / 0.25)
    (0.2549, 101, (0, 101)),  # within 2 % of level 0 (0.25): read as is, not 103 px resized to 101
    (0.256, 101, (0, 103)),  # 2.4 % off: resampled
    (0.985, 64, (1, 64)),  # level 1 (1.0) is 1.5 % coarser: the level for 0.985 um/px, read as is (one tolerance)
    (0.97, 64, (0, 248)),  # 3 % coarser: not that level; level 0, round(64 * 0.97 / 0.25) px resized
    (None, 64, (0, 64)),  # no target: p px at level 0
])
def test_read_plan_picks_the_best_level_and_the_pixels_to_read(mixed, mpp, patch, expected):
    with open_slide(mixed["40x"]) as slide:
        assert read_plan(slide, patch, mpp) == expected
        assert read_plan(slide, patch, None, level=1) == (1, patch)  # a level: no resampling
        if mpp is not None:  # the level picked and "read as is" agree on one tolerance
            assert (slide.level_mpp(expected[0]) <= mpp * (1 + MPP_TOLERANCE)) or expected[0] == 0


@pytest.mark.parametrize("n, size, out", [(3, 20, 10), (2, 17, 7), (1, 9, 9), (4, 5, 11)])
def test_resize_tiles_is_antialiased_bilinear_in_uint8(n, size, out):
    rng = np.random.default_rng(size)
    tiles = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    got = resize_tiles(tiles, out)
    assert got.dtype == torch.uint8 and got.shape == (n, out, out, 3) and got.is_contiguous()
    for i in range(n):  # Pillow's bilinear filter (antialiased when shrinking), which torch's follows
        ref = np.asarray(Image.fromarray(tiles[i].numpy()).resize((out, out), Image.Resampling.BILINEAR)).astype(int)
        assert np.abs(got[i].numpy().astype(int) - ref).max() <= 1


def test_mixed_20x_40x_cohort_gets_one_physical_patch_size(mixed, tmp_path, caplog):
    slides = list(mixed.values())
    with caplog.at_level(logging.WARNING, logger="isg"):
        summary = preprocess_cohort(slides, tmp_path / "target", patch_size=P, local_size=Q, progress=False)
    assert summary.ok and "physical scales" not in caplog.text
    um = {}
    for name, slide in mixed.items():
        with h5py.File(tmp_path / "target" / f"{slide.stem}.h5") as f:
            a = f["coords"].attrs
            level0_mpp = f.attrs["level0_mpp"]
            assert a["patch_size"] == P and a["mpp"] == pytest.approx(TARGET_MPP, rel=0.01)
            assert a["target_magnification"] == pytest.approx(20, rel=0.01)
            assert a["level0_magnification"] == pytest.approx(10 / level0_mpp, rel=0.01)
            um[name] = a["patch_size_level0"] * level0_mpp  # microns per patch side
    assert um["40x"] == um["20x"] == P * TARGET_MPP and um["odd"] == pytest.approx(P * TARGET_MPP, rel=0.01)

    # without a target (a level), the same cohort mixes 32 and 64 um patches: said so, naming both scales
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="isg"):
        preprocess_cohort(slides[:2], tmp_path / "level", patch_size=P, local_size=Q, level=0, progress=False)
    assert "2 physical scales" in caplog.text and "0.25 um/px: a40x" in caplog.text and "0.5 um/px: b20x" in caplog.text


def test_a_trident_style_reader_gets_the_pixels_isg_used(mixed, tmp_path):
    slide_path = mixed["40x"]
    preprocess_slide(slide_path, tmp_path, patch_size=P, local_size=Q, thumbnail=False)
    with h5py.File(tmp_path / f"{slide_path.stem}.h5") as f:
        coords = f["all_coords"][:12]
        size, size0 = int(f["coords"].attrs["patch_size"]), int(f["coords"].attrs["patch_size_level0"])
        level, read_size = int(f["coords"].attrs["patch_level"]), int(f["coords"].attrs["patch_size_level"])
    with open_slide(slide_path) as slide:
        used = torch.cat([t for _, t in iter_tiles(slide, coords, read_size, level=level, batch_size=5, num_workers=0,
                                                   out_size=size)]).numpy().astype(int)  # what isg scored and encodes
        for (x, y), tile in zip(coords, used):  # TRIDENT: patch_size_level0 px at level 0, resized to patch_size
            region = slide.read_region((int(x), int(y)), 0, (size0, size0))
            ref = np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BILINEAR)).astype(int)
            assert np.abs(tile - ref).max() <= 1


@pytest.mark.parametrize("kind", ["global", "local"])
def test_the_training_stream_reads_the_resized_patches(mixed, tmp_path, kind):
    from isg.features.patches import split_local
    from isg.train.patch_stream import PatchStream, resized_tiles

    slide_path = mixed["40x"]  # read 128 px at level 0, resized to 64
    preprocess_slide(slide_path, tmp_path, patch_size=P, local_size=Q, thumbnail=False)
    stream = PatchStream([tmp_path / f"{slide_path.stem}.h5"], kind, 8, seed=1, patches_per_slide=3, num_workers=0)
    _, order = next(stream._windows_from(0))
    batch = next(stream.batches(5))  # uint8 [5, 8, 8, 3]
    coords = stream.slides[0].coords
    with open_slide(slide_path) as slide:
        for row, (_, patch, sub) in enumerate(order[:5]):
            (_, tile), = iter_tiles(slide, coords[patch:patch + 1], 2 * P, num_workers=0, out_size=P)  # [1, P, P, 3]
            if kind == "local":
                tile = split_local(tile, Q).reshape(-1, Q, Q, 3)[sub:sub + 1]
            torch.testing.assert_close(batch[row], resized_tiles(tile, 8)[0], rtol=0, atol=1)


def test_slides_without_mpp_keep_working_at_level_0(tmp_path, caplog):
    image, _, _ = render_slide(np.random.default_rng(4), 300, 260, PARAMS, mpp=0.5, artefacts=False)
    Image.fromarray(image).save(tmp_path / "plain.png")
    with caplog.at_level(logging.WARNING, logger="isg"):
        stats = preprocess_slide(tmp_path / "plain.png", tmp_path / "out", patch_size=P, local_size=Q, thumbnail=False)
    assert "no mpp in the metadata" in caplog.text and stats["level"] == 0 and stats["read_size"] == P
    assert np.isnan(stats["mpp"])
    given = preprocess_slide(tmp_path / "plain.png", tmp_path / "given", patch_size=P, local_size=Q, slide_mpp=0.25,
                             thumbnail=False)  # --slide-mpp: resized to the target like any slide
    assert given["read_size"] == 2 * P and given["mpp"] == pytest.approx(TARGET_MPP)


@pytest.fixture(scope="module")
def single_level(tmp_path_factory):
    """A single-level (no pyramid) tiled TIFF, 2531 x 1777 px (odd), mostly background, with one damaged tile."""
    import tifffile

    path = tmp_path_factory.mktemp("flat") / "flat.tif"
    image = np.full((1777, 2531, 3), 242, np.uint8)
    tissue, _, _ = render_slide(np.random.default_rng(5), 900, 700, PARAMS, mpp=0.5, artefacts=False)
    image[400:1100, 1200:2100] = tissue
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", compression="jpeg", resolution=(2e4, 2e4),
                     resolutionunit="CENTIMETER")
    return path


@pytest.mark.parametrize("max_size", [2048, 700, 301, 64])
def test_streamed_thumbnail_equals_the_direct_one_in_bounded_memory(single_level, monkeypatch, max_size):
    import isg.io.slide

    with open_slide(single_level) as slide:
        assert slide.level_count == 1
        level_bytes = slide.dimensions[0] * slide.dimensions[1] * 3
        tracemalloc.start()
        direct, direct_damaged = slide.thumbnail(max_size, with_damage=True)
        direct_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        monkeypatch.setattr(isg.io.slide, "THUMBNAIL_DIRECT_BYTES", 1 << 20)  # stream every level over 1 MiB
        monkeypatch.setattr(type(slide), "_boxed_level", _small_blocks(type(slide)._boxed_level))
        tracemalloc.start()
        streamed, streamed_damaged = slide.thumbnail(max_size, with_damage=True)
        streamed_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert streamed.shape == direct.shape and streamed.dtype == np.uint8
    diff = np.abs(streamed.astype(int) - direct.astype(int))  # the same filter on the same pixels; Pillow's box
    print(f"streamed vs direct: mean {diff.mean():.4f}, > 1 level {np.mean(diff > 1):.4%}, max {diff.max()}")
    assert diff.mean() < 0.1 and np.mean(diff > 1) < 0.005  # windows differ by float rounding on rare rows
    assert direct_peak >= level_bytes  # the direct route holds the whole level
    assert streamed_peak < level_bytes / 4 + 4 * streamed.nbytes  # a block and the thumbnail, never the level
    assert not direct_damaged.any() and not streamed_damaged.any()


def _small_blocks(boxed):
    def small(self, level, tw, th, block=2048):
        return boxed(self, level, tw, th, block=300)  # several blocks, edges that do not fall on output pixels
    return small
