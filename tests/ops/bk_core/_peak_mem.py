"""Run one bk_core forward + backward at length N in this (fresh) process and print the growth of the
peak resident set size it caused, in bytes. Used by tests/ops/bk_core/test_long_sequences.py, a fresh process per
size.

The peak is the kernel's high-water mark VmHWM, reset to the current RSS just before the measured
call (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0): ru_maxrss alone cannot be reset, and the
transient peak of ``import torch`` can exceed a small run's peak, hiding it.

usage: python tests/ops/bk_core/_peak_mem.py N causal(0|1) dtype(float32|float64)"""
import resource
import sys

import torch

from resnet_bk import ops


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise KeyError(key)


def reset_peak():
    """Reset the high-water mark to the current RSS; returns the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status("VmRSS")
    except OSError:  # no /proc: ru_maxrss (cannot be reset)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_bytes():
    try:
        return _status("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def main():
    N, causal, dtype = int(sys.argv[1]), sys.argv[2] == "1", getattr(torch, sys.argv[3])
    torch.set_num_threads(1)
    # warm up every code path (allocator, thread pool, kernels) on a tiny problem first
    for n in (64, 4096):
        a = torch.randn(1, n, dtype=dtype, requires_grad=True)
        ops.bk_core(a, torch.ones(n - 1, dtype=dtype), torch.ones(n - 1, dtype=dtype), 1j,
                    causal=causal, backend="cpp").abs().sum().backward()
    g = torch.Generator().manual_seed(0)
    a = (-2.0 + 3.0 * (2 * torch.rand(1, N, generator=g) - 1)).to(dtype).requires_grad_()
    b = torch.ones(N - 1, dtype=dtype, requires_grad=True)
    gout = torch.randn(1, N, generator=g, dtype=torch.complex64).to(
        torch.complex128 if dtype == torch.float64 else torch.complex64)
    base = reset_peak()
    out = ops.bk_core(a, b, b, 1j, causal=causal, backend="cpp")
    ga, gb = torch.autograd.grad(out, (a, b), gout)
    assert torch.isfinite(ga).all() and torch.isfinite(gb).all()
    print(peak_bytes() - base)


if __name__ == "__main__":
    main()
