"""Tables and datasets for training and evaluation.

* :mod:`isg.data.expression`: bulk RNA-seq tables -> samples x genes float32, log10(1 + x).
* :mod:`isg.data.manifest`: slide manifests (slide_path, sample_id, patient_id) and matching to tables.
* :mod:`isg.data.splits`: patient-level k-fold splits (train / val / test), saved as JSON.
* :mod:`isg.data.bags`: a Dataset over per-slide feature .h5 files and its padding collate.
* :mod:`isg.data.tcga`: TCGA barcodes (patient, sample) and the slide -> expression sample rule.
* :mod:`isg.data.gdc`: GDC downloads (STAR gene counts, sample sheets, slide folders) -> one cohort.
"""

from isg.data.bags import BagDataset, collate_bags
from isg.data.expression import ExpressionError, load_expression, read_gene_list, resolve_genes
from isg.data.gdc import GDCCohort, GDCOptions, build_gdc_cohort, read_sample_sheet, read_star_counts, write_gdc_cohort
from isg.data.manifest import ManifestError, load_manifest, match_samples
from isg.data.splits import Split, load_splits, patient_kfold, save_splits

__all__ = [
    "BagDataset",
    "ExpressionError",
    "GDCCohort",
    "GDCOptions",
    "ManifestError",
    "Split",
    "build_gdc_cohort",
    "collate_bags",
    "load_expression",
    "load_manifest",
    "load_splits",
    "match_samples",
    "patient_kfold",
    "read_gene_list",
    "read_sample_sheet",
    "read_star_counts",
    "resolve_genes",
    "save_splits",
    "write_gdc_cohort",
]
