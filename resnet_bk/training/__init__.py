"""resnet_bk.training: trainers and the real-data training entry point (``python -m resnet_bk.training.train``)."""
from .data_efficiency import ActiveLearningSelector, CurriculumLearningScheduler, GradientCachingTrainer, model_logits

__all__ = ["CurriculumLearningScheduler", "ActiveLearningSelector", "GradientCachingTrainer", "model_logits"]
