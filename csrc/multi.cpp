// The combining write pass of a merge of several tuned models (multi.h). Each tile: base
// widened once, every model's weighted delta W_t (and, to normalize, its entry weight ω_t)
// computed from its mask and neuron plan exactly as merge()'s write pass computes Δ', then the
// models combined entry by entry in model order.
#include "multi.h"

#include <algorithm>

#include "kernel_common.h"

namespace fk {
namespace {

// Where a model's per-neuron numbers come from in a tile: one for the tensor, the tile's row,
// or one per column.
enum class Neurons { none, row, col };

Neurons neuron_shape(const NeuronPlan& plan) {
  if (plan.per_column) return Neurons::col;
  return plan.replace.size() != 1 || plan.replace[0] ? Neurons::row : Neurons::none;
}

// W (and ω when omega_out) of one model over one tile: Sub(Δ) under the mask, then Δ where the
// neuron is replaced, else Sub(Δ) · mul, the very products of merge()'s write_tile.
template <class C, MaskKind K, Neurons N>
void weighted_tile(const Pair& p, const Tile& t, const Located& m, const float* base, float* w,
                   float* omega_out) {
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  const TileMask<K> mask(m.mask, t);
  const int64_t j = N == Neurons::col ? t.col : N == Neurons::row ? t.row : 0;
  const uint8_t* replace = m.neurons.replace.data() + j;
  const float* mul = m.neurons.mul.data() + j;
  const float* omega = m.omega.data() + j;
  const uint32_t len = uint32_t(t.len);
  for (uint32_t k = 0; k < len; ++k) {
    const float d = C::load(u[k]) - base[k];
    const float product = d * mask.scale(k);
    const float sub = mask.keep(k, bits_of(d) & kAbsMask) ? product : 0.0f;
    const float scaled = sub * (N == Neurons::col ? mul[k] : mul[0]);
    float weighted = scaled;
    if (N == Neurons::col) weighted = replace[k] ? d : scaled;
    if (N == Neurons::row) weighted = replace[0] ? d : scaled;
    w[k] = weighted;
  }
  if (omega_out)
    for (uint32_t k = 0; k < len; ++k) omega_out[k] = N == Neurons::col ? omega[k] : omega[0];
}

template <class C>
void weighted_any(const Pair& p, const Tile& t, const Located& m, const float* base, float* w,
                  float* omega) {
  dispatch_mask(m.mask.kind, [&](auto kind) {
    switch (neuron_shape(m.neurons)) {
      case Neurons::col:
        return weighted_tile<C, kind.value, Neurons::col>(p, t, m, base, w, omega);
      case Neurons::row:
        return weighted_tile<C, kind.value, Neurons::row>(p, t, m, base, w, omega);
      default:
        return weighted_tile<C, kind.value, Neurons::none>(p, t, m, base, w, omega);
    }
  });
}

inline int sign_of(float x) { return int(x > 0.0f) - int(x < 0.0f); }

// One entry's λ·M from its models' W (stride kTile apart) and ω; counts consensus drops. Sums
// run t = 1 … N in float32, starting from the first term.
inline float combine_entry(const float* w, const float* omega, int models,
                           const CombineConfig& cfg, int64_t& dropped) {
  bool positive = true;
  if (cfg.consensus == Consensus::sum) {
    float total = w[0];
    for (int t = 1; t < models; ++t) total = total + w[t * kTile];
    positive = total >= 0.0f;
  } else if (cfg.consensus == Consensus::count) {
    int votes = 0;
    for (int t = 0; t < models; ++t) votes += sign_of(w[t * kTile]);
    positive = votes >= 0;
  }
  float merged = 0.0f, divisor = 0.0f;
  for (int t = 0; t < models; ++t) {
    const float x = w[t * kTile];
    const bool keep = cfg.consensus == Consensus::none || (positive ? x > 0.0f : x < 0.0f);
    dropped += !keep && x != 0.0f;
    const float term = keep ? x : 0.0f;
    merged = t == 0 ? term : merged + term;
    if (cfg.normalize) {
      const float o = keep ? omega[t * kTile] : 0.0f;
      divisor = t == 0 ? o : divisor + o;
    }
  }
  if (cfg.normalize && divisor != 0.0f) merged = merged / divisor;
  return cfg.lambda * merged;
}

template <class C>
int64_t combine_pass(const Pair& p, const std::vector<Located>& models,
                     const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,
                     int threads) {
  const int n_models = int(models.size());
  std::vector<int64_t> dropped(threads, 0);
  auto* dst = static_cast<typename C::T*>(out);
  parallel_held(p, threads, [&](int tid, int64_t lo, int64_t hi) {
    std::vector<float> w(size_t(n_models) * kTile), omega(cfg.normalize ? w.size() : 0);
    float base[kTile];
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
      for (int64_t k = 0; k < t.len; ++k) base[k] = C::load(b[k]);
      for (int m = 0; m < n_models; ++m) {
        Pair view = p;
        view.tuned = pairs[m].tuned;
        weighted_any<C>(view, t, models[m], base, w.data() + m * kTile,
                        cfg.normalize ? omega.data() + m * kTile : nullptr);
      }
      int64_t drops = 0;
      for (int64_t k = 0; k < t.len; ++k) {
        const float delta = combine_entry(w.data() + k, cfg.normalize ? omega.data() + k : nullptr,
                                          n_models, cfg, drops);
        dst[t.start - p.lo + k] = C::store(base[k] + delta);
      }
      dropped[tid] += drops;
    });
  });
  int64_t total = 0;
  for (int64_t d : dropped) total += d;
  return total;
}

}  // namespace

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
  result.dropped = dispatch_dtype(p.dtype, [&](auto codec) {
    return combine_pass<decltype(codec)>(p, models, pairs, out, combine, threads);
  });
  return result;
}

}  // namespace fk
