// pybind11 bindings of mergecore._C. Tensors arrive as (address, dtype code) pairs
// (torch's data_ptr(), codes 0 = float32, 1 = float16, 2 = bfloat16), so nothing here
// depends on PyTorch. Argument tuples are converted while holding the GIL; the kernels run
// with the GIL released. mergecore/backends/cpu.py builds these tuples and checks tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "fileio.h"
#include "kernels.h"
#include "parallel.h"

namespace py = pybind11;
using mc::Operand;

namespace {

// (kind, a, b, c, d, bits): see parse_mask; bits is a data pointer or 0
using MaskTuple = std::tuple<int, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t>;

Operand operand(uint64_t addr, int dtype, uint64_t n, const char* what, bool optional = false) {
  if (!mc::valid_dtype(dtype)) {
    throw std::invalid_argument(std::string("mergecore._C: ") + what + ": unsupported dtype code " +
                                std::to_string(dtype) + " (0 = float32, 1 = float16, 2 = bfloat16)");
  }
  if (addr == 0 && n > 0 && !optional) {
    throw std::invalid_argument(std::string("mergecore._C: ") + what + ": null data address");
  }
  return Operand{reinterpret_cast<const void*>(static_cast<uintptr_t>(addr)), dtype};
}

uint32_t u32(uint64_t v, const char* what) {
  if (v > 0xFFFFFFFFull) {
    throw std::invalid_argument(std::string("mergecore._C: ") + what + " does not fit 32 bits");
  }
  return static_cast<uint32_t>(v);
}

mc::Mask parse_mask(const MaskTuple& t) {
  mc::Mask m;
  m.kind = std::get<0>(t);
  switch (m.kind) {
    case mc::KEEP_ALL:
      break;
    case mc::KEEP_TOP:
      m.upper = mc::TopSet{u32(std::get<1>(t), "TopSet threshold"), std::get<2>(t)};
      break;
    case mc::KEEP_BAND:
      m.upper = mc::TopSet{u32(std::get<1>(t), "TopSet threshold"), std::get<2>(t)};
      m.drop = mc::TopSet{u32(std::get<3>(t), "TopSet threshold"), std::get<4>(t)};
      break;
    case mc::KEEP_RANDOM:
      if (std::get<1>(t) > (1u << 24)) throw std::invalid_argument("mergecore._C: threshold24 > 2**24");
      m.threshold24 = static_cast<uint32_t>(std::get<1>(t));
      m.key0 = u32(std::get<2>(t), "Philox key0");
      m.key1 = u32(std::get<3>(t), "Philox key1");
      m.bits = reinterpret_cast<uint8_t*>(static_cast<uintptr_t>(std::get<5>(t)));
      break;
    default:
      throw std::invalid_argument("mergecore._C: unknown mask kind " + std::to_string(m.kind));
  }
  return m;
}

[[noreturn]] void raise_os_error(int err, const std::string& what) {
  std::string msg = what + ": " + std::strerror(err);
  PyObject* args = Py_BuildValue("(is)", err, msg.c_str());
  PyErr_SetObject(PyExc_OSError, args);
  Py_XDECREF(args);
  throw py::error_already_set();
}

// ---- primitives ------------------------------------------------------------------------------

using Lerp2Tuple = std::tuple<uint64_t, int, uint64_t, int, uint64_t, int, uint64_t, double, double>;

std::vector<uint64_t> lerp2_many(const std::vector<Lerp2Tuple>& in) {
  std::vector<mc::Lerp2Job> jobs;
  jobs.reserve(in.size());
  for (const auto& t : in) {
    uint64_t n = std::get<6>(t);
    Operand out = operand(std::get<0>(t), std::get<1>(t), n, "lerp2 out");
    jobs.push_back(mc::Lerp2Job{const_cast<void*>(out.ptr), out.dtype,
                                operand(std::get<2>(t), std::get<3>(t), n, "lerp2 a"),
                                operand(std::get<4>(t), std::get<5>(t), n, "lerp2 b"), n,
                                static_cast<float>(std::get<7>(t)),
                                static_cast<float>(std::get<8>(t))});
  }
  py::gil_scoped_release release;
  return mc::lerp2_many(jobs);
}

using PairTuple = std::tuple<uint64_t, int, uint64_t, int, uint64_t>;
using TensorTuple = std::tuple<uint64_t, int, uint64_t>;

std::vector<uint64_t> count_nonfinite_many(const std::vector<TensorTuple>& in) {
  std::vector<mc::TensorRef> tensors;
  tensors.reserve(in.size());
  for (const auto& t : in) {
    uint64_t n = std::get<2>(t);
    tensors.push_back(mc::TensorRef{operand(std::get<0>(t), std::get<1>(t), n, "count_nonfinite x"), n});
  }
  py::gil_scoped_release release;
  return mc::count_nonfinite_many(tensors);
}

std::vector<std::tuple<double, double, double>> slerp_reduce_many(const std::vector<PairTuple>& in) {
  std::vector<mc::SlerpPair> pairs;
  pairs.reserve(in.size());
  for (const auto& t : in) {
    uint64_t n = std::get<4>(t);
    pairs.push_back(mc::SlerpPair{operand(std::get<0>(t), std::get<1>(t), n, "slerp a"),
                                  operand(std::get<2>(t), std::get<3>(t), n, "slerp b"), n});
  }
  std::vector<std::array<double, 3>> sums;
  {
    py::gil_scoped_release release;
    sums = mc::slerp_reduce_many(pairs);
  }
  std::vector<std::tuple<double, double, double>> out;
  out.reserve(sums.size());
  for (const auto& s : sums) out.emplace_back(s[0], s[1], s[2]);
  return out;
}

using L1Tuple = std::tuple<uint64_t, int, uint64_t, int, uint64_t, MaskTuple>;

std::vector<std::tuple<double, double>> masked_l1_many(const std::vector<L1Tuple>& in) {
  std::vector<mc::L1Job> jobs;
  jobs.reserve(in.size());
  for (const auto& t : in) {
    uint64_t n = std::get<4>(t);
    jobs.push_back(mc::L1Job{operand(std::get<0>(t), std::get<1>(t), n, "masked_l1 base", true),
                             operand(std::get<2>(t), std::get<3>(t), n, "masked_l1 x"), n,
                             parse_mask(std::get<5>(t))});
  }
  std::vector<std::array<double, 2>> sums;
  {
    py::gil_scoped_release release;
    sums = mc::masked_l1_many(jobs);
  }
  std::vector<std::tuple<double, double>> out;
  out.reserve(sums.size());
  for (const auto& s : sums) out.emplace_back(s[0], s[1]);
  return out;
}

using SelectTuple = std::tuple<uint64_t, int, uint64_t, int, uint64_t, std::vector<uint64_t>>;

std::vector<std::vector<std::tuple<uint64_t, uint64_t>>> select_top_many(
    const std::vector<SelectTuple>& in) {
  std::vector<mc::SelectJob> jobs;
  jobs.reserve(in.size());
  for (const auto& t : in) {
    uint64_t n = std::get<4>(t);
    mc::SelectJob job{operand(std::get<0>(t), std::get<1>(t), n, "select_top base", true),
                      operand(std::get<2>(t), std::get<3>(t), n, "select_top x"), n,
                      std::get<5>(t)};
    for (uint64_t k : job.ks) {
      if (k > n) {
        throw std::invalid_argument("mergecore._C: select_top k = " + std::to_string(k) +
                                    " exceeds the tensor's " + std::to_string(n) + " elements");
      }
    }
    jobs.push_back(std::move(job));
  }
  std::vector<std::vector<mc::TopSet>> sets;
  {
    py::gil_scoped_release release;
    sets = mc::select_top_many(jobs);
  }
  std::vector<std::vector<std::tuple<uint64_t, uint64_t>>> out(sets.size());
  for (size_t j = 0; j < sets.size(); ++j) {
    for (const auto& s : sets[j]) out[j].emplace_back(s.threshold, s.cutoff);
  }
  return out;
}

using CombineTuple =
    std::tuple<uint64_t, int, uint64_t, int, uint64_t, std::vector<std::tuple<uint64_t, int>>,
               std::vector<MaskTuple>, std::vector<double>, std::vector<double>, int, bool, double>;

std::vector<std::array<uint64_t, 2>> combine_many(const std::vector<CombineTuple>& in) {
  std::vector<mc::CombineJob> jobs;
  jobs.reserve(in.size());
  for (const auto& t : in) {
    mc::CombineJob job;
    job.n = std::get<4>(t);
    Operand out = operand(std::get<0>(t), std::get<1>(t), job.n, "combine out");
    job.out = const_cast<void*>(out.ptr);
    job.out_dtype = out.dtype;
    job.base = operand(std::get<2>(t), std::get<3>(t), job.n, "combine base", true);
    for (const auto& x : std::get<5>(t)) {
      job.xs.push_back(operand(std::get<0>(x), std::get<1>(x), job.n, "combine x"));
    }
    for (const auto& m : std::get<6>(t)) job.masks.push_back(parse_mask(m));
    for (double c : std::get<7>(t)) job.coefs.push_back(static_cast<float>(c));
    for (double w : std::get<8>(t)) job.weights.push_back(static_cast<float>(w));
    job.mode = std::get<9>(t);
    job.normalize = std::get<10>(t);
    job.lam = static_cast<float>(std::get<11>(t));
    size_t m = job.xs.size();
    if (job.masks.size() != m || job.coefs.size() != m || job.weights.size() != m) {
      throw std::invalid_argument("mergecore._C: combine needs one mask, coef and weight per model");
    }
    if (job.mode != mc::MODE_SUM && job.mode != mc::MODE_ELECT) {
      throw std::invalid_argument("mergecore._C: combine mode must be 0 (sum) or 1 (elect)");
    }
    jobs.push_back(std::move(job));
  }
  py::gil_scoped_release release;
  return mc::combine_many(jobs);
}

// ---- file IO ---------------------------------------------------------------------------------

uint64_t pread_into(int fd, int64_t file_offset, int64_t nbytes, uint64_t dst_addr, int nthreads) {
  if (file_offset < 0 || nbytes < 0) throw std::invalid_argument("pread_into: negative offset or size");
  if (nbytes > 0 && dst_addr == 0) throw std::invalid_argument("pread_into: null destination");
  mc::IoOutcome r;
  {
    py::gil_scoped_release release;
    r = mc::pread_into(fd, static_cast<uint64_t>(file_offset), static_cast<uint64_t>(nbytes),
                       reinterpret_cast<void*>(static_cast<uintptr_t>(dst_addr)), nthreads);
  }
  if (r.error != 0) {
    raise_os_error(r.error, "pread of " + std::to_string(nbytes) + " bytes at offset " +
                                std::to_string(file_offset) + " of fd " + std::to_string(fd) +
                                " failed after " + std::to_string(r.bytes) + " bytes");
  }
  return r.bytes;
}

uint64_t pread_direct_into(int direct_fd, int fd, int64_t file_offset, int64_t nbytes,
                           uint64_t dst_addr, int nthreads, int64_t align) {
  if (file_offset < 0 || nbytes < 0) throw std::invalid_argument("pread_direct_into: negative offset or size");
  if (nbytes > 0 && dst_addr == 0) throw std::invalid_argument("pread_direct_into: null destination");
  if (align <= 0 || (align & (align - 1)) != 0) throw std::invalid_argument("pread_direct_into: align must be a power of two");
  mc::IoOutcome r;
  {
    py::gil_scoped_release release;
    r = mc::pread_direct_into(direct_fd, fd, static_cast<uint64_t>(file_offset),
                              static_cast<uint64_t>(nbytes),
                              reinterpret_cast<void*>(static_cast<uintptr_t>(dst_addr)), nthreads,
                              static_cast<uint64_t>(align));
  }
  if (r.error != 0) {
    raise_os_error(r.error, "direct pread of " + std::to_string(nbytes) + " bytes at offset " +
                                std::to_string(file_offset) + " of fd " + std::to_string(fd) +
                                " failed after " + std::to_string(r.bytes) + " bytes");
  }
  return r.bytes;
}

std::pair<uint64_t, uint64_t> cached_pages(int fd, int64_t file_offset, int64_t nbytes) {
  if (file_offset < 0 || nbytes < 0) throw std::invalid_argument("cached_pages: negative offset or size");
  mc::CachedPages p;
  {
    py::gil_scoped_release release;
    p = mc::cached_pages(fd, static_cast<uint64_t>(file_offset), static_cast<uint64_t>(nbytes));
  }
  return {p.cached, p.total};
}

uint64_t pwrite_from(int fd, int64_t file_offset, int64_t nbytes, uint64_t src_addr) {
  if (file_offset < 0 || nbytes < 0) throw std::invalid_argument("pwrite_from: negative offset or size");
  if (nbytes > 0 && src_addr == 0) throw std::invalid_argument("pwrite_from: null source");
  mc::IoOutcome r;
  {
    py::gil_scoped_release release;
    r = mc::pwrite_from(fd, static_cast<uint64_t>(file_offset), static_cast<uint64_t>(nbytes),
                        reinterpret_cast<const void*>(static_cast<uintptr_t>(src_addr)));
  }
  if (r.error != 0) {
    raise_os_error(r.error, "pwrite of " + std::to_string(nbytes) + " bytes at offset " +
                                std::to_string(file_offset) + " of fd " + std::to_string(fd) +
                                " failed after " + std::to_string(r.bytes) + " bytes");
  }
  return r.bytes;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mergecore CPU kernels (raw buffers; see mergecore/backends/cpu.py for the API)";
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("float16") = 1,
                                   py::arg("bfloat16") = 2);
  m.attr("HAS_OPENMP") = mc::has_openmp();
  // bumped when a primitive's signature or result changes (mergecore/backends/cpu.py checks)
  m.attr("INTERFACE_VERSION") = 3;
  m.def("get_num_threads", &mc::get_num_threads, "Threads used by the kernels.");
  m.def("set_num_threads", &mc::set_num_threads, py::arg("n"),
        "Set the threads used by the kernels (values < 1 mean 1).");
  m.def("default_num_threads", &mc::default_num_threads,
        "MERGECORE_NUM_THREADS if set to a positive integer, else the usable CPU count.");
  m.def("lerp2_many", &lerp2_many, py::arg("jobs"),
        "jobs: [(out, out_dt, a, a_dt, b, b_dt, n, c0, c1)]; out = c0*a + c1*b. Returns each "
        "output's number of NaN/Inf values.");
  m.def("slerp_reduce_many", &slerp_reduce_many, py::arg("pairs"),
        "pairs: [(a, a_dt, b, b_dt, n)] -> [(sum a*a, sum b*b, sum a*b)].");
  m.def("masked_l1_many", &masked_l1_many, py::arg("jobs"),
        "jobs: [(base, base_dt, x, x_dt, n, mask)] -> [(L1(d), L1(d*keep))].");
  m.def("select_top_many", &select_top_many, py::arg("jobs"),
        "jobs: [(base, base_dt, x, x_dt, n, ks)] -> [[(threshold, cutoff) per k]].");
  m.def("count_nonfinite_many", &count_nonfinite_many, py::arg("tensors"),
        "tensors: [(x, x_dt, n)] -> [number of NaN/Inf values].");
  m.def("combine_many", &combine_many, py::arg("jobs"),
        "jobs: [(out, out_dt, base, base_dt, n, [(x, x_dt)], [mask], coefs, weights, mode, "
        "normalize, lam)]. Returns per job (NaN/Inf values of out, NaN/Inf deltas of all models).");
  m.def(
      "_select_tuning",
      [](uint64_t small_n, uint64_t grain) {
        if (small_n > (1ull << 31) || grain > (1ull << 30)) {
          throw std::invalid_argument("_select_tuning: small_n <= 2**31, grain <= 2**30");
        }
        return mc::select_tuning(small_n, grain);
      },
      py::arg("small_n"), py::arg("grain"),
      "Test hook: select_top's small-job limit and chunk size (0 = automatic); returns the "
      "previous pair. Defaults: (65536, 0).");
  m.def(
      "_select_bracket_min_n", &mc::select_bracket_min_n, py::arg("min_n"),
      "Test hook: single-k jobs of at least min_n elements try the sampled bracket before the "
      "histogram path (2**63 turns it off); returns the previous limit. Default: 0.");
  m.def("_combine_fused_elect", &mc::combine_fused_elect, py::arg("enabled"),
        "Test hook: elect combines with top/all masks take the fused path (default True); "
        "returns the previous setting.");
  m.def("_select_bracket_stats", &mc::select_bracket_stats,
        "Test hook: (jobs settled by the sampled bracket, jobs it sent to the histogram path).");
  m.def(
      "_philox_words",
      [](uint32_t key0, uint32_t key1, uint64_t start, uint64_t count, uint64_t dst_addr,
         const std::string& impl) {
        if (start % 4 != 0 || count % 4 != 0) {
          throw std::invalid_argument("_philox_words: start and count must be multiples of 4");
        }
        if (!mc::philox_words_impl(impl, key0, key1, start, count,
                                   reinterpret_cast<uint32_t*>(static_cast<uintptr_t>(dst_addr)))) {
          throw std::invalid_argument("_philox_words: this CPU cannot run implementation " + impl);
        }
      },
      py::arg("key0"), py::arg("key1"), py::arg("start"), py::arg("count"), py::arg("dst_addr"),
      py::arg("impl"),
      "Test hook: Philox4x32-10 words of elements [start, start + count) into a uint32 buffer, "
      "from the implementation named impl (one of PHILOX_IMPLS).");
  m.attr("PHILOX_IMPLS") = mc::philox_impls();
  m.attr("CPU_TARGETS") = MC_HOT_TARGETS;  // the hot loops' instruction-set clones
  m.def("pread_into", &pread_into, py::arg("fd"), py::arg("file_offset"), py::arg("nbytes"),
        py::arg("dst_addr"), py::arg("nthreads") = 1,
        "Read nbytes at file_offset of fd into dst_addr (threads split large reads); returns "
        "the bytes read (fewer only at end of file); OSError on failure.");
  m.def("cached_pages", &cached_pages, py::arg("fd"), py::arg("file_offset"), py::arg("nbytes"),
        "(pages the page cache holds, pages in all) of the byte range of fd, from mmap + "
        "mincore without reading anything; (0, 0) when the kernel will not tell.");
  m.def("pread_direct_into", &pread_direct_into, py::arg("direct_fd"), py::arg("fd"),
        py::arg("file_offset"), py::arg("nbytes"), py::arg("dst_addr"), py::arg("nthreads") = 1,
        py::arg("align") = 4096,
        "pread_into with the align-aligned interior read through direct_fd (O_DIRECT) when dst "
        "and file_offset are congruent modulo align; returns the bytes read");
  m.def("pwrite_from", &pwrite_from, py::arg("fd"), py::arg("file_offset"), py::arg("nbytes"),
        py::arg("src_addr"),
        "Write nbytes from src_addr at file_offset of fd; returns nbytes; OSError on failure.");
}
