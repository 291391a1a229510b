"""Shared test fixtures and markers."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts OpenMP: spinning threads cost 10x on shared cores

import pytest  # noqa: E402

from markers import skip_gpu_without_cuda  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "emu: runs CUDA kernels on the CPU in the host emulator (builds build/emu on demand)")


def pytest_collection_modifyitems(config, items):
    skip_gpu_without_cuda(items)


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
