"""Fused Dual Attention ops vs eager PyTorch: forward + backward time and peak memory.

    python3 -m pytest bench/bench_attention.py --benchmark-enable -s
    OMP_WAIT_POLICY=PASSIVE python3 -m pytest bench/bench_attention.py --benchmark-enable -s   # shared machine

On a machine shared with other jobs, OpenMP threads that spin while waiting
steal the few cores from each other: with 2 busy cores medians grew 10-20x
for eager and fused alike. ``OMP_WAIT_POLICY=PASSIVE`` (read when OpenMP
loads, so set it on the command line) gives stable figures there.

Tables (printed, and written to bench/results/):
* ``attention_cpu_<op>_M<M>_C<C>_L<L>``: ms per forward + backward on CPU (all torch / OpenMP threads),
  rows ``eager`` (the PyTorch reference, baseline) and ``fused`` (isg._C), extra column ``peak_mb``:
  peak resident memory of the step above what was resident before it, measured after all timings with
  glibc set to mmap every block of 64 kB and more (freed tensors leave the resident set; peak reset
  through /proc/self/clear_refs).
* ``attention_cpu_summary``: speed-up (eager time / fused time) per op and size, with both peaks.
* ``attention_cpu_model``: ms per forward + backward of an ISG-10-2 on one slide, fused ops vs references.
* ``attention_gpu_*``: the same on CUDA (time with synchronisation, peak from torch.cuda.max_memory_allocated),
  only with a CUDA device and a CUDA build of isg._C.
"""

from __future__ import annotations

import ctypes
import re

import pytest
import torch

from isg.model import create_model
from isg.model import dual_attention
from isg.ops import attention as ops

CPU_SIZES = [(512, 64, 16), (2048, 128, 64), (4096, 128, 16)]  # (M patches, C channels, L = S * S)
GPU_SIZES = CPU_SIZES + [(4096, 64, 64), (4096, 256, 64), (16384, 128, 64)]
OPS = ("gated_hadamard", "softmax_spatial_sum")


def _inputs(op, M, C, L, device, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    shapes = [(M, C), (M, C, L), (M, C, L)] if op == "gated_hadamard" else [(M, C, L), (M, C, L)]
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_() for s in shapes]


def _step(op, inputs, fused):
    fn = getattr(ops, op)
    out = fn(*inputs, fused=fused)
    return torch.autograd.grad(out, inputs, torch.ones_like(out))


# ----------------------------------------------------------------------------- CPU memory


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024


def _fixed_mmap_threshold() -> bool:
    """glibc: serve every block >= 64 kB with mmap (fixed M_MMAP_THRESHOLD), so freed tensors leave the resident set.

    Set only for the memory test, which runs after every timing (fresh mmaps page-fault on first touch)."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 65536))
    except OSError:
        return False


def _cpu_peak_mb(fn) -> float:
    """Peak resident bytes of ``fn()`` above the resident set before it, in MB (Linux; the kernel's RSS
    counters are synced lazily, so peaks of a few MB are imprecise)."""
    fn()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    before = _status("VmRSS")
    fn()
    return (_status("VmHWM") - before) / 2**20


def _needs_native(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    probe = torch.zeros(1, device=device)
    if not ops.native_available(probe):
        pytest.skip(f"isg._C has no fused attention kernels for {device}")


# ----------------------------------------------------------------------------- CPU


_CPU_MS: dict[tuple, dict[str, float]] = {}  # (op, size) -> {"eager": ms, "fused": ms}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", CPU_SIZES, ids=lambda s: "M{}_C{}_L{}".format(*s))
def test_cpu_fused_vs_eager(op, size, report):
    _needs_native("cpu")
    inputs = _inputs(op, *size, "cpu")
    _CPU_MS[op, size] = {name: report.measure(lambda: _step(op, inputs, fused), repeat=5) * 1e3
                         for name, fused in (("eager", False), ("fused", True))}


def test_cpu_model_step(report):
    """ISG-10-2 forward + backward on one slide of 256 patches (d = 64, S = 4): fused ops vs references."""
    _needs_native("cpu")
    torch.manual_seed(0)
    model = create_model("isg-10-2", d=64, local_grid=4, n_outputs=100, channels=32, embed_dim=128, depth=2)
    N = 256
    batch = (torch.randn(1, N, 64), torch.randn(1, N, 4, 4, 64), torch.randint(0, 50000, (1, N, 2)),
             torch.ones(1, N, dtype=torch.bool))

    def step():
        model.zero_grad(set_to_none=True)
        model(*batch).sum().backward()

    fused_seconds = report.measure(step, repeat=3)
    originals = dual_attention.gated_hadamard, dual_attention.softmax_spatial_sum
    dual_attention.gated_hadamard, dual_attention.softmax_spatial_sum = (ops.gated_hadamard_reference,
                                                                         ops.softmax_spatial_sum_reference)
    try:
        eager_seconds = report.measure(step, repeat=3)
    finally:
        dual_attention.gated_hadamard, dual_attention.softmax_spatial_sum = originals
    report.add("attention_cpu_model", "isg-10-2 eager ops", eager_seconds * 1e3, unit="ms fwd+bwd", baseline=True,
               higher_is_better=False, patches=N)
    report.add("attention_cpu_model", "isg-10-2 fused ops", fused_seconds * 1e3, unit="ms fwd+bwd",
               higher_is_better=False, patches=N)


def test_cpu_peak_memory_and_tables(report):
    """Runs after the timings: peak memory per contender, then the per-size tables and the summary."""
    _needs_native("cpu")
    if not _fixed_mmap_threshold():
        pytest.skip("peak memory needs glibc's mallopt")
    for (op, size), ms in _CPU_MS.items():
        inputs = _inputs(op, *size, "cpu")
        peak = {name: _cpu_peak_mb(lambda: _step(op, inputs, fused)) for name, fused in (("eager", False), ("fused", True))}
        table = "attention_cpu_{}_M{}_C{}_L{}".format(op, *size)
        for name in ("eager", "fused"):
            report.add(table, name, ms[name], unit="ms fwd+bwd", baseline=name == "eager", higher_is_better=False,
                       peak_mb=round(peak[name], 1), threads=torch.get_num_threads())
        report.add("attention_cpu_summary", "{} M{} C{} L{}".format(op, *size), ms["eager"] / ms["fused"],
                   unit="x speed-up", eager_ms=round(ms["eager"], 2), fused_ms=round(ms["fused"], 2),
                   eager_peak_mb=round(peak["eager"], 1), fused_peak_mb=round(peak["fused"], 1))


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: "M{}_C{}_L{}".format(*s))
def test_gpu_fused_vs_eager(op, size, dtype, report):
    _needs_native("cuda")
    dtype_name = str(dtype).replace("torch.", "")
    table = "attention_gpu_{}_{}_M{}_C{}_L{}".format(op, dtype_name, *size)
    inputs = _inputs(op, *size, "cuda", dtype)
    results = {}
    for name, fused in (("eager", False), ("fused", True)):
        def run():
            _step(op, inputs, fused)
            torch.cuda.synchronize()

        seconds = report.measure(run, repeat=20, warmup=3)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        results[name] = (seconds, peak)
        report.add(table, name, seconds * 1e3, unit="ms fwd+bwd", baseline=name == "eager", higher_is_better=False,
                   peak_mb=round(peak, 1), device=torch.cuda.get_device_name())
    (t_eager, m_eager), (t_fused, m_fused) = results["eager"], results["fused"]
    report.add("attention_gpu_summary", "{} {} M{} C{} L{}".format(op, dtype_name, *size), t_eager / t_fused,
               unit="x speed-up", eager_ms=round(t_eager * 1e3, 3), fused_ms=round(t_fused * 1e3, 3),
               eager_peak_mb=round(m_eager, 1), fused_peak_mb=round(m_fused, 1))
