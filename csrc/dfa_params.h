// Host-visible parameter block and launchers of the fused kernels (no CUDA device code:
// included by the C++ bindings and by the .cu files).
#pragma once

#include <stdint.h>

namespace dfa {

struct Params {
  // inputs, element type T (fp16 / bf16); last dim contiguous, 16-byte aligned rows
  const void* q; const void* k; const void* v;
  int64_t q_sb, q_sh, q_sr;
  int64_t k_sb, k_sh, k_sr;
  int64_t v_sb, v_sh, v_sr;
  // output / its gradient
  void* o; int64_t o_sb, o_sh, o_sr;
  const void* dout; int64_t do_sb, do_sh, do_sr;
  // gradients; dv shares dk's strides (last dim contiguous)
  void* dq; void* dk; void* dv;
  int64_t dq_sb, dq_sh, dq_sr;
  int64_t dk_sb, dk_sh, dk_sr;
  // softmax statistics, float32, contiguous [B,H,Lq] (padded) or [H,Tq] (varlen); LSE +inf: no key
  // (the backward treats any non-finite LSE so: p = 0).  delta = rowsum(dO * O), the same layout: written by the
  // backward's dq kernel (from o and dout), read by its dK/dV kernel
  float* lse; const float* lse_c; float* delta;
  // relative terms: the slot table int32 [Lq + Lk - 1] (nullptr: no relative term) and S2 = 2*span slots;
  // pos_key / pos_query [B|1, H, S2, D] (varlen [H, S2, D]) in slot order, element type T, last dim contiguous,
  // 16-byte aligned rows; nullptr = term absent
  const int32_t* table; int S2;
  const void* pos_k; const void* pos_q;
  int64_t pk_sb, pk_sh, pk_sr, pq_sb, pq_sh, pq_sr;
  // saturation band of the slot table (positions.slot_band): every d = i - j <= band_lo has one slot and every
  // d >= band_hi another; tiles wholly outside it skip the skew.  -2^30 / 2^30: no shortcut.
  int band_lo, band_hi;
  // the column terms of saturated tiles, precomputed (launch_sat_terms; nullptr: each score kernel computes them per
  // tile): rows of 8 T, (term at the band_lo slot, at the band_hi slot, 1, 0, 0, 0, 0, 0), row koff + j of key j
  // (k_j . pos_query: the forward and dq kernels) / qoff + i of query i (q_i . pos_key: the dK/dV kernel)
  const void* sat_terms_k; const void* sat_terms_q;
  // masks: key_mask uint8 [B,Lk] (1 = attend); uniform uint8 [B,1|H,Lq] (1 = uniform row)
  const uint8_t* key_mask; int64_t km_sb;
  const uint8_t* uniform; int64_t un_sb, un_sh;
  // dropout: rng -> int64 [2] = {seed, offset} on the device; keep iff a 16-bit Philox half >= drop_thresh
  const int64_t* rng; uint32_t drop_thresh; float drop_scale; int dropout;
  // relative-gradient band buffers (backward only; nullptr when no relative term): band entries of the element type
  // BandType<T> (dfa_bwd.cu: bf16 for bf16 inputs, float32 for fp16), the saturated sums float32
  void* band_q; float* sat_q; void* band_k; float* sat_k; int dmin; int W;
  int B, H, Lq, Lk;
  // the dropout stream's (b, h) is b * h_all + h0 + h: the call's own when the backward runs a group of its heads
  // (H of them, views from head h0 on; h_all = the call's heads); h_all = H, h0 = 0 otherwise
  int h_all, h0;
  float scale, scale_log2;
  // Packed variable-length mode (cu_q != nullptr): B = N sequences, Lq/Lk = max_seqlen_q/k (grid
  // extent and slot-table offset: slot = table[i - j + Lk - 1], i, j within the sequence);
  // sequence n is token rows cu_q[n]..cu_q[n+1] of q/o/dout (cu_k: k/v) and the *_sb strides are 0.
  // Float / table buffers are [H, Tq|Tk, ...]: row (h*Tq + cu_q[n] + i).
  const int32_t* cu_q; const int32_t* cu_k; int64_t Tq, Tk;
};

// Host launchers (defined in dfa_fwd.cu / dfa_bwd.cu).  dtype: 0 = fp16, 1 = bf16.
// return nullptr on success, else a static error string
const char* launch_fwd(const Params& p, int dtype, int head_dim, void* stream);
// Which variant the last launch_fwd / launch_bwd launched: "wgmma" (sm_90a, DEBERTA_FAST_CUDA_WGMMA=1), "mma.sync",
// or "" (none yet)
const char* last_fwd_kernel();
const char* last_bwd_kernel();
void reset_last_fwd_kernel();
void reset_last_kernels();  // both to ""
// The backward's two score kernels, launched one at a time (BWD_DQ: dq and the c2p band of scale*dS; BWD_DKDV: dK, dV
// and the p2c band), so that the host can reduce and free one band buffer before it allocates the other
enum BwdKernel : int { BWD_DQ = 0, BWD_DKDV = 1 };
const char* launch_bwd(const Params& p, int dtype, int head_dim, BwdKernel which, void* stream);
// The saturated column terms of every key row (by_query false: k . pos_query, p.sat_terms_k's layout) or query
// row (q . pos_key), at the slots of p.band_lo / band_hi: out [rows, 8] of the element type, rows = B*H*Lk (padded) /
// H*Tk (varlen) for keys, the same with Lq / Tq for queries.  The same bits as the score kernels' own per-tile
// products (store_col_saturated) for the rows of a sequence; the tiles' rows past its end get zeros (masked there).
const char* launch_sat_terms(const Params& p, bool by_query, void* out, int dtype, int head_dim, void* stream);
// The fraction of the 64 x 64 tiles of an Lq x Lk call wholly beyond the slot band (every d = i - j <= band_lo, or
// every d >= band_hi: tile_saturation's zones 1 / 2)
inline double saturated_fraction(int64_t Lq, int64_t Lk, int64_t band_lo, int64_t band_hi) {
  const int64_t nq = (Lq + 63) / 64, nk = (Lk + 63) / 64;
  if (nq <= 0 || nk <= 0) return 0.0;
  const auto clamp = [&](int64_t x) { return x < 0 ? int64_t(0) : x > nk ? nk : x; };
  const auto floor_div = [](int64_t a, int64_t d) { return a >= 0 ? a / d : -((-a + d - 1) / d); };
  int64_t sat = 0;
  for (int64_t qi = 0; qi < nq; ++qi) {
    const int64_t r0 = 64 * qi;
    // zone 2: r0 - (64 kj + 63) >= band_hi; zone 1: r0 + 63 - 64 kj <= band_lo
    const int64_t below = clamp(floor_div(r0 - 63 - band_hi, 64) + 1);
    const int64_t above = nk - clamp(-floor_div(-(r0 + 63 - band_lo), 64));
    sat += below + above;
  }
  return double(sat) / double(nq * nk);
}
// band_to_slots: dC2P (band_q / sat_q) or, by_key, dP2C (band_k / sat_k) of `rows` rows from the score kernel's band
// buffers (p.dmin, p.W, p.S2, the slot table and band, the varlen offsets); the saturated sums go to the table's slots
// at the band edges (sat_table_index)
const char* launch_band_to_slots(const Params& p, bool by_key, const int32_t* perm, const int32_t* offs, void* out,
                                 int dtype, int64_t rows, void* stream);

// Index into the slot table of distance d (clamped to the table [0, Lq + Lk - 1)): where the slot of the band edge
// d = band_lo / band_hi sits.
#ifdef __CUDACC__
#define DFA_HOST_DEVICE __host__ __device__
#else
#define DFA_HOST_DEVICE
#endif
DFA_HOST_DEVICE inline int sat_table_index(int d, int Lq, int Lk) {
  const int i = d + Lk - 1, last = Lq + Lk - 2;
  return i < 0 ? 0 : i > last ? last : i;
}
}  // namespace dfa
