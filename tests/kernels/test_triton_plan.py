"""The Triton BK-Core launch plan (``triton_kernels/bk_core.py``: ``plan``, ``carry_depth``), its
special values against csrc/bk_math.h (through the C++ backend), and IEEE division in the PTX.

The plan is pure Python: it is checked over the whole shape grid B = 1..4096, N = 1..2^24 with no
GPU. "Fills the GPU" means: at least TARGET_PROGRAMS programs (4 per SM of a 132-SM GPU, 128
threads each), or, for a problem too small for that, at least ceil(B N / MIN_TILE) programs (no
thread has more than one element). The carry depth (dependent combine steps along a row) is
O(log T + C / carry_block * log carry_block), never O(N).
"""
import importlib
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from triton_env import DEVICE, ON_GPU, import_kernels  # noqa: E402

K, = import_kernels("resnet_bk.triton_kernels.bk_core")

from resnet_bk import ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BS = [1, 2, 3, 7, 8, 9, 31, 64, 100, 127, 128, 129, 1000, 4095, 4096]
NS = sorted({1, 2, 3, 5, 100, 127, 128, 129, 1000, 1023, 1024, 1025, 4097, 65535, 1 << 18, (1 << 18) + 1,
             1_000_000, (1 << 24) - 1, 1 << 24})


def _is_pow2(x):
    return x >= 1 and x & (x - 1) == 0


@pytest.mark.parametrize("B", BS)
def test_plan_fills_the_gpu_for_every_shape(B):
    for N in NS:
        p = K.plan(B, N)
        what = f"B={B}, N={N}: {p}"
        assert _is_pow2(p.T) and _is_pow2(p.R) and _is_pow2(p.carry_block), what
        assert p.R * p.T <= K.MAX_TILE, what
        assert p.C == -(-N // p.T) and p.programs == -(-B // p.R) * p.C, what
        assert p.C == 1 or p.R == 1, what  # a tile never spans two rows of a chunked row
        # fills: enough programs, or no more than one element per thread
        assert p.programs >= min(K.TARGET_PROGRAMS, -(-B * N // K.MIN_TILE)), what
        # no tile is mostly padding: at most 2x in each of rows and positions
        assert p.programs * p.R * p.T <= 4 * B * N, what
        # parallel carries: depth O(log N + N / (T * carry_block) * log(carry_block)), never O(N)
        d = K.carry_depth(p)
        lg = max(1, math.ceil(math.log2(N + 1)))
        bound = 3 * lg + 2 + (-(-N // (p.T * p.carry_block))) * (int(math.log2(K.CARRY_BLOCK)) + 1)
        assert d <= bound, f"{what}: depth {d} > {bound}"
        if N >= 1 << 12:
            assert d * 64 < N, what


def test_plan_small_batch_long_rows():
    """What issue 23 asks for: B = 1 and B = 64 at N = 2^18 and 2^24 use full tiles and hundreds of
    programs; the old "lanes" plan ran B = 64 as 64 threads with 2^18 dependent steps."""
    for B, N in [(1, 1 << 18), (64, 1 << 18), (1, 1 << 24), (4096, 1 << 10)]:
        p = K.plan(B, N)
        assert p.programs >= K.TARGET_PROGRAMS and p.R * p.T >= 2 * K.MIN_TILE, p
    assert K.plan(64, 1 << 18).T == K.plan(1, 1 << 24).T == K.MAX_TILE
    p = K.plan(1, 1 << 24)
    assert K.carry_depth(p) < 256  # against 2^24 sequential steps for one thread per row


def test_plan_rejects_empty_shapes():
    with pytest.raises(ValueError, match="plan: expected B >= 1 and N >= 1, got B=0"):
        K.plan(0, 5)


# ---------------------------------------------------------------------------------------------
# special values: bk_math.h semantics (csrc/bk_math.h, via the C++ backend)

needs_interp = pytest.mark.skipif(not ON_GPU and not K.INTERPRETED,
                                  reason="Triton's interpreter cannot run here (TRITON_INTERPRET set too late)")
needs_cpp = pytest.mark.skipif("cpp" not in ops.available_backends(), reason="compiled extension not built")


def _inf_problem(dtype, B=2, N=24, j=9):
    g = torch.Generator().manual_seed(4)
    a = (-2.0 + 6.0 * torch.rand(B, N, generator=g, dtype=torch.float64) - 3.0).to(dtype)
    b = (0.5 + torch.rand(B, N - 1, generator=g, dtype=torch.float64)).to(dtype)
    c = (0.5 + torch.rand(B, N - 1, generator=g, dtype=torch.float64)).to(dtype)
    a[0, j] = float("inf")
    return a, b, c


@needs_interp
@needs_cpp
@pytest.mark.parametrize("causal", [False, True], ids=["twosided", "causal"])
@pytest.mark.parametrize("tile,carry_block", [(None, None), (4, 2)], ids=["one_tile", "chunks"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_infinite_pivot_matches_bk_math(dtype, tile, carry_block, causal):
    """An infinite potential a_j: bk_math.h gives 1 / d_j = 0 (its |d_j|^2 is infinite) and
    d_{j+1} = alpha_{j+1}, so position j decouples. The C++ backend (bk_math.h, lane path at this
    shape) is the oracle: the same non-finite pattern (causal: none, y_j = 0 exactly; two-sided:
    only G_jj, inf - inf) and the same finite values, also when j's chunk summary and carries
    (tile=4: j = 9 is inside the third chunk) take the infinite pivot across chunks; and the
    same finite gradients of a and b."""
    j = 9
    a, b, c = _inf_problem(dtype, j=j)
    want = ops.bk_core(a, b, c, 1j, causal=causal, backend="cpp")
    zri = torch.tensor([0.0, 1.0], dtype=dtype)
    got = K.bk_core_fwd(a.to(DEVICE), (b * c).to(DEVICE), zri.to(DEVICE), None, causal,
                        tile=tile, carry_block=carry_block).cpu()
    bad_got = ~torch.isfinite(torch.view_as_real(got)).all(-1)
    bad_want = ~torch.isfinite(torch.view_as_real(want)).all(-1)
    assert torch.equal(bad_got, bad_want), (bad_got.nonzero().tolist(), bad_want.nonzero().tolist())
    if causal:
        assert not bad_want.any() and got[0, j] == 0
    else:
        assert bad_want[0, j] and bad_want.sum() == 1
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    ok = ~bad_want
    err = (got[ok] - want[ok]).abs().max() / want[ok].abs().max()
    assert err < tol, f"relative error {err:.3g}"
    # the backward: the C++ kernel's gradients are finite (its two-sided backward forms
    # G = 1 / (d_j - k_j / e_{j+1}), whose limit at the infinite pivot is 0); so are these
    gout = torch.randn(a.shape, generator=torch.Generator().manual_seed(8), dtype=torch.complex128).to(want.dtype)
    aa, bb = a.clone().requires_grad_(), b.clone().requires_grad_()
    ga_want, gb_want = torch.autograd.grad(ops.bk_core(aa, bb, c, 1j, causal=causal, backend="cpp"), [aa, bb], gout)
    ga, gk, _, _ = K.bk_core_bwd(gout.to(DEVICE), a.to(DEVICE), (b * c).to(DEVICE), zri.to(DEVICE), None, causal,
                                 tile=tile, carry_block=carry_block)
    for name, x, y in (("grad a", ga.cpu(), ga_want), ("grad b", gk.cpu() * c, gb_want)):
        assert torch.isfinite(y).all() and torch.isfinite(x).all(), name
        err = (x - y).abs().max() / y.abs().max()
        assert err < tol, f"{name}: relative error {err:.3g}"


@needs_interp
@needs_cpp
@pytest.mark.parametrize("tile", [None, 1], ids=["one_tile", "chunks"])
def test_zero_pivot_gives_ieee_nonfinite_like_cpp(tile):
    """A zero pivot (a real z on the spectrum of a leading block: H = [[0, 1], [1, 0]], z = 1 gives
    d = (-1, 0)) is not clamped: causal y_1 = -1 exactly, y_2 non-finite; both two-sided outputs
    non-finite, as the C++ backend (bk_math.h) gives."""
    a = torch.zeros(1, 2, dtype=torch.float64)
    b = torch.ones(1, 1, dtype=torch.float64)
    zri = torch.tensor([1.0, 0.0], dtype=torch.float64)
    for causal in (True, False):
        want = ops.bk_core(a, b, b, 1.0 + 0j, causal=causal, backend="cpp")
        got = K.bk_core_fwd(a.to(DEVICE), b.to(DEVICE), zri.to(DEVICE), None, causal, tile=tile).cpu()
        fin = torch.isfinite(torch.view_as_real(got)).all(-1)
        assert torch.equal(fin, torch.isfinite(torch.view_as_real(want)).all(-1))
        if causal:
            assert got[0, 0] == -1


# ---------------------------------------------------------------------------------------------
# IEEE division in the compiled kernels (no GPU needed: Triton -> PTX for sm_90)


@pytest.mark.slow
def test_ptx_has_only_ieee_divisions():
    """Float32 `/` in Triton lowers to div.full.f32 (approximate, ~2 ulp) while the interpreter
    divides in IEEE; every BK-Core division (kernels and decode step) goes through
    tl.fdiv(..., ieee_rounding=True) (div.rn.f32) instead. Compiles the float32 variants of
    aot_check's "smoke" level (flags all on; all off with integers specialised to 1) and reads
    their PTX; ``aot_check --level quick`` applies the same check to float64 too."""
    code = ("import json; from resnet_bk.triton_kernels import aot_check as A; "
            "print(json.dumps(A.approximate_divisions(level='smoke', rn_count=True)))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    found = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("_fwd_kernel", "_bwd_kernel", "_pivot_summary_kernel", "_pivot_carry_kernel",
                 "_lin_carry_kernel", "_step_kernel"):
        assert any(lbl.startswith(name + "[fp32") for lbl in found), (name, sorted(found))
    for label, (approx, ieee) in found.items():
        assert approx == [], f"{label}: {approx}"
        if label.startswith(("_fwd_kernel", "_bwd_kernel", "_step_kernel")):
            assert ieee > 0, f"{label}: no IEEE division found (the check would be vacuous)"
