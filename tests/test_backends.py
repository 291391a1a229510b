"""isg.io backends: the registration (a toy backend is opened and streamed), slide discovery, the strict
one-decode path of the tifffile backend, nvImageCodec's decode against the CPU decode on the real vendor
fixtures (CPU backend here; CUDA under the ``gpu`` marker), DALI on Aperio's RGB-coded tiles, the
Aperio-layout writer, and the decoder ceiling of the cold reader figures."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import tifffile
import torch

from isg.io import (DamagedTiles, Slide, SlideError, SlideListError, backend_available, backend_names, find_slides,
                    iter_tiles, open_slide, register_backend, tile_grid, unregister_backend)
from isg.io.damage import DAMAGED_LIMIT
from real_slides import DAMAGES, DATA, aperio_ihc_svs, aperio_mosaic_svs, aperio_tile_stream, damage_tiff

HAS_NVIMGCODEC = backend_available("nvimgcodec")
HAS_DALI = importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


# ----------------------------------------------------------------------------- registration


class CheckerSlide(Slide):
    """A toy backend: ``.chk`` files hold 'W H' and the pixels are a checkerboard of 10 px cells."""

    backend = "checker"
    require_mpp = False

    def __init__(self, path, mpp=None, max_damaged=DAMAGED_LIMIT):
        super().__init__(path, mpp)
        w, h = map(int, open(path).read().split())
        self.level_dimensions, self.level_downsamples = [(w, h)], [1.0]
        self._finish_init()

    def _read(self, x, y, level, w, h, out):
        yy, xx = np.mgrid[y:y + h, x:x + w]
        out[...] = (((yy // 10 + xx // 10) % 2) * 200)[..., None].astype(np.uint8)


@pytest.fixture
def checker(tmp_path):
    register_backend("checker", suffixes=(".chk",), probe=lambda: True,
                     accepts=lambda path, kind: path.suffix == ".chk", auto_rank=5)(CheckerSlide)
    path = tmp_path / "toy.chk"
    path.write_text("97 75")
    yield path
    unregister_backend("checker")


@pytest.mark.parametrize("size, num_workers", [(16, 0), (33, 2)])
def test_a_registered_toy_backend_is_opened_and_streamed(checker, size, num_workers):
    assert "checker" in backend_names()
    with open_slide(checker) as slide:  # auto: the registration accepts .chk files
        assert isinstance(slide, CheckerSlide) and slide.dimensions == (97, 75)
        coords = tile_grid(slide, size, tissue_min=0)
        tiles = torch.cat([t for _, t in iter_tiles(slide, coords, size, batch_size=5, num_workers=num_workers)]).numpy()
        for (x, y), tile in zip(coords.tolist(), tiles):
            yy, xx = np.mgrid[y:y + size, x:x + size]
            expected = np.where((yy < 75) & (xx < 97), ((yy // 10 + xx // 10) % 2) * 200, 255).astype(np.uint8)
            np.testing.assert_array_equal(tile, np.repeat(expected[..., None], 3, -1))
    assert find_slides([checker.parent]) == [checker]  # folder listings take the registered suffixes
    unregister_backend("checker")
    with pytest.raises(ValueError, match="unknown slide backend 'checker'"):
        open_slide(checker, backend="checker")


# ----------------------------------------------------------------------------- discovery


def test_find_slides_from_folders_dicom_and_manifests(tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for name in ("b.svs", "a.tif", "notes.txt"):
        (folder / name).write_bytes(b"x")
    dicom = folder / "wsi"
    dicom.mkdir()
    (dicom / "boxes_0.dcm").write_bytes((DATA / "boxes_0.dcm").read_bytes())
    assert find_slides([folder]) == [folder / "a.tif", folder / "b.svs", dicom]
    assert find_slides([dicom]) == [dicom]  # a DICOM WSI folder is one slide
    manifest = tmp_path / "m.tsv"
    manifest.write_text("sample_id\tslide_path\ns1\tslides/b.svs\ns2\tslides/wsi\n")
    assert find_slides([], manifest) == [folder / "b.svs", dicom]
    manifest.write_text("sample_id\tslide_path\ns1\tslides/gone.svs\n")
    with pytest.raises(SlideListError, match="1 slide file.s. not found: .*gone.svs"):
        find_slides([], manifest)
    (tmp_path / "bad.csv").write_text("id,path\n1,x\n")
    with pytest.raises(SlideListError, match="no slide_path column"):
        find_slides([], tmp_path / "bad.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SlideListError, match="holds no slide files"):
        find_slides([tmp_path / "empty"])
    with pytest.raises(SlideListError, match="no slides given"):
        find_slides([])


# ----------------------------------------------------------------------------- Aperio-layout slides


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    """An Aperio-layout SVS of real tissue texture, 1357 x 1003 px (partial edge tiles), RGB-coded 240 px tiles."""
    return aperio_mosaic_svs(tmp_path_factory.mktemp("aperio") / "mosaic.svs", 1357, 1003, seed=3)


@pytest.fixture(scope="module")
def ihc_svs(tmp_path_factory):
    return aperio_ihc_svs(tmp_path_factory.mktemp("ihc") / "ihc.svs")


def test_aperio_writer_codes_tiles_as_aperio_does(mosaic):
    with tifffile.TiffFile(mosaic) as tif:
        assert tif.is_svs and [level.shape for level in tif.series[0].levels] == [(1003, 1357, 3)]
        page = tif.pages[0]
        assert page.photometric == 2 and page.tile == (240, 240) and page.jpegtables is not None and not page.is_jfif
        data = open(mosaic, "rb").read()
        stream = data[page.dataoffsets[0]:page.dataoffsets[0] + page.databytecounts[0]]
        sof = stream.index(b"\xff\xc0")
        assert b"Adobe" not in stream and list(stream[sof + 10:sof + 19:3]) == [0, 1, 2]  # component ids 0, 1, 2
        reference = page.asarray()
    import openslide

    with openslide.OpenSlide(str(mosaic)) as osr:  # OpenSlide's Aperio reader agrees on the colours
        np.testing.assert_array_equal(np.asarray(osr.read_region((0, 0), 0, (1357, 1003)))[..., :3], reference)
    with open_slide(mosaic) as slide:
        assert slide.mpp == pytest.approx(0.499) and slide.tile_shape(0) == (240, 240)
        np.testing.assert_array_equal(slide.read_region((0, 0), 0, (1357, 1003)), reference)
    tables, body = aperio_tile_stream(np.zeros((16, 16, 3), np.uint8))
    assert tables.startswith(b"\xff\xd8\xff\xdb") and tables.endswith(b"\xff\xd9") and b"\xff\xdb" not in body


def test_tifffile_decodes_each_tile_once(ihc_svs, monkeypatch):
    """The strict decode is the damage check: a stream over clean tiles decodes each file tile once."""
    import isg.io.backends.tiff_slide as tiff_slide
    import isg.io.damage as damage

    calls = []
    decode = damage.decode_jpeg
    monkeypatch.setattr(tiff_slide, "decode_jpeg", lambda *a, **k: calls.append(1) or decode(*a, **k))
    monkeypatch.setattr(damage, "jpeg_error", lambda stream: pytest.fail("a clean tile was checked apart"))
    with open_slide(ihc_svs) as slide:
        coords = tile_grid(slide, 128, tissue_min=0)
        log = DamagedTiles()
        assert sum(len(c) for c, _ in iter_tiles(slide, coords, 128, num_workers=2, damaged=log)) == 48
        assert len(calls) == 48 and len(log) == 0
        slide.read_region((0, 0), 0, (128, 128))  # a region check knows the tile is clean: one more decode only
        assert len(calls) == 49


# ----------------------------------------------------------------------------- nvImageCodec


def _fixtures(mosaic, ihc_svs):
    """(path, open_slide kwargs, tile size) of the real vendor fixtures with JPEG tiles."""
    return [(DATA / "small.svs", {}, 16), (ihc_svs, {}, 128), (mosaic, {}, 240), (mosaic, {}, 256)]


def _coords(slide, size):
    coords = tile_grid(slide, size, tissue_min=0)
    return np.concatenate([coords, [[7, 5], [slide.dimensions[0] - size // 2, 3]]])  # off the grid, past the border


@pytest.mark.skipif(not HAS_NVIMGCODEC, reason="nvImageCodec not installed")
@pytest.mark.parametrize("case", range(4))
def test_nvimgcodec_cpu_decode_equals_the_cpu_path(mosaic, ihc_svs, monkeypatch, case):
    monkeypatch.setattr("isg.io.slide.MIN_SLIDE_SIZE", 8)
    path, kwargs, size = _fixtures(mosaic, ihc_svs)[case]
    with open_slide(path, backend="nvimgcodec", host_decode=True, **kwargs) as slide, open_slide(path, backend="tifffile") as cpu:
        assert slide.backend == "nvimgcodec"
        coords = _coords(slide, size)
        got = torch.cat([t for _, t in iter_tiles(slide, coords, size, batch_size=7, num_workers=2)]).numpy()
        expected = np.stack([cpu.read_region(tuple(xy), 0, (size, size)) for xy in coords.tolist()])
        assert np.abs(got.astype(int) - expected).max() <= 2  # both libjpeg-turbo: equal up to the IDCT's rounding


@pytest.mark.skipif(not HAS_NVIMGCODEC, reason="nvImageCodec not installed")
@pytest.mark.parametrize("kind", DAMAGES)
def test_nvimgcodec_reports_damaged_tiles_as_the_cpu_path(ihc_svs, tmp_path, kind):
    bad = damage_tiff(ihc_svs, tmp_path / f"{kind}.svs", kind, 0, 47)
    grid = tile_grid(open_slide(ihc_svs), 128, tissue_min=0)
    with open_slide(bad, backend="nvimgcodec", host_decode=True, max_damaged=1.0) as slide, open_slide(ihc_svs) as good:
        log = DamagedTiles()
        coords, tiles = zip(*iter_tiles(slide, grid, 128, batch_size=16, num_workers=2, damaged=log))
        np.testing.assert_array_equal(log.coords, [(896, 640)])
        coords = np.concatenate(coords)
        np.testing.assert_array_equal(coords, grid[:47])
        expected = np.stack([good.read_region(tuple(xy), 0, (128, 128)) for xy in coords.tolist()])
        assert np.abs(torch.cat(tiles).numpy().astype(int) - expected).max() <= 2
        with pytest.raises(SlideError, match=rf"{kind}\.svs"):
            list(iter_tiles(slide, grid, 128))


def test_auto_picks_device_decode_only_on_a_gpu(ihc_svs, monkeypatch):
    with open_slide(ihc_svs) as slide:
        assert slide.backend == ("nvimgcodec" if HAS_NVIMGCODEC and torch.cuda.is_available() else "tifffile")
    if HAS_NVIMGCODEC:
        import isg.io.backends.nvimgcodec_slide as nv

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what auto sees on a GPU machine
        monkeypatch.setattr(nv, "_gpu_decoder_ready", lambda: True)
        with open_slide(ihc_svs) as slide:
            assert slide.backend == "nvimgcodec"
            assert type(slide.tile_reader(0, 128, "cpu")).__name__ == "HostTileReader"  # CPU batches: the CPU path


@pytest.mark.skipif(not HAS_NVIMGCODEC, reason="nvImageCodec not installed")
def test_nvimgcodec_tiles_it_cannot_decode_go_to_the_cpu_path(mosaic, caplog):
    """A tile whose segments passed the check but that the decoder returns nothing for is not 'damaged'."""
    with open_slide(mosaic, backend="nvimgcodec", host_decode=True) as slide, open_slide(mosaic, backend="tifffile") as cpu:
        coords = _coords(slide, 240)
        reader = slide.tile_reader(0, 240, "cpu", 2)
        reader._decoder = type("GivesUp", (), {"decode": lambda self, streams, **kwargs: [None] * len(streams)})()
        out = torch.zeros((len(coords), 240, 240, 3), dtype=torch.uint8)
        assert reader.read(coords, out) == [None] * len(coords)
        reader.close()
        np.testing.assert_array_equal(out.numpy(), np.stack([cpu.read_region(tuple(xy), 0, (240, 240)) for xy in coords.tolist()]))
        assert "decoded on the CPU" in caplog.text


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_NVIMGCODEC, reason="nvImageCodec not installed")
@pytest.mark.parametrize("case", range(4))
def test_nvimgcodec_gpu_decode_equals_the_cpu_path(mosaic, ihc_svs, monkeypatch, case):
    """nvJPEG on the GPU, straight into the device batch, against libjpeg-turbo on the CPU."""
    monkeypatch.setattr("isg.io.slide.MIN_SLIDE_SIZE", 8)
    path, kwargs, size = _fixtures(mosaic, ihc_svs)[case]
    with open_slide(path, backend="nvimgcodec", **kwargs) as slide, open_slide(path, backend="tifffile") as cpu:
        coords = _coords(slide, size)
        batches = list(iter_tiles(slide, coords, size, batch_size=7, num_workers=2, device="cuda"))
        assert all(t.device.type == "cuda" for _, t in batches)
        got = torch.cat([t for _, t in batches]).cpu().numpy().astype(int)
        expected = np.stack([cpu.read_region(tuple(xy), 0, (size, size)) for xy in coords.tolist()]).astype(int)
        assert np.abs(got - expected).max() <= 8 and np.abs(got - expected).mean() < 1.0  # IDCT / upsampling differences


# ----------------------------------------------------------------------------- DALI


@pytest.mark.skipif(not HAS_DALI, reason="NVIDIA DALI not installed")
def test_dali_reads_aperio_rgb_coded_tiles(mosaic):
    """Aperio's RGB-coded tiles carry no marker saying RGB: the streams get one, and DALI decodes the right colours."""
    with open_slide(mosaic) as slide:
        coords = tile_grid(slide, 240, tissue_min=0)  # on the tile grid, edge tiles included
        got = torch.cat([t for _, t in iter_tiles(slide, coords, 240, reader="dali", batch_size=4)]).numpy()
        expected = np.stack([slide.read_region(tuple(xy), 0, (240, 240)) for xy in coords.tolist()])
        assert np.abs(got.astype(int) - expected).max() <= 2


# ----------------------------------------------------------------------------- the decoder ceiling


def test_ceiling_decodes_the_file_tiles_under_the_requested_tiles(mosaic):
    from isg.io.throughput import ceiling_tiles_per_s, cold_tiles_per_s, split_passes, tile_streams

    with open_slide(mosaic) as slide:
        aligned = tile_grid(slide, 240, tissue_min=0)  # [30, 2]: one file tile each
        streams = tile_streams(slide, aligned, 0)
        assert len(streams) == len(aligned) == 30
        import simplejpeg

        for stream, xy in zip(streams[:5], aligned[:5].tolist()):  # complete streams: the right colours on their own
            np.testing.assert_array_equal(simplejpeg.decode_jpeg(stream), slide.read_region(tuple(xy), 0, (240, 240)))
        assert len(tile_streams(slide, np.array([[100, 100]]), 0)) == 4  # a misaligned tile straddles four
        passes = split_passes(aligned, 3)
        assert [len(p) for p in passes] == [10, 10, 10] and len(np.unique(np.concatenate(passes), axis=0)) == 30
        ceiling = ceiling_tiles_per_s(slide, passes, 0)
        assert ceiling["tiles_per_s"] > 0 and ceiling["file_tiles_per_tile"] == 1.0
    opened = []
    figure = cold_tiles_per_s(lambda: opened.append(open_slide(mosaic)) or opened[-1],
                              lambda s, c: list(iter_tiles(s, c, 240, num_workers=0)), passes, path=mosaic)
    assert len(opened) == 3 and len({id(s) for s in opened}) == 3  # a fresh reader per pass
    assert all(s._fd is None for s in opened) and len(figure["passes"]) == 3  # each closed after its pass
    with open_slide(DATA / "boxes.tiff", mpp=0.25) as slide:  # deflate tiles: no JPEG ceiling
        assert ceiling_tiles_per_s(slide, [tile_grid(slide, 64, tissue_min=0)], 0) is None
