// Order statistics of a set of order keys held in memory (the sample, the bracket candidates).
#pragma once

#include <cstdint>
#include <vector>

#include "types.h"

namespace fk {

// The key of descending rank `rank` (0 = largest).
uint64_t key_at_rank(std::vector<uint64_t> keys, int64_t rank);

// A cut through the keys and how many of them it holds.
struct RankCut {
  Cut cut;
  int64_t count;
};

// The cut holding exactly the `rank` largest keys. Keys must be distinct for it to hold exactly
// `rank` (order keys are, below 2^32 entries).
RankCut cut_at_rank(std::vector<uint64_t> keys, int64_t rank);

}  // namespace fk
