// CPU driver of the contraction-mapped margin softmax (spec/cm_margin.md).
//
// Row chunks of the batch: one BLAS GEMM gives the chunk's raw dots S = X_chunk W^T, one fused
// epilogue per row (csrc/common/cm_row.h) turns them into the softmax statistics and, when
// gradients are wanted, into G' = G / ||w|| in place; two more GEMMs give dU = G' W and
// dW += G'^T U. Extra memory: one (chunk x C) buffer, the (C x d) float32 dW accumulator and
// O(N + C) statistics; the (N x C) logits never exist.
//
// Three entry points share the driver:
//   forward   (loss_rows, lse, x_norm, w_norm)                  no gradients
//   backward  (dx, dw) from the saved statistics and any per-row upstream gradient (recomputes S)
//   fused     (loss, dx, dw) for scalar reductions: per-row weights known up front, so the
//             gradient is formed while the row is still in cache and S is computed once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "../common/cm_row.h"
#include "checks.h"

namespace idid_kernels {
namespace {

enum class Mode { kForward, kBackward, kFused };

struct CmArgs {
  double s;
  int64_t margin_kind;
  double m1, m2, m3, sphere_lambda;
  bool easy_margin, exact_grad, contraction;
  double offset, temperature;
  bool detach_norm;
  int64_t ignore_index, chunk_rows;
};

template <typename A>
CmConfig<A> make_config(const CmArgs& a) {
  TORCH_CHECK(a.margin_kind >= kMarginNone && a.margin_kind <= kMarginSphere, "cm_margin: unknown margin kind ",
              a.margin_kind);
  TORCH_CHECK(a.temperature > 0, "cm_margin: temperature must be > 0");
  Margin<A> m{static_cast<int>(a.margin_kind),
              static_cast<A>(a.m1),
              static_cast<A>(a.m2),
              static_cast<A>(a.m3),
              static_cast<A>(a.sphere_lambda),
              a.easy_margin,
              a.exact_grad,
              static_cast<A>(a.m3 + a.m2 * std::sin(a.m2))};
  return CmConfig<A>{m, static_cast<A>(a.s), a.contraction, static_cast<A>(a.offset),
                     static_cast<A>(1.0 / a.temperature), a.detach_norm};
}

void check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels, int64_t ignore_index) {
  check_2d_float("x", x);
  check_2d_float("weight", w);
  TORCH_CHECK(x.size(1) == w.size(1), "cm_margin: x and weight feature dims differ: ", x.size(1), " vs ", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cm_margin: x and weight dtypes differ");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "cm_margin: labels must be int64 of shape (", x.size(0), ",)");
  const int64_t c = w.size(0);
  const int64_t* lp = labels.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < labels.numel(); ++i) {
    TORCH_CHECK(lp[i] == ignore_index || (lp[i] >= 0 && lp[i] < c), "cm_margin: labels[", i, "] = ", lp[i],
                " out of range [0, ", c, ")");
  }
}

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor row_norms(const at::Tensor& t_acc) { return at::linalg_vector_norm(t_acc, 2, {1}, false, std::nullopt); }

// Inverse norms with F.normalize's floor.
at::Tensor inv_norms(const at::Tensor& norms) { return norms.clamp_min(kNormEps).reciprocal(); }

int64_t chunk_rows_for(int64_t requested, int64_t n) {
  return requested > 0 ? std::min(requested, n) : std::min<int64_t>(n, 256);
}

struct Outputs {
  at::Tensor loss_rows, lse, x_norm, w_norm, dx, dw;
};

template <typename A>
struct RowJob {
  const CmConfig<A>* cfg;
  A* s;               // chunk rows of raw dots, becomes cosines, then G'
  const A *inv_wn, *inv_xn, *x_norm;
  const int64_t* labels;
  const A* g;         // per-row weight / upstream gradient (gradient modes)
  A *loss, *lse, *radial;
  int64_t n0, num_classes, ignore_index;
  Mode mode;
};

// The per-row epilogue over rows [begin, end) of a chunk.
template <typename A>
IDK_FORCE_INLINE void epilogue_rows_impl(const RowJob<A>& job, int64_t begin, int64_t end) {
  const int64_t c = job.num_classes;
  const bool want_grad = job.mode != Mode::kForward;
  for (int64_t i = begin; i < end; ++i) {
    const int64_t row_id = job.n0 + i;
    A* row = job.s + i * c;
    const int64_t y = job.labels[row_id];
    const bool valid = y != job.ignore_index;
    if (!valid) {
      if (job.mode != Mode::kBackward) {
        job.loss[row_id] = A(0);
        job.lse[row_id] = A(0);
      }
    } else {
      cm_to_cosines(row, job.inv_wn, c, job.inv_xn[row_id]);
      if (job.mode != Mode::kBackward) {
        const CmRowOut<A> out = cm_row_forward(*job.cfg, row, c, y, job.x_norm[row_id]);
        job.loss[row_id] = out.loss;
        job.lse[row_id] = out.lse;
      }
    }
    if (!want_grad) continue;
    const A gi = job.g[row_id];
    if (!valid || gi == A(0)) {
      std::fill(row, row + c, A(0));
      job.radial[i] = A(0);
    } else {
      job.radial[i] = cm_row_grad(*job.cfg, row, job.inv_wn, c, y, job.x_norm[row_id], job.lse[row_id], gi);
    }
  }
}

void epilogue_rows(const RowJob<double>& job, int64_t begin, int64_t end) { epilogue_rows_impl(job, begin, end); }

// float32 is the fast path: cloned for AVX2+FMA (x86-64-v3) with a runtime pick, so the
// vectorised sweeps of cm_row.h run 8 wide where the CPU allows and the build stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("default", "arch=x86-64-v3")))
#endif
void epilogue_rows(const RowJob<float>& job, int64_t begin, int64_t end) {
  epilogue_rows_impl(job, begin, end);
}

// The shared driver. `g` is the per-row weight (fused) or upstream gradient (backward), acc dtype.
template <typename A>
void drive(Mode mode, const at::Tensor& xa, const at::Tensor& wa, const at::Tensor& labels, const CmConfig<A>& cfg,
           int64_t ignore_index, int64_t chunk, const at::Tensor& g, Outputs& o) {
  const int64_t n = xa.size(0), d = xa.size(1), c = wa.size(0);
  const bool want_grad = mode != Mode::kForward;
  const at::Tensor inv_xn = inv_norms(o.x_norm), inv_wn = inv_norms(o.w_norm);
  const A* ixp = inv_xn.const_data_ptr<A>();
  const A* iwp = inv_wn.const_data_ptr<A>();
  const A* xnp = o.x_norm.const_data_ptr<A>();
  const int64_t* yp = labels.const_data_ptr<int64_t>();
  const A* gp = want_grad ? g.const_data_ptr<A>() : nullptr;
  A* lossp = mode == Mode::kBackward ? nullptr : o.loss_rows.mutable_data_ptr<A>();
  A* lsep = o.lse.mutable_data_ptr<A>();

  at::Tensor buffer = at::empty({chunk, c}, xa.options());
  at::Tensor radial = want_grad ? at::empty({chunk}, xa.options()) : at::Tensor();
  at::Tensor dw_acc = want_grad ? at::zeros({c, d}, xa.options()) : at::Tensor();
  const int64_t row_grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(c, 1));

  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t rows = std::min(chunk, n - n0);
    at::Tensor s = buffer.narrow(0, 0, rows);
    const at::Tensor x_chunk = xa.narrow(0, n0, rows);
    at::mm_out(s, x_chunk, wa.t());
    A* sp = s.mutable_data_ptr<A>();
    A* radp = want_grad ? radial.mutable_data_ptr<A>() : nullptr;
    const RowJob<A> job{&cfg, sp, iwp, ixp, xnp, yp, gp, lossp, lsep, radp, n0, c, ignore_index, mode};
    at::parallel_for(0, rows, row_grain, [&](int64_t begin, int64_t end) { epilogue_rows(job, begin, end); });
    if (!want_grad) continue;
    // dU = G' W (rows x d); dW += G'^T U with U the chunk's unit rows.
    const at::Tensor u_chunk = x_chunk * inv_xn.narrow(0, n0, rows).unsqueeze(1);
    const at::Tensor du = at::mm(s, wa);
    dw_acc.addmm_(s.t(), u_chunk);
    // dx_n = radial_n u_n + (dU_n - <dU_n, u_n> u_n) / max(r_n, eps); no projection below eps.
    const A* dup = du.const_data_ptr<A>();
    const A* up = u_chunk.const_data_ptr<A>();
    A* dxp = o.dx.mutable_data_ptr<A>() + n0 * d;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const A* dui = dup + i * d;
        const A* ui = up + i * d;
        A* dxi = dxp + i * d;
        const A inv = ixp[n0 + i];
        A dot = 0;
        for (int64_t k = 0; k < d; ++k) dot += dui[k] * ui[k];
        if (!(xnp[n0 + i] > A(kNormEps))) dot = A(0);
        const A rad = radp[i];
        for (int64_t k = 0; k < d; ++k) dxi[k] = rad * ui[k] + (dui[k] - dot * ui[k]) * inv;
      }
    });
  }
  if (!want_grad) return;
  // dw_j = dW'_j - <dW'_j, w^_j> w^_j, dW'_j = sum_n G'_nj u_n (already divided by ||w_j||).
  const A* wp = wa.const_data_ptr<A>();
  const A* wnp = o.w_norm.const_data_ptr<A>();
  A* dwp = dw_acc.mutable_data_ptr<A>();
  at::parallel_for(0, c, std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (!(wnp[j] > A(kNormEps))) continue;
      const A* wj = wp + j * d;
      A* dwj = dwp + j * d;
      const A inv = iwp[j];
      A dot = 0;
      for (int64_t k = 0; k < d; ++k) dot += dwj[k] * wj[k];
      dot *= inv;
      for (int64_t k = 0; k < d; ++k) dwj[k] -= dot * wj[k] * inv;
    }
  });
  o.dw = dw_acc;
}

Outputs run(Mode mode, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in, const CmArgs& args,
            const at::Tensor& g_in, const at::Tensor& lse_in, const at::Tensor& x_norm_in,
            const at::Tensor& w_norm_in) {
  const at::Tensor labels = labels_in.contiguous();
  check_inputs(x_in, w_in, labels, args.ignore_index);
  const auto acc = acc_type(x_in);
  const at::Tensor xa = x_in.to(acc).contiguous();
  const at::Tensor wa = w_in.to(acc).contiguous();
  const int64_t n = xa.size(0);
  Outputs o;
  o.x_norm = x_norm_in.defined() ? x_norm_in.to(acc).contiguous() : row_norms(xa);
  o.w_norm = w_norm_in.defined() ? w_norm_in.to(acc).contiguous() : row_norms(wa);
  o.lse = lse_in.defined() ? lse_in.to(acc).contiguous() : at::empty({n}, xa.options());
  if (mode != Mode::kBackward) o.loss_rows = at::empty({n}, xa.options());
  at::Tensor g;
  if (mode != Mode::kForward) {
    g = g_in.to(acc).contiguous();
    TORCH_CHECK(g.dim() == 1 && g.size(0) == n, "cm_margin: per-row gradient must be (", n, ",)");
    o.dx = at::empty_like(xa);
  }
  const int64_t chunk = chunk_rows_for(args.chunk_rows, n);
  AT_DISPATCH_FLOATING_TYPES(acc, "cm_margin_cpu", [&] {
    drive<scalar_t>(mode, xa, wa, labels, make_config<scalar_t>(args), args.ignore_index, chunk, g, o);
  });
  if (o.dx.defined()) o.dx = o.dx.to(x_in.scalar_type());
  if (o.dw.defined()) o.dw = o.dw.to(w_in.scalar_type());
  return o;
}

#define IDK_CM_ARGS_PARAMS                                                                                         \
  double s, int64_t margin_kind, double m1, double m2, double m3, double sphere_lambda, bool easy_margin,          \
      bool exact_grad, bool contraction, double offset, double temperature, bool detach_norm, int64_t ignore_index, \
      int64_t chunk_rows
#define IDK_CM_ARGS                                                                                               \
  CmArgs {                                                                                                        \
    s, margin_kind, m1, m2, m3, sphere_lambda, easy_margin, exact_grad, contraction, offset, temperature,         \
        detach_norm, ignore_index, chunk_rows                                                                     \
  }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> cm_margin_forward_cpu(const at::Tensor& x,
                                                                                 const at::Tensor& weight,
                                                                                 const at::Tensor& labels,
                                                                                 IDK_CM_ARGS_PARAMS) {
  Outputs o = run(Mode::kForward, x, weight, labels, IDK_CM_ARGS, {}, {}, {}, {});
  return {o.loss_rows, o.lse, o.x_norm, o.w_norm};
}

std::tuple<at::Tensor, at::Tensor> cm_margin_backward_cpu(const at::Tensor& grad_rows, const at::Tensor& x,
                                                          const at::Tensor& weight, const at::Tensor& labels,
                                                          const at::Tensor& lse, const at::Tensor& x_norm,
                                                          const at::Tensor& w_norm, IDK_CM_ARGS_PARAMS) {
  Outputs o = run(Mode::kBackward, x, weight, labels, IDK_CM_ARGS, grad_rows, lse, x_norm, w_norm);
  return {o.dx, o.dw};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cm_margin_fused_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                                   const at::Tensor& labels,
                                                                   const at::Tensor& row_weight, IDK_CM_ARGS_PARAMS) {
  Outputs o = run(Mode::kFused, x, weight, labels, IDK_CM_ARGS, row_weight, {}, {}, {});
  // loss = sum_n w_n loss_n, summed in row order (deterministic).
  at::Tensor loss = (o.loss_rows * row_weight.to(o.loss_rows.scalar_type())).sum();
  return {loss, o.dx, o.dw};
}

}  // namespace

TORCH_LIBRARY_IMPL(idid_kernels, CPU, m) {
  m.impl("cm_margin_forward", &cm_margin_forward_cpu);
  m.impl("cm_margin_backward", &cm_margin_backward_cpu);
  m.impl("cm_margin_fused", &cm_margin_fused_cpu);
}

}  // namespace idid_kernels
