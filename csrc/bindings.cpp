// pybind11 boundary of the fused merge and of its first pass alone (locate's change scores): raw
// numpy buffers in, a dict out. No torch here, so the extension does not depend on torch's C++
// ABI. Everything is validated before the GIL is released; the kernel never calls back into
// Python.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>

#include "chunked.h"
#include "merge_kernel.h"
#include "multi.h"
#include "passes.h"
#include "scores.h"

namespace py = pybind11;

namespace {

[[noreturn]] void fail(const std::string& what) {
  throw py::value_error("fusion_kernels._cpp: " + what);
}

#define FK_CHECK(cond, what) \
  do {                       \
    if (!(cond)) fail(what); \
  } while (0)

template <class E>
E choose(const std::string& field, const std::string& value,
         std::initializer_list<std::pair<const char*, E>> options) {
  std::string names;
  for (const auto& opt : options) {
    if (value == opt.first) return opt.second;
    names += names.empty() ? opt.first : std::string(", ") + opt.first;
  }
  fail(field + " must be one of " + names + "; got '" + value + "'");
}

fk::DType parse_dtype(const std::string& name) {
  return choose<fk::DType>("dtype", name,
                           {{"float32", fk::DType::f32},
                            {"float16", fk::DType::f16},
                            {"bfloat16", fk::DType::bf16}});
}

// The array must be C-contiguous with n entries of the dtype's width (16-bit types arrive as
// int16/uint16 views of their bits).
void check_buffer(const py::array& a, const char* what, int64_t n, fk::DType dt, bool writable) {
  const int64_t width = dt == fk::DType::f32 ? 4 : 2;
  FK_CHECK(a.itemsize() == width, std::string(what) + " has " + std::to_string(a.itemsize()) +
                                      "-byte items; the dtype needs " + std::to_string(width));
  FK_CHECK(dt != fk::DType::f32 || a.dtype().kind() == 'f',
           std::string(what) + " must be a float32 array for dtype float32");
  FK_CHECK(a.flags() & py::array::c_style, std::string(what) + " must be C-contiguous");
  FK_CHECK(int64_t(a.size()) == n, std::string(what) + " has " + std::to_string(a.size()) +
                                       " entries; rows x cols is " + std::to_string(n));
  FK_CHECK(!writable || a.writeable(), std::string(what) + " must be writable");
}

fk::Axis parse_axis(const std::string& name) {
  return choose<fk::Axis>(
      "axis", name, {{"none", fk::Axis::none}, {"row", fk::Axis::row}, {"col", fk::Axis::col}});
}

// base and tuned checked as rows x cols entries of dtype.
fk::Pair checked_pair(const py::array& base, const py::array& tuned, const std::string& dtype,
                      int64_t rows, int64_t cols) {
  FK_CHECK(rows >= 0 && cols >= 0, "rows and cols must be non-negative");
  const int64_t n = rows * cols;
  const fk::DType dt = parse_dtype(dtype);
  check_buffer(base, "base", n, dt, false);
  check_buffer(tuned, "tuned", n, dt, false);
  return fk::Pair{base.data(), tuned.data(), dt, n, rows, cols};
}

// The kernel's configuration from the keyword arguments merge() and ChunkedMerge share.
fk::MergeConfig make_config(int64_t rows, int64_t cols, const std::string& axis,
                            const std::string& suppress, const std::string& rescale,
                            const std::string& restore, int64_t window_start, int64_t window_len,
                            uint64_t drop_threshold, float random_inverse, double density,
                            double epsilon, float weight, int64_t restored_neurons,
                            uint32_t tensor_seed, bool approx, int64_t approx_tolerance,
                            double l1_eps, int threads, int64_t sample_size,
                            uint64_t collect_cap) {
  FK_CHECK(rows >= 0 && cols >= 0, "rows and cols must be non-negative");
  const int64_t n = rows * cols;
  fk::MergeConfig cfg;
  cfg.axis = parse_axis(axis);
  cfg.suppress = choose<fk::Suppress>(
      "suppress", suppress,
      {{"none", fk::Suppress::none}, {"magnitude", fk::Suppress::magnitude},
       {"breadcrumbs", fk::Suppress::breadcrumbs}, {"random", fk::Suppress::random},
       {"della", fk::Suppress::della}});
  cfg.rescale = choose<fk::Rescale>(
      "rescale", rescale,
      {{"none", fk::Rescale::none}, {"l1", fk::Rescale::l1}, {"inverse", fk::Rescale::inverse}});
  cfg.restore = choose<fk::Restore>(
      "restore", restore,
      {{"none", fk::Restore::none},
       {"replace", fk::Restore::replace},
       {"rescale", fk::Restore::rescale}});
  FK_CHECK(window_start >= 0 && window_len >= 0 && window_start + window_len <= n,
           "the window [start, start + len) must lie within [0, n]");
  FK_CHECK(drop_threshold <= (uint64_t(1) << 32), "drop_threshold must be at most 2^32");
  const int64_t neurons = cfg.axis == fk::Axis::row ? rows : cfg.axis == fk::Axis::col ? cols : 0;
  FK_CHECK(restored_neurons >= 0 && restored_neurons <= neurons,
           "restored_neurons must be in [0, number of neurons] (0 for axis none)");
  FK_CHECK(approx_tolerance >= 0, "approx_tolerance must be non-negative");
  cfg.window_start = window_start;
  cfg.window_len = window_len;
  cfg.drop_threshold = drop_threshold;
  cfg.random_inverse = random_inverse;
  cfg.density = density;
  cfg.epsilon = epsilon;
  cfg.weight = weight;
  cfg.restored_neurons = restored_neurons;
  cfg.tensor_seed = tensor_seed;
  cfg.approx = approx;
  cfg.approx_tolerance = approx_tolerance;
  cfg.l1_eps = l1_eps;
  cfg.threads = threads;
  cfg.sample_size = sample_size;
  cfg.collect_cap = collect_cap;
  return cfg;
}

py::dict result_dict(const fk::MergeResult& r) {
  py::dict result;
  result["nonfinite"] = r.nonfinite;
  result["kept"] = r.kept;
  result["restored"] = r.restored;
  result["fallbacks"] = r.fallbacks;
  result["l1_scale"] = double(r.l1_scale);
  return result;
}

py::dict merge(const py::array& base, const py::array& tuned, py::array out,
               const std::string& dtype, int64_t rows, int64_t cols, const std::string& axis,
               const std::string& suppress, const std::string& rescale, const std::string& restore,
               int64_t window_start, int64_t window_len, uint64_t drop_threshold,
               float random_inverse, double density, double epsilon, float weight,
               int64_t restored_neurons, uint32_t tensor_seed, bool approx,
               int64_t approx_tolerance, double l1_eps, int threads, int64_t sample_size,
               uint64_t collect_cap) {
  const fk::Pair pair = checked_pair(base, tuned, dtype, rows, cols);
  check_buffer(out, "out", pair.n, pair.dtype, true);
  const fk::MergeConfig cfg =
      make_config(rows, cols, axis, suppress, rescale, restore, window_start, window_len,
                  drop_threshold, random_inverse, density, epsilon, weight, restored_neurons,
                  tensor_seed, approx, approx_tolerance, l1_eps, threads, sample_size,
                  collect_cap);
  void* dst = out.mutable_data();
  fk::MergeResult r;
  {
    py::gil_scoped_release release;
    r = fk::merge(pair, dst, cfg);
  }
  return result_dict(r);
}

// merge()'s keywords for one model of merge_multi(), from a dict of them.
fk::MergeConfig config_of(const py::dict& d, int threads) {
  auto get = [&](const char* key) {
    FK_CHECK(d.contains(key), std::string("a model's configuration lacks '") + key + "'");
    return py::object(d[key]);
  };
  auto opt = [&](const char* key, py::object fallback) {
    return d.contains(key) ? py::object(d[key]) : fallback;
  };
  return make_config(
      get("rows").cast<int64_t>(), get("cols").cast<int64_t>(), get("axis").cast<std::string>(),
      get("suppress").cast<std::string>(), get("rescale").cast<std::string>(),
      get("restore").cast<std::string>(), get("window_start").cast<int64_t>(),
      get("window_len").cast<int64_t>(), get("drop_threshold").cast<uint64_t>(),
      get("random_inverse").cast<float>(), get("density").cast<double>(),
      get("epsilon").cast<double>(), get("weight").cast<float>(),
      get("restored_neurons").cast<int64_t>(), get("tensor_seed").cast<uint32_t>(),
      get("approx").cast<bool>(), get("approx_tolerance").cast<int64_t>(),
      get("l1_eps").cast<double>(), threads, opt("sample_size", py::int_(-1)).cast<int64_t>(),
      opt("collect_cap", py::int_(uint64_t(1) << 22)).cast<uint64_t>());
}

py::dict merge_multi(const py::array& base, const py::list& tuned, py::array out,
                     const py::list& models, const std::string& dtype, int64_t rows,
                     int64_t cols, const std::string& consensus, bool normalize, float lambda,
                     int threads) {
  FK_CHECK(tuned.size() >= 1 && tuned.size() == models.size(),
           "one configuration per tuned tensor, and at least one tuned tensor");
  std::vector<fk::Pair> pairs;
  std::vector<fk::MergeConfig> cfgs;
  for (size_t m = 0; m < tuned.size(); ++m) {
    pairs.push_back(checked_pair(base, tuned[m].cast<py::array>(), dtype, rows, cols));
    cfgs.push_back(config_of(models[m].cast<py::dict>(), threads));
    FK_CHECK(cfgs.back().axis == cfgs.front().axis, "every model must have the same axis");
  }
  check_buffer(out, "out", pairs[0].n, pairs[0].dtype, true);
  fk::CombineConfig combine;
  combine.consensus = choose<fk::Consensus>(
      "consensus", consensus,
      {{"none", fk::Consensus::none}, {"sum", fk::Consensus::sum}, {"count", fk::Consensus::count}});
  combine.normalize = normalize;
  combine.lambda = lambda;
  combine.threads = threads;
  void* dst = out.mutable_data();
  fk::MultiResult r;
  {
    py::gil_scoped_release release;
    r = fk::merge_multi(pairs, cfgs, dst, combine);
  }
  py::dict result;
  result["nonfinite"] = r.nonfinite;
  result["dropped"] = r.dropped;
  py::list per_model;
  for (const auto& model : r.models) per_model.append(result_dict(model));
  result["models"] = per_model;
  return result;
}

const char* const kPassNames[] = {"first", "bracket", "histogram", "radix",
                                  "kept",  "write",   "done"};

// fk::ChunkedMerge for Python: the tensor's shape and dtype and merge()'s keywords at
// construction, then next() and feed() chunk by chunk (see chunked.h).
class PyChunkedMerge {
 public:
  PyChunkedMerge(const std::string& dtype, int64_t rows, int64_t cols, const fk::MergeConfig& cfg)
      : dtype_(parse_dtype(dtype)), rows_(rows), cols_(cols), merge_(dtype_, rows, cols, cfg) {}

  std::string next() {
    fk::ChunkPass pass;
    {
      py::gil_scoped_release release;
      pass = merge_.next();
    }
    pass_ = pass;
    return kPassNames[int(pass)];
  }

  // base, tuned (and out in the write pass): the entries of rows [row, row + chunk rows).
  void feed(const py::array& base, const py::array& tuned, py::object out, int64_t row) {
    FK_CHECK(pass_ != fk::ChunkPass::done, "feed() after the merge is done");
    FK_CHECK(row >= 0 && cols_ > 0 && base.size() % cols_ == 0,
             "a chunk must hold whole rows of the tensor");
    const int64_t n = int64_t(base.size());
    const int64_t lo = row * cols_;
    FK_CHECK(row + n / cols_ <= rows_, "the chunk runs past the tensor's last row");
    check_buffer(base, "base", n, dtype_, false);
    check_buffer(tuned, "tuned", n, dtype_, false);
    void* dst = nullptr;
    if (pass_ == fk::ChunkPass::write) {
      FK_CHECK(!out.is_none(), "the write pass needs out");
      py::array target = out.cast<py::array>();
      check_buffer(target, "out", n, dtype_, true);
      dst = target.mutable_data();
    }
    const void* b = base.data();
    const void* t = tuned.data();
    py::gil_scoped_release release;
    merge_.feed(b, t, dst, lo, lo + n);
  }

  py::dict result() const { return result_dict(merge_.result()); }

 private:
  fk::DType dtype_;
  int64_t rows_, cols_;
  fk::ChunkedMerge merge_;
  fk::ChunkPass pass_ = fk::ChunkPass::done;
};

py::dict scores(const py::array& base, const py::array& tuned, const std::string& dtype,
                int64_t rows, int64_t cols, const std::string& axis, int threads) {
  const fk::Pair pair = checked_pair(base, tuned, dtype, rows, cols);
  const fk::Axis neurons = parse_axis(axis);
  fk::ScoresResult r;
  {
    py::gil_scoped_release release;
    r = fk::change_scores(pair, neurons, threads);
  }
  py::dict result;
  result["nonfinite"] = r.nonfinite;
  result["total"] = r.total;
  // One float64 per neuron: copying them out costs nothing next to the pass over n entries.
  result["scores"] = py::array_t<double>(py::ssize_t(r.scores.size()), r.scores.data());
  return result;
}

}  // namespace

PYBIND11_MODULE(_cpp, m) {
  m.doc() = "Fused CPU kernel of fusion_kernels' per-tensor merge (see SPEC.md).";
  m.def("merge", &merge,
        "Merge one tensor pair into out; returns nonfinite, kept, restored, fallbacks, l1_scale.",
        py::arg("base"), py::arg("tuned"), py::arg("out"), py::kw_only(), py::arg("dtype"),
        py::arg("rows"), py::arg("cols"), py::arg("axis"), py::arg("suppress"),
        py::arg("rescale"), py::arg("restore"), py::arg("window_start"), py::arg("window_len"),
        py::arg("drop_threshold"), py::arg("random_inverse"), py::arg("density"),
        py::arg("epsilon"), py::arg("weight"), py::arg("restored_neurons"),
        py::arg("tensor_seed"), py::arg("approx"), py::arg("approx_tolerance"),
        py::arg("l1_eps"), py::arg("threads") = 0, py::arg("sample_size") = int64_t(-1),
        py::arg("collect_cap") = uint64_t(1) << 22);
  py::class_<PyChunkedMerge>(m, "ChunkedMerge",
                             "merge() for a tensor streamed in chunks of whole rows: call "
                             "next() for the next pass, then feed() every chunk in order; "
                             "next() returns 'done' at the end (see csrc/chunked.h).")
      .def(py::init([](const std::string& dtype, int64_t rows, int64_t cols,
                       const std::string& axis, const std::string& suppress,
                       const std::string& rescale, const std::string& restore,
                       int64_t window_start, int64_t window_len, uint64_t drop_threshold,
                       float random_inverse, double density, double epsilon, float weight,
                       int64_t restored_neurons, uint32_t tensor_seed, bool approx,
                       int64_t approx_tolerance, double l1_eps, int threads,
                       int64_t sample_size, uint64_t collect_cap) {
             parse_dtype(dtype);
             return new PyChunkedMerge(
                 dtype, rows, cols,
                 make_config(rows, cols, axis, suppress, rescale, restore, window_start,
                             window_len, drop_threshold, random_inverse, density, epsilon,
                             weight, restored_neurons, tensor_seed, approx, approx_tolerance,
                             l1_eps, threads, sample_size, collect_cap));
           }),
           py::kw_only(), py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("axis"),
           py::arg("suppress"), py::arg("rescale"), py::arg("restore"),
           py::arg("window_start"), py::arg("window_len"), py::arg("drop_threshold"),
           py::arg("random_inverse"), py::arg("density"), py::arg("epsilon"), py::arg("weight"),
           py::arg("restored_neurons"), py::arg("tensor_seed"), py::arg("approx"),
           py::arg("approx_tolerance"), py::arg("l1_eps"), py::arg("threads") = 0,
           py::arg("sample_size") = int64_t(-1), py::arg("collect_cap") = uint64_t(1) << 22)
      .def("next", &PyChunkedMerge::next, "End the pass under way; the name of the next.")
      .def("feed", &PyChunkedMerge::feed, py::arg("base"), py::arg("tuned"), py::arg("out"),
           py::arg("row"), "Feed rows [row, row + len(base) / cols) to the current pass.")
      .def("result", &PyChunkedMerge::result,
           "nonfinite, kept, restored, fallbacks, l1_scale (once next() returned 'done').");
  m.def("scores", &scores,
        "The merge's first pass alone (locate): returns nonfinite, total (Σ|Δ|) and scores, "
        "C(j) as float64 per row (axis row), per column (col) or none (none).",
        py::arg("base"), py::arg("tuned"), py::kw_only(), py::arg("dtype"), py::arg("rows"),
        py::arg("cols"), py::arg("axis"), py::arg("threads") = 0);
  m.def("merge_multi", &merge_multi,
        "Merge base with several tuned tensors into out (SPEC 'Several tuned models'); models "
        "holds merge()'s keywords per model. Returns nonfinite, dropped and models (a dict "
        "per model as merge() returns).",
        py::arg("base"), py::arg("tuned"), py::arg("out"), py::kw_only(), py::arg("models"),
        py::arg("dtype"), py::arg("rows"), py::arg("cols"), py::arg("consensus"),
        py::arg("normalize"), py::arg("lambda_"), py::arg("threads") = 0);
  m.def("default_threads", &fk::default_threads,
        "Threads the kernel uses for large tensors by default (1 when built without OpenMP).");
  m.def("isa", &fk::pass_isa, "Instruction set the streaming passes run with here.");
  m.def("set_isa", &fk::set_pass_isa, py::arg("name"),
        "Run the passes with the named build (baseline, avx2, avx512) if this CPU supports it; "
        "returns whether it does. For tests.");
}
