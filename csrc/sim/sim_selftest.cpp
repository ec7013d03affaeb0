// Faulty kernels the simulator must catch, and correct twins it must pass (tests/test_cuda_sim.py): without
// them a simulator that hid races or deadlocks would make every kernel test pass.  Bound as
// deberta_fast_cuda_sim.sim_selftest(name) -> (error text or "", output values).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "dfa_sim.h"

namespace dfa {
namespace {

constexpr int kN = 128;

// out[t] = value thread (t + 32) % n wrote to shared memory: needs the barrier between write and read.
template <bool BARRIER>
__global__ void neighbour_kernel(float* out) {
  DFA_DYNAMIC_SMEM(smem_raw);
  float* s = reinterpret_cast<float*>(smem_raw);
  const int t = threadIdx.x;
  s[t] = float(t);
  if (BARRIER) __syncthreads();
  out[t] = s[(t + 32) % kN];
}

// a shuffle reached by half of a warp
__global__ void divergent_shuffle_kernel(float* out) {
  const int t = threadIdx.x;
  float v = float(t);
  if ((t & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[t] = v;
}

// a warp barrier reached by half of a warp
__global__ void divergent_syncwarp_kernel(float* out) {
  const int t = threadIdx.x;
  if ((t & 31) >= 16) __syncwarp();
  out[t] = 1.f;
}

// a barrier after some threads returned
__global__ void barrier_after_exit_kernel(float* out) {
  const int t = threadIdx.x;
  if (t == 5) return;
  __syncthreads();
  out[t] = 1.f;
}

// a quad sum through shuffles, an indexed shuffle, votes and one m16n8k16 product of known matrices:
// A[r][k] = r + k / 16, B[k][n] = k - n
__global__ void collectives_kernel(float* out) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
  float x = float(lane);
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  x += __shfl_xor_sync(0xffffffffu, x, 2);
  __syncwarp();
  const float y = __shfl_sync(0xffffffffu, float(10 * lane), (7 * lane) % 32)  // lane (7 lane) % 32's value
                  + 1000.f * __any_sync(0xffffffffu, lane == 29) + 2000.f * __any_sync(0xffffffffu, 0);
  auto pack = [](float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, 4);
    return u;
  };
  auto A = [](int r, int k) { return float(r) + float(k) / 16.f; };
  auto B = [](int k, int n) { return float(k - n); };
  uint32_t a[4] = {pack(A(g, 2 * t), A(g, 2 * t + 1)), pack(A(g + 8, 2 * t), A(g + 8, 2 * t + 1)),
                         pack(A(g, 2 * t + 8), A(g, 2 * t + 9)), pack(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9))};
  const uint32_t b[2] = {pack(B(2 * t, g), B(2 * t + 1, g)), pack(B(2 * t + 8, g), B(2 * t + 9, g))};
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  dfa_sim::mma16816<false>(c, a, b);
  // lane's D elements: (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
  out[lane * 6] = x;
  for (int e = 0; e < 4; ++e) out[lane * 6 + 1 + e] = c[e];
  out[lane * 6 + 5] = y;
}

// ldmatrix.x4 (TRANS or not) of four 8x8 matrices: matrix m's row r starts at shared element (8m + r) * 16 and holds
// the values 1000m + 10r + c; out[(32 * trans + lane) * 8 + 2m + {0, 1}] = lane's pair from matrix m.
template <bool MISALIGNED>
__global__ void ldmatrix_kernel(float* out) {
  DFA_DYNAMIC_SMEM(smem_raw);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem_raw);
  const int lane = threadIdx.x;
  for (int e = lane; e < 32 * 16; e += 32) s[e] = uint16_t(1000 * (e / 128) + 10 * ((e / 16) % 8) + e % 16);
  __syncthreads();
  uint32_t r[4];
  const void* row = s + lane * 16 + (MISALIGNED ? 1 : 0);  // lane 8m + k: row k of matrix m
  for (int trans = 0; trans < 2; ++trans) {
    if (trans) dfa_sim::ldmatrix_x4<true>(r, row);
    else dfa_sim::ldmatrix_x4<false>(r, row);
    for (int m = 0; m < 4; ++m) {
      out[(32 * trans + lane) * 8 + 2 * m] = float(r[m] & 0xffffu);
      out[(32 * trans + lane) * 8 + 2 * m + 1] = float(r[m] >> 16);
    }
  }
}

// wgmma m64n32k16 (fp16) of known matrices A[m][k] = m / 8 + k / 16, B[k][n] = (k - n) / 8 through the canonical
// no-swizzle layouts (PTX ISA): A K-major (LBO 128, SBO 256: 8 row groups of 2 core matrices), B K-major (n rows of k;
// LBO 128, SBO 256) and MN-major (k rows of n; LBO 512 (next 8 k), SBO 128 (next 8 n)).  out[t * 32 + i]: thread t's
// accumulator i of A.B with A from shared memory and B K-major; out[t * 32 + 16 + i]: with A from registers (mma.sync
// A fragments) and B MN-major.  READ_EARLY: reads the accumulators before the wait (NaN); NO_WAIT: never waits;
// SMEM_RACE: thread 0 rewrites an element of B (MN-major) between the issue and the wait (across a barrier);
// REG_RACE: each thread rewrites its A registers before the wait.
template <bool READ_EARLY, bool NO_WAIT, bool SMEM_RACE = false, bool REG_RACE = false>
__global__ void wgmma_kernel(float* out) {
  DFA_DYNAMIC_SMEM(smem_raw);
  uint16_t* s = reinterpret_cast<uint16_t*>(smem_raw);
  const int tid = threadIdx.x, lane = tid & 31, g = lane >> 2, t = lane & 3, w = tid >> 5;
  auto A = [](int m, int k) { return float(m) / 8.f + float(k) / 16.f; };
  auto B = [](int k, int n) { return float(k - n) / 8.f; };
  auto h = [](float x) {
    const __half v = __float2half_rn(x);
    uint16_t u;
    memcpy(&u, &v, 2);
    return u;
  };
  uint16_t* sa = s;          // 64 x 16: 2048 bytes
  uint16_t* sb = s + 1024;   // 32 rows (n) x 16 (k): 1024 bytes
  uint16_t* sbt = s + 1536;  // 16 rows (k) x 32 (n): 1024 bytes
  for (int e = tid; e < 64 * 16; e += 128) {
    const int m = e / 16, k = e % 16;
    sa[((m % 8) * 16 + (m / 8) * 256 + (k % 8) * 2 + (k / 8) * 128) / 2] = h(A(m, k));
  }
  for (int e = tid; e < 32 * 16; e += 128) {
    const int n = e / 16, k = e % 16;
    sb[((n % 8) * 16 + (n / 8) * 256 + (k % 8) * 2 + (k / 8) * 128) / 2] = h(B(k, n));
    sbt[((k % 8) * 16 + (n % 8) * 2 + (n / 8) * 128 + (k / 8) * 512) / 2] = h(B(k, n));
  }
  __syncthreads();
  auto desc = [&](const void* p, uint32_t lbo, uint32_t sbo) {
    return uint64_t(dfa_sim::smem_offset(p) >> 4) | (uint64_t(lbo >> 4) << 16) | (uint64_t(sbo >> 4) << 32);
  };
  auto pack = [&](float lo, float hi) { return uint32_t(h(lo)) | (uint32_t(h(hi)) << 16); };
  const int r = 16 * w + g;
  uint32_t a[4] = {pack(A(r, 2 * t), A(r, 2 * t + 1)), pack(A(r + 8, 2 * t), A(r + 8, 2 * t + 1)),
                         pack(A(r, 2 * t + 8), A(r, 2 * t + 9)), pack(A(r + 8, 2 * t + 8), A(r + 8, 2 * t + 9))};
  float d1[16], d2[16];
  for (int i = 0; i < 16; ++i) d1[i] = d2[i] = 7.f;  // overwritten (scale-d 0)
  dfa_sim::wgmma(d1, 32, nullptr, desc(sa, 128, 256), desc(sb, 128, 256), false, false, false);
  dfa_sim::wgmma(d2, 32, a, 0u, desc(sbt, 512, 128), true, false, false);
  dfa_sim::wgmma_commit();
  if (READ_EARLY) out[tid * 32] = d1[0];
  if (NO_WAIT) return;
  if (SMEM_RACE) {
    __syncthreads();
    if (tid == 0) sbt[5] ^= 0x0400u;  // an exponent bit of B(0, 5)
    __syncthreads();
  }
  if (REG_RACE) a[0] ^= 1u;
  dfa_sim::wgmma_wait(0);
  for (int i = 0; i < 16; ++i) {
    if (!READ_EARLY || i > 0) out[tid * 32 + i] = d1[i];
    out[tid * 32 + 16 + i] = d2[i];
  }
}

std::pair<std::string, std::vector<float>> run(const std::string& name) {
  std::vector<float> out(kN * 5, -1.f);
  float* o = out.data();
  cudaStream_t s = nullptr;
  if (name == "neighbour" || name == "neighbour_no_barrier") {
    if (name == "neighbour") DFA_LAUNCH(neighbour_kernel<true>, 1, kN, kN * sizeof(float), s, o);
    else DFA_LAUNCH(neighbour_kernel<false>, 1, kN, kN * sizeof(float), s, o);
  } else if (name == "divergent_shuffle") {
    DFA_LAUNCH(divergent_shuffle_kernel, 1, kN, 0, s, o);
  } else if (name == "divergent_syncwarp") {
    DFA_LAUNCH(divergent_syncwarp_kernel, 1, kN, 0, s, o);
  } else if (name == "barrier_after_exit") {
    DFA_LAUNCH(barrier_after_exit_kernel, 1, kN, 0, s, o);
  } else if (name == "smem_over_default") {  // 64 KB without cudaFuncSetAttribute
    DFA_LAUNCH(neighbour_kernel<true>, 1, kN, 64 * 1024, s, o);
  } else if (name == "smem_over_optin") {
    return {cudaGetErrorString(cudaFuncSetAttribute(neighbour_kernel<true>,
                                                    cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024)),
            {}};
  } else if (name == "grid_y_over_limit") {
    DFA_LAUNCH(neighbour_kernel<true>, dim3(1, 65536), kN, kN * sizeof(float), s, o);
  } else if (name == "ldmatrix") {
    out.assign(2 * 32 * 8, -1.f);
    o = out.data();
    DFA_LAUNCH(ldmatrix_kernel<false>, 1, 32, 32 * 16 * sizeof(uint16_t), s, o);
  } else if (name == "ldmatrix_misaligned") {
    DFA_LAUNCH(ldmatrix_kernel<true>, 1, 32, 32 * 16 * sizeof(uint16_t), s, o);
  } else if (name.rfind("wgmma", 0) == 0) {
    out.assign(128 * 32, -1.f);
    o = out.data();
    if (name == "wgmma") DFA_LAUNCH((wgmma_kernel<false, false>), 1, 128, 4096, s, o);
    else if (name == "wgmma_read_early") DFA_LAUNCH((wgmma_kernel<true, false>), 1, 128, 4096, s, o);
    else if (name == "wgmma_no_wait") DFA_LAUNCH((wgmma_kernel<false, true>), 1, 128, 4096, s, o);
    else if (name == "wgmma_smem_race") DFA_LAUNCH((wgmma_kernel<false, false, true, false>), 1, 128, 4096, s, o);
    else if (name == "wgmma_reg_race") DFA_LAUNCH((wgmma_kernel<false, false, false, true>), 1, 128, 4096, s, o);
    else return {"unknown self-test " + name, {}};
  } else if (name == "collectives") {
    DFA_LAUNCH(collectives_kernel, 1, 32, 0, s, o);
    out.resize(32 * 6);
  } else {
    return {"unknown self-test " + name, {}};
  }
  const cudaError_t err = cudaGetLastError();
  return {err == cudaSuccess ? std::string() : std::string(cudaGetErrorString(err)), out};
}

}  // namespace

void bind_sim_selftest(pybind11::module_& m) {
  m.def("sim_selftest", &run, "run a simulator self-test kernel -> (error text or '', output values)");
  m.def("sim_dry_run", &dfa_sim::set_dry_run,
        "launches check their configuration and run no block (host-path timing); returns the previous setting",
        pybind11::arg("on"));
}

}  // namespace dfa
