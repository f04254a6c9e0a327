"""Triton kernel of BK-Core's one-token decode step (the causal recurrence advanced by one position):

    d = (a - z) - b c / state   (no state: a - z),    y = 1 / d

Canonical arguments (``resnet_bk.ops.bk_core.step``): ``a`` float32/float64, any shape, the
diagonal entries of one position for a batch of sequences; ``b``, ``c`` the off-diagonal entries
coupling the previous position to this one, one value (numel 1, shared) or ``a``'s shape;
``zri`` (2,) ``[Re z, Im z]``; ``state`` the previous pivot (complex, ``a``'s shape) or None.
One launch, one lane per sequence; nothing is read on the host. ``d`` may be the state itself
(updated in place: every lane loads its state entry before storing its d entry).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["bk_core_step", "BLOCK", "INTERPRETED"]

BLOCK = 128  # sequences per program


@triton.jit
def _recip_real(x):
    # 1 / x in IEEE round-to-nearest (float32 `/` lowers to div.full.f32, an approximation;
    # float64 `/` is div.rn.f64 already), as csrc/bk_math.h divides
    if x.dtype == tl.float64:
        return 1.0 / x
    else:
        return tl.fdiv(1.0, x, ieee_rounding=True)


@triton.jit
def _step_kernel(a_ptr, b_ptr, c_ptr, zri_ptr, s_ptr, y_ptr, d_ptr, n,
                 B_SHARED: tl.constexpr, C_SHARED: tl.constexpr, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n
    zr = tl.load(zri_ptr)
    zi = tl.load(zri_ptr + 1)
    dr = tl.load(a_ptr + i, mask=ok, other=0.0) - zr
    di = tl.zeros_like(dr) - zi
    if HAS_STATE:
        if B_SHARED:
            bv = tl.load(b_ptr + i * 0, mask=ok, other=0.0)
        else:
            bv = tl.load(b_ptr + i, mask=ok, other=0.0)
        if C_SHARED:
            cv = tl.load(c_ptr + i * 0, mask=ok, other=0.0)
        else:
            cv = tl.load(c_ptr + i, mask=ok, other=0.0)
        # (re, im) interleaved: one load of (BLOCK, 2) consecutive reals (coalesced), not two of stride 2
        sr, si = tl.split(tl.load(s_ptr + (2 * i)[:, None] + tl.arange(0, 2)[None, :], mask=ok[:, None], other=1.0))
        si = tl.where(ok, si, 0.0)
        # k / s = k conj(s) / |s|^2, 0 where |s|^2 is infinite (as csrc/bk_math.h's pivot_step)
        r = _recip_real(sr * sr + si * si)
        u = tl.where(r == 0.0, 0.0, sr * r)
        v = tl.where(r == 0.0, 0.0, si * r)
        k = bv * cv
        dr = dr - k * u
        di = di + k * v
    q = _recip_real(dr * dr + di * di)
    yr = tl.where(q == 0.0, 0.0, dr * q)
    yi = tl.where(q == 0.0, 0.0, -(di * q))
    off = (2 * i)[:, None] + tl.arange(0, 2)[None, :]
    tl.store(d_ptr + off, tl.join(dr, di), mask=ok[:, None])
    tl.store(y_ptr + off, tl.join(yr, yi), mask=ok[:, None])


INTERPRETED = type(_step_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


def _real(t: Tensor) -> Tensor:
    return torch.view_as_real(t)


def bk_core_step(a: Tensor, b: Tensor, c: Tensor, zri: Tensor, state: Optional[Tensor],
                 y: Optional[Tensor] = None, d: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(y, d) on canonical arguments; written into ``y`` and ``d`` when given (contiguous, ``a``'s
    shape, complex; ``d`` may be ``state``), else fresh."""
    cdt = torch.complex128 if a.dtype == torch.float64 else torch.complex64
    if y is None:
        y = torch.empty(a.shape, dtype=cdt, device=a.device)
        d = torch.empty(a.shape, dtype=cdt, device=a.device)
    n = a.numel()
    if n == 0:
        return y, d
    a = a.contiguous()
    b = b.contiguous()
    c = c.contiguous()
    s = None
    if state is not None:
        s = state if state is d else state.resolve_conj().resolve_neg().contiguous()
    dr = _real(d)
    sr = dr if s is d else (_real(s) if s is not None else dr)  # (unused without a state)
    _step_kernel[(triton.cdiv(n, BLOCK),)](a, b, c, zri, sr, _real(y), dr, n,
                                           B_SHARED=b.numel() == 1, C_SHARED=c.numel() == 1,
                                           HAS_STATE=state is not None, BLOCK=BLOCK, num_warps=4)
    return y, d
