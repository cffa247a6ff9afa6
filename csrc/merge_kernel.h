// The fused per-tensor merge of SPEC.md on the CPU: suppress, restore and write in as few passes
// over base and tuned as the method allows.
//
//   sample     magnitude/breadcrumbs: order keys of a sample bracket the window (select.h)
//   pass 1     Δ, the non-finite check, neuron change scores C(j), Σ|Δ|, the random mask's
//              sums, the bracket counts and candidates; and, when the mask is known by then
//              (the fused route), out itself, with the window's candidates written as dropped.
//              Locate runs this pass alone for C(j) and Σ|Δ| (scores.h)
//   select     radix select among the candidates (radix passes only when a bracket missed)
//   fix-up     the fused route rewrites the candidates the window keeps
//   della      one pass over rows, sorting each row's keys (della.h)
//   C'         restore=rescale only, unless the fused route summed it in pass 1
//   write      out = cast(f32(base) + Δ'): everything when not fused, else the restored rows
//              (axis=row; restored columns would need a full pass, so axis=col is not fused)
//
// So exact TIES reads base and tuned once and writes out once, plus the sample and the
// candidates (about 1 % of the entries for a 58.7M-entry tensor).
#pragma once

#include "types.h"

namespace fk {

// Everything the host decided (contract.py's counts and thresholds) plus the parameters.
struct MergeConfig {
  Suppress suppress = Suppress::none;
  Rescale rescale = Rescale::none;
  Restore restore = Restore::none;
  Axis axis = Axis::none;
  int64_t window_start = 0;      // magnitude/breadcrumbs keep order positions [start, start+len)
  int64_t window_len = 0;
  uint64_t drop_threshold = 0;   // random: keep iff h_DROP(i) < threshold, in [0, 2^32]
  float random_inverse = 1.0f;   // random, rescale=inverse: (float)(1/K)
  double density = 0.0;          // della's K
  double epsilon = 0.0;          // della's ε
  float weight = 1.0f;           // α
  int64_t restored_neurons = 0;  // m; 0 unless restore and axis are set
  uint32_t tensor_seed = 0;
  bool approx = false;           // select=approx for magnitude/breadcrumbs
  int64_t approx_tolerance = 0;  // largest |kept − k| approx may leave
  double l1_eps = 1e-7;          // contract.L1_EPS
  int64_t sample_size = -1;                  // see WindowRequest::sample_size
  uint64_t collect_cap = uint64_t(1) << 22;  // see WindowRequest::collect_cap
  int threads = 0;               // 0: OpenMP's default
};

struct MergeResult {
  int64_t nonfinite = 0;  // entries with non-finite Δ; when > 0, out's contents are undefined
  int64_t kept = 0;
  int64_t restored = 0;
  int64_t fallbacks = 0;
  float l1_scale = 1.0f;
};

// Writes out = cast(f32(base) + Δ', dtype) for pair.n entries (SPEC.md); out may alias base or
// tuned (the fused route is then skipped). pair.rows x pair.cols is the tensor as 2-D: its last
// dimension is the row (della), and for axis row/col the rows/columns are the neurons.
MergeResult merge(const Pair& pair, void* out, const MergeConfig& cfg);

// One tuned model located alone, nothing written (the merge of several tuned models, multi.h):
// its mask and neuron plan, under which the write pass's Δ' of an entry is the model's weighted
// delta W = ω · L (mul is the weight w outside R, C/C' inside; replace: Δ), and ω per neuron.
struct Located {
  Mask mask;
  NeuronPlan neurons;
  std::vector<float> omega;        // per neuron of `neurons`: 1 in R, else the weight
  std::vector<float> entry_scale;  // della's per-entry scales, which mask.entry_scale points into
  MergeResult result;              // nonfinite > 0: nothing else is set
};

// merge() up to its write pass: selection and restore planning for one model.
Located locate(const Pair& pair, const MergeConfig& cfg);

// Steps of merge() that the chunked merge (chunked.h) shares.
bool neurons_active(const MergeConfig& cfg);
// The mask as far as it is known before any pass.
Mask initial_mask(const Pair& p, const MergeConfig& cfg);
// contract.l1_scale, rounded once to float.
float l1_scale(double total_abs, double kept_abs, double eps);
// R: the m neurons with the largest change score, ties by lower index.
std::vector<int64_t> top_neurons(const std::vector<double>& change, int64_t m);
// Each neuron's treatment in the write pass; counts the rescale fallbacks into result.
NeuronPlan plan_neurons(const Pair& p, const MergeConfig& cfg, const std::vector<int64_t>& restored,
                        const std::vector<double>& change, const std::vector<double>& kept,
                        MergeResult& result);

}  // namespace fk
