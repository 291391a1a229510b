"""What ``isg manifest`` reads from GDC STAR files, and its defaults (no pandas here: the CLI reads them at start-up)."""

from __future__ import annotations

from dataclasses import dataclass, fields

STAR_SUFFIX = ".rna_seq.augmented_star_gene_counts.tsv"
STAR_ID_COLUMNS = ("gene_id", "gene_name", "gene_type")
STAR_VALUE_COLUMNS = ("unstranded", "stranded_first", "stranded_second", "tpm_unstranded", "fpkm_unstranded",
                      "fpkm_uq_unstranded")
GENE_KEYS = ("name", "id")


@dataclass(frozen=True)
class GDCOptions:
    """How STAR gene-count files become a samples x genes table."""

    value: str = "fpkm_uq_unstranded"  # STAR column (HE2RNA: FPKM-UQ); tpm_unstranded, unstranded (raw counts), ...
    gene_type: str | None = "protein_coding"  # keep genes of this gene_type; None keeps all
    gene_key: str = "name"  # table columns: gene names ("name") or versioned Ensembl ids ("id")

    def __post_init__(self):
        if self.value not in STAR_VALUE_COLUMNS:
            raise ValueError(f"value must be one of {', '.join(STAR_VALUE_COLUMNS)}, got {self.value!r}")
        if self.gene_key not in GENE_KEYS:
            raise ValueError(f"gene_key must be one of {', '.join(GENE_KEYS)}, got {self.gene_key!r}")


GDC_DEFAULTS = {f.name: f.default for f in fields(GDCOptions)}
