"""The learned pooling op family: ``learned_downsample`` / ``learned_upsample`` (``api.py``), their
reference twins (``reference.py``), canonicalisation (``canon.py``), the compiled ops' Python side
(``compiled.py``) and the Triton ops (``triton.py``)."""
from . import reference  # noqa: F401  (registers the reference backend's implementations first)
from . import compiled  # noqa: F401  (fake kernels; the cpp and cuda implementations)
from . import triton  # noqa: F401  (the triton implementations, when triton is importable)
from .api import learned_downsample, learned_upsample
from .reference import learned_downsample_ref, learned_upsample_ref

__all__ = ["learned_downsample", "learned_upsample", "learned_downsample_ref", "learned_upsample_ref"]
