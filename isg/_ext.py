"""Loading of the native module ``isg._C``.

The extension is optional at import time: every kernel has a pure-PyTorch
reference in :mod:`isg.ops` that is used when the extension (or its CUDA part)
is missing. ``ISG_EXT_PATH=/path/to/build`` loads a development build of
``_C`` from that folder instead of the installed one (see tools/dev_build.sh).

torch is imported before ``_C``: both use OpenMP, and the runtime loaded first is the one both
use (a wheel repaired by auditwheel vendors its own libgomp; loaded first, it would start a second
thread pool that ``torch.set_num_threads`` does not control). A failed load is remembered only
when torch was importable, so an import-order problem never disables the kernels for the process.
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
import threading
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False
_lock = threading.Lock()  # threads of a cohort reach their first kernel at once: one loads, the others wait


def _import_module() -> ModuleType:
    """``isg._C``: the build in ``ISG_EXT_PATH`` when set, else the installed one (ImportError when neither)."""
    override = os.environ.get("ISG_EXT_PATH")
    if not override:
        return importlib.import_module("isg._C")
    candidates = sorted(glob.glob(os.path.join(override, "_C*.so")) + glob.glob(os.path.join(override, "_C*.pyd")))
    if not candidates:
        raise ImportError(f"ISG_EXT_PATH={override!r} holds no _C extension")
    spec = importlib.util.spec_from_file_location("isg._C", candidates[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["isg._C"] = module
    return module


def _load() -> None:
    global _module, _error, _loaded
    try:
        import torch  # noqa: F401  (first: one OpenMP runtime for torch and _C)
    except ImportError as exc:  # not cached: a later call may succeed
        _module, _error = None, f"torch could not be imported before isg._C: {exc}"
        return
    try:
        _module, _error = _import_module(), None
    except ImportError as exc:  # not built (pure-Python checkout) or broken build
        _module, _error = None, str(exc)
    _loaded = True  # last: a thread that sees it sees the module (or the error)


def ext() -> ModuleType | None:
    """The native module, or None when it is not built."""
    if not _loaded:
        with _lock:
            if not _loaded:
                _load()
    return _module


def ext_error() -> str | None:
    """Why the native module could not be loaded (None when it loaded)."""
    ext()
    return _error


def has(function: str) -> bool:
    """True when the native module is built and exports ``function``."""
    module = ext()
    return module is not None and hasattr(module, function)


_cuda_status: tuple[bool, str] | None = None


def cuda_status() -> tuple[bool, str]:
    """(usable, why): whether isg's CUDA kernels can run in this process, and the reason when not (cached)."""
    global _cuda_status
    if _cuda_status is None:
        status = _query_cuda()
        if ext() is None and not _loaded:  # the load will be retried: do not cache
            return status
        _cuda_status = status
    return _cuda_status


def _query_cuda() -> tuple[bool, str]:
    module = ext()
    if module is None:
        return False, f"isg._C not loaded ({_error})"
    if not getattr(module, "built_with_cuda", False):
        return False, "isg._C was built without CUDA (rebuild with ISG_CUDA=ON and nvcc on PATH)"
    try:
        driver = module.cuda_driver_version_code() if hasattr(module, "cuda_driver_version_code") else None
        runtime = module.cuda_runtime_version_code() if hasattr(module, "cuda_runtime_version_code") else None
        if driver == 0:
            return False, "no NVIDIA driver (libcuda.so.1 not found)"
        if driver is not None and runtime is not None and driver < runtime:
            return False, (f"the NVIDIA driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than the static "
                           f"CUDA {runtime // 1000}.{runtime % 1000 // 10} runtime in isg._C needs (driver >= 580 for CUDA 13)")
        if module.cuda_device_count() == 0:
            return False, "no CUDA device visible (CUDA_VISIBLE_DEVICES, driver state)"
        import torch

        if torch.version.cuda is None:
            return False, f"torch {torch.__version__} is a CPU build"
        if not torch.cuda.is_available():
            return False, f"torch {torch.__version__} sees no CUDA device"
        return True, f"{module.cuda_device_count()} device(s), driver CUDA {driver // 1000}.{driver % 1000 // 10}" if driver else "ok"
    except Exception as exc:  # pragma: no cover - driver oddities
        return False, f"CUDA query failed: {exc}"


def cuda_ready() -> bool:
    """True when the native module has CUDA kernels and a CUDA device is usable."""
    return cuda_status()[0]
