"""``ConfigurableResNetBK``: one model class whose ``ResNetBKConfig`` flags really select modules.

Unlike the original (every ``use_*`` flag a no-op, a global ``GRAD_BLEND`` mutated by constructors),
each flag here either changes the module structure / forward, or raises ``NotImplementedError``
at construction saying why it cannot be honoured. Nothing is global: two models with different
configs coexist.

Honoured: ``use_adaptive_computation`` (ACT blocks and a ponder cost), ``use_multi_scale`` (+
``multi_scale_hierarchical``), ``use_learned_sparsity`` (``resnet_bk.models.sparse.SparseMoEResNetBKLayer``),
``use_custom_kernels`` (False forces the pure-PyTorch "reference" BK backend),
``use_gradient_checkpointing`` (torch.utils.checkpoint per block), ``use_mixed_precision`` (bfloat16
autocast in forward), ``use_analytic_gradient`` (always true: the BK-Core backward is the exact
gradient; False cannot be honoured), ``causal``, ``learnable_z``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .act import ACTLanguageModel
from .base import LanguageModel, ResNetBKBlock, call_with_cache, moe_aux_loss
from .cache import DecodeCache
from .generation import GenerationMixin
from .multi_scale import MultiScaleResNetBKBlock
from .sparse import SparseMoEResNetBKLayer

__all__ = ["ResNetBKConfig", "ConfigurableResNetBK", "PRESETS"]


@dataclass
class ResNetBKConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 4
    n_seq: int = 128
    num_experts: int = 4
    top_k: int = 1
    dropout_p: float = 0.1
    causal: bool = True
    learnable_z: bool = False
    moe_aux_weight: float = 0.01
    # BK-Core numerics. The backward is the exact O(N) gradient; the original's hypothesis-7 blend,
    # v clamp and feature clamp are gone. Setting grad_blend / v_max / feature_clamp raises.
    use_analytic_gradient: bool = True
    grad_blend: Optional[float] = None
    v_max: Optional[float] = None
    feature_clamp: Optional[float] = None
    # Step 2 (not provided by this package: raise if requested)
    use_koopman: bool = False
    koopman_dim: int = 256
    use_physics_informed: bool = False
    # Step 4 (not provided)
    use_quantization: bool = False
    quantization_bits: int = 8
    use_pruning: bool = False
    prune_threshold: float = 0.05
    use_distillation: bool = False
    # Step 5: hardware
    use_mixed_precision: bool = False
    use_custom_kernels: bool = True
    use_gradient_checkpointing: bool = False
    # Step 6: adaptive computation
    use_adaptive_computation: bool = False
    act_threshold: float = 0.99
    act_lambda: float = 0.01
    use_multi_scale: bool = False
    multi_scale_hierarchical: bool = False
    use_learned_sparsity: bool = False
    target_sparsity: float = 0.5
    sparsity_loss_weight: float = 0.01
    # Step 7: training-data utilities belong to the trainer, not the model
    use_curriculum_learning: bool = False
    use_active_learning: bool = False
    use_gradient_caching: bool = False
    grad_clip: float = 0.5

    @classmethod
    def preset(cls, name: str, **overrides) -> "ResNetBKConfig":
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {sorted(PRESETS)}, got {name!r}")
        return dataclasses.replace(PRESETS[name], **overrides)

    def validate(self) -> None:
        """Raise NotImplementedError for every flag this package cannot honour, ValueError for
        contradictory ones."""
        unsupported = {
            "use_koopman": "Koopman operator layers are not part of resnet_bk",
            "use_physics_informed": "physics-informed (Hamiltonian) layers are not part of resnet_bk",
            "use_quantization": "quantized BK-Core kernels are not part of resnet_bk",
            "use_pruning": "pruning is not part of resnet_bk",
            "use_distillation": "distillation is a training setup, not provided by resnet_bk",
            "use_curriculum_learning": ("curriculum learning is a trainer feature: use the data-efficiency "
                                        "trainers in resnet_bk.training, not a model flag"),
            "use_active_learning": ("active learning is a trainer feature: use the data-efficiency trainers "
                                    "in resnet_bk.training, not a model flag"),
            "use_gradient_caching": ("gradient caching reuses stale gradients from other batches (biased); "
                                     "it is not provided"),
        }
        for flag, why in unsupported.items():
            if getattr(self, flag):
                raise NotImplementedError(f"ResNetBKConfig.{flag}=True cannot be honoured: {why}")
        if not self.use_analytic_gradient:
            raise NotImplementedError("ResNetBKConfig.use_analytic_gradient=False cannot be honoured: the BK-Core "
                                      "backward is always the exact analytic gradient")
        for name in ("grad_blend", "v_max", "feature_clamp"):
            if getattr(self, name) is not None:
                raise NotImplementedError(
                    f"ResNetBKConfig.{name}={getattr(self, name)!r} cannot be honoured: the hypothesis-7 gradient "
                    f"blend and the silent v / feature clamps were removed (leave it None)")
        if self.use_adaptive_computation and self.use_multi_scale:
            raise NotImplementedError("use_adaptive_computation with use_multi_scale: ACT over multi-scale blocks "
                                      "is not implemented (choose one)")
        if self.use_adaptive_computation and self.use_learned_sparsity:
            raise NotImplementedError("use_adaptive_computation with use_learned_sparsity is not implemented")
        if self.use_multi_scale and self.use_learned_sparsity:
            raise NotImplementedError("use_multi_scale with use_learned_sparsity is not implemented")
        if self.multi_scale_hierarchical and not self.use_multi_scale:
            raise ValueError("multi_scale_hierarchical=True needs use_multi_scale=True")
        if self.use_adaptive_computation and self.use_gradient_checkpointing:
            raise NotImplementedError("use_gradient_checkpointing with ACT is not implemented (the ACT blocks "
                                      "gather a data-dependent subset of tokens)")


PRESETS: Dict[str, ResNetBKConfig] = {
    "baseline": ResNetBKConfig(),
    "act": ResNetBKConfig(use_adaptive_computation=True, act_threshold=0.95),
    "multi_scale": ResNetBKConfig(use_multi_scale=True),
    "hierarchical": ResNetBKConfig(use_multi_scale=True, multi_scale_hierarchical=True),
    "sparse": ResNetBKConfig(use_learned_sparsity=True),
    "memory_saving": ResNetBKConfig(use_gradient_checkpointing=True, use_mixed_precision=True),
}


class _Checkpointed(nn.Module):
    """Runs the wrapped block under torch.utils.checkpoint while training (activations recomputed)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    supports_cache = True

    def forward(self, x: Tensor, cache: Optional[DecodeCache] = None) -> Tensor:
        if cache is not None:  # incremental decoding: nothing to recompute
            return call_with_cache(self.block, cache, x)
        if self.training and torch.is_grad_enabled():
            return checkpoint(self.block, x, use_reentrant=False)
        return self.block(x)


class ConfigurableResNetBK(GenerationMixin, nn.Module):
    """A ResNet-BK language model built from a ``ResNetBKConfig`` (keyword overrides allowed:
    ``ConfigurableResNetBK(vocab_size=..., use_multi_scale=True, multi_scale_hierarchical=True)``).

    forward(x (B, N) long) -> logits (B, N, V); ``forward(x, return_aux_loss=True)`` returns
    (logits, aux) where aux is the sum of the enabled auxiliary losses (ACT: act_lambda * ponder,
    sparsity: the layer's sparsity loss, MoE load balance: moe_aux_weight * balance).
    """

    def __init__(self, config: Optional[ResNetBKConfig] = None, **overrides):
        super().__init__()
        if config is None:
            config = ResNetBKConfig()
        if not isinstance(config, ResNetBKConfig):
            raise TypeError(f"config: expected a ResNetBKConfig, got {type(config).__name__}")
        config = dataclasses.replace(config, **overrides)
        config.validate()
        self.config = config
        c = config
        backend = None if c.use_custom_kernels else "reference"
        common = dict(causal=c.causal, backend=backend, learnable_z=c.learnable_z)
        if c.use_adaptive_computation:
            self.model = ACTLanguageModel(c.vocab_size, c.d_model, c.n_layers, c.n_seq, c.num_experts, c.top_k,
                                          c.dropout_p, act_threshold=c.act_threshold, act_lambda=c.act_lambda,
                                          moe_aux_weight=c.moe_aux_weight, **common)
        else:
            if c.use_multi_scale:
                def make(i: int) -> nn.Module:
                    return MultiScaleResNetBKBlock(c.d_model, c.n_seq, c.num_experts, c.multi_scale_hierarchical,
                                                   top_k=c.top_k, dropout_p=c.dropout_p, **common)
            elif c.use_learned_sparsity:
                def make(i: int) -> nn.Module:
                    # SparseMoEResNetBKLayer takes no learnable_z: the sparse BK-Core keeps a fixed z.
                    layer = SparseMoEResNetBKLayer(c.d_model, c.n_seq, c.num_experts, c.top_k, c.dropout_p,
                                                   target_sparsity=c.target_sparsity,
                                                   sparsity_loss_weight=c.sparsity_loss_weight,
                                                   causal=c.causal, backend=backend)
                    return ResNetBKBlock(c.d_model, c.n_seq, bk_layer=layer)
            else:
                def make(i: int) -> nn.Module:
                    return ResNetBKBlock(c.d_model, c.n_seq, c.num_experts, c.top_k, c.dropout_p, **common)
            factory = make
            if c.use_gradient_checkpointing:
                def factory(i: int) -> nn.Module:
                    return _Checkpointed(make(i))
            self.model = LanguageModel(c.vocab_size, c.d_model, c.n_layers, c.n_seq, c.num_experts, c.top_k,
                                       c.dropout_p, block_factory=factory, moe_aux_weight=c.moe_aux_weight, **common)

    def _aux(self, ponder: Optional[Tensor]) -> Optional[Tensor]:
        c = self.config
        aux = None
        if ponder is not None:
            aux = c.act_lambda * ponder
        bal = moe_aux_loss(self)
        if bal is not None and c.moe_aux_weight != 0:
            aux = c.moe_aux_weight * bal if aux is None else aux + c.moe_aux_weight * bal
        if c.use_learned_sparsity:
            for m in self.modules():
                get = getattr(m, "get_sparsity_loss", None)
                if callable(get) and m is not self:
                    s = get()
                    if s is not None:
                        aux = s if aux is None else aux + s
        return aux

    def _generation_host(self):
        return self.model

    def init_cache(self, batch_size: int, *, length: Optional[int] = None) -> DecodeCache:
        """The inner model's decoding cache (``forward(x, cache=cache)`` goes to it)."""
        return self.model.init_cache(batch_size, length=length)

    def forward(self, x: Tensor, return_aux_loss: bool = False, cache: Optional[DecodeCache] = None):
        """``cache`` (from ``init_cache``): x continues the cached sequences (see ``LanguageModel``)."""
        ctx = (torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
               if self.config.use_mixed_precision else torch.autocast(device_type=x.device.type, enabled=False))
        kw = {} if cache is None else {"cache": cache}
        with ctx:
            if self.config.use_adaptive_computation:
                logits, ponder = self.model(x, return_ponder_cost=True, **kw)
            else:
                logits, ponder = self.model(x, **kw), None
        logits = logits.float()
        if not return_aux_loss:
            return logits
        return logits, self._aux(ponder)

    def training_loss(self, x: Tensor, y: Tensor) -> Tuple[Tensor, dict]:
        logits, aux = self(x, return_aux_loss=True)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        metrics = {"ce_loss": ce.detach()}
        if self.config.use_adaptive_computation:
            metrics["avg_layers_executed"] = self.model.get_avg_layers_executed()
        return (ce if aux is None else ce + aux), metrics

    def get_num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def get_config_summary(self) -> dict:
        """The config as a dict plus the list of enabled features and the block class in use."""
        c = self.config
        enabled = [f.name for f in dataclasses.fields(c) if f.name.startswith("use_") and getattr(c, f.name)]
        blocks = getattr(self.model, "blocks", [])
        first = blocks[0] if len(blocks) else None
        if isinstance(first, _Checkpointed):
            first = first.block
        return {"config": dataclasses.asdict(c), "enabled_features": enabled,
                "block_type": type(first).__name__ if first is not None else None,
                "num_parameters": self.get_num_parameters()}
