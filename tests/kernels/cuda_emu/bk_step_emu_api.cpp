// Test-only C entry points over the BK-Core decode-step CUDA launcher, compiled after the
// (rewritten) bk_step_cuda.cu in the emulation build of tests/kernels/test_cuda_emulated.py and
// called through ctypes.

#define BK_STEP_EMU_API(T, SUF)                                                                          \
  extern "C" int bk_emu_step_##SUF(const T* a, const T* b, int64_t bs, const T* c, int64_t cs,          \
                                   const T* zri, const T* state, T* y, T* d, int64_t n) {               \
    const bk_cuda::StepProblem<T> p{a, b, bs, c, cs, zri, state, n};                                     \
    return bk_cuda::step(p, y, d, nullptr).ok() ? 0 : 1;                                                 \
  }

BK_STEP_EMU_API(float, f32)
BK_STEP_EMU_API(double, f64)
