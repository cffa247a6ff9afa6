// Orchestration of one merge: which passes run for the method, and the small host-side steps
// between them (window resolution, candidate fix-up, the l1 scale, R and its factors).
#include "merge_kernel.h"

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "della.h"
#include "kernel_common.h"
#include "passes.h"
#include "scores.h"
#include "select.h"

namespace fk {

bool neurons_active(const MergeConfig& cfg) {
  return cfg.restore != Restore::none && cfg.axis != Axis::none;
}

// The mask as far as it is known before any pass: all and random are complete; top and window
// get their cuts, della its per-entry scales later.
Mask initial_mask(const Pair& p, const MergeConfig& cfg) {
  Mask m;
  m.tensor_seed = cfg.tensor_seed;
  switch (cfg.suppress) {
    case Suppress::magnitude:
    case Suppress::breadcrumbs:
      // Keeping the whole order needs no selection (and is cheaper as `all`); a window that
      // starts at the top needs only its lower cut.
      if (!(cfg.window_start == 0 && cfg.window_len == p.n))
        m.kind = cfg.window_start == 0 ? MaskKind::top : MaskKind::window;
      break;
    case Suppress::random:
      m.kind = MaskKind::random;
      m.drop_threshold = cfg.drop_threshold;
      m.scale = cfg.rescale == Rescale::inverse ? cfg.random_inverse : 1.0f;
      break;
    case Suppress::della:
      m.kind = MaskKind::della;
      break;
    default:
      break;
  }
  return m;
}

// contract.l1_scale, rounded once to float.
float l1_scale(double total_abs, double kept_abs, double eps) {
  if (total_abs < eps || kept_abs < eps) return 1.0f;
  return float(total_abs / kept_abs);
}

// The m neurons with the largest change score, ties by lower index (SPEC "Neurons").
std::vector<int64_t> top_neurons(const std::vector<double>& change, int64_t m) {
  std::vector<int64_t> order(change.size());
  std::iota(order.begin(), order.end(), int64_t(0));
  m = std::min<int64_t>(m, int64_t(order.size()));
  std::nth_element(order.begin(), order.begin() + m, order.end(), [&](int64_t a, int64_t b) {
    return change[a] > change[b] || (change[a] == change[b] && a < b);
  });
  order.resize(m);
  std::sort(order.begin(), order.end());
  return order;
}

// Neuron-Restore (SPEC "Restore and write"): for each neuron replace-or-multiply. kept is C'
// (rescale only).
NeuronPlan plan_neurons(const Pair& p, const MergeConfig& cfg, const std::vector<int64_t>& restored,
                        const std::vector<double>& change, const std::vector<double>& kept,
                        MergeResult& result) {
  NeuronPlan plan;
  const int64_t neurons = neurons_active(cfg) ? neuron_total(p, cfg.axis) : 1;
  plan.per_column = neurons_active(cfg) && cfg.axis == Axis::col;
  plan.replace.assign(neurons, 0);
  plan.mul.assign(neurons, cfg.weight);
  for (int64_t j : restored) {
    if (cfg.restore == Restore::replace || kept[j] == 0.0) {
      // rescale falls back to replace where nothing of the neuron survived suppress
      plan.replace[j] = 1;
      result.fallbacks += cfg.restore == Restore::rescale;
    } else {
      plan.mul[j] = float(change[j] / kept[j]);
    }
  }
  return plan;
}

namespace {

// Whether out shares memory with base or tuned (an in-place merge): then nothing may be written
// before the last read, which rules out the fused route.
bool overlaps(const Pair& p, const void* out) {
  const uintptr_t o = reinterpret_cast<uintptr_t>(out);
  const uintptr_t bytes = uintptr_t(p.n) * (p.dtype == DType::f32 ? 4 : 2);
  for (const void* in : {p.base, p.tuned}) {
    const uintptr_t i = reinterpret_cast<uintptr_t>(in);
    if (o < i + bytes && i < o + bytes) return true;
  }
  return false;
}

// Fused route, after the cuts are known: write the candidates the window keeps (the first pass
// wrote them as dropped) from the output bits gathered with them, and add their |Sub(Δ)| to C'.
// The lists are in index order, so each thread's stores walk forwards through out.
template <class T>
void fix_candidates(const Pair& p, const Mask& mask, FirstPassResult& first,
                    const FirstPassPlan& plan, void* out, bool rescale, int threads) {
  auto* dst = static_cast<T*>(out);
  std::vector<std::vector<double>> kept(threads);
  for (int c = 0; c < plan.brackets; ++c) {
    const std::vector<Candidate>& found = first.bracket[c].found;
    // An entry in both brackets is listed twice; the second list alone handles it.
    const bool skip_shared = c == 0 && plan.brackets == 2;
    const Bracket shared = plan.bracket[1];
    parallel_slices(int64_t(found.size()), threads, [&](int tid, int64_t lo, int64_t hi) {
      if (rescale && kept[tid].empty()) kept[tid].assign(plan.neurons, 0.0);
      for (int64_t j = lo; j < hi; ++j) {
        const Candidate& cand = found[j];
        if (skip_shared && cand.key >= shared.lo && cand.key <= shared.hi) continue;
        if (!cut_contains(mask.lower, cand.key, cand.index) ||
            cut_contains(mask.upper, cand.key, cand.index))
          continue;
        if constexpr (std::is_same_v<T, float>)
          dst[cand.index] = float_of(cand.kept_bits);
        else
          dst[cand.index] = T(cand.kept_bits);
        if (rescale)
          kept[tid][plan.per_column ? cand.index % p.cols : cand.index / p.cols] += cand.magnitude;
      }
    });
  }
  if (!rescale) return;
  for (const auto& part : kept)
    for (size_t j = 0; j < part.size(); ++j) first.kept_change[j] += part[j];
}

// Everything one merge carries from step to step.
struct MergeRun {
  const Pair& pair;
  const MergeConfig& cfg;
  void* out;
  int threads;
  Pair work;  // pair, streamed as one row when no neurons are involved
  Mask mask;
  bool windowed = false;         // magnitude/breadcrumbs with a real selection
  bool l1 = false;               // the l1 rescale applies
  bool rescale_neurons = false;  // restore=rescale on a neuron axis: C' is needed
  bool fused = false;            // out is written in the first pass
  FirstPassPlan plan;
  WindowRequest window_req{};
  WindowPlan window;
  FirstPassResult first;
  std::vector<float> entry_scale;  // della
  MergeResult result;

  MergeRun(const Pair& p, void* o, const MergeConfig& c)
      : pair(p), cfg(c), out(o), threads(thread_count(p.n, c.threads)), work(p) {}
};

// Before the first pass: the mask as far as it is known, the window's brackets, and whether
// the first pass can write out (the fused route: when the mask is known by then, up to the
// window candidates, fixed up afterwards, and the restored neurons, rewritten afterwards).
void prepare(MergeRun& run) {
  const MergeConfig& cfg = run.cfg;
  // C(j) only when restoring; without neurons the pass streams the pair as one row (della,
  // the one mask that needs rows, reads run.pair).
  const FirstPass pass = first_pass_for(run.pair, neurons_active(cfg) ? cfg.axis : Axis::none);
  run.work = pass.work;
  run.plan = pass.plan;
  run.mask = initial_mask(run.work, cfg);
  run.windowed = run.mask.kind == MaskKind::top || run.mask.kind == MaskKind::window;
  run.l1 = cfg.rescale == Rescale::l1 &&
           (cfg.suppress == Suppress::random || cfg.suppress == Suppress::della);
  run.rescale_neurons = neurons_active(cfg) && cfg.restore == Restore::rescale;

  FirstPassPlan& plan = run.plan;
  plan.total_abs = run.l1;
  plan.mask = &run.mask;
  plan.weight = cfg.weight;
  const bool unique_keys = run.pair.n <= (int64_t(1) << 32);
  run.window_req = WindowRequest{cfg.window_start, cfg.window_len,       cfg.tensor_seed,
                                 cfg.approx,       cfg.approx_tolerance, cfg.sample_size,
                                 cfg.collect_cap,  run.threads,          unique_keys};
  if (run.windowed) {
    run.window = plan_window(run.work, run.window_req);
    add_window_work(run.window, run.window_req, plan);
    // The top-bits histogram (the radix select's first level, approx's bins) in the first pass.
    plan.histogram = run.window.radix || cfg.approx;
  }
  const MaskKind kind = run.mask.kind;
  // Approx may move a cut past the bracket's candidates, which the fused route fixes up.
  const bool known = run.windowed ? run.window.brackets > 0 && !run.window.radix && !cfg.approx
                                  : kind == MaskKind::all || (kind == MaskKind::random && !run.l1);
  // Restored columns are spread over every row, so rewriting them costs a whole write pass:
  // then a first pass that does not write is the cheaper start.
  const bool columns_rewritten = neurons_active(cfg) && cfg.axis == Axis::col;
  // No out: the merge only locates (locate()), writing nothing.
  run.fused = known && !columns_rewritten && run.out != nullptr && !overlaps(run.pair, run.out);
  if (run.fused) {
    plan.out = run.out;
    plan.kept_change = run.rescale_neurons;
  }
}

// After the first pass: the window's cuts (the fused route falls back to a full write when
// the brackets missed), della's mask, the kept count and the l1 scale.
void suppress(MergeRun& run) {
  const MergeConfig& cfg = run.cfg;
  double kept_abs = run.first.kept_abs;
  if (run.windowed) {
    Window w{kCutNone, kCutNone, 0};
    const std::vector<uint64_t>& top = run.first.histogram;
    if (run.window.radix) {
      w = radix_window(run.work, top, run.window_req);
    } else if (!resolve_brackets(run.window, run.window_req, run.first, w)) {
      run.fused = false;  // what the first pass wrote is overwritten by a full write pass
      w = top.empty() ? radix_window(run.work, run.window_req)
                      : radix_window(run.work, top, run.window_req);
    } else {
      w = approx_window(w, run.work.n, top, run.window_req);
    }
    run.mask.upper = w.upper;
    run.mask.lower = w.lower;
    run.result.kept = w.kept;
  } else if (run.mask.kind == MaskKind::random) {
    run.result.kept = run.first.kept;
  } else if (run.mask.kind == MaskKind::della) {
    run.entry_scale.resize(size_t(run.pair.n));
    const DellaRequest req{cfg.tensor_seed, cfg.density, cfg.epsilon,
                           cfg.rescale == Rescale::inverse, run.threads};
    const DellaResult d = della_mask(run.pair, req, run.entry_scale.data());
    run.mask.entry_scale = run.entry_scale.data();
    run.result.kept = d.kept;
    kept_abs = d.kept_abs;
  } else {
    run.result.kept = run.pair.n;
  }
  if (run.l1) {
    run.result.l1_scale = l1_scale(run.first.total_abs, kept_abs, cfg.l1_eps);
    run.mask.scale = run.result.l1_scale;
  }
}

// R (into `restored`) and each neuron's treatment in the write pass.
NeuronPlan plan_restore(MergeRun& run, std::vector<int64_t>& restored) {
  const MergeConfig& cfg = run.cfg;
  std::vector<double> kept;
  if (neurons_active(cfg)) {
    restored = top_neurons(run.first.change, cfg.restored_neurons);
    run.result.restored = int64_t(restored.size());
    if (run.rescale_neurons)
      kept = run.fused ? std::move(run.first.kept_change)
                       : run_kept_change(run.work, run.mask, run.plan.per_column,
                                         run.plan.neurons, run.threads);
  }
  return plan_neurons(run.work, cfg, restored, run.first.change, kept, run.result);
}

// R, its factors, and the writes still due: everything (unfused), or the restored neurons.
void restore_and_write(MergeRun& run) {
  std::vector<int64_t> restored;
  const NeuronPlan neurons = plan_restore(run, restored);
  if (!run.fused)
    run_write_pass(run.work, run.mask, neurons, run.out, run.threads);
  else if (!restored.empty())  // fused with neurons: axis=row (see prepare)
    run_write_rows(run.work, run.mask, neurons, restored, run.out, run.threads);
}

}  // namespace

Located locate(const Pair& pair, const MergeConfig& cfg) {
  MergeRun run(pair, nullptr, cfg);
  prepare(run);
  run.first = run_first_pass(run.work, run.plan, run.threads);
  Located located;
  if (run.first.nonfinite > 0) {
    located.result.nonfinite = run.first.nonfinite;
    return located;
  }
  suppress(run);
  std::vector<int64_t> restored;
  located.neurons = plan_restore(run, restored);
  located.omega.assign(located.neurons.mul.size(), cfg.weight);
  for (int64_t j : restored) located.omega[j] = 1.0f;
  located.mask = run.mask;
  // The buffer moves with the vector, so the mask's pointer into it stays valid.
  located.entry_scale = std::move(run.entry_scale);
  located.mask.entry_scale = located.entry_scale.data();
  located.result = run.result;
  return located;
}

MergeResult merge(const Pair& pair, void* out, const MergeConfig& cfg) {
  MergeRun run(pair, out, cfg);
  prepare(run);
  run.first = run_first_pass(run.work, run.plan, run.threads);
  if (run.first.nonfinite > 0) {
    run.result.nonfinite = run.first.nonfinite;
    return run.result;
  }
  suppress(run);
  if (run.fused && run.windowed)
    dispatch_dtype(pair.dtype, [&](auto codec) {
      fix_candidates<typename decltype(codec)::T>(run.work, run.mask, run.first, run.plan, out,
                                                  run.rescale_neurons, run.threads);
    });
  restore_and_write(run);
  return run.result;
}

}  // namespace fk
