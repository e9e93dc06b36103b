// CPU policy of the IDID-R1 ops (spec/idid.md; oracle: idid_kernels/reference/idid.py, analytic
// backward: reference/grads.py idid_backward). The chunk loop, GEMMs, label layout and output
// assembly are the device-agnostic driver's (csrc/driver/idid_loss_driver.h); this file holds the
// vectorised row loops it calls.
//
// Forward epilogue: one fused pass per row of logits computes lse_i = logsumexp_c z_ic,
// lse_nt_i = logsumexp_{c != y_i} z_ic / tau and the distillation kd_i = sum_c r_{y_i c}
// (log r_{y_i c} - z_ic / tau) + lse_nt_i against the teacher r (C x C, computed once for the classes
// present). The diversity term works on same-label rows only: the driver's rows are sorted by label,
// so each class is a contiguous block of U and its n_c x n_c Gram is formed there (pairwise dots for
// small classes, GEMM blocks for large ones).
//
// Backward epilogue: each chunk's logits are overwritten in place with
// G_ic = g a_i [p_ic - Y_ic + (q_ic - r_ic) / tau] in one pass parallel over column blocks (each
// thread owns a block of classes and walks the rows in order, so the teacher gradient
// dPhi_{y_i c} += a_i r (log r - log q_ic - kd_i) is accumulated without races, in a fixed order:
// bitwise reproducible for any thread count). Then the diversity pull h_i per class.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/idid_math.h"
#include "../common/macros.h"
#include "../common/normalize.h"
#include "../driver/idid_loss_driver.h"
#include "fp_env.h"
#include "gemm.h"
#include "normalize.h"
#include "symmetric.h"
#include "vec_math.h"

namespace idid_kernels {
namespace {

// Classes with at most this many rows get their Gram by pairwise dots (no GEMM call overhead).
constexpr int64_t kSmallClass = 32;
// Elements of work per parallel task, to amortise the scheduling.
constexpr int64_t kGrainElems = 32768;
// symmetrize_rows / symmetrize_present form the whole C x C symmetric part (vectorised 8 x 8 blocks)
// once the rows they need are at least C / 4 (at C = 512 with 200 present classes: 60 against 80 us
// for the gradient on 2 threads); below that, the gathers of the n listed rows (n C entries).
constexpr int64_t kDenseRowsFactor = 4;

using at::Tensor;

int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row_len, 1)); }

// The (rows x d) passes of the normalisation (norms, unit rows, their backward) are a few flops per
// element: a quarter of the grain already pays for a second thread.
int64_t grain_unit_rows(int64_t d) { return std::max<int64_t>(1, kGrainElems / 4 / std::max<int64_t>(d, 1)); }

// Rows of sorted positions that take part: the valid rows sort first (host read: CPU tensors).
int64_t valid_rows(const idid::Layout& L) { return L.start.const_data_ptr<int64_t>()[L.num_classes]; }

// Classes with n_c >= 1: the rows of the compact teacher arrays (host read).
int64_t present_count(const idid::Layout& L) { return L.classes_present.item<int64_t>(); }

template <typename A>
void row_norms(const A* x, int64_t n, int64_t d, A* out) {
  at::parallel_for(0, n, grain_unit_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = cpu::row_norm<A, A>(x + i * d, d);
  });
}

// unit[j] = scale * x[src] / max(||x[src]||, 1e-12), src = rows ? rows[j] : j (F.normalize).
template <typename A>
void unit_rows(const A* x, const A* norms, const int64_t* rows, int64_t n, int64_t d, A scale, A* unit) {
  at::parallel_for(0, n, grain_unit_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t src = rows ? rows[j] : j;
      const A inv = scale / norm_floor(norms[src]);
      const A* xr = x + src * d;
      cpu::vscale(xr, inv, unit + j * d, d);
    }
  });
}

// F.normalize backward: out[dst] = (g - <g, u> u) / max(r, 1e-12), the radial term dropped where
// r <= 1e-12 (there the denominator is the constant floor). dst = rows ? rows[j] : j.
template <typename scalar_t, typename A>
void normalize_backward(const A* grad_u, const A* unit, const A* norms, const int64_t* rows, int64_t n, int64_t d,
                        scalar_t* out) {
  at::parallel_for(0, n, grain_unit_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t dst = rows ? rows[j] : j;
      const A r = norms[dst];
      const A* g = grad_u + j * d;
      const A* u = unit + j * d;
      const A radial = norm_above_floor(r) ? cpu::vdot(g, u, d) : A(0);
      const A inv = A(1) / norm_floor(r);
      scalar_t* o = out + dst * d;
      if constexpr (std::is_same_v<scalar_t, A>) {
        cpu::vproject(g, u, radial, inv, o, d);
      } else {
        for (int64_t k = 0; k < d; ++k) o[k] = static_cast<scalar_t>((g[k] - radial * u[k]) * inv);
      }
    }
  });
}

// Bands of the symmetric part (cpu/symmetric.h) in parallel, band t paired with band nb - 1 - t.
inline void symmetric_bands(const float* const* d, int64_t C, float scale, float* const* o) {
  const int64_t nb = cpu::sym_bands(C);
  at::parallel_for(0, (nb + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      cpu::vsym_band(d, C, scale, t, o);
      if (nb - 1 - t != t) cpu::vsym_band(d, C, scale, nb - 1 - t, o);
    }
  });
}

// Whether n of C rows are enough for the dense symmetric part to pay (kDenseRowsFactor).
inline bool dense_symmetric(int64_t n, int64_t C) { return n * kDenseRowsFactor >= C; }

// out[k][c] = scale (m[k][c] + m[c][k]) for the rows k of the list rows[0..n) (all c): each task
// owns a block of columns c and gathers m[c][k] for 32 listed rows at a time into a transposed
// tile, so the writes are contiguous runs and the work is n C, not C^2 (a batch has few of the
// classes). In float32 with n >= C / kDenseRowsFactor the listed rows come from the whole
// symmetric part in 8 x 8 blocks instead (symmetric_bands). Exactly symmetric: the sum commutes.
template <typename A>
void symmetrize_rows(const A* m, int64_t C, A scale, const int64_t* rows, int64_t n, A* out) {
  if constexpr (std::is_same_v<A, float>) {
    if (dense_symmetric(n, C)) {
      std::vector<const float*> d(C);
      std::vector<float*> o(C, nullptr);
      for (int64_t k = 0; k < C; ++k) d[k] = m + k * C;
      for (int64_t q = 0; q < n; ++q) o[rows[q]] = out + rows[q] * C;
      symmetric_bands(d.data(), C, scale, o.data());
      return;
    }
  }
  constexpr int64_t kTile = 32;
  const int64_t tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tc = begin; tc < end; ++tc) {
      const int64_t c0 = tc * kTile, c1 = std::min(C, c0 + kTile);
      for (int64_t q0 = 0; q0 < n; q0 += kTile) {
        const int64_t q1 = std::min(n, q0 + kTile);
        A tr[kTile][kTile];  // tr[q - q0][c - c0] = m[c][rows[q]]
        for (int64_t c = c0; c < c1; ++c) {
          const A* col = m + c * C;
          for (int64_t q = q0; q < q1; ++q) tr[q - q0][c - c0] = col[rows[q]];
        }
        for (int64_t q = q0; q < q1; ++q) {
          const A* t = tr[q - q0];
          const A* row = m + rows[q] * C;
          A* o = out + rows[q] * C;
#pragma omp simd
          for (int64_t c = c0; c < c1; ++c) o[c] = scale * (row[c] + t[c - c0]);
        }
      }
    }
  });
}

// The classes with count[c] != 0, in increasing order.
inline std::vector<int64_t> present_classes(const int64_t* count, int64_t C) {
  std::vector<int64_t> present;
  for (int64_t c = 0; c < C; ++c) {
    if (count[c] != 0) present.push_back(c);
  }
  return present;
}

// The similarity gradient out = scale (m + m^T) with a zero diagonal, for an m whose only nonzero
// rows are those of the present classes (count[k] != 0), held compactly: class k's row at trow[k]. The
// present rows of out are written whole; the others are zero-filled and get the present columns,
// gathered from m's present rows in 32 x 32 tiles (contiguous reads, writes within the tile's
// rows). out[k][c] is scale (m[k][c] + m[c][k]) where both rows are present, scale m[k][c] or
// scale m[c][k] where one is: exactly symmetric. In float32 with P >= C / kDenseRowsFactor present
// classes every entry is formed as scale (m[k][c] + m[c][k]) in 8 x 8 blocks, absent rows read as
// zero (symmetric_bands), which gives the same values.
template <typename A, typename Out>
void symmetrize_present(const A* m, int64_t C, A scale, const int64_t* count, const int64_t* trow, Out* out) {
  constexpr int64_t kTile = 32;
  const std::vector<int64_t> present = present_classes(count, C);
  const int64_t P = static_cast<int64_t>(present.size());
  if constexpr (std::is_same_v<A, float> && std::is_same_v<Out, float>) {
    if (dense_symmetric(P, C)) {  // every entry scale (D_kc + D_ck), absent rows of D zero
      std::vector<const float*> d(C, nullptr);
      std::vector<float*> o(C);
      for (int64_t k = 0; k < C; ++k) {
        if (count[k] != 0) d[k] = m + trow[k] * C;
        o[k] = out + k * C;
      }
      symmetric_bands(d.data(), C, scale, o.data());
      for (int64_t k = 0; k < C; ++k) out[k * C + k] = 0.0f;
      return;
    }
  }
  const int64_t* pc = present.data();
  const int64_t tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tk = begin; tk < end; ++tk) {
      const int64_t k0 = tk * kTile, k1 = std::min(C, k0 + kTile);
      for (int64_t k = k0; k < k1; ++k) {
        Out* o = out + k * C;
        if (count[k] == 0) {
          std::fill(o, o + C, Out(0));
          continue;
        }
        const A* row = m + trow[k] * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = static_cast<Out>(scale * row[c]);
      }
      for (int64_t q0 = 0; q0 < P; q0 += kTile) {
        const int64_t q1 = std::min(P, q0 + kTile);
        A tr[kTile][kTile];  // tr[k - k0][q - q0] = m[present[q]][k]
        for (int64_t q = q0; q < q1; ++q) {
          const A* col = m + trow[pc[q]] * C;
          for (int64_t k = k0; k < k1; ++k) tr[k - k0][q - q0] = col[k];
        }
        for (int64_t k = k0; k < k1; ++k) {
          const A* t = tr[k - k0];
          Out* o = out + k * C;
          if (count[k] == 0) {
            for (int64_t q = q0; q < q1; ++q) o[pc[q]] = static_cast<Out>(scale * t[q - q0]);
            continue;
          }
          const A* row = m + trow[k] * C;
          for (int64_t q = q0; q < q1; ++q) o[pc[q]] = static_cast<Out>(scale * (row[pc[q]] + t[q - q0]));
        }
      }
      for (int64_t k = k0; k < k1; ++k) {
        if (count[k] != 0) out[k * C + k] = Out(0);
      }
    }
  });
}

// Teacher rows: log r_kc = Phi_kc - logsumexp_{c' != k} Phi_kc', Phi = (Theta + Theta^T) / 2, for
// the classes present (the only rows the loss reads); log r_kk = 0 and r_kk = 0 (the diagonal takes
// no part); log r of absent classes is 0 (left unwritten unless whole). r holds the present classes'
// rows only, class k at row trow[k].
template <typename A>
void teacher_rows(const A* theta, const int64_t* count, const int64_t* trow, int64_t C, bool whole, A* log_r, A* r) {
  const std::vector<int64_t> present = present_classes(count, C);
  symmetrize_rows(theta, C, A(0.5), present.data(), static_cast<int64_t>(present.size()), log_r);  // Phi rows
  at::parallel_for(0, C, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      A* lr = log_r + k * C;
      if (count[k] == 0) {
        if (whole) std::fill(lr, lr + C, A(0));
        continue;
      }
      cpu::vteacher_row(lr, r + trow[k] * C, C, k);
    }
  });
}

template <typename A>
struct RowStats {
  A lse = 0, lse_nt = 0, kd = 0, ce = 0;
};

// The fused forward epilogue of one row of logits z (label k). L = logsumexp over the non-targets
// (own max, so nothing underflows however much the target dominates) gives both lse and ce.
template <typename A>
RowStats<A> forward_row(const A* z, int64_t C, int64_t k, bool distillation, A inv_tau, bool unit_tau, const A* r,
                        const A* log_r) {
  const A zy = z[k];
  const A* tail = z + k + 1;
  const int64_t n_tail = C - k - 1;
  const A m_nt = std::max(cpu::vmax(z, k), cpu::vmax(tail, n_tail));
  const A L = m_nt + std::log(cpu::vsum_exp(z, k, A(1), m_nt) + cpu::vsum_exp(tail, n_tail, A(1), m_nt));
  RowStats<A> s;
  s.lse = log_add_exp(L, zy);
  s.ce = softplus(L - zy);
  if (!distillation) return s;
  if (unit_tau) {
    s.lse_nt = L;  // one exp per element serves every statistic
  } else {
    // Scaling by 1/tau > 0 commutes with the (rounded) max, so m_nt / tau is the max of z / tau.
    const A mt = m_nt * inv_tau;
    s.lse_nt = mt + std::log(cpu::vsum_exp(z, k, inv_tau, mt) + cpu::vsum_exp(tail, n_tail, inv_tau, mt));
  }
  s.kd = cpu::vkl_sum(r, log_r, z, C, inv_tau) + s.lse_nt;
  return s;
}

// Classes with n_c >= 2 split by the Gram method: pairwise dots up to kSmallClass rows, GEMM blocks above.
void multi_classes(const int64_t* start, int64_t C, std::vector<int64_t>& small, std::vector<int64_t>& large) {
  for (int64_t c = 0; c < C; ++c) {
    const int64_t n = start[c + 1] - start[c];
    if (n >= 2) (n <= kSmallClass ? small : large).push_back(c);
  }
}

struct CpuPolicy {
  // The layout by a stable counting sort on the host (one pass; CPU tensors are host memory), with
  // the label check of direct op calls.
  static idid::Layout make_layout(const Tensor& labels, int64_t C, int64_t ignore_index) {
    const int64_t B = labels.size(0);
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const auto lopts = labels.options();
    idid::Layout L;
    L.num_classes = C;
    L.batch = B;
    L.valid = at::empty({B}, lopts.dtype(at::kBool));
    L.count = at::zeros({C}, lopts);
    L.start = at::empty({C + 1}, lopts);
    L.key = at::empty({B}, lopts);
    L.perm = at::empty({B}, lopts);
    bool* valid = L.valid.mutable_data_ptr<bool>();
    int64_t* count = L.count.mutable_data_ptr<int64_t>();
    int64_t* start = L.start.mutable_data_ptr<int64_t>();
    int64_t* key = L.key.mutable_data_ptr<int64_t>();
    int64_t* perm = L.perm.mutable_data_ptr<int64_t>();
    for (int64_t i = 0; i < B; ++i) {
      valid[i] = y[i] != ignore_index;
      if (!valid[i]) continue;
      TORCH_CHECK(y[i] >= 0 && y[i] < C, "idid_loss: label ", y[i], " at row ", i, " is outside [0, ", C,
                  ") and is not ignore_index (", ignore_index, ")");
      ++count[y[i]];
    }
    int64_t present = 0, multi = 0;
    start[0] = 0;
    for (int64_t c = 0; c < C; ++c) {
      start[c + 1] = start[c] + count[c];
      present += count[c] > 0;
      multi += count[c] > 1;
    }
    std::vector<int64_t> fill(start, start + C + 1);  // fill[C]: the next ignored position
    for (int64_t i = 0; i < B; ++i) {
      const int64_t c = valid[i] ? y[i] : C;
      key[fill[c]] = c;
      perm[fill[c]++] = i;
    }
    L.teacher_row = at::empty({C}, lopts);
    int64_t* trow = L.teacher_row.mutable_data_ptr<int64_t>();
    for (int64_t c = 0, next = 0; c < C; ++c) trow[c] = count[c] > 0 ? next++ : -1;
    L.classes_present = at::scalar_tensor(present, lopts);
    L.classes_multi = at::scalar_tensor(multi, lopts);
    L.valid_rows = at::scalar_tensor(start[C], lopts);
    L.bad_labels = at::scalar_tensor(false, lopts.dtype(at::kBool));  // rejected above
    return L;
  }

  // The ignored rows sort last: the chunk loops stop at the valid ones.
  static int64_t active_rows(const idid::Layout& L) { return valid_rows(L); }

  template <typename A>
  static Tensor sample_weights(const Tensor& labels, const idid::Layout& L, bool class_balanced) {
    const int64_t B = L.batch;
    const int64_t* y = labels.const_data_ptr<int64_t>();
    const bool* valid = L.valid.const_data_ptr<bool>();
    const int64_t* count = L.count.const_data_ptr<int64_t>();
    const int64_t present = L.classes_present.item<int64_t>(), rows = valid_rows(L);
    Tensor a_t = at::empty({B}, labels.options().dtype(c10::CppTypeToScalarType<A>::value));
    A* a = a_t.mutable_data_ptr<A>();
    for (int64_t i = 0; i < B; ++i) a[i] = valid[i] ? sample_weight<A>(class_balanced, count[y[i]], present, rows) : A(0);
    return a_t;
  }

  // The scalar terms on the host, as idid::AtenPolicy::loss_terms: L_IC summed in batch order in float64.
  template <typename A>
  static std::tuple<Tensor, Tensor, Tensor, Tensor> loss_terms(const Tensor& row_stats, const Tensor& density,
                                                               const idid::Layout& L, const idid::Config& cfg,
                                                               at::ScalarType dtype) {
    const int64_t B = L.batch, C = L.num_classes;
    const A* st = row_stats.const_data_ptr<A>();
    double l_ic = 0;
    for (int64_t i = 0; i < B; ++i) {
      l_ic += static_cast<double>(st[kStatA * B + i]) *
              (static_cast<double>(st[kStatCe * B + i]) + static_cast<double>(st[kStatKd * B + i]));
    }
    double l_id = 0, lam = 0;
    if (density.defined()) {
      const int64_t K2 = L.classes_multi.item<int64_t>();
      const A* dens = density.const_data_ptr<A>();
      A total = 0;
      for (int64_t c = 0; c < C; ++c) total += dens[c];
      if (K2 > 0) l_id = static_cast<double>(total / static_cast<A>(K2));
      lam = cfg.adaptive_weight ? (K2 > 0 ? l_ic / (l_id + cfg.eps) : 0.0) : cfg.diversity_weight;
    }
    const auto opts = row_stats.options().dtype(dtype);
    return {at::scalar_tensor(l_ic + lam * l_id, opts), at::scalar_tensor(l_ic, opts), at::scalar_tensor(l_id, opts),
            at::scalar_tensor(lam, opts)};
  }

  template <typename A>
  static Tensor row_norms(const Tensor& x) {
    Tensor norm = at::empty({x.size(0)}, x.options());
    idid_kernels::row_norms(x.const_data_ptr<A>(), x.size(0), x.size(1), norm.mutable_data_ptr<A>());
    return norm;
  }

  // Sorted: the valid rows in label order, then zero rows for the ignored positions.
  template <typename A>
  static Tensor unit_rows(const Tensor& x, const Tensor& norm, const idid::Layout* sorted, double scale) {
    const int64_t n = x.size(0), d = x.size(1);
    Tensor u = at::empty({n, d}, x.options());
    const int64_t active = sorted ? valid_rows(*sorted) : n;
    idid_kernels::unit_rows(x.const_data_ptr<A>(), norm.const_data_ptr<A>(),
                            sorted ? sorted->perm.const_data_ptr<int64_t>() : nullptr, active, d,
                            static_cast<A>(scale), u.mutable_data_ptr<A>());
    if (active < n) u.narrow(0, active, n - active).zero_();
    return u;
  }

  // Sorted: the valid rows' gradients scattered to their batch rows, 0 on ignored rows.
  template <typename A>
  static Tensor normalize_backward(const Tensor& g, const Tensor& u, const Tensor& norm, const idid::Layout* sorted,
                                   at::ScalarType dtype) {
    const int64_t n = u.size(0), d = u.size(1);
    const int64_t active = sorted ? valid_rows(*sorted) : n;
    Tensor out = active < n ? at::zeros({n, d}, u.options().dtype(dtype)) : at::empty({n, d}, u.options().dtype(dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "idid_normalize_backward", [&] {
      idid_kernels::normalize_backward(g.const_data_ptr<A>(), u.const_data_ptr<A>(), norm.const_data_ptr<A>(),
                                       sorted ? sorted->perm.const_data_ptr<int64_t>() : nullptr, active, d,
                                       out.mutable_data_ptr<scalar_t>());
    });
    return out;
  }

  template <typename A>
  static std::tuple<Tensor, Tensor> teacher(const Tensor& theta, const idid::Layout& L, bool whole) {
    const int64_t C = L.num_classes;
    Tensor log_r = at::empty({C, C}, theta.options()), r = at::empty({present_count(L), C}, theta.options());
    teacher_rows(theta.const_data_ptr<A>(), L.count.const_data_ptr<int64_t>(), L.teacher_row.const_data_ptr<int64_t>(),
                 C, whole, log_r.mutable_data_ptr<A>(), r.mutable_data_ptr<A>());
    return {log_r, r};
  }

  // dPhi: zeros, one row per present class (teacher_row), the only ones the gradient pass
  // accumulates into and symmetrize_grad reads. min(B, C) rows (at least the P present classes, and
  // a shape known without reading the labels: the fused op returns it), the rows past P zero.
  template <typename A>
  static Tensor teacher_grad(const idid::Layout& L, const at::TensorOptions& opts) {
    const int64_t C = L.num_classes;
    Tensor dphi = at::empty({std::min(L.batch, C), C}, opts);
    A* p = dphi.mutable_data_ptr<A>();
    at::parallel_for(0, dphi.size(0), grain_rows(C), [&](int64_t begin, int64_t end) {
      std::fill(p + begin * C, p + end * C, A(0));
    });
    return dphi;
  }

  // r = exp(log r) on the present rows (row teacher_row[k]), 0 on the diagonal.
  template <typename A>
  static Tensor teacher_probs(const Tensor& log_r_t, const idid::Layout& L) {
    const int64_t C = L.num_classes;
    const int64_t* count = L.count.const_data_ptr<int64_t>();
    const int64_t* trow = L.teacher_row.const_data_ptr<int64_t>();
    Tensor r_t = at::empty({present_count(L), C}, log_r_t.options());
    const A* log_r = log_r_t.const_data_ptr<A>();
    A* r = r_t.mutable_data_ptr<A>();
    at::parallel_for(0, C, grain_rows(C), [&](int64_t begin, int64_t end) {
      for (int64_t k = begin; k < end; ++k) {
        if (count[k] == 0) continue;
        A* rk = r + trow[k] * C;
        cpu::vexp(log_r + k * C, rk, C, A(1), A(0));
        rk[k] = 0;
      }
    });
    return r_t;
  }

  // The chunks hold valid rows only (active_rows), so every key is a class.
  template <typename A>
  static void forward_rows(const IdidChunk<A>& job) {
    at::parallel_for(0, job.rows, grain_rows(4 * job.num_classes), [&](int64_t begin, int64_t end) {
      for (int64_t jj = begin; jj < end; ++jj) forward_row_stats(job, jj);
    });
  }

  template <typename A>
  static void grad_rows(const IdidChunk<A>& job) {
    const A gi = *job.grad_ic;
    // Parallel over class blocks, rows in order within each: dphi row k gets its rows' terms
    // in sorted (for a class: batch) order whatever the thread count.
    at::parallel_for(0, job.num_classes, grain_rows(job.rows), [&](int64_t c0, int64_t c1) {
      const cpu::FlushSubnormals no_subnormals;  // G feeds the backward GEMMs (fp_env.h)
      for (int64_t jj = 0; jj < job.rows; ++jj) grad_row_cols(job, jj, c0, c1, gi);
    });
  }

  // Row jj of the chunk: its forward_row statistics, stored in the stats rows.
  template <typename A>
  static void forward_row_stats(const IdidChunk<A>& job, int64_t jj) {
    const int64_t C = job.num_classes, B = job.batch;
    const int64_t j = job.j0 + jj, k = job.key[j];
    const int64_t i = job.perm[j];
    const RowStats<A> s = forward_row(job.z + jj * C, C, k, job.distillation, job.inv_tau, job.unit_tau,
                                      job.distillation ? job.r + job.teacher_row[k] * C : nullptr,
                                      job.distillation ? job.log_r + k * C : nullptr);
    job.stats[kStatLse * B + i] = s.lse;
    job.stats[kStatLseNt * B + i] = s.lse_nt;
    job.stats[kStatKd * B + i] = s.kd;
    job.stats[kStatCe * B + i] = s.ce;
  }

  // Columns [c0, c1) of row jj's gradient from its stored statistics: z <- G there, dPhi
  // accumulated (distillation), the target column p_ik - 1 where it lies in the range.
  template <typename A>
  static void grad_row_cols(const IdidChunk<A>& job, int64_t jj, int64_t c0, int64_t c1, A gi) {
    const int64_t C = job.num_classes, B = job.batch;
    const A* st = job.stats;
    const int64_t j = job.j0 + jj, k = job.key[j];
    A* z = job.z + jj * C;
    const int64_t i = job.perm[j];
    const A aj = st[kStatA * B + i], lse = st[kStatLse * B + i];
    if (job.distillation) {
      const A lse_nt = st[kStatLseNt * B + i];
      const cpu::IcRow<A> row{lse,   lse_nt, job.inv_tau, gi * aj, aj, lse_nt - st[kStatKd * B + i],
                              job.unit_tau ? std::exp(lse_nt - lse) : A(0), job.unit_tau};
      const int64_t tk = job.teacher_row[k] * C;
      cpu::ic_grad_distill(z + c0, job.r + tk + c0, job.log_r + k * C + c0, job.dphi + tk + c0, c1 - c0, row);
    } else {
      cpu::ic_grad_plain(z + c0, c1 - c0, lse, gi * aj);
    }
    if (c0 <= k && k < c1) z[k] = gi * aj * std::expm1(-st[kStatCe * B + i]);  // p_ik - 1
  }

  // The fused op's row pass: per row, the statistics then the gradient, while the row is in L1.
  // Parallel over rows, each task owning whole class runs (the runs that start in its range of
  // the chunk), so every dPhi row is accumulated by one thread in sorted order: the same bits as
  // forward_rows + grad_rows for any thread count. A chunk with a run longer than an eighth of
  // its rows (a dominant class, which would serialise here) takes those two passes instead.
  template <typename A>
  static void forward_grad_rows(const IdidChunk<A>& job) {
    const int64_t C = job.num_classes, rows = job.rows;
    int64_t longest = 0;
    for (int64_t jj = 0, run = 0; jj < rows; ++jj) {
      run = (jj > 0 && job.key[job.j0 + jj] == job.key[job.j0 + jj - 1]) ? run + 1 : 1;
      longest = std::max(longest, run);
    }
    if (8 * longest > rows && rows >= 16) {
      forward_rows<A>(job);
      grad_rows<A>(job);
      return;
    }
    const A gi = *job.grad_ic;
    at::parallel_for(0, rows, grain_rows(4 * C), [&](int64_t begin, int64_t end) {
      const cpu::FlushSubnormals no_subnormals;  // G feeds the backward GEMMs (fp_env.h)
      const int64_t* key = job.key + job.j0;
      int64_t jj = begin;
      while (jj > 0 && jj < rows && key[jj] == key[jj - 1]) ++jj;  // that run belongs to the task before
      for (; jj < rows && (jj < end || key[jj] == key[jj - 1]); ++jj) {
        forward_row_stats(job, jj);
        grad_row_cols(job, jj, 0, C, gi);
      }
    });
  }

  // D_c = sum_{i != j same class} kappa_ij / (n_c (n_c - 1)) for n_c >= 2, else 0.
  template <typename A>
  static Tensor class_density(const Tensor& U, const idid::Layout& L, A t, int64_t chunk_rows) {
    const int64_t C = L.num_classes, d = U.size(1);
    const int64_t* start = L.start.const_data_ptr<int64_t>();
    const A* u = U.const_data_ptr<A>();
    Tensor density_t = at::zeros({C}, U.options());
    A* density = density_t.mutable_data_ptr<A>();
    std::vector<int64_t> small, large;
    multi_classes(start, C, small, large);

    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
      for (int64_t s = begin; s < end; ++s) {
        const int64_t c = small[s], n = start[c + 1] - start[c];
        const A* uc = u + start[c] * d;
        A sum = 0;
        for (int64_t a = 0; a < n; ++a) {
          for (int64_t b = a + 1; b < n; ++b) {
            sum += std::exp(diversity_exponent(cpu::vdot(uc + a * d, uc + b * d, d), t));
          }
        }
        density[c] = 2 * sum / static_cast<A>(n * (n - 1));
      }
    });

    for (const int64_t c : large) {
      const int64_t n = start[c + 1] - start[c];
      const Tensor Uc = U.narrow(0, start[c], n);
      const int64_t block = idid::chunk_rows_for(chunk_rows, n, sizeof(A), n);
      Tensor gram = at::empty({block, n}, U.options());
      std::vector<A> row_sum(n);
      for (int64_t i0 = 0; i0 < n; i0 += block) {
        const int64_t rows = std::min(block, n - i0);
        Tensor g = gram.narrow(0, 0, rows);
        cpu::mm_out(g, Uc.narrow(0, i0, rows), Uc.t());
        const A* gp = g.const_data_ptr<A>();
        at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
          for (int64_t ii = begin; ii < end; ++ii) {
            const A* row = gp + ii * n;
            const int64_t i = i0 + ii;  // skip the diagonal j == i
            row_sum[i] = cpu::vsum_kappa(row, i, t) + cpu::vsum_kappa(row + i + 1, n - i - 1, t);
          }
        });
      }
      A sum = 0;
      for (int64_t i = 0; i < n; ++i) sum += row_sum[i];
      density[c] = sum / static_cast<A>(n * (n - 1));
    }
    return density_t;
  }

  // dU_i += grad_id * 2t / (K_2 n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j.
  template <typename A>
  static void diversity_backward(const Tensor& U, const idid::Layout& L, A t, const Tensor& grad_id,
                                 int64_t chunk_rows, Tensor& dU_t) {
    const int64_t C = L.num_classes, d = U.size(1);
    const int64_t* start = L.start.const_data_ptr<int64_t>();
    const int64_t K2 = L.classes_multi.item<int64_t>();
    const A gd = grad_id.item<A>();
    const A* u = U.const_data_ptr<A>();
    A* dU = dU_t.mutable_data_ptr<A>();
    std::vector<int64_t> small, large;
    multi_classes(start, C, small, large);

    at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
      A kappa[kSmallClass * kSmallClass];
      for (int64_t s = begin; s < end; ++s) {
        const int64_t c = small[s], n = start[c + 1] - start[c];
        const A* uc = u + start[c] * d;
        const A coef = gd * diversity_grad_coef(t, K2, n);
        for (int64_t a = 0; a < n; ++a) {
          kappa[a * n + a] = 0;
          for (int64_t b = a + 1; b < n; ++b) {
            const A k = std::exp(diversity_exponent(cpu::vdot(uc + a * d, uc + b * d, d), t));
            kappa[a * n + b] = k;
            kappa[b * n + a] = k;
          }
        }
        for (int64_t a = 0; a < n; ++a) {
          A* out = dU + (start[c] + a) * d;
          for (int64_t b = 0; b < n; ++b) {
            if (b == a) continue;
            const A w = coef * kappa[a * n + b];
            const A* ub = uc + b * d;
            for (int64_t k = 0; k < d; ++k) out[k] += w * ub[k];
          }
        }
      }
    });

    for (const int64_t c : large) {
      const int64_t n = start[c + 1] - start[c];
      const A coef = gd * diversity_grad_coef(t, K2, n);
      const Tensor Uc = U.narrow(0, start[c], n);
      const int64_t block = idid::chunk_rows_for(chunk_rows, n, sizeof(A), n);
      Tensor gram = at::empty({block, n}, U.options());
      Tensor pull = at::empty({block, d}, U.options());
      for (int64_t i0 = 0; i0 < n; i0 += block) {
        const int64_t rows = std::min(block, n - i0);
        Tensor g = gram.narrow(0, 0, rows);
        cpu::mm_out(g, Uc.narrow(0, i0, rows), Uc.t());
        A* gp = g.mutable_data_ptr<A>();
        at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
          for (int64_t ii = begin; ii < end; ++ii) {
            cpu::vkappa(gp + ii * n, n, t);
            gp[ii * n + i0 + ii] = 0;
          }
        });
        Tensor h = pull.narrow(0, 0, rows);
        cpu::mm_out(h, g, Uc);
        const A* hp = h.const_data_ptr<A>();
        at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
          for (int64_t ii = begin; ii < end; ++ii) {
            A* out = dU + (start[c] + i0 + ii) * d;
            const A* hr = hp + ii * d;
            for (int64_t k = 0; k < d; ++k) out[k] += coef * hr[k];
          }
        });
      }
    }
  }

  // dTheta = grad_ic (dPhi + dPhi^T) / 2, the upstream coefficient applied here once. The diagonal
  // of the similarity takes no part in the loss: its gradient is exactly 0 (also where dPhi holds
  // NaN from NaN features, which would otherwise land there as 0 * NaN).
  template <typename A>
  static Tensor symmetrize_grad(const Tensor& dphi, const Tensor& grad_ic, const idid::Layout& L,
                                at::ScalarType dtype) {
    const int64_t C = L.num_classes;
    TORCH_CHECK(dphi.dim() == 2 && dphi.size(0) >= present_count(L) && dphi.size(1) == C,
                "idid_loss: the teacher gradient must hold a row for each of the ", present_count(L),
                " classes present, (rows, ", C, "), got ", dphi.sizes());
    Tensor out = at::empty({C, C}, dphi.options().dtype(dtype));
    const A scale = static_cast<A>(0.5) * grad_ic.item<A>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "idid_symmetrize_grad", [&] {
      symmetrize_present(dphi.const_data_ptr<A>(), C, scale, L.count.const_data_ptr<int64_t>(),
                         L.teacher_row.const_data_ptr<int64_t>(), out.mutable_data_ptr<scalar_t>());
    });
    return out;
  }

  // A CPU scalar is read for free: skip a pass whose upstream coefficient is zero.
  static bool may_be_nonzero(const Tensor& scalar) { return scalar.item<double>() != 0.0; }
};

using CpuOps = idid::IdidOps<CpuPolicy>;

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("idid_loss_forward", &CpuOps::forward);
  m.impl("idid_loss_backward", &CpuOps::backward);
  m.impl("idid_loss_fused", &CpuOps::fused);
  m.impl("idid_loss_fused_backward", &CpuOps::fused_backward);
}

}  // namespace idid_kernels
