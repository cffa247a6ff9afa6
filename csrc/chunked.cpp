// The chunked merge: merge_kernel.cpp's steps, with each pass fed one chunk of rows at a time.
#include "chunked.h"

#include <algorithm>
#include <array>

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
}

// The bracket pass over one chunk: per bracket, the entries with order key above hi are
// counted and those in [lo, hi] have their keys collected (the first pass's bracket rule).
template <class C>
void count_brackets(const Pair& chunk, ChunkedState& s) {
  const WindowPlan& w = s.window;
  struct Part {
    int64_t above[2] = {0, 0};
    std::vector<uint64_t> keys[2];
  };
  std::vector<Part> parts(size_t(s.threads));
  parallel_held(chunk, s.threads, [&](int tid, int64_t lo, int64_t hi) {
    Part& part = parts[size_t(tid)];
    const HashStream tie(s.req.tensor_seed, kStreamTie);
    float d[kTile];
    for_each_tile(lo, hi, chunk.cols, [&](const Tile& t) {
      load_delta<C>(chunk, t, d);
      for (int c = 0; c < w.brackets; ++c) {
        const Bracket& b = w.bracket[c];
        const uint32_t hi_abs = uint32_t(b.hi >> 32), lo_abs = uint32_t(b.lo >> 32);
        const bool collect = !s.found[c].overflow;
        for (int64_t k = 0; k < t.len; ++k) {
          const uint32_t a = bits_of(d[k]) & kAbsMask;
          // Most entries are decided by |Δ| alone; only ties with a bound need the hash.
          if (a < lo_abs) continue;
          if (a > hi_abs) {
            ++part.above[c];
            continue;
          }
          const uint64_t key = order_key(a, tie.at(t.start + k));
          if (key > b.hi)
            ++part.above[c];
          else if (key >= b.lo && collect)
            part.keys[c].push_back(key);
        }
      }
    });
  });
  for (Part& part : parts) {
    for (int c = 0; c < w.brackets; ++c) {
      BracketKeys& f = s.found[c];
      f.above += part.above[c];
      if (f.overflow) continue;
      f.keys.insert(f.keys.end(), part.keys[c].begin(), part.keys[c].end());
      if (f.keys.size() > w.collect_cap) {  // a missed bracket: the radix select takes over
        f.overflow = true;
        std::vector<uint64_t>().swap(f.keys);
      }
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
  if (s.window.radix || !s.req.unique_keys) return ChunkPass::histogram;
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
  if (!hit) return ChunkPass::histogram;
  set_window(s, w);
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
      dispatch_dtype(chunk.dtype, [&](auto codec) { count_brackets<decltype(codec)>(chunk, s); });
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
