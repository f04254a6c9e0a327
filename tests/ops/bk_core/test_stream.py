"""Streaming BK-Core (resnet_bk/ops/bk_core/stream.py): a carried state between causal chunks,
packed variable-length sequences (cu_seqlens) and final states, on every CPU backend (Triton under
TRITON_INTERPRET=1), against the whole sequence and against the reference twin, which computes the
streaming forms directly (a pivot loop with plain autograd), not through the backends' ghosts.

Tolerances (issue 18): chained chunks equal the whole sequence within 1e-12 (float64) and 1e-6
(float32) relative."""
import random

import pytest
import torch

from resnet_bk import ops

from helpers import cpu_backends, rel_err

BACKENDS = cpu_backends() + (["triton"] if "triton" in ops.available_backends() else [])
CHAIN_TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
Z = 0.3 + 0.8j


def make(B, N, dtype=torch.float64, seed=0, shared=True):
    g = torch.Generator().manual_seed(seed)
    a = (-2.0 + 6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0).to(dtype)
    shape = (N - 1,) if shared else (B, N - 1)
    b = (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    c = (0.5 + torch.rand(shape, generator=g, dtype=torch.float64)).to(dtype)
    return a, b, c


def cuts_of(N, rng, max_len):
    cuts = [0]
    while cuts[-1] < N:
        cuts.append(min(N, cuts[-1] + rng.randint(1, max_len)))
    return cuts


def chained(a, b, c, z, cuts, backend, **kw):
    """The causal op over chunks [cuts[i], cuts[i+1]), each continuing the previous one's state."""
    ys, st = [], None
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        if st is None:
            y, st = ops.bk_core(a[..., lo:hi], b[..., lo:hi - 1], c[..., lo:hi - 1], z, causal=True,
                                output_final_state=True, backend=backend, **kw)
        else:
            y, st = ops.bk_core(a[..., lo:hi], b[..., lo - 1:hi - 1], c[..., lo - 1:hi - 1], z, causal=True,
                                initial_state=st, output_final_state=True, backend=backend, **kw)
        ys.append(y)
    return torch.cat(ys, -1), st


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("max_len", [1, 7, 40])
def test_chained_equals_whole(backend, dtype, max_len):
    N = 90 if backend != "triton" else 37
    a, b, c = make(3, N, dtype, seed=max_len)
    cuts = cuts_of(N, random.Random(max_len), max_len)
    whole = ops.bk_core(a, b, c, Z, causal=True, backend=backend)
    got, last = chained(a, b, c, Z, cuts, backend)
    assert rel_err(got, whole, finite=True) < CHAIN_TOL[dtype]
    # the last state is the last pivot: y_{N-1} = 1 / d_{N-1}
    assert rel_err(1.0 / last, whole[:, -1]) < CHAIN_TOL[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
def test_chained_gradients_equal_whole(backend):
    """Gradients of one loss on the chained outputs equal those on the whole sequence, for diag, both
    off-diagonals (per row) and a learnable z."""
    N = 41 if backend != "triton" else 19
    torch.manual_seed(1)
    a, b, c = make(2, N, torch.float64, seed=3, shared=False)
    zt = torch.tensor(Z, dtype=torch.complex128)
    w = torch.randn(2, N, dtype=torch.complex128)
    grads = []
    for mode in ("whole", "chained"):
        leaves = [t.clone().requires_grad_(True) for t in (a, b, c)] + [zt.clone().requires_grad_(True)]
        aa, bb, cc, z = leaves
        if mode == "whole":
            y = ops.bk_core(aa, bb, cc, z, causal=True, backend=backend)
        else:
            y, _ = chained(aa, bb, cc, z, [0, 1, 5, 6, 17, N], backend)
        (y * w).real.sum().backward()
        grads.append([t.grad for t in leaves])
    for gw, gc, name in zip(grads[0], grads[1], ("diag", "super_diag", "sub_diag", "z")):
        assert rel_err(gc, gw) < 1e-11, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_state_vs_reference_twin(backend, dtype):
    """Arbitrary states (not produced by the op: real ones, tiny and large ones, both signs of the
    imaginary part), per-row couplings, a batch shape: the backends' ghosts against the direct loop."""
    g = torch.Generator().manual_seed(5)
    N = 13
    a = torch.randn(2, 3, N, generator=g, dtype=torch.float64).to(dtype)
    b = (torch.rand(2, 3, N, generator=g, dtype=torch.float64) + 0.2).to(dtype)
    c = (torch.randn(2, 3, N, generator=g, dtype=torch.float64)).to(dtype)
    st = torch.tensor([[1.5 - 0.0j, -0.7 + 2j, 1e-3 - 1e-3j], [40 + 3j, -2 - 0.01j, 0.2 + 0.9j]],
                      dtype=torch.complex128).to(dtype.to_complex())
    ref_y, ref_d = ops.bk_core_ref(a, b, c, Z, causal=True, initial_state=st, output_final_state=True)
    y, d = ops.bk_core(a, b, c, Z, causal=True, initial_state=st, output_final_state=True, backend=backend)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    assert rel_err(y, ref_y, finite=True) < tol
    assert rel_err(d, ref_d) < tol
    y2 = ops.bk_core(a, b, c, Z, causal=True, initial_state=st, backend=backend)
    assert torch.equal(y2, y)


# triton: about 40 s in the interpreter (slow lane); test_state_gradients_vs_reference is its fast check
@pytest.mark.parametrize("backend", cpu_backends() + [pytest.param(b, marks=pytest.mark.slow)
                                                      for b in BACKENDS if b == "triton"])
def test_gradcheck_through_state(backend):
    """gradcheck in float64 of (y, final state) for diag, both off-diagonals, z and initial_state."""
    g = torch.Generator().manual_seed(7)
    N = 6
    a = torch.randn(2, N, generator=g, dtype=torch.float64, requires_grad=True)
    b = (torch.rand(2, N, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)
    c = (torch.rand(N, generator=g, dtype=torch.float64) + 0.3).requires_grad_(True)
    z = torch.tensor(0.2 + 0.9j, dtype=torch.complex128, requires_grad=True)
    st = torch.tensor([0.5 - 1.2j, -1.0 - 0.3j], dtype=torch.complex128, requires_grad=True)

    def f(a, b, c, z, st):
        y, d = ops.bk_core(a, b, c, z, causal=True, initial_state=st, output_final_state=True, backend=backend)
        return y, d

    assert torch.autograd.gradcheck(f, (a, b, c, z, st))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zv", [0.2 + 0.9j, 0.4], ids=["complex_z", "real_z"])
def test_state_gradients_vs_reference(backend, zv):
    """Gradients of (y, final state) for diag, per-row super, shared sub, z and initial_state against
    the reference twin's (plain autograd through the pivot loop); a real z where the backend's
    kernels take the state themselves (the ghosts need Im z != 0)."""
    if zv.imag == 0 and backend not in STATE_KERNEL_BACKENDS:
        pytest.skip("ghost positions need Im z != 0")
    g = torch.Generator().manual_seed(11)
    N = 7
    a = torch.randn(2, N, generator=g, dtype=torch.float64)
    b = torch.rand(2, N, generator=g, dtype=torch.float64) + 0.3
    c = torch.rand(N, generator=g, dtype=torch.float64) + 0.3
    st = torch.tensor([0.5 - 1.2j, -1.0 - 0.3j], dtype=torch.complex128)
    wy = torch.randn(2, N, generator=g, dtype=torch.complex128)
    wd = torch.randn(2, generator=g, dtype=torch.complex128)
    grads = []
    for be in ("twin", backend):
        leaves = [t.clone().requires_grad_(True) for t in (a, b, c, torch.tensor(zv, dtype=torch.complex128), st)]
        kw = dict(causal=True, initial_state=leaves[4], output_final_state=True)
        y, d = (ops.bk_core_ref(*leaves[:4], **kw) if be == "twin" else ops.bk_core(*leaves[:4], backend=be, **kw))
        ((y * wy).real.sum() + (d * wd).real.sum()).backward()
        grads.append([t.grad for t in leaves])
    for gr, gb, name in zip(grads[0], grads[1], ("diag", "super_diag", "sub_diag", "z", "initial_state")):
        assert rel_err(gb, gr) < 1e-11, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_state(backend):
    N = 15
    a, b, c = make(2, N, torch.float64, seed=9)
    m = (torch.rand(2, N, generator=torch.Generator().manual_seed(2)) > 0.4).to(torch.float64)
    m[:, -1] = 0  # the final state does not depend on the mask
    st = torch.tensor([0.4 - 1j, 2 - 0.5j], dtype=torch.complex128)
    bb, cc = torch.cat([b[:1], b]), torch.cat([c[:1], c])
    ref_y, ref_d = ops.bk_core_masked_ref(a, bb, cc, Z, m, causal=True, initial_state=st, output_final_state=True)
    y, d = ops.bk_core_masked(a, bb, cc, Z, m, causal=True, initial_state=st, output_final_state=True, backend=backend)
    assert rel_err(y, ref_y) < 1e-12 and rel_err(d, ref_d) < 1e-12
    assert (y[m == 0] == 0).all()
    y_only = ops.bk_core_masked(a, bb, cc, Z, m, causal=True, initial_state=st, backend=backend)
    assert rel_err(y_only, ref_y) < 1e-12
    # the mask's gradient (straight-through) is Re(conj(y) g) everywhere, masked positions included
    mm = m.clone().requires_grad_(True)
    yy, _ = ops.bk_core_masked(a, bb, cc, Z, mm, causal=True, initial_state=st, output_final_state=True,
                               backend=backend)
    w = torch.randn(2, N, dtype=torch.complex128)
    (yy * w).real.sum().backward()
    full = ops.bk_core(a, bb, cc, Z, causal=True, initial_state=st, backend=backend)
    assert rel_err(mm.grad, (full.conj() * w.conj()).real) < 1e-12


def packed_case(lengths, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    a = (torch.randn(T, generator=g, dtype=torch.float64) * 2).to(dtype)
    b = (0.5 + torch.rand(T, generator=g, dtype=torch.float64)).to(dtype)
    c = (0.5 + torch.rand(T, generator=g, dtype=torch.float64)).to(dtype)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return a, b, c, cu


def loop_over(a, b, c, cu, causal, backend, states=None, with_state_entries=False):
    """Each sequence alone (the packed op's specification)."""
    cu = cu.tolist()
    ys, finals = [], []
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        if hi == lo:
            finals.append(None if states is None else states[s])
            continue
        if states is None:
            kb, kc = b[lo + 1:hi], c[lo + 1:hi]  # entry p couples p - 1 to p
            if causal:
                y, d = ops.bk_core(a[lo:hi], kb, kc, Z, causal=True, output_final_state=True, backend=backend)
                finals.append(d)
            else:
                y = ops.bk_core(a[lo:hi], kb, kc, Z, causal=False, backend=backend)
        else:
            y, d = ops.bk_core(a[lo:hi], b[lo:hi], c[lo:hi], Z, causal=True, initial_state=states[s],
                               output_final_state=True, backend=backend)
            finals.append(d)
        ys.append(y)
    return torch.cat(ys), finals


LENGTHS = [[5, 0, 1, 9, 0, 3], [1], [0, 4, 1, 1, 0], [12, 7]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("case", range(len(LENGTHS)))
def test_packed_equals_loop(backend, causal, case):
    a, b, c, cu = packed_case(LENGTHS[case], seed=case)
    T = a.shape[0]
    # without a state the off-diagonals have T - 1 entries (entry i couples i to i + 1)
    got = ops.bk_core(a, b[1:], c[1:], Z, causal=causal, cu_seqlens=cu, backend=backend)
    want, finals = loop_over(a, b, c, cu, causal, backend)
    assert got.shape == (T,)
    assert rel_err(got, want, finite=True) < 1e-12
    got2 = ops.bk_core(a[None], b[1:], c[1:], Z, causal=causal, cu_seqlens=cu.to(torch.int64), backend=backend)
    assert got2.shape == (1, T) and torch.equal(got2[0], got)
    if causal and all(f is not None for f in finals):
        _, d = ops.bk_core(a, b[1:], c[1:], Z, causal=True, cu_seqlens=cu, output_final_state=True, backend=backend)
        assert rel_err(d, torch.stack(finals)) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", range(len(LENGTHS)))
def test_packed_with_states(backend, case):
    a, b, c, cu = packed_case(LENGTHS[case], seed=10 + case)
    S = cu.shape[0] - 1
    g = torch.Generator().manual_seed(case)
    st = torch.complex(torch.randn(S, generator=g, dtype=torch.float64),
                       -0.2 - torch.rand(S, generator=g, dtype=torch.float64))
    y, d = ops.bk_core(a, b, c, Z, causal=True, cu_seqlens=cu, initial_state=st, output_final_state=True,
                       backend=backend)
    want, finals = loop_over(a, b, c, cu, True, backend, states=st)
    assert rel_err(y, want, finite=True) < 1e-12
    assert rel_err(d, torch.stack(finals)) < 1e-12
    ry, rd = ops.bk_core_ref(a, b, c, Z, causal=True, cu_seqlens=cu, initial_state=st, output_final_state=True)
    assert rel_err(y, ry) < 1e-12 and rel_err(d, rd) < 1e-12


@pytest.mark.parametrize("backend", cpu_backends())
def test_packed_gradients(backend):
    """Packed gradients equal the reference twin's (a loop over the sequences with plain autograd);
    the boundary entries of the off-diagonals get zero gradient."""
    a, b, c, cu = packed_case([4, 0, 1, 6, 3], seed=4)
    S = cu.shape[0] - 1
    st = torch.complex(torch.linspace(-1, 1, S, dtype=torch.float64), -torch.ones(S, dtype=torch.float64))
    z0 = torch.tensor(Z, dtype=torch.complex128)
    w = torch.randn(a.shape[0], dtype=torch.complex128, generator=torch.Generator().manual_seed(1))
    for with_state in (False, True):
        res = []
        for fn in ("op", "ref"):
            leaves = [t.clone().requires_grad_(True) for t in (a, b, c, z0)]
            aa, bb, cc, z = leaves
            kw = dict(causal=True, cu_seqlens=cu)
            if with_state:
                s0 = st.clone().requires_grad_(True)
                leaves.append(s0)
                kw.update(initial_state=s0, output_final_state=True)
                args = (aa, bb, cc, z)
            else:
                args = (aa, bb[1:], cc[1:], z)
            out = ops.bk_core(*args, backend=backend, **kw) if fn == "op" else ops.bk_core_ref(*args, **kw)
            y = out[0] if with_state else out
            loss = (y * w).real.sum() + ((out[1] * 0.3).real.sum() if with_state else 0)
            loss.backward()
            res.append([t.grad for t in leaves])
        for g_op, g_ref in zip(*res):
            assert rel_err(g_op, g_ref) < 1e-11
    # couplings into a sequence start are ignored
    bb = b[1:].clone().requires_grad_(True)
    ops.bk_core(a, bb, c[1:], Z, causal=False, cu_seqlens=cu, backend=backend).real.sum().backward()
    starts = cu[1:-1].tolist()
    for p in starts:
        if 0 < p < a.shape[0]:
            assert bb.grad[p - 1] == 0


def test_compile_fullgraph_streaming():
    a, b, c = make(2, 9)
    st = torch.tensor([0.5 - 1j, -1 - 0.5j], dtype=torch.complex128)
    bb, cc = torch.cat([b[:1], b]), torch.cat([c[:1], c])

    def f(a, b, c, st):
        return ops.bk_core(a, b, c, Z, causal=True, initial_state=st, output_final_state=True)

    y, d = torch.compile(f, fullgraph=True, backend="aot_eager")(a, bb, cc, st)
    ry, rd = ops.bk_core_ref(a, bb, cc, Z, causal=True, initial_state=st, output_final_state=True)
    assert rel_err(y, ry) < 1e-12 and rel_err(d, rd) < 1e-12
    pa, pb, pc, cu = packed_case([3, 0, 4, 2])

    def g(a, b, c, cu):
        return ops.bk_core(a, b, c, Z, causal=True, cu_seqlens=cu)

    got = torch.compile(g, fullgraph=True, backend="aot_eager")(pa, pb[1:], pc[1:], cu)
    want, _ = loop_over(pa, pb, pc, cu, True, None)
    assert rel_err(got, want) < 1e-12


def test_bad_input():
    a, b, c = make(2, 6)
    st = torch.zeros(2, dtype=torch.complex128) + (1 - 1j)
    bb, cc = torch.cat([b[:1], b]), torch.cat([c[:1], c])
    with pytest.raises(ValueError, match="initial_state: expected shape"):
        ops.bk_core(a, bb, cc, Z, causal=True, initial_state=st[:1])
    with pytest.raises(TypeError, match="initial_state: expected dtype torch.complex128"):
        ops.bk_core(a, bb, cc, Z, causal=True, initial_state=st.to(torch.complex64))
    with pytest.raises(TypeError, match="initial_state: expected a complex tensor"):
        ops.bk_core(a, bb, cc, Z, causal=True, initial_state=[1j, 1j])
    with pytest.raises(ValueError, match="super_diag: .*N = 6 off-diagonal entries"):
        ops.bk_core(a, b, c, Z, causal=True, initial_state=st)  # N - 1 entries with a state
    with pytest.raises(ValueError, match="super_diag: .*pass initial_state"):
        ops.bk_core(a, bb, cc, Z, causal=True)  # N entries without one
    with pytest.raises(ValueError, match="initial_state: a carried state is defined for causal=True only"):
        ops.bk_core(a, bb, cc, Z, causal=False, initial_state=st)
    with pytest.raises(ValueError, match="output_final_state: a carried state is defined for causal=True"):
        ops.bk_core(a, b, c, Z, causal=False, output_final_state=True)
    with pytest.raises(TypeError, match="output_final_state: expected a bool"):
        ops.bk_core(a, b, c, Z, causal=True, output_final_state=1)
    # the ghost positions of the other backends need Im z != 0 (the CPU and Triton kernels take any
    # z: see test_real_z_state_on_cpu_kernel)
    with pytest.raises(ValueError, match="z: a carried state .* needs Im z != 0"):
        ops.bk_core(a, bb, cc, 0.5, causal=True, initial_state=st, backend="reference")
    pa, pb, pc, cu = packed_case([3, 2, 4])
    T = pa.shape[0]
    for bad, err, msg in [
        (cu.to(torch.float32), TypeError, "cu_seqlens: expected dtype int32 or int64"),
        (cu[None], ValueError, "cu_seqlens: expected a 1-D tensor"),
        (cu + 1, ValueError, r"cu_seqlens: expected cu_seqlens\[0\] = 0"),
        (torch.tensor([0, 5, 3, T], dtype=torch.int32), ValueError, "cu_seqlens: expected non-decreasing"),
        (torch.tensor([0, 3, T - 1], dtype=torch.int32), ValueError, f"cu_seqlens: expected the last offset to be T = {T}"),
        ([0, 3, T], TypeError, "cu_seqlens: expected an int32/int64 tensor"),
    ]:
        with pytest.raises(err, match=msg):
            ops.bk_core(pa, pb[1:], pc[1:], Z, causal=True, cu_seqlens=bad)
    with pytest.raises(ValueError, match=r"cu_seqlens: packed sequences take diag of shape \(T,\) or \(1, T\)"):
        ops.bk_core(a, b, c, Z, causal=True, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match=r"initial_state: expected shape \(3,\)"):
        ops.bk_core(pa, pb, pc, Z, causal=True, cu_seqlens=cu, initial_state=st)
    with pytest.raises(ValueError, match="cu_seqlens: sequence 1 is empty and has no initial_state"):
        ops.bk_core(pa, pb[1:], pc[1:], Z, causal=True, output_final_state=True,
                    cu_seqlens=torch.tensor([0, 3, 3, T]))


# the backends whose kernels enter a carried state themselves (no ghost positions)
STATE_KERNEL_BACKENDS = [b for b in ("cpp", "triton") if b in BACKENDS]


@pytest.mark.parametrize("backend", STATE_KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_real_z_state_on_cpu_kernel(dtype, backend):
    """The CPU and Triton kernels enter the carried state themselves (no ghost positions): a real z
    works, and chained chunks equal the whole sequence, values and gradients (z, diag, couplings,
    state)."""
    g = torch.Generator().manual_seed(3)
    B, N, cut = (3, 40, 17) if backend != "triton" else (3, 19, 7)
    diag = (torch.rand(B, N, generator=g, dtype=torch.float64) * 2 + 3).to(dtype).requires_grad_()
    off = (torch.rand(N - 1, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    z = torch.tensor(0.25, dtype=dtype).to(torch.complex128 if dtype == torch.float64 else torch.complex64)
    z.requires_grad_()
    whole = ops.bk_core(diag, off, off, z, causal=True, backend=backend)
    y1, d1 = ops.bk_core(diag[:, :cut], off[:cut - 1], off[:cut - 1], z, causal=True, output_final_state=True,
                         backend=backend)
    y2 = ops.bk_core(diag[:, cut:], off[cut - 1:], off[cut - 1:], z, causal=True, initial_state=d1,
                     backend=backend)
    chained = torch.cat([y1, y2], 1)
    assert d1.imag.abs().max() == 0  # a real z and diagonal: real pivots (the ghosts could not carry them)
    tol = ops.tolerance(dtype)
    ops.assert_close(chained, whole, tol=tol)
    w = torch.randn(B, N, generator=g, dtype=torch.float64).to(whole.dtype)
    gw = torch.autograd.grad((whole * w).real.sum(), [diag, off, z])
    gc = torch.autograd.grad((chained * w).real.sum(), [diag, off, z])
    for x, y in zip(gc, gw):
        ops.assert_close(x, y, tol=tol)


@pytest.mark.skipif("cpp" not in ops.available_backends(), reason="compiled extension not built")
def test_opcheck_state_ops():
    """The CPU kernel's carried-state ops: schema, fake kernels (torch.compile / export) and
    dispatch consistency (their autograd is the Python Function in stream.py, not registered on
    the ops: inputs without grad)."""
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 9, generator=g, dtype=torch.float64) - 3
    k = torch.rand(1, 8, generator=g, dtype=torch.float64) + 0.5
    zri = torch.tensor([0.2, 0.9], dtype=torch.float64)
    d_in = torch.randn(3, generator=g, dtype=torch.complex128) + 2
    k_in = torch.rand(3, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, 9, generator=g) > 0.5).double()
    for m in (None, mask):
        torch.library.opcheck(torch.ops.resnet_bk.bk_core_fwd_state.default, (a, k, zri, m, d_in, k_in))
        y = torch.ops.resnet_bk.bk_core_fwd_state(a, k, zri, m, d_in, k_in)
        gy = torch.randn(y.shape, generator=g, dtype=y.dtype)
        torch.library.opcheck(torch.ops.resnet_bk.bk_core_bwd_state.default,
                              (gy, a, k, zri, m, d_in, k_in, m is not None, True, True, y if m is None else None))
    with pytest.raises(RuntimeError, match=r"d_in: expected a ComplexDouble tensor of shape \(3\)"):
        torch.ops.resnet_bk.bk_core_fwd_state(a, k, zri, None, d_in[:2], k_in)
    with pytest.raises(RuntimeError, match=r"k_in: expected a Double tensor of shape \(3\)"):
        torch.ops.resnet_bk.bk_core_fwd_state(a, k, zri, None, d_in, k_in.float())
