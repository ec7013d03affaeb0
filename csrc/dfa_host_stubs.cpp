// Test-only launchers for the host build of dfa_bindings.cpp (-DDFA_HOST_TEST, CPU torch; see
// tests/test_cuda_host.py): instead of running kernels they record what they were given, and the
// extension gets a few extra functions to read those records and to run the host-callable softmax
// helpers of dfa_softmax.h.  Not part of deberta_fast._C (build_config.cuda_sources leaves it out).
#ifndef DFA_HOST_TEST
#error "dfa_host_stubs.cpp is only for the host-test build (-DDFA_HOST_TEST)"
#endif

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "dfa_params.h"
#include "dfa_softmax.h"

namespace py = pybind11;

namespace dfa {
namespace {

struct Launch {
  std::string kernel;  // "fwd" | "bwd_dq" | "bwd_dkdv" | "band_to_slots" | "sat_terms"
  Params p{};          // fwd / bwd / band_to_slots
  bool by_key = false;  // band_to_slots: dP2C (band_k) rather than dC2P (band_q); sat_terms: key rows
  int dtype = -1, head_dim = 0, W = 0, S2 = 0;
  int64_t rows = 0;    // band_to_slots
  const void *band = nullptr, *sat = nullptr, *perm = nullptr, *offs = nullptr, *out = nullptr, *table = nullptr;
  int idx_lo = 0, idx_hi = 0;  // band_to_slots: slot-table indices of the saturated slots
  const void* stream = nullptr;
};

std::vector<Launch> launches;
std::string fail_kernel, fail_msg;

// nullptr, or the error text host_fail() armed for this kernel (once)
const char* record(Launch l) {
  const bool fail = l.kernel == fail_kernel;
  launches.push_back(std::move(l));
  if (!fail) return nullptr;
  fail_kernel.clear();
  return fail_msg.c_str();
}

template <typename T>
py::object val(T* x) {
  return py::int_(reinterpret_cast<uintptr_t>(x));
}
template <typename T>
py::object val(const T& x) {
  return py::cast(x);
}

#define DFA_PARAMS_FIELDS(X)                                                                               \
  X(q) X(k) X(v) X(q_sb) X(q_sh) X(q_sr) X(k_sb) X(k_sh) X(k_sr) X(v_sb) X(v_sh) X(v_sr) X(o) X(o_sb)      \
  X(o_sh) X(o_sr) X(dout) X(do_sb) X(do_sh) X(do_sr) X(dq) X(dk) X(dv) X(dq_sb) X(dq_sh) X(dq_sr) X(dk_sb) \
  X(dk_sh) X(dk_sr) X(lse) X(lse_c) X(delta) X(table) X(S2) X(pos_k) X(pos_q) X(pk_sb)                     \
  X(pk_sh) X(pk_sr) X(pq_sb) X(pq_sh) X(pq_sr) X(band_lo) X(band_hi) X(key_mask) X(km_sb) X(uniform)       \
  X(un_sb) X(un_sh) X(rng) X(drop_thresh) X(drop_scale) X(dropout) X(band_q) X(sat_q) X(band_k) X(sat_k)   \
  X(dmin) X(W) X(B) X(H) X(Lq) X(Lk) X(scale) X(scale_log2) X(cu_q) X(cu_k) X(Tq) X(Tk) X(sat_terms_k)         \
  X(sat_terms_q)

py::dict to_dict(const Launch& l) {
  py::dict d;
  d["kernel"] = l.kernel;
  d["dtype"] = l.dtype;
  d["stream"] = val(l.stream);
  if (l.kernel == "band_to_slots") {
    d["rows"] = l.rows;
    d["W"] = l.W;
    d["S2"] = l.S2;
    d["band"] = val(l.band);
    d["sat"] = val(l.sat);
    d["perm"] = val(l.perm);
    d["offs"] = val(l.offs);
    d["out"] = val(l.out);
    d["table"] = val(l.table);
    d["idx_lo"] = l.idx_lo;
    d["idx_hi"] = l.idx_hi;
    d["by_key"] = l.by_key;
  } else if (l.kernel == "sat_terms") {
    d["head_dim"] = l.head_dim;
    d["by_key"] = l.by_key;
    d["out"] = val(l.out);
  } else {
    d["head_dim"] = l.head_dim;
  }
  py::dict p;
#define DFA_FIELD(f) p[#f] = val(l.p.f);
  DFA_PARAMS_FIELDS(DFA_FIELD)
#undef DFA_FIELD
  d["params"] = p;
  return d;
}

}  // namespace

namespace {
const char* record_attention(const char* kernel, const Params& p, int dtype, int head_dim, void* stream) {
  Launch l;
  l.kernel = kernel;
  l.p = p;
  l.dtype = dtype;
  l.head_dim = head_dim;
  l.stream = stream;
  return record(std::move(l));
}
}  // namespace

const char* launch_fwd(const Params& p, int dtype, int head_dim, void* stream) {
  return record_attention("fwd", p, dtype, head_dim, stream);
}

const char* last_fwd_kernel() { return "recorded"; }
const char* last_bwd_kernel() { return "recorded"; }
void reset_last_fwd_kernel() {}
void reset_last_kernels() {}

const char* launch_bwd(const Params& p, int dtype, int head_dim, BwdKernel which, void* stream) {
  return record_attention(which == BWD_DQ ? "bwd_dq" : "bwd_dkdv", p, dtype, head_dim, stream);
}

const char* launch_band_to_slots(const Params& p, bool by_key, const int32_t* perm, const int32_t* offs, void* out,
                                 int dtype, int64_t rows, void* stream) {
  Launch l;
  l.kernel = "band_to_slots";
  l.p = p;
  l.by_key = by_key;
  l.table = p.table;
  l.idx_lo = sat_table_index(p.band_lo, p.Lq, p.Lk);
  l.idx_hi = sat_table_index(p.band_hi, p.Lq, p.Lk);
  l.band = by_key ? p.band_k : p.band_q;
  l.sat = by_key ? p.sat_k : p.sat_q;
  l.perm = perm;
  l.offs = offs;
  l.out = out;
  l.dtype = dtype;
  l.rows = rows;
  l.W = p.W;
  l.S2 = p.S2;
  l.stream = stream;
  return record(std::move(l));
}

const char* launch_sat_terms(const Params& p, bool by_query, void* out, int dtype, int head_dim, void* stream) {
  Launch l;
  l.kernel = "sat_terms";
  l.p = p;
  l.by_key = !by_query;
  l.out = out;
  l.dtype = dtype;
  l.head_dim = head_dim;
  l.stream = stream;
  return record(std::move(l));
}

void bind_host_test(py::module_& m) {
  m.def("host_launches", [] {
    py::list out;
    for (const Launch& l : launches) out.append(to_dict(l));
    return out;
  }, "the launches recorded since host_reset(): dicts (kernel, dtype, params | band_to_slots arguments)");
  m.def("host_reset", [] {
    launches.clear();
    fail_kernel.clear();
  });
  m.def("host_fail", [](const std::string& kernel, const std::string& msg) {
    fail_kernel = kernel;
    fail_msg = msg;
  }, "the next launch of `kernel` returns the error text `msg`", py::arg("kernel"), py::arg("msg"));
  m.def("row_lse", &row_lse, py::arg("m"), py::arg("l"));
  m.def("lse_log2", &lse_log2, py::arg("lse"));
}

}  // namespace dfa
