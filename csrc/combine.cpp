// The fused combine of spec.py, one pass over the inputs per job:
//   d_i = fl32(x_i) - fl32(base)   (no base: d_i = fl32(x_i))
//   wd_i = fl32(fl32(coefs[i]) * d_i) if masks[i] keeps the entry else 0
//   sum:   out = base + sum_i wd_i                              (fp32, model order)
//   elect: S = sum_i wd_i accumulated in fp64 (model order), so that the elected sign is a
//          bit-identical decision on every backend, also where S cancels exactly (with one
//          or two models the fp32 sum has the same sign, and is used instead);
//          agree_i = wd_i > 0 if S >= 0 else wd_i < 0;
//          num = sum_i agree_i * wd_i; den = sum_i agree_i * weights[i]   (fp32, model order)
//          merged = num / den if normalize and den != 0 else num; out = base + lam * merged
// Each element is independent, so the result is the same for every thread count.
#include <array>
#include <atomic>
#include <vector>

#include "items.h"
#include "kernels.h"

namespace mc {

namespace {

// How a model's terms are accumulated: SUM keeps only the fp32 sum; ELECT32 also stores the
// terms (for the agreement pass) and takes the sign from the fp32 sum, which for one or two
// models has the sign of the exact sum, hence of the fp64 sum (fp32 addition of two values is
// zero only when they cancel exactly); ELECT64 also accumulates the fp64 sum of the terms.
enum Acc : int { ACC_SUM = 0, ACC_ELECT32 = 1, ACC_ELECT64 = 2 };

// One model's contribution to a tile: wd = coef * d if kept else 0; acc += wd (FIRST: acc =
// 0 + wd).
template <int XD, int MK, bool FIRST, int ACC>
MC_INLINE uint32_t model_tile(const void* x, const float* b, uint64_t s, size_t cnt,
                              const TileMask& tm, float coef, float* wd, float* acc, double* s64) {
  uint32_t bad = 0;
  for (size_t t = 0; t < cnt; ++t) {
    const float d = ld<XD>(x, s + t) - b[t];
    const uint32_t key = f32_bits(d) & 0x7FFFFFFFu;
    bad += key >= NONFINITE_KEY;
    const float w = kept<MK>(tm, key, static_cast<uint32_t>(t)) ? coef * d : 0.0f;
    if constexpr (ACC != ACC_SUM) wd[t] = w;
    if constexpr (ACC == ACC_ELECT64) {
      s64[t] = (FIRST ? 0.0 : s64[t]) + static_cast<double>(w);
    }
    acc[t] = (FIRST ? 0.0f : acc[t]) + w;
  }
  return bad;
}

template <bool FIRST, int ACC>
MC_INLINE uint32_t model_step(const CombineJob& job, size_t i, const float* b, uint64_t s,
                              size_t cnt, uint32_t* words, float* wd, float* acc, double* s64) {
  const Mask& mask = job.masks[i];
  const TileMask tm = tile_mask(mask, s, cnt, words);
  uint32_t bad = 0;
  with_dtype(job.xs[i].dtype, [&](auto xd) MC_LAMBDA {
    constexpr int XD = decltype(xd)::value;
    if constexpr (XD != NONE) {
      with_mask_kind(mask.kind, [&](auto mk) MC_LAMBDA {
        bad = model_tile<XD, decltype(mk)::value, FIRST, ACC>(job.xs[i].ptr, b, s, cnt, tm,
                                                              job.coefs[i], wd, acc, s64);
      });
    }
  });
  return bad;
}

// Returns the tile's NaN/Inf deltas over all models.
template <int ACC>
MC_INLINE uint32_t models_tile(const CombineJob& job, const float* b, uint64_t s, size_t cnt,
                               uint32_t* words, float* wd_all, float* acc, double* s64) {
  uint32_t bad = 0;
  const size_t m = job.xs.size();
  if (m == 0) {
    for (size_t t = 0; t < cnt; ++t) {
      acc[t] = 0.0f;
      s64[t] = 0.0;
    }
  }
  for (size_t i = 0; i < m; ++i) {
    float* wd = wd_all + i * TILE;
    if (i == 0) {
      bad += model_step<true, ACC>(job, i, b, s, cnt, words, wd, acc, s64);
    } else {
      bad += model_step<false, ACC>(job, i, b, s, cnt, words, wd, acc, s64);
    }
  }
  return bad;
}

// The elect mode for M models whose masks are all KEEP_TOP or KEEP_ALL (KEEP_ALL is the
// TopSet (0, n)) and whose inputs share one dtype: every step of an element runs in registers
// in one vectorized loop, with the same operations in the same order as the general path
// below (so the same bits).
constexpr int FUSED_MAX_MODELS = 4;
std::atomic<bool> g_fused_elect{true};

// Returns the tile's NaN/Inf deltas over all models.
template <int XD, bool HAS_BASE, int M>
MC_INLINE uint32_t elect_fused_tile(const CombineJob& job, uint64_t s, size_t cnt, float* out) {
  const void* xp[M];
  TileMask tm[M];  // every mask as a KEEP_TOP tile mask
  float coef[M], weight[M];
  for (int i = 0; i < M; ++i) {
    const Mask& mk = job.masks[i];
    xp[i] = job.xs[i].ptr;
    const bool all = mk.kind == KEEP_ALL;
    tm[i] = TileMask{all ? 0u : mk.upper.threshold,
                     all ? static_cast<uint32_t>(cnt) : index_limit(mk.upper.cutoff, s, cnt), 0, 0,
                     0, nullptr};
    coef[i] = job.coefs[i];
    weight[i] = job.weights[i];
  }
  const void* bp = job.base.ptr;
  const float lam = job.lam;
  const bool normalize = job.normalize;
  uint32_t bad = 0;
  for (size_t t = 0; t < cnt; ++t) {
    const float b = HAS_BASE ? ld<XD>(bp, s + t) : 0.0f;
    float w[M];
    for (int i = 0; i < M; ++i) {
      const float d = ld<XD>(xp[i], s + t) - b;
      const uint32_t key = f32_bits(d) & 0x7FFFFFFFu;
      bad += key >= NONFINITE_KEY;
      w[i] = kept<KEEP_TOP>(tm[i], key, static_cast<uint32_t>(t)) ? coef[i] * d : 0.0f;
    }
    // the elected sign as +1 / -1: w agrees iff w * sign > 0 (exact: a sign flip)
    float sign;
    if constexpr (M <= 2) {
      float acc = 0.0f + w[0];
      for (int i = 1; i < M; ++i) acc = acc + w[i];
      sign = acc >= 0.0f ? 1.0f : -1.0f;
    } else {
      double acc = 0.0 + static_cast<double>(w[0]);
      for (int i = 1; i < M; ++i) acc = acc + static_cast<double>(w[i]);
      sign = acc >= 0.0 ? 1.0f : -1.0f;
    }
    float num = 0.0f, den = 0.0f;
    for (int i = 0; i < M; ++i) {
      const bool agree = w[i] * sign > 0.0f;
      num = num + (agree ? w[i] : 0.0f);
      den = den + (agree ? weight[i] : 0.0f);
    }
    const float merged = normalize && den != 0.0f ? num / den : num;
    out[t] = b + lam * merged;
  }
  return bad;
}

// True when the fused elect path applies to the job.
bool elect_fusable(const CombineJob& job) {
  if (!g_fused_elect.load()) return false;
  const size_t m = job.xs.size();
  if (job.mode != MODE_ELECT || m == 0 || m > FUSED_MAX_MODELS) return false;
  const int dt = job.xs[0].dtype;
  if (job.base.ptr != nullptr && job.base.dtype != dt) return false;
  for (size_t i = 0; i < m; ++i) {
    if (job.xs[i].dtype != dt) return false;
    if (job.masks[i].kind != KEEP_ALL && job.masks[i].kind != KEEP_TOP) return false;
  }
  return true;
}

template <int M>
MC_INLINE uint32_t elect_fused_dispatch(const CombineJob& job, uint64_t s, size_t cnt,
                                        float* out) {
  uint32_t bad = 0;
  with_dtype(job.xs[0].dtype, [&](auto xd) MC_LAMBDA {
    constexpr int XD = decltype(xd)::value;
    if constexpr (XD != NONE) {
      bad = job.base.ptr != nullptr ? elect_fused_tile<XD, true, M>(job, s, cnt, out)
                                    : elect_fused_tile<XD, false, M>(job, s, cnt, out);
    }
  });
  return bad;
}

// Returns (NaN/Inf outputs, NaN/Inf deltas) of [start, end).
MC_HOT std::array<uint64_t, 2> elect_fused_range(const CombineJob& job, uint64_t start,
                                                 uint64_t end) {
  alignas(64) float out[TILE];
  std::array<uint64_t, 2> bad{0, 0};
  for (uint64_t s = start; s < end; s += TILE) {
    const size_t cnt = static_cast<size_t>(end - s < TILE ? end - s : TILE);
    switch (job.xs.size()) {
      case 1: bad[1] += elect_fused_dispatch<1>(job, s, cnt, out); break;
      case 2: bad[1] += elect_fused_dispatch<2>(job, s, cnt, out); break;
      case 3: bad[1] += elect_fused_dispatch<3>(job, s, cnt, out); break;
      default: bad[1] += elect_fused_dispatch<4>(job, s, cnt, out); break;
    }
    store_f32(job.out, job.out_dtype, s, cnt, out);
    bad[0] += count_nonfinite(job.out, job.out_dtype, s, cnt);
  }
  return bad;
}

// Returns (NaN/Inf outputs, NaN/Inf deltas) of [start, end).
MC_HOT std::array<uint64_t, 2> combine_range(const CombineJob& job, uint64_t start, uint64_t end) {
  const size_t m = job.xs.size();
  std::array<uint64_t, 2> bad{0, 0};
  alignas(64) float b[TILE], acc[TILE], num[TILE], den[TILE], sgn[TILE];
  alignas(64) double s64[TILE];
  alignas(64) uint32_t words[TILE];
  const bool elect = job.mode == MODE_ELECT;
  std::vector<float> wd_store(elect ? m * TILE : 0);
  float* wd_all = wd_store.data();
  const bool has_base = job.base.ptr != nullptr;
  // b = fl32(base) per tile, or 0 without a base (then d = x - 0 = x exactly): zeroed once
  // here, not per tile (the per-tile fill was a tenth of the linear kernel's time)
  if (!has_base) {
    for (size_t t = 0; t < TILE; ++t) b[t] = 0.0f;
  }

  for (uint64_t s = start; s < end; s += TILE) {
    const size_t cnt = static_cast<size_t>(end - s < TILE ? end - s : TILE);
    if (has_base) load_f32(job.base.ptr, job.base.dtype, s, cnt, b);
    if (!elect) {
      bad[1] += models_tile<ACC_SUM>(job, b, s, cnt, words, wd_all, acc, s64);
      if (has_base) {
        for (size_t t = 0; t < cnt; ++t) acc[t] = b[t] + acc[t];
      }
      store_f32(job.out, job.out_dtype, s, cnt, acc);
      bad[0] += count_nonfinite(job.out, job.out_dtype, s, cnt);
      continue;
    }
    // elect: the sign of the fp64 sum of the fp32 terms (sgn = +1 or -1) ...
    if (m <= 2) {
      bad[1] += models_tile<ACC_ELECT32>(job, b, s, cnt, words, wd_all, acc, s64);
      for (size_t t = 0; t < cnt; ++t) sgn[t] = acc[t] >= 0.0f ? 1.0f : -1.0f;
    } else {
      bad[1] += models_tile<ACC_ELECT64>(job, b, s, cnt, words, wd_all, acc, s64);
      for (size_t t = 0; t < cnt; ++t) sgn[t] = s64[t] >= 0.0 ? 1.0f : -1.0f;
    }
    // ... then the sums over the agreeing models
    for (size_t i = 0; i < m; ++i) {
      const float* wd = wd_all + i * TILE;
      const float w = job.weights[i];
      const bool first = i == 0;
      for (size_t t = 0; t < cnt; ++t) {
        // bitwise, not short-circuit: keeps the loop branch-free (blends, no masked stores)
        const float v = wd[t];
        const bool pos = sgn[t] > 0.0f;
        const bool agree = (pos & (v > 0.0f)) | (!pos & (v < 0.0f));
        num[t] = (first ? 0.0f : num[t]) + (agree ? v : 0.0f);
        den[t] = (first ? 0.0f : den[t]) + (agree ? w : 0.0f);
      }
    }
    if (m == 0) {
      for (size_t t = 0; t < cnt; ++t) {
        num[t] = 0.0f;
        den[t] = 0.0f;
      }
    }
    const float lam = job.lam;
    if (job.normalize) {
      for (size_t t = 0; t < cnt; ++t) {
        const float merged = den[t] != 0.0f ? num[t] / den[t] : num[t];
        acc[t] = b[t] + lam * merged;
      }
    } else {
      for (size_t t = 0; t < cnt; ++t) acc[t] = b[t] + lam * num[t];
    }
    store_f32(job.out, job.out_dtype, s, cnt, acc);
    bad[0] += count_nonfinite(job.out, job.out_dtype, s, cnt);
  }
  return bad;
}

}  // namespace

std::vector<std::array<uint64_t, 2>> combine_many(const std::vector<CombineJob>& jobs) {
  std::vector<uint64_t> sizes;
  sizes.reserve(jobs.size());
  for (const auto& j : jobs) sizes.push_back(j.n);
  std::vector<Item> items = make_items(sizes, TILE, 64 * TILE, 1024 * TILE);
  std::vector<char> fusable(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) fusable[j] = elect_fusable(jobs[j]);
  std::vector<std::array<uint64_t, 2>> nonfinite(jobs.size(), {0, 0});
  parallel_for(items.size(), [&](size_t i) {
    const CombineJob& job = jobs[items[i].job];
    const std::array<uint64_t, 2> c =
        fusable[items[i].job] ? elect_fused_range(job, items[i].start, items[i].end)
                              : combine_range(job, items[i].start, items[i].end);
    __atomic_fetch_add(&nonfinite[items[i].job][0], c[0], __ATOMIC_RELAXED);
    __atomic_fetch_add(&nonfinite[items[i].job][1], c[1], __ATOMIC_RELAXED);
  });
  return nonfinite;
}

bool combine_fused_elect(bool enabled) { return g_fused_elect.exchange(enabled); }

}  // namespace mc
