"""The BK-Core reference: pure PyTorch, the specification in code, and the "reference" backend.

``bk_core_ref`` / ``bk_core_masked_ref`` are the twins of the public ops (same signatures). The
canonical functions below work on the arguments every backend receives (``canon.py``):

* ``a``    (B, N) float32/float64, contiguous: the diagonal of H.
* ``k``    (Bk, N-1) same dtype, Bk in {1, B}: the products ``b_i * c_i`` of the off-diagonals
  (Bk = 1 when one off-diagonal is shared by the whole batch; it is never materialised per row).
* ``zri``  (2,) same dtype: ``[Re z, Im z]``.
* ``mask`` (B, N) same dtype or None.

The math is docs/BK_CORE_MATH.md: stable Schur pivots d (left to right) and e (right to left),
``G_ii = 1 / (d_i + e_i - alpha_i)``, causal ``y_i = 1 / d_i``, and the exact O(N) gradient
recurrences. The loops over N are plain Python over columns (vectorised over the batch): this
backend is for reading and for checking, not for speed.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import _registry
from .._checks import check_bool
from .canon import canon_bk

__all__ = ["bk_core_fwd_ref", "bk_core_bwd_ref", "bk_core_ref", "bk_core_masked_ref", "complex_dtype_for"]


def complex_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _alpha_k(a: Tensor, k: Tensor, zri: Tensor) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    cdt = complex_dtype_for(a.dtype)
    z = torch.complex(zri[0], zri[1]).to(cdt)
    alpha = a.to(cdt) - z
    B, N = a.shape
    kk = k.expand(B, N - 1).to(cdt).unbind(1) if N > 1 else ()
    return alpha, list(alpha.unbind(1)), list(kk)


def _forward_pivots(al: List[Tensor], kk: List[Tensor]) -> List[Tensor]:
    """d_1 = alpha_1, d_i = alpha_i - k_{i-1} / d_{i-1}."""
    d = [al[0]]
    for i in range(1, len(al)):
        d.append(al[i] - kk[i - 1] / d[-1])
    return d


def _backward_pivots(al: List[Tensor], kk: List[Tensor]) -> List[Tensor]:
    """e_N = alpha_N, e_i = alpha_i - k_i / e_{i+1}."""
    N = len(al)
    e: List[Optional[Tensor]] = [None] * N
    e[N - 1] = al[N - 1]
    for i in range(N - 2, -1, -1):
        e[i] = al[i] - kk[i] / e[i + 1]
    return e  # type: ignore[return-value]


def bk_core_fwd_ref(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """Canonical forward: (B, N) complex G_ii (or 1/d_i when causal), times mask if given."""
    B, N = a.shape
    cdt = complex_dtype_for(a.dtype)
    if B == 0:
        return torch.empty(0, N, dtype=cdt, device=a.device)
    alpha, al, kk = _alpha_k(a, k, zri)
    D = torch.stack(_forward_pivots(al, kk), 1)
    if causal:
        G = 1.0 / D
    else:
        E = torch.stack(_backward_pivots(al, kk), 1)
        G = 1.0 / (D + E - alpha)
    if mask is not None:
        # positions whose mask is 0 are not computed: exactly 0, even where G is not finite
        m = mask.to(G.dtype)
        G = torch.where(mask != 0, G * m, torch.zeros((), dtype=G.dtype, device=G.device))
    return G


def bk_core_bwd_ref(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor],
                    causal: bool) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Canonical backward: (grad_a (B,N), grad_k (Bk,N-1), grad_zri (2,), grad_mask (B,N) | None).

    ``grad`` is PyTorch's upstream gradient of the complex output (B, N).
    """
    B, N = a.shape
    rdt = a.dtype
    cdt = complex_dtype_for(rdt)
    if B == 0:
        return (torch.zeros_like(a), torch.zeros_like(k), torch.zeros_like(zri),
                None if mask is None else torch.zeros_like(mask))
    alpha, al, kk = _alpha_k(a, k, zri)
    g = grad.to(cdt)
    w = g.conj()
    if mask is not None:
        w = w * mask.to(cdt)
    d = _forward_pivots(al, kk)
    D = torch.stack(d, 1)
    ws = w.unbind(1)
    gk_cols: List[Tensor] = []
    zero = torch.zeros((), dtype=cdt, device=a.device)

    def unmasked(x: Tensor, j: Optional[int] = None) -> Tensor:
        # a masked-out position was not computed: it contributes exactly 0 (even if G is not finite)
        if mask is None:
            return x
        m = mask if j is None else mask[:, j]
        return torch.where(m != 0, x, zero)

    if causal:
        # mu_N = -w_N / d_N^2 ; mu_j = mu_{j+1} k_j / d_j^2 - w_j / d_j^2
        mu: List[Optional[Tensor]] = [None] * N
        mu[N - 1] = unmasked(-ws[N - 1] / d[N - 1] ** 2, N - 1)
        for j in range(N - 2, -1, -1):
            mu[j] = mu[j + 1] * kk[j] / d[j] ** 2 + unmasked(-ws[j] / d[j] ** 2, j)
        MU = torch.stack(mu, 1)  # type: ignore[arg-type]
        grad_a = MU.real
        for j in range(N - 1):
            gk_cols.append((-mu[j + 1] / d[j]).real)  # type: ignore[operator]
        gz = -MU.sum().conj()
        G = 1.0 / D
    else:
        e = _backward_pivots(al, kk)
        E = torch.stack(e, 1)
        G = 1.0 / (D + E - alpha)
        P = unmasked(w * G * G)
        p = P.unbind(1)
        L = [p[0]]
        for j in range(1, N):
            L.append(kk[j - 1] / e[j] ** 2 * L[-1] + p[j])
        R: List[Optional[Tensor]] = [None] * N
        R[N - 1] = p[N - 1]
        for j in range(N - 2, -1, -1):
            R[j] = p[j] + kk[j] / d[j] ** 2 * R[j + 1]
        A = torch.stack(L, 1) + torch.stack(R, 1) - P  # type: ignore[arg-type]
        grad_a = -A.real
        for j in range(N - 1):
            gk_cols.append((L[j] / e[j + 1] + R[j + 1] / d[j]).real)  # type: ignore[operator]
        gz = A.sum().conj()
    if N > 1:
        grad_k = torch.stack(gk_cols, 1).to(rdt)
    else:
        grad_k = torch.zeros(B, 0, dtype=rdt, device=a.device)
    if k.shape[0] == 1 and B != 1:
        grad_k = grad_k.sum(0, keepdim=True)
    grad_zri = torch.view_as_real(gz.resolve_conj()).to(rdt)
    grad_mask = None
    if mask is not None:
        grad_mask = (G.conj() * g).real.to(mask.dtype)
    return grad_a.to(rdt).contiguous(), grad_k.contiguous(), grad_zri, grad_mask


class _BKCoreRef(torch.autograd.Function):
    """The canonical forward with its exact (spec) backward, so the reference backend gives the
    same gradients as every other backend."""

    @staticmethod
    def forward(ctx, a, k, zri, mask, causal):
        ctx.save_for_backward(a, k, zri, mask)
        ctx.causal = causal
        return bk_core_fwd_ref(a, k, zri, mask, causal)

    @staticmethod
    def backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        ga, gk, gz, gm = bk_core_bwd_ref(grad, a, k, zri, mask, ctx.causal)
        return ga, gk, gz, gm, None


def bk_core_reference(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
    """The reference backend's implementation (canonical arguments, with autograd)."""
    return _BKCoreRef.apply(a, k, zri, mask, causal)


def bk_core_ref(diag: Tensor, super_diag: Tensor, sub_diag: Tensor, z, *, causal: bool = False,
                initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                cu_seqlens: Optional[Tensor] = None):
    """Reference twin of :func:`resnet_bk.ops.bk_core` (same signature and checks, pure PyTorch)."""
    return bk_core_masked_ref(diag, super_diag, sub_diag, z, None, causal=causal, initial_state=initial_state,
                              output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def _stream_chunk_ref(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool,
                      state: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The streaming forms written directly (not through the ghosts the backends use): plain
    autograd through the pivot loop. ``k`` (Bk, N) when ``state`` (B,) is given (entry 0 couples the
    state to position 0), else (Bk, N-1). Returns ((B, N) output, (B,) last pivot)."""
    B, N = a.shape
    cdt = complex_dtype_for(a.dtype)
    z = torch.complex(zri[0], zri[1]).to(cdt)
    al = list((a.to(cdt) - z).unbind(1))
    kk = list(k.expand(B, k.shape[1]).to(cdt).unbind(1))
    if state is not None:
        al[0] = al[0] - kk[0] / state
        kk = kk[1:]
    d = _forward_pivots(al, kk)
    D = torch.stack(d, 1)
    if causal:
        G = 1.0 / D
    else:
        E = torch.stack(_backward_pivots(al, kk), 1)
        G = 1.0 / (D + E - torch.stack(al, 1))
    if mask is not None:
        G = torch.where(mask != 0, G, torch.zeros((), dtype=cdt, device=a.device)) * mask.to(cdt)
    return G, d[-1]


def _stream_ref(diag, super_diag, sub_diag, z, mask, causal, initial_state, output_final_state, cu_seqlens):
    from .stream import check_cu_seqlens, check_state  # the same argument checks as the op
    causal = check_bool("causal", causal)
    output_final_state = check_bool("output_final_state", output_final_state)
    if not causal and (initial_state is not None or output_final_state):
        raise ValueError("initial_state: a carried state is defined for causal=True only")
    args = canon_bk(diag, super_diag, sub_diag, z, mask, coupled_in=initial_state is not None)
    if cu_seqlens is None:
        st = None
        if initial_state is not None:
            st = check_state(initial_state, args.batch_shape, args.a.dtype, args.a.device)
        y, dl = _stream_chunk_ref(args.a, args.k, args.zri, args.mask, causal, st)
        y = y.reshape(args.batch_shape + (args.N,))
        return (y, dl.reshape(args.batch_shape)) if output_final_state else y
    T = args.N
    cu = check_cu_seqlens(cu_seqlens, T, args.a.device)[0].tolist()
    S = len(cu) - 1
    st = None if initial_state is None else check_state(initial_state, (S,), args.a.dtype, args.a.device)
    ys, finals = [], []
    kf = args.k[0].expand(args.k.shape[1])
    for s in range(S):
        lo, hi = cu[s], cu[s + 1]
        if hi == lo:
            finals.append(st[s] if st is not None else None)
            continue
        if st is None:
            ks = kf[lo:hi - 1]
        else:
            ks = kf[lo:hi]
        m = None if args.mask is None else args.mask[:, lo:hi]
        y, dl = _stream_chunk_ref(args.a[:, lo:hi], ks[None], args.zri, m, causal,
                                  None if st is None else st[s:s + 1])
        ys.append(y[0])
        finals.append(dl[0])
    y = torch.cat(ys).reshape(tuple(diag.shape))
    if not output_final_state:
        return y
    if any(f is None for f in finals):
        raise ValueError("cu_seqlens: an empty sequence without initial_state has no final state")
    return y, torch.stack(finals)


def bk_core_masked_ref(diag: Tensor, super_diag: Tensor, sub_diag: Tensor, z, mask: Optional[Tensor], *,
                       causal: bool = False, initial_state: Optional[Tensor] = None,
                       output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None):
    """Reference twin of :func:`resnet_bk.ops.bk_core_masked` (same signature and checks, pure PyTorch).
    The streaming arguments are computed directly (a pivot loop per sequence with plain autograd),
    independently of the ghost positions through which the op's backends compute them."""
    if initial_state is not None or output_final_state is not False or cu_seqlens is not None:
        return _stream_ref(diag, super_diag, sub_diag, z, mask, causal, initial_state, output_final_state,
                           cu_seqlens)
    args = canon_bk(diag, super_diag, sub_diag, z, mask)
    out = bk_core_reference(args.a, args.k, args.zri, args.mask, check_bool("causal", causal))
    return out.reshape(args.batch_shape + (args.N,))


_registry.register_impl("bk_core", "reference", bk_core_reference)
