// Attention with the locality reductions inside it, on the CPU: flash attention (Dao et al.
// 2022) over tiles of query rows and keys, whose online softmax also accumulates, per query
// row, the sums the attention-distance probe needs. One pass over the logits feeds both the
// module's output (softmax @ v) and the probe; no row of logits is ever whole in memory.
//
// Per query row, over the grid keys (those after the `prefix` keys), with m the largest grid
// logit and w = exp(s - m):
//   grid_max m, grid_total Z = sum w, weighted_shifted sum w (s - m),
//   weighted_distance sum w |c_q - c_k| (pixel distance between the tokens' anchors),
// and over the prefix keys their logsumexp (-inf without prefix keys). These are the pieces
// of localitylab.attention.reader.AttentionBlock; the reader's blocked torch path computes
// the same pieces and is the reference this kernel is tested against.
//
// The matrix products are torch's batch-reduce GEMM micro-kernels (cpublas::brgemm, oneDNN's
// where the machine has them) on tiles that stay in cache, with the keys transposed once per
// call, as torch's own CPU flash attention does; the exponentials are torch's vectorised
// exp_u20, the one that kernel uses.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace {

using Vec = at::vec::Vectorized<float>;
constexpr double kNegInf = -std::numeric_limits<double>::infinity();

// Row-major C (m x n) = A (m x k) B (k x n), or C += A B.
void gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
          int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

float row_max(const float* s, int64_t n) {
  int64_t j = 0;
  float best = -std::numeric_limits<float>::infinity();
  if (n >= Vec::size()) {
    Vec acc = Vec::loadu(s);
    for (j = Vec::size(); j + Vec::size() <= n; j += Vec::size()) acc = at::vec::maximum(acc, Vec::loadu(s + j));
    best = at::vec::vec_reduce_all<float>([](Vec& x, Vec& y) { return at::vec::maximum(x, y); }, acc);
  }
  for (; j < n; ++j) best = std::max(best, s[j]);
  return best;
}

struct TileSums {
  double total = 0, shifted = 0, distance = 0;
};

// Overwrites the row's logits s with w = exp(s - m) and returns sum w, sum w (s - m) and
// sum w d, d the distance from the query's anchor (qy, qx) to each key's (ky, kx); with
// anchors == false, no distances (prefix keys).
TileSums exp_row(float* s, int64_t n, float m, float qy, float qx, const float* ky, const float* kx, bool anchors) {
  const Vec vm(m), vqy(qy), vqx(qx);
  Vec total(0.f), shifted_sum(0.f), distance(0.f);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    const Vec shifted = Vec::loadu(s + j) - vm;
    const Vec w = shifted.exp_u20();
    w.store(s + j);
    total = total + w;
    shifted_sum = at::vec::fmadd(w, shifted, shifted_sum);
    if (anchors) {
      const Vec dy = vqy - Vec::loadu(ky + j), dx = vqx - Vec::loadu(kx + j);
      distance = at::vec::fmadd(w, at::vec::fmadd(dy, dy, dx * dx).sqrt(), distance);
    }
  }
  auto add = [](Vec& x, Vec& y) { return x + y; };
  TileSums sums;
  sums.total = at::vec::vec_reduce_all<float>(add, total);
  sums.shifted = at::vec::vec_reduce_all<float>(add, shifted_sum);
  sums.distance = anchors ? at::vec::vec_reduce_all<float>(add, distance) : 0.0;
  for (; j < n; ++j) {
    const float shifted = s[j] - m;
    const float w = std::exp(shifted);
    s[j] = w;
    sums.total += w;
    sums.shifted += static_cast<double>(w) * shifted;
    if (anchors) {
      const float dy = qy - ky[j], dx = qx - kx[j];
      sums.distance += static_cast<double>(w) * std::sqrt(dy * dy + dx * dx);
    }
  }
  return sums;
}

// q (R, H, Nq, D), k (R, H, Nk, D), v (R, H, Nk, Dv): float32. query_anchors (Nq, 2) and
// key_anchors (Nk - prefix, 2): pixels, (y, x), any float dtype. Returns the output
// (R, H, Nq, Dv) and the float64 (R, H, Nq) sums described at the top of this file.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_rows(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, double scale, int64_t prefix,
    const at::Tensor& query_anchors_in, const at::Tensor& key_anchors_in, int64_t query_tile, int64_t key_tile) {
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4 && v_in.dim() == 4, "attention_rows: q, k, v must be 4-d");
  TORCH_CHECK(q_in.scalar_type() == at::kFloat && k_in.scalar_type() == at::kFloat && v_in.scalar_type() == at::kFloat,
              "attention_rows: float32 only");
  // The scale goes into the queries, the keys are transposed (R, H, D, Nk): each tile's
  // logits are then one plain row-major product.
  const at::Tensor q = (q_in * scale).contiguous(), k = k_in.transpose(-1, -2).contiguous(), v = v_in.contiguous();
  const at::Tensor query_anchors = query_anchors_in.to(at::kFloat).contiguous();
  const int64_t R = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3), Nk = k.size(3), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == R && k.size(1) == H && k.size(2) == D && v.size(0) == R && v.size(1) == H && v.size(2) == Nk,
              "attention_rows: q, k, v shapes disagree");
  TORCH_CHECK(prefix >= 0 && prefix < Nk, "attention_rows: prefix must leave at least one grid key");
  TORCH_CHECK(query_anchors.dim() == 2 && query_anchors.size(0) == Nq && query_anchors.size(1) == 2,
              "attention_rows: query_anchors must be (Nq, 2)");
  TORCH_CHECK(key_anchors_in.dim() == 2 && key_anchors_in.size(0) == Nk - prefix && key_anchors_in.size(1) == 2,
              "attention_rows: key_anchors must be (Nk - prefix, 2)");
  const at::Tensor key_anchors = key_anchors_in.to(at::kFloat).t().contiguous();  // (2, T): the ys, then the xs
  TORCH_CHECK(query_tile > 0 && key_tile > 0, "attention_rows: tiles must be positive");
  query_tile = std::min(query_tile, std::max<int64_t>(Nq, 1));  // a tile past the rows only costs memory
  key_tile = std::min(key_tile, Nk);

  at::Tensor out = at::empty({R, H, Nq, Dv}, q.options());
  const auto stats = q.options().dtype(at::kDouble);
  at::Tensor grid_max = at::empty({R, H, Nq}, stats), grid_total = at::empty({R, H, Nq}, stats);
  at::Tensor weighted_shifted = at::empty({R, H, Nq}, stats), weighted_distance = at::empty({R, H, Nq}, stats);
  at::Tensor prefix_lse = at::empty({R, H, Nq}, stats);

  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const float* qa = query_anchors.data_ptr<float>();
  const float* ky = key_anchors.data_ptr<float>();
  const float* kx = ky + (Nk - prefix);
  float* od = out.data_ptr<float>();
  double* m_out = grid_max.data_ptr<double>();
  double* z_out = grid_total.data_ptr<double>();
  double* e_out = weighted_shifted.data_ptr<double>();
  double* d_out = weighted_distance.data_ptr<double>();
  double* p_out = prefix_lse.data_ptr<double>();
  const int64_t q_tiles = (Nq + query_tile - 1) / query_tile;

  at::parallel_for(0, R * H * q_tiles, 1, [&](int64_t begin, int64_t end) {
    const int64_t widest = std::max(key_tile, prefix);
    std::vector<float> logits(query_tile * widest), acc(query_tile * Dv), acc_prefix(query_tile * Dv);
    std::vector<double> m(query_tile), z(query_tile), e(query_tile), dist(query_tile);
    std::vector<double> pmax(query_tile), pz(query_tile);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t head = item / q_tiles, q0 = (item % q_tiles) * query_tile;
      const int64_t rows = std::min(query_tile, Nq - q0);
      const float* qt = qd + (head * Nq + q0) * D;
      const float* kh = kd + head * Nk * D;
      const float* vh = vd + head * Nk * Dv;
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(z.begin(), z.end(), 0.0);
      std::fill(e.begin(), e.end(), 0.0);
      std::fill(dist.begin(), dist.end(), 0.0);
      std::fill(acc.begin(), acc.end(), 0.f);
      if (prefix > 0) {  // the prefix keys: their own softmax pieces and numerator
        gemm(rows, prefix, D, qt, D, kh, Nk, logits.data(), prefix, false);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = logits.data() + i * prefix;
          pmax[i] = row_max(s, prefix);
          pz[i] = exp_row(s, prefix, static_cast<float>(pmax[i]), 0.f, 0.f, nullptr, nullptr, false).total;
        }
        gemm(rows, Dv, prefix, logits.data(), prefix, vh, Dv, acc_prefix.data(), Dv, false);
      }
      for (int64_t k0 = prefix; k0 < Nk; k0 += key_tile) {
        const int64_t cols = std::min(key_tile, Nk - k0);
        gemm(rows, cols, D, qt, D, kh + k0, Nk, logits.data(), cols, false);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = logits.data() + i * cols;
          const double new_max = std::max(m[i], static_cast<double>(row_max(s, cols)));
          const float* anchor = qa + (q0 + i) * 2;
          const TileSums sums = exp_row(s, cols, static_cast<float>(new_max), anchor[0], anchor[1],
                                        ky + (k0 - prefix), kx + (k0 - prefix), true);
          // Rescale what earlier tiles summed at the old maximum: w_old = w exp(m_old - m_new),
          // and sum w_old (s - m_new) = r (sum w (s - m_old) + (m_old - m_new) Z).
          if (m[i] == kNegInf) {
            z[i] = sums.total, e[i] = sums.shifted, dist[i] = sums.distance;
          } else {
            const double r = std::exp(m[i] - new_max);
            e[i] = r * (e[i] + (m[i] - new_max) * z[i]) + sums.shifted;
            z[i] = r * z[i] + sums.total;
            dist[i] = r * dist[i] + sums.distance;
            if (r != 1.0) {
              float* row = acc.data() + i * Dv;
              const float rf = static_cast<float>(r);
              for (int64_t c = 0; c < Dv; ++c) row[c] *= rf;
            }
          }
          m[i] = new_max;
        }
        gemm(rows, Dv, cols, logits.data(), cols, vh + k0 * Dv, Dv, acc.data(), Dv, true);
      }
      for (int64_t i = 0; i < rows; ++i) {  // softmax @ v over every key, from the two parts
        const int64_t at = head * Nq + q0 + i;
        const double grid_lse = m[i] + std::log(z[i]);
        const double plse = prefix > 0 ? pmax[i] + std::log(pz[i]) : kNegInf;
        const double lse = prefix > 0 ? std::max(grid_lse, plse) + std::log1p(std::exp(-std::abs(grid_lse - plse)))
                                      : grid_lse;
        const float grid_factor = static_cast<float>(std::exp(m[i] - lse));
        const float prefix_factor = prefix > 0 ? static_cast<float>(std::exp(pmax[i] - lse)) : 0.f;
        float* o = od + at * Dv;
        const float* a = acc.data() + i * Dv;
        const float* ap = acc_prefix.data() + i * Dv;
        for (int64_t c = 0; c < Dv; ++c) o[c] = grid_factor * a[c] + (prefix > 0 ? prefix_factor * ap[c] : 0.f);
        m_out[at] = m[i], z_out[at] = z[i], e_out[at] = e[i], d_out[at] = dist[i], p_out[at] = plse;
      }
    }
    at::native::cpublas::brgemm_release(/*is_vnni=*/false);
  });
  return {out, grid_max, grid_total, weighted_shifted, weighted_distance, prefix_lse};
}

}  // namespace

TORCH_LIBRARY(localitylab, m) {
  m.def("attention_rows(Tensor q, Tensor k, Tensor v, float scale, int prefix, Tensor query_anchors, "
        "Tensor key_anchors, int query_tile, int key_tile) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("attention_rows", c10::DispatchKey::CPU, TORCH_FN(attention_rows));
}
