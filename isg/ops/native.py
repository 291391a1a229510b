"""The one launch point of the native kernels for every face in :mod:`isg.ops`, and its fallback warning.

``isg._C`` binds each kernel as ``<op>_cpu`` (host pointers, then torch's thread count) and, in CUDA
builds, ``<op>_cuda`` (device pointers, then the current stream's handle); see csrc/module.cpp.
When a face cannot use its native kernel on a CPU or CUDA tensor it runs its pure-PyTorch reference
and says so once per op and device type (after stylegan2-ada's ``bias_act``), naming the reason.
"""

from __future__ import annotations

import warnings

import torch

from isg import _ext

__all__ = ["call", "available", "unavailable_reason", "warn_fallback"]


def call(name: str, device: torch.device, *args) -> None:
    """Runs ``isg._C.<name>_cpu(*args, threads)`` or, for a CUDA device, ``isg._C.<name>_cuda(*args, stream)``
    inside a device guard on that device (a tensor on cuda:1 while cuda:0 is current launches on cuda:1)."""
    module = _ext.ext()
    if device.type == "cuda":
        with torch.cuda.device(device):
            getattr(module, f"{name}_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        getattr(module, f"{name}_cpu")(*args, torch.get_num_threads())


def available(name: str, device: torch.device) -> bool:
    """Whether ``isg._C`` has ``name`` for ``device`` and, for CUDA, a usable device and driver."""
    if device.type == "cuda":
        return _ext.has(f"{name}_cuda") and _ext.cuda_ready()
    return device.type == "cpu" and _ext.has(f"{name}_cpu")


def unavailable_reason(name: str, device: torch.device) -> str:
    """Why :func:`available` is False (for messages)."""
    if device.type not in ("cpu", "cuda"):
        return f"isg has no kernels for {device.type} tensors"
    if _ext.ext() is None:
        return f"isg._C is not loaded: {_ext.ext_error()}"
    if device.type == "cuda" and not _ext.cuda_ready():
        return f"isg's CUDA kernels are unusable: {_ext.cuda_status()[1]}"
    suffix = "cuda" if device.type == "cuda" else "cpu"
    return f"isg._C has no {name}_{suffix} (an older or partial build; rebuild it)"


_warned: set[tuple[str, str]] = set()


def warn_fallback(op: str, name: str, device: torch.device) -> None:
    """Warns once per (op, device type) that ``op`` runs its PyTorch reference instead of ``isg._C.<name>``
    on a CPU or CUDA tensor (no warning for other devices, which have no native kernels)."""
    key = (op, device.type)
    if device.type not in ("cpu", "cuda") or key in _warned:
        return
    _warned.add(key)
    warnings.warn(f"{op}: the native {device.type} kernel is not used ({unavailable_reason(name, device)}); "
                  "running the slower PyTorch reference instead (`python -m isg info` tells more)",
                  RuntimeWarning, stacklevel=3)
