// Fused forward of DeBERTa disentangled attention: online softmax (FA2 style), relative terms on tensor cores
// (dfa_rel.cuh: per band tile, Q . Kr[window]^T and K . Qr[window]^T read back at each element's diagonal; tiles
// beyond the slot band: per-row c2p constants and one p2c value per key), K / V tiles double-buffered by cp.async,
// key-padding mask, uniform rows, Philox dropout; without dropout the rows' sums ride the P V product (an n-tile of
// ones).  Writes O and the float32 LSE (natural log; +inf and O = 0 for a row with no key, see dfa_softmax.h).  Takes
// pos_key / pos_query rows (no C2P / P2C tables; the backward kernels compute the relative terms the same way).
// One kernel serves the padded batch and the packed variable-length (varlen) layout: the
// per-block sequence offsets come from seq_view() (cu_seqlens read at run time, no extra
// template instantiations); blocks past the end of their sequence exit at once.
// WG (sm_90a, opt-in: DEBERTA_FAST_CUDA_WGMMA=1): Q K^T and P V on wgmma (dfa_wgmma.cuh), Q / K / V tiles in the
// CoreRows layout it reads; everything else the same code.  PIPE (with WG; DEBERTA_FAST_CUDA_WGMMA=serial: without):
// the products overlapped with the softmax (FlashAttention-3's intra-warpgroup pipelining): tile j's Q K^T and tile
// j-1's P V are issued together, the softmax of tile j runs while P V is in flight, then O is rescaled; so K / V take
// three stages (V of tile j-1 stays resident while tile j+1 arrives).
#include "dfa_rel.cuh"
#include "dfa_wgmma.cuh"

namespace dfa {

template <typename T, int D, bool WG = false, bool PIPE = WG>
struct FwdCfg {
  static constexpr int BM = 64;                   // queries per block (16 per warp)
  static constexpr int BN = D == 128 ? 32 : 64;  // keys per iteration (D = 128: 32, to fit sm_86's 99 KB)
  using L = std::conditional_t<WG, CoreRows<D>, PaddedRows<D>>;  // the Q / K / V tiles' layout
  // cp.async of tile it+1 while tile it is computed (PIPE: while V of tile it-1 is read too)
  using KV = KVTiles<T, BN, D, PIPE ? 3 : 2, true, L, true>;  // sources advanced per tile (ADVANCE)
  using Rel = RelSmem<T, BN, D>;    // with relative terms: window, saturated rows, skew scratch, slots
  // shared memory (elements of T): Q | K/V stages | Rel
  static constexpr int BASE = L::elems(BM) + KV::SMEM_ELEMS;
  static constexpr int SMEM = BASE * (int)sizeof(T);
  static constexpr int SMEM_REL = (BASE + Rel::ELEMS) * (int)sizeof(T);
  static_assert(WG || SMEM_REL <= 101376, "the forward must fit sm_86 / sm_89's 99 KB of shared memory per block");
  static_assert(SMEM_REL <= 115712, "the sm_90a forward must fit two blocks per SM (113 KB each)");
  static_assert(WG || !PIPE, "the pipelined forward is a wgmma one");
};

template <typename T, int D, bool WG, bool PIPE>
__device__ __forceinline__ void fwd_body(DFA_KERNEL_PARAMS(p)) {
  DFA_PROFILE_ASSUME(p);
  using Cfg = FwdCfg<T, D, WG, PIPE>;
  using L = typename Cfg::L;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, NT = BN / 8;
  DFA_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);
  const typename Cfg::Rel rs(Qs + Cfg::BASE);  // relative terms only (the launch sizes shared memory by that)

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int dbh = b * p.h_all + p.h0 + h;  // the dropout stream's (b, h) (Params::h_all)
  const int q0 = blockIdx.x * BM;
  const SeqView sv = seq_view(p, b, h);
  if (q0 >= sv.Lq) return;  // varlen: this sequence is shorter than max_seqlen_q (block-uniform)
  const int Lq = sv.Lq, Lk = sv.Lk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  const T* qg = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sv.qrow * p.q_sr;
  const T* kg = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sv.krow * p.k_sr;
  const T* vg = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + sv.krow * p.v_sr;
  const bool rel = p.table != nullptr;
  const auto [pk, pq] = pos_rows<T>(p, b, h);
  const uint8_t* km_b = p.key_mask ? p.key_mask + b * p.km_sb : nullptr;
  const auto skew = rs.skew(warp);
  const T* Qw = L::at(Qs, warp * 16, 0);

  int rows[2];
  bool uni[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    rows[hh] = q0 + warp * 16 + g + 8 * hh;
    uni[hh] = p.uniform != nullptr && rows[hh] < Lq && p.uniform[b * p.un_sb + h * p.un_sh + rows[hh]] != 0;
  }
  const bool warp_uniform = p.uniform != nullptr && any_set(uni[0] || uni[1]);  // some HF uniform row here
  uint2 key = make_uint2(0u, 0u);
  uint32_t offset = 0u;
  if (p.dropout) {
    const uint64_t seed = (uint64_t)p.rng[0];
    key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    offset = (uint32_t)p.rng[1];
  }

  load_tile<T, BM, D, kThreads, false, true, L>(Qs, qg, p.q_sr, q0, Lq);
  if constexpr (WG) fence_proxy_async();  // Q, read by wgmma: published by the next barrier
  float4 c2p_sat = make_float4(0.f, 0.f, 0.f, 0.f);  // {lo g, lo g+8, hi g, hi g+8}
  if (rel) {
    load_sat_rows<T, D>(rs.sat, pq, p.pq_sr, pk, p.pk_sr, saturated_slots(p));
    if (tile_saturation(p, q0, BM, 0, BN) == 0) fill_slots<Cfg::Rel::WR, 1>(rs.slots, p, q0 - (BN - 1));  // tile 0
    __syncthreads();  // Q, the saturated rows, the first window's slots
    c2p_sat = row_saturated_mma<T, D, L>(Qw, rs.sat);
  }
  const SatFold<T> fold(c2p_sat);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
  // without dropout the rows' sums ride the P . V product (product_acc_rows' rowsum: the sums of P as rounded for
  // it, so the output's weights sum to 1; columns 2t, 2t+1 of rows g / g + 8: every column holds the sum); with
  // dropout l sums the probabilities before the keep mask, a float add per element
  float ls[4] = {0.f, 0.f, 0.f, 0.f};
  // PIPE: the previous tile's P (wgmma A fragments, this warp's 16 rows), whose P . V is issued with the next tile's
  // Q K^T and waited for after that tile's softmax
  [[maybe_unused]] uint32_t pa[PIPE ? BN / 16 : 1][4];

  // the keys' saturated column terms, precomputed (launch_sat_terms): into K's padding with each tile's copy
  const T* kc = rel && p.sat_terms_k != nullptr
                        ? reinterpret_cast<const T*>(p.sat_terms_k) + sv.koff * 8
                        : nullptr;
  const typename Cfg::KV kv{Qs + L::elems(BM), kg, vg, p.k_sr, p.v_sr, Lk, kc};
  const DescsOf<T, L, WG> dsc(Qs);
  kv.start();
  // stage: the window slots' half and the K / V stage (PIPE: K's); vst: PIPE's V slot (KVTiles), vprev the previous
  // tile's
  for (int k0 = 0, stage = 0, vst = 0; k0 < Lk; k0 += BN, stage ^= 1, vst = PIPE ? (vst == 2 ? 0 : vst + 1) : stage) {
    const int vprev = vst == 0 ? 2 : vst - 1;
    const T* Ks = kv.acquire(k0, stage);
    const T* Vs = kv.v_at(vst);

    // 0: the band (skew); 1 / 2: beyond it (d <= band_lo / d >= band_hi: one slot); 3: no relative term
    const int zone = rel ? tile_saturation(p, q0 + warp * 16, 16, k0, BN) : 3;  // warp-uniform
    // block-uniform: some warp's tile lies in the band.  The window's slots were filled one tile ahead (before the
    // loop for tile 0); c2p is the row term (pos_key), p2c the column term (pos_query)
    if (rel && tile_saturation(p, q0, BM, k0, BN) == 0)
      rs.template products<L>(skew, rs.slots_of(stage), pk, p.pk_sr, pq, p.pq_sr, Qw, Ks, warp, zone == 0);

    float s[NT][4];
    // the relative terms of saturated tiles ride the score MMA; some warp's tile is saturated (block-uniform: warp 0
    // has the smallest distances, warp 3 the largest)
    const bool any_sat =
        rel && (tile_saturation(p, q0, 16, k0, BN) == 1 || tile_saturation(p, q0 + BM - 16, 16, k0, BN) == 2);
    fold.template score<D, BN, NT, L>(s, const_cast<T*>(Ks), rs.sat, warp, any_sat, kc != nullptr, zone, [&] {
      if constexpr (PIPE) {  // this tile's Q K^T, then the previous tile's P V; wait for the first
        scores_and_pv_issue<T, D, BN>(s, o, pa, dsc, Qs, Ks, kv.v_at(vprev), k0 > 0);
      } else {
        product_rows_rows<T, D, BN, WG>(s, dsc, Qs, Qw, Ks);
      }
    });

    float mx[2] = {-INFINITY, -INFINITY};
    // checked: an edge tile, or one with a masked key or a uniform row (tests per element).  raw: a saturated (or
    // relative-term-free) interior tile keeps the accumulators unscaled (scale_log2 > 0: max(acc) * scale is the
    // maximum of the scaled scores) and scales inside the exponent; the others hold scores in log2 units.
    const bool checked =
        tile_needs_checks(q0 + warp * 16, 16, Lq, k0, BN, Lk, warp_uniform || any_key_masked(km_b, k0, BN, Lk));
    const bool raw = zone != 0 && !checked;
    dispatch_tile(zone != 0, checked, [&](auto saturated, auto checks) {
      constexpr bool SAT = decltype(saturated)::value, CHECK = decltype(checks)::value;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, c = nt * 8 + 2 * t + (e & 1), i = rows[hh], j = k0 + c;
          if constexpr (SAT) {
            if constexpr (CHECK) {
              const float acc = s[nt][e];
              s[nt][e] = masked_score<true>(i, j, Lq, Lk, km_b, uni[hh], [&] { return acc * p.scale_log2; });
            }
          } else {
            const float c2pv = pk != nullptr ? skew.row_at(g + 8 * hh, c) : 0.f;
            const float p2cv = pq != nullptr ? skew.col_at(g + 8 * hh, c) : 0.f;
            s[nt][e] = finish_score<CHECK>(p, s[nt][e], c2pv, p2cv, i, j, Lq, Lk, km_b, uni[hh]);
          }
          mx[hh] = fmaxf(mx[hh], s[nt][e]);
        }
      }
    });
    float base[2], alpha[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float tmax = raw ? quad_max(mx[hh]) * p.scale_log2 : quad_max(mx[hh]);
      const float mnew = fmaxf(m[hh], tmax);
      base[hh] = (mnew == -INFINITY) ? 0.f : mnew;
      alpha[hh] = exp2f(m[hh] - base[hh]);  // 0 when m was -inf, exactly 1 when the maximum did not grow
      m[hh] = mnew;
    }
    // the rescale only when a row of the warp has a new maximum: otherwise every factor is 1 (bit-identical),
    // which is most tiles once the running maxima have settled.  PIPE: after this tile's probabilities, once the
    // previous tile's P V has landed in O (l, the sums with dropout, before the probabilities are added to it)
    const auto rescale = [&] {
      if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
        if constexpr (DFA_PROFILE_SETTLED_ON) {  // static-profile builds only: the vote and the factors kept, the
          ls[0] *= alpha[0];                     // rescale two multiplies (the common iteration, approximately)
          ls[2] *= alpha[1];
        } else {
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            if constexpr (!PIPE) l[hh] *= alpha[hh];
            ls[2 * hh] *= alpha[hh];
            ls[2 * hh + 1] *= alpha[hh];
#pragma unroll
            for (int dt = 0; dt < D / 8; ++dt) {
              o[dt][2 * hh] *= alpha[hh];
              o[dt][2 * hh + 1] *= alpha[hh];
            }
          }
        }
      }
    };
    if constexpr (!PIPE) {
      rescale();
    } else if (p.dropout) {
      l[0] *= alpha[0];
      l[1] *= alpha[1];
    }
    dispatch_bool(raw, [&](auto raw_c) { dispatch_bool(p.dropout, [&](auto drop_c) {
      constexpr bool RAW = decltype(raw_c)::value, DROP = decltype(drop_c)::value;
      static_assert(NT % 2 == 0, "dropout words come in n-tile pairs");
      uint4 dw = {};  // per n-tile pair: the lane's own Philox call (its rows x its 4 keys of the pair)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if (DROP && nt % 2 == 0) dw = dropout_words(key, offset, dbh, rows[0], k0 + nt * 8 + 2 * t);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, j = k0 + nt * 8 + 2 * t + (e & 1);
          const float pr = RAW ? exp2f(fmaf(s[nt][e], p.scale_log2, -base[hh])) : exp2f(s[nt][e] - base[hh]);
          float pd = pr;
          if constexpr (DROP) {
            l[hh] += pr;
            // the kept probability; the output takes the 1 / (1 - p_drop) once, in the epilogue
            if (!dropout_keep(word_of(dw, 2 * hh + nt % 2), j, p.drop_thresh)) pd = 0.f;
          }
          s[nt][e] = pd;
        }
      }
    }); });
    if constexpr (PIPE) {
      pv_wait<D, BN>(o, pa);  // the previous tile's P V
      rescale();
      pack_a<T, BN>(pa, s);  // issued with the next tile's scores (or after the loop)
      if (!p.dropout) row_sums<T, BN>(ls, pa);
    } else {
      product_acc_rows<T, D, BN, WG>(o, s, dsc, Vs, ls, !p.dropout);
    }
    // the next tile's window slots, published by release()'s barrier (the other half was last read a tile ago)
    if (rel && k0 + BN < Lk && tile_saturation(p, q0, BM, k0 + BN, BN) == 0)
      fill_slots<Cfg::Rel::WR, 1>(rs.slots_of(stage ^ 1), p, q0 - (k0 + BN) - (BN - 1));
    kv.release(k0, stage, vprev);
  }
  if constexpr (PIPE) {  // the last tile's P V
    if (Lk > 0) pv_issue<T, D, BN>(o, pa, dsc, kv.v_at(((Lk - 1) / BN) % 3));
    pv_wait<D, BN>(o, pa);
  }

  // epilogue
  T* og = reinterpret_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + sv.qrow * p.o_sr;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float lt = p.dropout ? quad_sum(l[hh]) : ls[2 * hh];
    const int i = rows[hh];
    if (i >= Lq) continue;
    const float inv = lt > 0.f ? (p.dropout ? p.drop_scale : 1.f) / lt : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t v = Pack<T>::pack(o[dt][2 * hh] * inv, o[dt][2 * hh + 1] * inv);
      *reinterpret_cast<uint32_t*>(og + (int64_t)i * p.o_sr + dt * 8 + 2 * t) = v;
    }
    if (t == 0) p.lse[sv.qoff + i] = row_lse(m[hh], lt);  // +inf: no key
  }
}

// WG: only where this pass can run wgmma (the sm_90a cubin, the simulator); the host launches it only then.
template <typename T, int D, bool WG, bool PIPE>
__global__ void __launch_bounds__(kThreads, 2) dfa_fwd_kernel(const Params p) {
  if constexpr (WG && !DFA_HAS_WGMMA) {
    (void)p;
    __trap();
  } else {
    fwd_body<T, D, WG, PIPE>(p);
  }
}

namespace {
const char* g_last_fwd = "";  // the kernel the last launch_fwd launched (last_fwd_kernel)
}  // namespace

template <typename T, int D, bool WG, bool PIPE = WG>
static const char* run_fwd(const Params& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, D, WG, PIPE>;
  auto kern = dfa_fwd_kernel<T, D, WG, PIPE>;
  const int smem = p.table != nullptr ? Cfg::SMEM_REL : Cfg::SMEM;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  dim3 grid((p.Lq + Cfg::BM - 1) / Cfg::BM, p.B * p.H);
  g_last_fwd = WG ? (PIPE ? "wgmma" : "wgmma serial") : "mma.sync";
  DFA_LAUNCH(kern, grid, kThreads, smem, stream, p);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_fwd(const Params& p, int dtype, int head_dim, void* stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  g_last_fwd = "";
  return dispatch_dtype_dim(dtype, head_dim, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    if (wgmma_wanted(s)) return wgmma_serial() ? run_fwd<T, D, true, false>(p, s) : run_fwd<T, D, true, true>(p, s);
    return run_fwd<T, D, false>(p, s);
  });
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dfa_sat_terms_kernel(const Params p, bool by_query, T* out) {
  DFA_DYNAMIC_SMEM(smem_raw);
  sat_terms_body<T, D>(p, by_query, out, reinterpret_cast<T*>(smem_raw));
}

const char* launch_sat_terms(const Params& p, bool by_query, void* out, int dtype, int head_dim, void* stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype_dim(dtype, head_dim, [&](auto t, auto d) -> const char* {
    using T = decltype(t);
    constexpr int D = decltype(d)::value;
    constexpr int smem = (64 + 16) * (D + 8) * (int)sizeof(T);  // <= 48 KB: no attribute needed
    const dim3 grid(((by_query ? p.Lq : p.Lk) + 63) / 64, p.B * p.H);
    auto kern = dfa_sat_terms_kernel<T, D>;
    DFA_LAUNCH(kern, grid, kThreads, smem, s, p, by_query, reinterpret_cast<T*>(out));
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
  });
}

const char* last_fwd_kernel() { return g_last_fwd; }
void reset_last_fwd_kernel() { g_last_fwd = ""; }

}  // namespace dfa
