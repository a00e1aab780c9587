// Keep masks of a model's delta (see mergecore/backends/spec.py), evaluated per tile, and
// the Philox4x32-10 stream behind KeepRandom (bit-identical to mergecore/rng.py).
#pragma once

#include <cstdint>
#include <cstring>
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
  // KEEP_RANDOM, optional: ceil(n / 8) bytes caching the keep decisions (element j: bit j & 7
  // of byte j >> 3). The L1 pass of DARE's rescale writes them while it evaluates the stream
  // (BITS_WRITE); the combine that follows reads them (BITS_READ) instead of evaluating the
  // Philox stream a second time, which is most of DARE's kernel time.
  uint8_t* bits = nullptr;
};

enum BitsUse : int { BITS_READ = 0, BITS_WRITE = 1 };

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

// words: scratch of TILE entries (used by KEEP_RANDOM). start is a multiple of 4, and of 8
// when m.bits is written. KEEP_RANDOM with m.bits: BITS_READ turns the cached bits into words
// that the same test keeps (word 0 < threshold 1, word 0xFFFFFFFF not) with no Philox call;
// BITS_WRITE evaluates the stream and stores the tile's bits.
MC_INLINE TileMask tile_mask(const Mask& m, uint64_t start, size_t count, uint32_t* words,
                             BitsUse use = BITS_READ) {
  TileMask tm{m.upper.threshold, index_limit(m.upper.cutoff, start, count), m.drop.threshold,
              index_limit(m.drop.cutoff, start, count), m.threshold24, words};
  if (m.kind != KEEP_RANDOM) return tm;
  // bits move 32 at a time (a uint32 of bits, shifted per lane: vectorizable); start is a
  // multiple of 8, so each group begins on a byte; the tensor's last partial group goes
  // byte by byte, so no byte past ceil(n / 8) is touched
  const size_t whole = count & ~size_t{31};
  if (m.bits != nullptr && use == BITS_READ) {  // bit 1 -> word 0, bit 0 -> word 0xFFFFFFFF
    const uint8_t* src = m.bits + (start >> 3);
    for (size_t q = 0; q < whole; q += 32) {
      uint32_t v;
      std::memcpy(&v, src + (q >> 3), 4);
      for (uint32_t k = 0; k < 32; ++k) words[q + k] = ((v >> k) & 1u) - 1u;
    }
    for (size_t t = whole; t < count; ++t) words[t] = ((src[t >> 3] >> (t & 7)) & 1u) - 1u;
    tm.threshold24 = 1;
    return tm;
  }
  philox_words(m.key0, m.key1, start, (count + 3) & ~size_t{3}, words);
  if (m.bits != nullptr) {  // BITS_WRITE
    uint8_t* dst = m.bits + (start >> 3);
    const uint32_t thr = m.threshold24;
    for (size_t q = 0; q < whole; q += 32) {
      uint32_t v = 0;
      for (uint32_t k = 0; k < 32; ++k) v |= static_cast<uint32_t>((words[q + k] >> 8) < thr) << k;
      std::memcpy(dst + (q >> 3), &v, 4);
    }
    for (size_t q = whole; q < count; q += 8) {
      uint32_t byte = 0;
      for (size_t k = 0; k < 8 && q + k < count; ++k) {
        byte |= static_cast<uint32_t>((words[q + k] >> 8) < thr) << k;
      }
      dst[q >> 3] = static_cast<uint8_t>(byte);
    }
  }
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
