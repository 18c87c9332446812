// Linear layers and convolutions, forward and the gradients, as MindSpore "aot" custom-op kernels for
// the CPU target (built by native_matmul.py). MindSpore 2.10's CPU MatMul reaches ~97 GFLOP/s on a
// convolution's im2col product on 2 cores where torch reaches ~148; oneDNN's sgemm (the library
// MindSpore itself ships, libdnnl.so.3) runs at torch's speed per core. Each product here is one
// single-threaded dnnl_sgemm per thread on a fixed part of the output, so results do not depend on
// timing, and a convolution's im2col and col2im stay inside the kernel (no column tensor in the graph).
//
// Kernel signature (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
// const char **dtypes, void *stream, void *extra); params are the inputs, then the outputs.
#include <sched.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

// oneDNN's C API (row-major sgemm: C = alpha * op(A) op(B) + beta * C); returns 0 on success
extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

int64_t Product(const int64_t *shape, int begin, int end) {
  int64_t p = 1;
  for (int i = begin; i < end; i++) p *= shape[i];
  return p;
}

// The cores this process may run on (a pinned data-parallel rank, a container's cpuset).
int64_t UsableCores() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

int64_t Cores() {
  static const int64_t cores = UsableCores();
  return cores;
}

// Set on threads that already run one of several parallel parts: their products stay single-threaded.
thread_local bool t_in_part = false;

// Runs body(part) for part in [0, parts) on one thread each (the caller's thread takes part 0).
template <typename Body>
void OnThreads(int64_t parts, Body body) {
  std::vector<std::thread> workers;
  for (int64_t p = 1; p < parts; p++) workers.emplace_back(body, p);
  body(0);
  for (auto &w : workers) w.join();
}

// [begin, end) of part `part` of `count` split into `parts` nearly equal pieces, multiples of `align`.
void Slice(int64_t count, int64_t parts, int64_t part, int64_t align, int64_t *begin, int64_t *end) {
  const int64_t units = (count + align - 1) / align;
  *begin = std::min(count, units * part / parts * align);
  *end = std::min(count, units * (part + 1) / parts * align);
}

// A product below this many multiply-adds runs on one thread: starting one costs ~20 us.
constexpr int64_t kParallelMacs = 1 << 20;

// Row-major C (m, n) = alpha op(A) op(B) + beta C on up to all cores, each thread computing a fixed block of
// columns (or of rows, when there are more rows than columns) with a single-threaded sgemm.
void Gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float *a, int64_t lda,
          const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  const int64_t parts = (t_in_part || m * n * k < kParallelMacs) ? 1 : Cores();
  if (parts <= 1 || k == 0) {
    dnnl_sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
  const bool by_rows = m >= n;
  OnThreads(parts, [=](int64_t part) {
    int64_t begin, end;
    Slice(by_rows ? m : n, parts, part, 16, &begin, &end);
    if (end <= begin) return;
    if (by_rows) {  // rows of op(A): row i of A, or column i of a transposed A
      const float *a_part = ta == 'N' ? a + begin * lda : a + begin;
      dnnl_sgemm(ta, tb, end - begin, n, k, alpha, a_part, lda, b, ldb, beta, c + begin * ldc, ldc);
    } else {  // columns of op(B)
      const float *b_part = tb == 'N' ? b + begin : b + begin * ldb;
      dnnl_sgemm(ta, tb, m, end - begin, k, alpha, a, lda, b_part, ldb, beta, c + begin, ldc);
    }
  });
}

// Sum of `rows` rows of `cols` contiguous values into out (cols), in row order, in double.
void ColumnSums(const float *x, int64_t rows, int64_t cols, float *out) {
  std::vector<double> sums(cols, 0.0);
  for (int64_t r = 0; r < rows; r++)
    for (int64_t c = 0; c < cols; c++) sums[c] += x[r * cols + c];
  for (int64_t c = 0; c < cols; c++) out[c] = static_cast<float>(sums[c]);
}

// Sum over the last axis of `rows` rows of `cols` values into out (rows), each in order, in double.
void RowSums(const float *x, int64_t rows, int64_t cols, float *out) {
  for (int64_t r = 0; r < rows; r++) {
    double s = 0;
    for (int64_t c = 0; c < cols; c++) s += x[r * cols + c];
    out[r] = static_cast<float>(s);
  }
}

// A 2-D convolution's geometry: input (C, H, W) per sample, weight (O, C, kh, kw), output (O, Ho, Wo).
struct ConvShape {
  int64_t n, c, h, w, o, kh, kw, ho, wo, stride, pad;
  ConvShape(const int64_t *x, const int64_t *weight, const float *geometry)
      : n(x[0]), c(x[1]), h(x[2]), w(x[3]), o(weight[0]), kh(weight[2]), kw(weight[3]),
        ho(0), wo(0), stride(static_cast<int64_t>(geometry[0])), pad(static_cast<int64_t>(geometry[1])) {
    ho = (h + 2 * pad - kh) / stride + 1;
    wo = (w + 2 * pad - kw) / stride + 1;
  }
  int64_t Taps() const { return c * kh * kw; }    // rows of the column matrix
  int64_t Pixels() const { return ho * wo; }      // its columns
  bool Pointwise() const { return kh == 1 && kw == 1 && stride == 1 && pad == 0; }
};

// The output columns [*lo, *hi) whose tap j (of stride, padding) falls inside a row of `w` pixels.
void InsideColumns(const ConvShape &s, int64_t j, int64_t *lo, int64_t *hi) {
  // src = xo * stride + j - pad must lie in [0, w)
  const int64_t last = s.w - 1 + s.pad - j;  // the largest xo * stride allowed
  *lo = std::min(s.wo, std::max<int64_t>(0, (s.pad - j + s.stride - 1) / s.stride));
  *hi = last < 0 ? *lo : std::max(*lo, std::min(s.wo, last / s.stride + 1));
}

// Runs body(c0, c1) over the input channels, split across cores unless this thread is already one
// part of a parallel loop (each channel's rows are written by one thread).
template <typename Body>
void OverChannels(const ConvShape &s, Body body) {
  const int64_t parts = (t_in_part || s.Taps() * s.Pixels() < (1 << 16)) ? 1 : std::min(Cores(), s.c);
  OnThreads(parts, [&](int64_t part) {
    int64_t begin, end;
    Slice(s.c, parts, part, 1, &begin, &end);
    if (begin < end) body(begin, end);
  });
}

// Output rows [y0, y1) of one sample's column matrix (C*kh*kw, (y1 - y0)*Wo) from x (C, H, W), zero
// outside the image (torch's unfold).
void Im2Col(const ConvShape &s, const float *x, int64_t y0, int64_t y1, float *cols) {
  const int64_t width = (y1 - y0) * s.wo;
  OverChannels(s, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ch++)
      for (int64_t i = 0; i < s.kh; i++)
        for (int64_t j = 0; j < s.kw; j++) {
          int64_t lo, hi;
          InsideColumns(s, j, &lo, &hi);
          float *row = cols + ((ch * s.kh + i) * s.kw + j) * width;
          for (int64_t y = y0; y < y1; y++) {
            const int64_t src_y = y * s.stride + i - s.pad;
            float *out = row + (y - y0) * s.wo;
            if (src_y < 0 || src_y >= s.h) {
              std::memset(out, 0, sizeof(float) * s.wo);
              continue;
            }
            const float *src = x + (ch * s.h + src_y) * s.w + j - s.pad;  // src[xo * stride] for xo in [lo, hi)
            std::memset(out, 0, sizeof(float) * lo);
            if (s.stride == 1) {
              std::memcpy(out + lo, src + lo, sizeof(float) * (hi - lo));
            } else {
              for (int64_t xo = lo; xo < hi; xo++) out[xo] = src[xo * s.stride];
            }
            std::memset(out + hi, 0, sizeof(float) * (s.wo - hi));
          }
        }
  });
}

// Adds the entries of Im2Col(s, ., y0, y1, cols) back onto the image positions they came from (its
// adjoint), into dx (C, H, W); taps in a fixed order.
void Col2Im(const ConvShape &s, const float *cols, int64_t y0, int64_t y1, float *dx) {
  const int64_t width = (y1 - y0) * s.wo;
  OverChannels(s, [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ch++)
      for (int64_t i = 0; i < s.kh; i++)
        for (int64_t j = 0; j < s.kw; j++) {
          int64_t lo, hi;
          InsideColumns(s, j, &lo, &hi);
          const float *row = cols + ((ch * s.kh + i) * s.kw + j) * width;
          for (int64_t y = y0; y < y1; y++) {
            const int64_t dst_y = y * s.stride + i - s.pad;
            if (dst_y < 0 || dst_y >= s.h) continue;
            float *dst = dx + (ch * s.h + dst_y) * s.w + j - s.pad;
            const float *src = row + (y - y0) * s.wo;
            if (s.stride == 1) {
              for (int64_t xo = lo; xo < hi; xo++) dst[xo] += src[xo];
            } else {
              for (int64_t xo = lo; xo < hi; xo++) dst[xo * s.stride] += src[xo];
            }
          }
        }
  });
}

// A column matrix holds at most this many floats (16 MB): a large image (the VAE at 1024^2) is
// unfolded a band of output rows at a time, not all at once (~2 GB for one 512-channel sample).
constexpr int64_t kColumnBudget = 1 << 22;

// Output rows per band of the column matrix.
int64_t BandRows(const ConvShape &s) {
  return std::max<int64_t>(1, std::min<int64_t>(s.ho, kColumnBudget / std::max<int64_t>(1, s.Taps() * s.wo)));
}

// Runs body(sample, threads_for_its_products) over the batch: samples on separate threads when there
// are at least as many as cores, else one after another with the products split across cores.
template <typename Body>
void OverSamples(int64_t n, Body body) {
  const int64_t cores = Cores();
  if (n >= cores && cores > 1) {
    OnThreads(cores, [=](int64_t part) {
      int64_t begin, end;
      Slice(n, cores, part, 1, &begin, &end);
      t_in_part = true;
      for (int64_t i = begin; i < end; i++) body(i);
      t_in_part = false;
    });
  } else {
    for (int64_t i = 0; i < n; i++) body(i);
  }
}

}  // namespace

// x (R..., I), weight (O, I)[, bias (O)] -> y (R..., O) = x weight^T + bias
extern "C" int LinearForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const bool has_bias = nparam == 4;
  const float *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), in = shapes[1][1], out = shapes[1][0];
  if (has_bias) {  // the bias first, the product added onto it (beta 1)
    const float *bias = static_cast<const float *>(params[2]);
    for (int64_t r = 0; r < rows; r++) std::memcpy(y + r * out, bias, sizeof(float) * out);
  }
  Gemm('N', 'T', rows, out, in, 1.0f, x, in, weight, in, has_bias ? 1.0f : 0.0f, y, out);
  return 0;
}

// dy (R..., O), weight (O, I) -> dx (R..., I) = dy weight
extern "C" int LinearGradInput(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), out = shapes[1][0], in = shapes[1][1];
  Gemm('N', 'N', rows, in, out, 1.0f, dy, out, weight, in, 0.0f, dx, in);
  return 0;
}

// dy (R..., O), x (R..., I) -> dweight (O, I) = dy^T x
extern "C" int LinearGradWeight(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  float *dweight = static_cast<float *>(params[2]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), out = shapes[0][ndims[0] - 1];
  const int64_t in = shapes[1][ndims[1] - 1];
  Gemm('T', 'N', out, in, rows, 1.0f, dy, out, x, in, 0.0f, dweight, in);
  return 0;
}

// dy (R..., O) -> dbias (O): the sum over every leading axis
extern "C" int LinearGradBias(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t cols = shapes[0][ndims[0] - 1];
  ColumnSums(static_cast<const float *>(params[0]), Product(shapes[0], 0, ndims[0] - 1), cols,
             static_cast<float *>(params[1]));
  return 0;
}

// A linear layer with a LoRA branch as one op: the base product, the bias and the low-rank update in
// one launch (unfused, ~14 MindSpore kernels per layer and step, forward and backward, each costing
// ~15-20 us to launch whatever its size: at the small configs that launch cost is most of the step).
//
// x (R..., I), weight (O, I), down (r, I), up (O, r), scale (1)[, bias (O)]
//   -> y (R..., O) = x weight^T + bias + scale (x down^T) up^T, h (R..., r) = x down^T (kept for the gradients)
extern "C" int LoRALinearForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                 void *) {
  const bool has_bias = nparam == 8;
  const float *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const float *down = static_cast<const float *>(params[2]), *up = static_cast<const float *>(params[3]);
  const float scale = static_cast<const float *>(params[4])[0];
  float *y = static_cast<float *>(params[nparam - 2]), *h = static_cast<float *>(params[nparam - 1]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), in = shapes[1][1], out = shapes[1][0];
  const int64_t rank = shapes[2][0];
  if (has_bias) {
    const float *bias = static_cast<const float *>(params[5]);
    for (int64_t r = 0; r < rows; r++) std::memcpy(y + r * out, bias, sizeof(float) * out);
  }
  Gemm('N', 'T', rows, out, in, 1.0f, x, in, weight, in, has_bias ? 1.0f : 0.0f, y, out);
  Gemm('N', 'T', rows, rank, in, 1.0f, x, in, down, in, 0.0f, h, rank);
  Gemm('N', 'T', rows, out, rank, scale, h, rank, up, rank, 1.0f, y, out);
  return 0;
}

// dy (R..., O), weight (O, I), down (r, I), up (O, r), scale (1)
//   -> dx (R..., I) = dy weight + scale (dy up) down, g (R..., r) = dy up
extern "C" int LoRALinearGradInput(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const float *down = static_cast<const float *>(params[2]), *up = static_cast<const float *>(params[3]);
  const float scale = static_cast<const float *>(params[4])[0];
  float *dx = static_cast<float *>(params[5]), *g = static_cast<float *>(params[6]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), out = shapes[1][0], in = shapes[1][1];
  const int64_t rank = shapes[2][0];
  Gemm('N', 'N', rows, rank, out, 1.0f, dy, out, up, rank, 0.0f, g, rank);
  Gemm('N', 'N', rows, in, out, 1.0f, dy, out, weight, in, 0.0f, dx, in);
  Gemm('N', 'N', rows, in, rank, scale, g, rank, down, in, 1.0f, dx, in);
  return 0;
}

// dy (R..., O), x (R..., I), h (R..., r), g (R..., r), scale (1)
//   -> ddown (r, I) = scale g^T x, dup (O, r) = scale dy^T h
extern "C" int LoRALinearGradFactors(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *h = static_cast<const float *>(params[2]), *g = static_cast<const float *>(params[3]);
  const float scale = static_cast<const float *>(params[4])[0];
  float *ddown = static_cast<float *>(params[5]), *dup = static_cast<float *>(params[6]);
  const int64_t rows = Product(shapes[0], 0, ndims[0] - 1), out = shapes[0][ndims[0] - 1];
  const int64_t in = shapes[1][ndims[1] - 1], rank = shapes[2][ndims[2] - 1];
  Gemm('T', 'N', rank, in, rows, scale, g, rank, x, in, 0.0f, ddown, in);
  Gemm('T', 'N', out, rank, rows, scale, dy, out, h, rank, 0.0f, dup, rank);
  return 0;
}

// x (N, C, H, W), weight (O, C, kh, kw), geometry (stride, padding)[, bias (O)] -> y (N, O, Ho, Wo)
extern "C" int ConvForward(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const bool has_bias = nparam == 5;
  const float *x = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const ConvShape s(shapes[0], shapes[1], static_cast<const float *>(params[2]));
  const float *bias = has_bias ? static_cast<const float *>(params[3]) : nullptr;
  float *y = static_cast<float *>(params[nparam - 1]);
  const int64_t pixels = s.Pixels(), taps = s.Taps(), band = BandRows(s);
  OverSamples(s.n, [&](int64_t i) {
    const float *xi = x + i * s.c * s.h * s.w;
    float *yi = y + i * s.o * pixels;
    if (has_bias)
      for (int64_t k = 0; k < s.o; k++) std::fill(yi + k * pixels, yi + (k + 1) * pixels, bias[k]);
    const float beta = has_bias ? 1.0f : 0.0f;
    if (s.Pointwise()) {
      Gemm('N', 'N', s.o, pixels, taps, 1.0f, weight, taps, xi, pixels, beta, yi, pixels);
      return;
    }
    std::vector<float> cols(taps * band * s.wo);
    for (int64_t y0 = 0; y0 < s.ho; y0 += band) {
      const int64_t y1 = std::min(s.ho, y0 + band), width = (y1 - y0) * s.wo;
      Im2Col(s, xi, y0, y1, cols.data());
      Gemm('N', 'N', s.o, width, taps, 1.0f, weight, taps, cols.data(), width, beta, yi + y0 * s.wo, pixels);
    }
  });
  return 0;
}

// dy (N, O, Ho, Wo), weight (O, C, kh, kw), geometry, x (N, C, H, W) (its shape only) -> dx (N, C, H, W)
extern "C" int ConvGradInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *weight = static_cast<const float *>(params[1]);
  const ConvShape s(shapes[3], shapes[1], static_cast<const float *>(params[2]));
  float *dx = static_cast<float *>(params[4]);
  const int64_t pixels = s.Pixels(), taps = s.Taps(), band = BandRows(s);
  OverSamples(s.n, [&](int64_t i) {
    const float *dyi = dy + i * s.o * pixels;
    float *dxi = dx + i * s.c * s.h * s.w;
    if (s.Pointwise()) {
      Gemm('T', 'N', taps, pixels, s.o, 1.0f, weight, taps, dyi, pixels, 0.0f, dxi, pixels);
      return;
    }
    std::memset(dxi, 0, sizeof(float) * s.c * s.h * s.w);
    std::vector<float> cols(taps * band * s.wo);
    for (int64_t y0 = 0; y0 < s.ho; y0 += band) {
      const int64_t y1 = std::min(s.ho, y0 + band), width = (y1 - y0) * s.wo;
      Gemm('T', 'N', taps, width, s.o, 1.0f, weight, taps, dyi + y0 * s.wo, pixels, 0.0f, cols.data(), width);
      Col2Im(s, cols.data(), y0, y1, dxi);
    }
  });
  return 0;
}

// dy (N, O, Ho, Wo), x (N, C, H, W), geometry, weight (O, C, kh, kw) (its shape only) -> dweight
// = the sum over samples and bands (in order) of dy_band cols_band^T
extern "C" int ConvGradWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const ConvShape s(shapes[1], shapes[3], static_cast<const float *>(params[2]));
  float *dweight = static_cast<float *>(params[4]);
  const int64_t pixels = s.Pixels(), taps = s.Taps(), band = s.Pointwise() ? s.ho : BandRows(s);
  std::vector<float> cols(s.Pointwise() ? 0 : taps * band * s.wo);
  bool first = true;
  for (int64_t i = 0; i < s.n; i++) {
    const float *xi = x + i * s.c * s.h * s.w;
    for (int64_t y0 = 0; y0 < s.ho; y0 += band) {
      const int64_t y1 = std::min(s.ho, y0 + band), width = (y1 - y0) * s.wo;
      const float *b = xi;
      if (!s.Pointwise()) {
        Im2Col(s, xi, y0, y1, cols.data());
        b = cols.data();
      }
      Gemm('N', 'T', s.o, taps, width, 1.0f, dy + i * s.o * pixels + y0 * s.wo, pixels, b, width,
           first ? 0.0f : 1.0f, dweight, taps);
      first = false;
    }
  }
  return 0;
}

// dy (N, O, Ho, Wo) -> dbias (O): sums over samples and pixels, in order
extern "C" int ConvGradBias(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]);
  float *dbias = static_cast<float *>(params[1]);
  const int64_t n = shapes[0][0], o = shapes[0][1], pixels = shapes[0][2] * shapes[0][3];
  std::vector<float> per_sample(o);
  for (int64_t i = 0; i < n; i++) {
    RowSums(dy + i * o * pixels, o, pixels, per_sample.data());
    for (int64_t k = 0; k < o; k++) dbias[k] = i == 0 ? per_sample[k] : dbias[k] + per_sample[k];
  }
  return 0;
}
