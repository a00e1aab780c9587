// Philox4x32-10 words for KeepRandom (bit-identical to mergecore/rng.py): a portable version
// and, on x86-64, an AVX2 one (8 blocks per register) and an AVX-512 one (16 blocks per
// register), all 10 rounds in registers; the widest the CPU has is chosen at load time.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "masks.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MC_X86 1
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own undefined-vector idiom
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace mc {

namespace {

void words_generic(uint32_t key0, uint32_t key1, uint64_t start, size_t count, uint32_t* out) {
  for (size_t b = 0; b < count / 4; ++b) {
    const uint64_t ctr = (start >> 2) + b;
    uint32_t c0 = static_cast<uint32_t>(ctr), c1 = static_cast<uint32_t>(ctr >> 32);
    uint32_t c2 = 0, c3 = 0, k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
      }
      const uint64_t p0 = static_cast<uint64_t>(PHILOX_M0) * c0;
      const uint64_t p1 = static_cast<uint64_t>(PHILOX_M1) * c2;
      c0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
      c2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
      c1 = static_cast<uint32_t>(p1);
      c3 = static_cast<uint32_t>(p0);
    }
    out[4 * b + 0] = c0;
    out[4 * b + 1] = c1;
    out[4 * b + 2] = c2;
    out[4 * b + 3] = c3;
  }
}

#ifdef MC_X86
// hi and lo 32-bit halves of x * m for 8 lanes
__attribute__((target("avx2"))) inline void mulhilo8(__m256i x, __m256i m, __m256i& hi,
                                                     __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(x, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(x, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

__attribute__((target("avx2"))) void words_avx2(uint32_t key0, uint32_t key1, uint64_t start,
                                                size_t count, uint32_t* out) {
  const size_t nb = count / 4;
  const uint64_t first = start >> 2;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(PHILOX_M1));
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  size_t b = 0;
  for (; b + 8 <= nb; b += 8) {
    const uint64_t ctr = first + b;
    // counters ctr + 0..7: low words may wrap past 2**32 inside the group; handle per lane
    __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr))),
                                  lane);
    const __m256i wrapped = _mm256_cmpgt_epi32(  // unsigned c0 < lo32(ctr): carried into hi
        _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr))),
                         _mm256_set1_epi32(INT32_MIN)),
        _mm256_xor_si256(c0, _mm256_set1_epi32(INT32_MIN)));
    __m256i c1 = _mm256_sub_epi32(_mm256_set1_epi32(static_cast<int>(ctr >> 32)), wrapped);
    __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
      }
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(c0, m0, hi0, lo0);
      mulhilo8(c2, m1, hi1, lo1);
      c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
      c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
    }
    // transpose (c0, c1, c2, c3) x 8 blocks into 32 interleaved words
    const __m256i t0 = _mm256_unpacklo_epi32(c0, c1), t1 = _mm256_unpackhi_epi32(c0, c1);
    const __m256i t2 = _mm256_unpacklo_epi32(c2, c3), t3 = _mm256_unpackhi_epi32(c2, c3);
    const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
    const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
    __m256i* dst = reinterpret_cast<__m256i*>(out + 4 * b);
    _mm256_storeu_si256(dst + 0, _mm256_permute2x128_si256(u0, u1, 0x20));
    _mm256_storeu_si256(dst + 1, _mm256_permute2x128_si256(u2, u3, 0x20));
    _mm256_storeu_si256(dst + 2, _mm256_permute2x128_si256(u0, u1, 0x31));
    _mm256_storeu_si256(dst + 3, _mm256_permute2x128_si256(u2, u3, 0x31));
  }
  if (b < nb) words_generic(key0, key1, (first + b) << 2, (nb - b) * 4, out + 4 * b);
}

// hi and lo 32-bit halves of x * m for 16 lanes
__attribute__((target("avx512f"))) inline void mulhilo16(__m512i x, __m512i m, __m512i& hi,
                                                         __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(x, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(x, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

__attribute__((target("avx512f"))) void words_avx512(uint32_t key0, uint32_t key1,
                                                     uint64_t start, size_t count,
                                                     uint32_t* out) {
  const size_t nb = count / 4;
  const uint64_t first = start >> 2;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(PHILOX_M0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(PHILOX_M1));
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  size_t b = 0;
  for (; b + 16 <= nb; b += 16) {
    const uint64_t ctr = first + b;
    const __m512i lo32 = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(ctr)));
    __m512i c0 = _mm512_add_epi32(lo32, lane);
    // lanes whose low word wrapped past 2**32 carry one into the high word
    const __mmask16 wrapped = _mm512_cmplt_epu32_mask(c0, lo32);
    __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32(static_cast<int>(ctr >> 32)), wrapped,
                                       _mm512_set1_epi32(static_cast<int>(ctr >> 32)),
                                       _mm512_set1_epi32(1));
    __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
      if (r) {
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
      }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c0, m0, hi0, lo0);
      mulhilo16(c2, m1, hi1, lo1);
      c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
      c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), _mm512_set1_epi32(static_cast<int>(k1)));
      c1 = lo1;
      c3 = lo0;
    }
    // 128-bit lane L of u_j holds the 4 words of block 4L + j ...
    const __m512i t0 = _mm512_unpacklo_epi32(c0, c1), t1 = _mm512_unpackhi_epi32(c0, c1);
    const __m512i t2 = _mm512_unpacklo_epi32(c2, c3), t3 = _mm512_unpackhi_epi32(c2, c3);
    const __m512i u0 = _mm512_unpacklo_epi64(t0, t2), u1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i u2 = _mm512_unpacklo_epi64(t1, t3), u3 = _mm512_unpackhi_epi64(t1, t3);
    // ... so a 4 x 4 transpose of 128-bit lanes puts blocks 4L .. 4L + 3 in output vector L
    const __m512i x0 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x1 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(1, 0, 1, 0));
    const __m512i x2 = _mm512_shuffle_i32x4(u0, u1, _MM_SHUFFLE(3, 2, 3, 2));
    const __m512i x3 = _mm512_shuffle_i32x4(u2, u3, _MM_SHUFFLE(3, 2, 3, 2));
    uint32_t* dst = out + 4 * b;
    _mm512_storeu_si512(dst + 0, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(dst + 16, _mm512_shuffle_i32x4(x0, x1, _MM_SHUFFLE(3, 1, 3, 1)));
    _mm512_storeu_si512(dst + 32, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(2, 0, 2, 0)));
    _mm512_storeu_si512(dst + 48, _mm512_shuffle_i32x4(x2, x3, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  if (b < nb) words_avx2(key0, key1, (first + b) << 2, (nb - b) * 4, out + 4 * b);
}
#endif

using WordsFn = void (*)(uint32_t, uint32_t, uint64_t, size_t, uint32_t*);

struct Impl {
  const char* name;
  WordsFn fn;
};

// The implementations this CPU can run, widest first.
std::vector<Impl> runnable() {
  std::vector<Impl> impls;
#ifdef MC_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) impls.push_back({"avx512", words_avx512});
  if (__builtin_cpu_supports("avx2")) impls.push_back({"avx2", words_avx2});
#endif
  impls.push_back({"generic", words_generic});
  return impls;
}

const std::vector<Impl> g_impls = runnable();
const WordsFn g_words = g_impls.front().fn;

}  // namespace

void philox_words(uint32_t key0, uint32_t key1, uint64_t start, size_t count, uint32_t* out) {
  g_words(key0, key1, start, count, out);
}

bool philox_words_impl(const std::string& name, uint32_t key0, uint32_t key1, uint64_t start,
                       size_t count, uint32_t* out) {
  for (const Impl& impl : g_impls) {
    if (name == impl.name) {
      impl.fn(key0, key1, start, count, out);
      return true;
    }
  }
  return false;
}

std::vector<std::string> philox_impls() {
  std::vector<std::string> names;
  for (const Impl& impl : g_impls) names.emplace_back(impl.name);
  return names;
}

}  // namespace mc
