// Fused forward of DeBERTa disentangled attention: online softmax (FA2 style),
// relative terms gathered from precomputed C2P / P2C tables (tiles beyond the slot band: per-row c2p
// constants and one p2c column, no slot table), K / V tiles double-buffered by cp.async, key-padding mask,
// uniform rows, Philox dropout.  Writes O and the float32 LSE (natural log; +inf and O = 0 for a
// row with no key, see dfa_softmax.h).
// One kernel serves the padded batch and the packed variable-length (varlen) layout: the
// per-block sequence offsets come from seq_view() (cu_seqlens read at run time, no extra
// template instantiations); blocks past the end of their sequence exit at once.
#include "dfa_common.cuh"

namespace dfa {

template <typename T, int D>
struct FwdCfg {
  static constexpr int BM = 64;  // queries per block (16 per warp)
  static constexpr int BN = 64;  // keys per iteration
  static constexpr int LDS = D + 8;
  using KV = KVTiles<T, BN, D, 2>;  // cp.async of tile it+1 while tile it is computed
  static constexpr int SMEM = (BM * LDS + KV::SMEM_ELEMS) * (int)sizeof(T);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) dfa_fwd_kernel(DFA_KERNEL_PARAMS(p)) {
  DFA_PROFILE_ASSUME(p);
  using Cfg = FwdCfg<T, D>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, LDS = Cfg::LDS, NT = BN / 8;
  DFA_DYNAMIC_SMEM(smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);

  const int bh = blockIdx.y, b = bh / p.H, h = bh % p.H;
  const int q0 = blockIdx.x * BM;
  const SeqView sv = seq_view(p, b, h);
  if (q0 >= sv.Lq) return;  // varlen: this sequence is shorter than max_seqlen_q (block-uniform)
  const int Lq = sv.Lq, Lk = sv.Lk;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;

  const T* qg = reinterpret_cast<const T*>(p.q) + b * p.q_sb + h * p.q_sh + sv.qrow * p.q_sr;
  const T* kg = reinterpret_cast<const T*>(p.k) + b * p.k_sb + h * p.k_sh + sv.krow * p.k_sr;
  const T* vg = reinterpret_cast<const T*>(p.v) + b * p.v_sb + h * p.v_sh + sv.krow * p.v_sr;
  const T* c2p_bh = p.c2p ? reinterpret_cast<const T*>(p.c2p) + sv.qoff * p.S2 : nullptr;
  const T* p2c_bh = p.p2c ? reinterpret_cast<const T*>(p.p2c) + sv.koff * p.S2 : nullptr;
  const uint8_t* km_b = p.key_mask ? p.key_mask + b * p.km_sb : nullptr;

  int rows[2];
  bool uni[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    rows[hh] = q0 + warp * 16 + g + 8 * hh;
    uni[hh] = p.uniform != nullptr && rows[hh] < Lq && p.uniform[b * p.un_sb + h * p.un_sh + rows[hh]] != 0;
  }
  uint2 key = make_uint2(0u, 0u);
  uint32_t offset = 0u;
  if (p.dropout) {
    const uint64_t seed = (uint64_t)p.rng[0];
    key = make_uint2((uint32_t)seed, (uint32_t)(seed >> 32));
    offset = (uint32_t)p.rng[1];
  }

  const int2 sslot = saturated_slots(p);
  const float4 c2p_sat = c2p_saturated<T>(p, c2p_bh, sslot, rows, Lq);

  load_tile<T, BM, D, kThreads>(Qs, qg, p.q_sr, q0, Lq);

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  const typename Cfg::KV kv{Qs + BM * LDS, kg, vg, p.k_sr, p.v_sr, Lk};
  kv.start();
  for (int k0 = 0, stage = 0; k0 < Lk; k0 += BN, stage ^= 1) {
    const T* Ks = kv.acquire(k0, stage);
    const T* Vs = Ks + BN * LDS;

    float s[NT][4];
#pragma unroll
    for (int i = 0; i < NT; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
    mma_rows_rows<T, D, NT>(s, Qs + warp * 16 * LDS, Ks);

    float mx[2] = {-INFINITY, -INFINITY};
    const int sat = tile_saturation(p, q0 + warp * 16, 16, k0, BN);  // warp-uniform
    const float crow[2] = {sat == 2 ? c2p_sat.z : c2p_sat.x, sat == 2 ? c2p_sat.w : c2p_sat.y};
    // saturated: beyond the band, one slot for the whole tile (per-row c2p, one p2c per column, no slot table);
    // checked: an edge tile or a masked call (range and key-mask tests per element)
    const bool checked = tile_needs_checks(q0 + warp * 16, 16, Lq, k0, BN, Lk, km_b);
    dispatch_tile(sat != 0, checked, [&](auto saturated, auto checks) {
      constexpr bool SAT = decltype(saturated)::value, CHECK = decltype(checks)::value;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const int j0 = k0 + nt * 8 + 2 * t;
        const float2 pcv = p2c_pair<T, SAT>(p, p2c_bh, sslot, sat, j0, Lk);
        const float pc[2] = {pcv.x, pcv.y};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hh = e >> 1, j = j0 + (e & 1);
          if constexpr (SAT)
            s[nt][e] = finish_score<CHECK>(p, s[nt][e], crow[hh], pc[e & 1], rows[hh], j, Lq, Lk, km_b, uni[hh]);
          else
            s[nt][e] = score_log2<T, CHECK>(p, s[nt][e], rows[hh], j, Lq, Lk, c2p_bh, p2c_bh, km_b, uni[hh]);
          mx[hh] = fmaxf(mx[hh], s[nt][e]);
        }
      }
    });
    float base[2];
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float mnew = fmaxf(m[hh], quad_max(mx[hh]));
      base[hh] = (mnew == -INFINITY) ? 0.f : mnew;
      const float alpha = exp2f(m[hh] - base[hh]);  // 0 when m was -inf
      m[hh] = mnew;
      l[hh] *= alpha;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * hh] *= alpha;
        o[dt][2 * hh + 1] *= alpha;
      }
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint4 w = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int hh = e >> 1, j = k0 + nt * 8 + 2 * t + (e & 1);
        const float pr = exp2f(s[nt][e] - base[hh]);
        l[hh] += pr;
        float pd = pr;
        if (p.dropout) {
          // (2t, 2t+1) lie in one group of 4 columns: one Philox call per row and pair
          if ((e & 1) == 0) w = dropout_words(key, offset, bh, rows[hh], j >> 2);
          pd = word_of(w, j & 3) >= p.drop_thresh ? pr * p.drop_scale : 0.f;
        }
        s[nt][e] = pd;
      }
    }
    mma_acc_rows<T, D, NT>(o, s, Vs);
    kv.release(k0);
  }

  // epilogue
  T* og = reinterpret_cast<T*>(p.o) + b * p.o_sb + h * p.o_sh + sv.qrow * p.o_sr;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const float lt = quad_sum(l[hh]);
    const int i = rows[hh];
    if (i >= Lq) continue;
    const float inv = lt > 0.f ? 1.f / lt : 0.f;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t v = Pack<T>::pack(o[dt][2 * hh] * inv, o[dt][2 * hh + 1] * inv);
      *reinterpret_cast<uint32_t*>(og + (int64_t)i * p.o_sr + dt * 8 + 2 * t) = v;
    }
    if (t == 0) p.lse[sv.qoff + i] = row_lse(m[hh], lt);  // +inf: no key
  }
}

template <typename T, int D>
static const char* run_fwd(const Params& p, cudaStream_t stream) {
  using Cfg = FwdCfg<T, D>;
  auto kern = dfa_fwd_kernel<T, D>;
  cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::SMEM);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  dim3 grid((p.Lq + Cfg::BM - 1) / Cfg::BM, p.B * p.H);
  DFA_LAUNCH(kern, grid, kThreads, Cfg::SMEM, stream, p);
  err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

const char* launch_fwd(const Params& p, int dtype, int head_dim, void* stream) {
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  return dispatch_dtype_dim(dtype, head_dim, [&](auto t, auto d) { return run_fwd<decltype(t), decltype(d)::value>(p, s); });
}

}  // namespace dfa
