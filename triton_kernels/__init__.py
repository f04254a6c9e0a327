"""Triton kernels of resnet_bk, installed as ``resnet_bk.triton_kernels``.

* ``bk_core``: BK-Core forward and exact backward (strategies "lanes" and "chunked").
* ``step``: BK-Core's one-token decode step (one launch).
* ``pooling``: learned down/upsampling, forward and backward.
* ``aot_check``: compiles every kernel specialisation for a CUDA target without a GPU.

Modules import these through ``resnet_bk.ops`` (the "triton" backend), never directly; the kernel
modules are imported lazily there, because ``TRITON_INTERPRET`` is read when they are imported.
"""
