// LayerNorm and GroupNorm, forward and backward, as MindSpore "aot" custom-op kernels for the CPU
// target (built by native_norms.py). MindSpore 2.10's own CPU norm kernels cost 10-30x torch's per
// call; these are plain loops over contiguous float32 rows. Statistics and reductions accumulate in
// double, in a fixed order, so results do not depend on thread count and resume bit-exactly.
//
// Kernel signature (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
// const char **dtypes, void *stream, void *extra); params are the inputs, then the outputs.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

#include "native_math.h"

namespace {

int64_t Product(const int64_t *shape, int begin, int end) {
  int64_t p = 1;
  for (int i = begin; i < end; i++) p *= shape[i];
  return p;
}

// Runs body(begin, end) over [0, count) split into contiguous chunks on up to all cores, each
// chunk doing at least `grain` units of `cost` elements (threads cost ~20 us to start). Every unit is
// computed by one thread in a fixed order, so results do not depend on the split.
template <typename Body>
void ParallelFor(int64_t count, int64_t cost, Body body) {
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(cost, 1));
  const int64_t chunks = std::min(UsableCores(), (count + grain - 1) / grain);
  if (chunks <= 1) {
    body(0, count);
    return;
  }
  std::vector<std::thread> workers;
  const int64_t step = (count + chunks - 1) / chunks;
  for (int64_t begin = step; begin < count; begin += step)
    workers.emplace_back(body, begin, std::min(count, begin + step));
  body(0, std::min(count, step));
  for (auto &w : workers) w.join();
}

// Mean and 1/sqrt(var + eps) of `count` contiguous values, two-pass (as torch).
void Moments(const float *x, int64_t count, double eps, float *mean, float *rstd) {
  double sum = 0;
  for (int64_t i = 0; i < count; i++) sum += x[i];
  const double m = sum / count;
  double sq = 0;
  for (int64_t i = 0; i < count; i++) {
    const double d = x[i] - m;
    sq += d * d;
  }
  *mean = static_cast<float>(m);
  *rstd = static_cast<float>(1.0 / std::sqrt(sq / count + eps));
}

// The forward kernels' buffers: x, weight, bias, norm parameters in; y out. The parameters are
// (eps) for LayerNorm, (eps, groups) for GroupNorm. The forward ops have one output: MindSpore's
// front end spends ~0.6 MB more compile memory on each call site of a several-output op (measured:
// -61 MB for the 97 norms of the tiny SDXL train step); the backward recomputes the statistics
// instead (one more read of x, in the same order, so bit-identical ones).
struct ForwardArgs {
  const float *x, *weight, *bias;
  double eps;
  float *y;
  explicit ForwardArgs(void **p)
      : x(static_cast<const float *>(p[0])), weight(static_cast<const float *>(p[1])),
        bias(static_cast<const float *>(p[2])), eps(static_cast<const float *>(p[3])[0]),
        y(static_cast<float *>(p[4])) {}
};

}  // namespace

// x (R..., C), weight (C), bias (C), (eps) -> y (R..., C)
extern "C" int LayerNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const ForwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *bias = a.bias;
  const double eps = a.eps;
  float *y = a.y;
  const int64_t cols = shapes[0][ndims[0] - 1], rows = Product(shapes[0], 0, ndims[0] - 1);
  ParallelFor(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *xr = x + r * cols;
      float *yr = y + r * cols;
      float m, s;
      Moments(xr, cols, eps, &m, &s);
      for (int64_t c = 0; c < cols; c++) yr[c] = (xr[c] - m) * s * weight[c] + bias[c];
    }
  });
  return 0;
}

// dy, x (R..., C), weight (C), (eps) -> dx (R..., C), dweight (C), dbias (C)
extern "C" int LayerNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *weight = static_cast<const float *>(params[2]);
  const double eps = static_cast<const float *>(params[3])[0];
  float *dx = static_cast<float *>(params[4]), *dweight = static_cast<float *>(params[5]);
  float *dbias = static_cast<float *>(params[6]);
  const int64_t cols = shapes[0][ndims[0] - 1], rows = Product(shapes[0], 0, ndims[0] - 1);
  std::vector<float> mean_buffer(rows), rstd_buffer(rows);
  float *mean = mean_buffer.data(), *rstd = rstd_buffer.data();
  // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * weight: rows in parallel
  ParallelFor(rows, cols, [=](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *dyr = dy + r * cols, *xr = x + r * cols;
      float *dxr = dx + r * cols;
      Moments(xr, cols, eps, mean + r, rstd + r);
      const float m = mean[r], s = rstd[r];
      double sum_g = 0, sum_gx = 0;
      for (int64_t c = 0; c < cols; c++) {
        const float g = dyr[c] * weight[c];
        sum_g += g;
        sum_gx += g * ((xr[c] - m) * s);
      }
      const float mean_g = static_cast<float>(sum_g / cols), mean_gx = static_cast<float>(sum_gx / cols);
      for (int64_t c = 0; c < cols; c++) dxr[c] = s * (dyr[c] * weight[c] - mean_g - (xr[c] - m) * s * mean_gx);
    }
  });
  // dweight, dbias: sums over rows, columns in parallel, each summed in row order
  ParallelFor(cols, rows, [=](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; c++) dweight[c] = dbias[c] = 0.0f;
    for (int64_t r = 0; r < rows; r++) {
      const float *dyr = dy + r * cols, *xr = x + r * cols;
      const float m = mean[r], s = rstd[r];
      for (int64_t c = begin; c < end; c++) {
        dweight[c] += dyr[c] * ((xr[c] - m) * s);
        dbias[c] += dyr[c];
      }
    }
  });
  return 0;
}

namespace {

// y = x * scale + shift, or silu of it (x sigmoid(x)), over n values
VECTOR_CLONES void AffineRow(const float *x, float *y, int64_t n, float scale, float shift, bool silu) {
  if (silu) {
    for (int64_t j = 0; j < n; j++) {
      const float a = x[j] * scale + shift;
      y[j] = a * Sigmoid(a);
    }
  } else {
    for (int64_t j = 0; j < n; j++) y[j] = x[j] * scale + shift;
  }
}

// g = dy * silu'(a), a = x * scale + shift recomputed: silu'(a) = s (1 + a (1 - s)), s = sigmoid(a)
VECTOR_CLONES void SiluGradRow(const float *dy, const float *x, float *g, int64_t n, float scale, float shift) {
  for (int64_t j = 0; j < n; j++) {
    const float a = x[j] * scale + shift;
    const float s = Sigmoid(a);
    g[j] = dy[j] * (s * (1.0f + a * (1.0f - s)));
  }
}

// x (N, C, ...), weight (C), bias (C), (eps, groups) -> y (N, C, ...); y the normalised x, or silu
// of it (`silu`: one kernel for the norm -> SiLU pairs of the ResNet blocks)
int GroupNormForwardImpl(void **params, int *ndims, int64_t **shapes, bool silu) {
  const ForwardArgs a(params);
  const float *x = a.x, *weight = a.weight, *bias = a.bias;
  const double eps = a.eps;
  float *y = a.y;
  const int64_t n = shapes[0][0], channels = shapes[0][1], spatial = Product(shapes[0], 2, ndims[0]);
  const int64_t groups = static_cast<int64_t>(static_cast<const float *>(params[3])[1]);
  const int64_t per_group = channels / groups;
  ParallelFor(n * groups, per_group * spatial, [=](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; k++) {
      const int64_t i = k / groups, g = k % groups;
      float m, s;
      Moments(x + (i * channels + g * per_group) * spatial, per_group * spatial, eps, &m, &s);
      for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
        const float scale = s * weight[c], shift = bias[c] - m * scale;
        AffineRow(x + (i * channels + c) * spatial, y + (i * channels + c) * spatial, spatial, scale, shift, silu);
      }
    }
  });
  return 0;
}

}  // namespace

extern "C" int GroupNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return GroupNormForwardImpl(params, ndims, shapes, false);
}

// the same, y = silu(GroupNorm(x))
extern "C" int GroupNormSiluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return GroupNormForwardImpl(params, ndims, shapes, true);
}

namespace {

// dy, x (N, C, ...), weight (C)[, bias (C)], (eps, groups) -> dx (N, C, ...), dweight (C), dbias
// (C). `bias` given: the forward was silu(GroupNorm(x)), and dy is first taken through SiLU's
// derivative at the recomputed norm output.
int GroupNormBackwardImpl(void **params, int64_t **shapes, int *ndims, const float *bias, const float *norm_params,
                          float *dx, float *dweight, float *dbias) {
  const float *dy = static_cast<const float *>(params[0]), *x = static_cast<const float *>(params[1]);
  const float *weight = static_cast<const float *>(params[2]);
  const int64_t n = shapes[0][0], channels = shapes[0][1], spatial = Product(shapes[0], 2, ndims[0]);
  const int64_t groups = static_cast<int64_t>(norm_params[1]), per_group = channels / groups;
  const int64_t count = per_group * spatial;
  const double eps = norm_params[0];
  // groups in parallel; within a group the samples in order, so dweight/dbias sum deterministically
  ParallelFor(groups, n * count, [=](int64_t begin, int64_t end) {
    std::vector<float> through_silu(bias != nullptr ? count : 0);
    for (int64_t g = begin; g < end; g++) {
      for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) dweight[c] = dbias[c] = 0.0f;
      for (int64_t i = 0; i < n; i++) {
        const int64_t first = (i * channels + g * per_group) * spatial;
        float m, s;
        Moments(x + first, count, eps, &m, &s);  // as the forward did
        // the gradient at the norm's output, channel c at grad + (c - g * per_group) * spatial
        const float *grad = dy + first;
        if (bias != nullptr) {
          for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
            const float scale = s * weight[c], shift = bias[c] - m * scale;
            const int64_t offset = (c - g * per_group) * spatial;
            SiluGradRow(dy + first + offset, x + first + offset, through_silu.data() + offset, spatial, scale, shift);
          }
          grad = through_silu.data();
        }
        double sum_g = 0, sum_gx = 0;
        for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
          const float *dyc = grad + (c - g * per_group) * spatial, *xc = x + (i * channels + c) * spatial;
          double sum_dy = 0, sum_dyx = 0;
          for (int64_t j = 0; j < spatial; j++) {
            sum_dy += dyc[j];
            sum_dyx += dyc[j] * ((xc[j] - m) * s);
          }
          dweight[c] += static_cast<float>(sum_dyx);
          dbias[c] += static_cast<float>(sum_dy);
          sum_g += weight[c] * sum_dy;
          sum_gx += weight[c] * sum_dyx;
        }
        // dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) over the group, g = dy * weight
        const float mean_g = static_cast<float>(sum_g / count), mean_gx = static_cast<float>(sum_gx / count);
        for (int64_t c = g * per_group; c < (g + 1) * per_group; c++) {
          const float *dyc = grad + (c - g * per_group) * spatial, *xc = x + (i * channels + c) * spatial;
          float *dxc = dx + (i * channels + c) * spatial;
          for (int64_t j = 0; j < spatial; j++)
            dxc[j] = s * (dyc[j] * weight[c] - mean_g - (xc[j] - m) * s * mean_gx);
        }
      }
    }
  });
  return 0;
}

}  // namespace

// dy, x (N, C, ...), weight (C), (eps, groups) -> dx (N, C, ...), dweight (C), dbias (C)
extern "C" int GroupNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return GroupNormBackwardImpl(params, shapes, ndims, nullptr, static_cast<const float *>(params[3]),
                               static_cast<float *>(params[4]), static_cast<float *>(params[5]),
                               static_cast<float *>(params[6]));
}

// dy, x, weight, bias, (eps, groups) -> dx, dweight, dbias of silu(GroupNorm(x))
extern "C" int GroupNormSiluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *,
                                     void *) {
  return GroupNormBackwardImpl(params, shapes, ndims, static_cast<const float *>(params[3]),
                               static_cast<const float *>(params[4]), static_cast<float *>(params[5]),
                               static_cast<float *>(params[6]), static_cast<float *>(params[7]));
}
