// Multi-head scaled-dot-product attention, forward and backward, as MindSpore "aot" custom-op
// kernels for the CPU target (built by native_attention.py). The products run on oneDNN's
// dnnl_sgemm (libdnnl.so.3, shipped inside MindSpore's wheel), which reads each head straight out
// of the (tokens, heads * d) projections through its leading dimension: no head transposes, no
// separate scale, softmax and gradient ops. In a LoRA train step those were ~18 launched kernels
// per attention layer on the CPU target (split/merge-head transposes, BatchMatMuls, the softmax
// and their gradients), each ~10 us of launch time whatever its size.
//
// Work is split by (sample, head): each pair is computed whole by one thread in a fixed order, so
// results do not depend on the core count. Small calls run on the calling thread (starting a
// thread costs ~30 us here).
//
// Kernel signature (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
// const char **dtypes, void *stream, void *extra); params are the inputs, then the outputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "native_math.h"

extern "C" {
// oneDNN 3.x C API (oneapi/dnnl/dnnl.h): row-major C = alpha * op(A) op(B) + beta * C
int dnnl_sgemm(char transa, char transb, int64_t M, int64_t N, int64_t K, float alpha, const float *A, int64_t lda,
               const float *B, int64_t ldb, float beta, float *C, int64_t ldc);
}

namespace {

// Below this many floating-point operations a call runs on the calling thread alone (see the top).
constexpr double kSerialFlops = 32e6;

// Runs fn(unit, scratch) for unit in [0, units): each thread owns a scratch buffer of `scratch`
// floats and takes the units p, p + parts, ... in order.
template <typename Fn>
void ForUnits(int64_t units, double flops, size_t scratch, const Fn &fn) {
  const int64_t parts = flops < kSerialFlops ? 1 : std::min(units, UsableCores());
  auto body = [&](int64_t p) {
    // not zero-filled: every unit writes its scratch before reading it (the probabilities of a
    // 4096-token attention are 64 MB a thread)
    std::unique_ptr<float[]> buffer(scratch > 0 ? new float[scratch] : nullptr);
    for (int64_t u = p; u < units; u += parts) fn(u, buffer.get());
  };
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; p++) workers.emplace_back(body, p);
  body(0);
  for (auto &w : workers) w.join();
}

// Sum of x[0..n) in double, as 8 interleaved partial sums added in a fixed order (vectorisable,
// and the same bits on every machine and thread count).
inline double Sum(const float *x, int64_t n) {
  double part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; l++) part[l] += x[j + l];
  for (int l = 0; j < n; j++, l++) part[l] += x[j];
  return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

// softmax of each of `rows` rows of `cols` values, in place
VECTOR_CLONES void SoftmaxRows(float *p, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; i++) {
    float *row = p + i * cols;
    const float top = *std::max_element(row, row + cols);
    for (int64_t j = 0; j < cols; j++) row[j] = ExpNonPositive(row[j] - top);
    const float inverse = static_cast<float>(1.0 / Sum(row, cols));
    for (int64_t j = 0; j < cols; j++) row[j] *= inverse;
  }
}

// the softmax gradient in place: ds = p * (dp - sum_j p dp), row by row; `work` holds cols floats
VECTOR_CLONES void SoftmaxGradRows(const float *p, float *ds, int64_t rows, int64_t cols, float *work) {
  for (int64_t i = 0; i < rows; i++) {
    const float *prow = p + i * cols;
    float *row = ds + i * cols;
    for (int64_t j = 0; j < cols; j++) work[j] = prow[j] * row[j];
    const float centre = static_cast<float>(Sum(work, cols));
    for (int64_t j = 0; j < cols; j++) row[j] = prow[j] * (row[j] - centre);
  }
}

// GELU (erf form, torch's default) pieces for the GEGLU kernels. Phi(x) = 0.5 erfc(-x / sqrt2); erfc
// of z = |u| >= 0 is t exp(-z^2 + P(t)), t = 1 / (1 + z / 2), with the Chebyshev-fitted degree-9 P of
// Press et al., Numerical Recipes (erfcc: relative error < 1.2e-7 for every z); z^2 is split into
// its rounded value and the rounding error (fma), so large |x| keeps its relative accuracy.
struct GeluTerms {
  float cdf;  // Phi(x)
  float pdf;  // phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
};

inline GeluTerms Gelu(float x) {
  const float u = -x * 0.70710678118654752f;
  const float z = std::fabs(u);
  const float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  const float square = z * z;
  const float square_error = std::fma(z, z, -square);
  const float gauss = ExpNonPositive(-square) * (1.0f - square_error);  // exp(-z^2) = exp(-x^2 / 2)
  const float erfc_z = t * gauss * ExpNonPositive(p);
  const float erfc_u = u >= 0.0f ? erfc_z : 2.0f - erfc_z;
  return GeluTerms{0.5f * erfc_u, gauss * 0.39894228040143268f};
}

// h (rows, 2 n) = [a | b] -> out (rows, n) = a * gelu(b)
VECTOR_CLONES void GegluRows(const float *h, float *out, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; i++) {
    const float *a = h + i * 2 * n, *b = a + n;
    float *o = out + i * n;
    for (int64_t j = 0; j < n; j++) o[j] = a[j] * (b[j] * Gelu(b[j]).cdf);
  }
}

// dout (rows, n), h (rows, 2 n) -> dh (rows, 2 n): da = dout gelu(b), db = dout a gelu'(b),
// gelu'(x) = Phi(x) + x phi(x)
VECTOR_CLONES void GegluGradRows(const float *dout, const float *h, float *dh, int64_t rows, int64_t n) {
  for (int64_t i = 0; i < rows; i++) {
    const float *a = h + i * 2 * n, *b = a + n, *d = dout + i * n;
    float *da = dh + i * 2 * n, *db = da + n;
    for (int64_t j = 0; j < n; j++) {
      const GeluTerms g = Gelu(b[j]);
      da[j] = d[j] * (b[j] * g.cdf);
      db[j] = d[j] * a[j] * (g.cdf + b[j] * g.pdf);
    }
  }
}

// Rows of `width` values of a tensor: all its dimensions but the last, and the last.
int64_t Rows(int ndim, const int64_t *shape) {
  int64_t rows = 1;
  for (int i = 0; i + 1 < ndim; i++) rows *= shape[i];
  return rows;
}

// Elementwise row work split into blocks of rows, each block computed by one thread.
template <typename Fn>
void ForRowBlocks(int64_t rows, double flops, const Fn &fn) {
  constexpr int64_t kBlocks = 16;
  const int64_t block = (rows + kBlocks - 1) / kBlocks;
  ForUnits((rows + block - 1) / block, flops, 0, [&](int64_t u, float *) {
    fn(u * block, std::min(rows, (u + 1) * block) - u * block);
  });
}

// The geometry of one call: q (batch, lq, heads * d); k, v (batch, lk, heads * d); the head count
// comes in as a one-value float tensor.
struct Geometry {
  int64_t batch, heads, d, lq, lk, width;
  float scale;
  Geometry(const int64_t *q, const int64_t *k, const void *head_count)
      : batch(q[0]), heads(static_cast<int64_t>(static_cast<const float *>(head_count)[0])), d(q[2] / heads),
        lq(q[1]), lk(k[1]), width(q[2]), scale(1.0f / std::sqrt(static_cast<float>(d))) {}
  int64_t Units() const { return batch * heads; }
  // offsets of unit u's first element in the token tensors
  int64_t QOffset(int64_t u) const { return (u / heads) * lq * width + (u % heads) * d; }
  int64_t KOffset(int64_t u) const { return (u / heads) * lk * width + (u % heads) * d; }
  double Flops() const { return 4.0 * batch * heads * lq * lk * d; }
  // p (lq, lk) = softmax(scale q k^T) of unit u
  void Probabilities(int64_t u, const float *q, const float *k, float *p) const {
    dnnl_sgemm('N', 'T', lq, lk, d, scale, q + QOffset(u), width, k + KOffset(u), width, 0.0f, p, lk);
    SoftmaxRows(p, lq, lk);
  }
};

}  // namespace

// q (B, Lq, H*d), k (B, Lk, H*d), v (B, Lk, H*d), (H) -> out (B, Lq, H*d): softmax(q k^T / sqrt(d)) v
// per sample and head. One output: MindSpore's front end spends more compile memory on each call
// site of a several-output custom op (measured: -12 MB for the 34 attention layers of the tiny
// SDXL train step), so the backward recomputes the probabilities (one more q k^T product) instead
// of reading them back; nothing of size Lq * Lk is held between the passes either.
extern "C" int AttentionForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const Geometry g(shapes[0], shapes[1], params[3]);
  const float *q = static_cast<const float *>(params[0]);
  const float *k = static_cast<const float *>(params[1]);
  const float *v = static_cast<const float *>(params[2]);
  float *out = static_cast<float *>(params[4]);
  ForUnits(g.Units(), g.Flops(), static_cast<size_t>(g.lq * g.lk), [&](int64_t u, float *p) {
    g.Probabilities(u, q, k, p);
    dnnl_sgemm('N', 'N', g.lq, g.d, g.lk, 1.0f, p, g.lk, v + g.KOffset(u), g.width, 0.0f, out + g.QOffset(u), g.width);
  });
  return 0;
}

// dout (B, Lq, H*d), q, k, v, (H) -> dq, dk, dv
extern "C" int AttentionBackward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const Geometry g(shapes[1], shapes[2], params[4]);
  const float *dout = static_cast<const float *>(params[0]);
  const float *q = static_cast<const float *>(params[1]);
  const float *k = static_cast<const float *>(params[2]);
  const float *v = static_cast<const float *>(params[3]);
  float *dq = static_cast<float *>(params[5]);
  float *dk = static_cast<float *>(params[6]);
  float *dv = static_cast<float *>(params[7]);
  const int64_t area = g.lq * g.lk;
  ForUnits(g.Units(), 2.5 * g.Flops(), static_cast<size_t>(2 * area + g.lk), [&](int64_t u, float *p) {
    float *ds = p + area;
    g.Probabilities(u, q, k, p);  // as the forward computed them
    const float *dout_u = dout + g.QOffset(u);
    // dv = p^T dout; dp = dout v^T (into ds)
    dnnl_sgemm('T', 'N', g.lk, g.d, g.lq, 1.0f, p, g.lk, dout_u, g.width, 0.0f, dv + g.KOffset(u), g.width);
    dnnl_sgemm('N', 'T', g.lq, g.lk, g.d, 1.0f, dout_u, g.width, v + g.KOffset(u), g.width, 0.0f, ds, g.lk);
    SoftmaxGradRows(p, ds, g.lq, g.lk, ds + area);
    // scores = scale q k^T: dq = scale ds k, dk = scale ds^T q
    dnnl_sgemm('N', 'N', g.lq, g.d, g.lk, g.scale, ds, g.lk, k + g.KOffset(u), g.width, 0.0f, dq + g.QOffset(u), g.width);
    dnnl_sgemm('T', 'N', g.lk, g.d, g.lq, g.scale, ds, g.lk, q + g.QOffset(u), g.width, 0.0f, dk + g.KOffset(u), g.width);
  });
  return 0;
}

// h (..., 2n) -> a * gelu(b) (..., n), [a | b] = h (GEGLU, Shazeer 2020: value and gate halves)
extern "C" int GegluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t rows = Rows(ndims[0], shapes[0]), n = shapes[0][ndims[0] - 1] / 2;
  const float *h = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  ForRowBlocks(rows, 40.0 * rows * n, [&](int64_t first, int64_t count) {
    GegluRows(h + first * 2 * n, out + first * n, count, n);
  });
  return 0;
}

// dout (..., n), h (..., 2n) -> dh (..., 2n)
extern "C" int GegluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t rows = Rows(ndims[1], shapes[1]), n = shapes[1][ndims[1] - 1] / 2;
  const float *dout = static_cast<const float *>(params[0]);
  const float *h = static_cast<const float *>(params[1]);
  float *dh = static_cast<float *>(params[2]);
  ForRowBlocks(rows, 60.0 * rows * n, [&](int64_t first, int64_t count) {
    GegluGradRows(dout + first * n, h + first * 2 * n, dh + first * 2 * n, count, n);
  });
  return 0;
}
