// The scheduler of the CUDA-execution emulator (see idid_emu.h for the model it implements).
//
// Each thread of a block is a fiber: a ucontext started on its own mmap'd stack (with a guard page
// below it), switched with _setjmp/_longjmp afterwards (swapcontext would make a signal-mask system
// call at every switch). Fortify's longjmp check refuses jumps between stacks, hence the #undef.
#ifdef _FORTIFY_SOURCE
#undef _FORTIFY_SOURCE
#endif

#include "idid_emu.h"

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <random>
#include <string>
#include <vector>

namespace idid_emu {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreads = 1024;
constexpr uint64_t kMaxBlocks = uint64_t(1) << 26;  // a permutation of the grid is materialised

enum class State : uint8_t { kReady, kBarrier, kWarp, kDone };

struct Stack {
  void* base = nullptr;  // guard page first, then the stack
  std::size_t bytes = 0;
};

// Stacks are kept for the life of the OS thread and reused by every block it runs.
struct StackPool {
  std::vector<Stack> stacks;
  ~StackPool() {
    for (Stack& s : stacks) munmap(s.base, s.bytes);
  }
  void* top_of(std::size_t i, std::size_t* size) {
    while (stacks.size() <= i) {
      const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
      const std::size_t bytes = kStackBytes + page;
      void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
      if (p == MAP_FAILED) return nullptr;
      mprotect(p, page, PROT_NONE);  // an overflow faults instead of corrupting the next stack
      stacks.push_back({p, bytes});
    }
    const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    *size = stacks[i].bytes - page;
    return static_cast<char*>(stacks[i].base) + page;
  }
};

struct Fiber {
  jmp_buf jb;
  ucontext_t uc;
  bool started = false;
  State state = State::kReady;
  uint3 tid{0, 0, 0};
};

struct Warp {
  bool pending = false;
  WarpOp op = WarpOp::kSyncWarp;
  unsigned mask = 0, arrived = 0;
  int width = 32, size = 0;
  const char* name = "";
  int arg[kWarpSize] = {};
  uint64_t in[kWarpSize] = {};
  uint64_t out[kWarpSize] = {};
};

enum class Order { kForward, kReverse, kRandom };

struct Block {
  const char* kernel = "";
  dim3 grid, dim;
  uint3 idx{0, 0, 0};
  int n = 0;
  int done = 0, at_barrier = 0;
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  const std::function<void()>* body = nullptr;
  Order order = Order::kForward;
  std::mt19937_64 rng;
  std::deque<int> ready;  // the threads to run next, front first
  bool failed = false;
  std::string error;
};

thread_local StackPool t_stacks;
thread_local jmp_buf t_scheduler;
thread_local Block* t_block = nullptr;
thread_local int t_current = -1;
thread_local cudaError_t t_last_error = cudaSuccess;
thread_local std::string t_last_message;

// "0-16, 18, 20-255"
std::string ranges(const std::vector<int>& ids) {
  std::string out;
  for (std::size_t i = 0; i < ids.size();) {
    std::size_t j = i;
    while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += std::to_string(ids[i]);
    if (j > i) out += "-" + std::to_string(ids[j]);
    i = j + 1;
  }
  return out.empty() ? "none" : out;
}

std::string where(const Block& b) {
  char buf[160];
  std::snprintf(buf, sizeof(buf), "kernel %s, block (%u, %u, %u)", b.kernel, b.idx.x, b.idx.y, b.idx.z);
  return buf;
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

std::vector<int> in_state(const Block& b, State s) {
  std::vector<int> ids;
  for (int i = 0; i < b.n; ++i)
    if (b.fibers[i].state == s) ids.push_back(i);
  return ids;
}

// Records the fault and leaves the fiber for good (its stack is simply reused later).
[[noreturn]] void fault(const std::string& what) {
  Block& b = *t_block;
  b.failed = true;
  b.error = "CUDA emulator: " + where(b) + ": " + what;
  _longjmp(t_scheduler, 1);
}

// Threads released by a barrier join the back of the queue: all of them, in the block's order.
void release_barrier(Block& b) {
  std::vector<int> ids(static_cast<std::size_t>(b.n));
  for (int i = 0; i < b.n; ++i) ids[i] = i;
  if (b.order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  if (b.order == Order::kRandom) std::shuffle(ids.begin(), ids.end(), b.rng);
  for (int i : ids) {
    b.fibers[i].state = State::kReady;
    b.ready.push_back(i);
  }
  b.at_barrier = 0;
}

// Lanes released by a warp collective go to the front of the queue (in forward and reverse order):
// the warp runs on ahead of the rest of the block, as a warp may on a GPU, which exposes a missing
// barrier that a thread-by-thread interleaving would hide. In random order they go to the front or
// the back at random.
void release_lanes(Block& b, int warp, unsigned mask) {
  std::vector<int> ids;
  for (int l = 0; l < kWarpSize; ++l)
    if ((mask >> l) & 1u) ids.push_back(warp * kWarpSize + l);
  if (b.order == Order::kReverse) std::reverse(ids.begin(), ids.end());
  const bool front = b.order != Order::kRandom || (b.rng() & 1u) != 0;
  if (b.order == Order::kRandom) std::shuffle(ids.begin(), ids.end(), b.rng);
  for (int i : ids) b.fibers[i].state = State::kReady;
  if (front) {
    b.ready.insert(b.ready.begin(), ids.begin(), ids.end());
  } else {
    b.ready.insert(b.ready.end(), ids.begin(), ids.end());
  }
}

void yield_to_scheduler() {
  Fiber& f = t_block->fibers[t_current];
  if (_setjmp(f.jb) == 0) _longjmp(t_scheduler, 1);
}

void fiber_main() {
  Block& b = *t_block;
  (*b.body)();
  // Returned: the thread leaves the block.
  const int t = t_current;
  b.fibers[t].state = State::kDone;
  ++b.done;
  if (b.at_barrier > 0) {
    fault("thread " + std::to_string(t) + " returned while threads " + ranges(in_state(b, State::kBarrier)) +
          " wait at __syncthreads() (a barrier in divergent code)");
  }
  const Warp& w = b.warps[t / kWarpSize];
  const int lane = t % kWarpSize;
  if (w.pending && ((w.mask >> lane) & 1u)) {
    std::vector<int> lanes;
    for (int l = 0; l < kWarpSize; ++l)
      if ((w.arrived >> l) & 1u) lanes.push_back(l);
    fault("lane " + std::to_string(lane) + " of warp " + std::to_string(t / kWarpSize) + " returned while lanes " +
          ranges(lanes) + " wait at " + w.name + "(mask " + hex(w.mask) + "), which needs it");
  }
  _longjmp(t_scheduler, 1);
}

void run_fiber(Block& b, int i) {
  Fiber& f = b.fibers[i];
  t_current = i;
  if (_setjmp(t_scheduler) == 0) {
    if (!f.started) {
      f.started = true;
      setcontext(&f.uc);
    }
    _longjmp(f.jb, 1);
  }
}

std::string deadlock_message(const Block& b) {
  std::string msg = "deadlock:";
  const std::vector<int> barrier = in_state(b, State::kBarrier), done = in_state(b, State::kDone);
  if (!barrier.empty()) msg += " threads " + ranges(barrier) + " wait at __syncthreads();";
  for (std::size_t wi = 0; wi < b.warps.size(); ++wi) {
    const Warp& w = b.warps[wi];
    if (!w.pending) continue;
    std::vector<int> missing_done, missing_barrier;
    for (int l = 0; l < kWarpSize; ++l) {
      if (!((w.mask >> l) & 1u) || ((w.arrived >> l) & 1u)) continue;
      const int t = static_cast<int>(wi) * kWarpSize + l;
      if (t < b.n && b.fibers[t].state == State::kDone) missing_done.push_back(l);
      else missing_barrier.push_back(l);
    }
    msg += " warp " + std::to_string(wi) + " waits at " + w.name + "(mask " + hex(w.mask) + ") for lanes ";
    msg += ranges(missing_barrier.empty() ? missing_done : missing_barrier);
    msg += missing_barrier.empty() ? " (returned);" : " (waiting at __syncthreads());";
  }
  if (!done.empty()) msg += " threads " + ranges(done) + " have returned";
  return msg;
}

void run_block(Block& b) {
  b.done = b.at_barrier = 0;
  for (int i = 0; i < b.n; ++i) {
    Fiber& f = b.fibers[i];
    f.started = false;
    f.state = State::kReady;
    f.tid = uint3{static_cast<unsigned>(i) % b.dim.x, (static_cast<unsigned>(i) / b.dim.x) % b.dim.y,
                  static_cast<unsigned>(i) / (b.dim.x * b.dim.y)};
    std::size_t size = 0;
    void* stack = t_stacks.top_of(static_cast<std::size_t>(i), &size);
    if (stack == nullptr) {
      b.failed = true;
      b.error = "CUDA emulator: out of memory for thread stacks";
      return;
    }
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = stack;
    f.uc.uc_stack.ss_size = size;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, fiber_main, 0);
  }
  for (Warp& w : b.warps) w = Warp();
  // Every thread starts ready, queued in the block's order; each runs until it blocks or returns.
  b.ready.clear();
  std::vector<int> start(static_cast<std::size_t>(b.n));
  for (int i = 0; i < b.n; ++i) start[i] = i;
  if (b.order == Order::kReverse) std::reverse(start.begin(), start.end());
  if (b.order == Order::kRandom) std::shuffle(start.begin(), start.end(), b.rng);
  b.ready.assign(start.begin(), start.end());
  while (b.done < b.n) {
    if (b.ready.empty()) {
      b.failed = true;
      b.error = "CUDA emulator: " + where(b) + ": " + deadlock_message(b);
      return;
    }
    const int i = b.ready.front();
    b.ready.pop_front();
    run_fiber(b, i);
    if (b.failed) return;
  }
}

bool parse_order(Order* order, uint64_t* seed, std::string* error) {
  const char* env = std::getenv("IDID_KERNELS_CUDA_EMULATE_ORDER");
  const std::string v = env == nullptr ? "" : env;
  *seed = 0;
  if (v.empty() || v == "forward") {
    *order = Order::kForward;
  } else if (v == "reverse") {
    *order = Order::kReverse;
  } else if (v == "random" || v.rfind("random:", 0) == 0) {
    *order = Order::kRandom;
    if (v.size() > 7) {
      char* end = nullptr;
      *seed = std::strtoull(v.c_str() + 7, &end, 10);
      if (end == nullptr || *end != '\0') {
        *error = "IDID_KERNELS_CUDA_EMULATE_ORDER=" + v + ": the seed must be a decimal integer";
        return false;
      }
    }
  } else {
    *error = "IDID_KERNELS_CUDA_EMULATE_ORDER must be forward, reverse, random or random:SEED, got '" + v + "'";
    return false;
  }
  return true;
}

uint64_t fnv1a(const char* s) {
  uint64_t h = 1469598103934665603ull;
  for (; *s != '\0'; ++s) h = (h ^ static_cast<unsigned char>(*s)) * 1099511628211ull;
  return h;
}

void set_error(cudaError_t code, const std::string& message) {
  t_last_error = code;
  t_last_message = message;
}

}  // namespace

void device_fault(const char* what) { fault("thread " + std::to_string(t_current) + ": " + what); }

const uint3& thread_idx() { return t_block->fibers[t_current].tid; }
const uint3& block_idx() { return t_block->idx; }
const dim3& block_dim() { return t_block->dim; }
const dim3& grid_dim() { return t_block->grid; }

void syncthreads() {
  Block& b = *t_block;
  const int t = t_current;
  if (b.done > 0) {
    fault("thread " + std::to_string(t) + " reached __syncthreads() after threads " +
          ranges(in_state(b, State::kDone)) + " returned (a barrier in divergent code)");
  }
  b.fibers[t].state = State::kBarrier;
  if (++b.at_barrier == b.n) release_barrier(b);
  yield_to_scheduler();
}

void warp_collective(WarpOp op, unsigned mask, void* value, int size, int arg, int width, const char* name) {
  Block& b = *t_block;
  const int t = t_current;
  const int wi = t / kWarpSize, lane = t % kWarpSize;
  const std::string who = "lane " + std::to_string(lane) + " of warp " + std::to_string(wi);
  if (!((mask >> lane) & 1u)) fault(who + " calls " + name + " with mask " + hex(mask) + ", which leaves it out");
  if (width <= 0 || width > kWarpSize || (width & (width - 1)) != 0) {
    fault(who + " calls " + name + " with width " + std::to_string(width) + " (a power of two up to 32)");
  }
  for (int l = 0; l < kWarpSize; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const int tl = wi * kWarpSize + l;
    if (tl >= b.n) fault(who + " calls " + name + " with mask " + hex(mask) + ", but lane " + std::to_string(l) +
                         " does not exist (block of " + std::to_string(b.n) + " threads)");
    if (b.fibers[tl].state == State::kDone) {
      fault(who + " calls " + name + "(mask " + hex(mask) + ") but lane " + std::to_string(l) + " has returned");
    }
  }
  Warp& w = b.warps[wi];
  if (w.pending) {
    if (w.op != op || w.mask != mask || w.width != width || w.size != size) {
      fault(who + " calls " + name + "(mask " + hex(mask) + ") while other lanes wait at " + w.name + "(mask " +
            hex(w.mask) + "): lanes of one mask must meet at the same collective");
    }
  } else {
    w.pending = true;
    w.op = op;
    w.mask = mask;
    w.width = width;
    w.size = size;
    w.name = name;
    w.arrived = 0;
  }
  std::memcpy(&w.in[lane], value, static_cast<std::size_t>(size));
  w.arg[lane] = arg;
  w.arrived |= 1u << lane;
  b.fibers[t].state = State::kWarp;
  if (w.arrived == mask) {
    unsigned ballot = 0;
    if (op == WarpOp::kBallot) {
      for (int l = 0; l < kWarpSize; ++l)
        if (((mask >> l) & 1u) && w.in[l] != 0) ballot |= 1u << l;
    }
    for (int l = 0; l < kWarpSize; ++l) {
      if (!((mask >> l) & 1u)) continue;
      const int base = (l / width) * width;
      int src = l;
      switch (op) {
        case WarpOp::kShflIdx: src = base + ((w.arg[l] % width) + width) % width; break;
        case WarpOp::kShflXor: src = l ^ w.arg[l]; if (src >= base + width || src < 0 || src >= kWarpSize) src = l; break;
        case WarpOp::kShflDown: src = l + w.arg[l]; if (src >= base + width) src = l; break;
        case WarpOp::kShflUp: src = l - w.arg[l]; if (src < base) src = l; break;
        case WarpOp::kSyncWarp: case WarpOp::kBallot: break;
      }
      if (!((mask >> src) & 1u)) {
        fault("lane " + std::to_string(l) + " of warp " + std::to_string(wi) + " reads lane " + std::to_string(src) +
              " in " + name + ", which is outside the mask " + hex(mask));
      }
      w.out[l] = op == WarpOp::kBallot ? ballot : w.in[src];
    }
    w.pending = false;
    release_lanes(b, wi, mask);
  }
  yield_to_scheduler();
  std::memcpy(value, &w.out[lane], static_cast<std::size_t>(size));
}

void run_grid(dim3 grid, dim3 block, const char* kernel, const std::function<void()>& body) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535) {
    set_error(cudaErrorInvalidConfiguration,
              std::string("invalid configuration argument: kernel ") + kernel + " launched with grid (" +
                  std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
                  "), block (" + std::to_string(block.x) + ", " + std::to_string(block.y) + ", " +
                  std::to_string(block.z) + ")");
    return;
  }
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks > kMaxBlocks) {
    set_error(cudaErrorLaunchFailure, std::string("CUDA emulator: kernel ") + kernel + " launched with " +
                                          std::to_string(blocks) + " blocks; the emulator runs at most " +
                                          std::to_string(kMaxBlocks) + " (use smaller shapes)");
    return;
  }
  Order order;
  uint64_t seed;
  std::string error;
  if (!parse_order(&order, &seed, &error)) {
    set_error(cudaErrorLaunchFailure, "CUDA emulator: " + error);
    return;
  }
  if (t_block != nullptr) {
    set_error(cudaErrorLaunchFailure, std::string("CUDA emulator: kernel ") + kernel +
                                          " launched from inside a kernel (dynamic parallelism is not emulated)");
    return;
  }
  Block b;
  b.kernel = kernel;
  b.grid = grid;
  b.dim = block;
  b.n = static_cast<int>(threads);
  b.fibers.resize(threads);
  b.warps.resize((threads + kWarpSize - 1) / kWarpSize);
  b.body = &body;
  b.order = order;
  std::vector<uint64_t> seq(blocks);
  for (uint64_t i = 0; i < blocks; ++i) seq[i] = i;
  const uint64_t kernel_hash = fnv1a(kernel);
  if (order == Order::kReverse) std::reverse(seq.begin(), seq.end());
  if (order == Order::kRandom) {
    std::mt19937_64 rng(seed ^ kernel_hash);
    std::shuffle(seq.begin(), seq.end(), rng);
  }
  t_block = &b;
  for (uint64_t lin : seq) {
    b.idx = uint3{static_cast<unsigned>(lin % grid.x), static_cast<unsigned>((lin / grid.x) % grid.y),
                  static_cast<unsigned>(lin / (uint64_t(grid.x) * grid.y))};
    b.rng.seed(seed ^ kernel_hash ^ (lin * 0x9e3779b97f4a7c15ull));
    run_block(b);
    if (b.failed) break;
  }
  t_block = nullptr;
  t_current = -1;
  if (b.failed) set_error(cudaErrorLaunchFailure, b.error);
}

}  // namespace idid_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = idid_emu::t_last_error;
  idid_emu::t_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() { return idid_emu::t_last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration:
    case cudaErrorLaunchFailure:
      if (!idid_emu::t_last_message.empty()) return idid_emu::t_last_message.c_str();
      return error == cudaErrorLaunchFailure ? "unspecified launch failure" : "invalid configuration argument";
  }
  return "unknown error";
}
