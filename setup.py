"""Build of resnet_bk.

* The C++ CPU extension ``resnet_bk._C`` is always built. If a CPU-only build fails, the package
  installs without it and runs on the reference backend: one loud warning here, and the cause is
  written to resnet_bk/_build_error.txt, which ``import resnet_bk`` reports. When the CUDA kernels
  are part of the build, or with ``RESNET_BK_REQUIRE_EXT=1``, a failed build is an error.
* No ``-std`` flag: torch's BuildExtension chooses the C++ standard its headers need. CUDA is found
  from ``CUDA_HOME`` / ``CUDA_PATH``, else from the toolkit the ``nvcc`` on PATH belongs to (asked
  from nvcc, so a wrapper script leads to the real toolkit), else /usr/local/cuda.
* The CUDA kernels are added when torch was built with CUDA *and* a CUDA toolkit is found, or when
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
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
VERSION = "0.1.0"


def _env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _log(msg):
    print(f"resnet_bk setup: {msg}", file=sys.stderr)


def _packages():
    return ["resnet_bk", "resnet_bk.ops", "resnet_bk.ops.bk_core", "resnet_bk.ops.pooling", "resnet_bk.ops.moe",
            "resnet_bk.models", "resnet_bk.training", "resnet_bk.triton_kernels"]


def _find_cuda_home():
    """(CUDA toolkit root, how it was found) or (None, why not): ``CUDA_HOME`` / ``CUDA_PATH`` as
    given, else the toolkit the ``nvcc`` on PATH really belongs to (asked from nvcc itself, so a
    wrapper script such as /usr/local/bin/nvcc leads to its real toolkit), else /usr/local/cuda."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:
            r = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True, timeout=120)
            for line in (r.stdout + r.stderr).splitlines():
                if line.startswith("#$ TOP="):
                    top = os.path.realpath(line.split("=", 1)[1].strip())
                    if os.path.exists(os.path.join(top, "bin", "nvcc")):
                        return top, f"nvcc on PATH ({nvcc})"
        except (OSError, subprocess.SubprocessError):
            pass
        top = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        if os.path.exists(os.path.join(top, "bin", "nvcc")):
            return top, f"nvcc on PATH ({nvcc})"
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda", "/usr/local/cuda"
    return None, "no CUDA_HOME, no nvcc on PATH, no /usr/local/cuda"


def _ext_modules():
    want_cuda_env = not _env_flag("RESNET_BK_SKIP_CUDA")
    cuda_home, cuda_how = _find_cuda_home() if want_cuda_env else (None, "RESNET_BK_SKIP_CUDA=1")
    if cuda_home:
        # torch.utils.cpp_extension reads CUDA_HOME once, when imported: set it first
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001
        _log(f"torch is not importable ({exc}); building without the compiled extension "
             f"(install torch first and use --no-build-isolation)")
        _BuildState.reason = f"torch was not importable at build time ({exc})"
        return [], {}
    # No -std flag: torch's BuildExtension gives the standard its headers need (C++20 since
    # torch 2.13; torch 2.14's headers do not compile as C++17).
    _log(f"C++ standard: torch {torch.__version__}'s default (no -std given)")
    cxx = ["-O3", "-fno-math-errno"]
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
    if want_cuda_env:
        if _env_flag("RESNET_BK_FORCE_CUDA"):
            want_cuda = True
        elif torch.version.cuda is not None and cuda_home:
            want_cuda = True
        elif torch.version.cuda is None:
            _log("torch has no CUDA: building the CPU extension only")
        else:
            _log(f"torch has CUDA {torch.version.cuda} but no CUDA toolkit was found ({cuda_how}): building the "
                 f"CPU extension only (set CUDA_HOME, or RESNET_BK_FORCE_CUDA=1 to make this an error)")
    cu_sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    cu_bind = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    if want_cuda and cu_sources:
        if not cuda_home:
            raise RuntimeError(f"RESNET_BK_FORCE_CUDA=1 but no CUDA toolkit was found ({cuda_how}); set CUDA_HOME")
        archs = os.environ.get("RESNET_BK_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST")
        if not archs:
            archs = "8.0;9.0+PTX"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        _log(f"CUDA found: {cuda_home} (from {cuda_how}); torch CUDA {torch.version.cuda}; "
             f"building CUDA kernels for TORCH_CUDA_ARCH_LIST={archs}")
        _BuildState.cuda = True
        sources += [os.path.relpath(p, ROOT) for p in cu_sources + cu_bind]
        ext = CUDAExtension(
            "resnet_bk._C", sources,
            extra_link_args=link,
            extra_compile_args={"cxx": cxx + ["-DRESNET_BK_WITH_CUDA"],
                                "nvcc": ["-O3", "-DRESNET_BK_WITH_CUDA"]},
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


BUILD_ERROR_FILE = "_build_error.txt"  # read by resnet_bk/ops/_extension.py when _C is missing


class _BuildState:
    cuda = False          # the CUDA kernels are part of this build
    reason = None         # why the extension was not built, when it was not


def _record_build_error(build_lib, reason):
    """Leave the reason next to the package (installed and in-place), so that resnet_bk can say
    at import why it runs without its compiled extension (pip hides this log without -v); a
    successful build removes a stale one."""
    for d in {os.path.join(ROOT, "resnet_bk"), os.path.join(build_lib, "resnet_bk")}:
        path = os.path.join(d, BUILD_ERROR_FILE)
        if reason is None:
            if os.path.exists(path):
                os.remove(path)
        elif os.path.isdir(d):
            with open(path, "w") as f:
                f.write(reason.strip() + "\n")


class _OptionalBuild:
    """Wraps build_ext. With the CUDA kernels in the build (torch has CUDA and a toolkit was found,
    or RESNET_BK_FORCE_CUDA=1), or with RESNET_BK_REQUIRE_EXT=1, a failed build is an error. A
    CPU-only build that fails leaves a working pure-Python install, with one loud warning here and
    the cause recorded for resnet_bk to report at import."""

    @staticmethod
    def wrap(build_cls):
        class Build(build_cls):
            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001
                    if _BuildState.cuda or _env_flag("RESNET_BK_REQUIRE_EXT"):
                        why = "the CUDA kernels are part of this build" if _BuildState.cuda else "RESNET_BK_REQUIRE_EXT=1"
                        raise RuntimeError(f"resnet_bk: building {ext.name} failed ({why}): {exc} "
                                           f"(the compiler's messages are above)") from exc
                    reason = f"building {ext.name} failed: {type(exc).__name__}: {exc}"
                    _record_build_error(self.build_lib, reason)
                    _log(f"WARNING: {reason}; resnet_bk will run on the reference backend only. "
                         f"Set RESNET_BK_REQUIRE_EXT=1 to make this an error.")
                    return
                _record_build_error(self.build_lib, None)

        return Build


ext_modules, cmdclass = _ext_modules()
if _BuildState.reason is not None:
    _record_build_error(ROOT, _BuildState.reason)
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
    package_data={"resnet_bk": [BUILD_ERROR_FILE]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["numpy"],
    extras_require={"triton": ["triton"], "test": ["pytest", "hypothesis"], "bench": ["tqdm", "matplotlib"]},
    zip_safe=False,
)
