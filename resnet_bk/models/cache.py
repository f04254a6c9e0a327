"""Incremental decoding state of the causal ResNet-BK models: ``DecodeCache``.

A ResNet-BK layer's only cross-token state is its BK-Core's last pivot, one complex number per
sequence (docs/BK_CORE_MATH.md, "Streaming"); the multi-scale layers add the tail of their pooling
window and the low-resolution group in progress, the learned-sparsity layer the last two positions of
its interpolator's window. None of it grows with the context: a step costs the same at context 8000
as at context 8.

Usage (every causal model in the package)::

    cache = model.init_cache(batch_size)
    logits = model(prompt, cache=cache)          # prefill: (B, n) continues from the cache's position
    logits = model(next_tokens, cache=cache)     # (B, 1) decode steps; the cache advances in place

The cache belongs to one model and one batch size. Each stateful module keeps its entries in its own
slot (``cache.slot(module)``): its position along its own axis (a low-resolution layer counts its own
entries) and its tensors. Tensors in the cache keep their autograd graph when grad is enabled, so a
loss over several cached calls back-propagates exactly through the states (detach the states, or
make a new cache, to truncate).
"""
from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Dict, Iterator, Optional

from torch import Tensor, nn

__all__ = ["DecodeCache", "check_cache", "cache_slot", "active_cache", "current_cache"]

# The cache of the cached forward running now, for code that only sees a module's output (the
# forward hook of ``attach_bucket_landmark``): set by the models' forward around a cached call.
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("resnet_bk_decode_cache", default=None)


@contextlib.contextmanager
def active_cache(cache: Optional["DecodeCache"]) -> Iterator[None]:
    token = _ACTIVE.set(cache)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_cache() -> Optional["DecodeCache"]:
    """The ``DecodeCache`` of the cached forward in progress (None outside one)."""
    return _ACTIVE.get()


class DecodeCache:
    """The decoding state of one model for a batch of ``batch_size`` sequences.

    ``position``: tokens consumed so far (the next token's position). ``length``: the normalising
    length a ``LearnableBucketLandmark`` attached to the model uses (positions keep their buckets as
    the sequence grows; required when one is attached, see ``resnet_bk.models.bucketing``).
    """

    def __init__(self, model: nn.Module, batch_size: int, length: Optional[int] = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        if length is not None and (not isinstance(length, int) or isinstance(length, bool) or length < 1):
            raise ValueError(f"length: expected a positive int or None, got {length!r}")
        self._model = weakref.ref(model)
        self.model_class = type(model).__name__
        self.batch_size = batch_size
        self.length = length
        self.position = 0
        self._slots: Dict[int, dict] = {}

    def slot(self, module: nn.Module) -> dict:
        """The entries of ``module`` (created empty on first use)."""
        s = self._slots.get(id(module))
        if s is None:
            s = self._slots[id(module)] = {"pos": 0, "d": None}
        return s

    def nbytes(self) -> int:
        """Bytes held by the cache's tensors (its memory; constant in the context)."""
        total = 0
        for s in self._slots.values():
            for v in s.values():
                if isinstance(v, Tensor):
                    total += v.numel() * v.element_size()
        return total

    def detach_(self) -> "DecodeCache":
        """Detach every state from its autograd graph (truncated back-propagation through time)."""
        for s in self._slots.values():
            for k, v in s.items():
                if isinstance(v, Tensor):
                    s[k] = v.detach()
        return self

    def __repr__(self) -> str:
        return (f"DecodeCache(model={self.model_class}, batch_size={self.batch_size}, position={self.position}, "
                f"length={self.length}, bytes={self.nbytes()})")


def check_cache(model: nn.Module, cache, tokens: Tensor, n_seq: int) -> None:
    """A cache used with ``model`` for ``tokens`` (B, n): the right type, model and batch size, and
    the positions it would reach within ``n_seq`` (the learned position embedding's length)."""
    if not isinstance(cache, DecodeCache):
        raise TypeError(f"cache: expected a DecodeCache from model.init_cache(batch_size), got {type(cache).__name__}")
    if cache._model() is not model:
        raise ValueError(f"cache: this cache was made by another model ({cache.model_class} "
                         f"{'no longer alive' if cache._model() is None else 'instance'}); use model.init_cache()")
    if tokens.shape[0] != cache.batch_size:
        raise ValueError(f"x: expected batch size {cache.batch_size} (the cache's), got {tokens.shape[0]}")
    end = cache.position + tokens.shape[1]
    if end > n_seq:
        raise ValueError(f"x: the cache is at position {cache.position} and {tokens.shape[1]} more tokens reach "
                         f"{end}, past n_seq={n_seq} (the learned position embedding's length)")


def cache_slot(module: nn.Module, cache: Optional[DecodeCache], causal: bool) -> Optional[dict]:
    """``module``'s slot of ``cache`` (None without a cache); a non-causal module cannot stream."""
    if cache is None:
        return None
    if not causal:
        raise ValueError(f"cache: {type(module).__name__} is two-sided (causal=False): its outputs depend on "
                         f"later positions, so it cannot decode incrementally")
    return cache.slot(module)
