"""Argument checks shared by the op families' canonicalisation: each raises an error that names the
argument and says what was expected and what was got, before any kernel runs."""
from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

try:
    from numpy import bool_ as _np_bool
except ImportError:  # numpy is optional
    _np_bool = bool


def describe(x) -> str:
    if isinstance(x, Tensor):
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, device={x.device})"
    return f"{type(x).__name__} {x!r}"


def check_bool(name: str, value) -> bool:
    """A flag such as ``causal``: bool(...) would turn causal="no" or None into a silent choice."""
    if not isinstance(value, (bool, _np_bool)):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_tensor(name: str, x, *, floating: bool = True, allow_bool: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {describe(x)}")
    if floating:
        ok = x.dtype in FLOAT_DTYPES or (allow_bool and x.dtype == torch.bool)
        if not ok:
            want = "a real floating tensor (float16, bfloat16, float32 or float64)"
            if allow_bool:
                want = "a bool or real floating tensor"
            raise TypeError(f"{name}: expected {want}, got dtype {x.dtype}")
    return x


def check_same_device(ref_name: str, ref: Tensor, name: str, x: Tensor) -> None:
    if x.device != ref.device:
        raise RuntimeError(
            f"{name}: expected a tensor on {ref.device} (the device of {ref_name}), got one on {x.device}; "
            f"move it with .to({str(ref.device)!r})")


def compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; float32, bfloat16 and float16 are computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_precision_class(ref_name: str, ref: Tensor, name: str, x: Tensor) -> None:
    if (ref.dtype == torch.float64) != (x.dtype == torch.float64):
        raise TypeError(
            f"{name}: dtype {x.dtype} mixes float64 with {ref_name}'s {ref.dtype}; expected "
            f"{'float64' if ref.dtype == torch.float64 else 'float32, bfloat16 or float16'} "
            f"(cast both to the same precision)")

