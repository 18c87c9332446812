// 2-D convolutions, forward and gradients, as MindSpore "aot" custom-op kernels for the CPU target
// (built by native_conv.py), computed by oneDNN's convolution primitives from the libdnnl.so.3 that
// ships inside MindSpore's wheel. MindSpore 2.10's own CPU Conv2D runs at ~1 GFLOP/s and the im2col
// + MatMul route at ~60-120 GFLOP/s on 2 cores; oneDNN's direct JIT convolution on its blocked
// layouts runs at ~180 (torch's speed: torch calls the same library), the layout conversions
// included.
//
// MindSpore's oneDNN is built for the "threadpool" runtime: it runs on the threads of a pool the
// caller passes with its stream. Ours reports a fixed number of threads, so oneDNN splits the work
// the same way on any machine and the results do not depend on the core count (resume stays
// bit-exact across machines); the closures then run on at most as many threads as there are cores.
//
// Kernel signature (MindSpore aot): int f(int nparam, void **params, int *ndims, int64_t **shapes,
// const char **dtypes, void *stream, void *extra); params are the inputs, then the outputs.
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "native_math.h"

// The part of oneDNN 3.x's C API used here (ABI-stable within major version 3; the values are
// those of oneapi/dnnl/dnnl_types.h), declared here because the wheel ships the library without
// its headers.
extern "C" {
typedef int64_t dnnl_dims_t[12];
typedef struct dnnl_engine *dnnl_engine_t;
typedef struct dnnl_stream *dnnl_stream_t;
typedef struct dnnl_memory_desc *dnnl_memory_desc_t;
typedef const struct dnnl_memory_desc *const_dnnl_memory_desc_t;
typedef struct dnnl_memory *dnnl_memory_t;
typedef struct dnnl_primitive_desc *dnnl_primitive_desc_t;
typedef const struct dnnl_primitive_desc *const_dnnl_primitive_desc_t;
typedef struct dnnl_primitive *dnnl_primitive_t;
typedef const struct dnnl_primitive_attr *const_dnnl_primitive_attr_t;
typedef struct {
  int arg;
  dnnl_memory_t memory;
} dnnl_exec_arg_t;
enum { dnnl_success = 0, dnnl_f32 = 3, dnnl_format_tag_any = 1, dnnl_cpu = 1, dnnl_forward_training = 64,
       dnnl_convolution_direct = 1 };
enum { dnnl_query_src_md = 129, dnnl_query_diff_src_md, dnnl_query_weights_md, dnnl_query_diff_weights_md,
       dnnl_query_dst_md, dnnl_query_diff_dst_md };
enum { DNNL_ARG_SRC = 1, DNNL_ARG_FROM = 1, DNNL_ARG_DST = 17, DNNL_ARG_TO = 17, DNNL_ARG_WEIGHTS = 33,
       DNNL_ARG_DIFF_SRC = 129, DNNL_ARG_DIFF_DST = 145, DNNL_ARG_DIFF_WEIGHTS = 161 };
int dnnl_engine_create(dnnl_engine_t *engine, int kind, size_t index);
int dnnl_threadpool_interop_stream_create(dnnl_stream_t *stream, dnnl_engine_t engine, void *threadpool);
int dnnl_memory_desc_create_with_strides(dnnl_memory_desc_t *md, int ndims, const dnnl_dims_t dims, int data_type,
                                         const dnnl_dims_t strides);
int dnnl_memory_desc_create_with_tag(dnnl_memory_desc_t *md, int ndims, const dnnl_dims_t dims, int data_type,
                                     int tag);
int dnnl_memory_desc_equal(const_dnnl_memory_desc_t a, const_dnnl_memory_desc_t b);
size_t dnnl_memory_desc_get_size(const_dnnl_memory_desc_t md);
int dnnl_memory_create(dnnl_memory_t *memory, const_dnnl_memory_desc_t md, dnnl_engine_t engine, void *handle);
int dnnl_memory_destroy(dnnl_memory_t memory);
int dnnl_convolution_forward_primitive_desc_create(
    dnnl_primitive_desc_t *pd, dnnl_engine_t engine, int prop_kind, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t bias, const_dnnl_memory_desc_t dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_attr_t attr);
int dnnl_convolution_backward_data_primitive_desc_create(
    dnnl_primitive_desc_t *pd, dnnl_engine_t engine, int alg_kind, const_dnnl_memory_desc_t diff_src,
    const_dnnl_memory_desc_t weights, const_dnnl_memory_desc_t diff_dst, const dnnl_dims_t strides,
    const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint, const_dnnl_primitive_attr_t attr);
int dnnl_convolution_backward_weights_primitive_desc_create(
    dnnl_primitive_desc_t *pd, dnnl_engine_t engine, int alg_kind, const_dnnl_memory_desc_t src,
    const_dnnl_memory_desc_t diff_weights, const_dnnl_memory_desc_t diff_bias, const_dnnl_memory_desc_t diff_dst,
    const dnnl_dims_t strides, const dnnl_dims_t dilates, const dnnl_dims_t padding_l, const dnnl_dims_t padding_r,
    const_dnnl_primitive_desc_t hint, const_dnnl_primitive_attr_t attr);
int dnnl_reorder_primitive_desc_create(dnnl_primitive_desc_t *pd, const_dnnl_memory_desc_t src, dnnl_engine_t src_engine,
                                       const_dnnl_memory_desc_t dst, dnnl_engine_t dst_engine,
                                       const_dnnl_primitive_attr_t attr);
const_dnnl_memory_desc_t dnnl_primitive_desc_query_md(const_dnnl_primitive_desc_t pd, int what, int index);
int dnnl_primitive_create(dnnl_primitive_t *primitive, const_dnnl_primitive_desc_t pd);
int dnnl_primitive_execute(dnnl_primitive_t primitive, dnnl_stream_t stream, int nargs,
                           const dnnl_exec_arg_t *args);
}

// oneDNN's dnnl::threadpool_interop::threadpool_iface (oneapi/dnnl/dnnl_threadpool_iface.hpp): the
// virtual functions in this order are its ABI.
struct ThreadpoolInterface {
  virtual int get_num_threads() const = 0;
  virtual bool get_in_parallel() const = 0;
  virtual void parallel_for(int n, const std::function<void(int, int)> &fn) = 0;
  virtual uint64_t get_flags() const = 0;
  virtual void wait() = 0;
  virtual ~ThreadpoolInterface() = default;
};

namespace {

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
  int64_t Pixels() const { return ho * wo; }
  // multiply-adds x 2 of the forward; each gradient costs the same
  double Flops() const { return 2.0 * n * o * c * kh * kw * ho * wo; }
};

// How many parts oneDNN splits each primitive into, whatever the machine (see the top).
constexpr int kParts = 8;

// The pool handed to oneDNN: each parallel_for runs its closures on up to UsableCores() threads started
// for the call.
// Below this many floating-point operations a convolution runs on the calling thread alone:
// starting a pool thread costs ~30 us here and one call makes several parallel_for calls (each
// layout conversion and the primitive), ~0.1 ms in all, which is what a second core saves on
// ~30 MFLOP. Measured (2 cores, alternated runs): the tiny SDXL train step at 128x128, whose
// convolutions are all 9-28 MFLOP, 0.095 -> 0.080 s; medium at 256x256 (>= 0.6 GFLOP each)
// unchanged, and 15% slower with every convolution serial. The split into kParts stays the same,
// so results do not change.
constexpr double kSerialFlops = 32e6;
thread_local bool t_in_pool = false;
thread_local bool t_serial = false;  // set by Run for the call in progress
struct Pool : ThreadpoolInterface {
  int get_num_threads() const override { return kParts; }
  bool get_in_parallel() const override { return t_in_pool; }
  void parallel_for(int n, const std::function<void(int, int)> &fn) override {
    const int parts = t_serial ? 1 : std::min<int>(n, static_cast<int>(UsableCores()));
    auto body = [&](int p) {
      t_in_pool = true;
      for (int i = p; i < n; i += parts) fn(i, n);
      t_in_pool = false;
    };
    std::vector<std::thread> workers;
    for (int p = 1; p < parts; p++) workers.emplace_back(body, p);
    body(0);
    for (auto &w : workers) w.join();
  }
  uint64_t get_flags() const override { return 0; }
  void wait() override {}
};

#define DNNL_OK(call) \
  do { \
    if ((call) != dnnl_success) return nullptr; \
  } while (0)

dnnl_engine_t Engine() {
  static dnnl_engine_t engine = [] {
    dnnl_engine_t e = nullptr;
    dnnl_engine_create(&e, dnnl_cpu, 0);
    return e;
  }();
  return engine;
}

dnnl_stream_t Stream() {
  static Pool pool;
  thread_local dnnl_stream_t stream = [] {
    dnnl_stream_t s = nullptr;
    dnnl_threadpool_interop_stream_create(&s, Engine(), &pool);
    return s;
  }();
  return stream;
}

dnnl_memory_desc_t Plain(int64_t a, int64_t b, int64_t c, int64_t d) {
  dnnl_memory_desc_t md = nullptr;
  dnnl_dims_t dims = {a, b, c, d}, strides = {b * c * d, c * d, d, 1};
  dnnl_memory_desc_create_with_strides(&md, 4, dims, dnnl_f32, strides);
  return md;
}

dnnl_memory_desc_t Any(int64_t a, int64_t b, int64_t c, int64_t d) {
  dnnl_memory_desc_t md = nullptr;
  dnnl_dims_t dims = {a, b, c, d};
  dnnl_memory_desc_create_with_tag(&md, 4, dims, dnnl_f32, dnnl_format_tag_any);
  return md;
}

// A tensor in the layout a primitive chose, converted from/to the plain (NCHW / OIHW) one.
struct Layout {
  const_dnnl_memory_desc_t plain = nullptr, chosen = nullptr;
  dnnl_primitive_t to_chosen = nullptr, to_plain = nullptr;  // null when the layouts are equal
  size_t bytes = 0;
};

bool MakeLayout(dnnl_memory_desc_t plain, const_dnnl_memory_desc_t chosen, Layout *l) {
  l->plain = plain;
  l->chosen = chosen;
  l->bytes = dnnl_memory_desc_get_size(chosen);
  if (dnnl_memory_desc_equal(plain, chosen)) return true;
  dnnl_primitive_desc_t pd;
  if (dnnl_reorder_primitive_desc_create(&pd, plain, Engine(), chosen, Engine(), nullptr) != dnnl_success) return false;
  dnnl_primitive_create(&l->to_chosen, pd);
  if (dnnl_reorder_primitive_desc_create(&pd, chosen, Engine(), plain, Engine(), nullptr) != dnnl_success) return false;
  dnnl_primitive_create(&l->to_plain, pd);
  return true;
}

// One primitive and the layouts of its three tensors.
struct Step {
  dnnl_primitive_t primitive = nullptr;
  Layout a, b, c;
};

struct ConvPrimitives {
  Step forward;           // src, weights, dst
  Step backward_data;     // diff_dst, weights, diff_src
  Step backward_weights;  // diff_dst, src, diff_weights
};

bool MakeStep(dnnl_primitive_desc_t pd, const int (&queries)[3], dnnl_memory_desc_t (&plain)[3], Step *step) {
  Layout *layouts[3] = {&step->a, &step->b, &step->c};
  for (int i = 0; i < 3; i++)
    if (!MakeLayout(plain[i], dnnl_primitive_desc_query_md(pd, queries[i], 0), layouts[i])) return false;
  return dnnl_primitive_create(&step->primitive, pd) == dnnl_success;
}

ConvPrimitives *MakeConv(const ConvShape &s) {
  auto *p = new ConvPrimitives();
  dnnl_dims_t strides = {s.stride, s.stride}, dilates = {0, 0}, pad = {s.pad, s.pad};
  dnnl_memory_desc_t src = Any(s.n, s.c, s.h, s.w), wei = Any(s.o, s.c, s.kh, s.kw), dst = Any(s.n, s.o, s.ho, s.wo);
  dnnl_primitive_desc_t fpd, dpd, wpd;
  DNNL_OK(dnnl_convolution_forward_primitive_desc_create(&fpd, Engine(), dnnl_forward_training, dnnl_convolution_direct,
                                                         src, wei, nullptr, dst, strides, dilates, pad, pad, nullptr));
  DNNL_OK(dnnl_convolution_backward_data_primitive_desc_create(&dpd, Engine(), dnnl_convolution_direct, src, wei, dst,
                                                               strides, dilates, pad, pad, fpd, nullptr));
  DNNL_OK(dnnl_convolution_backward_weights_primitive_desc_create(&wpd, Engine(), dnnl_convolution_direct, src, wei,
                                                                  nullptr, dst, strides, dilates, pad, pad, fpd, nullptr));
  dnnl_memory_desc_t x = Plain(s.n, s.c, s.h, s.w), w = Plain(s.o, s.c, s.kh, s.kw), y = Plain(s.n, s.o, s.ho, s.wo);
  dnnl_memory_desc_t f[3] = {x, w, y}, d[3] = {y, w, x}, g[3] = {y, x, w};
  if (!MakeStep(fpd, {dnnl_query_src_md, dnnl_query_weights_md, dnnl_query_dst_md}, f, &p->forward) ||
      !MakeStep(dpd, {dnnl_query_diff_dst_md, dnnl_query_weights_md, dnnl_query_diff_src_md}, d, &p->backward_data) ||
      !MakeStep(wpd, {dnnl_query_diff_dst_md, dnnl_query_src_md, dnnl_query_diff_weights_md}, g, &p->backward_weights))
    return nullptr;
  return p;
}

// Runs `step` on the kernel's buffers a, b (inputs) and c (output) with these argument names.
void Run(const Step &step, double flops, int arg_a, const void *a, int arg_b, const void *b, int arg_c, void *c);

ConvPrimitives *Conv(const ConvShape &s) {
  static std::mutex mutex;
  static std::map<std::vector<int64_t>, ConvPrimitives *> cache;
  const std::vector<int64_t> key = {s.n, s.c, s.h, s.w, s.o, s.kh, s.kw, s.stride, s.pad};
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  return cache[key] = MakeConv(s);
}

dnnl_memory_t Memory(const_dnnl_memory_desc_t md, void *data) {
  dnnl_memory_t m = nullptr;
  dnnl_memory_create(&m, md, Engine(), data);
  return m;
}

// A tensor of a kernel's inputs/outputs in the primitive's layout: converted on entry (inputs) and
// back on release (outputs), or the buffer itself when the layouts agree.
struct Staged {
  const Layout &l;
  void *user;
  bool output;
  std::vector<char> buffer;
  dnnl_memory_t plain = nullptr, chosen = nullptr;
  Staged(const Layout &layout, const void *data, bool is_output)
      : l(layout), user(const_cast<void *>(data)), output(is_output) {
    plain = Memory(l.plain, user);
    if (l.to_chosen == nullptr) {
      chosen = plain;
      return;
    }
    buffer.resize(l.bytes);
    chosen = Memory(l.chosen, buffer.data());
    if (!output) {
      dnnl_exec_arg_t args[] = {{DNNL_ARG_FROM, plain}, {DNNL_ARG_TO, chosen}};
      dnnl_primitive_execute(l.to_chosen, Stream(), 2, args);
    }
  }
  ~Staged() {
    if (l.to_chosen != nullptr) {
      if (output) {
        dnnl_exec_arg_t args[] = {{DNNL_ARG_FROM, chosen}, {DNNL_ARG_TO, plain}};
        dnnl_primitive_execute(l.to_plain, Stream(), 2, args);
      }
      dnnl_memory_destroy(chosen);
    }
    dnnl_memory_destroy(plain);
  }
};

void Run(const Step &step, double flops, int arg_a, const void *a, int arg_b, const void *b, int arg_c, void *c) {
  t_serial = flops < kSerialFlops;
  Staged sa(step.a, a, false), sb(step.b, b, false), sc(step.c, c, true);
  dnnl_exec_arg_t args[] = {{arg_a, sa.chosen}, {arg_b, sb.chosen}, {arg_c, sc.chosen}};
  dnnl_primitive_execute(step.primitive, Stream(), 3, args);
}

}  // namespace

// x (N, C, H, W), weight (O, C, kh, kw), geometry (stride, padding)[, bias (O)] -> y (N, O, Ho, Wo)
extern "C" int ConvForward(int nparam, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const bool has_bias = nparam == 5;
  const ConvShape s(shapes[0], shapes[1], static_cast<const float *>(params[2]));
  ConvPrimitives *p = Conv(s);
  if (p == nullptr) return 1;
  float *y = static_cast<float *>(params[nparam - 1]);
  Run(p->forward, s.Flops(), DNNL_ARG_SRC, params[0], DNNL_ARG_WEIGHTS, params[1], DNNL_ARG_DST, y);
  if (has_bias) {
    const float *bias = static_cast<const float *>(params[3]);
    const int64_t pixels = s.Pixels();
    for (int64_t i = 0; i < s.n; i++)
      for (int64_t k = 0; k < s.o; k++) {
        float *row = y + (i * s.o + k) * pixels;
        for (int64_t j = 0; j < pixels; j++) row[j] += bias[k];
      }
  }
  return 0;
}

// dy (N, O, Ho, Wo), weight (O, C, kh, kw), geometry, x (N, C, H, W) (its shape only) -> dx (N, C, H, W)
extern "C" int ConvGradInput(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const ConvShape s(shapes[3], shapes[1], static_cast<const float *>(params[2]));
  ConvPrimitives *p = Conv(s);
  if (p == nullptr) return 1;
  Run(p->backward_data, s.Flops(), DNNL_ARG_DIFF_DST, params[0], DNNL_ARG_WEIGHTS, params[1], DNNL_ARG_DIFF_SRC, params[4]);
  return 0;
}

// dy (N, O, Ho, Wo), x (N, C, H, W), geometry, weight (O, C, kh, kw) (its shape only) -> dweight
extern "C" int ConvGradWeight(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const ConvShape s(shapes[1], shapes[3], static_cast<const float *>(params[2]));
  ConvPrimitives *p = Conv(s);
  if (p == nullptr) return 1;
  Run(p->backward_weights, s.Flops(), DNNL_ARG_DIFF_DST, params[0], DNNL_ARG_SRC, params[1], DNNL_ARG_DIFF_WEIGHTS, params[4]);
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
