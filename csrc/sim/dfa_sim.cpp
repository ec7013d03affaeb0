// Fiber scheduler of the CPU simulator (dfa_sim.h): one block at a time, its CUDA threads as ucontext
// fibers on the calling OS thread, each run until it blocks at a barrier or a warp collective.
#include "dfa_sim.h"

#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

namespace dfa_sim {
namespace {

constexpr size_t kStack = 256 * 1024;  // per fiber (kernels keep their register tiles on it)
constexpr int kMaxThreads = 1024;

enum class St { Ready, Barrier, Warp, Done };

struct Copy {
  void* dst;
  const void* src;
  int src_bytes;
};

// What a warp's wgmma read: its descriptors and the shared-memory operands as they were at issue.  Checked again at
// the covering wait_group (by the first lane to wait): the hardware reads them asynchronously, any time before.
struct WgRead {
  uint64_t desc_a, desc_b;
  int wi, n;
  bool has_a, trans_b, bf16;
  bool checked = false;
  float A[16][16], B[16][128];
};

struct Result {  // a wgmma's result for one thread: lands in d[0, n) at the covering wait_group
  float* d;
  int n;
  float v[64];
  std::shared_ptr<WgRead> read;  // the warp's shared-memory operands
  const uint32_t* a_src;         // this thread's A registers (nullptr: A from shared memory), as read at issue
  uint32_t a[4];
};

struct Fiber {
  ucontext_t ctx;
  uint3 tid;
  St st = St::Ready;
  std::vector<Copy> open;                 // cp.async issued since the last commit_group
  std::vector<std::vector<Copy>> groups;  // committed, not yet waited for (oldest first)
  std::vector<Result> wg_open;                 // wgmma issued since the last wgmma commit_group
  std::vector<std::vector<Result>> wg_groups;  // committed, not yet waited for (oldest first)
};

struct Warp {
  int arrived = 0;
  CollectiveFn fn = nullptr;
  unsigned char in[32][kLaneBytes];
  unsigned char out[32][kLaneBytes];
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<std::unique_ptr<char[]>> stacks;
  ucontext_t sched;
  int cur = -1, n = 0, at_barrier = 0, done = 0;
  uint3 bidx;
  dim3 bdim, gdim;
  std::vector<unsigned char> smem;
  const std::function<void()>* body = nullptr;
  std::string error;  // first fault of this block
};

std::mutex g_mutex;            // one launch at a time (the scheduler state is global)
Block g_block;
std::map<const void*, int> g_max_smem;  // cudaFuncSetAttribute(MaxDynamicSharedMemorySize)
cudaError_t g_last = cudaSuccess;
bool g_dry = false;
std::string g_message;

Fiber& me() { return g_block.fibers[g_block.cur]; }

void yield() { swapcontext(&me().ctx, &g_block.sched); }

// Record the first fault and stop this fiber for good (the launch reports it).
[[noreturn]] void fault(const std::string& why) {
  if (g_block.error.empty()) g_block.error = why;
  me().st = St::Done;
  swapcontext(&me().ctx, &g_block.sched);
  std::abort();  // never resumed
}

std::string where() {
  const Fiber& f = me();
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread (%u,%u,%u)", g_block.bidx.x, g_block.bidx.y,
                g_block.bidx.z, f.tid.x, f.tid.y, f.tid.z);
  return buf;
}

void fiber_main(int idx) {
  (void)idx;
  (*g_block.body)();
  if (!me().open.empty() || !me().groups.empty())
    fault("thread exits with cp.async copies never waited for in " + where());
  if (!me().wg_open.empty() || !me().wg_groups.empty())
    fault("thread exits with wgmma results never waited for in " + where());
  me().st = St::Done;
  ++g_block.done;
  // uc_link returns to the scheduler
}


// Runs one block to completion; false with g_block.error set on a fault or deadlock.
bool run_block() {
  Block& b = g_block;
  b.at_barrier = b.done = 0;
  for (auto& w : b.warps) {
    w.arrived = 0;
    w.fn = nullptr;
  }
  std::memset(b.smem.data(), 0xFF, b.smem.size());  // NaN in every float format: stale reads show
  for (int i = 0; i < b.n; ++i) {
    Fiber& f = b.fibers[i];
    f.st = St::Ready;
    f.open.clear();
    f.groups.clear();
    f.wg_open.clear();
    f.wg_groups.clear();
    f.tid = make_uint3(i % b.bdim.x, (i / b.bdim.x) % b.bdim.y, i / (b.bdim.x * b.bdim.y));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = b.stacks[i].get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &b.sched;
    makecontext(&f.ctx, reinterpret_cast<void (*)()>(fiber_main), 1, i);
  }
  // Warp-greedy: each warp runs as far as it can (to a barrier or its end) before the next one starts, in ascending
  // warp order on even blocks and descending on odd ones, so either side of a missing barrier runs ahead.
  const int nwarps = (b.n + 31) / 32;
  const bool descending = (b.bidx.x + b.bidx.y + b.bidx.z) % 2 == 1;
  for (;;) {
    bool progressed = false;
    for (int k = 0; k < nwarps; ++k) {
      const int w = descending ? nwarps - 1 - k : k;
      for (bool again = true; again;) {
        again = false;
        for (int i = 32 * w; i < std::min(b.n, 32 * w + 32); ++i) {
          if (b.fibers[i].st != St::Ready) continue;
          b.cur = i;
          swapcontext(&b.sched, &b.fibers[i].ctx);
          progressed = again = true;
          if (!b.error.empty()) return false;
        }
      }
    }
    if (b.done == b.n) return true;
    if (!progressed) {
      int bar = 0, warp = 0;
      for (const auto& f : b.fibers) {
        bar += f.st == St::Barrier;
        warp += f.st == St::Warp;
      }
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "deadlock in block (%u,%u,%u): %d threads wait at __syncthreads, %d at a warp collective, "
                    "%d exited (a barrier or collective not reached by every thread)",
                    b.bidx.x, b.bidx.y, b.bidx.z, bar, warp, b.done);
      b.error = buf;
      return false;
    }
  }
}

}  // namespace

const uint3& thread_idx() { return me().tid; }
const uint3& block_idx() { return g_block.bidx; }
const dim3& block_dim() { return g_block.bdim; }
const dim3& grid_dim() { return g_block.gdim; }
unsigned char* dynamic_smem() { return g_block.smem.data(); }

void trap(const char* why) { fault(std::string(why) + " in " + where()); }

void check_smem(const void* ptr, size_t bytes, const char* what) {
  const auto* c = static_cast<const unsigned char*>(ptr);
  const unsigned char* base = g_block.smem.data();
  if (c < base || c + bytes > base + g_block.smem.size() || reinterpret_cast<uintptr_t>(c) % 16 != 0) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "%s at shared offset %td (%zu bytes) outside the %zu bytes of dynamic shared memory "
                  "or not 16-byte aligned in ", what, c - base, bytes, g_block.smem.size());
    fault(buf + where());
  }
}

void cp_async_16(void* dst, const void* src, int src_bytes) {
  check_smem(dst, 16, "cp.async destination");
  if (src_bytes < 0 || src_bytes > 16) fault("cp.async src-size outside [0, 16] in " + where());
  if (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % 16 != 0)
    fault("cp.async source not 16-byte aligned in " + where());
  std::memset(dst, 0xFF, 16);  // in flight: neither the old nor the new bytes (NaN) until the covering wait
  me().open.push_back({dst, src, src_bytes});
}

void cp_async_commit() {
  Fiber& f = me();
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

void cp_async_wait(int newest_pending) {
  Fiber& f = me();
  while (int(f.groups.size()) > newest_pending) {
    for (const Copy& c : f.groups.front()) {
      std::memset(c.dst, 0, 16);
      if (c.src_bytes > 0) std::memcpy(c.dst, c.src, size_t(c.src_bytes));
    }
    f.groups.erase(f.groups.begin());
  }
}

uint32_t smem_offset(const void* p) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* base = g_block.smem.data();
  if (c < base || c > base + g_block.smem.size()) fault("smem_offset of a pointer outside shared memory in " + where());
  return uint32_t(c - base);
}

namespace {

struct WgIn {
  float* d;
  const uint32_t* a_src;
  uint32_t a[4];
  uint64_t desc_a, desc_b;
  int n;
  uint8_t has_a, trans_b, accumulate, bf16;
};
static_assert(sizeof(WgIn) <= kLaneBytes, "wgmma payload");

// The 16-bit element at (row, col) of a no-swizzle canonical operand: `k_major`: rows (M / N) of 16-byte core-matrix
// rows along K; else (MN-major) rows of K, 16 bytes along M / N.  (mn, k) are the operand's coordinates.
float operand(uint64_t desc, int mn, int k, bool k_major, bool bf16) {
  if ((desc >> 62) != 0 || ((desc >> 49) & 7) != 0)
    fault("wgmma descriptor with a swizzle or base offset in " + where());
  const size_t start = size_t(desc & 0x3FFF) << 4, lbo = size_t((desc >> 16) & 0x3FFF) << 4,
               sbo = size_t((desc >> 32) & 0x3FFF) << 4;
  const size_t at = k_major ? start + (mn % 8) * 16 + (mn / 8) * sbo + (k % 8) * 2 + (k / 8) * lbo
                            : start + (k % 8) * 16 + (mn % 8) * 2 + (mn / 8) * sbo + (k / 8) * lbo;
  unsigned char* row = g_block.smem.data() + (at & ~size_t(15));
  check_smem(row, 16, "wgmma operand row");
  uint16_t h;
  std::memcpy(&h, g_block.smem.data() + at, 2);
  return bits_to_float(h, bf16);
}

// The pending result of thread `f` for accumulator d (nullptr: none); a pending one overlapping d otherwise faults.
const Result* pending(const Fiber& f, const float* d, int n) {
  const Result* hit = nullptr;
  auto scan = [&](const std::vector<Result>& rs) {
    for (const Result& r : rs) {
      if (r.d == d && r.n == n) hit = &r;  // the newest wins (scanned oldest first)
      else if (r.d < d + n && d < r.d + r.n) fault("wgmma accumulators overlapping a pending one in " + where());
    }
  };
  for (const auto& g : f.wg_groups) scan(g);
  scan(f.wg_open);
  return hit;
}

void wgmma_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  (void)out;
  Block& b = g_block;
  const int first = b.cur & ~31, wi = (first >> 5) & 3;  // the warp's place in its warpgroup: rows 16 wi..
  const auto* x0 = reinterpret_cast<const WgIn*>(in[0]);
  const int n = x0->n;
  const bool bf16 = x0->bf16, has_a = x0->has_a, trans_b = x0->trans_b;
  for (int l = 1; l < 32; ++l) {
    const auto* x = reinterpret_cast<const WgIn*>(in[l]);
    if (x->n != n || x->has_a != has_a || x->trans_b != trans_b || x->bf16 != bf16 || x->accumulate != x0->accumulate ||
        x->desc_b != x0->desc_b || (!has_a && x->desc_a != x0->desc_a))
      fault("lanes of one warp in different wgmma instructions in " + where());
  }
  float A[16][16], B[16][128];
  for (int r = 0; r < 16; ++r)
    for (int k = 0; k < 16; ++k) A[r][k] = has_a ? 0.f : operand(x0->desc_a, 16 * wi + r, k, true, bf16);
  if (has_a) {
    for (int l = 0; l < 32; ++l) {
      const uint32_t* a = reinterpret_cast<const WgIn*>(in[l])->a;
      const int g = l >> 2, t = l & 3;
      for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i & 1), k = 2 * t + 8 * (i >> 1);
        A[r][k] = bits_to_float(uint16_t(a[i] & 0xffffu), bf16);
        A[r][k + 1] = bits_to_float(uint16_t(a[i] >> 16), bf16);
      }
    }
  }
  for (int k = 0; k < 16; ++k)
    for (int c = 0; c < n; ++c) B[k][c] = operand(x0->desc_b, c, k, !trans_b, bf16);
  auto read = std::make_shared<WgRead>();
  *read = WgRead{x0->desc_a, x0->desc_b, wi, n, has_a, trans_b, bf16, false, {}, {}};
  std::memcpy(read->A, A, sizeof A);
  std::memcpy(read->B, B, sizeof B);
  for (int l = 0; l < 32; ++l) {
    const auto* x = reinterpret_cast<const WgIn*>(in[l]);
    Fiber& f = b.fibers[first + l];
    const Result* prev = x->accumulate ? pending(f, x->d, n / 2) : nullptr;
    Result res{x->d, n / 2, {}, read, has_a ? x->a_src : nullptr, {x->a[0], x->a[1], x->a[2], x->a[3]}};
    const int g = l >> 2, t = l & 3;
    for (int i = 0; i < n / 2; ++i) {
      const int r = g + 8 * ((i >> 1) & 1), c = 8 * (i >> 2) + 2 * t + (i & 1);
      double acc = !x->accumulate ? 0.0 : prev != nullptr ? double(prev->v[i]) : double(x->d[i]);
      for (int k = 0; k < 16; ++k) acc += double(A[r][k]) * double(B[k][c]);
      res.v[i] = float(acc);
    }
    for (int i = 0; i < n / 2; ++i) x->d[i] = NAN;  // in flight
    f.wg_open.push_back(res);
  }
}

}  // namespace

void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool accumulate,
           bool bf16) {
  if (n != 32 && n != 64 && n != 128) fault("wgmma with n " + std::to_string(n) + " in " + where());
  if (g_block.n % 128 != 0) fault("wgmma in a block that is not whole warpgroups in " + where());
  WgIn x{d, a, {0u, 0u, 0u, 0u}, desc_a, desc_b, n, uint8_t(a != nullptr), uint8_t(trans_b), uint8_t(accumulate),
         uint8_t(bf16)};
  if (a != nullptr) std::memcpy(x.a, a, sizeof(x.a));
  char none = 0;
  warp_collective(0xffffffffu, &x, sizeof(x), &none, 1, &wgmma_all);
}

void wgmma_commit() {
  Fiber& f = me();
  f.wg_groups.push_back(std::move(f.wg_open));
  f.wg_open.clear();
}

// The operands of a wgmma landing now must be what it read at issue: its A registers (this thread's), and its shared
// memory (checked by the warp's first lane to land it; the other warps change shared memory only across a barrier,
// at which every lane of this warp is held alike).
void check_operands(Result& r) {
  if (r.a_src != nullptr && std::memcmp(r.a_src, r.a, sizeof r.a) != 0)
    fault("A registers of a pending wgmma written before its wait_group in " + where());
  WgRead& x = *r.read;
  if (x.checked) return;
  x.checked = true;
  for (int k = 0; k < 16; ++k) {
    for (int m = 0; m < 16 && !x.has_a; ++m) {
      const float v = operand(x.desc_a, 16 * x.wi + m, k, true, x.bf16);
      if (std::memcmp(&v, &x.A[m][k], sizeof v) != 0)
        fault("shared memory read by a pending wgmma (A) changed before its wait_group in " + where());
    }
    for (int c = 0; c < x.n; ++c) {
      const float v = operand(x.desc_b, c, k, !x.trans_b, x.bf16);
      if (std::memcmp(&v, &x.B[k][c], sizeof v) != 0)
        fault("shared memory read by a pending wgmma (B) changed before its wait_group in " + where());
    }
  }
}

void wgmma_wait(int newest_pending) {
  Fiber& f = me();
  while (int(f.wg_groups.size()) > newest_pending) {
    for (Result& r : f.wg_groups.front()) check_operands(r);
    for (const Result& r : f.wg_groups.front()) std::memcpy(r.d, r.v, sizeof(float) * size_t(r.n));
    f.wg_groups.erase(f.wg_groups.begin());
  }
}

void syncthreads() {
  Block& b = g_block;
  if (++b.at_barrier == b.n) {
    b.at_barrier = 0;
    for (auto& f : b.fibers)
      if (f.st == St::Barrier) f.st = St::Ready;
    return;
  }
  me().st = St::Barrier;
  yield();
}

void warp_collective(unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes, CollectiveFn fn) {
  Block& b = g_block;
  const int linear = b.cur, lane = linear & 31;
  if (mask != 0xffffffffu) fault("warp collective with a partial mask in " + where() + " (only full warps modelled)");
  if (b.n % 32 != 0) fault("warp collective in a block of " + std::to_string(b.n) + " threads (not whole warps)");
  if (in_bytes > kLaneBytes || out_bytes > kLaneBytes) fault("warp collective payload too large");
  Warp& w = b.warps[linear >> 5];
  if (w.arrived == 0) w.fn = fn;
  else if (w.fn != fn) fault("lanes of one warp in different collectives (divergent code) at " + where());
  std::memcpy(w.in[lane], in, in_bytes);
  if (++w.arrived == 32) {
    w.fn(w.in, w.out);
    w.arrived = 0;
    for (int l = 0; l < 32; ++l) {
      Fiber& f = b.fibers[(linear & ~31) + l];
      if (f.st == St::Warp) f.st = St::Ready;
    }
  } else {
    me().st = St::Warp;
    yield();
  }
  std::memcpy(out, w.out[lane], out_bytes);
}

cudaError_t set_max_dynamic_smem(const void* kernel, int bytes) {
  std::lock_guard<std::mutex> lock(g_mutex);
  if (bytes < 0 || size_t(bytes) > kSmemOptin) {
    g_message = "cudaFuncSetAttribute: " + std::to_string(bytes) + " bytes of dynamic shared memory exceed the " +
                std::to_string(kSmemOptin) + " of an sm_80 device";
    return cudaErrorInvalidValue;
  }
  g_max_smem[kernel] = bytes;
  return cudaSuccess;
}

cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const void* kernel,
                   const std::function<void()>& body) {
  (void)stream;
  std::lock_guard<std::mutex> lock(g_mutex);
  auto fail = [](cudaError_t e, std::string msg) {
    g_last = e;
    g_message = std::move(msg);
    return e;
  };
  const long n = long(block.x) * block.y * block.z;
  if (n < 1 || n > kMaxThreads || block.z > 64)
    return fail(cudaErrorInvalidConfiguration, "launch: block of " + std::to_string(n) + " threads");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535)
    return fail(cudaErrorInvalidConfiguration, "launch: grid (" + std::to_string(grid.x) + ", " +
                                                   std::to_string(grid.y) + ", " + std::to_string(grid.z) + ")");
  auto it = g_max_smem.find(kernel);
  const size_t cap = it == g_max_smem.end() ? kSmemDefault : size_t(it->second);
  if (smem > cap)
    return fail(cudaErrorInvalidValue, "launch: " + std::to_string(smem) + " bytes of dynamic shared memory, " +
                                           std::to_string(cap) + " allowed for this kernel");
  if (g_dry) return cudaSuccess;
  Block& b = g_block;
  b.n = int(n);
  b.bdim = block;
  b.gdim = grid;
  b.body = &body;
  b.fibers.resize(b.n);
  b.warps.resize((b.n + 31) / 32);
  while (b.stacks.size() < size_t(b.n)) b.stacks.emplace_back(new char[kStack]);
  b.smem.assign(smem, 0);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        b.bidx = make_uint3(x, y, z);
        b.error.clear();
        if (!run_block()) return fail(cudaErrorLaunchFailure, "dfa_sim: " + b.error);
      }
  return cudaSuccess;
}

bool set_dry_run(bool on) {
  std::lock_guard<std::mutex> lock(g_mutex);
  return std::exchange(g_dry, on);
}

cudaError_t last_error() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const cudaError_t e = g_last;
  g_last = cudaSuccess;
  return e;
}

const char* error_string(cudaError_t err) {
  if (err == cudaSuccess) return "no error";
  static thread_local std::string msg;
  msg = g_message.empty() ? "dfa_sim: error " + std::to_string(int(err)) : g_message;
  return msg.c_str();
}

}  // namespace dfa_sim
