// DELLA's MagPrune mask (SPEC "Suppress: della"): keep probabilities from each entry's rank in its
// row, so the rows are sorted, one per task, in parallel.
#pragma once

#include "types.h"

namespace fk {

struct DellaRequest {
  uint32_t tensor_seed;
  double density;  // K
  double epsilon;  // ε
  bool inverse;    // store (float)(1/p) as the kept entry's scale, else 1
  int threads;
};

struct DellaResult {
  int64_t kept;
  double kept_abs;  // Σ|Δ| over kept entries, for the l1 rescale
};

// Writes entry_scale[i - p.lo] for every entry p holds (whole rows; rows = the tensor's leading
// dimensions, cols = its last): the kept entry's scale, or -1 where the entry is dropped. Row
// results add up in row order onto `so_far` (the previous chunks' result), so a tensor streamed
// in chunks of rows gets the same sums as a whole one.
DellaResult della_mask(const Pair& p, const DellaRequest& req, float* entry_scale,
                       DellaResult so_far = {0, 0.0});

}  // namespace fk
