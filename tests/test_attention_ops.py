"""Fused Dual Attention ops (isg.ops.attention): native kernels against the PyTorch references."""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from isg import _ext
from isg.ops import attention as ops
from isg.ops import native as launch

@pytest.fixture(scope="session")
def attention_ext(require_ext):
    """The native module with the attention kernels (an older build without them is skipped, or fails under CI)."""
    if not _ext.has("gated_hadamard_forward_cpu"):
        message = "isg._C was built without the attention kernels"
        if os.environ.get("ISG_REQUIRE_EXT") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return require_ext


SIZES = [(1, 1, 1), (3, 5, 7), (6, 7, 16), (3, 11, 32), (2, 3, 49), (7, 1, 3), (5, 4, 33), (0, 3, 4), (2, 0, 5)]
LOW_PRECISION = [torch.float16, torch.bfloat16]
FORMS = ["paper", "plus"]  # q / logits [M, 1, L] (Eq. 3, 6: one per position) or per channel


def _gated_inputs(M, C, L, dtype=torch.float32, seed=0, scale=2.0, form="paper"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((M, 1, L) if form == "paper" else (M, C, 1), generator=g) * scale
    k = torch.randn(M, C, L, generator=g) * scale
    v = torch.randn(M, C, L, generator=g)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _softmax_inputs(M, C, L, dtype=torch.float32, seed=0, scale=3.0, form="paper"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn((M, 1, L) if form == "paper" else (M, C, L), generator=g) * scale
    p = torch.randn(M, C, L, generator=g)
    return [t.to(dtype).requires_grad_() for t in (logits, p)]


def _forward_backward(fn, inputs, grad_seed=1):
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    grads = torch.autograd.grad(out, inputs, grad) if out.numel() else [torch.zeros_like(t) for t in inputs]
    return [out.detach(), *grads]


def _fused_gated(q, k, v):
    return ops.gated_hadamard(q, k, v, fused=True)


def _fused_softmax(logits, p):
    return ops.softmax_spatial_sum(logits, p, fused=True)


CASES = [
    ("gated_hadamard", _gated_inputs, _fused_gated, ops.gated_hadamard_reference),
    ("softmax_spatial_sum", _softmax_inputs, _fused_softmax, ops.softmax_spatial_sum_reference),
]


# ----------------------------------------------------------------------------- references themselves


@pytest.mark.parametrize("form", FORMS)
def test_references_match_definitions(form):
    q, k, v = (t.detach().double() for t in _gated_inputs(2, 3, 5, form=form))
    expected = torch.empty_like(k)
    for m in range(2):
        for c in range(3):
            for j in range(5):
                qj = q[m, 0, j] if form == "paper" else q[m, c, 0]  # Eq. 4: Q broadcast over channels (paper)
                expected[m, c, j] = 1.0 / (1.0 + torch.exp(-qj * k[m, c, j])) * v[m, c, j]
    torch.testing.assert_close(ops.gated_hadamard_reference(q, k, v), expected)

    logits, p = (t.detach().double() for t in _softmax_inputs(2, 3, 5, form=form))
    weights = torch.exp(logits) / torch.exp(logits).sum(-1, keepdim=True)  # Eq. 6: Z = softmax over positions
    expected = torch.stack([(weights[m, 0 if form == "paper" else c] * p[m, c]).sum() for m in range(2) for c in range(3)])
    torch.testing.assert_close(ops.softmax_spatial_sum_reference(logits, p), expected.view(2, 3))


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="gated_hadamard"):
        ops.gated_hadamard(torch.zeros(2, 3, 1), torch.zeros(2, 4, 5), torch.zeros(2, 4, 5))
    with pytest.raises(ValueError, match="gated_hadamard"):
        ops.gated_hadamard(torch.zeros(2, 1, 4), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="gated_hadamard"):
        ops.gated_hadamard(torch.zeros(2, 3, 1), torch.zeros(2, 3, 5), torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="softmax_spatial_sum"):
        ops.softmax_spatial_sum(torch.zeros(2, 3, 5), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="empty"):
        ops.softmax_spatial_sum(torch.zeros(2, 3, 0), torch.zeros(2, 3, 0))
    with pytest.raises(ValueError, match="different devices"):
        ops.gated_hadamard(torch.zeros(2, 3, 1, device="meta"), torch.zeros(2, 3, 5), torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="different devices"):
        ops.softmax_spatial_sum(torch.zeros(2, 3, 5, device="meta"), torch.zeros(2, 3, 5))


def test_unfused_path_is_the_reference():
    q, k, v = _gated_inputs(3, 4, 5)
    torch.testing.assert_close(ops.gated_hadamard(q, k, v, fused=False), ops.gated_hadamard_reference(q, k, v), rtol=0, atol=0)
    logits, p = _softmax_inputs(3, 4, 5)
    torch.testing.assert_close(ops.softmax_spatial_sum(logits, p, fused=False),
                               ops.softmax_spatial_sum_reference(logits, p), rtol=0, atol=0)


# ----------------------------------------------------------------------------- native kernels (CPU)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,make,fused,reference", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_fused_matches_reference_float32(attention_ext, name, make, fused, reference, size, form):
    if name == "softmax_spatial_sum" and size[2] == 0:
        pytest.skip("softmax over no positions is rejected (tested below)")
    inputs = make(*size, form=form)
    got = _forward_backward(fused, inputs)
    expected = _forward_backward(reference, inputs)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,make,fused,reference", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("size", [(3, 5, 7), (6, 7, 16), (2, 3, 49), (4, 8, 64), (3, 97, 16)], ids=lambda s: "x".join(map(str, s)))
def test_low_precision_error_within_twice_eager(attention_ext, name, make, fused, reference, dtype, size, form):
    """Error of the fused op in half / bfloat16 vs a float32 oracle <= 2x the error of eager PyTorch in that
    dtype (flash-attention's rule), relative to the oracle's magnitude."""
    oracle = _forward_backward(reference, [t.detach().float().requires_grad_() for t in make(*size, form=form)])
    low = make(*size, dtype=dtype, form=form)
    got = _forward_backward(fused, low)
    eager = _forward_backward(reference, low)
    for g, e, o in zip(got, eager, oracle):
        assert g.dtype == dtype
        fused_err = (g.float() - o).abs().max().item()
        eager_err = (e.float() - o).abs().max().item()
        floor = torch.finfo(dtype).eps * max(o.abs().max().item(), 1e-3)
        assert fused_err <= 2 * max(eager_err, floor), (fused_err, eager_err)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,make,fused,reference", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("size", [(1, 1, 1), (2, 3, 7), (1, 2, 49), (2, 5, 33)], ids=lambda s: "x".join(map(str, s)))
def test_gradcheck_float64(attention_ext, name, make, fused, reference, size, form):
    inputs = [t.detach().double().requires_grad_() for t in make(*size, scale=1.0, form=form)]
    assert torch.autograd.gradcheck(fused, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("size", [(2, 3, 7), (1, 4, 1), (3, 2, 40)], ids=lambda s: "x".join(map(str, s)))
def test_opcheck(attention_ext, size, form):
    q, k, v = _gated_inputs(*size, form=form)
    torch.library.opcheck(torch.ops.isg.gated_hadamard.default, (q, k, v))
    torch.library.opcheck(torch.ops.isg.gated_hadamard_backward.default,
                          (torch.randn_like(k), q.detach(), k.detach(), v.detach()))
    logits, p = _softmax_inputs(*size, form=form)
    torch.library.opcheck(torch.ops.isg.softmax_spatial_sum.default, (logits, p))
    torch.library.opcheck(torch.ops.isg.softmax_spatial_sum_backward.default,
                          (torch.randn(size[:2]), logits.detach(), p.detach()))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,make,fused,reference", CASES, ids=[c[0] for c in CASES])
def test_eager_function_and_compiled_graph_match_registered_op(attention_ext, name, make, fused, reference, form):
    """Eager calls run the kernels through an autograd.Function, torch.compile graphs the registered op:
    both give the registered op's values and gradients, bit for bit."""
    inputs = make(3, 37, 16, form=form)
    expected = _forward_backward(getattr(torch.ops.isg, name), inputs)
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    for contender in (fused, compiled):
        for got, want in zip(_forward_backward(contender, inputs), expected):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_extreme_values_stay_finite(attention_ext):
    q = torch.tensor([[80.0, -80.0, 0.0]])[..., None]
    k = torch.full((1, 3, 5), 100.0)
    v = torch.ones(1, 3, 5)
    out = ops.gated_hadamard(q, k, v, fused=True)
    torch.testing.assert_close(out, torch.tensor([1.0, 0.0, 0.5])[None, :, None].expand(1, 3, 5))
    logits = torch.tensor([[[1000.0, 0.0, -1000.0], [-5e4, -5e4, -5e4]]])
    p = torch.tensor([[[2.0, 3.0, 4.0], [1.0, 2.0, 3.0]]])
    torch.testing.assert_close(ops.softmax_spatial_sum(logits, p, fused=True), torch.tensor([[2.0, 2.0]]))
    logits.requires_grad_()
    ops.softmax_spatial_sum(logits, p, fused=True).sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_non_contiguous_and_mixed_dtype_inputs(attention_ext):
    q, k, v = (t.detach() for t in _gated_inputs(4, 3, 6, form="plus"))
    k_t = k.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous
    assert not k_t.is_contiguous()
    torch.testing.assert_close(ops.gated_hadamard(q, k_t, v, fused=True), ops.gated_hadamard_reference(q, k, v))
    out = ops.gated_hadamard(q.half(), k, v, fused=True)  # promoted to float32
    assert out.dtype == torch.float32


def test_reference_fallback_warns_once(monkeypatch):
    """fused=None without a kernel for the device: the reference, with one warning per op and device type that names
    the reason; fused=False asks for the reference (no warning); fused=True fails."""
    monkeypatch.setattr(launch, "_warned", set())
    monkeypatch.setattr(_ext, "has", lambda name: False)
    q, k, v = _gated_inputs(2, 3, 4)
    with pytest.warns(RuntimeWarning, match=r"gated_hadamard: the native cpu kernel is not used \(isg._C has no"):
        out = ops.gated_hadamard(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ops.gated_hadamard(q, k, v), out)
        torch.testing.assert_close(ops.gated_hadamard(q, k, v, fused=False), ops.gated_hadamard_reference(q, k, v))
    with pytest.raises(RuntimeError, match="no fused kernel for torch.float32 on cpu"):
        ops.gated_hadamard(q, k, v, fused=True)


def test_public_functions_pick_native_on_cpu(attention_ext):
    assert ops.native_available(torch.zeros(1))
    assert not ops.native_available(torch.zeros(1, dtype=torch.int32))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name,make,fused,reference", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize("size", [(1, 1, 1), (3, 5, 7), (2, 3, 49), (16, 64, 64), (256, 128, 16), (4096, 128, 16), (33, 130, 100)],
                         ids=lambda s: "x".join(map(str, s)))  # the paper's shape (4096 blocks of channel groups), odd ones
def test_cuda_matches_cpu_reference(attention_ext, name, make, fused, reference, dtype, size, form):
    if not ops.native_available(torch.zeros(1, device="cuda")):
        pytest.fail("isg._C has no usable CUDA kernels on this GPU machine (isg info says why)")
    inputs = [t.detach().cuda().requires_grad_() for t in make(*size, dtype=dtype, form=form)]
    got = _forward_backward(fused, inputs)
    oracle = _forward_backward(reference, [t.detach().double().requires_grad_() for t in inputs])
    eager = _forward_backward(reference, inputs)
    for g, e, o in zip(got, eager, oracle):
        fused_err = (g.double() - o).abs().max().item() if g.numel() else 0.0
        eager_err = (e.double() - o).abs().max().item() if e.numel() else 0.0
        floor = torch.finfo(dtype).eps * max(o.abs().max().item() if o.numel() else 0.0, 1e-3) * 4
        assert fused_err <= 2 * max(eager_err, floor), (fused_err, eager_err)


# ----------------------------------------------------------------------------- findings of the kernel review


def test_registered_ops_validate_their_inputs(attention_ext):
    """torch.compile graphs call torch.ops.isg.* directly: wrong dtypes, shapes or devices must raise there
    (before: q.half() made the kernel read past q's end, p.double() gave 3e19)."""
    q, k, v = (t.detach() for t in _gated_inputs(2, 3, 5, form="plus"))
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.isg.gated_hadamard(q.half(), k, v)
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.isg.gated_hadamard(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="neither"):
        torch.ops.isg.gated_hadamard(q[:, :2], k, v)
    with pytest.raises(ValueError, match="grad"):
        torch.ops.isg.gated_hadamard_backward(torch.zeros(2, 3, 4), q, k, v)
    logits, p = (t.detach() for t in _softmax_inputs(2, 3, 5))
    with pytest.raises(ValueError, match="one dtype"):
        torch.ops.isg.softmax_spatial_sum(logits, p.double())
    with pytest.raises(ValueError, match="grad"):
        torch.ops.isg.softmax_spatial_sum_backward(torch.zeros(2, 4), logits, p)
    with pytest.raises(ValueError, match="different devices"):
        torch.ops.isg.softmax_spatial_sum(logits.to("meta"), p)


def test_entry_points_follow_one_naming(attention_ext):
    """One binding table (csrc/module.cpp): every kernel as <op>_cpu and, in CUDA builds, <op>_cuda; no other spelling."""
    names = {name for name in dir(attention_ext) if not name.startswith("_")}
    kernels = {"gated_hadamard_forward", "gated_hadamard_backward", "softmax_spatial_sum_forward",
               "softmax_spatial_sum_backward", "shannon_histogram"}
    assert {f"{k}_cpu" for k in kernels} | {"shannon_bits_cpu"} <= names
    cuda_entries = {name for name in names if name.endswith("_cuda")} - {"built_with_cuda"}
    assert cuda_entries == ({f"{k}_cuda" for k in kernels} if attention_ext.built_with_cuda else set())
    assert not kernels & names


def test_kernels_reject_null_pointers(attention_ext):
    with pytest.raises(ValueError, match="null"):
        attention_ext.gated_hadamard_forward_cpu(0, 0, 0, 0, (2, 3, 4, True), 0, 1)
    with pytest.raises(ValueError, match="null"):
        attention_ext.softmax_spatial_sum_backward_cpu(0, 0, 0, 0, 0, (2, 3, 4, False), 0, 1)


@pytest.mark.parametrize("form", FORMS)
def test_non_finite_rows_match_reference(attention_ext, form):
    """All -inf / NaN logits: NaN as in PyTorch (before: NaN was cast to int inside exp, undefined behaviour)."""
    logits = torch.tensor([[-float("inf")] * 4, [float("nan"), 0.0, 1.0, 2.0], [0.0, 1.0, -float("inf"), 3.0]])[:, None]
    p = torch.randn(3, 2, 4)
    logits = logits if form == "paper" else logits.expand(3, 2, 4).contiguous()
    torch.testing.assert_close(ops.softmax_spatial_sum(logits, p, fused=True), ops.softmax_spatial_sum_reference(logits, p),
                               equal_nan=True)
    q = torch.tensor([float("inf"), -float("inf"), float("nan")]).view(3, 1, 1).expand(3, 1, 4).contiguous()
    q = q if form == "paper" else q[:, :, :1].expand(3, 2, 1).contiguous()
    k, v = torch.ones(3, 2, 4), torch.ones(3, 2, 4)
    torch.testing.assert_close(ops.gated_hadamard(q, k, v, fused=True), ops.gated_hadamard_reference(q, k, v), equal_nan=True)


def test_cpu_kernels_honour_torch_thread_count(attention_ext, monkeypatch):
    """The CPU kernels get torch.get_num_threads() explicitly (one OpenMP pool, whatever the import order)."""
    seen = []
    module = attention_ext

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                seen.append(args[-1])
                return getattr(module, name)(*args)
            return call

    monkeypatch.setattr(_ext, "ext", lambda: Spy())
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        q, k, v = _gated_inputs(4, 3, 16)
        ops.gated_hadamard(q, k, v, fused=True).sum().backward()
    finally:
        torch.set_num_threads(previous)
    assert seen == [1, 1]
