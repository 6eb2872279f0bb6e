// CPU kernels for pi_jax, called from XLA as FFI custom calls (pi_jax/native/__init__.py builds
// and registers them). float32 only; every product goes through OpenBLAS's sgemm (the
// scipy-openblas32 wheel, whose symbols carry a scipy_ prefix), which ran the MLP's shapes at
// 210-240 GFLOP/s against 170-200 for XLA:CPU's own dot (docs/performance.md).
//
// pi_causal_attention: flash attention (online softmax) over the lower triangle only.
//   q [B, L, N, H], k, v [B, L, K, H] -> out [B, L, N, H], lse [B, N, L] (log-sum-exp of the
//   scaled scores, float32). segment_ids [B, L] int32 (or empty: no masking): a query sees only
//   keys with its own id (packed documents). One work item = (batch, kv head, query block) with the kv head's
//   G query heads together; items are taken largest first from a shared counter by `threads`
//   workers, each calling a single-threaded sgemm, so the cores never wait on each other
//   inside a product.
// pi_logsumexp_pick: logits [M, V], targets [M] -> logsumexp [M], logits[m, targets[m]] [M].
// pi_matmul: x [M, K] @ w [K, N] (or w [N, K] transposed) -> [M, N], the longer of M and N
//   split over `threads` workers.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "cblas.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp(x) for x <= 0 (scores minus their row maximum), vectorisable: x = n·ln2 + r with |r| <=
// ln2/2, exp(r) by its degree-6 Taylor polynomial (relative error < 2e-7, float32's own
// rounding), 2^n from the exponent bits. Below -87 the result is 0 (float32 underflows there).
inline float ExpNonPositive(float x) {
  const float clamped = std::max(x, -87.0f);
  const float n = std::nearbyint(clamped * 1.44269504088896341f);
  const float r = (clamped - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

constexpr int64_t kSumSlice = 512;  // logsumexp_pick's float32 partial sums (see there)

// Runs fn(0) .. fn(workers - 1) on `workers` threads (the caller's among them). OpenBLAS itself
// is kept single-threaded (see the initializer at the end): the parallelism is ours, so two
// products never compete for the cores.
template <typename Fn>
void RunOnThreads(int64_t workers, Fn fn) {
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(fn, w);
  fn(0);
  for (auto& t : pool) t.join();
}

struct AttentionShape {
  int64_t batch, length, heads, kv_heads, head_dim, block;
};

// One query block of one kv head's query group: rows [t0, t0 + rows) of the G query heads that
// share kv head g, copied to one contiguous [G·rows, H] matrix (row j·rows + i: head g·G + j,
// position t0 + i), so each key block is one [G·rows, H] x [H, cols] product: OpenBLAS packs
// the key block once for all G heads. Keys [0, t0 + rows).
// Scratch: q_rows [G·block, H], scores [G·block, block], acc [G·block, H], row_max, row_sum
// [G·block]. seg: this batch row's segment ids [L], or nullptr (no document masking).
void AttendGroup(const AttentionShape& s, const float* q, const float* k, const float* v,
                 const int32_t* seg, float* out, float* lse, int64_t b, int64_t g, int64_t t0,
                 float scale, float* q_rows, float* scores, float* acc, float* row_max,
                 float* row_sum) {
  const int64_t h = s.head_dim, bs = s.block;
  const int64_t rows = std::min(bs, s.length - t0);
  const int64_t group = s.heads / s.kv_heads, all_rows = group * rows;
  const int64_t q_stride = s.heads * h, kv_stride = s.kv_heads * h;
  for (int64_t j = 0; j < group; ++j) {
    const float* src = q + (b * s.length + t0) * q_stride + (g * group + j) * h;
    for (int64_t i = 0; i < rows; ++i) {
      std::memcpy(q_rows + (j * rows + i) * h, src + i * q_stride, h * sizeof(float));
    }
  }
  const float* k_head = k + b * s.length * kv_stride + g * h;
  const float* v_head = v + b * s.length * kv_stride + g * h;
  std::fill(acc, acc + all_rows * h, 0.0f);
  std::fill(row_max, row_max + all_rows, -std::numeric_limits<float>::infinity());
  std::fill(row_sum, row_sum + all_rows, 0.0f);
  for (int64_t s0 = 0; s0 < t0 + rows; s0 += bs) {
    const int64_t cols = std::min(bs, t0 + rows - s0);
    const bool diagonal = s0 + cols > t0;  // the block that holds the causal boundary
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, all_rows, cols, h, scale, q_rows,
                      h, k_head + s0 * kv_stride, kv_stride, 0.0f, scores, cols);
    for (int64_t r = 0; r < all_rows; ++r) {
      float* row = scores + r * cols;
      // Keys visible to query t0 + i in this block: s0 .. t0 + i.
      const int64_t visible = diagonal ? std::min(cols, t0 + r % rows - s0 + 1) : cols;
      if (seg != nullptr) {  // keys of other segments: -inf, so their exp below is exactly 0
        const int32_t own = seg[t0 + r % rows];
        const int32_t* key_seg = seg + s0;
        constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#pragma omp simd
        for (int64_t j = 0; j < visible; ++j) row[j] = key_seg[j] == own ? row[j] : kNegInf;
      }
      // The reductions are vectorised by `omp simd` (-fopenmp-simd; the max written as a
      // comparison, which GCC vectorises where std::max stays scalar): left to GCC, a float max
      // or sum runs in order one lane at a time, and these passes cost as much as the two
      // products (8K attention 1.3 s -> 0.83 s on one core).
      float m = row_max[r];
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j < visible; ++j) m = row[j] > m ? row[j] : m;
      if (m == -std::numeric_limits<float>::infinity()) {
        // Nothing visible yet (earlier documents only, masked): the row's state stays empty.
        // Its own key comes later, so no row ends empty and lse is always finite.
        std::fill(row, row + cols, 0.0f);
        continue;
      }
      const float correction = ExpNonPositive(row_max[r] - m);  // 0 on the first block (-inf)
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < visible; ++j) {
        row[j] = ExpNonPositive(row[j] - m);
        sum += row[j];
      }
      std::fill(row + visible, row + cols, 0.0f);
      row_sum[r] = row_sum[r] * correction + sum;
      row_max[r] = m;
      if (correction != 1.0f) {
        float* a = acc + r * h;
        for (int64_t d = 0; d < h; ++d) a[d] *= correction;
      }
    }
    scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, all_rows, h, cols, 1.0f, scores,
                      cols, v_head + s0 * kv_stride, kv_stride, 1.0f, acc, h);
  }
  for (int64_t j = 0; j < group; ++j) {
    const int64_t n = g * group + j;
    float* out_blk = out + (b * s.length + t0) * q_stride + n * h;
    float* lse_row = lse + (b * s.heads + n) * s.length + t0;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t r = j * rows + i;
      const float inv = 1.0f / row_sum[r];
      for (int64_t d = 0; d < h; ++d) out_blk[i * q_stride + d] = acc[r * h + d] * inv;
      lse_row[i] = row_max[r] + std::log(row_sum[r]);
    }
  }
}

ffi::Error CausalAttention(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> segment_ids,
                           ffi::ResultBuffer<ffi::F32> out,
                           ffi::ResultBuffer<ffi::F32> lse, int64_t block, int64_t threads,
                           float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || v.dimensions().size() != 4 ||
      !std::equal(kd.begin(), kd.end(), v.dimensions().begin())) {
    return ffi::Error::InvalidArgument("pi_causal_attention: q [B, L, N, H], k, v [B, L, K, H]");
  }
  const AttentionShape s{qd[0], qd[1], qd[2], kd[2], qd[3], block};
  if (kd[0] != s.batch || kd[1] != s.length || kd[3] != s.head_dim || s.kv_heads <= 0 ||
      s.heads % s.kv_heads != 0 || block <= 0) {
    return ffi::Error::InvalidArgument("pi_causal_attention: q, k, v shapes do not agree");
  }
  const auto sd = segment_ids.dimensions();
  const bool masked = segment_ids.element_count() > 0;
  if (masked && (sd.size() != 2 || sd[0] != s.batch || sd[1] != s.length)) {
    return ffi::Error::InvalidArgument("pi_causal_attention: segment_ids [B, L] or empty");
  }
  const int32_t* seg = masked ? segment_ids.typed_data() : nullptr;
  const int64_t blocks = (s.length + block - 1) / block;
  const int64_t group = s.heads / s.kv_heads, groups = s.batch * s.kv_heads;
  const int64_t items = groups * blocks;
  const int64_t workers = std::max<int64_t>(1, std::min(threads, items));
  std::atomic<int64_t> next{0};
  RunOnThreads(workers, [&](int64_t) {
    const int64_t rows = group * block;
    std::vector<float> q_rows(rows * s.head_dim), scores(rows * block), acc(rows * s.head_dim),
        row_max(rows), row_sum(rows);
    for (int64_t item = next++; item < items; item = next++) {
      // Largest first: items 0 .. groups - 1 are the last query block, which visits every key
      // block.
      const int64_t qb = blocks - 1 - item / groups, bg = item % groups;
      const int64_t bi = bg / s.kv_heads;
      AttendGroup(s, q.typed_data(), k.typed_data(), v.typed_data(),
                  masked ? seg + bi * s.length : nullptr, out->typed_data(), lse->typed_data(),
                  bi, bg % s.kv_heads, qb * block, scale,
                  q_rows.data(), scores.data(), acc.data(), row_max.data(), row_sum.data());
    }
  });
  return ffi::Error::Success();
}

ffi::Error Matmul(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                  ffi::ResultBuffer<ffi::F32> out, int64_t threads, bool transpose_w) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2 || xd[1] != wd[transpose_w ? 1 : 0]) {
    return ffi::Error::InvalidArgument("pi_matmul: x [M, K] and w [K, N] (or [N, K] transposed)");
  }
  const int64_t m = xd[0], kk = xd[1], n = wd[transpose_w ? 0 : 1];
  // Each worker takes a slice of the longer side, in multiples of 16 (one AVX-512 register of
  // floats): rows for the layers' [L, D] x [D, F], columns for a loss chunk's [T, D] x [D, V],
  // where splitting rows would have every worker stream the whole vocabulary matrix.
  const bool by_rows = m >= n;
  const int64_t extent = by_rows ? m : n;
  const int64_t workers = std::max<int64_t>(1, std::min(threads, extent / 16));
  const int64_t chunk = ((extent + workers - 1) / workers + 15) / 16 * 16;
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* op = out->typed_data();
  const int64_t ldw = transpose_w ? kk : n;
  RunOnThreads(workers, [&](int64_t w_id) {
    const int64_t start = w_id * chunk, size = std::min(chunk, extent - start);
    if (size <= 0) return;
    if (by_rows) {
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_w ? CblasTrans : CblasNoTrans,
                        size, n, kk, 1.0f, xp + start * kk, kk, wp, ldw, 0.0f, op + start * n, n);
    } else {  // columns start .. start + size: rows of w [N, K], or columns of w [K, N]
      scipy_cblas_sgemm(CblasRowMajor, CblasNoTrans, transpose_w ? CblasTrans : CblasNoTrans, m,
                        size, kk, 1.0f, xp, kk, wp + (transpose_w ? start * kk : start), ldw,
                        0.0f, op + start, n);
    }
  });
  return ffi::Error::Success();
}

// Each row's log-sum-exp and its target's logit, the two terms of the next-token NLL, in one
// read of the row per pass (max, then exp-sum) with the rows split over the workers. XLA:CPU
// spends ~2.5 ns an element on its logsumexp over a [256, 49152] chunk; this ~10x less.
ffi::Error LogSumExpPick(ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::S32> targets,
                         ffi::ResultBuffer<ffi::F32> logz, ffi::ResultBuffer<ffi::F32> picked,
                         int64_t threads) {
  const auto ld = logits.dimensions();
  if (ld.size() != 2 || targets.dimensions().size() != 1 || targets.dimensions()[0] != ld[0]) {
    return ffi::Error::InvalidArgument("pi_logsumexp_pick: logits [M, V] and targets [M]");
  }
  const int64_t m = ld[0], v = ld[1];
  const int64_t workers = std::max<int64_t>(1, std::min(threads, m));
  const int64_t chunk = (m + workers - 1) / workers;
  const float* lp = logits.typed_data();
  const int32_t* tp = targets.typed_data();
  float* zp = logz->typed_data();
  float* pp = picked->typed_data();
  RunOnThreads(workers, [&](int64_t w_id) {
    for (int64_t r = w_id * chunk; r < std::min(m, (w_id + 1) * chunk); ++r) {
      const float* row = lp + r * v;
      float mx = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : mx)
      for (int64_t j = 0; j < v; ++j) mx = row[j] > mx ? row[j] : mx;
      // The exp-sum in float32 slices of kSumSlice added up in double: one float32 sum over a
      // whole vocabulary row runs ~6K terms deep in each of AVX2's 8 lanes, and its rounding
      // reached 6e-6 relative in the log-sum-exp (SmolLM2's 49152 logits); a slice is ~64 deep.
      double sum = 0.0;
      for (int64_t j0 = 0; j0 < v; j0 += kSumSlice) {
        const int64_t j1 = std::min(v, j0 + kSumSlice);
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = j0; j < j1; ++j) part += ExpNonPositive(row[j] - mx);
        sum += part;
      }
      zp[r] = mx + static_cast<float>(std::log(sum));
      const int32_t t = tp[r];
      // An out-of-range target (the caller checks token ids) reads as NaN, never out of bounds.
      pp[r] = (t >= 0 && t < v) ? row[t] : std::numeric_limits<float>::quiet_NaN();
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(PiCausalAttention, CausalAttention,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block")
                                  .Attr<int64_t>("threads")
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PiMatmul, Matmul,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads")
                                  .Attr<bool>("transpose_w"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(PiLogSumExpPick, LogSumExpPick,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("threads"));

// Loading the library makes this process's OpenBLAS (the scipy-openblas32 copy, which numpy
// does not use) single-threaded: the kernels above split the work themselves.
__attribute__((constructor)) static void SingleThreadedBlas() {
  scipy_openblas_set_num_threads(1);
}
