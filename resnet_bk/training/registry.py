"""The CLI's model registry: ``MODELS``, a dict from ``--model`` name to a factory
``factory(vocab_size, d_model, n_layers, n_seq, backend=None, **kwargs) -> nn.Module``.

Every model the CLI offers is named here, next to its factory (models do not register
themselves: ``resnet_bk.models`` never imports ``resnet_bk.training``). Add one at run time with
``register_model(name, factory)``.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch.nn as nn

from ..models import (ACTLanguageModel, AdaptiveSequenceLengthWrapper, EarlyExitLanguageModel, LanguageModel,
                      MultiScaleResNetBKBlock, SparseLanguageModel)

__all__ = ["MODELS", "ModelFactory", "register_model"]

ModelFactory = Callable[..., nn.Module]


def _plain(vocab_size, d_model, n_layers, n_seq, backend=None, **kw):
    return LanguageModel(vocab_size, d_model, n_layers, n_seq, backend=backend, **kw)


def _act(vocab_size, d_model, n_layers, n_seq, backend=None, **kw):
    kw.setdefault("act_threshold", 0.95)
    return ACTLanguageModel(vocab_size, d_model, n_layers, n_seq, backend=backend, **kw)


def _early_exit(vocab_size, d_model, n_layers, n_seq, backend=None, **kw):
    return EarlyExitLanguageModel(vocab_size, d_model, n_layers, n_seq, backend=backend, **kw)


def _multiscale(hierarchical: bool) -> ModelFactory:
    def make(vocab_size, d_model, n_layers, n_seq, backend=None, **kw):
        num_experts, top_k = kw.pop("num_experts", 4), kw.pop("top_k", 1)
        dropout_p, causal = kw.pop("dropout_p", 0.1), kw.pop("causal", True)

        def block(i):
            return MultiScaleResNetBKBlock(d_model, n_seq, num_experts, hierarchical, top_k=top_k,
                                           dropout_p=dropout_p, causal=causal, backend=backend)
        return LanguageModel(vocab_size, d_model, n_layers, n_seq, num_experts, top_k, dropout_p,
                             causal=causal, backend=backend, block_factory=block, **kw)
    return make


def _sparse(vocab_size, d_model, n_layers, n_seq, backend=None, **kw):
    return SparseLanguageModel(vocab_size, d_model, n_layers, n_seq, backend=backend, **kw)


def _learned_length(vocab_size, d_model, n_layers, n_seq, backend=None, *, num_length_bins=8,
                    length_penalty=0.01, **kw):
    base = LanguageModel(vocab_size, d_model, n_layers, n_seq, backend=backend, **kw)
    return AdaptiveSequenceLengthWrapper(base, n_seq, num_length_bins, length_penalty)


MODELS: Dict[str, ModelFactory] = {
    "plain": _plain,
    "act": _act,
    "early_exit": _early_exit,
    "multiscale": _multiscale(False),
    "hierarchical": _multiscale(True),
    "sparse": _sparse,
    "learned_length": _learned_length,
}


def register_model(name: str, factory: ModelFactory) -> None:
    """Add (or replace) a model for ``train(name, ...)`` / ``--model name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: expected a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory: expected a callable, got {type(factory).__name__}")
    MODELS[name] = factory
