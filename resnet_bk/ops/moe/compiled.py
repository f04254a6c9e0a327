"""The top-1 MoE compiled op (``torch.ops.resnet_bk.moe_top1_infer``: schema in csrc/schemas.cpp,
CPU kernel in csrc/cpu/moe_cpu.cpp; inference only, no autograd) and its registration as the "cpp"
backend."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _extension, _registry

HAS_MOE_OP = _extension.has_op("moe_top1_infer")


def moe_compiled(x, router_weight, router_bias, w1, b1, w2, b2):
    return torch.ops.resnet_bk.moe_top1_infer(x, router_weight, router_bias, list(w1), list(b1), list(w2), list(b2))


def _cpp_check(*args) -> Optional[str]:
    if not HAS_MOE_OP:
        return _extension.compiled_reason("moe_top1_infer", "cpu")
    if args[0].device.type != "cpu":
        return f"takes cpu tensors, got {args[0].device.type}"
    if args[0].dtype not in _registry.FAST_CPU_DTYPES:
        return f"takes float32/float64, got {args[0].dtype}"
    return None


_registry.register_impl("moe_top1_inference", "cpp", moe_compiled, _cpp_check)
