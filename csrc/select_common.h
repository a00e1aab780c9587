// Pieces shared by the two exact top-k paths (select.cpp: histograms over all keys;
// select_bracket.cpp: a sampled bracket around the threshold).
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace mc {

MC_INLINE void keys_tile(const SelectJob& job, uint64_t start, size_t count, uint32_t* key) {
  load_keys(job.x, job.base, start, count, key);
}

// Rank `need` (1-based; key descending, position ascending) among the m keys `keys`, by a
// radix select over 8-bit digits with stable compaction. `top_shift` is the shift of the
// highest digit in which the keys may differ (24 in general; lower when every key shares
// its high bits). Returns the threshold T and the cutoff position: m when every key equal
// to T is kept, else 1 + the position of the last kept one.
inline TopSet select_in_keys(const uint32_t* keys, size_t m, uint64_t need,
                             std::vector<uint32_t>& kbuf, std::vector<uint32_t>& ibuf,
                             int top_shift = 24) {
  kbuf.resize(m);
  ibuf.resize(m);
  const uint32_t* ck = keys;
  size_t len = m;
  bool first = true;
  for (int shift = top_shift; shift >= 0; shift -= 8) {
    uint64_t cnt[256] = {};
    for (size_t t = 0; t < len; ++t) cnt[(ck[t] >> shift) & 0xFFu]++;
    int digit = 255;
    for (; digit > 0; --digit) {
      if (cnt[digit] >= need) break;
      need -= cnt[digit];
    }
    size_t out = 0;
    for (size_t t = 0; t < len; ++t) {
      if (((ck[t] >> shift) & 0xFFu) == static_cast<uint32_t>(digit)) {
        kbuf[out] = ck[t];
        ibuf[out] = first ? static_cast<uint32_t>(t) : ibuf[t];
        ++out;
      }
    }
    len = out;
    ck = kbuf.data();
    first = false;
  }
  // kbuf[0 .. len) all equal the threshold, in position order; the first `need` are kept.
  uint64_t cutoff = need >= len ? m : static_cast<uint64_t>(ibuf[need - 1]) + 1;
  return TopSet{kbuf[0], cutoff};
}

// The flat index of the need-th (1-based) entry of [start, end) whose key equals value
// (end when there are fewer).
inline uint64_t find_nth_equal(const SelectJob& job, uint64_t start, uint64_t end,
                               uint32_t value, uint64_t need) {
  alignas(64) uint32_t key[TILE];
  for (uint64_t s = start; s < end; s += TILE) {
    size_t cnt = static_cast<size_t>(std::min<uint64_t>(TILE, end - s));
    keys_tile(job, s, cnt, key);
    uint32_t c = 0;
    for (size_t t = 0; t < cnt; ++t) c += key[t] == value;
    if (c < need) {
      need -= c;
      continue;
    }
    for (size_t t = 0; t < cnt; ++t) {
      if (key[t] == value && --need == 0) return s + t;
    }
  }
  return end;
}

// Chunk size of a large job of n elements (the tuning hook's, or automatic).
uint64_t select_grain(uint64_t n);

// Exact top-k for the single-k large jobs `which` of `jobs` by a sampled bracket; writes
// out[j][0] and returns true per job it could settle (the rest need the histogram path).
std::vector<char> select_bracketed(const std::vector<SelectJob>& jobs,
                                   const std::vector<uint32_t>& which,
                                   std::vector<std::vector<TopSet>>& out);

}  // namespace mc
