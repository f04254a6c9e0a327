"""Argument checking and canonicalisation of the BK-Core ops: every public BK-Core op validates its
arguments here, before any kernel runs, and every backend receives the canonical form
(``BKArgs``; see ``reference.py``)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.fx.experimental.symbolic_shapes import guard_or_false

from .._checks import check_precision_class, check_same_device, check_tensor, compute_dtype, describe


def canon_z(z, rdt: torch.dtype, device: torch.device, ref_name: str = "diag") -> Tensor:
    """z (Python number or 0-dim tensor) -> (2,) real tensor [Re z, Im z] of dtype rdt.

    Differentiable in z when z is a tensor (a learnable shift)."""
    if isinstance(z, Tensor):
        if z.dim() != 0:
            raise ValueError(f"z: expected a Python number or a 0-dim tensor, got shape {tuple(z.shape)}")
        if z.device != device:
            raise RuntimeError(f"z: expected a tensor on {device} (the device of {ref_name}), got one on "
                               f"{z.device}; register it as a buffer/parameter of your module or move it")
        if z.dtype == torch.bool or not (z.is_complex() or z.is_floating_point()):
            raise TypeError(f"z: expected a complex or real floating 0-dim tensor, got dtype {z.dtype}")
        if z.is_complex():
            return torch.view_as_real(z.to(torch.complex128 if rdt == torch.float64 else torch.complex64))
        zr = z.to(rdt)
        return torch.stack([zr, torch.zeros_like(zr)])
    if isinstance(z, bool) or not isinstance(z, numbers.Number):
        raise TypeError(f"z: expected a Python number or a 0-dim complex tensor, got {describe(z)}")
    zc = complex(z)
    if not (math.isfinite(zc.real) and math.isfinite(zc.imag)):
        raise ValueError(f"z: expected a finite spectral shift, got {zc!r}")
    if torch.compiler.is_compiling():
        return torch.tensor([zc.real, zc.imag], dtype=rdt, device=device)
    # A model calls the op with the same Python z every step: reuse its (2,) tensor (read-only for
    # every backend) instead of building one per call. Entries are never evicted (a captured CUDA
    # graph may still read one); past _Z_CACHE_MAX distinct values a tensor is built per call.
    key = (zc, rdt, device)
    t = _Z_CACHE.get(key)
    if t is None:
        t = _z_tensor(zc, rdt, device)
        if len(_Z_CACHE) < _Z_CACHE_MAX:
            _Z_CACHE[key] = t
    return t


_Z_CACHE: dict = {}
_Z_CACHE_MAX = 1024


def cached_z(z, rdt: torch.dtype, device: torch.device) -> Tensor:
    """``canon_z`` of a Python number for the per-step call: the cache is read first (an entry was
    validated when it was made; a NaN z never matches one), then ``canon_z`` validates and adds it."""
    t = _Z_CACHE.get((complex(z), rdt, device))
    return t if t is not None else canon_z(z, rdt, device)


def _z_tensor(zc: complex, rdt: torch.dtype, device: torch.device) -> Tensor:
    """[Re z, Im z] on ``device``. On a GPU it is filled by two kernel launches, not copied from the
    host, so that the first call with a new z may happen inside CUDA graph capture."""
    with torch.inference_mode(False):  # a normal tensor: autograd may save it later
        if device.type == "cpu":
            return torch.tensor([zc.real, zc.imag], dtype=rdt)
        t = torch.empty(2, dtype=rdt, device=device)
        t[0].fill_(zc.real)
        t[1].fill_(zc.imag)
        return t


def known_eq(a, b) -> bool:
    """a == b for sizes; a traced data-dependent (unbacked) size is not guarded on: unless the
    equality is known symbolically (same symbol), it counts as False. Plain ints cost no call."""
    if type(a) is int and type(b) is int:
        return a == b
    return guard_or_false(a == b)


def _broadcastable_to(shape: Tuple[int, ...], want: Tuple[int, ...]) -> bool:
    """shape broadcasts to exactly `want` (right-aligned, each dim equal or 1). A plain loop: this
    runs on every call, and torch.broadcast_shapes costs ~10 us."""
    if len(shape) > len(want):
        return False
    return all(known_eq(s, w) or known_eq(s, 1) for s, w in zip(reversed(shape), reversed(want)))


@dataclass
class BKArgs:
    a: Tensor            # (B, N) compute dtype, contiguous
    k: Tensor            # (Bk, N-1), Bk in {1, B}
    zri: Tensor          # (2,)
    mask: Optional[Tensor]  # (B, N) compute dtype or None
    batch_shape: Tuple[int, ...]
    N: int

    @property
    def B(self) -> int:
        return self.a.shape[0]


def canon_bk(diag, super_diag, sub_diag, z, mask=None, *, mask_name: str = "mask",
             coupled_in: bool = False) -> BKArgs:
    """Validates a BK-Core call and builds its canonical arguments. ``coupled_in`` (a chunk with a
    carried state, ``stream.py``): the off-diagonals have N entries, entry 0 coupling the position
    before the chunk to position 0, so ``k`` is (Bk, N); otherwise N - 1 entries, ``k`` (Bk, N-1)."""
    diag = check_tensor("diag", diag)
    if diag.dim() < 1:
        raise ValueError("diag: expected shape (..., N) with N >= 1, got a 0-dim tensor")
    N = diag.shape[-1]
    if N == 0:
        raise ValueError(f"diag: expected a sequence length N >= 1, got shape {tuple(diag.shape)} (N = 0)")
    batch_shape = tuple(diag.shape[:-1])
    rdt = compute_dtype(diag)
    n_off = N if coupled_in else N - 1
    want = batch_shape + (n_off,)
    offs = []
    for name, t in (("super_diag", super_diag), ("sub_diag", sub_diag)):
        t = check_tensor(name, t)
        check_same_device("diag", diag, name, t)
        check_precision_class("diag", diag, name, t)
        if t.dim() < 1 or t.dim() > len(want):
            raise ValueError(f"{name}: expected a shape broadcastable to {want} (diag is {tuple(diag.shape)}), "
                             f"got {tuple(t.shape)}")
        if not _broadcastable_to(tuple(t.shape), want):
            what = (f"N = {N} off-diagonal entries (entry 0 couples the carried state to position 0)" if coupled_in
                    else f"N - 1 = {N - 1} off-diagonal entries")
            hint = ""
            if not coupled_in and t.shape[-1] == N and N > 1:
                hint = "; N entries are for a chunk with a predecessor (pass initial_state, causal=True)"
            elif coupled_in and t.shape[-1] == N - 1 and N > 1:
                hint = "; with initial_state the off-diagonals have N entries, entry 0 coupling the state to position 0"
            raise ValueError(f"{name}: expected a shape broadcastable to {want} ({what} for diag of shape "
                             f"{tuple(diag.shape)}), got {tuple(t.shape)}{hint}")
        offs.append(t)
    zri = canon_z(z, rdt, diag.device)
    B = math.prod(batch_shape)
    a = diag.to(rdt).reshape(B, N).contiguous()
    kb = offs[0].to(rdt) * offs[1].to(rdt)
    lead = kb.shape[:-1]
    if all(s == 1 for s in lead):
        # one off-diagonal shared by the whole batch: never materialised per row
        k = kb.reshape(1, kb.shape[-1]).expand(1, n_off).contiguous()
    else:
        k = kb.expand(want).reshape(B, n_off).contiguous()
    m = None
    if mask is not None:
        mask = check_tensor(mask_name, mask, allow_bool=True)
        check_same_device("diag", diag, mask_name, mask)
        if tuple(mask.shape) != tuple(diag.shape):
            raise ValueError(f"{mask_name}: expected the shape of diag {tuple(diag.shape)}, got {tuple(mask.shape)}")
        m = mask.to(rdt).reshape(B, N).contiguous()
    return BKArgs(a, k, zri, m, batch_shape, N)
