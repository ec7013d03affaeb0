// Softmax row statistics of the fused kernels, host- and device-callable (no CUDA headers), so the
// host tests (-DDFA_HOST_TEST, tests/test_cuda_host.py) run the very code the kernels run.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define DFA_HD __host__ __device__ __forceinline__
#else
#define DFA_HD inline
#endif

namespace dfa {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Natural-log LSE of a row from its running max m (log2 units) and sum l of exp2(s - m):
// +inf for a row with no key (l == 0), as the Triton kernels write, so that exp2(s - LSE) = 0.
DFA_HD float row_lse(float m, float l) { return l > 0.f ? (m + log2f(l)) * kLn2 : INFINITY; }

// The backward's base-2 LSE of a row from the caller's LSE: +inf unless it is finite, so that
// p = exp2(s - lse2) is 0 (never NaN) for rows with no key (-inf / +inf) and for a NaN LSE.
DFA_HD float lse_log2(float lse) { return fabsf(lse) < INFINITY ? lse * kLog2e : INFINITY; }

}  // namespace dfa
