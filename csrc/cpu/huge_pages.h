// Transparent huge pages for large fresh outputs of the CPU ops (see advise_huge_pages).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace resnet_bk {

// A large output is usually fresh memory from mmap (glibc maps every block above its mmap
// threshold, at most 32 MiB, anew and unmaps it on free; PyTorch's CPU allocator does not cache),
// so writing it costs one page fault per 4 KiB page: at B = 64, N = 65536 float32 (a 32 MiB
// output) about 8 ms, twice the kernel itself. When enabled, ask for transparent huge pages on the
// 2 MiB-aligned interior of such a tensor before the kernel first writes it (MADV_HUGEPAGE; 512x
// fewer faults where THP is in "madvise" or "always" mode, a no-op under "never"). Memory already
// backed (a block reused from malloc's heap) is left alone. Advice only: the contents and the
// allocation are PyTorch's; errors are ignored.
// Off by default (on a VM whose host takes back freed guest memory, a fresh huge page can cost
// more than the small-page faults it saves, see README): RESNET_BK_HUGEPAGE=1 turns it on at
// start-up; torch.ops.resnet_bk.cpu_huge_pages (Python: resnet_bk.ops.cpu_huge_pages) switches it
// at run time.
inline std::atomic<bool>& huge_pages_enabled() {
  static std::atomic<bool> on{[] {
    const char* e = std::getenv("RESNET_BK_HUGEPAGE");
    return e != nullptr && e[0] != '\0' && e[0] != '0';
  }()};
  return on;
}

inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t nbytes = static_cast<uintptr_t>(t.numel()) * t.element_size();
  if (nbytes < 4 * kHuge || !huge_pages_enabled().load(std::memory_order_relaxed)) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (b + kHuge - 1) & ~(kHuge - 1), hi = (b + nbytes) & ~(kHuge - 1);
  if (hi <= lo) return;
  // Only fresh memory: a block reused from malloc's heap is already backed by pages (its first
  // page is resident), and advising it would only split the heap's memory area for nothing.
  unsigned char resident = 0;
  if (mincore(reinterpret_cast<void*>(lo), 4096, &resident) == 0 && (resident & 1)) return;
  (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace resnet_bk
