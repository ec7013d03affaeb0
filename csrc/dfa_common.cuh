// Shared device code of the fused DeBERTa disentangled-attention kernels.
//
// Layout conventions (all kernels):
//   * 128 threads = 4 warps; a warp owns 16 "rows" of a score tile; the tile is
//     [64 rows x BN cols].  In the forward and dQ kernels rows are queries i and
//     cols are keys j; in the dK/dV kernel rows are keys j and cols are queries i.
//   * Tensor-core MMA: mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (sm_80+).
//     Fragment layout (PTX ISA, g = lane/4, t = lane%4):
//       A 16x16: reg0=(g, 2t..2t+1) reg1=(g+8, 2t..) reg2=(g, 2t+8..) reg3=(g+8, 2t+8..)
//       B 16x8 : reg0=(k=2t..2t+1, n=g) reg1=(k=2t+8.., n=g)
//       C 16x8 : c0,c1=(g, 2t..2t+1)    c2,c3=(g+8, 2t..2t+1)
//     The lower-indexed element of a pair sits in the low 16 bits.
//   * Shared-memory tiles are row-major [rows][D + 8] (16-byte padding per row: the 8 row addresses of an
//     ldmatrix fall in distinct banks); MMA fragments come from ldmatrix(.trans).
//   * Scores are kept in log2 units: s2 = scale*log2(e)*(q.k + c2p + p2c).
//
// Relative terms: every kernel computes them on tensor cores from the pos_key / pos_query rows (dfa_rel.cuh), with
// slot = table[i - j + Lk - 1]; no C2P / P2C table exists.
#pragma once

#ifdef DFA_CPU_SIM
#include "sim/dfa_sim.h"  // the CPU simulator: host compiler, fibers for threads (csrc/sim/README.md)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
// Dynamic shared memory of a kernel, and a kernel launch (the simulator defines its own).
#define DFA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define DFA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

#include <type_traits>

#include "dfa_params.h"
#include "dfa_softmax.h"

namespace dfa {

constexpr int kThreads = 128;  // threads per block of every kernel: 4 warps

// (Params: see dfa_params.h)


// ---------------------------------------------------------------------------
// element-type helpers
template <typename T> struct Pack;
template <> struct Pack<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {  // the pair pack() made
    __half2_raw r;
    memcpy(&r, &u, sizeof(u));
    const __half2 h(r);
    return __half22float2(h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};
template <> struct Pack<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {  // the pair pack() made
    __nv_bfloat162_raw r;
    memcpy(&r, &u, sizeof(u));
    const __nv_bfloat162 h(r);
    return __bfloat1622float2(h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T>
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], const uint32_t b[2]);

template <>
__device__ __forceinline__ void mma16816<__half>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(DFA_CPU_SIM)
  dfa_sim::mma16816<false>(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(DFA_CPU_SIM)
  dfa_sim::mma16816<true>(c, a, b);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  __trap();
#endif
}

// mma.sync.aligned.m16n8k8.row.col.f32.{f16,bf16} (sm_80+): c += A (16x8: a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..))
// * B (8x8: b = (k = 2t..2t+1, n = g)); the k16 fragments' first halves.  The simulator runs it as the k16 MMA with
// zero upper halves (the same sum).
template <typename T>
__device__ __forceinline__ void mma1688(float c[4], const uint32_t a[2], uint32_t b) {
#if defined(DFA_CPU_SIM)
  const uint32_t a4[4] = {a[0], a[1], 0u, 0u}, b2[2] = {b, 0u};
  dfa_sim::mma16816<std::is_same_v<T, __nv_bfloat16>>(c, a4, b2);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __half>)
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b));
  else
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(b));
#else
  (void)c; (void)a; (void)b;
  __trap();
#endif
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (sm_75+): lanes 8m..8m+7 pass the row addresses of 8x8 matrix m
// (16-byte aligned); lane l gets r[m] = the pair (row l/4, columns 2(l%4), 2(l%4)+1) of matrix m, transposed with
// TRANS: exactly the A / B fragments of mma.m16n8k16 for the right four matrices.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* row_address) {
#if defined(DFA_CPU_SIM)
  dfa_sim::ldmatrix_x4<TRANS>(r, row_address);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(row_address));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
#else
  (void)r; (void)row_address;
  __trap();
#endif
}

// cp.async.cg.shared.global of 16 bytes (sm_80+), zero-filled when !valid (src-size 0: nothing is read from src);
// commit_group; wait_group N (all but the newest N committed groups of this thread have landed).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
#if defined(DFA_CPU_SIM)
  dfa_sim::cp_async_16(smem, gmem, valid ? 16 : 0);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(valid ? 16 : 0));
#else
  (void)smem; (void)gmem; (void)valid;
  __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(DFA_CPU_SIM)
  dfa_sim::cp_async_commit();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(DFA_CPU_SIM)
  dfa_sim::cp_async_wait(N);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Shared memory written through the generic proxy (stores, cp.async) made visible to the async proxy that wgmma reads
// it through (dfa_wgmma.cuh); before the barrier that publishes it.  Nothing before sm_90.
__device__ __forceinline__ void fence_proxy_async() {
#if !defined(DFA_CPU_SIM) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Calls f(c) for c = threadIdx.x, threadIdx.x + NTHREADS, ... < N: a static trip count, fully unrolled (no loop
// guard on the thread index, so the static profile counts every call), then the remainder.
template <int N, int NTHREADS, typename F>
__device__ __forceinline__ void for_thread_chunks(F&& f) {
  constexpr int FULL = N / NTHREADS, REM = N % NTHREADS;
#pragma unroll
  for (int it = 0; it < FULL; ++it) f((int)threadIdx.x + it * NTHREADS);
  if (REM != 0 && (int)threadIdx.x < REM) f((int)threadIdx.x + FULL * NTHREADS);
}

// Shared-memory tile layouts (elements of T): off(r, c), c a multiple of 8, addresses a 16-byte chunk (the unit of
// every copy and ldmatrix row address); at(tile, r, c) is its address; elems(rows) is a tile's size.
//   PaddedRows<D>: row-major [rows][D + 8] (ldmatrix's 8 row addresses in distinct banks): the mma.sync kernels'.
//   CoreRows<D>:   8x8 "core matrices" (8 rows x 16 bytes: 128 contiguous bytes), D / 8 + 1 per group of 8 rows (the
//                  last one the 8 padding columns), the groups one after another: the PTX ISA's canonical no-swizzle
//                  layout, which wgmma's descriptors read (dfa_wgmma.cuh).  An ldmatrix of one core matrix reads 128
//                  contiguous bytes (conflict-free).  The same size as PaddedRows.
template <int D>
struct PaddedRows {
  static constexpr int LDS = D + 8;
  static constexpr bool CORE = false;
  __device__ __forceinline__ static constexpr int off(int r, int c) { return r * LDS + c; }
  template <typename P>  // &tile[r][c]: the row, then the column (the mma.sync kernels' address arithmetic)
  __device__ __forceinline__ static P* at(P* tile, int r, int c) { return tile + r * LDS + c; }
  static constexpr int elems(int rows) { return rows * LDS; }
};
template <int D>
struct CoreRows {
  static constexpr int CH = D / 8 + 1;          // 16-byte chunks per row: D / 8 and the padding chunk
  static constexpr int GROUP_BYTES = CH * 128;  // one group of 8 rows
  static constexpr bool CORE = true;
  __device__ __forceinline__ static constexpr int off(int r, int c) {
    return ((r >> 3) * CH + (c >> 3)) * 64 + (r & 7) * 8 + (c & 7);
  }
  template <typename P>
  __device__ __forceinline__ static P* at(P* tile, int r, int c) { return tile + off(r, c); }
  static constexpr int elems(int rows) { return rows * CH * 8; }
};

// Whether a tile's n rows all lie in the nrows rows left: a tile load without per-row predicates (every tile but the
// last).
__device__ __forceinline__ bool rows_in_range(int n, int nrows) {
#ifdef DFA_PROFILE_INTERIOR  // static-profile builds only (benchmarks/static_cuda.py): every tile interior
  (void)n; (void)nrows;
  return true;
#else
  return n <= nrows;
#endif
}

// One 16-byte chunk global -> shared, zeros unless `ok` (ASYNC: cp.async, zero-filled, reading `fallback`, a valid
// address, in place of src; else a load and a store).
template <bool ASYNC, typename T>
__device__ __forceinline__ void copy_chunk(T* dst, const T* src, bool ok, const T* fallback) {
  if constexpr (ASYNC) {
    cp_async_16(dst, ok ? src : fallback, ok);
  } else {
    (void)fallback;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (ok) val = *reinterpret_cast<const uint4*>(src);
    *reinterpret_cast<uint4*>(dst) = val;
  }
}

// Load a [ROWS x D] tile of row-strided global rows into smem (layout L: [ROWS][D + 8] by default): `gt` points at
// the tile's first row, rows r >= nrows are zero-filled (nrows >= 1: gt stays a valid address).  16-byte chunks (rows
// must be 16-byte aligned): plain loads and stores, or with ASYNC cp.async (issued, not committed: the caller commits
// and waits).  A static trip count, one pointer advanced per pass (no per-copy index arithmetic, every copy counted
// by the static profile); a tile whose rows are all in range copies without a predicate or an address select.
template <typename T, int ROWS, int D, int NTHREADS, bool ASYNC = false, typename L = PaddedRows<D>>
__device__ __forceinline__ void load_tile_rows(T* smem, const T* gt, int64_t row_stride, int nrows) {
  constexpr int CPR = D / 8;             // 16-byte chunks per row
  constexpr int RSTEP = NTHREADS / CPR;  // rows per pass of the block
  static_assert(NTHREADS % CPR == 0, "whole rows per pass");
  static_assert(!L::CORE || (NTHREADS == 128 && 16 % CPR == 0), "core matrices: 8 threads fill one");
  // padded: consecutive threads take a row's consecutive chunks; core: 8 consecutive threads fill one core matrix
  // (rows r..r + 7 of one chunk: 128 contiguous bytes, no bank conflict)
  const int tid = (int)threadIdx.x;
  const int r0 = L::CORE ? ((tid >> 3) / CPR) * 8 + (tid & 7) : tid / CPR;
  const int cc = L::CORE ? (tid >> 3) % CPR : tid % CPR;
  const T* src = gt + r0 * row_stride + cc * 8;  // advanced by RSTEP rows per pass
  T* dst = L::at(smem, r0, cc * 8);
  if (rows_in_range(ROWS, nrows)) {  // (block-uniform)
#pragma unroll
    for (int it = 0; it * RSTEP < ROWS; ++it) {
      if (ROWS % RSTEP != 0 && r0 + it * RSTEP >= ROWS) break;
      copy_chunk<ASYNC>(dst + it * L::off(RSTEP, 0), src, true, gt);
      src += RSTEP * row_stride;
    }
    return;
  }
#pragma unroll
  for (int it = 0; it * RSTEP < ROWS; ++it) {
    const int r = r0 + it * RSTEP;
    if (ROWS % RSTEP != 0 && r >= ROWS) break;
    copy_chunk<ASYNC>(dst + it * L::off(RSTEP, 0), src, r < nrows, gt);
    src += RSTEP * row_stride;
  }
}

// Rows [row0, row0 + ROWS) of a [len x D] matrix at g (rows >= len zero-filled; row0 < len).  STATIC (default):
// load_tile_rows; otherwise a strided loop with a guard per copy (fewer live registers: the D = 128 dq kernel spills
// 88 B with the static copies).
template <typename T, int ROWS, int D, int NTHREADS, bool ASYNC = false, bool STATIC = true,
          typename L = PaddedRows<D>>
__device__ __forceinline__ void load_tile(T* smem, const T* g, int64_t row_stride, int row0, int len) {
  if constexpr (STATIC) {
    load_tile_rows<T, ROWS, D, NTHREADS, ASYNC, L>(smem, g + (int64_t)row0 * row_stride, row_stride, len - row0);
  } else {
    constexpr int CPR = D / 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NTHREADS) {
      const int r = c / CPR, cc = c % CPR;
      copy_chunk<ASYNC>(L::at(smem, r, cc * 8), g + (int64_t)(row0 + r) * row_stride + cc * 8, row0 + r < len, g);
    }
  }
}


// The K / V tiles of a loop over keys, through shared memory at `smem`.  STAGES = 2: [K | V] x 2, cp.async of tile
// k0 + BN (issued by acquire) while tile k0 is computed; STAGES = 1: one tile at a time (less shared memory);
// STAGES = 3: K in two slots and V in three, [K K | V V V], tile k0 + 2 BN issued by release() into this tile's K
// slot and the V slot of tile k0 - BN, free only then (the wgmma forward reads it while it computes tile k0's
// scores).  Per iteration: acquire(k0, stage) (waits for the tile, barrier; returns K), v_at(...) is V, compute,
// release(k0, stage, free V slot) (barrier, then the refill).  STAGES 1 / 2: `stage` counts 0 .. STAGES - 1 and names
// both tiles; STAGES 3: `stage` is the K slot (tile index & 1), V's slot the tile index mod 3.  No copy is issued
// when Lk = 0.
template <typename T, int BN, int D, int STAGES, bool STATIC_COPIES = true, typename L = PaddedRows<D>,
          bool ADVANCE = false>
struct KVTiles {
  static_assert(STAGES >= 1 && STAGES <= 3, "one to three stages");
  static_assert(BN <= kThreads, "one thread per row copies the padding chunk (kc)");
  static constexpr int TILE = L::elems(BN);  // one K or V tile
  static constexpr int SMEM_ELEMS = (STAGES == 3 ? 5 : STAGES * 2) * TILE;
  T* smem;
  const T *kg, *vg;
  int64_t k_sr, v_sr;
  int Lk;
  // rows of 8 T per key (launch_sat_terms' saturated column terms), copied into the K tile's padding columns D..D+7
  // with the tile; nullptr: none
  const T* kc = nullptr;
  // ADVANCE: the copies of a tile whose rows are all in range use their own lanes (AdvLanes) and this thread's
  // source addresses in the next tile to issue (its K and V row, its padding chunk), set by start() and advanced by
  // a tile per issue (tiles are issued in order): no address arithmetic per copy.  The last tile, partly past Lk,
  // takes load_tile's predicated copies.  (State: kernels hold one KVTiles and use it by reference; a copy would
  // not see the advance.)
  mutable const T *kn = nullptr, *vn = nullptr, *kcn = nullptr;
  // ADVANCE's lanes: TPR = kThreads / BN threads per row; thread t copies row (t % 8) + 8 (t / (8 TPR)), chunks
  // (t / 8) % TPR + TPR * pass.  The 8 threads of a shared-memory phase write one chunk of 8 consecutive rows
  // (distinct bank groups in both layouts), each warp instruction reads a row's TPR chunks (TPR x 16 contiguous
  // bytes: whole sectors), and every pass lies at a constant offset from the thread's row on both sides (immediates).
  // The price: a warp instruction spans 32 / TPR rows' cache lines (16 at BN = 64) where load_tile's lanes span
  // fewer (D = 64: 4 padded, 8 in core matrices): more L1 tag lookups per copy, predicted to hide behind the tile's
  // products (not measured; NOTES).
  struct AdvLanes {
    static constexpr int TPR = kThreads / BN, CPR = D / 8, PASSES = CPR / TPR;
    static_assert(kThreads % BN == 0 && BN % 8 == 0 && CPR % TPR == 0, "whole rows, whole core matrices");
    __device__ __forceinline__ static int row() {
      return ((int)threadIdx.x & 7) + 8 * ((int)threadIdx.x / (8 * TPR));
    }
    __device__ __forceinline__ static int col() { return (((int)threadIdx.x >> 3) % TPR) * 8; }
  };

  __device__ __forceinline__ T* k_at(int stage) const {
    if constexpr (STAGES == 3) return smem + stage * TILE;
    return smem + (STAGES == 1 ? 0 : stage) * 2 * TILE;
  }
  __device__ __forceinline__ T* v_at(int stage) const {
    if constexpr (STAGES == 3) return smem + (2 + stage) * TILE;
    return k_at(stage) + TILE;
  }
  __device__ __forceinline__ void issue(int ks, int vs, int k0) const {
    if constexpr (ADVANCE) {
      static_assert(STATIC_COPIES, "advanced sources: the static copies' tiles");
      using AL = AdvLanes;
      const bool whole = rows_in_range(BN, Lk - k0);  // block-uniform
      if (whole) {
        T* kd = L::at(k_at(ks), AL::row(), AL::col());
        T* vd = L::at(v_at(vs), AL::row(), AL::col());
#pragma unroll
        for (int it = 0; it < AL::PASSES; ++it) {
          copy_chunk<true>(kd + L::off(0, it * AL::TPR * 8), kn + it * AL::TPR * 8, true, kn);
          copy_chunk<true>(vd + L::off(0, it * AL::TPR * 8), vn + it * AL::TPR * 8, true, vn);
        }
        if (kc != nullptr && (int)threadIdx.x < BN)
          copy_chunk<true>(L::at(k_at(ks), (int)threadIdx.x, D), kcn, true, kc);
      }
      kn += BN * k_sr;
      vn += BN * v_sr;
      kcn += BN * 8;
      if (whole) {
        cp_async_commit();
        return;
      }
    }
    load_tile<T, BN, D, kThreads, true, STATIC_COPIES, L>(k_at(ks), kg, k_sr, k0, Lk);
    load_tile<T, BN, D, kThreads, true, STATIC_COPIES, L>(v_at(vs), vg, v_sr, k0, Lk);
    if (kc != nullptr && (int)threadIdx.x < BN) {  // one 16-byte chunk per key row (warp-uniform for BN % 32 == 0)
      const int r = (int)threadIdx.x;
      copy_chunk<true>(L::at(k_at(ks), r, D), kc + (int64_t)(k0 + r) * 8, k0 + r < Lk, kc);
    }
    cp_async_commit();
  }
  __device__ __forceinline__ void start() const {
    if constexpr (ADVANCE) {
      kn = kg + AdvLanes::row() * k_sr + AdvLanes::col();
      vn = vg + AdvLanes::row() * v_sr + AdvLanes::col();
      // (an address past kc when it is nullptr: never read, kc is tested first)
      kcn = reinterpret_cast<const T*>(reinterpret_cast<uintptr_t>(kc) + threadIdx.x * 8 * sizeof(T));
    }
    if (Lk > 0) issue(0, 0, 0);
    if (STAGES == 3 && BN < Lk) issue(1, 1, BN);
  }
  __device__ __forceinline__ const T* acquire(int k0, int stage) const {
    if (STAGES == 2 && k0 + BN < Lk) {
      issue(stage ^ 1, stage ^ 1, k0 + BN);  // the other stage was released one iteration ago
      cp_async_wait<1>();
    } else if (STAGES == 3 && k0 + BN < Lk) {
      cp_async_wait<1>();  // tile k0 + BN stays in flight
    } else {
      cp_async_wait<0>();
    }
    if constexpr (L::CORE) fence_proxy_async();  // read by wgmma too
    __syncthreads();  // every thread's copies of this tile visible
    return k_at(stage);
  }
  __device__ __forceinline__ void release(int k0, int stage = 0, int v_free = 0) const {
    __syncthreads();  // this stage (STAGES 3: K of this tile, V of the previous one) fully consumed
    if (STAGES == 1 && k0 + BN < Lk) issue(0, 0, k0 + BN);
    if (STAGES == 3 && k0 + 2 * BN < Lk) issue(stage, v_free, k0 + 2 * BN);
  }
};

// acc[NT][4] += A (16 x D, rows of smem `a`, this warp's 16 rows) * B^T, where B is
// NT*8 rows of smem `b` ([n][k] row-major: "col" operand of the MMA).  Fragments by ldmatrix: A's four 8x8
// matrices are (rows 0-7 | 8-15) x (k 0-7 | 8-15), B's are (n-tile nt | nt+1) x (k 0-7 | 8-15).
template <typename T, int D, int NT, typename LA = PaddedRows<D>, typename LB = PaddedRows<D>>
__device__ __forceinline__ void mma_rows_rows(float (*acc)[4], const T* a, const T* b) {
  static_assert(NT % 2 == 0, "score tile width must be a multiple of 16");
  const int lane = threadIdx.x & 31, lr = lane & 7, lm = lane >> 3;
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) {
    uint32_t af[4];
    ldmatrix_x4<false>(af, LA::at(a, (lm & 1) * 8 + lr, kc * 16 + (lm >> 1) * 8));
#pragma unroll
    for (int nt = 0; nt < NT; nt += 2) {
      uint32_t bf[4];
      ldmatrix_x4<false>(bf, LB::at(b, nt * 8 + (lm >> 1) * 8 + lr, kc * 16 + (lm & 1) * 8));
      mma16816<T>(acc[nt], af, bf);
      mma16816<T>(acc[nt + 1], af, bf + 2);
    }
  }
}

// (1, 1) in T: each register of the B fragment of an m16n8k16 MMA whose B is all ones (the product's every column is
// the A rows' sum over k).
template <typename T>
__device__ __forceinline__ constexpr uint32_t one_pair() {
  return std::is_same_v<T, __half> ? 0x3C003C00u : 0x3F803F80u;
}

// out[D/8][4] += P (16 x NT*8, from accumulator registers p[NT][4], already final
// values) * B, where B is NT*8 rows x D cols in smem `b` ([k][n] row-major).  B's fragments by ldmatrix.trans:
// (k 0-7 | 8-15) x (n-tile dt | dt+1).  With `sums` (warp-uniform), rowsum[4] += the rows' sums of P as rounded to T
// (an n-tile of ones: each of its columns holds them), one MMA per 16 of K instead of a float add per element.
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_acc_rows(float (*out)[4], const float (*p)[4], const T* b, float (&rowsum)[4],
                                             bool sums) {
  static_assert(NT % 2 == 0, "score tile width must be a multiple of 16");
  constexpr int LDS = D + 8;
  const int lane = threadIdx.x & 31, lr = lane & 7, lm = lane >> 3;
  const uint32_t ones[2] = {one_pair<T>(), one_pair<T>()};
#pragma unroll
  for (int kc = 0; kc < NT / 2; ++kc) {
    uint32_t af[4];
    af[0] = Pack<T>::pack(p[2 * kc][0], p[2 * kc][1]);
    af[1] = Pack<T>::pack(p[2 * kc][2], p[2 * kc][3]);
    af[2] = Pack<T>::pack(p[2 * kc + 1][0], p[2 * kc + 1][1]);
    af[3] = Pack<T>::pack(p[2 * kc + 1][2], p[2 * kc + 1][3]);
#pragma unroll
    for (int dt = 0; dt < D / 8; dt += 2) {
      uint32_t bf[4];
      ldmatrix_x4<true>(bf, b + (kc * 16 + (lm & 1) * 8 + lr) * LDS + (dt + (lm >> 1)) * 8);
      mma16816<T>(out[dt], af, bf);
      mma16816<T>(out[dt + 1], af, bf + 2);
    }
    if (sums) mma16816<T>(rowsum, af, ones);
  }
}

// ---------------------------------------------------------------------------
// Philox4x32-10 (Salmon et al. 2011; constants and round as Random123 / curand).
__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) { key.x += 0x9E3779B9u; key.y += 0xBB67AE85u; }
    const uint32_t lo0 = ctr.x * 0xD2511F53u, hi0 = __umulhi(ctr.x, 0xD2511F53u);
    const uint32_t lo1 = ctr.z * 0xCD9E8D57u, hi1 = __umulhi(ctr.z, 0xCD9E8D57u);
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
  }
  return ctr;
}

// Dropout: one Philox call (key = seed) serves a 2 x 4 block of elements, queries i, i + 8 (i % 16 < 8) by keys j,
// j + 1, j + 8, j + 9 (j % 16 < 8, even): the 8 elements one lane holds in the mma.sync C layout of a 16 x 16 tile,
// rows x keys (the forward, dq) or keys x queries (dK/dV, where two lanes share a call).  Counter {4 (j / 16) + (j /
// 2) % 4, 8 (i / 16) + i % 8, bh, offset}; element (i, j) takes word 2 ((i / 8) % 2) + (j / 8) % 2, its 16-bit half
// j % 2 (the low half for even j), and is kept iff that half >= drop_thresh (= round(p * 2^16)).  bh = b*H + h of the
// call (varlen: n*H + h with i, j within sequence n; a backward head group passes the call's own, Params::h_all /
// h0), so no two calls of a launch share a counter.  Tiles start at multiples of 16 queries and keys.
__device__ __forceinline__ uint4 dropout_words(uint2 key, uint32_t offset, int bh, int i, int j) {
  return philox4x32_10(make_uint4((uint32_t)(4 * (j >> 4) + ((j >> 1) & 3)), (uint32_t)(8 * (i >> 4) + (i & 7)),
                                  (uint32_t)bh, offset),
                       key);
}
__device__ __forceinline__ uint32_t word_of(uint4 w, int idx) {
  return idx == 0 ? w.x : idx == 1 ? w.y : idx == 2 ? w.z : w.w;
}
__device__ __forceinline__ bool dropout_keep(uint32_t word, int j, uint32_t thresh) {
  return ((j & 1) ? word >> 16 : word & 0xffffu) >= thresh;
}

// dK/dV's dropout words of an n-tile pair (keys x queries; lane 4 g + t holds keys kw + g, + 8 and queries q + 2 t,
// + 1 of each n-tile, q = q0 + 8 nt with nt even): the lanes g and g ^ 1 need the same two calls (queries q + 2 t + e,
// e = 0, 1); each computes the one of e = g % 2 and they swap them (4 shuffles).  out[e] is the call of e.
__device__ __forceinline__ void pair_dropout_words(uint4 (&out)[2], uint2 key, uint32_t offset, int bh, int q, int kw,
                                                   int g, int t) {
  const uint4 mine = dropout_words(key, offset, bh, q + 2 * t + (g & 1), kw + g);
  const uint4 other = make_uint4(__shfl_xor_sync(0xffffffffu, mine.x, 4), __shfl_xor_sync(0xffffffffu, mine.y, 4),
                                 __shfl_xor_sync(0xffffffffu, mine.z, 4), __shfl_xor_sync(0xffffffffu, mine.w, 4));
  out[0] = (g & 1) ? other : mine;
  out[1] = (g & 1) ? mine : other;
}

// Score of (i, j) in log2 units, or -inf (out of range / masked) or 0 (uniform row): value() otherwise.  i, j are
// positions within the sequence, Lq / Lk its lengths.  CHECK = false: an interior tile of a call without key mask or
// uniform rows (tile_needs_checks), every (i, j) in range: value() alone.
template <bool CHECK, typename F>
__device__ __forceinline__ float masked_score(int i, int j, int Lq, int Lk, const uint8_t* km_b, bool uniform_row,
                                              F&& value) {
  if constexpr (CHECK) {
    if (i >= Lq || j >= Lk) return -INFINITY;
    if (uniform_row) return 0.f;  // HF's padded query rows: uniform over all Lk keys
    if (km_b != nullptr && km_b[j] == 0) return -INFINITY;
  } else {
    (void)i; (void)j; (void)Lq; (void)Lk; (void)km_b; (void)uniform_row;
  }
  return value();
}

// The score from q_i.k_j (`acc`) and the relative terms' values c2pv, p2cv (0 where a term is absent).
template <bool CHECK = true>
__device__ __forceinline__ float finish_score(const Params& p, float acc, float c2pv, float p2cv, int i, int j, int Lq,
                                              int Lk, const uint8_t* km_b, bool uniform_row) {
  return masked_score<CHECK>(i, j, Lq, Lk, km_b, uniform_row, [&] { return ((acc + c2pv) + p2cv) * p.scale_log2; });
}

// The slots of the saturated distances, read from the slot table at d = band_lo / band_hi (clamped to the table):
// the slot of every saturated distance, also when there are more position rows than the table uses.  {lo, hi}.
__device__ __forceinline__ int2 saturated_slots(const Params& p) {
  if (p.table == nullptr) return make_int2(0, 0);
  const int lo = __ldg(p.table + sat_table_index(p.band_lo, p.Lq, p.Lk));
  const int hi = __ldg(p.table + sat_table_index(p.band_hi, p.Lq, p.Lk));
  return make_int2(min(max(lo, 0), p.S2 - 1), min(max(hi, 0), p.S2 - 1));
}

// Saturation of a tile of rows [r0, r0 + nr) x columns [c0, c0 + nc) (d = row - col for queries x keys):
// 0 = the band (the skew), 1 = every d <= p.band_lo (saturated_slots().x), 2 = every d >= p.band_hi (.y).  Any band
// the host passes keeps every access in bounds (the slots are clamped); a wrong one gives wrong scores.
__device__ __forceinline__ int tile_saturation(const Params& p, int r0, int nr, int c0, int nc) {
#ifdef DFA_PROFILE_ZONE  // static-profile builds only (benchmarks/static_cuda.py): every tile of one kind
  (void)p; (void)r0; (void)nr; (void)c0; (void)nc;
  return DFA_PROFILE_ZONE;
#else
  if (p.table == nullptr) return 0;
  if (r0 - (c0 + nc - 1) >= p.band_hi) return 2;
  if (r0 + nr - 1 - c0 <= p.band_lo) return 1;
  return 0;
#endif
}

// Static-profile builds only (benchmarks/static_cuda.py, -DDFA_PROFILE_PLAIN): the kernels see the common DeBERTa
// call (no mask, no uniform rows, no dropout unless -DDFA_PROFILE_DROPOUT; both relative terms present) as constants
// and assumptions, so the compiler drops the other branches and the main loop's paths are that call's.  In every
// real build the kernel parameter is p itself.
#ifdef DFA_PROFILE_KEY_MASK  // with DFA_PROFILE_PLAIN: a padded batch's key mask (no uniform rows)
#define DFA_PROFILE_KEY_MASK_OF(p) __builtin_assume(p.key_mask != nullptr)
#else
#define DFA_PROFILE_KEY_MASK_OF(p) p.key_mask = nullptr
#endif
#ifdef DFA_PROFILE_TILE_TERMS  // with DFA_PROFILE_PLAIN: the saturated column terms computed per tile in every block
#define DFA_PROFILE_SAT_TERMS_OF(p) p.sat_terms_k = p.sat_terms_q = nullptr
#else  // precomputed (launch_sat_terms)
#define DFA_PROFILE_SAT_TERMS_OF(p)           \
  __builtin_assume(p.sat_terms_k != nullptr); \
  __builtin_assume(p.sat_terms_q != nullptr)
#endif
#ifdef DFA_PROFILE_DROPOUT  // with DFA_PROFILE_PLAIN: a training call (attention dropout on)
#define DFA_PROFILE_DROPOUT_ON 1
#else
#define DFA_PROFILE_DROPOUT_ON 0
#endif
// with DFA_PROFILE_PLAIN: the forward's rows' maxima never grow (its rescale reduced to two multiplies, the vote and
// the factors kept): the longest path is the common iteration once the maxima have settled, an interior tile with its
// prefetch
#ifdef DFA_PROFILE_SETTLED
#define DFA_PROFILE_SETTLED_ON 1
#else
#define DFA_PROFILE_SETTLED_ON 0
#endif
#ifdef DFA_PROFILE_PLAIN
#define DFA_KERNEL_PARAMS(p) const Params p##_in
#define DFA_PROFILE_ASSUME(p)          \
  Params p = p##_in;                   \
  DFA_PROFILE_KEY_MASK_OF(p);          \
  p.uniform = nullptr;                 \
  p.dropout = DFA_PROFILE_DROPOUT_ON;  \
  __builtin_assume(p.table != nullptr); \
  __builtin_assume(p.pos_k != nullptr); \
  __builtin_assume(p.pos_q != nullptr); \
  DFA_PROFILE_SAT_TERMS_OF(p)
#else
#define DFA_KERNEL_PARAMS(p) const Params p
#define DFA_PROFILE_ASSUME(p) \
  do {                        \
  } while (0)
#endif

// Whether a warp's tile of rows [r0, r0 + nr) x columns [c0, c0 + nc) (row extent R, column extent C) needs the
// per-element range, key-mask and uniform-row tests: edge tiles do, and tiles that hold a masked key or a uniform row
// (`masked`: the kernel's warp-uniform votes, any_key_masked / any_set); interior tiles without either do not.
__device__ __forceinline__ bool tile_needs_checks(int r0, int nr, int R, int c0, int nc, int C, bool masked) {
#ifdef DFA_PROFILE_INTERIOR  // static-profile builds only (benchmarks/static_cuda.py): every tile interior
  (void)r0; (void)nr; (void)R; (void)c0; (void)nc; (void)C;
  return masked;
#else
  return r0 + nr > R || c0 + nc > C || masked;
#endif
}

// Warp votes (every lane gets the answer): whether a key of [j0, j0 + n) inside [0, Lk) is masked out (km_b: the
// batch row's key mask, nullptr = none), and whether any lane's flag is set.
__device__ __forceinline__ bool any_key_masked(const uint8_t* km_b, int j0, int n, int Lk) {
  if (km_b == nullptr) return false;  // uniform
  bool masked = false;
  for (int c = (int)(threadIdx.x & 31); c < n; c += 32) masked |= j0 + c < Lk && km_b[j0 + c] == 0;
  return __any_sync(0xffffffffu, masked) != 0;
}
__device__ __forceinline__ bool any_set(bool flag) { return __any_sync(0xffffffffu, flag) != 0; }

// Runs f(saturated, checked) with both as std::bool_constant: one specialised copy of a tile's element loop per
// kind (saturated or band; edge or interior), chosen by warp-uniform branches.
template <typename F>
__device__ __forceinline__ void dispatch_tile(bool saturated, bool checked, F&& f) {
  if (saturated) {
    if (checked) f(std::true_type{}, std::true_type{});
    else f(std::true_type{}, std::false_type{});
  } else {
    if (checked) f(std::false_type{}, std::true_type{});
    else f(std::false_type{}, std::false_type{});
  }
}

// Runs f(std::bool_constant<b>): one specialised copy per value, chosen by a (warp-uniform) branch.
template <typename F>
__device__ __forceinline__ void dispatch_bool(bool b, F&& f) {
  if (b) f(std::true_type{});
  else f(std::false_type{});
}

// What one block sees of its (batch element | packed sequence) b and head h.
//   Lq, Lk     : lengths of this sequence (padded: p.Lq, p.Lk)
//   qrow, krow : first token row of the sequence in q/o/dout/dq and k/v/dk/dv (padded: 0; the
//                *_sb strides select b there, they are 0 in varlen mode)
//   qoff, koff : row of (b, h, position 0) in the float buffers (lse, delta, band_q, sat_q |
//                band_k, sat_k): padded (b*H + h) * Lq, varlen h * Tq + cu_q[b].
// Everything is int64: tokens x strides can exceed 2^31 elements.  Whatever cu_seqlens hold, a
// sequence's rows stay inside [0, T) and its length within [0, max_seqlen] (no slot-table or
// buffer access out of bounds); the host validates them (CudaBackend.forward_varlen).
struct SeqView {
  int Lq, Lk;
  int64_t qrow, krow, qoff, koff;
};
// (start, length) of sequence b: start clamped to [0, T], end to [start, T], length to max_len.
__device__ __forceinline__ int2 seq_range(const int32_t* cu, int b, int64_t T, int max_len) {
  const int t = (int)T;  // T < 2^31 (host check)
  const int s = min(max(__ldg(cu + b), 0), t);
  const int e = min(max(__ldg(cu + b + 1), s), t);
  return make_int2(s, min(e - s, max_len));
}
__device__ __forceinline__ SeqView seq_view(const Params& p, int b, int h) {
  SeqView v;
  if (p.cu_q != nullptr) {
    const int2 rq = seq_range(p.cu_q, b, p.Tq, p.Lq), rk = seq_range(p.cu_k, b, p.Tk, p.Lk);
    v.Lq = rq.y;
    v.Lk = rk.y;
    v.qrow = rq.x;
    v.krow = rk.x;
    v.qoff = (int64_t)h * p.Tq + rq.x;
    v.koff = (int64_t)h * p.Tk + rk.x;
  } else {
    v.Lq = p.Lq;
    v.Lk = p.Lk;
    v.qrow = v.krow = 0;
    v.qoff = ((int64_t)b * p.H + h) * p.Lq;
    v.koff = ((int64_t)b * p.H + h) * p.Lk;
  }
  return v;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
// Fixed reduction order: deterministic.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Lane t's share (columns [t D/4, (t+1) D/4)) of dot(a, b) over a row of D 16-bit values (16-byte aligned rows): the
// products of 16-bit values are exact in float32, summed in a fixed order; quad_sum adds the quad's four shares.
template <typename T, int D>
__device__ __forceinline__ float row_dot_share(const T* a, const T* b, int t) {
  static_assert(D % 32 == 0, "a lane's share is whole 16-byte vectors");
  const uint4* a4 = reinterpret_cast<const uint4*>(a) + t * (D / 32);
  const uint4* b4 = reinterpret_cast<const uint4*>(b) + t * (D / 32);
  float acc = 0.f;
#pragma unroll
  for (int v = 0; v < D / 32; ++v) {
    const uint4 x = a4[v], y = b4[v];
    const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {y.x, y.y, y.z, y.w};
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float2 u = Pack<T>::unpack(xs[w]), z = Pack<T>::unpack(ys[w]);
      acc = fmaf(u.x, z.x, acc);
      acc = fmaf(u.y, z.y, acc);
    }
  }
  return acc;
}


// Calls run(T{}, std::integral_constant<int, D>{}) for the compiled (dtype, head_dim) pairs:
// dtype 0 = fp16, 1 = bf16; head_dim 32 / 64 / 128.  Returns run's error text, or one of its own.
template <typename Run>
inline const char* dispatch_dtype_dim(int dtype, int head_dim, Run&& run) {
  using D32 = std::integral_constant<int, 32>;
  using D64 = std::integral_constant<int, 64>;
  using D128 = std::integral_constant<int, 128>;
  if (dtype == 0) {
    if (head_dim == 32) return run(__half{}, D32{});
    if (head_dim == 64) return run(__half{}, D64{});
    if (head_dim == 128) return run(__half{}, D128{});
  } else if (dtype == 1) {
    if (head_dim == 32) return run(__nv_bfloat16{}, D32{});
    if (head_dim == 64) return run(__nv_bfloat16{}, D64{});
    if (head_dim == 128) return run(__nv_bfloat16{}, D128{});
  }
  return "deberta_fast._C: unsupported dtype/head_dim combination (fp16/bf16, head_dim 32/64/128)";
}

}  // namespace dfa
