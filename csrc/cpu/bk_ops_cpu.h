// The two settings ops of the CPU kernels (no tensors), defined in bk_ops_cpu.cpp and registered
// with the schemas in csrc/schemas.cpp.
#pragma once
#include <cstdint>

namespace resnet_bk {

// The instruction set the CPU kernels run with in this process, chosen once: 0 base, 1 AVX2 + FMA,
// 2 AVX-512 (RESNET_BK_CPU_ISA=base|avx2|avx512 lowers it).
int64_t cpu_isa();

// Huge-page advice on large fresh outputs (huge_pages.h). mode -1: query; 0: off; 1: on. Returns
// the setting before the call.
bool cpu_huge_pages(int64_t mode);

}  // namespace resnet_bk
