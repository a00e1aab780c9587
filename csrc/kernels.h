// The C++ entry points behind mergecore._C (one per batched primitive of
// mergecore/backends/spec.py). Every function runs all of its jobs in parallel regions over
// (job, chunk) work items; none of them touches Python objects, so callers release the GIL.
#pragma once

#include <array>
#include <cstdint>
#include <utility>
#include <vector>

#include "common.h"
#include "masks.h"

namespace mc {

struct Lerp2Job {
  void* out;
  int out_dtype;
  Operand a, b;
  uint64_t n;
  float c0, c1;
};

struct SlerpPair {
  Operand a, b;
  uint64_t n;
};

struct L1Job {
  Operand base, x;  // base.ptr may be null
  uint64_t n;
  Mask mask;
};

struct TensorRef {
  Operand x;
  uint64_t n;
};

struct SelectJob {
  Operand base, x;  // base.ptr may be null: keys of |x|
  uint64_t n;
  std::vector<uint64_t> ks;
};

enum CombineMode : int { MODE_SUM = 0, MODE_ELECT = 1 };

struct CombineJob {
  void* out;
  int out_dtype;
  Operand base;  // ptr may be null
  std::vector<Operand> xs;
  std::vector<Mask> masks;
  std::vector<float> coefs, weights;
  uint64_t n;
  int mode;
  bool normalize;
  float lam;
};

// Every kernel that writes a result computes in fp32 (coefficients rounded to fp32) and rounds
// once to the output dtype (round-to-nearest-even); no FMA contraction (-ffp-contract=off), so
// every instruction-set clone gives the same bits.

// out = c0*a + c1*b; returns each output's number of NaN/Inf values
std::vector<uint64_t> lerp2_many(const std::vector<Lerp2Job>& jobs);
// (sum a*a, sum b*b, sum a*b) per pair
std::vector<std::array<double, 3>> slerp_reduce_many(const std::vector<SlerpPair>& pairs);
// (L1(d), L1(d * keep)) per job
std::vector<std::array<double, 2>> masked_l1_many(const std::vector<L1Job>& jobs);
// exact top-k sets, one per k of each job
std::vector<std::vector<TopSet>> select_top_many(const std::vector<SelectJob>& jobs);
// Test hook: jobs of at most small_n elements take the single-item path; grain (0 = automatic)
// fixes the chunk size of large jobs. Returns the previous (small_n, grain).
std::pair<uint64_t, uint64_t> select_tuning(uint64_t small_n, uint64_t grain);
// Test hook: single-k jobs of at least min_n elements (and above small_n) try the sampled
// bracket first (0: every such job; 2**63: none). Returns the previous limit.
uint64_t select_bracket_min_n(uint64_t min_n);
// Test hook: (jobs the bracket settled, jobs it missed and sent to the histogram path) so far.
std::pair<uint64_t, uint64_t> select_bracket_stats();
// the fused sum / elect combine; returns per job (NaN/Inf values of the output, NaN/Inf
// deltas d_i over all models). Every NaN/Inf input gives a NaN/Inf delta, so a zero second
// count proves the inputs finite.
constexpr uint32_t NONFINITE_KEY = 0x7F800000u;  // smallest key of a NaN/Inf value
std::vector<std::array<uint64_t, 2>> combine_many(const std::vector<CombineJob>& jobs);
// Test hook: whether elect jobs with top/all masks take the fused one-loop path (the general
// path gives the same bits). Returns the previous setting.
bool combine_fused_elect(bool enabled);
// number of NaN/Inf values (all-ones exponent field) per tensor
std::vector<uint64_t> count_nonfinite_many(const std::vector<TensorRef>& tensors);

}  // namespace mc
