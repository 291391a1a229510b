"""isg: predict bulk gene expression from H&E whole-slide images.

Pipeline: :mod:`isg.io` (slides, tiles) -> :mod:`isg.select` (Shannon and
baseline selectors) -> :mod:`isg.features` (StyleGAN2 autoencoders) ->
:mod:`isg.model` (Dual Attention network). :mod:`isg.ops` holds the faces of
the native kernels; ``train``, ``infer`` and ``cli`` only wire these together.
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"

_BACKENDS = ("ext", "cuda", "cucim", "openslide", "tifffile", "dali", "lpips")


def is_available(backend: str) -> bool:
    """Whether an optional backend can be used in this process.

    ``ext``: the native module ``isg._C``; ``cuda``: its CUDA kernels and a CUDA
    device; ``cucim`` / ``openslide`` / ``tifffile`` / ``dali``: slide and
    decode backends; ``lpips``: the ImageNet AlexNet weights LPIPS needs (LPIPS itself is part of isg).
    """
    from isg import _ext

    if backend == "ext":
        return _ext.ext() is not None
    if backend == "cuda":
        return _ext.cuda_ready()
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_BACKENDS)}")
    if backend == "lpips":
        from isg.features.lpips_loss import cached_alexnet_weights

        return cached_alexnet_weights() is not None
    module = {"cucim": "cucim", "openslide": "openslide", "tifffile": "tifffile", "dali": "nvidia.dali"}[backend]
    try:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            return False
        if backend == "cucim":
            from isg.io.slide import _quiet_cucim  # cuCIM's cuFile layer prints libcuda errors without a driver

            with _quiet_cucim():
                importlib.import_module("cucim.clara")
        else:
            importlib.import_module(module)
        return True
    except Exception:  # broken install, missing shared library, ...
        return False


def backends() -> dict[str, bool]:
    """Availability of every optional backend (as shown by ``isg info``)."""
    return {name: is_available(name) for name in _BACKENDS}
