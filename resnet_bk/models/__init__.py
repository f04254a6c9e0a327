"""resnet_bk.models: nn.Modules built on ``resnet_bk.ops`` (base LM, ACT, multi-scale, learned sparsity,
learned sequence length, learnable position bucketing, configurable)."""
from .base import BKMixer, LanguageModel, MoEResNetBKLayer, ResNetBKBlock, SparseMoELayer, moe_aux_loss
from .act import ACTLanguageModel, ACTTrainer, AdaptiveResNetBKBlock
from .multi_scale import (HierarchicalMultiScaleLayer, LearnedDownsampling, LearnedUpsampling,
                          MultiScaleResNetBKBlock, MultiScaleResNetBKLayer, count_flops_multi_scale)
from .configurable import PRESETS, ConfigurableResNetBK, ResNetBKConfig
from .sparse import (AdaptiveSparsityScheduler, SparseBKCore, SparseLanguageModel, SparseMoEResNetBKLayer,
                     gumbel_sigmoid, sparsity_loss)
from .learned_length import AdaptiveSequenceLengthWrapper, LearnedSequenceLengthTrainer, SequenceLengthPredictor
from .bucketing import BucketLandmarkHandle, LearnableBucketLandmark, attach_bucket_landmark

__all__ = [
    "SparseMoELayer", "MoEResNetBKLayer", "ResNetBKBlock", "LanguageModel", "BKMixer", "moe_aux_loss",
    "AdaptiveResNetBKBlock", "ACTLanguageModel", "ACTTrainer",
    "LearnedDownsampling", "LearnedUpsampling", "MultiScaleResNetBKLayer", "HierarchicalMultiScaleLayer",
    "MultiScaleResNetBKBlock", "count_flops_multi_scale",
    "ResNetBKConfig", "ConfigurableResNetBK", "PRESETS",
    "SparseBKCore", "SparseMoEResNetBKLayer", "SparseLanguageModel", "AdaptiveSparsityScheduler",
    "gumbel_sigmoid", "sparsity_loss",
    "SequenceLengthPredictor", "AdaptiveSequenceLengthWrapper", "LearnedSequenceLengthTrainer",
    "LearnableBucketLandmark", "attach_bucket_landmark", "BucketLandmarkHandle",
]
