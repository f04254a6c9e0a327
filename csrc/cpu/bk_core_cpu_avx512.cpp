// AVX-512 build of the CPU kernels, chosen at run time when the CPU has AVX-512 F/DQ/BW/VL.
#include "bk_core_cpu.h"
#if defined(__x86_64__) && defined(__GNUC__)
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>
#include <immintrin.h>
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define BK_ISA_NS isa_avx512
#define BK_VEC_BYTES 64
#define BK_ISA_AVX512 1
#include "bk_core_cpu_impl.h"
#endif
