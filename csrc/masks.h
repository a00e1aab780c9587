// Keep masks of a model's delta (see mergecore/backends/spec.py), evaluated per tile, and
// the Philox4x32-10 stream behind KeepRandom (bit-identical to mergecore/rng.py).
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace mc {

enum MaskKind : int { KEEP_ALL = 0, KEEP_TOP = 1, KEEP_BAND = 2, KEEP_RANDOM = 3 };

// TopSet(T, J) = {j : key(j) > T or (key(j) == T and j < J)}.
struct TopSet {
  uint32_t threshold = 0xFFFFFFFFu;
  uint64_t cutoff = 0;
};

struct Mask {
  int kind = KEEP_ALL;
  TopSet upper;  // KEEP_TOP: the kept set; KEEP_BAND: the upper set
  TopSet drop;   // KEEP_BAND: removed from upper
  uint32_t threshold24 = 0;  // KEEP_RANDOM: keep iff word >> 8 < threshold24
  uint32_t key0 = 0, key1 = 0;
};

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;

// Words of elements [start, start + count) of the stream, start and count multiples of 4;
// element j uses word j & 3 of block j >> 2, whose counter is (lo32(j >> 2), hi32(j >> 2), 0,
// 0). One Philox evaluation per 4 elements (csrc/philox.cpp; AVX-512 or AVX2 when the CPU has it).
void philox_words(uint32_t key0, uint32_t key1, uint64_t start, size_t count, uint32_t* out);
// Test hook: the words from the implementation called `name` ("avx512", "avx2", "generic");
// false when this CPU cannot run it.
bool philox_words_impl(const std::string& name, uint32_t key0, uint32_t key1, uint64_t start,
                       size_t count, uint32_t* out);
// The implementations this CPU can run, the one philox_words uses first.
std::vector<std::string> philox_impls();

// Number of leading elements of the tile [start, start + count) with index < cutoff.
MC_INLINE uint32_t index_limit(uint64_t cutoff, uint64_t start, size_t count) {
  if (cutoff <= start) return 0;
  uint64_t lim = cutoff - start;
  return static_cast<uint32_t>(lim > count ? count : lim);
}

// A mask specialised to one tile: index cutoffs become tile-local limits, KEEP_RANDOM's
// words are computed for the whole tile (one Philox block per 4 elements).
struct TileMask {
  uint32_t upper_t, upper_lim, drop_t, drop_lim, threshold24;
  const uint32_t* words;
};

// words: scratch of TILE entries (used by KEEP_RANDOM). start is a multiple of 4.
MC_INLINE TileMask tile_mask(const Mask& m, uint64_t start, size_t count, uint32_t* words) {
  TileMask tm{m.upper.threshold, index_limit(m.upper.cutoff, start, count), m.drop.threshold,
              index_limit(m.drop.cutoff, start, count), m.threshold24, words};
  if (m.kind == KEEP_RANDOM) philox_words(m.key0, m.key1, start, (count + 3) & ~size_t{3}, words);
  return tm;
}

// Is tile element t (selection key `key`) kept?
template <int MK>
MC_INLINE bool kept(const TileMask& tm, uint32_t key, uint32_t t) {
  if constexpr (MK == KEEP_TOP) {
    return (key > tm.upper_t) | ((key == tm.upper_t) & (t < tm.upper_lim));
  } else if constexpr (MK == KEEP_BAND) {
    bool in = (key > tm.upper_t) | ((key == tm.upper_t) & (t < tm.upper_lim));
    bool out = (key > tm.drop_t) | ((key == tm.drop_t) & (t < tm.drop_lim));
    return in & !out;
  } else if constexpr (MK == KEEP_RANDOM) {
    (void)key;
    return (tm.words[t] >> 8) < tm.threshold24;
  } else {
    (void)tm;
    (void)key;
    (void)t;
    return true;
  }
}

template <int V>
using MK_ = std::integral_constant<int, V>;

// Calls f(MK_<kind>{}) for a mask kind.
template <class F>
MC_INLINE void with_mask_kind(int kind, F&& f) {
  switch (kind) {
    case KEEP_TOP:
      f(MK_<KEEP_TOP>{});
      break;
    case KEEP_BAND:
      f(MK_<KEEP_BAND>{});
      break;
    case KEEP_RANDOM:
      f(MK_<KEEP_RANDOM>{});
      break;
    default:
      f(MK_<KEEP_ALL>{});
  }
}

}  // namespace mc
