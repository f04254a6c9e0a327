"""The Triton backend, the part every op family shares: whether Triton is importable, where its
kernels (``triton_kernels/``, installed as ``resnet_bk.triton_kernels``) may run, and the backend's
registration. Each family registers its own ops in its ``triton.py`` (``bk_core/triton.py``,
``pooling/triton.py``).

The families' Triton ops are ``torch.library.custom_op``s with fake kernels, so torch.compile traces
calls to them (as opaque ops); autograd of each forward op calls its backward op. Why custom_op and
not ``triton_op``: a triton_op is decomposed into its kernel launches under torch.compile, which
cannot work with interpreted kernels (they would run on fake tensors), and CI tests compile through
the interpreter; the kernels are sequential scans with nothing for Inductor to fuse into anyway.

Devices: CUDA tensors. With ``TRITON_INTERPRET=1`` in the environment *before triton is first
imported* (``@triton.jit`` picks the interpreter at decoration time, for triton's own library
functions as for ours), Triton's interpreter runs the kernels on CPU tensors instead: that is how
CI tests them on a machine without a GPU (tests/conftest.py sets it). The kernel modules are
imported lazily, on the first call; ``check`` says why CPU tensors are refused when the order
was wrong.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _registry

try:
    import triton  # noqa: F401
    _TRITON_ERROR: Optional[str] = None
except Exception as exc:  # noqa: BLE001  (a broken install raises more than ImportError)
    _TRITON_ERROR = f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton"

ENV_INTERPRET = "TRITON_INTERPRET"
_KERNEL_MODULE = "resnet_bk.triton_kernels.bk_core"
_KERNEL_MODULES = (_KERNEL_MODULE, "resnet_bk.triton_kernels.pooling", "resnet_bk.triton_kernels.step")


def kernels(name: str):
    """The kernel module ``resnet_bk.triton_kernels.<name>`` (imported on first use)."""
    return importlib.import_module(f"resnet_bk.triton_kernels.{name}")


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


def check(a: Tensor, *args) -> Optional[str]:
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


AVAILABLE = _TRITON_ERROR is None
_registry.register_backend("triton", _available)
