"""Distributed BK-Core: sequence parallelism over ``torch.distributed`` ranks.

One sequence (e.g. 2^22 tokens) is split along its length over the ranks of a process group; each rank
holds and computes one contiguous chunk, and the ranks exchange only O(batch) numbers: the 2x2
Moebius transfer matrices of their chunks' pivot recursions (docs/BK_CORE_MATH.md, "Parallel
form") in forward, and the gradients of those matrices (the adjoint carries) in backward. The result
equals the single-process :func:`resnet_bk.ops.bk_core` of the whole sequence, forward and backward.
Usage and the exact data layout: docs/DISTRIBUTED.md.

How a rank computes its chunk exactly. Inside the chunk [s, s + n) the global pivots obey the local
recursions, except that the first forward pivot sees the left neighbour's last pivot d_{s-1} through
the self-energy k_{s-1} / d_{s-1}, and the last backward pivot sees the right neighbour's first
backward pivot e_{s+n} through k_{s+n-1} / e_{s+n}. A complex self-energy cannot be added to the
(real) diagonal of the op, so each one is produced by a real *ghost* position appended to the chunk: a
chain end with diagonal g and coupling kg has self-energy kg / (g - z), and

    kg = -Im z * k / Im d,    g = Re z - Im z * Re d / Im d    give    kg / (g - z) = k / d

exactly (g - z = -(Im z / Im d) d). For real symmetric H and Im z > 0 every pivot has
Im d <= -Im z < 0, so |kg| <= |k| and nothing is ever divided by zero. The local problem
[ghost, chunk, ghost] is then an ordinary bk_core call (any backend, the fast kernel), and autograd
carries the gradient through the ghosts to the boundary pivots, through the transfer matrices to the
ranks that own them.

The transfer matrices themselves are O(n) products of 2x2 complex matrices, reduced as a balanced
tree (log2 n vectorised torch steps), each partial product rescaled by its largest entry (exact: only
ratios matter; the scale is detached, it has zero derivative).
"""
from __future__ import annotations

import numbers
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .._checks import check_precision_class, check_same_device, check_tensor, compute_dtype
from .api import bk_core
from .canon import canon_z

__all__ = ["bk_core_sequence_parallel"]

Number = Union[int, float, complex]


class _GatherCarries(torch.autograd.Function):
    """all_gather of a small (B, C) tensor with its adjoint: the gradient of the gathered (P, B, C)
    tensor is summed over ranks (all_reduce) and each rank keeps its own slice. Every rank of the group
    must run the backward (a collective), as with DistributedDataParallel."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x, group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, g: Tensor):
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM, group=ctx.group)
        return g[dist.get_rank(ctx.group)].clone(), None  # own storage: views of it must start aligned


class _Tie(torch.autograd.Function):
    """Returns ``out`` unchanged but makes it depend on ``carries`` with a zero gradient, so that the
    collective in _GatherCarries.backward runs on every rank even where the output does not use the
    gathered carries (rank 0 of the causal op). Without it the ranks' collectives would pair up
    wrongly (or hang)."""

    @staticmethod
    def forward(ctx, out: Tensor, carries: Tensor) -> Tensor:
        ctx.shape, ctx.dtype = carries.shape, carries.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g, g.new_zeros(ctx.shape, dtype=ctx.dtype)


def _rescale(m: Tensor, vector: bool = False) -> Tensor:
    """Divide each 2x2 matrix (or 2-vector) by its largest entry magnitude; detached, since the pivots
    depend only on ratios (the derivative with respect to the scale is zero)."""
    dims = (-1,) if vector else (-2, -1)
    s = m.detach().abs().amax(dim=dims, keepdim=True)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return m / s


def _chain_product(mats: Tensor) -> Tensor:
    """(B, L, 2, 2) matrices in application order -> (B, 2, 2) product X_{L-1} @ ... @ X_0."""
    while mats.shape[1] > 1:
        L = mats.shape[1]
        if L % 2:
            eye = torch.eye(2, dtype=mats.dtype, device=mats.device).expand(mats.shape[0], 1, 2, 2)
            mats = torch.cat([mats, eye], 1)
        mats = _rescale(mats[:, 1::2] @ mats[:, 0::2])
    return mats[:, 0]


def _pivot_mats(alpha: Tensor, kin: Tensor) -> Tensor:
    """[[alpha_p, -k_p], [1, 0]] for each p: the pivot step x -> alpha_p - k_p / x."""
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    return torch.stack([torch.stack([alpha, -kin.to(alpha.dtype)], -1), torch.stack([one, zero], -1)], -2)


def _shift_mat(alpha: Tensor) -> Tensor:
    """[[-1, alpha], [0, 1]]: the map sigma -> alpha - sigma (a self-energy entering the chain end)."""
    one, zero = torch.ones_like(alpha), torch.zeros_like(alpha)
    return torch.stack([torch.stack([-one, alpha], -1), torch.stack([zero, one], -1)], -2)


def _ghost(z_re, z_im, k: Tensor, x: Tensor, real_z: bool, what: str):
    """Real ghost (diagonal g, coupling kg) whose self-energy kg / (g - z) equals k / x (x = the
    neighbour's boundary pivot, complex (B,)). See the module docstring."""
    if real_z:  # everything is real: k / x is real, g - z = 1
        return z_re + torch.ones_like(k), k / x.real
    xi = x.imag
    # k = 0 (an uncoupled boundary): the ghost is decoupled whatever x is.
    bad = (xi == 0) & (k != 0)
    if bool(bad.any()):
        raise ValueError(
            f"bk_core_sequence_parallel: the {what} boundary pivot is real although Im z != 0 (possible only "
            f"for a nonsymmetric H with couplings of both signs); the ghost construction cannot represent "
            f"its self-energy: split the sequence at another position")
    safe = torch.where(xi == 0, torch.ones_like(xi), xi)
    kg = torch.where(k == 0, torch.zeros_like(k), -z_im * k / safe)
    g = torch.where(k == 0, z_re + torch.ones_like(k), z_re - z_im * x.real / safe)
    return g, kg


def bk_core_sequence_parallel(diag_chunk: Tensor, super_chunk: Tensor, sub_chunk: Tensor,
                              z: Union[Number, Tensor], *, group=None, causal: bool = False,
                              backend: Optional[str] = None) -> Tensor:
    """``bk_core`` of one long sequence split along N over the ranks of ``group``.

    Rank r (of P) holds the contiguous positions [s_r, s_r + n_r) of the global sequence, in rank
    order (s_0 = 0, s_{r+1} = s_r + n_r; n_r >= 1 and may differ between ranks).

    Args:
        diag_chunk: (..., n_r) real: ``diag[..., s_r : s_r + n_r]``. The leading shape must be the same
            on every rank.
        super_chunk, sub_chunk: broadcastable to (..., m_r) with m_r = n_r on every rank but the last
            and m_r = n_r - 1 on the last: ``super_diag[..., s_r : s_r + m_r]``, i.e. the couplings
            (i, i+1) for i in this rank's chunk; the last entry couples this rank's last position
            to the next rank's first.
        z: the same spectral shift on every rank (Python number, or a 0-dim tensor; a tensor's
            gradient on each rank is that rank's part: sum it over ranks, see docs/DISTRIBUTED.md).
        group: the process group (default: the world).
        causal: the causal variant (only the forward transfer matrices are exchanged).
        backend: backend of the local bk_core call.

    Returns:
        (..., n_r) complex: ``bk_core(diag, super_diag, sub_diag, z)[..., s_r : s_r + n_r]`` of the
        global problem, differentiable (backward is a collective: every rank must run it).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("bk_core_sequence_parallel: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(causal, bool):
        raise TypeError(f"causal: expected a bool, got {type(causal).__name__} {causal!r}")
    P = dist.get_world_size(group)
    r = dist.get_rank(group)
    diag_chunk = check_tensor("diag_chunk", diag_chunk)
    if diag_chunk.dim() < 1 or diag_chunk.shape[-1] < 1:
        raise ValueError(f"diag_chunk: expected shape (..., n) with n >= 1 positions on every rank, got "
                         f"{tuple(diag_chunk.shape)} on rank {r}")
    last = r == P - 1
    n = diag_chunk.shape[-1]
    m = n - 1 if last else n
    batch = tuple(diag_chunk.shape[:-1])
    want = batch + (m,)
    for name, t in (("super_chunk", super_chunk), ("sub_chunk", sub_chunk)):
        t = check_tensor(name, t)
        check_same_device("diag_chunk", diag_chunk, name, t)
        check_precision_class("diag_chunk", diag_chunk, name, t)
        try:
            ok = t.dim() >= 1 and torch.broadcast_shapes(tuple(t.shape), want) == want
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name}: expected a shape broadcastable to {want} on rank {r} of {P} (m = n - 1 on the last "
                f"rank, m = n elsewhere: the last entry couples to the next rank's first position), "
                f"got {tuple(t.shape)}")
    if P == 1:
        return bk_core(diag_chunk, super_chunk, sub_chunk, z, causal=causal, backend=backend)

    rdt = compute_dtype(diag_chunk)
    cdt = torch.complex128 if rdt == torch.float64 else torch.complex64
    dev = diag_chunk.device
    zri = canon_z(z, rdt, dev, "diag_chunk")  # validates z; differentiable when z is a tensor
    z_re, z_im = zri[0], zri[1]
    if isinstance(z, Tensor):
        real_z = bool(z_im.detach() == 0)
        if real_z and z.requires_grad:
            raise ValueError("z: a tensor z with Im z = 0 that requires grad is not supported by "
                             "bk_core_sequence_parallel (the boundary construction is real there and has no "
                             "derivative in Im z); use Im z != 0 or a Python number")
    else:
        real_z = complex(z).imag == 0
    zc = torch.complex(z_re, z_im)

    B = 1
    for s in batch:
        B *= s
    a = diag_chunk.to(rdt).reshape(B, n)
    k = (super_chunk.to(rdt) * sub_chunk.to(rdt)).expand(want).reshape(B, m)
    k_int = k[:, : n - 1]                                   # couplings inside the chunk
    k_out = k[:, n - 1] if not last else a.new_zeros(B)     # coupling to the next rank
    alpha = a.to(cdt) - zc

    # This chunk's transfer matrices (application order, see the module docstring):
    #   F: sigma_in -> d_last      (forward pivots; sigma_in = self-energy from the left)
    #   H: tau_in   -> e_first     (backward pivots; tau_in = self-energy from the right)
    fmats = torch.cat([_shift_mat(alpha[:, :1]), _pivot_mats(alpha[:, 1:], k_int)], 1)
    F = _chain_product(fmats)
    if causal:
        H = torch.zeros_like(F)
    else:
        hm = torch.cat([_shift_mat(alpha[:, n - 1:]), _pivot_mats(alpha[:, : n - 1], k_int).flip(1)], 1)
        H = _chain_product(hm)
    payload = torch.cat([torch.view_as_real(F).reshape(B, 8), torch.view_as_real(H).reshape(B, 8),
                         k_out.reshape(B, 1)], 1)
    allc = _GatherCarries.apply(payload, group)             # (P, B, 17)
    Fs = torch.view_as_complex(allc[:, :, :8].reshape(P, B, 2, 2, 2).contiguous())
    Hs = torch.view_as_complex(allc[:, :, 8:16].reshape(P, B, 2, 2, 2).contiguous())
    kouts = allc[:, :, 16]

    def k_map(kq: Tensor) -> Tensor:  # x -> kq / x
        o, zr = torch.ones_like(kq).to(cdt), torch.zeros_like(kq).to(cdt)
        return torch.stack([torch.stack([zr, kq.to(cdt)], -1), torch.stack([o, zr], -1)], -2)

    def apply(mat: Tensor, v: Tensor) -> Tensor:
        return _rescale((mat @ v.unsqueeze(-1)).squeeze(-1), vector=True)

    start = torch.zeros(B, 2, dtype=cdt, device=dev)
    start[:, 1] = 1  # homogeneous (0, 1): self-energy 0 at the ends of the global chain
    one_r = a.new_ones(B)
    if r > 0:  # d_{s-1}: the last forward pivot of rank r-1
        v = start
        for q in range(r):
            v = apply(Fs[q], v)
            if q < r - 1:
                v = apply(k_map(kouts[q]), v)
        g_l, kg_l = _ghost(z_re, z_im, kouts[r - 1], v[:, 0] / v[:, 1], real_z, "left")
    else:
        g_l, kg_l = z_re + one_r, 0 * one_r
    if r < P - 1 and not causal:  # e_{s+n}: the first backward pivot of rank r+1
        w = start
        for q in range(P - 1, r, -1):
            w = apply(Hs[q], w)
            if q > r + 1:
                w = apply(k_map(kouts[q - 1]), w)
        g_r, kg_r = _ghost(z_re, z_im, k_out, w[:, 0] / w[:, 1], real_z, "right")
    else:
        g_r, kg_r = z_re + one_r, 0 * one_r

    a_aug = torch.cat([g_l.reshape(B, 1), a, g_r.reshape(B, 1)], 1)
    k_aug = torch.cat([kg_l.reshape(B, 1), k_int, kg_r.reshape(B, 1)], 1)
    ones = torch.ones(n + 1, dtype=rdt, device=dev)
    G = bk_core(a_aug, k_aug, ones, z, causal=causal, backend=backend)
    return _Tie.apply(G[:, 1:-1].reshape(batch + (n,)), allc)
