"""isg.eval.metrics against scipy / numpy references and known answers."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from isg.eval import (
    benjamini_hochberg,
    gene_correlations,
    pearson_per_gene,
    plot_gene_correlations,
    plot_pred_vs_true,
    roc_auc,
    save_results,
    summarize,
)


@pytest.mark.parametrize("n,g", [(3, 1), (7, 5), (31, 13)])
def test_pearson_matches_scipy_and_corrcoef(n, g):
    rng = np.random.default_rng(n)
    true = rng.normal(size=(n, g))
    pred = true * rng.uniform(-1, 1, size=g) + rng.normal(size=(n, g))
    r, p = pearson_per_gene(true, pred)
    for j in range(g):
        np.testing.assert_allclose(r[j], np.corrcoef(true[:, j], pred[:, j])[0, 1], rtol=1e-10, atol=1e-12)
        expected = stats.pearsonr(true[:, j], pred[:, j])
        np.testing.assert_allclose(p[j], expected.pvalue, rtol=1e-8, atol=1e-14)
    r_torch, _ = pearson_per_gene(torch.tensor(true), torch.tensor(pred))
    np.testing.assert_allclose(r_torch, r)


def test_pearson_edge_cases():
    true = np.array([[1.0, 2.0], [2.0, 2.0], [3.0, 2.0], [4.0, 2.0]])
    r, p = pearson_per_gene(true, true)
    assert r[0] == pytest.approx(1.0) and p[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(r[1]) and np.isnan(p[1])  # constant gene
    r, _ = pearson_per_gene(true[:, :1], -true[:, :1])
    assert r[0] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="at least 3 samples"):
        pearson_per_gene(true[:2], true[:2])
    with pytest.raises(ValueError, match="differ in shape"):
        pearson_per_gene(true, true[:, :1])


@pytest.mark.parametrize("m", [1, 2, 17, 200])
def test_bh_matches_scipy(m):
    p = np.random.default_rng(m).uniform(size=m) ** 3
    np.testing.assert_allclose(benjamini_hochberg(p), stats.false_discovery_control(p), rtol=1e-12)


def test_bh_known_answer_ties_and_nan():
    # p sorted (0.01, 0.02, 0.03, 0.04) x m=4 / rank -> 0.04 each
    np.testing.assert_allclose(benjamini_hochberg([0.04, 0.01, 0.03, 0.02]), [0.04] * 4)
    np.testing.assert_allclose(benjamini_hochberg([0.01, 0.01, 0.5]), [0.015, 0.015, 0.5])
    q = benjamini_hochberg([0.01, np.nan, 0.04])
    np.testing.assert_allclose(q, [0.02, np.nan, 0.04])
    assert np.isnan(benjamini_hochberg([np.nan, np.nan])).all()


def test_gene_correlations_table_and_summary():
    rng = np.random.default_rng(1)
    n = 40
    true = rng.normal(size=(n, 4))
    pred = np.column_stack([true[:, 0], -true[:, 1], rng.normal(size=n), true[:, 3] + 0.1 * rng.normal(size=n)])
    genes = ["good", "inverted", "noise", "close"]
    y_true = pd.DataFrame(true, columns=genes, index=[f"s{i}" for i in range(n)])
    y_pred = pd.DataFrame(pred, columns=genes, index=y_true.index).iloc[::-1, ::-1]  # aligned by labels
    table = gene_correlations(y_true, y_pred)
    assert list(table["gene"][:2]) == ["good", "close"] and table["gene"].iloc[-1] == "inverted"
    by_gene = table.set_index("gene").loc[genes]
    assert by_gene["significant"].tolist()[:2] == [True, False] and by_gene.loc["close", "significant"]
    np.testing.assert_array_equal(by_gene["significant"], (by_gene["r"] > 0) & (by_gene["q"] < 0.05))
    np.testing.assert_allclose(by_gene["q"], stats.false_discovery_control(by_gene["p"]))
    summary = summarize(table)
    assert summary["n_genes"] == 4 and summary["n_significant"] == int(table["significant"].sum())
    assert summary["mean_r"] == pytest.approx(table["r"].mean())
    with pytest.raises(ValueError, match="same samples"):
        gene_correlations(y_true, y_pred.iloc[1:])


@pytest.mark.parametrize(
    "labels,scores,expected",
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9], 1.0),  # perfect
        ([0, 0, 1, 1], [0.9, 0.8, 0.2, 0.1], 0.0),  # inverted
        ([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5], 0.5),  # all tied
        ([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8], 0.75),
        ([0, 1, 1], [0.3, 0.3, 0.9], 0.75),  # one tie counts 1/2
    ],
)
def test_auc_known_answers(labels, scores, expected):
    assert roc_auc(labels, scores) == pytest.approx(expected)


def test_auc_string_labels_and_brute_force():
    rng = np.random.default_rng(2)
    labels = np.where(rng.random(57) < 0.3, "MSI-H", "MSS")
    scores = np.round(rng.normal(size=57), 1)  # with ties
    pos, neg = scores[labels == "MSI-H"], scores[labels == "MSS"]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(labels, scores, positive="MSI-H") == pytest.approx(brute)
    with pytest.raises(ValueError, match="needs both classes"):
        roc_auc(["MSS", "MSS"], [0.1, 0.2], positive="MSI-H")


def test_save_results_and_plots(tmp_path):
    rng = np.random.default_rng(3)
    true = rng.normal(size=(12, 5))
    true[:, 4] = 1.0  # constant gene -> NaN r, written as null in JSON
    pred = true + rng.normal(size=(12, 5))
    genes = [f"G{j}" for j in range(5)]
    table = gene_correlations(true, pred, genes)
    save_results(tmp_path / "genes.csv", table)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "genes.csv"), table, check_dtype=False)
    save_results(tmp_path / "results.json", table)
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["summary"]["n_genes"] == 5 and document["summary"]["n_constant"] == 1
    assert document["genes"][-1]["gene"] == "G4" and document["genes"][-1]["r"] is None
    with pytest.raises(ValueError, match=r"\.csv or \.json"):
        save_results(tmp_path / "results.txt", table)
    plot_gene_correlations(table, tmp_path / "r.png")
    plot_pred_vs_true(pd.DataFrame(true, columns=genes), pd.DataFrame(pred, columns=genes), ["G0", "G2", "G3"], tmp_path / "scatter.png")
    for name in ("r.png", "scatter.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="genes not in the data"):
        plot_pred_vs_true(true, pred, ["nope"], tmp_path / "x.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["genes.csv", "r.png", "results.json", "scatter.png"]
