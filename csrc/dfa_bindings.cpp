// Host wrappers and Python bindings of deberta_fast._C (fused disentangled attention).
// Python registers these as torch.library custom ops (deberta_fast/_cuda_ext.py), which
// gives autograd, fake tensors and torch.compile support.
//
// -DDFA_HOST_TEST builds this same file as a CPU extension for the host tests
// (tests/test_cuda_host.py): CPU tensors stand in for CUDA ones, the device guard and stream are
// no-ops and the launchers are the recording stubs of dfa_host_stubs.cpp.  -DDFA_CPU_SIM builds it with
// the kernels themselves run by the CPU simulator (csrc/sim/README.md): the same CPU tensors, real launchers.
#include <torch/extension.h>

#if defined(DFA_HOST_TEST) || defined(DFA_CPU_SIM)
#define DFA_CPU_TENSORS 1
#endif

#ifndef DFA_CPU_TENSORS
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <algorithm>
#include <cmath>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "dfa_params.h"

#ifdef DFA_HOST_TEST
namespace dfa {
void bind_host_test(pybind11::module_& m);  // dfa_host_stubs.cpp
}
#endif
#ifdef DFA_CPU_SIM
namespace dfa {
void bind_sim_selftest(pybind11::module_& m);  // sim/sim_selftest.cpp
}
#endif

namespace {

using at::Tensor;
using OptT = std::optional<Tensor>;

// The device predicate of every check below ("a CUDA tensor"), the device guard and the stream.
#ifdef DFA_CPU_TENSORS
bool on_device(const Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
void* current_stream() { return nullptr; }
#else
bool on_device(const Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
void* current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

int dtype_code(const Tensor& t) {
  if (t.scalar_type() == at::kHalf) return 0;
  if (t.scalar_type() == at::kBFloat16) return 1;
  TORCH_CHECK(false, "deberta_fast cuda backend: inputs must be float16 or bfloat16 (tensor-core kernels), got ",
              t.scalar_type(), ". float32 is not supported: cast with .half() / .bfloat16() (or torch.autocast), "
              "or use backend='triton' / backend='torch'.");
  return -1;
}

void check_qkv(const char* name, const Tensor& t, const Tensor& q, int64_t L) {
  TORCH_CHECK(on_device(t), "deberta_fast cuda backend: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "deberta_fast cuda backend: ", name, " is on ", t.device(),
              " but query is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "deberta_fast cuda backend: ", name, " has dtype ",
              t.scalar_type(), " but query has ", q.scalar_type());
  TORCH_CHECK(t.dim() == 4, "deberta_fast cuda backend: ", name, " must be 4-D [B, H, L, D], got ", t.sizes());
  TORCH_CHECK(t.size(0) == q.size(0) && t.size(1) == q.size(1) && t.size(3) == q.size(3) && t.size(2) == L,
              "deberta_fast cuda backend: ", name, " has shape ", t.sizes(), ", expected [", q.size(0), ", ",
              q.size(1), ", ", L, ", ", q.size(3), "]");
  TORCH_CHECK(t.stride(3) == 1, "deberta_fast cuda backend: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides(), "; call .contiguous()");
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0 &&
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "deberta_fast cuda backend: ", name, " rows must be 16-byte aligned (strides multiple of 8 elements, "
              "aligned base pointer), got strides ", t.strides(), "; call .contiguous()");
}

// The slot table of the relative terms: int32 [Lq + Lk - 1] (varlen: max_seqlen_q + max_seqlen_k - 1).
void check_slot_table(const OptT& table, const Tensor& q, int64_t Lq, int64_t Lk) {
  TORCH_CHECK(table.has_value(), "deberta_fast cuda backend: relative terms need the slot table");
  const Tensor& tb = *table;
  TORCH_CHECK(on_device(tb) && tb.device() == q.device() && tb.scalar_type() == at::kInt && tb.dim() == 1 &&
                  tb.size(0) == Lq + Lk - 1 && tb.is_contiguous(),
              "deberta_fast cuda backend: slot table must be a contiguous int32 CUDA tensor of length Lq+Lk-1 = ",
              Lq + Lk - 1, " on ", q.device(), " (deberta_fast.positions.relative_slot_table), got ",
              tb.scalar_type(), " ", tb.sizes(), " on ", tb.device());
}

// pos_key / pos_query rows in slot order: [H, S2, D], or [B|1, H, S2, D] when batched (padded
// layout only), the query's dtype / device / head dim, 16-byte aligned rows.  Returns S2 (0: absent).
int64_t check_pos(const char* who, const char* name, const OptT& t, const Tensor& q, int64_t B, int64_t H, int64_t D,
                  bool batched_ok) {
  if (!t.has_value()) return 0;
  const Tensor& x = *t;
  TORCH_CHECK(on_device(x) && x.device() == q.device() && x.scalar_type() == q.scalar_type(), who, ": ", name,
              " must be a ", q.scalar_type(), " tensor on ", q.device(), ", got ", x.scalar_type(), " on ", x.device());
  const bool shape_ok = (x.dim() == 3 && x.size(0) == H) ||
                        (batched_ok && x.dim() == 4 && (x.size(0) == B || x.size(0) == 1) && x.size(1) == H);
  TORCH_CHECK(shape_ok && x.size(-1) == D && x.size(-2) >= 1, who, ": ", name, " must be [H, 2*span, D] = [", H,
              ", R, ", D, "]", batched_ok ? " or [B|1, H, R, D]" : "", ", got ", x.sizes());
  TORCH_CHECK(x.size(-2) < (int64_t(1) << 31), who, ": ", name, " has more than 2^31 - 1 rows");
  // the kernels index a head's rows with 32-bit offsets (load_window)
  TORCH_CHECK((x.size(-2) - 1) * x.stride(-2) + D < (int64_t(1) << 31), who, ": ", name, "'s rows of one head span ",
              (x.size(-2) - 1) * x.stride(-2) + D, " elements (row stride ", x.stride(-2),
              "); they must lie within 2^31 - 1; call .contiguous()");
  bool aligned = x.stride(-1) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) aligned = aligned && (x.size(i) == 1 || x.stride(i) % 8 == 0);
  TORCH_CHECK(aligned, who, ": ", name, " must have a contiguous last dimension and 16-byte aligned rows (strides "
              "multiple of 8 elements, aligned base pointer), got strides ", x.strides(), "; call .contiguous()");
  return x.size(-2);
}

// The relative terms: pos rows, their slot table (over the rows: slot values are clamped to [0, S2)).
void set_pos(dfa::Params& p, const char* who, const OptT& pos_key, const OptT& pos_query, const OptT& table,
             const Tensor& q, int64_t B, int64_t H, int64_t D, int64_t Lq, int64_t Lk, bool batched_ok) {
  const int64_t rk = check_pos(who, "pos_key", pos_key, q, B, H, D, batched_ok);
  const int64_t rq = check_pos(who, "pos_query", pos_query, q, B, H, D, batched_ok);
  TORCH_CHECK(rk == 0 || rq == 0 || rk == rq, who, ": pos_key and pos_query must have the same rows (2*span), got ",
              rk, " and ", rq);
  const int64_t S2 = std::max(rk, rq);
  if (S2 == 0) return;
  check_slot_table(table, q, Lq, Lk);
  p.table = table->data_ptr<int32_t>();
  p.S2 = static_cast<int>(S2);
  const auto strides = [](const Tensor& x, int64_t& sb, int64_t& sh, int64_t& sr) {
    sb = x.dim() == 4 && x.size(0) > 1 ? x.stride(0) : 0;
    sh = x.stride(-3);
    sr = x.stride(-2);
  };
  if (pos_key.has_value()) {
    p.pos_k = pos_key->data_ptr();
    strides(*pos_key, p.pk_sb, p.pk_sh, p.pk_sr);
  }
  if (pos_query.has_value()) {
    p.pos_q = pos_query->data_ptr();
    strides(*pos_query, p.pq_sb, p.pq_sh, p.pq_sr);
  }
}

void set_scale(dfa::Params& p, double scale) {
  TORCH_CHECK(std::isfinite(scale), "deberta_fast cuda backend: scale must be finite, got ", scale);
  p.scale = static_cast<float>(scale);
  p.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
}

// The slot table's saturation band (positions.slot_band): every d <= band_lo has the slot of d = band_lo, every
// d >= band_hi that of band_hi.  The kernels trust it for the values (a wrong band gives wrong scores), not for
// memory (the slots they read there are clamped like every other).
void set_band(dfa::Params& p, int64_t band_lo, int64_t band_hi) {
  if (p.table == nullptr) return;  // no relative term: nothing to saturate
  TORCH_CHECK(band_lo < band_hi, "deberta_fast cuda backend: band_lo (", band_lo, ") must be < band_hi (", band_hi,
              ") (deberta_fast.positions.slot_band)");
  p.band_lo = static_cast<int>(std::clamp<int64_t>(band_lo, -(int64_t(1) << 30), int64_t(1) << 30));
  p.band_hi = static_cast<int>(std::clamp<int64_t>(band_hi, -(int64_t(1) << 30), int64_t(1) << 30));
}

// Whether a call's score kernels read their saturated column terms precomputed (launch_sat_terms: one extra kernel
// that reads K, and Q for the backward, once) instead of computing them per tile in every block (a product and a
// barrier per saturated tile): DEBERTA_FAST_CUDA_SAT_TERMS=1 / =0 (read at each call) forces it; by default when at
// least half of the call's 64 x 64 tiles are saturated (a predicted break-even, benchmarks/NOTES.md; DeBERTa-v3's band,
// d in (-512, 506): none at L <= 512, 22 % at 1024, 54 % at 2048, 87 % at 8192).
bool sat_terms_wanted(const dfa::Params& p) {
  if (p.table == nullptr) return false;
  if (const char* env = std::getenv("DEBERTA_FAST_CUDA_SAT_TERMS")) {  // the package's flag spellings, any case
    std::string v(env);
    for (char& ch : v) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (v == "1" || v == "true" || v == "on" || v == "yes" || v == "y") return true;
    if (v == "0" || v == "false" || v == "off" || v == "no" || v == "n") return false;
  }
  return dfa::saturated_fraction(p.Lq, p.Lk, p.band_lo, p.band_hi) >= 0.5;
}

// The saturated column terms of p's key rows (by_query false: p.sat_terms_k) or query rows (p.sat_terms_q), `rows`
// of them (B*H*L, varlen H*T), computed on the stream and pointed at by p; the tensor must outlive the launches that
// read them (the caching allocator orders a reuse after them on the same stream).  Undefined (and p's pointer
// nullptr) unless sat_terms_wanted.
Tensor sat_terms(dfa::Params& p, bool by_query, int64_t rows, int dtype, int head_dim, const Tensor& like,
                 const char* who) {
  (by_query ? p.sat_terms_q : p.sat_terms_k) = nullptr;
  if (rows <= 0 || !sat_terms_wanted(p)) return Tensor();
  Tensor t = at::empty({rows, 8}, like.options());
  const char* err = dfa::launch_sat_terms(p, by_query, t.data_ptr(), dtype, head_dim, current_stream());
  TORCH_CHECK(err == nullptr, who, " (saturated terms) launch failed: ", err ? err : "");
  (by_query ? p.sat_terms_q : p.sat_terms_k) = t.data_ptr();
  return t;
}

// Dropout: an element is kept iff its 16-bit Philox half >= drop_thresh = round(p_drop * 2^16) (dfa_common.cuh,
// dropout_words), with probability 1 - drop_thresh / 2^16, and kept values are scaled by its inverse (not by
// 1 / (1 - p_drop): the expected output is the input's at every rate).  rng: int64 [2] = {seed, offset} on q's
// device.
void set_dropout(dfa::Params& p, const OptT& rng, const Tensor& q, double p_drop) {
  TORCH_CHECK(p_drop >= 0.0 && p_drop < 1.0, "deberta_fast cuda backend: dropout_p must be in [0, 1), got ",
              p_drop);  // NaN fails both comparisons
  if (p_drop == 0.0) return;
  TORCH_CHECK(rng.has_value() && on_device(*rng) && rng->device() == q.device() &&
                  rng->scalar_type() == at::kLong && rng->numel() == 2 && rng->is_contiguous(),
              "deberta_fast cuda backend: dropout needs rng = int64 CUDA tensor [2] (seed, offset) on ", q.device(),
              ", got ", rng.has_value() ? c10::str(rng->scalar_type(), " ", rng->sizes(), " on ", rng->device())
                                        : std::string("None"));
  p.rng = rng->data_ptr<int64_t>();
  p.dropout = 1;
  const double th = std::round(p_drop * 65536.0);
  p.drop_thresh = th >= 65535.0 ? 0xffffu : static_cast<uint32_t>(th);
  p.drop_scale = static_cast<float>(65536.0 / (65536.0 - p.drop_thresh));
}

// The forward's output as the backward gets it back: the dq kernel reads its rows (delta = rowsum(dO * O)) as 16-byte
// vectors, so the layout rules of q's.
void check_saved_out(const char* who, const Tensor& out, const Tensor& q) {
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == q.scalar_type() && out.device() == q.device(),
              who, ": saved output must match the query (", q.sizes(), ", ", q.scalar_type(), ", ", q.device(),
              "), got ", out.sizes(), ", ", out.scalar_type(), ", ", out.device());
  bool aligned = out.stride(-1) == 1 && reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < out.dim(); ++d) aligned = aligned && out.stride(d) % 8 == 0;
  TORCH_CHECK(aligned, who, ": saved output rows must be 16-byte aligned with a contiguous last dimension (strides "
              "multiple of 8 elements, aligned base pointer), got strides ", out.strides(), "; call .contiguous()");
}

// delta = rowsum(dO * O) [rows...], float32: written by the dq kernel for every row it reads it for.  The CPU builds
// (host tests, simulator) fill it with NaN, so that a row the kernel missed fails the tests.
Tensor delta_buffer(at::IntArrayRef shape, const Tensor& q) {
#ifdef DFA_CPU_TENSORS
  return at::full(shape, NAN, q.options().dtype(at::kFloat));
#else
  return at::empty(shape, q.options().dtype(at::kFloat));
#endif
}

// The band's entry type (dfa_bwd.cu, BandType): bf16 for bf16 inputs, float32 for fp16.
at::ScalarType band_dtype(const Tensor& q) { return q.scalar_type() == at::kBFloat16 ? at::kBFloat16 : at::kFloat; }

// The backward's score kernels and relative-gradient band buffers (band_dtype, one writer per element; not
// zero-filled: band_to_slots reads only the written entries), reduced by band_to_slots into dC2P / dP2C.  One side at
// a time: the dq kernel writes the c2p band, band_to_slots reduces it and it is freed before the dK/dV kernel's p2c
// band is allocated, so that the two [rows, W] buffers (0.4 GB each in bf16 at 16k tokens, H = 12, DeBERTa-v3's
// W = 1017; 0.8 GB in float32 for fp16) never coexist.  rows_q / rows_k: rows of dC2P / dP2C (B*H*Lq or H*Tq); Lq,
// Lk: extents of the distance range (varlen: the max lengths); shape_q / shape_k: dC2P / dP2C without their slot axis.
struct RelBackward {
  bool has_c2p = false, has_p2c = false;
  int64_t rows_q = 0, rows_k = 0, W = 0;

  void check(dfa::Params& p, const Tensor& q, bool c2p, bool p2c, int64_t rq, int64_t rk, int64_t Lq, int64_t Lk,
             int64_t dmin, int64_t w, const OptT& perm, const OptT& offs) {
    has_c2p = c2p && p.S2 > 0;
    has_p2c = p2c && p.S2 > 0;
    rows_q = rq;
    rows_k = rk;
    W = w;
    if (p.S2 <= 0) return;
    TORCH_CHECK(W >= 0 && W <= Lq + Lk - 1 && dmin >= -(Lk - 1) && dmin <= Lq - W,
                "deberta_fast cuda backward: band window [dmin, dmin+W) with dmin = ", dmin, ", W = ", W,
                " must lie in [-(Lk-1), Lq) = [", -(Lk - 1), ", ", Lq, ") (deberta_fast._cuda_ext.band_window)");
    // strictly inside the saturation band: warps whose tile lies beyond it write no band entry, and band_to_slots
    // reads every entry of the window that a row's sequence reaches
    TORCH_CHECK(W == 0 || (dmin >= int64_t(p.band_lo) + 1 && dmin + W <= int64_t(p.band_hi)),
                "deberta_fast cuda backward: band window [dmin, dmin+W) = [", dmin, ", ", dmin + W,
                ") must lie inside the saturation band (band_lo, band_hi) = (", p.band_lo, ", ", p.band_hi,
                "): compute it with deberta_fast._cuda_ext.band_window from the same band");
    const int64_t Wa = std::max<int64_t>(W, 1);
    const auto csr_ok = [&](const OptT& t, int64_t n) {
      return t.has_value() && on_device(*t) && t->device() == q.device() && t->scalar_type() == at::kInt &&
             t->dim() == 1 && t->numel() == n && t->is_contiguous();
    };
    TORCH_CHECK(csr_ok(perm, Wa) && csr_ok(offs, p.S2 + 1),
                "deberta_fast cuda backward: band perm must be int32 [max(W,1)] = [", Wa,
                "] and offs int32 [2*span+1] = [", p.S2 + 1, "] on ", q.device(),
                " (deberta_fast._cuda_ext.band_window)");
    p.dmin = static_cast<int>(dmin);
    p.W = static_cast<int>(W);
  }

  // Both score kernels (after the saturated column terms of the keys and of the queries, when sat_terms_wanted: the
  // dq kernel reads the keys', the dK/dV kernel the queries'), each with its band, each band reduced and freed
  // before the next is allocated.  Returns
  // dC2P [shape_q..., S2] / dP2C [shape_k..., S2] (empty [0] where a term is absent): what a C2P = Q pos_key^T /
  // P2C = K pos_query^T table's gradient would be; the host takes them on to dq / dk and the position rows.
  std::pair<Tensor, Tensor> run(dfa::Params& p, int dtype, int head_dim, at::IntArrayRef shape_q,
                                at::IntArrayRef shape_k, const OptT& perm, const OptT& offs, const Tensor& q,
                                bool launch, const char* what, void* stream) const {
    Tensor dc2p = at::empty({0}, q.options()), dp2c = at::empty({0}, q.options());
    const auto f32 = q.options().dtype(at::kFloat);
    const auto band_opts = q.options().dtype(band_dtype(q));
    const int64_t Wa = std::max<int64_t>(W, 1);
    // rows_q / rows_k are the query / key rows of the call (or head group): the terms' rows too
    const Tensor kterms = sat_terms(p, false, rows_k, dtype, head_dim, q, what);
    const Tensor qterms = sat_terms(p, true, rows_q, dtype, head_dim, q, what);
    for (const bool by_key : {false, true}) {
      const bool has = by_key ? has_p2c : has_c2p;
      const int64_t rows = by_key ? rows_k : rows_q;
      Tensor band, sat;
      if (has) {
        // The CPU builds (host tests, simulator) fill the band with NaN, so that a read of an unwritten entry fails
        // the tests.
#ifdef DFA_CPU_TENSORS
        band = at::full({rows, Wa}, NAN, band_opts);
#else
        band = at::empty({rows, Wa}, band_opts);
#endif
        sat = at::zeros({rows, 2}, f32);
      }
      (by_key ? p.band_k : p.band_q) = has ? band.data_ptr() : nullptr;
      (by_key ? p.sat_k : p.sat_q) = has ? sat.data_ptr<float>() : nullptr;
      if (launch) {
        const char* err = dfa::launch_bwd(p, dtype, head_dim, by_key ? dfa::BWD_DKDV : dfa::BWD_DQ, stream);
        TORCH_CHECK(err == nullptr, what, " launch failed: ", err ? err : "");
      }
      if (has) {
        std::vector<int64_t> shape(by_key ? shape_k.begin() : shape_q.begin(), by_key ? shape_k.end() : shape_q.end());
        shape.push_back(p.S2);
        Tensor& out = by_key ? dp2c : dc2p;
        out = at::empty(shape, q.options());
        const char* err = dfa::launch_band_to_slots(p, by_key, perm->data_ptr<int32_t>(), offs->data_ptr<int32_t>(),
                                                    out.data_ptr(), dtype, rows, stream);
        TORCH_CHECK(err == nullptr, "deberta_fast cuda backward (", by_key ? "p2c" : "c2p", " band) failed: ",
                    err ? err : "");
      }
      // the buffers go back to the caching allocator here; the stream orders the next kernel after their readers
      (by_key ? p.band_k : p.band_q) = nullptr;
      (by_key ? p.sat_k : p.sat_q) = nullptr;
    }
    return {dc2p, dp2c};
  }
};

// The backward's heads in groups: the c2p / p2c band buffer ([rows, W] float32, rows = B*H*L: 0.8 GB at 16k tokens,
// H = 12, DeBERTa-v3) is allocated per group of heads, each group at most g_band_budget bytes of it (a head alone over
// it is a group of one).  Settable for tests (set_band_budget); 0: one group.
int64_t g_band_budget = int64_t(256) << 20;

std::vector<std::pair<int64_t, int64_t>> head_groups(int64_t H, int64_t bytes_per_head) {
  int64_t size = H;
  if (g_band_budget > 0 && H * bytes_per_head > g_band_budget) {
    size = std::max<int64_t>(1, g_band_budget / std::max<int64_t>(1, bytes_per_head));
    size = (H + (H + size - 1) / size - 1) / ((H + size - 1) / size);  // balanced: fewest groups, then smallest
  }
  std::vector<std::pair<int64_t, int64_t>> out;
  for (int64_t h = 0; h < H; h += size) out.emplace_back(h, std::min(size, H - h));
  return out;
}

// Params of heads [h0, h0 + n): every per-head pointer moved to head h0 (strides kept), H = n, the dropout stream
// keyed by the call's own heads (h_all, h0).  lse_c / delta / band rows are the caller's (contiguous per group).
dfa::Params head_group(const dfa::Params& p, int64_t h0, int64_t n, int64_t elem) {
  dfa::Params g = p;
  const auto at = [&](const void* ptr, int64_t stride) {
    return ptr == nullptr ? nullptr : static_cast<const void*>(static_cast<const char*>(ptr) + h0 * stride * elem);
  };
  g.q = at(p.q, p.q_sh); g.k = at(p.k, p.k_sh); g.v = at(p.v, p.v_sh); g.dout = at(p.dout, p.do_sh);
  g.o = const_cast<void*>(at(p.o, p.o_sh));
  g.dq = const_cast<void*>(at(p.dq, p.dq_sh));
  g.dk = const_cast<void*>(at(p.dk, p.dk_sh));
  g.dv = const_cast<void*>(at(p.dv, p.dk_sh));
  g.pos_k = at(p.pos_k, p.pk_sh); g.pos_q = at(p.pos_q, p.pq_sh);
  if (p.uniform != nullptr) g.uniform = p.uniform + h0 * p.un_sh;
  g.H = static_cast<int>(n);
  g.h0 = static_cast<int>(p.h0 + h0);
  return g;
}

struct Common {
  dfa::Params p{};
  int dtype = 0;
  int D = 0;
};

Common make_common(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& key_mask, const OptT& uniform,
                   const OptT& rng, double scale, double p_drop) {
  Common c;
  c.dtype = dtype_code(q);
  TORCH_CHECK(q.dim() == 4, "deberta_fast cuda backend: query must be 4-D [B, H, Lq, D], got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  TORCH_CHECK(k.dim() == 4, "deberta_fast cuda backend: key must be 4-D [B, H, Lk, D], got ", k.sizes());
  const int64_t Lk = k.size(2);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "deberta_fast cuda backend: head_dim must be 32, 64 or 128, got ", D,
              "; use backend='triton' or backend='torch'");
  TORCH_CHECK(B >= 1 && H >= 1 && Lq >= 1 && Lk >= 1, "deberta_fast cuda backend: empty input");
  TORCH_CHECK(B * H <= 65535, "deberta_fast cuda backend: B*H must be <= 65535, got ", B * H);
  TORCH_CHECK(Lq + Lk < (int64_t(1) << 30), "deberta_fast cuda backend: sequence too long");
  check_qkv("query", q, q, Lq);
  check_qkv("key", k, q, Lk);
  check_qkv("value", v, q, Lk);
  auto& p = c.p;
  if (key_mask.has_value()) {
    const Tensor& m = *key_mask;
    TORCH_CHECK(on_device(m) && m.device() == q.device() && m.scalar_type() == at::kBool && m.dim() == 2 &&
                    m.size(0) == B && m.size(1) == Lk && m.stride(1) == 1,
                "deberta_fast cuda backend: key_mask must be a bool CUDA tensor [B, Lk] = [", B, ", ", Lk,
                "] with a contiguous last dim, got ", m.scalar_type(), " ", m.sizes(), " on ", m.device());
    p.key_mask = reinterpret_cast<const uint8_t*>(m.data_ptr());
    p.km_sb = m.stride(0);
  }
  if (uniform.has_value()) {
    const Tensor& u = *uniform;
    TORCH_CHECK(on_device(u) && u.device() == q.device() && u.scalar_type() == at::kBool && u.dim() == 3 &&
                    u.size(0) == B && (u.size(1) == 1 || u.size(1) == H) && u.size(2) == Lq && u.stride(2) == 1,
                "deberta_fast cuda backend: uniform_rows must be a bool CUDA tensor [B, 1|H, Lq] with a contiguous "
                "last dim, got ", u.scalar_type(), " ", u.sizes(), " on ", u.device());
    p.uniform = reinterpret_cast<const uint8_t*>(u.data_ptr());
    p.un_sb = u.stride(0);
    p.un_sh = u.size(1) == 1 ? 0 : u.stride(1);
  }
  set_dropout(p, rng, q, p_drop);
  p.q = q.data_ptr(); p.q_sb = q.stride(0); p.q_sh = q.stride(1); p.q_sr = q.stride(2);
  p.k = k.data_ptr(); p.k_sb = k.stride(0); p.k_sh = k.stride(1); p.k_sr = k.stride(2);
  p.v = v.data_ptr(); p.v_sb = v.stride(0); p.v_sh = v.stride(1); p.v_sr = v.stride(2);
  p.band_lo = -(1 << 30);  // no saturated-tile shortcut unless set_band() says where the band is
  p.band_hi = 1 << 30;
  p.B = static_cast<int>(B); p.H = static_cast<int>(H);
  p.h_all = p.H; p.h0 = 0;
  p.Lq = static_cast<int>(Lq); p.Lk = static_cast<int>(Lk);
  set_scale(p, scale);
  c.D = static_cast<int>(D);
  return c;
}

std::vector<Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& pos_key,
                        const OptT& pos_query, const OptT& table, const OptT& key_mask, const OptT& uniform,
                        const OptT& rng, double scale, double p_drop, int64_t band_lo, int64_t band_hi) {
  Common c = make_common(q, k, v, key_mask, uniform, rng, scale, p_drop);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  set_pos(c.p, "deberta_fast cuda backend", pos_key, pos_query, table, q, B, H, D, Lq, k.size(2), true);
  set_band(c.p, band_lo, band_hi);
  const DeviceGuard guard(q.device());
  Tensor out = at::empty({B, H, Lq, D}, q.options());
  Tensor lse = at::empty({B, H, Lq}, q.options().dtype(at::kFloat));
  auto& p = c.p;
  p.o = out.data_ptr(); p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sr = out.stride(2);
  p.lse = lse.data_ptr<float>();
  const Tensor kterms = sat_terms(p, false, B * H * k.size(2), c.dtype, c.D, q, "deberta_fast cuda forward");
  const char* err = dfa::launch_fwd(p, c.dtype, c.D, current_stream());
  TORCH_CHECK(err == nullptr, "deberta_fast cuda forward launch failed: ", err ? err : "");
  return {out, lse};
}

std::vector<Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const OptT& pos_key, const OptT& pos_query, const OptT& table,
                        const OptT& key_mask, const OptT& uniform, const OptT& rng, double scale, double p_drop,
                        int64_t dmin, int64_t W, const OptT& perm, const OptT& offs, int64_t band_lo,
                        int64_t band_hi) {
  Common c = make_common(q, k, v, key_mask, uniform, rng, scale, p_drop);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2), D = q.size(3);
  set_pos(c.p, "deberta_fast cuda backward", pos_key, pos_query, table, q, B, H, D, Lq, Lk, true);
  set_band(c.p, band_lo, band_hi);
  const DeviceGuard guard(q.device());
  check_qkv("grad_out", dout, q, Lq);
  check_saved_out("deberta_fast cuda backward", out, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == B && lse.size(1) == H &&
                  lse.size(2) == Lq && lse.is_contiguous() && lse.device() == q.device(),
              "deberta_fast cuda backward: lse must be contiguous float32 [B, H, Lq] on ", q.device());
  auto& p = c.p;
  Tensor dq = at::empty({B, H, Lq, D}, q.options());
  Tensor dk = at::empty({B, H, Lk, D}, q.options());
  Tensor dv = at::empty({B, H, Lk, D}, q.options());
  p.dout = dout.data_ptr(); p.do_sb = dout.stride(0); p.do_sh = dout.stride(1); p.do_sr = dout.stride(2);
  p.o = out.data_ptr(); p.o_sb = out.stride(0); p.o_sh = out.stride(1); p.o_sr = out.stride(2);
  p.lse_c = lse.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dq_sb = dq.stride(0); p.dq_sh = dq.stride(1); p.dq_sr = dq.stride(2);
  p.dk_sb = dk.stride(0); p.dk_sh = dk.stride(1); p.dk_sr = dk.stride(2);
  const auto groups = head_groups(H, at::elementSize(band_dtype(q)) * B * std::max(Lq, Lk) * std::max<int64_t>(W, 1));
  if (groups.size() == 1) {
    const Tensor delta = delta_buffer({B, H, Lq}, q);
    p.delta = delta.data_ptr<float>();
    RelBackward rel;
    rel.check(p, q, pos_key.has_value(), pos_query.has_value(), B * H * Lq, B * H * Lk, Lq, Lk, dmin, W, perm, offs);
    auto [dc2p, dp2c] = rel.run(p, c.dtype, c.D, {B, H, Lq}, {B, H, Lk}, perm, offs, q, true,
                                "deberta_fast cuda backward", current_stream());
    return {dq, dk, dv, dc2p, dp2c};
  }
  Tensor dc2p = pos_key.has_value() ? at::empty({B, H, Lq, p.S2}, q.options()) : at::empty({0}, q.options());
  Tensor dp2c = pos_query.has_value() ? at::empty({B, H, Lk, p.S2}, q.options()) : at::empty({0}, q.options());
  for (const auto& [h0, n] : groups) {
    dfa::Params g = head_group(p, h0, n, q.element_size());
    const Tensor lse_g = lse.narrow(1, h0, n).contiguous(), delta_g = delta_buffer({B, n, Lq}, q);
    g.lse_c = lse_g.data_ptr<float>();
    g.delta = delta_g.data_ptr<float>();
    RelBackward rel;
    rel.check(g, q, pos_key.has_value(), pos_query.has_value(), B * n * Lq, B * n * Lk, Lq, Lk, dmin, W, perm, offs);
    auto [c2p_g, p2c_g] = rel.run(g, c.dtype, c.D, {B, n, Lq}, {B, n, Lk}, perm, offs, q, true,
                                  "deberta_fast cuda backward", current_stream());
    if (pos_key.has_value()) dc2p.narrow(1, h0, n).copy_(c2p_g);
    if (pos_query.has_value()) dp2c.narrow(1, h0, n).copy_(p2c_g);
  }
  return {dq, dk, dv, dc2p, dp2c};
}

// ---------------------------------------------------------------------------------------------
// Packed variable-length (varlen) layout: q/o/dout [Tq, H, D], k/v [Tk, H, D], sequence n at token
// rows cu_q[n]..cu_q[n+1] (cu_k for keys); pos_key / pos_query [H, 2S, D]; the backward returns dC2P [H, Tq, 2S],
// dP2C [H, Tk, 2S]; LSE float32 [H, Tq].
// cu_seqlens are trusted on the device (no sync here): they must start at 0, be non-decreasing,
// end at Tq / Tk, and no length may exceed max_seqlen (the kernels clamp lengths to max_seqlen
// for memory safety only).  CudaBackend.forward_varlen validates them before calling.

void check_tokens(const char* name, const Tensor& t, const Tensor& q, int64_t T) {
  TORCH_CHECK(on_device(t), "deberta_fast cuda varlen: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == q.device(), "deberta_fast cuda varlen: ", name, " is on ", t.device(),
              " but query is on ", q.device());
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), "deberta_fast cuda varlen: ", name, " has dtype ",
              t.scalar_type(), " but query has ", q.scalar_type());
  TORCH_CHECK(t.dim() == 3 && t.size(0) == T && t.size(1) == q.size(1) && t.size(2) == q.size(2),
              "deberta_fast cuda varlen: ", name, " must be [total_tokens=", T, ", H=", q.size(1), ", D=", q.size(2),
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(2) == 1, "deberta_fast cuda varlen: ", name,
              " must have a contiguous last dimension (stride 1), got strides ", t.strides(), "; call .contiguous()");
  TORCH_CHECK(t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0,
              "deberta_fast cuda varlen: ", name, " rows must be 16-byte aligned (strides multiple of 8 elements, "
              "aligned base pointer), got strides ", t.strides(), "; call .contiguous()");
}

void check_cu(const char* name, const Tensor& cu, const Tensor& q, int64_t n1) {
  TORCH_CHECK(on_device(cu) && cu.device() == q.device() && cu.scalar_type() == at::kInt && cu.dim() == 1 &&
                  cu.numel() == n1 && cu.is_contiguous(),
              "deberta_fast cuda varlen: ", name, " must be a contiguous int32 CUDA tensor [N+1] = [", n1, "] on ",
              q.device(), " (cast with .to(torch.int32)), got ", cu.scalar_type(), " ", cu.sizes(), " on ",
              cu.device());
}

Common make_varlen(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q, const Tensor& cu_k,
                   int64_t max_q, int64_t max_k, const OptT& rng, double scale, double p_drop) {
  Common c;
  c.dtype = dtype_code(q);
  TORCH_CHECK(q.dim() == 3, "deberta_fast cuda varlen: query must be 3-D [total_q, H, D], got ", q.sizes());
  TORCH_CHECK(k.dim() == 3, "deberta_fast cuda varlen: key must be 3-D [total_k, H, D], got ", k.sizes());
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2), Tk = k.size(0);
  TORCH_CHECK(D == 32 || D == 64 || D == 128, "deberta_fast cuda varlen: head_dim must be 32, 64 or 128, got ", D,
              "; use backend='triton' or backend='torch'");
  TORCH_CHECK(H >= 1, "deberta_fast cuda varlen: no heads");
  check_tokens("query", q, q, Tq);
  check_tokens("key", k, q, Tk);
  check_tokens("value", v, q, Tk);
  const int64_t N = cu_q.numel() - 1;
  TORCH_CHECK(N >= 1, "deberta_fast cuda varlen: cu_seqlens_q must hold N+1 >= 2 offsets, got ", cu_q.numel());
  check_cu("cu_seqlens_q", cu_q, q, N + 1);
  check_cu("cu_seqlens_k", cu_k, q, N + 1);
  TORCH_CHECK(N * H <= 65535, "deberta_fast cuda varlen: N*H (sequences x heads) must be <= 65535, got ", N * H,
              "; split the batch");
  TORCH_CHECK(max_q >= 1 && max_k >= 1 && max_q + max_k < (int64_t(1) << 30),
              "deberta_fast cuda varlen: max_seqlen_q, max_seqlen_k must be >= 1 with sum < 2^30, got ", max_q, ", ",
              max_k);
  TORCH_CHECK(Tq < (int64_t(1) << 31) && Tk < (int64_t(1) << 31),
              "deberta_fast cuda varlen: total tokens must fit int32 cu_seqlens, got ", Tq, ", ", Tk);
  auto& p = c.p;
  set_dropout(p, rng, q, p_drop);
  // *_sb = 0: the sequence's token offset cu_q[n] * stride(0) selects it (seq_view)
  p.q = q.data_ptr(); p.q_sb = 0; p.q_sh = q.stride(1); p.q_sr = q.stride(0);
  p.k = k.data_ptr(); p.k_sb = 0; p.k_sh = k.stride(1); p.k_sr = k.stride(0);
  p.v = v.data_ptr(); p.v_sb = 0; p.v_sh = v.stride(1); p.v_sr = v.stride(0);
  p.band_lo = -(1 << 30);  // no saturated-tile shortcut unless set_band() says where the band is
  p.band_hi = 1 << 30;
  p.B = static_cast<int>(N); p.H = static_cast<int>(H);
  p.h_all = p.H; p.h0 = 0;
  p.Lq = static_cast<int>(max_q); p.Lk = static_cast<int>(max_k);
  p.cu_q = cu_q.data_ptr<int32_t>(); p.cu_k = cu_k.data_ptr<int32_t>();
  p.Tq = Tq; p.Tk = Tk;
  set_scale(p, scale);
  c.D = static_cast<int>(D);
  return c;
}

std::vector<Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptT& pos_key,
                               const OptT& pos_query, const OptT& table, const Tensor& cu_q, const Tensor& cu_k,
                               int64_t max_q, int64_t max_k, const OptT& rng, double scale, double p_drop,
                               int64_t band_lo, int64_t band_hi) {
  Common c = make_varlen(q, k, v, cu_q, cu_k, max_q, max_k, rng, scale, p_drop);
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2);
  set_pos(c.p, "deberta_fast cuda varlen", pos_key, pos_query, table, q, c.p.B, H, D, max_q, max_k, false);
  set_band(c.p, band_lo, band_hi);
  const DeviceGuard guard(q.device());
  // zero-filled: a token outside every sequence (offsets not checked: check_offsets=False, or tracing) has no block
  // and gets 0, as the triton and torch backends give it; valid offsets cover every token (lse's rows of such a token
  // are never read)
  Tensor out = at::zeros({Tq, H, D}, q.options());
  Tensor lse = at::empty({H, Tq}, q.options().dtype(at::kFloat));
  if (Tq == 0) return {out, lse};
  auto& p = c.p;
  p.o = out.data_ptr(); p.o_sb = 0; p.o_sh = out.stride(1); p.o_sr = out.stride(0);
  p.lse = lse.data_ptr<float>();
  const Tensor kterms = sat_terms(p, false, H * k.size(0), c.dtype, c.D, q, "deberta_fast cuda varlen forward");
  const char* err = dfa::launch_fwd(p, c.dtype, c.D, current_stream());
  TORCH_CHECK(err == nullptr, "deberta_fast cuda varlen forward launch failed: ", err ? err : "");
  return {out, lse};
}

std::vector<Tensor> varlen_bwd(const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v,
                               const Tensor& out, const Tensor& lse, const OptT& pos_key, const OptT& pos_query,
                               const OptT& table, const Tensor& cu_q, const Tensor& cu_k, int64_t max_q,
                               int64_t max_k, const OptT& rng, double scale, double p_drop, int64_t dmin, int64_t W,
                               const OptT& perm, const OptT& offs, int64_t band_lo, int64_t band_hi) {
  Common c = make_varlen(q, k, v, cu_q, cu_k, max_q, max_k, rng, scale, p_drop);
  const int64_t Tq = q.size(0), H = q.size(1), D = q.size(2), Tk = k.size(0);
  set_pos(c.p, "deberta_fast cuda varlen backward", pos_key, pos_query, table, q, c.p.B, H, D, max_q, max_k, false);
  set_band(c.p, band_lo, band_hi);
  const DeviceGuard guard(q.device());
  check_tokens("grad_out", dout, q, Tq);
  check_saved_out("deberta_fast cuda varlen backward", out, q);
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == H && lse.size(1) == Tq &&
                  lse.is_contiguous() && lse.device() == q.device(),
              "deberta_fast cuda varlen backward: lse must be contiguous float32 [H, total_q] on ", q.device(),
              ", got ", lse.scalar_type(), " ", lse.sizes());
  auto& p = c.p;
  const Tensor delta = delta_buffer({H, Tq}, q);  // [H, Tq], the dq kernel's
  // zero-filled, as the forward's output: tokens outside every sequence (unchecked offsets) get no gradient
  Tensor dq = at::zeros({Tq, H, D}, q.options());
  Tensor dk = at::zeros({Tk, H, D}, q.options());
  Tensor dv = at::zeros({Tk, H, D}, q.options());
  p.dout = dout.data_ptr(); p.do_sb = 0; p.do_sh = dout.stride(1); p.do_sr = dout.stride(0);
  p.o = out.data_ptr(); p.o_sb = 0; p.o_sh = out.stride(1); p.o_sr = out.stride(0);
  p.lse_c = lse.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr(); p.dk = dk.data_ptr(); p.dv = dv.data_ptr();
  p.dq_sb = 0; p.dq_sh = dq.stride(1); p.dq_sr = dq.stride(0);
  p.dk_sb = 0; p.dk_sh = dk.stride(1); p.dk_sr = dk.stride(0);
  const auto groups = head_groups(H, at::elementSize(band_dtype(q)) * std::max(Tq, Tk) * std::max<int64_t>(W, 1));
  if (groups.size() == 1) {
    RelBackward rel;
    rel.check(p, q, pos_key.has_value(), pos_query.has_value(), H * Tq, H * Tk, max_q, max_k, dmin, W, perm, offs);
    auto [dc2p, dp2c] = rel.run(p, c.dtype, c.D, {H, Tq}, {H, Tk}, perm, offs, q, Tq > 0 || Tk > 0,
                                "deberta_fast cuda varlen backward", current_stream());
    return {dq, dk, dv, dc2p, dp2c};
  }
  Tensor dc2p = pos_key.has_value() ? at::empty({H, Tq, p.S2}, q.options()) : at::empty({0}, q.options());
  Tensor dp2c = pos_query.has_value() ? at::empty({H, Tk, p.S2}, q.options()) : at::empty({0}, q.options());
  for (const auto& [h0, n] : groups) {
    // lse / delta [H, Tq]: a group's rows are contiguous
    dfa::Params g = head_group(p, h0, n, q.element_size());
    g.lse_c = p.lse_c + h0 * Tq;
    g.delta = p.delta + h0 * Tq;
    RelBackward rel;
    rel.check(g, q, pos_key.has_value(), pos_query.has_value(), n * Tq, n * Tk, max_q, max_k, dmin, W, perm, offs);
    auto [c2p_g, p2c_g] = rel.run(g, c.dtype, c.D, {n, Tq}, {n, Tk}, perm, offs, q, Tq > 0 || Tk > 0,
                                  "deberta_fast cuda varlen backward", current_stream());
    if (pos_key.has_value()) dc2p.narrow(0, h0, n).copy_(c2p_g);
    if (pos_query.has_value()) dp2c.narrow(0, h0, n).copy_(p2c_g);
  }
  return {dq, dk, dv, dc2p, dp2c};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "deberta_fast._C: fused DeBERTa disentangled attention (CUDA, mma.sync, fp16/bf16)";
  m.def("fwd", &fwd, "fused forward -> (out, lse)", py::arg("q"), py::arg("k"), py::arg("v"), py::arg("pos_key"),
        py::arg("pos_query"), py::arg("table"), py::arg("key_mask"), py::arg("uniform"), py::arg("rng"),
        py::arg("scale"), py::arg("p_drop"), py::arg("band_lo") = -(1 << 30), py::arg("band_hi") = 1 << 30);
  m.def("bwd", &bwd, "fused backward -> (dq, dk, dv, dc2p, dp2c)", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("pos_key"), py::arg("pos_query"), py::arg("table"),
        py::arg("key_mask"), py::arg("uniform"), py::arg("rng"), py::arg("scale"), py::arg("p_drop"),
        py::arg("dmin"), py::arg("W"), py::arg("perm"), py::arg("offs"), py::arg("band_lo") = -(1 << 30),
        py::arg("band_hi") = 1 << 30);
  m.def("varlen_fwd", &varlen_fwd, "packed varlen forward -> (out [Tq,H,D], lse [H,Tq])", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("pos_key"), py::arg("pos_query"), py::arg("table"),
        py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"), py::arg("max_seqlen_k"),
        py::arg("rng"), py::arg("scale"), py::arg("p_drop"), py::arg("band_lo") = -(1 << 30),
        py::arg("band_hi") = 1 << 30);
  m.def("varlen_bwd", &varlen_bwd, "packed varlen backward -> (dq, dk, dv, dc2p, dp2c)", py::arg("dout"),
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("lse"), py::arg("pos_key"),
        py::arg("pos_query"), py::arg("table"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("rng"), py::arg("scale"), py::arg("p_drop"),
        py::arg("dmin"), py::arg("W"), py::arg("perm"), py::arg("offs"), py::arg("band_lo") = -(1 << 30),
        py::arg("band_hi") = 1 << 30);
  m.attr("HEAD_DIMS") = py::make_tuple(32, 64, 128);
  m.def("saturated_fraction", &dfa::saturated_fraction,
        "the fraction of an Lq x Lk call's 64 x 64 tiles beyond the slot band (the default rule of the precomputed "
        "saturated terms: >= 0.5)", py::arg("Lq"), py::arg("Lk"), py::arg("band_lo"), py::arg("band_hi"));
  m.def("last_fwd_kernel", [] { return std::string(dfa::last_fwd_kernel()); },
        "the forward kernel the last forward launched: 'wgmma' (sm_90a with DEBERTA_FAST_CUDA_WGMMA=1), 'wgmma serial' "
        "(=serial) or 'mma.sync'");
  m.def("last_bwd_kernel", [] { return std::string(dfa::last_bwd_kernel()); },
        "the backward score kernels' variant the last backward launched: 'wgmma' or 'mma.sync'");
  m.def("reset_last_kernels", [] { dfa::reset_last_kernels(); }, "last_fwd_kernel / last_bwd_kernel to ''");
  m.def(
      "set_band_budget",
      [](int64_t bytes) {
        TORCH_CHECK(bytes >= 0, "deberta_fast cuda: the band budget must be >= 0 bytes (0: no limit)");
        return std::exchange(g_band_budget, bytes);
      },
      "bytes of the backward's band buffer per head group (0: one group); returns the previous value",
      py::arg("bytes"));
#ifdef DFA_HOST_TEST
  dfa::bind_host_test(m);
#endif
#ifdef DFA_CPU_SIM
  dfa::bind_sim_selftest(m);
#endif
}
