"""Sequence-parallel BK-Core over ``torch.distributed`` ranks (implemented in
``resnet_bk.ops.bk_core.distributed``; usage in docs/DISTRIBUTED.md)."""
from .ops.bk_core.distributed import bk_core_sequence_parallel

__all__ = ["bk_core_sequence_parallel"]
