// Building blocks of the kernel's loops: element codecs (fp32, fp16, bf16), the counter-based
// hash of SPEC.md, tiling of a flat range, OpenMP slices and the suppress mask of a tile.
//
// Every pass walks the tensor in tiles: runs of at most kTile entries that stay inside one row
// (so a tile has one neuron for axis=row and consecutive neurons for axis=col) and inside one
// 2^32 block of flat indices (so the hash's per-block seed is constant over the tile). The work
// on a tile's entries is a branch-free loop, which the compiler vectorises.
//
// The code sits in an inline namespace named by FK_ISA: translation units compiled for another
// instruction set (passes_avx2.cpp, passes_avx512.cpp) get their own copy, so the linker never
// mixes them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <type_traits>
#include <vector>

#ifdef FK_HAS_OPENMP
#include <omp.h>
#endif

#include "types.h"

#ifndef FK_ISA
#define FK_ISA base
#endif

namespace fk {
inline namespace FK_ISA {

constexpr int64_t kTile = 1024;
constexpr uint32_t kAbsMask = 0x7FFFFFFFu;
// |Δ| bits at or above this are Inf or NaN.
constexpr uint32_t kNonFiniteBits = 0x7F800000u;

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// ---- element codecs: load widens to fp32 exactly, store rounds to nearest even ----

struct F32 {
  using T = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

struct BF16 {
  using T = uint16_t;
  // bf16 is the top half of an fp32, so widening is a shift.
  static float load(uint16_t x) { return float_of(uint32_t(x) << 16); }
  // Round to nearest even; NaN cannot reach here (Δ is checked finite, base is finite).
  static uint16_t store(float x) {
    const uint32_t u = bits_of(x);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
};

struct F16 {
  using T = uint16_t;
  // IEEE half -> float without F16C, branch-free so the loops vectorise (the FP16 library's
  // method: normal values by rebiasing the exponent, subnormals through a magic-number subtract).
  static float load(uint16_t h) {
    const uint32_t w = uint32_t(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t magnitude = two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized);
    return float_of(sign | magnitude);
  }
  // float -> IEEE half, round to nearest even, overflow to Inf: the float unit does the rounding
  // by adding a power of two that aligns the mantissa (FP16 library's fp16_ieee_from_fp32_value).
  static uint16_t store(float f) {
    float scaled = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_of(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    scaled = float_of((bias >> 1) + 0x07800000u) + scaled;
    const uint32_t b = bits_of(scaled);
    const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
    return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

// Calls fn(Codec{}) for the codec of dt; every templated pass is entered through this.
template <class Fn>
auto dispatch_dtype(DType dt, Fn&& fn) {
  switch (dt) {
    case DType::f16:
      return fn(F16{});
    case DType::bf16:
      return fn(BF16{});
    default:
      return fn(F32{});
  }
}

// ---- counter-based hash (SPEC.md "Counter-based hash") ----

constexpr uint32_t kStreamTie = 0x9E3779B9u;
constexpr uint32_t kStreamDrop = 0x85EBCA6Bu;

inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// h_stream(i) = mix32((i mod 2^32) ^ s), s = mix32(tensor_seed ^ stream ^ mix32(i >> 32)).
struct HashStream {
  uint32_t seed_stream;  // tensor_seed ^ stream

  HashStream(uint32_t tensor_seed, uint32_t stream) : seed_stream(tensor_seed ^ stream) {}
  uint32_t block_seed(int64_t i) const {
    return mix32(seed_stream ^ mix32(uint32_t(uint64_t(i) >> 32)));
  }
  uint32_t at(int64_t i) const { return mix32(uint32_t(i) ^ block_seed(i)); }
  // Hashes of a tile (which never crosses a 2^32 boundary): one block seed, a vectorised loop.
  void fill(int64_t start, int64_t len, uint32_t* out) const {
    const uint32_t s = block_seed(start);
    const uint32_t low = uint32_t(start);
    for (int64_t k = 0; k < len; ++k) out[k] = mix32((low + uint32_t(k)) ^ s);
  }
};

// The 63-bit order key of SPEC "Order of entries": |Δ| bits (31) above the TIE hash (32).
inline uint64_t order_key(uint32_t abs_bits, uint32_t tie) {
  return (uint64_t(abs_bits) << 32) | tie;
}

inline bool cut_contains(const Cut& c, uint64_t key, int64_t index) {
  return key > c.key || (key == c.key && uint64_t(index) < c.index);
}

// ---- tiles ----

struct Tile {
  int64_t start;  // flat index of the first entry
  int64_t len;    // entries, 1..kTile
  int64_t row;    // its row
  int64_t col;    // column of the first entry
};

// Calls fn(tile) over [lo, hi) in tiles that stay within a row and a 2^32 block of indices.
template <class Fn>
void for_each_tile(int64_t lo, int64_t hi, int64_t cols, Fn&& fn) {
  int64_t i = lo;
  while (i < hi) {
    const int64_t row = i / cols;
    const int64_t col = i - row * cols;
    int64_t end = row * cols + cols;
    const int64_t block_end = int64_t((uint64_t(i) >> 32) + 1) << 32;
    if (end > block_end) end = block_end;
    if (end > hi) end = hi;
    if (end > i + kTile) end = i + kTile;
    fn(Tile{i, end - i, row, col});
    i = end;
  }
}

// Δ = f32(tuned) − f32(base) of a tile (exact for fp16/bf16 inputs).
template <class C>
inline void load_delta(const Pair& p, const Tile& t, float* d) {
  const auto* b = static_cast<const typename C::T*>(p.base) + (t.start - p.lo);
  const auto* u = static_cast<const typename C::T*>(p.tuned) + (t.start - p.lo);
  for (int64_t k = 0; k < t.len; ++k) d[k] = C::load(u[k]) - C::load(b[k]);
}

// Σ|x| in double over 32 interleaved partial sums: a fixed order (so results are reproducible)
// with enough independent chains that the adds pipeline instead of waiting on each other.
inline double sum_abs(const float* x, int64_t len) {
  constexpr int kLanes = 32;
  double acc[kLanes] = {};
  int64_t k = 0;
  for (; k + kLanes <= len; k += kLanes)
    for (int l = 0; l < kLanes; ++l) acc[l] += double(std::fabs(x[k + l]));
  for (; k < len; ++k) acc[k % kLanes] += double(std::fabs(x[k]));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] += acc[l + width];
  return acc[0];
}

// ---- threads ----

// Threads for a pass over n entries: as requested, else OpenMP's default, but one for tensors
// under 2^18 entries (a few hundred microseconds of work), where a team costs more than it
// saves, and far more when the machine is oversubscribed and a team waits for a time slice.
inline int thread_count(int64_t n, int requested) {
#ifdef FK_HAS_OPENMP
  if (requested > 0) return requested;
  if (n < (int64_t(1) << 18)) return 1;
  const int available = omp_get_max_threads();
  return available > 0 ? available : 1;
#else
  (void)n;
  (void)requested;
  return 1;
#endif
}

// Runs fn(slice, lo, hi) on `slices` contiguous slices of [0, n). An exception thrown by any
// slice (e.g. bad_alloc) is carried out of the parallel region and rethrown here.
template <class Fn>
void parallel_slices(int64_t n, int slices, Fn&& fn) {
  std::vector<std::exception_ptr> errors(slices);
  auto run = [&](int s) {
    try {
      fn(s, n * s / slices, n * (s + 1) / slices);
    } catch (...) {
      errors[s] = std::current_exception();
    }
  };
#ifdef FK_HAS_OPENMP
  if (slices > 1) {
    // The runtime may grant fewer threads than asked; each then takes every team-size-th slice.
#pragma omp parallel num_threads(slices)
    {
      const int team = omp_get_num_threads();
      for (int s = omp_get_thread_num(); s < slices; s += team) run(s);
    }
  } else {
    run(0);
  }
#else
  for (int s = 0; s < slices; ++s) run(s);
#endif
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

// Runs fn(slice, lo, hi) on `slices` contiguous slices of the entries p holds, [p.lo, p.end()).
template <class Fn>
void parallel_held(const Pair& p, int slices, Fn&& fn) {
  parallel_slices(p.held(), slices,
                  [&](int s, int64_t lo, int64_t hi) { fn(s, p.lo + lo, p.lo + hi); });
}

// ---- the suppress mask of a tile ----

// A cut split into 32-bit lanes for one tile: |Δ| bits, TIE hash, and how many of the tile's
// entries have a smaller flat index than the cut's entry (the index tie-break). |Δ| bits of
// finite values are below 2^31, so they compare as signed integers (one instruction in SIMD);
// the empty cut, whose key is all ones, becomes |Δ| bits 0x7FFFFFFF (a NaN, never reached).
struct CutLanes {
  int32_t abs;
  uint32_t tie;
  uint32_t index_limit;

  CutLanes(const Cut& c, const Tile& t) {
    const bool empty = (c.key >> 63) != 0;
    abs = empty ? 0x7FFFFFFF : int32_t(c.key >> 32);
    tie = empty ? 0xFFFFFFFFu : uint32_t(c.key);
    const uint64_t start = uint64_t(t.start);
    const uint64_t limit = empty || c.index <= start ? 0 : c.index - start;
    index_limit = uint32_t(limit < uint64_t(t.len) ? limit : uint64_t(t.len));
  }
  // 1 if the tile's entry k (|Δ| bits a, TIE hash h) is in the cut, else 0.
  uint32_t contains(uint32_t a, uint32_t h, uint32_t k) const {
    const uint32_t tie_first = uint32_t(h > tie) | (uint32_t(h == tie) & uint32_t(k < index_limit));
    return uint32_t(int32_t(a) > abs) | (uint32_t(int32_t(a) == abs) & tie_first);
  }
};

// The mask of one tile, specialised by kind so that each pass's loop is a single branch-free
// loop: keep(k, a) is 0/1 for the tile's entry k with |Δ| bits a; scale(k) its suppress scale.
template <MaskKind K>
struct TileMask;

template <>
struct TileMask<MaskKind::all> {
  TileMask(const Mask&, const Tile&) {}
  uint32_t keep(uint32_t, uint32_t) const { return 1; }
  float scale(uint32_t) const { return 1.0f; }
};

template <>
struct TileMask<MaskKind::top> {
  CutLanes lower;
  uint32_t seed, low;  // h_TIE(start + k) = mix32((low + k) ^ seed)

  TileMask(const Mask& m, const Tile& t)
      : lower(m.lower, t),
        seed(HashStream(m.tensor_seed, kStreamTie).block_seed(t.start)),
        low(uint32_t(t.start)) {}
  uint32_t keep(uint32_t k, uint32_t a) const {
    return lower.contains(a, mix32((low + k) ^ seed), k);
  }
  float scale(uint32_t) const { return 1.0f; }
};

template <>
struct TileMask<MaskKind::window> {
  CutLanes lower, upper;
  uint32_t seed, low;  // h_TIE(start + k) = mix32((low + k) ^ seed)

  TileMask(const Mask& m, const Tile& t)
      : lower(m.lower, t),
        upper(m.upper, t),
        seed(HashStream(m.tensor_seed, kStreamTie).block_seed(t.start)),
        low(uint32_t(t.start)) {}
  uint32_t keep(uint32_t k, uint32_t a) const {
    const uint32_t h = mix32((low + k) ^ seed);
    return lower.contains(a, h, k) & (upper.contains(a, h, k) ^ 1u);
  }
  float scale(uint32_t) const { return 1.0f; }
};

template <>
struct TileMask<MaskKind::random> {
  uint32_t seed, low, keep_all, threshold;
  float uniform;

  // The threshold is in [0, 2^32]; 2^32 keeps everything. 32-bit compares vectorise.
  TileMask(const Mask& m, const Tile& t)
      : seed(HashStream(m.tensor_seed, kStreamDrop).block_seed(t.start)),
        low(uint32_t(t.start)),
        keep_all(uint32_t(m.drop_threshold >> 32)),
        threshold(uint32_t(m.drop_threshold)),
        uniform(m.scale) {}
  uint32_t keep(uint32_t k, uint32_t) const {
    return keep_all | uint32_t(mix32((low + k) ^ seed) < threshold);
  }
  float scale(uint32_t) const { return uniform; }
};

template <>
struct TileMask<MaskKind::della> {
  const float* entry_scale;
  float uniform;

  TileMask(const Mask& m, const Tile& t)
      : entry_scale(m.entry_scale + (t.start - m.entry_lo)), uniform(m.scale) {}
  uint32_t keep(uint32_t k, uint32_t) const { return uint32_t(entry_scale[k] >= 0.0f); }
  float scale(uint32_t k) const { return entry_scale[k] * uniform; }
};

// Calls fn(TileMask<kind>-tag) so a pass is instantiated once per mask kind.
template <class Fn>
auto dispatch_mask(MaskKind kind, Fn&& fn) {
  switch (kind) {
    case MaskKind::top:
      return fn(std::integral_constant<MaskKind, MaskKind::top>{});
    case MaskKind::window:
      return fn(std::integral_constant<MaskKind, MaskKind::window>{});
    case MaskKind::random:
      return fn(std::integral_constant<MaskKind, MaskKind::random>{});
    case MaskKind::della:
      return fn(std::integral_constant<MaskKind, MaskKind::della>{});
    default:
      return fn(std::integral_constant<MaskKind, MaskKind::all>{});
  }
}

}  // namespace FK_ISA
}  // namespace fk
