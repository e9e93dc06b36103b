// CPU kernels of class_density: D_c = sum_{i != j, y_i = y_j = c} kappa_ij / (n_c (n_c - 1)),
// kappa_ij = exp(t (<u_i, u_j> - 1)), D_c = 0 for n_c < 2 (spec/idid.md).
//
// Only same-class pairs are ever formed, never the B x B Gram: rows are bucketed by label with a
// stable counting sort, the unit rows are written in bucket order (so every class is a contiguous
// block U_c), and each class with n_c >= 2 is cut into tiles of at most kTileRows rows. A tile is
// one GEMM against its class block plus an elementwise pass, so the work is sum_c n_c^2 d, not B^2 d.
// Classes with little Gram work take direct dot products instead of a GEMM call (kDirectWork).
//
// Forward, tile (c, rows [r0, r1)):  K = U_c[r0:r1] U_c[r0:]^T, summing kappa over the strict upper
//   triangle only; D_c = 2 * (sum over its tiles) / (n_c (n_c - 1)) (kappa is symmetric).
// Backward, same tiles:  W = t kappa (zero diagonal) over the full rows, P = W U_c and
//   dD_c/du_i = 2 g_c / (n_c (n_c - 1)) P_i, then the normalize backward per row.
//
// Tiles are handed to the threads dynamically, largest first; each tile's result goes to its own
// slot (forward) or its own rows of dx (backward), and the per-class sums add tile results in a
// fixed order, so the output is bitwise the same for any thread count or schedule.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/density.h"
#include "checks.h"
#include "gemm.h"
#include "normalize.h"

namespace idid_kernels {
namespace {

// Rows per tile: a tile's Gram block (kTileRows x n_c) stays cache-sized for n_c in the thousands
// and a large class still splits into enough tiles to keep every thread busy.
constexpr int64_t kTileRows = 128;

// Rows grouped by label: the rows of class c are order[offsets[c] .. offsets[c + 1]), ascending.
struct Buckets {
  std::vector<int64_t> order;
  std::vector<int64_t> offsets;
  int64_t count(int64_t c) const { return offsets[c + 1] - offsets[c]; }
};

Buckets bucket_by_label(const at::Tensor& labels_in, int64_t n, int64_t num_classes) {
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == n, "class_density: labels must have shape (", n,
              ",), got ", labels_in.sizes());
  TORCH_CHECK(labels_in.scalar_type() == at::kLong, "class_density: labels must be int64, got ",
              labels_in.scalar_type());
  TORCH_CHECK(labels_in.device().is_cpu(), "class_density: labels must be on the CPU like x");
  const at::Tensor labels = labels_in.contiguous();
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  Buckets b;
  b.offsets.assign(num_classes + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = lp[i];
    TORCH_CHECK(c >= 0 && c < num_classes, "class_density: labels[", i, "] = ", c, " is out of range [0, ",
                num_classes, ")");
    ++b.offsets[c + 1];
  }
  for (int64_t c = 0; c < num_classes; ++c) b.offsets[c + 1] += b.offsets[c];
  std::vector<int64_t> next(b.offsets.begin(), b.offsets.end() - 1);
  b.order.resize(n);
  for (int64_t i = 0; i < n; ++i) b.order[next[lp[i]]++] = i;
  return b;
}

struct Tile {
  int64_t cls, r0, r1;
};

// Tiles of every class with n_c >= 2, largest class first (for the dynamic schedule); tiles of one
// class stay in row order, so the per-class sum below adds them in a fixed order.
std::vector<Tile> make_tiles(const Buckets& b, int64_t num_classes) {
  std::vector<int64_t> classes;
  for (int64_t c = 0; c < num_classes; ++c) {
    if (b.count(c) >= 2) classes.push_back(c);
  }
  std::stable_sort(classes.begin(), classes.end(),
                   [&](int64_t a, int64_t c) { return b.count(a) > b.count(c); });
  std::vector<Tile> tiles;
  for (int64_t c : classes) {
    const int64_t nc = b.count(c);
    for (int64_t r0 = 0; r0 < nc; r0 += kTileRows) tiles.push_back({c, r0, std::min(nc, r0 + kTileRows)});
  }
  return tiles;
}

// Runs work(i) for every tile i on the intra-op threads, handing out tiles dynamically.
template <typename F>
void for_each_tile(int64_t num_tiles, const F& work) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_tiles));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    // Worker threads do not inherit the caller's dispatch state; the tile GEMMs work on plain
    // tensors that need no autograd (as ATen's own kernels do inside parallel_for).
    at::AutoDispatchBelowADInplaceOrView guard;
    for (int64_t i = next.fetch_add(1); i < num_tiles; i = next.fetch_add(1)) work(i);
  });
}

// A class with at most this much Gram work (n_c^2 d multiply-adds) is done with direct dot products:
// an at::mm call costs microseconds of dispatch and allocation, more than the whole Gram of a class
// of a few rows (the common case with many classes and few rows per class).
constexpr int64_t kDirectWork = 1 << 15;

inline bool direct_gram(int64_t nc, int64_t d) { return nc * nc * d <= kDirectWork; }

// Pragmas live in these small functions: they cannot sit inside AT_DISPATCH's macro argument.
template <typename acc>
acc dot(const acc* a, const acc* b, int64_t d) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t k = 0; k < d; ++k) s += a[k] * b[k];
  return s;
}

// sum_j kappa(c_j) over n cosines.
template <typename acc>
acc kernel_sum(const acc* cosines, int64_t n, acc t) {
  acc s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < n; ++j) s += diversity_kernel(cosines[j], t);
  return s;
}

// c_j <- d kappa / dc at c_j = t kappa(c_j), in place.
template <typename acc>
void kernel_grad_row(acc* cosines, int64_t n, acc t) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) cosines[j] = diversity_kernel_grad(diversity_kernel(cosines[j], t), t);
}

// Forward of one tile: sum of kappa_ij over i in [r0, r1), j in (i, n_c) of the class block
// U_c = us[off, off + n_c), the class's unit rows. Row sums in acc, the tile total in double: a class
// can hold millions of pairs. (Tensor views are made only for the GEMM path: they cost microseconds.)
template <typename acc>
double tile_kernel_sum(const at::Tensor& us, int64_t off, int64_t nc, int64_t r0, int64_t r1, acc t) {
  const int64_t d = us.size(1);
  const acc* up = us.const_data_ptr<acc>() + off * d;
  double total = 0;
  if (direct_gram(nc, d)) {
    for (int64_t i = r0; i < r1; ++i) {
      acc s = 0;
      for (int64_t j = i + 1; j < nc; ++j) s += diversity_kernel(dot(up + i * d, up + j * d, d), t);
      total += static_cast<double>(s);
    }
    return total;
  }
  // Columns from r0 on: the strict upper triangle of rows [r0, r1) lies there.
  const at::Tensor uc = us.narrow(0, off, nc);
  const int64_t ld = nc - r0;
  const at::Tensor k = cpu::mm(uc.narrow(0, r0, r1 - r0), uc.narrow(0, r0, ld).t()).contiguous();
  const acc* kp = k.const_data_ptr<acc>();
  for (int64_t a = 0; a < r1 - r0; ++a) total += static_cast<double>(kernel_sum(kp + a * ld + a + 1, ld - a - 1, t));
  return total;
}

// Backward of one tile: pull_i = sum_{j != i} t kappa_ij u_j for i in [r0, r1) of the class block
// U_c = us[off, off + n_c), then dx_i = normalize_backward(scale * pull_i). Class row i is original
// row order[i].
template <typename scalar_t, typename acc>
void tile_backward(const at::Tensor& us, int64_t off, int64_t nc, int64_t r0, int64_t r1, acc t, acc scale,
                   const int64_t* order, const acc* norm, scalar_t* dx) {
  const int64_t d = us.size(1);
  const acc* up = us.const_data_ptr<acc>() + off * d;
  if (direct_gram(nc, d)) {
    std::vector<acc> pull(d);
    for (int64_t i = r0; i < r1; ++i) {
      std::fill(pull.begin(), pull.end(), acc(0));
      for (int64_t j = 0; j < nc; ++j) {
        if (j == i) continue;
        const acc w = diversity_kernel_grad(diversity_kernel(dot(up + i * d, up + j * d, d), t), t);
        const acc* uj = up + j * d;
        acc* pp = pull.data();
#pragma omp simd
        for (int64_t k = 0; k < d; ++k) pp[k] += w * uj[k];
      }
      cpu::normalize_backward_row(pull.data(), up + i * d, norm[order[i]], scale, dx + order[i] * d, d);
    }
    return;
  }
  const at::Tensor uc = us.narrow(0, off, nc);
  at::Tensor w = cpu::mm(uc.narrow(0, r0, r1 - r0), uc.t()).contiguous();  // cosines, then weights
  acc* wp = w.mutable_data_ptr<acc>();
  for (int64_t a = 0; a < r1 - r0; ++a) {
    kernel_grad_row(wp + a * nc, nc, t);
    wp[a * nc + r0 + a] = 0;  // i != j
  }
  const at::Tensor pull = cpu::mm(w, uc).contiguous();  // (r1 - r0, d)
  const acc* pp = pull.const_data_ptr<acc>();
  for (int64_t a = 0; a < r1 - r0; ++a) {
    const int64_t i = order[r0 + a];
    cpu::normalize_backward_row(pp + a * d, up + (r0 + a) * d, norm[i], scale, dx + i * d, d);
  }
}

// Unit rows of x in bucket order (acc dtype, (n, d)). With norm_saved undefined the norms are
// computed and written to norm_out in the original row order; otherwise the saved norms are used.
template <typename scalar_t, typename acc>
void sorted_unit_rows(const scalar_t* xp, const Buckets& b, int64_t n, int64_t d, const acc* norm_saved,
                      acc* norm_out, acc* up) {
  at::parallel_for(0, n, cpu::row_grain(d), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t i = b.order[p];
      const acc r = norm_saved != nullptr ? norm_saved[i] : cpu::row_norm<scalar_t, acc>(xp + i * d, d);
      if (norm_out != nullptr) norm_out[i] = r;
      cpu::scale_row(xp + i * d, r, up + p * d, d);
    }
  });
}

// -> (D (C,) in x's dtype, norm (B,) in the accumulation dtype).
std::tuple<at::Tensor, at::Tensor> class_density_forward_cpu(const at::Tensor& x_in, const at::Tensor& labels,
                                                             int64_t num_classes, double t) {
  check_2d_float("x", x_in);
  TORCH_CHECK(num_classes >= 1, "class_density: num_classes must be >= 1, got ", num_classes);
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1);
  const auto acc_dtype = cpu::acc_dtype_of(x.scalar_type());
  const Buckets b = bucket_by_label(labels, n, num_classes);
  const std::vector<Tile> tiles = make_tiles(b, num_classes);
  at::Tensor norm = at::empty({n}, x.options().dtype(acc_dtype));
  at::Tensor us = at::empty({n, d}, x.options().dtype(acc_dtype));
  at::Tensor density = at::zeros({num_classes}, x.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_density_forward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    sorted_unit_rows<scalar_t, acc>(x.const_data_ptr<scalar_t>(), b, n, d, nullptr, norm.mutable_data_ptr<acc>(),
                                    us.mutable_data_ptr<acc>());
    const acc ta = static_cast<acc>(t);
    std::vector<double> tile_sum(tiles.size(), 0.0);
    for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t ti) {
      const Tile& tile = tiles[ti];
      tile_sum[ti] = tile_kernel_sum<acc>(us, b.offsets[tile.cls], b.count(tile.cls), tile.r0, tile.r1, ta);
    });
    // Tiles of a class are consecutive and in row order: a fixed summation order.
    acc* dp = density.mutable_data_ptr<acc>();
    for (size_t ti = 0; ti < tiles.size();) {
      const int64_t c = tiles[ti].cls;
      double total = 0;
      for (; ti < tiles.size() && tiles[ti].cls == c; ++ti) total += tile_sum[ti];
      const int64_t nc = b.count(c);
      dp[c] = static_cast<acc>(2.0 * total / (static_cast<double>(nc) * static_cast<double>(nc - 1)));
    }
  });
  return {density.to(x.scalar_type()), norm};
}

// dx (B, d) in x's dtype for D = class_density(x, labels, C, t) given grad = dL/dD (C,).
at::Tensor class_density_backward_cpu(const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& labels,
                                      const at::Tensor& norm_in, double t) {
  check_2d_float("x", x_in);
  TORCH_CHECK(grad_in.dim() == 1 && grad_in.size(0) >= 1, "class_density_backward: grad must be (C,), got ",
              grad_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), d = x.size(1), num_classes = grad_in.size(0);
  TORCH_CHECK(norm_in.dim() == 1 && norm_in.size(0) == n, "class_density_backward: norm must be (", n, ",), got ",
              norm_in.sizes());
  const auto acc_dtype = cpu::acc_dtype_of(x.scalar_type());
  const at::Tensor grad = grad_in.to(acc_dtype).contiguous();
  const at::Tensor norm = norm_in.to(acc_dtype).contiguous();
  const Buckets b = bucket_by_label(labels, n, num_classes);
  const std::vector<Tile> tiles = make_tiles(b, num_classes);
  at::Tensor us = at::empty({n, d}, x.options().dtype(acc_dtype));
  at::Tensor dx = at::zeros({n, d}, x.options());  // rows of classes with n_c < 2 get no gradient
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "class_density_backward_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const acc* np = norm.const_data_ptr<acc>();
    const acc* gp = grad.const_data_ptr<acc>();
    sorted_unit_rows<scalar_t, acc>(x.const_data_ptr<scalar_t>(), b, n, d, np, nullptr, us.mutable_data_ptr<acc>());
    scalar_t* dxp = dx.mutable_data_ptr<scalar_t>();
    const acc ta = static_cast<acc>(t);
    for_each_tile(static_cast<int64_t>(tiles.size()), [&](int64_t ti) {
      const Tile& tile = tiles[ti];
      const int64_t nc = b.count(tile.cls), off = b.offsets[tile.cls];
      // dD_c/du_i = 2 / (n_c (n_c - 1)) * sum_{j != i} t kappa_ij u_j (kappa symmetric: both pair orders).
      const acc scale = acc(2) * gp[tile.cls] * pair_weight<acc>(nc);
      tile_backward<scalar_t, acc>(us, off, nc, tile.r0, tile.r1, ta, scale, b.order.data() + off, np, dxp);
    });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("class_density_forward", &class_density_forward_cpu);
  m.impl("class_density_backward", &class_density_backward_cpu);
}

}  // namespace idid_kernels
