// Device-agnostic driver of the IDID-R1 ops (spec/idid.md; oracle idid_kernels/reference/idid.py,
// analytic backward reference/grads.py idid_backward): argument checks, the chunk loop with its GEMMs
// (BLAS / cuBLAS through ATen), the order of the passes and the output assembly. Rows are processed
// sorted by label (Layout below), so that every per-class reduction can run in a fixed order.
//
// A device supplies a policy P with these static members (A: float or double, the accumulation type):
//   make_layout(labels, C, ignore_index) -> Layout       the rows sorted by label
//   active_rows(layout) -> int64                          sorted positions the chunk loops cover: all B,
//                                                         or where the count is known for free, the valid rows
//   sample_weights<A>(labels, layout, balanced) -> a      (B,) a_i, batch order
//   row_norms<A>(x) -> ||x_i||
//   unit_rows<A>(x, norm, sorted, scale)                  scale x_i / max(||x_i||, eps); label-sorted
//                                                         rows (ignored ones zero) when sorted != null
//   normalize_backward<A>(g, u, norm, sorted, dtype)      F.normalize backward; sorted rows in, batch
//                                                         order out when sorted != null
//   teacher<A>(theta, layout, whole) -> (log r, r)        teacher rows of the present classes (r: rows
//                                                         layout.teacher_row[k] where defined, else k);
//                                                         whole: log r's absent rows are written too (0)
//   teacher_probs<A>(log_r, layout) -> r                  backward: r from the saved log r
//   forward_rows<A>(chunk)                                per row: lse, lse_nt, kd, ce into row_stats
//   grad_rows<A>(chunk)                                   per row: z <- G in place, dPhi accumulated
//   forward_grad_rows<A>(chunk)                           the fused op's: forward_rows then grad_rows
//   class_density<A>(U, layout, t, chunk_rows)            (C,) D_c (0 where n_c < 2)
//   diversity_backward<A>(U, layout, t, grad_id, chunk_rows, dU)   dU += grad_id dL_ID/dU
//   loss_terms<A>(row_stats, density, layout, cfg, dtype) (loss, L_IC, L_ID, lambda)
//   teacher_grad<A>(layout, opts) -> dphi                 zeros where the gradient pass accumulates (rows as r;
//                                                         (C, C), or (min(B, C), C) where teacher_row is defined)
//   symmetrize_grad<A>(dphi, grad_ic, layout, dtype)      dTheta = grad_ic (dPhi + dPhi^T) / 2
//   may_be_nonzero(scalar)                                false only where a zero is seen for free
// AtenPolicy below implements all but the four row/diversity passes with ATen ops that never read
// device memory on the host (on a GPU nothing synchronises: counts, K_B, K_2, a_i, lambda stay
// tensors); the CUDA policy (csrc/cuda/idid_loss_binding.cpp) adds its kernels to it. The CPU policy
// (csrc/cpu/idid_loss.cpp) has host loops for every member: there the layout is a counting sort, the
// counts are free to read, and its loops beat a chain of ATen ops. The row passes get an IdidChunk
// (csrc/common/idid_chunk.h): one chunk of logits of sorted rows.
//
// Forward, per chunk of sorted rows: z = U_c (alpha V)^T (GEMM), then the row statistics. Backward,
// per chunk: the same GEMM, z <- G in place, dU_c = G (alpha V) and dV += G^T U_c (GEMMs). Extra
// memory: one chunk of at most ~32 MB, O(B d + C d) unit rows and gradients, the C x C teacher.
//
// Fused (a loss that needs a gradient): one pass does both, at unit upstream coefficients, since
// the gradient is linear in them: per chunk the GEMM, the row statistics, z <- G and the two
// gradient GEMMs, then the diversity pull into its own buffer. It returns the gradients of L_IC
// (dx, dproxies, dPhi) and of L_ID (dx), and fused_backward only combines them with the upstream
// coefficients: dx = grad_ic dx_ic + grad_id dx_id, dproxies = grad_ic dproxies_ic and
// dTheta = grad_ic (dPhi + dPhi^T) / 2. Three GEMMs instead of four, one row pass fewer, and no
// recomputation of the layout, unit rows and teacher in backward.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

#include "../common/idid_chunk.h"
#include "../common/macros.h"
#include "../cpu/checks.h"
#include "half_gemm.h"
#include "normalize_aten.h"

namespace idid_kernels {
namespace idid {

using at::Tensor;

// Default memory budget of one chunk of logits (rows x C accumulation-dtype values).
constexpr int64_t kChunkBytes = int64_t{32} << 20;

// Rows per chunk: the caller's override when positive, else what fits the budget.
inline int64_t chunk_rows_for(int64_t chunk_rows, int64_t row_len, int64_t elem_size, int64_t total) {
  const int64_t rows = chunk_rows > 0 ? chunk_rows : kChunkBytes / std::max<int64_t>(row_len * elem_size, 1);
  return std::max<int64_t>(1, std::min(rows, std::max<int64_t>(total, 1)));
}

inline at::ScalarType acc_dtype_of(const Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

struct Config {
  double alpha, tau, t, eps;
  bool distillation, diversity, adaptive_weight;
  double diversity_weight;
  bool class_balanced;
  int64_t ignore_index, chunk_rows;
};

// The batch rows sorted by label (stable, so batch order within a class), ignored rows last.
// Every member lives on the labels' device.
struct Layout {
  int64_t num_classes = 0, batch = 0;
  Tensor key;              // (B,) label of each sorted position; num_classes for ignored rows
  Tensor perm;             // (B,) batch row of each sorted position
  Tensor start;            // (C + 1,) class c holds positions [start[c], start[c + 1]); start[C] = valid rows
  Tensor count;            // (C,) n_c
  Tensor classes_present;  // 0-dim: K_B, the classes with n_c >= 1
  Tensor classes_multi;    // 0-dim: K_2, the classes with n_c >= 2
  Tensor valid_rows;       // 0-dim: rows not ignored
  Tensor valid;            // (B,) batch order: the row takes part (label in [0, C), not ignore_index)
  Tensor bad_labels;       // 0-dim bool: some label is outside [0, C) and not ignore_index
  Tensor teacher_row;      // CPU: (C,) row of each present class in the compact (P, C) r and dPhi (-1 for
                           // absent ones); undefined where they are (C, C) (the GPU)
};

// The device-agnostic policy members, with ATen ops only.
struct AtenPolicy {
  // A label outside [0, C) that is not ignore_index (possible only where functional.py's range check
  // was skipped: torch.compile, CUDA-graph capture, IDID_KERNELS_CHECK_LABELS=0) is not read out of
  // bounds: its row takes no part and the loss terms become NaN (bad_labels), with no host sync.
  static Layout make_layout(const Tensor& labels, int64_t num_classes, int64_t ignore_index) {
    Layout L;
    L.num_classes = num_classes;
    L.batch = labels.size(0);
    const Tensor kept = labels != ignore_index;
    const Tensor in_range = (labels >= 0) & (labels < num_classes);
    L.valid = kept & in_range;
    L.bad_labels = (kept & in_range.logical_not()).any();
    const Tensor key = at::where(L.valid, labels, num_classes);
    const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
    L.key = std::get<0>(sorted).contiguous();
    L.perm = std::get<1>(sorted).contiguous();
    // Integer searches and differences: exact on every device.
    L.start = at::searchsorted(L.key, at::arange(num_classes + 1, labels.options())).contiguous();
    L.count = (L.start.narrow(0, 1, num_classes) - L.start.narrow(0, 0, num_classes)).contiguous();
    L.classes_present = (L.count > 0).sum();
    L.classes_multi = (L.count > 1).sum();
    L.valid_rows = L.start.select(0, num_classes);
    return L;
  }

  // The number of valid rows is a device scalar: the chunk loop covers every sorted position (the
  // ignored ones, last, are zero rows of U and give zero gradients).
  static int64_t active_rows(const Layout& L) { return L.batch; }

  // a_i = 1 / (K_B n_{y_i}) (class-balanced) or 1 / B_valid, 0 on ignored rows; batch order.
  template <typename A>
  static Tensor sample_weights(const Tensor& labels, const Layout& L, bool class_balanced) {
    const auto acc = c10::CppTypeToScalarType<A>::value;
    Tensor denom;
    if (class_balanced) {
      const Tensor n = L.count.index_select(0, at::where(L.valid, labels, 0));
      denom = L.classes_present.to(acc) * n.to(acc);
    } else {
      denom = L.valid_rows.to(acc).expand({L.batch});
    }
    return at::where(L.valid, at::reciprocal(denom), 0);  // drops the ignored rows' 1 / 0
  }

  template <typename A>
  static Tensor row_norms(const Tensor& x) {
    return aten::row_norms(x);
  }

  template <typename A>
  static Tensor unit_rows(const Tensor& x, const Tensor& norm, const Layout* sorted, double scale) {
    const Tensor inv = at::full_like(norm, scale) / norm.clamp_min(kNormEps);
    if (sorted == nullptr) return (x * inv.unsqueeze(1)).contiguous();
    const Tensor u = x.index_select(0, sorted->perm) * inv.index_select(0, sorted->perm).unsqueeze(1);
    return at::where((sorted->key < sorted->num_classes).unsqueeze(1), u, 0).contiguous();
  }

  // (g - [r > eps] <g, u> u) / max(r, eps) per row. With `sorted`, row j goes to batch row perm[j]
  // (a permutation: each row written once), and the ignored rows get 0 whatever their norm.
  template <typename A>
  static Tensor normalize_backward(const Tensor& g, const Tensor& u, const Tensor& norm_in, const Layout* sorted,
                                   at::ScalarType dtype) {
    const Tensor norm = sorted == nullptr ? norm_in : norm_in.index_select(0, sorted->perm);
    const Tensor radial = at::where(norm > kNormEps, (g * u).sum(1), 0);
    Tensor out = (g - radial.unsqueeze(1) * u) * norm.clamp_min(kNormEps).reciprocal().unsqueeze(1);
    if (sorted == nullptr) return out.to(dtype);
    out = at::where((sorted->key < sorted->num_classes).unsqueeze(1), out, 0).to(dtype);
    return at::empty_like(out).index_copy_(0, sorted->perm, out);
  }

  // log r_kc = Phi_kc - logsumexp_{c' != k} Phi_kc', Phi = (Theta + Theta^T) / 2, for every row; the
  // diagonal and the rows of classes absent from the batch hold 0 in both log r and r.
  template <typename A>
  static std::tuple<Tensor, Tensor> teacher(const Tensor& theta, const Layout& L, bool /*whole*/) {
    Tensor log_r = theta + theta.t();
    log_r.mul_(0.5);
    log_r.diagonal().fill_(-std::numeric_limits<double>::infinity());
    log_r.sub_(at::logsumexp(log_r, {1}, /*keepdim=*/true));
    const Tensor absent = (L.count == 0).unsqueeze(1);
    log_r.diagonal().zero_();
    log_r.masked_fill_(absent, 0);
    Tensor r = log_r.exp();
    r.diagonal().zero_();
    r.masked_fill_(absent, 0);
    return {log_r, r};
  }

  template <typename A>
  static Tensor teacher_probs(const Tensor& log_r, const Layout& L) {
    Tensor r = log_r.exp();
    r.diagonal().zero_();
    r.masked_fill_((L.count == 0).unsqueeze(1), 0);
    return r;
  }

  // L_IC = sum_i a_i (ce_i + kd_i) in float64 (NaN if a label was out of range); L_ID = mean of D_c
  // over the K_2 classes with pairs (0 if none); lambda = L_IC / (L_ID + eps) (0 if K_2 = 0), or the
  // fixed weight; loss = L_IC + lambda L_ID. `density` is undefined without the diversity term.
  template <typename A>
  static std::tuple<Tensor, Tensor, Tensor, Tensor> loss_terms(const Tensor& row_stats, const Tensor& density,
                                                               const Layout& L, const Config& cfg,
                                                               at::ScalarType dtype) {
    const Tensor st = row_stats.to(at::kDouble);
    const Tensor l_ic =
        at::where(L.bad_labels, std::numeric_limits<double>::quiet_NaN(),
                  (st.select(0, kStatA) * (st.select(0, kStatCe) + st.select(0, kStatKd))).sum());
    Tensor l_id = at::zeros_like(l_ic), lam = at::zeros_like(l_ic);
    if (density.defined()) {
      l_id = (density.sum() / L.classes_multi.clamp_min(1).to(density.scalar_type())).to(at::kDouble);
      lam = cfg.adaptive_weight ? at::where(L.classes_multi > 0, l_ic / (l_id + cfg.eps), 0.0)
                                : at::full_like(l_ic, cfg.diversity_weight);
    }
    return {(l_ic + lam * l_id).to(dtype), l_ic.to(dtype), l_id.to(dtype), lam.to(dtype)};
  }

  // dPhi (C, C), zeros: the gradient pass accumulates the present classes' rows into it.
  template <typename A>
  static Tensor teacher_grad(const Layout& L, const at::TensorOptions& opts) {
    return at::zeros({L.num_classes, L.num_classes}, opts);
  }

  // dTheta = grad_ic (dPhi + dPhi^T) / 2 (exactly symmetric: the sum commutes), cast to dtype; 0 on
  // the diagonal, which takes no part in the loss (also where dPhi holds NaN).
  template <typename A>
  static Tensor symmetrize_grad(const Tensor& dphi, const Tensor& grad_ic, const Layout& /*L*/,
                                at::ScalarType dtype) {
    Tensor out = ((dphi + dphi.t()) * (grad_ic * 0.5)).to(dtype).contiguous();
    out.diagonal().zero_();
    return out;
  }

  // A device scalar cannot be read without a synchronisation: run every pass.
  static bool may_be_nonzero(const Tensor& /*scalar*/) { return true; }
};

inline void check_inputs(const Tensor& x, const Tensor& proxies, const Tensor& labels) {
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
  TORCH_CHECK(proxies.device() == x.device() && labels.device() == x.device(),
              "idid_loss: x, proxies and labels must be on one device, got ", x.device(), ", ", proxies.device(),
              ", ", labels.device());
}

using ForwardOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

template <typename A>
IdidChunk<A> make_chunk(const Layout& L, const Tensor& row_stats, const Config& cfg) {
  IdidChunk<A> job;
  job.z = nullptr;
  job.key = L.key.const_data_ptr<int64_t>();
  job.perm = L.perm.const_data_ptr<int64_t>();
  job.start = L.start.const_data_ptr<int64_t>();
  // Backward only reads the statistics (its row_stats may be the caller's tensor).
  job.stats = const_cast<A*>(row_stats.const_data_ptr<A>());
  job.r = nullptr;
  job.log_r = nullptr;
  job.dphi = nullptr;
  job.teacher_row = L.teacher_row.defined() ? L.teacher_row.const_data_ptr<int64_t>() : nullptr;
  job.grad_ic = nullptr;
  job.j0 = 0;
  job.rows = 0;
  job.num_classes = L.num_classes;
  job.batch = L.batch;
  job.inv_tau = static_cast<A>(1.0 / cfg.tau);
  job.unit_tau = cfg.tau == 1.0;
  job.distillation = cfg.distillation;
  return job;
}

// What the forward and the fused op set up alike: inputs in the accumulation dtype, the sorted
// layout, norms, the unit rows U (sorted) and alpha V, zeroed row statistics holding the sample
// weights, the teacher (log r whole or present rows only) and the chunk job pointing at them.
template <typename A>
struct ForwardSetup {
  at::TensorOptions opts;
  Tensor x, w, labels;
  int64_t B, d, C;
  Layout L;
  Tensor x_norm, w_norm, U, Va;
  HalfGemm gemm;
  Tensor U_op, Va_op, row_stats, log_r, r;
  IdidChunk<A> job;
};

template <typename A, typename P>
ForwardSetup<A> setup_forward(const Tensor& x_in, const Tensor& proxies_in, const Tensor& similarity_in,
                              const Tensor& labels_in, const Config& cfg, bool whole_teacher) {
  const auto acc = acc_dtype_of(x_in);
  const auto opts = x_in.options().dtype(acc);
  const Tensor x = x_in.to(acc).contiguous();
  const Tensor w = proxies_in.to(acc).contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t C = w.size(0);
  Layout L = P::make_layout(labels, C, cfg.ignore_index);
  const Tensor x_norm = P::template row_norms<A>(x);
  const Tensor w_norm = P::template row_norms<A>(w);
  const Tensor U = P::template unit_rows<A>(x, x_norm, &L, 1.0);
  const Tensor Va = P::template unit_rows<A>(w, w_norm, nullptr, cfg.alpha);
  const HalfGemm gemm = HalfGemm::for_input(x_in, acc);
  Tensor row_stats = at::zeros({kNumStats, x.size(0)}, opts);
  row_stats.select(0, kStatA).copy_(P::template sample_weights<A>(labels, L, cfg.class_balanced));
  Tensor log_r = at::empty({0, 0}, opts), r;
  if (cfg.distillation) {
    std::tie(log_r, r) = P::template teacher<A>(similarity_in.to(acc).contiguous(), L, whole_teacher);
  }
  IdidChunk<A> job = make_chunk<A>(L, row_stats, cfg);
  job.stats = row_stats.mutable_data_ptr<A>();
  if (cfg.distillation) {
    job.r = r.const_data_ptr<A>();
    job.log_r = log_r.const_data_ptr<A>();
  }
  return {opts,   x,      w,      labels,    x.size(0), x.size(1), C,   std::move(L),
          x_norm, w_norm, U,      Va,        gemm,      gemm.operand_of(U), gemm.operand_of(Va), row_stats,
          log_r,  r,      job};
}

template <typename A, typename P>
ForwardOutputs forward_impl(const Tensor& x_in, const Tensor& proxies_in, const Tensor& similarity_in,
                            const Tensor& labels_in, const Config& cfg) {
  ForwardSetup<A> f = setup_forward<A, P>(x_in, proxies_in, similarity_in, labels_in, cfg, true);
  const Layout& L = f.L;
  const int64_t C = f.C;
  const auto& opts = f.opts;
  const HalfGemm& gemm = f.gemm;
  IdidChunk<A>& job = f.job;
  const int64_t active = P::active_rows(L);
  if (active > 0) {
    const int64_t chunk = chunk_rows_for(cfg.chunk_rows, C, sizeof(A), active);
    Tensor zbuf = at::empty({chunk, C}, opts);
    for (int64_t j0 = 0; j0 < active; j0 += chunk) {
      const int64_t rows = std::min(chunk, active - j0);
      Tensor zc = zbuf.narrow(0, 0, rows);
      gemm.mm_out(zc, f.U_op.narrow(0, j0, rows), f.Va_op.t());
      job.z = zc.mutable_data_ptr<A>();
      job.j0 = j0;
      job.rows = rows;
      P::template forward_rows<A>(job);
    }
  }

  const Tensor density =
      cfg.diversity ? P::template class_density<A>(f.U, L, static_cast<A>(cfg.t), cfg.chunk_rows) : Tensor();
  const auto [loss, l_ic, l_id, lam] = P::template loss_terms<A>(f.row_stats, density, L, cfg, x_in.scalar_type());
  return {loss, l_ic, l_id, lam, f.row_stats, f.x_norm, f.w_norm, f.log_r};
}

// The chunk loop of the gradient passes over the active (sorted) rows: per chunk z = U (alpha V)^T,
// row_pass(job) turns z into G in place, then dU's rows = G (alpha V) and dV = alpha G^T U, summed
// over the chunks (the first chunk's GEMM writes dV, the others add to it, alpha is applied once).
template <typename A, typename RowPass>
void gradient_chunks(IdidChunk<A>& job, const HalfGemm& gemm, const Tensor& U_op, const Tensor& Va_op, int64_t active,
                     const Config& cfg, const at::TensorOptions& opts, Tensor& dU, Tensor& dV, RowPass row_pass) {
  const int64_t C = Va_op.size(0);
  const int64_t chunk = chunk_rows_for(cfg.chunk_rows, C, sizeof(A), active);
  Tensor zbuf = at::empty({chunk, C}, opts);
  for (int64_t j0 = 0; j0 < active; j0 += chunk) {
    const int64_t rows = std::min(chunk, active - j0);
    Tensor zc = zbuf.narrow(0, 0, rows);
    const Tensor Uc = U_op.narrow(0, j0, rows);
    gemm.mm_out(zc, Uc, Va_op.t());
    job.z = zc.mutable_data_ptr<A>();
    job.j0 = j0;
    job.rows = rows;
    row_pass(job);
    const Tensor g_op = gemm.operand_of(zc);
    Tensor dUc = dU.narrow(0, j0, rows);
    gemm.mm_out(dUc, g_op, Va_op);  // alpha G V
    if (j0 == 0) {
      gemm.mm_out(dV, g_op.t(), Uc);  // G^T U, scaled by alpha below
    } else {
      gemm.addmm_(dV, g_op.t(), Uc);
    }
  }
  dV.mul_(cfg.alpha);
}

template <typename A, typename P>
std::tuple<Tensor, Tensor, Tensor> backward_impl(const Tensor& grad_ic_in, const Tensor& grad_id_in, const Tensor& x_in,
                                                 const Tensor& proxies_in, const Tensor& labels_in,
                                                 const Tensor& row_stats_in, const Tensor& x_norm_in,
                                                 const Tensor& w_norm_in, const Tensor& log_r_in, const Config& cfg) {
  const auto acc = acc_dtype_of(x_in);
  const auto opts = x_in.options().dtype(acc);
  const Tensor x = x_in.to(acc).contiguous();
  const Tensor w = proxies_in.to(acc).contiguous();
  const Tensor labels = labels_in.contiguous();
  const int64_t B = x.size(0), d = x.size(1), C = w.size(0);
  TORCH_CHECK(row_stats_in.dim() == 2 && row_stats_in.size(0) == kNumStats && row_stats_in.size(1) == B,
              "idid_loss_backward: row_stats must be (", int64_t{kNumStats}, ", ", B, "), got ", row_stats_in.sizes());
  TORCH_CHECK(x_norm_in.numel() == B && w_norm_in.numel() == C, "idid_loss_backward: norms must be (", B, ",) and (",
              C, ",)");
  if (cfg.distillation) {
    TORCH_CHECK(log_r_in.dim() == 2 && log_r_in.size(0) == C && log_r_in.size(1) == C,
                "idid_loss_backward: teacher_log_prob must be (", C, ", ", C, "), got ", log_r_in.sizes());
  }
  // Upstream coefficients stay where they are computed (a device scalar on a GPU: no .item()).
  const Tensor grad_ic = grad_ic_in.to(opts).reshape({});
  const Tensor grad_id = grad_id_in.to(opts).reshape({});
  const Tensor row_stats = row_stats_in.to(opts).contiguous();
  const Tensor x_norm = x_norm_in.to(opts).reshape({B}).contiguous();
  const Tensor w_norm = w_norm_in.to(opts).reshape({C}).contiguous();
  const Layout L = P::make_layout(labels, C, cfg.ignore_index);

  const Tensor U = P::template unit_rows<A>(x, x_norm, &L, 1.0);
  const Tensor V = P::template unit_rows<A>(w, w_norm, nullptr, 1.0);
  const Tensor Va = P::template unit_rows<A>(w, w_norm, nullptr, cfg.alpha);
  const HalfGemm gemm = HalfGemm::for_input(x_in, acc);
  Tensor dU = at::zeros({B, d}, opts), dV = at::zeros({C, d}, opts);
  Tensor dphi = cfg.distillation ? P::template teacher_grad<A>(L, opts) : Tensor();

  const int64_t active = P::active_rows(L);
  if (active > 0 && P::may_be_nonzero(grad_ic)) {
    Tensor log_r, r;
    IdidChunk<A> job = make_chunk<A>(L, row_stats, cfg);
    job.grad_ic = grad_ic.const_data_ptr<A>();
    if (cfg.distillation) {
      log_r = log_r_in.to(opts).contiguous();
      r = P::template teacher_probs<A>(log_r, L);
      job.r = r.const_data_ptr<A>();
      job.log_r = log_r.const_data_ptr<A>();
      job.dphi = dphi.mutable_data_ptr<A>();
    }
    gradient_chunks<A>(job, gemm, gemm.operand_of(U), gemm.operand_of(Va), active, cfg, opts, dU, dV,
                       [](IdidChunk<A>& j) { P::template grad_rows<A>(j); });  // z <- G, dPhi accumulated
  }
  if (cfg.diversity && active > 0 && P::may_be_nonzero(grad_id)) {
    P::template diversity_backward<A>(U, L, static_cast<A>(cfg.t), grad_id, cfg.chunk_rows, dU);
  }

  const auto out = x_in.scalar_type();
  const Tensor dx = P::template normalize_backward<A>(dU, U, x_norm, &L, out);  // sorted -> batch order
  const Tensor dw = P::template normalize_backward<A>(dV, V, w_norm, nullptr, out);
  const Tensor dsim = cfg.distillation ? P::template symmetrize_grad<A>(dphi, grad_ic, L, out)
                                       : at::zeros({C, C}, x_in.options());
  return {dx, dw, dsim};
}

using FusedOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The loss and its gradients at unit upstream coefficients, in one pass (the file comment): (loss,
// l_ic, l_id, lam, dx_ic, dx_id, dproxies_ic, dphi). The gradients stay in the accumulation dtype;
// dx_id is (0, d) without the diversity term, dphi (0, 0) without distillation.
template <typename A, typename P>
FusedOutputs fused_impl(const Tensor& x_in, const Tensor& proxies_in, const Tensor& similarity_in,
                        const Tensor& labels_in, const Config& cfg) {
  // Absent classes' rows of log r are never read here: they are left unwritten.
  ForwardSetup<A> f = setup_forward<A, P>(x_in, proxies_in, similarity_in, labels_in, cfg, false);
  const Layout& L = f.L;
  const int64_t B = f.B, d = f.d, C = f.C;
  const auto& opts = f.opts;
  const auto acc = opts.dtype().toScalarType();
  const HalfGemm& gemm = f.gemm;
  const Tensor &U = f.U, &U_op = f.U_op, &Va_op = f.Va_op, &x_norm = f.x_norm, &w_norm = f.w_norm;
  const Tensor& row_stats = f.row_stats;
  const Tensor V = P::template unit_rows<A>(f.w, w_norm, nullptr, 1.0);
  Tensor dphi = cfg.distillation ? P::template teacher_grad<A>(L, opts) : at::empty({0, 0}, opts);
  const Tensor unit = at::ones({}, opts);
  IdidChunk<A>& job = f.job;
  job.grad_ic = unit.const_data_ptr<A>();
  if (cfg.distillation) job.dphi = dphi.mutable_data_ptr<A>();
  Tensor dU = at::empty({B, d}, opts), dV = at::empty({C, d}, opts);
  const int64_t active = P::active_rows(L);
  if (active < B) dU.narrow(0, active, B - active).zero_();  // the ignored rows, sorted last
  if (active > 0) {
    // The row statistics, then z <- G (grad_ic = 1), dPhi.
    gradient_chunks<A>(job, gemm, U_op, Va_op, active, cfg, opts, dU, dV,
                       [](IdidChunk<A>& j) { P::template forward_grad_rows<A>(j); });
  } else {
    dV.zero_();
  }
  Tensor dU_id = at::empty({0, d}, opts), density;
  if (cfg.diversity) {
    density = P::template class_density<A>(U, L, static_cast<A>(cfg.t), cfg.chunk_rows);
    dU_id = at::zeros({B, d}, opts);
    if (active > 0) P::template diversity_backward<A>(U, L, static_cast<A>(cfg.t), unit, cfg.chunk_rows, dU_id);
  }
  const auto [loss, l_ic, l_id, lam] = P::template loss_terms<A>(row_stats, density, L, cfg, x_in.scalar_type());
  const Tensor dx_ic = P::template normalize_backward<A>(dU, U, x_norm, &L, acc);  // sorted -> batch order
  const Tensor dx_id = cfg.diversity ? P::template normalize_backward<A>(dU_id, U, x_norm, &L, acc) : dU_id;
  const Tensor dw = P::template normalize_backward<A>(dV, V, w_norm, nullptr, acc);
  return {loss, l_ic, l_id, lam, dx_ic, dx_id, dw, dphi};
}

// (dx, dproxies, dsimilarity) from the fused pass's gradients and the upstream coefficients, cast
// to dtype; dsimilarity is (0, 0) unless similarity_grad (distillation, and the similarity needs it).
template <typename A, typename P>
std::tuple<Tensor, Tensor, Tensor> fused_backward_impl(const Tensor& grad_ic_in, const Tensor& grad_id_in,
                                                       const Tensor& dx_ic, const Tensor& dx_id, const Tensor& dw,
                                                       const Tensor& dphi, const Tensor& labels, int64_t ignore_index,
                                                       bool similarity_grad, int64_t C, at::ScalarType dtype) {
  const auto opts = dx_ic.options();
  const Tensor gi = grad_ic_in.to(opts).reshape({});
  const Tensor gd = grad_id_in.to(opts).reshape({});
  Tensor dx = dx_ic * gi;
  if (dx_id.numel() > 0) dx.addcmul_(dx_id, gd);
  Tensor dsim = at::empty({0, 0}, opts.dtype(dtype));
  if (similarity_grad) {
    const Layout L = P::make_layout(labels.contiguous(), C, ignore_index);
    dsim = P::template symmetrize_grad<A>(dphi, gi, L, dtype);
  }
  return {dx.to(dtype), (dw * gi).to(dtype), dsim};
}

// The two op entry points over one device's policy.
template <typename P>
struct IdidOps {
  static Config forward_config(const Tensor& x, const Tensor& proxies, const Tensor& similarity, const Tensor& labels,
                               double alpha, double tau, double t, double eps, bool distillation, bool diversity,
                               bool adaptive_weight, double diversity_weight, bool class_balanced,
                               int64_t ignore_index, int64_t chunk_rows) {
    check_inputs(x, proxies, labels);
    const int64_t C = proxies.size(0);
    TORCH_CHECK(similarity.dim() == 2 && similarity.size(0) == C && similarity.size(1) == C,
                "idid_loss: similarity must be (", C, ", ", C, "), got ", similarity.sizes());
    TORCH_CHECK(similarity.scalar_type() == x.scalar_type(), "idid_loss: similarity dtype ",
                similarity.scalar_type(), " differs from x dtype ", x.scalar_type());
    TORCH_CHECK(similarity.device() == x.device(), "idid_loss: similarity is on ", similarity.device(),
                " but x is on ", x.device());
    TORCH_CHECK(alpha > 0 && tau > 0 && t > 0 && eps > 0, "idid_loss: alpha, tau, t, eps must be > 0");
    return Config{alpha,           tau,         t, eps, distillation, diversity, adaptive_weight, diversity_weight,
                  class_balanced, ignore_index, chunk_rows};
  }

  static ForwardOutputs forward(const Tensor& x, const Tensor& proxies, const Tensor& similarity,
                                const Tensor& labels, double alpha, double tau, double t, double eps,
                                bool distillation, bool diversity, bool adaptive_weight, double diversity_weight,
                                bool class_balanced, int64_t ignore_index, int64_t chunk_rows) {
    const Config cfg = forward_config(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity,
                                      adaptive_weight, diversity_weight, class_balanced, ignore_index, chunk_rows);
    if (x.scalar_type() == at::kDouble) return forward_impl<double, P>(x, proxies, similarity, labels, cfg);
    return forward_impl<float, P>(x, proxies, similarity, labels, cfg);
  }

  static FusedOutputs fused(const Tensor& x, const Tensor& proxies, const Tensor& similarity, const Tensor& labels,
                            double alpha, double tau, double t, double eps, bool distillation, bool diversity,
                            bool adaptive_weight, double diversity_weight, bool class_balanced, int64_t ignore_index,
                            int64_t chunk_rows) {
    const Config cfg = forward_config(x, proxies, similarity, labels, alpha, tau, t, eps, distillation, diversity,
                                      adaptive_weight, diversity_weight, class_balanced, ignore_index, chunk_rows);
    if (x.scalar_type() == at::kDouble) return fused_impl<double, P>(x, proxies, similarity, labels, cfg);
    return fused_impl<float, P>(x, proxies, similarity, labels, cfg);
  }

  static std::tuple<Tensor, Tensor, Tensor> fused_backward(const Tensor& grad_ic, const Tensor& grad_id,
                                                           const Tensor& dx_ic, const Tensor& dx_id,
                                                           const Tensor& dproxies, const Tensor& dphi,
                                                           const Tensor& labels, int64_t ignore_index,
                                                           bool similarity_grad, int64_t num_classes,
                                                           at::ScalarType dtype) {
    TORCH_CHECK(grad_ic.numel() == 1 && grad_id.numel() == 1,
                "idid_loss_fused_backward: grad_ic and grad_id must be scalars");
    TORCH_CHECK(dx_ic.dim() == 2 && (dx_ic.scalar_type() == at::kFloat || dx_ic.scalar_type() == at::kDouble),
                "idid_loss_fused_backward: dx_ic must be a 2-D float32 or float64 tensor, got ", dx_ic.sizes(), " ",
                dx_ic.scalar_type());
    const int64_t B = dx_ic.size(0), d = dx_ic.size(1);
    const auto acc = dx_ic.scalar_type();
    TORCH_CHECK(dx_id.dim() == 2 && (dx_id.size(0) == B || dx_id.size(0) == 0) && dx_id.size(1) == d &&
                    dx_id.scalar_type() == acc,
                "idid_loss_fused_backward: dx_id must be (", B, ", ", d, ") or (0, ", d, ") ", acc, ", got ",
                dx_id.sizes(), " ", dx_id.scalar_type());
    TORCH_CHECK(dproxies.dim() == 2 && dproxies.size(0) == num_classes && dproxies.size(1) == d &&
                    dproxies.scalar_type() == acc,
                "idid_loss_fused_backward: dproxies must be (", num_classes, ", ", d, ") ", acc, ", got ",
                dproxies.sizes(), " ", dproxies.scalar_type());
    TORCH_CHECK(labels.dim() == 1 && labels.size(0) == B && labels.scalar_type() == at::kLong,
                "idid_loss_fused_backward: labels must be (", B, ",) int64, got ", labels.sizes(), " ",
                labels.scalar_type());
    if (similarity_grad) {
      TORCH_CHECK(dphi.dim() == 2 && dphi.size(1) == num_classes && dphi.size(0) <= num_classes &&
                      dphi.scalar_type() == acc,
                  "idid_loss_fused_backward: dphi must be (rows <= ", num_classes, ", ", num_classes, ") ", acc,
                  ", got ", dphi.sizes(), " ", dphi.scalar_type());
    }
    const Tensor dx_ic_c = dx_ic.contiguous(), dx_id_c = dx_id.contiguous(), dw_c = dproxies.contiguous();
    const Tensor dphi_c = dphi.contiguous();
    if (acc == at::kDouble) {
      return fused_backward_impl<double, P>(grad_ic, grad_id, dx_ic_c, dx_id_c, dw_c, dphi_c, labels, ignore_index,
                                            similarity_grad, num_classes, dtype);
    }
    return fused_backward_impl<float, P>(grad_ic, grad_id, dx_ic_c, dx_id_c, dw_c, dphi_c, labels, ignore_index,
                                         similarity_grad, num_classes, dtype);
  }

  static std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_ic, const Tensor& grad_id, const Tensor& x,
                                                     const Tensor& proxies, const Tensor& labels,
                                                     const Tensor& row_stats, const Tensor& x_norm,
                                                     const Tensor& w_norm, const Tensor& teacher_log_prob,
                                                     double alpha, double tau, double t, bool distillation,
                                                     bool diversity, int64_t ignore_index, int64_t chunk_rows) {
    check_inputs(x, proxies, labels);
    TORCH_CHECK(grad_ic.numel() == 1 && grad_id.numel() == 1,
                "idid_loss_backward: grad_ic and grad_id must be scalars");
    TORCH_CHECK(tau > 0, "idid_loss_backward: tau must be > 0");
    const Config cfg{alpha, tau, t, 1.0, distillation, diversity, false, 0.0, true, ignore_index, chunk_rows};
    if (x.scalar_type() == at::kDouble) {
      return backward_impl<double, P>(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm, w_norm,
                                      teacher_log_prob, cfg);
    }
    return backward_impl<float, P>(grad_ic, grad_id, x, proxies, labels, row_stats, x_norm, w_norm,
                                   teacher_log_prob, cfg);
  }
};

}  // namespace idid
}  // namespace idid_kernels
