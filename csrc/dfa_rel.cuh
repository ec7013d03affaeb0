// Relative terms on tensor cores (the forward's "skew"), shared device code.
//
// With Kr[d] = pos_key[slot(d)] and Qr[d] = pos_query[slot(d)] for a distance d = i - j, a block tile of rows
// [q0, q0 + BM) x keys [k0, k0 + BN) spans the BM + BN - 1 distances d = dmin + x, dmin = q0 - k0 - (BN - 1):
//   c2p[i, j] = q_i . Kr[i - j]   is column (i - j - dmin) of  Q_tile . Kr[window]^T
//   p2c[i, j] = k_j . Qr[i - j]   is column (i - j - dmin) of  K_tile . Qr[window]^T
// The window's rows are gathered once per tile into shared memory (`load_window`; their slots are computed one tile
// ahead by `fill_slots`), the products run on mma.sync, are rounded to T (as HF's bmm of the position terms is) and
// stored to per-warp shared scratch, and each score element reads its two values back at its own diagonal
// (`SkewTile`).  No [B,H,L,2S] table and no host GEMM.
//
// Per warp (16 rows r0 = q0 + 16 w):
//   c2p: Q_w (16 x D) . window rows [16 w, 16 w + BN + 16)^T -> 16 x (BN + 16); element (g', c) at column
//        g' - c + BN - 1 (g' row in the warp, c key in the tile).
//   p2c: per 16-key block kb, K_kb (16 x D) . window rows [xb, xb + 32)^T, xb = 16 w - 16 kb + BN - 16 -> 16 x 32;
//        element (g', 16 kb + c') at column g' - c' + 15.
// Saturated tiles (every d beyond the slot band) need one slot: per-row c2p constants (`c2p_saturated_mma`, once
// per block) and one p2c value per key (`p2c_saturated_mma`: K_tile . SatRows^T, one n-tile per 16 keys).
#pragma once

#include "dfa_common.cuh"

namespace dfa {

// The slot of distance d (clamped to the table, then to [0, S2)): what the gather of the table layout read.
__device__ __forceinline__ int slot_of(const Params& p, int d) {
  const int last = p.Lq + p.Lk - 2;
  return min(max(__ldg(p.table + min(max(d + p.Lk - 1, 0), last)), 0), p.S2 - 1);
}

// slots[x] = slot(dmin + x), x in [0, ROWS): the slot of each window row, once per tile for both windows.
template <int ROWS>
__device__ __forceinline__ void fill_slots(int* slots, const Params& p, int dmin) {
  for_thread_chunks<ROWS, kThreads>([&](int x) { slots[x] = slot_of(p, dmin + x); });
}

// W[x] = pos[slots[x]], x in [0, ROWS): the position rows of ROWS consecutive distances into smem [ROWS][D + 8].
// Plain 16-byte loads (independent of the K / V tiles' cp.async groups); `pos` nullptr: nothing.
template <typename T, int ROWS, int D>
__device__ __forceinline__ void load_window(T* W, const int* slots, const T* pos, int64_t sr) {
  constexpr int CPR = D / 8, LDS = D + 8;
  if (pos == nullptr) return;
  for_thread_chunks<ROWS * CPR, kThreads>([&](int c) {
    const int x = c / CPR, cc = c % CPR;
    const T* src = pos + (int64_t)slots[x] * sr + cc * 8;
    *reinterpret_cast<uint4*>(W + x * LDS + cc * 8) = __ldg(reinterpret_cast<const uint4*>(src));
  });
}

// The 16 rows of the saturated slots: 0 / 1 = pos_query[lo / hi], 2 / 3 = pos_key[lo / hi], 4..15 = 0 (a row of a
// term that is absent: 0).  Plain loads; visible after the caller's barrier.
template <typename T, int D>
__device__ __forceinline__ void load_sat_rows(T* S, const Params& p, const T* pos_k, const T* pos_q, int2 sslot) {
  constexpr int CPR = D / 8, LDS = D + 8;
  for_thread_chunks<16 * CPR, kThreads>([&](int c) {
    const int r = c / CPR, cc = c % CPR;
    const T* pos = r < 2 ? pos_q : r < 4 ? pos_k : nullptr;
    const int64_t sr = r < 2 ? p.pq_sr : p.pk_sr;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (pos != nullptr)
      val = __ldg(reinterpret_cast<const uint4*>(pos + (int64_t)((r & 1) ? sslot.y : sslot.x) * sr + cc * 8));
    *reinterpret_cast<uint4*>(S + r * LDS + cc * 8) = val;
  });
}

// A float rounded to T and back: the value HF's low-precision bmm of a position term holds.
template <typename T>
__device__ __forceinline__ float round_to(float x) {
  return Pack<T>::to_float(Pack<T>::from_float(x));
}

// Store a warp's 16 x (NT*8) accumulator as T into smem rows of stride LD (32-bit pair stores).
template <typename T, int NT>
__device__ __forceinline__ void store_acc(T* dst, int ld, const float (*acc)[4]) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    *reinterpret_cast<uint32_t*>(dst + g * ld + nt * 8 + 2 * t) = Pack<T>::pack(acc[nt][0], acc[nt][1]);
    *reinterpret_cast<uint32_t*>(dst + (g + 8) * ld + nt * 8 + 2 * t) = Pack<T>::pack(acc[nt][2], acc[nt][3]);
  }
}

// c2p of this thread's rows (g, g + 8) at the saturated slots, {lo g, lo g+8, hi g, hi g+8}: columns 2 / 3 of
// Q_w . SatRows^T (held by lane 4 g + 1), rounded to T.
template <typename T, int D>
__device__ __forceinline__ float4 c2p_saturated_mma(const T* Qw, const T* S) {
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  mma_rows_rows<T, D, 2>(acc, Qw, S);
  const int src = ((threadIdx.x & 31) & ~3) | 1;
  const float lo0 = __shfl_sync(0xffffffffu, acc[0][0], src), hi0 = __shfl_sync(0xffffffffu, acc[0][1], src);
  const float lo1 = __shfl_sync(0xffffffffu, acc[0][2], src), hi1 = __shfl_sync(0xffffffffu, acc[0][3], src);
  return make_float4(round_to<T>(lo0), round_to<T>(lo1), round_to<T>(hi0), round_to<T>(hi1));
}

// p2c of the tile's BN keys at the saturated slots: per 16-key block kb, K_kb . SatRows[0..7]^T (16 x 8, one
// n-tile): lane 4 g holds columns 0 / 1 (pos_query lo / hi) of key 16 kb + g in acc[kb][0..1] and of key
// 16 kb + g + 8 in acc[kb][2..3] (fp32).
template <typename T, int D, int BN>
__device__ __forceinline__ void p2c_saturated_mma(float (*acc)[4], const T* Ks, const T* S) {
  static_assert(D % 32 == 0, "two k-chunks per ldmatrix of the saturated rows");
  constexpr int LDS = D + 8;
  const int lane = threadIdx.x & 31, lr = lane & 7, lm = lane >> 3;
#pragma unroll
  for (int kb = 0; kb < BN / 16; ++kb) acc[kb][0] = acc[kb][1] = acc[kb][2] = acc[kb][3] = 0.f;
#pragma unroll
  for (int kc = 0; kc < D / 16; kc += 2) {
    uint32_t bf[4];  // rows 0-7 of S x (k-chunk kc | kc + 1)
    ldmatrix_x4<false>(bf, S + lr * LDS + kc * 16 + lm * 8);
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        uint32_t af[4];
        ldmatrix_x4<false>(af, Ks + (16 * kb + (lm & 1) * 8 + lr) * LDS + (kc + h) * 16 + (lm >> 1) * 8);
        mma16816<T>(acc[kb], af, bf + 2 * h);
      }
    }
  }
}

// This thread's key pair (8 nt + 2t, + 1) of p2c_saturated_mma's result at zone 1 (lo) / 2 (hi), rounded to T and
// scaled: keys 2t / 2t + 1 of the half (nt & 1) of block nt / 2 sit in lanes 8t / 8t + 4.
template <typename T>
__device__ __forceinline__ float2 p2c_saturated_pair(const float (*acc)[4], int nt, int zone, float scale) {
  const int t = threadIdx.x & 3;
  const float* a = acc[nt >> 1] + 2 * (nt & 1);
  const float v = zone == 1 ? a[0] : a[1];
  const float lo = __shfl_sync(0xffffffffu, v, 8 * t), hi = __shfl_sync(0xffffffffu, v, 8 * t + 4);
  const float2 r = Pack<T>::unpack(Pack<T>::pack(lo, hi));
  return make_float2(r.x * scale, r.y * scale);
}

// The per-warp scratch of the skew and its reads.  BN: keys per tile.  Layout (elements of T):
//   c2p: [16][CS], CS = BN + 24 (BN + 15 columns used; the stride spreads the 8 row groups over the banks)
//   p2c: [BN][PS], PS = 40 (per 16-key block, 31 columns used)
template <typename T, int BN>
struct SkewTile {
  static constexpr int NC = BN + 16;  // c2p columns computed (BN + 15 used)
  static constexpr int CS = NC + 8;
  static constexpr int PS = 40;
  static constexpr int ELEMS = 16 * CS + BN * PS;  // per warp
  static_assert(NC % 16 == 0, "c2p columns: a multiple of 16 (ldmatrix pairs)");
  T* c2p;  // this warp's
  T* p2c;

  __device__ __forceinline__ explicit SkewTile(T* warp_scratch) : c2p(warp_scratch), p2c(warp_scratch + 16 * CS) {}

  // c2p products of warp w's 16 rows (Qw) against the window W (rows from 16 w).
  template <int D>
  __device__ __forceinline__ void c2p_products(const T* Qw, const T* W, int warp) const {
    constexpr int LDS = D + 8;
    float acc[NC / 8][4];
#pragma unroll
    for (int i = 0; i < NC / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    mma_rows_rows<T, D, NC / 8>(acc, Qw, W + 16 * warp * LDS);
    store_acc<T, NC / 8>(c2p, CS, acc);
  }
  // p2c products of the tile's BN keys (Ks) against the window W, for warp w's rows.
  template <int D>
  __device__ __forceinline__ void p2c_products(const T* Ks, const T* W, int warp) const {
    constexpr int LDS = D + 8;
#pragma unroll
    for (int kb = 0; kb < BN / 16; ++kb) {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
      mma_rows_rows<T, D, 4>(acc, Ks + 16 * kb * LDS, W + (16 * warp - 16 * kb + BN - 16) * LDS);
      store_acc<T, 4>(p2c + 16 * kb * PS, PS, acc);
    }
  }
  // c2p / p2c of the element (row gr of the warp, key c of the tile)
  __device__ __forceinline__ float c2p_at(int gr, int c) const {
    return Pack<T>::to_float(c2p[gr * CS + gr - c + BN - 1]);
  }
  __device__ __forceinline__ float p2c_at(int gr, int c) const {
    return Pack<T>::to_float(p2c[c * PS + gr - (c & 15) + 15]);
  }
};

}  // namespace dfa
