// Locate's change scores (SPEC "Neurons"): the merge's first pass run alone. It reads base and
// tuned once and yields Δ's finiteness, Σ|Δ| and C(j) = Σ|Δ| over each neuron, in float64.
// Merge plans its own first pass through first_pass_for, so both stream the pair the same way
// and share the one summation loop (passes_impl.h).
#pragma once

#include <vector>

#include "types.h"

namespace fk {

struct ScoresResult {
  int64_t nonfinite = 0;       // entries with non-finite Δ; total and scores are then not finite
  double total = 0.0;          // Σ|Δ|
  std::vector<double> scores;  // C(j): rows entries (axis row), cols (col), none (none)
};

// Neurons along `axis` of a rows x cols pair: rows, cols, or 1 for axis none.
int64_t neuron_total(const Pair& p, Axis axis);

// A first pass and the pair as it streams it, for neuron sums along `axis`.
struct FirstPass {
  Pair work;
  FirstPassPlan plan;
};

// The pair as rows x cols with C(j) per row or column planned; for axis none, no neuron sums and
// the pair as one row of n entries (the rows would only cut tiles short).
FirstPass first_pass_for(const Pair& pair, Axis axis);

// Σ|Δ| and C(j) along `axis` in one pass over pair.n entries (threads 0: OpenMP's default).
ScoresResult change_scores(const Pair& pair, Axis axis, int threads);

}  // namespace fk
