// Relative terms on tensor cores (the "skew"), shared by the forward and both backward kernels.
//
// A block tile has 64 rows (16 per warp) and COLS columns.  Queries x keys (forward, dq): the row term is c2p
// (q_i . Kr[d], pos_key) and the column term p2c (k_j . Qr[d], pos_query).  Keys x queries (dK/dV): the row term is
// p2c (pos_query), the column term c2p (pos_key).  With d = i - j (query i, key j), the tile's 64 + COLS - 1
// distances are numbered by a window row x such that element (row r, column c) of warp w sits at
//   x = 16 w + r - c + COLS - 1:   d = dmin + x, dmin = q0 - k0 - (COLS - 1)   (queries x keys, DIR = +1)
//                                  d = dmax - x, dmax = q0 - k0 + COLS - 1     (keys x queries, DIR = -1)
// so that one layout serves both orientations.  Per band tile the window's position rows are gathered into shared
// memory (`load_window`; their slots are computed one tile ahead by `fill_slots`), the products run on mma.sync, are
// rounded to T (as HF's bmm of the position terms is) and stored to per-warp shared scratch, and each score element
// reads its two values back at its own diagonal (`SkewTile`).  No [B,H,L,2S] table and no host GEMM.
//
// Per warp:
//   row term: R_w (16 x D) . window rows [16 w, 16 w + COLS + 16)^T -> 16 x (COLS + 16); element (r, c) at column
//             r - c + COLS - 1.
//   column term: per 16-column block cb, C_cb (16 x D) . window rows [xb, xb + 32)^T, xb = 16 w - 16 cb + COLS - 16
//             -> 16 x 32; element (r, 16 cb + c') at column r - c' + 15.
// Saturated tiles (every d beyond the slot band) need one slot: per-row constants (`row_saturated_mma`, once per
// block) and one value per column (`store_col_saturated`: C_tile . SatRows^T, per tile), both folded into the score
// MMA by one extra m16n8k8 per n-tile (`SatFold`): no per-element arithmetic for the relative terms.
#pragma once

#include "dfa_common.cuh"

namespace dfa {

// The position rows of batch element (or packed sequence's batch row) b, head h: {pos_key, pos_query}; nullptr for an
// absent term and for a call without relative terms (p.table nullptr).
template <typename T>
struct PosRows {
  const T* key;
  const T* query;
};
template <typename T>
__device__ __forceinline__ PosRows<T> pos_rows(const Params& p, int b, int h) {
  const bool rel = p.table != nullptr;
  return {rel && p.pos_k ? reinterpret_cast<const T*>(p.pos_k) + b * p.pk_sb + h * p.pk_sh : nullptr,
          rel && p.pos_q ? reinterpret_cast<const T*>(p.pos_q) + b * p.pq_sb + h * p.pq_sh : nullptr};
}

// The slot of distance d: the table's entry (its index clamped to the table), clamped to [0, S2).
__device__ __forceinline__ int slot_of(const Params& p, int d) {
  const int last = p.Lq + p.Lk - 2;
  return min(max(__ldg(p.table + min(max(d + p.Lk - 1, 0), last)), 0), p.S2 - 1);
}

// slots[x] = slot(d0 + DIR x), x in [0, ROWS): the slot of each window row, once per tile for both windows (d0 = dmin,
// DIR = +1 for queries x keys; d0 = dmax, DIR = -1 for keys x queries).
template <int ROWS, int DIR>
__device__ __forceinline__ void fill_slots(int* slots, const Params& p, int d0) {
  static_assert(DIR == 1 || DIR == -1, "window direction");
  for_thread_chunks<ROWS, kThreads>([&](int x) { slots[x] = slot_of(p, d0 + DIR * x); });
}

// W[x] = pos[slots[x]], x in [0, ROWS): the position rows of ROWS consecutive distances into smem [ROWS][D + 8].
// Plain 16-byte loads (independent of the K / V tiles' cp.async groups); `pos` nullptr: nothing.  Each thread copies
// chunk tid % CPR of rows tid / CPR + it * RSTEP: one base address per thread and immediate offsets (a per-copy
// division would make the compiler keep ROWS * CPR / 128 addresses live across the main loop: the D = 128 dK/dV
// kernel spilled 216-292 B so).  The loads go out BATCH at a time before their stores (one memory latency per batch,
// not per row: a store waits for its load), and a row's offset is a 32-bit product (the host checks that a head's
// rows lie within 2^31 elements: check_pos).
template <typename T, int ROWS, int D, int BATCH = 8>
__device__ __forceinline__ void load_window(T* W, const int* slots, const T* pos, int64_t sr) {
  constexpr int CPR = D / 8, LDS = D + 8, RSTEP = kThreads / CPR, ITERS = (ROWS + RSTEP - 1) / RSTEP;
  static_assert(kThreads % CPR == 0, "whole rows per pass");
  if (pos == nullptr) return;
  const int r0 = (int)threadIdx.x / CPR, cc = (int)threadIdx.x % CPR, sr32 = (int)sr;
  const T* src = pos + cc * 8;
  T* dst = W + r0 * LDS + cc * 8;
  const int* sl = slots + r0;
#pragma unroll
  for (int i0 = 0; i0 < ITERS; i0 += BATCH) {
    uint4 v[BATCH];
#pragma unroll
    for (int b = 0; b < BATCH && i0 + b < ITERS; ++b) {
      const int it = i0 + b;
      if (ROWS % RSTEP != 0 && r0 + it * RSTEP >= ROWS) break;
      v[b] = __ldg(reinterpret_cast<const uint4*>(src + sl[it * RSTEP] * sr32));
    }
#pragma unroll
    for (int b = 0; b < BATCH && i0 + b < ITERS; ++b) {
      const int it = i0 + b;
      if (ROWS % RSTEP != 0 && r0 + it * RSTEP >= ROWS) break;
      *reinterpret_cast<uint4*>(dst + it * RSTEP * LDS) = v[b];
    }
  }
}

// The 16 rows of the saturated slots: 0 / 1 = the column term's position rows at lo / hi (`col_pos`), 2 / 3 = the
// row term's (`row_pos`), 4..15 = 0 (a row of a term that is absent: 0).  Plain loads; visible after the caller's
// barrier.
template <typename T, int D>
__device__ __forceinline__ void load_sat_rows(T* S, const T* col_pos, int64_t col_sr, const T* row_pos,
                                              int64_t row_sr, int2 sslot) {
  constexpr int CPR = D / 8, LDS = D + 8;
  for_thread_chunks<16 * CPR, kThreads>([&](int c) {
    const int r = c / CPR, cc = c % CPR;
    const T* pos = r < 2 ? col_pos : r < 4 ? row_pos : nullptr;
    const int64_t sr = r < 2 ? col_sr : row_sr;
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

// The row term of this thread's rows (g, g + 8) at the saturated slots, {lo g, lo g+8, hi g, hi g+8}: columns 2 / 3
// of R_w . SatRows^T (held by lane 4 g + 1), rounded to T.
template <typename T, int D, typename L = PaddedRows<D>>
__device__ __forceinline__ float4 row_saturated_mma(const T* Rw, const T* S) {
  float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
  mma_rows_rows<T, D, 2, L>(acc, Rw, S);
  const int src = ((threadIdx.x & 31) & ~3) | 1;
  const float lo0 = __shfl_sync(0xffffffffu, acc[0][0], src), hi0 = __shfl_sync(0xffffffffu, acc[0][1], src);
  const float lo1 = __shfl_sync(0xffffffffu, acc[0][2], src), hi1 = __shfl_sync(0xffffffffu, acc[0][3], src);
  return make_float4(round_to<T>(lo0), round_to<T>(lo1), round_to<T>(hi0), round_to<T>(hi1));
}

// The column terms of a tile's COLS columns at the saturated slots, written into the 8 padding columns of the
// tile's rows (COLS rows of layout L): row c gets (term at lo, at hi, 1, 0, 0, 0, 0, 0) as T in columns D..D + 7,
// which is SatFold's B' for ldmatrix.  Warp w computes rows [16 w, 16 w + 16): C_w . SatRows[0..7]^T, one n-tile, where
// lane 4 g holds the lo / hi terms of rows g and g + 8.  The caller's barrier publishes them to the other warps.
template <typename T, int D, int COLS, typename L = PaddedRows<D>>
__device__ __forceinline__ void store_col_saturated(T* Cs, const T* S, int warp) {
  static_assert(D % 32 == 0, "two k-chunks per ldmatrix of the saturated rows");
  constexpr int LDS = D + 8;  // S's
  if (16 * warp >= COLS) return;  // warp-uniform
  const int lane = threadIdx.x & 31, lr = lane & 7, lm = lane >> 3, g = lane >> 2;
  T* Cw = L::at(Cs, 16 * warp, 0);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int kc = 0; kc < D / 16; kc += 2) {
    uint32_t bf[4];  // rows 0-7 of S x (k-chunk kc | kc + 1)
    ldmatrix_x4<false>(bf, S + lr * LDS + kc * 16 + lm * 8);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t af[4];
      ldmatrix_x4<false>(af, L::at(Cw, (lm & 1) * 8 + lr, (kc + h) * 16 + (lm >> 1) * 8));
      mma16816<T>(acc, af, bf + 2 * h);
    }
  }
  if ((lane & 3) == 0) {
    const uint32_t one = Pack<T>::pack(1.f, 0.f);
    *reinterpret_cast<uint4*>(L::at(Cw, g, D)) = make_uint4(Pack<T>::pack(acc[0], acc[1]), one, 0u, 0u);
    *reinterpret_cast<uint4*>(L::at(Cw, g + 8, D)) = make_uint4(Pack<T>::pack(acc[2], acc[3]), one, 0u, 0u);
  }
}

// launch_sat_terms' block: rows [r0, r0 + 64) of the key (by_query false) or query rows of (b, h), their column
// terms at the saturated slots (store_col_saturated, on the tile in smem) out to `out` rows koff / qoff + r, 16 bytes
// each.  smem: [64][D + 8] | [16][D + 8] (elements of T).
template <typename T, int D>
__device__ __forceinline__ void sat_terms_body(const Params& p, bool by_query, T* out, T* smem) {
  constexpr int ROWS = 64, LDS = D + 8;
  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H, r0 = blockIdx.x * ROWS;
  const SeqView sv = seq_view(p, b, h);
  const int len = by_query ? sv.Lq : sv.Lk;
  if (r0 >= len) return;  // (block-uniform)
  const T* xg = by_query ? reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sv.qrow * p.q_sr
                         : reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sv.krow * p.k_sr;
  const auto [pk, pq] = pos_rows<T>(p, b, h);
  T* xs = smem;
  T* sat = smem + ROWS * LDS;
  load_tile<T, ROWS, D, kThreads>(xs, xg, by_query ? p.q_sr : p.k_sr, r0, len);
  load_sat_rows<T, D>(sat, by_query ? pk : pq, by_query ? p.pk_sr : p.pq_sr, nullptr, 0, saturated_slots(p));
  __syncthreads();
  store_col_saturated<T, D, ROWS>(xs, sat, (int)threadIdx.x >> 5);
  __syncthreads();
  const int r = (int)threadIdx.x;
  if (r < ROWS && r0 + r < len)
    *reinterpret_cast<uint4*>(out + ((by_query ? sv.qoff : sv.koff) + r0 + r) * 8) =
        *reinterpret_cast<const uint4*>(xs + r * LDS + D);
}

// Saturated tiles fold their relative terms into the score MMA: s[nt] += A'_zone . B'_nt (one m16n8k8 per n-tile),
//   A'_zone (16 x 8, the warp's rows):      (zone == 1, zone == 2, the row's row term at the zone, 0, ...)
//   B'_nt   (8 x 8, the n-tile's columns):  (column term at lo, at hi, 1, 0, ...)   (store_col_saturated)
// so the accumulator of a saturated score holds q.k + row term + column term (both rounded to T, as HF's bmm rounds
// them) and the element loop adds nothing.  A' of both zones is built once per block from row_saturated_mma's result.
template <typename T>
struct SatFold {
  uint32_t a[2][2];  // [zone - 1][row g | row g + 8]

  __device__ __forceinline__ explicit SatFold(float4 row) {  // row: {lo g, lo g+8, hi g, hi g+8}
    const int t = threadIdx.x & 3;
    const uint32_t sel_lo = t == 0 ? Pack<T>::pack(1.f, 0.f) : 0u, sel_hi = t == 0 ? Pack<T>::pack(0.f, 1.f) : 0u;
    a[0][0] = t == 1 ? Pack<T>::pack(row.x, 0.f) : sel_lo;
    a[0][1] = t == 1 ? Pack<T>::pack(row.y, 0.f) : sel_lo;
    a[1][0] = t == 1 ? Pack<T>::pack(row.z, 0.f) : sel_hi;
    a[1][1] = t == 1 ? Pack<T>::pack(row.w, 0.f) : sel_hi;
  }
  // s[nt] += A'_zone . B'_nt for a saturated zone (1 / 2).  Cs: the tile's column rows with store_col_saturated's
  // padding (published); B' of four n-tiles per ldmatrix.
  template <int D, int NT, typename L = PaddedRows<D>>
  __device__ __forceinline__ void add(float (*s)[4], const T* Cs, int zone) const {
    static_assert(NT % 4 == 0, "four n-tiles per ldmatrix");
    const int lane = threadIdx.x & 31;
    const uint32_t az[2] = {zone == 1 ? a[0][0] : a[1][0], zone == 1 ? a[0][1] : a[1][1]};  // selects, no indexing
#pragma unroll
    for (int q = 0; q < NT; q += 4) {
      uint32_t bf[4];  // matrix m: rows 8 (q + m) + 0..7, columns D..D + 7
      ldmatrix_x4<false>(bf, L::at(Cs, 8 * q + lane, D));
#pragma unroll
      for (int m = 0; m < 4; ++m) mma1688<T>(s[q + m], az, bf[m]);
    }
  }
  // One tile's score products `mmas()` into s, with the saturated terms folded in.  When some warp's tile is
  // saturated (`any_sat`, block-uniform) and the column terms are not precomputed (`pre`: launch_sat_terms' rows,
  // copied into Cs's padding with the tile), every warp stores its columns' terms into the padding of the column tile
  // Cs (store_col_saturated; COLS columns per tile) before the products and one barrier after them publishes the
  // terms; a warp whose tile is saturated (zone 1 / 2) adds them.
  template <int D, int COLS, int NT, typename L = PaddedRows<D>, typename Mmas>
  __device__ __forceinline__ void score(float (*s)[4], T* Cs, const T* sat, int warp, bool any_sat, bool pre,
                                        int zone, Mmas&& mmas) const {
    const bool store = any_sat && !pre;  // (block-uniform)
    if (store) store_col_saturated<T, D, COLS, L>(Cs, sat, warp);
    mmas();
    if (store) __syncthreads();
    if (zone == 1 || zone == 2) add<D, NT, L>(s, Cs, zone);
  }
};

// The per-warp scratch of the skew and its reads.  COLS: columns per tile.  Layout (elements of T):
//   row term:    [16][CS], CS = COLS + 24 (COLS + 15 columns used; the stride spreads the 8 row groups over the banks)
//   column term: [COLS][PS], PS = 40 (per 16-column block, 31 columns used)
template <typename T, int COLS>
struct SkewTile {
  static constexpr int NC = COLS + 16;  // row-term columns computed (COLS + 15 used)
  static constexpr int CS = NC + 8;
  static constexpr int PS = 40;
  static constexpr int ELEMS = 16 * CS + COLS * PS;  // per warp
  static_assert(NC % 16 == 0, "row-term columns: a multiple of 16 (ldmatrix pairs)");
  T* rowv;  // this warp's
  T* colv;

  __device__ __forceinline__ explicit SkewTile(T* warp_scratch) : rowv(warp_scratch), colv(warp_scratch + 16 * CS) {}

  // Row-term products of warp w's 16 rows (Rw) against the window W (rows from 16 w).
  template <int D, typename L = PaddedRows<D>>
  __device__ __forceinline__ void row_products(const T* Rw, const T* W, int warp) const {
    constexpr int LDS = D + 8;  // W's
    float acc[NC / 8][4];
#pragma unroll
    for (int i = 0; i < NC / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    mma_rows_rows<T, D, NC / 8, L>(acc, Rw, W + 16 * warp * LDS);
    store_acc<T, NC / 8>(rowv, CS, acc);
  }
  // Column-term products of the tile's COLS column vectors (Cs) against the window W, for warp w's rows.
  template <int D, typename L = PaddedRows<D>>
  __device__ __forceinline__ void col_products(const T* Cs, const T* W, int warp) const {
    constexpr int LDS = D + 8;  // W's
#pragma unroll
    for (int kb = 0; kb < COLS / 16; ++kb) {
      float acc[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
      mma_rows_rows<T, D, 4, L>(acc, L::at(Cs, 16 * kb, 0), W + (16 * warp - 16 * kb + COLS - 16) * LDS);
      store_acc<T, 4>(colv + 16 * kb * PS, PS, acc);
    }
  }
  // The row / column term of the element (row gr of the warp, column c of the tile)
  __device__ __forceinline__ float row_at(int gr, int c) const {
    return Pack<T>::to_float(rowv[gr * CS + gr - c + COLS - 1]);
  }
  __device__ __forceinline__ float col_at(int gr, int c) const {
    return Pack<T>::to_float(colv[c * PS + gr - (c & 15) + 15]);
  }
};

// Shared memory of the relative terms for a block tile of 64 rows x COLS columns, at `base` (16-byte aligned):
// window [WR][D + 8] | saturated rows [16][D + 8] | 4 warps' SkewTile scratch | the window's slots [2][WR] (int:
// two tiles, filled one ahead).  ELEMS: its size in elements of T.
template <typename T, int COLS, int D>
struct RelSmem {
  static constexpr int LDS = D + 8;
  static constexpr int WR = 64 + COLS;  // window rows: the 64 + COLS - 1 distances of a block tile (+1)
  using Skew = SkewTile<T, COLS>;
  static constexpr int ELEMS = WR * LDS + 16 * LDS + 4 * Skew::ELEMS + 2 * WR * (int)(sizeof(int) / sizeof(T));
  T* win;
  T* sat;
  T* scratch;
  int* slots;

  __device__ __forceinline__ explicit RelSmem(T* base)
      : win(base),
        sat(base + WR * LDS),
        scratch(sat + 16 * LDS),
        slots(reinterpret_cast<int*>(scratch + 4 * Skew::ELEMS)) {}
  __device__ __forceinline__ Skew skew(int warp) const { return Skew(scratch + warp * Skew::ELEMS); }
  __device__ __forceinline__ int* slots_of(int stage) const { return slots + stage * WR; }

  // One band tile's products (block-uniform call: barriers inside): the row term (rows Rw against the window of
  // `row_pos`), then the column term (the tile's column vectors Cs against the window of `col_pos`), into the warp's
  // scratch when `band_warp` (its own tile lies in the band).  ws: the window's slots.  A term whose position rows are
  // nullptr is skipped.  L: the layout of Rw's and Cs's tiles.
  template <typename L = PaddedRows<D>>
  __device__ __forceinline__ void products(const Skew& skew, const int* ws, const T* row_pos, int64_t row_sr,
                                           const T* col_pos, int64_t col_sr, const T* Rw, const T* Cs, int warp,
                                           bool band_warp) const {
    load_window<T, WR, D>(win, ws, row_pos, row_sr);
    __syncthreads();
    if (band_warp && row_pos != nullptr) skew.template row_products<D, L>(Rw, win, warp);
    if (col_pos != nullptr) {
      __syncthreads();  // every warp done with the row term's window
      load_window<T, WR, D>(win, ws, col_pos, col_sr);
      __syncthreads();
      if (band_warp) skew.template col_products<D, L>(Cs, win, warp);
    }
    __syncwarp();  // the scratch this warp wrote, visible to its lanes
  }
};

}  // namespace dfa
