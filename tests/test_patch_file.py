"""isg.data.patch_file: the one owner of the per-slide patch file (round trip, schema 1 files, re-select, atomicity)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from isg.data.patch_file import (SCHEMA_VERSION, PatchGeometry, SlidePatches, is_complete, read_patch_file,
                                 write_patch_file)

GEOMETRY = PatchGeometry(patch_size=96, patch_level=1, patch_size_level0=192, downsample=2.0, level_dim=(640, 480),
                         mpp=0.5, local_size=32)
RULE = {"rule": "mean_std", "n_sigma": 1.0, "threshold": None, "k": None, "min_keep": 1}


def make_patches(n: int, selected, *, features: bool = True, d: int = 3, s: int = 3, damaged: int = 1) -> SlidePatches:
    """N tissue patches on a row, scores 0.5 * i, the given selection; feature row j = index of the j-th selected patch."""
    selected = np.asarray(selected, bool)
    tissue = np.stack([np.arange(n) * 192, np.full(n, 7)], 1)
    patches = SlidePatches(
        "slide-a", "/data/slide-a.svs", GEOMETRY, tissue, np.arange(n) * 0.5, selected,
        damaged_coords=[[192 * n, 7]] * damaged, damaged_reasons=["corrupt tile 3 of level 1: zeroed"] * damaged,
        options={"patch_size": 96, "local_size": 32, "mpp": 1.0, "level": None, "selector": "shannon", "tissue_min": 0.05},
        rule=RULE, cut=1.25, backend="tifffile", level0_mpp=0.25, dimensions=(1280, 960), isg_version="test")
    if features:
        rows = np.flatnonzero(selected).astype(np.float32)
        patches = patches.with_features(np.repeat(rows[:, None], d, 1), {"encoder": "isg-autoencoder-global", "d": d},
                                        np.broadcast_to(rows[:, None, None, None], (len(rows), s, s, d)).astype(np.float16),
                                        {"encoder": "isg-autoencoder-local", "d": d})
    return patches


def assert_same(a: SlidePatches, b: SlidePatches) -> None:
    for name in ("tissue_coords", "scores", "selected", "damaged_coords", "features", "local_features"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=name)
            assert x.dtype == y.dtype, name
    for name in ("slide_id", "slide_path", "geometry", "damaged_reasons", "options", "rule", "cut", "backend", "level0_mpp",
                 "dimensions", "feature_attrs", "local_feature_attrs"):
        assert getattr(a, name) == getattr(b, name), name


@pytest.mark.parametrize("n, selected", [(7, [0, 1, 0, 1, 1, 0, 1]), (7, [0] * 7), (1, [1]), (0, []), (5, [1] * 5)])
def test_round_trip_and_clam_trident_layout(tmp_path, n, selected):
    patches = make_patches(n, selected)
    write_patch_file(tmp_path / "a.h5", patches)
    back = read_patch_file(tmp_path / "a.h5")
    assert_same(patches, back)
    assert back.n_tissue == n and back.n_selected == sum(selected) and back.coords.shape == (sum(selected), 2)
    assert is_complete(tmp_path / "a.h5") and back.thumbnail is None  # the thumbnail lives in memory only
    with h5py.File(tmp_path / "a.h5") as f:  # what a CLAM / TRIDENT reader sees
        assert f["coords"].dtype == np.int64 and f["coords"].shape == (sum(selected), 2)
        attrs = f["coords"].attrs
        assert (attrs["patch_size"], attrs["patch_level"], attrs["patch_size_level0"]) == (96, 1, 192)
        np.testing.assert_array_equal(attrs["downsample"], [2.0, 2.0])
        assert f["features"].shape == (sum(selected), 3) and f["local_features"].shape == (sum(selected), 3, 3, 3)
        assert f.attrs["encoding-type"] == "isg-patches" and f.attrs["encoding-version"] == SCHEMA_VERSION
        assert json.loads(f.attrs["rule"]) == {**RULE, "cut": 1.25} and json.loads(f.attrs["options"])["selector"] == "shannon"


def test_read_without_features_keeps_them_on_disk(tmp_path):
    write_patch_file(tmp_path / "a.h5", make_patches(4, [1, 0, 1, 1]))
    light = read_patch_file(tmp_path / "a.h5", features=False)
    assert light.features is None and light.unread == ("features", "local_features") and light.has_features()
    assert light.feature_attrs["d"] == 3  # the encoder is known without the arrays
    with pytest.raises(ValueError, match="read without their features, local_features"):
        write_patch_file(tmp_path / "b.h5", light)
    with pytest.raises(ValueError, match="re-select needs them"):
        light.reselected(np.ones(4, bool), RULE, None)
    no_local = read_patch_file(tmp_path / "a.h5", local=False)
    assert no_local.features is not None and no_local.unread == ("local_features",) and not (tmp_path / "b.h5").exists()


def test_reselect_keeps_feature_rows_for_a_subset_and_drops_them_otherwise():
    patches = make_patches(7, [0, 1, 0, 1, 1, 0, 1])
    topk = {**RULE, "rule": "topk", "k": 2}
    subset, status = patches.reselected([0, 0, 0, 1, 0, 0, 1], topk, None)
    assert status == "kept" and subset.rule == topk and subset.cut is None
    np.testing.assert_array_equal(subset.features[:, 0], [3, 6])  # the rows of tissue patches 3 and 6
    np.testing.assert_array_equal(subset.local_features[:, 2, 1, 0], [3, 6])
    assert subset.feature_attrs == patches.feature_attrs
    wider, status = patches.reselected([1, 1, 0, 1, 1, 0, 1], RULE, 0.0)
    assert status == "dropped" and wider.features is None and wider.local_features is None and wider.feature_attrs == {}
    assert wider.n_selected == 5 and wider.cut == 0.0
    none, status = make_patches(7, [1] * 7, features=False).reselected([0] * 7, RULE, float("nan"))
    assert status == "none" and none.n_selected == 0 and none.cut is None
    with pytest.raises(ValueError, match="a selection of"):
        patches.reselected([1, 0], RULE, 0.0)


def test_inconsistent_patches_are_refused_naming_the_file(tmp_path):
    with pytest.raises(ValueError, match="slide-a: features has shape \\(2, 3\\) for 3 selected"):
        make_patches(5, [1, 1, 1, 0, 0], features=False).with_features(np.zeros((2, 3)), {})
    with pytest.raises(ValueError, match="scores has 3 rows for 4 tissue patches"):
        SlidePatches("x", None, None, np.zeros((4, 2)), np.zeros(3), np.ones(4, bool))
    path = write_patch_file(tmp_path / "a.h5", make_patches(4, [1, 0, 1, 0]))
    with h5py.File(path, "a") as f:  # damage: the selection no longer picks coords
        f["selected"][...] = [1, 1, 1, 0]
    with pytest.raises(ValueError, match="a.h5: 'selected' does not pick 'coords'"):
        read_patch_file(path)
    with h5py.File(path, "a") as f:
        f.attrs["encoding-version"] = "9"
    with pytest.raises(ValueError, match="a.h5: schema version '9' is newer"):
        read_patch_file(path)
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="text.h5: not a readable HDF5"):
        read_patch_file(tmp_path / "text.h5")
    assert not is_complete(tmp_path / "text.h5") and not is_complete(tmp_path / "absent.h5")
    with pytest.raises(FileNotFoundError, match="absent.h5: no such file"):
        read_patch_file(tmp_path / "absent.h5")


def test_a_failure_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = write_patch_file(tmp_path / "a.h5", make_patches(4, [1, 0, 1, 0]))
    before = path.read_bytes()
    create = h5py.Group.create_dataset

    def failing(self, name, *args, **kwargs):
        if name == "selected":
            raise OSError("disk full")
        return create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        write_patch_file(path, make_patches(6, [1] * 6))
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["a.h5"]


# ----------------------------------------------------------------------------- files of earlier versions


def write_schema1(path, n: int, selected, rule: str = "cohort", threshold: float = 2.5, k: int = -1, features: bool = True):
    """A patch file as isg preprocess + isg extract wrote it before schema 2: loose attrs on ``coords``."""
    selected = np.asarray(selected, bool)
    tissue = np.stack([np.arange(n) * 200, np.zeros(n)], 1).astype(np.int64)
    with h5py.File(path, "w") as f:
        f.attrs.update(slide_id=path.stem, slide_path="/data/old.svs", isg_version="0.9", backend="openslide",
                       level0_mpp=0.25, dimensions=np.asarray([4000, 3000]), n_damaged=1)
        f.create_dataset("coords", data=tissue[selected]).attrs.update(
            patch_size=100, patch_level=1, level0_patch_size=200, downsample=np.asarray([2.0, 2.0]),
            level_dim=np.asarray([2000, 1500]), mpp=0.5, local_size=25, selector="gradient", rule=rule,
            threshold=threshold, k=k, n_sigma=0.5, tissue_min=0.1, name=path.stem)
        f.create_dataset("all_coords", data=tissue)
        f.create_dataset("scores", data=np.linspace(0, 1, n))
        f.create_dataset("selected", data=selected)
        f.create_dataset("damaged_coords", data=np.asarray([[999, 999]]))
        f.create_dataset("damaged_reasons", data=np.asarray(["truncated tile"], dtype=object), dtype=h5py.string_dtype())
        if features:
            f.create_dataset("features", data=np.ones((selected.sum(), 4), np.float32)).attrs["encoder"] = "old"
            f.create_dataset("local_features", data=np.ones((selected.sum(), 4, 4, 2), np.float16))
    return path


@pytest.mark.parametrize("rule, threshold, k, expected", [
    ("cohort", 2.5, -1, {"rule": "cohort", "threshold": 2.5, "k": None}),
    ("mean_std", 0.7, -1, {"rule": "mean_std", "threshold": None, "k": None}),
    ("topk", float("nan"), 3, {"rule": "topk", "threshold": None, "k": 3}),
])
def test_schema1_files_load_and_upgrade_on_write(tmp_path, rule, threshold, k, expected):
    from isg.select import SelectionRule

    path = write_schema1(tmp_path / "old.h5", 6, [0, 1, 1, 0, 1, 0], rule, threshold, k)
    old = read_patch_file(path)
    assert old.slide_id == "old" and old.slide_path == "/data/old.svs" and old.backend == "openslide"
    assert old.geometry == PatchGeometry(100, 1, 200, 2.0, (2000, 1500), 0.5, 25) and old.dimensions == (4000, 3000)
    assert old.options == {"patch_size": 100, "local_size": 25, "selector": "gradient", "tissue_min": pytest.approx(0.1)}
    assert old.rule == {"n_sigma": 0.5, "min_keep": 1, **expected} and SelectionRule.from_dict(old.rule).rule == rule
    assert old.cut == (None if np.isnan(threshold) else threshold)
    assert old.n_selected == 3 and old.features.shape == (3, 4) and old.feature_attrs == {"encoder": "old"}
    assert old.damaged_reasons == ["truncated tile"] and old.level0_mpp == 0.25 and is_complete(path)
    write_patch_file(tmp_path / "new.h5", old)  # written back: schema 2, same content
    new = read_patch_file(tmp_path / "new.h5")
    assert_same(old, new)
    with h5py.File(tmp_path / "new.h5") as f:
        assert f.attrs["encoding-version"] == SCHEMA_VERSION and "selector" not in f["coords"].attrs


def test_clam_trident_feature_files_load_as_all_selected(tmp_path):
    with h5py.File(tmp_path / "trident.h5", "w") as f:  # coords + features only, TRIDENT's coords attrs
        f.create_dataset("coords", data=np.asarray([[0, 0], [512, 0], [0, 512]])).attrs.update(
            patch_size=256, patch_size_level0=512, patch_level=0, level0_magnification=40, target_magnification=20)
        f.create_dataset("features", data=np.eye(3, 5, dtype=np.float32))
    patches = read_patch_file(tmp_path / "trident.h5")
    assert patches.n_tissue == patches.n_selected == 3 and patches.scores is None and patches.rule is None
    assert patches.geometry == PatchGeometry(256, 0, 512, 2.0, None, None, None) and patches.slide_mpp is None
    np.testing.assert_array_equal(patches.features, np.eye(3, 5))
    assert not is_complete(tmp_path / "trident.h5")  # no 'selected': not a finished isg preprocess output
