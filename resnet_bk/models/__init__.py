"""resnet_bk.models: nn.Modules built on ``resnet_bk.ops`` (base LM, ACT, early exit, multi-scale, learned sparsity,
learned sequence length, learnable position bucketing, configurable).

The trainers (``ACTTrainer``, ``LearnedSequenceLengthTrainer``, ``AdaptiveSparsityScheduler``) live in
``resnet_bk.training``; their names here still work (resolved on first use)."""
from typing import TYPE_CHECKING

from ._lazy import lazy_reexports
from .base import BKMixer, LanguageModel, MoEResNetBKLayer, ResNetBKBlock, SparseMoELayer, moe_aux_loss
from .act import ACTLanguageModel, AdaptiveResNetBKBlock
from .early_exit import EarlyExitLanguageModel, EarlyExitResNetBKBlock
from .multi_scale import (HierarchicalMultiScaleLayer, LearnedDownsampling, LearnedUpsampling,
                          MultiScaleResNetBKBlock, MultiScaleResNetBKLayer, count_flops_multi_scale)
from .configurable import PRESETS, ConfigurableResNetBK, ResNetBKConfig
from .sparse import SparseBKCore, SparseLanguageModel, SparseMoEResNetBKLayer, gumbel_sigmoid, sparsity_loss
from .learned_length import AdaptiveSequenceLengthWrapper, SequenceLengthPredictor
from .bucketing import (BucketLandmarkHandle, HyLoRADAConfig, LearnableBucketLandmark, PositionAdaptiveLandmark,
                        attach_bucket_landmark)

if TYPE_CHECKING:
    from ..training.act import ACTTrainer
    from ..training.learned_length import LearnedSequenceLengthTrainer
    from ..training.sparsity import AdaptiveSparsityScheduler

# Trainers moved to resnet_bk.training (which imports models); lazy re-export (PEP 562): models never import training.
__getattr__, __dir__ = lazy_reexports(globals(), {
    "ACTTrainer": "resnet_bk.training.act",
    "LearnedSequenceLengthTrainer": "resnet_bk.training.learned_length",
    "AdaptiveSparsityScheduler": "resnet_bk.training.sparsity",
})

__all__ = [
    "SparseMoELayer", "MoEResNetBKLayer", "ResNetBKBlock", "LanguageModel", "BKMixer", "moe_aux_loss",
    "AdaptiveResNetBKBlock", "ACTLanguageModel", "ACTTrainer", "EarlyExitResNetBKBlock", "EarlyExitLanguageModel",
    "LearnedDownsampling", "LearnedUpsampling", "MultiScaleResNetBKLayer", "HierarchicalMultiScaleLayer",
    "MultiScaleResNetBKBlock", "count_flops_multi_scale",
    "ResNetBKConfig", "ConfigurableResNetBK", "PRESETS",
    "SparseBKCore", "SparseMoEResNetBKLayer", "SparseLanguageModel", "AdaptiveSparsityScheduler",
    "gumbel_sigmoid", "sparsity_loss",
    "SequenceLengthPredictor", "AdaptiveSequenceLengthWrapper", "LearnedSequenceLengthTrainer",
    "LearnableBucketLandmark", "PositionAdaptiveLandmark", "HyLoRADAConfig", "attach_bucket_landmark",
    "BucketLandmarkHandle",
]
