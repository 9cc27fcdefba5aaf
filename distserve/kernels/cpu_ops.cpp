// CPU kernels, compiled on first use (torch.utils.cpp_extension): the helpers the attention
// kernels share (exp8, dot8, ...), fused elementwise ops that would otherwise be several torch
// ops (rms_norm, silu_and_mul, rotary_embedding), the small-batch linear, the KV cache write
// and greedy argmax. decode_attention.cpp and prefill_attention.cpp follow in the same unit.
#include <torch/extension.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <ATen/Parallel.h>
#include <cmath>
#include <algorithm>
#include <limits>
#include <cstring>
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

// Vector ops as overloads on the vector type, so code written once serves 8 and 16 lanes (the
// exponential's polynomial below, prefill attention's softmax). vsplat's first argument only
// picks the width. Spelled once for both widths: V the type, P its intrinsics' prefix.
#define DISTSERVE_VECTOR_OPS(V, P)                                   \
  inline V vsplat(V, float x) { return P##_set1_ps(x); }             \
  inline V vfma(V a, V b, V c) { return P##_fmadd_ps(a, b, c); }     \
  inline V vfnma(V a, V b, V c) { return P##_fnmadd_ps(a, b, c); }   \
  inline V vmul(V a, V b) { return P##_mul_ps(a, b); }               \
  inline V vadd(V a, V b) { return P##_add_ps(a, b); }               \
  inline V vsub(V a, V b) { return P##_sub_ps(a, b); }               \
  inline V vmax(V a, V b) { return P##_max_ps(a, b); }
DISTSERVE_VECTOR_OPS(__m256, _mm256)
#ifdef __AVX512F__
DISTSERVE_VECTOR_OPS(__m512, _mm512)
#endif
#undef DISTSERVE_VECTOR_OPS

// e^r for x = n ln2 + r (n = round(x / ln2)): the 2^n factor is the caller's
template <typename V>
inline V exp_reduced(V x, V n) {
  const V z{};
  V r = vfnma(n, vsplat(z, 0.693359375f), x);  // ln2 in two parts
  r = vfnma(n, vsplat(z, -2.12194440e-4f), r);
  V p = vsplat(z, 1.9875691500e-4f);
  p = vfma(p, r, vsplat(z, 1.3981999507e-3f));
  p = vfma(p, r, vsplat(z, 8.3334519073e-3f));
  p = vfma(p, r, vsplat(z, 4.1665795894e-2f));
  p = vfma(p, r, vsplat(z, 1.6666665459e-1f));
  p = vfma(p, r, vsplat(z, 5.0000001201e-1f));
  return vfma(p, vmul(r, r), vadd(r, vsplat(z, 1.f)));
}

// e^x for eight floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6
// polynomial, 2^n through the exponent bits (relative error ~1e-7, like expf). Inputs are
// clamped to [-87.3, 88.3], where 2^n stays a normal float; kNonPositive skips the upper clamp
// for inputs known to be <= 0 (a softmax's shifted scores). Below -87.3 (masked keys are -inf)
// it gives ~1e-38, which no sum with the row's maximum (1) can see.
template <bool kNonPositive = false>
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
  if (!kNonPositive) x = _mm256_min_ps(x, _mm256_set1_ps(88.3f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_reduced(x, n);
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#ifdef __AVX512F__
// exp8<true> for sixteen floats, 2^n applied by scalef
inline __m512 exp16_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp_reduced(x, n), n);
}
#endif
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

}  // namespace


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

// GPT-2's tanh-approximated GELU in place: 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),
// u = sqrt(2 / pi) (x + 0.044715 x^3). One exponential a value, where torch's kernel
// evaluates tanh to full precision and runs ~5x slower than its exact GELU here.
torch::Tensor gelu_tanh_(torch::Tensor x) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "float32 contiguous");
  float* xp = x.data_ptr<float>();
  constexpr float kMinus2Root2OverPi = -1.5957691216057308f, kCubic = 0.044715f;
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.f), a = _mm256_set1_ps(kMinus2Root2OverPi), c = _mm256_set1_ps(kCubic);
    for (; i + 8 <= end; i += 8) {
      const __m256 v = _mm256_loadu_ps(xp + i);
      const __m256 inner = _mm256_mul_ps(a, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v));
      _mm256_storeu_ps(xp + i, _mm256_div_ps(v, _mm256_add_ps(one, exp8(inner))));
    }
#endif
    for (; i < end; ++i) {
      const float v = xp[i];
      xp[i] = v / (1.f + std::exp(kMinus2Root2OverPi * (v + kCubic * v * v * v)));
    }
  });
  return x;
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

// Greedy tokens from a screened LM head. s [B, V] (bfloat16) approximates the logits x W^T:
// x and W rounded to bfloat16, the products summed in float32, the sum rounded to bfloat16,
// so |s_j - x . w_j| <= c ||x||_2 ||w_j||_2 (norms [V] holds the ||w_j||_2, rounded up; c
// from the caller). A token can be the argmax only if its upper bound s_j + b_j + err_j
// reaches every token's lower bound s_k + b_k - err_k; those candidates' logits are
// recomputed from the float32 rows of W with double sums, and the largest taken (the first
// on ties). The bounds are computed in float32 with their own rounding added to err_j (a
// thousandth of it, and 2^-20 |b_j|). A row with more than `cap` candidates, or anything not
// finite, gets -1: the caller computes its logits in full. x: [B, K] float32, w: [V, K]
// float32 rows -> [B] int64.
torch::Tensor screened_argmax(torch::Tensor x, torch::Tensor s, torch::Tensor w, torch::Tensor norms,
                              c10::optional<torch::Tensor> bias, double c, int64_t cap) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1, "x: float32 [B, K] rows");
  TORCH_CHECK(s.scalar_type() == torch::kBFloat16 && s.dim() == 2 && s.stride(1) == 1 && s.size(0) == x.size(0),
              "s: bfloat16 [B, V] rows");
  TORCH_CHECK(w.scalar_type() == torch::kFloat32 && w.dim() == 2 && w.stride(1) == 1 && w.size(1) == x.size(1) &&
                  w.size(0) >= s.size(1), "w: float32 [V, K] rows");
  TORCH_CHECK(norms.scalar_type() == torch::kFloat32 && norms.is_contiguous() && norms.numel() >= s.size(1), "norms [V]");
  TORCH_CHECK(!bias.has_value() || (bias->scalar_type() == torch::kFloat32 && bias->is_contiguous() &&
                                    bias->numel() >= s.size(1)), "bias [V] float32");
  const int64_t B = x.size(0), K = x.size(1), V = s.size(1);
  auto out = torch::empty({B}, x.options().dtype(torch::kInt64));
  const float* xp = x.data_ptr<float>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::BFloat16>());
  const float* wp = w.data_ptr<float>();
  const float* np = norms.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  int64_t* op = out.data_ptr<int64_t>();
  const int64_t lx = x.stride(0), ls = s.stride(0), lw = w.stride(0);
  constexpr float kInf = std::numeric_limits<float>::infinity();
  // s_j + b_j and its error bound err_j, in float32
  auto value = [&](const uint16_t* sr, int64_t j) {
    uint32_t bits = static_cast<uint32_t>(sr[j]) << 16;
    float v;
    std::memcpy(&v, &bits, 4);
    return bp ? v + bp[j] : v;
  };
  auto slack = [&](float e, int64_t j) { return e * np[j] + (bp ? std::abs(bp[j]) * 0x1p-20f : 0.f); };
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> candidates;
    for (int64_t b = begin; b < end; ++b) {
      const float* xr = xp + b * lx;
      const uint16_t* sr = sp + b * ls;
      double sq = 0.0;
#pragma omp simd reduction(+ : sq)
      for (int64_t i = 0; i < K; ++i) sq += static_cast<double>(xr[i]) * xr[i];
      const float e = static_cast<float>(c * std::sqrt(sq) * 1.001);
      bool finite = std::isfinite(e);
      float lower = -kInf;
      int64_t j = 0;
#ifdef __AVX512F__
      const __m512 ev = _mm512_set1_ps(e), infv = _mm512_set1_ps(kInf), bscale = _mm512_set1_ps(0x1p-20f);
      __m512 lo = _mm512_set1_ps(-kInf);
      __mmask16 bad = 0;
      auto load = [&](int64_t i, __m512* v, __m512* err) {
        *v = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sr + i))), 16));
        *err = _mm512_mul_ps(ev, _mm512_loadu_ps(np + i));
        if (bp) {
          const __m512 bv = _mm512_loadu_ps(bp + i);
          *v = _mm512_add_ps(*v, bv);
          *err = _mm512_fmadd_ps(_mm512_abs_ps(bv), bscale, *err);
        }
      };
      for (; j + 16 <= V; j += 16) {
        __m512 v, err;
        load(j, &v, &err);
        bad |= _mm512_cmp_ps_mask(_mm512_abs_ps(v), infv, _CMP_NLT_UQ);  // inf or NaN
        lo = _mm512_max_ps(lo, _mm512_sub_ps(v, err));
      }
      lower = _mm512_reduce_max_ps(lo);
      finite = finite && bad == 0;
#endif
      for (; j < V; ++j) {
        const float v = value(sr, j);
        finite = finite && std::isfinite(v);
        lower = std::max(lower, v - slack(e, j));
      }
      candidates.clear();
      j = 0;
#ifdef __AVX512F__
      const __m512 lower_v = _mm512_set1_ps(lower);
      for (; finite && j + 16 <= V && static_cast<int64_t>(candidates.size()) <= cap; j += 16) {
        __m512 v, err;
        load(j, &v, &err);
        for (__mmask16 m = _mm512_cmp_ps_mask(_mm512_add_ps(v, err), lower_v, _CMP_GE_OQ); m; m &= m - 1)
          candidates.push_back(j + __builtin_ctz(m));
      }
#endif
      for (; finite && j < V && static_cast<int64_t>(candidates.size()) <= cap; ++j)
        if (value(sr, j) + slack(e, j) >= lower) candidates.push_back(j);
      int64_t best = -1;
      if (finite && static_cast<int64_t>(candidates.size()) <= cap) {
        double top = 0.0;
        for (const int64_t k : candidates) {
          const float* wr = wp + k * lw;
          double z = bp ? bp[k] : 0.0;
#pragma omp simd reduction(+ : z)
          for (int64_t i = 0; i < K; ++i) z += static_cast<double>(xr[i]) * wr[i];
          if (best < 0 || z > top) top = z, best = k;
        }
        if (!std::isfinite(top)) best = -1;
      }
      op[b] = best;
    }
  });
  return out;
}
