// The kept scratch block of the CPU kernels (scratch.h).
#include "scratch.h"

#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>

namespace idid_kernels {
namespace cpu {
namespace {

struct Cache {
  std::mutex mutex;
  at::Tensor block;  // uint8 (bytes,), or undefined
  bool in_use = false;
  int keep = -1;  // -1: not read yet
};

// Never destroyed: a tensor from scratch_tensor may be freed after static destructors have run.
Cache& cache() {
  static Cache* c = new Cache;
  return *c;
}

// Call with the mutex held.
bool keep_locked(Cache& c) {
  if (c.keep < 0) {
    const char* raw = std::getenv("IDID_KERNELS_KEEP_SCRATCH");
    c.keep = (raw != nullptr && std::strcmp(raw, "0") == 0) ? 0 : 1;
  }
  return c.keep == 1;
}

}  // namespace

ScratchLease::ScratchLease(int64_t numel, const at::TensorOptions& options) {
  const int64_t item = static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(options.dtype())));
  const int64_t bytes = std::max<int64_t>(numel, 1) * item;
  Cache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mutex);
    if (keep_locked(c) && !c.in_use) {
      if (!c.block.defined() || c.block.numel() < bytes) {
        c.block = at::Tensor();  // the old block goes before the new one is taken
        c.block = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCPU));
      }
      c.in_use = true;
      cached_ = true;
      tensor_ = c.block.narrow(0, 0, bytes).view(options.dtype().toScalarType()).narrow(0, 0, numel);
      return;
    }
  }
  tensor_ = at::empty({numel}, options.device(at::kCPU));
}

ScratchLease::~ScratchLease() {
  tensor_ = at::Tensor();
  if (!cached_) return;
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.in_use = false;
  if (!keep_locked(c)) c.block = at::Tensor();
}

at::Tensor scratch_tensor(int64_t numel, const at::TensorOptions& options) {
  auto lease = std::make_shared<ScratchLease>(numel, options);
  const at::Tensor& t = lease->tensor();
  // The storage's deleter owns the lease: the block goes back when the last view of it is freed.
  return at::from_blob(
      t.data_ptr(), {numel}, [lease](void*) mutable { lease.reset(); }, t.options());
}

int64_t scratch_bytes() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return c.block.defined() ? c.block.numel() : 0;
}

int64_t scratch_release() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  if (c.in_use || !c.block.defined()) return 0;
  const int64_t bytes = c.block.numel();
  c.block = at::Tensor();
  return bytes;
}

bool scratch_keep() {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  return keep_locked(c);
}

void set_scratch_keep(bool keep) {
  Cache& c = cache();
  std::lock_guard<std::mutex> lock(c.mutex);
  c.keep = keep ? 1 : 0;
  if (!keep && !c.in_use) c.block = at::Tensor();
}

}  // namespace cpu
}  // namespace idid_kernels
