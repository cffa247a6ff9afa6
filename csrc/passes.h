// The streaming passes over base and tuned. Each exists once per instruction set the build
// supports (passes_impl.h); these entry points pick the best one this CPU runs.
#pragma once

#include <string>

#include "multi.h"
#include "types.h"

namespace fk {

// Δ's finiteness and whatever `plan` asks for (neuron scores, sums, bracket counts, histogram).
FirstPassResult run_first_pass(const Pair& p, const FirstPassPlan& plan, int threads);

// C'(j) = Σ|Sub(Δ)| over each neuron (rescale restore).
std::vector<double> run_kept_change(const Pair& p, const Mask& mask, bool per_column,
                                    int64_t neurons, int threads);

// out = cast(f32(base) + Δ') for every entry.
void run_write_pass(const Pair& p, const Mask& mask, const NeuronPlan& plan, void* out,
                    int threads);

// The write pass over the listed rows only (restored neurons after a fused first pass).
void run_write_rows(const Pair& p, const Mask& mask, const NeuronPlan& plan,
                    const std::vector<int64_t>& rows, void* out, int threads);

// The combining write pass of a merge of several tuned models over whole tensors (p.lo = 0):
// out = cast(f32(base) + λ·M) from every model's located mask and neuron plan; returns the
// (model, entry) pairs consensus dropped. p is base as the tiles walk it; pairs[t].tuned the
// models' tensors.
int64_t run_combine_pass(const Pair& p, const std::vector<Located>& models,
                         const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,
                         int threads);

// The instruction set the passes run with here ("avx512", "avx2" or "baseline"), for reports.
const char* pass_isa();

// Runs the passes with a narrower build than the CPU's best ("baseline", "avx2", "avx512"), so
// tests can hold each build to the reference; false if this CPU cannot run it.
bool set_pass_isa(const std::string& name);

// Threads a large tensor's passes use by default (1 without OpenMP).
int default_threads();

}  // namespace fk
