#!/usr/bin/env bash
# Builds resnet_bk against the newest torch this machine's pip has (a CUDA build: today 2.14.1),
# in a venv inside the clone (nothing cached outside it), and checks what a user of that torch gets:
#   - the build log says which C++ standard and which CUDA toolkit it used;
#   - the CUDA kernels compile (nvcc), resnet_bk._C imports without a GPU, and every op has its
#     CPU and CUDA kernels registered (.ci/check_build.py);
#   - the CPU op tests (tests/ops, fast lane) pass against that build.
# The main test run (bash run.sh test) stays on the pinned CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
TORCH_NEWEST=${RESNET_BK_NEWEST_TORCH:-2.14.1}
WORK=$ROOT/.ci-work
V=$WORK/venv-torch-$TORCH_NEWEST
SRC=$WORK/src
mkdir -p "$WORK"
t0=$(date +%s)
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/python" -m pip install -q "torch==$TORCH_NEWEST" numpy ninja pytest hypothesis "setuptools>=64" wheel 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "newest-torch: $("$V/bin/python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)') ($(( $(date +%s) - t0 )) s)"
# a copy of the working tree's tracked files: the in-place build of the main run is left alone
rm -rf "$SRC" && mkdir -p "$SRC"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$SRC"
t1=$(date +%s)
(cd "$SRC" && RESNET_BK_REQUIRE_EXT=1 MAX_JOBS=${MAX_JOBS:-2} "$V/bin/python" -m pip install -v --no-build-isolation --no-deps . \
    > "$WORK/build.log" 2>&1) || { tail -60 "$WORK/build.log"; echo "newest-torch: the build failed (log above)"; exit 1; }
grep -E "resnet_bk setup: (C\+\+ standard|CUDA found|torch has)" "$WORK/build.log" | sort -u | sed 's/^ */newest-torch build: /'
echo "newest-torch: build took $(( $(date +%s) - t1 )) s"
cd "$WORK"   # not the repository root: import the installed package, not the source tree
"$V/bin/python" "$ROOT/.ci/check_build.py"
"$V/bin/python" -m pytest -q -p no:cacheprovider -m "not slow" "$ROOT/tests/ops"
echo "newest-torch: done in $(( $(date +%s) - t0 )) s"
