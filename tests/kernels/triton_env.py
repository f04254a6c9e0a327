"""Imports the Triton kernel modules for a test module: on a machine without a GPU (or with
TRITON_INTERPRET=1) they must be imported with TRITON_INTERPRET=1 set, since ``@triton.jit``
decides at decoration time (for triton's own library functions too); the variable is restored
afterwards. Import this after the module's ``pytest.skip`` for a missing triton."""
import importlib
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
DEVICE = "cuda" if ON_GPU else "cpu"


def import_kernels(*names: str) -> list:
    """The modules ``names`` (e.g. "triton", "resnet_bk.triton_kernels.bk_core"), imported with the
    interpreter on when there is no GPU."""
    prev = os.environ.get("TRITON_INTERPRET")
    if not ON_GPU:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        return [importlib.import_module(n) for n in names]
    finally:
        if prev is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = prev
