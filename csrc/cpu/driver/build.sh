#!/usr/bin/env bash
# Builds build/bk_driver (the repository's build/, git-ignored): the three instruction-set objects
# of the BK-Core CPU kernels with the flags setup.py compiles them with (Python's extension
# defaults -DNDEBUG -g -fwrapv -O3 -Wall -fPIC, then setup.py's -O3 -std=c++17 -fno-math-errno
# -fopenmp, and -march=native when RESNET_BK_NATIVE=1), plus the driver. No torch.
# CXX picks the compiler (default g++).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
CXX="${CXX:-g++}"
OUT="$ROOT/build"
OBJ="$OUT/bk_driver_obj"
mkdir -p "$OBJ"
FLAGS=(-DNDEBUG -g -fwrapv -O3 -Wall -fPIC -O3 -std=c++17 -fno-math-errno -fopenmp)
case "${RESNET_BK_NATIVE:-0}" in 1|true|yes|on) FLAGS+=(-march=native) ;; esac
# compiler messages go to $OBJ/<name>.log (GCC's own AVX-512 headers warn, as in the torch build)
compile() {  # compile <source> <name>
  if ! "$CXX" "${FLAGS[@]}" -c "$1" -o "$OBJ/$2.o" 2> "$OBJ/$2.log"; then
    cat "$OBJ/$2.log" >&2
    echo "build.sh: compiling $1 failed" >&2
    return 1
  fi
}
pids=()
for isa in base avx2 avx512; do
  compile "$ROOT/csrc/cpu/bk_core_cpu_$isa.cpp" "bk_core_cpu_$isa" &
  pids+=($!)
done
compile "$ROOT/csrc/cpu/driver/bk_driver.cpp" bk_driver &
pids+=($!)
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" -eq 0 ] || exit 1
"$CXX" -fopenmp -pthread "$OBJ"/bk_core_cpu_{base,avx2,avx512}.o "$OBJ/bk_driver.o" -o "$OUT/bk_driver"
echo "built $OUT/bk_driver"
