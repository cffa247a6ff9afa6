// Radix select of the SPEC order's window boundaries: the exact fallback of the brackets.
//
// A boundary (the entry at position p of the order) is found level by level: a histogram of the
// top 16 |Δ| bits names the bin that holds it; while that bin's group is too large to
// hold in memory, another pass histograms the next digit of the key within the group; once it is
// small, one pass collects the group's (key, index) pairs and nth_element picks the entry.
// bf16 deltas tie a lot, so a group can be large even at full |Δ| resolution: the TIE-hash
// digits then split it evenly.
#include "select.h"

#include <algorithm>
#include <cstdlib>
#include <memory>

#include "kernel_common.h"
#include "passes.h"

namespace fk {
namespace {

// A group at level L shares the key bits above kPrefixShift[L]: level 1 the top 16 |Δ| bits,
// level 2 all |Δ| bits, level 3 also the TIE hash's top 16 bits, level 4 the whole key.
constexpr int kPrefixShift[5] = {63, 47, 32, 16, 0};
constexpr int kLastLevel = 4;

inline bool precedes(const Candidate& a, const Candidate& b) {
  return a.key > b.key || (a.key == b.key && a.index < b.index);
}

// Where rank (0 = first in order) falls in a histogram read from its top bin down.
struct Located {
  uint64_t bin;
  uint64_t rank;   // within the bin
  uint64_t count;  // entries in the bin
};

Located locate(const std::vector<uint64_t>& hist, uint64_t rank) {
  for (size_t b = hist.size(); b-- > 0;) {
    if (rank < hist[b]) return {b, rank, hist[b]};
    rank -= hist[b];
  }
  return {0, 0, 0};  // rank beyond the total: callers only ask for ranks < n
}

// One boundary still being resolved: the group of entries whose key >> kPrefixShift[level]
// equals prefix, and the rank of the boundary entry within it.
struct Query {
  int level = 0;
  uint64_t prefix = 0;
  uint64_t count = 0;
  uint64_t rank = 0;
  bool done = false;
  Cut cut = kCutNone;
};

// What one pass does for one group: histogram the next key digit, or collect the entries.
struct Job {
  int level;
  uint64_t prefix;
  bool collect;
  int abs_shift;        // cheap test on |Δ| bits first: (a >> abs_shift) == abs_prefix
  uint32_t abs_prefix;
  bool needs_key;       // the TIE hash is needed (collecting, or a digit below the |Δ| bits)
  int digit_shift;
  uint64_t digit_mask;
  std::vector<std::vector<uint64_t>> hist;    // per thread
  std::vector<std::vector<Candidate>> found;  // per thread
};

Job make_job(const Query& q, uint64_t collect_cap, int threads) {
  Job j{};
  j.level = q.level;
  j.prefix = q.prefix;
  j.collect = q.count <= collect_cap || q.level == kLastLevel;
  const int shift = kPrefixShift[q.level];
  if (shift >= 32) {
    j.abs_shift = shift - 32;
    j.abs_prefix = uint32_t(q.prefix);
  } else {
    j.abs_shift = 0;
    j.abs_prefix = uint32_t(q.prefix >> (32 - shift));
  }
  if (j.collect) {
    j.needs_key = true;
    j.found.resize(threads);
  } else {
    j.digit_shift = kPrefixShift[q.level + 1];
    j.digit_mask = (uint64_t(1) << (shift - j.digit_shift)) - 1;
    j.needs_key = j.digit_shift < 32;
    j.hist.assign(threads, std::vector<uint64_t>(j.digit_mask + 1, 0));
  }
  return j;
}

// One pass over base and tuned serving every job.
template <class C>
void refine_pass(const Pair& p, uint32_t tensor_seed, std::vector<Job>& jobs, int threads) {
  parallel_held(p, threads, [&](int tid, int64_t lo, int64_t hi) {
    const HashStream tie(tensor_seed, kStreamTie);
    float d[kTile];
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      load_delta<C>(p, t, d);
      for (int64_t k = 0; k < t.len; ++k) {
        const uint32_t a = bits_of(d[k]) & kAbsMask;
        for (Job& j : jobs) {
          if ((a >> j.abs_shift) != j.abs_prefix) continue;
          const int64_t i = t.start + k;
          const uint64_t key = j.needs_key ? order_key(a, tie.at(i)) : uint64_t(a) << 32;
          if ((key >> kPrefixShift[j.level]) != j.prefix) continue;
          if (j.collect)
            j.found[tid].push_back({key, i, 0, 0.0f});
          else
            ++j.hist[tid][(key >> j.digit_shift) & j.digit_mask];
        }
      }
    });
  });
}

// Advances q with its job's result: the boundary entry itself, or the next level's group.
void advance(Query& q, Job& j) {
  if (j.collect) {
    std::vector<Candidate> all;
    for (auto& part : j.found) all.insert(all.end(), part.begin(), part.end());
    auto nth = all.begin() + int64_t(q.rank);
    std::nth_element(all.begin(), nth, all.end(), precedes);
    q.cut = Cut{nth->key, uint64_t(nth->index)};
    q.done = true;
    return;
  }
  std::vector<uint64_t> merged(j.digit_mask + 1, 0);
  for (auto& h : j.hist)
    for (size_t b = 0; b < merged.size(); ++b) merged[b] += h[b];
  const Located at = locate(merged, q.rank);
  const int bits = kPrefixShift[q.level] - kPrefixShift[q.level + 1];
  q.prefix = (q.prefix << bits) | at.bin;
  q.rank = at.rank;
  q.count = at.count;
  q.level += 1;
}

Query start_query(int64_t position, int64_t n, const std::vector<uint64_t>& top) {
  Query q;
  if (position <= 0 || position >= n) {
    q.done = true;
    q.cut = position <= 0 ? kCutNone : kCutAll;
    return q;
  }
  const Located at = locate(top, uint64_t(position));
  q.level = 1;
  q.prefix = at.bin;
  q.rank = at.rank;
  q.count = at.count;
  return q;
}

// The cut at the histogram-bin edge nearest `position`, and the position of that edge.
std::pair<Cut, int64_t> nearest_edge(int64_t position, int64_t n,
                                     const std::vector<uint64_t>& top) {
  if (position <= 0) return {kCutNone, 0};
  if (position >= n) return {kCutAll, n};
  const Located at = locate(top, uint64_t(position));
  const int64_t above = position - int64_t(at.rank);
  const int64_t below = above + int64_t(at.count);
  const int shift = kPrefixShift[1];
  if (position - above <= below - position)
    return {Cut{(at.bin + 1) << shift, ~uint64_t(0)}, above};
  return {Cut{at.bin << shift, ~uint64_t(0)}, below};
}

// How far select=approx may move each cut: the tolerance split between the cuts strictly inside
// the tensor; -1 (no move) in exact mode.
int64_t approx_slack(int64_t n, const WindowRequest& req) {
  if (!req.approx) return -1;
  int inner = 0;
  for (const int64_t p : {req.start, req.start + req.len}) inner += p > 0 && p < n;
  return req.tolerance / std::max(inner, 1);
}

// select=approx's rule for the cut at `position` (contract.approx_cut): the nearer edge of its
// top-bits bin (the upper one on a tie) when within the slack; false when the cut stays.
bool move_cut(int64_t position, int64_t n, const std::vector<uint64_t>& top,
              const WindowRequest& req, Cut& cut, int64_t& edge) {
  const int64_t slack = approx_slack(n, req);
  if (slack < 0 || position <= 0 || position >= n) return false;
  const auto nearest = nearest_edge(position, n, top);
  if (std::llabs(nearest.second - position) > slack) return false;
  cut = nearest.first;
  edge = nearest.second;
  return true;
}

}  // namespace

Window approx_window(const Window& exact, int64_t n, const std::vector<uint64_t>& top_histogram,
                     const WindowRequest& req) {
  if (!req.approx || req.len == 0) return exact;
  Cut cuts[2] = {exact.upper, exact.lower};
  int64_t edge[2] = {req.start, req.start + req.len};
  for (int q = 0; q < 2; ++q) move_cut(edge[q], n, top_histogram, req, cuts[q], edge[q]);
  return Window{cuts[0], cuts[1], edge[1] - edge[0]};
}

// One boundary query per window end, and the jobs of the pass under way.
struct RadixState {
  WindowRequest req;
  Query queries[2];
  std::vector<Job> jobs;
  int job_of[2] = {-1, -1};
  int64_t edge[2] = {0, 0};  // the SPEC position each cut lands on
  Window result{kCutNone, kCutNone, 0};
  bool done = false;
};

// The window's cuts from the top-bits histogram: in approx mode each cut moves to the nearer
// edge of its bin when that is within the cut's share of the tolerance (move_cut); every other
// cut by radix select, one pass per level.
RadixSelect::RadixSelect(int64_t n, const std::vector<uint64_t>& top_histogram,
                         const WindowRequest& req)
    : state_(std::make_unique<RadixState>()) {
  RadixState& s = *state_;
  s.req = req;
  if (req.len == 0) {
    s.done = true;
    return;
  }
  const int64_t position[2] = {req.start, req.start + req.len};
  for (int q = 0; q < 2; ++q) {
    s.queries[q] = start_query(position[q], n, top_histogram);
    s.edge[q] = position[q];
    if (!s.queries[q].done && move_cut(position[q], n, top_histogram, req, s.queries[q].cut,
                                       s.edge[q]))
      s.queries[q].done = true;
  }
  plan_jobs();
}

RadixSelect::~RadixSelect() = default;

bool RadixSelect::done() const { return state_->done; }

Window RadixSelect::window() const { return state_->result; }

// The jobs of the next pass: one per group still searched (both boundaries may share one).
void RadixSelect::plan_jobs() {
  RadixState& s = *state_;
  if (s.queries[0].done && s.queries[1].done) {
    s.result = Window{s.queries[0].cut, s.queries[1].cut, s.edge[1] - s.edge[0]};
    s.done = true;
    return;
  }
  s.jobs.clear();
  for (int q = 0; q < 2; ++q) {
    s.job_of[q] = -1;
    if (s.queries[q].done) continue;
    for (size_t j = 0; j < s.jobs.size(); ++j)
      if (s.jobs[j].level == s.queries[q].level && s.jobs[j].prefix == s.queries[q].prefix)
        s.job_of[q] = int(j);
    if (s.job_of[q] < 0) {
      s.job_of[q] = int(s.jobs.size());
      s.jobs.push_back(make_job(s.queries[q], s.req.collect_cap, s.req.threads));
    }
  }
}

void RadixSelect::feed(const Pair& chunk) {
  RadixState& s = *state_;
  dispatch_dtype(chunk.dtype, [&](auto codec) {
    refine_pass<decltype(codec)>(chunk, s.req.tensor_seed, s.jobs, s.req.threads);
  });
}

void RadixSelect::end_pass() {
  RadixState& s = *state_;
  for (int q = 0; q < 2; ++q)
    if (s.job_of[q] >= 0) advance(s.queries[q], s.jobs[size_t(s.job_of[q])]);
  plan_jobs();
}

namespace {

Window select_levels(const Pair& p, const std::vector<uint64_t>& top_histogram,
                     const WindowRequest& req) {
  RadixSelect select(p.n, top_histogram, req);
  while (!select.done()) {
    select.feed(p);
    select.end_pass();
  }
  return select.window();
}

}  // namespace

Window radix_window(const Pair& p, const WindowRequest& req) {
  FirstPassPlan plan;
  plan.histogram = true;
  const FirstPassResult top = run_first_pass(p, plan, req.threads);
  return select_levels(p, top.histogram, req);
}

Window radix_window(const Pair& p, const std::vector<uint64_t>& top_histogram,
                    const WindowRequest& req) {
  return select_levels(p, top_histogram, req);
}

}  // namespace fk
