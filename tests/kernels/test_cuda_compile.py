"""Compile checks of the CUDA sources that run without a GPU.

* every kernel file csrc/cuda/*.cu compiles with nvcc for sm_80 and sm_90 (one nvcc call per file,
  both architectures, ptxas verbose so register spills show in the log), with the half/bfloat16
  defines torch's extension builder adds;
* the torch binding csrc/cuda/*.cpp passes a C++ syntax check against this torch's headers with
  RESNET_BK_WITH_CUDA defined (a CPU-only torch ships the c10/ATen CUDA headers but not the
  generated cuda_cmake_macros.h, which C10_CUDA_NO_CMAKE_CONFIGURE_FILE skips).

Skipped, with the reason, when nvcc (or the CUDA headers) are not found. The compilations run
concurrently to keep the test short.
"""
import glob
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
NVCC = shutil.which("nvcc")
CU_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
BIND_FILES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cpp")))
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
# the kernels are built with torch's C++ standard (C++20, see setup.py)
# torch.utils.cpp_extension passes these to nvcc by default: the kernels must not rely on implicit
# half/bfloat16 conversions or operators.
TORCH_NVCC_DEFINES = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                      "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]


def _cuda_include():
    """The include folder of the toolkit nvcc belongs to, asked from nvcc (``#$ TOP=``), as setup.py
    finds it: /usr/local/bin/nvcc may be a wrapper script, not a link into the toolkit."""
    if NVCC is None:
        return None
    tops = [os.path.dirname(os.path.dirname(os.path.realpath(NVCC)))]
    r = subprocess.run([NVCC, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                       capture_output=True, text=True, timeout=120)
    tops = [ln.split("=", 1)[1].strip() for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("#$ TOP=")] + tops
    for top in tops:
        inc = os.path.join(os.path.realpath(top), "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            return inc
    return None


def _run_all(cmds):
    procs = [(c, subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)) for c in cmds]
    return [(c, p.communicate()[0], p.returncode) for c, p in procs]


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA kernels cannot be compile-checked here")
def test_cuda_sources_compile(tmp_path):
    assert CU_FILES, "no .cu files under csrc/cuda"
    cmds = []
    for src in CU_FILES:
        obj = tmp_path / (os.path.basename(src) + ".o")
        cmds.append([NVCC, "-std=c++20", "-O3", "-c", *ARCHS, "-Xptxas", "-v", "-DRESNET_BK_WITH_CUDA",
                     *TORCH_NVCC_DEFINES,
                     src, "-o", str(obj)])
    bind = []
    inc = _cuda_include()
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if inc and cxx and BIND_FILES:
        from torch.utils.cpp_extension import include_paths

        incs = [f"-I{p}" for p in include_paths()] + [f"-I{inc}", f"-I{sysconfig.get_paths()['include']}"]
        for src in BIND_FILES:
            bind.append([cxx, "-std=c++20", "-fsyntax-only", "-DRESNET_BK_WITH_CUDA",
                         "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE", *incs, src])
    results = _run_all(cmds + bind)
    failed = [(c, out) for c, out, rc in results if rc != 0]
    for c, out, rc in results:
        sys.stdout.write(f"$ {' '.join(c[:1] + c[-3:])}\n{out[-2000:]}\n")
    assert not failed, "\n\n".join(f"{' '.join(c)}\n{out[-6000:]}" for c, out in failed)
    for src in CU_FILES:
        assert (tmp_path / (os.path.basename(src) + ".o")).stat().st_size > 0
