"""GDC downloads as users get them: STAR gene-count files, sample sheets, slide folders -> one cohort.

* A STAR gene-count file (``<uuid>.rna_seq.augmented_star_gene_counts.tsv``, usually in a folder named
  by the GDC file id) holds a ``# gene-model: GENCODE v36`` line, the header ``gene_id gene_name
  gene_type unstranded stranded_first stranded_second tpm_unstranded fpkm_unstranded fpkm_uq_unstranded``,
  four ``N_unmapped / N_multimapping / N_noFeature / N_ambiguous`` rows, then one row per gene.
* The GDC sample sheet (TSV: File ID, File Name, Data Category, Data Type, Project ID, Case ID,
  Sample ID, Sample Type) says which sample each downloaded file belongs to.
* Slides keep their GDC names (``TCGA-AA-3000-01Z-00-DX1.<uuid>.svs``) and are matched to expression
  samples by their barcode (:mod:`isg.data.tcga`).

:func:`build_gdc_cohort` joins them into a manifest (slide_path, sample_id, patient_id), a samples x
genes table of raw values of one column (FPKM-UQ by default, as HE2RNA; :func:`isg.data.load_expression`
applies ``log10(1 + x)`` when training) and a list of everything that could not be matched.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from isg.data.expression import ExpressionError
from isg.data.gdc_options import GDC_DEFAULTS, STAR_ID_COLUMNS, STAR_SUFFIX, STAR_VALUE_COLUMNS, GDCOptions
from isg.data.manifest import ManifestError
from isg.data.tcga import match_slide, patient_of, sample_of, slide_barcode
from isg.utils import atomic_path, list_some

SHEET_COLUMNS = {"File ID": "file_id", "File Name": "file_name", "Data Category": "data_category",
                 "Data Type": "data_type", "Project ID": "project_id", "Case ID": "case_id",
                 "Sample ID": "sample_id", "Sample Type": "sample_type"}
SHEET_REQUIRED = ("File ID", "File Name", "Case ID", "Sample ID")


@dataclass
class GDCCohort:
    """A joined GDC download: what ``isg manifest`` writes."""

    manifest: pd.DataFrame  # slide_path, sample_id, patient_id, project_id, matched_by
    expression: pd.DataFrame | None  # samples x genes raw values (matched samples only), or None
    genes: pd.DataFrame | None  # gene (the column name), gene_id, gene_name, gene_type
    unmatched: pd.DataFrame  # kind, name, detail: everything left out, and why


# ----------------------------------------------------------------------------- sample sheets


def read_sample_sheet(path: str | os.PathLike) -> pd.DataFrame:
    """A GDC sample sheet as a table with snake_case columns (file_id, file_name, case_id, sample_id, ...).

    Case and sample ids that GDC lists as ``"A, A"`` (one per aliquot) are reduced to their distinct values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sample sheet {path}: no such file")
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ManifestError(f"sample sheet {path}: cannot be read as a TSV table ({exc})") from exc
    sheet.columns = sheet.columns.str.strip()
    missing = [column for column in SHEET_REQUIRED if column not in sheet.columns]
    if missing:
        raise ManifestError(f"sample sheet {path}: missing column(s) {', '.join(missing)} (has: {list_some(sheet.columns)}); "
                            "expected a GDC sample sheet (File ID, File Name, ..., Case ID, Sample ID, Sample Type)")
    if sheet.empty:
        raise ManifestError(f"sample sheet {path}: no rows")
    sheet = sheet[[c for c in SHEET_COLUMNS if c in sheet.columns]].rename(columns=SHEET_COLUMNS)
    for column in sheet.columns:
        sheet[column] = sheet[column].str.strip()
    for column in ("case_id", "sample_id"):
        sheet[column] = [", ".join(dict.fromkeys(p.strip() for p in v.split(",") if p.strip())) for v in sheet[column]]
    sheet["sheet"] = str(path)
    return sheet


# ----------------------------------------------------------------------------- STAR gene counts


def read_star_counts(path: str | os.PathLike, value: str = GDC_DEFAULTS["value"], annotation: bool = True) -> pd.DataFrame:
    """One STAR gene-count file: a table indexed by gene_id with gene_name, gene_type (``annotation``) and ``value``.

    The ``N_*`` summary rows are dropped; ``attrs["gene_model"]`` holds the ``# gene-model:`` line.
    Raises :class:`ExpressionError` naming the file for a wrong header, non-numeric, NaN or negative
    values and duplicated gene ids.
    """
    path = Path(path)
    if value not in STAR_VALUE_COLUMNS:
        raise ValueError(f"value must be one of {', '.join(STAR_VALUE_COLUMNS)}, got {value!r}")
    if not path.is_file():
        raise FileNotFoundError(f"STAR gene-count file {path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as handle:
        comments = []
        line = handle.readline()
        while line.startswith("#"):
            comments.append(line.lstrip("#").strip())
            line = handle.readline()
    header = line.rstrip("\n").split("\t")
    missing = [c for c in (*STAR_ID_COLUMNS, value) if c not in header]
    columns = [*STAR_ID_COLUMNS, value] if annotation else [STAR_ID_COLUMNS[0], value]
    if missing:
        raise ExpressionError(f"{path}: not a GDC STAR gene-count file: the header lacks {', '.join(missing)} "
                              f"(has: {list_some(c for c in header if c)})")
    try:
        table = pd.read_csv(path, sep="\t", skiprows=len(comments), usecols=columns,
                            dtype={c: str for c in columns[:-1]}, keep_default_na=False, na_values={value: ["", "NA", "NaN", "nan"]})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise ExpressionError(f"{path}: cannot be read as a STAR gene-count table ({exc})") from exc
    table = table[~table["gene_id"].str.startswith("N_")].set_index("gene_id")
    if table.empty:
        raise ExpressionError(f"{path}: no gene rows (only the N_* summary rows?)")
    numbers = pd.to_numeric(table[value], errors="coerce")
    text = numbers.isna() & table[value].notna()
    if text.any():
        raise ExpressionError(f"{path}: {int(text.sum())} non-numeric {value} value(s), e.g. gene "
                              f"{table.index[text][0]}: {table[value][text].iloc[0]!r}")
    for problem, bad in (("missing (NaN) or infinite", ~np.isfinite(numbers.to_numpy(dtype=np.float64))),
                         ("negative", numbers.to_numpy(dtype=np.float64) < 0)):
        if bad.any():
            raise ExpressionError(f"{path}: {int(bad.sum())} {problem} {value} value(s) for gene(s) {list_some(table.index[bad])}")
    duplicated = table.index[table.index.duplicated()].unique()
    if len(duplicated):
        raise ExpressionError(f"{path}: {len(duplicated)} duplicated gene id(s): {list_some(duplicated)}")
    table[value] = numbers.astype(np.float64)
    table.attrs["gene_model"] = next((c.split(":", 1)[1].strip() for c in comments if c.startswith("gene-model")), None)
    return table


def star_files(folder: str | os.PathLike) -> list[Path]:
    """Every ``*.rna_seq.augmented_star_gene_counts.tsv`` under ``folder`` (GDC puts each in a folder named by its file id)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"expression folder {folder}: no such folder")
    files = sorted(folder.rglob(f"*{STAR_SUFFIX}"))
    if not files:
        raise ExpressionError(f"expression folder {folder}: no *{STAR_SUFFIX} file in it or its subfolders")
    return files


def read_star_folder(files: list[Path], value: str = GDC_DEFAULTS["value"]) -> tuple[np.ndarray, pd.DataFrame]:
    """Values [files, genes] (float64) of ``files`` and their shared gene annotation (gene_id index).

    Every file must list the same genes in the same order as the first (one GENCODE release):
    a file that does not is named with the genes that differ.
    """
    first = read_star_counts(files[0], value)
    values = np.empty((len(files), len(first)), np.float64)
    values[0] = first[value].to_numpy()
    for row, path in enumerate(files[1:], start=1):
        table = read_star_counts(path, value, annotation=False)  # the genes must be the first file's
        if not table.index.equals(first.index):
            only_here, only_there = table.index.difference(first.index), first.index.difference(table.index)
            detail = (f"{len(only_here)} gene id(s) only in it ({list_some(only_here, 3)}), {len(only_there)} only in "
                      f"the first ({list_some(only_there, 3)})") if len(only_here) or len(only_there) else "the same genes in another order"
            models = f" (gene models {table.attrs['gene_model']!r} vs {first.attrs['gene_model']!r})" \
                if table.attrs["gene_model"] != first.attrs["gene_model"] else ""
            raise ExpressionError(f"{path}: its genes do not match those of {files[0]}: {detail}{models}")
        values[row] = table[value].to_numpy()
    return values, first[list(STAR_ID_COLUMNS[1:])]


def gene_columns(annotation: pd.DataFrame, options: GDCOptions) -> pd.DataFrame:
    """Genes kept (``gene_type`` filter, no ``_PAR_Y`` copies) and their column names.

    Returns ``annotation`` rows (index position ``row``) with ``gene`` (the column name), gene_id,
    gene_name, gene_type. With ``gene_key="name"``, names shared by several genes become
    ``NAME|GENE_ID`` for each of them (no arbitrary winner).
    """
    genes = annotation.reset_index().rename(columns={"index": "gene_id"})
    genes.insert(0, "row", np.arange(len(genes)))
    genes = genes[~genes["gene_id"].str.endswith("_PAR_Y")]  # GENCODE lists the X/Y pseudoautosomal genes twice; GDC fills Y with 0
    if options.gene_type is not None:
        genes = genes[genes["gene_type"] == options.gene_type]
        if genes.empty:
            raise ExpressionError(f"no gene of gene_type {options.gene_type!r} (types present: "
                                  f"{list_some(annotation['gene_type'].unique())})")
    if options.gene_key == "id":
        names = genes["gene_id"]
    else:
        shared = genes["gene_name"].duplicated(keep=False) | (genes["gene_name"] == "")
        names = genes["gene_name"].where(~shared, genes["gene_name"] + "|" + genes["gene_id"])
    genes.insert(1, "gene", names.to_numpy())
    return genes.reset_index(drop=True)


# ----------------------------------------------------------------------------- the cohort


def _unmatched(rows: list, kind: str, name, detail: str) -> None:
    rows.append({"kind": kind, "name": str(name), "detail": detail})


def _expression_files(sheet: pd.DataFrame, expression_dir, unmatched: list) -> pd.DataFrame:
    """Expression file rows (path, sample_id, case_id, project_id) of the files found under ``expression_dir``."""
    listed = sheet[sheet["file_name"].str.endswith(STAR_SUFFIX)].drop_duplicates("file_name")
    by_name, by_id = listed.set_index("file_name"), listed.set_index("file_id")
    rows, found = [], set()
    for path in star_files(expression_dir):
        if path.name in by_name.index:
            entry = by_name.loc[path.name]
        elif path.parent.name in by_id.index:  # renamed file, still in its GDC file-id folder
            entry = by_id.loc[path.parent.name]
        else:
            _unmatched(unmatched, "expression_not_in_sheet", path, "no sample sheet lists this file (by file name or folder file id)")
            continue
        found.add(entry.name if path.name in by_name.index else entry["file_name"])
        if "," in entry["sample_id"] or not entry["sample_id"]:
            _unmatched(unmatched, "expression_several_samples", path, f"the sample sheet gives sample id(s) {entry['sample_id']!r}")
            continue
        rows.append({"path": path, "sample_id": entry["sample_id"], "case_id": entry["case_id"],
                     "project_id": entry.get("project_id", "")})
    for name in listed["file_name"]:
        if name not in found:
            _unmatched(unmatched, "sheet_file_missing", name, f"listed in {listed.set_index('file_name').loc[name, 'sheet']} "
                       f"but not found under {expression_dir}")
    if not rows:
        raise ManifestError(f"none of the STAR files under {expression_dir} is listed in the sample sheet(s) "
                            f"{list_some(sheet['sheet'].unique())}: is it the sheet of this download?")
    return pd.DataFrame(rows)


def _expression_table(files: pd.DataFrame, options: GDCOptions, unmatched: list) -> tuple[pd.DataFrame, pd.DataFrame]:
    """samples x genes raw values; replicate files of one sample (several aliquots) are averaged."""
    values, annotation = read_star_folder(list(files["path"]), options.value)
    genes = gene_columns(annotation, options)
    table = pd.DataFrame(values[:, genes["row"].to_numpy()], index=files["sample_id"].to_numpy(), columns=genes["gene"].to_numpy())
    counts = files["sample_id"].value_counts()
    for sample in counts.index[counts > 1]:
        paths = files.loc[files["sample_id"] == sample, "path"]
        _unmatched(unmatched, "expression_averaged", sample, f"{len(paths)} files averaged: {list_some(p.name for p in paths)}")
    table = table.groupby(level=0, sort=True).mean()
    table.index.name, table.columns.name = "sample_id", "gene"
    return table, genes.drop(columns="row")


def _slide_rows(slides: Iterable[Path], sheet: pd.DataFrame, expression_samples: Iterable[str] | None,
                unmatched: list) -> list[dict]:
    """Manifest rows of the slides that have a sample (and expression, when ``expression_samples`` is known)."""
    listed = sheet.drop_duplicates("file_name").set_index("file_name")
    samples = sorted(set(expression_samples)) if expression_samples is not None else None
    rows, seen = [], {}
    for path in sorted(Path(p) for p in slides):
        if path.name in seen:
            _unmatched(unmatched, "slide_duplicate", path, f"same file name as {seen[path.name]}: kept that one")
            continue
        seen[path.name] = path
        barcode = slide_barcode(path)
        if barcode is not None:
            sample, patient = sample_of(barcode), patient_of(barcode)
        elif path.name in listed.index and listed.loc[path.name, "sample_id"] and "," not in listed.loc[path.name, "sample_id"]:
            sample, patient = listed.loc[path.name, "sample_id"], listed.loc[path.name, "case_id"]
        else:
            _unmatched(unmatched, "slide_unknown_sample", path, "not a TCGA slide name (TCGA-XX-XXXX-NNV-...) and not in a sample sheet")
            continue
        how = "name"
        if samples is not None:
            if barcode is not None:
                sample, how = match_slide(barcode, samples)
            else:
                how = "sheet" if sample in samples else "none"
            if how == "none":
                _unmatched(unmatched, "slide_without_expression", path, f"no expression sample of {barcode or sample}")
                continue
            if how == "ambiguous":
                _unmatched(unmatched, "slide_vial_ambiguous", path, f"several vials of {barcode[:15]} have expression; "
                           f"matched to {sample} (first vial)")
        rows.append({"slide_path": str(path.resolve()), "sample_id": sample, "patient_id": patient, "matched_by": how})
    return rows


def build_gdc_cohort(slides: Iterable[str | os.PathLike], sample_sheets: Iterable[str | os.PathLike],
                     expression_dir: str | os.PathLike | None = None, options: GDCOptions = GDCOptions()) -> GDCCohort:
    """Join slide files, GDC sample sheet(s) and (optionally) a folder of STAR files into one cohort.

    Slides named by TCGA barcode are matched to expression samples by :func:`isg.data.tcga.match_slide`;
    other slides by their sample sheet row. Without ``expression_dir`` the expression samples are the
    STAR files the sheets list (when they list any), and no table is read. Everything left out is in
    ``unmatched`` with the reason.
    """
    sheets = [read_sample_sheet(s) for s in sample_sheets]
    if not sheets:
        raise ManifestError("at least one GDC sample sheet is needed")
    sheet = pd.concat(sheets, ignore_index=True).fillna("")
    unmatched: list[dict] = []
    expression = genes = None
    if expression_dir is not None:
        files = _expression_files(sheet, expression_dir, unmatched)
        expression, genes = _expression_table(files, options, unmatched)
        expression_samples = list(expression.index)
    else:
        listed = sheet[sheet["file_name"].str.endswith(STAR_SUFFIX) & ~sheet["sample_id"].str.contains(",")]
        expression_samples = list(listed["sample_id"]) if len(listed) else None
    rows = _slide_rows(slides, sheet, expression_samples, unmatched)
    if not rows:
        raise ManifestError(f"no slide could be matched to a sample ({len(unmatched)} problem(s), e.g. "
                            f"{list_some((u['name'] + ': ' + u['detail'] for u in unmatched), 3)})")
    manifest = pd.DataFrame(rows)
    projects = sheet[sheet["project_id"] != ""].drop_duplicates("sample_id").set_index("sample_id")["project_id"] \
        if "project_id" in sheet else pd.Series(dtype=str)
    manifest.insert(3, "project_id", manifest["sample_id"].map(projects).fillna(""))
    order = np.lexsort((manifest["slide_path"].map(lambda p: Path(p).name), manifest["sample_id"]))
    manifest = manifest.iloc[order].reset_index(drop=True)  # by sample, then slide file name
    if expression is not None:
        with_slides = expression.index.isin(manifest["sample_id"])
        for sample in expression.index[~with_slides]:
            _unmatched(unmatched, "expression_without_slide", sample, "no slide matched this sample")
        expression = expression[with_slides]
    return GDCCohort(manifest, expression, genes, pd.DataFrame(unmatched, columns=["kind", "name", "detail"]))


def write_gdc_cohort(cohort: GDCCohort, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``manifest.csv``, ``unmatched.tsv`` and, with expression, ``expression.tsv`` (samples x genes,
    raw values) and ``expression.genes.tsv`` (column -> gene_id, gene_name, gene_type); atomically."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"manifest": (out_dir / "manifest.csv", cohort.manifest, ",", False),
              "unmatched": (out_dir / "unmatched.tsv", cohort.unmatched, "\t", False)}
    if cohort.expression is not None:
        tables["expression"] = (out_dir / "expression.tsv", cohort.expression, "\t", True)
        tables["genes"] = (out_dir / "expression.genes.tsv", cohort.genes, "\t", False)
    for path, table, sep, index in tables.values():
        with atomic_path(path) as tmp:
            table.to_csv(tmp, sep=sep, index=index, float_format="%.10g" if index else None)
    return {name: entry[0] for name, entry in tables.items()}
