// Symmetric parts of square float32 matrices in 8 x 8 blocks (the idid_loss teacher and its
// gradient): out = scale (D + D^T) for a C x C matrix D given by its rows.
//
// Row k of D is d[k], or a row of zeros where d[k] is null; row k of out is o[k], and where o[k]
// is null that row is not stored (its mirror column still is). A call forms band I (rows
// kSymBand I .. kSymBand (I + 1) - 1) against the columns from kSymBand I on, tile by tile (each
// pair of kSymBand x kSymBand tiles is small enough for L1) in 8 x 8 blocks, each with its mirror
// block, so one call per band covers the matrix. Band I costs about 2 kSymBand (C - kSymBand I)
// entries: callers that run bands in parallel pair band t with band nb - 1 - t. Blocks of which
// no row is stored are skipped. Each entry is scale (D_ij + D_ji), rounded once per operation, so
// out is exactly symmetric. The diagonal is formed like every entry (scale 2 D_kk); callers that
// need it zero set it. AVX2 transposes the blocks in registers where the CPU has it (a runtime
// check); elsewhere, and for the blocks that cross C, a scalar loop.
#pragma once

#include <cstdint>

namespace idid_kernels {
namespace cpu {

constexpr int64_t kSymBand = 32;
inline int64_t sym_bands(int64_t C) { return (C + kSymBand - 1) / kSymBand; }

void vsym_band(const float* const* d, int64_t C, float scale, int64_t band, float* const* o);

}  // namespace cpu
}  // namespace idid_kernels
