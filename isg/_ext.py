"""Loading of the native module ``isg._C``.

The extension is optional at import time: every kernel has a pure-PyTorch
reference in :mod:`isg.ops` that is used when the extension (or its CUDA part)
is missing. ``ISG_EXT_PATH=/path/to/build`` loads a development build of
``_C`` from that folder instead of the installed one (see tools/dev_build.sh).
"""

from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import sys
from types import ModuleType

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def _load() -> None:
    global _module, _error, _loaded
    _loaded = True
    override = os.environ.get("ISG_EXT_PATH")
    try:
        if override:
            candidates = sorted(glob.glob(os.path.join(override, "_C*.so")) + glob.glob(os.path.join(override, "_C*.pyd")))
            if not candidates:
                raise ImportError(f"ISG_EXT_PATH={override!r} holds no _C extension")
            spec = importlib.util.spec_from_file_location("isg._C", candidates[0])
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            sys.modules["isg._C"] = module
            _module = module
        else:
            _module = importlib.import_module("isg._C")
    except ImportError as exc:  # not built (pure-Python checkout) or broken build
        _module, _error = None, str(exc)


def ext() -> ModuleType | None:
    """The native module, or None when it is not built."""
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


def cuda_ready() -> bool:
    """True when the native module has CUDA kernels and a CUDA device is usable."""
    module = ext()
    if module is None or not getattr(module, "built_with_cuda", False):
        return False
    try:
        import torch

        return torch.cuda.is_available() and module.cuda_device_count() > 0
    except Exception:  # pragma: no cover - driver oddities
        return False
