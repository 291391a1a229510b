"""Tables and datasets for training and evaluation.

* :mod:`isg.data.expression`: bulk RNA-seq tables -> samples x genes float32, log10(1 + x).
* :mod:`isg.data.manifest`: slide manifests (slide_path, sample_id, patient_id) and matching to tables.
* :mod:`isg.data.splits`: patient-level k-fold splits (train / val / test), saved as JSON.
* :mod:`isg.data.patch_file`: the per-slide patch file ``<slide_id>.h5`` (its one owner: layout, read, write).
* :mod:`isg.data.bags`: a Dataset of feature bags over patch files and its padding collate.
* :mod:`isg.data.tcga`: TCGA barcodes (patient, sample) and the slide -> expression sample rule.
* :mod:`isg.data.gdc`: GDC downloads (STAR gene counts, sample sheets, slide folders) -> one cohort.

Names load on first use (PEP 562), so ``import isg.data.gdc_options`` (read by the CLI at start-up)
pulls in neither pandas nor torch.
"""

import importlib

_HOME = {
    "BagDataset": "bags", "bag_arrays": "bags", "collate_bags": "bags", "to_bag": "bags",
    "SlidePatches": "patch_file", "read_patch_file": "patch_file", "write_patch_file": "patch_file",
    "ExpressionError": "expression", "load_expression": "expression", "read_gene_list": "expression",
    "resolve_genes": "expression",
    "GDCCohort": "gdc", "build_gdc_cohort": "gdc", "read_sample_sheet": "gdc", "read_star_counts": "gdc",
    "write_gdc_cohort": "gdc", "GDCOptions": "gdc_options",
    "ManifestError": "manifest", "load_manifest": "manifest", "match_samples": "manifest",
    "Split": "splits", "load_splits": "splits", "patient_kfold": "splits", "save_splits": "splits",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'isg.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"isg.data.{_HOME[name]}"), name)


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = sorted(_HOME)
