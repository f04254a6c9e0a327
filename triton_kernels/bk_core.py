"""Triton kernels for BK-Core: forward and exact backward, two-sided and causal, optional mask.

The math is shared/BK_CORE_MATH.md; the semantics to match are ``resnet_bk.ops.reference``
(``bk_core_fwd_ref`` / ``bk_core_bwd_ref``). Canonical arguments:

* ``a``    (B, N) float32/float64: the diagonal of H.
* ``k``    (Bk, N-1), Bk in {1, B}: products ``b_i c_i`` of the off-diagonals.
* ``zri``  (2,): ``[Re z, Im z]``.
* ``mask`` (B, N) or None.

Complex numbers are carried as (re, im) pairs of real tensors.

Work decomposition: every sequence is cut into ``C`` chunks of ``CH`` positions; one *segment*
is one (row, chunk) pair and one Triton lane runs one segment sequentially (a block of ``BLOCK``
segments per program). Two strategies differ only in the chunking:

* ``"lanes"``: ``C = 1`` (a segment is a whole sequence): lanes across the batch, one sequential
  loop over N, no carries.
* ``"chunked"`` (few long sequences): ``C > 1``. The pivot recurrences are Moebius maps, i.e. the
  2x2 complex matrices ``M_i = [[alpha_i, -k_{i-1}], [1, 0]]`` acting projectively on
  ``(d_{i-1}, 1)``; a first kernel forms each chunk's product (rescaled by its largest entry,
  which leaves the projective action unchanged and keeps it in range), a small carry kernel
  runs the C products per row to get the exact pivot entering each chunk, and the main kernel
  recomputes each chunk from that carry. The gradient recurrences (L, R, mu) are first-order
  linear, ``x_j = c_j x_{j-1} + p_j``; a chunk is summarised by ``(prod c, local x from 0)`` and
  combined the same way. Nothing is approximated: the carries are the exact values (up to
  rounding) that the sequential recursion would reach.

Intermediate values (d, e, p, R) live in scratch buffers laid out (CH, S) with S = B * C, so that
the lanes of one program touch consecutive addresses at each step.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["choose_strategy", "chunk_size", "bk_core_fwd", "bk_core_bwd", "STRATEGIES",
           "ENV_STRATEGY", "ENV_CHUNK", "is_interpreted"]

STRATEGIES = ("lanes", "chunked")
ENV_STRATEGY = "RESNET_BK_TRITON_STRATEGY"
ENV_CHUNK = "RESNET_BK_TRITON_CHUNK"
# read once, when this module is first imported (a value is validated at the first call that uses it)
_ENV_STRATEGY_VALUE = os.environ.get(ENV_STRATEGY) or None
_ENV_CHUNK_VALUE = os.environ.get(ENV_CHUNK) or None

# "chunked" pays three extra launches and a carry pass; it wins when the batch alone cannot fill
# the GPU (few rows) and each row is long enough that N sequential steps dominate.
CHUNKED_MAX_B = 8
CHUNKED_MIN_N = 512
BLOCK = 32  # segments per program: one warp, one segment per thread


# ---------------------------------------------------------------------------------------------
# complex helpers on (re, im) pairs


@triton.jit
def _cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def _crecip(r, i):
    # scaled so that |z|^2 never overflows or underflows in float32
    s = tl.maximum(tl.abs(r), tl.abs(i))
    ur = r / s
    ui = i / s
    den = s * (ur * ur + ui * ui)
    return ur / den, -ui / den


@triton.jit
def _cdiv(ar, ai, br, bi):
    rr, ri = _crecip(br, bi)
    return _cmul(ar, ai, rr, ri)


@triton.jit
def _seg_ids(pid, S, C, CH, BLOCK: tl.constexpr):
    s = pid * BLOCK + tl.arange(0, BLOCK)
    ok = s < S
    s64 = s.to(tl.int64)
    row = s64 // C
    start = (s64 % C) * CH
    return s64, ok, row, start


# ---------------------------------------------------------------------------------------------
# chunk summaries of the pivot recurrences (chunked strategy only)


@triton.jit
def _pivot_step(v, a_ptr, k_ptr, row, N, n, kn, k_rs, zr, zi, zero, qr, qi):
    """One pivot step at position n where v: p = alpha_n - k_kn q with q the inverse of the previous
    pivot (kn = n - 1 left to right, n right to left; k outside [0, N-1) is 0). Returns alpha,
    k, p and the new q = 1 / p (q unchanged where not v)."""
    alr = tl.load(a_ptr + row * N + n, mask=v, other=0.0) - zr
    ali = zero - zi
    kk = tl.load(k_ptr + row * k_rs + kn, mask=v & (kn >= 0) & (kn < N - 1), other=0.0)
    pr = alr - kk * qr
    pi = ali - kk * qi
    nqr, nqi = _crecip(pr, pi)
    return alr, ali, kk, pr, pi, tl.where(v, nqr, qr), tl.where(v, nqi, qi)


@triton.jit
def _load_carry(ptr, s, S, ok, zero, HAS_CARRY: tl.constexpr):
    """A complex carry (re at ptr[s], im at ptr[S + s]), or 0 without carries."""
    if HAS_CARRY:
        return tl.load(ptr + s, mask=ok, other=0.0), tl.load(ptr + S + s, mask=ok, other=0.0)
    else:
        return zero, zero


@triton.jit
def _mobius_step(v, alr, ali, kk, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i):
    """P <- M P with M = [[alpha, -k], [1, 0]] where v, rescaled by its largest entry (only
    ratios matter); P unchanged where not v."""
    q00r, q00i = _cmul(alr, ali, p00r, p00i)
    q01r, q01i = _cmul(alr, ali, p01r, p01i)
    q00r = q00r - kk * p10r
    q00i = q00i - kk * p10i
    q01r = q01r - kk * p11r
    q01i = q01i - kk * p11i
    m = tl.maximum(tl.maximum(tl.maximum(tl.abs(q00r), tl.abs(q00i)), tl.maximum(tl.abs(q01r), tl.abs(q01i))),
                   tl.maximum(tl.maximum(tl.abs(p00r), tl.abs(p00i)), tl.maximum(tl.abs(p01r), tl.abs(p01i))))
    inv = 1.0 / m
    return (tl.where(v, q00r * inv, p00r), tl.where(v, q00i * inv, p00i),
            tl.where(v, q01r * inv, p01r), tl.where(v, q01i * inv, p01i),
            tl.where(v, p00r * inv, p10r), tl.where(v, p00i * inv, p10i),
            tl.where(v, p01r * inv, p11r), tl.where(v, p01i * inv, p11i))


@triton.jit
def _store_mobius(ptr, S, s, ok, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i):
    """The 8 real entries of P at ptr[e * S + s], e = 0..7 (m00 m01 m10 m11 as re/im pairs)."""
    tl.store(ptr + 0 * S + s, p00r, mask=ok)
    tl.store(ptr + 1 * S + s, p00i, mask=ok)
    tl.store(ptr + 2 * S + s, p01r, mask=ok)
    tl.store(ptr + 3 * S + s, p01i, mask=ok)
    tl.store(ptr + 4 * S + s, p10r, mask=ok)
    tl.store(ptr + 5 * S + s, p10i, mask=ok)
    tl.store(ptr + 6 * S + s, p11r, mask=ok)
    tl.store(ptr + 7 * S + s, p11i, mask=ok)


@triton.jit
def _pivot_summary_kernel(a_ptr, k_ptr, zri_ptr, pf_ptr, pb_ptr, N, S, C, CH, k_rs,
                          TWO_SIDED: tl.constexpr, BLOCK: tl.constexpr):
    """pf/pb (8, S): the chunk's product of Moebius matrices (entries m00 m01 m10 m11 as re/im
    pairs), left to right for d and right to left for e."""
    pid = tl.program_id(0)
    # scratch offsets t * S + s reach 2 * B * N; tl.cast, not .to: S may be specialised to constexpr 1
    S = tl.cast(S, tl.int64)
    s, ok, row, start = _seg_ids(pid, S, C, CH, BLOCK)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    one = tl.full([BLOCK], 1.0, a_ptr.dtype.element_ty)
    zero = tl.zeros([BLOCK], a_ptr.dtype.element_ty)
    # forward: P <- M_n P with M_n = [[alpha_n, -k_{n-1}], [1, 0]]
    p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = one, zero, zero, zero, zero, zero, one, zero
    for t in range(0, CH):
        n = start + t
        v = ok & (n < N)
        alr = tl.load(a_ptr + row * N + n, mask=v, other=0.0) - zr
        kk = tl.load(k_ptr + row * k_rs + n - 1, mask=v & (n >= 1), other=0.0)
        p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = _mobius_step(
            v, alr, zero - zi, kk, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i)
    _store_mobius(pf_ptr, S, s, ok, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i)
    if TWO_SIDED:
        # backward: P <- M_n P with M_n = [[alpha_n, -k_n], [1, 0]], n from the chunk's end
        p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = one, zero, zero, zero, zero, zero, one, zero
        for tt in range(0, CH):
            n = start + CH - 1 - tt
            v = ok & (n < N)
            alr = tl.load(a_ptr + row * N + n, mask=v, other=0.0) - zr
            kk = tl.load(k_ptr + row * k_rs + n, mask=v & (n < N - 1), other=0.0)
            p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i = _mobius_step(
                v, alr, zero - zi, kk, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i)
        _store_mobius(pb_ptr, S, s, ok, p00r, p00i, p01r, p01i, p10r, p10i, p11r, p11i)


@triton.jit
def _apply_moebius(p_ptr, idx, S, xr, xi, yr, yi):
    m00r = tl.load(p_ptr + 0 * S + idx)
    m00i = tl.load(p_ptr + 1 * S + idx)
    m01r = tl.load(p_ptr + 2 * S + idx)
    m01i = tl.load(p_ptr + 3 * S + idx)
    m10r = tl.load(p_ptr + 4 * S + idx)
    m10i = tl.load(p_ptr + 5 * S + idx)
    m11r = tl.load(p_ptr + 6 * S + idx)
    m11i = tl.load(p_ptr + 7 * S + idx)
    ar, ai = _cmul(m00r, m00i, xr, xi)
    br, bi = _cmul(m01r, m01i, yr, yi)
    cr, ci = _cmul(m10r, m10i, xr, xi)
    dr, di = _cmul(m11r, m11i, yr, yi)
    nxr = ar + br
    nxi = ai + bi
    nyr = cr + dr
    nyi = ci + di
    m = tl.maximum(tl.maximum(tl.abs(nxr), tl.abs(nxi)), tl.maximum(tl.abs(nyr), tl.abs(nyi)))
    inv = 1.0 / m
    return nxr * inv, nxi * inv, nyr * inv, nyi * inv


@triton.jit
def _pivot_carry_kernel(pf_ptr, pb_ptr, qin_ptr, rin_ptr, B, C, S,
                        TWO_SIDED: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, run the chunk products in order. qin/rin (2, S): the reciprocal of the pivot
    entering each chunk, 1/d_{start-1} (left) and 1/e_{end+1} (right); 0 at the sequence ends."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    rows = rows.to(tl.int64)
    one = tl.full([BLOCK], 1.0, pf_ptr.dtype.element_ty)
    zero = tl.zeros([BLOCK], pf_ptr.dtype.element_ty)
    # projective vector (x, y) with x / y = d; (1, 0) is "no pivot yet" (q = y / x = 0)
    xr = one
    xi = zero
    yr = zero
    yi = zero
    for c in range(0, C):
        idx = rows * C + c
        qr, qi = _cdiv(yr, yi, xr, xi)
        tl.store(qin_ptr + idx, qr, mask=ok)
        tl.store(qin_ptr + S + idx, qi, mask=ok)
        xr, xi, yr, yi = _apply_moebius(pf_ptr, tl.where(ok, idx, 0), S, xr, xi, yr, yi)
    if TWO_SIDED:
        xr = one
        xi = zero
        yr = zero
        yi = zero
        for cc in range(0, C):
            idx = rows * C + (C - 1 - cc)
            qr, qi = _cdiv(yr, yi, xr, xi)
            tl.store(rin_ptr + idx, qr, mask=ok)
            tl.store(rin_ptr + S + idx, qi, mask=ok)
            xr, xi, yr, yi = _apply_moebius(pb_ptr, tl.where(ok, idx, 0), S, xr, xi, yr, yi)


# ---------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_kernel(a_ptr, k_ptr, zri_ptr, mask_ptr, qin_ptr, rin_ptr, out_ptr, d_ptr,
                N, S, C, CH, k_rs,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CARRY: tl.constexpr,
                BLOCK: tl.constexpr):
    """out (B, N, 2): G (or 1/d when causal) times the mask, as re/im pairs; d (2, CH, S) scratch."""
    pid = tl.program_id(0)
    # scratch offsets t * S + s reach 2 * B * N; tl.cast, not .to: S may be specialised to constexpr 1
    S = tl.cast(S, tl.int64)
    s, ok, row, start = _seg_ids(pid, S, C, CH, BLOCK)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    zero = tl.zeros([BLOCK], a_ptr.dtype.element_ty)
    SC = CH * S
    qr, qi = _load_carry(qin_ptr, s, S, ok, zero, HAS_CARRY)
    # left to right: d_n = alpha_n - k_{n-1} q_{n-1}, q_n = 1 / d_n
    for t in range(0, CH):
        n = start + t
        v = ok & (n < N)
        alr, ali, kk, dr, di, qr, qi = _pivot_step(v, a_ptr, k_ptr, row, N, n, n - 1, k_rs, zr, zi, zero,
                                                     qr, qi)
        if CAUSAL:
            outr = qr
            outi = qi
            if HAS_MASK:
                mk = tl.load(mask_ptr + row * N + n, mask=v, other=0.0)
                outr = outr * mk
                outi = outi * mk
            tl.store(out_ptr + (row * N + n) * 2, outr, mask=v)
            tl.store(out_ptr + (row * N + n) * 2 + 1, outi, mask=v)
        else:
            tl.store(d_ptr + t * S + s, dr, mask=v)
            tl.store(d_ptr + SC + t * S + s, di, mask=v)
    if not CAUSAL:
        tl.debug_barrier()
        rr, ri = _load_carry(rin_ptr, s, S, ok, zero, HAS_CARRY)
        # right to left: e_n = alpha_n - k_n r_{n+1}, r_n = 1 / e_n; G_n = 1 / (d_n + e_n - alpha_n)
        for tt in range(0, CH):
            t = CH - 1 - tt
            n = start + t
            v = ok & (n < N)
            alr, ali, kk, er, ei, rr, ri = _pivot_step(v, a_ptr, k_ptr, row, N, n, n, k_rs, zr, zi, zero,
                                                         rr, ri)
            dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
            di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
            gr, gi = _crecip(dr + er - alr, di + ei - ali)
            if HAS_MASK:
                mk = tl.load(mask_ptr + row * N + n, mask=v, other=0.0)
                gr = gr * mk
                gi = gi * mk
            tl.store(out_ptr + (row * N + n) * 2, gr, mask=v)
            tl.store(out_ptr + (row * N + n) * 2 + 1, gi, mask=v)


# ---------------------------------------------------------------------------------------------
# backward


@triton.jit
def _load_w(g_ptr, mask_ptr, off, v, HAS_MASK: tl.constexpr):
    """w = conj(g) * mask, and g itself (for the mask gradient)."""
    gr = tl.load(g_ptr + off * 2, mask=v, other=0.0)
    gi = tl.load(g_ptr + off * 2 + 1, mask=v, other=0.0)
    wr = gr
    wi = -gi
    if HAS_MASK:
        mk = tl.load(mask_ptr + off, mask=v, other=0.0)
        wr = wr * mk
        wi = wi * mk
    return wr, wi, gr, gi


@triton.jit
def _bwd_pass1_kernel(g_ptr, a_ptr, k_ptr, zri_ptr, mask_ptr, qin_ptr, rin_ptr,
                      d_ptr, e_ptr, p_ptr, sum_ptr, gmask_ptr,
                      N, S, C, CH, k_rs,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, NEED_GMASK: tl.constexpr,
                      HAS_CARRY: tl.constexpr, BLOCK: tl.constexpr):
    """Recompute the pivots (d, and e when two-sided) into scratch, the mask gradient, and with
    carries the chunk summaries (prod c, local x) of the linear gradient recurrences into
    sum (8, S): R (two-sided) or mu (causal) in rows 0..3, L (two-sided) in rows 4..7."""
    pid = tl.program_id(0)
    # scratch offsets t * S + s reach 2 * B * N; tl.cast, not .to: S may be specialised to constexpr 1
    S = tl.cast(S, tl.int64)
    s, ok, row, start = _seg_ids(pid, S, C, CH, BLOCK)
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    zero = tl.zeros([BLOCK], a_ptr.dtype.element_ty)
    one = tl.full([BLOCK], 1.0, a_ptr.dtype.element_ty)
    SC = CH * S
    qr, qi = _load_carry(qin_ptr, s, S, ok, zero, HAS_CARRY)
    for t in range(0, CH):
        n = start + t
        v = ok & (n < N)
        alr, ali, kk, dr, di, qr, qi = _pivot_step(v, a_ptr, k_ptr, row, N, n, n - 1, k_rs, zr, zi, zero,
                                                     qr, qi)
        tl.store(d_ptr + t * S + s, dr, mask=v)
        tl.store(d_ptr + SC + t * S + s, di, mask=v)
        if CAUSAL:
            if NEED_GMASK:
                gr = tl.load(g_ptr + (row * N + n) * 2, mask=v, other=0.0)
                gi = tl.load(g_ptr + (row * N + n) * 2 + 1, mask=v, other=0.0)
                tl.store(gmask_ptr + row * N + n, qr * gr + qi * gi, mask=v)
    tl.debug_barrier()
    if CAUSAL:
        if HAS_CARRY:
            # mu_j = c_j mu_{j+1} + p_j, c_j = k_j / d_j^2, p_j = -w_j / d_j^2 (right to left)
            cpr = one
            cpi = zero
            xr = zero
            xi = zero
            for tt in range(0, CH):
                t = CH - 1 - tt
                n = start + t
                v = ok & (n < N)
                dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
                di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
                kk = tl.load(k_ptr + row * k_rs + n, mask=v & (n < N - 1), other=0.0)
                wr, wi, gr, gi = _load_w(g_ptr, mask_ptr, row * N + n, v, HAS_MASK)
                ir, ii = _crecip(dr, di)
                i2r, i2i = _cmul(ir, ii, ir, ii)
                pr, pi = _cmul(wr, wi, i2r, i2i)
                ccr = kk * i2r
                cci = kk * i2i
                nxr, nxi = _cmul(ccr, cci, xr, xi)
                npr, npi = _cmul(ccr, cci, cpr, cpi)
                xr = tl.where(v, nxr - pr, xr)
                xi = tl.where(v, nxi - pi, xi)
                cpr = tl.where(v, npr, cpr)
                cpi = tl.where(v, npi, cpi)
            tl.store(sum_ptr + 0 * S + s, cpr, mask=ok)
            tl.store(sum_ptr + 1 * S + s, cpi, mask=ok)
            tl.store(sum_ptr + 2 * S + s, xr, mask=ok)
            tl.store(sum_ptr + 3 * S + s, xi, mask=ok)
    else:
        rr, ri = _load_carry(rin_ptr, s, S, ok, zero, HAS_CARRY)
        # right to left: e, G, p = w G^2; R summary with c_j = k_j / d_j^2
        cpr = one
        cpi = zero
        xr = zero
        xi = zero
        for tt in range(0, CH):
            t = CH - 1 - tt
            n = start + t
            v = ok & (n < N)
            alr, ali, kk, er, ei, rr, ri = _pivot_step(v, a_ptr, k_ptr, row, N, n, n, k_rs, zr, zi, zero,
                                                         rr, ri)
            tl.store(e_ptr + t * S + s, er, mask=v)
            tl.store(e_ptr + SC + t * S + s, ei, mask=v)
            dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
            di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
            Gr, Gi = _crecip(dr + er - alr, di + ei - ali)
            wr, wi, gr, gi = _load_w(g_ptr, mask_ptr, row * N + n, v, HAS_MASK)
            G2r, G2i = _cmul(Gr, Gi, Gr, Gi)
            pr, pi = _cmul(wr, wi, G2r, G2i)
            tl.store(p_ptr + t * S + s, pr, mask=v)
            tl.store(p_ptr + SC + t * S + s, pi, mask=v)
            if NEED_GMASK:
                tl.store(gmask_ptr + row * N + n, Gr * gr + Gi * gi, mask=v)
            if HAS_CARRY:
                idr, idi = _crecip(dr, di)
                i2r, i2i = _cmul(idr, idi, idr, idi)
                ccr = kk * i2r
                cci = kk * i2i
                nxr, nxi = _cmul(ccr, cci, xr, xi)
                npr, npi = _cmul(ccr, cci, cpr, cpi)
                xr = tl.where(v, nxr + pr, xr)
                xi = tl.where(v, nxi + pi, xi)
                cpr = tl.where(v, npr, cpr)
                cpi = tl.where(v, npi, cpi)
        if HAS_CARRY:
            tl.store(sum_ptr + 0 * S + s, cpr, mask=ok)
            tl.store(sum_ptr + 1 * S + s, cpi, mask=ok)
            tl.store(sum_ptr + 2 * S + s, xr, mask=ok)
            tl.store(sum_ptr + 3 * S + s, xi, mask=ok)
            tl.debug_barrier()
            # left to right: L summary with c_j = k_{j-1} / e_j^2
            cpr = one
            cpi = zero
            xr = zero
            xi = zero
            for t in range(0, CH):
                n = start + t
                v = ok & (n < N)
                er = tl.load(e_ptr + t * S + s, mask=v, other=1.0)
                ei = tl.load(e_ptr + SC + t * S + s, mask=v, other=0.0)
                pr = tl.load(p_ptr + t * S + s, mask=v, other=0.0)
                pi = tl.load(p_ptr + SC + t * S + s, mask=v, other=0.0)
                kk = tl.load(k_ptr + row * k_rs + n - 1, mask=v & (n >= 1), other=0.0)
                ier, iei = _crecip(er, ei)
                i2r, i2i = _cmul(ier, iei, ier, iei)
                ccr = kk * i2r
                cci = kk * i2i
                nxr, nxi = _cmul(ccr, cci, xr, xi)
                npr, npi = _cmul(ccr, cci, cpr, cpi)
                xr = tl.where(v, nxr + pr, xr)
                xi = tl.where(v, nxi + pi, xi)
                cpr = tl.where(v, npr, cpr)
                cpi = tl.where(v, npi, cpi)
            tl.store(sum_ptr + 4 * S + s, cpr, mask=ok)
            tl.store(sum_ptr + 5 * S + s, cpi, mask=ok)
            tl.store(sum_ptr + 6 * S + s, xr, mask=ok)
            tl.store(sum_ptr + 7 * S + s, xi, mask=ok)


@triton.jit
def _lin_carry_kernel(sum_ptr, cin_ptr, B, C, S, CAUSAL: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, combine the chunk summaries in order. cin (4, S): the value entering each chunk:
    R_{end+1} (or mu_{end+1}) in rows 0..1, L_{start-1} in rows 2..3 (two-sided)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < B
    rows = rows.to(tl.int64)
    zero = tl.zeros([BLOCK], sum_ptr.dtype.element_ty)
    xr = zero
    xi = zero
    for cc in range(0, C):
        idx = tl.where(ok, rows * C + (C - 1 - cc), 0)
        tl.store(cin_ptr + idx, xr, mask=ok)
        tl.store(cin_ptr + S + idx, xi, mask=ok)
        pr = tl.load(sum_ptr + 0 * S + idx)
        pi = tl.load(sum_ptr + 1 * S + idx)
        lr = tl.load(sum_ptr + 2 * S + idx)
        li = tl.load(sum_ptr + 3 * S + idx)
        nr, ni = _cmul(pr, pi, xr, xi)
        xr = nr + lr
        xi = ni + li
    if not CAUSAL:
        xr = zero
        xi = zero
        for c in range(0, C):
            idx = tl.where(ok, rows * C + c, 0)
            tl.store(cin_ptr + 2 * S + idx, xr, mask=ok)
            tl.store(cin_ptr + 3 * S + idx, xi, mask=ok)
            pr = tl.load(sum_ptr + 4 * S + idx)
            pi = tl.load(sum_ptr + 5 * S + idx)
            lr = tl.load(sum_ptr + 6 * S + idx)
            li = tl.load(sum_ptr + 7 * S + idx)
            nr, ni = _cmul(pr, pi, xr, xi)
            xr = nr + lr
            xi = ni + li


@triton.jit
def _bwd_final_kernel(g_ptr, a_ptr, k_ptr, zri_ptr, mask_ptr, cin_ptr,
                      d_ptr, e_ptr, p_ptr, r_ptr, ga_ptr, gk_ptr, gz_ptr,
                      N, S, C, CH, k_rs,
                      CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_CARRY: tl.constexpr,
                      BLOCK: tl.constexpr):
    """grad_a (B, N), per-row grad_k (B, N-1) and per-segment partial sums gz (2, S) of A
    (two-sided) or mu (causal), from which the host forms grad_z."""
    pid = tl.program_id(0)
    # scratch offsets t * S + s reach 2 * B * N; tl.cast, not .to: S may be specialised to constexpr 1
    S = tl.cast(S, tl.int64)
    s, ok, row, start = _seg_ids(pid, S, C, CH, BLOCK)
    zero = tl.zeros([BLOCK], a_ptr.dtype.element_ty)
    SC = CH * S
    xr, xi = _load_carry(cin_ptr, s, S, ok, zero, HAS_CARRY)
    sr = zero
    si = zero
    if CAUSAL:
        # right to left: gk_j = Re(-mu_{j+1} / d_j), mu_j = (k_j mu_{j+1} - w_j) / d_j^2
        for tt in range(0, CH):
            t = CH - 1 - tt
            n = start + t
            v = ok & (n < N)
            dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
            di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
            kk = tl.load(k_ptr + row * k_rs + n, mask=v & (n < N - 1), other=0.0)
            wr, wi, gr, gi = _load_w(g_ptr, mask_ptr, row * N + n, v, HAS_MASK)
            ir, ii = _crecip(dr, di)
            gkr, gki = _cmul(xr, xi, ir, ii)
            tl.store(gk_ptr + row * (N - 1) + n, -gkr, mask=v & (n < N - 1))
            i2r, i2i = _cmul(ir, ii, ir, ii)
            tr, ti = _cmul(kk * xr - wr, kk * xi - wi, i2r, i2i)
            xr = tl.where(v, tr, xr)
            xi = tl.where(v, ti, xi)
            tl.store(ga_ptr + row * N + n, xr, mask=v)
            sr += tl.where(v, xr, 0.0)
            si += tl.where(v, xi, 0.0)
    else:
        # right to left: R_j = p_j + (k_j / d_j^2) R_{j+1}, stored
        for tt in range(0, CH):
            t = CH - 1 - tt
            n = start + t
            v = ok & (n < N)
            dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
            di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
            pr = tl.load(p_ptr + t * S + s, mask=v, other=0.0)
            pi = tl.load(p_ptr + SC + t * S + s, mask=v, other=0.0)
            kk = tl.load(k_ptr + row * k_rs + n, mask=v & (n < N - 1), other=0.0)
            ir, ii = _crecip(dr, di)
            i2r, i2i = _cmul(ir, ii, ir, ii)
            tr, ti = _cmul(kk * i2r, kk * i2i, xr, xi)
            xr = tl.where(v, tr + pr, xr)
            xi = tl.where(v, ti + pi, xi)
            tl.store(r_ptr + t * S + s, xr, mask=v)
            tl.store(r_ptr + SC + t * S + s, xi, mask=v)
        tl.debug_barrier()
        # left to right: L_j = (k_{j-1} / e_j^2) L_{j-1} + p_j; A = L + R - p;
        # gk_{j-1} = Re(L_{j-1} / e_j + R_j / d_{j-1})
        if HAS_CARRY:
            lr = tl.load(cin_ptr + 2 * S + s, mask=ok, other=0.0)
            li = tl.load(cin_ptr + 3 * S + s, mask=ok, other=0.0)
            # d_{start-1} is the last position of the previous segment of the same row
            vp = ok & (start >= 1)
            dpr = tl.load(d_ptr + (CH - 1) * S + s - 1, mask=vp, other=1.0)
            dpi = tl.load(d_ptr + SC + (CH - 1) * S + s - 1, mask=vp, other=0.0)
        else:
            lr = zero
            li = zero
            dpr = zero + 1.0
            dpi = zero
        for t in range(0, CH):
            n = start + t
            v = ok & (n < N)
            dr = tl.load(d_ptr + t * S + s, mask=v, other=1.0)
            di = tl.load(d_ptr + SC + t * S + s, mask=v, other=0.0)
            er = tl.load(e_ptr + t * S + s, mask=v, other=1.0)
            ei = tl.load(e_ptr + SC + t * S + s, mask=v, other=0.0)
            pr = tl.load(p_ptr + t * S + s, mask=v, other=0.0)
            pi = tl.load(p_ptr + SC + t * S + s, mask=v, other=0.0)
            Rr = tl.load(r_ptr + t * S + s, mask=v, other=0.0)
            Ri = tl.load(r_ptr + SC + t * S + s, mask=v, other=0.0)
            kk = tl.load(k_ptr + row * k_rs + n - 1, mask=v & (n >= 1), other=0.0)
            ier, iei = _crecip(er, ei)
            t1r, t1i = _cmul(lr, li, ier, iei)
            t2r, t2i = _cdiv(Rr, Ri, dpr, dpi)
            tl.store(gk_ptr + row * (N - 1) + n - 1, t1r + t2r, mask=v & (n >= 1))
            i2r, i2i = _cmul(ier, iei, ier, iei)
            tr, ti = _cmul(kk * i2r, kk * i2i, lr, li)
            lr = tl.where(v, tr + pr, lr)
            li = tl.where(v, ti + pi, li)
            Ar = lr + Rr - pr
            Ai = li + Ri - pi
            tl.store(ga_ptr + row * N + n, -Ar, mask=v)
            sr += tl.where(v, Ar, 0.0)
            si += tl.where(v, Ai, 0.0)
            dpr = dr
            dpi = di
    tl.store(gz_ptr + s, sr, mask=ok)
    tl.store(gz_ptr + S + s, si, mask=ok)


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


def choose_strategy(B: int, N: int) -> str:
    """The strategy for B rows of length N: "chunked" for few long sequences (B <= 8 and
    N >= 512), else "lanes". Forced by the ``strategy=`` argument of the kernel entry points or
    ``RESNET_BK_TRITON_STRATEGY``. The thresholds are a first guess, to be tuned on a GPU."""
    return "chunked" if (B <= CHUNKED_MAX_B and N >= CHUNKED_MIN_N) else "lanes"


def chunk_size(N: int) -> int:
    """Chunk length of the chunked strategy: about sqrt(N) (a power of two in [16, 4096]), which
    balances the per-chunk sequential work against the sequential carry pass over N / CH chunks."""
    return int(min(4096, max(16, triton.next_power_of_2(int(math.isqrt(max(N, 1)))))))


def _resolve(B: int, N: int, strategy: Optional[str], chunk: Optional[int]) -> Tuple[str, int, int]:
    src = "strategy="
    if strategy is None:
        strategy = _ENV_STRATEGY_VALUE
        src = ENV_STRATEGY
    if strategy is None:
        strategy = choose_strategy(B, N)
    if strategy not in STRATEGIES:
        raise ValueError(f"{src}: expected one of {STRATEGIES}, got {strategy!r}")
    if strategy == "lanes":
        return strategy, 1, N
    src = "chunk="
    if chunk is None and _ENV_CHUNK_VALUE:
        src = ENV_CHUNK
        try:
            chunk = int(_ENV_CHUNK_VALUE)
        except ValueError:
            raise ValueError(f"{ENV_CHUNK}: expected a positive integer, got {_ENV_CHUNK_VALUE!r}") from None
    if chunk is None:
        chunk = chunk_size(N)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"{src}: expected a positive integer chunk length, got {chunk!r}")
    CH = min(chunk, N)
    return strategy, triton.cdiv(N, CH), CH


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


def _launch(kernel, grid, *args, **meta):
    # Launched eagerly: the op layer registers these entry points as custom ops with fake kernels.
    return kernel[grid](*args, **meta)


def _pivot_carries(a, k, zri, N, S, C, CH, k_rs, two_sided):
    B = a.shape[0]
    pf = torch.empty(8, S, dtype=a.dtype, device=a.device)
    pb = torch.empty(8, S, dtype=a.dtype, device=a.device) if two_sided else pf
    _launch(_pivot_summary_kernel, (triton.cdiv(S, BLOCK),), a, k, zri, pf, pb, N, S, C, CH, k_rs,
            TWO_SIDED=two_sided, BLOCK=BLOCK, num_warps=1)
    qin = torch.empty(2, S, dtype=a.dtype, device=a.device)
    rin = torch.empty(2, S, dtype=a.dtype, device=a.device) if two_sided else qin
    _launch(_pivot_carry_kernel, (triton.cdiv(B, BLOCK),), pf, pb, qin, rin, B, C, S,
            TWO_SIDED=two_sided, BLOCK=BLOCK, num_warps=1)
    return qin, rin


def bk_core_fwd(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool, *,
                strategy: Optional[str] = None, chunk: Optional[int] = None) -> Tensor:
    """Forward on canonical arguments: (B, N) complex G (or 1/d when causal), times mask.

    ``strategy``: "lanes" / "chunked" / None (``choose_strategy`` or RESNET_BK_TRITON_STRATEGY);
    ``chunk``: chunk length of the chunked strategy (None: ``chunk_size(N)`` or RESNET_BK_TRITON_CHUNK).
    """
    _check(a, k, zri, mask)
    a, k, zri = a.contiguous(), k.contiguous(), zri.contiguous()
    mask = None if mask is None else mask.contiguous()
    B, N = a.shape
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    out = torch.empty(B, N, dtype=cdt, device=a.device)
    if B == 0:
        return out
    _, C, CH = _resolve(B, N, strategy, chunk)
    S = B * C
    k_rs = 0 if k.shape[0] == 1 else N - 1
    if C > 1:
        qin, rin = _pivot_carries(a, k, zri, N, S, C, CH, k_rs, not causal)
    else:
        qin = rin = a  # unused (HAS_CARRY=False)
    dscr = a if causal else torch.empty(2, CH, S, dtype=a.dtype, device=a.device)
    _launch(_fwd_kernel, (triton.cdiv(S, BLOCK),), a, k, zri, a if mask is None else mask, qin, rin,
            torch.view_as_real(out), dscr, N, S, C, CH, k_rs,
            CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_CARRY=C > 1, BLOCK=BLOCK, num_warps=1)
    return out


def bk_core_bwd(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool,
                need_mask_grad: bool = True, *, strategy: Optional[str] = None,
                chunk: Optional[int] = None) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Exact backward on canonical arguments, same contract as ``bk_core_bwd_ref``:
    (grad_a (B, N), grad_k (Bk, N-1) (summed over rows when Bk == 1), grad_zri (2,),
    grad_mask (B, N) or None). ``grad`` is PyTorch's upstream gradient of the complex output."""
    _check(a, k, zri, mask)
    a, k, zri = a.contiguous(), k.contiguous(), zri.contiguous()
    mask = None if mask is None else mask.contiguous()
    B, N = a.shape
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    if tuple(grad.shape) != (B, N):
        raise ValueError(f"grad: expected shape ({B}, {N}), got {tuple(grad.shape)}")
    need_gmask = mask is not None and need_mask_grad
    if B == 0:
        return (torch.zeros_like(a), torch.zeros_like(k), torch.zeros_like(zri),
                torch.zeros_like(mask) if need_gmask else None)
    g = torch.view_as_real(grad.to(cdt).resolve_conj().resolve_neg().contiguous())
    _, C, CH = _resolve(B, N, strategy, chunk)
    S = B * C
    k_rs = 0 if k.shape[0] == 1 else N - 1
    dev, dt = a.device, a.dtype
    if C > 1:
        qin, rin = _pivot_carries(a, k, zri, N, S, C, CH, k_rs, not causal)
    else:
        qin = rin = a
    d = torch.empty(2, CH, S, dtype=dt, device=dev)
    e = d if causal else torch.empty(2, CH, S, dtype=dt, device=dev)
    p = d if causal else torch.empty(2, CH, S, dtype=dt, device=dev)
    summ = torch.empty(8, S, dtype=dt, device=dev) if C > 1 else a
    gmask = torch.empty(B, N, dtype=dt, device=dev) if need_gmask else a
    grid = (triton.cdiv(S, BLOCK),)
    mptr = a if mask is None else mask
    _launch(_bwd_pass1_kernel, grid, g, a, k, zri, mptr, qin, rin, d, e, p, summ, gmask,
            N, S, C, CH, k_rs, CAUSAL=bool(causal), HAS_MASK=mask is not None, NEED_GMASK=need_gmask,
            HAS_CARRY=C > 1, BLOCK=BLOCK, num_warps=1)
    if C > 1:
        cin = torch.empty(4, S, dtype=dt, device=dev)
        _launch(_lin_carry_kernel, (triton.cdiv(B, BLOCK),), summ, cin, B, C, S,
                CAUSAL=bool(causal), BLOCK=BLOCK, num_warps=1)
    else:
        cin = a
    r = d if causal else torch.empty(2, CH, S, dtype=dt, device=dev)
    grad_a = torch.empty(B, N, dtype=dt, device=dev)
    gk_rows = torch.empty(B, N - 1, dtype=dt, device=dev)
    gz = torch.empty(2, S, dtype=dt, device=dev)
    _launch(_bwd_final_kernel, grid, g, a, k, zri, mptr, cin, d, e, p, r, grad_a, gk_rows, gz,
            N, S, C, CH, k_rs, CAUSAL=bool(causal), HAS_MASK=mask is not None, HAS_CARRY=C > 1,
            BLOCK=BLOCK, num_warps=1)
    grad_k = gk_rows.sum(0, keepdim=True) if (k.shape[0] == 1 and B != 1) else gk_rows
    tot = gz.sum(1)
    # two-sided: grad_z = conj(sum A); causal: grad_z = -conj(sum mu); zri = [Re, Im]
    grad_zri = torch.stack([tot[0], -tot[1]]) if not causal else torch.stack([-tot[0], tot[1]])
    return grad_a, grad_k, grad_zri, (gmask if need_gmask else None)
