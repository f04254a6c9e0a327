"""bk_core_masked on every CPU backend against ``mask * dense_oracle(...)`` (float64): all-zero,
all-one, random, bool and straight-through float masks, causal and two-sided, gradients of diag,
super_diag, sub_diag, z and the float mask (grad_mask = Re(conj(G) g), shared/BK_CORE_MATH.md),
leading batch shapes, opcheck with a mask."""
import functools

import pytest
import torch

from resnet_bk import ops

from helpers import cpu_backends, dense_oracle, rel_err, tol

BACKENDS = cpu_backends()
TOL = {dt: tol(dt) for dt in (torch.float64, torch.float32)}  # the op layer's policy




def make(shape, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + (6.0 * torch.rand(shape + (N,), generator=g, dtype=torch.float64) - 3.0)
    b = 0.5 + torch.rand(shape + (N - 1,), generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(shape + (N - 1,), generator=g, dtype=torch.float64)
    return a, b, c


def make_mask(kind, shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    if kind == "ones":
        return torch.ones(shape, dtype=torch.float64)
    if kind == "bool":
        return torch.rand(shape, generator=g) > 0.5
    if kind == "random":
        return (torch.rand(shape, generator=g) > 0.3).double()
    if kind == "dense90":  # 90% masked
        return (torch.rand(shape, generator=g) > 0.9).double()
    raise ValueError(kind)


MASKS = ["zeros", "ones", "bool", "random", "dense90"]


@functools.lru_cache(maxsize=None)
def _oracle(N, causal, z):
    """float64 oracle of make((4,), N, seed=N), computed once per (N, causal) for every mask/backend."""
    a, b, c = make((4,), N, seed=N)
    return dense_oracle(a, b, c, z, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("N", [1, 2, 7, 33])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_forward_vs_masked_dense(backend, causal, kind, N, dtype):
    a, b, c = make((4,), N, seed=N)
    mask = make_mask(kind, (4, N), seed=N + 1)
    z = 0.2 + 0.9j
    out = ops.bk_core_masked(a.to(dtype), b.to(dtype), c.to(dtype), z, mask, causal=causal, backend=backend)
    assert out.shape == (4, N)
    want = mask.to(torch.complex128) * _oracle(N, causal, z)
    if kind == "zeros":
        assert torch.equal(out, torch.zeros_like(out))
    else:
        assert rel_err(out, want) < TOL[dtype]
    # masked-out positions are exactly 0, not merely small
    zero = ~mask.bool()
    assert torch.equal(out[zero], torch.zeros_like(out[zero]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_all_one_mask_equals_unmasked(backend, causal):
    a, b, c = make((3,), 50)
    ones = torch.ones(3, 50, dtype=torch.float64)
    got = ops.bk_core_masked(a, b, c, 1j, ones, causal=causal, backend=backend)
    ref = ops.bk_core(a, b, c, 1j, causal=causal, backend=backend)
    assert rel_err(got, ref) < 1e-14


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_leading_batch_shapes(backend, causal):
    B, H, N = 2, 3, 12
    a, b, c = make((B, H), N, seed=4)
    mask = make_mask("random", (B, H, N), seed=5)
    out = ops.bk_core_masked(a, b, c, 0.5j, mask, causal=causal, backend=backend)
    assert out.shape == (B, H, N)
    want = mask * dense_oracle(a, b, c, 0.5j, causal)
    assert rel_err(out, want) < 1e-10
    # a shared off-diagonal (N-1,) with a (B, H, N) mask
    bs, cs = b[0, 0], c[0, 0]
    out = ops.bk_core_masked(a, bs, cs, 0.5j, mask, causal=causal, backend=backend)
    want = mask * dense_oracle(a, bs.expand(B, H, N - 1), cs.expand(B, H, N - 1), 0.5j, causal)
    assert rel_err(out, want) < 1e-10


def _grads(fn, inputs, g):
    ins = [t.detach().clone().requires_grad_() if t.is_floating_point() or t.is_complex() else t for t in inputs]
    out = fn(*ins)
    want = [t for t in ins if t.requires_grad]
    gs = torch.autograd.grad(out, want, g, allow_unused=True)
    return [torch.zeros_like(t) if x is None else x for x, t in zip(gs, want)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("kind", ["zeros", "ones", "random", "dense90"])
@pytest.mark.parametrize("N", [1, 2, 9, 24])
def test_gradients_vs_dense_autograd(backend, causal, kind, N):
    """Gradients of diag, super_diag, sub_diag, z and the float mask against autograd through
    ``mask * dense_oracle`` with the same upstream gradient."""
    a, b, c = make((3,), N, seed=N + 7)
    z = torch.tensor(0.3 + 0.8j, dtype=torch.complex128)
    mask = make_mask(kind, (3, N), seed=N)
    g = torch.randn(3, N, dtype=torch.complex128, generator=torch.Generator().manual_seed(N))
    got = _grads(lambda a, b, c, z, m: ops.bk_core_masked(a, b, c, z, m, causal=causal, backend=backend),
                 (a, b, c, z, mask), g)
    want = _grads(lambda a, b, c, z, m: m * dense_oracle(a, b, c, z, causal), (a, b, c, z, mask), g)
    for name, x, y in zip(("diag", "super_diag", "sub_diag", "z", "mask"), got, want):
        if y.numel() == 0:
            continue
        if y.abs().max() == 0:  # e.g. an all-zero mask: every gradient but the mask's is exactly 0
            assert torch.equal(x, torch.zeros_like(x)), name
        else:
            assert rel_err(x, y) < 1e-10, name
    # the spec's closed form for the mask gradient
    G = dense_oracle(a, b, c, z, causal)
    assert rel_err(got[4], (G.conj() * g).real) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_straight_through_mask(backend, causal):
    """mask = hard + soft - soft.detach(): the forward uses the hard 0/1 mask and the soft logits
    receive Re(conj(G) g) * d soft / d logits."""
    B, N = 3, 20
    a, b, c = make((B,), N, seed=11)
    logits = torch.randn(B, N, dtype=torch.float64, generator=torch.Generator().manual_seed(12), requires_grad=True)
    g = torch.randn(B, N, dtype=torch.complex128, generator=torch.Generator().manual_seed(13))

    def st(lg):
        soft = torch.sigmoid(lg)
        hard = (soft > 0.5).to(soft.dtype)
        return hard + soft - soft.detach()

    out = ops.bk_core_masked(a, b, c, 1j, st(logits), causal=causal, backend=backend)
    hard = (torch.sigmoid(logits) > 0.5).double()
    G = dense_oracle(a, b, c, 1j, causal)
    assert rel_err(out, hard * G) < 1e-10
    (gl,) = torch.autograd.grad(out, logits, g)
    s = torch.sigmoid(logits.detach())
    assert rel_err(gl, (G.conj() * g).real * s * (1 - s)) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_mask_gradients_to_the_rest(backend):
    """A bool mask takes no gradient; diag etc. still get the masked gradient."""
    a, b, c = make((2,), 15, seed=21)
    mask = make_mask("bool", (2, 15), seed=22)
    g = torch.randn(2, 15, dtype=torch.complex128, generator=torch.Generator().manual_seed(23))
    got = _grads(lambda a, b, c: ops.bk_core_masked(a, b, c, 1j, mask, causal=True, backend=backend), (a, b, c), g)
    want = _grads(lambda a, b, c: mask * dense_oracle(a, b, c, 1j, True), (a, b, c), g)
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_gradients_float32(backend, causal):
    N = 150 if not causal else 48  # the causal oracle inverts N leading blocks: keep it small
    a, b, c = make((4,), N, seed=31)
    mask = make_mask("random", (4, N), seed=32)
    g = torch.randn(4, N, dtype=torch.complex128, generator=torch.Generator().manual_seed(33))
    z = torch.tensor(1j, dtype=torch.complex128)
    want = _grads(lambda a, b, c, z, m: m * dense_oracle(a, b, c, z, causal), (a, b, c, z, mask), g)
    got = _grads(lambda a, b, c, z, m: ops.bk_core_masked(a, b, c, z, m, causal=causal, backend=backend),
                 (a.float(), b.float(), c.float(), z.to(torch.complex64), mask.float()), g.to(torch.complex64))
    for x, y in zip(got, want):
        assert rel_err(x, y) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_gradcheck_with_mask(backend, causal):
    a, b, c = make((2,), 6, seed=41)
    z = torch.tensor(0.1 + 0.7j, dtype=torch.complex128)
    mask = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    ins = [t.clone().requires_grad_() for t in (a, b, c, z, mask)]
    assert torch.autograd.gradcheck(
        lambda a, b, c, z, m: ops.bk_core_masked(a, b, c, z, m, causal=causal, backend=backend),
        ins, eps=1e-6, atol=1e-7)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("kind", ["zeros", "random"])
def test_opcheck_with_mask(causal, kind):
    from resnet_bk.ops.bk_core.canon import canon_bk
    a, b, c = make((3,), 16, seed=51)
    args = canon_bk(a, b, c, 0.2 + 1j, make_mask(kind, (3, 16), seed=52))
    ins = (args.a.clone().requires_grad_(), args.k.clone().requires_grad_(), args.zri.clone().requires_grad_(),
           args.mask.clone().requires_grad_())
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_fwd, ins + (causal,))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="compiled extension not built")
def test_verify_mode_with_mask():
    a, b, c = make((2,), 30, seed=61)
    m = make_mask("random", (2, 30), seed=62).requires_grad_()
    a.requires_grad_()
    with ops.verify():
        out = ops.bk_core_masked(a, b, c, 1j, m, causal=True, backend="cpp")
        out.abs().sum().backward()
    assert m.grad is not None and a.grad is not None


@pytest.mark.parametrize("case,exc,words", [
    ("shape", ValueError, "mask"),
    ("int", TypeError, "mask"),
    ("complex", TypeError, "mask"),
    ("device", RuntimeError, "mask"),
])
def test_bad_mask(case, exc, words):
    a, b, c = make((2,), 8)
    mask = {"shape": torch.ones(2, 7, dtype=torch.float64), "int": torch.ones(2, 8, dtype=torch.int64),
            "complex": torch.ones(2, 8, dtype=torch.complex64), "device": torch.ones(2, 8, device="meta")}[case]
    with pytest.raises(exc) as info:
        ops.bk_core_masked(a, b, c, 1j, mask)
    assert words in str(info.value)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
def test_masked_out_positions_are_not_computed(backend, causal):
    """A position whose mask is 0 is exactly 0 and sends no gradient, even where G is not finite."""
    N = 12
    a = torch.randn(3, N, dtype=torch.float64)
    a[1, 7] = float("nan")
    b = torch.ones(N - 1, dtype=torch.float64)
    mask = torch.ones(3, N, dtype=torch.float64)
    mask[1, 7:] = 0.0
    ar = a.clone().requires_grad_()
    out = ops.bk_core_masked(ar, b, b, 1j, mask, causal=causal, backend=backend)
    assert torch.equal(out[1, 7:], torch.zeros_like(out[1, 7:]))
    assert torch.isfinite(torch.view_as_real(out[[0, 2]])).all()
    if causal:  # positions before the NaN never see it
        assert torch.isfinite(torch.view_as_real(out[1, :7])).all()
        out.abs().sum().backward()
        assert torch.isfinite(ar.grad[[0, 2]]).all()
