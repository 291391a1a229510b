"""Shannon scorer: definition, native (C++/CUDA) vs numpy reference, grid scoring, errors, agreement with
real compressors and the paper's Fig. 2 behaviour."""

from __future__ import annotations

import lzma
import math
import warnings
import zlib

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from isg.ops import native as launch
from isg.ops import shannon
from isg.ops.shannon import (bits_from_histogram, shannon_bits, shannon_bits_reference, shannon_grid_bits,
                             shannon_grid_histogram, shannon_grid_histogram_reference, shannon_histogram,
                             shannon_histogram_reference)
from tissue_samples import slide_like_tiles, textured_tiles, textureless_tiles

SHAPES = [(1, 1), (7, 13), (31, 17), (64, 64), (2, 9)]


def _tiles(batch, h, w, c, seed=0):
    """Mixed-content uint8 tiles: noise, smooth ramps and flat areas."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(0, 256, (batch, h, w, c), dtype=np.uint8)
    tiles[:, : h // 2] //= 16                                                       # low-amplitude noise
    ramp = (np.arange(w)[None, :, None] * 3 + np.arange(h)[:, None, None]) % 256
    tiles[0] = ramp.astype(np.uint8)                                                # smooth
    if batch > 1:
        tiles[1] = 77                                                               # flat
    return tiles


# ------------------------------------------------------------------------------------------ definition (reference)


def test_med_residuals_known_answer():
    x = np.array([[10, 20], [30, 25]], np.uint8)[None, :, :, None]                  # [1, 2, 2, 1]
    # (0,0): pred 0 -> 10; (0,1): left 10 -> 10; (1,0): up 10 -> 20; (1,1): a=30 b=20 c=10 -> a+b-c=40 -> clip 30 -> -5
    expected = np.zeros(256, np.int64)
    for r in (10, 10, 20, (25 - 30) % 256):
        expected[r] += 1
    np.testing.assert_array_equal(shannon_histogram_reference(x)[0, 0], expected)


def test_bits_known_answers():
    # 1x1 tile: N = 1, K = 1 -> data 0, model 8 + log2 256 + log2 C(0, 0) = 16 bits per channel
    assert shannon_bits_reference(np.zeros((1, 1, 1, 3), np.uint8))[0] == pytest.approx(48.0, abs=1e-12)
    # flat h x w tile of value v > 0: per channel residuals {v: 1, 0: N - 1}, K = 2
    h, w = 5, 6
    n = h * w
    per_channel = math.log2(n) + (n - 1) * math.log2(n / (n - 1)) + 8 + math.log2(256 * 255 / 2) + math.log2(n - 1)
    flat = np.full((1, h, w, 1), 9, np.uint8)
    assert shannon_bits_reference(flat)[0] == pytest.approx(per_channel, rel=1e-12)
    # all 256 residuals equally often: data = 8 bits per pixel, model = 8 + 0 + log2 C(N - 1, 255)
    hist = np.full((1, 1, 256), 4, np.int64)
    expected = 1024 * 8 + 8 + sum(math.log2((1023 - 255 + i) / i) for i in range(1, 256))
    assert bits_from_histogram(hist)[0] == pytest.approx(expected, rel=1e-12)


def test_noise_costs_about_8_bits_and_flat_almost_nothing():
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (1, 64, 64, 3), dtype=np.uint8)
    bits = shannon_bits_reference(np.concatenate([noise, np.full_like(noise, 128)]))
    assert 8.0 < bits[0] / noise.size < 8.5
    assert bits[1] < 200


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("h,w", SHAPES)
def test_torch_reference_matches_numpy(h, w, channels):
    tiles = _tiles(3, h, w, channels, seed=8)
    torch_hist = shannon.shannon_histogram_torch(torch.from_numpy(tiles))
    np.testing.assert_array_equal(torch_hist.numpy(), shannon_histogram_reference(tiles))


@pytest.mark.parametrize("h,w", SHAPES)
def test_reference_histogram_counts_every_pixel(h, w):
    hist = shannon_histogram_reference(_tiles(3, h, w, 3))
    assert hist.shape == (3, 3, 256) and (hist.sum(-1) == h * w).all()


# ------------------------------------------------------------------------------------------ native vs reference


@pytest.fixture(scope="session")
def native(require_ext):
    """The native module with the Shannon kernels (skipped, or failed under ISG_REQUIRE_EXT=1, without them)."""
    import os

    if not hasattr(require_ext, "shannon_histogram_cpu"):
        message = "isg._C was built without the shannon kernels"
        if os.environ.get("ISG_REQUIRE_EXT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return require_ext


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("h,w", SHAPES)
def test_native_matches_reference(native, h, w, channels):
    tiles = _tiles(4, h, w, channels)
    hist = shannon_histogram(tiles)
    np.testing.assert_array_equal(hist, shannon_histogram_reference(tiles))
    np.testing.assert_allclose(shannon_bits(tiles), shannon_bits_reference(tiles), rtol=1e-9, atol=0)


def test_native_matches_reference_on_extreme_values(native):
    # a + b - c over/underflows uint8 here: every MED branch with wrap-around is exercised
    rng = np.random.default_rng(7)
    tiles = rng.choice(np.array([0, 1, 2, 127, 128, 129, 253, 254, 255], np.uint8), size=(8, 33, 47, 3))
    np.testing.assert_array_equal(shannon_histogram(tiles), shannon_histogram_reference(tiles))


def test_native_bits_formula_matches_reference(native):
    rng = np.random.default_rng(3)
    hist = rng.integers(0, 50, (20, 3, 256)).astype(np.int64) * (rng.random((20, 3, 256)) < 0.3)
    hist[0] = 0                                                                     # empty histogram -> 0 bits
    hist[1, :, 7] = 1000                                                            # single symbol
    native = shannon.histogram_bits(hist)
    np.testing.assert_allclose(native, bits_from_histogram(hist), rtol=1e-9, atol=0)
    assert native[0] == 0.0


def test_native_non_contiguous_and_torch_inputs(native):
    base = torch.from_numpy(_tiles(6, 20, 30, 3))
    views = [base.permute(0, 2, 1, 3), base[::2], base[:, 1:-1, 3:], base.flip(-1)[..., :3]]
    for view in views:
        expected = shannon_histogram_reference(view.contiguous().numpy())
        got = shannon_histogram(view)
        assert isinstance(got, torch.Tensor)
        np.testing.assert_array_equal(got.numpy(), expected)
    negative = base.numpy()[:, ::-1]                                                # numpy negative strides
    np.testing.assert_array_equal(shannon_histogram(negative), shannon_histogram_reference(negative.copy()))


@pytest.mark.parametrize("tile,stride", [(8, 8), ((17, 13), (9, 11)), ((5, 7), (16, 3)), (30, 1)])
def test_grid_matches_tiles(native, tile, stride):
    region = _tiles(1, 45, 38, 3, seed=5)[0]
    hist = shannon_grid_histogram(region, tile, stride)
    np.testing.assert_array_equal(hist, shannon_grid_histogram_reference(region, tile, stride))
    th, tw = (tile, tile) if np.isscalar(tile) else tile
    sy, sx = (stride, stride) if np.isscalar(stride) else stride
    ny, nx = (45 - th) // sy + 1, (38 - tw) // sx + 1
    bits = shannon_grid_bits(region, tile, stride)
    assert bits.shape == (ny, nx)
    iy, ix = ny - 1, nx // 2                                                        # one tile checked by hand
    crop = region[iy * sy: iy * sy + th, ix * sx: ix * sx + tw][None]
    assert bits[iy, ix] == pytest.approx(shannon_bits_reference(crop)[0], rel=1e-9)


def test_torch_grid_fallback_matches_reference():
    region = _tiles(1, 45, 38, 3, seed=5)[0]
    tiles = shannon._grid_tiles_torch(torch.from_numpy(region), (17, 13), (9, 11))
    np.testing.assert_array_equal(shannon.shannon_histogram_torch(tiles).numpy(),
                                  shannon_grid_histogram_reference(region, (17, 13), (9, 11)))


def test_grid_on_non_contiguous_region(native):
    region = torch.from_numpy(_tiles(1, 40, 33, 4, seed=2)[0]).transpose(0, 1)      # [33, 40, 4], RGBA, strided
    hist = shannon_grid_histogram(region, (10, 12), (7, 5))
    expected = shannon_grid_histogram_reference(region.contiguous().numpy()[..., :3], (10, 12), (7, 5))
    np.testing.assert_array_equal(hist.numpy(), expected)


def test_opcheck(native):
    tiles = torch.from_numpy(_tiles(3, 9, 11, 3))
    torch.library.opcheck(torch.ops.isg.shannon_histogram.default, (tiles,))
    torch.library.opcheck(torch.ops.isg.shannon_grid_histogram.default, (tiles[0], 4, 5, 3, 2))
    torch.library.opcheck(torch.ops.isg.shannon_bits_from_histogram.default, (torch.ops.isg.shannon_histogram(tiles).long(),))


def test_registered_ops_validate_their_inputs(native):
    """torch.compile graphs call the registered ops directly: bad input must raise, never reach a kernel."""
    hist = torch.ops.isg.shannon_histogram(torch.from_numpy(_tiles(2, 9, 11, 3)))
    assert hist.dtype == torch.int32
    with pytest.raises(ValueError, match="int64"):
        torch.ops.isg.shannon_bits_from_histogram(hist)                  # was 4.9e12 bits instead of ~1795
    with pytest.raises(ValueError, match="int64"):
        torch.ops.isg.shannon_bits_from_histogram(hist.long()[..., :255])
    with pytest.raises(ValueError, match="uint8"):
        torch.ops.isg.shannon_histogram(torch.zeros(2, 8, 8, 3, dtype=torch.int16))
    with pytest.raises(ValueError, match="uint8"):
        torch.ops.isg.shannon_histogram(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="do not fit"):
        torch.ops.isg.shannon_grid_histogram(torch.zeros(8, 8, 3, dtype=torch.uint8), 9, 4, 1, 1)


def test_launch_switches_to_the_tensors_device(monkeypatch):
    """A tensor on cuda:1 while cuda:0 is current must launch on cuda:1 (device guard around every launch)."""
    current = ["cuda:0"]
    launched = []

    class Guard:
        def __init__(self, device):
            self.device, self.previous = str(device), None

        def __enter__(self):
            self.previous, current[0] = current[0], self.device

        def __exit__(self, *exc):
            current[0] = self.previous

    class Stream:
        cuda_stream = 1234

    class Module:
        def shannon_histogram_cuda(self, *args):
            launched.append((current[0], args[-1]))

    monkeypatch.setattr(torch.cuda, "device", Guard)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(launch._ext, "ext", lambda: Module())
    launch.call("shannon_histogram", torch.device("cuda:1"), 1, 2, 3)
    assert launched == [("cuda:1", 1234)]


def _require_cuda_kernels():
    if not shannon._native(torch.device("cuda")):
        pytest.fail("isg._C has no usable CUDA kernels on this GPU machine (python -m isg info says why)")


def test_reference_fallback_warns_once(monkeypatch):
    """Without a native kernel for the tiles' device the numpy reference runs, and says so once per op and device
    type, naming the reason (after stylegan2-ada's bias_act)."""
    monkeypatch.setattr(launch, "_warned", set())
    monkeypatch.setattr(launch._ext, "has", lambda name: False)
    tiles = _tiles(2, 9, 11, 3)
    with pytest.warns(RuntimeWarning, match=r"shannon_histogram: the native cpu kernel is not used \(isg._C has no "
                                            r"shannon_histogram_cpu"):
        first = shannon_histogram(tiles)
    with pytest.warns(RuntimeWarning, match=r"shannon_bits: the native cpu kernel is not used"):
        bits = shannon_bits(tiles)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = shannon_histogram(tiles)
        assert np.array_equal(shannon_bits(tiles), bits)
    np.testing.assert_array_equal(first, shannon_histogram_reference(tiles))
    np.testing.assert_array_equal(second, first)


@pytest.mark.gpu
def test_cuda_matches_cpu(native):
    _require_cuda_kernels()
    tiles = torch.from_numpy(_tiles(5, 37, 29, 3)).cuda()
    np.testing.assert_array_equal(shannon.shannon_histogram_torch(tiles).cpu().numpy(),
                                  shannon_histogram_reference(tiles.cpu().numpy()))
    hist = shannon_histogram(tiles)
    assert hist.is_cuda
    np.testing.assert_array_equal(hist.cpu().numpy(), shannon_histogram_reference(tiles.cpu().numpy()))
    np.testing.assert_allclose(shannon_bits(tiles), shannon_bits(tiles.cpu()), rtol=1e-9, atol=0)
    region = tiles[0]
    np.testing.assert_array_equal(shannon_grid_histogram(region, 9, (5, 4)).cpu().numpy(),
                                  shannon_grid_histogram_reference(region.cpu().numpy(), 9, (5, 4)))


def word_path_cases() -> dict[str, tuple[np.ndarray, tuple | None]]:
    """Layouts the scorer sees at the widths of real tiles, as (tiles or region, None or (tile, stride) of a grid); the
    CUDA word path reads them as 4-byte words (256 px RGB rows: 192 words, 6 strips of 32). Shared with the emulated
    tests (tests/test_emulated_kernels.py)."""
    region = _tiles(1, 48, 520, 3, seed=23)[0]
    return {
        "rgb-256": (_tiles(2, 40, 256, 3, seed=21), None),
        "rgb-256x256": (_tiles(1, 256, 256, 3, seed=24), None),            # a production tile: 8 bands of 32 rows
        "rgba-view-256": (_tiles(2, 40, 256, 4, seed=25)[..., :3], None),   # pitch 4 bytes, alpha dropped as a view
        "grey-256": (_tiles(2, 40, 256, 1, seed=26), None),
        "rgba-view-width-255": (_tiles(2, 33, 255, 4, seed=22)[..., :3], None),  # 255 words: the last strip is short
        "misaligned-origins": (region[:24, :264], ((24, 256), (1, 1))),   # x = 0..8: 4-byte aligned at x % 4 == 0 only
        "grid": (region, ((24, 128), (24, 128))),                           # 2 x 4 tiles of 96 words
    }


def histogram_of_case(x, grid):
    """Histograms of a word_path_cases() entry by the public functions (on x's device)."""
    return shannon_histogram(x) if grid is None else shannon_grid_histogram(x, *grid)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(word_path_cases()))
def test_cuda_word_path_matches_cpu(native, case):
    """The word path on the GPU against the CPU kernel and the numpy reference, bits included (bench/gpu_check.sh)."""
    _require_cuda_kernels()
    x, grid = word_path_cases()[case]
    base = x if x.base is None else x.base                 # a region's corner or an RGBA view: the same view on the GPU
    assert base.base is None and base.flags.c_contiguous
    offset = x.__array_interface__["data"][0] - base.__array_interface__["data"][0]
    device_x = torch.from_numpy(base).cuda().reshape(-1).as_strided(x.shape, x.strides, offset)  # uint8: strides in bytes
    gpu = histogram_of_case(device_x, grid)
    cpu = histogram_of_case(torch.from_numpy(x), grid)
    reference = shannon_histogram_reference(x) if grid is None else shannon_grid_histogram_reference(x, *grid)
    np.testing.assert_array_equal(gpu.cpu().numpy(), cpu.numpy())
    np.testing.assert_array_equal(cpu.numpy(), reference)
    np.testing.assert_array_equal(shannon.histogram_bits(gpu), shannon.histogram_bits(cpu))


# ------------------------------------------------------------------------------------------ inputs and errors


def test_rgba_drops_alpha_and_grey_is_one_channel():
    tiles = _tiles(2, 12, 10, 4)
    np.testing.assert_array_equal(shannon_bits(tiles), shannon_bits(np.ascontiguousarray(tiles[..., :3])))
    assert shannon_histogram(tiles).shape == (2, 3, 256)
    assert shannon_histogram(tiles[..., :1]).shape == (2, 1, 256)


def test_empty_batch():
    empty = np.zeros((0, 8, 8, 3), np.uint8)
    assert shannon_bits(empty).shape == (0,)
    assert shannon_histogram(empty).shape == (0, 3, 256)
    assert shannon_bits_reference(empty).shape == (0,)
    assert shannon.shannon_histogram_torch(torch.from_numpy(empty)).shape == (0, 3, 256)


def test_numpy_and_torch_agree():
    tiles = _tiles(3, 16, 16, 3)
    np.testing.assert_array_equal(shannon_bits(tiles), shannon_bits(torch.from_numpy(tiles)))
    assert shannon_bits(tiles).dtype == np.float64


@pytest.mark.parametrize("bad,match", [
    (np.zeros((2, 8, 8, 3), np.float32), "uint8"),
    (np.zeros((8, 8, 3), np.uint8), r"4 dims.*tiles\[None\]"),
    (np.zeros((2, 8, 8, 2), np.uint8), "channels"),
    (torch.zeros((2, 8, 8, 5), dtype=torch.uint8), "channels"),
    (np.zeros((2, 0, 8, 3), np.uint8), "empty"),
    ([[1, 2, 3]], "numpy array or torch tensor"),
])
def test_bad_tiles_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        shannon_bits(bad)


def test_bad_grid_raises():
    region = np.zeros((20, 20, 3), np.uint8)
    with pytest.raises(ValueError, match="larger than the region"):
        shannon_grid_bits(region, 32)
    with pytest.raises(ValueError, match="stride"):
        shannon_grid_bits(region, 8, 0)
    with pytest.raises(ValueError, match="region"):
        shannon_grid_bits(np.zeros((2, 20, 20, 3), np.uint8), 8)
    with pytest.raises(ValueError, match="int64"):
        shannon.histogram_bits(np.zeros((2, 3, 255), np.int64))


# ------------------------------------------------------------------------------------------ vs real compressors


@pytest.fixture(scope="module")
def slide_tiles():
    return slide_like_tiles(p=64)


def _compressed_sizes(tiles):
    import cv2

    sizes = {"zlib-9": [], "lzma": [], "png": []}
    for tile in tiles:
        sizes["zlib-9"].append(len(zlib.compress(tile.tobytes(), 9)))
        sizes["lzma"].append(len(lzma.compress(tile.tobytes())))
        sizes["png"].append(len(cv2.imencode(".png", tile[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])[1]))
    return sizes


def test_rank_correlation_with_compressors(slide_tiles):
    tiles, kinds = slide_tiles
    assert len(tiles) > 300 and {"tissue", "partial", "noise", "posterized", "blank"} == set(kinds)
    bits = shannon_bits(tiles)
    for name, sizes in _compressed_sizes(tiles).items():
        rho = spearmanr(bits, sizes)[0]
        print(f"Spearman(bits, {name}) = {rho:.4f} on {len(tiles)} tiles")
        assert rho >= 0.95, name
    # bits are a sensible code length: never far above the raw 8 bits per subpixel
    assert (bits < tiles[0].size * 8.6).all()


def test_fig2_textureless_below_textured():
    flat, names = textureless_tiles(p=128)
    tissue = textured_tiles(p=128)
    low, high = shannon_bits(flat), shannon_bits(tissue)
    assert low.max() < high.min(), dict(zip(names, low))
    # solid colours cost the same few bits whatever the colour
    solids = [b for b, n in zip(low, names) if n.startswith("solid")]
    assert max(solids) - min(solids) < 1e-6 and max(solids) < 200


def test_chunked_bits_equal_unchunked(monkeypatch):
    tiles = _tiles(7, 9, 8, 3, seed=4)
    region = _tiles(1, 50, 41, 3, seed=6)[0]
    whole, grid = shannon_bits(tiles), shannon_grid_bits(region, (9, 7), (4, 5))
    monkeypatch.setattr(shannon, "CHUNK_TILES", 3)
    np.testing.assert_array_equal(shannon_bits(tiles), whole)
    np.testing.assert_array_equal(shannon_grid_bits(region, (9, 7), (4, 5)), grid)
    np.testing.assert_allclose(grid.ravel(), shannon_bits_reference(np.ascontiguousarray(
        np.lib.stride_tricks.sliding_window_view(region, (9, 7), axis=(0, 1))[::4, ::5].transpose(0, 1, 3, 4, 2)
    ).reshape(-1, 9, 7, 3)), rtol=1e-9)
