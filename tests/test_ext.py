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


@pytest.mark.parametrize("threads", [2, 7])
def test_threads_reaching_their_first_kernel_at_once_all_get_the_module(monkeypatch, threads):
    """A cohort's reader threads call ext() together while the module loads (it takes a while): none may see
    "not loaded" and fall back to the PyTorch reference (isg paper's preprocess did: "isg._C is not loaded: None")."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    module, loads = types.SimpleNamespace(name="isg._C"), []

    def slow_import():
        loads.append(1)
        time.sleep(0.2)
        return module

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", None)
    monkeypatch.setattr(_ext, "_import_module", slow_import)
    start = threading.Barrier(threads)

    def first_kernel(_):
        start.wait()
        return _ext.ext(), _ext.ext_error()

    with ThreadPoolExecutor(threads) as pool:
        seen = list(pool.map(first_kernel, range(threads)))
    assert seen == [(module, None)] * threads and loads == [1]


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


# ----------------------------------------------------------------------------- a toy kernel through the one launch point


@pytest.mark.parametrize("n", [1, 7])
def test_a_toy_kernel_face_launches_through_the_binding_names(monkeypatch, n):
    """The face side of docs/architecture.md's kernel recipe: `<op>_cpu(pointers..., num_threads)` is found by its
    name and called by isg.ops.native; without it the face runs its reference and warns once."""
    import warnings

    import torch

    from isg.ops import native

    calls = []

    def toy_scale_cpu(src, dst, size, factor, threads):  # what an ISG_BIND'ed C++ function receives
        calls.append(threads)
        torch.mul(src_tensor, factor, out=dst_tensor)

    src_tensor, dst_tensor = torch.arange(n, dtype=torch.float32), torch.empty(n)

    def face(x: torch.Tensor) -> torch.Tensor:  # the recipe's face, over the one launch point
        if native.available("toy_scale", x.device):
            native.call("toy_scale", x.device, x.data_ptr(), dst_tensor.data_ptr(), x.numel(), 2.0)
            return dst_tensor
        native.warn_fallback("toy_scale", "toy_scale", x.device)
        return x * 2.0  # the reference

    monkeypatch.setattr(_ext, "ext", lambda: types.SimpleNamespace(toy_scale_cpu=toy_scale_cpu))
    torch.testing.assert_close(face(src_tensor), src_tensor * 2)
    assert calls == [torch.get_num_threads()]

    monkeypatch.setattr(_ext, "ext", lambda: types.SimpleNamespace())  # a build without the op
    monkeypatch.setattr(native, "_warned", set())
    with pytest.warns(RuntimeWarning, match=r"toy_scale: the native cpu kernel is not used \(isg._C has no toy_scale_cpu"):
        torch.testing.assert_close(face(src_tensor), src_tensor * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        face(src_tensor)
