// AVX2 + FMA build of the CPU kernels, chosen at run time when the CPU has them.
#include "bk_core_cpu.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#pragma GCC target("avx2,fma")
#define BK_ISA_NS isa_avx2
#define BK_VEC_BYTES 32
#include "bk_core_cpu_impl.h"
#endif
