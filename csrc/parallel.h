// Thread-count setting and the one parallel-for every kernel uses.
#pragma once

#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace mc {

// Threads used by every kernel (>= 1). Set from Python; default: MERGECORE_NUM_THREADS or the
// number of CPUs this process may run on.
int get_num_threads();
void set_num_threads(int n);
int default_num_threads();
bool has_openmp();

// Runs fn(item) for item in [0, nitems) on up to get_num_threads() threads, dynamically
// scheduled (items differ in size: many small jobs and chunks of large ones). The first
// exception thrown by fn is rethrown after all threads finish.
template <class Fn>
void parallel_for(size_t nitems, Fn&& fn) {
  if (nitems == 0) return;
  int nt = get_num_threads();
  if (nt <= 1 || nitems == 1) {
    for (size_t i = 0; i < nitems; ++i) fn(i);
    return;
  }
  if (static_cast<size_t>(nt) > nitems) nt = static_cast<int>(nitems);
  std::exception_ptr error;
  std::mutex error_mutex;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t i = 0; i < static_cast<int64_t>(nitems); ++i) {
    try {
      fn(static_cast<size_t>(i));
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  }
#else
  for (size_t i = 0; i < nitems; ++i) {
    try {
      fn(i);
    } catch (...) {
      if (!error) error = std::current_exception();
    }
  }
#endif
  if (error) std::rethrow_exception(error);
}

// Index of the calling thread inside parallel_for (0 outside).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Split n elements into chunks of `grain` elements (the last may be shorter); chunk count.
inline size_t chunk_count(uint64_t n, uint64_t grain) { return n == 0 ? 0 : (n + grain - 1) / grain; }

// A chunk size for a job of n elements: a multiple of `align`, between lo and hi, aiming at
// about 4 chunks per thread for large jobs so dynamic scheduling can balance the load.
inline uint64_t pick_grain(uint64_t n, uint64_t align, uint64_t lo, uint64_t hi) {
  uint64_t target = n / (static_cast<uint64_t>(get_num_threads()) * 4 + 1);
  if (target < lo) target = lo;
  if (target > hi) target = hi;
  return (target + align - 1) / align * align;
}

}  // namespace mc
