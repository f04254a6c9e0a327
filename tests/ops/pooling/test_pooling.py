"""learned_downsample / learned_upsample on every CPU backend: against the plain PyTorch a user would
write (computed in float64), against the reference, gradients of every input, opcheck, torch.compile,
bad input, the causal no-leak property of the down -> up round trip, verify mode.

Tolerances: float64 1e-12 relative to the output's scale; float32 2e-6 (sums of r terms, or B*D
terms for the logits gradient, in float32); bf16/fp16 outputs are one rounding of a float32 result,
so they are held to half an ulp of the dtype (plus float32 noise) against the float64 result of the
*rounded* inputs.
"""
import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops import _registry
from resnet_bk.ops.pooling import compiled as pooling_compiled

from helpers import cpu_backends

BACKENDS = cpu_backends()
HAS_CPP = "cpp" in BACKENDS and pooling_compiled.HAS_POOL_OPS
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
DT_IDS = ["f64", "f32", "bf16"]


def plain_down(x, logits, causal=False):
    """What a user writes (seed design): softmax, view, multiply, sum. float64 throughout."""
    M, r = logits.shape
    x = x.double()
    N, D = x.shape[-2], x.shape[-1]
    if causal and r > 1:  # window of output j is [j*r - r + 1, j*r]
        x = torch.cat([x.new_zeros(x.shape[:-2] + (r - 1, D)), x[..., : N - (r - 1), :]], -2)
    w = torch.softmax(logits.double(), -1)
    return (x.reshape(x.shape[:-2] + (M, r, D)) * w[:, :, None]).sum(-2)


def plain_up(y, bias, residual=None, scale=None):
    """What a user writes: view, add the bias, view, add the residual. float64 throughout."""
    M, RD = y.shape[-2], y.shape[-1]
    if bias.dim() == 2:
        bias = bias[..., None]
    r = bias.shape[1]
    D = RD // r
    v = (y.double().reshape(y.shape[:-2] + (M, r, D)) + bias.double()).reshape(y.shape[:-2] + (M * r, D))
    if scale is not None:
        v = (scale.double() if isinstance(scale, torch.Tensor) else scale) * v
    if residual is not None:
        v = residual.double() + v
    return v


def check_close(got, want, dtype):
    """Relative to the largest magnitude of want (plus half an ulp of each element for bf16/fp16)."""
    got = got.double()
    want = want.double()
    assert got.shape == want.shape
    scale = want.abs().max().clamp_min(1e-30)
    if dtype == torch.float64:
        tol = 1e-12 * scale
    elif dtype == torch.float32:
        tol = 2e-6 * scale
    else:
        eps = torch.finfo(dtype).eps
        tol = eps * want.abs() + 2e-6 * scale
    err = (got - want).abs()
    assert bool((err <= tol).all()), f"max err {err.max().item():.3g} (scale {scale.item():.3g})"


def rnd(*shape, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)


def acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# (B, N, D, r): r = 2 and 4, D not a power of two, N = r (M = 1), r = 1 and 3, long N with small D
DOWN_GRID = [(2, 8, 5, 2), (3, 16, 7, 4), (1, 2, 3, 2), (2, 4, 1, 4), (2, 9, 6, 3), (2, 5, 4, 1),
             (1, 4096, 3, 2), (2, 4096, 5, 4)]
UP_GRID = [(2, 4, 5, 2), (3, 4, 7, 4), (1, 1, 3, 2), (2, 1, 1, 4), (2, 3, 6, 3), (2, 5, 4, 1),
           (1, 2048, 3, 2), (2, 1024, 5, 4)]


def _id(t):
    return "B{}N{}D{}r{}".format(*t)


# ---------------------------------------------------------------------------------------------
# forward

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("shape", DOWN_GRID, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_downsample_forward(backend, causal, shape, dtype):
    B, N, D, r = shape
    x = rnd(B, N, D, dtype=dtype, seed=N + D)
    logits = rnd(N // r, r, dtype=acc(dtype), seed=1, scale=2.0)
    out = ops.learned_downsample(x, logits, causal=causal, backend=backend)
    assert out.shape == (B, N // r, D) and out.dtype == dtype
    check_close(out, plain_down(x, logits, causal), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_kind,with_res", [("MrD", True), ("1rD", False), ("Mr1", True), ("Mr", False)],
                         ids=["MrD-res", "1rD-nores", "Mr1-res", "Mr-nores"])
@pytest.mark.parametrize("shape", UP_GRID, ids=_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS)
def test_upsample_forward(backend, bias_kind, with_res, shape, dtype):
    B, M, D, r = shape
    y = rnd(B, M, r * D, dtype=dtype, seed=M + D)
    bshape = {"MrD": (M, r, D), "1rD": (1, r, D), "Mr1": (M, r, 1), "Mr": (M, r)}[bias_kind]
    bias = rnd(*bshape, dtype=acc(dtype), seed=2)
    res = rnd(B, M * r, D, dtype=dtype, seed=3) if with_res else None
    scale = torch.tensor(0.37, dtype=acc(dtype)) if with_res else None
    out = ops.learned_upsample(y, bias, residual=res, scale=scale, backend=backend)
    assert out.shape == (B, M * r, D) and out.dtype == dtype
    check_close(out, plain_up(y, bias, res, scale), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_scale_variants(backend):
    y, bias = rnd(2, 3, 8), rnd(3, 2, 4, seed=1)
    res = rnd(2, 6, 4, seed=2)
    check_close(ops.learned_upsample(y, bias, scale=0.5, backend=backend), plain_up(y, bias, None, 0.5), torch.float64)
    check_close(ops.learned_upsample(y, bias, res, backend=backend), plain_up(y, bias, res), torch.float64)
    check_close(ops.learned_upsample(y, bias, res, 2, backend=backend), plain_up(y, bias, res, 2.0), torch.float64)


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_cpp_matches_reference(dtype):
    """Both compute in float32 and round once: they agree to one ulp of the dtype."""
    x = rnd(3, 64, 33, dtype=dtype, seed=5)
    logits = rnd(16, 4, dtype=torch.float32, seed=6)
    a = ops.learned_downsample(x, logits, causal=True, backend="cpp")
    b = ops.learned_downsample(x, logits, causal=True, backend="reference")
    eps = torch.finfo(dtype).eps
    assert bool(((a.float() - b.float()).abs() <= eps * b.float().abs() + 1e-6).all())
    y = rnd(3, 16, 4 * 33, dtype=dtype, seed=7)
    bias = rnd(16, 4, 33, dtype=torch.float32, seed=8)
    u1 = ops.learned_upsample(y, bias, x, torch.tensor(0.3), backend="cpp")
    u2 = ops.learned_upsample(y, bias, x, torch.tensor(0.3), backend="reference")
    assert bool(((u1.float() - u2.float()).abs() <= eps * u2.float().abs() + 1e-6).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_and_leading_shapes(backend):
    big = rnd(2, 3, 24, 10, seed=9)
    x = big[..., ::2]  # (2, 3, 24, 5), strided
    assert not x.is_contiguous()
    logits = rnd(4, 6, seed=10).t()  # (6, 4) transposed view
    assert not logits.is_contiguous()
    out = ops.learned_downsample(x, logits, causal=True, backend=backend)
    assert out.shape == (2, 3, 6, 5)
    check_close(out, plain_down(x, logits, True), torch.float64)
    # no batch dimension at all: (N, D)
    check_close(ops.learned_downsample(x[0, 0], logits, backend=backend), plain_down(x[0, 0], logits), torch.float64)

    y = rnd(2, 3, 6, 40, seed=11)[..., ::2]  # (2, 3, 6, 20) strided, r = 4, D = 5
    bias = rnd(4, 6, 5, seed=12).transpose(0, 1)  # (6, 4, 5) non-contiguous
    res = rnd(2, 3, 5, 24, seed=13).transpose(-1, -2)  # (2, 3, 24, 5) non-contiguous
    out = ops.learned_upsample(y, bias, res, 0.7, backend=backend)
    assert out.shape == (2, 3, 24, 5)
    check_close(out, plain_up(y, bias, res, 0.7), torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    out = ops.learned_downsample(torch.zeros(0, 8, 3), torch.zeros(4, 2), backend=backend)
    assert out.shape == (0, 4, 3)
    out = ops.learned_upsample(torch.zeros(0, 4, 6), torch.zeros(4, 2, 3), backend=backend)
    assert out.shape == (0, 8, 3)


def test_nonfinite_propagates_not_clamped():
    x = rnd(2, 8, 3)
    x[1, 5, 2] = float("nan")
    logits = rnd(4, 2, seed=1)
    for backend in BACKENDS:
        out = ops.learned_downsample(x, logits, backend=backend)
        assert torch.isnan(out[1, 2, 2]) and int(torch.isnan(out).sum()) == 1


# ---------------------------------------------------------------------------------------------
# gradients

def _grads(fn, inputs, g):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    gs = torch.autograd.grad(out, ins, g)
    return out, gs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
# D = 37: the kernel's 16-lane dot products (logits gradient) with a tail
@pytest.mark.parametrize("shape", [(2, 8, 5, 2), (2, 12, 3, 4), (1, 3, 2, 3), (2, 4, 2, 1), (2, 6, 37, 2)], ids=_id)
def test_downsample_gradcheck(backend, causal, shape):
    B, N, D, r = shape
    x = rnd(B, N, D, seed=1).requires_grad_()
    logits = rnd(N // r, r, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, l: ops.learned_downsample(x, l, causal=causal, backend=backend),
                                    (x, logits), fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_kind", ["MrD", "1rD", "Mr1", "Mr", "11D"])
@pytest.mark.parametrize("shape", [(2, 3, 5, 2), (2, 2, 3, 4), (1, 1, 2, 3)], ids=_id)
def test_upsample_gradcheck(backend, bias_kind, shape):
    B, M, D, r = shape
    bshape = {"MrD": (M, r, D), "1rD": (1, r, D), "Mr1": (M, r, 1), "Mr": (M, r), "11D": None}[bias_kind]
    if bshape is None:
        bshape = (1, r, 1)
    y = rnd(B, M, r * D, seed=1).requires_grad_()
    bias = rnd(*bshape, seed=2).requires_grad_()
    res = rnd(B, M * r, D, seed=3).requires_grad_()
    scale = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, b, rr, s: ops.learned_upsample(y, b, rr, s, backend=backend),
                                    (y, bias, res, scale), fast_mode=True)
    assert torch.autograd.gradcheck(lambda y, b: ops.learned_upsample(y, b, backend=backend), (y, bias),
                                    fast_mode=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("shape", [(3, 4096, 3, 2), (4, 64, 33, 4)], ids=_id)
def test_downsample_gradients_vs_plain(backend, dtype, causal, shape):
    """The same upstream gradient through the op and through float64 plain PyTorch."""
    B, N, D, r = shape
    x = rnd(B, N, D, dtype=dtype, seed=3)
    logits = rnd(N // r, r, dtype=torch.float32, seed=4)
    g = rnd(B, N // r, D, dtype=dtype, seed=5)
    _, (gx, gl) = _grads(lambda x, l: ops.learned_downsample(x, l, causal=causal, backend=backend), (x, logits), g)
    _, (wx, wl) = _grads(lambda x, l: plain_down(x, l, causal), (x.double(), logits.double()), g.double())
    assert gx.dtype == dtype and gl.dtype == torch.float32
    check_close(gx, wx, dtype)
    # a sum of B*D products in float32 (inputs rounded to bf16 are exact in float32)
    assert ((gl.double() - wl).abs().max() / wl.abs().max()).item() < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("bias_kind", ["MrD", "1rD", "Mr"])
def test_upsample_gradients_vs_plain(backend, dtype, bias_kind):
    B, M, D, r = 3, 256, 5, 4
    bshape = {"MrD": (M, r, D), "1rD": (1, r, D), "Mr": (M, r)}[bias_kind]
    y = rnd(B, M, r * D, dtype=dtype, seed=1)
    bias = rnd(*bshape, dtype=torch.float32, seed=2)
    res = rnd(B, M * r, D, dtype=dtype, seed=3)
    scale = torch.tensor(0.6)
    g = rnd(B, M * r, D, dtype=dtype, seed=4)
    _, got = _grads(lambda y, b, rr, s: ops.learned_upsample(y, b, rr, s, backend=backend), (y, bias, res, scale), g)
    _, want = _grads(plain_up, (y.double(), bias.double(), res.double(), scale.double()), g.double())
    assert got[0].dtype == dtype and got[2].dtype == dtype and got[1].dtype == torch.float32
    check_close(got[0], want[0], dtype)
    check_close(got[2], want[2], dtype)
    # reductions over many terms in float32: bounded relative to the sum of the terms' magnitudes
    assert ((got[1].double() - want[1]).abs().max() / want[1].abs().max()).item() < 1e-5
    terms = (g.double().abs() * plain_up(y.abs(), bias.abs())).sum()
    assert (got[3].double() - want[3]).abs().item() < 1e-6 * terms.item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad(backend):
    """Only some inputs require grad: the others get None, the rest are still right."""
    x = rnd(2, 8, 3)
    logits = rnd(4, 2, seed=1).requires_grad_()
    ops.learned_downsample(x, logits, backend=backend).sum().backward()
    want = torch.autograd.grad(plain_down(x, logits).sum(), logits)[0]
    check_close(logits.grad, want, torch.float64)
    y = rnd(2, 4, 6, seed=2).requires_grad_()
    bias = rnd(4, 2, 3, seed=3)
    s = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    ops.learned_upsample(y, bias, scale=s, backend=backend).sum().backward()
    assert bias.grad is None
    check_close(y.grad, torch.full_like(y, 0.5), torch.float64)
    check_close(s.grad, plain_up(y.detach(), bias).sum(), torch.float64)


# ---------------------------------------------------------------------------------------------
# causality

class _LowResCausal(torch.nn.Module):
    """A low-resolution stand-in that is causal along its sequence axis: position-wise MLP + cumsum."""

    def __init__(self, D, r):
        super().__init__()
        self.a = torch.nn.Linear(D, D).double()
        self.b = torch.nn.Linear(D, r * D).double()

    def forward(self, z):
        return self.b(torch.tanh(self.a(z)).cumsum(-2))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("r", [1, 2, 4, 3])
def test_causal_round_trip_never_sees_the_future(backend, r):
    torch.manual_seed(r)
    B, M, D = 2, 6, 5
    N = M * r
    f = _LowResCausal(D, r)
    logits = rnd(M, r, seed=1)
    bias = rnd(M, r, D, seed=2)
    scale = torch.tensor(0.5, dtype=torch.float64)

    def round_trip(x, causal):
        low = ops.learned_downsample(x, logits, causal=causal, backend=backend)
        return ops.learned_upsample(f(low), bias, residual=x, scale=scale, backend=backend)

    x = rnd(B, N, D, seed=3)
    base = round_trip(x, True)
    for p in range(N):
        x2 = x.clone()
        x2[:, p] += 1.0
        moved = round_trip(x2, True)
        assert torch.equal(moved[:, :p], base[:, :p]), f"position {p} leaked into earlier outputs"
        assert (moved[:, p:] - base[:, p:]).abs().max() > 1e-3
    # the Jacobian says the same: d out[t] / d x[p] == 0 for every p > t
    J = torch.autograd.functional.jacobian(lambda x: round_trip(x, True)[0].sum(-1), x[:1])[:, 0].sum(-1)  # (N, N)
    assert torch.equal(torch.triu(J, 1), torch.zeros_like(J))
    if r > 1:  # the non-causal pooling leaks (the defect of the original design)
        x2 = x.clone()
        x2[:, r - 1] += 1.0
        assert (round_trip(x2, False)[:, 0] - round_trip(x, False)[:, 0]).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_unread_positions_get_zero_gradient(backend):
    B, M, D, r = 2, 3, 4, 4
    x = rnd(B, M * r, D).requires_grad_()
    ops.learned_downsample(x, rnd(M, r, seed=1), causal=True, backend=backend).sum().backward()
    N = M * r
    assert torch.equal(x.grad[:, N - (r - 1):], torch.zeros(B, r - 1, D, dtype=torch.float64))
    assert bool((x.grad[:, : N - (r - 1)] != 0).all())


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile, verify

@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["f64", "bf16"])
def test_opcheck_downsample(causal, dtype):
    x = rnd(2, 12, 5, dtype=dtype).requires_grad_(dtype == torch.float64)  # and logits-only grads in bf16
    logits = rnd(3, 4, dtype=acc(dtype), seed=1).requires_grad_()
    torch.library.opcheck(torch.ops.resnet_bk.learned_downsample_fwd, (x, logits, causal))


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
@pytest.mark.parametrize("variant", ["full", "nores", "noscale", "shared_bias", "scalar_bias"])
def test_opcheck_upsample(variant):
    B, M, D, r = 2, 3, 5, 2
    y = rnd(B, M, r * D).requires_grad_()
    bshape = {"shared_bias": (1, r, D), "scalar_bias": (M, r, 1)}.get(variant, (M, r, D))
    bias = rnd(*bshape, seed=1).requires_grad_()
    res = None if variant == "nores" else rnd(B, M * r, D, seed=2).requires_grad_()
    scale = None if variant == "noscale" else torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_bk.learned_upsample_fwd, (y, bias, res, scale))


class _MultiScale(torch.nn.Module):
    def __init__(self, N, D, r):
        super().__init__()
        self.inp = torch.nn.Linear(D, D)
        self.pool_logits = torch.nn.Parameter(torch.randn(N // r, r))
        self.low = torch.nn.Linear(D, r * D)
        self.pos = torch.nn.Parameter(torch.randn(N // r, r, D) * 0.1)
        self.s = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        h = torch.relu(self.inp(x))
        low = ops.learned_downsample(h, self.pool_logits, causal=True)
        return ops.learned_upsample(self.low(low), self.pos, residual=h, scale=self.s)


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = _MultiScale(32, 12, 4)
    x = torch.randn(3, 32, 12)
    eager = m(x)
    eager.square().sum().backward()
    g_eager = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    out = torch.compile(m, fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, g_eager[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_verify_mode_passes_and_catches(dtype, monkeypatch):
    x = rnd(2, 16, 6, dtype=dtype).requires_grad_()
    logits = rnd(4, 4, dtype=dtype, seed=1).requires_grad_()
    y = rnd(2, 4, 24, dtype=dtype, seed=2).requires_grad_()
    bias = rnd(4, 4, 6, dtype=dtype, seed=3).requires_grad_()
    s = torch.tensor(0.4, dtype=dtype, requires_grad=True)
    with ops.verify():
        d = ops.learned_downsample(x, logits, causal=True, backend="cpp")
        u = ops.learned_upsample(y, bias, residual=x, scale=s, backend="cpp")
        (d.square().sum() + u.square().sum()).backward()
    assert x.grad is not None and logits.grad is not None and s.grad is not None

    def broken(x, logits, causal):
        return pooling_compiled.learned_downsample_compiled(x, logits, causal) * 1.001

    monkeypatch.setitem(_registry._registry["cpp"].impls, "learned_downsample", (broken, None))
    with ops.verify(), pytest.raises(ops.VerificationError, match="forward output"):
        ops.learned_downsample(x.detach(), logits.detach(), backend="cpp")


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
def test_automatic_choice_is_cpp_on_cpu():
    x, logits = rnd(1, 4, 2), rnd(2, 2)
    ch = _registry.choose("learned_downsample", x.device, (x, logits, False))
    assert ch.backend == "cpp"
    ch = _registry.choose("learned_upsample", x.device, (rnd(1, 2, 4), rnd(2, 2, 2), None, None))
    assert ch.backend == "cpp"


# ---------------------------------------------------------------------------------------------
# bad input: errors name the argument, raised before any kernel runs

@pytest.mark.parametrize("case,exc,words", [
    ("x_list", TypeError, "x"),
    ("x_int", TypeError, "x"),
    ("x_1dim", ValueError, "x"),
    ("n_not_divisible", ValueError, "N = 9"),
    ("logits_rows", ValueError, "logits"),
    ("logits_1dim", ValueError, "logits"),
    ("logits_int", TypeError, "logits"),
    ("logits_f64_mix", TypeError, "logits"),
    ("logits_device", RuntimeError, "logits"),
    ("d_zero", ValueError, "D >= 1"),
    ("backend_name", ValueError, "backend"),
])
def test_downsample_bad_input(case, exc, words):
    x, logits = rnd(2, 8, 3, dtype=torch.float32), rnd(4, 2, dtype=torch.float32)
    kw = {}
    if case == "x_list":
        x = x.tolist()
    elif case == "x_int":
        x = x.long()
    elif case == "x_1dim":
        x = x[0, :, 0]
    elif case == "n_not_divisible":
        x = rnd(2, 9, 3, dtype=torch.float32)
    elif case == "logits_rows":
        logits = rnd(3, 2, dtype=torch.float32)
    elif case == "logits_1dim":
        logits = logits[:, 0]
    elif case == "logits_int":
        logits = logits.int()
    elif case == "logits_f64_mix":
        logits = logits.double()
    elif case == "logits_device":
        logits = logits.to("meta")
    elif case == "d_zero":
        x = torch.zeros(2, 8, 0)
    elif case == "backend_name":
        kw["backend"] = "gpu"
    with pytest.raises(exc) as info:
        ops.learned_downsample(x, logits, **kw)
    assert words in str(info.value)


@pytest.mark.parametrize("case,exc,words", [
    ("y_int", TypeError, "y"),
    ("y_not_multiple", ValueError, "y"),
    ("bias_4dim", ValueError, "position_bias"),
    ("bias_wrong_M", ValueError, "position_bias"),
    ("bias_wrong_D", ValueError, "position_bias"),
    ("bias_2d_wrong", ValueError, "position_bias"),
    ("bias_f64_mix", TypeError, "position_bias"),
    ("res_shape", ValueError, "residual"),
    ("res_dtype", TypeError, "residual"),
    ("res_device", RuntimeError, "residual"),
    ("scale_vector", ValueError, "scale"),
    ("scale_str", TypeError, "scale"),
    ("scale_int_tensor", TypeError, "scale"),
])
def test_upsample_bad_input(case, exc, words):
    y = rnd(2, 4, 6, dtype=torch.float32)
    bias = rnd(4, 2, 3, dtype=torch.float32, seed=1)
    res = rnd(2, 8, 3, dtype=torch.float32, seed=2)
    scale = torch.tensor(0.5)
    if case == "y_int":
        y = y.long()
    elif case == "y_not_multiple":
        y = rnd(2, 4, 7, dtype=torch.float32)
    elif case == "bias_4dim":
        bias = bias[None]
    elif case == "bias_wrong_M":
        bias = rnd(3, 2, 3, dtype=torch.float32)
    elif case == "bias_wrong_D":
        bias = rnd(4, 2, 2, dtype=torch.float32)
    elif case == "bias_2d_wrong":
        bias = rnd(2, 3, dtype=torch.float32)
    elif case == "bias_f64_mix":
        bias = bias.double()
    elif case == "res_shape":
        res = res[:, :7]
    elif case == "res_dtype":
        res = res.double()
    elif case == "res_device":
        res = res.to("meta")
    elif case == "scale_vector":
        scale = torch.ones(2)
    elif case == "scale_str":
        scale = "0.5"
    elif case == "scale_int_tensor":
        scale = torch.tensor(1)
    with pytest.raises(exc) as info:
        ops.learned_upsample(y, bias, res, scale)
    assert words in str(info.value)


@pytest.mark.skipif(not HAS_CPP, reason="compiled pooling kernels not built")
def test_kernel_rejects_bad_canonical_args():
    """The C++ ops check their own arguments too (a caller that bypasses the Python layer)."""
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.resnet_bk.learned_downsample_fwd(torch.zeros(1, 8, 2), torch.zeros(3, 2), False)
    with pytest.raises(RuntimeError, match="logits"):
        torch.ops.resnet_bk.learned_downsample_fwd(torch.zeros(1, 8, 2), torch.zeros(4, 2, dtype=torch.float64), False)
    with pytest.raises(RuntimeError, match="bias"):
        torch.ops.resnet_bk.learned_upsample_fwd(torch.zeros(1, 4, 6), torch.zeros(4, 2, 2), None, None)
    with pytest.raises(RuntimeError, match="scale"):
        torch.ops.resnet_bk.learned_upsample_fwd(torch.zeros(1, 4, 6), torch.zeros(4, 2, 3), None, torch.ones(2))
