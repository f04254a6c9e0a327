"""The BK-Core op family: ``bk_core``, ``bk_core_masked``, ``bk_core_features`` (``api.py``), their
reference twins (``reference.py``), argument canonicalisation (``canon.py``), the compiled ops'
Python side (``compiled.py``), the Triton ops (``triton.py``), the one-token decode step
``bk_core_step`` (``step.py``: the whole op, every backend) and sequence-parallel BK-Core over
``torch.distributed`` (``distributed.py``, re-exported as ``resnet_bk.distributed``)."""
from . import reference  # noqa: F401  (registers the reference backend's implementation first)
from . import compiled  # noqa: F401  (fake kernels; the cpp and cuda implementations)
from . import triton  # noqa: F401  (the triton implementation, when triton is importable)
from . import step as _step  # noqa: F401  (the decode step's implementations)
from .api import bk_core, bk_core_features, bk_core_masked
from .step import bk_core_step
from .reference import bk_core_masked_ref, bk_core_ref

__all__ = ["bk_core", "bk_core_masked", "bk_core_features", "bk_core_step", "bk_core_ref", "bk_core_masked_ref"]
