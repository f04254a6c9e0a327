"""The cached one-token step of a whole MoE ResNet-BK block: ``moe_bk_block_step``.

    h_next, d = moe_bk_block_step(h, ln_weight, ln_bias, ln_eps, router_weight, router_bias,
                                  w1, b1, w2, b2, v_weight, v_bias, h0_diag, h0_super, h0_sub,
                                  position, z, state, bk_scale, out_weight, out_bias)

For a batch of B sequences at one position ``position`` (h (B, D)), the decode step of the standard
block of ``LanguageModel`` (``ResNetBKBlock`` around ``MoEResNetBKLayer``):

    xn  = layer_norm(h)                                   (ln_weight, ln_bias, ln_eps)
    ffn = moe_top1_inference(xn, router_weight, router_bias, w1, b1, w2, b2)
    v   = ffn @ v_weight.T + v_bias                       (B,)
    d   = (h0_diag[pos] + v - z) - h0_super[pos-1] h0_sub[pos-1] / state   (state None: no coupling)
    h'  = h + (ffn + bk_scale * ([Re 1/d, Im 1/d] @ out_weight.T + out_bias))

Returns ``(h', d)``; ``d`` (B,) complex is the block's new state (its BK-Core pivot). ``h0_*`` are the
layer's H0 buffers ((1, n_seq) / (1, n_seq - 1), float32 or h's dtype), ``z`` one complex value.

Why it exists: at batch 1 a block's decode step is two GEMVs and a few hundred flops, but its path
through the modules is ~25 dispatched ops; the ``cpp`` backend (``csrc/cpu/block_step_cpu.cpp``) is
one call with its own GEMV loops. Backends: ``reference`` (the same composition of
``F.layer_norm``, ``moe_top1_ref``, ``F.linear`` and the BK-Core step in PyTorch) and ``cpp``. The
values agree up to rounding (not bit for bit: the GEMVs sum in another order). Inference only.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _extension, _registry
from ..bk_core.reference import complex_dtype_for
from .api import _check as _check_moe
from .reference import moe_top1_ref

__all__ = ["moe_bk_block_step", "moe_bk_block_step_ref", "block_step_fast_ok"]

OP = "moe_bk_block_step"
HAS_BLOCK_STEP_OP = _extension.has_op(OP)


def _h0(t: Tensor, i: int, dtype: torch.dtype) -> Tensor:
    return t.reshape(-1)[i].to(dtype)


def moe_bk_block_step_ref(h, ln_weight, ln_bias, ln_eps, router_weight, router_bias, w1, b1, w2, b2, v_weight,
                          v_bias, h0_diag, h0_super, h0_sub, position, z, state, bk_scale, out_weight,
                          out_bias) -> Tuple[Tensor, Tensor]:
    """Reference twin of :func:`moe_bk_block_step` (pure PyTorch)."""
    xn = F.layer_norm(h, (h.shape[-1],), ln_weight, ln_bias, ln_eps)
    ffn = moe_top1_ref(xn, router_weight, router_bias, w1, b1, w2, b2)
    v = F.linear(ffn, v_weight, v_bias)[:, 0]
    cdt = complex_dtype_for(h.dtype)
    alpha = (_h0(h0_diag, position, h.dtype) + v).to(cdt) - z.to(cdt)
    if state is None:
        d = alpha
    else:
        k = _h0(h0_super, position - 1, h.dtype) * _h0(h0_sub, position - 1, h.dtype)
        # k / state = k conj(state) / |state|^2, exactly 0 for an infinite pivot (bk_math.h's rule)
        n2 = state.real * state.real + state.imag * state.imag
        r = torch.where(torch.isinf(n2), torch.zeros_like(n2), 1 / n2)
        d = alpha - torch.complex(k * state.real * r, -k * state.imag * r)
    n2 = d.real * d.real + d.imag * d.imag
    r = torch.where(torch.isinf(n2), torch.zeros_like(n2), 1 / n2)
    y = torch.complex(d.real * r, -d.imag * r)
    feats = torch.stack([y.real, y.imag], dim=-1)
    return h + (ffn + bk_scale * F.linear(feats, out_weight, out_bias)), d


def block_step_compiled(*args) -> Tuple[Tensor, Tensor]:
    args = list(args)
    for i in (6, 7, 8, 9):
        args[i] = list(args[i])
    return torch.ops.resnet_bk.moe_bk_block_step(*args)


def _cpp_check(*args) -> Optional[str]:
    if not HAS_BLOCK_STEP_OP:
        return _extension.compiled_reason(OP, "cpu")
    if args[0].device.type != "cpu":
        return f"takes cpu tensors, got {args[0].device.type}"
    if args[0].dtype not in _registry.FAST_CPU_DTYPES:
        return f"takes float32/float64, got {args[0].dtype}"
    return None


_registry.register_impl(OP, "reference", moe_bk_block_step_ref)
_registry.register_impl(OP, "cpp", block_step_compiled, _cpp_check)


def block_step_fast_ok(h: Tensor) -> bool:
    """Whether a model's decode step may call the compiled op directly (its kernel checks the
    arguments itself): grad mode off, h a 2-dim contiguous float32/float64 CPU tensor, the kernel
    built and nothing (a forced backend, verify mode, tracing) asking for the general path."""
    return (HAS_BLOCK_STEP_OP and not torch.is_grad_enabled() and h.device.type == "cpu" and h.dim() == 2
            and h.dtype in _registry.FAST_CPU_DTYPES and h.is_contiguous()
            and _registry.compiled_cpu_takes(OP, block_step_compiled, None))


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, Tensor) else type(t).__name__


def _check(h, ln_weight, ln_bias, ln_eps, router_weight, router_bias, w1, b1, w2, b2, v_weight, v_bias, h0_diag,
           h0_super, h0_sub, position, z, state, bk_scale, out_weight, out_bias) -> None:
    if not isinstance(h, Tensor) or h.dim() != 2 or h.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"h: expected a float32/float64 tensor of shape (B, D), got {_shape(h)}"
                         + (f" {h.dtype}" if isinstance(h, Tensor) else ""))
    B, D = h.shape
    _check_moe(h, router_weight, router_bias, w1, b1, w2, b2)
    if w2[0].shape[0] != D:
        raise ValueError(f"w2: expected experts mapping back to d_model={D} (w2[e] of shape ({D}, H)), got "
                         f"{tuple(w2[0].shape)}")
    want = {"ln_weight": (ln_weight, (D,)), "ln_bias": (ln_bias, (D,)), "v_weight": (v_weight, (1, D)),
            "v_bias": (v_bias, (1,)), "out_weight": (out_weight, (D, 2)), "out_bias": (out_bias, (D,))}
    for name, (t, shape) in want.items():
        if not isinstance(t, Tensor) or tuple(t.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {_shape(t)}")
        if t.dtype != h.dtype or t.device != h.device:
            raise TypeError(f"{name}: expected dtype {h.dtype} on {h.device} (h's), got {t.dtype} on {t.device}")
    if not isinstance(bk_scale, Tensor) or bk_scale.numel() != 1 or bk_scale.dtype != h.dtype:
        raise ValueError(f"bk_scale: expected one {h.dtype} value, got {_shape(bk_scale)}"
                         + (f" {bk_scale.dtype}" if isinstance(bk_scale, Tensor) else ""))
    if not isinstance(ln_eps, (int, float)) or not ln_eps >= 0:
        raise ValueError(f"ln_eps: expected a number >= 0, got {ln_eps!r}")
    if not isinstance(position, int) or isinstance(position, bool):
        raise TypeError(f"position: expected an int, got {type(position).__name__}")
    for name, t in (("h0_diag", h0_diag), ("h0_super", h0_super), ("h0_sub", h0_sub)):
        if not isinstance(t, Tensor) or t.dtype not in (torch.float32, h.dtype) or t.device != h.device:
            raise TypeError(f"{name}: expected a float32 or {h.dtype} tensor on {h.device}, got "
                            + (f"{t.dtype} on {t.device}" if isinstance(t, Tensor) else type(t).__name__))
    if not 0 <= position < h0_diag.numel():
        raise ValueError(f"position: expected 0 <= position < {h0_diag.numel()} (h0_diag's entries), got {position}")
    cdt = complex_dtype_for(h.dtype)
    if not isinstance(z, Tensor) or z.numel() != 1 or z.dtype not in (torch.complex64, cdt):
        raise TypeError(f"z: expected one complex64{' or complex128' if cdt == torch.complex128 else ''} value, got "
                        + (f"{z.dtype} of shape {tuple(z.shape)}" if isinstance(z, Tensor) else type(z).__name__))
    if state is not None:
        if not isinstance(state, Tensor) or tuple(state.shape) != (B,) or state.dtype != cdt:
            raise ValueError(f"state: expected a {cdt} tensor of shape ({B},), got "
                             + (f"{state.dtype} {tuple(state.shape)}" if isinstance(state, Tensor)
                                else type(state).__name__))
        if not 1 <= position <= min(h0_super.numel(), h0_sub.numel()):
            raise ValueError(f"position: a state couples position - 1 to position: expected 1 <= position <= "
                             f"{min(h0_super.numel(), h0_sub.numel())}, got {position}")
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in
                                       [h, ln_weight, ln_bias, router_weight, router_bias, *w1, *b1, *w2, *b2,
                                        v_weight, v_bias, bk_scale, out_weight, out_bias, z, state]):
        raise RuntimeError("moe_bk_block_step: inference only (no autograd); call it under torch.no_grad() "
                           "or with tensors that do not require grad")


def moe_bk_block_step(h: Tensor, ln_weight: Tensor, ln_bias: Tensor, ln_eps: float, router_weight: Tensor,
                      router_bias: Tensor, w1: Sequence[Tensor], b1: Sequence[Tensor], w2: Sequence[Tensor],
                      b2: Sequence[Tensor], v_weight: Tensor, v_bias: Tensor, h0_diag: Tensor, h0_super: Tensor,
                      h0_sub: Tensor, position: int, z: Tensor, state: Optional[Tensor], bk_scale: Tensor,
                      out_weight: Tensor, out_bias: Tensor, *, backend: Optional[str] = None
                      ) -> Tuple[Tensor, Tensor]:
    """One cached decode step of a MoE ResNet-BK block (see the module doc): (h (B, D), ...) ->
    (h' (B, D), d (B,) complex)."""
    args: List = [h, ln_weight, ln_bias, ln_eps, router_weight, router_bias, w1, b1, w2, b2, v_weight, v_bias,
                  h0_diag, h0_super, h0_sub, position, z, state, bk_scale, out_weight, out_bias]
    device, args = canonical_call(*args)
    return _registry.select(OP, device, args, backend)(*args)


def canonical_call(*args, **kwargs):
    """(device, canonical arguments) of a ``moe_bk_block_step`` call (for ``explain``)."""
    _check(*args)
    c = [a.contiguous() if isinstance(a, Tensor) else a for a in args]
    c[6:10] = [[t.contiguous() for t in a] for a in args[6:10]]
    return c[0].device, tuple(c)
