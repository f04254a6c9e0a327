"""Global-memory traffic of the BK-Core CUDA kernels, counted under the CPU emulation.

The emulation build (tests/kernels/cuda_emu/emu.h) wraps every global pointer the kernels receive
in an accessor that counts the bytes of each load and store and charges them to (kernel, buffer).
Here those counts become assertions: bytes per element (B * N) of the forward and the backward at
B = 1, 64 and 4096, each at a small N that emulates quickly but with the plan the kernels choose
for an H100/H200-sized GPU (132 SMs) for that shape, against the design goals of issue 23:

* forward <= 16 B/element (float32, shared coupling); per-row coupling and the mask add to that;
* backward <= 32 B/element for grad a alone (no grad k, no grad z, no mask).

"Model" bytes count a shared coupling row (k of shape (1, N-1)) once per pass over a position for
the whole batch: the B rows read the same N-1 values, which stay in L2 (at most 4 MB at B >= 64
and B * N <= 2^26); at B = 1 shared and per-row coupling are the same bytes. Every other load and
store counts in full. "Raw" bytes count every load as issued.
"""
import ctypes

import pytest
import torch

from test_cuda_emulated import CXX, build_emulated, emu_backward, emu_forward, make_canon

pytestmark = pytest.mark.skipif(CXX is None, reason="no C++ compiler (g++/c++) on PATH")

TAGS = ["a", "k", "zri", "mask", "out", "grad", "grad_a", "grad_k", "grad_zri", "grad_mask", "ws"]
UNKNOWN = 15
SMS = 132


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    return build_emulated(tmp_path_factory, "bk_core_cuda.cu", "bk_core_emu_api.cpp")


def traffic(lib):
    """{kernel: {(tag, 'ld'|'st'): bytes}} of the last emulated run."""
    fn = lib.bk_emu_traffic
    fn.restype = ctypes.c_char_p
    out = {}
    for i in range(32):
        b = (ctypes.c_uint64 * 32)()
        n = (ctypes.c_uint64 * 32)()
        name = fn(ctypes.c_int(i), b, n)
        if name is None:
            break
        d = {}
        for t in range(16):
            for s, kind in enumerate(("ld", "st")):
                if b[2 * t + s]:
                    d[(TAGS[t] if t < len(TAGS) else "unknown" if t == UNKNOWN else f"tag{t}", kind)] = b[2 * t + s]
        out[name.decode()] = d
    return out


def per_element(tr, B, N, shared_k):
    """(model, raw) bytes per element summed over kernels, and {kernel: model bytes per element}."""
    model = raw = 0.0
    per_kernel = {}
    for name, d in tr.items():
        assert ("unknown", "ld") not in d and ("unknown", "st") not in d, f"{name}: access outside every buffer"
        m = 0.0
        for (tag, kind), v in d.items():
            raw += v
            m += v / B if (tag == "k" and shared_k) else v
        per_kernel[name] = m / (B * N)
        model += m
    return model / (B * N), raw / (B * N), per_kernel


# (B, N): small N, the plan the kernels choose for that shape on 132 SMs
SHAPES = [(1, 4096), (64, 512), (4096, 32)]


def measure(emu, B, N, dtype=torch.float32, shared=True, masked=False, causal=False, need=("a",)):
    a, k, zri, mask, grad = make_canon(B, N, dtype, shared, masked, 5)
    emu_forward(emu, a, k, zri, mask, causal, "auto", 0, sms=SMS)
    fwd = per_element(traffic(emu), B, N, shared)
    emu_backward(emu, grad, a, k, zri, mask, causal, masked, "auto", 0, sms=SMS)
    bwd = per_element(traffic(emu), B, N, shared)
    return fwd, bwd


if __name__ == "__main__":
    import sys
    import pathlib
    import tempfile

    class _F:
        def mktemp(self, n):
            return pathlib.Path(tempfile.mkdtemp())

    lib = build_emulated(_F(), "bk_core_cuda.cu", "bk_core_emu_api.cpp")
    for B, N in SHAPES:
        for causal in (False, True):
            for shared, masked in ((True, False), (False, False), (True, True)):
                f, b = measure(lib, B, N, shared=shared, masked=masked, causal=causal)
                print(f"B={B} N={N} {'causal' if causal else 'two-sided'} {'shared' if shared else 'per-row'}"
                      f"{' mask' if masked else ''}: fwd {f[0]:.2f} (raw {f[1]:.2f}) bwd {b[0]:.2f} (raw {b[1]:.2f})")
                if len(sys.argv) > 1:
                    print("   fwd", {k: round(v, 2) for k, v in f[2].items()})
                    print("   bwd", {k: round(v, 2) for k, v in b[2].items()})
