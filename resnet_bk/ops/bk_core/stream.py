"""Streaming BK-Core: a carried state (causal chunks that continue a sequence), packed
variable-length sequences (``cu_seqlens``) and the final state of a chunk.

The causal pivots d_i = (a_i - z) - k_{i-1} / d_{i-1} are the whole cross-token state: a chunk that
continues a sequence needs only the pivot of the position before it (``initial_state``, d_prev) and
the coupling k_in = super_diag[..., 0] * sub_diag[..., 0] of that position to the chunk's first one,
whose first pivot is then d_0 = (a_0 - z) - k_in / d_prev. The chunk's final state is the pivot of
its last position, d_{N-1} = 1 / y_{N-1}.

How it is computed, exactly. The CPU, CUDA and Triton kernels (the cpp, cuda and triton backends)
take the state itself: their chains start from d_prev with the coupling k_in into position 0
(``bk_core_fwd_state``, ``bk_core_fwd_state_triton``), and their backward returns mu at position 0
(the conjugate of the gradient gt_0 reaching d_0), from which the state's gradients follow as in the
decode step: grad d_prev = gt_0 conj(1 / d_prev)^2 k_in and grad k_in = -Re(gt_0 conj(1 / d_prev)).
Every other backend (and those three under torch.compile or verify mode) takes real diagonals and one
shared z, so the complex self-energy k_in / d_prev is produced by two real *ghost* positions placed before the chunk
(the construction ``distributed.py`` uses at chunk ends, in a form with no division): a ghost g2 with
diagonal Re z starts the chain (its pivot is -i Im z), a ghost g1 with diagonal Re z + s Re d_prev
follows through the coupling kg2 = -Im z (Im z + s Im d_prev), so that its pivot is exactly
s * d_prev, and it couples to position 0 through kg1 = s * k_in:

    d_g2 = -i Im z,   d_g1 = s Re d_prev - i (Im z + kg2 / Im z) = s d_prev,   kg1 / d_g1 = k_in / d_prev.

s = max(1, |z| / |d_prev|) (detached: the result does not depend on it) keeps |d_g1| >= |z|, so the
ghosts' rounding is relative to d_prev. Every ghost value is a polynomial in (z, d_prev, k_in), so
autograd carries exact gradients through the ghosts to ``initial_state``, the first couplings and z.
The construction needs Im z != 0 (with a real z a real diagonal never makes a complex pivot): on
those backends a Python or CPU z with Im z = 0 raises (cpp, cuda and triton take any z).

Packed sequences: S sequences back to back in one row of T positions, ``cu_seqlens`` their offsets.
A sequence starts where the coupling into it is zero (d = a - z, and for the two-sided op e = a - z at
its end), so the kernels run the packed row as one sequence whose couplings at the boundaries are
multiplied by 0 (their gradients are 0: the boundary entries are ignored). With ``initial_state``
(S,), each sequence gets its two ghosts before its first position in a row of T + 2S positions.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _extension, _registry, _verify
from .._checks import check_bool, describe
from .canon import BKArgs, canon_bk
from .reference import bk_core_reference, complex_dtype_for

try:
    import numpy as _np
except ImportError:  # numpy is optional: the checks then run as tensor ops
    _np = None

__all__ = ["run_stream", "check_cu_seqlens"]


HAS_STATE_OP = _extension.has_op("bk_core_fwd_state")


class _CarriedState(torch.autograd.Function):
    """The CPU, CUDA or Triton kernel's causal op entered from a carried state: (a (B, N), k (Bk, N-1),
    zri, mask or None, d_in (B,) complex, k_in (B,), ops) -> y (B, N) complex, with gradients for
    every input (see the module doc for d_in's and k_in's); ``ops``: the (forward, backward) state ops
    (``_state_ops``)."""

    @staticmethod
    def forward(ctx, a, k, zri, mask, d_in, k_in, ops):
        y = ops[0](a, k, zri, mask, d_in, k_in)
        ctx.save_for_backward(a, k, zri, mask, d_in, k_in, y if mask is None else None)
        ctx.bwd_op = ops[1]
        return y

    @staticmethod
    def backward(ctx, gy):
        a, k, zri, mask, d_in, k_in, y = ctx.saved_tensors
        need = ctx.needs_input_grad
        ga, gk, gz, gm, mu0 = ctx.bwd_op(
            gy, a, k, zri, mask, d_in, k_in, mask is not None and need[3], need[1], need[2], y)
        g_din = g_kin = None
        if need[4] or need[5]:
            # the kernel's mu is the conjugate of the gradient reaching d (grad a = Re mu either way)
            gtr = (mu0 * d_in.reciprocal()).conj()  # gt_0 conj(1 / d_in), gt_0 = conj(mu_0)
            if need[5]:
                g_kin = -gtr.real
            if need[4]:
                g_din = gtr * d_in.reciprocal().conj() * k_in
        return (ga, gk if need[1] else None, gz if need[2] else None, gm if (mask is not None and need[3]) else None,
                g_din, g_kin, None)


# per device type: the backend whose compiled kernels take the state, if the build has its kernel
_STATE_BACKEND = {dev: be for dev, be in (("cpu", "cpp"), ("cuda", "cuda"))
                  if _extension.has_kernel("bk_core_fwd_state", dev.upper())}


def _triton_state_ops():
    """The Triton state ops, registered by ``triton.py`` when triton is importable (else None)."""
    ns = torch.ops.resnet_bk
    if not hasattr(ns, "bk_core_fwd_state_triton"):
        return None
    return ns.bk_core_fwd_state_triton, ns.bk_core_bwd_state_triton


def _native_state(args: BKArgs, kmask: Optional[Tensor], backend: Optional[str]):
    """The (forward, backward) ops that take a causal call's carried state themselves, or None (then
    the ghost positions): the backend the dispatch would choose for these arguments is cpp (CPU
    tensors) or cuda (CUDA tensors) and the build has the state op's kernel for that device, or it
    is triton (its kernels take the state); never while tracing or verifying."""
    if (args.B == 0 or torch.compiler.is_compiling() or _verify.verify_enabled()
            or args.a.dtype not in _registry.FAST_CPU_DTYPES):
        return None
    want = _STATE_BACKEND.get(args.a.device.type) if HAS_STATE_OP else None
    tri = _triton_state_ops()
    if want is None and tri is None:
        return None
    choice = _registry.choose_warned("bk_core", args.a.device, (args.a, args.k[:, 1:], args.zri, kmask, True),
                                     backend)
    if want is not None and choice.backend == want:
        return torch.ops.resnet_bk.bk_core_fwd_state, torch.ops.resnet_bk.bk_core_bwd_state
    if tri is not None and choice.backend == "triton":
        return tri
    return None


def _dispatch(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool,
              backend: Optional[str]) -> Tensor:
    """The canonical call on the chosen backend: (B, N) complex."""
    if a.shape[0] == 0:
        _registry.forced(backend)
        return bk_core_reference(a, k, zri, mask, causal)
    fn = _registry.select("bk_core", a.device, (a, k, zri, mask, causal), backend)
    return fn(a, k, zri, mask, causal)


def check_state(initial_state, batch_shape: Tuple[int, ...], rdt: torch.dtype, device: torch.device,
                what: str = "diag's batch shape") -> Tensor:
    """``initial_state`` -> (B,) complex of the compute dtype; clear errors otherwise."""
    if not isinstance(initial_state, Tensor):
        raise TypeError(f"initial_state: expected a complex tensor or None, got {describe(initial_state)}")
    cdt = complex_dtype_for(rdt)
    if initial_state.dtype != cdt:
        raise TypeError(f"initial_state: expected dtype {cdt} (the pivots of a {rdt} computation), got "
                        f"{initial_state.dtype}")
    if initial_state.device != device:
        raise RuntimeError(f"initial_state: expected a tensor on {device} (the device of diag), got one on "
                           f"{initial_state.device}")
    if tuple(initial_state.shape) != tuple(batch_shape):
        raise ValueError(f"initial_state: expected shape {tuple(batch_shape)} ({what}), got "
                         f"{tuple(initial_state.shape)}")
    return initial_state.reshape(-1)


def _check_z_for_state(z, zri: Tensor) -> None:
    """The ghosts need Im z != 0: checked where it costs no device synchronisation."""
    if isinstance(z, Tensor):
        if torch.compiler.is_compiling() or zri.device.type != "cpu":
            return
        zi = float(zri[1].detach())
    elif isinstance(z, numbers.Number):
        zi = complex(z).imag
    else:
        return
    if zi == 0.0:
        raise ValueError(f"z: a carried state (initial_state) needs Im z != 0, got z = {z!r} (with a real z and "
                         f"a real diagonal no pivot is complex, and a complex state cannot enter the chain)")


def _ghosts(state: Tensor, k_in: Tensor, zri: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(g2, g1, kg2, kg1), each (M,) real: two ghost positions whose chain hands k_in / state to the
    next position (module docstring)."""
    zr, zi = zri[0], zri[1]
    dr, di = state.real, state.imag
    with torch.no_grad():
        zabs = torch.sqrt(zr * zr + zi * zi)
        s = torch.maximum(zabs / state.abs(), torch.ones((), dtype=zr.dtype, device=zr.device))
    g2 = zr.expand(dr.shape)
    g1 = zr + s * dr
    kg2 = -zi * (zi + s * di)
    kg1 = s * k_in
    return g2, g1, kg2, kg1


def check_cu_seqlens(cu_seqlens, T: int, device: torch.device) -> Tuple[Tensor, Optional[object]]:
    """(``cu_seqlens``, its values as a NumPy view for a CPU tensor, else None). The values are
    checked on the host (one device-to-host read on a GPU, as varlen attention kernels need too),
    except under torch.compile."""
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens: expected an int32/int64 tensor of sequence offsets, got {describe(cu_seqlens)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens: expected dtype int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens: expected a 1-D tensor (S + 1,) of offsets, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise RuntimeError(f"cu_seqlens: expected a tensor on {device} (the device of diag), got one on "
                           f"{cu_seqlens.device}")
    host = None
    if not torch.compiler.is_compiling():
        if _np is not None and cu_seqlens.device.type == "cpu":
            host = cu_seqlens.numpy()  # a view: the checks below cost microseconds, not an op each
            first, last = int(host[0]), int(host[-1])
            decreasing = bool((host[1:] < host[:-1]).any())
        else:  # one device-to-host read for the three conditions
            n = cu_seqlens.shape[0]
            dec = (cu_seqlens[1:] < cu_seqlens[:-1]).any() if n > 1 else cu_seqlens.new_zeros((), dtype=torch.bool)
            first, decreasing, last = torch.stack([cu_seqlens[0].to(torch.int64), dec.to(torch.int64),
                                                   cu_seqlens[-1].to(torch.int64)]).tolist()
        if first != 0:
            raise ValueError(f"cu_seqlens: expected cu_seqlens[0] = 0, got {first}")
        if decreasing:
            c = cu_seqlens.tolist()
            i = next(i for i in range(1, len(c)) if c[i] < c[i - 1])
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got cu_seqlens[{i - 1}] = {c[i - 1]} > "
                             f"cu_seqlens[{i}] = {c[i]}")
        if last != T:
            raise ValueError(f"cu_seqlens: expected the last offset to be T = {T} (the packed length of diag), "
                             f"got {last}")
    return cu_seqlens, host


def cut_couplings(k: Tensor, cu_seqlens: Tensor, host=None) -> Tensor:
    """k (1, T-1), k[0, i] coupling position i to i + 1, with the entries that lead into a sequence
    start zeroed (the entries packed sequences ignore; their gradient is 0). ``host``: the offsets
    as a NumPy array (CPU): the entries are picked there and zeroed in k, a fresh tensor (the
    product of the off-diagonals; mul's backward does not read it). Otherwise k is padded by one
    entry on each side, so that k's entry i sits at column i + 1, the start it leads into, and
    every offset (0 and T included) is a valid column to zero, with no filtering on the device."""
    T = k.shape[1] + 1
    if host is not None:
        st = host[1:-1]
        idx = st[(st > 0) & (st < T)] - 1
        if len(idx) == 0:
            return k
        if not k.requires_grad:  # a plain store (an ATen index op wakes the thread pool: ~30 us)
            k.numpy()[0, idx] = 0
            return k
        return k.index_fill_(1, torch.from_numpy(idx.astype(_np.int64)), 0.0)
    kx = torch.nn.functional.pad(k, (1, 1)).index_fill_(1, cu_seqlens.to(torch.int64), 0.0)
    return kx[:, 1:-1]


def _starts(cu: Tensor, T: int) -> Tensor:
    """(T + 1,) bool: a sequence starts at position p (p = T: the end)."""
    return torch.zeros(T + 1, dtype=torch.bool, device=cu.device).index_fill_(0, cu, True)


def _apply_mask(y: Tensor, mask: Tensor) -> Tensor:
    """``mask * y`` with the masked op's conventions: exactly 0 where the mask is 0 (even where y is
    not finite); the mask's gradient is Re(conj(y) g)."""
    keep = (mask != 0) | torch.isfinite(y)
    return torch.where(keep, y, torch.zeros((), dtype=y.dtype, device=y.device)) * mask.to(y.dtype)


def _final_from(y_last: Tensor) -> Tensor:
    return 1.0 / y_last


def run_stream(diag: Tensor, super_diag: Tensor, sub_diag: Tensor, z, mask: Optional[Tensor], causal,
               backend: Optional[str], initial_state: Optional[Tensor], output_final_state,
               cu_seqlens: Optional[Tensor]) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``bk_core`` / ``bk_core_masked`` with any of initial_state, output_final_state, cu_seqlens."""
    causal = check_bool("causal", causal)
    output_final_state = check_bool("output_final_state", output_final_state)
    has_state = initial_state is not None
    if not causal and (has_state or output_final_state):
        which = "initial_state" if has_state else "output_final_state"
        raise ValueError(f"{which}: a carried state is defined for causal=True only, got causal=False (the two-sided "
                         f"G depends on positions after the chunk; its chunked form is "
                         f"resnet_bk.distributed.bk_core_sequence_parallel)")
    if cu_seqlens is not None:
        return _run_packed(diag, super_diag, sub_diag, z, mask, causal, backend, initial_state, output_final_state,
                           cu_seqlens)
    args = canon_bk(diag, super_diag, sub_diag, z, mask, coupled_in=has_state)
    B, N = args.B, args.N
    # with a final state and a mask the kernel runs unmasked (the causal mask saves no work) and
    # the mask is applied after, so the last pivot is there even where the mask is 0
    kmask = None if output_final_state else args.mask
    state_ops = _native_state(args, kmask, backend) if has_state else None
    if state_ops is not None:
        st = check_state(initial_state, args.batch_shape, args.a.dtype, args.a.device)
        y = _CarriedState.apply(args.a, args.k[:, 1:], args.zri, kmask, st, args.k[:, 0].expand(B), state_ops)
    elif has_state:
        st = check_state(initial_state, args.batch_shape, args.a.dtype, args.a.device)
        _check_z_for_state(z, args.zri)
        k_in = args.k[:, 0].expand(B)
        g2, g1, kg2, kg1 = _ghosts(st, k_in, args.zri)
        a = torch.cat([g2[:, None], g1[:, None], args.a], 1)
        k = torch.cat([kg2[:, None], kg1[:, None], args.k[:, 1:].expand(B, N - 1)], 1)
        m = None if kmask is None else torch.cat([kmask.new_zeros(B, 2), kmask], 1)
        y = _dispatch(a, k, args.zri, m, True, backend)[:, 2:]
    else:
        y = _dispatch(args.a, args.k, args.zri, kmask, causal, backend)
    final = None
    if output_final_state:
        final = _final_from(y[:, -1]).reshape(args.batch_shape)
        if args.mask is not None:
            y = _apply_mask(y, args.mask)
    y = y.reshape(args.batch_shape + (N,))
    return (y, final) if output_final_state else y


def _run_packed(diag, super_diag, sub_diag, z, mask, causal, backend, initial_state, output_final_state,
                cu_seqlens):
    if not isinstance(diag, Tensor) or not (diag.dim() == 1 or (diag.dim() == 2 and diag.shape[0] == 1)):
        got = tuple(diag.shape) if isinstance(diag, Tensor) else describe(diag)
        raise ValueError(f"cu_seqlens: packed sequences take diag of shape (T,) or (1, T) (all sequences back to "
                         f"back), got diag of shape {got}")
    has_state = initial_state is not None
    args = canon_bk(diag, super_diag, sub_diag, z, mask, coupled_in=has_state)
    T = args.N
    cu, host = check_cu_seqlens(cu_seqlens, T, args.a.device)
    S = cu.shape[0] - 1
    cu = cu.to(torch.int64)
    dev = args.a.device
    kmask = None if output_final_state else args.mask
    if not has_state:
        # couplings k[i] (i -> i + 1) into a sequence start are ignored: zeroed in canon's k, a
        # fresh tensor (the product super * sub; mul's backward does not read it)
        k = cut_couplings(args.k, cu, host) if S > 1 and T > 1 else args.k
        y = _dispatch(args.a, k, args.zri, kmask, causal, backend)[0]
    else:
        st = check_state(initial_state, (S,), args.a.dtype, dev, what="one state per sequence, S = len(cu_seqlens) - 1")
        lens = cu[1:] - cu[:-1]
        _check_z_for_state(z, args.zri)
        kfull = args.k[0].expand(T)  # kfull[p] couples p - 1 (or the state) to p
        # an empty sequence's ghosts couple to nothing (the next position is another sequence's)
        k_in = torch.where(lens > 0, kfull[cu[:-1].clamp(max=T - 1)], torch.zeros((), dtype=kfull.dtype, device=dev))
        g2, g1, kg2, kg1 = _ghosts(st, k_in, args.zri)
        # position p of sequence s moves to p + 2 (s + 1); sequence s's ghosts sit at cu[s] + 2s, + 1
        pos = torch.arange(T, device=dev)
        seq = torch.searchsorted(cu[1:], pos, right=True)
        tok = pos + 2 * (seq + 1)
        gpos = cu[:-1] + 2 * torch.arange(S, device=dev)
        L = T + 2 * S
        a = args.a.new_empty(L)
        a[tok] = args.a[0]
        a[gpos] = g2
        a[gpos + 1] = g1
        k = args.k.new_zeros(L)  # k[j] couples j to j + 1 (one spare entry at the end)
        if T > 1:
            k[tok[:-1]] = kfull[1:] * (~_starts(cu, T)[1:T]).to(kfull.dtype)
        k[gpos] = kg2
        k[gpos + 1] = kg1
        m = None
        if kmask is not None:
            m = kmask.new_zeros(L)
            m[tok] = kmask[0]
            m = m[None]
        y = _dispatch(a[None], k[None, : L - 1], args.zri, m, True, backend)[0][tok]
    final = None
    if output_final_state:
        lens = cu[1:] - cu[:-1]
        last = (cu[1:] - 1).clamp(min=0)
        yl = y[last]
        if has_state:
            final = torch.where(lens > 0, _final_from(yl), st)
        else:
            if not torch.compiler.is_compiling() and bool((lens == 0).any()):
                s0 = int((lens == 0).nonzero()[0])
                raise ValueError(f"cu_seqlens: sequence {s0} is empty and has no initial_state, so it has no final "
                                 f"state (pass initial_state, or drop output_final_state)")
            final = _final_from(yl)
        if args.mask is not None:
            y = _apply_mask(y, args.mask[0])
    y = y.reshape(tuple(diag.shape))
    return (y, final) if output_final_state else y
