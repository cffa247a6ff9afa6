// Locate's change scores: the plan of a first pass that sums |Δ| per neuron, and that pass alone.
#include "scores.h"

#include <algorithm>

#include "kernel_common.h"
#include "passes.h"

namespace fk {

int64_t neuron_total(const Pair& p, Axis axis) {
  if (axis == Axis::row) return p.rows;
  if (axis == Axis::col) return p.cols;
  return 1;
}

FirstPass first_pass_for(const Pair& pair, Axis axis) {
  FirstPass pass{pair, {}};
  if (axis == Axis::none) {
    pass.work.rows = 1;
    pass.work.cols = std::max<int64_t>(pair.n, 1);
  }
  pass.plan.change = axis != Axis::none;
  pass.plan.per_column = axis == Axis::col;
  pass.plan.neurons = neuron_total(pass.work, axis);
  return pass;
}

ScoresResult change_scores(const Pair& pair, Axis axis, int threads) {
  FirstPass pass = first_pass_for(pair, axis);
  pass.plan.total_abs = true;
  FirstPassResult first = run_first_pass(pass.work, pass.plan, thread_count(pair.n, threads));
  ScoresResult result;
  result.nonfinite = first.nonfinite;
  result.total = first.total_abs;
  result.scores = std::move(first.change);
  return result;
}

}  // namespace fk
