"""Triton backend registration (kernels in triton_kernels/, imported as resnet_bk.triton_kernels)."""
from __future__ import annotations

import os
from typing import Tuple

from . import _dispatch

try:
    import triton  # noqa: F401
    _TRITON_ERROR = None
except Exception as exc:  # noqa: BLE001
    _TRITON_ERROR = f"triton is not installed ({type(exc).__name__}: {exc}); pip install triton"


def _available() -> Tuple[bool, str]:
    if _TRITON_ERROR is not None:
        return False, _TRITON_ERROR
    return False, "no Triton kernels are registered yet"


_dispatch.register_backend("triton", _available)
