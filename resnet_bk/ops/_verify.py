"""Verify mode and the tolerance policy.

The policy (docs/BK_CORE_MATH.md, "Tolerances"): a backend agrees with the reference when, element
by element, ``|got - ref| <= tol * (|ref| + max|ref|)`` with ``tol = tolerance(dtype)``: 1e-10 for
float64, 1e-5 for float32 (bfloat16/float16 inputs are computed in float32; an output stored in a
16-bit dtype may also differ by one rounding of that dtype).

Verify mode (``RESNET_BK_VERIFY=1`` or ``with resnet_bk.ops.verify():``) runs the reference beside
the chosen backend, forward and backward, and raises ``VerificationError`` on a mismatch.
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Optional

import torch
from torch import Tensor

ENV_VERIFY = "RESNET_BK_VERIFY"
_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


class _State(threading.local):
    verify: Optional[bool] = None  # a class default: reading it in a new thread raises nothing (cheap)


_state = _State()


class VerificationError(AssertionError):
    """A backend disagreed with the reference beyond the dtype's tolerance (verify mode)."""


def tolerance(dtype: torch.dtype) -> float:
    """The relative tolerance of the verification policy for results of ``dtype`` (real or complex):
    float64/complex128 1e-10, float32/complex64 1e-5, bfloat16/float16 max(1e-5, 2 eps of the dtype)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype: expected a torch.dtype, got {type(dtype).__name__} {dtype!r}")
    real = dtype.to_real() if dtype.is_complex else dtype
    if real in (torch.bfloat16, torch.float16):
        return max(1e-5, 2 * torch.finfo(real).eps)
    if real not in _TOLERANCE:
        raise ValueError(f"dtype: expected a floating or complex dtype, got {dtype}")
    return _TOLERANCE[real]


# os.environ.get encodes the key and decodes the value in Python (about 1 us, and it runs on every
# fast-path call); on POSIX the same values are read from its bytes mapping directly.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None


def getenv(name: str, default: str = "") -> str:
    """``os.environ.get(name, default)``, cheaper (the per-call reads of the op layer's fast paths)."""
    if _ENV_BYTES is not None:
        v = _ENV_BYTES.get(name.encode())
        return default if v is None else os.fsdecode(v)
    return os.environ.get(name, default)


def verify_enabled() -> bool:
    """Whether verify mode is on in this thread (the ``verify()`` context, else ``RESNET_BK_VERIFY``)."""
    v = _state.verify
    if v is not None:
        return bool(v)
    return getenv(ENV_VERIFY, "0") not in ("", "0", "false", "False")


@contextlib.contextmanager
def verify(enabled: bool = True):
    """Within this context every op also runs the reference and raises VerificationError on a
    mismatch (forward, and backward when gradients are taken)."""
    prev = _state.verify
    _state.verify = enabled
    try:
        yield
    finally:
        _state.verify = prev


def assert_close(got: Tensor, ref: Tensor, tol: Optional[float] = None, *, what: str = "output",
                 op: str = "resnet_bk") -> None:
    """Raise VerificationError unless ``got`` matches ``ref`` under the policy above
    (``tol`` defaults to ``tolerance(ref.dtype)``; NaN where the reference is NaN counts as equal)."""
    tol = tolerance(ref.dtype) if tol is None else tol
    if got.shape != ref.shape:
        raise VerificationError(f"{op}: {what} has shape {tuple(got.shape)}, reference {tuple(ref.shape)}")
    g = got.detach().to(ref.dtype)
    r = ref.detach()
    both_nan = torch.isnan(g) & torch.isnan(r) if not r.is_complex() else (
        torch.isnan(g.real) & torch.isnan(r.real))
    scale = r.abs().max() if r.numel() else torch.zeros((), dtype=r.abs().dtype)
    err = (g - r).abs()
    bad = (err > tol * (r.abs() + scale)) & ~both_nan
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        raise VerificationError(
            f"{op}: {what} differs from the reference beyond relative tolerance {tol:g}: "
            f"{int(bad.sum())} of {bad.numel()} elements, first at flat index {i}: "
            f"got {g.reshape(-1)[i].item()}, reference {r.reshape(-1)[i].item()}")


def verified(op: str, name: str, fn: Callable, ref: Callable) -> Callable:
    """``fn`` (a backend's implementation of ``op`` on canonical arguments) checked against ``ref``
    on every call, forward and backward."""
    def run(*args):
        tensors = [i for i, x in enumerate(args) if isinstance(x, Tensor)]
        out = fn(*args)
        with torch.no_grad():
            expect = ref(*[x.detach() if isinstance(x, Tensor) else x for x in args])
        assert_close(out, expect, what=f"forward output of backend {name!r}", op=op)
        needs = [i for i in tensors if args[i].requires_grad]
        if not (torch.is_grad_enabled() and needs and out.requires_grad):
            return out
        return _VerifyGrad.apply(op, name, fn, ref, args, needs, out, *[args[i] for i in needs])

    return run


class _VerifyGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op, name, fn, ref, args, needs, out, *inputs):
        ctx.info = (op, name, fn, ref, args, needs)
        return out.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        op, name, fn, ref, args, needs = ctx.info
        results = []
        for f in (fn, ref):
            a = [x.detach().requires_grad_(i in needs) if isinstance(x, Tensor) else x
                 for i, x in enumerate(args)]
            with torch.enable_grad():
                o = f(*a)
                gs = torch.autograd.grad(o, [a[i] for i in needs], grad, allow_unused=True)
            results.append(gs)
        for i, g_fn, g_ref in zip(needs, *results):
            if g_ref is None:
                continue
            g_fn = torch.zeros_like(g_ref) if g_fn is None else g_fn
            assert_close(g_fn, g_ref, what=f"gradient of argument {i} from backend {name!r}", op=op)
        return (None,) * 7 + tuple(results[0])
