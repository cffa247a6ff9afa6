// The baseline build of the passes, and the run-time choice of the widest build this CPU runs.
#include <atomic>
#include <string>

#include "passes_impl.h"
#include "passes_isa.h"

namespace fk {
namespace {

enum class Isa { baseline, avx2, avx512 };

Isa cpu_isa() {
#if FK_X86_PASSES
  static const Isa isa = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
                      __builtin_cpu_supports("f16c") && __builtin_cpu_supports("popcnt");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::baseline;
  }();
  return isa;
#else
  return Isa::baseline;
#endif
}

// A narrower build chosen by set_pass_isa (tests run every build the CPU supports); -1: none.
std::atomic<int> chosen_isa{-1};

Isa best_isa() {
  const int chosen = chosen_isa.load(std::memory_order_relaxed);
  return chosen >= 0 ? Isa(chosen) : cpu_isa();
}

const char* const kIsaNames[] = {"baseline", "avx2", "avx512"};

}  // namespace

// Calls fn from the widest build of the passes this CPU runs.
#if FK_X86_PASSES
#define FK_DISPATCH(call)                             \
  switch (best_isa()) {                               \
    case Isa::avx512:                                 \
      return avx512::call;                            \
    case Isa::avx2:                                   \
      return avx2::call;                              \
    default:                                          \
      return base::call;                              \
  }
#else
#define FK_DISPATCH(call) return base::call;
#endif

FirstPassResult run_first_pass(const Pair& p, const FirstPassPlan& plan, int threads) {
  FK_DISPATCH(first_pass(p, plan, threads))
}

std::vector<double> run_kept_change(const Pair& p, const Mask& mask, bool per_column,
                                    int64_t neurons, int threads) {
  FK_DISPATCH(kept_change(p, mask, per_column, neurons, threads))
}

void run_write_pass(const Pair& p, const Mask& mask, const NeuronPlan& plan, void* out,
                    int threads) {
  FK_DISPATCH(write_pass(p, mask, plan, out, threads))
}

void run_write_rows(const Pair& p, const Mask& mask, const NeuronPlan& plan,
                    const std::vector<int64_t>& rows, void* out, int threads) {
  FK_DISPATCH(write_rows(p, mask, plan, rows, out, threads))
}

int64_t run_combine_pass(const Pair& p, const std::vector<Located>& models,
                         const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,
                         int threads) {
  FK_DISPATCH(combine_pass(p, models, pairs, out, cfg, threads))
}

const char* pass_isa() { return kIsaNames[int(best_isa())]; }

bool set_pass_isa(const std::string& name) {
  for (int isa = 0; isa <= int(cpu_isa()); ++isa) {
    if (name == kIsaNames[isa]) {
      chosen_isa.store(isa == int(cpu_isa()) ? -1 : isa);
      return true;
    }
  }
  return false;
}

int default_threads() { return thread_count(int64_t(1) << 40, 0); }

}  // namespace fk
