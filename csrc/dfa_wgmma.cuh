// Hopper's warpgroup MMA (wgmma.mma_async, sm_90a) for the kernels' products (their WG variants).  Its shared-memory
// operands are tiles of CoreRows layout (dfa_common.cuh), the PTX ISA's canonical no-swizzle layouts: read K-major,
// ((8,m),(T,2k)) : ((1T,SBO),(1,LBO)); read MN-major, ((T,1,m),(8,k)) : ((1,T,SBO),(1T,LBO)); T = 8 elements = 16
// bytes; LBO = the bytes between core matrices adjacent along K, SBO along M / N.
//
// wgmma (PTX ISA 9.7.15, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"): the 4 warps of a warpgroup
// issue it together; warp w computes rows [16 w, 16 w + 16) of D = A B (+ D) for m64nNk16.  Its accumulator fragment
// is mma.sync's m16n8 C fragment repeated over the N / 8 n-tiles (d[4 nt + e] = acc[nt][e]), and an A operand in
// registers is mma.sync's m16n8k16 A fragment: so the forward's softmax and relative-term code run unchanged on it.
// A from shared memory (`wgmma_ss`: Q), or registers (`wgmma_rs`: P); B from shared memory, K-major (K^T: the keys'
// rows as they are) or MN-major (`TRANS_B`: V's rows, n = the head dim).  Asynchronous: `wgmma_fence()` before the
// first one that reads registers written since, `wgmma_commit()`, then `wgmma_wait<N>()` before the accumulators are
// read; shared memory written by the threads (cp.async, stores) is made visible to its async proxy by
// `fence_proxy_async()` (dfa_common.cuh) before the barrier that publishes it.
//
// The simulator (csrc/sim) runs the same calls per warp (its 16 rows), decoding the descriptors as above: the
// accumulators read NaN until the covering wait; the layouts and the fragment order are the PTX ISA's, which only a
// GPU can confirm.
#pragma once

#include <atomic>
#include <cstdlib>
#include <cstring>

#include "dfa_common.cuh"

#if defined(DFA_CPU_SIM) || (defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL))
#define DFA_HAS_WGMMA 1  // this pass can run wgmma (sm_90a device code, or the simulator)
#else
#define DFA_HAS_WGMMA 0
#endif

namespace dfa {

// The shared-window offset of a pointer into the block's dynamic shared memory.
__device__ __forceinline__ uint32_t smem_offset(const void* p) {
#if defined(DFA_CPU_SIM)
  return dfa_sim::smem_offset(p);
#elif defined(__CUDA_ARCH__)
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#else
  (void)p;
  return 0u;
#endif
}

// A no-swizzle matrix descriptor: start address, LBO (bytes between core matrices adjacent in K) and SBO (adjacent in
// M / N), each in 16-byte units in bits 0-13 / 16-29 / 32-45; base offset 0, swizzle mode 0 (bits 62-63).
__device__ __forceinline__ uint64_t smem_desc(const void* start, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((smem_offset(start) >> 4) & 0x3FFFu) | ((uint64_t)((lbo >> 4) & 0x3FFFu) << 16) |
         ((uint64_t)((sbo >> 4) & 0x3FFFu) << 32);
}

__device__ __forceinline__ void wgmma_fence() {
#if defined(DFA_CPU_SIM)
#elif DFA_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(DFA_CPU_SIM)
  dfa_sim::wgmma_commit();
#elif DFA_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(DFA_CPU_SIM)
  dfa_sim::wgmma_wait(N);
#elif DFA_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Register operands pinned at this point: the compiler may neither move their reads / writes across it nor reuse their
// registers before it.  After a wait_group, on the accumulators and A registers of the wgmmas it waited for (the PTX
// ISA leaves touching them before the covering wait undefined, and the wait's asm names no register).
template <int N>
__device__ __forceinline__ void fence_operands(float* d) {
#if !defined(DFA_CPU_SIM)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
#else
  (void)d;
#endif
}
template <int N>
__device__ __forceinline__ void fence_operands(uint32_t (*a)[4]) {
#if !defined(DFA_CPU_SIM)
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
#else
  (void)a;
#endif
}

// The inline PTX: N / 2 accumulator operands ("+f"), then the scale-d flag, the A descriptor or 4 A registers, the B
// descriptor and the transpose immediate(s).  I*: those operands' numbers as text.
#define DFA_ACC8(i)                                                                                               \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
      "+f"(d[i + 7])
#define DFA_ACC16 DFA_ACC8(0), DFA_ACC8(8)
#define DFA_ACC32 DFA_ACC16, DFA_ACC8(16), DFA_ACC8(24)
#define DFA_ACC64 DFA_ACC32, DFA_ACC8(32), DFA_ACC8(40), DFA_ACC8(48), DFA_ACC8(56)
#define DFA_REGS16 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}"
#define DFA_REGS32                                                                                                \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,"  \
  "%29,%30,%31}"
#define DFA_REGS64                                                                                                \
  "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,"  \
  "%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55," \
  "%56,%57,%58,%59,%60,%61,%62,%63}"
#define DFA_WGMMA_HEAD(NN, TY, IP) \
  "{\n.reg .pred p;\nsetp.ne.b32 p, %" IP ", 0;\nwgmma.mma_async.sync.aligned.m64n" NN "k16.f32." TY "." TY " "
#define DFA_WGMMA_SS_PTX(NN, TY, REGS, IP, IA, IB, IT) \
  DFA_WGMMA_HEAD(NN, TY, IP) REGS ", %" IA ", %" IB ", p, 1, 1, 0, %" IT ";\n}\n"
#define DFA_WGMMA_RS_PTX(NN, TY, REGS, IP, A0, A1, A2, A3, IB, IT) \
  DFA_WGMMA_HEAD(NN, TY, IP) REGS ", {%" A0 ",%" A1 ",%" A2 ",%" A3 "}, %" IB ", p, 1, 1, %" IT ";\n}\n"
#define DFA_WGMMA_SS_CASE(NN, REGS, ACC, IP, IA, IB, IT)                                                   \
  if constexpr (F16)                                                                                       \
    asm volatile(DFA_WGMMA_SS_PTX(NN, "f16", REGS, IP, IA, IB, IT)                                         \
                 : ACC : "r"(acc), "l"(desc_a), "l"(desc_b), "n"(TB) : "memory");                         \
  else                                                                                                     \
    asm volatile(DFA_WGMMA_SS_PTX(NN, "bf16", REGS, IP, IA, IB, IT)                                        \
                 : ACC : "r"(acc), "l"(desc_a), "l"(desc_b), "n"(TB) : "memory")
#define DFA_WGMMA_RS_CASE(NN, REGS, ACC, IP, A0, A1, A2, A3, IB, IT)                                       \
  if constexpr (F16)                                                                                       \
    asm volatile(DFA_WGMMA_RS_PTX(NN, "f16", REGS, IP, A0, A1, A2, A3, IB, IT)                             \
                 : ACC : "r"(acc), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(TB)         \
                 : "memory");                                                                              \
  else                                                                                                     \
    asm volatile(DFA_WGMMA_RS_PTX(NN, "bf16", REGS, IP, A0, A1, A2, A3, IB, IT)                            \
                 : ACC : "r"(acc), "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(TB)         \
                 : "memory")

// D (64 x N, float32) = A (64 x 16, shared, K-major) . B (16 x N, shared: K-major, or MN-major with TRANS_B) (+ D
// when `accumulate`).  d: this thread's N / 2 accumulators (d[4 nt + e]: n-tile nt, mma.sync C element e).
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_ss(float* d, uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma n: 32, 64 or 128");
#if defined(DFA_CPU_SIM)
  dfa_sim::wgmma(d, N, nullptr, desc_a, desc_b, TRANS_B, accumulate, std::is_same_v<T, __nv_bfloat16>);
#elif DFA_HAS_WGMMA
  constexpr bool F16 = std::is_same_v<T, __half>;
  constexpr int TB = TRANS_B ? 1 : 0;
  const int acc = accumulate ? 1 : 0;
  if constexpr (N == 32) {
    DFA_WGMMA_SS_CASE("32", DFA_REGS16, DFA_ACC16, "16", "17", "18", "19");
  } else if constexpr (N == 64) {
    DFA_WGMMA_SS_CASE("64", DFA_REGS32, DFA_ACC32, "32", "33", "34", "35");
  } else {
    DFA_WGMMA_SS_CASE("128", DFA_REGS64, DFA_ACC64, "64", "65", "66", "67");
  }
#else
  (void)d; (void)desc_a; (void)desc_b; (void)accumulate;
  __trap();
#endif
}

// D (64 x N) = A (64 x 16 from registers: this warp's rows as mma.sync's m16n8k16 A fragment `a`) . B (as wgmma_ss)
// (+ D when `accumulate`).  `a` must stay unchanged, and in scope, until the covering wait (the simulator compares it
// there).
template <typename T, int N, bool TRANS_B>
__device__ __forceinline__ void wgmma_rs(float* d, const uint32_t a[4], uint64_t desc_b, bool accumulate) {
  static_assert(N == 32 || N == 64 || N == 128, "wgmma n: 32, 64 or 128");
#if defined(DFA_CPU_SIM)
  dfa_sim::wgmma(d, N, a, 0u, desc_b, TRANS_B, accumulate, std::is_same_v<T, __nv_bfloat16>);
#elif DFA_HAS_WGMMA
  constexpr bool F16 = std::is_same_v<T, __half>;
  constexpr int TB = TRANS_B ? 1 : 0;
  const int acc = accumulate ? 1 : 0;
  if constexpr (N == 32) {
    DFA_WGMMA_RS_CASE("32", DFA_REGS16, DFA_ACC16, "16", "17", "18", "19", "20", "21", "22");
  } else if constexpr (N == 64) {
    DFA_WGMMA_RS_CASE("64", DFA_REGS32, DFA_ACC32, "32", "33", "34", "35", "36", "37", "38");
  } else {
    DFA_WGMMA_RS_CASE("128", DFA_REGS64, DFA_ACC64, "64", "65", "66", "67", "68", "69", "70");
  }
#else
  (void)d; (void)a; (void)desc_b; (void)accumulate;
  __trap();
#endif
}

// The wgmma descriptors of a block's tiles (layout L): a tile's is `base`'s plus its element offset from `base` (one
// integer add: the start address sits in the low bits in 16-byte units); the 16-column / 16-row steps inside a tile add
// constants.  Read K-major (A, or B of A . B^T): LBO = the next 8 columns (one core matrix), SBO = the next 8 rows (one
// row group).  Read MN-major (B of P . B, rows = the k dimension): LBO = the next 8 rows (a row group), SBO = the next
// 8 columns (a core matrix).
template <typename T, typename L>
struct TileDescs {
  const T* base;
  uint64_t kmajor, mnmajor;  // of `base`

  __device__ __forceinline__ explicit TileDescs(const T* b)
      : base(b), kmajor(smem_desc(b, 128, L::GROUP_BYTES)), mnmajor(smem_desc(b, L::GROUP_BYTES, 128)) {}
  __device__ __forceinline__ uint64_t at(uint64_t d, const T* tile) const {
    return d + (uint64_t)((int)(tile - base) * (int)sizeof(T) / 16);
  }
  // columns [16 kc, 16 kc + 16) of a K-major tile; rows [16 kc, 16 kc + 16) of an MN-major one
  static constexpr uint64_t kstep(int kc) { return (uint64_t)(kc * 256 / 16); }
  static constexpr uint64_t mnstep(int kc) { return (uint64_t)(kc * 2 * L::GROUP_BYTES / 16); }
};
struct NoDescs {  // the mma.sync kernels' stand-in
  __device__ __forceinline__ explicit NoDescs(const void*) {}
};
template <typename T, typename L, bool WG>
using DescsOf = std::conditional_t<WG, TileDescs<T, L>, NoDescs>;

// acc (this warp's 16 rows x N, mma.sync C fragments) = A . B^T, A a block tile of 64 rows (Aw: this warp's 16), B a
// tile of N rows, both D wide.  WG: one wgmma per 16 of D (the warpgroup's 64 rows; A and B from shared memory, both
// K-major; the first one overwrites); else mma.sync from ldmatrix fragments (padded tiles).
template <typename T, int D, int N, bool WG, typename Descs>
__device__ __forceinline__ void product_rows_rows(float (*acc)[4], const Descs& dsc, const T* A, const T* Aw,
                                                  const T* B) {
  if constexpr (WG) {
    (void)Aw;
    const uint64_t da = dsc.at(dsc.kmajor, A), db = dsc.at(dsc.kmajor, B);
    fence_operands<N / 2>(&acc[0][0]);  // (every earlier write of them before the fence)
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc)
      wgmma_ss<T, N, false>(&acc[0][0], da + dsc.kstep(kc), db + dsc.kstep(kc), kc > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_operands<N / 2>(&acc[0][0]);
  } else {
    (void)dsc; (void)A;
#pragma unroll
    for (int i = 0; i < N / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    mma_rows_rows<T, D, N / 8>(acc, Aw, B);
  }
}

// P (this warp's 16 x K values in mma.sync C fragments p[K / 8][4]) rounded to T as wgmma / mma.sync A fragments.
template <typename T, int K>
__device__ __forceinline__ void pack_a(uint32_t (*a)[4], const float (*p)[4]) {
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) {
    a[kc][0] = Pack<T>::pack(p[2 * kc][0], p[2 * kc][1]);
    a[kc][1] = Pack<T>::pack(p[2 * kc][2], p[2 * kc][3]);
    a[kc][2] = Pack<T>::pack(p[2 * kc + 1][0], p[2 * kc + 1][1]);
    a[kc][3] = Pack<T>::pack(p[2 * kc + 1][2], p[2 * kc + 1][3]);
  }
}

// rowsum[4] += the rows' sums of A fragments a[K / 16] (an mma.sync with B all ones: every column holds them).
template <typename T, int K>
__device__ __forceinline__ void row_sums(float (&rowsum)[4], const uint32_t (*a)[4]) {
  const uint32_t ones[2] = {one_pair<T>(), one_pair<T>()};
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) mma16816<T>(rowsum, a[kc], ones);
}

// acc (this warp's 16 rows x D) += A . B issued (committed, not waited for): A = a[K / 16] (P, pack_a), B a tile of K
// rows x D read MN-major; one wgmma per 16 of K.  Neither acc nor a may be touched before pv_wait.
template <typename T, int D, int K, typename Descs>
__device__ __forceinline__ void pv_issue(float (*acc)[4], uint32_t (*a)[4], const Descs& dsc, const T* B) {
  const uint64_t db = dsc.at(dsc.mnmajor, B);
  fence_operands<K / 16>(a);  // the packs and the accumulators' last writes (a rescale) before the fence
  fence_operands<D / 2>(&acc[0][0]);
  wgmma_fence();
#pragma unroll
  for (int kc = 0; kc < K / 16; ++kc) wgmma_rs<T, D, true>(&acc[0][0], a[kc], db + dsc.mnstep(kc), true);
  wgmma_commit();
}

// Waits for every wgmma in flight and pins acc and a after it (unconditionally: ptxas serializes every wgmma of the
// kernel (C7514) if some path reads the accumulators without a wait, even one that issued none).
template <int D, int K>
__device__ __forceinline__ void pv_wait(float (*acc)[4], uint32_t (*a)[4]) {
  wgmma_wait<0>();
  fence_operands<D / 2>(&acc[0][0]);
  fence_operands<K / 16>(a);
}

// The wgmma forward's overlapped products: s (this warp's 16 rows x N) = Q . K^T issued; then, when `pending`
// (block-uniform), o += pa . V (the previous tile's P V) issued behind it; waits for s only, so that the softmax of s
// runs while P V is in flight (pv_wait before o or pa are touched, whether or not one was issued).  Q: the block's
// 64 rows; K, V: tiles of N rows.
template <typename T, int D, int N, typename Descs>
__device__ __forceinline__ void scores_and_pv_issue(float (*s)[4], float (*o)[4], uint32_t (*pa)[4], const Descs& dsc,
                                                    const T* Q, const T* K, const T* V, bool pending) {
  const uint64_t da = dsc.at(dsc.kmajor, Q), db = dsc.at(dsc.kmajor, K), dv = dsc.at(dsc.mnmajor, V);
  // every operand's last write before the one fence: ptxas serializes the wgmmas (C7514) if anything touches their
  // registers between it and their wait
  fence_operands<N / 2>(&s[0][0]);
  fence_operands<N / 16>(pa);
  fence_operands<D / 2>(&o[0][0]);
  wgmma_fence();
#pragma unroll
  for (int kc = 0; kc < D / 16; ++kc) wgmma_ss<T, N, false>(&s[0][0], da + dsc.kstep(kc), db + dsc.kstep(kc), kc > 0);
  wgmma_commit();
  if (pending) {
#pragma unroll
    for (int kc = 0; kc < N / 16; ++kc) wgmma_rs<T, D, true>(&o[0][0], pa[kc], dv + dsc.mnstep(kc), true);
    wgmma_commit();
    wgmma_wait<1>();  // the scores (the older group)
  } else {
    wgmma_wait<0>();
  }
  fence_operands<N / 2>(&s[0][0]);
}

// acc (this warp's 16 rows x D) += P . B: P this warp's 16 x K values in mma.sync C fragments (p[K / 8][4], rounded to
// T here), B a tile of K rows x D.  WG: one wgmma per 16 of K (A = P from registers, B read MN-major), waited for;
// else mma.sync with B's fragments by ldmatrix.trans (padded tiles).  `rowsum`, `sums`: mma_acc_rows' (P's row sums,
// on an mma.sync with B all ones, in both variants).
template <typename T, int D, int K, bool WG, typename Descs>
__device__ __forceinline__ void product_acc_rows(float (*acc)[4], const float (*p)[4], const Descs& dsc, const T* B,
                                                 float (&rowsum)[4], bool sums) {
  if constexpr (WG) {
    uint32_t a[K / 16][4];  // every A fragment written before the fence (the ISA: none after it)
    pack_a<T, K>(a, p);
    pv_issue<T, D, K>(acc, a, dsc, B);
    pv_wait<D, K>(acc, a);
    if (sums) row_sums<T, K>(rowsum, a);
  } else {
    (void)dsc;
    mma_acc_rows<T, D, K / 8>(acc, p, B, rowsum, sums);
  }
}

template <typename T, int D, int K, bool WG, typename Descs>
__device__ __forceinline__ void product_acc_rows(float (*acc)[4], const float (*p)[4], const Descs& dsc, const T* B) {
  float none[4];  // (no row sums: dead once inlined)
  product_acc_rows<T, D, K, WG>(acc, p, dsc, B, none, false);
}

#if !defined(DFA_CPU_SIM)
// Whether the image the device runs of this translation unit holds the wgmma code: 1 in an sm_90a cubin, 0 in any
// other (sm_80, sm_90 or compute_90 images have the traps).  Read by the host once per device (wgmma_image).
static __device__ int dfa_wgmma_image = DFA_HAS_WGMMA;
#endif

// Host: whether this translation unit's wgmma instantiations may be launched on the current device (the simulator:
// always).  Once per process, device and source file a 4-byte copy from the device (a synchronisation), then cached;
// not while `stream` is being captured into a CUDA graph (the copy would end the capture: the mma.sync kernels run,
// and the next call outside a capture asks), nor over a pending error of an earlier launch (left for its caller).
static inline bool wgmma_image(cudaStream_t stream) {
#ifdef DFA_CPU_SIM
  (void)stream;
  return true;
#else
  static std::atomic<int> cache[64];  // per device: 0 unknown, 1 yes, 2 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
  if (cache[dev].load() == 0) {
    cudaStreamCaptureStatus cap = cudaStreamCaptureStatusNone;
    if (cudaPeekAtLastError() != cudaSuccess || cudaStreamIsCapturing(stream, &cap) != cudaSuccess ||
        cap != cudaStreamCaptureStatusNone)
      return false;
    int v = 0;
    if (cudaMemcpyFromSymbol(&v, dfa_wgmma_image, sizeof(v)) != cudaSuccess) {
      (void)cudaGetLastError();  // this copy's own error (none was pending): not the next launch's
      return false;
    }
    cache[dev].store(v == 1 ? 1 : 2);
  }
  return cache[dev].load() == 1;
#endif
}

// Host: launch the wgmma instantiations?  DEBERTA_FAST_CUDA_WGMMA=1 or =serial (read at each launch) and the device
// runs this translation unit's sm_90a image.
static inline bool wgmma_wanted(cudaStream_t stream) {
  const char* env = std::getenv("DEBERTA_FAST_CUDA_WGMMA");
  return env != nullptr && (std::strcmp(env, "1") == 0 || std::strcmp(env, "serial") == 0) && wgmma_image(stream);
}

// Host: DEBERTA_FAST_CUDA_WGMMA=serial: the wgmma forward waits for each product in turn (no overlap with the
// softmax), for an A/B against the pipelined one.
static inline bool wgmma_serial() {
  const char* env = std::getenv("DEBERTA_FAST_CUDA_WGMMA");
  return env != nullptr && std::strcmp(env, "serial") == 0;
}

}  // namespace dfa
