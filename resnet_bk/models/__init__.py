"""resnet_bk.models: nn.Modules built on ``resnet_bk.ops`` (base LM, ACT, multi-scale, configurable)."""
from .base import BKMixer, LanguageModel, MoEResNetBKLayer, ResNetBKBlock, SparseMoELayer, moe_aux_loss
from .act import ACTLanguageModel, ACTTrainer, AdaptiveResNetBKBlock
from .multi_scale import (HierarchicalMultiScaleLayer, LearnedDownsampling, LearnedUpsampling,
                          MultiScaleResNetBKBlock, MultiScaleResNetBKLayer, count_flops_multi_scale)
from .configurable import PRESETS, ConfigurableResNetBK, ResNetBKConfig

__all__ = [
    "SparseMoELayer", "MoEResNetBKLayer", "ResNetBKBlock", "LanguageModel", "BKMixer", "moe_aux_loss",
    "AdaptiveResNetBKBlock", "ACTLanguageModel", "ACTTrainer",
    "LearnedDownsampling", "LearnedUpsampling", "MultiScaleResNetBKLayer", "HierarchicalMultiScaleLayer",
    "MultiScaleResNetBKBlock", "count_flops_multi_scale",
    "ResNetBKConfig", "ConfigurableResNetBK", "PRESETS",
]
