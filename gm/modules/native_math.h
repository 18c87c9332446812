// What our CPU kernels share (included by each native_*.cc; native_build.py hashes this header
// with each source): the usable core count and vectorisable float32 math.
#pragma once

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>

// The cores this process may run on (a data-parallel rank pinned to some, a container's cpuset),
// not the machine's; read once.
inline int64_t UsableCores() {
  static const int64_t cores = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof(set), &set) == 0) return static_cast<int64_t>(std::max(1, CPU_COUNT(&set)));
    return static_cast<int64_t>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return cores;
}

// The row loops are compiled for AVX-512, AVX2 and the baseline, picked by the CPU at load time
// (the library is built without -march: the cache folder may be shared by several machines).
#define VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))

// exp(x) for x <= 0 (softmax arguments after subtracting the row maximum, -|a| for a sigmoid),
// written so the compiler vectorises the loops that call it (std::exp is a scalar library call):
// x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7
// before rounding, about one float ulp), 2^n by the exponent bits. Below -87 the result is ~0.
inline float ExpNonPositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  // round to nearest by adding and subtracting 1.5 * 2^23 (std::nearbyint does not vectorise)
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, exactly subtractable
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / (1 + exp(-a)) without overflow for any a (exp of -|a| only)
inline float Sigmoid(float a) {
  const float e = ExpNonPositive(-std::fabs(a));
  const float r = 1.0f / (1.0f + e);
  return a >= 0.0f ? r : e * r;
}
