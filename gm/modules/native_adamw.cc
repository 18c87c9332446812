// AdamW over every trained parameter in one call, as a MindSpore "aot" custom-op kernel for the CPU
// target (built by native_adamw.py). One MindSpore AdamWeightDecay kernel per parameter, plus the
// gradient's scaling, is ~550 launched kernels per step for the 136 LoRA modules of the tiny SDXL,
// each ~10-15 us of launch time whatever its size; this is one.
//
// The kernel updates the parameters, both moments and the update count *in place* (their buffers
// are its inputs) and writes a dummy output that the train step depends on. That is safe because
// every op that reads a parameter in the step (forward, backward) is an ancestor of the gradients
// this op consumes. A flag input says whether to update at all (accumulating micro-batches, a
// skipped overflow, a measurement): the train step then needs no branch, whose subgraph call cost
// MindSpore ~7 ms per step here, passing ~1100 tensors in and out.
//
// The arithmetic is torch.optim.AdamW's (single-tensor path, float32 tensors, double scalars):
//   p *= 1 - lr wd;  m += (1 - b1) (g - m);  v = v b2 + (1 - b2) g g;
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// Elementwise, so the bits do not depend on how the work is split between threads.
//
// Inputs: grads (N,) float32, the concatenated gradients in parameter order (already divided by the
// loss scale and the accumulation count); hyper (2 + G,) float32 = [update (1) or not (0), clip
// factor, lr of each group]; step () int32, the updates done so far, incremented here; config
// (3 + G,) float64 = [beta1, beta2, eps, weight decay of each group]; group (n,) int32, each
// parameter's group; then the n parameters, the n first moments and the n second moments (float32).
// Output: (1,) float32, set to 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "native_math.h"

namespace {

constexpr int kFixedInputs = 5;
// below this many elements one thread does it all (starting a thread costs ~30 us)
constexpr int64_t kSerialElements = 1 << 18;

int64_t Count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; i++) n *= shape[i];
  return n;
}

struct Tensor3 {
  float *param, *exp_avg, *exp_avg_sq;
  int64_t offset, count;  // the parameter's elements in the concatenated gradient
  float decay, step_size, grad_scale;  // per group: 1 - lr wd, lr / (1 - b1^t); the clip factor
};

struct Shared {
  float w1, b2, w2, bc2_sqrt, eps;  // 1 - b1, b2, 1 - b2, sqrt(1 - b2^t), eps as torch's float32 ops see them
};

void UpdateRange(const Tensor3 &t, const Shared &s, const float *grad, int64_t begin, int64_t end) {
  const float *g_row = grad + t.offset;
  for (int64_t i = begin; i < end; i++) {
    const float g = g_row[i] * t.grad_scale;
    const float p = t.param[i] * t.decay;
    const float m = t.exp_avg[i] + s.w1 * (g - t.exp_avg[i]);
    const float v = t.exp_avg_sq[i] * s.b2 + s.w2 * g * g;
    const float denom = std::sqrt(v) / s.bc2_sqrt + s.eps;
    t.exp_avg[i] = m;
    t.exp_avg_sq[i] = v;
    t.param[i] = p + (-t.step_size) * (m / denom);
  }
}

// Every element of [begin, end) of the concatenated parameters (tensors sorted by offset).
void UpdateSpan(const std::vector<Tensor3> &tensors, const Shared &s, const float *grad, int64_t begin, int64_t end) {
  auto it = std::upper_bound(tensors.begin(), tensors.end(), begin,
                             [](int64_t at, const Tensor3 &t) { return at < t.offset; });
  for (--it; it != tensors.end() && it->offset < end; ++it) {
    const int64_t lo = std::max<int64_t>(begin - it->offset, 0);
    const int64_t hi = std::min<int64_t>(end - it->offset, it->count);
    if (lo < hi) UpdateRange(*it, s, grad, lo, hi);
  }
}

}  // namespace

extern "C" int AdamWUpdate(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                           void *) {
  const int n = (nparam - kFixedInputs - 1) / 3;
  if (n < 1 || kFixedInputs + 3 * n + 1 != nparam) return 1;
  for (int i = kFixedInputs; i < kFixedInputs + 3 * n; i++)
    if (std::strcmp(dtypes[i], "float32") != 0) return 2;
  static_cast<float *>(params[nparam - 1])[0] = 0.0f;
  const float *grad = static_cast<const float *>(params[0]);
  const float *hyper = static_cast<const float *>(params[1]);
  if (hyper[0] == 0.0f) return 0;
  int32_t *step_count = static_cast<int32_t *>(params[2]);
  const int32_t step = ++*step_count;
  const double *config = static_cast<const double *>(params[3]);
  const int32_t *group = static_cast<const int32_t *>(params[4]);
  const int64_t total = Count(ndims[0], shapes[0]);
  const double beta1 = config[0], beta2 = config[1];
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  const Shared shared{static_cast<float>(1.0 - beta1), static_cast<float>(beta2), static_cast<float>(1.0 - beta2),
                      static_cast<float>(std::sqrt(bias_correction2)), static_cast<float>(config[2])};

  std::vector<Tensor3> tensors(n);
  int64_t offset = 0;
  for (int j = 0; j < n; j++) {
    const int k = kFixedInputs + j;
    const double lr = hyper[2 + group[j]], weight_decay = config[3 + group[j]];
    tensors[j] = Tensor3{static_cast<float *>(params[k]), static_cast<float *>(params[k + n]),
                         static_cast<float *>(params[k + 2 * n]), offset, Count(ndims[k], shapes[k]),
                         static_cast<float>(1.0 - lr * weight_decay), static_cast<float>(lr / bias_correction1),
                         hyper[1]};
    offset += tensors[j].count;
  }
  if (offset != total) return 3;  // the gradient vector does not match the parameters

  const int64_t chunks = total < kSerialElements ? 1 : UsableCores();
  const int64_t span = (total + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  for (int64_t begin = span; begin < total; begin += span)
    workers.emplace_back([&, begin] { UpdateSpan(tensors, shared, grad, begin, std::min(total, begin + span)); });
  UpdateSpan(tensors, shared, grad, 0, std::min(total, span));
  for (auto &w : workers) w.join();
  return 0;
}
