"""isg.data: expression tables, manifests, patient-level splits, feature bags."""

from __future__ import annotations

import json
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from isg.data import (
    BagDataset,
    ExpressionError,
    ManifestError,
    collate_bags,
    load_expression,
    load_manifest,
    load_splits,
    match_samples,
    patient_kfold,
    read_gene_list,
    save_splits,
)

# ----------------------------------------------------------------------------- expression tables


def write_table(path, frame: pd.DataFrame, sep="\t"):
    frame.to_csv(path, sep=sep)
    return path


@pytest.fixture
def counts():
    rng = np.random.default_rng(0)
    values = rng.integers(0, 1000, size=(5, 7)).astype(float)
    values[:, 6] = 0  # never expressed
    return pd.DataFrame(values, index=[f"S{i}" for i in range(5)], columns=[f"G{j}" for j in range(7)])


@pytest.mark.parametrize("suffix,sep", [(".tsv", "\t"), (".csv", ","), (".txt", ";"), (".tsv.gz", "\t")])
def test_log10p_known_answer_and_formats(tmp_path, counts, suffix, sep):
    path = write_table(tmp_path / f"expr{suffix}", counts, sep)
    table = load_expression(path, min_samples=0)
    assert table.dtypes.unique().tolist() == [np.float32]
    assert table.index.name == "sample_id" and list(table.index) == list(counts.index)
    np.testing.assert_allclose(table.to_numpy(), np.log10(1 + counts.to_numpy()), rtol=1e-6)
    assert table.loc["S0", "G6"] == 0.0


def test_known_values_and_no_transform(tmp_path):
    frame = pd.DataFrame({"A": [0.0, 9.0, 99.0], "B": [-1.5, 2.0, 3.0]}, index=["x", "y", "z"])
    path = write_table(tmp_path / "e.tsv", frame)
    np.testing.assert_allclose(load_expression(path, genes=["A"])["A"].to_numpy(), [0.0, 1.0, 2.0], atol=1e-7)
    raw = load_expression(path, transform=None, min_samples=0)
    np.testing.assert_array_equal(raw["B"].to_numpy(), np.float32([-1.5, 2.0, 3.0]))


def test_genes_as_rows_explicit_and_auto(tmp_path, counts):
    genes_rows = counts.T.copy()
    path = write_table(tmp_path / "tcga.tsv", genes_rows)
    expected = load_expression(write_table(tmp_path / "s.tsv", counts), min_samples=0)
    explicit = load_expression(path, orientation="genes_x_samples", min_samples=0)
    pd.testing.assert_frame_equal(explicit, expected)
    by_manifest = load_expression(path, samples=["S1", "S3", "nope"], min_samples=0)
    pd.testing.assert_frame_equal(by_manifest, expected)
    # without a manifest: Ensembl ids in rows mean genes x samples
    ensembl = genes_rows.set_axis([f"ENSG{j:011d}.5" for j in range(7)], axis=0)
    auto = load_expression(write_table(tmp_path / "ens.tsv", ensembl), min_samples=0)
    assert list(auto.index) == list(counts.index) and auto.columns[0] == "ENSG00000000000.5"


def test_orientation_without_any_known_sample(tmp_path, counts):
    path = write_table(tmp_path / "e.tsv", counts)
    with pytest.raises(ExpressionError, match="none of the .* manifest sample ids"):
        load_expression(path, samples=["P1", "P2"])


def test_default_gene_rule(tmp_path, counts):
    path = write_table(tmp_path / "e.tsv", counts)
    assert "G6" not in load_expression(path).columns  # never expressed, min_samples=1
    assert "G6" in load_expression(path, min_samples=0).columns
    log = np.log10(1 + counts.drop(columns="G6"))
    top_var = load_expression(path, top_n=3)
    assert list(top_var.columns) == list(log.var(ddof=0).sort_values(ascending=False).index[:3])
    top_mean = load_expression(path, top_n=2, select="mean")
    assert list(top_mean.columns) == list(log.mean().sort_values(ascending=False).index[:2])


def test_gene_list_from_file_and_order(tmp_path, counts):
    path = write_table(tmp_path / "e.tsv", counts)
    (tmp_path / "genes.txt").write_text("# wanted\nG3\nG1\n\nG6\n")
    table = load_expression(path, genes=tmp_path / "genes.txt")
    assert list(table.columns) == ["G3", "G1", "G6"]  # requested genes are kept even if never expressed
    pd.DataFrame({"gene": ["G2", "G0"], "note": ["a", "b"]}).to_csv(tmp_path / "genes.csv", index=False)
    assert read_gene_list(tmp_path / "genes.csv") == ["G2", "G0"]


def test_missing_requested_genes_listed(tmp_path, counts):
    path = write_table(tmp_path / "e.tsv", counts)
    wanted = ["G1"] + [f"X{i}" for i in range(13)]
    with pytest.raises(ExpressionError, match=r"e\.tsv: 13 requested gene\(s\) not in the table: X0, X1.*\(\+3 more\)"):
        load_expression(path, genes=wanted)


def test_nan_values_named(tmp_path, counts):
    counts.loc["S2", "G4"] = np.nan
    counts.loc["S3", "G1"] = np.nan
    path = write_table(tmp_path / "nan.tsv", counts)
    with pytest.raises(ExpressionError, match=r"nan\.tsv: 2 NaN or infinite value\(s\).*samples S2, S3; genes G1, G4; cells \(sample/gene\) S2/G4, S3/G1"):
        load_expression(path)


def test_negative_values_rejected_for_log_transform(tmp_path, counts):
    counts.loc["S4", "G0"] = -3
    path = write_table(tmp_path / "neg.tsv", counts)
    with pytest.raises(ExpressionError, match=r"1 negative value.*S4/G0"):
        load_expression(path)


@pytest.mark.parametrize("axis,what", [(0, "sample id"), (1, "gene name")])
def test_duplicates_named(tmp_path, counts, axis, what):
    labels = list(counts.axes[axis])
    labels[2] = labels[0]
    path = write_table(tmp_path / "dup.tsv", counts.set_axis(labels, axis=axis))
    with pytest.raises(ExpressionError, match=rf"dup\.tsv: 1 duplicated {what}\(s\): {labels[0]}"):
        load_expression(path)


def test_non_numeric_column_named(tmp_path, counts):
    counts["project"] = "TCGA-COAD"
    path = write_table(tmp_path / "text.tsv", counts)
    with pytest.raises(ExpressionError, match=r"text\.tsv: 1 gene\(s\) hold non-numeric values: project"):
        load_expression(path)


def test_missing_file_and_bad_arguments(tmp_path, counts):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        load_expression(tmp_path / "nothere.tsv")
    path = write_table(tmp_path / "e.tsv", counts)
    with pytest.raises(ValueError, match="orientation"):
        load_expression(path, orientation="sideways")
    with pytest.raises(ValueError, match="transform"):
        load_expression(path, transform="log2")


# ----------------------------------------------------------------------------- manifests


def make_manifest(tmp_path, rows, name="manifest.csv"):
    for row in rows:
        slide = tmp_path / row["slide_path"]
        slide.parent.mkdir(parents=True, exist_ok=True)
        slide.touch()
    pd.DataFrame(rows).to_csv(tmp_path / name, index=False)
    return tmp_path / name


def slide_rows(n, per_patient=1):
    return [{"slide_path": f"slides/s{i}.svs", "sample_id": f"S{i}", "patient_id": f"P{i // per_patient}"} for i in range(n)]


def test_manifest_resolves_paths_and_ids(tmp_path):
    rows = slide_rows(3) + [{"slide_path": "slides/x.ome.tif", "sample_id": "S0", "patient_id": "P0", "extra": "kept"}]
    manifest = load_manifest(make_manifest(tmp_path, rows))
    assert list(manifest["slide_id"]) == ["s0", "s1", "s2", "x"]
    assert manifest["slide_path"][0] == str((tmp_path / "slides/s0.svs").resolve())
    assert "extra" in manifest.columns


def test_manifest_errors(tmp_path):
    path = make_manifest(tmp_path, slide_rows(2))
    pd.read_csv(path).drop(columns="patient_id").to_csv(tmp_path / "nopat.csv", index=False)
    with pytest.raises(ManifestError, match=r"nopat\.csv: missing column\(s\) patient_id"):
        load_manifest(tmp_path / "nopat.csv")
    rows = slide_rows(2) + [{"slide_path": "slides/s0.svs", "sample_id": "S9", "patient_id": "P9"}]
    with pytest.raises(ManifestError, match=r"duplicated slide\(s\) by slide_path: .*s0\.svs"):
        load_manifest(make_manifest(tmp_path, rows, "dup.csv"))
    rows = slide_rows(2) + [{"slide_path": "other/s0.svs", "sample_id": "S9", "patient_id": "P9"}]
    with pytest.raises(ManifestError, match=r"by slide_id: s0"):
        load_manifest(make_manifest(tmp_path, rows, "dupid.csv"))
    frame = pd.DataFrame(slide_rows(4))
    frame.to_csv(tmp_path / "absent.csv", index=False)
    (tmp_path / "slides" / "s3.svs").unlink(missing_ok=True)
    (tmp_path / "slides").mkdir(exist_ok=True)
    for i in (0, 1):
        (tmp_path / "slides" / f"s{i}.svs").touch()
    with pytest.raises(ManifestError, match=r"absent\.csv: 2 slide file\(s\) not found: .*s2\.svs, .*s3\.svs"):
        load_manifest(tmp_path / "absent.csv")
    assert len(load_manifest(tmp_path / "absent.csv", check_files=False)) == 4
    frame.assign(sample_id=["S0", "", "S2", "S3"]).to_csv(tmp_path / "empty.csv", index=False)
    with pytest.raises(ManifestError, match=r"empty sample_id on 1 line\(s\): 3"):
        load_manifest(tmp_path / "empty.csv", check_files=False)


def test_match_samples(tmp_path):
    manifest = load_manifest(make_manifest(tmp_path, slide_rows(4)))
    expression = pd.DataFrame(np.ones((4, 2)), index=["S3", "S1", "S0", "Z"], columns=["A", "B"])
    with pytest.warns(UserWarning) as record:
        kept, table = match_samples(manifest, expression)
    messages = " | ".join(str(w.message) for w in record)
    assert "1 sample(s) with slides but no expression: S2" in messages
    assert "1 sample(s) with expression but no slides: Z" in messages
    assert list(kept["sample_id"]) == ["S0", "S1", "S3"] and list(table.index) == ["S0", "S1", "S3"]
    with pytest.raises(ManifestError, match="no sample has both slides and expression"):
        match_samples(manifest, expression.set_axis(["a", "b", "c", "d"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        match_samples(manifest, expression.set_axis(["S0", "S1", "S2", "S3"]))


# ----------------------------------------------------------------------------- patient k-fold


def cohort(n_patients, seed=0):
    """Patients with 1-3 samples each and a patient-level class (about 1/4 positive)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "MSI-H" if rng.random() < 0.25 else "MSS"
        for s in range(rng.integers(1, 4)):
            rows.append({"sample_id": f"P{p}-{s}", "patient_id": f"P{p}", "msi": label})
    return pd.DataFrame(rows)


@pytest.mark.parametrize("n_patients,n_splits", [(7, 2), (23, 5), (40, 3)])
def test_kfold_by_patient(n_patients, n_splits):
    manifest = cohort(n_patients)
    splits = patient_kfold(manifest, n_splits=n_splits, seed=3)
    patient_of = dict(zip(manifest["sample_id"], manifest["patient_id"]))
    all_samples = set(manifest["sample_id"])
    tests = [set(split.test) for split in splits]
    assert set().union(*tests) == all_samples and sum(map(len, tests)) == len(all_samples)  # test folds partition
    for split in splits:
        parts = [set(split.train), set(split.val), set(split.test)]
        assert set().union(*parts) == all_samples and sum(map(len, parts)) == len(all_samples)
        patients = [{patient_of[s] for s in part} for part in parts]
        assert not (patients[0] & patients[1] or patients[0] & patients[2] or patients[1] & patients[2])
        assert split.val and split.train
    sizes = [len({patient_of[s] for s in t}) for t in tests]
    assert max(sizes) - min(sizes) <= 3


def test_kfold_deterministic_with_seed():
    manifest = cohort(30)
    assert patient_kfold(manifest, seed=1) == patient_kfold(manifest, seed=1)
    assert patient_kfold(manifest, seed=1) != patient_kfold(manifest, seed=2)


def test_kfold_stratification_balances_classes():
    manifest = cohort(60, seed=4)
    classes = manifest.drop_duplicates("patient_id").set_index("patient_id")["msi"]
    positives = []
    for split in patient_kfold(manifest, n_splits=5, seed=0, stratify="msi"):
        patients = set(manifest.set_index("sample_id").loc[split.test, "patient_id"])
        positives.append(int((classes[list(patients)] == "MSI-H").sum()))
        val_patients = set(manifest.set_index("sample_id").loc[split.val, "patient_id"])
        assert (classes[list(val_patients)] == "MSI-H").any()
    assert max(positives) - min(positives) <= 1
    by_series = patient_kfold(manifest, n_splits=5, stratify=manifest.set_index("sample_id")["msi"])
    assert by_series == patient_kfold(manifest, n_splits=5, stratify="msi")


def test_kfold_errors():
    manifest = cohort(4)
    with pytest.raises(ValueError, match="n_splits must be between 2 and the number of patients"):
        patient_kfold(manifest, n_splits=5)
    with pytest.raises(ValueError, match="stratify column 'nope'"):
        patient_kfold(manifest, n_splits=2, stratify="nope")
    with pytest.raises(ValueError, match="no stratification label for 1 sample"):
        patient_kfold(manifest, n_splits=2, stratify=manifest.set_index("sample_id")["msi"].iloc[1:])
    twice = pd.concat([manifest, manifest.iloc[:1].assign(patient_id="other")])
    with pytest.raises(ValueError, match="more than one patient: P0-0"):
        patient_kfold(twice, n_splits=2)


def test_splits_roundtrip_and_validation(tmp_path):
    splits = patient_kfold(cohort(12), n_splits=3, seed=0)
    save_splits(tmp_path / "splits.json", splits, seed=0)
    assert load_splits(tmp_path / "splits.json") == splits
    assert json.loads((tmp_path / "splits.json").read_text())["meta"] == {"seed": 0}
    assert [p.name for p in tmp_path.iterdir()] == ["splits.json"]  # no temp file left
    (tmp_path / "bad.json").write_text(json.dumps({"splits": [{"train": ["a"], "val": [], "test": ["a"]}]}))
    with pytest.raises(ValueError, match="split 0 has 1 sample.*train and test: a"):
        load_splits(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a splits document"):
        load_splits(tmp_path / "junk.json")


# ----------------------------------------------------------------------------- feature bags


def write_bag(path, n, d=6, s=2, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {
        "features": rng.normal(size=(n, d)).astype(np.float32),
        "local_features": rng.normal(size=(n, s, s, d)).astype(np.float16),
        "coords": np.stack([np.arange(n), np.arange(n) * 2], 1).astype(np.int64),
    }
    with h5py.File(path, "w") as file:
        for name, array in arrays.items():
            file[name] = array
    return arrays


@pytest.mark.parametrize("sizes", [(5, 3), (1, 7, 4)])
def test_bags_and_collate(tmp_path, sizes):
    arrays = [write_bag(tmp_path / f"b{i}.h5", n, seed=i) for i, n in enumerate(sizes)]
    targets = np.arange(len(sizes) * 2, dtype=np.float32).reshape(len(sizes), 2)
    dataset = BagDataset([tmp_path / f"b{i}.h5" for i in range(len(sizes))], targets)
    batch = collate_bags([dataset[i] for i in range(len(dataset))])
    n_max = max(sizes)
    assert batch["features"].shape == (len(sizes), n_max, 6) and batch["features"].dtype == torch.float32
    assert batch["local_features"].shape == (len(sizes), n_max, 2, 2, 6)
    assert batch["coords"].shape == (len(sizes), n_max, 2) and batch["coords"].dtype == torch.int64
    np.testing.assert_array_equal(batch["mask"].sum(1).numpy(), sizes)
    for i, n in enumerate(sizes):
        np.testing.assert_array_equal(batch["features"][i, :n].numpy(), arrays[i]["features"])
        np.testing.assert_allclose(batch["local_features"][i, :n].numpy(), arrays[i]["local_features"].astype(np.float32))
        assert not batch["features"][i, n:].any() and not batch["mask"][i, n:].any()
    np.testing.assert_array_equal(batch["target"].numpy(), targets)
    assert batch["slide_id"] == [f"b{i}" for i in range(len(sizes))]


def test_bag_subsampling_and_cache(tmp_path):
    arrays = write_bag(tmp_path / "big.h5", 50)
    dataset = BagDataset([tmp_path / "big.h5"], max_patches=8, local=False, cache=True)
    torch.manual_seed(0)
    first, second = dataset[0], dataset[0]
    assert first["features"].shape == (8, 6) and "local_features" not in first
    rows = first["coords"][:, 0].numpy()
    assert (np.diff(rows) > 0).all()  # a subset, kept in patch order
    np.testing.assert_array_equal(first["features"].numpy(), arrays["features"][rows])
    assert not torch.equal(first["coords"], second["coords"])  # drawn anew
    (tmp_path / "big.h5").unlink()
    assert dataset[0]["features"].shape == (8, 6)  # served from the cache


def test_bags_from_manifest_and_errors(tmp_path):
    write_bag(tmp_path / "s0.h5", 3)
    write_bag(tmp_path / "s1.h5", 4)
    manifest = pd.DataFrame({"slide_id": ["s1", "s0"], "sample_id": ["B", "A"], "patient_id": ["p", "q"]})
    expression = pd.DataFrame({"g": [1.0, 2.0]}, index=["A", "B"])
    dataset = BagDataset.from_manifest(manifest, tmp_path, expression)
    assert dataset[0]["slide_id"] == "s1" and dataset[0]["target"].tolist() == [2.0] and len(dataset[0]["features"]) == 4
    with pytest.raises(ValueError, match="have no expression row: A"):
        BagDataset.from_manifest(manifest, tmp_path, expression.loc[["B"]])
    with pytest.raises(FileNotFoundError, match=r"1 feature file\(s\) not found: .*nope\.h5"):
        BagDataset([tmp_path / "s0.h5", tmp_path / "nope.h5"])
    with h5py.File(tmp_path / "broken.h5", "w") as file:
        file["features"] = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"broken\.h5: no 'coords' dataset"):
        BagDataset([tmp_path / "broken.h5"])[0]
    with h5py.File(tmp_path / "unextracted.h5", "w") as file:  # patches without features
        file["coords"] = np.zeros((3, 2), np.int64)
    with pytest.raises(KeyError, match=r"unextracted\.h5: missing dataset\(s\) features, local_features"):
        BagDataset([tmp_path / "unextracted.h5"])[0]
