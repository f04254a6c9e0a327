"""resnet_bk.training: trainers, the CLI's model registry and the real-data training entry point
(``python -m resnet_bk.training.train``). Depends on ``resnet_bk.models``, never the reverse."""
from .act import ACTTrainer
from .data_efficiency import ActiveLearningSelector, CurriculumLearningScheduler, GradientCachingTrainer, model_logits
from .learned_length import LearnedSequenceLengthTrainer
from .sparsity import AdaptiveSparsityScheduler

__all__ = ["ACTTrainer", "LearnedSequenceLengthTrainer", "AdaptiveSparsityScheduler",
           "CurriculumLearningScheduler", "ActiveLearningSelector", "GradientCachingTrainer", "model_logits"]
