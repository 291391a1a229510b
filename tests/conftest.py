"""Shared test fixtures and markers."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "emu: runs CUDA kernels on the CPU in the host emulator (builds build/emu on demand)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def require_ext():
    """The native module; skipped when it is not built, unless ISG_REQUIRE_EXT=1 (CI)."""
    from isg import _ext

    module = _ext.ext()
    if module is None:
        if os.environ.get("ISG_REQUIRE_EXT") == "1":
            pytest.fail(f"isg._C is required (ISG_REQUIRE_EXT=1) but failed to load: {_ext.ext_error()}")
        pytest.skip(f"isg._C not built: {_ext.ext_error()}")
    return module
