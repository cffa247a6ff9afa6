// The combining write pass of a merge of several tuned models (multi.h), compiled once per
// instruction set with the other passes (passes_impl.h includes this file). Each tile: base
// widened once, every model's weighted delta W_t (and, to normalize, its entry weight ω_t)
// computed from its mask and neuron plan exactly as merge()'s write pass computes Δ', then the
// models combined in model order, each step one branch-free loop over the tile.
#pragma once

#include <algorithm>
#include <memory>

#include "kernel_common.h"
#include "multi.h"

namespace fk {
inline namespace FK_ISA {
namespace {

// Where a model's per-neuron numbers come from in a tile: one for the tensor, the tile's row,
// or one per column.
enum class Neurons { none, row, col };

Neurons neuron_shape(const NeuronPlan& plan) {
  if (plan.per_column) return Neurons::col;
  return plan.replace.size() != 1 || plan.replace[0] ? Neurons::row : Neurons::none;
}

// W (and ω when omega_out) of one model over one tile: Sub(Δ) under the mask, then Δ where the
// neuron is replaced, else Sub(Δ) · mul: the very products of merge()'s write_tile.
template <class C, MaskKind K, Neurons N>
void weighted_tile(const void* tuned, const Tile& t, const Located& m, const float* base,
                   float* w, float* omega_out) {
  const auto* u = static_cast<const typename C::T*>(tuned) + t.start;
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
void weighted_any(const void* tuned, const Tile& t, const Located& m, const float* base, float* w,
                  float* omega) {
  dispatch_mask(m.mask.kind, [&](auto kind) {
    switch (neuron_shape(m.neurons)) {
      case Neurons::col:
        return weighted_tile<C, kind.value, Neurons::col>(tuned, t, m, base, w, omega);
      case Neurons::row:
        return weighted_tile<C, kind.value, Neurons::row>(tuned, t, m, base, w, omega);
      default:
        return weighted_tile<C, kind.value, Neurons::none>(tuned, t, m, base, w, omega);
    }
  });
}

// Per thread: every model's W (and ω) of the tile, and the tile's running sums.
struct CombineTile {
  std::vector<float> w, omega;
  float base[kTile], merged[kTile], divisor[kTile], total[kTile];
  int32_t votes[kTile];
  uint8_t positive[kTile];
};

// The elected sign σ of each entry (positive: σ = +1) from every model's W, summed (sum) or
// voted (count) in model order.
void elect(CombineTile& c, int models, uint32_t len, Consensus consensus) {
  if (consensus == Consensus::sum) {
    std::copy(c.w.data(), c.w.data() + len, c.total);
    for (int t = 1; t < models; ++t) {
      const float* w = c.w.data() + t * kTile;
      for (uint32_t k = 0; k < len; ++k) c.total[k] = c.total[k] + w[k];
    }
    for (uint32_t k = 0; k < len; ++k) c.positive[k] = c.total[k] >= 0.0f;
  } else {
    std::fill(c.votes, c.votes + len, 0);
    for (int t = 0; t < models; ++t) {
      const float* w = c.w.data() + t * kTile;
      for (uint32_t k = 0; k < len; ++k) c.votes[k] += int32_t(w[k] > 0.0f) - int32_t(w[k] < 0.0f);
    }
    for (uint32_t k = 0; k < len; ++k) c.positive[k] = c.votes[k] >= 0;
  }
}

// M (and the kept weights' sum) in model order, starting from the first term; returns the
// (model, entry) pairs with W != 0 that consensus dropped.
int64_t sum_kept(CombineTile& c, int models, uint32_t len, const CombineConfig& cfg) {
  const bool vote = cfg.consensus != Consensus::none;
  uint32_t dropped = 0;
  for (int t = 0; t < models; ++t) {
    const float* w = c.w.data() + t * kTile;
    const float* o = c.omega.data() + (cfg.normalize ? t * kTile : 0);
    for (uint32_t k = 0; k < len; ++k) {
      const uint32_t agree = c.positive[k] ? uint32_t(w[k] > 0.0f) : uint32_t(w[k] < 0.0f);
      const uint32_t keep = vote ? agree : 1u;
      dropped += (keep ^ 1u) & uint32_t(w[k] != 0.0f);
      const float term = keep ? w[k] : 0.0f;
      c.merged[k] = t == 0 ? term : c.merged[k] + term;
      if (cfg.normalize) {
        const float part = keep ? o[k] : 0.0f;
        c.divisor[k] = t == 0 ? part : c.divisor[k] + part;
      }
    }
  }
  return dropped;
}

template <class C>
int64_t combine_pass_impl(const Pair& p, const std::vector<Located>& models,
                          const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,
                          int threads) {
  const int n_models = int(models.size());
  std::vector<int64_t> dropped(threads, 0);
  auto* dst = static_cast<typename C::T*>(out);
  const float lambda = cfg.lambda;
  parallel_held(p, threads, [&](int tid, int64_t lo, int64_t hi) {
    auto c = std::make_unique<CombineTile>();
    c->w.resize(size_t(n_models) * kTile);
    c->omega.resize(cfg.normalize ? c->w.size() : 0);
    std::fill(c->positive, c->positive + kTile, 1);
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      const auto* b = static_cast<const typename C::T*>(p.base) + t.start;
      const uint32_t len = uint32_t(t.len);
      for (uint32_t k = 0; k < len; ++k) c->base[k] = C::load(b[k]);
      for (int m = 0; m < n_models; ++m)
        weighted_any<C>(pairs[m].tuned, t, models[m], c->base, c->w.data() + m * kTile,
                        cfg.normalize ? c->omega.data() + m * kTile : nullptr);
      if (cfg.consensus != Consensus::none) elect(*c, n_models, len, cfg.consensus);
      dropped[tid] += sum_kept(*c, n_models, len, cfg);
      typename C::T* o = dst + t.start;
      for (uint32_t k = 0; k < len; ++k) {
        float merged = c->merged[k];
        if (cfg.normalize && c->divisor[k] != 0.0f) merged = merged / c->divisor[k];
        o[k] = C::store(c->base[k] + lambda * merged);
      }
    });
  });
  int64_t total = 0;
  for (int64_t d : dropped) total += d;
  return total;
}

}  // namespace

int64_t combine_pass(const Pair& p, const std::vector<Located>& models,
                     const std::vector<Pair>& pairs, void* out, const CombineConfig& cfg,
                     int threads) {
  return dispatch_dtype(p.dtype, [&](auto codec) {
    return combine_pass_impl<decltype(codec)>(p, models, pairs, out, cfg, threads);
  });
}

}  // namespace FK_ISA
}  // namespace fk
