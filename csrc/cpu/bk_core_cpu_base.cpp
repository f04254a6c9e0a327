// Portable build of the CPU kernels (any architecture; the compiler's baseline vector ISA).
#define BK_ISA_NS isa_base
#include "bk_core_cpu_impl.h"
