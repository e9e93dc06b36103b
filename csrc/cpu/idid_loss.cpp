// CPU kernels of the IDID-R1 loss (spec/idid.md; oracle: idid_kernels/reference/idid.py, analytic
// backward: reference/grads.py idid_backward).
//
// Forward: the logits z = alpha U V^T are formed one chunk of rows at a time (a BLAS GEMM into a
// buffer of at most ~32 MB, never the whole (B, C) matrix), and one fused pass per row computes
// lse_i = logsumexp_c z_ic, lse_nt_i = logsumexp_{c != y_i} z_ic / tau and the distillation
// kd_i = sum_c r_{y_i c} (log r_{y_i c} - z_ic / tau) + lse_nt_i against the teacher r (C x C,
// computed once for the classes present). The diversity term works on same-label rows only: rows
// are bucketed by label (counting sort) and each class's n_c x n_c Gram is formed (pairwise dots
// for small classes, GEMM blocks for large ones). Saved for backward: per-row (a, lse, lse_nt, kd, ce),
// the row norms of x and of the proxies, and log r.
//
// Backward recomputes each chunk's GEMM and overwrites it in place with
// G_ic = g a_i [p_ic - Y_ic + (q_ic - r_ic) / tau] in one pass parallel over column blocks (each
// thread owns a block of classes and walks the rows in order, so the teacher gradient
// dPhi_{y_i c} += a_i r (log r - log q_ic - kd_i) is accumulated without races, in a fixed order:
// bitwise reproducible for any thread count). Then dU = alpha G V (GEMM) and dV += alpha G^T U
// (GEMM into a C x d accumulator), the diversity pull h_i per class, and the F.normalize backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../common/idid_math.h"
#include "../common/macros.h"
#include "checks.h"
#include "vec_math.h"

namespace idid_kernels {
namespace {

// Default memory budget of one logits chunk (rows x C accumulation-dtype values) and of one block
// of a large class's Gram matrix.
constexpr int64_t kChunkBytes = int64_t{32} << 20;
// Classes with at most this many rows get their Gram by pairwise dots (no GEMM call overhead).
constexpr int64_t kSmallClass = 32;
// Rows of the saved per-row statistics: a_i, lse_i, lse_nt_i, kd_i, ce_i.
constexpr int64_t kRowStats = 5;
// Elements of work per parallel task, to amortise the scheduling.
constexpr int64_t kGrainElems = 32768;

using at::Tensor;

int64_t grain_rows(int64_t row_len) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(row_len, 1)); }

// Rows per chunk: the caller's override when positive, else what fits the budget.
int64_t chunk_rows_for(int64_t chunk_rows, int64_t row_len, int64_t elem_size, int64_t total) {
  int64_t rows = chunk_rows > 0 ? chunk_rows : kChunkBytes / std::max<int64_t>(row_len * elem_size, 1);
  return std::max<int64_t>(1, std::min(rows, std::max<int64_t>(total, 1)));
}

// Labels bucketed by class. "Compact" index j numbers the rows that are not ignored, in batch
// order; rows[j] is the batch row, label[j] its class.
struct Layout {
  int64_t num_classes = 0;
  std::vector<int64_t> rows, label;
  std::vector<int64_t> count;    // n_c
  std::vector<int64_t> start;    // C + 1 offsets into bucket
  std::vector<int64_t> bucket;   // compact indices grouped by class, ascending within a class
  std::vector<int64_t> present;  // classes with n_c >= 1 (K_B of them)
  std::vector<int64_t> multi;    // classes with n_c >= 2 (K_2 of them)
  int64_t valid() const { return static_cast<int64_t>(rows.size()); }
};

Layout make_layout(const Tensor& labels_in, int64_t num_classes, int64_t ignore_index) {
  const Tensor labels = labels_in.contiguous();
  const int64_t n = labels.size(0);
  const int64_t* y = labels.const_data_ptr<int64_t>();
  Layout L;
  L.num_classes = num_classes;
  L.count.assign(num_classes, 0);
  for (int64_t i = 0; i < n; ++i) {
    if (y[i] == ignore_index) continue;
    TORCH_CHECK(y[i] >= 0 && y[i] < num_classes, "idid_loss: label ", y[i], " at row ", i, " is outside [0, ",
                num_classes, ") and is not ignore_index (", ignore_index, ")");
    L.rows.push_back(i);
    L.label.push_back(y[i]);
    ++L.count[y[i]];
  }
  L.start.assign(num_classes + 1, 0);
  for (int64_t c = 0; c < num_classes; ++c) {
    L.start[c + 1] = L.start[c] + L.count[c];
    if (L.count[c] >= 1) L.present.push_back(c);
    if (L.count[c] >= 2) L.multi.push_back(c);
  }
  std::vector<int64_t> fill(L.start.begin(), L.start.end() - 1);
  L.bucket.resize(L.rows.size());
  for (int64_t j = 0; j < L.valid(); ++j) L.bucket[fill[L.label[j]]++] = j;
  return L;
}

template <typename A>
void row_norms(const A* x, int64_t n, int64_t d, A* out) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) out[i] = std::sqrt(cpu::vdot(x + i * d, x + i * d, d));
  });
}

// unit[j] = scale * x[src] / max(||x[src]||, 1e-12), src = rows ? rows[j] : j (F.normalize).
template <typename A>
void unit_rows(const A* x, const A* norms, const int64_t* rows, int64_t n, int64_t d, A scale, A* unit) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t src = rows ? rows[j] : j;
      const A inv = scale / std::max(norms[src], static_cast<A>(kNormEps));
      const A* xr = x + src * d;
      A* ur = unit + j * d;
      for (int64_t k = 0; k < d; ++k) ur[k] = xr[k] * inv;
    }
  });
}

// F.normalize backward: out[dst] = (g - <g, u> u) / max(r, 1e-12), the radial term dropped where
// r <= 1e-12 (there the denominator is the constant floor). dst = rows ? rows[j] : j.
template <typename scalar_t, typename A>
void normalize_backward(const A* grad_u, const A* unit, const A* norms, const int64_t* rows, int64_t n, int64_t d,
                        scalar_t* out) {
  at::parallel_for(0, n, grain_rows(d), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const int64_t dst = rows ? rows[j] : j;
      const A r = norms[dst];
      const A* g = grad_u + j * d;
      const A* u = unit + j * d;
      const A radial = r > static_cast<A>(kNormEps) ? cpu::vdot(g, u, d) : A(0);
      const A inv = A(1) / std::max(r, static_cast<A>(kNormEps));
      scalar_t* o = out + dst * d;
      for (int64_t k = 0; k < d; ++k) o[k] = static_cast<scalar_t>((g[k] - radial * u[k]) * inv);
    }
  });
}

// out[k][c] = scale (m[k][c] + m[c][k]) for the rows k with keep(k) (all rows when keep is null),
// in 32 x 32 tiles so that the transposed reads stay in L1 (a row-by-row pass reads a column with
// a page stride). Exactly symmetric: the sum commutes.
template <typename A, typename Out>
void symmetrize(const A* m, int64_t C, A scale, const int64_t* keep, Out* out) {
  constexpr int64_t kTile = 32;
  const int64_t tiles = (C + kTile - 1) / kTile;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tk = begin; tk < end; ++tk) {
      const int64_t k0 = tk * kTile, k1 = std::min(C, k0 + kTile);
      for (int64_t c0 = 0; c0 < C; c0 += kTile) {
        const int64_t c1 = std::min(C, c0 + kTile);
        for (int64_t k = k0; k < k1; ++k) {
          if (keep != nullptr && keep[k] == 0) continue;
          const A* row = m + k * C;
          Out* o = out + k * C;
          for (int64_t c = c0; c < c1; ++c) o[c] = static_cast<Out>(scale * (row[c] + m[c * C + k]));
        }
      }
    }
  });
}

// Teacher rows: log r_kc = Phi_kc - logsumexp_{c' != k} Phi_kc', Phi = (Theta + Theta^T) / 2, for
// the classes present (the only rows the loss reads); log r_kk = 0 and r_kk = 0 (the diagonal takes
// no part); log r of absent classes is 0 and their r rows are left unwritten.
template <typename A>
void teacher_rows(const A* theta, const Layout& L, A* log_r, A* r) {
  const int64_t C = L.num_classes;
  symmetrize(theta, C, A(0.5), L.count.data(), log_r);  // Phi rows of the present classes
  at::parallel_for(0, C, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      A* lr = log_r + k * C;
      if (L.count[k] == 0) {
        std::fill(lr, lr + C, A(0));
        continue;
      }
      const A m = std::max(cpu::vmax(lr, k), cpu::vmax(lr + k + 1, C - k - 1));
      const A lse = m + std::log(cpu::vsum_exp(lr, k, A(1), m) + cpu::vsum_exp(lr + k + 1, C - k - 1, A(1), m));
      for (int64_t c = 0; c < C; ++c) lr[c] -= lse;
      lr[k] = 0;
      if (r != nullptr) {
        cpu::vexp(lr, r + k * C, C, A(1), A(0));
        r[k * C + k] = 0;
      }
    }
  });
}

// r = exp(log r) on the present rows, 0 on the diagonal and elsewhere.
template <typename A>
void teacher_probs(const A* log_r, const Layout& L, A* r) {
  const int64_t C = L.num_classes;
  const int64_t K = static_cast<int64_t>(L.present.size());
  at::parallel_for(0, K, grain_rows(C), [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = L.present[p];
      cpu::vexp(log_r + k * C, r + k * C, C, A(1), A(0));
      r[k * C + k] = 0;
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

// Rows of each class with n_c >= 2, as an (n_c, d) matrix of unit rows (bucket order).
Tensor class_rows(const Tensor& U, const Layout& L, int64_t c) {
  const int64_t n = L.count[c];
  const Tensor idx = at::from_blob(const_cast<int64_t*>(L.bucket.data() + L.start[c]), {n}, at::kLong);
  return U.index_select(0, idx);
}

// L_ID = mean over classes with n_c >= 2 of D_c = sum_{i != j same class} kappa_ij / (n_c (n_c - 1)).
template <typename A>
A diversity_forward(const Tensor& U, const Layout& L, A t, int64_t chunk_rows) {
  const int64_t d = U.size(1);
  const A* u = U.const_data_ptr<A>();
  const int64_t K2 = static_cast<int64_t>(L.multi.size());
  if (K2 == 0) return A(0);
  std::vector<A> density(K2, A(0));
  std::vector<int64_t> small, large;
  for (int64_t m = 0; m < K2; ++m) (L.count[L.multi[m]] <= kSmallClass ? small : large).push_back(m);

  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t s = begin; s < end; ++s) {
      const int64_t m = small[s], c = L.multi[m], n = L.count[c];
      const int64_t* members = L.bucket.data() + L.start[c];
      A sum = 0;
      for (int64_t a = 0; a < n; ++a) {
        for (int64_t b = a + 1; b < n; ++b) {
          sum += std::exp(diversity_exponent(cpu::vdot(u + members[a] * d, u + members[b] * d, d), t));
        }
      }
      density[m] = 2 * sum / static_cast<A>(n * (n - 1));
    }
  });

  for (const int64_t m : large) {
    const int64_t c = L.multi[m], n = L.count[c];
    const Tensor Uc = class_rows(U, L, c);
    const int64_t block = chunk_rows_for(chunk_rows, n, sizeof(A), n);
    Tensor gram = at::empty({block, n}, U.options());
    std::vector<A> row_sum(n);
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t rows = std::min(block, n - i0);
      Tensor g = gram.narrow(0, 0, rows);
      at::mm_out(g, Uc.narrow(0, i0, rows), Uc.t());
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
    density[m] = sum / static_cast<A>(n * (n - 1));
  }
  A total = 0;
  for (int64_t m = 0; m < K2; ++m) total += density[m];
  return total / static_cast<A>(K2);
}

// dU_i += grad_id * 2t / (K_2 n_c (n_c - 1)) sum_{j same class, j != i} kappa_ij u_j.
template <typename A>
void diversity_backward(const Tensor& U, const Layout& L, A t, A grad_id, int64_t chunk_rows, A* dU) {
  const int64_t d = U.size(1);
  const A* u = U.const_data_ptr<A>();
  const int64_t K2 = static_cast<int64_t>(L.multi.size());
  std::vector<int64_t> small, large;
  for (int64_t m = 0; m < K2; ++m) (L.count[L.multi[m]] <= kSmallClass ? small : large).push_back(m);

  at::parallel_for(0, static_cast<int64_t>(small.size()), 1, [&](int64_t begin, int64_t end) {
    A kappa[kSmallClass * kSmallClass];
    for (int64_t s = begin; s < end; ++s) {
      const int64_t c = L.multi[small[s]], n = L.count[c];
      const int64_t* members = L.bucket.data() + L.start[c];
      const A coef = grad_id * diversity_grad_coef(t, K2, n);
      for (int64_t a = 0; a < n; ++a) {
        kappa[a * n + a] = 0;
        for (int64_t b = a + 1; b < n; ++b) {
          const A k = std::exp(diversity_exponent(cpu::vdot(u + members[a] * d, u + members[b] * d, d), t));
          kappa[a * n + b] = k;
          kappa[b * n + a] = k;
        }
      }
      for (int64_t a = 0; a < n; ++a) {
        A* out = dU + members[a] * d;
        for (int64_t b = 0; b < n; ++b) {
          if (b == a) continue;
          const A w = coef * kappa[a * n + b];
          const A* ub = u + members[b] * d;
          for (int64_t k = 0; k < d; ++k) out[k] += w * ub[k];
        }
      }
    }
  });

  for (const int64_t m : large) {
    const int64_t c = L.multi[m], n = L.count[c];
    const int64_t* members = L.bucket.data() + L.start[c];
    const A coef = grad_id * diversity_grad_coef(t, K2, n);
    const Tensor Uc = class_rows(U, L, c);
    const int64_t block = chunk_rows_for(chunk_rows, n, sizeof(A), n);
    Tensor gram = at::empty({block, n}, U.options());
    Tensor pull = at::empty({block, d}, U.options());
    for (int64_t i0 = 0; i0 < n; i0 += block) {
      const int64_t rows = std::min(block, n - i0);
      Tensor g = gram.narrow(0, 0, rows);
      at::mm_out(g, Uc.narrow(0, i0, rows), Uc.t());
      A* gp = g.mutable_data_ptr<A>();
      at::parallel_for(0, rows, grain_rows(n), [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          cpu::vkappa(gp + ii * n, n, t);
          gp[ii * n + i0 + ii] = 0;
        }
      });
      Tensor h = pull.narrow(0, 0, rows);
      at::mm_out(h, g, Uc);
      const A* hp = h.const_data_ptr<A>();
      at::parallel_for(0, rows, grain_rows(d), [&](int64_t begin, int64_t end) {
        for (int64_t ii = begin; ii < end; ++ii) {
          A* out = dU + members[i0 + ii] * d;
          const A* hr = hp + ii * d;
          for (int64_t k = 0; k < d; ++k) out[k] += coef * hr[k];
        }
      });
    }
  }
}

void check_inputs(const Tensor& x, const Tensor& proxies, const Tensor& labels) {
  check_2d_float("x", x);
  check_2d_float("proxies", proxies);
  TORCH_CHECK(proxies.size(1) == x.size(1), "idid_loss: proxies must have ", x.size(1), " columns, got ",
              proxies.sizes());
  TORCH_CHECK(proxies.size(0) >= 2, "idid_loss: needs C >= 2 classes, got ", proxies.size(0));
  TORCH_CHECK(proxies.scalar_type() == x.scalar_type(), "idid_loss: proxies dtype ", proxies.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0), "idid_loss: labels must be (", x.size(0),
              ",), got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong, "idid_loss: labels must be int64, got ", labels.scalar_type());
}

at::ScalarType acc_dtype_of(const Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

template <typename A>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Tensor& x_in, const Tensor& proxies_in, const Tensor& similarity_in, const Tensor& labels, double alpha,
    double tau, double t, double eps, bool distillation, bool diversity, bool adaptive_weight,
    double diversity_weight, bool class_balanced, int64_t ignore_index, int64_t chunk_rows) {
  const auto acc = acc_dtype_of(x_in);
  const auto opts = x_in.options().dtype(acc);
  const Tensor x = x_in.to(acc).contiguous();
  const Tensor w = proxies_in.to(acc).contiguous();
  const int64_t B = x.size(0), d = x.size(1), C = w.size(0);
  const Layout L = make_layout(labels, C, ignore_index);
  const int64_t Bv = L.valid();
  const int64_t K_B = static_cast<int64_t>(L.present.size());

  Tensor x_norm = at::empty({B}, opts), w_norm = at::empty({C}, opts);
  row_norms(x.const_data_ptr<A>(), B, d, x_norm.mutable_data_ptr<A>());
  row_norms(w.const_data_ptr<A>(), C, d, w_norm.mutable_data_ptr<A>());
  Tensor U = at::empty({Bv, d}, opts), Va = at::empty({C, d}, opts);
  unit_rows(x.const_data_ptr<A>(), x_norm.const_data_ptr<A>(), L.rows.data(), Bv, d, A(1), U.mutable_data_ptr<A>());
  unit_rows(w.const_data_ptr<A>(), w_norm.const_data_ptr<A>(), nullptr, C, d, static_cast<A>(alpha),
            Va.mutable_data_ptr<A>());

  Tensor log_r = at::empty(distillation ? at::IntArrayRef{C, C} : at::IntArrayRef{0, 0}, opts);
  Tensor r = distillation ? at::empty({C, C}, opts) : Tensor();
  if (distillation) {
    const Tensor theta = similarity_in.to(acc).contiguous();
    teacher_rows(theta.const_data_ptr<A>(), L, log_r.mutable_data_ptr<A>(), r.mutable_data_ptr<A>());
  }
  const A* lr = distillation ? log_r.const_data_ptr<A>() : nullptr;
  const A* rp = distillation ? r.const_data_ptr<A>() : nullptr;

  std::vector<A> a(Bv), lse(Bv), lse_nt(Bv), kd(Bv), ce(Bv);
  for (int64_t j = 0; j < Bv; ++j) a[j] = sample_weight<A>(class_balanced, L.count[L.label[j]], K_B, Bv);

  const A inv_tau = static_cast<A>(1.0 / tau);
  const bool unit_tau = tau == 1.0;
  const int64_t chunk = chunk_rows_for(chunk_rows, C, sizeof(A), Bv);
  Tensor zbuf = at::empty({Bv > 0 ? chunk : 0, C}, opts);
  for (int64_t j0 = 0; j0 < Bv; j0 += chunk) {
    const int64_t rows = std::min(chunk, Bv - j0);
    Tensor zc = zbuf.narrow(0, 0, rows);
    at::mm_out(zc, U.narrow(0, j0, rows), Va.t());
    const A* zp = zc.const_data_ptr<A>();
    at::parallel_for(0, rows, grain_rows(4 * C), [&](int64_t begin, int64_t end) {
      for (int64_t jj = begin; jj < end; ++jj) {
        const int64_t j = j0 + jj, k = L.label[j];
        const A* z = zp + jj * C;
        const RowStats<A> s = forward_row(z, C, k, distillation, inv_tau, unit_tau,
                                          distillation ? rp + k * C : nullptr, distillation ? lr + k * C : nullptr);
        lse[j] = s.lse;
        lse_nt[j] = s.lse_nt;
        kd[j] = s.kd;
        ce[j] = s.ce;
      }
    });
  }

  double l_ic = 0;  // B terms: summed in batch order, in double
  for (int64_t j = 0; j < Bv; ++j) l_ic += static_cast<double>(a[j]) * (static_cast<double>(ce[j]) + kd[j]);
  double l_id = 0, lam = 0;
  if (diversity) {
    l_id = diversity_forward<A>(U, L, static_cast<A>(t), chunk_rows);
    if (adaptive_weight) {
      lam = L.multi.empty() ? 0.0 : l_ic / (l_id + eps);
    } else {
      lam = diversity_weight;
    }
  }

  Tensor row_stats = at::zeros({kRowStats, B}, opts);
  A* st = row_stats.mutable_data_ptr<A>();
  for (int64_t j = 0; j < Bv; ++j) {
    const int64_t i = L.rows[j];
    st[i] = a[j];
    st[B + i] = lse[j];
    st[2 * B + i] = lse_nt[j];
    st[3 * B + i] = kd[j];
    st[4 * B + i] = ce[j];
  }
  const auto out_opts = x_in.options();
  return {at::scalar_tensor(l_ic + lam * l_id, out_opts), at::scalar_tensor(l_ic, out_opts),
          at::scalar_tensor(l_id, out_opts), at::scalar_tensor(lam, out_opts), row_stats, x_norm, w_norm, log_r};
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor> backward_impl(double grad_ic, double grad_id, const Tensor& x_in,
                                                 const Tensor& proxies_in, const Tensor& labels,
                                                 const Tensor& row_stats_in, const Tensor& x_norm_in,
                                                 const Tensor& w_norm_in, const Tensor& log_r_in, double alpha,
                                                 double tau, double t, bool distillation, bool diversity,
                                                 int64_t ignore_index, int64_t chunk_rows) {
  using A = acc_t<scalar_t>;
  const auto acc = acc_dtype_of(x_in);
  const auto opts = x_in.options().dtype(acc);
  const Tensor x = x_in.to(acc).contiguous();
  const Tensor w = proxies_in.to(acc).contiguous();
  const int64_t B = x.size(0), d = x.size(1), C = w.size(0);
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == kRowStats && row_stats_in.size(1) == B,
              "idid_loss_backward: row_stats must be (", kRowStats, ", ", B, "), got ", row_stats_in.sizes());
  TORCH_CHECK(x_norm_in.numel() == B && w_norm_in.numel() == C, "idid_loss_backward: norms must be (", B, ",) and (",
              C, ",)");
  if (distillation) {
    TORCH_CHECK(log_r_in.dim() == 2 && log_r_in.size(0) == C && log_r_in.size(1) == C,
                "idid_loss_backward: teacher_log_prob must be (", C, ", ", C, "), got ", log_r_in.sizes());
  }
  const Tensor row_stats = row_stats_in.to(acc).contiguous();
  const Tensor x_norm = x_norm_in.to(acc).contiguous(), w_norm = w_norm_in.to(acc).contiguous();
  const Layout L = make_layout(labels, C, ignore_index);
  const int64_t Bv = L.valid();

  Tensor U = at::empty({Bv, d}, opts), V = at::empty({C, d}, opts), Va = at::empty({C, d}, opts);
  unit_rows(x.const_data_ptr<A>(), x_norm.const_data_ptr<A>(), L.rows.data(), Bv, d, A(1), U.mutable_data_ptr<A>());
  unit_rows(w.const_data_ptr<A>(), w_norm.const_data_ptr<A>(), nullptr, C, d, A(1), V.mutable_data_ptr<A>());
  unit_rows(w.const_data_ptr<A>(), w_norm.const_data_ptr<A>(), nullptr, C, d, static_cast<A>(alpha),
            Va.mutable_data_ptr<A>());
  Tensor dU = at::zeros({Bv, d}, opts), dV = at::zeros({C, d}, opts);
  Tensor dphi = distillation ? at::zeros({C, C}, opts) : Tensor();

  const A gi = static_cast<A>(grad_ic);
  if (grad_ic != 0.0 && Bv > 0) {
    const A* st = row_stats.const_data_ptr<A>();
    const Tensor log_r = distillation ? log_r_in.to(acc).contiguous() : Tensor();
    Tensor r = distillation ? at::empty({C, C}, opts) : Tensor();
    if (distillation) teacher_probs(log_r.const_data_ptr<A>(), L, r.mutable_data_ptr<A>());
    const A* lr = distillation ? log_r.const_data_ptr<A>() : nullptr;
    const A* rp = distillation ? r.const_data_ptr<A>() : nullptr;
    A* dp = distillation ? dphi.mutable_data_ptr<A>() : nullptr;
    const A inv_tau = static_cast<A>(1.0 / tau);
    const bool unit_tau = tau == 1.0;

    const int64_t chunk = chunk_rows_for(chunk_rows, C, sizeof(A), Bv);
    Tensor zbuf = at::empty({chunk, C}, opts);
    for (int64_t j0 = 0; j0 < Bv; j0 += chunk) {
      const int64_t rows = std::min(chunk, Bv - j0);
      Tensor zc = zbuf.narrow(0, 0, rows);
      const Tensor Uc = U.narrow(0, j0, rows);
      at::mm_out(zc, Uc, Va.t());
      A* zp = zc.mutable_data_ptr<A>();
      // Parallel over class blocks, rows in order within each: dphi row k gets its rows' terms
      // in batch order whatever the thread count.
      at::parallel_for(0, C, grain_rows(rows), [&](int64_t c0, int64_t c1) {
        for (int64_t jj = 0; jj < rows; ++jj) {
          const int64_t j = j0 + jj, i = L.rows[j], k = L.label[j];
          A* z = zp + jj * C;
          const A aj = st[i], lse = st[B + i];
          if (distillation) {
            const A lse_nt = st[2 * B + i];
            const cpu::IcRow<A> row{lse, lse_nt, inv_tau, gi * aj, aj, lse_nt - st[3 * B + i],
                                    unit_tau ? std::exp(lse_nt - lse) : A(0), unit_tau};
            cpu::ic_grad_distill(z + c0, rp + k * C + c0, lr + k * C + c0, dp + k * C + c0, c1 - c0, row);
          } else {
            cpu::ic_grad_plain(z + c0, c1 - c0, lse, gi * aj);
          }
          if (c0 <= k && k < c1) z[k] = gi * aj * std::expm1(-st[4 * B + i]);  // p_ik - 1
        }
      });
      Tensor dUc = dU.narrow(0, j0, rows);
      at::mm_out(dUc, zc, Va);          // alpha G V
      dV.addmm_(zc.t(), Uc, 1, alpha);  // alpha G^T U
    }
  }
  if (diversity && grad_id != 0.0 && !L.multi.empty()) {
    diversity_backward<A>(U, L, static_cast<A>(t), static_cast<A>(grad_id), chunk_rows, dU.mutable_data_ptr<A>());
  }

  Tensor dx = at::zeros({B, d}, x_in.options());
  Tensor dw = at::empty({C, d}, x_in.options());
  normalize_backward(dU.const_data_ptr<A>(), U.const_data_ptr<A>(), x_norm.const_data_ptr<A>(), L.rows.data(), Bv,
                     d, dx.mutable_data_ptr<scalar_t>());
  normalize_backward(dV.const_data_ptr<A>(), V.const_data_ptr<A>(), w_norm.const_data_ptr<A>(), nullptr, C, d,
                     dw.mutable_data_ptr<scalar_t>());
  Tensor dsim;
  if (distillation) {  // dTheta = (dPhi + dPhi^T) / 2, the upstream coefficient applied here once
    dsim = at::empty({C, C}, x_in.options());
    symmetrize(dphi.const_data_ptr<A>(), C, static_cast<A>(0.5) * gi, nullptr, dsim.mutable_data_ptr<scalar_t>());
  } else {
    dsim = at::zeros({C, C}, x_in.options());
  }
  return {dx, dw, dsim};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> idid_loss_forward_cpu(
    const Tensor& x, const Tensor& proxies, const Tensor& similarity, const Tensor& labels, double alpha, double tau,
    double t, double eps, bool distillation, bool diversity, bool adaptive_weight, double diversity_weight,
    bool class_balanced, int64_t ignore_index, int64_t chunk_rows) {
  check_inputs(x, proxies, labels);
  const int64_t C = proxies.size(0);
  TORCH_CHECK(similarity.dim() == 2 && similarity.size(0) == C && similarity.size(1) == C,
              "idid_loss: similarity must be (", C, ", ", C, "), got ", similarity.sizes());
  TORCH_CHECK(similarity.scalar_type() == x.scalar_type(), "idid_loss: similarity dtype ", similarity.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(alpha > 0 && tau > 0 && t > 0 && eps > 0, "idid_loss: alpha, tau, t, eps must be > 0");
  if (x.scalar_type() == at::kDouble) {
    return forward_impl<double>(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity,
                                adaptive_weight, diversity_weight, class_balanced, ignore_index, chunk_rows);
  }
  return forward_impl<float>(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity,
                             adaptive_weight, diversity_weight, class_balanced, ignore_index, chunk_rows);
}

std::tuple<Tensor, Tensor, Tensor> idid_loss_backward_cpu(const Tensor& grad_ic, const Tensor& grad_id,
                                                          const Tensor& x, const Tensor& proxies,
                                                          const Tensor& labels, const Tensor& row_stats,
                                                          const Tensor& x_norm, const Tensor& w_norm,
                                                          const Tensor& teacher_log_prob, double alpha, double tau,
                                                          double t, bool distillation, bool diversity,
                                                          int64_t ignore_index, int64_t chunk_rows) {
  check_inputs(x, proxies, labels);
  TORCH_CHECK(grad_ic.numel() == 1 && grad_id.numel() == 1,
              "idid_loss_backward: grad_ic and grad_id must be scalars");
  const double gi = grad_ic.item<double>(), gd = grad_id.item<double>();
  std::tuple<Tensor, Tensor, Tensor> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "idid_loss_backward_cpu", [&] {
    out = backward_impl<scalar_t>(gi, gd, x, proxies, labels, row_stats, x_norm, w_norm, teacher_log_prob, alpha,
                                  tau, t, distillation, diversity, ignore_index, chunk_rows);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("idid_loss_forward", &idid_loss_forward_cpu);
  m.impl("idid_loss_backward", &idid_loss_backward_cpu);
}

}  // namespace idid_kernels
