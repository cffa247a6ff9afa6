// Brackets around the window's boundaries from a sample of order keys.
//
// The sample quantile of position p lies within a few standard deviations (sqrt(S q (1 − q))
// ranks of S samples, q = p / n) of the true one, so the sample keys kSigmas deviations either
// side bracket the boundary entry; the first pass checks that they do (above <= p < above +
// candidates) and the radix select takes over when they do not. Order keys include the TIE
// hash, so the bracket is narrow even when |Δ| ties: about 2 kSigmas / sqrt(S) of the entries
// fall inside it, however bf16 deltas tie.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <functional>

#include "kernel_common.h"
#include "rank.h"
#include "select.h"

namespace fk {
namespace {

// A bracket misses with probability ~6e-5 per boundary at 4 deviations; a miss only costs the
// radix select's passes.
constexpr double kSigmas = 4.0;
constexpr int64_t kSlack = 4;
// Samples are drawn as runs of consecutive entries: one cache line of each input per run
// instead of one per sample.
constexpr int64_t kSampleRun = 16;
constexpr int64_t kPrefetchRuns = 24;
// No order key exceeds this, so "key > kKeyMax" is the empty set.
constexpr uint64_t kKeyMax = (uint64_t(1) << 63) - 1;

uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Where the sample's runs of consecutive entries start: drawn by a fixed hash of the run number.
inline int64_t run_start(int64_t j, int64_t n, int64_t run, uint32_t tensor_seed) {
  const uint64_t draw = splitmix64(uint64_t(j) ^ (uint64_t(tensor_seed) << 32));
  return int64_t(draw % uint64_t(n - run + 1));
}

// Order keys of about `count` entries: runs of kSampleRun consecutive entries at positions
// drawn by a fixed hash of the run number.
template <class C>
std::vector<uint64_t> sample_keys(const Pair& p, uint32_t tensor_seed, int64_t count,
                                  int threads) {
  const int64_t run = std::min<int64_t>(kSampleRun, p.n);
  const int64_t runs = (count + run - 1) / run;
  std::vector<uint64_t> keys(size_t(runs * run));
  const auto* base = static_cast<const typename C::T*>(p.base);
  const auto* tuned = static_cast<const typename C::T*>(p.tuned);
  const HashStream tie(tensor_seed, kStreamTie);
  parallel_slices(runs, threads, [&](int, int64_t lo, int64_t hi) {
    uint32_t h[kSampleRun];
    for (int64_t j = lo; j < hi; ++j) {
      // Each run is two cache misses; prefetching a few runs ahead overlaps them.
      if (j + kPrefetchRuns < hi) {
        const int64_t ahead = run_start(j + kPrefetchRuns, p.n, run, tensor_seed);
        __builtin_prefetch(base + ahead);
        __builtin_prefetch(tuned + ahead);
      }
      const int64_t start = run_start(j, p.n, run, tensor_seed);
      for (int64_t r = 0; r < run; ++r) h[r] = tie.at(start + r);
      for (int64_t r = 0; r < run; ++r) {
        const float d = C::load(tuned[start + r]) - C::load(base[start + r]);
        keys[size_t(j * run + r)] = order_key(bits_of(d) & kAbsMask, h[r]);
      }
    }
  });
  return keys;
}

// The sample's keys that fall in a chunk, at the places sample_keys puts them.
template <class C>
void sample_chunk(const Pair& chunk, const SampleRuns& runs, uint32_t tensor_seed,
                  std::vector<uint64_t>& keys) {
  const auto* base = static_cast<const typename C::T*>(chunk.base);
  const auto* tuned = static_cast<const typename C::T*>(chunk.tuned);
  const HashStream tie(tensor_seed, kStreamTie);
  for (size_t j = 0; j < runs.start.size(); ++j) {
    const int64_t lo = std::max(runs.start[j], chunk.lo);
    const int64_t hi = std::min(runs.start[j] + runs.run, chunk.end());
    for (int64_t i = lo; i < hi; ++i) {
      const float d = C::load(tuned[i - chunk.lo]) - C::load(base[i - chunk.lo]);
      keys[j * size_t(runs.run) + size_t(i - runs.start[j])] =
          order_key(bits_of(d) & kAbsMask, tie.at(i));
    }
  }
}

// Sampling costs O(S) and the candidates O(n / sqrt(S)); their sum is least near S ~ n^(2/3)
// (the constant measured on 58.7M-entry bf16 tensors, where it gives 2^18).
int64_t auto_sample_size(int64_t n) {
  const double s = 1.75 * std::pow(double(n), 2.0 / 3.0);
  return std::clamp<int64_t>(int64_t(s), int64_t(1) << 12, int64_t(1) << 20);
}

// Ranks (into the descending sample) that bound position p's bracket; may fall outside [0, S).
std::pair<int64_t, int64_t> bracket_ranks(int64_t position, int64_t n, int64_t samples) {
  const double q = double(position) / double(n);
  const double rank = q * double(samples);
  const double deviation = std::sqrt(double(samples) * q * (1.0 - q));
  const int64_t margin = int64_t(std::ceil(kSigmas * deviation)) + kSlack;
  return {int64_t(std::floor(rank)) - margin, int64_t(std::ceil(rank)) + margin};
}

inline bool precedes(const Candidate& a, const Candidate& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

}  // namespace

WindowPlan window_boundaries(int64_t n, const WindowRequest& req) {
  WindowPlan w;
  w.position[0] = req.start;
  w.position[1] = req.start + req.len;
  for (int b = 0; b < 2 && req.len > 0; ++b)
    if (w.position[b] > 0 && w.position[b] < n) w.inner[w.inner_count++] = b;
  w.radix = w.inner_count > 0 && req.sample_size == 0;
  return w;
}

int64_t sample_count(int64_t n, const WindowRequest& req) {
  const int64_t asked = req.sample_size > 0 ? req.sample_size : auto_sample_size(n);
  return std::min(asked, n);
}

SampleRuns sample_runs(int64_t n, const WindowRequest& req) {
  SampleRuns runs;
  runs.run = std::min<int64_t>(kSampleRun, n);
  const int64_t count = (sample_count(n, req) + runs.run - 1) / runs.run;
  runs.start.resize(size_t(count));
  for (int64_t j = 0; j < count; ++j)
    runs.start[size_t(j)] = run_start(j, n, runs.run, req.tensor_seed);
  return runs;
}

void add_sample_keys(const Pair& chunk, const SampleRuns& runs, const WindowRequest& req,
                     std::vector<uint64_t>& keys) {
  keys.resize(runs.start.size() * size_t(runs.run));
  dispatch_dtype(chunk.dtype, [&](auto codec) {
    sample_chunk<decltype(codec)>(chunk, runs, req.tensor_seed, keys);
  });
}

void bracket_window(WindowPlan& w, int64_t n, std::vector<uint64_t> keys) {
  const int count = w.inner_count;
  const int64_t samples = int64_t(keys.size());
  std::pair<int64_t, int64_t> ranks[2];
  double width = 0.0;
  for (int c = 0; c < count; ++c) {
    ranks[c] = bracket_ranks(w.position[w.inner[c]], n, samples);
    width = std::max(width, double(ranks[c].second - ranks[c].first + 1) / double(samples));
  }
  w.brackets = count;
  for (int c = 0; c < count; ++c) {
    const auto [hi_rank, lo_rank] = ranks[c];
    w.boundary_of[c] = w.inner[c];
    w.bracket[c].hi = hi_rank < 0 ? kKeyMax : key_at_rank(keys, hi_rank);
    w.bracket[c].lo = lo_rank >= samples ? 0 : key_at_rank(keys, lo_rank);
  }
  w.collect_cap = uint64_t(2.0 * width * double(n)) + 4096;
}

WindowPlan plan_window(const Pair& p, const WindowRequest& req) {
  WindowPlan w = window_boundaries(p.n, req);
  if (w.inner_count == 0 || w.radix) return w;
  const int64_t wanted = sample_count(p.n, req);
  std::vector<uint64_t> keys = dispatch_dtype(p.dtype, [&](auto codec) {
    return sample_keys<decltype(codec)>(p, req.tensor_seed, wanted,
                                        thread_count(wanted * 16, req.threads));
  });
  bracket_window(w, p.n, std::move(keys));
  return w;
}

void add_window_work(const WindowPlan& w, const WindowRequest& req, FirstPassPlan& plan) {
  plan.tensor_seed = req.tensor_seed;
  plan.brackets = w.brackets;
  plan.collect_cap = w.collect_cap;
  plan.lower_bracket = -1;
  for (int c = 0; c < w.brackets; ++c) {
    plan.bracket[c] = w.bracket[c];
    if (w.boundary_of[c] == 1) plan.lower_bracket = c;
  }
}

namespace {

// The cut at the candidate of the given rank (SPEC order) and how many candidates it holds.
// Works on a copy: the fused route sweeps the list afterwards in the index order the first
// pass made it in.
RankCut cut_in(const std::vector<Candidate>& found, int64_t rank, bool unique_keys) {
  if (unique_keys) {
    std::vector<uint64_t> keys(found.size());
    for (size_t j = 0; j < found.size(); ++j) keys[j] = found[j].key;
    return cut_at_rank(std::move(keys), rank);
  }
  // Equal keys (2^32 entries or more): the index breaks the tie.
  std::vector<Candidate> copy(found);
  std::nth_element(copy.begin(), copy.begin() + rank, copy.end(), precedes);
  return {Cut{copy[size_t(rank)].key, uint64_t(copy[size_t(rank)].index)}, rank};
}

}  // namespace

namespace {

// The window's exact cuts from each bracket's count above it and `cut_at(c, rank)`, the cut at
// a rank among bracket c's candidates (the same rule whether the candidates were gathered whole
// or chunk by chunk). False when a bracket missed.
template <class CutAt>
bool resolve_with(const WindowPlan& w, const WindowRequest& req, const int64_t* above,
                  const int64_t* candidates, const bool* overflow, CutAt&& cut_at, Window& out) {
  if (req.len == 0) {
    out = Window{kCutNone, kCutNone, 0};
    return true;
  }
  Cut cuts[2];
  int64_t edge[2];
  for (int b = 0; b < 2; ++b) {
    cuts[b] = w.position[b] <= 0 ? kCutNone : kCutAll;
    edge[b] = w.position[b];
  }
  for (int c = 0; c < w.brackets; ++c) {
    const int b = w.boundary_of[c];
    const int64_t position = w.position[b];
    if (overflow[c] || position < above[c] || position >= above[c] + candidates[c]) return false;
    const RankCut cut = cut_at(c, position - above[c]);
    cuts[b] = cut.cut;
    edge[b] = above[c] + cut.count;
  }
  const int64_t kept = edge[1] - edge[0];
  if (kept != req.len) return false;
  out = Window{cuts[0], cuts[1], kept};
  return true;
}

}  // namespace

bool resolve_brackets(const WindowPlan& w, const WindowRequest& req, FirstPassResult& first,
                      Window& out) {
  int64_t above[2] = {0, 0}, candidates[2] = {0, 0};
  bool overflow[2] = {false, false};
  for (int c = 0; c < w.brackets; ++c) {
    above[c] = first.bracket[c].above;
    candidates[c] = int64_t(first.bracket[c].found.size());
    overflow[c] = first.bracket[c].overflow;
  }
  auto cut_at = [&](int c, int64_t rank) {
    return cut_in(first.bracket[c].found, rank, req.unique_keys);
  };
  return resolve_with(w, req, above, candidates, overflow, cut_at, out);
}

bool resolve_bracket_keys(const WindowPlan& w, const WindowRequest& req,
                          const BracketKeys (&found)[2], Window& out) {
  int64_t above[2] = {0, 0}, candidates[2] = {0, 0};
  bool overflow[2] = {false, false};
  for (int c = 0; c < w.brackets; ++c) {
    above[c] = found[c].above;
    candidates[c] = int64_t(found[c].keys.size());
    overflow[c] = found[c].overflow;
  }
  auto cut_at = [&](int c, int64_t rank) {
    return cut_at_rank(found[c].keys, rank);
  };
  return resolve_with(w, req, above, candidates, overflow, cut_at, out);
}

}  // namespace fk
