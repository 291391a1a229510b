"""GDC / TCGA inputs as users download them: STAR gene-count folders, sample sheets, GDC-named slides,
``isg manifest``, and manifest -> preprocess -> extract -> train with no hand-editing."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pandas as pd
import pytest

from isg.cli import main as cli_main
from isg.data import (ExpressionError, GDCOptions, ManifestError, build_gdc_cohort, load_expression, load_manifest,
                      read_star_counts)
from isg.data.tcga import match_slide, patient_of, sample_of, slide_barcode

STAR_HEADER = ("gene_id", "gene_name", "gene_type", "unstranded", "stranded_first", "stranded_second", "tpm_unstranded",
               "fpkm_unstranded", "fpkm_uq_unstranded")
GENES = [  # (gene_id, gene_name, gene_type), as in GENCODE v36
    ("ENSG00000000003.15", "TSPAN6", "protein_coding"),
    ("ENSG00000000005.6", "TNMD", "protein_coding"),
    ("ENSG00000000419.13", "DPM1", "protein_coding"),
    ("ENSG00000002586.20", "CD99", "protein_coding"),
    ("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding"),
    ("ENSG00000015479.19", "MATR3", "protein_coding"),
    ("ENSG00000243485.5", "MIR1302-2HG", "lncRNA"),
    ("ENSG00000280987.4", "MATR3", "protein_coding"),
]
SHEET_HEADER = ("File ID", "File Name", "Data Category", "Data Type", "Project ID", "Case ID", "Sample ID", "Sample Type")
SAMPLE_TYPES = {"01": "Primary Tumor", "11": "Solid Tissue Normal"}


def star_text(values: np.ndarray) -> str:
    """A STAR augmented gene-count file: values [genes, 6] (the six value columns)."""
    lines = ["# gene-model: GENCODE v36", "\t".join(STAR_HEADER)]
    for name, n in (("N_unmapped", 2384574), ("N_multimapping", 3061223), ("N_noFeature", 1998405), ("N_ambiguous", 2875631)):
        lines.append(f"{name}\t\t\t{n}\t{n}\t{n}\t\t\t")
    for (gene_id, name, kind), row in zip(GENES, values):
        lines.append("\t".join([gene_id, name, kind] + [f"{v:g}" for v in row]))
    return "\n".join(lines) + "\n"


def write_star(folder, sample: str, rng, sheet_rows: list, values=None):
    """One expression file in its GDC file-id folder, and its sample sheet row; returns (path, values)."""
    file_id, name = str(uuid.UUID(int=int(rng.integers(2**63)))), f"{uuid.UUID(int=int(rng.integers(2**63)))}.rna_seq.augmented_star_gene_counts.tsv"
    if values is None:
        counts = rng.integers(0, 3000, len(GENES)).astype(float)
        values = np.stack([counts, counts // 2, counts // 2, counts / 10, counts / 20, counts * 3.5], axis=1)
        values[GENES.index(("ENSG00000002586.20_PAR_Y", "CD99", "protein_coding"))] = 0
    path = folder / file_id / name
    path.parent.mkdir(parents=True)
    path.write_text(star_text(values))
    sheet_rows.append((file_id, name, "Transcriptome Profiling", "Gene Expression Quantification", "TCGA-COAD",
                       sample[:12], sample, SAMPLE_TYPES[sample[13:15]]))
    return path, values


def write_slide(folder, barcode: str, rng, sheet_rows: list, image=None):
    """A GDC-named slide (<barcode>.<uuid>.svs in its file-id folder); a tiny pyramid, or an empty file."""
    file_id = str(uuid.UUID(int=int(rng.integers(2**63))))
    path = folder / file_id / f"{barcode}.{uuid.UUID(int=int(rng.integers(2**63))).hex[:8].upper()}-ABCD.svs"
    path.parent.mkdir(parents=True)
    if image is None:
        path.write_bytes(b"")
    else:
        from isg.io.synth import pyramid, write_pyramid_tiff

        write_pyramid_tiff(path, pyramid(image, 128), mpp=0.5, tile=128)
    sheet_rows.append((file_id, path.name, "Biospecimen", "Slide Image", "TCGA-COAD", barcode[:12], barcode[:16],
                       SAMPLE_TYPES[barcode[13:15]]))
    return path


def write_sheet(path, rows):
    pd.DataFrame(rows, columns=SHEET_HEADER).to_csv(path, sep="\t", index=False)
    return path


@pytest.fixture
def gdc(tmp_path):
    """Slides: 3000 has two DX slides; 3001 a frozen TS slide of vial A (and normal RNA without a slide);
    3002 a slide without expression; 3003 RNA of vials A and B; 3004 two RNA files of one sample."""
    rng = np.random.default_rng(0)
    slides, expression, slide_rows, rna_rows = tmp_path / "slides", tmp_path / "rna", [], []
    for barcode in ("TCGA-AA-3000-01Z-00-DX1", "TCGA-AA-3000-01Z-00-DX2", "TCGA-AA-3001-01A-01-TS1",
                    "TCGA-AA-3002-01Z-00-DX1", "TCGA-AA-3003-01Z-00-DX1", "TCGA-AA-3004-01Z-00-DX1"):
        write_slide(slides, barcode, rng, slide_rows)
    values = {}
    for sample in ("TCGA-AA-3000-01A", "TCGA-AA-3001-01A", "TCGA-AA-3001-11A", "TCGA-AA-3003-01B", "TCGA-AA-3003-01A",
                   "TCGA-AA-3004-01A", "TCGA-AA-3004-01A"):
        values.setdefault(sample, []).append(write_star(expression, sample, rng, rna_rows)[1])
    sheets = [write_sheet(tmp_path / "slides_sheet.tsv", slide_rows), write_sheet(tmp_path / "rna_sheet.tsv", rna_rows)]
    return tmp_path, sorted(slides.rglob("*.svs")), sheets, values


# ----------------------------------------------------------------------------- barcodes


def test_barcodes_and_the_vial_rule():
    assert patient_of("TCGA-AA-3000-01A-01R-0821-07") == "TCGA-AA-3000"
    assert sample_of("TCGA-AA-3000-01A-01R-0821-07") == "TCGA-AA-3000-01A"
    assert slide_barcode("x/TCGA-AA-3000-01Z-00-DX1.2F0B2C51-8F3C-4E8A.svs") == "TCGA-AA-3000-01Z-00-DX1"
    assert slide_barcode("slide_17.svs") is None
    with pytest.raises(ValueError, match="not a TCGA"):
        patient_of("SYN-0001")
    samples = ["TCGA-AA-3000-01A", "TCGA-AA-3000-11A", "TCGA-AA-3001-01B", "TCGA-AA-3001-01A"]
    assert match_slide("TCGA-AA-3000-01Z-00-DX1", samples) == ("TCGA-AA-3000-01A", "only")  # FFPE: vial Z
    assert match_slide("TCGA-AA-3000-11A-01-TS1", samples) == ("TCGA-AA-3000-11A", "vial")  # normal slide, normal RNA
    assert match_slide("TCGA-AA-3001-01B-01-BS1", samples) == ("TCGA-AA-3001-01B", "vial")
    assert match_slide("TCGA-AA-3001-01Z-00-DX1", samples) == ("TCGA-AA-3001-01A", "ambiguous")
    assert match_slide("TCGA-AA-3000-06Z-00-DX1", samples) == (None, "none")  # a metastasis slide: no tumour RNA
    assert match_slide("TCGA-AA-3009-01Z-00-DX1", samples) == (None, "none")


# ----------------------------------------------------------------------------- STAR files


def test_star_file_values_and_columns(gdc):
    _, _, _, values = gdc
    path = next((gdc[0] / "rna").rglob("*.tsv"))
    table = read_star_counts(path)
    assert list(table.index) == [g[0] for g in GENES]  # N_* rows dropped
    assert table.attrs["gene_model"] == "GENCODE v36"
    assert list(table.columns) == ["gene_name", "gene_type", "fpkm_uq_unstranded"]
    tpm = read_star_counts(path, "tpm_unstranded")["tpm_unstranded"].to_numpy()
    counts = read_star_counts(path, "unstranded")["unstranded"].to_numpy()
    np.testing.assert_allclose(tpm, np.round(counts / 10, 5), rtol=1e-5)  # the columns are the ones asked for


@pytest.mark.parametrize("damage, match", [
    (lambda t: t.rsplit("\t", 1)[0] + "\tNaN\n", r"1 missing \(NaN\) or infinite fpkm_uq_unstranded value\(s\) for gene\(s\) ENSG00000280987.4"),
    (lambda t: t.rsplit("\t", 1)[0] + "\t\n", r"missing \(NaN\)"),
    (lambda t: t.replace("fpkm_uq_unstranded", "fpkm_uq"), "the header lacks fpkm_uq_unstranded"),
    (lambda t: t.rsplit("\t", 1)[0] + "\tabc\n", "non-numeric"),
    (lambda t: t.rsplit("\t", 1)[0] + "\t-4\n", "negative"),
    (lambda t: t.replace("ENSG00000000005.6", "ENSG00000000003.15"), "duplicated gene id"),
])
def test_damaged_star_file_named(tmp_path, damage, match):
    path = tmp_path / "f.rna_seq.augmented_star_gene_counts.tsv"
    path.write_text(damage(star_text(np.arange(len(GENES) * 6, dtype=float).reshape(-1, 6) + 1)))
    with pytest.raises(ExpressionError, match=rf"{path.name}: .*{match}"):
        read_star_counts(path)


def test_gene_table_of_a_download(gdc):
    root, slides, sheets, values = gdc
    cohort = build_gdc_cohort(slides, sheets, root / "rna")
    expected_genes = ["TSPAN6", "TNMD", "DPM1", "CD99", "MATR3|ENSG00000015479.19", "MATR3|ENSG00000280987.4"]
    assert list(cohort.expression.columns) == expected_genes  # protein coding, no PAR_Y copy, shared names disambiguated
    assert list(cohort.genes["gene_id"]) == ["ENSG00000000003.15", "ENSG00000000005.6", "ENSG00000000419.13",
                                             "ENSG00000002586.20", "ENSG00000015479.19", "ENSG00000280987.4"]
    rows = [GENES.index(g) for g in GENES if g[2] == "protein_coding" and not g[0].endswith("_PAR_Y")]
    np.testing.assert_allclose(cohort.expression.loc["TCGA-AA-3000-01A"], values["TCGA-AA-3000-01A"][0][rows, 5])
    replicate = (values["TCGA-AA-3004-01A"][0] + values["TCGA-AA-3004-01A"][1]) / 2
    np.testing.assert_allclose(cohort.expression.loc["TCGA-AA-3004-01A"], replicate[rows, 5])  # two files averaged
    by_id = build_gdc_cohort(slides, sheets, root / "rna", GDCOptions(value="unstranded", gene_type=None, gene_key="id"))
    assert list(by_id.expression.columns) == [g[0] for g in GENES if not g[0].endswith("_PAR_Y")]
    np.testing.assert_allclose(by_id.expression.loc["TCGA-AA-3000-01A", "ENSG00000243485.5"], values["TCGA-AA-3000-01A"][0][6, 0])


def test_slides_matched_and_unmatched_listed(gdc):
    root, slides, sheets, _ = gdc
    cohort = build_gdc_cohort(slides, sheets, root / "rna")
    manifest = cohort.manifest.assign(barcode=[slide_barcode(p) for p in cohort.manifest["slide_path"]])
    assert list(zip(manifest["barcode"], manifest["sample_id"], manifest["matched_by"])) == [
        ("TCGA-AA-3000-01Z-00-DX1", "TCGA-AA-3000-01A", "only"),  # a sample with two slides
        ("TCGA-AA-3000-01Z-00-DX2", "TCGA-AA-3000-01A", "only"),
        ("TCGA-AA-3001-01A-01-TS1", "TCGA-AA-3001-01A", "vial"),
        ("TCGA-AA-3003-01Z-00-DX1", "TCGA-AA-3003-01A", "ambiguous"),
        ("TCGA-AA-3004-01Z-00-DX1", "TCGA-AA-3004-01A", "only"),
    ]
    assert list(manifest["patient_id"]) == ["TCGA-AA-3000", "TCGA-AA-3000", "TCGA-AA-3001", "TCGA-AA-3003", "TCGA-AA-3004"]
    assert set(manifest["project_id"]) == {"TCGA-COAD"}
    assert list(cohort.expression.index) == ["TCGA-AA-3000-01A", "TCGA-AA-3001-01A", "TCGA-AA-3003-01A", "TCGA-AA-3004-01A"]
    unmatched = {(kind, name.split("/")[-1][:23]) for kind, name, _ in cohort.unmatched.itertuples(index=False)}
    assert unmatched == {("slide_without_expression", "TCGA-AA-3002-01Z-00-DX1"),
                         ("slide_vial_ambiguous", "TCGA-AA-3003-01Z-00-DX1"),
                         ("expression_without_slide", "TCGA-AA-3001-11A"), ("expression_without_slide", "TCGA-AA-3003-01B"),
                         ("expression_averaged", "TCGA-AA-3004-01A")}


def test_download_problems_named(gdc):
    root, slides, sheets, _ = gdc
    extra = root / "rna" / "stray" / "x.rna_seq.augmented_star_gene_counts.tsv"
    extra.parent.mkdir()
    extra.write_text(next((root / "rna").rglob("*.tsv")).read_text())
    gone = sorted((root / "rna").rglob("*.tsv"))[0]
    gone.unlink()
    cohort = build_gdc_cohort(slides, sheets, root / "rna")
    kinds = dict(zip(cohort.unmatched["name"].str.split("/").str[-1], cohort.unmatched["kind"]))
    assert kinds[extra.name] == "expression_not_in_sheet" and kinds[gone.name] == "sheet_file_missing"

    other = sorted((root / "rna").rglob("*.tsv"))[1]
    other.write_text(other.read_text().replace("ENSG00000000419.13", "ENSG00000000457.14"))
    with pytest.raises(ExpressionError, match=rf"{other.name}: its genes do not match those of .*1 gene id\(s\) only in it \(ENSG00000000457.14\)"):
        build_gdc_cohort(slides, sheets, root / "rna")
    bad_sheet = root / "bad_sheet.tsv"
    pd.DataFrame({"File ID": ["x"], "File Name": ["y"]}).to_csv(bad_sheet, sep="\t", index=False)
    with pytest.raises(ManifestError, match=r"bad_sheet\.tsv: missing column\(s\) Case ID, Sample ID"):
        build_gdc_cohort(slides, [bad_sheet], root / "rna")
    with pytest.raises(ManifestError, match="none of the STAR files .* is listed"):
        build_gdc_cohort(slides, [sheets[0]], root / "rna")


def test_without_expression_dir_sheet_samples_still_match(gdc):
    root, slides, sheets, _ = gdc
    cohort = build_gdc_cohort(slides, sheets)
    assert cohort.expression is None and len(cohort.manifest) == 5
    only_slides = build_gdc_cohort(slides, [sheets[0]])  # no expression anywhere: every slide, sample from its name
    assert len(only_slides.manifest) == 6 and "TCGA-AA-3002-01Z" in set(only_slides.manifest["sample_id"])


def test_gene_list_by_name_or_id(gdc):
    root, slides, sheets, _ = gdc
    assert cli_main(["manifest", str(root / "slides"), "--sample-sheet", str(sheets[0]), "--sample-sheet", str(sheets[1]),
                     "--expression-dir", str(root / "rna"), "--out", str(root / "out"), "--gene-key", "id"]) == 0
    table = root / "out" / "expression.tsv"
    (root / "genes.txt").write_text("DPM1\nENSG00000000003\nENSG00000280987.4\n")
    picked = load_expression(table, genes=root / "genes.txt")
    assert list(picked.columns) == ["ENSG00000000419.13", "ENSG00000000003.15", "ENSG00000280987.4"]
    with pytest.raises(ExpressionError, match=r"2 requested gene\(s\) not in the table: TP53, KRAS"):
        load_expression(table, genes=["TSPAN6", "TP53", "KRAS"])
    with pytest.raises(ExpressionError, match=r"MATR3 \(ENSG00000015479.19 or ENSG00000280987.4\).*by Ensembl id"):
        load_expression(table, genes=["MATR3"])
    with pytest.raises(ExpressionError, match="requested twice"):
        load_expression(table, genes=["DPM1", "ENSG00000000419"])


def test_tcga_manifest_without_patient_column(tmp_path):
    (tmp_path / "m.csv").write_text("slide_path,sample_id\na.svs,TCGA-AA-3000-01A\nb.svs,TCGA-AA-3000-11A\n")
    manifest = load_manifest(tmp_path / "m.csv", check_files=False)
    assert list(manifest["patient_id"]) == ["TCGA-AA-3000", "TCGA-AA-3000"]
    (tmp_path / "n.csv").write_text("slide_path,sample_id\na.svs,S1\n")
    with pytest.raises(ManifestError, match="missing column"):
        load_manifest(tmp_path / "n.csv", check_files=False)


# ----------------------------------------------------------------------------- end to end


def test_gdc_download_to_trained_model(tmp_path, capsys):
    """GDC-named slides + GDC-layout expression folder + sample sheets -> isg manifest -> isg preprocess
    -> isg extract run -> isg train, no file edited by hand."""
    import torch

    from isg.features import Autoencoder, save_autoencoder
    from isg.io.synth import render_slide

    rng = np.random.default_rng(1)
    slide_rows, rna_rows = [], []
    barcodes = [f"TCGA-AA-{3000 + p}-01Z-00-DX1" for p in range(6)] + ["TCGA-AA-3000-01Z-00-DX2", "TCGA-AA-3009-01Z-00-DX1"]
    for index, barcode in enumerate(barcodes):
        params = {"density": rng.uniform(0.2, 0.8), "nuclei_size": rng.uniform(0.2, 0.8), "stain": 0.5, "tissue_fraction": 0.6}
        image, _, _ = render_slide(np.random.default_rng(index), 384, 384, params, artefacts=False)
        write_slide(tmp_path / "slides", barcode, rng, slide_rows, image)
    for p in range(7):  # 3006 has expression and no slide; 3009 a slide and no expression
        write_star(tmp_path / "rna", f"TCGA-AA-{3000 + p}-01A", rng, rna_rows)
    sheet = write_sheet(tmp_path / "gdc_sample_sheet.tsv", slide_rows + rna_rows)  # one sheet for both downloads

    out = tmp_path / "cohort"
    assert cli_main(["manifest", str(tmp_path / "slides"), "--sample-sheet", str(sheet), "--expression-dir",
                     str(tmp_path / "rna"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "7 slide(s) of 6 sample(s), 6 patient(s)" in printed and "1 slide_without_expression" in printed
    assert "1 expression_without_slide" in printed
    assert cli_main(["preprocess", "--manifest", str(out / "manifest.csv"), "--out", str(tmp_path / "patches"),
                     "--patch-size", "128", "--local-size", "32", "--quiet", "--no-thumbnail"]) == 0
    torch.manual_seed(0)
    for role in ("global", "local"):
        save_autoencoder(tmp_path / f"{role}.pt", Autoencoder(resolution=32, d=8, channel_base=256, channel_max=16))
    assert cli_main(["extract", "run", "--h5-dir", str(tmp_path / "patches"), "--global", str(tmp_path / "global.pt"),
                     "--local", str(tmp_path / "local.pt"), "--quiet"]) == 0
    (tmp_path / "genes.txt").write_text("TSPAN6\nENSG00000000419\nCD99\n")
    assert cli_main(["train", "--manifest", str(out / "manifest.csv"), "--expression", str(out / "expression.tsv"),
                     "--genes", str(tmp_path / "genes.txt"), "--features", str(tmp_path / "patches"),
                     "--out", str(tmp_path / "train"), "--model", "isg-2-1", "--folds", "2", "--epochs", "1",
                     "--model-kwargs", '{"embed_dim": 16, "depth": 1, "num_heads": 2}']) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n_samples"] == 6 and result["n_genes"] == 3
    splits = json.loads(next((tmp_path / "train").glob("splits*.json")).read_text())["splits"]
    for split in splits:  # the two slides of TCGA-AA-3000 are one sample of one patient: never on both sides
        test_patients = {s[:12] for s in split["test"]}
        assert not test_patients & {s[:12] for s in split["train"] + split["val"]}


def test_cli_manifest_errors_name_the_input(gdc, capsys):
    root, _, sheets, _ = gdc
    assert cli_main(["manifest", str(root / "nowhere"), "--sample-sheet", str(sheets[0]), "--out", str(root / "o")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    damaged = sorted((root / "rna").rglob("*.tsv"))[2]
    lines = damaged.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("ENSG00000000005.6"))
    lines[row] = lines[row].rsplit("\t", 1)[0] + "\tNaN"
    damaged.write_text("\n".join(lines) + "\n")
    assert cli_main(["manifest", str(root / "slides"), "--sample-sheet", str(sheets[0]), "--sample-sheet", str(sheets[1]),
                     "--expression-dir", str(root / "rna"), "--out", str(root / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{damaged}: 1 missing (NaN) or infinite fpkm_uq_unstranded value(s) for gene(s) ENSG00000000005.6" in err
    assert not (root / "o" / "manifest.csv").exists()  # nothing written from a damaged download
