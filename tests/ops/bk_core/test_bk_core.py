"""BK-Core forward and exact gradient against the float64 dense oracle and the reference, on every
CPU backend. Tolerances (shared/BK_CORE_MATH.md): float64 1e-10 relative, float32 1e-5 relative
(the pivot algorithm reaches ~3e-7), bf16/fp16 inputs are computed in float32 after rounding the
inputs, so they are held to float32's tolerance against the oracle of the *rounded* inputs."""
import math

import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops import _registry
from resnet_bk.ops.bk_core.canon import canon_bk
from resnet_bk.ops.bk_core.reference import complex_dtype_for

from helpers import cpu_backends, dense_oracle, rel_err

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
BACKENDS = cpu_backends()




def make(shape, N, dtype=torch.float64, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + (6.0 * torch.rand(shape + (N,), generator=g, dtype=torch.float64) - 3.0)
    offs = (N - 1,) if shared else shape + (N - 1,)
    b = 0.5 + torch.rand(offs, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(offs, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), c.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("N", [1, 2, 3, 17, 128])
@pytest.mark.parametrize("lead", [(), (5,), (2, 3)], ids=["lead0", "lead1", "lead2"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=["f64", "f32", "bf16"])
def test_forward_vs_dense(backend, causal, N, lead, dtype):
    a, b, c = make(lead, N, dtype)
    z = 0.3 + 0.8j
    out = ops.bk_core(a, b, c, z, causal=causal, backend=backend)
    assert out.shape == lead + (N,)
    assert out.dtype == (torch.complex128 if dtype == torch.float64 else torch.complex64)
    key = (causal, N, lead, dtype)  # make() is deterministic: one oracle for every backend
    if key not in _DENSE_REF:
        _DENSE_REF[key] = dense_oracle(a.double(), b.double(), c.double(), z, causal)
    assert rel_err(out, _DENSE_REF[key]) < TOL[dtype]


_DENSE_REF = {}  # dense oracles (the causal N = 128 ones take ~15 s each), shared by the backends
_N4097_REF = {}  # the oracle of the one input below, computed once for every backend (~40 s dense)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_forward_n4097_vs_dense(backend, causal):
    a, b, c = make((1,), 4097, torch.float32, shared=True)
    ref_in = [t.double() for t in (a, b, c)]
    if causal not in _N4097_REF:
        if causal:  # leading-block inverses are O(N^4): use the float64 pivot recursion (checked above)
            _N4097_REF[causal] = ops.bk_core(*ref_in, 1j, causal=True, backend="reference")
        else:
            _N4097_REF[causal] = dense_oracle(*ref_in, 1j)
    ref = _N4097_REF[causal]
    out = ops.bk_core(a, b, c, 1j, causal=causal, backend=backend)
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])  # held to the reference
@pytest.mark.parametrize("B,N", [(3, 700), (40, 333), (70, 300), (1, 2000)])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_batched_and_chunked_paths(backend, B, N, causal):
    """Shapes that exercise the C++ kernel's lane padding and its chunked (carry) path."""
    a, b, c = make((B,), N, torch.float64, seed=B + N)
    ref = ops.bk_core(a, b, c, 0.2 + 0.9j, causal=causal, backend="reference")
    out = ops.bk_core(a, b, c, 0.2 + 0.9j, causal=causal, backend=backend)
    assert rel_err(out, ref) < 1e-12


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("B,dtype", [(8, torch.float32), (4, torch.float64), (5, torch.float32)],
                         ids=["B8-f32", "B4-f64", "B5-f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_small_batch_chunks_with_shared_coupling(B, dtype, causal):
    """A small batch cut into parallel chunks with one shared off-diagonal row: with half a SIMD
    block of sequences every block holds two chunks, each half of its lanes reading the shared
    row at its own offset (broadcast per half); B = 5 mixes more chunks per block (transposed
    path). Forward and every gradient against the reference."""
    N = 2000
    a, b, c = make((B,), N, torch.float64, shared=True, seed=B)
    g = torch.Generator().manual_seed(3)
    w = torch.view_as_complex(torch.randn(B, N, 2, generator=g, dtype=torch.float64))

    def run(backend, dt):
        ins = [t.to(dt).requires_grad_() for t in (a, b, c)]
        z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128, requires_grad=True)
        out = ops.bk_core(*ins, z, causal=causal, backend=backend)
        return [out] + list(torch.autograd.grad(out, ins + [z], w.to(out.dtype)))

    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for i, (x, y) in enumerate(zip(run("cpp", dtype), run("reference", torch.float64))):
        assert rel_err(x, y) < tol, (i, rel_err(x, y))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("shared", [False, True], ids=["perrow", "shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_sequential_subchunk_plan(shared, masked, dtype, causal):
    """A batch that fills every thread's SIMD lanes with sequences longer than the kernel's chunk
    (4096) runs each sequence as sub-chunks in order (two-sided forward and backward, causal
    forward; the two-sided ones' right-to-left carries from one boundary pass, blocks in pairs and
    singly): forward and every gradient (z and the mask included) against the reference."""
    B, N = 70, 4500
    a, b, c = make((B,), N, torch.float64, shared=shared, seed=11)
    g = torch.Generator().manual_seed(12)
    mask = (torch.rand(B, N, generator=g, dtype=torch.float64) > 0.2).double() if masked else None
    z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128)
    w = torch.randn(B, N, 2, generator=g, dtype=torch.float64)

    def run(backend, dt):
        ins = [t.to(dt).requires_grad_() for t in (a, b, c)] + [z.clone().requires_grad_()]
        m = mask.to(dt).requires_grad_() if masked else None
        if masked:
            out = ops.bk_core_masked(*ins, m, causal=causal, backend=backend)
        else:
            out = ops.bk_core(*ins, causal=causal, backend=backend)
        leaves = ins + ([m] if masked else [])
        grads = torch.autograd.grad(out, leaves, torch.view_as_complex(w.to(dt)).to(out.dtype))
        return [out] + list(grads)

    got = run("cpp", dtype)
    ref = run("reference", torch.float64)
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for i, (x, y) in enumerate(zip(got, ref)):
        assert rel_err(x, y) < tol, (i, rel_err(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_broadcast_and_noncontiguous(backend):
    B, H, N = 2, 3, 33
    a, _, _ = make((B, H), N)
    big = torch.randn(B, H, 2 * N) * 2
    a_nc = big[..., ::2]  # strided slice
    assert not a_nc.is_contiguous()
    b_shared = 0.5 + torch.rand(N - 1, dtype=torch.float64)
    c_head = (0.5 + torch.rand(H, N - 1, dtype=torch.float64))  # broadcast over B
    c_nc = (0.5 + torch.rand(1, H, 2 * (N - 1), dtype=torch.float64))[..., 1::2]
    for aa, cc in ((a, c_head), (a_nc.double(), c_nc)):
        out = ops.bk_core(aa, b_shared, cc, 1j, backend=backend)
        ref = dense_oracle(aa.double(), b_shared.expand(B, H, N - 1), cc.expand(B, H, N - 1), 1j)
        assert rel_err(out, ref) < 1e-10


def _grads(fn, inputs, g):
    ins = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*ins)
    gs = torch.autograd.grad(out, ins, g, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for x, t in zip(gs, ins)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("N", [1, 2, 3, 17, 64])
@pytest.mark.parametrize("shared", [False, True], ids=["perrow", "shared"])
def test_gradients_vs_dense_autograd(backend, causal, N, shared):
    a, b, c = make((3,), N, torch.float64, shared=shared, seed=N)
    z = torch.tensor(0.3 + 0.8j, dtype=torch.complex128)
    g = torch.randn(3, N, dtype=torch.complex128)
    got = _grads(lambda a, b, c, z: ops.bk_core(a, b, c, z, causal=causal, backend=backend), (a, b, c, z), g)
    want = _grads(lambda a, b, c, z: dense_oracle(a, b, c, z, causal), (a, b, c, z), g)
    for x, y in zip(got, want):
        if y.numel():
            assert rel_err(x, y) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_gradients_float32(backend, causal):
    a, b, c = make((4,), 200, torch.float64, seed=1)
    g = torch.randn(4, 200, dtype=torch.complex128)
    z = torch.tensor(1j, dtype=torch.complex128)
    want = _grads(lambda a, b, c, z: dense_oracle(a, b, c, z, causal), (a, b, c, z), g)
    got = _grads(lambda a, b, c, z: ops.bk_core(a, b, c, z, causal=causal, backend=backend),
                 (a.float(), b.float(), c.float(), z.to(torch.complex64)), g.to(torch.complex64))
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_gradcheck(backend, causal):
    a, b, c = make((2,), 7, torch.float64, seed=3)
    z = torch.tensor(0.1 + 0.7j, dtype=torch.complex128)
    ins = [t.clone().requires_grad_() for t in (a, b, c, z)]
    assert torch.autograd.gradcheck(lambda a, b, c, z: ops.bk_core(a, b, c, z, causal=causal, backend=backend),
                                    ins, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_upstream_gradient(backend):
    a, b, c = make((4,), 50, torch.float64)
    g_full = torch.randn(4, 100, dtype=torch.complex128)
    g_nc = g_full[:, ::2]
    ga = _grads(lambda a: ops.bk_core(a, b, c, 1j, backend=backend), (a,), g_nc)[0]
    gb = _grads(lambda a: ops.bk_core(a, b, c, 1j, backend=backend), (a,), g_nc.contiguous())[0]
    assert torch.equal(ga, gb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_long_sequence_float32(backend, causal):
    """N = 65,536 in float32 against the float64 pivot recursion: no growth of the error."""
    if backend == "reference":
        pytest.skip("the float64 reference *is* the comparison")
    N = 65536
    a, b, c = make((1,), N, torch.float64, shared=True, seed=7)
    ref = ops.bk_core(a, b, c, 1j, causal=causal, backend="reference")
    out = ops.bk_core(a.float(), b.float(), c.float(), 1j, causal=causal, backend=backend)
    assert torch.isfinite(torch.view_as_real(out)).all()
    assert rel_err(out, ref) < 1e-5


def test_causal_never_sees_the_future():
    N, j = 40, 23
    a, b, c = make((2,), N, torch.float64)
    for backend in BACKENDS:
        base = ops.bk_core(a, b, c, 1j, causal=True, backend=backend)
        a2 = a.clone()
        a2[:, j] += 1.7
        b2, c2 = b.clone(), c.clone()
        b2[:, j] += 0.5  # coupling j <-> j+1
        moved = ops.bk_core(a2, b2, c2, 1j, causal=True, backend=backend)
        assert torch.equal(moved[:, :j], base[:, :j])
        assert (moved[:, j:] - base[:, j:]).abs().max() > 1e-3
        # the two-sided op does leak: this is why models use the causal one
        two = ops.bk_core(a, b, c, 1j, backend=backend)
        two2 = ops.bk_core(a2, b2, c2, 1j, backend=backend)
        assert (two2[:, :j] - two[:, :j]).abs().max() > 1e-6


def test_features_dropin():
    a, b, c = make((3,), 16, torch.float32)
    f = ops.bk_core_features(a, b, c, 1j)
    assert f.shape == (3, 16, 2) and f.dtype == torch.float32
    G = ops.bk_core(a, b, c, 1j)
    assert torch.equal(f[..., 0], G.real) and torch.equal(f[..., 1], G.imag)


def test_learnable_z_gets_gradient():
    a, b, c = make((2,), 30, torch.float32)
    eps = torch.tensor(1.0, requires_grad=True)
    z = torch.complex(torch.tensor(0.0), eps)
    ops.bk_core(a, b, c, z).abs().sum().backward()
    assert eps.grad is not None and eps.grad.abs() > 0


# ---------------------------------------------------------------------------------------------
# registration: opcheck, torch.compile

@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_opcheck(causal, masked):
    a, b, c = make((3,), 20, torch.float64)
    from resnet_bk.ops.bk_core.canon import canon_bk
    m = (torch.rand(3, 20) > 0.5).double() if masked else None
    args = canon_bk(a.requires_grad_(), b, c.requires_grad_(), 0.2 + 1j, m)
    zri = args.zri.clone().requires_grad_()
    mask = None if m is None else args.mask.clone().requires_grad_()
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_fwd, (args.a, args.k, zri, mask, causal))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
def test_compile_fullgraph_matches_eager():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 1)
            self.out = torch.nn.Linear(2, 8)
            self.register_buffer("h0", torch.ones(31))

        def forward(self, x):
            v = self.proj(x).squeeze(-1)
            f = ops.bk_core_features(-2.0 + v, self.h0, self.h0, 1j, causal=True)
            return self.out(f)

    torch.manual_seed(0)
    m = M()
    x = torch.randn(4, 32, 8)
    eager = m(x)
    eager.sum().backward()
    g_eager = m.proj.weight.grad.clone()
    m.zero_grad()
    cm = torch.compile(m, fullgraph=True)
    out = cm(x)
    out.sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.proj.weight.grad, g_eager, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument, raised before any kernel runs

def _ok():
    a, b, c = make((2,), 8, torch.float32)
    return a, b, c


@pytest.mark.parametrize("case,exc,words", [
    ("diag_list", TypeError, "diag"),
    ("diag_int", TypeError, "diag"),
    ("diag_complex", TypeError, "diag"),
    ("n_zero", ValueError, "N = 0"),
    ("diag_0dim", ValueError, "diag"),
    ("super_wrong_len", ValueError, "super_diag"),
    ("sub_wrong_batch", ValueError, "sub_diag"),
    ("super_int", TypeError, "super_diag"),
    ("mixed_f64", TypeError, "super_diag"),
    ("z_string", TypeError, "z"),
    ("z_nonfinite", ValueError, "z"),
    ("z_vector", ValueError, "z"),
    ("z_bool", TypeError, "z"),
    ("mask_shape", ValueError, "mask"),
    ("backend_name", ValueError, "backend"),
])
def test_bad_input(case, exc, words):
    a, b, c = _ok()
    z = 1j
    kw = {}
    fn = ops.bk_core
    if case == "diag_list":
        a = a.tolist()
    elif case == "diag_int":
        a = a.long()
    elif case == "diag_complex":
        a = a.to(torch.complex64)
    elif case == "n_zero":
        a, b, c = torch.zeros(2, 0), torch.zeros(2, 0), torch.zeros(2, 0)
    elif case == "diag_0dim":
        a = torch.tensor(1.0)
    elif case == "super_wrong_len":
        b = torch.ones(2, 8)
    elif case == "sub_wrong_batch":
        c = torch.ones(3, 7)
    elif case == "super_int":
        b = torch.ones(7, dtype=torch.int32)
    elif case == "mixed_f64":
        b = b.double()
    elif case == "z_string":
        z = "1j"
    elif case == "z_nonfinite":
        z = complex(0, float("inf"))
    elif case == "z_vector":
        z = torch.tensor([1j, 1j])
    elif case == "z_bool":
        z = True
    elif case == "mask_shape":
        fn = ops.bk_core_masked
        kw["mask"] = torch.ones(2, 7)
    elif case == "backend_name":
        kw["backend"] = "gpu"
    with pytest.raises(exc) as info:
        fn(a, b, c, z, **kw)
    assert words in str(info.value)


@pytest.mark.skipif(not torch.backends.mps.is_available() and not torch.cuda.is_available(),
                    reason="needs a second device")
def test_mixed_devices_error():
    a, b, c = _ok()
    other = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(RuntimeError, match="super_diag"):
        ops.bk_core(a, b.to(other), c, 1j)


def test_mixed_devices_error_meta():
    a, b, c = _ok()
    with pytest.raises(RuntimeError, match="sub_diag"):
        ops.bk_core(a, b, c.to("meta"), 1j)
    with pytest.raises(RuntimeError, match="z"):
        ops.bk_core(a, b, c, torch.tensor(1j, device="meta"))


def test_nonfinite_inputs_propagate_not_clamped():
    a, b, c = make((3,), 20, torch.float64)
    a[1, 5] = float("nan")
    for backend in BACKENDS:
        out = ops.bk_core(a, b, c, 1j, causal=True, backend=backend)
        assert torch.isnan(out[1, 5:]).all()
        assert torch.isfinite(torch.view_as_real(out[1, :5])).all()
        assert torch.isfinite(torch.view_as_real(out[[0, 2]])).all()


def test_empty_batch():
    out = ops.bk_core(torch.zeros(0, 5), torch.ones(4), torch.ones(4), 1j)
    assert out.shape == (0, 5) and out.dtype == torch.complex64


# ---------------------------------------------------------------------------------------------
# dispatch

def test_available_and_explain():
    av = ops.available_backends()
    assert "reference" in av
    a, b, c = _ok()
    ch = ops.explain(a, b, c, 1j)
    assert ch.backend == av[[x for x in av if x in ("cpp", "reference")] and 0] or ch.backend in av
    assert "bk_core" in str(ch)
    forced = ops.explain(a, b, c, 1j, backend="reference")
    assert forced.backend == "reference" and "forced" in str(forced)


def test_env_forces_backend(monkeypatch):
    a, b, c = _ok()
    monkeypatch.setenv("RESNET_BK_BACKEND", "reference")
    assert ops.explain(a, b, c, 1j).backend == "reference"
    monkeypatch.setenv("RESNET_BK_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailableError, match="cuda"):
        ops.bk_core(a, b, c, 1j)


def test_forced_unavailable_backend_raises():
    a, b, c = _ok()
    with pytest.raises(ops.BackendUnavailableError, match="triton|cuda"):
        ops.bk_core(a, b, c, 1j, backend="cuda")


def test_automatic_fallback_warns_once(monkeypatch):
    a, b, c = _ok()
    be = _registry._registry["cpp"]
    monkeypatch.setattr(be, "available", lambda: (False, "pretend the extension did not build"))
    _registry._warned.clear()
    with pytest.warns(RuntimeWarning, match="pretend the extension did not build"):
        out = ops.bk_core(a, b, c, 1j)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out2 = ops.bk_core(a, b, c, 1j)  # second call: no new warning
    assert torch.equal(out, out2)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
def test_verify_mode_passes_and_catches(monkeypatch):
    a, b, c = make((2,), 40, torch.float32)
    a.requires_grad_()
    with ops.verify():
        out = ops.bk_core(a, b, c, 1j, backend="cpp")
        out.abs().sum().backward()
    from resnet_bk.ops.bk_core.compiled import bk_core_compiled

    def broken(a, k, zri, mask, causal):
        return bk_core_compiled(a, k, zri, mask, causal) * 1.001

    monkeypatch.setitem(_registry._registry["cpp"].impls, "bk_core", (broken, None))
    with ops.verify(), pytest.raises(ops.VerificationError, match="forward output"):
        ops.bk_core(a.detach(), b, c, 1j, backend="cpp")

    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, k, zri):
            return bk_core_compiled(a, k, zri, None, False)

        @staticmethod
        def backward(ctx, g):
            return torch.zeros(ctx.needs_input_grad[0] and (2, 40) or (0,)), None, None

    monkeypatch.setitem(_registry._registry["cpp"].impls, "bk_core",
                        (lambda a, k, zri, mask, causal: BadGrad.apply(a, k, zri), None))
    monkeypatch.setenv("RESNET_BK_VERIFY", "1")
    out = ops.bk_core(a, b, c, 1j, backend="cpp")
    with pytest.raises(ops.VerificationError, match="gradient"):
        out.abs().sum().backward()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("B,N,dtype", [(40, 333, torch.float64), (3, 700, torch.float64), (8, 2000, torch.float32),
                                       (70, 4500, torch.float32)],
                         ids=["whole-f64", "chunked-f64", "twochunks-f32", "subchunks-f32"])
@pytest.mark.parametrize("masked", [False, True], ids=["plain", "masked"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_gradient_subsets(B, N, dtype, masked, causal):
    """Only the gradients asked for are computed (no grad k or grad z: the kernels' lean sweep,
    which forms grad a alone); each subset of leaves gets the reference's gradients, on every plan
    of the C++ kernel (whole sequences, parallel chunks, two chunks per block, sequential
    sub-chunks), and the op returns empty tensors for what was not asked for."""
    a, b, c = make((B,), N, torch.float64, shared=True, seed=N)
    g = torch.Generator().manual_seed(5)
    mask = (torch.rand(B, N, generator=g, dtype=torch.float64) > 0.2).double() if masked else None
    w = torch.view_as_complex(torch.randn(B, N, 2, generator=g, dtype=torch.float64))
    z0 = torch.tensor(0.2 + 0.9j, dtype=torch.complex128)

    def run(backend, dt, want):
        ins = {"a": a.to(dt), "b": b.to(dt), "c": c.to(dt), "z": z0.clone(),
               "m": mask.to(dt) if masked else None}
        for name in want:
            ins[name].requires_grad_()
        if masked:
            out = ops.bk_core_masked(ins["a"], ins["b"], ins["c"], ins["z"], ins["m"], causal=causal, backend=backend)
        else:
            out = ops.bk_core(ins["a"], ins["b"], ins["c"], ins["z"], causal=causal, backend=backend)
        return dict(zip(want, torch.autograd.grad(out, [ins[n] for n in want], w.to(out.dtype))))

    ref = run("reference", torch.float64, ["a", "b", "c", "z"] + (["m"] if masked else []))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for want in (["a"], ["a", "b"], ["a", "z"], ["c"], ["z"]) + ((["a", "m"],) if masked else ()):
        got = run("cpp", dtype, want)
        for name in want:
            assert rel_err(got[name], ref[name]) < tol, (want, name, rel_err(got[name], ref[name]))
    # the op itself: grad k and grad z not asked for come back empty
    args = canon_bk(a.to(dtype), b.to(dtype), c.to(dtype), 0.2 + 0.9j,
                               mask.to(dtype) if masked else None)
    ga, gk, gz, gm = torch.ops.resnet_bk.bk_core_bwd(w.to(complex_dtype_for(dtype)), args.a, args.k,
                                                     args.zri, args.mask, causal, False, False, False)
    assert gk.numel() == 0 and gz.numel() == 0 and gm.numel() == 0 and ga.shape == (B, N)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("B,N", [(40, 333), (3, 700), (70, 4500)], ids=["whole", "chunked", "long"])
def test_causal_backward_reads_the_saved_output(B, N):
    """The causal op without a mask saves its output y = 1/d, and the CPU backward reads its pivots
    from it (one pass, no pivot chain): given the true output, every gradient equals the one
    recomputed without it; given a wrong one, the gradients change (so it is really read); the
    two-sided and masked backwards do not use it. Modifying the output in place before backward
    raises autograd's version-counter error instead of giving a wrong gradient."""
    a, b, c = make((B,), N, torch.float64, shared=True, seed=N)
    args = canon_bk(a, b, c, 0.2 + 0.9j)
    g = torch.Generator().manual_seed(9)
    w = torch.view_as_complex(torch.randn(B, N, 2, generator=g, dtype=torch.float64))
    bwd = torch.ops.resnet_bk.bk_core_bwd
    for causal in (True, False):
        y = torch.ops.resnet_bk.bk_core_fwd(args.a, args.k, args.zri, None, causal)
        plain = bwd(w, args.a, args.k, args.zri, None, causal, False)
        given = bwd(w, args.a, args.k, args.zri, None, causal, False, True, True, y)
        for x, r in zip(given[:3], plain[:3]):
            assert rel_err(x, r) < 1e-12
        wrong = bwd(w, args.a, args.k, args.zri, None, causal, False, True, True, y * 1.5)
        assert (rel_err(wrong[0], plain[0]) > 1e-3) == causal
    ar = a.clone().requires_grad_()
    out = ops.bk_core(ar, b, c, 0.2 + 0.9j, causal=True)
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.abs().sum().backward()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
def test_every_cpu_isa_path(isa, tmp_path):
    """Each compiled instruction-set variant gives the reference's answer (subprocess: the choice
    is made once per process)."""
    import subprocess
    import sys
    code = (
        "import torch\nfrom resnet_bk import ops\nfrom resnet_bk import ops\n"
        "torch.manual_seed(0)\n"
        "for B, N in ((3, 700), (70, 50), (70, 4200), (64, 1024)):\n"
        "  a = torch.randn(B, N, dtype=torch.float64) * 2; b = torch.rand(B, N - 1, dtype=torch.float64) + .5\n"
        "  for causal in (False, True):\n"
        "    r = ops.bk_core(a, b, b, .3+.9j, causal=causal, backend='reference')\n"
        "    o = ops.bk_core(a, b, b, .3+.9j, causal=causal, backend='cpp')\n"
        "    assert ((o - r).abs().max() / r.abs().max()) < 1e-12, (B, N, causal)\n"
        "    of = ops.bk_core(a.float(), b.float(), b.float(), .3+.9j, causal=causal, backend='cpp')\n"
        "    assert ((of - r).abs().max() / r.abs().max()) < 1e-5\n"
        "    w = torch.randn_like(r)\n"
        "    ga = [torch.autograd.grad(ops.bk_core(x, b, b, .3+.9j, causal=causal, backend=be), x, w)[0]\n"
        "          for be in ('reference', 'cpp') for x in [a.clone().requires_grad_()]]\n"
        "    assert ((ga[1] - ga[0]).abs().max() / ga[0].abs().max()) < 1e-12, (B, N, causal, 'grad a alone')\n"
        "print(ops.cpu_isa())\n")
    env = dict(__import__("os").environ, RESNET_BK_CPU_ISA=isa)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
def test_double_backward_raises_clearly():
    a, b, c = make((2,), 10, torch.float64)
    a.requires_grad_()
    out = ops.bk_core(a, b, c, 1j, backend="cpp")
    (g,) = torch.autograd.grad(out.abs().sum(), a, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        g.sum().backward()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_common_call_fast_path_matches_general_path(lead, dtype):
    """The automatic call with a shared (N-1,) off-diagonal and a Python z (taken without the
    general canonicalisation once z has been seen) returns what the general path returns, shape
    included, and its gradients."""
    N = 33
    g = torch.Generator().manual_seed(5)
    a = (torch.rand(*lead, N, generator=g, dtype=torch.float64) * 6 - 5).to(dtype).requires_grad_()
    b = torch.ones(N - 1, dtype=dtype)
    ops.bk_core(a, b, b, 0.5 + 1j)  # z seen once
    fast = ops.bk_core(a, b, b, 0.5 + 1j)
    general = ops.bk_core(a, b, b, 0.5 + 1j, backend="cpp")
    assert fast.shape == lead + (N,) and torch.equal(fast, general)
    w = torch.randn(fast.shape, dtype=fast.dtype, generator=g)
    (ga,) = torch.autograd.grad((fast * w).real.sum(), a)
    (gb,) = torch.autograd.grad((general * w).real.sum(), a)
    assert torch.equal(ga, gb)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("B, N, dtype", [(64, 1024, torch.float32), (40, 1030, torch.float32),
                                         (64, 1024, torch.float64), (33, 2048, torch.float64)])
@pytest.mark.parametrize("coupling", ["shared-constant", "shared", "per-row"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_skewed_lane_plans(B, N, dtype, coupling, causal, masked):
    """Rows whose starts are (almost) a multiple of 4 KiB apart run with skewed lanes (each SIMD
    lane starts its sweep at another offset, with padding around its row; csrc/cpu Plan::skew_lanes).
    Output and every gradient equal the reference's, for each kind of coupling row (a shared
    constant row takes a broadcast path), a partly filled last block, a mask and both variants."""
    # (skewed when the batch fills every thread's lanes: B >= 16 float / 8 double lanes x threads;
    # the thread count is left as the run set it)
    g = torch.Generator().manual_seed(N + B)
    a = (torch.rand(B, N, generator=g, dtype=torch.float64) * 6 - 5).to(dtype)
    if coupling == "shared-constant":
        b = torch.full((N - 1,), 0.7, dtype=dtype)
    elif coupling == "shared":
        b = (torch.rand(N - 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    else:
        b = (torch.rand(B, N - 1, generator=g, dtype=torch.float64) + 0.5).to(dtype)
    c = b * 1.1
    m = (torch.rand(B, N, generator=g) < 0.6).to(dtype) if masked else None
    z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128 if dtype == torch.float64 else torch.complex64)
    w = torch.view_as_complex(torch.randn(B, N, 2, generator=g, dtype=torch.float64)).to(z.dtype)
    res = {}
    for be in ("reference", "cpp"):
        leaves = [x.clone().requires_grad_() for x in (a, b, c, z)] + ([m.clone().requires_grad_()] if masked else [])
        if masked:
            out = ops.bk_core_masked(*leaves[:4], leaves[4], causal=causal, backend=be)
        else:
            out = ops.bk_core(*leaves, causal=causal, backend=be)
        res[be] = [out.detach()] + list(torch.autograd.grad((out * w).real.sum(), leaves))
    names = ["out", "diag", "super", "sub", "z", "mask"]
    tol = 1e-9 if dtype == torch.float64 else 3e-5
    for name, x, r in zip(names, res["cpp"], res["reference"]):
        assert rel_err(x, r) < tol, (name, rel_err(x, r))
