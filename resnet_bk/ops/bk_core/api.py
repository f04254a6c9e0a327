"""The public BK-Core ops: ``bk_core``, ``bk_core_masked``, ``bk_core_features`` and ``explain``.

Each call is canonicalised once (``canon.py``: validation and the canonical arguments), then the
registry chooses the backend. The call a model makes every step (a CPU tensor the compiled op takes
as it is) goes straight to the compiled op when the registry says it may
(``_registry.compiled_cpu_takes``): the same op and arguments the general path would build.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _extension, _registry
from .._checks import check_bool
from .canon import BKArgs, cached_z, canon_bk, known_eq
from .compiled import bk_core_compiled
from .reference import bk_core_reference
from .stream import check_cu_seqlens, cut_couplings, run_stream

# The complex dtype of each fast CPU dtype (a dict: torch.compile cannot trace dtype.to_complex()).
_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128}

Number = Union[int, float, complex]


def _run(args: BKArgs, causal, backend: Optional[str]) -> Tensor:
    causal = check_bool("causal", causal)
    if known_eq(args.B, 0):  # (not guarded on a traced unbacked batch: the kernels take 0 rows)
        # An empty batch runs no kernel, but stays in the autograd graph (backward through it gives
        # zero-size gradients and a zero grad for z): the reference handles B = 0 without a loop.
        _registry.forced(backend)  # a bad backend name still raises
        out = bk_core_reference(args.a, args.k, args.zri, args.mask, causal)
        return out.reshape(args.batch_shape + (args.N,))
    fn = _registry.select("bk_core", args.a.device, (args.a, args.k, args.zri, args.mask, causal), backend)
    out = fn(args.a, args.k, args.zri, args.mask, causal)
    return out.reshape(args.batch_shape + (args.N,))


def bk_core(diag: Tensor, super_diag: Tensor, sub_diag: Tensor, z: Union[Number, Tensor], *,
            causal: bool = False, backend: Optional[str] = None, initial_state: Optional[Tensor] = None,
            output_final_state: bool = False, cu_seqlens: Optional[Tensor] = None
            ) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Diagonal of the resolvent of a tridiagonal H: ``G_ii = ((H - zI)^-1)_ii``.

    Args:
        diag: (..., N) real; float32/float64 (bfloat16/float16 are computed in float32).
        super_diag, sub_diag: real, broadcastable to (..., N-1); a shared (N-1,) off-diagonal is
            never materialised per batch row.
        z: Python number or 0-dim complex tensor (may require grad: a learnable shift).
        causal: return the causal variant ``1 / d_i`` (the resolvent of the leading i x i block),
            which never sees positions after i.
        backend: force a backend ("reference", "cpp", "cuda", "triton"); raises if it cannot run.
        initial_state: (causal) the chunk continues a sequence: the pivot d of the position just
            before it, (...,) complex64 (complex128 for float64). super_diag/sub_diag then have N
            entries (broadcastable to (..., N)): entry 0 couples that position to position 0.
        output_final_state: (causal) also return the pivot of the chunk's last position, the
            ``initial_state`` of the next chunk: ``y, d_last = bk_core(..., output_final_state=True)``.
        cu_seqlens: packed sequences: diag (T,) or (1, T) holds S sequences back to back, cu_seqlens
            (S + 1,) int32/int64 their offsets (0 = cu[0] <= ... <= cu[S] = T). Each sequence is
            computed alone (the off-diagonal entries at the boundaries are ignored); with
            initial_state (S,) and output_final_state, one state per sequence.

    Returns:
        (..., N) complex64 (complex128 for float64 input), and the final state (...,) with
        ``output_final_state``. Exact gradients (O(N)) for diag, super_diag, sub_diag, z and
        initial_state. Chained chunks equal the whole sequence (docs/BK_CORE_MATH.md, "Streaming").
    """
    if initial_state is not None or output_final_state is not False or cu_seqlens is not None:
        if (cu_seqlens is not None and initial_state is None and output_final_state is False
                and isinstance(diag, Tensor) and (diag.dim() == 1 or (diag.dim() == 2 and diag.shape[0] == 1))
                and not torch.compiler.is_compiling()):
            # packed sequences without states: the per-step fast path with the couplings into each
            # sequence start zeroed (the general path validates everything else the same way)
            T = diag.shape[-1]
            _, host = check_cu_seqlens(cu_seqlens, T, diag.device)
            out = _compiled_cpu_call(diag, super_diag, sub_diag, z, causal, backend,
                                     cuts=(cu_seqlens, host) if cu_seqlens.shape[0] > 2 else None)
            if out is not None:
                return out
        return run_stream(diag, super_diag, sub_diag, z, None, causal, backend, initial_state, output_final_state,
                          cu_seqlens)
    out = _compiled_cpu_call(diag, super_diag, sub_diag, z, causal, backend)
    if out is not None:
        return out
    return _run(canon_bk(diag, super_diag, sub_diag, z), causal, backend)


def _compiled_cpu_call(diag, super_diag, sub_diag, z, causal, backend, cuts=None) -> Optional[Tensor]:
    """The call a model makes every step (float32/float64 CPU ``diag``, one shared off-diagonal pair
    of its dtype, (N-1,) or (1, N-1), a Python ``z`` or a 0-dim complex tensor ``z`` of the matching
    complex dtype on the same device, a bool ``causal``), recognised in a few attribute reads and
    sent straight to the compiled op when ``_registry.compiled_cpu_takes`` allows it: the same op
    and arguments the general path would build (``canon_z`` of a complex tensor of that dtype is
    ``view_as_real(z)``, differentiable in z). Anything else returns None and takes the general path
    (which validates, raises on bad input, dispatches, warns and verifies). ``cuts``: packed
    sequences, the validated ``cu_seqlens``: the couplings into each sequence start are zeroed."""
    if not (_extension.HAS_C and type(causal) is bool and isinstance(diag, Tensor) and isinstance(super_diag, Tensor)
            and isinstance(sub_diag, Tensor)):
        return None
    dt = diag.dtype
    if dt not in _registry.FAST_CPU_DTYPES or diag.device.type != "cpu" or diag.dim() < 1:
        return None
    N = diag.shape[-1]
    sd, bd = super_diag.dim(), sub_diag.dim()
    # (a traced data-dependent batch is an unbacked size: the op takes 0 rows, no guard on it)
    if (N < 2 or known_eq(diag.numel(), 0) or not 1 <= sd <= 2 or not 1 <= bd <= 2
            or super_diag.shape[-1] != N - 1 or sub_diag.shape[-1] != N - 1
            or (sd == 2 and (super_diag.shape[0] != 1 or diag.dim() < 2))
            or (bd == 2 and (sub_diag.shape[0] != 1 or diag.dim() < 2))
            or super_diag.dtype != dt or sub_diag.dtype != dt
            or super_diag.device != diag.device or sub_diag.device != diag.device):
        return None
    if type(z) in (complex, float, int):
        zri = cached_z(z, dt, diag.device)  # validated (a non-finite z raises) and reused
    elif isinstance(z, Tensor) and z.dim() == 0 and z.dtype == _COMPLEX_OF[dt] and z.device == diag.device:
        zri = torch.view_as_real(z)
    else:
        return None
    if not _registry.compiled_cpu_takes("bk_core", bk_core_compiled, backend):
        return None
    a = diag if diag.dim() == 2 else diag.reshape(-1, N)
    k = (super_diag * sub_diag).reshape(1, N - 1)
    if cuts is not None:
        k = cut_couplings(k, *cuts)
    out = torch.ops.resnet_bk.bk_core_fwd(a.contiguous(), k, zri, None, causal)
    return out if diag.dim() == 2 else out.view(diag.shape)


def bk_core_masked(diag: Tensor, super_diag: Tensor, sub_diag: Tensor, z: Union[Number, Tensor],
                   mask: Tensor, *, causal: bool = False, backend: Optional[str] = None,
                   initial_state: Optional[Tensor] = None, output_final_state: bool = False,
                   cu_seqlens: Optional[Tensor] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """``mask * bk_core(...)``: mask (..., N) bool or float 0/1 (a straight-through Gumbel mask
    receives the gradient ``Re(conj(G) g)``).

    The pivots run over every position (the recursion couples them all); a position whose mask is
    0 is not computed: its output is exactly 0 (even where G would not be finite) and it sends no
    gradient to diag, super_diag, sub_diag or z. The C++ kernel skips the combine for a position
    whose mask is 0 in all the sequences of a SIMD block (16 float / 8 double lanes), so the
    saving depends on how masks line up across the batch (see the benchmark).

    ``initial_state``, ``output_final_state`` and ``cu_seqlens`` as for :func:`bk_core` (the pivots,
    and so the states, run through every position, masked or not)."""
    if initial_state is not None or output_final_state is not False or cu_seqlens is not None:
        return run_stream(diag, super_diag, sub_diag, z, mask, causal, backend, initial_state, output_final_state,
                          cu_seqlens)
    return _run(canon_bk(diag, super_diag, sub_diag, z, mask), causal, backend)


def bk_core_features(he_diag: Tensor, h0_super: Tensor, h0_sub: Tensor, z: Union[Number, Tensor], *,
                     causal: bool = False, backend: Optional[str] = None) -> Tensor:
    """Drop-in for the original ResNet-BK ``BKCoreFunction.apply(he_diag, h0_super, h0_sub, z)``:
    returns (..., N, 2) float32 ``[Re G, Im G]``, with the exact gradient."""
    G = bk_core(he_diag, h0_super, h0_sub, z, causal=causal, backend=backend)
    return torch.view_as_real(G).to(torch.float32)


def canonical_call(diag, super_diag, sub_diag, z, mask=None, *, causal=False, initial_state=None,
                   output_final_state=False, cu_seqlens=None):
    """(device, canonical arguments) of a ``bk_core`` / ``bk_core_masked`` call (for ``explain``; a
    streaming call runs on the backend its canonical call would use)."""
    args = canon_bk(diag, super_diag, sub_diag, z, mask, coupled_in=initial_state is not None)
    return args.a.device, (args.a, args.k, args.zri, args.mask, check_bool("causal", causal))
