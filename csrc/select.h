// Selecting the window [start, start + len) of the SPEC order (magnitude, breadcrumbs) without
// sorting the tensor. Two routes to the same exact cuts:
//
//   bracket (bracket.cpp)  a sample of order keys brackets each boundary; the first pass counts
//                          the entries above the bracket and collects those inside it, and
//                          nth_element over those few finds the boundary entry. No extra pass.
//   radix   (select.cpp)   the fallback when a bracket misses (rare) or is not wanted: radix
//                          select over the key (|Δ| bits, TIE hash, then the index), one pass
//                          per level, collecting the last group.
#pragma once

#include <memory>
#include <vector>

#include "types.h"

namespace fk {

struct WindowRequest {
  int64_t start;
  int64_t len;
  uint32_t tensor_seed;
  // approx: each cut strictly inside the tensor moves to the nearer edge of its top-bits
  // histogram bin when that is at most tolerance / (such cuts) positions away (approx_window).
  bool approx;
  int64_t tolerance;
  // Keys sampled to bracket the boundaries: < 0 picks by n, 0 goes straight to the radix select.
  int64_t sample_size;
  // Largest radix group collected in one pass (16 bytes an entry); larger groups are split by
  // histogramming the next key digit first. Tests lower it to reach every radix level.
  uint64_t collect_cap;
  int threads;
  // Order keys are all distinct (the TIE hash is a bijection within each 2^32 block of indices),
  // so selection can ignore the index tie-break; true when n <= 2^32.
  bool unique_keys;
};

// The kept window as two cuts: kept iff in lower and not in upper.
struct Window {
  Cut upper;
  Cut lower;
  int64_t kept;
};

// The boundaries (start and start + len) and, for those strictly inside the tensor, brackets.
struct WindowPlan {
  int64_t position[2] = {0, 0};
  bool radix = false;  // a boundary inside the tensor is left to the radix select
  int inner_count = 0;  // boundaries strictly inside the tensor, listed in inner
  int inner[2] = {0, 0};
  int brackets = 0;
  int boundary_of[2] = {0, 0};  // which boundary bracket b belongs to
  Bracket bracket[2] = {};
  uint64_t collect_cap = 0;  // twice the candidates the brackets should hold
};

// Samples the order keys and brackets the boundaries (bracket.cpp).
WindowPlan plan_window(const Pair& p, const WindowRequest& req);

// plan_window in steps, for a tensor streamed in chunks: the boundaries (radix set when the
// request samples nothing), where the sample's runs lie, their keys taken chunk by chunk, and
// the brackets from the keys. The sample is the one plan_window draws, so are the brackets.
struct SampleRuns {
  int64_t run = 0;             // entries per run
  std::vector<int64_t> start;  // first entry of each run
};
WindowPlan window_boundaries(int64_t n, const WindowRequest& req);
int64_t sample_count(int64_t n, const WindowRequest& req);
SampleRuns sample_runs(int64_t n, const WindowRequest& req);
void add_sample_keys(const Pair& chunk, const SampleRuns& runs, const WindowRequest& req,
                     std::vector<uint64_t>& keys);
void bracket_window(WindowPlan& w, int64_t n, std::vector<uint64_t> keys);

// A bracket's count above it and its candidates' keys, gathered chunk by chunk (keys alone:
// with distinct keys, n <= 2^32, the key decides the order).
struct BracketKeys {
  int64_t above = 0;
  bool overflow = false;
  std::vector<uint64_t> keys;
};

// Adds the brackets' counting and collecting to the first pass.
void add_window_work(const WindowPlan& w, const WindowRequest& req, FirstPassPlan& plan);

// The exact cuts from the first pass's bracket results: radix select among the candidates
// (bracket.cpp). False when a bracket missed.
bool resolve_brackets(const WindowPlan& w, const WindowRequest& req, FirstPassResult& first,
                      Window& out);

// resolve_brackets for candidates gathered as keys (distinct keys only).
bool resolve_bracket_keys(const WindowPlan& w, const WindowRequest& req,
                          const BracketKeys (&found)[2], Window& out);

// select=approx (SPEC "Selection modes", contract.approx_cut) applied to the exact window: each
// cut moves to the nearer edge of its bin of the top-bits histogram (the upper edge on a tie)
// when within its share of the tolerance. The exact window itself when not approx.
Window approx_window(const Window& exact, int64_t n, const std::vector<uint64_t>& top_histogram,
                     const WindowRequest& req);

// The window by radix select alone: a pass for the top-bits histogram, then one per level
// (select.cpp). For when there are no brackets, or one missed.
Window radix_window(const Pair& p, const WindowRequest& req);
// The same from a top-bits histogram the first pass already made.
Window radix_window(const Pair& p, const std::vector<uint64_t>& top_histogram,
                    const WindowRequest& req);

struct RadixState;

// The radix select driven pass by pass, so that a tensor too large to hold can stream through
// each pass in chunks: while !done(), feed every chunk of the tensor once, then end_pass().
// radix_window is this over a whole tensor.
class RadixSelect {
 public:
  RadixSelect(int64_t n, const std::vector<uint64_t>& top_histogram, const WindowRequest& req);
  ~RadixSelect();
  bool done() const;
  void feed(const Pair& chunk);
  void end_pass();
  Window window() const;

 private:
  void plan_jobs();
  std::unique_ptr<RadixState> state_;
};

}  // namespace fk
