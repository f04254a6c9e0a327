"""Triton kernels for BK-Core: forward and exact backward, two-sided and causal, optional mask.

The math is docs/BK_CORE_MATH.md; the semantics to match are ``resnet_bk.ops.reference``
(``bk_core_fwd_ref`` / ``bk_core_bwd_ref``) and, for special values, csrc/bk_math.h. Canonical
arguments:

* ``a``    (B, N) float32/float64: the diagonal of H.
* ``k``    (Bk, N-1), Bk in {1, B}: products ``b_i c_i`` of the off-diagonals.
* ``zri``  (2,): ``[Re z, Im z]``.
* ``mask`` (B, N) or None.

Complex numbers are carried as (re, im) pairs of real tensors.

Work decomposition (``plan``): a program owns a *tile* of R rows x T consecutive positions
(R x T between MIN_TILE and MAX_TILE elements, both powers of two; R > 1 only when a whole row fits
in T), loaded with coalesced accesses (consecutive threads, consecutive addresses; a complex value
as one access of interleaved (re, im) pairs), each input once per kernel (the e chain scans the
d chain's leaves in reversed tile order; tests/kernels/test_triton_traffic.py counts the bytes).
Nothing in a tile is sequential: every recurrence is an associative scan along the tile (``tl.associative_scan``)

* the pivot chains d (left to right) and e (right to left) as products of the 2x2 Moebius
  matrices ``M_i = [[alpha_i, -k], [1, 0]]`` acting on homogeneous pivots ``(x, y)``, d = x / y;
  products are rescaled by exact powers of two (only ratios matter);
* the gradient recurrences (L, R, mu) ``x_j = c_j x_{j-1} + p_j`` as pairs (c, p).

A row longer than T is cut into C = ceil(N / T) chunks, one tile each. Two-sided, the value
entering each chunk comes from three launches: (1) a summary kernel stores each chunk's product,
(2) a carry kernel scans the C products of each row (blocks of CARRY_BLOCK chunks, a scan inside a
block, the running value carried between blocks), (3) the tile kernel applies its in-tile prefix
products to the carry. So the dependent steps per row are about 2 log2(T) + ceil(C / CARRY_BLOCK)
log2(CARRY_BLOCK), not N (``carry_depth``). The backward does this twice: pivots, then the linear
recurrences. Causal, the carry is a decoupled look-back inside the tile kernel (as in single-pass
prefix scans; ``_fwd_lookback_kernel``): the forward is one launch reading a and k once, the
backward two (the pivots entering each chunk, then the gradient tiles with mu carried right to
left the same way). Whole rows (C = 1) are one launch either way.

Special values follow csrc/bk_math.h: the reciprocal of a pivot whose |p|^2 is infinite is exactly
0 (``_inv_parts``), and an infinite alpha (an infinite potential) makes its Moebius matrix the limit
``M / alpha -> [[1, 0], [0, 0]]`` (the constant map to an infinite pivot), so the position decouples:
``1 / d_j = 0``, ``d_{j+1} = alpha_{j+1}``. Every division is IEEE round-to-nearest (``tl.fdiv`` with
``ieee_rounding=True``), never ``div.full.f32`` / ``div.approx``: ``aot_check.ptx_divisions`` checks
the PTX.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["Plan", "plan", "carry_depth", "bk_core_fwd", "bk_core_bwd", "ENV_TILE", "is_interpreted",
           "SM_COUNT", "TARGET_PROGRAMS", "MIN_TILE", "MAX_TILE", "CARRY_BLOCK", "NUM_WARPS"]

ENV_TILE = "RESNET_BK_TRITON_TILE"
# read once, when this module is first imported (a value is validated at the first call that uses it)
_ENV_TILE_VALUE = os.environ.get(ENV_TILE) or None

SM_COUNT = 132                   # H100 / H200 SXM
PROGRAMS_PER_SM = 4
TARGET_PROGRAMS = SM_COUNT * PROGRAMS_PER_SM
NUM_WARPS = 4                    # threads per program: 128
MIN_TILE = NUM_WARPS * 32        # one element per thread
MAX_TILE = 1024                  # eight elements per thread
CARRY_BLOCK = 1024               # chunk summaries scanned per step of the carry kernel


# ---------------------------------------------------------------------------------------------
# the plan (pure Python)


@dataclass(frozen=True)
class Plan:
    R: int            # rows per tile
    T: int            # positions per tile (a power of two)
    C: int            # chunks (tiles) per row
    programs: int     # tile programs per launch
    carry_block: int  # chunks per step of the carry kernel (a power of two)

    @property
    def tile(self) -> int:
        return self.R * self.T


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _make(B: int, N: int, R: int, T: int, carry_block: int) -> Plan:
    C = -(-N // T)
    return Plan(R, T, C, -(-B // R) * C, min(carry_block, _pow2(C)))


def plan(B: int, N: int, tile: Optional[int] = None, carry_block: Optional[int] = None,
         sms: Optional[int] = None) -> Plan:
    """The launch for B rows of length N. Tiles of E = R x T elements, E the largest power of two
    in [MIN_TILE, MAX_TILE] that still gives TARGET_PROGRAMS (4 per SM of a 132-SM GPU) programs;
    T = min(E, next_pow2(N)), R = min(E / T, next_pow2(B)). "Fills the GPU" (checked over
    B = 1..4096, N = 1..2^24 in tests/kernels/test_triton_plan.py): programs >= TARGET_PROGRAMS,
    or the problem is so small that programs >= ceil(B N / MIN_TILE), i.e. at most one element per
    thread. ``tile`` forces T (a power of two, R = 1 unless a whole row fits); ``carry_block``
    forces the carry kernel's block (a power of two). ``sms`` replaces SM_COUNT (tests: a small shape
    given the plan of a full-size one on a 132-SM GPU)."""
    if B < 1 or N < 1:
        raise ValueError(f"plan: expected B >= 1 and N >= 1, got B={B}, N={N}")
    if sms is not None and (not isinstance(sms, int) or sms < 1):
        raise ValueError(f"plan: expected sms >= 1, got {sms!r}")
    target = TARGET_PROGRAMS if sms is None else sms * PROGRAMS_PER_SM
    cb = CARRY_BLOCK if carry_block is None else carry_block
    npow, bpow = _pow2(N), _pow2(B)
    if tile is not None:
        T = min(tile, npow)
        return _make(B, N, 1 if T < npow else min(tile // T, bpow), T, cb)
    E = MAX_TILE
    while E > MIN_TILE:
        T = min(E, npow)
        if _make(B, N, min(E // T, bpow), T, cb).programs >= target:
            break
        E //= 2
    T = min(E, npow)
    return _make(B, N, min(E // T, bpow), T, cb)


def carry_depth(p: Plan) -> int:
    """Dependent combine steps along one row for the forward's pivots (the backward adds as many
    for its linear recurrences): the in-tile scans are log2(T) deep; with C > 1 chunks add the
    summary scan and ceil(C / carry_block) steps of the carry kernel, each log2(block) + 1 deep."""
    lg = int(math.log2(p.T)) if p.T > 1 else 0
    d = lg + 1
    if p.C > 1:
        d += lg + (-(-p.C // p.carry_block)) * (int(math.log2(p.carry_block)) + 1)
    return d


# ---------------------------------------------------------------------------------------------
# arithmetic helpers on (re, im) pairs


@triton.jit
def _div(x, y):
    # IEEE round-to-nearest for float32 too (plain `/` lowers to div.full.f32, an approximation);
    # float64 `/` is div.rn.f64 already (and the precise-division op is float32 only)
    if y.dtype == tl.float64:
        return x / y
    else:
        return tl.fdiv(x, y, ieee_rounding=True)


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _inv_parts(re, im):
    """csrc/bk_math.h ``inv_parts``: (u, v) with 1 / x = u - i v, each exactly 0 where |x|^2 is
    infinite (an infinite pivot contributes 0, not inf * 0)."""
    r = _div(1.0, re * re + im * im)
    u = tl.where(r == 0.0, 0.0, re * r)
    v = tl.where(r == 0.0, 0.0, im * r)
    return u, v


@triton.jit
def _cdiv(ar, ai, br, bi):
    """a / b = a * recip(b) with bk_math's recip."""
    u, v = _inv_parts(br, bi)
    return _cmul(ar, ai, u, -v)


@triton.jit
def _pow2_inv(m):
    """2^-floor(log2 m) for a finite m > 0 (the exponent field, clamped so that 0, subnormals,
    inf and NaN give a finite power of two): multiplying by it is exact."""
    if m.dtype == tl.float64:
        e = (m.to(tl.int64, bitcast=True) >> 52) & 0x7FF
        e = tl.minimum(tl.maximum(e, 1), 2046)
        return ((2046 - e) << 52).to(tl.float64, bitcast=True)
    else:
        e = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
        e = tl.minimum(tl.maximum(e, 1), 254)
        return ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _amax4(a, b, c, d):
    return tl.maximum(tl.maximum(tl.abs(a), tl.abs(b)), tl.maximum(tl.abs(c), tl.abs(d)))


@triton.jit
def _mob_comb(a00r, a00i, a01r, a01i, a10r, a10i, a11r, a11i,
              b00r, b00i, b01r, b01i, b10r, b10i, b11r, b11i):
    """Scan combine of Moebius matrices: B A (A the earlier prefix), rescaled by a power of two."""
    c00r, c00i = _cmul(b00r, b00i, a00r, a00i)
    t_r, t_i = _cmul(b01r, b01i, a10r, a10i)
    c00r += t_r
    c00i += t_i
    c01r, c01i = _cmul(b00r, b00i, a01r, a01i)
    t_r, t_i = _cmul(b01r, b01i, a11r, a11i)
    c01r += t_r
    c01i += t_i
    c10r, c10i = _cmul(b10r, b10i, a00r, a00i)
    t_r, t_i = _cmul(b11r, b11i, a10r, a10i)
    c10r += t_r
    c10i += t_i
    c11r, c11i = _cmul(b10r, b10i, a01r, a01i)
    t_r, t_i = _cmul(b11r, b11i, a11r, a11i)
    c11r += t_r
    c11i += t_i
    s = _pow2_inv(tl.maximum(_amax4(c00r, c00i, c01r, c01i), _amax4(c10r, c10i, c11r, c11i)))
    return c00r * s, c00i * s, c01r * s, c01i * s, c10r * s, c10i * s, c11r * s, c11i * s


@triton.jit
def _lin_comb(c1r, c1i, x1r, x1i, c2r, c2i, x2r, x2i):
    """Scan combine of affine maps x -> c x + p: (c2 c1, c2 x1 + x2) (1 the earlier prefix)."""
    cr, ci = _cmul(c2r, c2i, c1r, c1i)
    xr, xi = _cmul(c2r, c2i, x1r, x1i)
    return cr, ci, xr + x2r, xi + x2i


@triton.jit
def _mob_leaf(v, alr, ali, kk):
    """The Moebius matrix of one pivot step [[alpha, -k], [1, 0]]; its limit [[1, 0], [0, 0]]
    where alpha is infinite; the identity where not v (padding)."""
    zero = tl.zeros_like(alr)
    live = v & (tl.abs(alr) != float("inf"))
    m00r = tl.where(live, alr, 1.0)
    m00i = tl.where(live, ali, 0.0)
    m01r = tl.where(live, -kk, 0.0)
    one = zero + 1.0
    m10r = tl.where(live, one, zero)
    m11r = tl.where(v, zero, one)
    return m00r, m00i, m01r, zero, m10r, zero, m11r, zero


@triton.jit
def _mob_apply(p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i, xr, xi, yr, yi):
    """P (x, y), rescaled by a power of two."""
    ar, ai = _cmul(p00r, p00i, xr, xi)
    br, bi = _cmul(p01r, p01i, yr, yi)
    cr, ci = _cmul(p10r, p10i, xr, xi)
    dr, di = _cmul(p11r, p11i, yr, yi)
    nxr = ar + br
    nxi = ai + bi
    nyr = cr + dr
    nyi = ci + di
    s = _pow2_inv(_amax4(nxr, nxi, nyr, nyi))
    return nxr * s, nxi * s, nyr * s, nyi * s


@triton.jit
def _shift1(x, first, R: tl.constexpr, T: tl.constexpr):
    """x[:, t - 1] along the tile, ``first`` (R, 1) at t = 0."""
    t = tl.arange(0, T)[None, :] + tl.zeros([R, T], tl.int32)
    y = tl.gather(x, tl.maximum(t - 1, 0), 1)
    return tl.where(t == 0, first, y)


@triton.jit
def _shift_next(x, last, R: tl.constexpr, T: tl.constexpr):
    """x[:, t + 1] along the tile, ``last`` (R, 1) at t = T - 1."""
    t = tl.arange(0, T)[None, :] + tl.zeros([R, T], tl.int32)
    y = tl.gather(x, tl.minimum(t + 1, T - 1), 1)
    return tl.where(t == T - 1, last, y)


@triton.jit
def _flip(x, R: tl.constexpr, T: tl.constexpr):
    t = tl.arange(0, T)[None, :] + tl.zeros([R, T], tl.int32)
    return tl.gather(x, T - 1 - t, 1)


@triton.jit
def _load_complex(ptr, idx, m):
    """Complex entries idx of an interleaved (re, im) array: one load of consecutive reals."""
    off = idx[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    return tl.split(tl.load(ptr + off, mask=m[:, :, None], other=0.0))


@triton.jit
def _store_complex(ptr, idx, re, im, m):
    off = idx[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]
    tl.store(ptr + off, tl.join(re, im), mask=m[:, :, None])


@triton.jit
def _tile(pid, B, N, C, R: tl.constexpr, T: tl.constexpr):
    """Rows (R, 1) int64, chunk start, t (1, T), row validity (R, 1)."""
    rb = pid // C
    c = pid - rb * C
    rows = (rb * R + tl.arange(0, R)).to(tl.int64)[:, None]
    t = tl.arange(0, T)[None, :]
    return rows, (c * T).to(tl.int64), t, rows < B


@triton.jit
def _load_vec(ptr, off, stride, okr, HAS: tl.constexpr, zero):
    """A carried complex pair (x, y) (4 reals at off + e * stride), or (1, 0) without a carry."""
    if HAS:
        return (tl.load(ptr + off, mask=okr, other=1.0), tl.load(ptr + off + stride, mask=okr, other=0.0),
                tl.load(ptr + off + 2 * stride, mask=okr, other=0.0),
                tl.load(ptr + off + 3 * stride, mask=okr, other=0.0))
    else:
        return zero + 1.0, zero, zero, zero


@triton.jit
def _leaves(a_ptr, k_ptr, kin_ptr, rows, start, t, okr, N, k_rs, zr, zi, R: tl.constexpr, T: tl.constexpr,
            HAS_STATE: tl.constexpr):
    """One coalesced read of the tile's a and k: positions n, validity, alpha = a - z, k_n (the e
    chain's coupling) and k_{n-1} (the d chain's: k_n shifted by one lane, the lane entering the
    tile one value per row; with HAS_STATE the row's first tile takes k_in (B,), the coupling from
    the carried state into position 0)."""
    n = start + t
    v = okr & (n < N)
    alr = tl.load(a_ptr + rows * N + n, mask=v, other=0.0) - zr
    ali = tl.zeros_like(alr) - zi
    kr = tl.load(k_ptr + rows * k_rs + n, mask=v & (n < N - 1), other=0.0)
    kp = tl.load(k_ptr + rows * k_rs + (start - 1), mask=okr & (rows * 0 + start >= 1), other=0.0)
    if HAS_STATE:
        kp = tl.where(rows * 0 + start >= 1, kp, tl.load(kin_ptr + rows, mask=okr & (rows * 0 + start == 0), other=0.0))
    kk = _shift1(kr, kp, R, T)
    return n, v, alr, ali, kr, kk


@triton.jit
def _rev_valid(start, t, okr, N, T: tl.constexpr):
    """Validity in reversed tile order (lane t holds position start + T - 1 - t)."""
    return okr & (start + (T - 1 - t) < N)


@triton.jit
def _load_state(st_ptr, rows, okr):
    """The carried state d_in (B, 2) as the homogeneous pivot (1, 1 / d_in) (bk_math's reciprocal:
    0 for an infinite d_in), one value per row."""
    dr = tl.load(st_ptr + rows * 2, mask=okr, other=1.0)
    di = tl.load(st_ptr + rows * 2 + 1, mask=okr, other=0.0)
    u, w = _inv_parts(dr, di)
    zero = tl.zeros_like(dr)
    return zero + 1.0, zero, u, -w


@triton.jit
def _scan_chain(piv_ptr, rows, start, okr, B, C, alr, ali, kk, v,
                REV: tl.constexpr, HAS_CARRY: tl.constexpr, T: tl.constexpr,
                HAS_STATE: tl.constexpr, st_ptr):
    """Homogeneous pivots (x, y) of the d chain, or REV the e chain (its leaves given in reversed
    tile order), from the carry entering the chunk (piv (2, 4, B, C)); a whole-row tile (no carry)
    with HAS_STATE starts the d chain from the carried state (st (B, 2))."""
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = _mob_leaf(v, alr, ali, kk)
    p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = tl.associative_scan(
        (m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i), 1, _mob_comb)
    c = start // T
    off = (REV * 4 * B + rows) * C + c
    if HAS_STATE and not HAS_CARRY and not REV:
        xr, xi, yr, yi = _load_state(st_ptr, rows, okr)
    else:
        xr, xi, yr, yi = _load_vec(piv_ptr, off, B * C, okr, HAS_CARRY, tl.zeros([rows.shape[0], 1], alr.dtype))
    return _mob_apply(p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i, xr, xi, yr, yi)


@triton.jit
def _store_last(ptr, off, stride, sel, a, b, c, d):
    tl.store(ptr + off, a, mask=sel)
    tl.store(ptr + off + stride, b, mask=sel)
    tl.store(ptr + off + 2 * stride, c, mask=sel)
    tl.store(ptr + off + 3 * stride, d, mask=sel)


@triton.jit
def _summary_dir(sum_ptr, rows, start, t, okr, B, C, alr, ali, kk, v, REV: tl.constexpr, T: tl.constexpr):
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = _mob_leaf(v, alr, ali, kk)
    p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = tl.associative_scan(
        (m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i), 1, _mob_comb)
    off = (REV * 8 * B + rows) * (C * 1) + start // T + t * 0
    BC = B * C
    last = okr & (t == T - 1)
    _store_last(sum_ptr, off, BC, last, p00r, p00i, p01r, p01i)
    _store_last(sum_ptr, off + 4 * BC, BC, last, p10r, p10i, p11r, p11i)


@triton.jit
def _pivot_summary_kernel(a_ptr, k_ptr, zri_ptr, sum_ptr, kin_ptr, B, N, C, k_rs,
                          TWO_SIDED: tl.constexpr, R: tl.constexpr, T: tl.constexpr, HAS_STATE: tl.constexpr = False):
    """sum (2, 8, B, C): each chunk's Moebius product, d chain then e chain (a and k read once);
    HAS_STATE (causal): the first chunk's coupling into position 0 is k_in (B,)."""
    rows, start, t, okr = _tile(tl.program_id(0), B, N, C, R, T)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    n, v, alr, ali, kr, kk = _leaves(a_ptr, k_ptr, kin_ptr, rows, start, t, okr, N, k_rs, zr, zi, R, T, HAS_STATE)
    _summary_dir(sum_ptr, rows, start, t, okr, B, C, alr, ali, kk, v, False, T)
    if TWO_SIDED:
        _summary_dir(sum_ptr, rows, start, t, okr, B, C, _flip(alr, R, T), ali, _flip(kr, R, T),
                     _rev_valid(start, t, okr, N, T), True, T)


@triton.jit
def _pivot_carry_kernel(sum_ptr, piv_ptr, st_ptr, B, C, CB: tl.constexpr, HAS_STATE: tl.constexpr = False):
    """piv (2, 4, B, C): the homogeneous pivot entering each chunk, from the left (d) and from the
    right (e; program_id(1) = 1), by a scan over the chunk products in blocks of CB. HAS_STATE
    (causal): the d chain starts from the carried state st (B, 2), not from a fresh start."""
    row = tl.program_id(0).to(tl.int64)
    dr = tl.program_id(1)
    BC = B * C
    j0 = tl.arange(0, CB)
    zero = tl.sum(tl.zeros([CB], sum_ptr.dtype.element_ty), 0)
    xr = zero + 1.0
    xi = zero
    yr = zero
    yi = zero
    if HAS_STATE:
        sr = tl.load(st_ptr + row * 2)
        si = tl.load(st_ptr + row * 2 + 1)
        yr, yi = _inv_parts(sr, si)
        yi = -yi
    first = tl.where(dr == 1, C - 1, 0)
    base = (dr * 4 * B + row) * C
    tl.store(piv_ptr + base + first, xr)
    tl.store(piv_ptr + base + BC + first, xi)
    tl.store(piv_ptr + base + 2 * BC + first, yr)
    tl.store(piv_ptr + base + 3 * BC + first, yi)
    for blk in range(0, C, CB):
        j = blk + j0
        ok = j < C
        idx = tl.where(dr == 1, C - 1 - j, j)
        sb = (dr * 8 * B + row) * C + idx
        m00r = tl.load(sum_ptr + sb, mask=ok, other=1.0)
        m00i = tl.load(sum_ptr + sb + BC, mask=ok, other=0.0)
        m01r = tl.load(sum_ptr + sb + 2 * BC, mask=ok, other=0.0)
        m01i = tl.load(sum_ptr + sb + 3 * BC, mask=ok, other=0.0)
        m10r = tl.load(sum_ptr + sb + 4 * BC, mask=ok, other=0.0)
        m10i = tl.load(sum_ptr + sb + 5 * BC, mask=ok, other=0.0)
        m11r = tl.load(sum_ptr + sb + 6 * BC, mask=ok, other=1.0)
        m11i = tl.load(sum_ptr + sb + 7 * BC, mask=ok, other=0.0)
        p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = tl.associative_scan(
            (m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i), 0, _mob_comb)
        vxr, vxi, vyr, vyi = _mob_apply(p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i, xr, xi, yr, yi)
        # the value after chunk j enters chunk j + 1 (in scan order)
        nxt = tl.where(dr == 1, idx - 1, idx + 1)
        okn = ok & (j + 1 < C)
        tl.store(piv_ptr + base + nxt, vxr, mask=okn)
        tl.store(piv_ptr + base + BC + nxt, vxi, mask=okn)
        tl.store(piv_ptr + base + 2 * BC + nxt, vyr, mask=okn)
        tl.store(piv_ptr + base + 3 * BC + nxt, vyi, mask=okn)
        lastj = tl.minimum(blk + CB, C) - 1
        sel = j == lastj
        xr = tl.sum(tl.where(sel, vxr, 0.0), 0)
        xi = tl.sum(tl.where(sel, vxi, 0.0), 0)
        yr = tl.sum(tl.where(sel, vyr, 0.0), 0)
        yi = tl.sum(tl.where(sel, vyi, 0.0), 0)


@triton.jit
def _lin_carry_kernel(sum_ptr, cin_ptr, B, C, CB: tl.constexpr):
    """cin (D, 2, B, C): the value of linear recurrence D entering each chunk (0 entering the first
    in its direction), from the chunk summaries sum (D, 4, B, C) (c product, local value).
    Direction 0 (R or mu) runs right to left, direction 1 (L) left to right."""
    row = tl.program_id(0).to(tl.int64)
    dr = tl.program_id(1)
    BC = B * C
    j0 = tl.arange(0, CB)
    xr = tl.sum(tl.zeros([CB], sum_ptr.dtype.element_ty), 0)
    xi = xr
    first = tl.where(dr == 0, C - 1, 0)
    base = (dr * 2 * B + row) * C
    tl.store(cin_ptr + base + first, xr)
    tl.store(cin_ptr + base + BC + first, xi)
    for blk in range(0, C, CB):
        j = blk + j0
        ok = j < C
        idx = tl.where(dr == 0, C - 1 - j, j)
        sb = (dr * 4 * B + row) * C + idx
        cr = tl.load(sum_ptr + sb, mask=ok, other=1.0)
        ci = tl.load(sum_ptr + sb + BC, mask=ok, other=0.0)
        pr = tl.load(sum_ptr + sb + 2 * BC, mask=ok, other=0.0)
        pi = tl.load(sum_ptr + sb + 3 * BC, mask=ok, other=0.0)
        cr, ci, pr, pi = tl.associative_scan((cr, ci, pr, pi), 0, _lin_comb)
        vr, vi = _cmul(cr, ci, xr, xi)
        vr += pr
        vi += pi
        nxt = tl.where(dr == 0, idx - 1, idx + 1)
        okn = ok & (j + 1 < C)
        tl.store(cin_ptr + base + nxt, vr, mask=okn)
        tl.store(cin_ptr + base + BC + nxt, vi, mask=okn)
        sel = j == tl.minimum(blk + CB, C) - 1
        xr = tl.sum(tl.where(sel, vr, 0.0), 0)
        xi = tl.sum(tl.where(sel, vi, 0.0), 0)


# ---------------------------------------------------------------------------------------------
# causal rows of C > 1 chunks: one pass with a decoupled look-back
#
# Each program takes a ticket (an atomic counter zeroed per launch), not its program_id: tickets
# are handed out in the order programs start, so every tile's predecessor in its row (ticket
# tk - B) belongs to a program that has already started, and waiting on it cannot deadlock. A
# tile publishes a descriptor: its aggregate (the chunk's map, status AGG) as soon as its scan is
# done, then its inclusive value (the chain's value leaving the chunk, status INCL) once it knows
# the value entering it. A tile walks back over its predecessors, composing their aggregates until
# it meets an inclusive value. Publishing: the values, a barrier, then the status by an atomic
# with release semantics; reading: the status by an atomic with acquire semantics, then the values
# by volatile loads. Descriptors: stat (B C,) int32 and the counter (1,) (one zeroed allocation),
# desc (B C, DW) values, indexed by ticket.

_AGG = tl.constexpr(1)
_INCL = tl.constexpr(2)
_FWD_DW = tl.constexpr(12)  # Moebius aggregate (8 reals), homogeneous pivot (x, y) (4 reals)
_BWD_DW = tl.constexpr(6)  # affine aggregate (c, p) (4 reals), mu (2 reals)
LOOK_FIRST = tl.constexpr(4)     # the look-back's first window of predecessors
LOOK_WINDOW = tl.constexpr(128)  # its later windows


@triton.jit
def _ticket(ctr_ptr, B, C, REV: tl.constexpr, T: tl.constexpr):
    """The tile of the next ticket: chunk c = tk // B (REV: C - 1 - tk // B, chunks right to left),
    row r = tk % B; the ticket, r, c, rows (1, 1) int64, chunk start, t (1, T), row validity."""
    tk = tl.atomic_add(ctr_ptr, 1)
    q = tk // B
    r = tk - q * B
    if REV:
        c = C - 1 - q
    else:
        c = q
    rows = tl.zeros([1, 1], tl.int64) + r
    return tk, r, c, rows, (c * T).to(tl.int64), tl.arange(0, T)[None, :], rows < B


@triton.jit
def _publish(stat_ptr, tk, status, pred):
    """The status of ticket tk's descriptor, after its values (stored before the call)."""
    tl.debug_barrier()
    tl.atomic_xchg(stat_ptr + tk, status, mask=pred, sem="release")


@triton.jit
def _mob_comb_rev(a00r, a00i, a01r, a01i, a10r, a10i, a11r, a11i,
                  b00r, b00i, b01r, b01i, b10r, b10i, b11r, b11i):
    """A B (B applied first): the scan combine over a window of predecessors, nearest first."""
    return _mob_comb(b00r, b00i, b01r, b01i, b10r, b10i, b11r, b11i,
                     a00r, a00i, a01r, a01i, a10r, a10i, a11r, a11i)


@triton.jit
def _lin_comb_rev(c1r, c1i, x1r, x1i, c2r, c2i, x2r, x2i):
    """The affine maps' combine with 2 applied first (a window of predecessors, nearest first)."""
    return _lin_comb(c2r, c2i, x2r, x2i, c1r, c1i, x1r, x1i)


@triton.jit
def _last(x, idx, W: tl.constexpr):
    """Lane W - 1 of a window vector, as a scalar."""
    return tl.sum(tl.where(idx == W - 1, x, 0.0), 0)


@triton.jit
def _at(x, idx, f):
    """Lane f of a window vector (0 when f is past the window), as a scalar."""
    return tl.sum(tl.where(idx == f, x, 0.0), 0)


@triton.jit
def _window_status(stat_ptr, tk, B, base, W: tl.constexpr):
    """The statuses of ticket tk's predecessors at distances base + 1 .. base + W in its row (one
    lane each, read with acquire semantics, spinning while any is empty; lanes past the row's first
    chunk read as inclusive: that chunk is always inclusive), their descriptor rows j, the lane
    indices, which lanes exist, and the nearest inclusive lane f (a scalar)."""
    idx = tl.arange(0, W)
    d = base + idx + 1
    valid = d <= tk // B
    j = tk - d * B
    zero = tl.zeros([W], tl.int32)
    s = tl.atomic_add(stat_ptr + j, zero, mask=valid, sem="acquire")
    s = tl.where(valid, s, _INCL)
    while tl.sum((s == 0).to(tl.int32), 0) > 0:
        wait = s == 0
        s2 = tl.atomic_add(stat_ptr + j, zero, mask=wait, sem="acquire")
        s = tl.where(wait, s2, s)
    f = tl.min(tl.where(s == _INCL, idx, W), 0)
    return j, idx, valid, f


@triton.jit
def _window_mob(stat_ptr, desc_ptr, tk, B, base, W: tl.constexpr):
    """One window of the Moebius walk: (found, the product M_0 ... M_{f-1} of the aggregates before
    the nearest inclusive lane f (M_0 the nearest, applied last), and that lane's inclusive value
    (x, y), or (1, 0) when no lane is inclusive)."""
    j, idx, valid, f = _window_status(stat_ptr, tk, B, base, W)
    use = (idx < f) & valid
    o = desc_ptr + j * _FWD_DW
    p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = tl.associative_scan(
        (tl.load(o, mask=use, other=1.0, volatile=True), tl.load(o + 1, mask=use, other=0.0, volatile=True),
         tl.load(o + 2, mask=use, other=0.0, volatile=True), tl.load(o + 3, mask=use, other=0.0, volatile=True),
         tl.load(o + 4, mask=use, other=0.0, volatile=True), tl.load(o + 5, mask=use, other=0.0, volatile=True),
         tl.load(o + 6, mask=use, other=1.0, volatile=True), tl.load(o + 7, mask=use, other=0.0, volatile=True)),
        0, _mob_comb_rev)
    inc = (idx == f) & valid
    found = f < W
    vxr = tl.where(found, _at(tl.load(o + 8, mask=inc, other=0.0, volatile=True), idx, f), 1.0)
    vxi = _at(tl.load(o + 9, mask=inc, other=0.0, volatile=True), idx, f)
    vyr = _at(tl.load(o + 10, mask=inc, other=0.0, volatile=True), idx, f)
    vyi = _at(tl.load(o + 11, mask=inc, other=0.0, volatile=True), idx, f)
    return (found, _last(p00r, idx, W), _last(p00i, idx, W), _last(p01r, idx, W), _last(p01i, idx, W),
            _last(p10r, idx, W), _last(p10i, idx, W), _last(p11r, idx, W), _last(p11i, idx, W), vxr, vxi, vyr, vyi)


@triton.jit
def _walk_mob(stat_ptr, desc_ptr, tk, B, one):
    """The homogeneous pivot (x, y) entering ticket tk's chunk, from the descriptors of its
    predecessors tk - B, tk - 2B, ... (Moebius maps; _FWD_DW reals each), in windows: 4, then
    LOOK_WINDOW at a time. A window's statuses are read together (waiting while any is empty), its
    aggregates up to the nearest inclusive value composed by a scan; the running product of the
    windows is applied to that value. Not to be called for a row's first chunk (no predecessor)."""
    found, w00r, w00i, w01r, w01i, w10r, w10i, w11r, w11i, xr, xi, yr, yi = _window_mob(
        stat_ptr, desc_ptr, tk, B, 0, LOOK_FIRST)
    # the running product (windows nearer applied last): R <- R W
    r00r, r00i, r01r, r01i, r10r, r10i, r11r, r11i = w00r, w00i, w01r, w01i, w10r, w10i, w11r, w11i
    base = tk * 0 + LOOK_FIRST
    while not found:
        found, w00r, w00i, w01r, w01i, w10r, w10i, w11r, w11i, xr, xi, yr, yi = _window_mob(
            stat_ptr, desc_ptr, tk, B, base, LOOK_WINDOW)
        r00r, r00i, r01r, r01i, r10r, r10i, r11r, r11i = _mob_comb(
            w00r, w00i, w01r, w01i, w10r, w10i, w11r, w11i, r00r, r00i, r01r, r01i, r10r, r10i, r11r, r11i)
        base += LOOK_WINDOW
    return _mob_apply(r00r, r00i, r01r, r01i, r10r, r10i, r11r, r11i, xr * one, xi * one, yr * one, yi * one)


@triton.jit
def _window_lin(stat_ptr, desc_ptr, tk, B, base, W: tl.constexpr):
    """One window of the affine walk: (found, the composite (c, p) of the aggregates before the
    nearest inclusive lane (the nearest applied last), and that lane's inclusive value, or 0)."""
    j, idx, valid, f = _window_status(stat_ptr, tk, B, base, W)
    use = (idx < f) & valid
    o = desc_ptr + j * _BWD_DW
    cr, ci, pr, pi = tl.associative_scan(
        (tl.load(o, mask=use, other=1.0, volatile=True), tl.load(o + 1, mask=use, other=0.0, volatile=True),
         tl.load(o + 2, mask=use, other=0.0, volatile=True), tl.load(o + 3, mask=use, other=0.0, volatile=True)),
        0, _lin_comb_rev)
    inc = (idx == f) & valid
    vr = _at(tl.load(o + 4, mask=inc, other=0.0, volatile=True), idx, f)
    vi = _at(tl.load(o + 5, mask=inc, other=0.0, volatile=True), idx, f)
    return f < W, _last(cr, idx, W), _last(ci, idx, W), _last(pr, idx, W), _last(pi, idx, W), vr, vi


@triton.jit
def _walk_lin(stat_ptr, desc_ptr, tk, B, one):
    """The value of an affine recurrence x -> c x + p entering ticket tk's chunk, from the
    descriptors of its predecessors tk - B, tk - 2B, ... (_BWD_DW reals each: c, p; then the
    inclusive value), in windows as ``_walk_mob``."""
    found, rcr, rci, rpr, rpi, vr, vi = _window_lin(stat_ptr, desc_ptr, tk, B, 0, LOOK_FIRST)
    base = tk * 0 + LOOK_FIRST
    while not found:
        found, wcr, wci, wpr, wpi, vr, vi = _window_lin(stat_ptr, desc_ptr, tk, B, base, LOOK_WINDOW)
        rcr, rci, rpr, rpi = _lin_comb(wcr, wci, wpr, wpi, rcr, rci, rpr, rpi)
        base += LOOK_WINDOW
    xr, xi = _cmul(rcr, rci, vr, vi)
    return (xr + rpr) * one, (xi + rpi) * one


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(a_ptr, k_ptr, zri_ptr, mask_ptr, piv_ptr, out_ptr, st_ptr, kin_ptr, B, N, C, k_rs,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CARRY: tl.constexpr,
                R: tl.constexpr, T: tl.constexpr, HAS_STATE: tl.constexpr = False):
    """out (B, N, 2): G (or 1/d when causal), times the mask where it is nonzero (0 where it is 0).
    HAS_STATE (causal): each row continues the carried state (st (B, 2) complex, kin (B,))."""
    rows, start, t, okr = _tile(tl.program_id(0), B, N, C, R, T)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    n, v, alr, ali, kr, kk = _leaves(a_ptr, k_ptr, kin_ptr, rows, start, t, okr, N, k_rs, zr, zi, R, T, HAS_STATE)
    xd, xdi, yd, ydi = _scan_chain(piv_ptr, rows, start, okr, B, C, alr, ali, kk, v, False, HAS_CARRY, T,
                                    HAS_STATE, st_ptr)
    if CAUSAL:
        # y = 1 / d = y_h / x_h
        gr, gi = _cdiv(yd, ydi, xd, xdi)
    else:
        xe, xei, ye, yei = _scan_chain(piv_ptr, rows, start, okr, B, C, _flip(alr, R, T), ali, _flip(kr, R, T),
                                       _rev_valid(start, t, okr, N, T), True, HAS_CARRY, T, False, st_ptr)
        xe = _flip(xe, R, T)
        xei = _flip(xei, R, T)
        ye = _flip(ye, R, T)
        yei = _flip(yei, R, T)
        # G = 1 / (d + e - alpha) = yd ye / (xd ye + xe yd - alpha yd ye)
        numr, numi = _cmul(yd, ydi, ye, yei)
        t1r, t1i = _cmul(xd, xdi, ye, yei)
        t2r, t2i = _cmul(xe, xei, yd, ydi)
        t3r, t3i = _cmul(alr, ali, numr, numi)
        gr, gi = _cdiv(numr, numi, t1r + t2r - t3r, t1i + t2i - t3i)
    if HAS_MASK:
        mk = tl.load(mask_ptr + rows * N + n, mask=v, other=0.0)
        gr = tl.where(mk != 0.0, gr * mk, 0.0)
        gi = tl.where(mk != 0.0, gi * mk, 0.0)
    # (re, im) interleaved: one store of (R, T, 2) consecutive reals (coalesced), not two of stride 2
    _store_complex(out_ptr, rows * N + n, gr, gi, v)


@triton.jit
def _fwd_lookback_kernel(a_ptr, k_ptr, zri_ptr, mask_ptr, out_ptr, piv_ptr, st_ptr, kin_ptr, stat_ptr, ctr_ptr,
                         desc_ptr, B, N, C, k_rs, HAS_MASK: tl.constexpr, CARRIES: tl.constexpr, T: tl.constexpr,
                         HAS_STATE: tl.constexpr = False):
    """Causal rows of C > 1 chunks (one row per tile) in one pass: a and k read once, the pivot
    entering each chunk by a decoupled look-back (see above), then out (B, N, 2) = 1/d, times the
    mask where it is nonzero (0 where it is 0). CARRIES: no output; the homogeneous pivot entering
    each chunk goes to piv (4, B, C) (the backward's carries). HAS_STATE: each row continues the
    carried state (st (B, 2) complex, kin (B,))."""
    tk, r, c, rows, start, t, okr = _ticket(ctr_ptr, B, C, False, T)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    n, v, alr, ali, kr, kk = _leaves(a_ptr, k_ptr, kin_ptr, rows, start, t, okr, N, k_rs, zr, zi, 1, T, HAS_STATE)
    m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i = _mob_leaf(v, alr, ali, kk)
    p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = tl.associative_scan(
        (m00r, m00i, m01r, m01i, m10r, m10i, m11r, m11i), 1, _mob_comb)
    # the aggregate: the chunk's product (a row's first chunk publishes its inclusive value only)
    last = okr & (t == T - 1)
    off = tk * _FWD_DW + t * 0
    # (the chunk index as a tensor of the lanes' shape: the interpreter's `&` of a block and a scalar
    # is not a boolean)
    agg = last & (t * 0 + c > 0)
    _store_last(desc_ptr, off, 1, agg, p00r, p00i, p01r, p01i)
    _store_last(desc_ptr, off + 4, 1, agg, p10r, p10i, p11r, p11i)
    _publish(stat_ptr, tk, _AGG, c > 0)
    # the pivot entering the chunk: the row start (1, 0), or (1, 1 / d_in) with a carried state, for
    # the first chunk; the look-back for the others
    zero = tl.zeros([1, 1], alr.dtype)
    if HAS_STATE:
        sxr, sxi, syr, syi = _load_state(st_ptr, rows, okr & (rows * 0 + c == 0))
    else:
        sxr, sxi, syr, syi = zero + 1.0, zero, zero, zero
    wxr, wxi, wyr, wyi = _walk_mob(stat_ptr, desc_ptr, tk, B, tl.full([], 1.0, alr.dtype))
    first = c == 0
    xr = tl.where(first, sxr, wxr)
    xi = tl.where(first, sxi, wxi)
    yr = tl.where(first, syr, wyr)
    yi = tl.where(first, syi, wyi)
    xd, xdi, yd, ydi = _mob_apply(p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i, xr, xi, yr, yi)
    # the inclusive value: the pivot leaving the chunk
    _store_last(desc_ptr, off + 8, 1, last, xd, xdi, yd, ydi)
    _publish(stat_ptr, tk, _INCL, tk >= 0)
    if CARRIES:
        BC = B * C
        _store_last(piv_ptr, rows * C + c, BC, okr, xr, xi, yr, yi)
    else:
        # y = 1 / d = y_h / x_h
        gr, gi = _cdiv(yd, ydi, xd, xdi)
        if HAS_MASK:
            mk = tl.load(mask_ptr + rows * N + n, mask=v, other=0.0)
            gr = tl.where(mk != 0.0, gr * mk, 0.0)
            gi = tl.where(mk != 0.0, gi * mk, 0.0)
        _store_complex(out_ptr, rows * N + n, gr, gi, v)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_kernel(g_ptr, a_ptr, k_ptr, zri_ptr, mask_ptr, piv_ptr, lsum_ptr, cin_ptr,
                ga_ptr, gk_ptr, gz_ptr, gmask_ptr, st_ptr, kin_ptr, mu0_ptr, stat_ptr, ctr_ptr, desc_ptr, B, N, C, k_rs,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, NEED_GMASK: tl.constexpr,
                HAS_CARRY: tl.constexpr, SUMMARY: tl.constexpr, R: tl.constexpr, T: tl.constexpr,
                NEED_GK: tl.constexpr = True, HAS_STATE: tl.constexpr = False, LOOK: tl.constexpr = False):
    """SUMMARY: the chunk summaries (c product, local value) of the gradient recurrences into lsum
    (D, 4, B, C) (direction 0: R or mu, right to left; 1: L). Otherwise, from the values entering the
    chunk (cin (D, 2, B, C); causal rows of C > 1 chunks with LOOK: mu by a reverse look-back over the
    chunks to the right, the tiles taken by ticket, right to left): grad_a
    (B, N), per-row grad_k (B, N-1) when NEED_GK, per-tile partial sums gz (2, programs) of A
    (two-sided) or mu (causal), grad_mask (B, N). The d chain starts from piv (the homogeneous
    pivot entering each chunk). HAS_STATE (causal): rows continue the carried state (st (B, 2),
    kin (B,)) and mu at position 0 goes to mu0 (B, 2)."""
    if CAUSAL and HAS_CARRY and LOOK:
        tk, r, c, rows, start, t, okr = _ticket(ctr_ptr, B, C, True, T)
        pid = r * C + c
    else:
        pid = tl.program_id(0)
        rows, start, t, okr = _tile(pid, B, N, C, R, T)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    c = start // T
    BC = B * C
    n, v, alr, ali, kr, kk = _leaves(a_ptr, k_ptr, kin_ptr, rows, start, t, okr, N, k_rs, zr, zi, R, T, HAS_STATE)
    xd, xdi, yd, ydi = _scan_chain(piv_ptr, rows, start, okr, B, C, alr, ali, kk, v, False, HAS_CARRY, T,
                                    HAS_STATE, st_ptr)
    gr, gi = _load_complex(g_ptr, rows * N + n, v)
    wr = gr
    wi = -gi
    if HAS_MASK:
        mk = tl.load(mask_ptr + rows * N + n, mask=v, other=0.0)
        wr = wr * mk
        wi = wi * mk
        live = v & (mk != 0.0)
    else:
        live = v
    # 1 / d
    idr, idi = _cdiv(yd, ydi, xd, xdi)
    id2r, id2i = _cmul(idr, idi, idr, idi)
    # kr: the coupling to the right, k_n; kk: k_{n-1}
    last = okr & (t == T - 1)
    if CAUSAL:
        if NEED_GMASK:
            tl.store(gmask_ptr + rows * N + n, idr * gr + idi * gi, mask=v)
        # mu_j = (k_j / d_j^2) mu_{j+1} - w_j / d_j^2, right to left: scanned in reversed tile order
        pr, pi = _cmul(wr, wi, id2r, id2i)
        pr = tl.where(live, -pr, 0.0)
        pi = tl.where(live, -pi, 0.0)
        ccr = _flip(tl.where(v, kr * id2r, 1.0), R, T)
        cci = _flip(tl.where(v, kr * id2i, 0.0), R, T)
        pr = _flip(pr, R, T)
        pi = _flip(pi, R, T)
        ccr, cci, pr, pi = tl.associative_scan((ccr, cci, pr, pi), 1, _lin_comb)
        if SUMMARY:
            _store_last(lsum_ptr, (0 * 4 * B + rows) * C + c + t * 0, BC, last, ccr, cci, pr, pi)
        else:
            mir = tl.zeros([R, 1], alr.dtype)
            mii = mir
            if HAS_CARRY and not LOOK:
                mir = tl.load(cin_ptr + (0 * 2 * B + rows) * C + c, mask=okr, other=0.0)
                mii = tl.load(cin_ptr + (0 * 2 * B + rows) * C + c + BC, mask=okr, other=0.0)
            if HAS_CARRY and LOOK:
                # the chunk's map (reversed lane T - 1) as its aggregate (a row's last chunk, the first
                # in this order, publishes its inclusive value only), then mu entering from the right
                off = tk * _BWD_DW + t * 0
                _store_last(desc_ptr, off, 1, last & (t * 0 + c < C - 1), ccr, cci, pr, pi)
                _publish(stat_ptr, tk, _AGG, c < C - 1)
                wmr, wmi = _walk_lin(stat_ptr, desc_ptr, tk, B, tl.full([], 1.0, alr.dtype))
                mir += wmr
                mii += wmi
            mur, mui = _cmul(ccr, cci, mir, mii)
            mur += pr
            mui += pi
            if HAS_CARRY and LOOK:
                # the inclusive value: mu at the chunk's first position
                tl.store(desc_ptr + off + 4, mur, mask=last)
                tl.store(desc_ptr + off + 5, mui, mask=last)
                _publish(stat_ptr, tk, _INCL, tk >= 0)
            # reversed tile order from here: n, 1/d, validity reversed
            nrv = start + (T - 1 - t)
            vr_ = okr & (nrv < N)
            nxr = _shift1(mur, mir, R, T)   # mu_{j+1}
            nxi = _shift1(mui, mii, R, T)
            fdr = _flip(idr, R, T)
            fdi = _flip(idi, R, T)
            if NEED_GK:
                gkr, _ = _cmul(nxr, nxi, fdr, fdi)
                tl.store(gk_ptr + rows * (N - 1) + nrv, -gkr, mask=vr_ & (nrv < N - 1))
            tl.store(ga_ptr + rows * N + nrv, mur, mask=vr_)
            if HAS_STATE:
                # mu_0, the adjoint of the carried state's pivot step (conj of the gradient reaching d_0)
                tl.store(mu0_ptr + rows * 2 + nrv * 0, mur, mask=vr_ & (nrv == 0))
                tl.store(mu0_ptr + rows * 2 + 1 + nrv * 0, mui, mask=vr_ & (nrv == 0))
            sr = tl.sum(tl.sum(tl.where(vr_, mur, 0.0), 1), 0)
            si = tl.sum(tl.sum(tl.where(vr_, mui, 0.0), 1), 0)
            tl.store(gz_ptr + pid, sr)
            tl.store(gz_ptr + tl.num_programs(0) + pid, si)
    else:
        xe, xei, ye, yei = _scan_chain(piv_ptr, rows, start, okr, B, C, _flip(alr, R, T), ali, _flip(kr, R, T),
                                       _rev_valid(start, t, okr, N, T), True, HAS_CARRY, T, False, st_ptr)
        xe = _flip(xe, R, T)
        xei = _flip(xei, R, T)
        ye = _flip(ye, R, T)
        yei = _flip(yei, R, T)
        ier, iei = _cdiv(ye, yei, xe, xei)
        # G = 1 / (d_j - k_j / e_{j+1}) = yd / (xd - k_j yd / e_{j+1}), as the C++ backward forms it:
        # an infinite pivot d_j (yd = 0) gives G = 0, the limit, where d + e - alpha is inf - inf
        if HAS_CARRY:
            ecr = tl.load(piv_ptr + (4 * B + rows) * C + c, mask=okr, other=1.0)
            eci = tl.load(piv_ptr + (4 * B + rows) * C + c + BC, mask=okr, other=0.0)
            eyr = tl.load(piv_ptr + (4 * B + rows) * C + c + 2 * BC, mask=okr, other=0.0)
            eyi = tl.load(piv_ptr + (4 * B + rows) * C + c + 3 * BC, mask=okr, other=0.0)
            nir, nii = _cdiv(eyr, eyi, ecr, eci)
        else:
            nir = tl.zeros([R, 1], alr.dtype)
            nii = nir
        t1r, t1i = _cmul(_shift_next(ier, nir, R, T), _shift_next(iei, nii, R, T), yd, ydi)
        Gr, Gi = _cdiv(yd, ydi, xd - kr * t1r, xdi - kr * t1i)
        if NEED_GMASK:
            tl.store(gmask_ptr + rows * N + n, Gr * gr + Gi * gi, mask=v)
        G2r, G2i = _cmul(Gr, Gi, Gr, Gi)
        pr, pi = _cmul(wr, wi, G2r, G2i)
        pr = tl.where(live, pr, 0.0)
        pi = tl.where(live, pi, 0.0)
        ie2r, ie2i = _cmul(ier, iei, ier, iei)
        # L_j = (k_{j-1} / e_j^2) L_{j-1} + p_j, left to right (kk = k_{n-1})
        lcr, lci, lxr, lxi = tl.associative_scan(
            (tl.where(v, kk * ie2r, 1.0), tl.where(v, kk * ie2i, 0.0), pr, pi), 1, _lin_comb)
        # R_j = (k_j / d_j^2) R_{j+1} + p_j, right to left (reversed tile order)
        rcr, rci, rxr, rxi = tl.associative_scan(
            (_flip(tl.where(v, kr * id2r, 1.0), R, T), _flip(tl.where(v, kr * id2i, 0.0), R, T),
             _flip(pr, R, T), _flip(pi, R, T)), 1, _lin_comb)
        if SUMMARY:
            _store_last(lsum_ptr, (0 * 4 * B + rows) * C + c + t * 0, BC, last, rcr, rci, rxr, rxi)
            _store_last(lsum_ptr, (1 * 4 * B + rows) * C + c + t * 0, BC, last, lcr, lci, lxr, lxi)
        else:
            if HAS_CARRY:
                rir = tl.load(cin_ptr + (0 * 2 * B + rows) * C + c, mask=okr, other=0.0)
                rii = tl.load(cin_ptr + (0 * 2 * B + rows) * C + c + BC, mask=okr, other=0.0)
                lir = tl.load(cin_ptr + (1 * 2 * B + rows) * C + c, mask=okr, other=0.0)
                lii = tl.load(cin_ptr + (1 * 2 * B + rows) * C + c + BC, mask=okr, other=0.0)
                # 1 / d_{start-1}: the homogeneous d entering the chunk
                dxr = tl.load(piv_ptr + (rows) * C + c, mask=okr, other=1.0)
                dxi = tl.load(piv_ptr + (rows) * C + c + BC, mask=okr, other=0.0)
                dyr = tl.load(piv_ptr + (rows) * C + c + 2 * BC, mask=okr, other=0.0)
                dyi = tl.load(piv_ptr + (rows) * C + c + 3 * BC, mask=okr, other=0.0)
                pdr, pdi = _cdiv(dyr, dyi, dxr, dxi)
            else:
                rir = tl.zeros([R, 1], alr.dtype)
                rii = rir
                lir = rir
                lii = rir
                pdr = rir
                pdi = rir
            Rr, Ri = _cmul(rcr, rci, rir, rii)
            Rr = _flip(Rr + rxr, R, T)
            Ri = _flip(Ri + rxi, R, T)
            Lr, Li = _cmul(lcr, lci, lir, lii)
            Lr += lxr
            Li += lxi
            Ar = Lr + Rr - pr
            Ai = Li + Ri - pi
            tl.store(ga_ptr + rows * N + n, -Ar, mask=v)
            # grad k_{j-1} = Re(L_{j-1} / e_j + R_j / d_{j-1}), written at j
            if NEED_GK:
                plr = _shift1(Lr, lir, R, T)
                pli = _shift1(Li, lii, R, T)
                pdr = _shift1(idr, pdr, R, T)
                pdi = _shift1(idi, pdi, R, T)
                u1, _ = _cmul(plr, pli, ier, iei)
                u2, _ = _cmul(Rr, Ri, pdr, pdi)
                tl.store(gk_ptr + rows * (N - 1) + n - 1, u1 + u2, mask=v & (n >= 1))
            sr = tl.sum(tl.sum(tl.where(v, Ar, 0.0), 1), 0)
            si = tl.sum(tl.sum(tl.where(v, Ai, 0.0), 1), 0)
            tl.store(gz_ptr + pid, sr)
            tl.store(gz_ptr + tl.num_programs(0) + pid, si)


# ---------------------------------------------------------------------------------------------
# host side


def _is_interpreted_fn(fn) -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - every triton with an interpreter has it
        return False
    return isinstance(fn, InterpretedFunction)


def is_interpreted() -> bool:
    """True when these kernels were created by Triton's interpreter (TRITON_INTERPRET=1 at import):
    they then run on CPU tensors and cannot run on CUDA ones, and vice versa."""
    return _is_interpreted_fn(_fwd_kernel)


INTERPRETED = is_interpreted()
# The interpreter also needs triton's own @jit library functions (tl.zeros, tl.sum, ...) to be
# interpreted, which is decided when triton itself is first imported.
INTERPRETER_PROBLEM = None
if INTERPRETED and not _is_interpreted_fn(tl.zeros):
    INTERPRETER_PROBLEM = ("triton was imported before TRITON_INTERPRET=1 was set, so its library "
                           "functions are compiled-mode; set TRITON_INTERPRET=1 before importing "
                           "resnet_bk or triton")


def _pos_pow2(value, src: str) -> int:
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            raise ValueError(f"{src}: expected a power of two, got {value!r}") from None
    if not isinstance(value, int) or value < 1 or value & (value - 1):
        raise ValueError(f"{src}: expected a power of two, got {value!r}")
    return value


def _resolve(B: int, N: int, tile: Optional[int], carry_block: Optional[int], sms: Optional[int] = None) -> Plan:
    src = "tile="
    if tile is None and _ENV_TILE_VALUE:
        tile, src = _ENV_TILE_VALUE, ENV_TILE
    if tile is not None:
        tile = _pos_pow2(tile, src)
    if carry_block is not None:
        carry_block = _pos_pow2(carry_block, "carry_block=")
    return plan(B, N, tile, carry_block, sms)


def _check(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor]) -> None:
    if a.dim() != 2 or a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"a: expected a (B, N) float32/float64 tensor, got {tuple(a.shape)} {a.dtype}")
    B, N = a.shape
    if k.dim() != 2 or k.shape[1] != N - 1 or k.shape[0] not in (1, B) or k.dtype != a.dtype:
        raise ValueError(f"k: expected ({B} or 1, {N - 1}) {a.dtype}, got {tuple(k.shape)} {k.dtype}")
    if tuple(zri.shape) != (2,) or zri.dtype != a.dtype:
        raise ValueError(f"zri: expected (2,) {a.dtype}, got {tuple(zri.shape)} {zri.dtype}")
    if mask is not None and (tuple(mask.shape) != (B, N) or mask.dtype != a.dtype):
        raise ValueError(f"mask: expected ({B}, {N}) {a.dtype}, got {tuple(mask.shape)} {mask.dtype}")
    for name, t in (("k", k), ("zri", zri), ("mask", mask)):
        if t is not None and t.device != a.device:
            raise RuntimeError(f"{name}: expected a tensor on {a.device} (the device of a), got {t.device}")


def _check_state(a: Tensor, causal: bool, d_in: Optional[Tensor], k_in: Optional[Tensor]):
    """A carried state -> (d_in as a (B, 2) real view, k_in (B,)), contiguous; (None, None) without."""
    if (d_in is None) != (k_in is None):
        missing = "k_in" if k_in is None else "d_in"
        raise ValueError(f"{missing}: expected d_in and k_in both or neither, got only "
                         f"{'d_in' if k_in is None else 'k_in'}")
    if d_in is None:
        return None, None
    if not causal:
        raise ValueError("d_in: a carried state is defined for the causal op only, got causal=False")
    B = a.shape[0]
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    if not isinstance(d_in, Tensor) or tuple(d_in.shape) != (B,) or d_in.dtype != cdt:
        got = f"{tuple(d_in.shape)} {d_in.dtype}" if isinstance(d_in, Tensor) else type(d_in).__name__
        raise ValueError(f"d_in: expected a ({B},) {cdt} tensor, got {got}")
    if not isinstance(k_in, Tensor) or tuple(k_in.shape) != (B,) or k_in.dtype != a.dtype:
        got = f"{tuple(k_in.shape)} {k_in.dtype}" if isinstance(k_in, Tensor) else type(k_in).__name__
        raise ValueError(f"k_in: expected a ({B},) {a.dtype} tensor, got {got}")
    for name, t in (("d_in", d_in), ("k_in", k_in)):
        if t.device != a.device:
            raise RuntimeError(f"{name}: expected a tensor on {a.device} (the device of a), got {t.device}")
    return torch.view_as_real(d_in.resolve_conj().contiguous()), k_in.contiguous()


def _launch(kernel, grid, *args, **meta):
    # Launched eagerly: the op layer registers these entry points as custom ops with fake kernels.
    return kernel[grid](*args, **meta)


def _pivot_carries(a, k, zri, p: Plan, k_rs, two_sided, st=None, kin=None):
    B, N = a.shape
    has_state = st is not None
    summ = torch.empty(2, 8, B, p.C, dtype=a.dtype, device=a.device)
    _launch(_pivot_summary_kernel, (p.programs,), a, k, zri, summ, kin if has_state else a, B, N, p.C, k_rs,
            TWO_SIDED=two_sided, R=p.R, T=p.T, HAS_STATE=has_state, num_warps=NUM_WARPS)
    piv = torch.empty(2, 4, B, p.C, dtype=a.dtype, device=a.device)
    _launch(_pivot_carry_kernel, (B, 2 if two_sided else 1), summ, piv, st if has_state else a, B, p.C,
            CB=p.carry_block, HAS_STATE=has_state, num_warps=NUM_WARPS)
    return piv


def _use_lookback(causal: bool, p: Plan) -> bool:
    """Causal rows of several chunks take the look-back, except under
    torch.use_deterministic_algorithms (then the carry kernels: a fixed order of operations)."""
    return causal and p.C > 1 and not torch.are_deterministic_algorithms_enabled()


def _lookback_ws(B: int, C: int, dw: int, dtype, device):
    """A look-back launch's descriptors: status (B C,) int32 and the ticket counter (1,), one
    zeroed allocation (programs may start in any order), and desc (B C, dw) values."""
    z = torch.zeros(B * C + 1, dtype=torch.int32, device=device)
    return z[:B * C], z[B * C:], torch.empty(B * C, dw, dtype=dtype, device=device)


def _causal_carries(a, k, zri, p: Plan, k_rs, st=None, kin=None):
    """piv (4, B, C): the homogeneous pivot entering each chunk of a causal row (one look-back pass)."""
    B, N = a.shape
    has_state = st is not None
    piv = torch.empty(4, B, p.C, dtype=a.dtype, device=a.device)
    stat, ctr, desc = _lookback_ws(B, p.C, _FWD_DW.value, a.dtype, a.device)
    _launch(_fwd_lookback_kernel, (B * p.C,), a, k, zri, a, a, piv, st if has_state else a,
            kin if has_state else a, stat, ctr, desc, B, N, p.C, k_rs, HAS_MASK=False, CARRIES=True, T=p.T,
            HAS_STATE=has_state, num_warps=NUM_WARPS)
    return piv


def bk_core_fwd(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool, *,
                tile: Optional[int] = None, carry_block: Optional[int] = None, sms: Optional[int] = None,
                d_in: Optional[Tensor] = None, k_in: Optional[Tensor] = None) -> Tensor:
    """Forward on canonical arguments: (B, N) complex G (or 1/d when causal), times mask.

    ``d_in`` (B,) complex, ``k_in`` (B,) real (causal only, both or neither): a carried state, the
    pivot of the position before each row and its coupling into position 0, so that
    d_0 = (a_0 - z) - k_in / d_in (the CPU/CUDA ``bk_core_fwd_state``).

    ``tile``: positions per tile (a power of two; None: ``plan`` or RESNET_BK_TRITON_TILE);
    ``carry_block``: chunks per step of the carry kernel (a power of two; None: CARRY_BLOCK);
    ``sms``: the SM count ``plan`` assumes (None: SM_COUNT; tests only).
    """
    _check(a, k, zri, mask)
    st, kin = _check_state(a, causal, d_in, k_in)
    a, k, zri = a.contiguous(), k.contiguous(), zri.contiguous()
    mask = None if mask is None else mask.contiguous()
    B, N = a.shape
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    out = torch.empty(B, N, dtype=cdt, device=a.device)
    if B == 0 or N == 0:
        return out
    p = _resolve(B, N, tile, carry_block, sms)
    k_rs = 0 if k.shape[0] == 1 else N - 1
    has_state = st is not None
    if _use_lookback(causal, p):
        # one pass: the carries by a decoupled look-back inside the tile kernel (one row per tile)
        stat, ctr, desc = _lookback_ws(B, p.C, _FWD_DW.value, a.dtype, a.device)
        _launch(_fwd_lookback_kernel, (B * p.C,), a, k, zri, a if mask is None else mask, torch.view_as_real(out),
                a, st if has_state else a, kin if has_state else a, stat, ctr, desc, B, N, p.C, k_rs,
                HAS_MASK=mask is not None, CARRIES=False, T=p.T, HAS_STATE=has_state, num_warps=NUM_WARPS)
        return out
    piv = _pivot_carries(a, k, zri, p, k_rs, not causal, st, kin) if p.C > 1 else a
    _launch(_fwd_kernel, (p.programs,), a, k, zri, a if mask is None else mask, piv,
            torch.view_as_real(out), st if has_state else a, kin if has_state else a, B, N, p.C, k_rs,
            CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_CARRY=p.C > 1, R=p.R, T=p.T,
            HAS_STATE=has_state, num_warps=NUM_WARPS)
    return out


def bk_core_bwd(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool,
                need_mask_grad: bool = True, need_k_grad: bool = True, *, tile: Optional[int] = None,
                carry_block: Optional[int] = None, sms: Optional[int] = None,
                d_in: Optional[Tensor] = None, k_in: Optional[Tensor] = None) -> tuple:
    """Exact backward on canonical arguments, same contract as ``bk_core_bwd_ref``:
    (grad_a (B, N), grad_k (Bk, N-1) (summed over rows when Bk == 1) or None without
    ``need_k_grad`` (then never stored), grad_zri (2,), grad_mask (B, N) or None). ``grad`` is
    PyTorch's upstream gradient of the complex output. With a carried state (``d_in``, ``k_in`` as
    in ``bk_core_fwd``) a fifth entry mu0 (B,) complex: mu at position 0, the conjugate of the
    gradient reaching d_0 (the CPU/CUDA ``bk_core_bwd_state``'s mu0)."""
    _check(a, k, zri, mask)
    st, kin = _check_state(a, causal, d_in, k_in)
    has_state = st is not None
    a, k, zri = a.contiguous(), k.contiguous(), zri.contiguous()
    mask = None if mask is None else mask.contiguous()
    B, N = a.shape
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    if tuple(grad.shape) != (B, N):
        raise ValueError(f"grad: expected shape ({B}, {N}), got {tuple(grad.shape)}")
    need_gmask = mask is not None and need_mask_grad
    if B == 0 or N == 0:
        res = (torch.zeros_like(a), torch.zeros_like(k) if need_k_grad else None, torch.zeros_like(zri),
               torch.zeros_like(mask) if need_gmask else None)
        return res + (torch.zeros(B, dtype=cdt, device=a.device),) if has_state else res
    g = torch.view_as_real(grad.to(cdt).resolve_conj().resolve_neg().contiguous())
    p = _resolve(B, N, tile, carry_block, sms)
    k_rs = 0 if k.shape[0] == 1 else N - 1
    dev, dt = a.device, a.dtype
    D = 1 if causal else 2
    mptr = a if mask is None else mask
    gmask = torch.empty(B, N, dtype=dt, device=dev) if need_gmask else a
    grad_a = torch.empty(B, N, dtype=dt, device=dev)
    gk_rows = torch.empty(B, N - 1, dtype=dt, device=dev) if need_k_grad else a
    gz = torch.empty(2, p.programs, dtype=dt, device=dev)
    meta = dict(CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_CARRY=p.C > 1, R=p.R, T=p.T,
                HAS_STATE=has_state, num_warps=NUM_WARPS)
    stp, kinp = (st, kin) if has_state else (a, a)
    mu0 = torch.empty(B, dtype=cdt, device=dev) if has_state else None
    mu0p = torch.view_as_real(mu0) if has_state else a
    stat = ctr = desc = a
    look = _use_lookback(causal, p)
    if look:
        # two passes: the pivots entering each chunk (a look-back), then the gradient tiles, mu
        # carried right to left by a reverse look-back inside the tile kernel
        piv = _causal_carries(a, k, zri, p, k_rs, st, kin)
        cin = a
        stat, ctr, desc = _lookback_ws(B, p.C, _BWD_DW.value, dt, dev)
    elif p.C > 1:
        # (causal under torch.use_deterministic_algorithms: the carry kernels, a fixed order)
        piv = _pivot_carries(a, k, zri, p, k_rs, not causal, st, kin)
        lsum = torch.empty(D, 4, B, p.C, dtype=dt, device=dev)
        _launch(_bwd_kernel, (p.programs,), g, a, k, zri, mptr, piv, lsum, a, a, a, a, a, stp, kinp, a, a, a, a,
                B, N, p.C, k_rs, NEED_GMASK=False, SUMMARY=True, **meta)
        cin = torch.empty(D, 2, B, p.C, dtype=dt, device=dev)
        _launch(_lin_carry_kernel, (B, D), lsum, cin, B, p.C, CB=p.carry_block, num_warps=NUM_WARPS)
    else:
        piv = cin = a
    _launch(_bwd_kernel, (p.programs,), g, a, k, zri, mptr, piv, a, cin, grad_a, gk_rows, gz, gmask,
            stp, kinp, mu0p, stat, ctr, desc, B, N, p.C, k_rs, NEED_GMASK=need_gmask, SUMMARY=False,
            NEED_GK=bool(need_k_grad), LOOK=look, **meta)
    grad_k = None
    if need_k_grad:
        grad_k = gk_rows.sum(0, keepdim=True) if (k.shape[0] == 1 and B != 1) else gk_rows
    tot = gz.sum(1)
    # two-sided: grad_z = conj(sum A); causal: grad_z = -conj(sum mu); zri = [Re, Im]
    grad_zri = torch.stack([tot[0], -tot[1]]) if not causal else torch.stack([-tot[0], tot[1]])
    res = (grad_a, grad_k, grad_zri, (gmask if need_gmask else None))
    return res + (mu0,) if has_state else res
