// One chunk of logits of the IDID-R1 loss (spec/idid.md), as the row epilogues of every device see
// it: plain pointers (host memory on the CPU, device memory on a GPU), no torch types, so the CUDA
// kernels compile with nvcc alone. The driver is csrc/driver/idid_loss_driver.h.
//
// The driver works on the batch rows sorted by label (a stable sort, so batch order within a class;
// ignored rows last): sorted position j holds batch row perm[j], of label key[j]. A chunk is the
// sorted positions [j0, j0 + rows); its logits z (rows x C, row-major) are row jj = j - j0. Sorting
// makes every class a contiguous run of positions, which is what lets the teacher gradient and the
// diversity term reduce each class's rows in a fixed order, without atomics.
#pragma once

#include <cstdint>

namespace idid_kernels {

// Rows of row_stats (5, B), indexed by batch row: a_i, lse_i, lse_nt_i, kd_i, ce_i.
enum IdidStat : int { kStatA = 0, kStatLse = 1, kStatLseNt = 2, kStatKd = 3, kStatCe = 4, kNumStats = 5 };

template <typename A>
struct IdidChunk {
  A* z;                  // (rows, C) logits alpha <u_j, v_c>; backward overwrites them with G = dL/dz
  const int64_t* key;    // (B,) label of each sorted position; num_classes marks an ignored row
  const int64_t* perm;   // (B,) batch row of each sorted position
  const int64_t* start;  // (C + 1,) class c holds the sorted positions [start[c], start[c + 1])
  A* stats;              // (kNumStats, B) row_stats: forward writes lse..ce of valid rows, backward reads all
  const A* r;            // teacher probabilities r_kc (r_kk = 0), row teacher_row[k]; null without distillation
  const A* log_r;        // (C, C) teacher log-probabilities (log r_kk = 0); null without distillation
  A* dphi;               // accumulator of dL_IC/dPhi, row teacher_row[k] (backward with distillation), else null
  // Row of class k in r and dphi: the CPU keeps only the present classes' rows (P x C); null: row k
  // of a (C, C) array (the GPU).
  const int64_t* teacher_row;
  const A* grad_ic;      // backward: the upstream coefficient of L_IC, one scalar in the same memory
  int64_t j0, rows, num_classes, batch;
  A inv_tau;
  bool unit_tau;         // tau == 1: lse_nt = the non-target logsumexp of z, p = q exp(lse_nt - lse)
  bool distillation;
};

}  // namespace idid_kernels
