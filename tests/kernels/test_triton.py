"""Triton BK-Core kernels (triton_kernels/bk_core.py) and the "triton" backend, against the
reference backend: forward and every gradient, with the planned tiles and with forced short tiles
(several chunks per row, carried between chunks in several carry blocks), float32/float64,
two-sided/causal, with/without mask, shared/per-row off-diagonals.

Without a GPU the kernels run in Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 must be
set before triton is first imported (``@triton.jit`` decides at decoration time, for triton's own
library functions too); tests/conftest.py sets it on machines without a GPU, and this module sets
it too when run on its own. The interpreter
is slow, so shapes are small; short tiles are forced so that several chunks, a partial last chunk,
several carry blocks and several programs are exercised.

Tolerances (shared/BK_CORE_MATH.md): relative to the reference's largest magnitude, 1e-5 for
float32 and 1e-10 for float64.
"""
import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_env import DEVICE, ON_GPU, import_kernels  # noqa: E402

triton, K, P = import_kernels("triton", "resnet_bk.triton_kernels.bk_core", "resnet_bk.triton_kernels.pooling")

from resnet_bk import ops  # noqa: E402
from resnet_bk.ops import _registry, _triton  # noqa: E402
from resnet_bk.ops.bk_core.canon import canon_bk  # noqa: E402
from resnet_bk.ops.bk_core.reference import bk_core_bwd_ref, bk_core_fwd_ref  # noqa: E402

if not ON_GPU and (not (K.INTERPRETED and P.INTERPRETED) or K.INTERPRETER_PROBLEM):
    pytest.skip("Triton's interpreter cannot run here: triton was imported before TRITON_INTERPRET=1 was "
                "set (tests/conftest.py sets it on machines without a GPU)", allow_module_level=True)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
Z = 0.3 + 0.8j


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    """The backend's check accepts CPU tensors only under TRITON_INTERPRET=1."""
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(K.ENV_TILE, raising=False)
    yield


def canon_inputs(B, N, dtype, shared=False, masked=False, seed=0):
    """Canonical (a, k, zri, mask) with nonsymmetric b, c (k = b c) and z = 0.3 + 0.8j."""
    g = torch.Generator().manual_seed(seed)
    a = -2.0 + (6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0)
    b = 0.5 + torch.rand(1 if shared else B, N - 1, generator=g, dtype=torch.float64)
    c = 0.5 + torch.rand(1 if shared else B, N - 1, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, N, generator=g) > 0.3).double() if masked else None
    zri = torch.tensor([Z.real, Z.imag], dtype=torch.float64)
    dev = dict(dtype=dtype, device=DEVICE)
    return a.to(**dev), (b * c).to(**dev), zri.to(**dev), None if mask is None else mask.to(**dev)


def upstream(B, N, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    return torch.randn(B, N, generator=g, dtype=torch.complex128).to(cdt).to(DEVICE)


def assert_rel(got, ref, tol, what):
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(ref.shape)}"
    assert got.dtype == ref.dtype, f"{what}: dtype {got.dtype} vs {ref.dtype}"
    if ref.numel() == 0:
        return
    got, ref = got.cpu(), ref.cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    scale = ref.abs().max().item()
    # an all-zero reference (e.g. the logits gradient when r = 1) is held to the absolute tolerance
    err = (got - ref).abs().max().item() / (scale if scale > 0 else 1.0)
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol:g}"


def check_kernels(B, N, dtype, causal, masked, shared, tile=None, carry_block=None, seed=0):
    a, k, zri, mask = canon_inputs(B, N, dtype, shared, masked, seed)
    tol = TOL[dtype]
    out = K.bk_core_fwd(a, k, zri, mask, causal, tile=tile, carry_block=carry_block)
    assert_rel(out, bk_core_fwd_ref(a, k, zri, mask, causal), tol, "forward")
    g = upstream(B, N, dtype, seed + 1)
    got = K.bk_core_bwd(g, a, k, zri, mask, causal, True, tile=tile, carry_block=carry_block)
    exp = bk_core_bwd_ref(g, a, k, zri, mask, causal)
    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask"), got, exp):
        if y is None:
            assert x is None, f"{name}: expected None"
        else:
            assert_rel(x, y, tol, name)


# ---------------------------------------------------------------------------------------------
# the kernels against the reference


@pytest.mark.parametrize("shared", [False, True], ids=["k_rows", "k_shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
# float32 is in the slow lane here (the interpreter runs every scan combine in Python); the fast
# lane has float32 in test_several_programs_and_long_rows and the backend tests
@pytest.mark.parametrize("dtype", [torch.float64, pytest.param(torch.float32, marks=pytest.mark.slow)],
                         ids=["f64", "f32"])
# the single-tile plan is in the fast lane through the short, several-programs and backend tests
@pytest.mark.parametrize("tile,carry_block", [pytest.param(None, None, marks=pytest.mark.slow), (4, 2)],
                         ids=["planned", "chunks"])
def test_kernels_match_reference(tile, carry_block, dtype, causal, masked, shared):
    # planned: all 3 rows of 11 in one 4 x 16 tile; chunks: tiles of 4 positions, two full chunks
    # and a partial one per row, carried in two carry blocks of 2 chunks
    check_kernels(3, 11, dtype, causal, masked, shared, tile, carry_block)


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("tile,carry_block", [(None, None), (4, 2)], ids=["planned", "chunks"])
def test_without_grad_k_the_rest_is_unchanged(tile, carry_block, causal):
    """need_k_grad=False: no grad k (never stored), and grad a, grad z, grad mask bit for bit."""
    a, k, zri, mask = canon_inputs(3, 11, torch.float64, True, True, 3)
    g = upstream(3, 11, torch.float64, 4)
    full = K.bk_core_bwd(g, a, k, zri, mask, causal, True, tile=tile, carry_block=carry_block)
    lean = K.bk_core_bwd(g, a, k, zri, mask, causal, True, False, tile=tile, carry_block=carry_block)
    assert full[1] is not None and lean[1] is None
    for name, i in (("grad_a", 0), ("grad_zri", 2), ("grad_mask", 3)):
        assert torch.equal(lean[i], full[i]), f"{name}: differs without grad k"


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("N,tile,carry_block", [(1, None, None), (2, None, None), (3, None, None),
                                                (1, 4, None), (2, 1, 1), (3, 2, 1), (5, 1, 2)])
def test_short_sequences(N, tile, carry_block, causal):
    check_kernels(2, N, torch.float64, causal, True, False, tile, carry_block)


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("B,N,tile,carry_block", [(5, 5, 16, None), (2, 24, 8, None), (1, 48, 8, 2),
                                                  pytest.param(37, 5, None, None, marks=pytest.mark.slow)])
def test_several_programs_and_long_rows(B, N, tile, carry_block, causal):
    """5 rows of 5 in 2 x 8 tiles (three programs, the last one half empty); 2 rows x 3 chunks
    (one carry block of 4); a single row of 48 in 6 chunks of 8, carried in three blocks of 2;
    the planned 16 x 8 tiles for 37 rows of 5 (slow lane)."""
    check_kernels(B, N, torch.float32, causal, True, True, tile, carry_block, seed=B + N)


# ---------------------------------------------------------------------------------------------
# a carried state (causal): the kernels against the CPU kernel's state ops

HAS_CPU_STATE = hasattr(torch.ops.resnet_bk, "bk_core_fwd_state")


def state_inputs(B, dtype, seed, real_state=False):
    """d_in (B,) complex (row 0 infinite when B > 1: bk_math's 1 / d_in = 0, a fresh start), k_in (B,)."""
    g = torch.Generator().manual_seed(seed)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    d = torch.complex(torch.randn(B, generator=g, dtype=torch.float64) + 1.5,
                      torch.zeros(B, dtype=torch.float64) if real_state else
                      torch.randn(B, generator=g, dtype=torch.float64))
    if B > 1:
        d[0] = complex(float("inf"), 0.0)
    kin = 0.5 + torch.rand(B, generator=g, dtype=torch.float64)
    return d.to(cdt).to(DEVICE), kin.to(dtype).to(DEVICE)


def check_state_kernels(B, N, dtype, masked, shared, tile=None, carry_block=None, seed=0, real_z=False):
    a, k, zri, mask = canon_inputs(B, N, dtype, shared, masked, seed)
    if real_z:
        zri = zri * torch.tensor([1.0, 0.0], dtype=dtype, device=zri.device)
    d, kin = state_inputs(B, dtype, seed + 2, real_state=real_z)
    tol = TOL[dtype]
    cpu = [None if x is None else x.cpu() for x in (a, k, zri, mask, d, kin)]
    out = K.bk_core_fwd(a, k, zri, mask, True, tile=tile, carry_block=carry_block, d_in=d, k_in=kin)
    assert_rel(out, torch.ops.resnet_bk.bk_core_fwd_state(*cpu), tol, "forward")
    g = upstream(B, N, dtype, seed + 1)
    got = K.bk_core_bwd(g, a, k, zri, mask, True, True, tile=tile, carry_block=carry_block, d_in=d, k_in=kin)
    ca, ck, cz, cm, cd, ckin = cpu
    exp = torch.ops.resnet_bk.bk_core_bwd_state(g.cpu(), ca, ck, cz, cm, cd, ckin, cm is not None, True, True, None)
    assert len(got) == 5
    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask", "mu0"), got, exp):
        if name == "grad_mask" and cm is None:
            assert x is None, f"{name}: expected None"
        else:
            assert_rel(x, y, tol, name)
    # the state matters: without it the forward differs (the first position at least)
    plain = K.bk_core_fwd(a, k, zri, mask, True, tile=tile, carry_block=carry_block)
    assert not torch.allclose(plain[B > 1:, 0], out[B > 1:, 0]) or (masked and not mask[B > 1:, 0].any())


@pytest.mark.skipif(not HAS_CPU_STATE, reason="the compiled extension has no bk_core_fwd_state")
@pytest.mark.parametrize("shared", [False, True], ids=["k_rows", "k_shared"])
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
# (1, 1): one position; (3, 5): all rows in one tile (R > 1); (3, 5, 2, 1): three chunks carried in
# three blocks of one; (3, 40, 8, 2): five chunks in three blocks of two (slow lane: 6 s each);
# (1, 40): one 64-tile
@pytest.mark.parametrize("B,N,tile,carry_block", [(1, 1, None, None), (3, 5, None, None), (3, 5, 2, 1),
                                                  pytest.param(3, 40, 8, 2, marks=pytest.mark.slow),
                                                  (1, 40, None, None)])
def test_state_kernels_match_cpu_kernel(B, N, tile, carry_block, masked, shared):
    check_state_kernels(B, N, torch.float64, masked, shared, tile, carry_block, seed=B + N)


@pytest.mark.skipif(not HAS_CPU_STATE, reason="the compiled extension has no bk_core_fwd_state")
@pytest.mark.parametrize("tile,carry_block", [(None, None), (4, 2)], ids=["planned", "chunks"])
def test_state_kernels_float32_and_real_z(tile, carry_block):
    """float32 (chunked rows too), and a real z with real states (the ghosts could not carry them)."""
    check_state_kernels(3, 11, torch.float32, True, False, tile, carry_block, seed=4)
    check_state_kernels(3, 11, torch.float64, False, True, tile, carry_block, seed=5, real_z=True)


def test_state_bad_arguments():
    a, k, zri, _ = canon_inputs(2, 5, torch.float64)
    d = torch.ones(2, dtype=torch.complex128, device=DEVICE)
    kin = torch.ones(2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="d_in: a carried state is defined for the causal op only, got causal=False"):
        K.bk_core_fwd(a, k, zri, None, False, d_in=d, k_in=kin)
    with pytest.raises(ValueError, match="k_in: expected d_in and k_in both or neither, got only d_in"):
        K.bk_core_fwd(a, k, zri, None, True, d_in=d)
    with pytest.raises(ValueError,
                       match=r"d_in: expected a \(2,\) torch.complex128 tensor, got \(1,\) torch.complex128"):
        K.bk_core_fwd(a, k, zri, None, True, d_in=d[:1], k_in=kin)
    with pytest.raises(ValueError, match=r"k_in: expected a \(2,\) torch.float64 tensor, got \(2,\) torch.float32"):
        K.bk_core_bwd(upstream(2, 5, torch.float64), a, k, zri, None, True, d_in=d, k_in=kin.float())
    z = K.bk_core_bwd(upstream(2, 5, torch.float64)[:0], a[:0], k[:0], zri, None, True, d_in=d[:0], k_in=kin[:0])
    assert len(z) == 5 and z[4].shape == (0,)


@pytest.mark.skipif(not HAS_CPU_STATE, reason="the compiled extension has no bk_core_fwd_state")
def test_opcheck_state_ops():
    a, k, zri, mask = canon_inputs(2, 4, torch.float64, shared=True, masked=True)
    d, kin = state_inputs(2, torch.float64, 3)
    d[0] = 0.5 - 1j
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_fwd_state_triton.default, (a, k, zri, mask, d, kin))
    g = upstream(2, 4, torch.float64)
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_bwd_state_triton.default,
                          (g, a, k, zri, None, d, kin, False, True, True, None))


def test_zero_rows_and_bad_arguments():
    a, k, zri, _ = canon_inputs(2, 5, torch.float64)
    assert K.bk_core_fwd(a[:0], k[:0], zri, None, False).shape == (0, 5)
    with pytest.raises(ValueError, match="k: expected"):
        K.bk_core_fwd(a, k[:, :3], zri, None, False)
    with pytest.raises(ValueError, match="zri: expected"):
        K.bk_core_fwd(a, k, zri.float(), None, False)
    with pytest.raises(ValueError, match="tile=: expected a power of two, got 3"):
        K.bk_core_fwd(a, k, zri, None, False, tile=3)
    with pytest.raises(ValueError, match="carry_block=: expected a power of two, got 0"):
        K.bk_core_fwd(a, k, zri, None, False, tile=2, carry_block=0)
    with pytest.raises(ValueError, match="grad: expected shape"):
        K.bk_core_bwd(upstream(2, 4, torch.float64), a, k, zri, None, False)


def test_tile_override(monkeypatch):
    """``tile=`` forces the positions per tile (one row per tile unless a whole row fits); the
    environment value is read once, at import, and the keyword wins over it."""
    assert K._resolve(2, 15, None, None) == K.plan(2, 15)
    assert K._resolve(2, 15, 4, None) == K.Plan(R=1, T=4, C=4, programs=8, carry_block=4)
    assert K._resolve(2, 15, 32, 2) == K.Plan(R=2, T=16, C=1, programs=1, carry_block=1)
    monkeypatch.setenv(K.ENV_TILE, "4")
    assert K._resolve(2, 15, None, None) == K.plan(2, 15)  # a later change has no effect
    monkeypatch.setattr(K, "_ENV_TILE_VALUE", "4")
    assert K._resolve(2, 15, None, None).T == 4
    assert K._resolve(2, 15, 8, None).T == 8
    monkeypatch.setattr(K, "_ENV_TILE_VALUE", "six")
    with pytest.raises(ValueError, match=K.ENV_TILE):
        K._resolve(2, 15, None, None)


# ---------------------------------------------------------------------------------------------
# the "triton" backend through resnet_bk.ops


def public_inputs(dtype, shared, seed=3):
    g = torch.Generator().manual_seed(seed)
    B, N = 2, 9
    a = (-2.0 + 6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0).to(dtype)
    shp = (N - 1,) if shared else (B, N - 1)
    b = (0.5 + torch.rand(shp, generator=g, dtype=torch.float64)).to(dtype)
    c = (0.5 + torch.rand(shp, generator=g, dtype=torch.float64)).to(dtype)
    mask = (torch.rand(B, N, generator=g) > 0.3).to(dtype)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    z = torch.tensor(Z, dtype=cdt)
    return [t.to(DEVICE) for t in (a, b, c, z, mask)]


@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("tile", [None, "4"], ids=["planned", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_backend_autograd_matches_reference(monkeypatch, dtype, tile, causal):
    """Every input's gradient (diag, super, sub, learnable complex z, straight-through mask)
    through ops.bk_core_masked, short tiles forced as by the environment (read at import)."""
    monkeypatch.setattr(K, "_ENV_TILE_VALUE", tile)
    results = []
    for backend in ("triton", "reference"):
        inputs = [t.clone().requires_grad_() for t in public_inputs(dtype, shared=tile is not None)]
        out = ops.bk_core_masked(*inputs, causal=causal, backend=backend)
        g = upstream(*out.shape, dtype, seed=7)
        grads = torch.autograd.grad(out, inputs, g)
        results.append((out,) + grads)
    for name, x, y in zip(("out", "diag", "super", "sub", "z", "mask"), *results):
        assert_rel(x.detach(), y.detach(), TOL[dtype], name)


def test_backend_registered_and_explained(monkeypatch):
    assert "triton" in ops.available_backends()
    assert ops.backend_status()["triton"] == "available"
    a, b, c, _, _ = public_inputs(torch.float64, shared=True)
    choice = ops.explain(a, b, c, 1j, backend="triton")
    assert choice.backend == "triton"
    if not ON_GPU:
        # CPU tensors are rejected, saying why, unless the interpreter is on
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ops.BackendUnavailableError, match="takes CUDA tensors"):
            ops.bk_core(a, b, c, 1j, backend="triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        # any other device is rejected with the reason
        assert "takes CUDA tensors, got meta" in _triton.check(torch.empty(2, 3, device="meta"))


def test_verify_mode_passes():
    a, b, c, z, mask = public_inputs(torch.float64, shared=False)
    a.requires_grad_()
    with ops.verify():
        out = ops.bk_core_masked(a, b, c, z, mask, backend="triton")
        out.real.sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("causal,masked", [(False, True), (True, False)], ids=["twosided_mask", "causal"])
def test_opcheck(causal, masked):
    a, k, zri, mask = canon_inputs(2, 4, torch.float64, shared=False, masked=masked)
    a.requires_grad_()
    torch.library.opcheck(torch.ops.resnet_bk.bk_core_fwd_triton, (a, k, zri, mask, causal))


def test_compile_fullgraph_matches_eager():
    """torch.compile traces the dispatch and the registered op (fake kernel + autograd) without
    a graph break; aot_eager keeps the test quick (Inductor adds nothing to an opaque op)."""
    a, b, c, z, mask = public_inputs(torch.float64, shared=True)

    def f(a, b, c):
        return ops.bk_core_masked(a, b, c, 1j, mask, backend="triton").abs().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    a1 = a.clone().requires_grad_()
    a2 = a.clone().requires_grad_()
    y1 = cf(a1, b, c)
    y1.backward()
    y2 = f(a2, b, c)
    y2.backward()
    assert_rel(y1.detach(), y2.detach(), 1e-12, "compiled output")
    assert_rel(a1.grad, a2.grad, 1e-12, "compiled gradient")


def test_kernels_compile_for_gpu():
    """The real Triton compiler (not the interpreter) lowers the kernels to sm_90 cubin, including
    the launcher's constexpr-1 specialisation of integer arguments; no GPU is needed for this.
    ``python -m resnet_bk.triton_kernels.aot_check`` runs every specialisation."""
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-W", "ignore", "-m", "resnet_bk.triton_kernels.aot_check",
                        "--level", "smoke"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "20 kernel variants compiled for sm_90" in r.stdout and "IEEE divisions only" in r.stdout


# ---------------------------------------------------------------------------------------------
# causal rows of several chunks: one pass with a decoupled look-back


def _launches(monkeypatch):
    names = []
    orig = K._launch

    def launch(kernel, grid, *args, **meta):
        names.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return orig(kernel, grid, *args, **meta)
    monkeypatch.setattr(K, "_launch", launch)
    return names


# without a state, chunked causal rows are also in test_kernels_match_reference's fast lane
@pytest.mark.parametrize("dtype,need_gk,state", [
    (torch.float64, True, True), pytest.param(torch.float64, False, False, marks=pytest.mark.slow),
    pytest.param(torch.float32, True, False, marks=pytest.mark.slow), (torch.float32, False, True)],
    ids=["f64-gk-state", "f64-nogk", "f32-gk", "f32-nogk-state"])
def test_causal_lookback_matches_reference(monkeypatch, dtype, need_gk, state):
    """3 rows of 37 in chunks of 8 (C = 5, a partial last chunk), per-row k, a mask: the forward is
    one look-back launch, the backward two (the pivots entering each chunk; the gradient tiles with
    mu carried by a reverse look-back), against the reference (with a carried state: the CPU
    kernel's state ops), grad k stored only when asked for."""
    if state and not HAS_CPU_STATE:
        pytest.skip("the compiled extension has no bk_core_fwd_state")
    B, N, tile = 3, 37, 8
    names = _launches(monkeypatch)
    a, k, zri, mask = canon_inputs(B, N, dtype, False, True, 7)
    g = upstream(B, N, dtype, 8)
    tol = TOL[dtype]
    st = {}
    if state:
        d, kin = state_inputs(B, dtype, 9)
        st = dict(d_in=d, k_in=kin)
    out = K.bk_core_fwd(a, k, zri, mask, True, tile=tile, **st)
    assert names == ["_fwd_lookback_kernel"], names
    del names[:]
    got = K.bk_core_bwd(g, a, k, zri, mask, True, True, need_gk, tile=tile, **st)
    assert names == ["_fwd_lookback_kernel", "_bwd_kernel"], names
    if state:
        cpu = [x.cpu() for x in (a, k, zri, mask, d, kin)]
        ref = torch.ops.resnet_bk.bk_core_fwd_state(*cpu)
        exp = torch.ops.resnet_bk.bk_core_bwd_state(g.cpu(), *cpu, True, True, True, None)
        assert len(got) == 5
        assert_rel(got[4], exp[4], tol, "mu0")
    else:
        ref = bk_core_fwd_ref(a, k, zri, mask, True)
        exp = bk_core_bwd_ref(g, a, k, zri, mask, True)
    assert_rel(out, ref, tol, "forward")
    for name, i in (("grad_a", 0), ("grad_zri", 2), ("grad_mask", 3)):
        assert_rel(got[i], exp[i], tol, name)
    if need_gk:
        assert_rel(got[1], exp[1], tol, "grad_k")
    else:
        assert got[1] is None


@triton.jit
def _walk_kernel(stat_ptr, desc_ptr, out_ptr, B, LIN: triton.language.constexpr):
    """Program i: the look-back walk of ticket B + i (a chunk >= 1) over pre-filled descriptors."""
    i = triton.language.program_id(0)
    one = triton.language.full([], 1.0, desc_ptr.dtype.element_ty)
    if LIN:
        xr, xi = K._walk_lin(stat_ptr, desc_ptr, i + B, B, one)
        triton.language.store(out_ptr + i * 4, xr)
        triton.language.store(out_ptr + i * 4 + 1, xi)
    else:
        xr, xi, yr, yi = K._walk_mob(stat_ptr, desc_ptr, i + B, B, one)
        triton.language.store(out_ptr + i * 4, xr)
        triton.language.store(out_ptr + i * 4 + 1, xi)
        triton.language.store(out_ptr + i * 4 + 2, yr)
        triton.language.store(out_ptr + i * 4 + 3, yi)


# statuses per (row, chunk), chunk 0 always inclusive: 1 = AGG (aggregate only), 2 = INCL; runs of
# aggregates longer than the walk's first window (4) make it take a second one
WALK_STATUS = [[2, 1, 1, 2, 1, 1, 1, 1, 1, 1, 1, 1], [2, 2, 1, 2, 2, 1, 2, 1, 1, 1, 1, 2]]


@pytest.mark.parametrize("lin", [False, True], ids=["moebius", "affine"])
def test_lookback_walk_composes_aggregates(lin):
    """The walk itself, on hand-built descriptors with aggregates and inclusive values mixed (the
    interpreter runs programs in order, so a kernel's own look-back only ever meets inclusive
    values): for each ticket (chunk c >= 1 of a row), the value entering chunk c = the inclusive
    value of the nearest inclusive predecessor carried through the aggregates in between. The
    field a status does not name holds NaN, so reading the wrong one shows; each stored map and
    inclusive pivot is scaled by an arbitrary complex factor (pivots are homogeneous)."""
    B, C = len(WALK_STATUS), len(WALK_STATUS[0])
    g = torch.Generator().manual_seed(11)

    def cplx(*shape):
        return torch.complex(torch.randn(*shape, generator=g, dtype=torch.float64),
                             torch.randn(*shape, generator=g, dtype=torch.float64))
    dw = 6 if lin else 12
    desc = torch.full((B * C, dw), float("nan"), dtype=torch.float64)
    stat = torch.zeros(B * C, dtype=torch.int32)
    want = torch.zeros(B, C, dtype=torch.complex128)   # the value entering chunk c (x / y for pivots)
    for r in range(B):
        if lin:
            cm, pm = cplx(C) * 0.7, cplx(C)
            incl = torch.zeros((), dtype=torch.complex128)
        else:
            maps = cplx(C, 2, 2) + 2.0 * torch.eye(2, dtype=torch.complex128)
            incl = cplx(2)
        for c in range(C):
            want[r, c] = incl if lin else incl[0] / incl[1]
            i = c * B + r
            s = WALK_STATUS[r][c]
            stat[i] = s
            if lin:
                incl = cm[c] * incl + pm[c]
                if s == 1:
                    desc[i, :4] = torch.view_as_real(torch.stack([cm[c], pm[c]])).flatten()
                else:
                    desc[i, 4:] = torch.view_as_real(incl)
            else:
                incl = maps[c] @ incl
                f = cplx(())
                if s == 1:
                    desc[i, :8] = torch.view_as_real((maps[c] * f).flatten()).flatten()
                else:
                    desc[i, 8:] = torch.view_as_real(incl * f).flatten()
    out = torch.zeros((C - 1) * B, 4, dtype=torch.float64)
    dev = dict(device=DEVICE)
    res = out.to(**dev)
    _walk_kernel[((C - 1) * B,)](stat.to(**dev), desc.to(**dev), res, B, LIN=lin)
    res = res.cpu()
    v = torch.complex(res[:, 0], res[:, 1])
    if not lin:
        v = v / torch.complex(res[:, 2], res[:, 3])
    exp = want[:, 1:].T.flatten()   # ticket order: chunk-major
    assert torch.isfinite(torch.view_as_real(v)).all(), v
    assert torch.allclose(v, exp, rtol=1e-12, atol=1e-12), (v, exp)


def test_tickets_not_program_ids_decide_the_tiles(monkeypatch):
    """Programs taking tickets in an order unrelated to their program ids (here the interpreter is
    made to run program ids in reverse, as a GPU may start them in any order) give the same
    results: a tile is chosen by its ticket, so its look-back only ever waits on programs that
    started before it. (Tiles chosen by program id would wait on tiles no program has published:
    the interpreter, running programs one after another, would spin for ever; a cap on status
    reads turns that into a failure.)"""
    if ON_GPU:
        pytest.skip("drives Triton's interpreter")
    from triton.runtime import interpreter as I
    B, N, tile = 2, 29, 8
    a, k, zri, mask = canon_inputs(B, N, torch.float64, False, True, 5)
    g = upstream(B, N, torch.float64, 6)
    want_out = K.bk_core_fwd(a, k, zri, mask, True, tile=tile)
    want = K.bk_core_bwd(g, a, k, zri, mask, True, True, tile=tile)
    seen = []
    orig_idx = I.InterpreterBuilder.set_grid_idx
    orig_rmw = I.InterpreterBuilder.create_atomic_rmw
    reads = [0]

    def reversed_idx(self, x, y, z):
        seen.append(self.grid_dim[0] - 1 - x)
        return orig_idx(self, self.grid_dim[0] - 1 - x, y, z)

    def capped_rmw(self, *args):
        reads[0] += 1
        if reads[0] > 1000:
            raise RuntimeError("look-back spinning on a status no program before it will publish")
        return orig_rmw(self, *args)
    monkeypatch.setattr(I.InterpreterBuilder, "set_grid_idx", reversed_idx)
    monkeypatch.setattr(I.InterpreterBuilder, "create_atomic_rmw", capped_rmw)
    out = K.bk_core_fwd(a, k, zri, mask, True, tile=tile)
    got = K.bk_core_bwd(g, a, k, zri, mask, True, True, tile=tile)
    assert seen[:2] == [B * 4 - 1, B * 4 - 2], seen[:4]   # C = 4 chunks: program ids ran in reverse
    assert torch.equal(out, want_out)
    for name, x, y in zip(("grad_a", "grad_k", "grad_zri", "grad_mask"), got, want):
        assert torch.allclose(x, y, rtol=1e-13, atol=1e-13), name
    assert_rel(out, bk_core_fwd_ref(a, k, zri, mask, True), TOL[torch.float64], "forward")


# ---------------------------------------------------------------------------------------------
# learned down/upsampling kernels (triton_kernels/pooling.py)


def down_formula(x, logits, causal):
    """out[b, j] = sum_k softmax(logits[j])_k x[b, j*r + k - s], s = r - 1 if causal (zero padding)."""
    B, N, D = x.shape
    M, r = logits.shape
    w = torch.softmax(logits, -1)
    xs = x.to(logits.dtype)
    if causal and r > 1:
        xs = F.pad(xs, (0, 0, r - 1, 0))[:, :N]
    return (xs.reshape(B, M, r, D) * w[None, :, :, None]).sum(2).to(x.dtype)


def up_formula(y, bias, residual, scale):
    """residual + scale * (y[b, m, k*D + d] + bias[m, k, d]) as (B, M*r, D)."""
    B, M, RD = y.shape
    r = bias.shape[1]
    v = (y.to(bias.dtype).reshape(B, M, r, RD // r) + bias).reshape(B, M * r, RD // r)
    if scale is not None:
        v = scale * v
    if residual is not None:
        v = residual.to(bias.dtype) + v
    return v.to(y.dtype)


POOL_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3}


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16], ids=["f64", "f32", "f16"])
@pytest.mark.parametrize("r,D", [(3, 70), (1, 5), (4, 2)])
def test_downsample_kernel(dtype, causal, r, D):
    """D = 70 spans two feature blocks; r = 3 is not a power of two; x is a strided view."""
    B, M = 2, 3
    g = torch.Generator().manual_seed(r * D)
    x = torch.randn(M * r, B, D, generator=g, dtype=torch.float64).to(dtype).transpose(0, 1).to(DEVICE)
    logits = torch.randn(M, r, generator=g, dtype=torch.float64).to(_acc(dtype)).to(DEVICE)
    tol = POOL_TOL[dtype]
    out = P.learned_downsample_fwd(x, logits, causal)
    xr, lr = x.clone().requires_grad_(), logits.clone().requires_grad_()
    ref = down_formula(xr, lr, causal)
    assert_rel(out, ref.detach(), tol, "downsample forward")
    gout = torch.randn(ref.shape, generator=g, dtype=torch.float64).to(dtype).to(DEVICE)
    ex, el = torch.autograd.grad(ref, [xr, lr], gout)
    gx, gl = P.learned_downsample_bwd(gout, x, logits, causal)
    assert_rel(gx, ex, tol, "grad_x")
    assert_rel(gl, el, tol, "grad_logits")
    only_x = P.learned_downsample_bwd(gout, x, logits, causal, need_x=True, need_logits=False)
    assert only_x[1] is None and torch.equal(only_x[0], gx)


@pytest.mark.parametrize("with_res,with_scale", [(True, True), (False, False), (True, False)],
                         ids=["res_scale", "plain", "res"])
@pytest.mark.parametrize("Mb,Db", [(3, 5), (1, 5), (3, 1), (1, 1)], ids=["full", "phase", "scalar", "shared"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_upsample_kernel(dtype, Mb, Db, with_res, with_scale):
    B, M, r, D = 2, 3, 4, 5
    g = torch.Generator().manual_seed(Mb * 10 + Db)
    acc = _acc(dtype)

    def rnd(*shape, dt):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dt).to(DEVICE)

    y = rnd(B, M, 2 * r * D, dt=dtype)[..., ::2]  # strided view
    bias = rnd(Mb, r, Db, dt=acc)
    res = rnd(B, M * r, D, dt=dtype) if with_res else None
    scale = torch.tensor(0.7, dtype=acc, device=DEVICE) if with_scale else None
    tol = POOL_TOL[dtype]
    out = P.learned_upsample_fwd(y, bias, res, scale)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (y, bias, res, scale)]
    ref = up_formula(*leaves)
    assert_rel(out, ref.detach(), tol, "upsample forward")
    gout = rnd(*ref.shape, dt=dtype)
    want = [t for t in leaves if t is not None]
    exp = dict(zip([id(t) for t in want], torch.autograd.grad(ref, want, gout)))
    gy, gb, gs = P.learned_upsample_bwd(gout, y, bias, scale)
    assert_rel(gy, exp[id(leaves[0])], tol, "grad_y")
    assert_rel(gb, exp[id(leaves[1])], tol, "grad_bias")
    if with_scale:
        assert_rel(gs, exp[id(leaves[3])], tol, "grad_scale")
    else:
        assert gs is None


needs_pool_ops = pytest.mark.skipif(not hasattr(ops, "learned_downsample"),
                                    reason="resnet_bk.ops has no learned_downsample (pooling ops not merged)")


@needs_pool_ops
@pytest.mark.parametrize("causal", [False, True], ids=["plain", "causal"])
def test_pool_ops_through_dispatch(causal):
    """The "triton" impls of the public pooling ops: outputs and every gradient equal the
    reference backend's; opcheck of the registered ops."""
    g = torch.Generator().manual_seed(5)
    B, M, r, D = 2, 3, 2, 4
    x = torch.randn(B, M * r, D, generator=g, dtype=torch.float64).to(DEVICE)
    logits = torch.randn(M, r, generator=g, dtype=torch.float64).to(DEVICE)
    bias = torch.randn(1, r, D, generator=g, dtype=torch.float64).to(DEVICE)
    scale = torch.tensor(0.5, dtype=torch.float64, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, logits, bias, scale)]
        low = ops.learned_downsample(leaves[0], leaves[1], causal=causal, backend=backend)
        y = low.repeat(1, 1, r)  # (B, M, r*D)
        out = ops.learned_upsample(y, leaves[2], residual=leaves[0], scale=leaves[3], backend=backend)
        gout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=out.dtype).to(DEVICE)
        results.append((out,) + torch.autograd.grad(out, leaves, gout))
    for name, a, b in zip(("out", "x", "logits", "bias", "scale"), *results):
        assert_rel(a.detach(), b.detach(), 1e-12, name)
    xc = x.clone().requires_grad_()
    torch.library.opcheck(torch.ops.resnet_bk.learned_downsample_fwd_triton, (xc, logits, causal))
    yc = torch.randn(B, M, r * D, dtype=torch.float64, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.resnet_bk.learned_upsample_fwd_triton, (yc, bias, x, scale))


@pytest.mark.parametrize("state", [False, True], ids=["fresh", "state"])
def test_causal_deterministic_takes_the_carry_kernels(monkeypatch, state):
    """Under torch.use_deterministic_algorithms(True) causal rows of several chunks take the carry
    kernels (a fixed order of operations, no look-back: its rounding depends on the order programs
    run in on a GPU), and still match the reference, with and without a carried state."""
    if state and not HAS_CPU_STATE:
        pytest.skip("the compiled extension has no bk_core_fwd_state")
    B, N, tile, dtype = 2, 29, 8, torch.float64
    names = _launches(monkeypatch)
    a, k, zri, mask = canon_inputs(B, N, dtype, True, True, 3)
    g = upstream(B, N, dtype, 4)
    st = dict(zip(("d_in", "k_in"), state_inputs(B, dtype, 5))) if state else {}
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        out = K.bk_core_fwd(a, k, zri, mask, True, tile=tile, **st)
        fwd_names = list(names)
        del names[:]
        got = K.bk_core_bwd(g, a, k, zri, mask, True, True, True, tile=tile, **st)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert "_fwd_lookback_kernel" not in fwd_names and "_fwd_kernel" in fwd_names, fwd_names
    assert "_fwd_lookback_kernel" not in names and "_lin_carry_kernel" in names, names
    if state:
        cpu = [x.cpu() for x in (a, k, zri, mask, st["d_in"], st["k_in"])]
        ref = torch.ops.resnet_bk.bk_core_fwd_state(*cpu)
        exp = torch.ops.resnet_bk.bk_core_bwd_state(g.cpu(), *cpu, True, True, True, None)
        assert_rel(got[4], exp[4], TOL[dtype], "mu0")
    else:
        ref = bk_core_fwd_ref(a, k, zri, mask, True)
        exp = bk_core_bwd_ref(g, a, k, zri, mask, True)
    assert_rel(out, ref, TOL[dtype], "forward")
    for name, i in (("grad_a", 0), ("grad_k", 1), ("grad_zri", 2), ("grad_mask", 3)):
        assert_rel(got[i], exp[i], TOL[dtype], name)
