// lerp2 (out = c0*a + c1*b) and the two whole-tensor reductions: slerp's (a.a, b.b, a.b) and
// DARE's masked L1 sums. Reductions sum fp32 over fixed RBLOCK-element blocks (16 lanes, in
// a fixed order) and add the block partials in fp64 in block order, so the result does not
// depend on the thread count or on how jobs are chunked.
#include <cmath>

#include "items.h"
#include "kernels.h"

namespace mc {

namespace {

constexpr size_t LANES = 32;

MC_HOT uint64_t lerp2_range(const Lerp2Job& job, uint64_t start, uint64_t end) {
  alignas(64) float a[TILE], b[TILE];
  uint64_t nonfinite = 0;
  const float c0 = job.c0, c1 = job.c1;
  for (uint64_t s = start; s < end; s += TILE) {
    size_t cnt = static_cast<size_t>(end - s < TILE ? end - s : TILE);
    load_f32(job.a.ptr, job.a.dtype, s, cnt, a);
    load_f32(job.b.ptr, job.b.dtype, s, cnt, b);
    for (size_t t = 0; t < cnt; ++t) a[t] = c0 * a[t] + c1 * b[t];
    store_f32(job.out, job.out_dtype, s, cnt, a);
    nonfinite += count_nonfinite(job.out, job.out_dtype, s, cnt);
  }
  return nonfinite;
}

// Zero-pad a tile buffer from cnt up to the next multiple of LANES.
MC_INLINE size_t pad_lanes(float* v, size_t cnt) {
  size_t padded = (cnt + LANES - 1) / LANES * LANES;
  for (size_t t = cnt; t < padded; ++t) v[t] = 0.0f;
  return padded;
}

MC_INLINE double lanes_sum(const float* acc) {
  double s = 0.0;
  for (size_t l = 0; l < LANES; ++l) s += static_cast<double>(acc[l]);
  return s;
}

// One block [start, end) of a slerp pair: fp32 lane sums of a*a, b*b, a*b (element t of the
// block goes to lane t % LANES; the tail is summed as if zero-padded).
template <int AD, int BD>
MC_INLINE void slerp_lanes(const void* pa, const void* pb, uint64_t start, uint64_t end,
                           float* aa, float* bb, float* ab) {
  uint64_t s = start;
  for (; s + LANES <= end; s += LANES) {
    for (size_t l = 0; l < LANES; ++l) {
      const float x = ld<AD>(pa, s + l), y = ld<BD>(pb, s + l);
      aa[l] += x * x;
      bb[l] += y * y;
      ab[l] += x * y;
    }
  }
  for (size_t l = 0; s + l < end; ++l) {
    const float x = ld<AD>(pa, s + l), y = ld<BD>(pb, s + l);
    aa[l] += x * x;
    bb[l] += y * y;
    ab[l] += x * y;
  }
}

MC_HOT void slerp_block(const SlerpPair& p, uint64_t start, uint64_t end, double* out3) {
  alignas(64) float aa[LANES] = {}, bb[LANES] = {}, ab[LANES] = {};
  with_dtype(p.a.dtype, [&](auto ad) MC_LAMBDA {
    with_dtype(p.b.dtype, [&](auto bd) MC_LAMBDA {
      constexpr int AD = decltype(ad)::value, BD = decltype(bd)::value;
      if constexpr (AD != NONE && BD != NONE) {
        slerp_lanes<AD, BD>(p.a.ptr, p.b.ptr, start, end, aa, bb, ab);
      }
    });
  });
  out3[0] = lanes_sum(aa);
  out3[1] = lanes_sum(bb);
  out3[2] = lanes_sum(ab);
}

// One block of an L1 job: fp32 lane sums of |d| and |d| * keep.
MC_HOT void l1_block(const L1Job& job, uint64_t start, uint64_t end, double* out2) {
  alignas(64) float v[TILE], vk[TILE];
  alignas(64) uint32_t words[TILE];
  alignas(64) float all[LANES] = {}, kept_sum[LANES] = {};
  for (uint64_t s = start; s < end; s += TILE) {
    size_t cnt = static_cast<size_t>(end - s < TILE ? end - s : TILE);
    const TileMask tm = tile_mask(job.mask, s, cnt, words, BITS_WRITE);
    with_dtype(code_of(job.x), [&](auto xd) MC_LAMBDA {
      with_dtype(code_of(job.base), [&](auto bd) MC_LAMBDA {
        with_mask_kind(job.mask.kind, [&](auto mk) MC_LAMBDA {
          constexpr int XD = decltype(xd)::value, BD = decltype(bd)::value;
          constexpr int MK = decltype(mk)::value;
          if constexpr (XD != NONE) {  // x is never absent
            for (size_t t = 0; t < cnt; ++t) {
              const float d = ld<XD>(job.x.ptr, s + t) - ld<BD>(job.base.ptr, s + t);
              const uint32_t key = f32_bits(d) & 0x7FFFFFFFu;
              v[t] = bits_f32(key);  // |d|
              vk[t] = kept<MK>(tm, key, static_cast<uint32_t>(t)) ? v[t] : 0.0f;
            }
          }
        });
      });
    });
    size_t padded = pad_lanes(v, cnt);
    pad_lanes(vk, cnt);
    for (size_t t = 0; t < padded; t += LANES) {
      for (size_t l = 0; l < LANES; ++l) {
        all[l] += v[t + l];
        kept_sum[l] += vk[t + l];
      }
    }
  }
  out2[0] = lanes_sum(all);
  out2[1] = lanes_sum(kept_sum);
}

// Per-job offsets into a flat array of block partials; returns the total block count.
template <class Job>
uint64_t block_offsets(const std::vector<Job>& jobs, std::vector<uint64_t>& offsets) {
  offsets.resize(jobs.size() + 1);
  offsets[0] = 0;
  for (size_t j = 0; j < jobs.size(); ++j) {
    offsets[j + 1] = offsets[j] + chunk_count(jobs[j].n, RBLOCK);
  }
  return offsets.back();
}

template <class Job>
std::vector<uint64_t> sizes_of(const std::vector<Job>& jobs) {
  std::vector<uint64_t> sizes;
  sizes.reserve(jobs.size());
  for (const auto& j : jobs) sizes.push_back(j.n);
  return sizes;
}

// Runs block_fn(job, block_start, block_end, partial*) over every block of every job and
// returns per job the fp64 sums (in block order) of the K partials.
template <size_t K, class Job, class BlockFn>
std::vector<std::array<double, K>> blocked_reduce(const std::vector<Job>& jobs,
                                                  BlockFn block_fn) {
  std::vector<uint64_t> offsets;
  uint64_t nblocks = block_offsets(jobs, offsets);
  std::vector<double> partial(nblocks * K);
  std::vector<Item> items = make_items(sizes_of(jobs), RBLOCK, 16 * RBLOCK, 256 * RBLOCK);
  parallel_for(items.size(), [&](size_t i) {
    const Item& it = items[i];
    const Job& job = jobs[it.job];
    for (uint64_t s = it.start; s < it.end; s += RBLOCK) {
      uint64_t e = s + RBLOCK < it.end ? s + RBLOCK : it.end;
      block_fn(job, s, e, &partial[(offsets[it.job] + s / RBLOCK) * K]);
    }
  });
  std::vector<std::array<double, K>> result(jobs.size());
  for (size_t j = 0; j < jobs.size(); ++j) {
    std::array<double, K> acc{};
    for (uint64_t b = offsets[j]; b < offsets[j + 1]; ++b) {
      for (size_t k = 0; k < K; ++k) acc[k] += partial[b * K + k];
    }
    result[j] = acc;
  }
  return result;
}

// NaN/Inf values of x in [start, end) (one clone per instruction set).
MC_HOT uint64_t nonfinite_range(const Operand& x, uint64_t start, uint64_t end) {
  return count_nonfinite(x.ptr, x.dtype, start, end - start);
}

}  // namespace

std::vector<uint64_t> lerp2_many(const std::vector<Lerp2Job>& jobs) {
  std::vector<Item> items = make_items(sizes_of(jobs), TILE, 64 * TILE, 2048 * TILE);
  std::vector<uint64_t> nonfinite(jobs.size(), 0);
  parallel_for(items.size(), [&](size_t i) {
    const uint64_t c = lerp2_range(jobs[items[i].job], items[i].start, items[i].end);
    __atomic_fetch_add(&nonfinite[items[i].job], c, __ATOMIC_RELAXED);
  });
  return nonfinite;
}

std::vector<std::array<double, 3>> slerp_reduce_many(const std::vector<SlerpPair>& pairs) {
  return blocked_reduce<3>(pairs, [](const SlerpPair& p, uint64_t s, uint64_t e, double* out) {
    slerp_block(p, s, e, out);
  });
}

std::vector<std::array<double, 2>> masked_l1_many(const std::vector<L1Job>& jobs) {
  return blocked_reduce<2>(jobs, [](const L1Job& job, uint64_t s, uint64_t e, double* out) {
    l1_block(job, s, e, out);
  });
}

std::vector<uint64_t> count_nonfinite_many(const std::vector<TensorRef>& tensors) {
  std::vector<uint64_t> sizes;
  for (const auto& t : tensors) sizes.push_back(t.n);
  std::vector<Item> items = make_items(sizes, TILE, 256 * TILE, 4096 * TILE);
  std::vector<uint64_t> counts(tensors.size(), 0);
  parallel_for(items.size(), [&](size_t i) {
    const Item& it = items[i];
    const Operand& x = tensors[it.job].x;
    uint64_t c = nonfinite_range(x, it.start, it.end);
    __atomic_fetch_add(&counts[it.job], c, __ATOMIC_RELAXED);
  });
  return counts;
}

}  // namespace mc
