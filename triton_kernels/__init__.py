"""Triton kernels of resnet_bk, installed as ``resnet_bk.triton_kernels``."""
