"""The Triton backend: registration of the kernels in ``triton_kernels/`` (imported as
``resnet_bk.triton_kernels``) as PyTorch ops and as the "triton" backend of dispatch.

``torch.ops.resnet_bk.bk_core_fwd_triton`` / ``bk_core_bwd_triton`` are ``torch.library.custom_op``s
with fake kernels, so torch.compile traces calls to them (as opaque ops); autograd of the forward
op calls the backward op (the exact O(N) gradient, shared/BK_CORE_MATH.md). Why custom_op and not
``triton_op``: a triton_op is decomposed into its kernel launches under torch.compile, which cannot
work with interpreted kernels (they would run on fake tensors), and CI tests compile through the
interpreter; the kernels are sequential scans with nothing for Inductor to fuse into anyway.

Devices: CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment *when the kernels are first
imported*, Triton's interpreter runs them on CPU tensors instead (that is how CI tests them on a
machine without a GPU); the kernel module is therefore imported lazily, on the first call.
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


_loaded = None  # the kernel module once imported (its INTERPRETED flag is fixed at import)


def _kernels():
    global _loaded
    if _loaded is None:
        _loaded = importlib.import_module(_KERNEL_MODULE)
    return _loaded


def _loaded_interpreted() -> Optional[bool]:
    """None while the kernels are not imported yet (they will follow TRITON_INTERPRET then)."""
    mod = _loaded if _loaded is not None else sys.modules.get(_KERNEL_MODULE)
    return None if mod is None else mod.INTERPRETED


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
else:
    _dispatch.register_backend("triton", _available)
