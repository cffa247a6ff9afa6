// The passes compiled for AVX-512 (F, BW, VL, DQ): 16 fp32 lanes, and compares that write mask
// registers, which the bracket and cut tests are made of. See passes_avx2.cpp for why the
// standard headers come first.
#include "passes_prelude.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,bmi,bmi2,f16c,popcnt")
#pragma GCC target("prefer-vector-width=512")
#define FK_ISA avx512
#include "passes_impl.h"
#endif
