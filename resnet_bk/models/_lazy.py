"""Lazy re-exports (PEP 562) of names that live in a higher layer (``resnet_bk.training``).

The trainers moved to ``resnet_bk.training``, which imports ``resnet_bk.models``; the old names
under ``resnet_bk.models`` are resolved on first attribute access, so importing a models module
never imports ``resnet_bk.training``.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_reexports(module_globals: dict, names: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """``(__getattr__, __dir__)`` for a module whose ``names`` (name -> absolute module path) are
    imported from that module on first access (then cached in ``module_globals``)."""
    module_name = module_globals["__name__"]

    def __getattr__(name: str):
        target = names.get(name)
        if target is None:
            raise AttributeError(f"module {module_name!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(target), name)
        module_globals[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(set(module_globals) | set(names))

    return __getattr__, __dir__
