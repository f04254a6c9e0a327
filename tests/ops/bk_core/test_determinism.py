"""Determinism of the CPU backends (docs/DETERMINISM.md).

Guaranteed and tested here:
* repeated calls with the same inputs, shape, dtype, thread count and instruction set give bitwise
  identical outputs and gradients, on every CPU backend (no atomics, no data-dependent scheduling:
  each (row, chunk) lane is computed by exactly one thread, and the per-lane partial sums of grad z
  are added in lane order after the parallel phase);
* across thread counts, bitwise identical whenever the C++ kernel's chunk plan does not change:
  the kernel cuts a row into C chunks only when the batch is too small to occupy every thread
  (B < 32 * threads in float32, 16 * threads in float64) and N >= 512; with C = 1 (enough rows, or
  N < 512) the thread count only decides which thread runs which block of rows;
* across thread counts with a different chunk plan: agreement to rounding (the chunked carries
  change the order of operations), tested to 1e-12 (float64) / 2e-6 (float32) relative.
"""
import pytest
import torch

from resnet_bk import ops

from helpers import cpu_backends

BACKENDS = cpu_backends()


def _problem(B, N, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (-2.0 + 3.0 * (2 * torch.rand(B, N, generator=g, dtype=torch.float64) - 1)).to(dtype)
    b = (0.5 + torch.rand(B, N - 1, generator=g, dtype=torch.float64)).to(dtype)
    c = (0.5 + torch.rand(N - 1, generator=g, dtype=torch.float64)).to(dtype)
    m = (torch.rand(B, N, generator=g) < 0.7).to(dtype)
    gout = torch.randn(B, N, generator=g, dtype=torch.complex128)
    return a, b, c, m, gout


def _run(backend, a, b, c, m, gout, causal, masked):
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    leaves = [a.clone().requires_grad_(), b.clone().requires_grad_(), c.clone().requires_grad_(),
              torch.tensor(0.3 + 0.9j, dtype=cdt, requires_grad=True)]
    if masked:
        leaves.append(m.clone().requires_grad_())
        out = ops.bk_core_masked(*leaves, causal=causal, backend=backend)
    else:
        out = ops.bk_core(*leaves, causal=causal, backend=backend)
    return [out.detach()] + list(torch.autograd.grad(out, leaves, gout.to(cdt)))


def _bitwise(xs, ys):
    return all(torch.equal(x, y) for x, y in zip(xs, ys))


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,N", [(1, 8192), (40, 300), (3, 3000)], ids=["chunked", "rows", "both"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("variant", ["twosided", "causal", "masked"])
def test_repeated_runs_are_bitwise_identical(backend, B, N, dtype, variant):
    if backend == "reference":
        N = min(N, 2000 // B)  # the reference loops over N in Python
    a, b, c, m, gout = _problem(B, N, dtype)
    causal, masked = variant == "causal", variant == "masked"
    first = _run(backend, a, b, c, m, gout, causal, masked)
    for _ in range(2):
        assert _bitwise(_run(backend, a, b, c, m, gout, causal, masked), first)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("B,N,dtype", [(3, 500, torch.float32), (3, 500, torch.float64),
                                       (64, 1000, torch.float32), (40, 700, torch.float64)],
                         ids=["short-f32", "short-f64", "wide-f32", "wide-f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_thread_count_invariance_without_chunking(B, N, dtype, causal, threads):
    """Shapes where the chunk plan is C = 1 for 1 and 2 threads (N < 512, or B >= 32 x 2 rows in float32,
    16 x 2 in float64): bitwise identical across thread counts."""
    a, b, c, m, gout = _problem(B, N, dtype)
    results = []
    for t in (1, 2):
        threads(t)
        results.append(_run("cpp", a, b, c, m, gout, causal, False))
    assert _bitwise(results[0], results[1])


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)], ids=["f32", "f64"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_thread_count_changes_only_rounding_when_chunking_changes(dtype, tol, causal, threads):
    """B = 1, N = 2^15: 1 thread cuts the row into 32 (f32) / 16 (f64) chunks, 2 threads into 64 / 32. The
    results are not bitwise equal (documented), but equal to rounding."""
    a, b, c, m, gout = _problem(1, 1 << 15, dtype)
    results = []
    for t in (1, 2):
        threads(t)
        results.append(_run("cpp", a, b, c, m, gout, causal, False))
    for x, y in zip(*results):
        x = x.to(torch.complex128) if x.is_complex() else x.double()
        y = y.to(x.dtype)
        assert ((x - y).abs().max() / y.abs().max()).item() < tol
