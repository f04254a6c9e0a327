"""Top-1 mixture-of-experts FFN for inference: ``moe_top1_inference``.

    y = moe_top1_inference(x, router_weight, router_bias, w1, b1, w2, b2)   # x (T, D) -> (T, D_out)

Each expert is ``Linear(D, H) -> ReLU -> Linear(H, D_out)`` (weights ``w1[e]`` (H, D), ``b1[e]``
(H,), ``w2[e]`` (D_out, H), ``b2[e]`` (D_out,)); the router's logits are ``router_weight @ x^T +
router_bias`` (E, T); the softmax over the experts is taken in float32; each token goes to its
arg-max expert and that expert's output is scaled by its probability (Switch-style top-1, the gate
that gives the router its gradient in training). This is ``SparseMoELayer``'s no-grad forward.

Backends: ``reference`` (PyTorch: one gather, two addmm per expert, one scatter) and ``cpp`` (the
same with the routing and grouping in C++, ``csrc/cpu/moe_cpu.cpp``: it removes most of the per-op
Python and dispatcher cost, which is most of a small layer's time; at 8 tokens, d_model 128, the
layer's own path took 197 us here and the op 71 us). Inference only: no autograd (a call that
would need gradients raises).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _registry
from .compiled import HAS_MOE_OP, moe_compiled
from .reference import moe_top1_ref


def _check(x, router_weight, router_bias, w1, b1, w2, b2) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"x: expected a floating tensor of shape (T, D), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    T, D = x.shape
    if not isinstance(router_weight, Tensor) or router_weight.dim() != 2 or router_weight.shape[1] != D:
        raise ValueError(f"router_weight: expected shape (E, {D}), got "
                         f"{tuple(router_weight.shape) if isinstance(router_weight, Tensor) else type(router_weight).__name__}")
    E = router_weight.shape[0]
    if not isinstance(router_bias, Tensor) or tuple(router_bias.shape) != (E,):
        raise ValueError(f"router_bias: expected shape ({E},), got "
                         f"{tuple(router_bias.shape) if isinstance(router_bias, Tensor) else type(router_bias).__name__}")
    lists = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    for name, l in lists.items():
        if not isinstance(l, (list, tuple)) or len(l) != E or not all(isinstance(t, Tensor) for t in l):
            raise ValueError(f"{name}: expected a list of {E} tensors (one per expert), got "
                             f"{type(l).__name__} of length {len(l) if hasattr(l, '__len__') else '?'}")
    H, Do = w1[0].shape[0], w2[0].shape[0]
    want = {"w1": (H, D), "b1": (H,), "w2": (Do, H), "b2": (Do,)}
    for name, l in lists.items():
        for e, t in enumerate(l):
            if tuple(t.shape) != want[name]:
                raise ValueError(f"{name}[{e}]: expected shape {want[name]}, got {tuple(t.shape)}")
    for name, t in [("router_weight", router_weight), ("router_bias", router_bias)] + [
            (f"{n}[{e}]", t) for n, l in lists.items() for e, t in enumerate(l)]:
        if t.dtype != x.dtype or t.device != x.device:
            raise TypeError(f"{name}: expected dtype {x.dtype} on {x.device} (x's), got {t.dtype} on {t.device}")
    if torch.is_grad_enabled() and any(t.requires_grad for t in [x, router_weight, router_bias, *w1, *b1, *w2, *b2]):
        raise RuntimeError("moe_top1_inference: inference only (no autograd); call it under torch.no_grad() "
                           "or with tensors that do not require grad")


def moe_top1_fast_ok(x: Tensor, backend: Optional[str] = None) -> bool:
    """Whether a call on x may go straight to the compiled op: grad mode off, x a 2-dim
    float32/float64 CPU tensor, the kernel built, the backend automatic or "cpp" and the conditions
    of ``_registry.compiled_cpu_takes`` (no backend forced by the environment, no verify mode, no
    tracing). ``SparseMoELayer`` asks this before using the op, and otherwise keeps its own path."""
    return (HAS_MOE_OP and not torch.is_grad_enabled() and isinstance(x, Tensor) and x.device.type == "cpu"
            and x.dim() == 2 and x.dtype in _registry.FAST_CPU_DTYPES
            and _registry.compiled_cpu_takes("moe_top1_inference", moe_compiled, backend))


def moe_top1_inference(x: Tensor, router_weight: Tensor, router_bias: Tensor, w1: Sequence[Tensor],
                       b1: Sequence[Tensor], w2: Sequence[Tensor], b2: Sequence[Tensor], *,
                       backend: Optional[str] = None) -> Tensor:
    """Top-1 MoE FFN forward for inference (see the module doc); x (T, D) -> (T, D_out)."""
    if (moe_top1_fast_ok(x, backend) and x.shape[0] > 0 and x.is_contiguous()
            and isinstance(w1, list) and isinstance(b1, list) and isinstance(w2, list) and isinstance(b2, list)):
        # The module's per-step call: the kernel checks shapes, dtypes and devices itself.
        return torch.ops.resnet_bk.moe_top1_infer(x, router_weight, router_bias, w1, b1, w2, b2)
    _check(x, router_weight, router_bias, w1, b1, w2, b2)
    args = (x.contiguous(), router_weight, router_bias, list(w1), list(b1), list(w2), list(b2))
    if x.shape[0] == 0:
        _registry.forced(backend)  # a bad backend name still raises
        return moe_top1_ref(*args)
    return _registry.select("moe_top1_inference", x.device, args, backend)(*args)


def canonical_call(x, router_weight, router_bias, w1, b1, w2, b2):
    """(device, canonical arguments) of a ``moe_top1_inference`` call (for ``explain``)."""
    _check(x, router_weight, router_bias, w1, b1, w2, b2)
    return x.device, (x.contiguous(), router_weight, router_bias, list(w1), list(b1), list(w2), list(b2))
