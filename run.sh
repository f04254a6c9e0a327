#!/usr/bin/env bash
# The two set-up commands of resnet_bk (see README):
#   bash run.sh bench [args]   set up, build, run the benchmark suite on the best backends here
#   bash run.sh test  [args]   set up, build, run the test suite (what .ci/run calls)
#   bash run.sh gpu-check [OUT_DIR]   on a machine with a CUDA GPU and a CUDA torch already
#                              installed (nothing downloaded): build against that torch, run the
#                              CUDA and Triton tests on the GPU and the GPU benchmark grid, write
#                              the results files to OUT_DIR (default benchmarks/results)
# Set-up installs torch==2.13.0 (a CPU machine never pulls the CUDA build) unless
# RESNET_BK_KEEP_TORCH=1, which keeps the torch you have (e.g. your CUDA build); the package is
# built against that torch with --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
job=${1:-}
shift || true

setup() {
  if [ "${RESNET_BK_KEEP_TORCH:-0}" = "1" ]; then
    "$PY" -c "import torch; print('resnet_bk: keeping torch', torch.__version__)"
  elif ! "$PY" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '2.13.0' else 1)" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
  fi
  "$PY" -m pip install -q ninja numpy pytest hypothesis tqdm matplotlib pytest-benchmark
  if [ "${RESNET_BK_NO_TRITON:-0}" != "1" ]; then
    # triton from the registry installs beside the CPU torch; the tests run it with TRITON_INTERPRET=1
    "$PY" -m pip install -q triton || echo "resnet_bk: triton did not install; its tests will be skipped"
  fi
  MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
}

case "$job" in
  test)
    setup
    exec "$PY" -m pytest -q tests "$@"
    ;;
  bench)
    setup
    exec "$PY" -m benchmarks.run "$@"
    ;;
  setup)
    setup
    ;;
  gpu-check)
    # no downloads: the torch, triton, pytest and ninja the machine has; a failed build is an error
    "$PY" -c "import torch, sys; print('resnet_bk gpu-check: torch', torch.__version__, 'CUDA', torch.version.cuda, \
'GPU', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); sys.exit(0 if torch.cuda.is_available() else 1)" \
      || { echo "resnet_bk gpu-check: needs a CUDA GPU and a CUDA build of torch" >&2; exit 1; }
    RESNET_BK_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-16} "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . \
      || { echo "resnet_bk gpu-check: the build failed" >&2; exit 1; }
    exec "$PY" -m benchmarks.gpu_check "$@"
    ;;
  *)
    echo "usage: bash run.sh {bench|test|setup|gpu-check} [args...]" >&2
    exit 2
    ;;
esac
