// dfa_bwd.cu built by the host compiler for the CPU simulator (-DDFA_CPU_SIM).
#include "../dfa_bwd.cu"
