// Scheduler of the host CUDA emulation (see include/cuda_emu.h) and the few runtime API calls
// the project uses. Adapted from ../shared/cuda-emu (same scheduler; __match_any_sync added).
#include "cuda_emu.h"

#include <ucontext.h>
#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <sstream>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace isg_emu {
namespace {

constexpr size_t kStack = 256 * 1024;

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  uint3 tid;
  int linear = 0;
  enum State { Ready, Blocked, Done } state = Ready;
  Op op = Op::None;
  unsigned mask = 0;
  int line = 0, arg = 0, width = 32;
  uint64_t value = 0, result = 0;
  void* fake_stack = nullptr;
};

struct Kernel {
  dim3 grid, block;
  uint3 block_idx;
  std::vector<Fiber> fibers;
  Fiber* current = nullptr;
  ucontext_t sched;
  void* sched_fake = nullptr;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  std::function<void()> body;
  std::exception_ptr error;
  std::mt19937 rng;
  int order = 0;  // 0 forward, 1 reverse, 2 random
  bool warp_sched = true, split = false;
};

thread_local Kernel* g = nullptr;
thread_local cudaError_t g_last_error = cudaSuccess;
Stats g_stats{};

[[noreturn]] void fail(const std::string& what) { throw std::runtime_error("cuda_emu: " + what); }

void switch_to_fiber(Fiber& f) {
  g->current = &f;
#if EMU_ASAN
  __sanitizer_start_switch_fiber(&g->sched_fake, f.stack, kStack);
#endif
  swapcontext(&g->sched, &f.ctx);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(g->sched_fake, nullptr, nullptr);
#endif
  g->current = nullptr;
}

void switch_to_scheduler(Fiber& f, bool exiting) {
#if EMU_ASAN
  __sanitizer_start_switch_fiber(exiting ? nullptr : &f.fake_stack, g->sched_bottom, g->sched_size);
#endif
  swapcontext(&f.ctx, &g->sched);
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, nullptr, nullptr);
#endif
}

void trampoline() {
  Fiber& f = *g->current;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g->sched_bottom, &g->sched_size);
#endif
  try {
    g->body();
  } catch (...) {
    if (!g->error) g->error = std::current_exception();
  }
  f.state = Fiber::Done;
  switch_to_scheduler(f, true);
  std::abort();  // never resumed
}

const char* op_name(Op op) {
  switch (op) {
    case Op::None: return "none";
    case Op::SyncThreads: return "__syncthreads";
    case Op::ActiveMask: return "__activemask";
    case Op::Shfl: return "__shfl_sync";
    case Op::ShflXor: return "__shfl_xor_sync";
    case Op::ShflUp: return "__shfl_up_sync";
    case Op::ShflDown: return "__shfl_down_sync";
    case Op::All: return "__all_sync";
    case Op::Any: return "__any_sync";
    case Op::Ballot: return "__ballot_sync";
    case Op::MatchAny: return "__match_any_sync";
  }
  return "?";
}

std::string where(const Fiber& f) {
  std::ostringstream s;
  s << "block (" << g->block_idx.x << "," << g->block_idx.y << "," << g->block_idx.z << ") thread " << f.linear << " (warp "
    << f.linear / 32 << " lane " << f.linear % 32 << ")";
  return s.str();
}

std::string dump() {
  std::ostringstream s;
  for (auto& f : g->fibers) {
    if (f.state == Fiber::Done) continue;
    s << "\n  " << where(f) << ": " << (f.state == Fiber::Blocked ? op_name(f.op) : "ready") << " line " << f.line << " mask 0x"
      << std::hex << f.mask << std::dec;
  }
  return s.str();
}

bool is_collective(Op op) { return op >= Op::Shfl; }

// __activemask groups: lanes of one warp waiting at the same call site.
bool resolve_activemask(int nthreads, int w0) {
  bool progressed = false;
  {
    std::vector<int> lines;
    for (int l = 0; l < 32 && w0 + l < nthreads; ++l) {
      Fiber& f = g->fibers[w0 + l];
      if (f.state == Fiber::Blocked && f.op == Op::ActiveMask && std::find(lines.begin(), lines.end(), f.line) == lines.end())
        lines.push_back(f.line);
    }
    for (int line : lines) {
      std::vector<int> lanes;
      for (int l = 0; l < 32 && w0 + l < nthreads; ++l) {
        Fiber& f = g->fibers[w0 + l];
        if (f.state == Fiber::Blocked && f.op == Op::ActiveMask && f.line == line) lanes.push_back(l);
      }
      std::vector<unsigned> groups;
      if (g->split && lanes.size() > 1 && (g->rng() & 1)) {
        unsigned a = 0, b = 0;
        for (int l : lanes) ((g->rng() & 1) ? a : b) |= 1u << l;
        if (a) groups.push_back(a);
        if (b) groups.push_back(b);

      } else {
        unsigned m = 0;
        for (int l : lanes) m |= 1u << l;
        groups.push_back(m);
      }
      for (unsigned m : groups) {
        for (int l = 0; l < 32; ++l)
          if (m >> l & 1u) {
            Fiber& f = g->fibers[w0 + l];
            f.result = m;
            f.state = Fiber::Ready;
          }
      }
      progressed = true;
    }
  }
  return progressed;
}

uint64_t collective_result(Op op, const Fiber& self, int w0, unsigned mask, int nthreads) {
  const int lane = self.linear - w0;
  auto value_of = [&](int src) -> uint64_t {
    if (!(mask >> src & 1u))
      fail(std::string(op_name(op)) + ": source lane " + std::to_string(src) + " is not in the mask 0x" +
           [&] { std::ostringstream s; s << std::hex << mask; return s.str(); }() + " at line " + std::to_string(self.line) + ", " +
           where(self) + " (its value is undefined)");
    return g->fibers[w0 + src].value;
  };
  const int width = self.width;
  const int seg = lane & ~(width - 1);
  switch (op) {
    case Op::Shfl: return value_of(seg + (self.arg % width + width) % width);
    case Op::ShflXor: { int src = lane ^ self.arg; if (src >= seg + width) src = lane; return value_of(src); }
    case Op::ShflUp: { int src = lane - self.arg; if (src < seg) src = lane; return value_of(src); }
    case Op::ShflDown: { int src = lane + self.arg; if (src >= seg + width) src = lane; return value_of(src); }
    case Op::All: case Op::Any: case Op::Ballot: {
      unsigned ballot = 0;
      for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u && g->fibers[w0 + l].value) ballot |= 1u << l;
      if (op == Op::Ballot) return ballot;
      if (op == Op::All) return ballot == mask;
      return ballot != 0;
    }
    case Op::MatchAny: {
      unsigned same = 0;
      for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u && g->fibers[w0 + l].value == self.value) same |= 1u << l;
      return same;
    }
    default: fail("bad collective");
  }
}

bool resolve_collectives(int nthreads, int w0) {
  bool progressed = false;
  {
    for (int l = 0; l < 32 && w0 + l < nthreads; ++l) {
      Fiber& f = g->fibers[w0 + l];
      if (f.state != Fiber::Blocked || !is_collective(f.op)) continue;
      const unsigned mask = f.mask;
      if (!(mask >> l & 1u)) fail(std::string(op_name(f.op)) + " at line " + std::to_string(f.line) + ": mask omits the calling lane, " + where(f));
      bool ready = true;
      for (int m = 0; m < 32; ++m) {
        if (!(mask >> m & 1u)) continue;
        if (w0 + m >= nthreads)
          fail(std::string(op_name(f.op)) + " at line " + std::to_string(f.line) + ": mask names lane " + std::to_string(m) +
               " which does not exist (block of " + std::to_string(nthreads) + " threads), " + where(f));
        Fiber& o = g->fibers[w0 + m];
        if (o.state == Fiber::Done)
          fail(std::string(op_name(f.op)) + " at line " + std::to_string(f.line) + ": mask names lane " + std::to_string(m) +
               " which has exited, " + where(f));
        if (o.state != Fiber::Blocked || !is_collective(o.op)) { ready = false; continue; }
        if (o.op != f.op || o.mask != mask) { ready = false; continue; }  // UB if it never resolves: reported as deadlock
      }
      if (!ready) continue;
      std::vector<uint64_t> results(32);
      for (int m = 0; m < 32; ++m)
        if (mask >> m & 1u) results[m] = collective_result(f.op, g->fibers[w0 + m], w0, mask, nthreads);
      for (int m = 0; m < 32; ++m)
        if (mask >> m & 1u) {
          Fiber& o = g->fibers[w0 + m];
          o.result = results[m];
          o.state = Fiber::Ready;
        }
      progressed = true;
    }
  }
  return progressed;
}

bool resolve_barrier(int nthreads) {
  int waiting = 0, done = 0, line = -1;
  for (auto& f : g->fibers) {
    if (f.state == Fiber::Done) { ++done; continue; }
    if (f.state == Fiber::Blocked && f.op == Op::SyncThreads) {
      if (line >= 0 && f.line != line)
        fail("__syncthreads at different call sites (lines " + std::to_string(line) + " and " + std::to_string(f.line) + ")");
      line = f.line;
      ++waiting;
    } else {
      return false;
    }
  }
  if (waiting == 0) return false;
  if (done) fail("__syncthreads at line " + std::to_string(line) + " reached by " + std::to_string(waiting) + " threads while " +
                 std::to_string(done) + " threads of the block have exited (divergent barrier)");
  for (auto& f : g->fibers) f.state = Fiber::Ready;
  return true;
}

void run_block(int nthreads) {
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = g->fibers[t];
    f.linear = t;
    f.tid = make_uint3(t % g->block.x, (t / g->block.x) % g->block.y, t / (g->block.x * g->block.y));
    f.state = Fiber::Ready;
    f.op = Op::None;
    f.fake_stack = nullptr;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, trampoline, 0);
  }
  // Scheduling. sched=warp (default): warps take turns; the chosen warp runs greedily (its lanes run
  // to their next sync point, its warp-level sync points are resolved, again) until it can go no
  // further (all its lanes at __syncthreads or exited): one warp may race far ahead of the others,
  // which exposes a missing __syncthreads. sched=block: every thread runs to its next sync point
  // before any is resolved (all warps in lock step). order=forward|reverse|random: order of warps
  // (and of lanes within a warp).
  const int nwarps = (nthreads + 31) / 32;
  std::vector<int> warps(nwarps);
  for (int w = 0; w < nwarps; ++w) warps[w] = w;
  if (g->order == 1) std::reverse(warps.begin(), warps.end());
  auto run_lanes = [&](int w0, int w1) {
    bool ran = false;
    std::vector<int> lanes;
    for (int t = w0; t < w1; ++t) lanes.push_back(t);
    if (g->order == 1) std::reverse(lanes.begin(), lanes.end());
    if (g->order == 2) std::shuffle(lanes.begin(), lanes.end(), g->rng);
    for (int t : lanes) {
      Fiber& f = g->fibers[t];
      if (f.state != Fiber::Ready) continue;
      switch_to_fiber(f);
      ran = true;
      if (g->error) std::rethrow_exception(g->error);
    }
    return ran;
  };
  for (;;) {
    bool any = false;
    if (g->order == 2) std::shuffle(warps.begin(), warps.end(), g->rng);
    if (g->warp_sched) {
      for (int w : warps) {
        const int w0 = w * 32, w1 = std::min(nthreads, w0 + 32);
        for (;;) {
          bool step = run_lanes(w0, w1);
          step = resolve_activemask(nthreads, w0) || step;
          step = resolve_collectives(nthreads, w0) || step;
          if (!step) break;
          any = true;
        }
      }
    } else {
      while (run_lanes(0, nthreads)) any = true;
      bool res = false;
      for (int w : warps) res = resolve_activemask(nthreads, w * 32) || res;
      if (!res)
        for (int w : warps) res = resolve_collectives(nthreads, w * 32) || res;
      any = any || res;
    }
    bool all_done = true;
    for (auto& f : g->fibers) all_done &= f.state == Fiber::Done;
    if (all_done) return;
    if (any) continue;
    if (resolve_barrier(nthreads)) continue;
    fail("deadlock: no thread of the block can progress:" + dump());
  }
}

}  // namespace

char shared_window[1];  // reference point of emulated shared-space addresses (__cvta_generic_to_shared)
void not_shared(const void* p) {
  std::ostringstream s;
  s << "__cvta_generic_to_shared(" << p << "): not the address of a __shared__ variable";
  fail(s.str());
}

void misaligned(const void* p, size_t alignment) {
  std::ostringstream s;
  s << "misaligned address: load of " << alignment << " bytes at " << p;
  if (g && g->current) s << ", " << where(*g->current);
  fail(s.str());
}

uint3& thread_idx() { return g->current->tid; }
uint3& block_idx() { return g->block_idx; }
dim3& block_dim() { return g->block; }
dim3& grid_dim() { return g->grid; }
Stats& stats() { return g_stats; }

uint64_t sync_point(Op op, unsigned mask, uint64_t value, int arg, int width, int line) {
  Fiber& f = *g->current;
  ++g_stats.sync_points;
  f.op = op;
  f.mask = mask;
  f.value = value;
  f.arg = arg;
  f.width = width;
  f.line = line;
  f.state = Fiber::Blocked;
  switch_to_scheduler(f, false);
  f.op = Op::None;
  return f.result;
}

void run_kernel(const dim3& grid, const dim3& block, size_t shmem, cudaStream_t stream, std::function<void()> body) {
  const uint64_t nthreads = uint64_t(block.x) * block.y * block.z;
  if (nthreads == 0 || nthreads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u ||
      grid.y > 65535 || grid.z > 65535 || shmem > 48 * 1024) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  if (g) fail("nested kernel launch");
  Kernel k;
  k.grid = grid;
  k.block = block;
  k.body = std::move(body);
  const char* order = std::getenv("ISG_EMU_ORDER");
  const char* sched = std::getenv("ISG_EMU_SCHED");
  const char* split = std::getenv("ISG_EMU_SPLIT");
  const char* seed = std::getenv("ISG_EMU_SEED");
  k.order = !order ? 0 : std::string(order) == "reverse" ? 1 : std::string(order) == "random" ? 2 : 0;
  k.warp_sched = !(sched && std::string(sched) == "block");
  k.split = split && std::string(split) == "1";
  k.rng.seed(seed ? unsigned(std::atoi(seed)) : 12345u);
  k.fibers.resize(nthreads);
  char* stacks = static_cast<char*>(mmap(nullptr, kStack * nthreads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) fail("mmap of fiber stacks failed");
  for (uint64_t t = 0; t < nthreads; ++t) k.fibers[t].stack = stacks + t * kStack;
  g = &k;
  ++g_stats.launches;
  try {
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          k.block_idx = make_uint3(x, y, z);
          ++g_stats.blocks;
          g_stats.threads += nthreads;
          run_block(int(nthreads));
        }
  } catch (...) {
    g = nullptr;
    munmap(stacks, kStack * nthreads);
    throw;
  }
  g = nullptr;
  munmap(stacks, kStack * nthreads);
}

}  // namespace isg_emu

// ---------------------------------------------------------------------------- runtime API subset
extern "C" {
cudaError_t cudaGetLastError(void) {
  cudaError_t e = isg_emu::g_last_error;
  isg_emu::g_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return isg_emu::g_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error (emulated)";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument (emulated)";
    default: return "emulated CUDA error";
  }
}
cudaError_t cudaGetDeviceCount(int* count) { *count = 1; return cudaSuccess; }
cudaError_t cudaRuntimeGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaDriverGetVersion(int* v) { *v = 13000; return cudaSuccess; }
cudaError_t cudaMemsetAsync(void* dst, int value, size_t bytes, cudaStream_t) {
  if (bytes && !dst) return cudaErrorInvalidValue;
  std::memset(dst, value, bytes);
  return cudaSuccess;
}
}
