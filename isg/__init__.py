"""isg: predict bulk gene expression from H&E whole-slide images.

Pipeline: :mod:`isg.io` (slides, tiles) -> :mod:`isg.select` (Shannon and
baseline selectors) -> :mod:`isg.features` (StyleGAN2 autoencoders) ->
:mod:`isg.model` (Dual Attention network). :mod:`isg.ops` holds the faces of
the native kernels; ``train``, ``pipeline`` and ``cli`` only wire these together.
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"

_BACKENDS = ("ext", "cuda", "cucim", "openslide", "tifffile", "dali", "nvimgcodec", "lpips")


def is_available(backend: str) -> bool:
    """Whether an optional backend can be used in this process.

    ``ext``: the native module ``isg._C``; ``cuda``: its CUDA kernels and a CUDA
    device; ``cucim`` / ``openslide`` / ``tifffile`` / ``dali`` / ``nvimgcodec``: slide and
    decode backends; ``lpips``: the lpips package (LPIPS itself is built into isg; the package is the
    reference and ``--lpips-impl lpips``).
    """
    from isg import _ext

    if backend == "ext":
        return _ext.ext() is not None
    if backend == "cuda":
        return _ext.cuda_ready()
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_BACKENDS)}")
    module = {"cucim": "cucim", "openslide": "openslide", "tifffile": "tifffile", "dali": "nvidia.dali",
              "nvimgcodec": "nvidia.nvimgcodec", "lpips": "lpips"}[backend]
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        if backend == "cucim":
            from isg.utils import quiet_cucim  # cuCIM's cuFile layer prints libcuda errors without a driver

            with quiet_cucim():
                importlib.import_module("cucim.clara")
        else:
            importlib.import_module(module)
        return True
    except Exception:  # broken install, missing shared library, ...
        return False


def backend_detail(backend: str) -> str:
    """One line on a backend's state for ``isg info``: what was built, or why it is off."""
    from isg import _ext

    if backend == "ext":
        module = _ext.ext()
        return f"built with CUDA: {getattr(module, 'built_with_cuda', False)}" if module else str(_ext.ext_error())
    if backend == "cuda":
        return _ext.cuda_status()[1]
    return ""


def backends() -> dict[str, bool]:
    """Availability of every optional backend (as shown by ``isg info``)."""
    return {name: is_available(name) for name in _BACKENDS}
