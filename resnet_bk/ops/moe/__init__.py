"""The mixture-of-experts op family: ``moe_top1_inference`` (``api.py``), its reference twin
``moe_top1_ref`` (``reference.py``) and the compiled op's registration (``compiled.py``); and
``moe_bk_block_step`` (``block_step.py``: a MoE ResNet-BK block's whole decode step as one op,
with its reference twin); ``moe_dispatch`` (``dispatch.py``), the differentiable top-k dispatch as one traceable op (what
``SparseMoELayer`` runs under torch.compile / torch.export)."""
from . import reference  # noqa: F401  (registers the reference backend's implementation first)
from . import compiled  # noqa: F401  (the cpp implementation)
from .api import moe_top1_fast_ok, moe_top1_inference
from .block_step import block_step_fast_ok, moe_bk_block_step, moe_bk_block_step_ref
from .dispatch import moe_dispatch
from .reference import moe_top1_ref

__all__ = ["moe_top1_inference", "moe_top1_ref", "moe_top1_fast_ok", "moe_dispatch", "moe_bk_block_step",
           "moe_bk_block_step_ref", "block_step_fast_ok"]
