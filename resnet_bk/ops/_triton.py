"""The Triton backend: registration of the kernels in ``triton_kernels/`` (imported as
``resnet_bk.triton_kernels``) as PyTorch ops and as the "triton" backend of dispatch.

``torch.ops.resnet_bk.bk_core_fwd_triton`` / ``bk_core_bwd_triton`` are ``torch.library.custom_op``s
with fake kernels, so torch.compile traces calls to them (as opaque ops); autograd of the forward
op calls the backward op (the exact O(N) gradient, shared/BK_CORE_MATH.md). Why custom_op and not
``triton_op``: a triton_op is decomposed into its kernel launches under torch.compile, which cannot
work with interpreted kernels (they would run on fake tensors), and CI tests compile through the
interpreter; the kernels are sequential scans with nothing for Inductor to fuse into anyway.

Devices: CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment *before triton is first
imported* (``@triton.jit`` picks the interpreter at decoration time, for triton's own library
functions as for ours), Triton's interpreter runs the kernels on CPU tensors instead: that is how
CI tests them on a machine without a GPU (tests/conftest.py sets it). The kernel modules are
imported lazily, on the first call; ``_check`` says why CPU tensors are refused when the order
was wrong.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _dispatch
from .reference import complex_dtype_for

try:
    import triton  # noqa: F401
    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"

ENV_INTERPRET = "TRITON_INTERPRET"
_KERNEL_MODULE = "resnet_bk.triton_kernels.bk_core"
_KERNEL_MODULES = (_KERNEL_MODULE, "resnet_bk.triton_kernels.pooling")


def _kernels():
    return importlib.import_module(_KERNEL_MODULE)


def _loaded_interpreted() -> Optional[bool]:
    """Whether the imported kernel modules are interpreted (each fixes that at import, from
    TRITON_INTERPRET); None while none is imported yet (they will follow TRITON_INTERPRET then)."""
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is not None:
            return mod.INTERPRETED
    return None


def _interpreter_problem() -> Optional[str]:
    """Why the interpreter cannot run the kernels (triton itself was imported before
    TRITON_INTERPRET=1), or None."""
    mod = sys.modules.get(_KERNEL_MODULE)
    if mod is None:
        # not imported yet: triton's library functions decide, as they will for the kernels
        import triton.language as tl
        return None if type(tl.zeros).__name__ == "InterpretedFunction" else (
            "triton was imported before TRITON_INTERPRET=1 was set; set it before importing resnet_bk or triton")
    return mod.INTERPRETER_PROBLEM


def interpret_requested() -> bool:
    """TRITON_INTERPRET=1 (read the way triton reads it: "1", "true", "on" ...)."""
    return os.environ.get(ENV_INTERPRET, "0").lower() in ("1", "true", "on", "yes", "y")


def _available() -> Tuple[bool, str]:
    if _TRITON_ERROR is not None:
        return False, _TRITON_ERROR
    return True, "Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)"


def _check(a: Tensor, *args) -> Optional[str]:
    """None if the Triton kernels can run on these canonical arguments, else why not."""
    dev = a.device.type
    if dev == "cuda":
        interp = _loaded_interpreted()
        if interp or (interp is None and interpret_requested()):
            return ("the Triton kernels run in the interpreter (TRITON_INTERPRET=1), which takes CPU "
                    "tensors, not CUDA ones")
        return None
    if dev == "cpu":
        if not interpret_requested():
            return "takes CUDA tensors (CPU tensors only under TRITON_INTERPRET=1, Triton's interpreter)"
        if _loaded_interpreted() is False:
            return ("TRITON_INTERPRET=1 was set after the Triton kernels had been compiled for the GPU; "
                    "set it before the first Triton call")
        if _interpreter_problem() is not None:
            return _interpreter_problem()
        return None
    return f"takes CUDA tensors, got {dev}"


if _TRITON_ERROR is None:
    @torch.library.custom_op("resnet_bk::bk_core_fwd_triton", mutates_args=())
    def bk_core_fwd_triton(a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor], causal: bool) -> Tensor:
        """(B, N) complex: G (or 1/d when causal) times mask; canonical arguments."""
        return _kernels().bk_core_fwd(a, k, zri, mask, causal)

    @torch.library.custom_op("resnet_bk::bk_core_bwd_triton", mutates_args=())
    def bk_core_bwd_triton(grad: Tensor, a: Tensor, k: Tensor, zri: Tensor, mask: Optional[Tensor],
                           causal: bool, need_mask_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """(grad_a (B, N), grad_k (Bk, N-1), grad_zri (2,), grad_mask (B, N), or (0,) when not needed)."""
        ga, gk, gz, gm = _kernels().bk_core_bwd(grad, a, k, zri, mask, causal, need_mask_grad)
        if gm is None:
            gm = a.new_empty((0,))
        return ga, gk, gz, gm

    @bk_core_fwd_triton.register_fake
    def _fwd_fake(a, k, zri, mask, causal):
        torch._check(a.dim() == 2, lambda: "a: expected shape (B, N)")
        return a.new_empty(a.shape, dtype=complex_dtype_for(a.dtype))

    @bk_core_bwd_triton.register_fake
    def _bwd_fake(grad, a, k, zri, mask, causal, need_mask_grad):
        gm = a.new_empty(a.shape) if (mask is not None and need_mask_grad) else a.new_empty((0,))
        return a.new_empty(a.shape), k.new_empty(k.shape), zri.new_empty((2,)), gm

    def _setup_context(ctx, inputs, output):
        a, k, zri, mask, causal = inputs
        ctx.save_for_backward(a, k, zri, mask)
        ctx.causal = causal

    def _backward(ctx, grad):
        a, k, zri, mask = ctx.saved_tensors
        need_mask = mask is not None and ctx.needs_input_grad[3]
        ga, gk, gz, gm = torch.ops.resnet_bk.bk_core_bwd_triton(grad, a, k, zri, mask, ctx.causal, need_mask)
        return ga, gk, gz, (gm if need_mask else None), None

    torch.library.register_autograd("resnet_bk::bk_core_fwd_triton", _backward, setup_context=_setup_context)

    def bk_core_triton(a, k, zri, mask, causal):
        return torch.ops.resnet_bk.bk_core_fwd_triton(a, k, zri, mask, causal)

    _dispatch.register_backend("triton", _available)
    _dispatch.register_impl("bk_core", "triton", bk_core_triton, _check)

    # ---- learned down/upsampling (the ops live in resnet_bk.ops.pooling; until that module is
    # present these registrations are inert: dispatch is only asked for ops that exist)
    _POOL_MODULE = "resnet_bk.triton_kernels.pooling"

    def _pool():
        return importlib.import_module(_POOL_MODULE)

    @torch.library.custom_op("resnet_bk::learned_downsample_fwd_triton", mutates_args=())
    def learned_downsample_fwd_triton(x: Tensor, logits: Tensor, causal: bool) -> Tensor:
        """x (B, N, D), logits (M, r) -> (B, M, D)."""
        return _pool().learned_downsample_fwd(x, logits, causal)

    @torch.library.custom_op("resnet_bk::learned_downsample_bwd_triton", mutates_args=())
    def learned_downsample_bwd_triton(grad: Tensor, x: Tensor, logits: Tensor, causal: bool, need_x: bool,
                                      need_logits: bool) -> Tuple[Tensor, Tensor]:
        """(grad_x (B, N, D) or (0,), grad_logits (M, r) or (0,))."""
        gx, gl = _pool().learned_downsample_bwd(grad, x, logits, causal, need_x, need_logits)
        return (x.new_empty((0,)) if gx is None else gx), (logits.new_empty((0,)) if gl is None else gl)

    @learned_downsample_fwd_triton.register_fake
    def _down_fwd_fake(x, logits, causal):
        return x.new_empty((x.shape[0], logits.shape[0], x.shape[2]))

    @learned_downsample_bwd_triton.register_fake
    def _down_bwd_fake(grad, x, logits, causal, need_x, need_logits):
        return (x.new_empty(x.shape) if need_x else x.new_empty((0,)),
                logits.new_empty(logits.shape) if need_logits else logits.new_empty((0,)))

    def _down_setup(ctx, inputs, output):
        x, logits, causal = inputs
        ctx.save_for_backward(x, logits)
        ctx.causal = causal

    def _down_backward(ctx, grad):
        x, logits = ctx.saved_tensors
        nx, nl = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gl = torch.ops.resnet_bk.learned_downsample_bwd_triton(grad, x, logits, ctx.causal, nx, nl)
        return (gx if nx else None), (gl if nl else None), None

    torch.library.register_autograd("resnet_bk::learned_downsample_fwd_triton", _down_backward,
                                    setup_context=_down_setup)

    @torch.library.custom_op("resnet_bk::learned_upsample_fwd_triton", mutates_args=())
    def learned_upsample_fwd_triton(y: Tensor, bias: Tensor, residual: Optional[Tensor],
                                    scale: Optional[Tensor]) -> Tensor:
        """y (B, M, r*D), bias (Mb, r, Db) -> (B, M*r, D)."""
        return _pool().learned_upsample_fwd(y, bias, residual, scale)

    @torch.library.custom_op("resnet_bk::learned_upsample_bwd_triton", mutates_args=())
    def learned_upsample_bwd_triton(grad: Tensor, y: Tensor, bias: Tensor, scale: Optional[Tensor], need_y: bool,
                                    need_bias: bool, need_scale: bool) -> Tuple[Tensor, Tensor, Tensor]:
        """(grad_y, grad_bias, grad_scale), each (0,) when not needed."""
        gy, gb, gs = _pool().learned_upsample_bwd(grad, y, bias, scale, need_y, need_bias, need_scale)
        # a fresh empty tensor per missing gradient: a custom op's outputs may not alias each other
        return (y.new_empty((0,)) if gy is None else gy, bias.new_empty((0,)) if gb is None else gb,
                bias.new_empty((0,)) if gs is None else gs)

    @learned_upsample_fwd_triton.register_fake
    def _up_fwd_fake(y, bias, residual, scale):
        r = bias.shape[1]
        return y.new_empty((y.shape[0], y.shape[1] * r, y.shape[2] // r))

    @learned_upsample_bwd_triton.register_fake
    def _up_bwd_fake(grad, y, bias, scale, need_y, need_bias, need_scale):
        return (y.new_empty(y.shape) if need_y else y.new_empty((0,)),
                bias.new_empty(bias.shape) if need_bias else bias.new_empty((0,)),
                bias.new_empty(()) if (need_scale and scale is not None) else bias.new_empty((0,)))

    def _up_setup(ctx, inputs, output):
        y, bias, residual, scale = inputs
        ctx.save_for_backward(y, bias, scale)

    def _up_backward(ctx, grad):
        y, bias, scale = ctx.saved_tensors
        ny, nb, nr, ns = ctx.needs_input_grad
        gy, gb, gs = torch.ops.resnet_bk.learned_upsample_bwd_triton(grad, y, bias, scale, ny, nb, ns)
        # d out / d residual is the identity: the upstream gradient itself
        return (gy if ny else None), (gb if nb else None), (grad if nr else None), (gs if ns else None)

    torch.library.register_autograd("resnet_bk::learned_upsample_fwd_triton", _up_backward, setup_context=_up_setup)

    def learned_downsample_triton(x, logits, causal):
        return torch.ops.resnet_bk.learned_downsample_fwd_triton(x, logits, causal)

    def learned_upsample_triton(y, bias, residual, scale):
        return torch.ops.resnet_bk.learned_upsample_fwd_triton(y, bias, residual, scale)

    _dispatch.register_impl("learned_downsample", "triton", learned_downsample_triton, _check)
    _dispatch.register_impl("learned_upsample", "triton", learned_upsample_triton, _check)
else:
    _dispatch.register_backend("triton", _available)
