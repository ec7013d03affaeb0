// Fused backward of DeBERTa disentangled attention, deterministic (no atomics).  Both score kernels recompute S
// exactly as the forward does (dfa_rel.cuh: per band tile the position rows' products on tensor cores, read back at
// each element's diagonal; beyond the slot band per-row constants and one value per column; no C2P / P2C table),
// and the loop tiles (K / V in dq, Q / dO in dK/dV) come by cp.async, double-buffered (one stage at D = 128):
//   * dq kernel   : one block per 64 queries, loops over 32-key tiles -> dQ (content part)
//                   and the c2p band of scale*dS (see below).
//   * dkdv kernel : one block per 64 keys, loops over 32-query tiles -> dK (content part),
//                   dV and the p2c band of scale*dS.  Its tiles are keys x queries: the skew's row term is p2c
//                   (pos_query) and its column term c2p (pos_key), on a window that runs down in d.
//   * band_to_slots: fixed-order segment sums turning a band into dC2P / dP2C.
// Both score kernels recompute P from the saved LSE (FA2); a non-finite LSE (a row with no key) gives P = 0
// (dfa_softmax.h: lse_log2).  Delta = rowsum(dO*O): the dq kernel computes it for its rows (from O and dO, in a fixed
// order) and stores it; the dK/dV kernel, launched after it, reads it.  Like the forward, both score kernels serve
// the padded batch and the packed varlen layout (seq_view(): per-sequence offsets at run time, early exit past a
// sequence's end); band rows are then (h*T + token) so band_to_slots is layout-agnostic.
//
// Relative-table gradients.  With dS = dL/ds (s = scaled score):
//   dC2P[i, s] = scale * sum_{j : slot(i-j) = s} dS[i, j],  dP2C[j, s] likewise over i.
// slot depends on d = i - j only and is constant outside the band (lo, hi) of positions.slot_band: the table's
// slot at d = lo below it, at d = hi above it.  The dq kernel writes scale*dS[i, i-d] for d in the window
// [dmin, dmin+W) to band_q[i, d-dmin] (one writer per element) and sums d < dmin / d >= dmin+W into sat_q[i, 0/1]
// in a fixed order; band_to_slots then sums each slot's d's in a fixed order (CSR `perm`/`offs` from the host).
// Same for keys.  The host turns dC2P / dP2C into the dq / dk / position-row terms (two GEMMs each).
// WG (sm_90a, opt-in: DEBERTA_FAST_CUDA_WGMMA=1 or =serial, as the forward's): the score kernels' products on wgmma
// (dfa_wgmma.cuh), their Q / dO / K / V tiles in the CoreRows layout; everything else the same code.
#include "dfa_rel.cuh"
#include "dfa_wgmma.cuh"

namespace dfa {

template <typename T, int D, bool WG = false>
struct BwdCfg {
  using L = std::conditional_t<WG, CoreRows<D>, PaddedRows<D>>;  // the Q / dO / K / V tiles' layout
  // dq kernel: 64 queries per block, BN keys per iteration.  BN = 32 and, at D = 128, one K / V stage: with the
  // relative terms' shared memory (window, skew scratch) the block fits sm_86 / sm_89's 99 KB.  (Strided copies at
  // D = 128: the static ones push it past 255 registers.)  Sources advanced per tile (KVTiles' ADVANCE) at D = 64
  // and, in the dkdv kernel, at D = 64 and the wgmma D = 128: at D = 32 the band tiles' longest paths grew by 12 - 16
  // instructions per element, and the mma.sync D = 128 dkdv kernel spilled 32 B on sm_90a with the batched window
  // loads.
  static constexpr int DQ_BM = 64, DQ_BN = 32;
  using DQ_KV = KVTiles<T, DQ_BN, D, (D >= 128 ? 1 : 2), (D < 128), L, (D == 64)>;
  using DQ_Rel = RelSmem<T, DQ_BN, D>;
  static constexpr int DQ_BASE = 2 * L::elems(DQ_BM) + DQ_KV::SMEM_ELEMS;  // Q | dO | K/V stages
  static constexpr int DQ_SMEM = DQ_BASE * (int)sizeof(T);
  static constexpr int DQ_SMEM_REL = (DQ_BASE + DQ_Rel::ELEMS) * (int)sizeof(T);
  // dkdv kernel: 64 keys per block, BM queries per iteration, Q / dO double-buffered by cp.async (one stage at
  // D = 128, for the same reason)
  static constexpr int KV_BN = 64, KV_BM = 32;
  using KV_QDO = KVTiles<T, KV_BM, D, (D >= 128 ? 1 : 2), true, L, (D == 64 || (WG && D == 128))>;
  using KV_Rel = RelSmem<T, KV_BM, D>;
  // K | V | Q/dO stages | row statistics (lse2, delta, uniform: 3 x BM x 4 B) | Rel
  static constexpr int KV_BASE = 2 * L::elems(KV_BN) + KV_QDO::SMEM_ELEMS + KV_BM * 12 / (int)sizeof(T);
  static constexpr int KV_SMEM = KV_BASE * (int)sizeof(T);
  static constexpr int KV_SMEM_REL = (KV_BASE + KV_Rel::ELEMS) * (int)sizeof(T);
  static_assert(DQ_SMEM_REL <= 101376 && KV_SMEM_REL <= 101376,
                "the backward kernels must fit sm_86 / sm_89's 99 KB of shared memory per block");
  static_assert((KV_BM * 12) % 16 == 0, "the relative terms' shared memory stays 16-byte aligned");
};

// The band's entries (one dS each, summed per slot by band_to_slots in float32): bf16 for bf16 inputs, the value the
// dS x K / dS^T x Q products take as their operand (half the bytes of float32, written once and read once per
// backward); float32 for fp16, whose range would flush the small dS of a softmax's tail to zero.
template <typename T> struct BandEntry { using type = float; };
template <> struct BandEntry<__nv_bfloat16> { using type = __nv_bfloat16; };
template <typename T> using BandType = typename BandEntry<T>::type;
__device__ __forceinline__ float band_float(float x) { return x; }
__device__ __forceinline__ float band_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename B> __device__ __forceinline__ B band_entry(float x) {
  if constexpr (std::is_same_v<B, float>) return x;
  else return __float2bfloat16_rn(x);
}

// dS of element (i, j), d = i - j, into the relative-table gradients: the saturated sums sat[0] (d below the band
// window) / sat[1] (above it), else band_row[d - dmin] (one writer per element).  SAT: the warp's whole tile is
// saturated (zone 1: below, 2: above), no window test; the same sums in the same order.
template <bool SAT, typename B>
__device__ __forceinline__ void add_rel_grad(const Params& p, int zone, float ds, int d, float (&sat)[2],
                                             B* band_row) {
  if constexpr (SAT) {
    if (zone == 1) sat[0] += ds;
    else sat[1] += ds;
  } else {
    const int w = d - p.dmin;
    if (w < 0) sat[0] += ds;
    else if (w >= p.W) sat[1] += ds;
    else band_row[w] = band_entry<B>(ds);
  }
}

// ---------------------------------------------------------------------------
template <typename T, int D, bool WG>
__device__ __forceinline__ void bwd_dq_body(DFA_KERNEL_PARAMS(p)) {
  DFA_PROFILE_ASSUME(p);
  using Cfg = BwdCfg<T, D, WG>;
  using L = typename Cfg::L;
  using Rel = typename Cfg::DQ_Rel;
  constexpr int BM = Cfg::DQ_BM, BN = Cfg::DQ_BN, NT = BN / 8;
  DFA_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* dOs = Qs + L::elems(BM);
  const Rel rs(Qs + Cfg::DQ_BASE);  // relative terms only (the launch sizes shared memory by that)

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int dbh = b * p.h_all + p.h0 + h;  // the dropout stream's (b, h) (Params::h_all)
  const int q0 = blockIdx.x * BM;
  const SeqView sv = seq_view(p, b, h);
  if (q0 >= sv.Lq) return;  // varlen: past this sequence's end (block-uniform)
  const int Lq = sv.Lq, Lk = sv.Lk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  const T* qg = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sv.qrow * p.q_sr;
  const T* kg = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sv.krow * p.k_sr;
  const T* vg = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + sv.krow * p.v_sr;
  const T* dog = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + sv.qrow * p.do_sr;
  const T* og = reinterpret_cast<const T*>(p.o) + b * p.o_sb + h * p.o_sh + sv.qrow * p.o_sr;
  const bool rel = p.table != nullptr;
  const auto [pk, pq] = pos_rows<T>(p, b, h);
  const uint8_t* km_b = p.key_mask ? p.key_mask + b * p.km_sb : nullptr;
  const bool rel_grad = p.band_q != nullptr;
  const auto skew = rs.skew(warp);
  const T* Qw = L::at(Qs, warp * 16, 0);
  const DescsOf<T, L, WG> dsc(Qs);

  int rows[2];
  bool uni[2];
  float lse2[2], dlt[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int i = q0 + warp * 16 + g + 8 * hh;
    rows[hh] = i;
    const bool ok = i < Lq;
    uni[hh] = p.uniform != nullptr && ok && p.uniform[b * p.un_sb + h * p.un_sh + i] != 0;
    lse2[hh] = ok ? lse_log2(p.lse_c[sv.qoff + i]) : 0.f;  // +inf (p = 0) unless finite
    // delta = rowsum(dO * O) of row i, the quad's four shares; stored for the dK/dV kernel
    dlt[hh] = quad_sum(ok ? row_dot_share<T, D>(dog + (int64_t)i * p.do_sr, og + (int64_t)i * p.o_sr, t) : 0.f);
    if (ok && t == 0) p.delta[sv.qoff + i] = dlt[hh];
    dlt[hh] *= p.scale;  // from here delta * scale: ds = pr * fmaf(dp, dps, -delta * scale)
  }
  // dp's factor: scale, and a kept element's 1 / (1 - p_drop) (no product per element)
  const float dps = p.dropout ? p.scale * p.drop_scale : p.scale;
  const bool warp_uniform = p.uniform != nullptr && any_set(uni[0] || uni[1]);  // some HF uniform row here
  uint2 key = make_uint2(0u, 0u);
  uint32_t offset = 0u;
  if (p.dropout) {
    const uint64_t seed = (uint64_t)p.rng[0];
    key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    offset = (uint32_t)p.rng[1];
  }

  load_tile<T, BM, D, kThreads, false, true, L>(Qs, qg, p.q_sr, q0, Lq);
  load_tile<T, BM, D, kThreads, false, true, L>(dOs, dog, p.do_sr, q0, Lq);
  if constexpr (WG) fence_proxy_async();  // Q, dO, read by wgmma: published by the next barrier
  float4 c2p_sat = make_float4(0.f, 0.f, 0.f, 0.f);  // {lo g, lo g+8, hi g, hi g+8}, as the forward's
  if (rel) {
    load_sat_rows<T, D>(rs.sat, pq, p.pq_sr, pk, p.pk_sr, saturated_slots(p));
    if (tile_saturation(p, q0, BM, 0, BN) == 0) fill_slots<Rel::WR, 1>(rs.slots, p, q0 - (BN - 1));  // tile 0
    __syncthreads();  // Q, the saturated rows, the first window's slots
    c2p_sat = row_saturated_mma<T, D, L>(Qw, rs.sat);
  }
  const SatFold<T> fold(c2p_sat);

  float dq[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
  float sat[2][2] = {{0.f, 0.f}, {0.f, 0.f}};  // [row][lo/hi]

  // the keys' saturated column terms, precomputed (launch_sat_terms): into K's padding with each tile's copy
  const T* kc = rel && p.sat_terms_k != nullptr
                        ? reinterpret_cast<const T*>(p.sat_terms_k) + sv.koff * 8
                        : nullptr;
  const typename Cfg::DQ_KV kv{dOs + L::elems(BM), kg, vg, p.k_sr, p.v_sr, Lk, kc};
  kv.start();
  for (int k0 = 0, stage = 0; k0 < Lk; k0 += BN, stage ^= 1) {
    const T* Ks = kv.acquire(k0, stage);
    const T* Vs = Ks + Cfg::DQ_KV::TILE;

    // 0: the band (skew); 1 / 2: beyond it (d <= band_lo / d >= band_hi: one slot, and every dS goes to that side's
    // run sum); 3: no relative term.  The products as in the forward (block-uniform call)
    const int zone = rel ? tile_saturation(p, q0 + warp * 16, 16, k0, BN) : 3;  // warp-uniform
    if (rel && tile_saturation(p, q0, BM, k0, BN) == 0)
      rs.template products<L>(skew, rs.slots_of(stage), pk, p.pk_sr, pq, p.pq_sr, Qw, Ks, warp, zone == 0);
    // the saturated tiles' relative terms ride the score MMA, as in the forward (SatFold::score)
    const bool any_sat =
        rel && (tile_saturation(p, q0, 16, k0, BN) == 1 || tile_saturation(p, q0 + BM - 16, 16, k0, BN) == 2);
    float s[NT][4], dp[NT][4];
    fold.template score<D, BN, NT, L>(s, const_cast<T*>(Ks), rs.sat, warp, any_sat, kc != nullptr, zone, [&] {
      product_rows_rows<T, D, BN, WG>(s, dsc, Qs, Qw, Ks);
      product_rows_rows<T, D, BN, WG>(dp, dsc, dOs, L::at(dOs, warp * 16, 0), Vs);
    });

    const bool checked =
        tile_needs_checks(q0 + warp * 16, 16, Lq, k0, BN, Lk, warp_uniform || any_key_masked(km_b, k0, BN, Lk));
    dispatch_tile(zone != 0, checked, [&](auto saturated, auto checks) {
      constexpr bool SAT = decltype(saturated)::value, CHECK = decltype(checks)::value;
      static_assert(NT % 2 == 0, "dropout words come in n-tile pairs");
      uint4 dw = {};  // per n-tile pair: the lane's own Philox call (its rows x its 4 keys of the pair)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (p.dropout && nt % 2 == 0) dw = dropout_words(key, offset, dbh, rows[0], k0 + nt * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, c = nt * 8 + 2 * t + (e & 1), i = rows[hh], j = k0 + c;
          const bool valid = !CHECK || (i < Lq && j < Lk);
          const float acc = s[nt][e];
          float x;  // the exponent: score - LSE in log2 units
          if constexpr (SAT && !CHECK) {
            x = fmaf(acc, p.scale_log2, -lse2[hh]);  // the unscaled accumulator (q.k + row + column term)
          } else if constexpr (SAT) {
            x = masked_score<CHECK>(i, j, Lq, Lk, km_b, uni[hh], [&] { return acc * p.scale_log2; }) - lse2[hh];
          } else {
            const float c2pv = pk != nullptr ? skew.row_at(g + 8 * hh, c) : 0.f;
            const float p2cv = pq != nullptr ? skew.col_at(g + 8 * hh, c) : 0.f;
            x = finish_score<CHECK>(p, acc, c2pv, p2cv, i, j, Lq, Lk, km_b, uni[hh]) - lse2[hh];
          }
          const float pr = valid ? exp2f(x) : 0.f;
          // scale * (keep / (1 - p_drop) * dp - delta): a dropped element's dp is 0
          float u = fmaf(dp[nt][e], dps, -dlt[hh]);
          if (p.dropout && !dropout_keep(word_of(dw, 2 * hh + nt % 2), j, p.drop_thresh)) u = -dlt[hh];
          const float ds = ((CHECK && uni[hh]) || !valid) ? 0.f : pr * u;
          s[nt][e] = ds;
          if (rel_grad && valid)
            add_rel_grad<SAT>(p, zone, ds, i - j, sat[hh], static_cast<BandType<T>*>(p.band_q) + (sv.qoff + i) * p.W);
        }
      }
    });
    product_acc_rows<T, D, BN, WG>(dq, s, dsc, Ks);
    // the next tile's window slots, published by release()'s barrier (the other half was last read a tile ago)
    if (rel && k0 + BN < Lk && tile_saturation(p, q0, BM, k0 + BN, BN) == 0)
      fill_slots<Rel::WR, 1>(rs.slots_of(stage ^ 1), p, q0 - (k0 + BN) - (BN - 1));
    kv.release(k0);
  }

  T* dqg = reinterpret_cast<T*>(p.dq) + b * p.dq_sb + h * p.dq_sh + sv.qrow * p.dq_sr;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float lo = quad_sum(sat[hh][0]), hi = quad_sum(sat[hh][1]);
    const int i = rows[hh];
    if (i >= Lq) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<uint32_t*>(dqg + (int64_t)i * p.dq_sr + dt * 8 + 2 * t) =
          Pack<T>::pack(dq[dt][2 * hh], dq[dt][2 * hh + 1]);
    if (rel_grad && t == 0) {
      p.sat_q[(sv.qoff + i) * 2 + 0] = lo;
      p.sat_q[(sv.qoff + i) * 2 + 1] = hi;
    }
  }
}

// ---------------------------------------------------------------------------
template <typename T, int D, bool WG>
__device__ __forceinline__ void bwd_dkdv_body(DFA_KERNEL_PARAMS(p)) {
  DFA_PROFILE_ASSUME(p);
  using Cfg = BwdCfg<T, D, WG>;
  using L = typename Cfg::L;
  using Rel = typename Cfg::KV_Rel;
  constexpr int BN = Cfg::KV_BN, BM = Cfg::KV_BM, NT = BM / 8;
  static_assert(BM <= 32, "one query column per lane in the uniform-row vote");
  DFA_DYNAMIC_SMEM(smem_raw);
  T* Ks = reinterpret_cast<T*>(smem_raw);
  T* Vs = Ks + L::elems(BN);
  T* QdOs = Vs + L::elems(BN);  // Cfg::KV_QDO's stages
  float* lse2_s = reinterpret_cast<float*>(QdOs + Cfg::KV_QDO::SMEM_ELEMS);
  float* dlt_s = lse2_s + BM;
  int* uni_s = reinterpret_cast<int*>(dlt_s + BM);
  const Rel rs(reinterpret_cast<T*>(smem_raw) + Cfg::KV_BASE);  // relative terms only

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int dbh = b * p.h_all + p.h0 + h;  // the dropout stream's (b, h) (Params::h_all)
  const int k0 = blockIdx.x * BN;
  const SeqView sv = seq_view(p, b, h);
  if (k0 >= sv.Lk) return;  // varlen: past this sequence's last key (block-uniform)
  const int Lq = sv.Lq, Lk = sv.Lk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  const T* qg = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sv.qrow * p.q_sr;
  const T* kg = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sv.krow * p.k_sr;
  const T* vg = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + sv.krow * p.v_sr;
  const T* dog = reinterpret_cast<const T*>(p.dout) + b * p.do_sb + h * p.do_sh + sv.qrow * p.do_sr;
  const bool rel = p.table != nullptr;
  const auto [pk, pq] = pos_rows<T>(p, b, h);
  const uint8_t* km_b = p.key_mask ? p.key_mask + b * p.km_sb : nullptr;
  const bool rel_grad = p.band_k != nullptr;
  const auto skew = rs.skew(warp);
  const T* Kw = L::at(Ks, warp * 16, 0);
  const DescsOf<T, L, WG> dsc(Ks);

  int cols_j[2];  // rows of the transposed tile are keys
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) cols_j[hh] = k0 + warp * 16 + g + 8 * hh;
  const bool masked_keys = any_key_masked(km_b, k0 + warp * 16, 16, Lk);  // this warp's rows (keys)
  uint2 key = make_uint2(0u, 0u);
  uint32_t offset = 0u;
  if (p.dropout) {
    const uint64_t seed = (uint64_t)p.rng[0];
    key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    offset = (uint32_t)p.rng[1];
  }

  load_tile<T, BN, D, kThreads, false, true, L>(Ks, kg, p.k_sr, k0, Lk);
  load_tile<T, BN, D, kThreads, false, true, L>(Vs, vg, p.v_sr, k0, Lk);
  if constexpr (WG) fence_proxy_async();  // K, V, read by wgmma: published by the next barrier
  // keys x queries: the row term is p2c (pos_query), the column term c2p (pos_key); the window runs down in d from
  // dmax = q0 - k0 + BM - 1
  float4 p2c_sat = make_float4(0.f, 0.f, 0.f, 0.f);  // this thread's keys' p2c: {lo g, lo g+8, hi g, hi g+8}
  if (rel) {
    load_sat_rows<T, D>(rs.sat, pk, p.pk_sr, pq, p.pq_sr, saturated_slots(p));
    if (tile_saturation(p, 0, BM, k0, BN) == 0) fill_slots<Rel::WR, -1>(rs.slots, p, -k0 + BM - 1);  // tile 0
    __syncthreads();  // K, the saturated rows, the first window's slots
    p2c_sat = row_saturated_mma<T, D, L>(Kw, rs.sat);
  }
  const SatFold<T> fold(p2c_sat);

  const float dps = p.dropout ? p.scale * p.drop_scale : p.scale;  // as the dq kernel's
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  float sat[2][2] = {{0.f, 0.f}, {0.f, 0.f}};

  // the queries' saturated column terms, precomputed (launch_sat_terms): into Q's padding with each tile's copy
  const T* qc = rel && p.sat_terms_q != nullptr
                        ? reinterpret_cast<const T*>(p.sat_terms_q) + sv.qoff * 8
                        : nullptr;
  const typename Cfg::KV_QDO qt{QdOs, qg, dog, p.q_sr, p.do_sr, Lq, qc};
  qt.start();
  for (int q0 = 0, stage = 0; q0 < Lq; q0 += BM, stage ^= 1) {
    // this tile's row statistics (the previous iteration's release() barrier: nobody reads the old ones)
    for (int r = threadIdx.x; r < BM; r += kThreads) {
      const int i = q0 + r;
      const bool ok = i < Lq;
      lse2_s[r] = ok ? lse_log2(p.lse_c[sv.qoff + i]) : 0.f;
      dlt_s[r] = ok ? p.delta[sv.qoff + i] * p.scale : 0.f;  // delta * scale (as the dq kernel's)
      uni_s[r] = (p.uniform != nullptr && ok) ? (int)p.uniform[b * p.un_sb + h * p.un_sh + i] : 0;
    }
    const T* Qs = qt.acquire(q0, stage);  // its barrier also publishes the statistics (and K / V on the first)
    const T* dOs = Qs + Cfg::KV_QDO::TILE;

    // zone 1 / 2: this warp's keys x the query tile wholly beyond the band (see the dq kernel); 3: no relative term
    const int zone = rel ? tile_saturation(p, q0, BM, k0 + warp * 16, 16) : 3;  // warp-uniform
    if (rel && tile_saturation(p, q0, BM, k0, BN) == 0)
      rs.template products<L>(skew, rs.slots_of(stage), pq, p.pq_sr, pk, p.pk_sr, Kw, Qs, warp, zone == 0);
    // the saturated tiles' relative terms ride the score MMA (SatFold::score; here warp 3 has the smallest distances)
    const bool any_sat =
        rel && (tile_saturation(p, q0, BM, k0 + BN - 16, 16) == 1 || tile_saturation(p, q0, BM, k0, 16) == 2);
    float s[NT][4], dp[NT][4];
    fold.template score<D, BM, NT, L>(s, const_cast<T*>(Qs), rs.sat, warp, any_sat, qc != nullptr, zone, [&] {
      product_rows_rows<T, D, BM, WG>(s, dsc, Ks, Kw, Qs);                           // S^T  [keys x queries]
      product_rows_rows<T, D, BM, WG>(dp, dsc, Vs, L::at(Vs, warp * 16, 0), dOs);  // dP^T (before dropout)
    });

    // rows are keys (the warp's: masked_keys), columns queries (this tile's uniform rows, from shared memory)
    const bool tile_uniform = p.uniform != nullptr && any_set(lane < BM && uni_s[lane] != 0);
    const bool checked = tile_needs_checks(q0, BM, Lq, k0 + warp * 16, 16, Lk, masked_keys || tile_uniform);
    dispatch_tile(zone != 0, checked, [&](auto saturated, auto checks) {
      constexpr bool SAT = decltype(saturated)::value, CHECK = decltype(checks)::value;
      static_assert(NT % 2 == 0, "dropout words come in n-tile pairs");
      uint4 dw[2] = {};  // per n-tile pair: the calls of the lane's two queries, one its own, one its neighbour's
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (p.dropout && nt % 2 == 0) pair_dropout_words(dw, key, offset, dbh, q0 + 8 * nt, cols_j[0] - g, g, t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, j = cols_j[hh], il = nt * 8 + 2 * t + (e & 1), i = q0 + il;
          const bool valid = !CHECK || (i < Lq && j < Lk);
          const bool u = CHECK && uni_s[il] != 0;  // an unchecked tile has none (the vote)
          const float acc = s[nt][e];
          float x;  // the exponent: score - LSE in log2 units
          if constexpr (SAT && !CHECK) {
            x = fmaf(acc, p.scale_log2, -lse2_s[il]);  // the unscaled accumulator (q.k + row + column term)
          } else if constexpr (SAT) {
            x = masked_score<CHECK>(i, j, Lq, Lk, km_b, u, [&] { return acc * p.scale_log2; }) - lse2_s[il];
          } else {
            const float c2pv = pk != nullptr ? skew.col_at(g + 8 * hh, il) : 0.f;
            const float p2cv = pq != nullptr ? skew.row_at(g + 8 * hh, il) : 0.f;
            x = finish_score<CHECK>(p, acc, c2pv, p2cv, i, j, Lq, Lk, km_b, u) - lse2_s[il];
          }
          const float pr = valid ? exp2f(x) : 0.f;
          // pd: the kept probability (dV takes the 1 / (1 - p_drop) once, in the epilogue); ds as the dq kernel's
          float pd = pr, us = fmaf(dp[nt][e], dps, -dlt_s[il]);
          if (p.dropout && !dropout_keep(word_of(dw[e & 1], 2 * (nt % 2) + hh), j, p.drop_thresh)) {
            pd = 0.f;
            us = -dlt_s[il];
          }
          const float ds = (u || !valid) ? 0.f : pr * us;
          s[nt][e] = pd;
          dp[nt][e] = ds;
          if (rel_grad && valid)
            add_rel_grad<SAT>(p, zone, ds, i - j, sat[hh], static_cast<BandType<T>*>(p.band_k) + (sv.koff + j) * p.W);
        }
      }
    });
    product_acc_rows<T, D, BM, WG>(dv, s, dsc, dOs);
    product_acc_rows<T, D, BM, WG>(dk, dp, dsc, Qs);
    // the next tile's window slots (published by release()'s barrier)
    if (rel && q0 + BM < Lq && tile_saturation(p, q0 + BM, BM, k0, BN) == 0)
      fill_slots<Rel::WR, -1>(rs.slots_of(stage ^ 1), p, (q0 + BM) - k0 + BM - 1);
    qt.release(q0);
  }

  const int64_t kbase = b * p.dk_sb + h * p.dk_sh + sv.krow * p.dk_sr;
  const float dvs = p.dropout ? p.drop_scale : 1.f;  // the kept probabilities' 1 / (1 - p_drop)
  T* dkg = reinterpret_cast<T*>(p.dk) + kbase;
  T* dvg = reinterpret_cast<T*>(p.dv) + kbase;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float lo = quad_sum(sat[hh][0]), hi = quad_sum(sat[hh][1]);
    const int j = cols_j[hh];
    if (j >= Lk) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<uint32_t*>(dkg + (int64_t)j * p.dk_sr + dt * 8 + 2 * t) =
          Pack<T>::pack(dk[dt][2 * hh], dk[dt][2 * hh + 1]);
      *reinterpret_cast<uint32_t*>(dvg + (int64_t)j * p.dk_sr + dt * 8 + 2 * t) =
          Pack<T>::pack(dv[dt][2 * hh] * dvs, dv[dt][2 * hh + 1] * dvs);
    }
    if (rel_grad && t == 0) {
      p.sat_k[(sv.koff + j) * 2 + 0] = lo;
      p.sat_k[(sv.koff + j) * 2 + 1] = hi;
    }
  }
}

// ---------------------------------------------------------------------------
// out[r, s] = sum_{k in [offs[s], offs[s+1])} band[r, perm[k]] + (s == slot lo) sat[r,0] + (s == slot hi) sat[r,1]
// over the entries the score kernel wrote: row r (a query, or a key when BY_KEY) has distances d = i - j only for
// j (i) inside its sequence, so band columns w = d - dmin outside [w0, w1) were never written and are skipped (the
// band buffers are not zero-filled; inside [w0, w1) every entry is written because the host keeps the window strictly
// inside the saturation band, Bands::alloc).  Grid-stride over the int64 rows; offs / perm entries outside [0, W) are
// skipped (a direct op call with a bad CSR cannot read out of bounds, nor can bad cu_seqlens: w0, w1 stay in [0, W]).
template <typename T, bool BY_KEY>
__global__ void __launch_bounds__(kThreads) dfa_band_to_slots_kernel(const Params p, const int32_t* __restrict__ perm,
                                                                     const int32_t* __restrict__ offs, T* out,
                                                                     int64_t rows) {
  const BandType<T>* band = static_cast<const BandType<T>*>(BY_KEY ? p.band_k : p.band_q);
  const float* sat = BY_KEY ? p.sat_k : p.sat_q;
  const int W = p.W, S2 = p.S2;
  // the saturated sums' slots: the table's at the band edges (as the forward's saturated_slots), clamped
  const int2 sslot = saturated_slots(p);
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    // this row's position x within its sequence, the sequence's length on the row's side and on the other side
    int x, len, other;
    if (p.cu_q != nullptr) {  // varlen: r = h * T + token, the sequence found by binary search over cu_seqlens
      const int32_t* cu = BY_KEY ? p.cu_k : p.cu_q;
      const int64_t Tr = BY_KEY ? p.Tk : p.Tq;
      const int tok = (int)(r % Tr);
      int lo = 0, hi = p.B - 1;  // the last sequence whose (clamped) start is <= tok
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (seq_range(cu, mid, Tr, BY_KEY ? p.Lk : p.Lq).x <= tok) lo = mid;
        else hi = mid - 1;
      }
      const int2 own = seq_range(cu, lo, Tr, BY_KEY ? p.Lk : p.Lq);
      x = tok - own.x;
      len = own.y;
      other = seq_range(BY_KEY ? p.cu_q : p.cu_k, lo, BY_KEY ? p.Tq : p.Tk, BY_KEY ? p.Lq : p.Lk).y;
    } else {
      len = BY_KEY ? p.Lk : p.Lq;
      other = BY_KEY ? p.Lq : p.Lk;
      x = (int)(r % len);
    }
    // distances of the written entries: queries i = x: d in [x - other + 1, x]; keys j = x: d in [-x, other - 1 - x]
    int w0 = 0, w1 = 0;
    if (x >= 0 && x < len && other > 0) {
      const int dlo = BY_KEY ? -x : x - other + 1;
      w0 = min(max(dlo - p.dmin, 0), W);
      w1 = min(max(dlo + other - p.dmin, w0), W);
    }
    const BandType<T>* br = band + r * W;
    for (int s = threadIdx.x; s < S2; s += blockDim.x) {
      float acc = 0.f;
      const int k1 = min(offs[s + 1], W);
      for (int k = max(offs[s], 0); k < k1; ++k) {
        const int c = perm[k];
        if (c >= w0 && c < w1) acc += band_float(br[c]);
      }
      if (s == sslot.x) acc += sat[r * 2 + 0];
      if (s == sslot.y) acc += sat[r * 2 + 1];
      out[r * S2 + s] = Pack<T>::from_float(acc);
    }
  }
}

// WG: only where this pass can run wgmma (the sm_90a cubin, the simulator); the host launches them only then.
template <typename T, int D, bool WG>
__global__ void __launch_bounds__(kThreads, 2) dfa_bwd_dq_kernel(const Params p) {
  if constexpr (WG && !DFA_HAS_WGMMA) {
    (void)p;
    __trap();
  } else {
    bwd_dq_body<T, D, WG>(p);
  }
}
template <typename T, int D, bool WG>
__global__ void __launch_bounds__(kThreads) dfa_bwd_dkdv_kernel(const Params p) {
  if constexpr (WG && !DFA_HAS_WGMMA) {
    (void)p;
    __trap();
  } else {
    bwd_dkdv_body<T, D, WG>(p);
  }
}

namespace {
const char* g_last_bwd = "";  // the score kernel the last launch_bwd launched (last_bwd_kernel)
}  // namespace

template <typename T, int D, bool WG>
static const char* run_bwd(const Params& p, BwdKernel which, cudaStream_t stream) {
  using Cfg = BwdCfg<T, D, WG>;
  const bool rel = p.table != nullptr;
  const auto go = [&](auto kern, int smem, dim3 grid) -> const char* {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return cudaGetErrorString(err);
    g_last_bwd = WG ? "wgmma" : "mma.sync";
    DFA_LAUNCH(kern, grid, kThreads, smem, stream, p);
    err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  };
  if (which == BWD_DQ)
    return go(dfa_bwd_dq_kernel<T, D, WG>, rel ? Cfg::DQ_SMEM_REL : Cfg::DQ_SMEM,
              dim3((p.Lq + Cfg::DQ_BM - 1) / Cfg::DQ_BM, p.B * p.H));
  return go(dfa_bwd_dkdv_kernel<T, D, WG>, rel ? Cfg::KV_SMEM_REL : Cfg::KV_SMEM,
            dim3((p.Lk + Cfg::KV_BN - 1) / Cfg::KV_BN, p.B * p.H));
}

const char* launch_bwd(const Params& p, int dtype, int head_dim, BwdKernel which, void* stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  g_last_bwd = "";
  return dispatch_dtype_dim(dtype, head_dim, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    return wgmma_wanted(s) ? run_bwd<T, D, true>(p, which, s) : run_bwd<T, D, false>(p, which, s);
  });
}

const char* last_bwd_kernel() { return g_last_bwd; }
void reset_last_kernels() {
  reset_last_fwd_kernel();
  g_last_bwd = "";
}

const char* launch_band_to_slots(const Params& p, bool by_key, const int32_t* perm, const int32_t* offs, void* out,
                                 int dtype, int64_t rows, void* stream) {
  if (rows <= 0) return nullptr;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned grid = (unsigned)(rows < (1 << 20) ? rows : (1 << 20));  // grid-stride beyond
  const auto go = [&](auto t) {
    using T = decltype(t);
    auto kern = by_key ? dfa_band_to_slots_kernel<T, true> : dfa_band_to_slots_kernel<T, false>;
    DFA_LAUNCH(kern, grid, kThreads, 0, s, p, perm, offs, reinterpret_cast<T*>(out), rows);
  };
  if (dtype == 0) go(__half{});
  else if (dtype == 1) go(__nv_bfloat16{});
  else return "deberta_fast._C: unsupported dtype for band_to_slots";
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace dfa
