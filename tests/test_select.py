"""isg.select: selection rules, default threshold, selectors behind one interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from isg.select import (PAPER_THRESHOLD_BITS, SELECTORS, default_threshold_bits, get_selector, grey_tiles,
                        otsu_grey_threshold, score_tiles, select)
from isg.select.samples import histology_image, textureless_tiles

SCORES = np.array([5.0, 1.0, 9.0, 3.0, 9.0, 0.0])


def test_threshold_rule():
    np.testing.assert_array_equal(select(SCORES, "threshold", threshold=3.0), [1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(select(SCORES, threshold=9.0), [0, 0, 1, 0, 1, 0])
    # nothing passes: min_keep keeps the best one (first of ties), unless disabled
    np.testing.assert_array_equal(select(SCORES, threshold=100.0), [0, 0, 1, 0, 0, 0])
    np.testing.assert_array_equal(select(SCORES, threshold=100.0, min_keep=0), np.zeros(6, bool))
    np.testing.assert_array_equal(select(SCORES, threshold=100.0, min_keep=3), [1, 0, 1, 0, 1, 0])
    assert select(SCORES, threshold=3.0).dtype == np.bool_


def test_topk_rule():
    np.testing.assert_array_equal(select(SCORES, "topk", k=1), [0, 0, 1, 0, 0, 0])   # tie -> lower index
    np.testing.assert_array_equal(select(SCORES, "topk", k=3), [1, 0, 1, 0, 1, 0])
    assert select(SCORES, "topk", k=100).all()
    assert not select(SCORES, "topk", k=0, min_keep=0).any()


def test_mean_std_rule():
    # mean 4.5, population std ~3.5 -> mean + 1 sigma ~ 8.0 keeps the two 9s
    np.testing.assert_array_equal(select(SCORES, "mean_std"), [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(select(SCORES, "mean_std", n_sigma=0.0), [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(select(SCORES, "mean_std", n_sigma=-1.0), [1, 1, 1, 1, 1, 0])
    # constant scores: nobody is above the mean, min_keep keeps one
    np.testing.assert_array_equal(select(np.ones(4), "mean_std"), [1, 0, 0, 0])


def test_empty_scores():
    for rule, kw in (("threshold", {"threshold": 1.0}), ("topk", {"k": 2}), ("mean_std", {})):
        assert select(np.zeros(0), rule, **kw).shape == (0,)


@pytest.mark.parametrize("kwargs,match", [
    ({"rule": "threshold"}, "needs threshold"),
    ({"rule": "topk"}, "k="),
    ({"rule": "topk", "k": 1.5}, "k="),
    ({"rule": "best"}, "unknown rule"),
    ({"rule": "topk", "k": 1, "min_keep": -1}, "min_keep"),
])
def test_select_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        select(SCORES, **kwargs)
    with pytest.raises(ValueError, match="NaN"):
        select([1.0, np.nan], "topk", k=1)
    with pytest.raises(ValueError, match="1-D"):
        select(np.ones((2, 2)), "topk", k=1)


def test_default_threshold_scales_with_pixels():
    assert default_threshold_bits(512) == PAPER_THRESHOLD_BITS == 1.6e6
    assert default_threshold_bits(256) == pytest.approx(4e5)
    assert default_threshold_bits(1024) == pytest.approx(6.4e6)
    assert default_threshold_bits((256, 512)) == pytest.approx(8e5)
    for bad in (0, -3, 2.5, (1, 2, 3)):
        with pytest.raises(ValueError, match="patch_size"):
            default_threshold_bits(bad)


def test_default_threshold_separates_tissue_from_flat_and_blurred():
    p = 128
    tissue = histology_image()[:p * 4, :p * 4].reshape(4, p, 4, p, 3).swapaxes(1, 2).reshape(16, p, p, 3)
    flat, names = textureless_tiles(p)
    threshold = default_threshold_bits(p)
    assert (score_tiles(tissue) > threshold).all()
    # solid colours and blurred tissue fall below it (noisy background need not: see docs/selection.md)
    smooth = [i for i, name in enumerate(names) if name.startswith(("solid", "blur"))]
    assert len(smooth) == 5 and (score_tiles(flat[smooth]) < threshold).all()


@pytest.fixture(scope="module")
def tissue_and_background():
    image = histology_image()
    rng = np.random.default_rng(0)
    background = np.clip(rng.normal(236, 1.5, (2, 96, 96, 3)), 0, 255).astype(np.uint8)
    background[1] = 242
    return np.stack([image[40:136, 300:396], image[250:346, 120:216], *background])   # [4, 96, 96, 3]


@pytest.mark.parametrize("name", SELECTORS)
def test_each_selector_ranks_tissue_above_background(name, tissue_and_background):
    scores = get_selector(name)(tissue_and_background)
    assert scores.shape == (4,) and scores.dtype == np.float64
    assert min(scores[:2]) > max(scores[2:]), scores
    # same answer for torch input, and for RGBA input (alpha dropped)
    np.testing.assert_allclose(get_selector(name)(torch.from_numpy(tissue_and_background)), scores)
    rgba = np.concatenate([tissue_and_background, np.full((4, 96, 96, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(get_selector(name)(rgba), scores)


@pytest.mark.parametrize("name", SELECTORS)
def test_each_selector_handles_grey_and_odd_sizes(name):
    rng = np.random.default_rng(1)
    tiles = rng.integers(0, 256, (3, 13, 7, 1), dtype=np.uint8)
    tiles[0] = 200
    scores = get_selector(name)(tiles)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    assert scores[0] <= scores[1:].min()


def test_otsu_background_only_batch_is_not_split():
    flat = np.clip(np.random.default_rng(2).normal(240, 2, (3, 32, 32, 3)), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(get_selector("otsu")(flat), 0.0)


def test_otsu_with_slide_threshold_is_batch_independent(tissue_and_background):
    threshold = otsu_grey_threshold(histology_image())
    assert 0 < threshold <= 220
    scorer = get_selector("otsu", threshold=threshold)
    whole = scorer(tissue_and_background)
    np.testing.assert_array_equal(np.concatenate([scorer(tissue_and_background[:1]), scorer(tissue_and_background[1:])]),
                                  whole)
    grey = grey_tiles(tissue_and_background)
    np.testing.assert_allclose(whole, (grey < threshold).mean(axis=(1, 2)))
    with pytest.raises(ValueError, match="takes no options"):
        get_selector("canny", threshold=3)


def test_get_selector_errors_and_score_tiles():
    with pytest.raises(ValueError, match="unknown selector 'sift'"):
        get_selector("sift")
    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    assert get_selector("shannon") is score_tiles
    assert grey_tiles(tiles).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        get_selector("gradient")(tiles.astype(np.float32))
