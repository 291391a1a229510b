"""Loading of isg._C: torch first, no cached failure caused by import order, why CUDA is unusable."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from isg import _ext


def test_torch_is_loaded_before_the_native_module():
    code = ("import sys; from isg import _ext; assert 'torch' not in sys.modules; _ext.ext(); "
            "assert 'torch' in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


def test_failed_torch_import_is_not_cached(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    assert _ext.ext() is None and "torch" in _ext.ext_error()
    assert _ext._loaded is False  # retried on the next call, once torch imports


def _fake(driver, runtime=13000, devices=1, built=True):
    return types.SimpleNamespace(built_with_cuda=built, cuda_driver_version_code=lambda: driver,
                                 cuda_runtime_version_code=lambda: runtime, cuda_device_count=lambda: devices)


@pytest.mark.parametrize("module,reason", [
    (_fake(0), "no NVIDIA driver"),
    (_fake(12080), "older than the static CUDA 13.0 runtime"),
    (_fake(13000, devices=0), "no CUDA device visible"),
    (_fake(13000, built=False), "built without CUDA"),
])
def test_cuda_status_says_why(monkeypatch, module, reason):
    monkeypatch.setattr(_ext, "ext", lambda: module)
    ok, why = _ext._query_cuda()
    assert not ok and reason in why
