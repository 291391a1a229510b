"""Marker handling shared by tests/ and bench/ (both conftests call it)."""

from __future__ import annotations

import pytest
import torch


def skip_gpu_without_cuda(items) -> None:
    """Items marked ``gpu`` are skipped without a CUDA device; on a GPU machine they run."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
