"""isg.select: selection rules, default threshold, selectors behind one interface."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from isg.ops.shannon import shannon_bits
from isg.select import (DEFAULT_RULE, kept_record, robust_z_threshold, PAPER_THRESHOLD_BITS, RULE_KINDS, RULES, SELECTION_FILE, SELECTORS, Selection,
                        SelectionRule, SelectionWarning, apply_rule, cohort_threshold, default_threshold_bits,
                        get_selector, grey_tiles, mean_std_threshold, otsu_grey_threshold, read_scored, register_rule,
                        reselect_h5, select)
from tissue_samples import histology_image, textureless_tiles

SCORES = np.array([5.0, 1.0, 9.0, 3.0, 9.0, 0.0])


def test_threshold_rule():
    np.testing.assert_array_equal(select(SCORES, "threshold", threshold=3.0).keep, [1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(select(SCORES, SelectionRule("threshold", threshold=9.0)).keep, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(select(SCORES, "cohort", threshold=9.0).keep, [0, 0, 1, 0, 1, 0])  # a frozen cohort cut
    # nothing passes: min_keep keeps the best one (first of ties), unless disabled, and says so
    with pytest.warns(SelectionWarning, match=r"slide-7: rule 'threshold' keeps 0 of 6 tiles \(cut 100.*keeping the 1 best"):
        np.testing.assert_array_equal(select(SCORES, "threshold", threshold=100.0, name="slide-7").keep, [0, 0, 1, 0, 0, 0])
    with pytest.warns(SelectionWarning, match="keeping none"):
        np.testing.assert_array_equal(select(SCORES, "threshold", threshold=100.0, min_keep=0).keep, np.zeros(6, bool))
    with pytest.warns(SelectionWarning, match="keeps 2 of 6"):
        np.testing.assert_array_equal(select(SCORES, "threshold", threshold=9.0, min_keep=3).keep, [1, 0, 1, 0, 1, 0])
    assert select(SCORES, "threshold", threshold=3.0).keep.dtype == np.bool_


def test_topk_rule():
    np.testing.assert_array_equal(select(SCORES, "topk", k=1).keep, [0, 0, 1, 0, 0, 0])   # tie -> lower index
    np.testing.assert_array_equal(select(SCORES, "topk", k=3).keep, [1, 0, 1, 0, 1, 0])
    assert select(SCORES, "topk", k=100).keep.all()
    assert not select(SCORES, "topk", k=0, min_keep=0).keep.any()


def test_mean_std_rule():
    # mean 4.5, population std ~3.5 -> mean + 1 sigma ~ 8.0 keeps the two 9s
    np.testing.assert_array_equal(select(SCORES, "mean_std").keep, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(select(SCORES, "mean_std", n_sigma=0.0).keep, [1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(select(SCORES, "mean_std", n_sigma=-1.0).keep, [1, 1, 1, 1, 1, 0])
    assert mean_std_threshold(SCORES) == pytest.approx(4.5 + np.sqrt(((SCORES - 4.5) ** 2).mean()))
    # constant scores: nobody is above the mean, min_keep keeps one, and the warning says the scores saturate
    with pytest.warns(SelectionWarning, match="saturate: 100% of the 4 tiles share the maximum 1"):
        np.testing.assert_array_equal(select(np.ones(4), "mean_std").keep, [1, 0, 0, 0])


def test_saturated_otsu_scores_keep_nothing_under_mean_std_and_say_so():
    # the issue-9 artefact: tissue fractions saturate at 1.0, mean + sigma > 1 keeps nothing
    fractions = np.r_[np.ones(60), np.linspace(0.05, 0.95, 40)]
    with pytest.warns(SelectionWarning, match="saturate: 60% of the 100 tiles"):
        assert select(fractions, "mean_std").keep.sum() == 1
    assert select(fractions, get_selector("otsu").natural_rule).keep.sum() == 60 + (np.linspace(0.05, 0.95, 40) >= 0.5).sum()


def test_cohort_threshold_pools_slides():
    slides = [np.array([1.0, 2.0, 3.0]), np.array([10.0]), np.array([], np.float64)]
    pooled = np.array([1.0, 2.0, 3.0, 10.0])
    assert cohort_threshold(slides) == pytest.approx(pooled.mean() + pooled.std())
    assert cohort_threshold(slides, n_sigma=0.5) == pytest.approx(pooled.mean() + 0.5 * pooled.std())
    # one cut for every slide: the low slide keeps nothing above the cohort mean + sigma...
    cut = cohort_threshold(slides)
    with pytest.warns(SelectionWarning):
        assert select(slides[0], "cohort", threshold=cut).keep.sum() == 1  # ...min_keep steps in, loudly
    with pytest.raises(ValueError, match="no scores"):
        cohort_threshold([np.zeros(0)])
    with pytest.raises(ValueError, match="needs threshold"):
        select(SCORES, "cohort")


def test_rule_defaults_have_one_definition():
    from isg.cli import build_parser
    from isg.pipeline.preprocess import PreprocessOptions

    assert DEFAULT_RULE == SelectionRule() and DEFAULT_RULE.rule == "rank" and DEFAULT_RULE.share == pytest.approx(0.1587)
    assert DEFAULT_RULE.n_sigma == 1.0
    assert set(RULES) == {"mean_std", "cohort", "threshold", "topk", "rank", "robust_z"} == set(RULE_KINDS)
    assert list(SELECTORS) == ["shannon", "otsu", "gradient", "canny", "dog", "log"]
    # each selector carries its natural rule: Otsu tissue fraction >= 0.5, the others the paper's share by rank
    assert get_selector("otsu").natural_rule == SelectionRule("threshold", threshold=0.5)
    assert all(get_selector(name).natural_rule == DEFAULT_RULE for name in SELECTORS if name != "otsu")
    assert PreprocessOptions().rule is None and PreprocessOptions().selection_rule() == DEFAULT_RULE
    assert PreprocessOptions(selector="otsu").selection_rule() == get_selector("otsu").natural_rule
    for command in ("preprocess", "select"):  # no rule option given: the selector's natural rule
        args = build_parser().parse_args([command, "x", "--out", "y"] if command == "preprocess" else [command, "x"])
        assert args.rule is None and args.n_sigma is None and args.threshold is None and args.k is None
    from isg.cli._rules import rule_from_args

    assert rule_from_args(build_parser().parse_args(["select", "x", "--share", "0.3"])) == SelectionRule("rank", share=0.3)
    assert rule_from_args(build_parser().parse_args(["select", "x", "--rule", "robust_z", "--n-sigma", "2"])) == \
        SelectionRule("robust_z", n_sigma=2)


def test_select_returns_the_cut_it_applied():
    mean, std = SCORES.mean(), SCORES.std()
    assert select(SCORES, "mean_std").cut == pytest.approx(mean + std)
    assert select(SCORES, "mean_std", n_sigma=0.5).cut == pytest.approx(mean + 0.5 * std)
    assert select(SCORES, "threshold", threshold=3.0).cut == 3.0
    assert select(SCORES, SelectionRule("cohort", threshold=9.0)).cut == 9.0
    assert select(SCORES, "topk", k=2).cut is None  # rank-based: no absolute cut
    keep, cut = select(SCORES, "mean_std")  # a NamedTuple
    assert isinstance(select(SCORES), Selection) and keep.sum() == 2 and cut == pytest.approx(mean + std)
    assert select(SCORES).cut is None and select(SCORES).keep.sum() == 1  # the default: rank, ceil(0.1587 * 6) = 1
    with pytest.warns(SelectionWarning):  # the rule's own cut, also when min_keep stepped in
        assert select(SCORES, "threshold", threshold=100.0).cut == 100.0
    with pytest.raises(TypeError, match="inside the SelectionRule"):
        select(SCORES, DEFAULT_RULE, k=3)


@pytest.mark.parametrize("rule", [SelectionRule(), SelectionRule("cohort", n_sigma=0.5, threshold=3.25),
                                  SelectionRule("topk", k=7, min_keep=0), SelectionRule("threshold", threshold=np.float64(2.5))])
def test_rule_serialises_to_json_and_back(rule):
    import json

    data = json.loads(json.dumps(rule.to_dict()))
    assert SelectionRule.from_dict(data) == rule and type(data["n_sigma"]) is float
    with pytest.raises(ValueError, match="unknown selection rule key.*: cut"):
        SelectionRule.from_dict({**data, "cut": 1.0})


def test_cohort_rule_freezes_over_slides():
    per_slide = [np.array([1.0, 2.0]), np.array([3.0, 10.0])]
    pending = SelectionRule("cohort", n_sigma=0.5)
    assert pending.pending and not SelectionRule("threshold").pending and not DEFAULT_RULE.pending
    frozen = pending.frozen_over(per_slide)
    assert not frozen.pending and frozen.threshold == pytest.approx(cohort_threshold(per_slide, 0.5))
    assert frozen.frozen_over([np.zeros(3)]) is frozen  # a frozen cut never moves


def test_adding_a_rule_kind_is_one_decorator():
    @register_rule("above_median", description="keep scores above the median")
    def above_median(scores, rule):
        cut = float(np.median(scores))
        return scores > cut, cut

    try:
        assert "above_median" in RULES  # the CLIs list it (live view of the registry)
        rule = SelectionRule("above_median")
        assert SelectionRule.from_dict(rule.to_dict()) == rule
        np.testing.assert_array_equal(select(SCORES, rule).keep, [1, 0, 1, 0, 1, 0])
        assert select(SCORES, rule).cut == 4.0
        with pytest.raises(ValueError, match="registered twice"):
            register_rule("above_median")(above_median)
    finally:
        RULE_KINDS.pop("above_median")
    with pytest.raises(ValueError, match="unknown rule"):
        SelectionRule("above_median")


@pytest.mark.parametrize("n", [0, 1, 7])
@pytest.mark.parametrize("rule", [SelectionRule("threshold", threshold=1.0), SelectionRule("topk", k=2), DEFAULT_RULE,
                                  SelectionRule("mean_std"), SelectionRule("robust_z"), SelectionRule("cohort", threshold=5.0)],
                         ids=lambda r: r.rule)
def test_odd_sizes(n, rule):
    scores = np.arange(n, dtype=np.float64)[::-1] * 1.5  # distinct, best first
    median = np.median(scores) if n else 0.0
    expected = {"threshold": scores >= 1.0, "cohort": scores >= 5.0, "topk": np.arange(n) < 2,
                "rank": np.arange(n) < np.ceil(0.1587 * n - 1e-9),
                "robust_z": scores > median + 1.4826 * np.median(np.abs(scores - median)) if n else np.zeros(0, bool),
                "mean_std": scores > scores.mean() + scores.std() if n else np.zeros(0, bool)}[rule.rule]
    if n and not expected.any():
        expected = np.arange(n) < 1  # min_keep = 1: the best one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SelectionWarning)
        keep, cut = select(scores, rule)
    np.testing.assert_array_equal(keep, expected)
    assert keep.dtype == np.bool_ and (cut is None) == (rule.rule in ("topk", "rank") or (n == 0 and rule.rule in ("mean_std", "robust_z")))


@pytest.mark.parametrize("kwargs,match", [
    ({"rule": "threshold"}, "needs threshold"),
    ({"rule": "topk"}, "k="),
    ({"rule": "topk", "k": 1.5}, "k="),
    ({"rule": "best"}, "unknown rule"),
    ({"rule": "topk", "k": 1, "min_keep": -1}, "min_keep"),
    ({"rule": "mean_std", "n_sigma": float("nan")}, "n_sigma"),
    ({"rule": "threshold", "threshold": float("inf")}, "threshold"),
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
    assert (shannon_bits(tissue) > threshold).all()
    # solid colours and blurred tissue fall below it (noisy background need not: see docs/selection.md)
    smooth = [i for i, name in enumerate(names) if name.startswith(("solid", "blur"))]
    assert len(smooth) == 5 and (shannon_bits(flat[smooth]) < threshold).all()


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
    scorer = get_selector("otsu").for_slide(histology_image())  # the per-slide preparation hook
    whole = scorer(tissue_and_background)
    np.testing.assert_array_equal(np.concatenate([scorer(tissue_and_background[:1]), scorer(tissue_and_background[1:])]),
                                  whole)
    grey = grey_tiles(tissue_and_background)
    np.testing.assert_allclose(whole, (grey <= threshold).mean(axis=(1, 2)))
    np.testing.assert_array_equal(get_selector("otsu")(tissue_and_background, threshold=threshold), whole)
    assert get_selector("canny").for_slide(histology_image()) is get_selector("canny").score  # no hook: no options


def test_get_selector_errors_and_shannon():
    with pytest.raises(ValueError, match="unknown selector 'sift'"):
        get_selector("sift")
    tiles = np.zeros((2, 8, 8, 3), np.uint8)
    assert get_selector("shannon").score is shannon_bits and get_selector("shannon").unit == "bits"
    assert get_selector("shannon").rule_for(SelectionRule("threshold"), 256).threshold == default_threshold_bits(256)
    with pytest.raises(ValueError, match="explicit threshold"):
        get_selector("dog").rule_for(SelectionRule("threshold"), 256)
    assert get_selector("dog").rule_for(None, 256) == DEFAULT_RULE
    assert grey_tiles(tiles).shape == (2, 8, 8)
    with pytest.raises(ValueError, match="uint8"):
        get_selector("gradient")(tiles.astype(np.float32))


# ----------------------------------------------------------------------------- stored scores (isg select)


def _write_h5(path, scores, selected, selector="shannon", patch_size=128, features=True):
    """A preprocess output as isg preprocess + isg extract write it: features row i <-> i-th selected patch."""
    from isg.data.patch_file import PatchGeometry, SlidePatches, write_patch_file

    scores, selected = np.asarray(scores, np.float64), np.asarray(selected, bool)
    tissue = np.stack([np.arange(len(scores)) * patch_size, np.zeros(len(scores))], 1).astype(np.int64)
    patches = SlidePatches(path.stem, "/nowhere.tif", PatchGeometry(patch_size, 0, patch_size, 1.0, None, 0.5, 32),
                           tissue, scores, selected, options={"patch_size": patch_size, "selector": selector},
                           rule=DEFAULT_RULE.to_dict(), cut=0.0)
    if features:
        rows = np.flatnonzero(selected).astype(np.float32)  # feature = index of its patch in the tissue patches
        patches = patches.with_features(np.repeat(rows[:, None], 3, 1), {"encoder": "test"},
                                        np.repeat(rows[:, None, None, None], 2, 3).repeat(2, 1).repeat(2, 2).astype(np.float16))
    write_patch_file(path, patches)
    return path


def test_reselect_keeps_matching_features_for_a_subset(tmp_path):
    from isg.data.patch_file import read_patch_file

    path = _write_h5(tmp_path / "a.h5", [5, 1, 9, 3, 8, 0], [1, 0, 1, 1, 1, 0])
    result = reselect_h5(path, SelectionRule("topk", k=2), tmp_path / "out" / "a.h5")
    assert result == {"slide_id": "a", "n_tissue": 6, "n_kept": 2, "kept_fraction": 2 / 6, "under_floor": True, "features": "kept"}
    out = read_patch_file(tmp_path / "out" / "a.h5")
    np.testing.assert_array_equal(out.selected, [0, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(out.coords[:, 0], [2 * 128, 4 * 128])
    np.testing.assert_array_equal(out.features[:, 0], [2, 4])  # the rows of patches 2 and 4
    np.testing.assert_array_equal(out.local_features[:, 0, 0, 0], [2, 4])
    assert out.feature_attrs["encoder"] == "test" and out.slide_id == "a"
    assert SelectionRule.from_dict(out.rule) == SelectionRule("topk", k=2) and out.cut is None
    assert out.geometry.patch_size == 128
    # a selection outside the old one cannot reuse features: they are dropped, in place
    assert reselect_h5(path, SelectionRule("threshold", threshold=1.0))["features"] == "dropped"
    out = read_patch_file(path)
    assert out.features is None and out.local_features is None and out.coords.shape == (5, 2) and out.cut == 1.0


def test_apply_cohort_rule_freezes_one_cut_and_records_it(tmp_path):
    import json

    low = _write_h5(tmp_path / "low.h5", [1.0, 2.0, 3.0], [0, 0, 1], features=False)
    high = _write_h5(tmp_path / "high.h5", [6.0, 8.0, 10.0, 12.0], [0, 0, 1, 1], features=False)
    pooled = np.array([1.0, 2.0, 3.0, 6.0, 8.0, 10.0, 12.0])
    with pytest.warns(SelectionWarning, match="low.h5: rule 'cohort' keeps 0 of 3"):
        record = apply_rule([low, high], SelectionRule("cohort"))
    cut = pooled.mean() + pooled.std()
    assert record["threshold"] == pytest.approx(cut) and record["rule"]["threshold"] == pytest.approx(cut)
    assert record["slides"]["high"]["n_kept"] == 2 and record["slides"]["low"]["n_kept"] == 1
    assert record["kept_per_slide"] == {"mean": 1.5, "min": 1, "max": 2} and record["threshold_unit"] == "bits"
    assert json.loads((tmp_path / SELECTION_FILE).read_text()) == record
    assert read_scored(high).cut == pytest.approx(cut) and read_scored(high).rule["rule"] == "cohort"
    # a new slide is cut at the frozen threshold: it never moves it
    (tmp_path / "new").mkdir()
    new = _write_h5(tmp_path / "new" / "new.h5", [9.0, 100.0, 200.0], [1, 1, 1], features=False)
    frozen = SelectionRule(**record["rule"])
    assert apply_rule([new], frozen)["threshold"] == pytest.approx(cut)
    assert read_scored(new).cut == pytest.approx(cut)


def test_apply_rule_refuses_mixed_scales_and_bad_files(tmp_path):
    a = _write_h5(tmp_path / "a.h5", [1.0, 2.0], [1, 1], selector="shannon")
    b = _write_h5(tmp_path / "b.h5", [0.5, 0.9], [1, 1], selector="otsu")
    with pytest.raises(ValueError, match="mix selectors"):
        apply_rule([a, b], SelectionRule("cohort"))
    (tmp_path / "c.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="c.h5: not a readable HDF5"):
        apply_rule([a, tmp_path / "c.h5"], SelectionRule("cohort"))
    with pytest.raises(ValueError, match="no .h5 files"):
        apply_rule([], SelectionRule())


def test_isg_select_cli(tmp_path, capsys):
    import json

    from isg.cli import main

    (tmp_path / "train").mkdir()
    for name, scores in (("s1", [1.0, 5.0, 9.0]), ("s2", [2.0, 3.0, 4.0, 20.0])):
        _write_h5(tmp_path / "train" / f"{name}.h5", scores, np.ones(len(scores), bool))
    assert main(["select", str(tmp_path / "train"), "--rule", "cohort"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["rule"]["rule"] == "cohort" and record["n_scored"] == 7
    (tmp_path / "new").mkdir()
    _write_h5(tmp_path / "new" / "n1.h5", [0.0, 30.0], [1, 1])
    assert main(["select", str(tmp_path / "new"), "--from-selection", str(tmp_path / "train" / SELECTION_FILE)]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(record["threshold"])
    assert main(["select", str(tmp_path / "new"), "--rule", "topk", "--top-k", "1", "--out", str(tmp_path / "k1")]) == 0
    assert json.loads(capsys.readouterr().out)["kept_per_slide"]["max"] == 1
    assert main(["select", str(tmp_path / "nothing")]) == 2
    assert main(["select", str(tmp_path / "new"), "--rule", "threshold"]) == 2
    assert "needs --threshold" in capsys.readouterr().err


def test_preprocess_cohort_rule_freezes_cut_and_predict_reuses_it(tmp_path):
    import json

    from isg.io.synth import make_cohort
    from isg.pipeline.predict import new_slide_options
    from isg.pipeline.preprocess import preprocess_cohort, preprocess_slide
    from isg.train.expression import write_pipeline

    cohort = make_cohort(tmp_path / "c", n_slides=3, size=768, genes=3, seed=1)
    preprocess_cohort(cohort.slides[:2], tmp_path / "p", patch_size=128, local_size=32, rule="cohort", progress=False)
    record = json.loads((tmp_path / "p" / SELECTION_FILE).read_text())
    stored = [read_scored(tmp_path / "p" / f"{s.stem}.h5") for s in cohort.slides[:2]]
    assert record["threshold"] == pytest.approx(cohort_threshold([p.scores for p in stored]))
    assert stored[0].rule["rule"] == "cohort" and stored[0].cut == pytest.approx(record["threshold"])
    assert stored[0].rule["threshold"] == pytest.approx(record["threshold"])
    # what isg train records in pipeline.json and isg predict reuses on new slides
    write_pipeline(tmp_path / "train", tmp_path / "p", cohort.slides[0].stem)
    options = new_slide_options(json.loads((tmp_path / "train" / "pipeline.json").read_text()))
    assert options["rule"] == SelectionRule.from_dict(stored[0].rule) and options["patch_size"] == 128
    preprocess_slide(cohort.slides[2], tmp_path / "new", **options)
    new = read_scored(tmp_path / "new" / f"{cohort.slides[2].stem}.h5")
    assert new.cut == pytest.approx(record["threshold"])  # a new slide does not move the cut
    if (new.scores >= new.cut).any():  # (else min_keep keeps the best one, with a warning)
        np.testing.assert_array_equal(new.selected, new.scores >= new.cut)


# ----------------------------------------------------------------------------- rank and robust z


@pytest.mark.parametrize("n, kept", [(1, 1), (6, 1), (7, 2), (12, 2), (100, 16), (1001, 159)])
def test_rank_keeps_the_share_mean_plus_sigma_keeps_of_normal_scores(n, kept):
    scores = np.random.default_rng(n).permutation(n).astype(float)  # distinct: the best are n - 1, n - 2, ...
    keep = select(scores, DEFAULT_RULE).keep
    assert keep.sum() == kept == np.ceil(0.1587 * n - 1e-9)
    assert set(scores[keep]) == set(range(n - kept, n))
    assert select(np.ones(5), SelectionRule("rank", share=0.4)).keep.tolist() == [True, True, False, False, False]  # ties by index
    assert select(scores, SelectionRule("rank", share=1.0)).keep.all()


def test_rank_survives_skew_where_mean_plus_sigma_does_not():
    """Normal scores: mean + 1 sigma and rank keep the same share. Left-skewed ones (a bulk near the top, a long lower
    tail, as real tissue): mean + 1 sigma keeps almost nothing, rank keeps 15.87 %, robust z in between."""
    rng = np.random.default_rng(0)
    normal = rng.normal(size=20000)
    shares = {rule: select(normal, rule).keep.mean() for rule in ("mean_std", "rank", "robust_z")}
    assert shares == pytest.approx({"mean_std": 0.1587, "rank": 0.1587, "robust_z": 0.1587}, abs=0.01)
    skewed = -rng.lognormal(0, 1.0, 20000)  # skew about -6
    assert select(skewed, "mean_std").keep.mean() < 0.08
    assert select(skewed, "rank").keep.mean() == pytest.approx(0.1587, abs=1e-4)


def test_robust_z_known_answers():
    scores = np.array([1.0, 2.0, 3.0, 4.0, 100.0])  # median 3, MAD 1
    assert robust_z_threshold(scores) == pytest.approx(3 + 1.4826)
    assert select(scores, "robust_z").keep.tolist() == [False, False, False, False, True]
    assert select(scores, "robust_z", n_sigma=0.5).keep.tolist() == [False, False, False, True, True]
    selection = select(scores, SelectionRule("robust_z", n_sigma=2))
    assert selection.cut == pytest.approx(3 + 2 * 1.4826)
    with pytest.warns(SelectionWarning, match="robust_z"):  # a constant slide: MAD 0, nothing strictly above
        assert select(np.full(4, 2.0), "robust_z").keep.sum() == 1


def test_rank_rule_round_trips_and_is_checked():
    rule = SelectionRule("rank", share=0.3)
    assert SelectionRule.from_dict(json.loads(json.dumps(rule.to_dict()))) == rule
    for bad in (0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="share"):
            SelectionRule("rank", share=bad)


def test_floor_guard_names_the_slide_and_records_the_kept_share(tmp_path):
    """A rule that keeps 2 patches of a slide: a warning names the slide, and the kept share is on the record (h5 attrs,
    summary.json); the default rule keeps the paper's share and stays above the floor."""
    import h5py

    from isg.io.synth import make_cohort
    from isg.pipeline.preprocess import preprocess_cohort

    cohort = make_cohort(tmp_path / "c", n_slides=2, size=768, tile=128, genes=3, seed=2)
    with pytest.warns(SelectionWarning, match="under the floor") as caught:
        preprocess_cohort(cohort.slides, tmp_path / "two", patch_size=64, local_size=16, rule=SelectionRule("topk", k=2),
                          thumbnail=False, progress=False, workers=1)
    messages = " ".join(str(w.message) for w in caught)
    assert all(slide.stem in messages for slide in cohort.slides)
    items = json.loads((tmp_path / "two" / "summary.json").read_text())["items"]
    for item in items:
        stats = item["stats"]
        assert stats["under_floor"] is True and stats["kept_fraction"] == pytest.approx(2 / stats["n_tissue"])
        with h5py.File(tmp_path / "two" / f"{item['name']}.h5") as f:
            assert f.attrs["kept_fraction"] == pytest.approx(2 / stats["n_tissue"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", SelectionWarning)  # the default rule is not under the floor here
        preprocess_cohort(cohort.slides, tmp_path / "default", patch_size=64, local_size=16, thumbnail=False, progress=False)
    for item in json.loads((tmp_path / "default" / "summary.json").read_text())["items"]:
        assert item["stats"]["under_floor"] is False and item["stats"]["kept_fraction"] == pytest.approx(0.1587, abs=0.02)
    assert kept_record(np.ones(10, bool)) == {"kept_fraction": 1.0, "under_floor": False}
    with pytest.warns(SelectionWarning, match="slide-x: the selection keeps 7 of 7"):  # fewer than 8 patches
        assert kept_record(np.ones(7, bool), name="slide-x")["under_floor"]


@pytest.mark.parametrize("n", [0, 1, 7, 100, 1001])
@pytest.mark.parametrize("rule", [SelectionRule("rank"), SelectionRule("rank", share=0.5, min_keep=3), SelectionRule("topk", k=5),
                                  SelectionRule("topk", k=0, min_keep=2), SelectionRule("mean_std"), SelectionRule("robust_z")])
def test_most_kept_bounds_what_the_rule_keeps(n, rule):
    """Exact for the count kinds (what the tile arena sizes itself by), n for the kinds that cut at a score."""
    scores = np.random.default_rng(n).gamma(2.0, size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # min_keep stepping in
        kept = int(select(scores, rule).keep.sum()) if n else 0
    assert kept <= rule.most_kept(n)
    if rule.kind.count is not None:
        assert rule.most_kept(n) == kept
    else:
        assert rule.most_kept(n) == n
