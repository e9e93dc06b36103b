// Device-agnostic driver of the cm_margin ops: chunking, the BLAS/cuBLAS GEMMs (through ATen),
// the normalisation backward, and the op entry points. Each device supplies only its row
// epilogue (csrc/cpu/cm_margin.cpp, csrc/cuda/cm_margin.cu), a callable
// `epilogue(const CmRowJob<A>& job, int64_t rows)`.
//
// Per chunk of rows: U_c = the chunk's unit rows, S = U_c W^T (GEMM), epilogue (S -> cosines ->
// statistics, and G' = G / ||w|| in the gradient modes), dU = G' W and dW' += G'^T U_c (GEMMs).
// After the last chunk dW = dW' - <dW', w^> w^ per class. Extra memory: the (chunk x C) buffer,
// the (C x d) dW' accumulator in the accumulation dtype, O(N + C) statistics.
//
// Range: norms are computed without overflow or underflow of the squares (row_norms), and the
// GEMM takes unit feature rows, so |<u_n, w_j>| <= ||w_j||: rows of any finite norm, features and
// class weights both far above 1e19 included, give finite cosines. (Raw x_n . w_j overflows float32
// once ||x_n|| ||w_j|| > 3.4e38.) Class rows below ~1e-30 in norm lose digits to subnormal products.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../common/cm_row.h"
#include "../cpu/checks.h"
#include "../cpu/normalize.h"
#include "../cpu/scratch.h"
#include "half_gemm.h"
#include "normalize_aten.h"

namespace idid_kernels {

struct CmArgs {
  double s;
  int64_t margin_kind;
  double m1, m2, m3, sphere_lambda;
  bool easy_margin, exact_grad, contraction;
  double offset, temperature;
  bool detach_norm;
  int64_t ignore_index, chunk_rows;
  at::Tensor target;  // margin kind kMarginGiven: (2, N) per-row phi and phi'; undefined otherwise
};

template <typename A>
CmConfig<A> make_cm_config(const CmArgs& a) {
  TORCH_CHECK(a.margin_kind >= kMarginNone && a.margin_kind <= kMarginGiven, "cm_margin: unknown margin kind ",
              a.margin_kind);
  TORCH_CHECK(a.temperature > 0, "cm_margin: temperature must be > 0");
  const Margin<A> m{static_cast<int>(a.margin_kind),
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

// shard: w holds some of the classes; a label is then any class >= 0 (its shard may be another).
// host_labels: whether to check the label range here (CPU labels only: on a GPU this would be a
// sync; functional.py checked the range already).
inline void cm_check_inputs(const at::Tensor& x, const at::Tensor& w, const at::Tensor& labels,
                            int64_t ignore_index, bool shard, bool host_labels) {
  check_2d_float("x", x);
  check_2d_float("weight", w);
  TORCH_CHECK(x.size(1) == w.size(1), "cm_margin: x and weight feature dims differ: ", x.size(1), " vs ", w.size(1));
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "cm_margin: x and weight dtypes differ");
  TORCH_CHECK(x.device() == w.device() && x.device() == labels.device(), "cm_margin: tensors on different devices");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == x.size(0) && labels.scalar_type() == at::kLong,
              "cm_margin: labels must be int64 of shape (", x.size(0), ",)");
  if (host_labels && labels.is_cpu()) {
    const int64_t c = w.size(0);
    const int64_t* lp = labels.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < labels.numel(); ++i) {
      TORCH_CHECK(lp[i] == ignore_index || (lp[i] >= 0 && (shard || lp[i] < c)), "cm_margin: labels[", i,
                  "] = ", lp[i], " out of range [0, ", c, ")");
    }
  }
}

// ||row|| per row in the accumulation dtype: the vectorised CPU loops, or ATen on other devices.
inline at::Tensor cm_row_norms(const at::Tensor& t) { return t.is_cpu() ? cpu::row_norms(t) : aten::row_norms(t); }

struct CmOutputs {
  at::Tensor loss_rows, x_norm, w_norm, dx, dw;
  at::Tensor stats;            // (2, N): per-row shift m and log_sum (cm_row.h), forward -> backward
  at::Tensor lse;              // shard modes: partial max (forward) or the global lse (backward)
  at::Tensor sum_exp, target;  // shard forward (lse holds the partial max)
  at::Tensor du, radial;       // shard backward: sum_j G_nj w^_j before projection, s g'(r) R partial
  at::Tensor grad_logits;      // keep_logits: the (N, C) G' of the one chunk, for cm_rows_dweight
};

// u = x / max(||x||, eps) row-wise given the inverse norms.
inline at::Tensor cm_unit_rows(const at::Tensor& t, const at::Tensor& inv_norm) { return t * inv_norm.unsqueeze(1); }

// <grad, unit> per row, zeroed where the norm is below F.normalize's floor (no radial part there).
inline at::Tensor cm_radial_dot(const at::Tensor& grad, const at::Tensor& unit, const at::Tensor& norm) {
  return at::where(norm > kNormEps, (grad * unit).sum(1), at::zeros({}, grad.options()));
}

// dw <- dw - <dw, w^> w^ per class row, in place (w^ = w / ||w||; rows below the norm floor keep
// dw): the CPU's one pass over (C x d) for what cm_radial_dot and three more ATen ops do in five
// passes and three (C x d) temporaries.
template <typename A>
void cm_project_rows_cpu(at::Tensor& dw, const at::Tensor& w, const at::Tensor& inv_wn, const at::Tensor& w_norm) {
  const int64_t c = dw.size(0), d = dw.size(1);
  A* dwp = dw.mutable_data_ptr<A>();
  const A* wp = w.const_data_ptr<A>();
  const A* inv = inv_wn.const_data_ptr<A>();
  const A* nrm = w_norm.const_data_ptr<A>();
  at::parallel_for(0, c, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      if (!(nrm[j] > A(kNormEps))) continue;
      A* g = dwp + j * d;
      const A* wr = wp + j * d;
      const A s = inv[j];
      A dot = A(0);
#pragma omp simd reduction(+ : dot)
      for (int64_t k = 0; k < d; ++k) dot += g[k] * (wr[k] * s);
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) g[k] -= dot * (wr[k] * s);
    }
  });
}

// dx_n = s g'(r_n) R_n u_n + (dU_n - <dU_n, u_n> u_n) / max(r_n, eps) for a chunk's rows, u_n =
// x_n / max(r_n, eps), the radial part dropped where r_n is not above the floor (as
// cm_radial_dot): one pass per row on the CPU, for the five (rows x d) temporaries of the ATen form.
template <typename A>
void cm_dx_rows_cpu(at::Tensor& dx, const at::Tensor& x, const at::Tensor& du, const at::Tensor& radial,
                    const at::Tensor& norm, const at::Tensor& inv_norm) {
  const int64_t rows = x.size(0), d = x.size(1);
  A* out = dx.mutable_data_ptr<A>();
  const A* xp = x.const_data_ptr<A>();
  const A* dup = du.const_data_ptr<A>();
  const A* rad = radial.const_data_ptr<A>();
  const A* nrm = norm.const_data_ptr<A>();
  const A* inv = inv_norm.const_data_ptr<A>();
  at::parallel_for(0, rows, std::max<int64_t>(1, 8192 / std::max<int64_t>(d, 1)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const A* xr = xp + i * d;
      const A* g = dup + i * d;
      A* o = out + i * d;
      const A s = inv[i];
      A dot = A(0);
      if (nrm[i] > A(kNormEps)) {
#pragma omp simd reduction(+ : dot)
        for (int64_t k = 0; k < d; ++k) dot += g[k] * (xr[k] * s);
      }
      const A r = rad[i];
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) {
        const A u = xr[k] * s;
        o[k] = u * r + (g[k] - dot * u) * s;
      }
    }
  });
}

// dW = dW' - <dW', w^> w^ per class (w^ = w / ||w||), dW' = sum_n G'_nj u_n: in place on the CPU.
template <typename A>
at::Tensor cm_project_dw(at::Tensor& dw_acc, const at::Tensor& wa, const at::Tensor& inv_wn,
                         const at::Tensor& w_norm) {
  if (dw_acc.is_cpu()) {
    cm_project_rows_cpu<A>(dw_acc, wa, inv_wn, w_norm);
    return dw_acc;
  }
  const at::Tensor w_hat = cm_unit_rows(wa, inv_wn);
  return dw_acc - cm_radial_dot(dw_acc, w_hat, w_norm).unsqueeze(1) * w_hat;
}

// An epilogue may run the forward-only mode itself with `tiled_forward(xa, wa, labels, cfg,
// ignore_index, chunk, gemm, o)` (the CPU's class-tiled forward, csrc/cpu/cm_margin.cpp): the
// int overload is chosen where that member exists, the long one (no hook) otherwise.
template <typename A, typename E>
auto cm_tiled_forward(int, const E& e, const at::Tensor& xa, const at::Tensor& wa, const at::Tensor& labels,
                      const CmConfig<A>& cfg, int64_t ignore_index, int64_t chunk, const HalfGemm& gemm,
                      CmOutputs& o) -> decltype(e.template tiled_forward<A>(xa, wa, labels, cfg, ignore_index, chunk,
                                                                            gemm, o),
                                                bool()) {
  e.template tiled_forward<A>(xa, wa, labels, cfg, ignore_index, chunk, gemm, o);
  return true;
}
template <typename A, typename E>
bool cm_tiled_forward(long, const E&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const CmConfig<A>&,
                      int64_t, int64_t, const HalfGemm&, CmOutputs&) {
  return false;
}

// xa: the features in the accumulation dtype; wa: the weight as gemm.weight() gives it.
// keep_logits (mode kCmFused, chunk == N): the chunk buffer is returned as o.grad_logits instead of
// reused, and dW is left to cm_rows_dweight (the upstream gradient is not known yet).
template <typename A, typename Epilogue>
void cm_drive(CmMode mode, const at::Tensor& xa, const at::Tensor& wa, const at::Tensor& labels,
              const CmConfig<A>& cfg, int64_t ignore_index, int64_t class_offset, int64_t chunk, const at::Tensor& g,
              const HalfGemm& gemm, CmOutputs& o, const Epilogue& epilogue, bool keep_logits = false) {
  if (mode == kCmForward &&
      cm_tiled_forward<A>(0, epilogue, xa, wa, labels, cfg, ignore_index, chunk, gemm, o)) {
    return;
  }
  const int64_t n = xa.size(0), d = xa.size(1), c = wa.size(0);
  const bool want_grad = mode != kCmForward && mode != kCmShardForward;
  const bool shard_grad = mode == kCmShardBackward;
  const at::Tensor inv_xn = o.x_norm.clamp_min(kNormEps).reciprocal();
  const at::Tensor inv_wn = o.w_norm.clamp_min(kNormEps).reciprocal();
  const bool shard = mode == kCmShardForward || mode == kCmShardBackward;
  // The chunk buffer: on the CPU the kept scratch block (cpu/scratch.h: a fresh mapping of this size
  // is faulted in page by page every call), elsewhere the device's caching allocator.
  // A kept buffer outlives the call: on the CPU a tensor that holds the block until it is freed.
  TORCH_CHECK(!keep_logits || (mode == kCmFused && chunk == n), "cm_margin: keep_logits needs one fused chunk");
  std::optional<cpu::ScratchLease> lease;
  if (xa.is_cpu() && !keep_logits) lease.emplace(chunk * c, xa.options());
  at::Tensor buffer = lease          ? lease->tensor().view({chunk, c})
                      : keep_logits ? (xa.is_cpu() ? cpu::scratch_tensor(n * c, xa.options()).view({n, c})
                                                   : at::empty({n, c}, xa.options()))
                                    : at::empty({chunk, c}, xa.options());
  if (keep_logits) o.grad_logits = buffer;
  const bool want_dw = want_grad && !keep_logits;
  at::Tensor radial = want_grad ? at::empty({chunk}, xa.options()) : at::Tensor();
  // dW' is written by the first chunk's GEMM and accumulated into by the others (no zero fill).
  at::Tensor dw_acc = want_dw ? (n > 0 ? at::empty({c, d}, xa.options()) : at::zeros({c, d}, xa.options()))
                              : at::Tensor();
  at::Tensor du_buffer = want_grad && !shard_grad ? at::empty({chunk, d}, xa.options()) : at::Tensor();

  CmRowJob<A> job{cfg,
                  nullptr,
                  inv_wn.const_data_ptr<A>(),
                  o.x_norm.const_data_ptr<A>(),
                  labels.const_data_ptr<int64_t>(),
                  want_grad ? g.const_data_ptr<A>() : nullptr,
                  o.loss_rows.defined() ? o.loss_rows.mutable_data_ptr<A>() : nullptr,
                  shard ? nullptr : o.stats.mutable_data_ptr<A>(),
                  shard ? nullptr : o.stats.mutable_data_ptr<A>() + n,
                  shard ? o.lse.mutable_data_ptr<A>() : nullptr,
                  want_grad ? radial.mutable_data_ptr<A>() : nullptr,
                  o.sum_exp.defined() ? o.sum_exp.mutable_data_ptr<A>() : nullptr,
                  o.target.defined() ? o.target.mutable_data_ptr<A>() : nullptr,
                  0,
                  c,
                  ignore_index,
                  class_offset,
                  static_cast<int>(mode)};
  for (int64_t n0 = 0; n0 < n; n0 += chunk) {
    const int64_t rows = std::min(chunk, n - n0);
    at::Tensor s = buffer.narrow(0, 0, rows);
    const at::Tensor inv_c = inv_xn.narrow(0, n0, rows);
    const at::Tensor u = cm_unit_rows(xa.narrow(0, n0, rows), inv_c);
    const at::Tensor u_op = gemm.operand_of(u);
    gemm.mm_out(s, u_op, wa.t());
    job.s = s.mutable_data_ptr<A>();
    job.n0 = n0;
    epilogue(job, rows);
    if (!want_grad) continue;
    const at::Tensor norm_c = o.x_norm.narrow(0, n0, rows);
    const at::Tensor g_op = gemm.operand_of(s);
    at::Tensor du = shard_grad ? gemm.mm(g_op, wa) : du_buffer.narrow(0, 0, rows);  // sum_j G_nj w^_j
    if (!shard_grad) gemm.mm_out(du, g_op, wa);
    if (want_dw && n0 == 0) {
      gemm.mm_out(dw_acc, g_op.t(), u_op);  // sum_n G'_nj u_n
    } else if (want_dw) {
      gemm.addmm_(dw_acc, g_op.t(), u_op);
    }
    if (shard_grad) {  // the caller adds the shards' parts, then projects
      o.du.narrow(0, n0, rows).copy_(du);
      o.radial.narrow(0, n0, rows).copy_(radial.narrow(0, 0, rows));
      continue;
    }
    // dx_n = s g'(r) R_n u_n + (dU_n - <dU_n, u_n> u_n) / max(r_n, eps)
    at::Tensor dx_c = o.dx.narrow(0, n0, rows);
    if (dx_c.is_cpu()) {
      cm_dx_rows_cpu<A>(dx_c, xa.narrow(0, n0, rows), du, radial.narrow(0, 0, rows), norm_c, inv_c);
      continue;
    }
    const at::Tensor dot = cm_radial_dot(du, u, norm_c);
    dx_c.copy_(u * radial.narrow(0, 0, rows).unsqueeze(1) + (du - dot.unsqueeze(1) * u) * inv_c.unsqueeze(1));
  }
  if (!want_dw) return;
  o.dw = cm_project_dw<A>(dw_acc, wa, inv_wn, o.w_norm);
}

// Whether the driver checks CPU labels for the epilogue E (E::kHostLabelCheck, default true): an
// epilogue that handles bad labels itself (the CUDA kernel, also when emulated on CPU tensors) opts out.
template <typename E, typename = void>
struct HostLabelCheck : std::true_type {};
template <typename E>
struct HostLabelCheck<E, std::void_t<decltype(E::kHostLabelCheck)>> : std::bool_constant<E::kHostLabelCheck> {};

// stats_in: the (2, N) forward statistics (backward), or the global lse (N,) (shard backward).
template <typename Epilogue>
CmOutputs cm_run(CmMode mode, const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& labels_in,
                 const CmArgs& args, const at::Tensor& g_in, const at::Tensor& stats_in, const at::Tensor& x_norm_in,
                 const at::Tensor& w_norm_in, const Epilogue& epilogue, int64_t class_offset = 0,
                 bool keep_logits = false) {
  const at::Tensor labels = labels_in.contiguous();
  const bool shard = mode == kCmShardForward || mode == kCmShardBackward;
  TORCH_CHECK(class_offset >= 0, "cm_margin: class_offset must be >= 0, got ", class_offset);
  cm_check_inputs(x_in, w_in, labels, args.ignore_index, shard, HostLabelCheck<Epilogue>::value);
  const auto acc = x_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const HalfGemm gemm = HalfGemm::for_input(x_in, acc);
  const at::Tensor xa = x_in.to(acc).contiguous();
  const at::Tensor wa = gemm.weight(w_in);
  const int64_t n = xa.size(0);
  CmOutputs o;
  o.x_norm = x_norm_in.defined() ? x_norm_in.to(acc).contiguous() : cm_row_norms(xa);
  o.w_norm = w_norm_in.defined() ? w_norm_in.to(acc).contiguous() : cm_row_norms(wa);
  if (shard) {
    o.lse = stats_in.defined() ? stats_in.to(acc).contiguous() : at::empty({n}, xa.options());
  } else {
    o.stats = stats_in.defined() ? stats_in.to(acc).contiguous() : at::empty({2, n}, xa.options());
    TORCH_CHECK(o.stats.dim() == 2 && o.stats.size(0) == 2 && o.stats.size(1) == n,
                "cm_margin: saved row statistics must have shape (2, ", n, "), got ", o.stats.sizes());
  }
  if (mode == kCmForward || mode == kCmFused) o.loss_rows = at::empty({n}, xa.options());
  if (mode == kCmShardForward) {
    o.sum_exp = at::empty({n}, xa.options());
    o.target = at::empty({n}, xa.options());
  }
  at::Tensor g;
  if (mode == kCmBackward || mode == kCmFused || mode == kCmShardBackward) {
    g = g_in.to(acc).contiguous();
    TORCH_CHECK(g.dim() == 1 && g.size(0) == n, "cm_margin: per-row gradient must be (", n, ",)");
    if (mode == kCmShardBackward) {
      o.du = at::empty_like(xa);
      o.radial = at::empty({n}, xa.options());
    } else {
      o.dx = at::empty_like(xa);
    }
  }
  at::Tensor given;
  if (args.margin_kind == kMarginGiven) {
    TORCH_CHECK(args.target.defined(), "cm_margin: margin kind ", int(kMarginGiven),
                " (given) needs the (2, N) target tensor of per-row phi and phi'");
    TORCH_CHECK(args.target.dim() == 2 && args.target.size(0) == 2 && args.target.size(1) == n,
                "cm_margin: target must have shape (2, ", n, "), got ", args.target.sizes());
    TORCH_CHECK(args.target.device() == x_in.device(), "cm_margin: target is on ", args.target.device(),
                ", x on ", x_in.device());
    given = args.target.to(acc).contiguous();
  } else {
    TORCH_CHECK(!args.target.defined(), "cm_margin: a target tensor is read by margin kind ", int(kMarginGiven),
                " only, got kind ", args.margin_kind);
  }
  const int64_t chunk =
      keep_logits ? n : (args.chunk_rows > 0 ? std::min(args.chunk_rows, n) : std::min<int64_t>(n, 256));
  AT_DISPATCH_FLOATING_TYPES(acc, "cm_margin", [&] {
    CmConfig<scalar_t> cfg = make_cm_config<scalar_t>(args);
    if (given.defined()) {
      cfg.margin.given = given.const_data_ptr<scalar_t>();
      cfg.margin.given_stride = n;
    }
    cm_drive<scalar_t>(mode, xa, wa, labels, cfg, args.ignore_index, class_offset, chunk, g, gemm, o, epilogue,
                       keep_logits);
  });
  // keep_logits: dx stays in the accumulation dtype until the upstream gradient has scaled it
  if (o.dx.defined() && !keep_logits) o.dx = o.dx.to(x_in.scalar_type());
  if (o.dw.defined()) o.dw = o.dw.to(w_in.scalar_type());
  return o;
}

// The three op entry points, for one device's epilogue.
#define IDK_CM_ARGS_PARAMS                                                                                         \
  double s, int64_t margin_kind, double m1, double m2, double m3, double sphere_lambda, bool easy_margin,          \
      bool exact_grad, bool contraction, double offset, double temperature, bool detach_norm, int64_t ignore_index, \
      int64_t chunk_rows, const std::optional<at::Tensor>&target
#define IDK_CM_ARGS                                                                                         \
  CmArgs {                                                                                                  \
    s, margin_kind, m1, m2, m3, sphere_lambda, easy_margin, exact_grad, contraction, offset, temperature,   \
        detach_norm, ignore_index, chunk_rows, target.has_value() ? *target : at::Tensor()                  \
  }

template <typename Epilogue>
struct CmOps {
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& x,
                                                                            const at::Tensor& weight,
                                                                            const at::Tensor& labels,
                                                                            IDK_CM_ARGS_PARAMS) {
    CmOutputs o = cm_run(kCmForward, x, weight, labels, IDK_CM_ARGS, {}, {}, {}, {}, Epilogue{});
    return {o.loss_rows, o.stats, o.x_norm, o.w_norm};
  }
  static std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_rows, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& labels,
                                                     const at::Tensor& row_stats, const at::Tensor& x_norm,
                                                     const at::Tensor& w_norm, IDK_CM_ARGS_PARAMS) {
    CmOutputs o =
        cm_run(kCmBackward, x, weight, labels, IDK_CM_ARGS, grad_rows, row_stats, x_norm, w_norm, Epilogue{});
    return {o.dx, o.dw};
  }
  static std::tuple<at::Tensor, at::Tensor, at::Tensor> fused(const at::Tensor& x, const at::Tensor& weight,
                                                              const at::Tensor& labels, const at::Tensor& row_weight,
                                                              IDK_CM_ARGS_PARAMS) {
    CmOutputs o = cm_run(kCmFused, x, weight, labels, IDK_CM_ARGS, row_weight, {}, {}, {}, Epilogue{});
    // loss = sum_n w_n loss_n (ATen's sum: a fixed order, deterministic)
    at::Tensor loss = (o.loss_rows * row_weight.to(o.loss_rows.scalar_type())).sum();
    return {loss, o.dx, o.dw};
  }
  // reduction="none" with the whole batch in one chunk: the forward's per-row losses and, for the
  // upstream gradient 1 on every row, dx (accumulation dtype) and the (N, C) logit gradients G'. The
  // gradients for an upstream g are then g_n dx_n and rows_dweight(g, G', ...): three GEMMs in all,
  // where forward + backward recompute the cosines in a fourth. Holds N x C values (one chunk)
  // from forward to backward; chunk_rows is not read.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_grad(
      const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, IDK_CM_ARGS_PARAMS) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    const at::Tensor ones = at::ones({x.size(0)}, x.options().dtype(acc));
    CmOutputs o = cm_run(kCmFused, x, weight, labels, IDK_CM_ARGS, ones, {}, {}, {}, Epilogue{}, 0, true);
    return {o.loss_rows, o.x_norm, o.w_norm, o.dx, o.grad_logits};
  }
  // Class shards (the classes [class_offset, class_offset + C) of a larger head): per-row partial
  // max, sum-exp and target logit; the x and weight norms as in forward.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_forward(
      const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels, int64_t class_offset,
      IDK_CM_ARGS_PARAMS) {
    CmOutputs o = cm_run(kCmShardForward, x, weight, labels, IDK_CM_ARGS, {}, {}, {}, {}, Epilogue{}, class_offset);
    return {o.lse, o.sum_exp, o.target, o.x_norm, o.w_norm};
  }
  // Given the global lse and per-row upstream gradient: the shard's du = sum_j G_nj w^_j (N, d),
  // its radial part s g'(r) R (N,), Q = <du, u> (N,), and the shard's complete dweight.
  static std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> shard_backward(
      const at::Tensor& grad_rows, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& labels,
      int64_t class_offset, const at::Tensor& lse, const at::Tensor& x_norm, const at::Tensor& w_norm,
      IDK_CM_ARGS_PARAMS) {
    CmOutputs o = cm_run(kCmShardBackward, x, weight, labels, IDK_CM_ARGS, grad_rows, lse, x_norm, w_norm, Epilogue{},
                         class_offset);
    const at::Tensor xa = x.to(o.du.scalar_type());
    const at::Tensor u = cm_unit_rows(xa, o.x_norm.clamp_min(kNormEps).reciprocal());
    at::Tensor q = cm_radial_dot(o.du, u, o.x_norm);
    return {o.du, o.radial, q, o.dw};
  }
};

#undef IDK_CM_ARGS_PARAMS
#undef IDK_CM_ARGS

// dweight of reduction="none" from forward_grad's G' (N, C) for the upstream gradient grad_rows (N,):
// dW' = G'^T (g_n u_n) (one GEMM), then projected as in cm_drive. Device-agnostic.
inline at::Tensor cm_rows_dweight(const at::Tensor& grad_rows, const at::Tensor& grad_logits, const at::Tensor& x,
                                  const at::Tensor& weight, const at::Tensor& x_norm, const at::Tensor& w_norm) {
  check_2d_float("x", x);
  check_2d_float("weight", weight);
  const int64_t n = x.size(0), c = weight.size(0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(x.size(1) == weight.size(1), "cm_margin: x and weight feature dims differ: ", x.size(1), " vs ",
              weight.size(1));
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "cm_margin: x and weight dtypes differ");
  for (const at::Tensor* t : {&grad_rows, &grad_logits, &x_norm, &w_norm}) {
    TORCH_CHECK(t->device() == x.device() && weight.device() == x.device(), "cm_margin: tensors on different devices");
  }
  TORCH_CHECK(grad_logits.dim() == 2 && grad_logits.size(0) == n && grad_logits.size(1) == c &&
                  grad_logits.scalar_type() == acc,
              "cm_margin: grad_logits must be (", n, ", ", c, ") in ", acc, ", got ", grad_logits.sizes(), " ",
              grad_logits.scalar_type());
  TORCH_CHECK(grad_rows.dim() == 1 && grad_rows.size(0) == n, "cm_margin: per-row gradient must be (", n, ",)");
  TORCH_CHECK(x_norm.dim() == 1 && x_norm.size(0) == n && w_norm.dim() == 1 && w_norm.size(0) == c,
              "cm_margin: norms must be (", n, ",) and (", c, ",)");
  const HalfGemm gemm = HalfGemm::for_input(x, acc);
  const at::Tensor xa = x.to(acc).contiguous();
  const at::Tensor wa = gemm.weight(weight);
  const at::Tensor xn = x_norm.to(acc).contiguous(), wn = w_norm.to(acc).contiguous();
  const at::Tensor inv_wn = wn.clamp_min(kNormEps).reciprocal();
  // g_n u_n = x_n (g_n / max(r_n, eps))
  const at::Tensor gu = xa * (xn.clamp_min(kNormEps).reciprocal() * grad_rows.to(acc)).unsqueeze(1);
  at::Tensor dw_acc = at::empty({c, x.size(1)}, xa.options());
  gemm.mm_out(dw_acc, gemm.operand_of(grad_logits.contiguous()).t(), gemm.operand_of(gu));
  at::Tensor dw;
  AT_DISPATCH_FLOATING_TYPES(acc, "cm_rows_dweight", [&] { dw = cm_project_dw<scalar_t>(dw_acc, wa, inv_wn, wn); });
  return dw.to(weight.scalar_type());
}

}  // namespace idid_kernels
