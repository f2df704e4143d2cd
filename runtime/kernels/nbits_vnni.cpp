// The AVX-512 VNNI build of nbits_avx2.h's kernel (vpdpbusd on 256-bit vectors: one instruction for what AVX2
// does with vpmaddubsw + vpaddw + vpmaddwd): the same integer block sums; int4 results equal the AVX2 build's to
// the last bit, int8 ones within float rounding (nbits_avx2.h says why).
// Only this file is compiled for AVX-512; nbits_avx2_op.cpp calls into it on CPUs that report avx512vnni and
// avx512vl (__builtin_cpu_supports), nowhere else.
#pragma GCC target("avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")
#define QVL_ISA vnni
#define QVL_VNNI 1
#include "nbits_avx2.h"

void qvl::vnni_run_columns(const Job& j, int n0, int n1) { vnni::run_columns(j, n0, n1); }
