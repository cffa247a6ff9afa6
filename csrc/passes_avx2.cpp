// The passes compiled for AVX2 (8 fp32 lanes, 32-bit integer multiplies for the hash).
//
// Everything included before the target pragma (the standard library, types.h) stays compiled
// for the baseline instruction set; only the code of passes_impl.h, which lives in namespace
// fk::avx2 (FK_ISA), is compiled for AVX2, so no baseline caller can end up in AVX2 code.
#include "passes_prelude.h"

// The same condition as FK_X86_PASSES in passes_isa.h, whose declarations cannot be included
// here: this file opens fk::avx2 as the inline namespace of kernel_common.h.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC target("avx2,bmi,bmi2,f16c,popcnt")
#define FK_ISA avx2
#include "passes_impl.h"
#endif
