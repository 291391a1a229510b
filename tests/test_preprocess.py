"""isg.pipeline.preprocess + ``isg preprocess``: h5 layout, selection rules, bad slides, resume, kill, Dask, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from isg.cli import main as cli_main
from isg.data.patch_file import is_complete as h5_complete
from isg.pipeline.preprocess import preprocess_cohort, preprocess_slide
from isg.io import SlideError
from isg.select import SelectionRule

P, Q = 128, 32  # small global / local patches for fast tests
TOP5 = SelectionRule("topk", k=5)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from isg.io.synth import make_cohort

    return make_cohort(tmp_path_factory.mktemp("synth"), n_slides=3, size=(1100, 900), tile=128, seed=3)


@pytest.fixture(scope="module")
def bad_slides(tmp_path_factory):
    from isg.io.synth import make_bad_slides

    return make_bad_slides(tmp_path_factory.mktemp("bad"))


def read_h5(path) -> dict:
    with h5py.File(path, "r") as f:
        data = {name: f[name][()] for name in f}
        data["attrs"] = dict(f.attrs)
        data["coords_attrs"] = dict(f["coords"].attrs)
    data["options"], data["rule"] = json.loads(data["attrs"]["options"]), json.loads(data["attrs"]["rule"])
    return data


def same_outputs(dir_a, dir_b, names) -> None:
    for name in names:
        a, b = read_h5(Path(dir_a) / f"{name}.h5"), read_h5(Path(dir_b) / f"{name}.h5")
        for key in ("coords", "all_coords", "scores", "selected"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
        assert a["coords_attrs"].keys() == b["coords_attrs"].keys()


@pytest.mark.parametrize("rule, extra", [("mean_std", {}), ("mean_std", {"n_sigma": 0.5}), ("threshold", {}),
                                         ("threshold", {"threshold": 0.0}), ("topk", {"k": 5})])
def test_h5_layout_and_selection_follow_rule(cohort, tmp_path, rule, extra):
    from isg.select import default_threshold_bits

    slide = cohort.slides[0]
    stats = preprocess_slide(slide, tmp_path, patch_size=P, local_size=Q, rule=SelectionRule(rule, **extra))
    out = read_h5(tmp_path / f"{slide.stem}.h5")
    coords, all_coords, scores, selected = out["coords"], out["all_coords"], out["scores"], out["selected"]
    n = len(all_coords)
    assert coords.dtype == np.int64 and all_coords.dtype == np.int64 and coords.shape[1:] == (2,)
    assert scores.dtype == np.float64 and scores.shape == (n,) and selected.dtype == bool and selected.shape == (n,)
    np.testing.assert_array_equal(coords, all_coords[selected])
    assert stats["n_tissue"] == n > 0 and stats["n_kept"] == len(coords) >= 1
    assert len(np.unique(all_coords, axis=0)) == n and (all_coords >= 0).all()
    assert (all_coords[:, 0] < 1100).all() and (all_coords[:, 1] < 900).all()

    attrs = out["coords_attrs"]  # the geometry, with CLAM / TRIDENT names
    assert attrs["patch_size"] == P and attrs["local_size"] == Q and attrs["patch_level"] == 0
    assert attrs["patch_size_level0"] == P and attrs["mpp"] == pytest.approx(0.5)
    assert out["options"]["selector"] == "shannon" and out["options"]["patch_size"] == P and out["rule"]["rule"] == rule
    assert out["attrs"]["slide_id"] == slide.stem and out["attrs"]["slide_path"] == str(slide.resolve())
    assert out["attrs"]["isg_version"] and out["attrs"]["encoding-version"] == "2"

    if rule == "mean_std":
        cut = scores.mean() + extra.get("n_sigma", 1.0) * scores.std()
        assert out["rule"]["cut"] == pytest.approx(cut)
        np.testing.assert_array_equal(selected, scores > cut)
    elif rule == "threshold":
        cut = extra.get("threshold", default_threshold_bits(P))
        assert out["rule"]["cut"] == out["rule"]["threshold"] == pytest.approx(cut)  # the default cut, recorded
        expected = scores >= cut
        if not expected.any():  # min_keep=1: the best patch is kept
            expected = scores == scores.max()
        np.testing.assert_array_equal(selected, expected)
    else:
        assert selected.sum() == 5 and scores[selected].min() >= scores[~selected].max()
        assert out["rule"]["cut"] is None and out["rule"]["k"] == 5


def test_scores_are_the_selector_on_the_read_tiles(cohort, tmp_path):
    from isg.io import open_slide
    from isg.select import get_selector

    slide_path = cohort.slides[1]
    preprocess_slide(slide_path, tmp_path, patch_size=P, local_size=Q, selector="gradient", thumbnail=False)
    out = read_h5(tmp_path / f"{slide_path.stem}.h5")
    pick = np.linspace(0, len(out["all_coords"]) - 1, 4).astype(int)
    with open_slide(slide_path) as slide:
        tiles = np.stack([slide.read_region(tuple(out["all_coords"][i]), 0, (P, P)) for i in pick])
    np.testing.assert_allclose(out["scores"][pick], get_selector("gradient")(tiles), rtol=1e-6)
    assert not (tmp_path / f"{slide_path.stem}.png").exists()


@pytest.mark.parametrize("patch_size, local_size", [(96, 32), (60, 20)])
def test_reduced_level_and_odd_sizes(cohort, tmp_path, patch_size, local_size):
    from isg.io import open_slide

    slide_path = cohort.slides[2]
    with open_slide(slide_path) as slide:
        downsample = slide.level_downsamples[1]
        level_mpp = slide.level_mpp(1)
    stats = preprocess_slide(slide_path, tmp_path, patch_size=patch_size, local_size=local_size, mpp=level_mpp * 1.2)
    attrs = read_h5(tmp_path / f"{slide_path.stem}.h5")["coords_attrs"]
    read_size = round(patch_size * 1.2)  # read at level 1 (the coarsest at least as fine), resized to p
    assert stats["level"] == 1 and attrs["patch_level"] == 1 and attrs["patch_size_level"] == read_size == stats["read_size"]
    assert attrs["mpp"] == pytest.approx(level_mpp * read_size / patch_size) == pytest.approx(level_mpp * 1.2, rel=0.02)
    assert attrs["patch_size_level0"] == round(read_size * downsample) and attrs["patch_size"] == patch_size
    assert attrs["target_magnification"] == pytest.approx(10 / attrs["mpp"])


def test_thumbnail_marks_kept_and_dropped(cohort, tmp_path):
    from PIL import Image

    slide = cohort.slides[0]
    preprocess_slide(slide, tmp_path, patch_size=P, local_size=Q)
    image = np.asarray(Image.open(tmp_path / f"{slide.stem}.png").convert("RGB")).astype(int)
    assert max(image.shape[:2]) == 1024 and abs(image.shape[1] / image.shape[0] - 1100 / 900) < 0.01
    red = (image[..., 0] > 180) & (image[..., 1] < 60) & (image[..., 2] < 60)
    green = (image[..., 1] > 120) & (image[..., 0] < 60) & (image[..., 2] < 60)
    assert red.sum() > 100 and green.sum() > 100


def test_bad_slides_reported_and_good_ones_finish(cohort, bad_slides, tmp_path):
    slides = [cohort.slides[0], *bad_slides.values()]
    summary = preprocess_cohort(slides, tmp_path, patch_size=P, local_size=Q, progress=False)
    bad = {"corrupt", "truncated", "unsupported", "tiny", "no_mpp"}
    assert {r.name for r in summary.failed} == bad and {r.name for r in summary.done} == {cohort.slides[0].stem, "good"}
    errors = {r.name: r.error for r in summary.failed}
    assert all(str(bad_slides[name]) in errors[name] for name in bad)  # messages name the file
    assert "mpp" in errors["no_mpp"] and "small" in errors["tiny"]
    assert sorted(p.name for p in tmp_path.glob("*.h5")) == sorted([f"{cohort.slides[0].stem}.h5", "good.h5"])
    assert not list(tmp_path.glob(".*"))  # no temp files left behind
    assert summary.totals["n_tissue"] == sum(r.stats["n_tissue"] for r in summary.done)
    # the missing mpp can be given
    assert preprocess_slide(bad_slides["no_mpp"], tmp_path, patch_size=P, local_size=Q, slide_mpp=0.5)["n_kept"] >= 1


def test_rerun_skips_finished_slides_and_redoes_foreign_files(cohort, tmp_path):
    names = [s.stem for s in cohort.slides]
    preprocess_cohort(cohort.slides[:2], tmp_path, patch_size=P, local_size=Q, progress=False)
    first = tmp_path / f"{names[0]}.h5"
    mtime = first.stat().st_mtime_ns
    (tmp_path / f"{names[1]}.h5").write_bytes(b"not hdf5 at all")  # e.g. a file copied in by hand, damaged
    summary = preprocess_cohort(cohort.slides, tmp_path, patch_size=P, local_size=Q, progress=False)
    assert [r.name for r in summary.skipped] == [names[0]] and {r.name for r in summary.done} == set(names[1:])
    assert first.stat().st_mtime_ns == mtime
    assert summary.skipped[0].stats["n_tissue"] > 0  # carried over from the previous summary.json
    assert all(h5_complete(tmp_path / f"{n}.h5") for n in names)
    summary = preprocess_cohort(cohort.slides, tmp_path, patch_size=P, local_size=Q, progress=False, overwrite=True)
    assert len(summary.done) == 3 and first.stat().st_mtime_ns != mtime


KILL_SCRIPT = """
import os, signal, sys
import h5py
from isg.pipeline.preprocess import preprocess_cohort

victim = sys.argv[3]
create = h5py.Group.create_dataset
def dying_create(self, name, *args, **kw):
    if name == "scores" and self.file.attrs.get("slide_id") == victim:
        self.file.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of writing the victim's h5
    return create(self, name, *args, **kw)
h5py.Group.create_dataset = dying_create
preprocess_cohort(sys.argv[1].split(","), sys.argv[2], patch_size=128, local_size=32, workers=1, progress=False)
"""


def test_resume_after_kill_mid_write(cohort, tmp_path):
    slides = cohort.slides[:2]
    victim = slides[1].stem
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_SCRIPT), ",".join(map(str, slides)),
                          str(tmp_path), victim], capture_output=True, text=True, timeout=120)
    assert run.returncode == -9, run.stderr
    finished = tmp_path / f"{slides[0].stem}.h5"
    assert h5_complete(finished) and not (tmp_path / f"{victim}.h5").exists()
    partial = list(tmp_path.glob(f".{victim}.*.h5"))
    assert len(partial) == 1  # the killed write's temp file is there ...
    mtime = finished.stat().st_mtime_ns
    summary = preprocess_cohort(slides, tmp_path, patch_size=P, local_size=Q, progress=False)
    assert [r.name for r in summary.skipped] == [slides[0].stem] and [r.name for r in summary.done] == [victim]
    assert finished.stat().st_mtime_ns == mtime and h5_complete(tmp_path / f"{victim}.h5")
    assert not partial[0].exists() and not list(tmp_path.glob(".*"))  # ... and never taken for an output


def test_failure_mid_write_leaves_no_output(cohort, tmp_path, monkeypatch):
    create = h5py.Group.create_dataset

    def failing_create(self, name, *args, **kw):
        if name == "selected":
            raise OSError("disk full")
        return create(self, name, *args, **kw)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing_create)
    with pytest.raises(OSError, match="disk full"):
        preprocess_slide(cohort.slides[0], tmp_path, patch_size=P, local_size=Q, thumbnail=False)
    assert list(tmp_path.iterdir()) == []
    summary = preprocess_cohort(cohort.slides[:1], tmp_path, patch_size=P, local_size=Q, thumbnail=False, progress=False)
    assert summary.failed[0].error_type == "OSError" and not list(tmp_path.glob("*.h5"))


def test_dask_local_cluster_same_outputs_as_threads(cohort, tmp_path):
    distributed = pytest.importorskip("distributed")
    names = [s.stem for s in cohort.slides]
    preprocess_cohort(cohort.slides, tmp_path / "threads", patch_size=P, local_size=Q, progress=False, thumbnail=False)
    with distributed.LocalCluster(host="127.0.0.1", protocol="tcp", n_workers=1, threads_per_worker=1,
                                  processes=True, dashboard_address=None) as cluster:
        summary = preprocess_cohort(cohort.slides, tmp_path / "dask", scheduler=cluster.scheduler_address,
                                    patch_size=P, local_size=Q, progress=False, thumbnail=False)
    assert summary.ok and len(summary.done) == 3 and summary.scheduler.startswith("dask"), summary.to_dict()
    same_outputs(tmp_path / "threads", tmp_path / "dask", names)


# ----------------------------------------------------------------------------- CLI


def test_cli_end_to_end_with_manifest_and_failures(cohort, bad_slides, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["preprocess", "--manifest", str(cohort.manifest), "--out", str(out), "--patch-size", "128",
            "--local-size", "32", "--quiet"]
    assert cli_main(args) == 0
    assert sorted(p.stem for p in out.glob("*.h5")) == sorted(s.stem for s in cohort.slides)
    assert cli_main(args + [str(bad_slides["corrupt"])]) == 1
    err = capsys.readouterr().err
    assert "1 of 4 slide(s) failed" in err and "corrupt" in err and str(bad_slides["corrupt"]) in err
    assert cli_main(["preprocess", str(cohort.slides[0]), "--out", str(tmp_path / "topk"), "--patch-size", "128",
                     "--local-size", "32", "--top-k", "3", "--quiet"]) == 0
    assert read_h5(tmp_path / "topk" / f"{cohort.slides[0].stem}.h5")["coords"].shape == (3, 2)


@pytest.mark.parametrize("extra, message", [
    ([], "no slides given"),
    (["missing.svs"], "not found: missing.svs"),
    (["SLIDE", "--local-size", "48"], "must divide patch_size"),
    (["SLIDE", "--selector", "sharpness"], "unknown selector"),
    (["SLIDE", "--rule", "topk"], "needs k"),
    (["SLIDE", "--rule", "threshold", "--selector", "otsu"], "explicit threshold"),
    (["SLIDE", "--mpp", "0.5", "--level", "1"], "either mpp or level"),
    (["SLIDE", "--workers", "0"], "--workers"),
    (["SLIDE", "--resources", "GPU"], "--resources"),
    (["SLIDE", "SLIDE"], "given twice"),
    (["--manifest", "nope.csv"], "no such file"),
    pytest.param(["SLIDE", "--device", "cuda"], "no CUDA device", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="a CUDA device is available")),
])
def test_cli_bad_arguments_exit_2(cohort, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(tmp_path)
    extra = [str(cohort.slides[0]) if a == "SLIDE" else a for a in extra]
    assert cli_main(["preprocess", *extra, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "isg preprocess: error:" in err and message in err
    assert not (tmp_path / "out").exists()


def test_cohort_rejects_unknown_options(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*patchsize"):
        preprocess_cohort([], tmp_path, patchsize=128)
    with pytest.raises(ValueError, match="must divide"):
        preprocess_cohort([], tmp_path, local_size=100)


def test_otsu_selector_uses_one_threshold_per_slide(cohort, tmp_path):
    """HE2RNA-style Otsu tissue fraction: the grey threshold comes from the slide, so batching cannot change scores."""
    slide = cohort.slides[0]
    preprocess_slide(slide, tmp_path / "b7", patch_size=128, selector="otsu", batch_size=7, thumbnail=False)
    preprocess_slide(slide, tmp_path / "b64", patch_size=128, selector="otsu", batch_size=64, thumbnail=False)
    a, b = read_h5(tmp_path / "b7" / f"{slide.stem}.h5"), read_h5(tmp_path / "b64" / f"{slide.stem}.h5")
    np.testing.assert_array_equal(a["all_coords"], b["all_coords"])
    np.testing.assert_array_equal(a["scores"], b["scores"])
    assert 0 <= a["scores"].min() and a["scores"].max() <= 1  # tissue fractions


def test_preprocess_otsu_keeps_its_natural_share_of_tissue(cohort, tmp_path):
    """``isg preprocess --selector otsu`` without ``--rule`` applies Otsu's natural rule (tissue fraction >= 0.5),
    not mean + 1 sigma, which keeps one patch per slide because the fractions saturate at 1 (issue 17)."""
    slide = cohort.slides[0]
    args = ["preprocess", str(slide), "--patch-size", str(P), "--local-size", str(Q), "--selector", "otsu", "--quiet"]
    assert cli_main(args + ["--out", str(tmp_path / "natural")]) == 0
    out = read_h5(tmp_path / "natural" / f"{slide.stem}.h5")
    np.testing.assert_array_equal(out["selected"], out["scores"] >= 0.5)
    assert out["selected"].sum() > len(out["scores"]) // 2 and out["rule"]["rule"] == "threshold"
    assert out["rule"]["threshold"] == out["rule"]["cut"] == 0.5
    # an explicit rule still wins: mean + 1 sigma keeps only tiles above the cut (none, if the fractions saturate)
    assert cli_main(args + ["--out", str(tmp_path / "mean_std"), "--rule", "mean_std"]) == 0
    scores = out["scores"]
    kept = read_h5(tmp_path / "mean_std" / f"{slide.stem}.h5")["selected"]
    assert kept.sum() == max(1, (scores > scores.mean() + scores.std()).sum()) < out["selected"].sum()


def test_a_selector_registered_by_one_decorator_runs_through_preprocess(cohort, tmp_path):
    from isg.io import open_slide
    from isg.select import SELECTORS, grey_tiles, register_selector

    @register_selector("darkness", natural_rule=SelectionRule("topk", k=3), unit="grey levels below white")
    def darkness(tiles) -> np.ndarray:
        return 255.0 - grey_tiles(tiles).mean(axis=(1, 2), dtype=np.float64)  # [B]

    try:
        slide = cohort.slides[1]
        assert cli_main(["preprocess", str(slide), "--out", str(tmp_path), "--patch-size", str(P), "--local-size", str(Q),
                         "--selector", "darkness", "--quiet", "--no-thumbnail"]) == 0
        out = read_h5(tmp_path / f"{slide.stem}.h5")
        assert out["selected"].sum() == 3 and out["options"]["selector"] == "darkness"  # its natural rule
        assert out["scores"][out["selected"]].min() >= out["scores"][~out["selected"]].max()
        pick = [0, len(out["all_coords"]) // 2, len(out["all_coords"]) - 1]
        with open_slide(slide) as reader:
            tiles = np.stack([reader.read_region(tuple(out["all_coords"][i]), 0, (P, P)) for i in pick])
        np.testing.assert_allclose(out["scores"][pick], darkness(tiles))
    finally:
        SELECTORS.pop("darkness")


# ----------------------------------------------------------------------------- damaged tiles, mpp, formats (issue 10)


@pytest.fixture(scope="module")
def damaged_svs(tmp_path_factory):
    """The Aperio-layout IHC SVS (48 tiles of 128 px at level 0) and a copy with tile 9 (at (128, 128)) zeroed."""
    from real_slides import aperio_ihc_svs, damage_tiff

    root = tmp_path_factory.mktemp("damaged")
    (root / "good").mkdir()
    good = aperio_ihc_svs(root / "good" / "ihc.svs")
    bad = damage_tiff(good, root / "ihc_bad.svs", "zeroed", 0, 9)
    return good, bad


@pytest.mark.parametrize("backend", ["tifffile", "openslide", "cucim"])
def test_damaged_patches_are_excluded_listed_and_counted(damaged_svs, tmp_path, capfd, backend):
    pytest.importorskip(backend)
    good, bad = damaged_svs
    options = dict(patch_size=128, local_size=32, rule=TOP5, tissue_min=0, backend=backend)
    clean = preprocess_slide(good, tmp_path / "good", **options)
    stats = preprocess_slide(bad, tmp_path / "bad", **options)
    assert (clean["n_damaged"], stats["n_damaged"]) == (0, 1)
    assert stats["n_tissue"] == clean["n_tissue"] - 1
    a, b = read_h5(tmp_path / "good" / "ihc.h5"), read_h5(tmp_path / "bad" / "ihc_bad.h5")
    np.testing.assert_array_equal(b["damaged_coords"], [[128, 128]])
    assert "zeroed" in b["damaged_reasons"][0].decode() and b["attrs"]["n_damaged"] == 1
    assert [128, 128] not in b["all_coords"].tolist() and [128, 128] in a["all_coords"].tolist()
    keep = [xy != [128, 128] for xy in a["all_coords"].tolist()]  # every other patch scored exactly as on the good file
    np.testing.assert_array_equal(b["all_coords"], a["all_coords"][keep])
    np.testing.assert_array_equal(b["scores"], a["scores"][keep])
    out, err = capfd.readouterr()
    assert "JPEG" not in out + err and "ERROR" not in out + err


def test_damaged_limit_and_fail_mode_name_the_file_and_count(damaged_svs, tmp_path, capsys):
    _, bad = damaged_svs
    options = dict(patch_size=128, local_size=32, rule=TOP5, tissue_min=0)
    from isg.io import DamagedSlideError

    with pytest.raises(DamagedSlideError, match=r"ihc_bad\.svs: 1 of 48 tissue patches \(2\.1%\) touch damaged tiles, "
                                                r"more than the 1% allowed"):
        preprocess_slide(bad, tmp_path, max_damaged=0.01, **options)
    with pytest.raises(DamagedSlideError, match=r"ihc_bad\.svs: 1 of 48 tissue patches touch damaged tiles \(on_damaged='fail'\)"):
        preprocess_slide(bad, tmp_path, on_damaged="fail", **options)
    assert not list(tmp_path.glob("*.h5"))
    # the thumbnail paints the damaged tile white, yet its patch stays on the grid to be found and counted
    stats = preprocess_slide(bad, tmp_path / "default", patch_size=128, local_size=32, rule=TOP5)
    assert stats["n_damaged"] == 1
    # the CLI: summary.json and the table carry n_damaged; --on-damaged fail makes the slide a failure
    args = ["preprocess", str(bad), "--out", str(tmp_path / "cli"), "--patch-size", "128", "--local-size", "32",
            "--top-k", "5", "--tissue-min", "0"]
    assert cli_main(args) == 0
    summary = json.loads((tmp_path / "cli" / "summary.json").read_text())
    assert summary["totals"]["n_damaged"] == 1 and summary["items"][0]["stats"]["n_damaged"] == 1
    assert "n_damaged" in capsys.readouterr().err
    assert cli_main(args + ["--on-damaged", "fail", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "1 of 48 tissue patches" in err


def test_mpp_csv_and_plain_images_without_mpp(cohort, bad_slides, tmp_path, capsys):
    from PIL import Image

    from isg.pipeline.scale import read_mpp_csv

    # a plain image read by pixel level needs no mpp: the outputs record it as unknown
    image = tmp_path / "plain.png"
    with __import__("isg.io", fromlist=["open_slide"]).open_slide(cohort.slides[0]) as slide:
        Image.fromarray(slide.read_region((0, 0), 0, (600, 500))).save(image)
    stats = preprocess_slide(image, tmp_path / "png", patch_size=P, local_size=Q)
    assert stats["n_kept"] >= 1 and np.isnan(stats["mpp"])
    h5 = read_h5(tmp_path / "png" / "plain.h5")
    assert np.isnan(h5["attrs"]["level0_mpp"]) and np.isnan(h5["coords_attrs"]["mpp"])
    with pytest.raises(SlideError, match=r"plain\.png: reading at 0\.5 um/px needs the slide's mpp"):
        preprocess_slide(image, tmp_path / "png2", patch_size=P, local_size=Q, mpp=0.5)
    # --mpp-csv: per-slide mpp by file name, path or id
    table = tmp_path / "mpp.csv"
    table.write_text(f"slide,mpp\n{bad_slides['no_mpp'].name},0.25\n")
    assert read_mpp_csv(table) == {"no_mpp": 0.25}
    out = tmp_path / "cli"
    args = ["preprocess", str(bad_slides["no_mpp"]), "--out", str(out), "--patch-size", str(P), "--local-size", str(Q)]
    assert cli_main(args + ["--quiet"]) == 1  # no mpp in the file
    assert cli_main(args + ["--quiet", "--mpp-csv", str(table)]) == 0
    assert read_h5(out / "no_mpp.h5")["attrs"]["level0_mpp"] == 0.25
    for text, message in (("slide,um\nx,1\n", "needs columns slide, mpp"), ("slide,mpp\nx,-1\n", "line 2: mpp must be a positive"),
                          ("slide,mpp\nx,1\nx.svs,2\n", "two mpp values")):
        table.write_text(text)
        assert cli_main(args + ["--mpp-csv", str(table)]) == 2
        err = capsys.readouterr().err
        assert str(table) in err and message in err


def test_dicom_wsi_folder_through_the_cli(tmp_path, monkeypatch):
    pytest.importorskip("openslide")
    from real_slides import DATA

    monkeypatch.setattr("isg.io.slide.MIN_SLIDE_SIZE", 8)
    folder = tmp_path / "slides" / "case1"
    folder.mkdir(parents=True)
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        (folder / name).write_bytes((DATA / name).read_bytes())
    args = ["preprocess", str(tmp_path / "slides"), "--out", str(tmp_path / "out"), "--patch-size", "8",
            "--local-size", "4", "--tissue-min", "0", "--top-k", "1", "--quiet"]
    assert cli_main(args) == 0
    h5 = read_h5(tmp_path / "out" / "case1.h5")
    assert h5["attrs"]["backend"] == "openslide" and h5["attrs"]["level0_mpp"] == pytest.approx(0.499)
    assert h5["all_coords"].shape == (4, 2)


def test_unsupported_format_is_a_clear_error(tmp_path):
    path = tmp_path / "slide.czi"
    path.write_bytes(b"ZISRAWFILE" + bytes(100))
    from isg.io import SlideError as Error
    from isg.io import open_slide

    with pytest.raises(Error, match=r"slide\.czi: unsupported format \(suffix '\.czi'.*supported: .*\.dcm.*\.svs"):
        open_slide(path)


@pytest.mark.skipif(__import__("importlib").util.find_spec("nvidia") is None
                    or __import__("importlib").util.find_spec("nvidia.dali") is None, reason="NVIDIA DALI not installed")
def test_dali_reader_through_preprocess(cohort, tmp_path):
    """``reader="dali"`` (``--reader dali``): the same patches as the thread reader (patch size = the file's tiles)."""
    slide = cohort.slides[0]
    a = preprocess_slide(slide, tmp_path / "threads", patch_size=128, local_size=32, rule=TOP5, thumbnail=False)
    b = preprocess_slide(slide, tmp_path / "dali", patch_size=128, local_size=32, rule=TOP5, thumbnail=False,
                         reader="dali")
    assert (a["n_tissue"], a["n_damaged"]) == (b["n_tissue"], b["n_damaged"])
    ha, hb = read_h5(tmp_path / "threads" / f"{slide.stem}.h5"), read_h5(tmp_path / "dali" / f"{slide.stem}.h5")
    np.testing.assert_array_equal(ha["all_coords"], hb["all_coords"])
    np.testing.assert_allclose(ha["scores"], hb["scores"], rtol=0.05)  # two JPEG decoders: close, not identical
