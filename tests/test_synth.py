"""isg.io.synth: deterministic cohorts, pyramid layout readable by every backend, tables that match the
manifest, expression and MSI tied to the latent texture parameters, and ``isg synth``."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import tifffile

from isg.cli import main as cli_main
from isg.data import load_expression, load_manifest, match_samples
from isg.io import open_slide
from isg.io.synth import make_cohort, pyramid, render_slide


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
        assert kinds == {"blob", "pen", "blur", "noise"}
        for artefact in record["artefacts"]:
            x0, y0, x1, y1 = artefact["bbox"]
            assert 0 <= x0 < x1 <= 600 and 0 <= y0 < y1 <= 520
        assert 0.1 < record["params"]["tissue_fraction"] < 0.8
    # the latent parameters show in the pixels: denser / larger nuclei -> more dark purple pixels
    def dark_fraction(density, size):
        image, _, _ = render_slide(np.random.default_rng(0), 512, 512, {"density": density, "nuclei_size": size, "stain": 0.5},
                                   artefacts=False)
        return float((image.astype(np.int16).sum(-1) < 420).mean())

    assert dark_fraction(0.9, 0.5) > 1.5 * dark_fraction(0.1, 0.5)
    assert dark_fraction(0.5, 0.9) > 1.5 * dark_fraction(0.5, 0.1)
    image, _, _ = render_slide(np.random.default_rng(0), 257, 131, {"density": 0.5, "nuclei_size": 0.5, "stain": 0.5})
    assert image.shape == (131, 257, 3) and image.dtype == np.uint8
    assert [level.shape[:2] for level in pyramid(np.zeros((1000, 700, 3), np.uint8), 128, 2)] == [(1000, 700), (500, 350), (250, 175)]


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
    assert cli_main(["synth", "--out", str(out), "--slides", "3", "--patients", "1"]) == 2
    assert "n_patients=1" in capsys.readouterr().err
