"""The fast paths of the common CPU calls (BK-Core with a module's buffers, the pooling ops, the
MoE experts as functional calls) return what the general paths return, gradients included, and are
really taken."""
import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops import _registry
from resnet_bk.ops.bk_core import api as bk_api
from resnet_bk.ops.pooling import compiled as pooling_compiled, reference as pooling_ref
from resnet_bk.models.base import SparseMoELayer

pytestmark = pytest.mark.skipif("cpp" not in ops.available_backends() or not pooling_compiled.HAS_POOL_OPS,
                                reason="compiled extension not built")

@pytest.fixture
def no_dispatch(monkeypatch):
    """Makes the general path raise, so a test sees that the fast path was taken."""
    def boom(*a, **k):
        raise AssertionError("general dispatch path taken")
    monkeypatch.setattr(_registry, "select", boom)


def _grads(out, inputs, g):
    w = torch.randn(out.shape, dtype=out.dtype, generator=g)
    loss = (out * w).real.sum() if out.is_complex() else (out * w).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("learnable", [False, True])
def test_bk_core_module_call_fast_path(dtype, learnable, monkeypatch):
    """(1, N-1) off-diagonal buffers and a 0-dim complex tensor z (buffer or learnable shift)."""
    g = torch.Generator().manual_seed(0)
    N = 17
    a = (torch.rand(3, N, generator=g, dtype=torch.float64) * 6 - 5).to(dtype).requires_grad_()
    off = torch.ones(1, N - 1, dtype=dtype)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    zr = torch.tensor(0.3, dtype=dtype, requires_grad=learnable)
    zbuf = torch.tensor(0.3 + 1j, dtype=cdt)

    def mkz():
        return torch.complex(zr, torch.ones((), dtype=dtype)) if learnable else zbuf
    inputs = (a, zr) if learnable else (a,)
    fast = ops.bk_core(a, off, off, mkz(), causal=True)
    with monkeypatch.context() as m:
        m.setattr(bk_api, "_compiled_cpu_call", lambda *args: None)
        general = ops.bk_core(a, off, off, mkz(), causal=True)
    assert torch.equal(fast, general)
    for gf, gg in zip(_grads(fast, inputs, torch.Generator().manual_seed(1)),
                      _grads(general, inputs, torch.Generator().manual_seed(1))):
        assert torch.equal(gf, gg)
    monkeypatch.setattr(_registry, "select", lambda *a, **k: (_ for _ in ()).throw(AssertionError("general path")))
    ops.bk_core(a, off, off, mkz(), causal=True)  # taken: no dispatch
    with pytest.raises(AssertionError, match="general path"):  # a wrong z dtype is not taken
        ops.bk_core(a, off, off, mkz().to(torch.complex128 if cdt == torch.complex64 else torch.complex64))


def test_bk_core_forced_cpp_takes_the_fast_path(monkeypatch):
    """backend="cpp" forces the backend the fast path runs: same result, no dispatch; other forced
    backends still go through dispatch."""
    a = torch.randn(4, 33, dtype=torch.float64)
    off = torch.ones(32, dtype=torch.float64)
    general = ops.bk_core(a, off, off, 0.5 + 1j, backend="reference")
    monkeypatch.setattr(_registry, "select", lambda *a, **k: (_ for _ in ()).throw(AssertionError("general path")))
    fast = ops.bk_core(a, off, off, 0.5 + 1j, backend="cpp")
    torch.testing.assert_close(fast, general, rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError, match="general path"):
        ops.bk_core(a, off, off, 0.5 + 1j, backend="reference")


def test_bk_core_fast_path_keeps_the_general_errors():
    a = torch.randn(7)
    with pytest.raises(ValueError, match="super_diag"):  # (1, N-1) off-diagonal for an unbatched diag
        ops.bk_core(a, torch.ones(1, 6), torch.ones(1, 6), torch.tensor(1j))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_pooling_fast_paths_match_general(dtype, causal, no_dispatch):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 12, 5, dtype=dtype, generator=g, requires_grad=True)
    lg = torch.randn(4, 3, dtype=dtype, generator=g, requires_grad=True)
    fast = ops.learned_downsample(x, lg, causal=causal)
    ref = pooling_ref.learned_downsample_ref(x, lg, causal)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(_grads(fast, (x, lg), torch.Generator().manual_seed(3)),
                    _grads(ref, (x, lg), torch.Generator().manual_seed(3))):
        torch.testing.assert_close(a, b)
    y = torch.randn(2, 4, 3 * 5, dtype=dtype, generator=g, requires_grad=True)
    for bshape in ((1, 3, 5), (4, 3, 1)):
        bias = torch.randn(bshape, dtype=dtype, generator=g, requires_grad=True)
        for res in (None, torch.randn(2, 12, 5, dtype=dtype, generator=g, requires_grad=True)):
            fast = ops.learned_upsample(y, bias, residual=res)
            ref = pooling_ref.learned_upsample_ref(y, bias, res, None)
            torch.testing.assert_close(fast, ref)
            ins = (y, bias) if res is None else (y, bias, res)
            for a, b in zip(_grads(fast, ins, torch.Generator().manual_seed(4)),
                            _grads(ref, ins, torch.Generator().manual_seed(4))):
                torch.testing.assert_close(a, b)


def test_pooling_fast_path_declines_what_the_general_path_must_check():
    x = torch.randn(2, 12, 5)
    with pytest.raises(ValueError, match="logits"):
        ops.learned_downsample(x, torch.zeros(3, 3))
    with pytest.raises(TypeError, match="logits"):
        ops.learned_downsample(x, torch.zeros(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="residual"):
        ops.learned_upsample(torch.randn(2, 4, 15), torch.zeros(1, 3, 5), residual=torch.randn(2, 11, 5))


def _has_node(out, name):
    stack, seen = [out.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or id(n) in seen:
            continue
        seen.add(id(n))
        if name in n.name():
            return True
        stack += [f for f, _ in n.next_functions]
    return False


@pytest.mark.parametrize("masked", [False, True])
def test_bk_core_autograd_is_the_cpp_node(masked):
    """The compiled op's autograd is the C++ one (csrc/autograd.cpp, no Python per call), and it
    computes the mask gradient only when the mask needs one."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::bk_core_fwd", "Autograd")
    a = torch.randn(3, 16, dtype=torch.float64, requires_grad=True)
    off = torch.ones(15, dtype=torch.float64)
    m = (torch.rand(3, 16) > 0.5).double() if masked else None
    out = ops.bk_core_masked(a, off, off, 1j, m, backend="cpp") if masked else ops.bk_core(a, off, off, 1j, backend="cpp")
    assert _has_node(out, "BkCoreFunction"), out.grad_fn
    (ga,) = torch.autograd.grad(out.real.sum(), a)
    ref_a = a.detach().clone().requires_grad_()
    ref = ops.bk_core_masked(ref_a, off, off, 1j, m, backend="reference") if masked else ops.bk_core(ref_a, off, off, 1j, backend="reference")
    (gr,) = torch.autograd.grad(ref.real.sum(), ref_a)
    torch.testing.assert_close(ga, gr, rtol=1e-10, atol=1e-12)


def test_pooling_autograd_is_the_cpp_node():
    """The pooling ops' autograd is the C++ one too, residual and scale gradients included."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::learned_downsample_fwd", "Autograd")
    assert torch._C._dispatch_has_kernel_for_dispatch_key("resnet_bk::learned_upsample_fwd", "Autograd")
    x = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    d = ops.learned_downsample(x, logits, causal=True)
    assert _has_node(d, "DownsampleFunction")
    y = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(1, 2, 5, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, 8, 5, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    u = ops.learned_upsample(y, bias, residual=res, scale=scale)
    assert _has_node(u, "UpsampleFunction")
    cases = [(d, (x, logits), None)]
    # every residual / scale combination: the C++ node's input indices shift when residual is None
    for r_, s_ in ((res, scale), (None, scale), (res, None), (None, None)):
        out = u if (r_ is res and s_ is scale) else ops.learned_upsample(y, bias, residual=r_, scale=s_)
        cases.append((out, tuple(t for t in (y, bias, r_, s_) if t is not None), (r_ is not None, s_ is not None)))
    for out, inputs, kinds in cases:
        w = torch.randn_like(out)
        got = torch.autograd.grad((out * w).sum(), inputs)
        ref_in = [t.detach().clone().requires_grad_() for t in inputs]
        if kinds is None:
            ref = ops.learned_downsample(ref_in[0], ref_in[1], causal=True, backend="reference")
        else:
            it = iter(ref_in[2:])
            rr = next(it) if kinds[0] else None
            ss = next(it) if kinds[1] else None
            ref = ops.learned_upsample(ref_in[0], ref_in[1], residual=rr, scale=ss, backend="reference")
        want = torch.autograd.grad((ref * w).sum(), ref_in)
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
