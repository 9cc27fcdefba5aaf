// CPU kernels for the decode hot path, compiled on first use (torch.utils.cpp_extension).
//
// paged_attention_decode: one query per sequence against its KV blocks, read in place
//   through the block table (no gather), an online softmax per head, grouped-query aware.
// rms_norm, silu_and_mul: fused elementwise ops that would otherwise be several torch ops.
#include <torch/extension.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <limits>
#include <vector>

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

#ifdef __AVX2__
// Eight dot products q . k_i (i < 8) at once: one accumulator per row, then a transposing
// horizontal reduction, so the eight sums land in one vector.
inline __m256 dot8(const float* q, const float* const* k, int64_t D) {
  __m256 a[8];
  for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[i] + d), a[i]);
  }
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
  const __m256 lo = _mm256_permute2f128_ps(s0123, s4567, 0x20), hi = _mm256_permute2f128_ps(s0123, s4567, 0x31);
  return _mm256_add_ps(lo, hi);
}

// e^x for eight floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
// polynomial, 2^n through the exponent bits (relative error ~1e-7, like expf). Inputs are
// clamped to [-87.3, 88.3], where 2^n stays a normal float.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  // ln2 in two parts
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// s[t] = e^(s[t] - m) for t < n; returns their sum
inline float exp_shifted(float* s, int64_t n, float m) {
  int64_t t = 0;
  float total = 0.f;
#ifdef __AVX2__
  const __m256 mv = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (; t + 8 <= n; t += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), mv));
    _mm256_storeu_ps(s + t, e);
    acc = _mm256_add_ps(acc, e);
  }
  float lanes[8];
  _mm256_storeu_ps(lanes, acc);
  for (float v : lanes) total += v;
#endif
  for (; t < n; ++t) {
    s[t] = std::exp(s[t] - m);
    total += s[t];
  }
  return total;
}

// scores[t] = q . k_t * scale for the tokens [0, n) of one head; k_t = rows[t]
inline void score_rows(const float* q, const float* const* rows, int64_t n, int64_t D, float scale, float* out) {
  int64_t t = 0;
#ifdef __AVX2__
  if (D % 8 == 0) {
    const __m256 sv = _mm256_set1_ps(scale);
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(out + t, _mm256_mul_ps(dot8(q, rows + t, D), sv));
  }
#endif
  for (; t < n; ++t) out[t] = dot(q, rows[t], D) * scale;
}

// acc += p * v over D floats
inline void axpy(float p, const float* v, float* acc, int64_t D) {
  int64_t d = 0;
#ifdef __AVX2__
  const __m256 pv = _mm256_set1_ps(p);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(acc + d)));
#endif
  for (; d < D; ++d) acc[d] = std::fma(p, v[d], acc[d]);
}

#ifdef __AVX2__
// out[0, 8R) += sum_t p[t] * rows[t][0, 8R), the 8R sums held in registers over the tokens
// (each element accumulated in token order with one fma a token, as axpy does: the same result)
template <int R>
inline void weighted_sum(const float* p, const float* const* rows, int64_t offset, int64_t len, float* out) {
  __m256 acc[R];
  for (int i = 0; i < R; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
  for (int64_t t = 0; t < len; ++t) {
    const __m256 pv = _mm256_set1_ps(p[t]);
    const float* v = rows[t] + offset;
    for (int i = 0; i < R; ++i) acc[i] = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8 * i), acc[i]);
  }
  for (int i = 0; i < R; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

// weighted_sum over D floats (D a multiple of 8), 64 at a time
inline void weighted_rows(const float* p, const float* const* rows, int64_t offset, int64_t len, int64_t D, float* out) {
  int64_t c = 0;
  for (; c + 64 <= D; c += 64) weighted_sum<8>(p, rows, offset + c, len, out + c);
  switch ((D - c) / 8) {
    case 1: weighted_sum<1>(p, rows, offset + c, len, out + c); break;
    case 2: weighted_sum<2>(p, rows, offset + c, len, out + c); break;
    case 3: weighted_sum<3>(p, rows, offset + c, len, out + c); break;
    case 4: weighted_sum<4>(p, rows, offset + c, len, out + c); break;
    case 5: weighted_sum<5>(p, rows, offset + c, len, out + c); break;
    case 6: weighted_sum<6>(p, rows, offset + c, len, out + c); break;
    case 7: weighted_sum<7>(p, rows, offset + c, len, out + c); break;
    default: break;
  }
}
#endif

// the largest of s[0, n), n >= 1
inline float max_of(const float* s, int64_t n) {
  int64_t t = 0;
  float m = s[0];
#ifdef __AVX2__
  if (n >= 8) {
    __m256 mv = _mm256_loadu_ps(s);
    for (t = 8; t + 8 <= n; t += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + t));
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (float l : lanes) m = l > m ? l : m;
  }
#endif
  for (; t < n; ++t) m = s[t] > m ? s[t] : m;
  return m;
}

// Scratch space of one thread of the decode attention.
struct AttentionScratch {
  std::vector<const float*> k_tokens, v_tokens;
  std::vector<float> scores, acc;
};

// Attention of one sequence's query heads for the KV heads [h0, h1) over its `len` cached
// tokens, block by block: the scores of a block's tokens (all the heads [h0, h1) of a token
// together: they are contiguous in the cache), then after the softmax the values, each block's
// rows read once from memory for all the query rows (software prefetching of the next block
// measured no gain: benchmarks/decode_attention.py). Every head's arithmetic is the same
// whichever heads are done together, so the result does not depend on how the batch is split
// over threads.
inline void attend(const float* q, float* out, const int64_t* table, int64_t len, const float* kp, const float* vp,
                   int64_t bs, int64_t k_sb, int64_t k_st, int64_t k_sh, int64_t v_sb, int64_t v_st, int64_t v_sh,
                   int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, AttentionScratch& w) {
  const int64_t heads = h1 - h0, rows_per_token = heads * G;
  w.k_tokens.resize(len);
  w.v_tokens.resize(len);
  for (int64_t t = 0; t < len; ++t) {
    w.k_tokens[t] = kp + table[t / bs] * k_sb + (t % bs) * k_st;
    w.v_tokens[t] = vp + table[t / bs] * v_sb + (t % bs) * v_st;
  }
  // scores[(h, g), t] = q_(h, g) . k_(h, t) * scale, eight tokens at a time
  w.scores.resize(rows_per_token * len);
  for (int64_t b0 = 0; b0 < len; b0 += bs) {
    const int64_t b1 = std::min(len, b0 + bs);
    for (int64_t t0 = b0; t0 < b1; t0 += 8) {
      const int64_t t1 = std::min(b1, t0 + 8);
      for (int64_t h = h0; h < h1; ++h) {
        const float* rows[8];  // this head's key rows of the eight tokens
        for (int64_t t = t0; t < t1; ++t) rows[t - t0] = w.k_tokens[t] + h * k_sh;
        for (int64_t g = 0; g < G; ++g)
          score_rows(q + (h * G + g) * D, rows, t1 - t0, D, scale, w.scores.data() + ((h - h0) * G + g) * len + t0);
      }
    }
  }
  for (int64_t r = 0; r < rows_per_token; ++r) {  // softmax over t
    float* sr = w.scores.data() + r * len;
    const float m = max_of(sr, len);
    const float inv = 1.f / exp_shifted(sr, len, m);
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) sr[t] *= inv;
  }
  // out_(h, g) = sum_t p_(h, g), t v_(h, t)
#ifdef __AVX2__
  if (D % 8 == 0) {  // a block at a time; each query row's sums in registers over the block's tokens
    std::fill(out + h0 * G * D, out + h1 * G * D, 0.f);
    for (int64_t b0 = 0; b0 < len; b0 += bs) {
      const int64_t n = std::min(bs, len - b0);
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t g = 0; g < G; ++g) {
          const int64_t r = (h - h0) * G + g;
          weighted_rows(w.scores.data() + r * len + b0, w.v_tokens.data() + b0, h * v_sh, n, D, out + (h * G + g) * D);
        }
    }
    return;
  }
#endif
  w.acc.assign(rows_per_token * D, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t h = h0; h < h1; ++h) {
      const float* v = w.v_tokens[t] + h * v_sh;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t r = (h - h0) * G + g;
        axpy(w.scores[r * len + t], v, w.acc.data() + r * D, D);
      }
    }
  }
  std::copy(w.acc.begin(), w.acc.end(), out + h0 * G * D);
}

}  // namespace

// q: [B, Hq, D]; k_cache/v_cache: [NB, bs, Hkv, D] (row stride may exceed Hkv*D);
// block_tables: [B, max_blocks] int64; seq_lens: [B] int64 -> out: [B, Hq, D]
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor block_tables, torch::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(q.is_contiguous() && block_tables.is_contiguous() && seq_lens.is_contiguous(), "contiguous inputs");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2);
  const int64_t G = Hq / Hkv;
  const int64_t max_blocks = block_tables.size(1);
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const int64_t k_sb = k_cache.stride(0), k_st = k_cache.stride(1), k_sh = k_cache.stride(2);
  const int64_t v_sb = v_cache.stride(0), v_st = v_cache.stride(1), v_sh = v_cache.stride(2);
  const float fscale = static_cast<float>(scale);

  // a whole sequence per task when there are enough of them, else one (sequence, KV head)
  // per task so that every thread has work
  const bool per_head = B < 2 * at::get_num_threads();
  const int64_t tasks = per_head ? B * Hkv : B;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = per_head ? task / Hkv : task;
      const int64_t h0 = per_head ? task % Hkv : 0, h1 = per_head ? h0 + 1 : Hkv;
      attend(qp + b * Hq * D, op + b * Hq * D, bt + b * max_blocks, lens[b], kp, vp, bs, k_sb, k_st, k_sh, v_sb, v_st,
             v_sh, h0, h1, G, D, fscale, scratch);
    }
  });
  return out;
}

// x: [T, H] -> x / rms(x) * weight (float32 accumulation)
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "float32 [T, H] contiguous");
  const int64_t T = x.size(0), H = x.size(1);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* row = xp + t * H;
      const float inv = 1.f / std::sqrt(dot(row, row, H) / H + static_cast<float>(eps));
      float* o = op + t * H;
#pragma omp simd
      for (int64_t i = 0; i < H; ++i) o[i] = wp[i] * (row[i] * inv);
    }
  });
  return out;
}

// x: [T, 2I] holding [gate | up] -> silu(gate) * up: [T, I]
torch::Tensor silu_and_mul(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.dim() == 2, "float32 [T, 2I] contiguous");
  const int64_t T = x.size(0), I = x.size(1) / 2;
  auto out = torch::empty({T, I}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = xp + t * 2 * I;
      const float* up = gate + I;
      float* o = op + t * I;
      int64_t i = 0;
#ifdef __AVX2__
      const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
      for (; i + 8 <= I; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_sub_ps(zero, g));
        _mm256_storeu_ps(o + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < I; ++i) o[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
    }
  });
  return out;
}

// y = x W^T (+ bias) for a few rows of x: x [M, K], W [N, K] row-major -> y [M, N].
// Decode steps are bound by streaming W; eight rows of W are read once and used for every
// row of x while they sit in L1.
torch::Tensor linear_small_batch(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(1) == w.size(1), "x [M, K], W [N, K] contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, (N + 7) / 8, 16, [&](int64_t begin, int64_t end) {
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * 8, rows_here = std::min<int64_t>(8, N - n0);
      const float* rows[8];
      for (int i = 0; i < 8; ++i) rows[i] = wp + (n0 + std::min<int64_t>(i, rows_here - 1)) * K;
      for (int64_t m = 0; m < M; ++m) {
        float out[8];
#ifdef __AVX2__
        if (K % 8 == 0) {
          _mm256_storeu_ps(out, dot8(xp + m * K, rows, K));
        } else
#endif
        {
          for (int i = 0; i < 8; ++i) out[i] = dot(xp + m * K, rows[i], K);
        }
        for (int64_t i = 0; i < rows_here; ++i) yp[m * N + n0 + i] = out[i] + (bp ? bp[n0 + i] : 0.f);
      }
    }
  });
  return y;
}

// Rotary embedding (neox layout) in place on the first `heads` heads of each row of qkv:
// qkv [T, W] with W >= heads * D, cos/sin [T, D] (the halves repeat, as transformers builds them).
void rotary_embedding(torch::Tensor qkv, torch::Tensor cos, torch::Tensor sin, int64_t heads, int64_t D) {
  TORCH_CHECK(qkv.scalar_type() == torch::kFloat32 && qkv.stride(1) == 1, "float32 rows");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == D, "cos/sin [T, D]");
  const int64_t T = qkv.size(0), row = qkv.stride(0), half = D / 2;
  float* xp = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  at::parallel_for(0, T, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * D;
      const float* s = sp + t * D;
      for (int64_t h = 0; h < heads; ++h) {
        float* x = xp + t * row + h * D;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[i + half];
          x[i] = x1 * c[i] - x2 * s[i];
          x[i + half] = x2 * c[i + half] + x1 * s[i + half];
        }
      }
    }
  });
}

// Write each token's K and V (rows of [T, Hkv * D], possibly strided) into its cache slot.
void reshape_and_cache(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor slot_mapping) {
  TORCH_CHECK(k.stride(1) == 1 && v.stride(1) == 1 && slot_mapping.is_contiguous(), "row-major K/V");
  const int64_t T = k.size(0), width = k.size(1), bs = k_cache.size(1);
  TORCH_CHECK(k_cache.stride(1) == width && k_cache.stride(2) * k_cache.size(2) == width, "cache rows hold a token");
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  const int64_t k_sb = k_cache.stride(0), v_sb = v_cache.stride(0);
  at::parallel_for(0, T, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = slots[t];
      std::copy(kp + t * k.stride(0), kp + t * k.stride(0) + width, kc + (slot / bs) * k_sb + (slot % bs) * width);
      std::copy(vp + t * v.stride(0), vp + t * v.stride(0) + width, vc + (slot / bs) * v_sb + (slot % bs) * width);
    }
  });
}

// x W^T + b for a decode step inside the one-call layer: up to `stream_rows` rows on the
// streaming kernel over the plain weight, more on oneDNN's packed weight (what the layer by
// layer path runs through torch.ops.mkldnn._linear_pointwise), which wins on larger batches.
static torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                             const torch::Tensor& packed, int64_t stream_rows) {
  if (x.size(0) <= stream_rows) return linear_small_batch(x, w, b);
  static const auto onednn = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                                 .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                                   c10::string_view, c10::List<std::optional<at::Scalar>>,
                                                   std::optional<c10::string_view>)>();
  return onednn.call(x, packed, b, "none", c10::List<std::optional<at::Scalar>>(), c10::string_view(""));
}

// One LLaMA-family decoder layer for a decode step (one new token a sequence), in one call:
// the same kernels as the layer-by-layer path, in the same order; what it saves is a dozen
// Python-level calls per layer, which at batch 1 cost about as much as the attention itself.
//   h = x + o_proj(attn(rope(q), rope(k), v)), q, k, v = qkv_proj(rms_norm(x))
//   y = h + down_proj(silu(gate) * up),        gate, up = gate_up_proj(rms_norm(h))
// Each projection takes its plain weight (w) and oneDNN's packed one (p); see `project`.
torch::Tensor llama_decode_layer(torch::Tensor x, torch::Tensor ln1, torch::Tensor qkv_w, torch::Tensor qkv_p,
                                 c10::optional<torch::Tensor> qkv_b, torch::Tensor o_w, torch::Tensor o_p,
                                 c10::optional<torch::Tensor> o_b, torch::Tensor ln2, torch::Tensor gate_up_w,
                                 torch::Tensor gate_up_p, c10::optional<torch::Tensor> gate_up_b, torch::Tensor down_w,
                                 torch::Tensor down_p, c10::optional<torch::Tensor> down_b, torch::Tensor k_cache,
                                 torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables,
                                 torch::Tensor seq_lens, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, double eps, double scale, int64_t stream_rows) {
  const int64_t B = x.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  auto qkv = project(rms_norm(x, ln1, eps), qkv_w, qkv_b, qkv_p, stream_rows);
  rotary_embedding(qkv, cos, sin, num_heads + num_kv_heads, head_dim);
  reshape_and_cache(qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), k_cache, v_cache,
                    slot_mapping);
  auto q = qkv.narrow(1, 0, q_size).contiguous().view({B, num_heads, head_dim});
  auto attn = paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale).view({B, q_size});
  auto h = project(attn, o_w, o_b, o_p, stream_rows).add_(x);
  auto mlp = project(silu_and_mul(project(rms_norm(h, ln2, eps), gate_up_w, gate_up_b, gate_up_p, stream_rows)),
                     down_w, down_b, down_p, stream_rows);
  return mlp.add_(h);
}

// Greedy sampling: the index of each row's largest value, the first one on ties (as
// torch.argmax; a NaN counts as the largest). x: [B, V] -> [B] int64.
torch::Tensor argmax_rows(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "float32 [B, V] rows");
  const int64_t B = x.size(0), V = x.size(1), row = x.stride(0);
  auto out = torch::empty({B}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float* r = xp + b * row;
      float m = r[0];
      bool nan = false;
      int64_t v = 0;
#ifdef __AVX2__
      __m256 mv = _mm256_set1_ps(r[0]), unordered = _mm256_setzero_ps();
      for (; v + 8 <= V; v += 8) {
        const __m256 xv = _mm256_loadu_ps(r + v);
        mv = _mm256_max_ps(mv, xv);
        unordered = _mm256_or_ps(unordered, _mm256_cmp_ps(xv, xv, _CMP_UNORD_Q));
      }
      float lanes[8];
      _mm256_storeu_ps(lanes, mv);
      for (float l : lanes) m = l > m ? l : m;
      nan = _mm256_movemask_ps(unordered) != 0;
#endif
      for (; v < V; ++v) {
        m = r[v] > m ? r[v] : m;
        nan = nan || r[v] != r[v];
      }
      int64_t found = 0;
      for (int64_t i = 0; i < V; ++i)
        if (nan ? r[i] != r[i] : r[i] == m) {  // a NaN counts as the largest, as in torch
          found = i;
          break;
        }
      op[b] = found;
    }
  });
  return out;
}
