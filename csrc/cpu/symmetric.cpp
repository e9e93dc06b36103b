// Symmetric parts in 8 x 8 blocks (contract in symmetric.h).
#include "symmetric.h"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define IDK_SYM_AVX2 1
#endif

namespace idid_kernels {
namespace cpu {
namespace {

inline float at(const float* const* d, int64_t i, int64_t j) { return d[i] ? d[i][j] : 0.0f; }

// Entries (i, j) and (j, i) for the rows i of [i0, i1) and the columns j of [j0, j1), j >= i0.
void sym_scalar(const float* const* d, float scale, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                float* const* o) {
  for (int64_t i = i0; i < i1; ++i) {
    for (int64_t j = std::max(j0, i); j < j1; ++j) {
      const float v = scale * (at(d, i, j) + at(d, j, i));
      if (o[i]) o[i][j] = v;
      if (o[j]) o[j][i] = v;
    }
  }
}

void band_scalar(const float* const* d, int64_t C, float scale, int64_t band, float* const* o) {
  const int64_t i0 = kSymBand * band, i1 = std::min(C, i0 + kSymBand);
  sym_scalar(d, scale, i0, i1, i0, C, o);
}

#ifdef IDK_SYM_AVX2
#define IDK_AVX2 __attribute__((target("avx2")))

IDK_AVX2 inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
  const __m256 s7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
  r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

IDK_AVX2 inline void load_block(const float* const* d, int64_t i0, int64_t j0, __m256 r[8]) {
  for (int k = 0; k < 8; ++k) r[k] = d[i0 + k] ? _mm256_loadu_ps(d[i0 + k] + j0) : _mm256_setzero_ps();
}

IDK_AVX2 inline void store_block(float* const* o, int64_t i0, int64_t j0, const __m256 r[8]) {
  for (int k = 0; k < 8; ++k) {
    if (o[i0 + k]) _mm256_storeu_ps(o[i0 + k] + j0, r[k]);
  }
}

// The 8 x 8 block (i0, j0), j0 >= i0, and its mirror.
IDK_AVX2 inline void block_avx2(const float* const* d, __m256 s, int64_t i0, int64_t j0, float* const* o) {
  __m256 a[8], b[8];
  load_block(d, i0, j0, a);  // D[I][J]
  load_block(d, j0, i0, b);  // D[J][I]
  transpose8(b);             // (D[J][I])^T = D^T[I][J]
  for (int k = 0; k < 8; ++k) a[k] = _mm256_mul_ps(s, _mm256_add_ps(a[k], b[k]));
  store_block(o, i0, j0, a);
  if (j0 != i0) {
    transpose8(a);
    store_block(o, j0, i0, a);
  }
}

// Band I of kSymBand rows against the column tiles of kSymBand from its own, each tile pair (both
// in L1) walked in 8 x 8 blocks; blocks that cross C run the scalar loop.
IDK_AVX2 void band_avx2(const float* const* d, int64_t C, float scale, int64_t band, float* const* o) {
  const __m256 s = _mm256_set1_ps(scale);
  const auto stores = [o, C](int64_t r0) {
    for (int64_t k = r0; k < std::min(C, r0 + 8); ++k) {
      if (o[k]) return true;
    }
    return false;
  };
  const int64_t i_begin = kSymBand * band, i_end = std::min(C, i_begin + kSymBand);
  for (int64_t j_tile = i_begin; j_tile < C; j_tile += kSymBand) {
    const int64_t j_end = std::min(C, j_tile + kSymBand);
    for (int64_t i0 = i_begin; i0 < i_end; i0 += 8) {
      const bool rows_store = stores(i0);
      for (int64_t j0 = std::max(j_tile, i0); j0 < j_end; j0 += 8) {
        if (!rows_store && !stores(j0)) continue;  // neither block is stored
        if (i0 + 8 <= C && j0 + 8 <= C) {
          block_avx2(d, s, i0, j0, o);
        } else {
          sym_scalar(d, scale, i0, std::min(C, i0 + 8), j0, std::min(C, j0 + 8), o);
        }
      }
    }
  }
}

bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2");
  return yes;
}
#endif

}  // namespace

void vsym_band(const float* const* d, int64_t C, float scale, int64_t band, float* const* o) {
#ifdef IDK_SYM_AVX2
  if (has_avx2()) {
    band_avx2(d, C, scale, band, o);
    return;
  }
#endif
  band_scalar(d, C, scale, band, o);
}

}  // namespace cpu
}  // namespace idid_kernels
