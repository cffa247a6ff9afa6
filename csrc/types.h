// Plain types shared by every part of the kernel, whatever instruction set a part is compiled
// for. Only data lives here: code that may be compiled for several instruction sets lives in
// kernel_common.h, inside a namespace named after the instruction set.
#pragma once

#include <cstdint>
#include <vector>

namespace fk {

// The radix-select fallback histograms |Δ| bits >> kTopShift: the top 16 of the 31 bits.
constexpr int kTopShift = 15;
constexpr int64_t kTopBins = int64_t(1) << 16;

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };
enum class Suppress : int { none, magnitude, breadcrumbs, random, della };
enum class Rescale : int { none, l1, inverse };
enum class Restore : int { none, replace, rescale };
enum class Axis : int { none, row, col };

// A tensor of n entries viewed as rows x cols (cols = the row length), of which base and tuned
// hold the contiguous entries [lo, hi): the whole tensor (lo = 0, hi = n, the default) or one
// chunk of it streamed through the passes (chunked.h). Entry i is base[i - lo]; flat indices
// (hashes, neurons) stay the tensor's own.
struct Pair {
  const void* base;
  const void* tuned;
  DType dtype;
  int64_t n;
  int64_t rows;
  int64_t cols;
  int64_t lo = 0;
  int64_t hi = -1;  // < 0: n

  int64_t end() const { return hi < 0 ? n : hi; }
  int64_t held() const { return end() - lo; }
};

// A prefix of the SPEC order, given by the first entry after it: x is in the cut iff x precedes
// (key, index), i.e. has a larger order key, or the same key and a smaller flat index. Order
// keys use 63 bits, so {~0, 0} is the empty cut and {0, ~0} the whole tensor.
struct Cut {
  uint64_t key;
  uint64_t index;
};

constexpr Cut kCutNone{~uint64_t(0), 0};
constexpr Cut kCutAll{0, ~uint64_t(0)};

// top: the first k of the order (TIES); window: positions [t, t + k) (breadcrumbs).
enum class MaskKind { all, top, window, random, della };

// Which entries suppress keeps, and with what scale: Sub(Δ)_i = Δ_i · scale_i for kept i, else 0.
struct Mask {
  MaskKind kind = MaskKind::all;
  // top and window: kept iff in `lower` and not in `upper` (top: upper is empty).
  Cut upper = kCutNone;
  Cut lower = kCutAll;
  uint32_t tensor_seed = 0;
  // random: kept iff h_DROP(i) < drop_threshold (SPEC's u(i) < K on integers).
  uint64_t drop_threshold = 0;
  // della: per-entry scale from the row pass, negative where dropped.
  const float* entry_scale = nullptr;
  int64_t entry_lo = 0;  // the flat index of entry_scale[0] (a chunk's first entry)
  // Uniform scale; for della it multiplies entry_scale (one of the two is exactly 1).
  float scale = 1.0f;
};

// The order keys around one window boundary, from a sample: entries with key > hi are before
// the boundary for sure; entries with lo <= key <= hi are the candidates that may hold it.
struct Bracket {
  uint64_t hi;
  uint64_t lo;
};

// Per-neuron treatment in the write pass: Δ' = Δ where replace[j], else Sub(Δ) · mul[j]
// (mul is α outside R, the rescale factor C(j)/C'(j) inside it).
struct NeuronPlan {
  bool per_column = false;  // axis=col: neuron j is column j; else row j (axis=none: one neuron)
  std::vector<uint8_t> replace;
  std::vector<float> mul;
};

// What the first pass computes besides Δ's finiteness.
struct FirstPassPlan {
  bool change = false;         // C(j) per neuron
  bool per_column = false;     // neurons are columns (else rows)
  int64_t neurons = 0;
  bool total_abs = false;      // Σ|Δ| (l1 rescale)
  const Mask* mask = nullptr;  // the mask; random's kept count and Σ|Δ| are taken here
  bool histogram = false;      // of |Δ| bits >> kTopShift, for the radix-select fallback
  uint32_t tensor_seed = 0;    // for the TIE hash of bracketed keys
  int brackets = 0;            // window boundaries bracketed (0, 1 or 2)
  Bracket bracket[2] = {};
  // Bracket of the window's lower cut, -1 if none. Brackets are listed upper cut first, so
  // with two the upper is 0 and the lower 1; a lone upper bracket means the window reaches n.
  int lower_bracket = -1;
  uint64_t collect_cap = 0;    // stop collecting candidates (and report overflow) beyond this
  // Fused write: out = cast(f32(base) + α · Sub(Δ)) in the same pass, under the provisional
  // mask (the mask itself; for a window, what the brackets decide, candidates dropped).
  void* out = nullptr;
  float weight = 1.0f;
  bool kept_change = false;    // Σ|Sub(Δ)| per neuron over the provisionally kept entries
};

// An entry the window's selection must look at: a bracket candidate or a radix-group member.
struct Candidate {
  uint64_t key;
  int64_t index;
  // Fused route: out's element bits had the entry been kept, and |Δ| (its |Sub(Δ)| then).
  uint32_t kept_bits;
  float magnitude;
};

struct BracketResult {
  int64_t above = 0;             // entries with key > hi
  bool overflow = false;         // more candidates than collect_cap: the list is incomplete
  std::vector<Candidate> found;  // entries with lo <= key <= hi
};

struct FirstPassResult {
  int64_t nonfinite = 0;
  double total_abs = 0.0;
  int64_t kept = 0;
  double kept_abs = 0.0;
  std::vector<uint64_t> histogram;
  std::vector<double> change;
  std::vector<double> kept_change;
  BracketResult bracket[2];
};

}  // namespace fk
