// CPU GEMMs through oneDNN or at::mm (gemm.h).
#include "gemm.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include <ATen/MemoryOverlap.h>
#include <torch/library.h>

// oneDNN's matmul behind torch's own mkldnn matmuls (result = beta result + alpha mat1 mat2), in
// libtorch_cpu. Declared weak: a torch build without it leaves the address null and the kernels
// use at::mm, instead of failing to load.
namespace at {
namespace native {
__attribute__((weak)) void mkldnn_matmul(const at::Tensor& mat1, const at::Tensor& mat2, const at::Tensor& result,
                                         float beta, float alpha);
}  // namespace native
}  // namespace at

namespace idid_kernels {
namespace cpu {
namespace {

// Below this many multiply-adds at::mm wins: oneDNN's primitive lookup costs ~10 us a call.
constexpr int64_t kMinOneDnnMacs = int64_t(1) << 21;  // 128^3

std::atomic<int> g_setting{-1};  // -1: not read from the environment yet
std::atomic<int> g_chosen{-1};   // engine float32 GEMMs take under auto: -1 not timed yet
std::mutex g_mutex;
std::atomic<int64_t> g_onednn_calls{0};

GemmEngine parse_env() {
  const char* raw = std::getenv("IDID_KERNELS_CPU_GEMM");
  if (raw == nullptr || *raw == '\0' || std::strcmp(raw, "auto") == 0) return GemmEngine::kAuto;
  if (std::strcmp(raw, "aten") == 0) return GemmEngine::kAten;
  if (std::strcmp(raw, "onednn") == 0) return GemmEngine::kOneDnn;
  TORCH_CHECK(false, "IDID_KERNELS_CPU_GEMM must be auto, aten or onednn, got '", raw, "'");
}

GemmEngine setting() {
  int s = g_setting.load(std::memory_order_acquire);
  if (s < 0) {
    std::lock_guard<std::mutex> lock(g_mutex);
    s = g_setting.load(std::memory_order_relaxed);
    if (s < 0) {
      const GemmEngine e = parse_env();
      TORCH_CHECK(e != GemmEngine::kOneDnn || onednn_available(),
                  "IDID_KERNELS_CPU_GEMM=onednn: this torch build has no oneDNN matmul");
      s = static_cast<int>(e);
      g_setting.store(s, std::memory_order_release);
    }
  }
  return static_cast<GemmEngine>(s);
}

void onednn_mm(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, float beta, float alpha) {
  at::native::mkldnn_matmul(a, b, out, beta, alpha);
  g_onednn_calls.fetch_add(1, std::memory_order_relaxed);
}

// Fastest of the best of three of each engine on a (256, 128) x (128, 2048) product, the shape of
// a cm_margin chunk; oneDNN only when it is at least 10% faster.
GemmEngine time_engines() {
  if (!onednn_available()) return GemmEngine::kAten;
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  const at::Tensor a = at::linspace(-1.0, 1.0, 256 * 128, opts).view({256, 128});
  const at::Tensor b = at::linspace(1.0, -1.0, 128 * 2048, opts).view({2048, 128}).t();
  at::Tensor out = at::empty({256, 2048}, opts);
  using clock = std::chrono::steady_clock;
  double best_aten = 1e30, best_dnnl = 1e30;
  try {
    at::mm_out(out, a, b);
    onednn_mm(out, a, b, 0.0f, 1.0f);  // JIT-compiles this shape's kernels
    for (int r = 0; r < 3; ++r) {
      auto t0 = clock::now();
      at::mm_out(out, a, b);
      auto t1 = clock::now();
      onednn_mm(out, a, b, 0.0f, 1.0f);
      auto t2 = clock::now();
      best_aten = std::min(best_aten, std::chrono::duration<double>(t1 - t0).count());
      best_dnnl = std::min(best_dnnl, std::chrono::duration<double>(t2 - t1).count());
    }
  } catch (const std::exception&) {
    return GemmEngine::kAten;  // a build whose oneDNN refuses float32
  }
  return best_dnnl < 0.9 * best_aten ? GemmEngine::kOneDnn : GemmEngine::kAten;
}

GemmEngine float32_engine() {
  const GemmEngine s = setting();
  if (s != GemmEngine::kAuto) return s;
  int c = g_chosen.load(std::memory_order_acquire);
  if (c < 0) {
    std::lock_guard<std::mutex> lock(g_mutex);
    c = g_chosen.load(std::memory_order_relaxed);
    if (c < 0) {
      c = static_cast<int>(time_engines());
      g_chosen.store(c, std::memory_order_release);
    }
  }
  return static_cast<GemmEngine>(c);
}

// oneDNN reads a 2-D operand in place when it is row-major or column-major contiguous; others it
// would copy first.
bool in_place_operand(const at::Tensor& t) {
  if (t.is_contiguous()) return true;
  return t.stride(0) == 1 && t.stride(1) == t.size(0);
}

bool use_onednn(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (a.scalar_type() != at::kFloat || b.scalar_type() != at::kFloat || out.scalar_type() != at::kFloat) return false;
  if (!a.is_cpu() || !b.is_cpu() || !out.is_cpu() || a.dim() != 2 || b.dim() != 2 || out.dim() != 2) return false;
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1);
  if (m == 0 || n == 0 || k == 0 || m * n * k < kMinOneDnnMacs) return false;
  if (b.size(0) != k || out.size(0) != m || out.size(1) != n) return false;  // at::mm_out reports it
  if (!out.is_contiguous() || !in_place_operand(a) || !in_place_operand(b)) return false;
  return float32_engine() == GemmEngine::kOneDnn;
}

}  // namespace

bool onednn_available() { return &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN(); }

void set_gemm_engine(GemmEngine engine) {
  TORCH_CHECK(engine != GemmEngine::kOneDnn || onednn_available(),
              "cpu_gemm('onednn'): this torch build has no oneDNN matmul");
  std::lock_guard<std::mutex> lock(g_mutex);
  g_setting.store(static_cast<int>(engine), std::memory_order_release);
}

int64_t onednn_calls() { return g_onednn_calls.load(std::memory_order_relaxed); }

const char* gemm_engine_in_use() { return float32_engine() == GemmEngine::kOneDnn ? "onednn" : "aten"; }

void mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (use_onednn(out, a, b)) {
    onednn_mm(out, a, b, 0.0f, 1.0f);
  } else {
    at::mm_out(out, a, b);
  }
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  cpu::mm_out(out, a, b);
  return out;
}

void addmm_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (use_onednn(out, a, b)) {
    onednn_mm(out, a, b, 1.0f, static_cast<float>(alpha));
  } else {
    out.addmm_(a, b, 1, alpha);
  }
}

}  // namespace cpu
}  // namespace idid_kernels

// cpu_mm(a, b) and cpu_mm_out(a, b, out): a b through the kernels' GEMM path above, for the bench's
// floor in the kernels' own engine and for tests. CPU only; no autograd.
TORCH_LIBRARY_FRAGMENT(idid_kernels, m) {
  m.def("cpu_mm(Tensor a, Tensor b) -> Tensor");
  m.def("cpu_mm_out(Tensor a, Tensor b, Tensor(a!) out) -> ()");
}

namespace {

void check_cpu_mm(const char* name, const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), name, ": expected (m, k) and (k, n), got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), name, ": dtypes differ: ", a.scalar_type(), " and ",
              b.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("cpu_mm", [](const at::Tensor& a, const at::Tensor& b) {
    check_cpu_mm("cpu_mm", a, b);
    return idid_kernels::cpu::mm(a, b);
  });
  m.impl("cpu_mm_out", [](const at::Tensor& a, const at::Tensor& b, at::Tensor out) {
    check_cpu_mm("cpu_mm_out", a, b);
    TORCH_CHECK(out.dim() == 2 && out.size(0) == a.size(0) && out.size(1) == b.size(1), "cpu_mm_out: out must be (",
                a.size(0), ", ", b.size(1), "), got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == a.scalar_type(), "cpu_mm_out: out is ", out.scalar_type(), ", the operands ",
                a.scalar_type());
    at::assert_no_overlap(out, a);  // oneDNN would write into an operand it is still reading
    at::assert_no_overlap(out, b);
    idid_kernels::cpu::mm_out(out, a, b);
  });
}
