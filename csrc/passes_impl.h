// The streaming passes over base and tuned, compiled once per instruction set (passes.cpp for
// the baseline, passes_avx2.cpp, passes_avx512.cpp) and chosen at run time by passes.cpp. Each
// thread walks one contiguous slice of the flat range in tiles; per-thread results are reduced
// in thread order, so a given thread count always gives the same sums. The per-entry loops are
// instantiated per dtype and mask kind so that each is one branch-free loop the compiler
// vectorises.
#pragma once

#include <algorithm>

#include "kernel_common.h"
#include "passes.h"

namespace fk {
inline namespace FK_ISA {
namespace {

// Adds a tile's non-negative values to per-neuron sums: a row's tile adds to one neuron, a
// column neuron receives one value from each row.
inline void add_to_neurons(const Tile& t, const float* x, bool per_column, double* acc) {
  if (per_column) {
    for (int64_t k = 0; k < t.len; ++k) acc[t.col + k] += double(x[k]);
  } else {
    acc[t.row] += sum_abs(x, t.len);
  }
}

// One bracket's bounds as 32-bit lanes. |Δ| bits compare as signed (see CutLanes); hashes
// compare as signed after flipping their top bit (`ties`), which SIMD does in one instruction.
struct BracketLanes {
  int32_t hi_abs, lo_abs, hi_tie, lo_tie;

  explicit BracketLanes(const Bracket& b)
      : hi_abs(int32_t(b.hi >> 32)),
        lo_abs(int32_t(b.lo >> 32)),
        hi_tie(int32_t(uint32_t(b.hi) ^ 0x80000000u)),
        lo_tie(int32_t(uint32_t(b.lo) ^ 0x80000000u)) {}
  // h_flipped = h ^ 0x80000000 as int32.
  uint32_t above(int32_t a, int32_t h_flipped) const {
    return uint32_t(a > hi_abs) | (uint32_t(a == hi_abs) & uint32_t(h_flipped > hi_tie));
  }
  uint32_t from_lo(int32_t a, int32_t h_flipped) const {
    return uint32_t(a > lo_abs) | (uint32_t(a == lo_abs) & uint32_t(h_flipped >= lo_tie));
  }
};

// The window's brackets as the first pass sees them: none; the lower cut only (top k); both
// cuts (upper in bracket 0, lower in bracket 1); the upper cut only (the window reaches n).
enum class Brackets { none, lower, both, upper };

// The first pass's loop over one tile. Always: the non-finite count. For each bracket: the
// count above it and a 0/1 candidate flag per entry. kWrite: out = cast(f32(base) + α·Sub(Δ))
// under the provisional mask (from the brackets when there are any, candidates dropped; else
// TileMask<K>). kStats: |Δ| and |Sub(Δ)| kept for the statistics loops that follow.
template <class C, Brackets B, bool kWrite, MaskKind K, bool kStats>
inline void scan_tile(const Pair& p, const Tile& t, const FirstPassPlan& plan, float* abs_delta,
                      float* sub_abs, uint8_t (*flag)[kTile + 8], FirstPassResult& r) {
  constexpr bool kTwo = B == Brackets::both;
  const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  auto* out = kWrite ? static_cast<typename C::T*>(plan.out) + (t.start - p.lo) : nullptr;
  const uint32_t seed = HashStream(plan.tensor_seed, kStreamTie).block_seed(t.start);
  const uint32_t low = uint32_t(t.start);
  const BracketLanes first(plan.bracket[0]), second(plan.bracket[kTwo ? 1 : 0]);
  const Mask none;
  const TileMask<K> mask(plan.mask ? *plan.mask : none, t);
  const float weight = plan.weight;
  // A local bound: the byte-sized flag stores could alias t.len as far as the compiler knows,
  // and a bound it must reload defeats vectorisation.
  const uint32_t len = uint32_t(t.len);
  uint32_t nonfinite = 0, above0 = 0, above1 = 0;
  for (uint32_t k = 0; k < len; ++k) {
    const float base = C::load(b[k]);
    const float d = C::load(u[k]) - base;
    const float magnitude = std::fabs(d);
    const uint32_t a = bits_of(magnitude);
    if (kStats) abs_delta[k] = magnitude;
    nonfinite += uint32_t(int32_t(a) >= int32_t(kNonFiniteBits));
    uint32_t keep = 1;
    float scale = 1.0f;
    if (B != Brackets::none) {
      const int32_t h = int32_t(mix32((low + k) ^ seed) ^ 0x80000000u);
      const uint32_t over0 = first.above(int32_t(a), h);
      const uint32_t cand0 = first.from_lo(int32_t(a), h) & (over0 ^ 1u);
      flag[0][k] = uint8_t(cand0);
      above0 += over0;
      if (B == Brackets::lower) keep = over0;  // candidates are not over the bracket
      if (B == Brackets::upper) keep = (over0 | cand0) ^ 1u;
      if (kTwo) {
        const uint32_t over1 = second.above(int32_t(a), h);
        const uint32_t cand1 = second.from_lo(int32_t(a), h) & (over1 ^ 1u);
        flag[1][k] = uint8_t(cand1);
        above1 += over1;
        keep = over1 & ((over0 | cand0 | cand1) ^ 1u);
      }
    } else if (kWrite) {
      keep = mask.keep(k, a);
      scale = mask.scale(k);
    }
    if (kWrite) {
      const float product = d * scale;
      const float sub = keep ? product : 0.0f;
      out[k] = C::store(base + sub * weight);
      if (kStats) sub_abs[k] = std::fabs(sub);
    }
  }
  r.nonfinite += nonfinite;
  if (B != Brackets::none) r.bracket[0].above += above0;
  if (kTwo) r.bracket[1].above += above1;
}

// Collects the candidates a tile flagged for one bracket, with their order keys and, for the
// fused write, the output they get if the window keeps them.
template <class C>
inline void gather_candidates(const Pair& p, const FirstPassPlan& plan, const Tile& t,
                              uint8_t* flag, BracketResult& r) {
  const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  std::memset(flag + t.len, 0, 8);
  const HashStream tie(plan.tensor_seed, kStreamTie);
  // Candidates are rare: read the 0/1 flags eight at a time and visit only the set ones.
  for (int64_t w = 0; w < t.len; w += 8) {
    uint64_t word;
    std::memcpy(&word, flag + w, 8);
    for (; word != 0; word &= word - 1) {
      const int64_t k = w + (__builtin_ctzll(word) >> 3);
      if (r.found.size() >= plan.collect_cap) {
        r.overflow = true;
        return;
      }
      const float base = C::load(b[k]);
      const float d = C::load(u[k]) - base;
      const float sub = d * 1.0f;  // the window's scale, as the write loops compute it
      const auto kept = C::store(base + sub * plan.weight);
      uint32_t kept_bits;
      if constexpr (std::is_same_v<decltype(kept), const float>)
        kept_bits = bits_of(kept);
      else
        kept_bits = kept;
      r.found.push_back({order_key(bits_of(std::fabs(d)), tie.at(t.start + k)), t.start + k,
                         kept_bits, std::fabs(sub)});
    }
  }
}

void merge_into(FirstPassResult& total, FirstPassResult& part, int brackets) {
  total.nonfinite += part.nonfinite;
  total.total_abs += part.total_abs;
  total.kept += part.kept;
  total.kept_abs += part.kept_abs;
  for (size_t b = 0; b < part.histogram.size(); ++b) total.histogram[b] += part.histogram[b];
  for (size_t j = 0; j < part.change.size(); ++j) total.change[j] += part.change[j];
  for (size_t j = 0; j < part.kept_change.size(); ++j) total.kept_change[j] += part.kept_change[j];
  for (int b = 0; b < brackets; ++b) {
    BracketResult& into = total.bracket[b];
    BracketResult& from = part.bracket[b];
    into.above += from.above;
    into.overflow = into.overflow || from.overflow;
    into.found.insert(into.found.end(), from.found.begin(), from.found.end());
  }
}

// Which bracket layout a plan has.
Brackets brackets_of(const FirstPassPlan& plan) {
  if (plan.brackets == 2) return Brackets::both;
  if (plan.brackets == 0) return Brackets::none;
  return plan.lower_bracket == 0 ? Brackets::lower : Brackets::upper;
}

// Whether the first pass needs |Δ| and |Sub(Δ)| of each tile after its scan.
bool needs_stats(const FirstPassPlan& plan) {
  return plan.histogram || plan.change || plan.kept_change || plan.total_abs ||
         (plan.mask && plan.mask->kind == MaskKind::random);
}

// The scan_tile instantiation for a plan: bracket layout, fused write, the mask it writes, and
// whether statistics follow.
template <class C, bool kStats>
void scan_any(const Pair& p, const Tile& t, const FirstPassPlan& plan, float* abs_delta,
              float* sub_abs, uint8_t (*flag)[kTile + 8], FirstPassResult& r) {
  constexpr MaskKind all = MaskKind::all;
  const bool write = plan.out != nullptr;
#define FK_SCAN(B, W, K) \
  return scan_tile<C, B, W, K, kStats>(p, t, plan, abs_delta, sub_abs, flag, r)
  switch (brackets_of(plan)) {
    case Brackets::lower:
      if (write) FK_SCAN(Brackets::lower, true, all);
      FK_SCAN(Brackets::lower, false, all);
    case Brackets::both:
      if (write) FK_SCAN(Brackets::both, true, all);
      FK_SCAN(Brackets::both, false, all);
    case Brackets::upper:
      if (write) FK_SCAN(Brackets::upper, true, all);
      FK_SCAN(Brackets::upper, false, all);
    default:
      if (write && plan.mask && plan.mask->kind == MaskKind::random)
        FK_SCAN(Brackets::none, true, MaskKind::random);
      if (write) FK_SCAN(Brackets::none, true, all);
      FK_SCAN(Brackets::none, false, all);
  }
#undef FK_SCAN
}

template <class C>
FirstPassResult first_pass_impl(const Pair& p, const FirstPassPlan& plan, int threads) {
  std::vector<FirstPassResult> parts(threads);
  parallel_held(p, threads, [&](int tid, int64_t lo, int64_t hi) {
    FirstPassResult& r = parts[tid];
    if (plan.histogram) r.histogram.assign(kTopBins, 0);
    if (plan.change) r.change.assign(plan.neurons, 0.0);
    if (plan.kept_change) r.kept_change.assign(plan.neurons, 0.0);
    // Room for this slice's share of the candidates expected (half the cap).
    const double share = double(hi - lo) / double(std::max<int64_t>(p.held(), 1));
    for (int b = 0; b < plan.brackets; ++b)
      r.bracket[b].found.reserve(size_t(double(plan.collect_cap / 2) * share));
    const bool random = plan.mask && plan.mask->kind == MaskKind::random;
    const bool stats = needs_stats(plan);
    float abs_delta[kTile], sub_abs[kTile], kept_abs[kTile];
    uint8_t flag[2][kTile + 8];
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      if (stats)
        scan_any<C, true>(p, t, plan, abs_delta, sub_abs, flag, r);
      else
        scan_any<C, false>(p, t, plan, abs_delta, sub_abs, flag, r);
      for (int b = 0; b < plan.brackets; ++b)
        if (!r.bracket[b].overflow) gather_candidates<C>(p, plan, t, flag[b], r.bracket[b]);
      if (plan.histogram)
        for (int64_t k = 0; k < t.len; ++k) ++r.histogram[bits_of(abs_delta[k]) >> kTopShift];
      if (plan.change) add_to_neurons(t, abs_delta, plan.per_column, r.change.data());
      if (plan.kept_change) add_to_neurons(t, sub_abs, plan.per_column, r.kept_change.data());
      if (plan.total_abs) r.total_abs += sum_abs(abs_delta, t.len);
      if (random) {
        const TileMask<MaskKind::random> mask(*plan.mask, t);
        uint32_t kept = 0;
        const uint32_t len = uint32_t(t.len);
        for (uint32_t k = 0; k < len; ++k) {
          const uint32_t keep = mask.keep(k, 0);
          kept += keep;
          kept_abs[k] = keep ? abs_delta[k] : 0.0f;
        }
        r.kept += kept;
        r.kept_abs += sum_abs(kept_abs, t.len);
      }
    });
  });
  for (int tid = 1; tid < threads; ++tid) merge_into(parts[0], parts[tid], plan.brackets);
  return std::move(parts[0]);
}

// Sub(Δ) of a tile's entries: Δ · scale where kept, else +0.
template <class C, MaskKind K>
inline void tile_sub(const Pair& p, const Tile& t, const Mask& mask, float* sub) {
  const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  const TileMask<K> m(mask, t);
  const uint32_t len = uint32_t(t.len);
  for (uint32_t k = 0; k < len; ++k) {
    const float d = C::load(u[k]) - C::load(b[k]);
    const float product = d * m.scale(k);
    sub[k] = m.keep(k, bits_of(d) & kAbsMask) ? product : 0.0f;
  }
}

template <class C, MaskKind K>
std::vector<double> kept_change_impl(const Pair& p, const Mask& mask, bool per_column,
                                     int64_t neurons, int threads) {
  std::vector<std::vector<double>> parts(threads);
  parallel_held(p, threads, [&](int tid, int64_t lo, int64_t hi) {
    parts[tid].assign(neurons, 0.0);
    float sub[kTile], magnitude[kTile];
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      tile_sub<C, K>(p, t, mask, sub);
      for (int64_t k = 0; k < t.len; ++k) magnitude[k] = std::fabs(sub[k]);
      add_to_neurons(t, magnitude, per_column, parts[tid].data());
    });
  });
  for (int tid = 1; tid < threads; ++tid)
    for (int64_t j = 0; j < neurons; ++j) parts[0][j] += parts[tid][j];
  return std::move(parts[0]);
}

// How a tile's Δ' is formed from Sub(Δ) and Δ: one multiplier α for the whole tensor (no
// restore), one neuron per tile (axis=row), or one neuron per entry (axis=col).
enum class NeuronShape { none, row, col };

// out = cast(f32(base) + Δ') over one tile.
template <class C, MaskKind K, NeuronShape N>
inline void write_tile(const Pair& p, const Tile& t, const Mask& mask, const NeuronPlan& plan,
                       typename C::T* out) {
  const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  const TileMask<K> m(mask, t);
  const int64_t j = N == NeuronShape::col ? t.col : N == NeuronShape::row ? t.row : 0;
  const uint8_t* replace = plan.replace.data() + j;
  const float* mul = plan.mul.data() + j;
  // Every product is computed and then selected, so the loop has no branches.
  const uint32_t len = uint32_t(t.len);
  for (uint32_t k = 0; k < len; ++k) {
    const float base = C::load(b[k]);
    const float d = C::load(u[k]) - base;
    const float product = d * m.scale(k);
    const float sub = m.keep(k, bits_of(d) & kAbsMask) ? product : 0.0f;
    const float scaled = sub * (N == NeuronShape::col ? mul[k] : mul[0]);
    float new_delta = scaled;
    if (N == NeuronShape::col) new_delta = replace[k] ? d : scaled;
    if (N == NeuronShape::row) new_delta = replace[0] ? d : scaled;
    out[k] = C::store(base + new_delta);
  }
}

template <class C, MaskKind K, NeuronShape N>
void write_pass_impl(const Pair& p, const Mask& mask, const NeuronPlan& plan, void* out,
                     int threads) {
  auto* dst = static_cast<typename C::T*>(out);
  parallel_held(p, threads, [&](int, int64_t lo, int64_t hi) {
    for_each_tile(lo, hi, p.cols, [&](const Tile& t) {
      write_tile<C, K, N>(p, t, mask, plan, dst + (t.start - p.lo));
    });
  });
}

template <class C, MaskKind K>
void write_rows_impl(const Pair& p, const Mask& mask, const NeuronPlan& plan,
                     const std::vector<int64_t>& rows, void* out, int threads) {
  auto* dst = static_cast<typename C::T*>(out);
  const int slices = int(std::min<int64_t>(threads, int64_t(rows.size())));
  parallel_slices(int64_t(rows.size()), std::max(slices, 1), [&](int, int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t start = rows[r] * p.cols;
      // A replaced row is Δ throughout, whatever the mask: skip evaluating it.
      const bool replaced = plan.replace[rows[r]] != 0;
      for_each_tile(start, start + p.cols, p.cols, [&](const Tile& t) {
        if (replaced)
          write_tile<C, MaskKind::all, NeuronShape::row>(p, t, mask, plan, dst + t.start);
        else
          write_tile<C, K, NeuronShape::row>(p, t, mask, plan, dst + t.start);
      });
    }
  });
}

}  // namespace

FirstPassResult first_pass(const Pair& p, const FirstPassPlan& plan, int threads) {
  return dispatch_dtype(p.dtype, [&](auto codec) {
    return first_pass_impl<decltype(codec)>(p, plan, threads);
  });
}

std::vector<double> kept_change(const Pair& p, const Mask& mask, bool per_column, int64_t neurons,
                                int threads) {
  return dispatch_dtype(p.dtype, [&](auto codec) {
    return dispatch_mask(mask.kind, [&](auto kind) {
      return kept_change_impl<decltype(codec), kind.value>(p, mask, per_column, neurons, threads);
    });
  });
}

void write_pass(const Pair& p, const Mask& mask, const NeuronPlan& plan, void* out, int threads) {
  dispatch_dtype(p.dtype, [&](auto codec) {
    dispatch_mask(mask.kind, [&](auto kind) {
      using C = decltype(codec);
      if (plan.per_column)
        write_pass_impl<C, kind.value, NeuronShape::col>(p, mask, plan, out, threads);
      else if (plan.replace.size() != 1 || plan.replace[0])  // several neurons, or a replaced one
        write_pass_impl<C, kind.value, NeuronShape::row>(p, mask, plan, out, threads);
      else
        write_pass_impl<C, kind.value, NeuronShape::none>(p, mask, plan, out, threads);
    });
  });
}

void write_rows(const Pair& p, const Mask& mask, const NeuronPlan& plan,
                const std::vector<int64_t>& rows, void* out, int threads) {
  dispatch_dtype(p.dtype, [&](auto codec) {
    dispatch_mask(mask.kind, [&](auto kind) {
      write_rows_impl<decltype(codec), kind.value>(p, mask, plan, rows, out, threads);
    });
  });
}

}  // namespace FK_ISA
}  // namespace fk

#include "combine_impl.h"
