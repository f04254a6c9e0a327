#!/usr/bin/env bash
# The two set-up commands of resnet_bk (see README):
#   bash run.sh bench [args]   set up, build, run the benchmark suite on the best backends here
#   bash run.sh test  [args]   set up, build, run the test suite (what .ci/run calls)
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
  *)
    echo "usage: bash run.sh {bench|test|setup} [args...]" >&2
    exit 2
    ;;
esac
