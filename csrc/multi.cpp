// The merge of several tuned models (multi.h): each model located by merge()'s own passes, then
// the one combining pass (combine_impl.h, built per instruction set with the other passes).
#include "multi.h"

#include <algorithm>

#include "kernel_common.h"
#include "passes.h"

namespace fk {

MultiResult merge_multi(const std::vector<Pair>& pairs, const std::vector<MergeConfig>& cfgs,
                        void* out, const CombineConfig& combine) {
  MultiResult result;
  std::vector<Located> models;
  models.reserve(pairs.size());
  bool neurons = false;
  for (size_t m = 0; m < pairs.size(); ++m) {
    models.push_back(locate(pairs[m], cfgs[m]));
    result.models.push_back(models.back().result);
    result.nonfinite += models.back().result.nonfinite;
    neurons = neurons || neurons_active(cfgs[m]);
  }
  if (result.nonfinite > 0 || pairs.empty()) return result;
  // Tiles follow rows only when some model has neurons; else the pair streams as one row.
  Pair p = pairs[0];
  if (!neurons) {
    p.rows = 1;
    p.cols = std::max<int64_t>(p.n, 1);
  }
  const int threads = thread_count(p.n, combine.threads);
  result.dropped = run_combine_pass(p, models, pairs, out, combine, threads);
  return result;
}

}  // namespace fk
