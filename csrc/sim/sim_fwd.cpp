// dfa_fwd.cu built by the host compiler for the CPU simulator (-DDFA_CPU_SIM).
#include "../dfa_fwd.cu"
