// The chunked merge: merge_kernel.cpp's steps, with each pass fed one chunk of rows at a time.
#include "chunked.h"

#include <algorithm>

#include "della.h"
#include "kernel_common.h"
#include "passes.h"
#include "scores.h"
#include "select.h"

namespace fk {

// Everything carried from chunk to chunk and pass to pass.
struct ChunkedState {
  MergeConfig cfg;
  Pair pair{};  // the tensor as rows x cols (della's rows); no buffers
  Pair work{};  // as the passes stream it: one row of n entries when no neurons are involved
  int threads = 1;
  ChunkPass pass = ChunkPass::done;
  bool started = false;
  FirstPassPlan plan;
  Mask mask;
  bool windowed = false;
  bool l1 = false;
  bool rescale_neurons = false;
  bool sampling = false;
  WindowRequest req{};
  WindowPlan window;
  SampleRuns runs;
  std::vector<uint64_t> sample;
  BracketKeys found[2];
  std::vector<uint64_t> histogram;
  std::unique_ptr<RadixSelect> radix;
  FirstPassResult first;
  DellaResult della{0, 0.0};
  std::vector<float> entry_scale;  // della's mask of the chunk being fed
  std::vector<int64_t> restored;
  std::vector<double> kept_change;
  NeuronPlan neurons;
  MergeResult result;
};

namespace {

void accumulate(FirstPassResult& total, const FirstPassResult& part) {
  total.nonfinite += part.nonfinite;
  total.total_abs += part.total_abs;
  total.kept += part.kept;
  total.kept_abs += part.kept_abs;
  if (total.change.size() < part.change.size()) total.change.resize(part.change.size(), 0.0);
  for (size_t j = 0; j < part.change.size(); ++j) total.change[j] += part.change[j];
  if (total.histogram.size() < part.histogram.size())
    total.histogram.resize(part.histogram.size(), 0);
  for (size_t b = 0; b < part.histogram.size(); ++b) total.histogram[b] += part.histogram[b];
}

// The bracket pass over one chunk: the first pass's bracket loop (entries with order key above
// each bracket counted, those inside it collected), keeping only the candidates' keys.
void count_brackets(const Pair& chunk, ChunkedState& s) {
  FirstPassPlan plan;
  add_window_work(s.window, s.req, plan);
  FirstPassResult part = run_first_pass(chunk, plan, s.threads);
  for (int c = 0; c < s.window.brackets; ++c) {
    BracketKeys& f = s.found[c];
    f.above += part.bracket[c].above;
    if (f.overflow) continue;
    for (const Candidate& cand : part.bracket[c].found) f.keys.push_back(cand.key);
    // Past the cap the bracket missed: the radix select takes over.
    if (part.bracket[c].overflow || f.keys.size() > s.window.collect_cap) {
      f.overflow = true;
      std::vector<uint64_t>().swap(f.keys);
    }
  }
}

// Della's mask over a chunk's rows, for the passes that apply it.
void della_chunk(ChunkedState& s, const Pair& rows) {
  s.entry_scale.resize(size_t(rows.held()));
  const DellaRequest req{s.cfg.tensor_seed, s.cfg.density, s.cfg.epsilon,
                         s.cfg.rescale == Rescale::inverse, s.threads};
  const DellaResult d = della_mask(rows, req, s.entry_scale.data(), s.della);
  if (s.pass == ChunkPass::first) s.della = d;
  s.mask.entry_scale = s.entry_scale.data();
  s.mask.entry_lo = rows.lo;
}

void set_window(ChunkedState& s, const Window& w) {
  s.mask.upper = w.upper;
  s.mask.lower = w.lower;
  s.result.kept = w.kept;
}

// merge()'s restore_and_write plan: the kept pass when C' is needed, then the write pass.
ChunkPass plan_write(ChunkedState& s) {
  s.neurons = plan_neurons(s.work, s.cfg, s.restored, s.first.change, s.kept_change, s.result);
  return ChunkPass::write;
}

// merge()'s suppress step once the cuts are known: kept count, l1 scale, R.
ChunkPass after_select(ChunkedState& s) {
  double kept_abs = s.first.kept_abs;
  if (s.mask.kind == MaskKind::random) {
    s.result.kept = s.first.kept;
  } else if (s.mask.kind == MaskKind::della) {
    s.result.kept = s.della.kept;
    kept_abs = s.della.kept_abs;
  } else if (!s.windowed) {
    s.result.kept = s.pair.n;
  }
  if (s.l1) {
    s.result.l1_scale = l1_scale(s.first.total_abs, kept_abs, s.cfg.l1_eps);
    s.mask.scale = s.result.l1_scale;
  }
  if (neurons_active(s.cfg)) {
    s.restored = top_neurons(s.first.change, s.cfg.restored_neurons);
    s.result.restored = int64_t(s.restored.size());
  }
  if (s.rescale_neurons) {
    s.kept_change.assign(size_t(s.plan.neurons), 0.0);
    return ChunkPass::kept;
  }
  return plan_write(s);
}

ChunkPass start_radix(ChunkedState& s) {
  s.radix = std::make_unique<RadixSelect>(s.pair.n, s.histogram, s.req);
  if (!s.radix->done()) return ChunkPass::radix;
  set_window(s, s.radix->window());
  return after_select(s);
}

ChunkPass after_first(ChunkedState& s) {
  if (s.first.nonfinite > 0) {
    s.result.nonfinite = s.first.nonfinite;
    return ChunkPass::done;
  }
  if (!s.windowed) return after_select(s);
  if (s.window.radix) {  // the first pass made the top-bits histogram (as merge() does)
    s.histogram = std::move(s.first.histogram);
    return start_radix(s);
  }
  if (!s.req.unique_keys) return ChunkPass::histogram;
  if (s.sampling) {
    bracket_window(s.window, s.pair.n, std::move(s.sample));
    return ChunkPass::bracket;
  }
  Window w{kCutNone, kCutNone, 0};
  resolve_bracket_keys(s.window, s.req, s.found, w);  // no boundary inside: nothing to miss
  set_window(s, w);
  return after_select(s);
}

ChunkPass after_bracket(ChunkedState& s) {
  Window w{kCutNone, kCutNone, 0};
  const bool hit = resolve_bracket_keys(s.window, s.req, s.found, w);
  for (BracketKeys& f : s.found) std::vector<uint64_t>().swap(f.keys);
  if (!hit && s.first.histogram.empty()) return ChunkPass::histogram;
  if (!hit) {  // approx: the first pass made the top-bits histogram
    s.histogram = std::move(s.first.histogram);
    return start_radix(s);
  }
  set_window(s, approx_window(w, s.pair.n, s.first.histogram, s.req));
  return after_select(s);
}

}  // namespace

ChunkedMerge::ChunkedMerge(DType dtype, int64_t rows, int64_t cols, const MergeConfig& cfg)
    : state_(std::make_unique<ChunkedState>()) {
  ChunkedState& s = *state_;
  s.cfg = cfg;
  s.pair = Pair{nullptr, nullptr, dtype, rows * cols, rows, cols};
  s.threads = thread_count(s.pair.n, cfg.threads);
  // As merge()'s prepare(): C(j) only when restoring, the mask as far as it is known.
  const FirstPass pass = first_pass_for(s.pair, neurons_active(cfg) ? cfg.axis : Axis::none);
  s.work = pass.work;
  s.plan = pass.plan;
  s.mask = initial_mask(s.work, cfg);
  s.windowed = s.mask.kind == MaskKind::top || s.mask.kind == MaskKind::window;
  s.l1 = cfg.rescale == Rescale::l1 &&
         (cfg.suppress == Suppress::random || cfg.suppress == Suppress::della);
  s.rescale_neurons = neurons_active(cfg) && cfg.restore == Restore::rescale;
  s.plan.total_abs = s.l1;
  s.plan.mask = &s.mask;
  s.req = WindowRequest{cfg.window_start, cfg.window_len, cfg.tensor_seed,
                        cfg.approx,       cfg.approx_tolerance, cfg.sample_size,
                        cfg.collect_cap,  s.threads,            s.pair.n <= (int64_t(1) << 32)};
  if (s.windowed) {
    s.window = window_boundaries(s.pair.n, s.req);
    s.sampling = s.window.inner_count > 0 && !s.window.radix && s.req.unique_keys;
    s.plan.histogram = s.window.radix || cfg.approx;  // as merge()'s prepare
    if (s.sampling) s.runs = sample_runs(s.pair.n, s.req);
  }
}

ChunkedMerge::~ChunkedMerge() = default;

ChunkPass ChunkedMerge::next() {
  ChunkedState& s = *state_;
  if (!s.started) {
    s.started = true;
    s.pass = ChunkPass::first;
    return s.pass;
  }
  switch (s.pass) {
    case ChunkPass::first:
      s.pass = after_first(s);
      break;
    case ChunkPass::bracket:
      s.pass = after_bracket(s);
      break;
    case ChunkPass::histogram:
      s.pass = start_radix(s);
      break;
    case ChunkPass::radix:
      s.radix->end_pass();
      if (s.radix->done()) {
        set_window(s, s.radix->window());
        s.pass = after_select(s);
      }
      break;
    case ChunkPass::kept:
      s.pass = plan_write(s);
      break;
    default:
      s.pass = ChunkPass::done;
  }
  return s.pass;
}

void ChunkedMerge::feed(const void* base, const void* tuned, void* out, int64_t lo, int64_t hi) {
  ChunkedState& s = *state_;
  Pair chunk = s.work;
  chunk.base = base;
  chunk.tuned = tuned;
  chunk.lo = lo;
  chunk.hi = hi;
  Pair rows = s.pair;  // della's rows
  rows.base = base;
  rows.tuned = tuned;
  rows.lo = lo;
  rows.hi = hi;
  const bool della = s.mask.kind == MaskKind::della;
  switch (s.pass) {
    case ChunkPass::first:
      accumulate(s.first, run_first_pass(chunk, s.plan, s.threads));
      if (s.sampling) add_sample_keys(chunk, s.runs, s.req, s.sample);
      if (della) della_chunk(s, rows);
      break;
    case ChunkPass::bracket:
      count_brackets(chunk, s);
      break;
    case ChunkPass::histogram: {
      FirstPassPlan plan;
      plan.histogram = true;
      FirstPassResult part = run_first_pass(chunk, plan, s.threads);
      if (s.histogram.empty()) s.histogram.assign(part.histogram.size(), 0);
      for (size_t b = 0; b < part.histogram.size(); ++b) s.histogram[b] += part.histogram[b];
      break;
    }
    case ChunkPass::radix:
      s.radix->feed(chunk);
      break;
    case ChunkPass::kept: {
      if (della) della_chunk(s, rows);
      const std::vector<double> part =
          run_kept_change(chunk, s.mask, s.plan.per_column, s.plan.neurons, s.threads);
      for (size_t j = 0; j < part.size(); ++j) s.kept_change[j] += part[j];
      break;
    }
    case ChunkPass::write:
      if (della) della_chunk(s, rows);
      run_write_pass(chunk, s.mask, s.neurons, out, s.threads);
      break;
    default:
      break;
  }
}

const MergeResult& ChunkedMerge::result() const { return state_->result; }

}  // namespace fk
