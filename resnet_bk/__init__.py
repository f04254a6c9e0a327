"""ResNet-BK: exact O(N) BK-Core resolvent kernels and the adaptive modules built on them."""
from . import ops
from .ops import bk_core, bk_core_features, bk_core_masked

__version__ = "0.1.0"
__all__ = ["ops", "bk_core", "bk_core_features", "bk_core_masked", "__version__"]
