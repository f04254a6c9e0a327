"""Build of resnet_bk.

* The C++ CPU extension ``resnet_bk._C`` is always built (if a compiler works; otherwise the
  package installs without it and runs on the reference backend, with one clear warning).
* The CUDA kernels are added when torch was built with CUDA *and* nvcc is found, or when
  ``RESNET_BK_FORCE_CUDA=1``; never decided by ``torch.cuda.is_available()`` on the build host.
  ``RESNET_BK_SKIP_CUDA=1`` turns them off. Arch list: ``RESNET_BK_CUDA_ARCHS`` (e.g. "8.0;9.0"),
  else ``TORCH_CUDA_ARCH_LIST``, else 8.0 and 9.0 with PTX for the newest.
* ``MAX_JOBS`` is respected (ninja); no ``-march=native`` unless ``RESNET_BK_NATIVE=1``: the wide
  vector paths are chosen at run time from what the CPU has.
* ``triton_kernels/`` installs as ``resnet_bk.triton_kernels`` (never as a top-level
  ``triton_kernels``, which Triton and vLLM own). ``tests/`` and ``benchmarks/`` stay out.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"resnet_bk setup: {msg}", file=sys.stderr)


def _packages():
    pkgs = ["resnet_bk", "resnet_bk.ops", "resnet_bk.triton_kernels"]
    for sub in ("models", "training", "utils"):
        if os.path.isdir(os.path.join(ROOT, "resnet_bk", sub)):
            pkgs.append(f"resnet_bk.{sub}")
    return pkgs


def _ext_modules():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001
        _log(f"torch is not importable ({exc}); building without the compiled extension "
             f"(install torch first and use --no-build-isolation)")
        return [], {}
    cxx = ["-O3", "-std=c++17", "-fno-math-errno"]
    link = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is a header template whose OpenMP pragma is compiled in *this* extension:
        # without -fopenmp it silently runs on one thread. At run time the extension's libgomp.so.1
        # resolves to the copy torch already loaded, so torch.set_num_threads governs it.
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if _env_flag("RESNET_BK_NATIVE"):
        cxx.append("-march=native")
    sources = [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))]
    sources += ["csrc/schemas.cpp", "csrc/autograd.cpp", "csrc/module.cpp"]
    want_cuda = False
    if not _env_flag("RESNET_BK_SKIP_CUDA"):
        nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
        if _env_flag("RESNET_BK_FORCE_CUDA"):
            want_cuda = True
        elif torch.version.cuda is not None and nvcc:
            want_cuda = True
        elif torch.version.cuda is None:
            _log("torch has no CUDA: building the CPU extension only")
        else:
            _log("nvcc not found: building the CPU extension only (set CUDA_HOME or RESNET_BK_FORCE_CUDA=1)")
    cu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cu_bind = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if want_cuda and cu_sources:
        archs = os.environ.get("RESNET_BK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not archs:
            archs = "8.0;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
        sources += [os.path.relpath(p, ROOT) for p in cu_sources + cu_bind]
        ext = CUDAExtension(
            "resnet_bk._C", sources,
            extra_link_args=link,
            extra_compile_args={"cxx": cxx + ["-DRESNET_BK_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++17", "-DRESNET_BK_WITH_CUDA"]},
            py_limited_api=False)
    else:
        ext = CppExtension("resnet_bk._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())}


def _has_ninja_module():
    try:
        import ninja  # noqa: F401
        return True
    except ImportError:
        return False


class _OptionalBuild:
    """Wraps build_ext so that a failing compiler leaves a working pure-Python install."""

    @staticmethod
    def wrap(build_cls):
        class Build(build_cls):
            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001
                    if _env_flag("RESNET_BK_REQUIRE_EXT"):
                        raise
                    _log(f"WARNING: the compiled extension failed to build ({exc}); resnet_bk will run "
                         f"on the reference backend. Set RESNET_BK_REQUIRE_EXT=1 to make this an error.")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001
                    if _env_flag("RESNET_BK_REQUIRE_EXT"):
                        raise
                    _log(f"WARNING: building {ext.name} failed ({exc}); resnet_bk will run on the reference "
                         f"backend. Set RESNET_BK_REQUIRE_EXT=1 to make this an error.")

        return Build


ext_modules, cmdclass = _ext_modules()
if "build_ext" in cmdclass:
    cmdclass["build_ext"] = _OptionalBuild.wrap(cmdclass["build_ext"])

setup(
    name="resnet_bk",
    version=VERSION,
    description="ResNet-BK: exact O(N) BK-Core resolvent kernels (C++, CUDA, Triton) and adaptive modules",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=_packages(),
    package_dir={"resnet_bk.triton_kernels": "triton_kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"], "bench": ["tqdm", "matplotlib"]},
    zip_safe=False,
)
