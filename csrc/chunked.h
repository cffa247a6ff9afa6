// The merge of merge_kernel.h for a tensor streamed through in chunks of whole rows, so that a
// tensor larger than the memory budget never has to be held at once. The caller drives it:
//
//   while ((pass = merge.next()) != ChunkPass::done)
//     for each chunk of rows, in order: merge.feed(chunk's base, tuned, out (write pass only))
//
// Passes, each over the whole tensor:
//   first      Δ's finiteness, C(j), Σ|Δ|, random's and della's kept sums, and the sample of
//              order keys that brackets the window (the sample merge() draws) and, when
//              sampling is off or select=approx, the radix select's top-bits histogram
//   bracket    magnitude/breadcrumbs: the count above each bracket and the keys inside it
//   histogram  \ the radix select, when a bracket missed (or keys tie, past 2^32 entries):
//   radix      / a top-bits histogram, then one pass per level (select.h)
//   kept       C'(j), restore=rescale only
//   write      out = cast(f32(base) + Δ') of the chunk
//
// Every decision is merge()'s, from the same numbers, so the bytes written are merge()'s: the
// window's cuts are exact (or the same bin edges in approx mode), della's rows are whole in
// every chunk, and the sums are float64 sums of the same terms.
#pragma once

#include <memory>

#include "merge_kernel.h"

namespace fk {

enum class ChunkPass { first, bracket, histogram, radix, kept, write, done };

struct ChunkedState;

class ChunkedMerge {
 public:
  // The tensor: rows x cols entries of dtype (leading dimensions flattened; a 1-D tensor is one
  // row). cfg as for merge().
  ChunkedMerge(DType dtype, int64_t rows, int64_t cols, const MergeConfig& cfg);
  ~ChunkedMerge();
  // Ends the pass under way (if any) and names the next one; done when the tensor is merged or
  // Δ was found not finite (result().nonfinite > 0).
  ChunkPass next();
  // One chunk of the current pass: entries [lo, hi) (whole rows, fed in order, together covering
  // the tensor once per pass). out (hi − lo entries) is written in the write pass only.
  void feed(const void* base, const void* tuned, void* out, int64_t lo, int64_t hi);
  const MergeResult& result() const;

 private:
  std::unique_ptr<ChunkedState> state_;
};

}  // namespace fk
