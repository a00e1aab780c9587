// Shared definitions of the mergecore CPU kernels: dtype codes, bit-exact conversions,
// tile loads/stores, the function-multiversioning macro.
//
// All arithmetic is fp32. bf16 and fp16 are widened exactly to fp32 on load and narrowed
// once on store with round-to-nearest-even; NaN stays NaN (quieted, sign kept). The
// conversions are plain integer code, so they do not depend on the FPU's rounding mode,
// on F16C, or on the compiler's handling of _Float16.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace mc {

// dtype codes shared with mergecore/backends/cpu.py
enum DType : int { F32 = 0, F16 = 1, BF16 = 2 };

inline bool valid_dtype(int code) { return code == F32 || code == F16 || code == BF16; }
inline size_t dtype_size(int code) { return code == F32 ? 4 : 2; }

// Elements processed per inner tile: small enough to stay in L1, a multiple of 4 (one Philox
// block) and of the vector width.
constexpr size_t TILE = 512;
// Reduction block: partial sums are fp32 over one block, blocks are combined in fp64.
constexpr size_t RBLOCK = 4096;

// Hot loops get one clone per instruction set (x86-64-v4 = AVX-512 F/BW/CD/DQ/VL, AVX2, the
// baseline); the loader picks the best the CPU has at run time, so the binary stays portable
// (no global -march=native). The AVX-512 clone has twice the vector registers, which the
// fused TIES loop needs: 1.1 vs 0.9 Gelem/s per thread on the 2-core Zen 4 VM.
// A build may choose its clones: MC_CPU_TARGETS, e.g. "avx2","default" (setup.py sets it from
// MERGECORE_CPU_TARGETS; scripts/test-cpu-clones.sh uses that to test the AVX2 clone on CPUs
// that would run the AVX-512 one).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(MC_NO_CLONES)
#ifndef MC_CPU_TARGETS
#define MC_CPU_TARGETS "arch=x86-64-v4", "avx2", "default"
#endif
#define MC_HOT __attribute__((target_clones(MC_CPU_TARGETS)))
#define MC_STRINGIFY_(...) #__VA_ARGS__
#define MC_STRINGIFY(...) MC_STRINGIFY_(__VA_ARGS__)
#define MC_HOT_TARGETS MC_STRINGIFY(MC_CPU_TARGETS)
#else
#define MC_HOT
#define MC_HOT_TARGETS "none"
#endif
#define MC_INLINE inline __attribute__((always_inline))
// Lambdas are separate functions: without this they would be compiled for the baseline target
// outside of the calling clone (and not vectorized for it).
#define MC_LAMBDA __attribute__((always_inline))

MC_INLINE uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

MC_INLINE float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// bf16 -> fp32: exact (bf16 is the top half of an fp32).
MC_INLINE float bf16_to_f32(uint16_t h) { return bits_f32(static_cast<uint32_t>(h) << 16); }

// fp32 -> bf16, round to nearest even; NaN -> quiet NaN with the same sign.
MC_INLINE uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? nan : rounded);
}

// fp16 -> fp32: exact for every input, including subnormals, infinities and NaN payloads.
MC_INLINE float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t man = h & 0x3FFu;
  // normal: rebias the exponent (15 -> 127)
  uint32_t normal = ((exp + 112u) << 23) | (man << 13);
  // inf / NaN: all-ones exponent, payload kept
  uint32_t special = 0x7F800000u | (man << 13);
  // subnormal: man * 2^-24, exact in fp32 (man < 2^10)
  uint32_t sub = f32_bits(static_cast<float>(man) * 5.9604644775390625e-08f);
  uint32_t mag = exp == 0 ? sub : (exp == 31 ? special : normal);
  return bits_f32(sign | mag);
}

// fp32 -> fp16, round to nearest even (overflow -> inf, underflow -> subnormal or zero);
// NaN -> quiet NaN with the same sign.
MC_INLINE uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  uint32_t e = a >> 23;
  // normal fp16 range (|f| >= 2^-14): rebias and round the 13 dropped mantissa bits; a
  // carry into the exponent is the correct result, and anything >= 65520 becomes inf.
  uint32_t rebased = a - (112u << 23);
  uint32_t nrm = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
  nrm = a >= (143u << 23) || nrm > 0x7C00u ? 0x7C00u : nrm;
  // subnormal range: value / 2^-24 = m * 2^(e - 126), shift right by s = 126 - e (>= 14)
  uint32_t m = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t s = e >= 112u ? 14u : (126u - e > 25u ? 25u : 126u - e);
  uint32_t q = m >> s;
  uint32_t rem = m & ((1u << s) - 1u);
  uint32_t half = 1u << (s - 1u);
  uint32_t sub = q + ((rem > half) | ((rem == half) & (q & 1u)));
  uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);
  uint32_t mag = a > 0x7F800000u ? nan : (e >= 113u ? nrm : sub);
  return static_cast<uint16_t>(sign | mag);
}

// Element access by dtype, resolved at compile time. NONE is an absent operand (reads 0).
constexpr int NONE = -1;

template <int DT>
MC_INLINE float ld(const void* p, size_t i) {
  if constexpr (DT == F32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (DT == BF16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else if constexpr (DT == F16) {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    (void)p;
    (void)i;
    return 0.0f;
  }
}

template <int DT>
MC_INLINE void st(void* p, size_t i, float v) {
  if constexpr (DT == F32) {
    static_cast<float*>(p)[i] = v;
  } else if constexpr (DT == BF16) {
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  } else {
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  }
}

template <int V>
using DT_ = std::integral_constant<int, V>;

// Calls f(DT_<code>{}) for a dtype code (NONE allowed when the operand is absent).
template <class F>
MC_INLINE void with_dtype(int code, F&& f) {
  switch (code) {
    case F32:
      f(DT_<F32>{});
      break;
    case F16:
      f(DT_<F16>{});
      break;
    case BF16:
      f(DT_<BF16>{});
      break;
    default:
      f(DT_<NONE>{});
  }
}

// Load count elements starting at element start of a (dtype, pointer) tensor as fp32.
MC_INLINE void load_f32(const void* src, int dtype, size_t start, size_t count, float* dst) {
  with_dtype(dtype, [&](auto dt) MC_LAMBDA {
    for (size_t t = 0; t < count; ++t) dst[t] = ld<decltype(dt)::value>(src, start + t);
  });
}

// Store count fp32 values to elements [start, start + count) of a (dtype, pointer) tensor.
MC_INLINE void store_f32(void* dst, int dtype, size_t start, size_t count, const float* src) {
  with_dtype(dtype, [&](auto dt) MC_LAMBDA {
    constexpr int D = decltype(dt)::value;
    if constexpr (D != NONE) {
      for (size_t t = 0; t < count; ++t) st<D>(dst, start + t, src[t]);
    }
  });
}

// NaN/Inf values (exponent field all ones) among elements [start, start + count) of a
// (dtype, pointer) tensor: used to check a tile just stored, while it is in L1. Counted in
// chunks with counters as narrow as the elements (uint32 for fp32, uint16 for 16-bit), so the
// loop stays in vector lanes of the element width; widening every flag to 64 bits cost about
// a sixth of the linear kernel's time on an AVX2 CPU.
MC_INLINE uint64_t count_nonfinite(const void* p, int dtype, size_t start, size_t count) {
  constexpr size_t CHUNK = 32768;  // < 2^16: a uint16 counter cannot overflow
  uint64_t total = 0;
  for (size_t c0 = 0; c0 < count; c0 += CHUNK) {
    const size_t n = count - c0 < CHUNK ? count - c0 : CHUNK;
    if (dtype == F32) {
      const uint32_t* u = static_cast<const uint32_t*>(p) + start + c0;
      uint32_t c = 0;
      for (size_t t = 0; t < n; ++t) c += (u[t] & 0x7F800000u) == 0x7F800000u ? 1u : 0u;
      total += c;
    } else {
      const uint16_t* u = static_cast<const uint16_t*>(p) + start + c0;
      const uint16_t m = dtype == F16 ? 0x7C00u : 0x7F80u;
      uint16_t c = 0;
      for (size_t t = 0; t < n; ++t) c = static_cast<uint16_t>(c + ((u[t] & m) == m ? 1u : 0u));
      total += c;
    }
  }
  return total;
}

// A tensor operand: data pointer and dtype code (pointer may be null for "no base").
struct Operand {
  const void* ptr = nullptr;
  int dtype = F32;
};

// The dtype code of an operand, NONE when it is absent.
MC_INLINE int code_of(const Operand& o) { return o.ptr != nullptr ? o.dtype : NONE; }

// d = fl32(x) - fl32(base) for a tile (base absent: d = fl32(x) - 0 = fl32(x), exactly).
MC_INLINE void load_delta(const Operand& x, const Operand& base, size_t start, size_t count,
                          float* d) {
  with_dtype(code_of(x), [&](auto xd) MC_LAMBDA {
    with_dtype(code_of(base), [&](auto bd) MC_LAMBDA {
      constexpr int XD = decltype(xd)::value, BD = decltype(bd)::value;
      for (size_t t = 0; t < count; ++t) {
        d[t] = ld<XD>(x.ptr, start + t) - ld<BD>(base.ptr, start + t);
      }
    });
  });
}

// Selection keys of a tile: bits(|fl32(x) - fl32(base)|), i.e. the delta's bits, sign cleared.
MC_INLINE void load_keys(const Operand& x, const Operand& base, size_t start, size_t count,
                         uint32_t* key) {
  with_dtype(code_of(x), [&](auto xd) MC_LAMBDA {
    with_dtype(code_of(base), [&](auto bd) MC_LAMBDA {
      constexpr int XD = decltype(xd)::value, BD = decltype(bd)::value;
      for (size_t t = 0; t < count; ++t) {
        float d = ld<XD>(x.ptr, start + t) - ld<BD>(base.ptr, start + t);
        key[t] = f32_bits(d) & 0x7FFFFFFFu;
      }
    });
  });
}

// Selection key of a delta: its bit pattern with the sign cleared.
MC_INLINE void delta_keys(const float* d, size_t count, uint32_t* key) {
  for (size_t t = 0; t < count; ++t) key[t] = f32_bits(d[t]) & 0x7FFFFFFFu;
}

}  // namespace mc
