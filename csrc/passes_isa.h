// The passes built for wider instruction sets: passes_avx2.cpp and passes_avx512.cpp. Only GCC on
// x86-64 builds them, through `#pragma GCC target`, so the extension still builds and runs
// anywhere; passes.cpp calls one only on a CPU that reports every feature it was built for.
#pragma once

#include "multi.h"
#include "types.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FK_X86_PASSES 1
#else
#define FK_X86_PASSES 0
#endif

#if FK_X86_PASSES
// The same declarations in each instruction set's namespace.
#define FK_DECLARE_PASSES(isa)                                                                   \
  namespace fk {                                                                                 \
  namespace isa {                                                                                \
  FirstPassResult first_pass(const Pair& p, const FirstPassPlan& plan, int threads);             \
  std::vector<double> kept_change(const Pair& p, const Mask& mask, bool per_column,              \
                                  int64_t neurons, int threads);                                 \
  void write_pass(const Pair& p, const Mask& mask, const NeuronPlan& plan, void* out,            \
                  int threads);                                                                  \
  void write_rows(const Pair& p, const Mask& mask, const NeuronPlan& plan,                       \
                  const std::vector<int64_t>& rows, void* out, int threads);                     \
  int64_t combine_pass(const Pair& p, const std::vector<Located>& models,                        \
                       const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,      \
                       int threads);                                                             \
  }                                                                                              \
  }
FK_DECLARE_PASSES(avx2)
FK_DECLARE_PASSES(avx512)
#undef FK_DECLARE_PASSES
#endif
