"""isg.io: slide backends (same pixels as the TIFF pages), mpp parsing, bad inputs, tissue grid,
tile streaming (exactly read_region's pixels) and two-level tiling."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from isg.io import (DamagedSlideError, DamagedTileError, DamagedTiles, SlideError, iter_tiles, local_grid,
                    mpp_from_description, mpp_from_resolution, open_slide, tile_grid, tissue_mask)
from isg.io.synth import make_bad_slides, pyramid, render_slide, write_pyramid_tiff
from real_slides import DAMAGES, DATA, aperio_ihc_svs, damage, damage_tiff, ihc_image, segment

PARAMS = {"density": 0.7, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.45}


def _has(module: str) -> bool:
    if importlib.util.find_spec(module) is None:
        return False
    try:
        if module == "cucim":
            from isg.io import backend_available

            return backend_available("cucim")
        importlib.import_module(module)
        return True
    except Exception:
        return False


TIFF_BACKENDS = [b for b, module in (("tifffile", "tifffile"), ("openslide", "openslide"), ("cucim", "cucim")) if _has(module)]


@pytest.fixture(scope="module")
def slide_file(tmp_path_factory):
    """A 1000 x 776 px slide (partial edge tiles), 128 px JPEG tiles, levels 1000, 500, 250 px wide, mpp 0.5."""
    image, _, _ = render_slide(np.random.default_rng(1), 1000, 776, PARAMS, mpp=0.5)
    path = tmp_path_factory.mktemp("io") / "odd.tif"
    write_pyramid_tiff(path, pyramid(image, 128, 2), 0.5, tile=128)
    return path


@pytest.fixture(scope="module")
def pages(slide_file):
    with tifffile.TiffFile(slide_file) as tif:
        return [page.asarray() for page in tif.pages]


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return make_bad_slides(tmp_path_factory.mktemp("bad"))


# ----------------------------------------------------------------------------- backends


@pytest.mark.parametrize("backend", TIFF_BACKENDS + ["auto"])
def test_backend_reads_the_tiff_pages(slide_file, pages, backend):
    with open_slide(slide_file, backend=backend) as slide:
        assert slide.dimensions == (1000, 776)
        assert slide.level_dimensions == [(1000, 776), (500, 388), (250, 194)]
        assert slide.level_downsamples == pytest.approx([1.0, 2.0, 4.0], rel=0.01)
        assert slide.mpp == pytest.approx(0.5)
        assert slide.level_count == 3
        for level, page in enumerate(pages):
            factor = slide.level_downsamples[level]
            h, w = page.shape[:2]
            for x, y, rw, rh in ((0, 0, w, h), (37, 11, 129, 97), (w - 50, h - 30, 101, 77), (-13, -7, 40, 33)):
                region = slide.read_region((round(x * factor), round(y * factor)), level, (rw, rh))
                assert region.shape == (rh, rw, 3) and region.dtype == np.uint8
                expected = np.full((rh, rw, 3), 255, np.uint8)  # white past the border
                x0, y0 = max(x, 0), max(y, 0)
                x1, y1 = min(x + rw, w), min(y + rh, h)
                expected[y0 - y:y1 - y, x0 - x:x1 - x] = page[y0:y1, x0:x1]
                np.testing.assert_array_equal(region, expected, err_msg=f"{backend} level {level} region {(x, y, rw, rh)}")


@pytest.mark.parametrize("backend", [b for b in TIFF_BACKENDS if b != "openslide"])
def test_inexact_downsample_round_trips(tmp_path, backend):
    """Odd sizes give non-integer downsamples (777 / 388): level coordinates still map back exactly.
    (OpenSlide places such regions at fractional level coordinates, so it is left out here.)"""
    image, _, _ = render_slide(np.random.default_rng(2), 1001, 777, PARAMS, mpp=0.5)
    path = tmp_path / "odd.tif"
    write_pyramid_tiff(path, pyramid(image, 128, 2), 0.5, tile=128)
    with tifffile.TiffFile(path) as tif:
        level1 = tif.pages[1].asarray()
    with open_slide(path, backend=backend) as slide:
        assert slide.level_dimensions[1] == (500, 388)
        for gx, gy in ((0, 0), (450, 358), (129, 255), (499, 387)):
            location = (round(gx * slide.level_downsamples[1]), round(gy * slide.level_downsamples[1]))
            assert slide.to_level(location, 1) == (gx, gy)
            region = slide.read_region(location, 1, (1, 1))
            np.testing.assert_array_equal(region[0, 0], level1[gy, gx])


def test_auto_picks_tifffile_for_tiff_and_svs(slide_file, tmp_path):
    with open_slide(slide_file) as slide:
        assert slide.backend == "tifffile"  # the fastest streaming reader for generic TIFF
    svs = tmp_path / "same.svs"
    svs.write_bytes(slide_file.read_bytes())
    with open_slide(svs) as slide:  # and for SVS: 2.6x cuCIM on a real Aperio file (issue 10, docs/io.md)
        assert slide.backend == "tifffile"


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_thumbnail_and_levels_for_mpp(slide_file, pages, backend):
    with open_slide(slide_file, backend=backend) as slide:
        thumb = slide.thumbnail(250)
        assert thumb.shape == (194, 250, 3)
        np.testing.assert_array_equal(thumb, pages[2])  # exactly the coarsest level
        assert slide.thumbnail(100).shape == (78, 100, 3)
        assert slide.thumbnail(4000).shape == (776, 1000, 3)  # never upscaled
        assert slide.best_level_for_mpp(0.5) == 0
        assert slide.best_level_for_mpp(1.0) == 1
        assert slide.best_level_for_mpp(1.9) == 1
        assert slide.best_level_for_mpp(2.0) == 2
        assert slide.best_level_for_mpp(0.25) == 0
        assert slide.level_mpp(2) == pytest.approx(2.0, rel=0.01)
        with pytest.raises(ValueError, match="level 3 out of range"):
            slide.read_region((0, 0), 3, (10, 10))


def test_image_backend(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (71, 93, 3), dtype=np.uint8)
    with_dpi, without = tmp_path / "a.png", tmp_path / "b.png"
    Image.fromarray(pixels).save(with_dpi, dpi=(50800, 50800))  # 0.5 um/px
    Image.fromarray(pixels).save(without)
    with open_slide(with_dpi) as slide:
        assert slide.backend == "image" and slide.dimensions == (93, 71) and slide.level_count == 1
        assert slide.mpp == pytest.approx(0.5, rel=1e-3)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (93, 71)), pixels)
        region = slide.read_region((90, 70), 0, (5, 3))
        np.testing.assert_array_equal(region[:1, :3], pixels[70:, 90:])
        assert (region[1:] == 255).all() and (region[:, 3:] == 255).all()
    with open_slide(without) as slide:  # read by pixel level, a plain image needs no mpp (issue 10 section 4)
        assert slide.mpp is None and slide.level_mpp(0) is None
        with pytest.raises(SlideError, match=r"b\.png.*mpp"):  # but reading at a resolution does
            slide.best_level_for_mpp(0.5)
    assert open_slide(without, mpp=0.25).mpp == 0.25
    Image.fromarray(pixels).save(tmp_path / "screen.png", dpi=(72, 72))  # a screen default, not a calibration
    with open_slide(tmp_path / "screen.png") as slide, pytest.raises(SlideError, match="mpp"):
        slide.best_level_for_mpp(0.5)


# ----------------------------------------------------------------------------- metadata


@pytest.mark.parametrize("description, expected", [
    ("Aperio Image Library v12.0.15\r\n46000x32914 [0,100 46000x32814] (256x256) JPEG/RGB Q=70|AppMag = 20|MPP = 0.4990|Filename = x", 0.499),
    ("isg-synth|MPP = 0.25", 0.25),
    ("MPP=1e-1", 0.1),
    ("no calibration here", None),
    ("", None),
    (None, None),
])
def test_mpp_from_description(description, expected):
    assert mpp_from_description(description) == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize("resolution, unit, expected", [
    ((20000, 1), 3, 0.5),           # pixels per cm
    ((50800, 1), 2, 0.5),           # pixels per inch
    (40000.0, 3, 0.25),
    ((20000, 1), 1, None),          # RESUNIT_NONE: no physical size
    ((0, 1), 3, None),
    (None, 3, None),
])
def test_mpp_from_resolution(resolution, unit, expected):
    assert mpp_from_resolution(resolution, unit) == (pytest.approx(expected) if expected else None)


@pytest.mark.parametrize("description, resolution, expected", [
    ("calibrated|MPP = 0.25", None, 0.25),          # description only
    (None, (1e4 / 0.3, 1e4 / 0.3), 0.3),            # resolution tags only
    ("calibrated|MPP = 0.25", (20000, 20000), 0.25),  # the Aperio value wins
])
@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_mpp_sources(tmp_path, description, resolution, expected, backend):
    path = tmp_path / "m.tif"
    image = np.full((256, 256, 3), 200, np.uint8)
    kwargs = {"resolution": resolution, "resolutionunit": "CENTIMETER"} if resolution else {}
    tifffile.imwrite(path, image, tile=(128, 128), photometric="rgb", compression="jpeg", description=description,
                     metadata=None, **kwargs)
    with open_slide(path, backend=backend) as slide:
        assert slide.mpp == pytest.approx(expected, rel=1e-4)
    with open_slide(path, backend=backend, mpp=0.123) as slide:
        assert slide.mpp == 0.123  # override


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case, problem", [
    ("corrupt", "corrupt"), ("truncated", "truncated"), ("unsupported", "unsupported"), ("tiny", "too small"),
    ("no_mpp", "mpp"), ("missing", "not found"),
])
@pytest.mark.parametrize("backend", ["auto", "tifffile"])
def test_bad_inputs_raise_slide_error(bad, case, problem, backend):
    path = bad.get(case, bad["good"].with_name("missing.tif"))
    if backend == "tifffile" and case == "unsupported":
        problem = "not a TIFF"
    with pytest.raises(SlideError) as info:
        open_slide(path, backend=backend)
    assert str(path) in str(info.value) and problem in str(info.value)
    assert info.value.path == str(path)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("backend", [b for b in TIFF_BACKENDS if b != "tifffile"])
@pytest.mark.parametrize("case", ["corrupt", "truncated", "unsupported", "tiny", "no_mpp"])
def test_bad_inputs_other_backends(bad, case, backend):
    with pytest.raises(SlideError, match=str(bad[case]).replace(".", r"\.")):
        open_slide(bad[case], backend=backend)


def test_no_mpp_override_and_bad_arguments(bad):
    with open_slide(bad["no_mpp"], mpp=0.5) as slide:
        assert slide.mpp == 0.5 and slide.level_count == 3
    with pytest.raises(SlideError, match="mpp= must be a positive number"):
        open_slide(bad["good"], mpp=-1)
    with pytest.raises(ValueError, match="unknown slide backend 'pillow'"):
        open_slide(bad["good"], backend="pillow")
    with pytest.raises(SlideError, match="not a file"):
        open_slide(bad["good"].parent)


# ----------------------------------------------------------------------------- tissue and grid


def _nonwhite_fraction(tile: np.ndarray) -> float:
    rgb = tile.astype(np.int16)
    return float(((rgb.max(-1) - rgb.min(-1)) > 25).mean())


def test_tile_grid_skips_background(slide_file):
    with open_slide(slide_file, backend="tifffile") as slide:
        full = tile_grid(slide, 64, tissue_min=0)
        assert len(full) == 16 * 13  # ceil(1000 / 64) x ceil(776 / 64), row-major
        assert (full[:16, 1] == 0).all() and (np.diff(full[:16, 0]) == 64).all()
        kept = tile_grid(slide, 64, tissue_min=0.05)
        kept_set = {tuple(c) for c in kept.tolist()}
        assert 0 < len(kept) < len(full)
        for x, y in full.tolist():
            fraction = _nonwhite_fraction(slide.read_region((x, y), 0, (64, 64)))
            if fraction == 0:
                assert (x, y) not in kept_set, f"background tile {(x, y)} kept"
            if fraction > 0.5:
                assert (x, y) in kept_set, f"tissue tile {(x, y)} ({fraction:.0%}) dropped"
        # level 1: coordinates stay level 0 and step by patch * downsample
        level1 = tile_grid(slide, 64, level=1, tissue_min=0)
        assert len(level1) == 8 * 7 and level1[1, 0] == 128
        assert np.array_equal(tile_grid(slide, 64, mpp=1.0, tissue_min=0), level1)
        mask = tissue_mask(slide)
        assert mask.dtype == bool and 0.1 < mask.mean() < 0.9


def test_tile_grid_blank_slide(tmp_path):
    path = tmp_path / "blank.tif"
    write_pyramid_tiff(path, [np.full((300, 300, 3), 245, np.uint8)], 0.5, tile=128)
    with open_slide(path, backend="tifffile") as slide:
        assert not tissue_mask(slide).any()
        assert len(tile_grid(slide, 100)) == 0
        assert len(tile_grid(slide, 100, tissue_min=0)) == 9


def test_tile_grid_explicit_mask(slide_file):
    with open_slide(slide_file, backend="tifffile") as slide:
        mask = np.zeros((100, 100), bool)
        mask[:, :50] = True  # left half of the slide
        coords = tile_grid(slide, 100, mask=mask, tissue_min=0.5)
        assert len(coords) and (coords[:, 0] + 100 <= 500 + 1).all()


# ----------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("backend", TIFF_BACKENDS)
@pytest.mark.parametrize("size, level, batch_size, num_workers", [(128, 0, 5, 0), (97, 0, 4, 2), (61, 1, 7, 3), (128, 0, 3, 1)])
def test_iter_tiles_matches_read_region(slide_file, backend, size, level, batch_size, num_workers):
    with open_slide(slide_file, backend=backend) as slide:
        coords = tile_grid(slide, size, level=level, tissue_min=0)
        coords = np.concatenate([coords, [[990, 770], [-20, 5]]])  # tiles past the border: padded white
        seen, batches = [], []
        for batch_coords, tiles in iter_tiles(slide, coords, size, level=level, batch_size=batch_size, num_workers=num_workers):
            assert isinstance(tiles, torch.Tensor) and tiles.dtype == torch.uint8
            assert tiles.shape == (len(batch_coords), size, size, 3) and len(batch_coords) <= batch_size
            seen.append(batch_coords)
            batches.append(tiles)  # kept: buffers in use must not be recycled
        assert np.array_equal(np.concatenate(seen), coords)
        assert len(batches[-1]) == (len(coords) % batch_size or batch_size)  # last partial batch
        tiles = torch.cat(batches).numpy()
        for i in range(0, len(coords), 3):
            x, y = coords[i]
            np.testing.assert_array_equal(tiles[i], slide.read_region((int(x), int(y)), level, (size, size)), err_msg=f"tile {i}")
        ds = 2 ** level
        assert (tiles[-1][:, :20 // ds] == 255).all() and (tiles[-2][8 // ds:] == 255).all()  # left of / below the slide


def test_iter_tiles_recycles_only_dropped_buffers(slide_file):
    with open_slide(slide_file, backend="tifffile") as slide:
        coords = tile_grid(slide, 64, tissue_min=0)
        reference = [slide.read_region((int(x), int(y)), 0, (64, 64)) for x, y in coords]
        for keep in (True, False):
            kept, checked, pointers = [], 0, []
            for batch_coords, tiles in iter_tiles(slide, coords, 64, batch_size=8, num_workers=2, prefetch=1):
                pointers.append(tiles.data_ptr())
                for j in range(len(tiles)):
                    np.testing.assert_array_equal(tiles[j].numpy(), reference[checked + j])
                if keep:
                    kept.append(tiles[:2])  # a view keeps its buffer alive
                checked += len(tiles)
                del tiles  # reference counting frees the batch: its buffer may be reused
            assert checked == len(coords)
            assert (len(set(pointers)) == len(pointers)) if keep else (len(set(pointers)) <= 4)  # recycled when dropped
            for i, view in enumerate(kept):
                np.testing.assert_array_equal(view.numpy(), np.stack(reference[8 * i:8 * i + 2]))


def test_batch_buffers_are_laid_out_off_32_byte_alignment(slide_file):
    from isg.io.tiles import BUFFER_OFFSET, release_buffers

    with open_slide(slide_file, backend="tifffile") as slide:
        coords = tile_grid(slide, 128, tissue_min=0)[:6]
        for _, tiles in iter_tiles(slide, coords, 128, batch_size=4, num_workers=0):
            assert tiles.is_contiguous() and all(t.data_ptr() % 64 == BUFFER_OFFSET for t in tiles)
    release_buffers()


def test_tifffile_segment_cache_is_bounded_and_exact(slide_file, pages):
    with open_slide(slide_file, backend="tifffile") as slide:
        slide.cache_bytes = 3 * 128 * 128 * 3  # three decoded tiles
        for x, y in tile_grid(slide, 100, tissue_min=0).tolist():  # 100 px tiles straddle the 128 px file tiles
            region = slide.read_region((x, y), 0, (100, 100))
            h, w = min(100, 776 - y), min(100, 1000 - x)
            np.testing.assert_array_equal(region[:h, :w], pages[0][y:y + h, x:x + w])
            assert slide._cached <= slide.cache_bytes and len(slide._cache) <= 3


def test_iter_tiles_early_stop_and_errors(slide_file):
    with open_slide(slide_file, backend="tifffile") as slide:
        coords = tile_grid(slide, 64, tissue_min=0)
        stream = iter_tiles(slide, coords, 64, batch_size=4, num_workers=2)
        next(stream)
        stream.close()  # cancels the prefetched batches without hanging
        assert list(iter_tiles(slide, np.zeros((0, 2), np.int64), 64)) == []
        with pytest.raises(ValueError, match=r"coords must be \[N, 2\]"):
            next(iter_tiles(slide, np.zeros((3, 3)), 64))
        with pytest.raises(ValueError, match="whole pixels"):
            next(iter_tiles(slide, np.array([[0.5, 1.0]]), 64))
        with pytest.raises(ValueError, match="level 5 out of range"):
            next(iter_tiles(slide, coords, 64, level=5))


# ----------------------------------------------------------------------------- two-level tiling


def test_local_grid_matches_split_of_global_tiles(slide_file):
    p, q = 96, 32
    with open_slide(slide_file, backend="tifffile") as slide:
        coords = np.array([[0, 0], [320, 160], [900, 700]])  # the last one crosses the border
        grid = local_grid(coords, p, q)
        assert grid.shape == (3, 3, 3, 2) and grid.dtype == np.int64
        assert grid[1, 2, 1].tolist() == [320 + 32, 160 + 64]  # [n, row, col] -> (x + col q, y + row q)
        for n, (x, y) in enumerate(coords):
            tile = slide.read_region((int(x), int(y)), 0, (p, p))
            blocks = tile.reshape(3, q, 3, q, 3).transpose(0, 2, 1, 3, 4)  # [S, S, q, q, 3]
            for i in range(3):
                for j in range(3):
                    local = slide.read_region(tuple(int(v) for v in grid[n, i, j]), 0, (q, q))
                    np.testing.assert_array_equal(local, blocks[i, j])
    level1 = local_grid([[0, 0]], 64, 16, downsample=2.0)
    assert level1[0, 1, 3].tolist() == [96, 32]
    for q_bad in (0, 36, 100):
        with pytest.raises(ValueError, match="divisor"):
            local_grid(coords, 96, q_bad)


# ----------------------------------------------------------------------------- DALI


@pytest.mark.skipif(not _has("nvidia.dali"), reason="NVIDIA DALI not installed")
@pytest.mark.parametrize("level, batch_size", [(0, 5), (1, 64)])
def test_dali_tiles_match_read_region(slide_file, level, batch_size):
    from isg.io.dali import dali_available, iter_tiles_dali

    assert dali_available()
    with open_slide(slide_file, backend="tifffile") as slide:
        coords = tile_grid(slide, 128, level=level, tissue_min=0)  # on the tile grid, edge tiles included
        seen, tiles = [], []
        for batch_coords, batch in iter_tiles_dali(slide, coords, 128, level=level, batch_size=batch_size):
            assert batch.dtype == torch.uint8 and batch.shape[1:] == (128, 128, 3) and len(batch) <= batch_size
            seen.append(batch_coords)
            tiles.append(batch)
        assert np.array_equal(np.concatenate(seen), coords)
        tiles = torch.cat(tiles).numpy()
        for i, (x, y) in enumerate(coords.tolist()):
            np.testing.assert_array_equal(tiles[i], slide.read_region((x, y), level, (128, 128)), err_msg=f"tile {i}")
        with pytest.raises(ValueError, match="tile grid"):
            next(iter_tiles_dali(slide, np.array([[5, 0]]), 128))
        with pytest.raises(ValueError, match="size must be the tile size"):
            next(iter_tiles_dali(slide, coords[:1], 100))


def test_dali_missing_is_reported(monkeypatch):
    import isg.io.dali as dali

    monkeypatch.setattr(dali.importlib.util, "find_spec", lambda name: None)
    assert dali.dali_available() is False


def test_auto_falls_back_when_cucim_cannot_decode(tmp_path):
    image = np.full((300, 400, 3), 200, np.uint8)
    image[100:200, 100:200] = (150, 50, 120)
    path = tmp_path / "zlib.svs"  # stripped deflate TIFF: cuCIM opens it but cannot decode it
    tifffile.imwrite(path, image, photometric="rgb", compression="zlib", resolution=(20000, 20000),
                     resolutionunit="CENTIMETER", metadata=None)
    with open_slide(path) as slide:
        assert slide.backend == "tifffile"
        np.testing.assert_array_equal(slide.read_region((50, 50), 0, (200, 100)), image[50:150, 50:250])


def test_corrupt_tile_data_raises_slide_error(slide_file, tmp_path):
    path = tmp_path / "bad_tile.tif"
    data = bytearray(slide_file.read_bytes())
    with tifffile.TiffFile(slide_file) as tif:
        offset = tif.pages[0].dataoffsets[5]
    data[offset:offset + 16] = bytes(16)  # no JPEG SOI marker any more
    path.write_bytes(bytes(data))
    with open_slide(path, backend="tifffile") as slide:
        slide.read_region((0, 0), 0, (128, 128))  # other tiles still read
        with pytest.raises(SlideError, match=r"bad_tile\.tif: corrupt tile 5 of level 0"):
            slide.read_region((5 * 128, 0), 0, (128, 128))


# ----------------------------------------------------------------------------- damaged tiles (issue 10)


@pytest.fixture(scope="module")
def ihc_svs(tmp_path_factory):
    return aperio_ihc_svs(tmp_path_factory.mktemp("ihc") / "ihc.svs")


def _no_decoder_output(capfd):
    out, err = capfd.readouterr()
    for text in (out, err):
        assert "JPEG" not in text and "ERROR" not in text and "TIFF" not in text, text


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_damaged_tile_of_an_aperio_svs_is_a_failure_not_pixels(ihc_svs, tmp_path, capfd, backend, kind):
    last = 47  # the last tile of level 0 (bottom right)
    bad = damage_tiff(ihc_svs, tmp_path / f"{kind}.svs", kind, 0, last)
    xy = (896, 640)
    grid = np.stack(np.meshgrid(np.arange(0, 1024, 128), np.arange(0, 768, 128)), -1).reshape(-1, 2)  # [48, 2] row-major
    with open_slide(ihc_svs, backend=backend) as good, open_slide(bad, backend=backend) as slide:  # 1 of 48 tiles
        with pytest.raises(DamagedTileError, match=rf"{kind}\.svs: corrupt tile {last} of level 0"):
            slide.read_region(xy, 0, (128, 128))
        with pytest.raises(DamagedTileError, match=rf"{kind}\.svs"):  # no log: the stream stops at it
            list(iter_tiles(slide, grid, 128, batch_size=16, num_workers=2))
        log = DamagedTiles()
        coords, tiles = zip(*iter_tiles(slide, grid, 128, batch_size=16, num_workers=2, damaged=log))
        coords, tiles = np.concatenate(coords), torch.cat(tiles).numpy()
        np.testing.assert_array_equal(log.coords, [xy])
        np.testing.assert_array_equal(coords, grid[:last])
        expected = np.stack([good.read_region(tuple(c), 0, (128, 128)) for c in grid[:last]])
        np.testing.assert_array_equal(tiles, expected)
        assert slide.thumbnail(256).shape == (192, 256, 3)  # overviews paint damaged tiles white
    _no_decoder_output(capfd)


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("backend", TIFF_BACKENDS)
def test_damaged_real_aperio_file(tmp_path, monkeypatch, capfd, backend, kind):
    """The real Aperio SVS (16 px, one JPEG tile with shared JPEGTables) of openslide-python's tests."""
    monkeypatch.setattr("isg.io.slide.MIN_SLIDE_SIZE", 8)
    source = DATA / "small.svs"
    with open_slide(source, backend=backend) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.dimensions == (16, 16)
        pixels = slide.read_region((0, 0), 0, (16, 16))
    with open_slide(source, backend="openslide") as reference:
        np.testing.assert_array_equal(pixels, reference.read_region((0, 0), 0, (16, 16)))
    bad = damage_tiff(source, tmp_path / "small.svs", kind, 0, 0)
    if kind == "truncated":
        with pytest.raises(DamagedSlideError, match=r"small\.svs: truncated or damaged: 1 of 1 tiles of level 0"):
            open_slide(bad, backend=backend)
        cut = damage(source, tmp_path / "cut.svs", kind, *segment(source, 0, 0))  # cut before its directory
        with pytest.raises(SlideError, match=r"cut\.svs: corrupt or truncated"):
            open_slide(cut, backend=backend)
        if backend == "openslide":  # OpenSlide hashes the smallest level's tiles when it opens an SVS
            with pytest.raises(SlideError, match=r"small\.svs: OpenSlide cannot open it .*Short read"):
                open_slide(bad, backend=backend, max_damaged=1.0)
            return
    with open_slide(bad, backend=backend, max_damaged=1.0) as slide:
        with pytest.raises(DamagedTileError, match=r"small\.svs: corrupt tile 0 of level 0"):
            slide.read_region((0, 0), 0, (16, 16))
        log = DamagedTiles()
        assert list(iter_tiles(slide, np.array([[0, 0]]), 16, damaged=log)) == [] or len(log) == 1
        assert len(log) == 1
    _no_decoder_output(capfd)


@pytest.mark.parametrize("kind", DAMAGES)
@pytest.mark.parametrize("backend", [b for b in TIFF_BACKENDS if b != "cucim"])  # cuCIM does not decode deflate
def test_damaged_real_deflate_tiff(tmp_path, capfd, backend, kind):
    """openslide-python's boxes.tiff (300 x 250, deflate tiles of 64 px); boxes.png holds its pixels."""
    expected = np.asarray(Image.open(DATA / "boxes.png").convert("RGB"))
    tile = 7  # row 1, column 2: (128, 64)
    bad = damage_tiff(DATA / "boxes.tiff", tmp_path / "boxes.tiff", kind, 0, tile)
    xy = (64 * (tile % 5), 64 * (tile // 5))
    with open_slide(bad, backend=backend, mpp=0.25, max_damaged=1.0) as slide:
        with pytest.raises(DamagedTileError, match=rf"boxes\.tiff: corrupt tile {tile} of level 0"):
            slide.read_region(xy, 0, (64, 64))
        grid = tile_grid(slide, 64, tissue_min=0)
        log = DamagedTiles()
        for coords, tiles in iter_tiles(slide, grid, 64, batch_size=7, num_workers=2, damaged=log):
            for (x, y), pixels in zip(coords.tolist(), tiles.numpy()):
                reference = np.full((64, 64, 3), 255, np.uint8)
                part = expected[y:y + 64, x:x + 64]
                reference[:part.shape[0], :part.shape[1]] = part
                np.testing.assert_array_equal(pixels, reference)
        np.testing.assert_array_equal(log.coords, [xy])
    _no_decoder_output(capfd)


def _dicom_frame(path) -> tuple[int, int]:
    data = path.read_bytes()
    start = data.index(b"\xff\xd8\xff")
    return start, data.index(b"\xff\xd9", start) + 2 - start


@pytest.mark.skipif("openslide" not in TIFF_BACKENDS, reason="OpenSlide not installed")
@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_real_dicom_wsi(tmp_path, monkeypatch, capfd, kind):
    """openslide-python's DICOM WSI (two instances, JPEG frames) through OpenSlide, as a file and as a folder."""
    monkeypatch.setattr("isg.io.slide.MIN_SLIDE_SIZE", 8)
    folder = tmp_path / "dicom"
    folder.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (folder / name).write_bytes((DATA / name).read_bytes())
    with open_slide(folder) as slide, open_slide(DATA / "small.svs", backend="openslide") as aperio:
        assert slide.backend == "openslide" and slide.dimensions == (16, 16) and slide.mpp == pytest.approx(0.499)
        good = slide.read_region((0, 0), 0, (16, 16))
        assert good.std() > 0
    damage(DATA / "boxes_0.dcm", folder / "boxes_0.dcm", kind, *_dicom_frame(DATA / "boxes_0.dcm"))  # its JPEG frame
    try:
        slide = open_slide(folder)
    except SlideError as exc:  # OpenSlide reads the frame index at open: a cut file may not open at all
        assert kind == "truncated" and "boxes_0.dcm" in str(exc)
        return
    with slide:
        with pytest.raises(DamagedTileError, match=r"boxes_0\.dcm: corrupt a tile of level 0"):
            slide.read_region((0, 0), 0, (16, 16))
        log = DamagedTiles()
        assert list(iter_tiles(slide, np.array([[0, 0]]), 16, damaged=log)) == []
        assert len(log) == 1
    _no_decoder_output(capfd)


@pytest.mark.skipif(not _has("nvidia.dali"), reason="NVIDIA DALI not installed")
@pytest.mark.parametrize("kind", DAMAGES)
def test_dali_reader_skips_damaged_tiles(slide_file, tmp_path, kind):
    bad = damage_tiff(slide_file, tmp_path / "bad.tif", kind, 0, 5)
    grid = np.stack(np.meshgrid(np.arange(0, 896, 128), np.arange(0, 768, 128)), -1).reshape(-1, 2)  # whole tiles
    with open_slide(slide_file) as good, open_slide(bad, max_damaged=1.0) as slide:
        log = DamagedTiles()
        coords, tiles = zip(*iter_tiles(slide, grid, 128, reader="dali", damaged=log, batch_size=8))
        coords, tiles = np.concatenate(coords), torch.cat(tiles).numpy()
        assert {tuple(xy) for xy in log.coords.tolist()} == {(5 * 128, 0)}
        assert len(coords) == len(grid) - 1
        for xy, pixels in zip(coords[:8], tiles[:8]):
            np.testing.assert_allclose(pixels, good.read_region(tuple(xy), 0, (128, 128)), atol=3)
        with pytest.raises(DamagedTileError, match=r"bad\.tif"):
            list(iter_tiles(slide, grid, 128, reader="dali"))


@pytest.mark.parametrize("kind", DAMAGES)
def test_damaged_plain_image(tmp_path, kind):
    source = tmp_path / "ihc.jpg"
    Image.fromarray(ihc_image()).save(source, quality=90)
    data = source.read_bytes()
    start = data.index(b"\xff\xda")  # start of scan: the entropy-coded data follows
    bad = damage(source, tmp_path / f"{kind}.jpg", kind, start + 64, len(data) - start - 66)
    with open_slide(source) as slide:
        assert slide.mpp is None or slide.mpp > 0
    with pytest.raises(SlideError, match=rf"{kind}\.jpg: (damaged image|not a readable image)"):
        open_slide(bad)


# ----------------------------------------------------------------------------- formats (issue 10, section 4)


def test_ome_tiff_written_by_tifffile(tmp_path):
    """An OME-TIFF pyramid (SubIFDs, JPEG tiles, PhysicalSizeX in the OME-XML) as tifffile writes it."""
    image = ihc_image()
    path = tmp_path / "ihc.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tif:
        tif.write(image, tile=(128, 128), compression="jpeg", subifds=1, photometric="rgb",
                  metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeXUnit": "µm",
                            "PhysicalSizeY": 0.25, "PhysicalSizeYUnit": "µm"})
        tif.write(np.ascontiguousarray(image[::2, ::2]), tile=(128, 128), compression="jpeg", subfiletype=1,
                  photometric="rgb")
    with open_slide(path) as slide, tifffile.TiffFile(path) as tif:
        assert slide.backend == "tifffile" and slide.level_dimensions == [(1024, 768), (512, 384)]
        assert slide.mpp == pytest.approx(0.25)
        np.testing.assert_array_equal(slide.read_region((100, 60), 0, (300, 200)), tif.series[0].levels[0].asarray()[60:260, 100:400])
        np.testing.assert_array_equal(slide.read_region((0, 0), 1, (512, 384)), tif.series[0].levels[1].asarray())
    from isg.data.manifest import slide_id_of

    assert slide_id_of(path) == "ihc"


@pytest.mark.skipif("openslide" not in TIFF_BACKENDS, reason="OpenSlide not installed")
@pytest.mark.parametrize("suffix", [".ndpi", ".mrxs", ".dcm", ".scn"])
def test_vendor_formats_go_to_openslide_with_a_clear_error(tmp_path, suffix):
    """No public package ships small NDPI / MRXS files: routing and the error for a broken one are tested."""
    path = tmp_path / f"broken{suffix}"
    path.write_bytes(b"not a slide" * 10)
    with pytest.raises(SlideError, match=rf"broken\{suffix}: (OpenSlide cannot open it|unsupported format)"):
        open_slide(path)


# ----------------------------------------------------------------------------- shared helpers (issue 8)


def test_otsu_threshold_and_box_fraction_known_answers():
    from skimage.filters import threshold_otsu

    from isg.io import box_fraction, otsu_threshold

    values = np.concatenate([np.full(100, 40), np.full(60, 200)]).astype(np.uint8)
    assert otsu_threshold(values) == threshold_otsu(values)
    assert 40 <= otsu_threshold(values) < 200
    assert otsu_threshold(values, lower=150) == 150 and otsu_threshold(values, upper=30) == 30
    assert otsu_threshold(np.full(10, 7)) == 7  # constant input: no threshold to find
    mask = np.zeros((10, 12), bool)
    mask[2:6, 3:9] = True  # 4 x 6 block
    boxes = np.array([[0, 0, 12, 10], [3, 2, 9, 6], [0, 0, 3, 2], [6, 4, 14, 12], [11, 9, 11, 9]])
    expected = [24 / 120, 1.0, 0.0, (3 * 2) / (8 * 8), 0.0]  # the part past the mask counts as background
    np.testing.assert_allclose(box_fraction(mask, boxes), expected)


def test_native_output_is_captured_and_python_stderr_stays_visible(capfd):
    import os
    import sys

    from isg.io import native_messages, quiet_native_output

    before = native_messages()
    with quiet_native_output():
        with quiet_native_output():  # nested: one redirection
            os.write(2, b"ERROR in line 205 while decompressing JPEG image\n")
        print("progress bar", file=sys.stderr, flush=True)
        os.write(2, b"Corrupt JPEG data: premature end of data segment\n")
    out, err = capfd.readouterr()
    assert "progress bar" in err and "JPEG" not in err
    assert native_messages() - before == 2


def test_jpeg_check_attributes_warnings_under_threads(tmp_path):
    """Concurrent checks of good and damaged JPEG tiles: libjpeg's printed warnings land on the right tiles."""
    import concurrent.futures as cf

    from isg.io.damage import jpeg_error

    svs = aperio_ihc_svs(tmp_path / "ihc.svs")
    streams = []
    for index in range(48):
        offset, count = segment(svs, 0, index)
        data = bytearray(svs.read_bytes()[offset:offset + count])
        if index % 5 == 0:  # random bytes in the middle: libjpeg warns (premature end / bad Huffman / marker)
            data[count // 4:count // 4 + 512] = np.random.default_rng(index).bytes(512)
        streams.append(bytes(data))
    alone = [jpeg_error(stream) is not None for stream in streams]  # one at a time: nothing to confuse
    damaged = set(range(0, 48, 5))
    assert {i for i, bad in enumerate(alone) if bad} <= damaged
    assert sum(alone) >= 0.8 * len(damaged)  # the rest decode without a word: garbage no decoder can see
    with cf.ThreadPoolExecutor(4) as pool:
        errors = list(pool.map(jpeg_error, streams * 3))
    assert [e is not None for e in errors] == alone * 3


@pytest.mark.parametrize("keep_bytes", [300, 1000])
def test_a_tile_index_cut_short_is_a_damaged_slide(tmp_path, keep_bytes):
    """A TIFF truncated inside its tile index lists fewer tiles than its grid: they count as missing (the
    slide is refused naming the file), never an IndexError while streaming."""
    image = np.random.default_rng(0).integers(0, 255, (384, 640, 3), dtype=np.uint8)  # 3 x 5 tiles of 128
    whole = tmp_path / "whole.tif"
    tifffile.imwrite(whole, image, tile=(128, 128), compression="jpeg", photometric="rgb")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(whole.read_bytes()[:keep_bytes])
    with pytest.raises(DamagedSlideError, match=r"cut\.tif: truncated or damaged: 15 of 15 tiles of level 0"):
        open_slide(cut, backend="tifffile", mpp=0.5)
