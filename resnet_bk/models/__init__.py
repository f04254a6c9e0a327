"""resnet_bk.models: nn.Modules built on ``resnet_bk.ops`` (base LM, ACT, multi-scale, configurable)."""
from .base import BKMixer, LanguageModel, MoEResNetBKLayer, ResNetBKBlock, SparseMoELayer, moe_aux_loss

__all__ = ["SparseMoELayer", "MoEResNetBKLayer", "ResNetBKBlock", "LanguageModel", "BKMixer", "moe_aux_loss"]
