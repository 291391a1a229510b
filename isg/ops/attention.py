"""Fused Dual Attention ops: sigmoid-gated Hadamard product and softmax-weighted spatial sum.

Both ops live in the attention-fusion blocks of the Dual Attention network
(:mod:`isg.model`), one per updater:

* ``gated_hadamard(q, k [M, C, L], v [M, C, L]) -> [M, C, L]``
  ``= sigmoid(q * k) * v`` with q broadcast to k (local updater, Eq. 4-5: A = sigmoid(Q (.) K), A (.) V).
  q is ``[M, 1, L]`` in the paper's form (one logit per local position, shared over channels)
  or ``[M, C, 1]`` in the ``-plus`` form (one logit per channel, shared over positions);
* ``softmax_spatial_sum(logits, p [M, C, L]) -> [M, C]``
  ``= sum_j softmax_j(logits) * p_j`` over positions j, logits broadcast to p (global updater,
  Eq. 6-8: Sum(Z (.) P)). logits is ``[M, 1, L]`` in the paper's form (one weight per position,
  shared over channels) or ``[M, C, L]`` in the ``-plus`` form.

Eager PyTorch materialises the intermediates (q * k, the sigmoid, the softmax)
and saves them for backward; the fused kernels read their inputs once, keep
the intermediates in registers, accumulate in float32 and recompute them in
backward. Pattern (pytorch/extension-cpp, stylegan2-ada ``torch_utils/ops``):
pure-PyTorch ``*_reference`` (oracle + fallback), ``torch.library.custom_op``
``isg::<op>`` / ``isg::<op>_backward`` over ``isg._C`` raw-pointer kernels
(CPU C++ with OpenMP, CUDA), fake + autograd registrations, and a public
function that picks the native op when it is available for the input's device
and dtype (float32, float64, float16, bfloat16), else the reference. Under
torch.compile the public functions call the registered ops; in eager mode a
``torch.autograd.Function`` over the same kernel launches, which skips the
custom-op dispatch (~0.15 ms per forward + backward on CPU).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from isg.ops import native

__all__ = [
    "gated_hadamard",
    "gated_hadamard_reference",
    "softmax_spatial_sum",
    "softmax_spatial_sum_reference",
    "native_available",
]

# dtype codes shared with csrc/attention/attention.h (enum class DType)
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


# ----------------------------------------------------------------------------- references (oracle + fallback)


def gated_hadamard_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``sigmoid(q * k) * v``: q [M, 1, L] or [M, C, 1] (broadcast), k and v [M, C, L] -> [M, C, L]."""
    return torch.sigmoid(q * k) * v


def softmax_spatial_sum_reference(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``sum_j softmax_j(logits) * p_j`` over the last axis: logits [M, 1, L] or [M, C, L], p [M, C, L] -> [M, C]."""
    return (torch.softmax(logits, dim=-1) * p).sum(-1)


# ----------------------------------------------------------------------------- argument checks


def _check_device(op: str, *tensors: torch.Tensor) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{op}: inputs are on different devices: {', '.join(sorted(map(str, devices)))}")


def _check_gated(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _check_device("gated_hadamard", q, k, v)
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"gated_hadamard: expected q [M, 1, L] or [M, C, 1], k [M, C, L], v [M, C, L]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    m, c, length = k.shape
    if tuple(q.shape) not in ((m, 1, length), (m, c, 1)):
        raise ValueError(f"gated_hadamard: q {tuple(q.shape)} is neither [M, 1, L] = {(m, 1, length)} "
                         f"nor [M, C, 1] = {(m, c, 1)} for k {tuple(k.shape)}")


def _check_softmax(logits: torch.Tensor, p: torch.Tensor) -> None:
    _check_device("softmax_spatial_sum", logits, p)
    if logits.dim() != 3 or p.dim() != 3:
        raise ValueError(f"softmax_spatial_sum: expected logits [M, 1, L] or [M, C, L] and p [M, C, L]; "
                         f"got logits {tuple(logits.shape)}, p {tuple(p.shape)}")
    m, c, length = p.shape
    if tuple(logits.shape) not in ((m, 1, length), (m, c, length)):
        raise ValueError(f"softmax_spatial_sum: logits {tuple(logits.shape)} is neither [M, 1, L] nor [M, C, L] "
                         f"for p {tuple(p.shape)}")
    if length == 0:
        raise ValueError("softmax_spatial_sum: the spatial axis L is empty (softmax over no positions)")


def _check_native(op: str, *tensors: torch.Tensor) -> None:
    """What the kernels need beyond shapes: one supported dtype, one CPU or CUDA device."""
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) > 1 or next(iter(dtypes)) not in _DTYPE_CODES:
        raise ValueError(f"isg::{op}: expected tensors of one dtype among float32, float64, float16, bfloat16; "
                         f"got {', '.join(str(t.dtype) for t in tensors)}")
    _check_device(f"isg::{op}", *tensors)
    if tensors[0].device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"isg::{op}: no kernel for device {tensors[0].device} (cpu or cuda)")


def _check_gated_op(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    """Checks inside the registered ops (what torch.compile graphs call), before any pointer is read."""
    _check_gated(q, k, v)
    if grad is not None and grad.shape != k.shape:
        raise ValueError(f"isg::{op}: grad {tuple(grad.shape)} does not match k {tuple(k.shape)}")
    _check_native(op, q, k, v, *([] if grad is None else [grad]))


def _check_softmax_op(op: str, logits: torch.Tensor, p: torch.Tensor, grad: torch.Tensor | None = None) -> None:
    _check_softmax(logits, p)
    if grad is not None and grad.shape != p.shape[:2]:
        raise ValueError(f"isg::{op}: grad {tuple(grad.shape)} is not [M, C] = {tuple(p.shape[:2])}")
    _check_native(op, logits, p, *([] if grad is None else [grad]))


# ----------------------------------------------------------------------------- native calls


def _shape_args(small: torch.Tensor, full: torch.Tensor) -> tuple[tuple[int, int, int, bool], int]:
    """((M, C, L, shared_over_channels), dtype code) of a [M, C, L] op whose small operand is ``small``."""
    m, c, length = full.shape
    paper = small.shape[1] == 1 and small.shape[2] == length  # [M, 1, L] (for C = 1 both forms agree)
    return (m, c, length, paper), _DTYPE_CODES[full.dtype]


def _gated_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Kernel launch of the forward (arguments checked by the caller)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(k, memory_format=torch.contiguous_format)
    if k.numel():
        native.call("gated_hadamard_forward", k.device, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                    *_shape_args(q, k))
    return out


def _gated_backward(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grad, q, k, v = grad.contiguous(), q.contiguous(), k.contiguous(), v.contiguous()
    grad_q, grad_k, grad_v = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if q.numel():  # with k empty the kernel zeroes grad_q (a sum over nothing)
        native.call("gated_hadamard_backward", k.device, grad.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                    grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), *_shape_args(q, k))
    return grad_q, grad_k, grad_v


def _softmax_forward(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    logits, p = logits.contiguous(), p.contiguous()
    out = p.new_empty(p.shape[:2])
    if out.numel():
        native.call("softmax_spatial_sum_forward", p.device, logits.data_ptr(), p.data_ptr(), out.data_ptr(),
                    *_shape_args(logits, p))
    return out


def _softmax_backward(grad: torch.Tensor, logits: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # the forward output is recomputed in float inside the kernel (not saved, not rounded)
    grad, logits, p = grad.contiguous(), logits.contiguous(), p.contiguous()
    grad_logits, grad_p = torch.empty_like(logits), torch.empty_like(p)
    if logits.numel():  # with C = 0 the kernel zeroes the paper-form grad_logits
        native.call("softmax_spatial_sum_backward", p.device, grad.data_ptr(), logits.data_ptr(), p.data_ptr(),
                    grad_logits.data_ptr(), grad_p.data_ptr(), *_shape_args(logits, p))
    return grad_logits, grad_p


# Registered ops (torch.compile, torch.export, opcheck): checked, with fake and autograd registrations.


@torch.library.custom_op("isg::gated_hadamard", mutates_args=())
def _gated_hadamard_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    _check_gated_op("gated_hadamard", q, k, v)
    return _gated_forward(q, k, v)


@_gated_hadamard_op.register_fake
def _(q, k, v):
    _check_gated_op("gated_hadamard", q, k, v)
    return torch.empty_like(k, memory_format=torch.contiguous_format)


@torch.library.custom_op("isg::gated_hadamard_backward", mutates_args=())
def _gated_hadamard_backward_op(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_gated_op("gated_hadamard_backward", q, k, v, grad)
    return _gated_backward(grad, q, k, v)


@_gated_hadamard_backward_op.register_fake
def _(grad, q, k, v):
    _check_gated_op("gated_hadamard_backward", q, k, v, grad)
    fmt = torch.contiguous_format
    return (torch.empty_like(q, memory_format=fmt), torch.empty_like(k, memory_format=fmt),
            torch.empty_like(v, memory_format=fmt))


def _gated_hadamard_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _gated_hadamard_grad(ctx, grad):
    q, k, v = ctx.saved_tensors
    return torch.ops.isg.gated_hadamard_backward(grad, q, k, v)


_gated_hadamard_op.register_autograd(_gated_hadamard_grad, setup_context=_gated_hadamard_setup)


@torch.library.custom_op("isg::softmax_spatial_sum", mutates_args=())
def _softmax_spatial_sum_op(logits: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    _check_softmax_op("softmax_spatial_sum", logits, p)
    return _softmax_forward(logits, p)


@_softmax_spatial_sum_op.register_fake
def _(logits, p):
    _check_softmax_op("softmax_spatial_sum", logits, p)
    return p.new_empty(p.shape[:2])


@torch.library.custom_op("isg::softmax_spatial_sum_backward", mutates_args=())
def _softmax_spatial_sum_backward_op(grad: torch.Tensor, logits: torch.Tensor,
                                     p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    _check_softmax_op("softmax_spatial_sum_backward", logits, p, grad)
    return _softmax_backward(grad, logits, p)


@_softmax_spatial_sum_backward_op.register_fake
def _(grad, logits, p):
    _check_softmax_op("softmax_spatial_sum_backward", logits, p, grad)
    fmt = torch.contiguous_format
    return torch.empty_like(logits, memory_format=fmt), torch.empty_like(p, memory_format=fmt)


def _softmax_spatial_sum_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _softmax_spatial_sum_grad(ctx, grad):
    logits, p = ctx.saved_tensors
    return torch.ops.isg.softmax_spatial_sum_backward(grad, logits, p)


_softmax_spatial_sum_op.register_autograd(_softmax_spatial_sum_grad, setup_context=_softmax_spatial_sum_setup)


# Eager autograd over the same kernel launches: the public functions use these outside torch.compile.
# The custom-op dispatch (Python impl, autograd wrapper, redispatch, alias checks) costs ~0.15 ms per
# forward + backward on CPU, as much as the kernels themselves at M = 512 patches (bench_attention.py).


class _GatedHadamard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _gated_forward(q, k, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _gated_backward(grad, *ctx.saved_tensors)


class _SoftmaxSpatialSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, p):
        ctx.save_for_backward(logits, p)
        return _softmax_forward(logits, p)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _softmax_backward(grad, *ctx.saved_tensors)


# ----------------------------------------------------------------------------- public functions


def native_available(x: torch.Tensor) -> bool:
    """Whether the fused kernels serve tensors like ``x`` (device and dtype)."""
    return x.dtype in _DTYPE_CODES and native.available("gated_hadamard_forward", x.device)


def _common(*tensors: torch.Tensor) -> list[torch.Tensor]:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [t.to(dtype) for t in tensors]


def _use_fused(op: str, fused: bool | None, small: torch.Tensor, full: torch.Tensor) -> bool:
    """fused=None: the kernel when it serves ``full`` (else the reference, with a warning once when the dtype has a
    kernel but the device's is missing); True: the kernel or an error; False: the reference."""
    available = native_available(full)
    if fused and not available:
        why = (f"dtype {full.dtype} has none" if full.dtype not in _DTYPE_CODES
               else native.unavailable_reason("gated_hadamard_forward", full.device))
        raise RuntimeError(f"{op}: no fused kernel for {full.dtype} on {full.device} ({why})")
    if fused is None and not available and full.dtype in _DTYPE_CODES:
        native.warn_fallback(op, "gated_hadamard_forward", full.device)
    return available if fused is None else fused


def gated_hadamard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """``sigmoid(q * k) * v``: q [M, 1, L] (paper) or [M, C, 1] (plus), k and v [M, C, L] -> [M, C, L].

    ``fused=None`` uses the native kernel when available for the device and
    dtype, ``True`` requires it, ``False`` forces the PyTorch reference.
    """
    _check_gated(q, k, v)
    q, k, v = _common(q, k, v)
    if _use_fused("gated_hadamard", fused, q, k):
        return torch.ops.isg.gated_hadamard(q, k, v) if torch.compiler.is_compiling() else _GatedHadamard.apply(q, k, v)
    return gated_hadamard_reference(q, k, v)


def softmax_spatial_sum(logits: torch.Tensor, p: torch.Tensor, *, fused: bool | None = None) -> torch.Tensor:
    """``sum_j softmax_j(logits) * p_j`` over positions: logits [M, 1, L] (paper) or [M, C, L] (plus), p [M, C, L] -> [M, C].

    ``fused`` as in :func:`gated_hadamard`.
    """
    _check_softmax(logits, p)
    logits, p = _common(logits, p)
    if _use_fused("softmax_spatial_sum", fused, logits, p):
        compiling = torch.compiler.is_compiling()
        return torch.ops.isg.softmax_spatial_sum(logits, p) if compiling else _SoftmaxSpatialSum.apply(logits, p)
    return softmax_spatial_sum_reference(logits, p)
