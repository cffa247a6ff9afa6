// The merge of several tuned models over one base (SPEC.md "Several tuned models"): each model
// located alone by merge()'s own passes (merge_kernel.h's locate: selection and restore
// planning, nothing written), then ONE combining pass that reads base and every tuned tensor
// once, tile by tile, and writes out = cast(f32(base) + λ·M).
#pragma once

#include <vector>

#include "merge_kernel.h"
#include "types.h"

namespace fk {

enum class Consensus : int { none, sum, count };

struct CombineConfig {
  Consensus consensus = Consensus::none;
  bool normalize = false;
  float lambda = 1.0f;  // λ, as float32
  int threads = 0;      // the combining pass's; 0: OpenMP's default
};

struct MultiResult {
  int64_t nonfinite = 0;  // > 0: some model's Δ is not finite and nothing was written
  int64_t dropped = 0;    // (model, entry) pairs with W != 0 that consensus dropped
  std::vector<MergeResult> models;
};

// pairs[t] is (base, tuned_{t+1}) with its configuration cfgs[t] (tensor_seed is model t+1's);
// every pair has base's shape and dtype. out must not overlap base or any tuned tensor unless
// it is one of them exactly.
MultiResult merge_multi(const std::vector<Pair>& pairs, const std::vector<MergeConfig>& cfgs,
                        void* out, const CombineConfig& combine);

}  // namespace fk
