// DELLA rows: sort each row's order keys, turn ranks into keep probabilities, draw u(i) < p(i).
#include "della.h"

#include <algorithm>

#include "kernel_common.h"

namespace fk {
namespace {

struct RowEntry {
  uint64_t key;
  int64_t col;
};

// SPEC order within a row: key descending, then index (here column) ascending.
inline bool precedes(const RowEntry& a, const RowEntry& b) {
  return a.key > b.key || (a.key == b.key && a.col < b.col);
}

// p(r) = (K − ε) + ((2ε)·r)/(L − 1), in double and in this order, like contract.della_probability.
inline double keep_probability(const DellaRequest& req, int64_t rank, int64_t row_len) {
  if (row_len == 1) return req.density;
  return (req.density - req.epsilon) + ((2.0 * req.epsilon) * double(rank)) / double(row_len - 1);
}

template <class C>
void della_row(const Pair& p, const DellaRequest& req, int64_t row, std::vector<float>& d,
               std::vector<RowEntry>& entries, float* entry_scale, int64_t& kept,
               double& kept_abs) {
  const int64_t len = p.cols;
  const int64_t start = row * len;
  const HashStream tie(req.tensor_seed, kStreamTie);
  const HashStream drop(req.tensor_seed, kStreamDrop);
  for_each_tile(start, start + len, len, [&](const Tile& t) {
    load_delta<C>(p, t, d.data() + t.col);
  });
  for (int64_t c = 0; c < len; ++c)
    entries[c] = {order_key(bits_of(d[c]) & kAbsMask, tie.at(start + c)), c};
  std::sort(entries.begin(), entries.end(), precedes);
  int64_t row_kept = 0;
  double acc[4] = {0, 0, 0, 0};  // interleaved partial sums: fixed order, shorter add chains
  for (int64_t pos = 0; pos < len; ++pos) {
    const int64_t c = entries[pos].col;
    const int64_t i = start + c;
    const double prob = keep_probability(req, len - 1 - pos, len);
    const bool keep = double(drop.at(i)) * 0x1.0p-32 < prob;
    entry_scale[i - p.lo] = keep ? (req.inverse ? float(1.0 / prob) : 1.0f) : -1.0f;
    if (keep) {
      ++row_kept;
      acc[c & 3] += double(std::fabs(d[c]));
    }
  }
  kept = row_kept;
  kept_abs = (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace

DellaResult della_mask(const Pair& p, const DellaRequest& req, float* entry_scale,
                       DellaResult result) {
  if (p.held() == 0) return result;
  // Per-row results summed in row order afterwards, so the total does not depend on scheduling.
  const int64_t first_row = p.lo / p.cols;
  const int64_t rows = p.held() / p.cols;
  std::vector<int64_t> row_kept(rows, 0);
  std::vector<double> row_abs(rows, 0.0);
  const int threads = std::min<int64_t>(thread_count(p.held(), req.threads), rows);
  parallel_slices(rows, threads, [&](int, int64_t lo, int64_t hi) {
    std::vector<float> d(p.cols);
    std::vector<RowEntry> entries(p.cols);
    for (int64_t row = lo; row < hi; ++row)
      dispatch_dtype(p.dtype, [&](auto codec) {
        della_row<decltype(codec)>(p, req, first_row + row, d, entries, entry_scale,
                                   row_kept[row], row_abs[row]);
      });
  });
  for (int64_t row = 0; row < rows; ++row) {
    result.kept += row_kept[row];
    result.kept_abs += row_abs[row];
  }
  return result;
}

}  // namespace fk
