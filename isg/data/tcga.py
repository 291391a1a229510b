"""TCGA barcodes: patient and sample ids, and which expression sample a slide belongs to.

A TCGA barcode reads ``TCGA-TSS-PPPP-SSV-...``: project, tissue source site (2), participant (4),
then sample type (2 digits: 01 primary tumour, 06 metastasis, 11 solid normal, ...) and vial (a letter).
Patient id = the first 12 characters (``TCGA-AA-3000``), sample id = the first 16 (``TCGA-AA-3000-01A``).
A slide barcode continues with portion and slide: ``TCGA-AA-3000-01Z-00-DX1`` (GDC names the file
``<barcode>.<file uuid>.svs``).

Slide -> expression sample (:func:`match_slide`): the candidates are the expression samples with the
slide's first 15 characters (same patient, same sample type: a tumour slide never takes a normal-tissue
profile). Then, in order: the candidate with the slide's vial letter (frozen-section slides ``TS``/``BS``
come from the vial that was sequenced); else the only candidate (diagnostic ``DX`` slides are FFPE and
carry vial ``Z``, which no RNA aliquot has); else, of several vials, the first in alphabetical order
(``A``, the primary vial), recorded as ambiguous.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

TCGA_SAMPLE = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}-\d{2}[A-Z]", re.IGNORECASE)
TCGA_PATIENT = re.compile(r"^TCGA-[A-Z0-9]{2}-[A-Z0-9]{4}(?![A-Z0-9])", re.IGNORECASE)
PATIENT_LENGTH, SAMPLE_TYPE_LENGTH, SAMPLE_LENGTH = 12, 15, 16


def is_tcga_sample(barcode: str) -> bool:
    """True for a TCGA barcode down to (at least) the vial: ``TCGA-AA-3000-01A...``."""
    return bool(TCGA_SAMPLE.match(str(barcode)))


def is_tcga_patient(barcode: str) -> bool:
    """True for a TCGA barcode of (at least) a patient: ``TCGA-AA-3000...``."""
    return bool(TCGA_PATIENT.match(str(barcode)))


def patient_of(barcode: str) -> str:
    """``TCGA-AA-3000-01A-...`` -> ``TCGA-AA-3000`` (the first 12 characters)."""
    if not is_tcga_patient(barcode):
        raise ValueError(f"{barcode!r} is not a TCGA barcode (TCGA-XX-XXXX...)")
    return str(barcode)[:PATIENT_LENGTH].upper()


def sample_of(barcode: str) -> str:
    """``TCGA-AA-3000-01A-01R-...`` -> ``TCGA-AA-3000-01A`` (the first 16 characters)."""
    if not is_tcga_sample(barcode):
        raise ValueError(f"{barcode!r} is not a TCGA sample barcode (TCGA-XX-XXXX-NNV...)")
    return str(barcode)[:SAMPLE_LENGTH].upper()


def slide_barcode(path: str | os.PathLike) -> str | None:
    """The TCGA barcode of a slide file named as GDC names it (``<barcode>.<uuid>.svs``), else None."""
    barcode = Path(path).name.split(".")[0]
    return barcode.upper() if is_tcga_sample(barcode) else None


def match_slide(barcode: str, samples: Iterable[str]) -> tuple[str | None, str]:
    """The expression sample of a slide, by the rule in the module docstring.

    Returns ``(sample id or None, how)`` with ``how`` one of ``"vial"`` (same vial), ``"only"``
    (the one sample of that patient and sample type), ``"ambiguous"`` (first of several vials) or
    ``"none"``.
    """
    barcode = barcode.upper()
    candidates = sorted({s for s in samples if s[:SAMPLE_TYPE_LENGTH].upper() == barcode[:SAMPLE_TYPE_LENGTH]})
    same_vial = [s for s in candidates if s[:SAMPLE_LENGTH].upper() == barcode[:SAMPLE_LENGTH]]
    if same_vial:
        return same_vial[0], "vial"
    if len(candidates) == 1:
        return candidates[0], "only"
    if candidates:
        return candidates[0], "ambiguous"
    return None, "none"


def patient_ids(sample_ids: Iterable[str]) -> list[str] | None:
    """Patient ids of TCGA sample ids (their first 12 characters), or None when any id is not a TCGA barcode."""
    sample_ids = [str(s) for s in sample_ids]
    return [patient_of(s) for s in sample_ids] if sample_ids and all(map(is_tcga_patient, sample_ids)) else None
