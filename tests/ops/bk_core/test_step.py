"""``ops.bk_core_step``, the one-token decode step of the causal BK-Core, on every CPU backend
(reference, cpp, and triton under TRITON_INTERPRET=1): decoding a sequence step by step equals
``bk_core(..., causal=True)`` of the whole sequence (float64 1e-12, float32 1e-6 relative), exact
gradients (gradcheck in float64, every input including the state and a tensor z; the gradients of
a decoded sequence equal those of the whole one), the out= and inplace forms, torch.compile,
opcheck of the compiled ops, explain / verify, and every bad input."""
import pytest
import torch

from resnet_bk import ops
from resnet_bk.ops import _registry, _triton
from resnet_bk.ops.bk_core import step as step_mod

from helpers import cpu_backends, rel_err


def _backends():
    bs = cpu_backends()
    if "triton" in ops.available_backends() and _triton.check(torch.zeros(1)) is None:
        bs.append("triton")
    return bs


BACKENDS = _backends()
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-6}
CDT = {torch.float64: torch.complex128, torch.float32: torch.complex64, torch.bfloat16: torch.complex64}


def make(lead, N, dtype=torch.float64, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + (6.0 * torch.rand(lead + (N,), generator=g, dtype=torch.float64) - 3.0)
    offs = (N - 1,) if shared else lead + (N - 1,)
    b = 0.5 + torch.rand(offs, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(offs, generator=g, dtype=torch.float64)
    return a.to(dtype), b.to(dtype), c.to(dtype)


def decode(a, b, c, z, backend, **kw):
    """Step by step over the last dim: (y (..., N), last state)."""
    N = a.shape[-1]
    ys, state = [], None
    for t in range(N):
        j = max(t - 1, 0)  # the coupling into position t (unused at t = 0, but validated)
        y, state = ops.bk_core_step(a[..., t], b[..., j], c[..., j], z, state, backend=backend, **kw)
        ys.append(y)
    return torch.stack(ys, -1), state


# every backend x dtype x batch shape x coupling; the interpreted Triton kernels (slow) on one batch shape
DECODE_CASES = [(be, dt, lead, sh) for be in BACKENDS
                for dt in (torch.float64, torch.float32, torch.bfloat16)
                for lead in ((), (3,), (2, 3)) for sh in (False, True)
                if be != "triton" or lead == (3,)]


@pytest.mark.parametrize("backend,dtype,lead,shared", DECODE_CASES,
                         ids=[f"{be}-{str(dt)[6:]}-lead{len(lead)}-{'shared' if sh else 'perrow'}"
                              for be, dt, lead, sh in DECODE_CASES])
def test_decode_equals_whole_sequence(backend, shared, lead, dtype):
    N = 9
    a, b, c = make(lead, N, dtype, shared, seed=len(lead) + 3 * shared)
    z = 0.3 + 0.8j
    y, d = decode(a, b, c, z, backend)
    assert y.dtype == CDT[dtype] and d.dtype == CDT[dtype] and d.shape == lead
    whole = ops.bk_core(a, b, c, z, causal=True, backend=backend)
    assert rel_err(y, whole) < TOL[dtype]
    # the state is the last pivot: y_N = 1 / d_N
    assert rel_err(1.0 / d, whole[..., -1]) < TOL[dtype]
    if backend != "reference":
        ref = ops.bk_core(a, b, c, z, causal=True, backend="reference")
        assert rel_err(y, ref) < TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_and_tensor_z(backend):
    """state=None: d = diag - z (super/sub unused); a real 0-dim tensor z is a real shift."""
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    b = torch.tensor(7.0, dtype=torch.float64)
    for z in (0.25 + 1j, torch.tensor(0.25 + 1j, dtype=torch.complex128), torch.tensor(0.25, dtype=torch.float64)):
        y, d = ops.bk_core_step(a, b, b, z, None, backend=backend)
        zc = complex(z.item()) if isinstance(z, torch.Tensor) else z
        want = a.to(torch.complex128) - zc
        assert torch.allclose(d, want, rtol=0, atol=1e-15)
        assert torch.allclose(y, 1 / want, rtol=1e-15, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_and_empty_batch(backend):
    a, b, c = make((), 4)
    y, d = decode(a, b, c, 1j, backend)
    assert d.shape == () and rel_err(y, ops.bk_core(a, b, c, 1j, causal=True)) < 1e-12
    e = torch.zeros(0, dtype=torch.float64)
    y, d = ops.bk_core_step(e, torch.tensor(1.0, dtype=torch.float64), e, 1j,
                            torch.zeros(0, dtype=torch.complex128), backend=backend)
    assert y.shape == (0,) and d.shape == (0,)


# ---- gradients ------------------------------------------------------------------------------

def _leaves(shared, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(3, generator=g, dtype=torch.float64) * 4 - 2
    b = (0.5 + torch.rand((1,) if shared else (3,), generator=g, dtype=torch.float64))
    c = (0.5 + torch.rand(() if shared else (3,), generator=g, dtype=torch.float64))
    z = torch.tensor(0.3 + 0.7j, dtype=torch.complex128)
    s = torch.randn(3, generator=g, dtype=torch.complex128) + 1.5
    return [t.requires_grad_() for t in (a, b, c, z, s)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shared", [False, True], ids=["perrow", "shared"])
def test_gradcheck(backend, shared):
    a, b, c, z, s = _leaves(shared)

    def f(a, b, c, z, s):
        return ops.bk_core_step(a, b, c, z, s, backend=backend)

    assert torch.autograd.gradcheck(f, (a, b, c, z, s))

    def first(a, z):  # the first token: no state
        return ops.bk_core_step(a, b.detach(), c.detach(), z, None, backend=backend)

    assert torch.autograd.gradcheck(first, (a, z))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck(backend):
    """The backward is torch formulas on the saved output, so a double backward is exact too."""
    leaves = _leaves(False, seed=3)
    assert torch.autograd.gradgradcheck(lambda *x: ops.bk_core_step(*x, backend=backend), tuple(leaves))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_decoded_sequence_equal_whole(backend):
    """A loss on the decoded outputs (and the final state) has the gradients of the same loss on
    bk_core of the whole sequence, for diag, both off-diagonals and z."""
    a, b, c = make((2,), 6, seed=5)
    w = torch.randn(2, 6, dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    grads = []
    for run in ("step", "whole"):
        leaves = [t.clone().requires_grad_() for t in (a, b, c)]
        z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128, requires_grad=True)
        if run == "step":
            y, _ = decode(*leaves, z, backend)
        else:
            y = ops.bk_core(*leaves, z, causal=True, backend="reference")
        (y * w).real.sum().backward()
        grads.append([t.grad for t in leaves] + [z.grad])
    for name, g1, g2 in zip(("diag", "super", "sub", "z"), *grads):
        assert rel_err(g1, g2) < 1e-12, name


def test_state_gradient_chains_chunks():
    """Gradients flow through the state across steps (truncated BPTT works by detaching it)."""
    a, b, c = make((2,), 3, seed=2)
    _, s1 = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 1j, None)
    s1 = s1.detach().requires_grad_()
    y2, s2 = ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s1)
    y3, _ = ops.bk_core_step(a[:, 2], b[:, 1], c[:, 1], 1j, s2)
    y3.real.sum().backward()
    assert s1.grad is not None and torch.isfinite(torch.view_as_real(s1.grad)).all()
    s1b = s1.detach().requires_grad_()
    y3b, _ = ops.bk_core_step(a[:, 2], b[:, 1], c[:, 1], 1j,
                              ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s1b, backend="reference")[1],
                              backend="reference")
    y3b.real.sum().backward()
    assert rel_err(s1.grad, s1b.grad) < 1e-12


# ---- out= and inplace ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_out_and_inplace(backend, dtype):
    a, b, c = make((4,), 5, dtype, seed=7)
    whole = ops.bk_core(a, b, c, 0.5j, causal=True)
    cdt = CDT[dtype]
    ys = torch.empty(5, 4, dtype=cdt)
    with torch.no_grad():
        y0, state = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 0.5j, None, out=ys[0], backend=backend)
        assert y0 is ys[0] or y0.data_ptr() == ys[0].data_ptr()
        ptr = state.data_ptr()
        for t in range(1, 5):
            y, st = ops.bk_core_step(a[:, t], b[:, t - 1], c[:, t - 1], 0.5j, state, out=ys[t], inplace=True,
                                     backend=backend)
            assert st is state and st.data_ptr() == ptr and y.data_ptr() == ys[t].data_ptr()
    assert rel_err(ys.T, whole) < TOL[dtype]
    assert rel_err(1.0 / state, whole[:, -1]) < TOL[dtype]
    # inplace without out= returns a fresh y; out= without inplace leaves the state alone
    st = state.clone()
    y, st2 = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 0.5j, st, inplace=True, backend=backend)
    y_ref, d_ref = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 0.5j, state, backend="reference")
    assert st2 is st and rel_err(st, d_ref) < TOL[dtype] and rel_err(y, y_ref) < TOL[dtype]
    keep = state.clone()
    o = torch.empty(4, dtype=cdt)
    y, d = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 0.5j, state, out=o, backend=backend)
    assert y is o and torch.equal(state, keep) and rel_err(d, d_ref) < TOL[dtype]


# ---- dispatch, explain, verify, compile, opcheck -----------------------------------------------

def test_explain_and_automatic_backend():
    a, b, c = make((3,), 2)
    s = torch.ones(3, dtype=torch.complex128)
    ch = ops.explain(ops.bk_core_step, a[:, 1], b[:, 0], c[:, 0], 1j, s)
    assert ch.op == "bk_core_step"
    assert ch.backend == ("cpp" if "cpp" in ops.available_backends() else "reference")
    assert ops.explain(ops.bk_core_step, a[:, 1], b[:, 0], c[:, 0], 1j, None, backend="reference").backend == "reference"
    with pytest.raises(ops.BackendUnavailableError, match="bk_core_step"):
        ops.explain(ops.bk_core_step, a[:, 1], b[:, 0], c[:, 0], 1j, s, backend="cuda")


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")
def test_fast_path_calls_the_compiled_op_once(monkeypatch):
    """The decode call on CPU tensors under no_grad goes straight to the one compiled op."""
    a, b, c = make((4,), 2, torch.float32)
    s = torch.ones(4, dtype=torch.complex64)
    calls = []
    monkeypatch.setattr(step_mod, "canon_step", lambda *x, **k: calls.append("canon") or (_ for _ in ()).throw(
        AssertionError("general path taken")))
    with torch.no_grad(), torch.profiler.profile() as prof:
        y, d = ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s)
        ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s, out=y, inplace=True)
    names = [e.name for e in prof.events()]
    assert names.count("resnet_bk::bk_core_step") == 1 and names.count("resnet_bk::bk_core_step_out") == 1
    assert not calls
    assert not y.requires_grad


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")
def test_environment_turns_the_fast_path_off(monkeypatch):
    """RESNET_BK_BACKEND and RESNET_BK_VERIFY, set after import, are read on every call."""
    a, b, c = make((4,), 2)
    s = torch.ones(4, dtype=torch.complex128)

    def compiled_calls():
        with torch.no_grad(), torch.profiler.profile() as prof:
            ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s)
        return [e.name for e in prof.events()].count("resnet_bk::bk_core_step")

    assert compiled_calls() == 1
    monkeypatch.setenv("RESNET_BK_BACKEND", "reference")
    assert compiled_calls() == 0
    monkeypatch.delenv("RESNET_BK_BACKEND")
    monkeypatch.setenv("RESNET_BK_VERIFY", "1")
    calls = []
    monkeypatch.setattr(step_mod, "_check_against_reference", lambda *x: calls.append(x[0]))
    assert compiled_calls() == 1 and calls == ["cpp"]


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")
def test_verify_mode_passes():
    a, b, c = make((3,), 4, seed=4)
    a.requires_grad_()
    with ops.verify():
        y, _ = decode(a, b, c, 1j, "cpp")
        y.real.sum().backward()
        with torch.no_grad():
            st = torch.ones(3, dtype=torch.complex128)
            ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 1j, st, inplace=True, backend="cpp")
    assert a.grad is not None


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="needs the C++ backend")
def test_verify_mode_catches_a_wrong_backend(monkeypatch):
    a, b, c = make((3,), 2, seed=4)
    s = torch.ones(3, dtype=torch.complex128)
    impls = _registry._registry["cpp"].impls
    fn, check = impls["bk_core_step"]
    monkeypatch.setitem(impls, "bk_core_step", (lambda *x: tuple(t * 1.001 for t in fn(*x)), check))
    out_fn, out_check = impls["bk_core_step_out"]

    def wrong_out(*x):
        out_fn(*x)
        x[-1].mul_(1.001)

    monkeypatch.setitem(impls, "bk_core_step_out", (wrong_out, out_check))
    with ops.verify():
        with pytest.raises(ops.VerificationError, match="bk_core_step: output y of backend 'cpp'"):
            ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s, backend="cpp")
        with pytest.raises(ops.VerificationError, match="bk_core_step: output d of backend 'cpp'"):
            ops.bk_core_step(a[:, 1], b[:, 0], c[:, 0], 1j, s, inplace=True, backend="cpp")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces a step (functional, with its gradient) and the
    in-place decode form."""
    a, b, c = make((3,), 2, seed=9)
    s = ops.bk_core_step(a[:, 0], b[:, 0], c[:, 0], 1j, None)[1].detach()

    def f(x, st):
        y, d = ops.bk_core_step(x, b[:, 0], c[:, 0], 1j, st, backend=backend)
        return (y * d).real.sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    x1, x2 = a[:, 1].clone().requires_grad_(), a[:, 1].clone().requires_grad_()
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    l1, l2 = cf(x1, s1), f(x2, s2)
    l1.backward()
    l2.backward()
    assert rel_err(l1.detach(), l2.detach()) < 1e-12
    assert rel_err(x1.grad, x2.grad) < 1e-12 and rel_err(s1.grad, s2.grad) < 1e-12

    def g(x, st, out):
        return ops.bk_core_step(x, b[:, 0], c[:, 0], 1j, st, out=out, inplace=True, backend=backend)

    cg = torch.compile(g, fullgraph=True, backend="aot_eager")
    st1, st2 = s.clone(), s.clone()
    o1, o2 = torch.empty_like(s), torch.empty_like(s)
    with torch.no_grad():
        cg(a[:, 1], st1, o1)
        g(a[:, 1], st2, o2)
    assert rel_err(st1, st2) < 1e-12 and rel_err(o1, o2) < 1e-12


def _opcheck_args(dtype=torch.float64):
    a, b, c, z, s = [t.detach() for t in _leaves(False)]
    zri = torch.tensor([0.3, 0.7], dtype=dtype)
    return a.to(dtype), b.to(dtype), c.to(dtype), zri, s.to(CDT[dtype])


@pytest.mark.skipif(not step_mod.HAS_COMPILED, reason="needs the compiled extension")
def test_opcheck_compiled_ops():
    a, b, c, zri, s = _opcheck_args()
    shared = torch.tensor(0.7, dtype=torch.float64)
    for args in ((a, b, c, zri, s), (a, shared, c, zri, s), (a, b, c, zri, None)):
        req = [t.clone().requires_grad_() if t is not None else None for t in args]
        torch.library.opcheck(torch.ops.resnet_bk.bk_core_step.default, tuple(req))
    y, d = torch.empty_like(s), torch.empty_like(s)
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_step_out.default, (a, b, c, zri, s, y, d))


@pytest.mark.skipif("triton" not in BACKENDS, reason="Triton kernels cannot run here")
def test_opcheck_triton_ops():
    a, b, c, zri, s = _opcheck_args()
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_step_triton.default,
                          tuple(t.clone().requires_grad_() for t in (a, b, c, zri, s)))
    y, d = torch.empty_like(s), torch.empty_like(s)
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_step_out_triton.default, (a, b, c, zri, s, y, d))


# ---- bad input --------------------------------------------------------------------------------

def _ok():
    a = torch.zeros(3, dtype=torch.float32)
    b = torch.ones(3, dtype=torch.float32)
    return a, b, b.clone(), torch.ones(3, dtype=torch.complex64)


@pytest.mark.parametrize("backend", [None] + BACKENDS)
def test_bad_inputs(backend):
    a, b, c, s = _ok()
    step = lambda *x, **k: ops.bk_core_step(*x, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"state: expected diag_t's batch shape \(3,\), got \(4,\)"):
        step(a, b, c, 1j, torch.ones(4, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"state: expected diag_t's batch shape \(3,\), got \(1, 3\)"):
        step(a, b, c, 1j, torch.ones(1, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="state: expected dtype torch.complex64.*got torch.complex128"):
        step(a, b, c, 1j, torch.ones(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="state: expected dtype torch.complex64.*got torch.float32"):
        step(a, b, c, 1j, torch.ones(3))
    with pytest.raises(RuntimeError, match="state: expected a tensor on cpu .*got one on meta"):
        step(a, b, c, 1j, torch.ones(3, dtype=torch.complex64, device="meta"))
    with pytest.raises(ValueError, match=r"super_t: expected a shape broadcastable to diag_t's batch shape \(3,\), got \(2,\)"):
        step(a, torch.ones(2), c, 1j, s)
    with pytest.raises(ValueError, match=r"sub_t: expected a shape broadcastable .*got \(1, 3\)"):
        step(a, b, torch.ones(1, 3), 1j, s)
    with pytest.raises(ValueError, match="sub_t: .*got \\(2,\\)"):
        step(a, b, torch.ones(2), 1j, None)  # validated even where unused
    with pytest.raises(TypeError, match="super_t: dtype torch.float64 mixes float64"):
        step(a, b.double(), c, 1j, s)
    with pytest.raises(TypeError, match="diag_t: expected a real floating tensor"):
        step(torch.zeros(3, dtype=torch.int64), b, c, 1j, s)
    with pytest.raises(ValueError, match="inplace: expected a state to update"):
        step(a, b, c, 1j, None, inplace=True)
    with pytest.raises(TypeError, match="inplace: expected a bool"):
        step(a, b, c, 1j, s, inplace=1)
    with pytest.raises(RuntimeError, match="inplace=True: expected no input to require grad"):
        step(a.clone().requires_grad_(), b, c, 1j, s, inplace=True)
    with pytest.raises(RuntimeError, match="out=: expected no input to require grad"):
        step(a, b, c, 1j, s.clone().requires_grad_(), out=torch.empty(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"out: expected diag_t's shape \(3,\), got \(4,\)"):
        step(a, b, c, 1j, s, out=torch.empty(4, dtype=torch.complex64))
    with pytest.raises(TypeError, match="out: expected dtype torch.complex64 .*got torch.complex128"):
        step(a, b, c, 1j, s, out=torch.empty(3, dtype=torch.complex128))
    with pytest.raises(RuntimeError, match="out: expected a tensor on cpu .*got one on meta"):
        step(a, b, c, 1j, s, out=torch.empty(3, dtype=torch.complex64, device="meta"))
    with pytest.raises(ValueError, match="out: expected a contiguous tensor"):
        step(a, b, c, 1j, s, out=torch.empty(3, 2, dtype=torch.complex64)[:, 0])
    with pytest.raises(ValueError, match="state: expected a contiguous tensor"):
        step(a, b, c, 1j, torch.ones(3, 2, dtype=torch.complex64)[:, 0], inplace=True)
    with pytest.raises(ValueError, match="out: expected a tensor other than state"):
        step(a, b, c, 1j, s, out=s, inplace=True)
    with pytest.raises(ValueError, match="z: expected a Python number or a 0-dim tensor"):
        step(a, b, c, torch.ones(2, dtype=torch.complex64), s)
    with pytest.raises(ValueError, match="z: expected a finite spectral shift"):
        step(a, b, c, float("nan"), s)
    # nothing was written by a rejected call
    assert torch.equal(s, torch.ones(3, dtype=torch.complex64))
