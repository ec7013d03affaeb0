// CPU simulator of the CUDA kernels (-DDFA_CPU_SIM): the very sources of csrc/*.cu compiled by the host
// C++ compiler and run on CPU tensors, a CUDA block as 1 OS thread of cooperative fibers (one per CUDA
// thread).  A correctness tool like TRITON_INTERPRET=1, not a timing target (see csrc/sim/README.md).
//
// What it models:
//   * __syncthreads: every thread of the block must arrive (an exited thread never does: the block is
//     reported as deadlocked, which on a GPU is undefined behaviour);
//   * warp collectives (__shfl_xor_sync, mma.sync m16n8k16): the 32 lanes meet, the last to arrive
//     computes every lane's result; lanes that call different collectives, a partial mask or an exited
//     lane are reported;
//   * warp-greedy scheduling: a warp runs as far as it can (to a barrier or its end) before the next one starts,
//     warps in ascending order on even blocks, descending on odd ones: a missing __syncthreads shows up as stale or
//     uninitialised shared memory, which the launch fills with 0xFF bytes (NaN in fp16 / bf16 / fp32) per block;
//   * ldmatrix: its row addresses must be 16-byte aligned and inside the block's dynamic shared memory;
//   * cp.async: the destination is NaN from issue until the issuing thread's covering wait_group (cp_async_16);
//   * launch limits of an sm_80 device: block <= 1024 threads, grid.y / grid.z <= 65535, dynamic shared
//     memory <= 48 KB unless cudaFuncSetAttribute raised it, and <= 163 KB (A100's opt-in maximum).
// Not modelled: timing, memory-model races between warps inside one barrier interval, L1 / texture paths.
#pragma once

#include <cuda_bf16.h>  // host implementations of the fp16 / bf16 conversions (CUDA toolkit headers)
#include <cuda_fp16.h>
#include <driver_types.h>  // cudaError_t, cudaStream_t, cudaFuncAttribute
#include <stdint.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstddef>
#include <functional>

#undef __shared__
#define __shared__ static  // a block's threads share it (blocks run one after another)
#define __launch_bounds__(...)
#define DFA_DYNAMIC_SMEM(name) unsigned char* name = ::dfa_sim::dynamic_smem()
#define DFA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (void)::dfa_sim::launch(dim3(grid), dim3(block), (size_t)(smem), (stream), ::dfa_sim::kernel_id(kernel), \
                          [&] { kernel(__VA_ARGS__); })

namespace dfa_sim {

constexpr size_t kSmemDefault = 48 * 1024;   // without cudaFuncSetAttribute
constexpr size_t kSmemOptin = 166912;        // sm_80 (A100) maximum dynamic shared memory per block
constexpr size_t kLaneBytes = 64;            // payload of one lane in a warp collective

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
unsigned char* dynamic_smem();
void syncthreads();
[[noreturn]] void trap(const char* why);

// One warp collective: every lane of the calling warp deposits `in` (in_bytes <= kLaneBytes); the last lane
// to arrive runs fn(in[32], out[32]); each lane then copies out[its lane] to `out`.  `fn` also identifies the
// collective: lanes meeting in different ones are reported.
using CollectiveFn = void (*)(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]);
void warp_collective(unsigned mask, const void* in, size_t in_bytes, void* out, size_t out_bytes, CollectiveFn fn);

template <typename... A>
const void* kernel_id(void (*kernel)(A...)) {
  return reinterpret_cast<const void*>(kernel);
}
cudaError_t set_max_dynamic_smem(const void* kernel, int bytes);
cudaError_t launch(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, const void* kernel,
                   const std::function<void()>& body);
cudaError_t last_error();  // and clears it
// Dry run (host-path timing, benchmarks/bench_host.py): launch() checks its configuration as always and then returns
// without running a block.  Returns the previous setting.
bool set_dry_run(bool on);
const char* error_string(cudaError_t err);

// --- collectives
template <typename V>
struct ShflIn {
  V v;
  int lane_mask;
};
inline void nothing_all(const unsigned char (*)[kLaneBytes], unsigned char (*)[kLaneBytes]) {}
inline void any_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  int any = 0;
  for (int l = 0; l < 32; ++l) any |= *reinterpret_cast<const int*>(in[l]);
  for (int l = 0; l < 32; ++l) *reinterpret_cast<int*>(out[l]) = any;
}
template <typename V>
void shfl_idx_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  for (int l = 0; l < 32; ++l) {
    const int src = reinterpret_cast<const ShflIn<V>*>(in[l])->lane_mask & 31;  // the source lane
    *reinterpret_cast<V*>(out[l]) = reinterpret_cast<const ShflIn<V>*>(in[src])->v;
  }
}
template <typename V>
void shfl_xor_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  for (int l = 0; l < 32; ++l) {
    const auto* x = reinterpret_cast<const ShflIn<V>*>(in[l]);
    const int src = (l ^ x->lane_mask) & 31;
    *reinterpret_cast<V*>(out[l]) = reinterpret_cast<const ShflIn<V>*>(in[src])->v;
  }
}

// fp16 / bf16 bits -> float (exact)
inline float bits_to_float(uint16_t h, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(h) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
  const uint32_t s = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float mag;
  if (e == 0) mag = std::ldexp(float(m), -24);
  else if (e == 31) mag = m ? NAN : INFINITY;
  else mag = std::ldexp(float(m | 1024), int(e) - 25);
  return s ? -mag : mag;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragments as in the PTX ISA (dfa_common.cuh);
// float64 sum of the exact products, rounded once (the hardware's order of fp32 additions is unspecified).
struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};
template <bool BF16>
void mma16816_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  float A[16][16], B[16][8];
  double C[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto* x = reinterpret_cast<const MmaIn*>(in[l]);
    const int g = l >> 2, t = l & 3;
    auto lo = [](uint32_t w) { return bits_to_float(uint16_t(w & 0xffffu), BF16); };
    auto hi = [](uint32_t w) { return bits_to_float(uint16_t(w >> 16), BF16); };
    A[g][2 * t] = lo(x->a[0]);     A[g][2 * t + 1] = hi(x->a[0]);
    A[g + 8][2 * t] = lo(x->a[1]); A[g + 8][2 * t + 1] = hi(x->a[1]);
    A[g][2 * t + 8] = lo(x->a[2]); A[g][2 * t + 9] = hi(x->a[2]);
    A[g + 8][2 * t + 8] = lo(x->a[3]); A[g + 8][2 * t + 9] = hi(x->a[3]);
    B[2 * t][g] = lo(x->b[0]);     B[2 * t + 1][g] = hi(x->b[0]);
    B[2 * t + 8][g] = lo(x->b[1]); B[2 * t + 9][g] = hi(x->b[1]);
    C[g][2 * t] = x->c[0];     C[g][2 * t + 1] = x->c[1];
    C[g + 8][2 * t] = x->c[2]; C[g + 8][2 * t + 1] = x->c[3];
  }
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 8; ++n)
      for (int k = 0; k < 16; ++k) C[r][n] += double(A[r][k]) * double(B[k][n]);
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    float* d = reinterpret_cast<float*>(out[l]);
    d[0] = float(C[g][2 * t]);
    d[1] = float(C[g][2 * t + 1]);
    d[2] = float(C[g + 8][2 * t]);
    d[3] = float(C[g + 8][2 * t + 1]);
  }
}

template <bool BF16>
inline void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]) {
  MmaIn x{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  warp_collective(0xffffffffu, &x, sizeof(x), c, 4 * sizeof(float), &mma16816_all<BF16>);
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8m..8m+7 give the row addresses of 8x8 matrix m (16-byte
// aligned, inside the block's shared memory: checked); lane l gets, per matrix, the 32-bit pair (row l/4, columns
// 2(l%4), 2(l%4)+1), of the transposed matrix with .trans (PTX ISA, "warp-level matrix load instruction: ldmatrix").
void check_smem(const void* ptr, size_t bytes, const char* what);
template <bool TRANS>
void ldmatrix_x4_all(const unsigned char (*in)[kLaneBytes], unsigned char (*out)[kLaneBytes]) {
  const uint16_t* row[32];
  for (int l = 0; l < 32; ++l) {
    __builtin_memcpy(&row[l], in[l], sizeof(row[l]));
    check_smem(row[l], 16, "ldmatrix row address");
  }
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = reinterpret_cast<uint32_t*>(out[l]);
    const int g = l >> 2, c = 2 * (l & 3);
    for (int m = 0; m < 4; ++m) {
      uint16_t lo, hi;
      if (TRANS) {
        lo = row[8 * m + c][g];
        hi = row[8 * m + c + 1][g];
      } else {
        lo = row[8 * m + g][c];
        hi = row[8 * m + g][c + 1];
      }
      r[m] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
  }
}
template <bool TRANS>
inline void ldmatrix_x4(uint32_t r[4], const void* row_address) {
  warp_collective(0xffffffffu, &row_address, sizeof(row_address), r, 4 * sizeof(uint32_t), &ldmatrix_x4_all<TRANS>);
}

// cp.async.cg.shared.global (16 bytes, the rest of the 16 zero-filled after src_bytes) / commit_group /
// wait_group N.  At issue the destination turns to 0xFF bytes (NaN), and the copy lands only when a wait_group of
// the issuing thread covers its group: a read before that (a missing wait, a missing barrier after another thread's
// wait, or a stage refilled while another warp still reads it) sees NaN.  A thread that exits with copies not
// waited for is reported.
void cp_async_16(void* dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int newest_pending);

// wgmma.mma_async (m64nNk16, f16 / bf16 in, f32 accumulate; csrc/dfa_wgmma.cuh), run per warp: warp w of the
// warpgroup computes its 16 rows of D (w = warp % 4).  A from this warp's m16n8k16 A fragments (`a`, RS) or a
// descriptor (`a` nullptr, SS: K-major); B from a descriptor, K-major or MN-major (`trans_b`).  Descriptors: no
// swizzle and base offset 0 (else a fault), start address = the byte offset in the block's dynamic shared memory
// (smem_offset), LBO / SBO as the PTX ISA's canonical no-swizzle layouts; every row read is bounds-checked.  The
// result (float64 sums of exact products, rounded once) lands in `d` at the wait_group that covers its commit_group;
// until then `d` holds NaN, and a later wgmma on the same `d` continues from the pending value (in-order
// accumulation, as the hardware chains them).  The hardware reads the operands asynchronously, any time before that
// wait: the shared memory a wgmma read (checked by the warp's first lane to wait) and the thread's A registers must
// be unchanged there, or it is reported.  A thread that exits with wgmma results not waited for is reported.
uint32_t smem_offset(const void* p);
void wgmma(float* d, int n, const uint32_t* a, uint64_t desc_a, uint64_t desc_b, bool trans_b, bool accumulate,
           bool bf16);
void wgmma_commit();
void wgmma_wait(int newest_pending);

}  // namespace dfa_sim

// --- the CUDA built-ins the kernels use
#define threadIdx (::dfa_sim::thread_idx())
#define blockIdx (::dfa_sim::block_idx())
#define blockDim (::dfa_sim::block_dim())
#define gridDim (::dfa_sim::grid_dim())

inline void __syncthreads() { ::dfa_sim::syncthreads(); }
[[noreturn]] inline void __trap() { ::dfa_sim::trap("__trap()"); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask) {
  static_assert(sizeof(::dfa_sim::ShflIn<V>) <= ::dfa_sim::kLaneBytes, "shuffle payload too large");
  ::dfa_sim::ShflIn<V> x{v, lane_mask};
  V r;
  ::dfa_sim::warp_collective(mask, &x, sizeof(x), &r, sizeof(r), &::dfa_sim::shfl_xor_all<V>);
  return r;
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src_lane) {
  static_assert(sizeof(::dfa_sim::ShflIn<V>) <= ::dfa_sim::kLaneBytes, "shuffle payload too large");
  ::dfa_sim::ShflIn<V> x{v, src_lane};
  V r;
  ::dfa_sim::warp_collective(mask, &x, sizeof(x), &r, sizeof(r), &::dfa_sim::shfl_idx_all<V>);
  return r;
}
inline int __any_sync(unsigned mask, int predicate) {
  int p = predicate != 0, r;
  ::dfa_sim::warp_collective(mask, &p, sizeof(p), &r, sizeof(r), &::dfa_sim::any_all);
  return r;
}
// A warp barrier: every lane must reach it (checked like any collective); memory is shared at once here.
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  char none = 0;
  ::dfa_sim::warp_collective(mask, &none, 1, &none, 1, &::dfa_sim::nothing_all);
}
template <typename V>
inline V __ldg(const V* p) { return *p; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((uint64_t(a) * b) >> 32); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  return ::dfa_sim::set_max_dynamic_smem(::dfa_sim::kernel_id(kernel), value);
}
inline cudaError_t cudaGetLastError() { return ::dfa_sim::last_error(); }
inline const char* cudaGetErrorString(cudaError_t err) { return ::dfa_sim::error_string(err); }
