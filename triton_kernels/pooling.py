"""Triton kernels for learned down/upsampling (the ops ``resnet_bk.ops.learned_downsample`` /
``learned_upsample``), forward and backward, on their canonical arguments:

* downsample: ``x`` (B, N, D) activation dtype T, ``logits`` (M, r) accumulation dtype A, ``causal``
  -> (B, M, D) T, ``out[b, j] = sum_k softmax(logits[j])_k x[b, j*r + k - s]``, s = r - 1 when
  causal (positions before 0 read as 0), else 0.
* upsample: ``y`` (B, M, r*D) T, ``bias`` (Mb, r, Db) A with Mb in {1, M}, Db in {1, D},
  ``residual`` (B, M*r, D) T or None, ``scale`` 0-dim A or None ->
  (B, M*r, D) T, ``residual + scale * (y[b, m, k*D + d] + bias[m, k, d])``.

T is float32/float64/float16/bfloat16, A is float64 for float64 activations else float32; every
sum is accumulated in A. The softmax is fused into the pooling kernel (one program per output
row (b, j), looping over D); the gradient of the logits is reduced per row in the kernel, summed
over the batch on the host and pushed through the (M, r) softmax Jacobian there.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["learned_downsample_fwd", "learned_downsample_bwd", "learned_upsample_fwd",
           "learned_upsample_bwd", "INTERPRETED"]

BLOCK_D = 64
BLOCK_UP = 256


@triton.jit
def _softmax_row(logits_ptr, j, r, BLOCK_R: tl.constexpr):
    ks = tl.arange(0, BLOCK_R)
    km = ks < r
    lg = tl.load(logits_ptr + j * r + ks, mask=km, other=float("-inf"))
    e = tl.exp(lg - tl.max(lg, 0))
    e = tl.where(km, e, 0.0)
    return ks, km, e / tl.sum(e, 0)


@triton.jit
def _down_kernel(x_ptr, logits_ptr, out_ptr, g_ptr, gx_ptr, u_ptr,
                 M, r, D, shift, sxb, sxn, sxd,
                 BACKWARD: tl.constexpr, NEED_X: tl.constexpr, NEED_LOGITS: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per output row (b, j). Forward: out (B, M, D). Backward: gx (B, N, D)
    (zero-filled by the host: positions outside every window keep 0), u (B, M, r) =
    sum_d g[b, j, d] x[b, j*r + k - s, d] (the gradient with respect to the softmax weights)."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // M
    j = pid % M
    ks, km, w = _softmax_row(logits_ptr, j, r, BLOCK_R)
    pos = j * r + ks - shift
    kv = km & (pos >= 0)
    N = M * r
    u = tl.zeros([BLOCK_R], logits_ptr.dtype.element_ty)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        dm = ds < D
        m2 = kv[:, None] & dm[None, :]
        if BACKWARD:
            g = tl.load(g_ptr + (b * M + j) * D + ds, mask=dm, other=0.0).to(logits_ptr.dtype.element_ty)
            if NEED_X:
                gx = w[:, None] * g[None, :]
                tl.store(gx_ptr + (b * N + pos[:, None]) * D + ds[None, :], gx, mask=m2)
            if NEED_LOGITS:
                xt = tl.load(x_ptr + b * sxb + pos[:, None] * sxn + ds[None, :] * sxd, mask=m2, other=0.0)
                u += tl.sum(xt.to(logits_ptr.dtype.element_ty) * g[None, :], 1)
        else:
            xt = tl.load(x_ptr + b * sxb + pos[:, None] * sxn + ds[None, :] * sxd, mask=m2, other=0.0)
            o = tl.sum(xt.to(logits_ptr.dtype.element_ty) * w[:, None], 0)
            tl.store(out_ptr + (b * M + j) * D + ds, o, mask=dm)
    if BACKWARD:
        if NEED_LOGITS:
            tl.store(u_ptr + (b * M + j) * r + ks, u, mask=km)


@triton.jit
def _up_kernel(y_ptr, bias_ptr, res_ptr, scale_ptr, out_ptr, M, r, D,
               syb, sym, syi, sbm, sbk, sbd, srb, srn, srd,
               HAS_RES: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (B * M, cdiv(r * D, BLOCK)); out (B, M*r, D) contiguous: row (b, m) of y and the r
    output rows of group m share the flat index i = k * D + d."""
    pid = tl.program_id(0).to(tl.int64)
    b = pid // M
    m = pid % M
    RD = r * D
    i = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < RD
    k = i // D
    d = i % D
    yv = tl.load(y_ptr + b * syb + m * sym + i * syi, mask=im, other=0.0)
    v = yv.to(bias_ptr.dtype.element_ty) + tl.load(bias_ptr + m * sbm + k * sbk + d * sbd, mask=im, other=0.0)
    if HAS_SCALE:
        v = v * tl.load(scale_ptr)
    if HAS_RES:
        rv = tl.load(res_ptr + b * srb + (m * r + k) * srn + d * srd, mask=im, other=0.0)
        v = v + rv.to(bias_ptr.dtype.element_ty)
    tl.store(out_ptr + (b * M + m) * RD + i, v, mask=im)


@triton.jit
def _up_bwd_kernel(g_ptr, y_ptr, bias_ptr, scale_ptr, gy_ptr, gb_ptr, gs_ptr, B, M, r, D,
                   syb, sym, syi, sbm, sbk, sbd,
                   HAS_SCALE: tl.constexpr, NEED_Y: tl.constexpr, NEED_BIAS: tl.constexpr,
                   NEED_SCALE: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (M, cdiv(r * D, BLOCK)), a loop over the batch. gy (B, M, r*D) = scale * g;
    gb (M, r*D) = sum_b g (the host applies the scale and the broadcast reduction);
    gs (M, nblocks) partial sums of g * (y + bias)."""
    m = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    RD = r * D
    i = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    im = i < RD
    k = i // D
    d = i % D
    acc_g = tl.zeros([BLOCK], bias_ptr.dtype.element_ty)
    acc_s = tl.zeros([BLOCK], bias_ptr.dtype.element_ty)
    if HAS_SCALE:
        sc = tl.load(scale_ptr)
    else:
        sc = 1.0
    if NEED_SCALE:
        bv = tl.load(bias_ptr + m * sbm + k * sbk + d * sbd, mask=im, other=0.0)
    for b in range(0, B):
        g = tl.load(g_ptr + (b * M + m) * RD + i, mask=im, other=0.0).to(bias_ptr.dtype.element_ty)
        if NEED_Y:
            tl.store(gy_ptr + (b * M + m) * RD + i, g * sc, mask=im)
        acc_g += g
        if NEED_SCALE:
            yv = tl.load(y_ptr + b * syb + m * sym + i * syi, mask=im, other=0.0)
            acc_s += g * (yv.to(bias_ptr.dtype.element_ty) + bv)
    if NEED_BIAS:
        tl.store(gb_ptr + m * RD + i, acc_g, mask=im)
    if NEED_SCALE:
        tl.store(gs_ptr + m * tl.num_programs(1) + blk, tl.sum(acc_s, 0))


# ---------------------------------------------------------------------------------------------
# host side

INTERPRETED = type(_down_kernel).__name__ == "InterpretedFunction"  # TRITON_INTERPRET=1 at import


def _check_down(x: Tensor, logits: Tensor) -> Tuple[int, int, int, int, int]:
    if x.dim() != 3:
        raise ValueError(f"x: expected shape (B, N, D), got {tuple(x.shape)}")
    if logits.dim() != 2 or logits.shape[1] < 1 or x.shape[1] != logits.shape[0] * logits.shape[1]:
        raise ValueError(f"logits: expected shape (N // r, r) for x of shape {tuple(x.shape)}, got {tuple(logits.shape)}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    if logits.dtype != acc:
        raise TypeError(f"logits: expected dtype {acc} for x of dtype {x.dtype}, got {logits.dtype}")
    B, N, D = x.shape
    M, r = logits.shape
    return B, N, D, M, r


def learned_downsample_fwd(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
    """x (B, N, D), logits (M, r) -> (B, M, D) in x's dtype."""
    B, N, D, M, r = _check_down(x, logits)
    logits = logits.contiguous()
    out = torch.empty(B, M, D, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    _down_kernel[(B * M,)](x, logits, out, x, x, logits, M, r, D, (r - 1) if causal else 0, *x.stride(),
                           BACKWARD=False, NEED_X=False, NEED_LOGITS=False,
                           BLOCK_R=triton.next_power_of_2(r), BLOCK_D=BLOCK_D, num_warps=2)
    return out


def learned_downsample_bwd(grad: Tensor, x: Tensor, logits: Tensor, causal: bool, need_x: bool = True,
                           need_logits: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """(grad_x (B, N, D) in x's dtype or None, grad_logits (M, r) or None)."""
    B, N, D, M, r = _check_down(x, logits)
    if tuple(grad.shape) != (B, M, D):
        raise ValueError(f"grad: expected shape ({B}, {M}, {D}), got {tuple(grad.shape)}")
    logits = logits.contiguous()
    grad = grad.contiguous()
    gx = torch.zeros(B, N, D, dtype=x.dtype, device=x.device) if need_x else None
    u = torch.zeros(B, M, r, dtype=logits.dtype, device=x.device) if need_logits else None
    if (need_x or need_logits) and B * M * D > 0:
        _down_kernel[(B * M,)](x, logits, x, grad, x if gx is None else gx, logits if u is None else u,
                               M, r, D, (r - 1) if causal else 0, *x.stride(),
                               BACKWARD=True, NEED_X=bool(need_x), NEED_LOGITS=bool(need_logits),
                               BLOCK_R=triton.next_power_of_2(r), BLOCK_D=BLOCK_D, num_warps=2)
    gl = None
    if need_logits:
        w = torch.softmax(logits, -1)
        U = u.sum(0)  # type: ignore[union-attr]
        gl = w * (U - (w * U).sum(-1, keepdim=True))
    return gx, gl


def _check_up(y: Tensor, bias: Tensor) -> Tuple[int, int, int, int]:
    if y.dim() != 3 or bias.dim() != 3:
        raise ValueError(f"y, bias: expected shapes (B, M, r*D) and (Mb, r, Db), got {tuple(y.shape)} and "
                         f"{tuple(bias.shape)}")
    B, M, RD = y.shape
    r = bias.shape[1]
    if r < 1 or RD % r != 0 or bias.shape[0] not in (1, M) or bias.shape[2] not in (1, RD // r):
        raise ValueError(f"bias: expected shape (1 | {M}, r, 1 | D) with r * D = {RD}, got {tuple(bias.shape)}")
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    if bias.dtype != acc:
        raise TypeError(f"bias: expected dtype {acc} for y of dtype {y.dtype}, got {bias.dtype}")
    return B, M, r, RD // r


def learned_upsample_fwd(y: Tensor, bias: Tensor, residual: Optional[Tensor], scale: Optional[Tensor]) -> Tensor:
    """y (B, M, r*D), bias (Mb, r, Db) -> (B, M*r, D) in y's dtype: residual + scale * (y + bias)."""
    B, M, r, D = _check_up(y, bias)
    out = torch.empty(B, M * r, D, dtype=y.dtype, device=y.device)
    if out.numel() == 0:
        return out
    be = bias.expand(M, r, D)  # broadcast dimensions get stride 0: never materialised
    rs = residual.stride() if residual is not None else (0, 0, 0)
    _up_kernel[(B * M, triton.cdiv(r * D, BLOCK_UP))](
        y, bias, y if residual is None else residual, bias if scale is None else scale, out, M, r, D,
        *y.stride(), *be.stride(), *rs,
        HAS_RES=residual is not None, HAS_SCALE=scale is not None, BLOCK=BLOCK_UP, num_warps=4)
    return out


def learned_upsample_bwd(grad: Tensor, y: Tensor, bias: Tensor, scale: Optional[Tensor], need_y: bool = True,
                         need_bias: bool = True, need_scale: bool = True
                         ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(grad_y (B, M, r*D) in y's dtype, grad_bias (Mb, r, Db), grad_scale 0-dim), each None when
    not needed; grad_scale is None when ``scale`` is None. The residual's gradient is ``grad``."""
    B, M, r, D = _check_up(y, bias)
    if tuple(grad.shape) != (B, M * r, D):
        raise ValueError(f"grad: expected shape ({B}, {M * r}, {D}), got {tuple(grad.shape)}")
    need_scale = bool(need_scale) and scale is not None
    grad = grad.contiguous()
    acc = bias.dtype
    nblk = triton.cdiv(r * D, BLOCK_UP)
    gy = torch.empty(B, M, r * D, dtype=y.dtype, device=y.device) if need_y else None
    gb = torch.empty(M, r * D, dtype=acc, device=y.device) if need_bias else None
    gs = torch.empty(M, nblk, dtype=acc, device=y.device) if need_scale else None
    if (need_y or need_bias or need_scale) and M * r * D > 0:
        be = bias.expand(M, r, D)
        _up_bwd_kernel[(M, nblk)](
            grad, y, bias, bias if scale is None else scale, y if gy is None else gy,
            bias if gb is None else gb, bias if gs is None else gs, B, M, r, D, *y.stride(), *be.stride(),
            HAS_SCALE=scale is not None, NEED_Y=bool(need_y), NEED_BIAS=bool(need_bias),
            NEED_SCALE=need_scale, BLOCK=BLOCK_UP, num_warps=4)
    if not (M * r * D > 0):  # nothing launched: every sum is empty
        for t in (gb, gs):
            if t is not None:
                t.zero_()
    grad_bias = None
    if need_bias:
        g3 = gb.reshape(M, r, D)  # type: ignore[union-attr]
        if scale is not None:
            g3 = g3 * scale
        dims = [i for i in (0, 2) if bias.shape[i] == 1 and g3.shape[i] != 1]
        grad_bias = g3.sum(dim=dims, keepdim=True) if dims else g3
    grad_scale = gs.sum() if need_scale else None  # type: ignore[union-attr]
    return gy, grad_bias, grad_scale
