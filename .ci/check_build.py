"""Checks an installed resnet_bk build: the compiled extension imported (no GPU needed), and every
op has the kernels it should for the build's torch (CPU always; CUDA when torch has CUDA)."""
import sys

import torch

import resnet_bk
from resnet_bk import ops
from resnet_bk.ops import _extension

# op -> the dispatch keys it must have kernels for ("CUDA" only when torch was built with CUDA)
EXPECTED = {
    "bk_core_fwd": ("CPU", "CUDA", "Autograd"), "bk_core_bwd": ("CPU", "CUDA"),
    # the carried-state forms (their autograd is Python: resnet_bk/ops/bk_core/stream.py)
    "bk_core_fwd_state": ("CPU", "CUDA"), "bk_core_bwd_state": ("CPU", "CUDA"),
    "bk_core_step": ("CPU", "CUDA", "Autograd"), "bk_core_step_out": ("CPU", "CUDA"),
    "learned_downsample_fwd": ("CPU", "CUDA", "Autograd"), "learned_downsample_bwd": ("CPU", "CUDA"),
    "learned_upsample_fwd": ("CPU", "CUDA", "Autograd"), "learned_upsample_bwd": ("CPU", "CUDA"),
    "moe_top1_infer": ("CPU",),  # CPU-only op (inference MoE)
    "moe_bk_block_step": ("CPU",),  # CPU-only op (the fused decode step of a MoE block)
}


def main() -> int:
    print(f"check_build: resnet_bk from {resnet_bk.__file__}; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); GPU present: {torch.cuda.is_available()}")
    if not _extension.HAS_C:
        print(f"check_build: FAIL: {_extension.LOAD_ERROR}")
        return 1
    bad = []
    for op, keys in EXPECTED.items():
        want = [k for k in keys if k != "CUDA" or torch.version.cuda is not None]
        have = [k for k in want if _extension.has_kernel(op, k)]
        print(f"check_build: {op:24s} {' '.join(have)}")
        bad += [f"{op}: no {k} kernel" for k in want if k not in have]
    print(f"check_build: backends: {ops.backend_status()}; cpu_isa {ops.cpu_isa()}")
    if bad:
        print("check_build: FAIL: " + "; ".join(bad))
        return 1
    print("check_build: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
