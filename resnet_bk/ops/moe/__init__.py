"""The top-1 mixture-of-experts inference op family: ``moe_top1_inference`` (``api.py``), its
reference twin ``moe_top1_ref`` (``reference.py``) and the compiled op's registration
(``compiled.py``)."""
from . import reference  # noqa: F401  (registers the reference backend's implementation first)
from . import compiled  # noqa: F401  (the cpp implementation)
from .api import moe_top1_fast_ok, moe_top1_inference
from .reference import moe_top1_ref

__all__ = ["moe_top1_inference", "moe_top1_ref", "moe_top1_fast_ok"]
