// Radix select over 64-bit keys: histogram the top 16 bits of (key − min) over the keys still in
// play, keep the bin holding the rank, repeat; nth_element finishes once few are left. A few
// linear passes instead of nth_element's partitioning, which matters at the half million
// candidates of a large tensor.
#include "rank.h"

#include <algorithm>
#include <functional>

namespace fk {
namespace {

constexpr size_t kFinish = 2048;

// One level: the bin of (key − lo) >> shift holding `rank`, the keys in higher bins, and the
// keys of that bin moved to the front of `keys` (which is resized to them).
struct Level {
  uint64_t lo;
  int shift;
  size_t bin;
  int64_t over;  // keys in higher bins
};

bool narrow(std::vector<uint64_t>& keys, int64_t& rank, std::vector<uint32_t>& hist, Level& level) {
  uint64_t lo = keys[0], hi = keys[0];
  for (uint64_t k : keys) {
    lo = std::min(lo, k);
    hi = std::max(hi, k);
  }
  const uint64_t span = hi - lo;
  if (span == 0) return false;
  const int shift = std::max(0, 64 - __builtin_clzll(span) - 16);
  hist.assign(size_t(span >> shift) + 1, 0);
  for (uint64_t k : keys) ++hist[(k - lo) >> shift];
  size_t bin = hist.size();
  int64_t over = 0;
  while (rank >= int64_t(hist[--bin])) {
    rank -= hist[bin];
    over += hist[bin];
  }
  level = Level{lo, shift, bin, over};
  return true;
}

void keep_bin(std::vector<uint64_t>& keys, const Level& level) {
  size_t kept = 0;  // branch-free: about as many keys leave the bin as stay in it
  for (uint64_t k : keys) {
    keys[kept] = k;
    kept += ((k - level.lo) >> level.shift) == level.bin;
  }
  keys.resize(kept);
}

}  // namespace

uint64_t key_at_rank(std::vector<uint64_t> keys, int64_t rank) {
  std::vector<uint32_t> hist;
  Level level;
  while (keys.size() > kFinish && narrow(keys, rank, hist, level)) keep_bin(keys, level);
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<uint64_t>());
  return keys[size_t(rank)];
}

RankCut cut_at_rank(std::vector<uint64_t> keys, int64_t rank) {
  std::vector<uint32_t> hist;
  Level level;
  int64_t above = 0;  // keys above those still in play
  while (keys.size() > kFinish && narrow(keys, rank, hist, level)) {
    above += level.over;
    keep_bin(keys, level);
  }
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<uint64_t>());
  return {Cut{keys[size_t(rank)], 0}, above + rank};
}

}  // namespace fk
