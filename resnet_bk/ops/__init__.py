"""resnet_bk.ops: the functional core. Every op dispatches to a backend (reference, cpp, cuda,
triton) through the registry; models call only these functions.

    G = bk_core(diag, super_diag, sub_diag, z)             # (..., N) complex
    y = bk_core(diag, super_diag, sub_diag, z, causal=True)
    y_t, d_t = bk_core_step(diag_t, super_t, sub_t, z, state)  # one token of the causal op
    feats = bk_core_features(he_diag, h0_super, h0_sub, z)  # (..., N, 2) float32 [Re, Im]

Choosing a backend: ``backend=`` on any op, else ``RESNET_BK_BACKEND``, else automatic (CUDA
tensors: cuda, triton, reference; CPU tensors: cpp, reference). ``explain(...)`` says which backend a
call would use and why; ``available_backends()`` lists what loaded. ``verify()`` (or
``RESNET_BK_VERIFY=1``) checks every call against the reference under the policy ``tolerance(dtype)``.

Layout: one package per op family (``bk_core/``, ``pooling/``, ``moe/``), each with the same file
roles: ``api.py`` (the public functions), ``canon.py`` (argument checks and canonical form),
``reference.py`` (the reference twins and the reference backend), ``compiled.py`` (the compiled
ops' Python side: fake kernels, registration) and ``triton.py`` (the Triton ops). Shared:
``_registry.py`` (backends, choice, explain, fast-path decision), ``_verify.py`` (verify mode,
tolerance policy), ``_extension.py`` (loading ``resnet_bk._C``; ``cpu_isa``, ``cpu_huge_pages``),
``_triton.py`` (where Triton kernels may run), ``_checks.py`` (argument checks).
Note: ``resnet_bk.ops.bk_core`` is the function; its package is reached as
``from resnet_bk.ops.bk_core import api`` (or ``sys.modules["resnet_bk.ops.bk_core"]``).
"""
from __future__ import annotations

import torch as _torch

from . import _registry, _verify, _extension, _triton  # noqa: F401  (backends registered before the ops)
from ._extension import cpu_huge_pages, cpu_isa
from ._registry import BackendUnavailableError, Choice, available_backends, backend_status
from ._verify import VerificationError, assert_close, tolerance, verify, verify_enabled
from .bk_core import bk_core, bk_core_features, bk_core_masked, bk_core_masked_ref, bk_core_ref, bk_core_step
from .pooling import learned_downsample, learned_downsample_ref, learned_upsample, learned_upsample_ref
from .moe import (block_step_fast_ok, moe_bk_block_step, moe_bk_block_step_ref, moe_dispatch, moe_top1_fast_ok,
                  moe_top1_inference, moe_top1_ref)
from .bk_core import api as _bk_api
from .bk_core import step as _bk_step
from .pooling import api as _pool_api
from .moe import api as _moe_api
from .moe import block_step as _block_step

# public op -> (registry op name, the function giving (device, canonical arguments) of a call)
_CANONICAL = {
    bk_core: ("bk_core", _bk_api.canonical_call),
    bk_core_masked: ("bk_core", _bk_api.canonical_call),
    bk_core_features: ("bk_core", _bk_api.canonical_call),
    bk_core_step: ("bk_core_step", _bk_step.canonical_step_call),
    learned_downsample: ("learned_downsample", _pool_api.canonical_downsample_call),
    learned_upsample: ("learned_upsample", _pool_api.canonical_upsample_call),
    moe_top1_inference: ("moe_top1_inference", _moe_api.canonical_call),
    moe_bk_block_step: ("moe_bk_block_step", _block_step.canonical_call),
}


def explain(*args, backend=None, **kwargs) -> Choice:
    """Which backend a call would use, and why the ones before it in the preference order were
    skipped; ``str(explain(...))`` reads as a sentence. A forced backend that cannot run raises
    ``BackendUnavailableError`` with the reason. Two forms:

        explain(diag, super_diag, sub_diag, z, mask=None, causal=False, backend=None)   # bk_core
        explain(ops.learned_downsample, x, logits, causal=True, backend=None)          # any public op
    """
    if args and callable(args[0]) and not isinstance(args[0], _torch.Tensor):
        fn, args = args[0], args[1:]
        if fn not in _CANONICAL:
            raise ValueError(f"op: expected one of the public ops {[f.__name__ for f in _CANONICAL]}, got {fn!r}")
        op, canonical = _CANONICAL[fn]
    else:
        op, canonical = "bk_core", _bk_api.canonical_call
        kwargs.pop("op", None)  # the old keyword (always "bk_core")
    device, canon = canonical(*args, **kwargs)
    return _registry.choose(op, device, canon, backend)

__all__ = [
    "bk_core", "bk_core_features", "bk_core_masked", "bk_core_step", "bk_core_ref", "bk_core_masked_ref",
    "learned_downsample", "learned_upsample", "learned_downsample_ref", "learned_upsample_ref",
    "moe_top1_inference", "moe_top1_ref", "moe_top1_fast_ok", "moe_dispatch", "moe_bk_block_step",
    "moe_bk_block_step_ref", "block_step_fast_ok",
    "available_backends", "backend_status", "explain", "verify", "verify_enabled", "tolerance", "assert_close",
    "cpu_isa", "cpu_huge_pages", "BackendUnavailableError", "VerificationError", "Choice",
]
