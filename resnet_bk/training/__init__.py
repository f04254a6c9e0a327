"""resnet_bk.training: trainers and the real-data training entry point (``python -m resnet_bk.training.train``)."""
