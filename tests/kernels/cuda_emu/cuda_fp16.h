// Test-only stand-in for CUDA's float16 header (CPU emulation build, see emu.h), using the
// compiler's IEEE binary16 type: bit-compatible with torch.float16, round to nearest even.
#pragma once

struct __half {
  _Float16 h;
};

inline float __half2float(__half h) { return float(h.h); }
inline __half __float2half(float f) { return __half{static_cast<_Float16>(f)}; }
