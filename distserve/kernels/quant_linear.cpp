// Weight-only quantized linear layers: weights stay int8 or int4 in memory, activations are
// float32, and each weight is dequantized in registers as the matmul streams it.
//
// A quantized weight [N, K] is stored as
//   q:  int8 [N, K] (bits 8), or uint8 [N, K / 2] (bits 4: within each group of G elements,
//       byte j holds element j in its low nibble and element j + G / 2 in its high nibble,
//       the layout of GGUF's Q4_0 / Q4_1 blocks);
//   sm: float16 [N, K / G, 2], each group's (scale, min):  w = q * scale + min.
// This covers symmetric and asymmetric, per-channel (G = K) and groupwise formats, and the
// GGUF block formats map onto it unchanged (see layers/quantization.py).

namespace {

// Up to this many activation rows share one pass over the weights (one accumulator each).
constexpr int kQuantRows = 4;

#ifdef __F16C__
inline float half_to_float(at::Half h) { return _cvtsh_ss(h.x); }  // one instruction, not c10's bit twiddling
#else
inline float half_to_float(at::Half h) { return static_cast<float>(h); }
#endif

#ifdef __AVX512F__
// 16 consecutive weights of group g of one row as float32, from bits-8 storage.
inline __m512 dequant16_i8(const int8_t* q, __m512 scale, __m512 min) {
  const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
  return _mm512_fmadd_ps(v, scale, min);
}

// 32 weights (elements j..j+15 and j+G/2..j+G/2+15 of a group) from 16 bytes of bits-4 storage.
inline void dequant32_i4(const uint8_t* q, __m512 scale, __m512 min, __m512* lo, __m512* hi) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i l = _mm_and_si128(bytes, mask), h = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  *lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(l)), scale, min);
  *hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(h)), scale, min);
}
#endif

// y[m, n] for rows m in [m0, m0 + rows) and outputs n in [n0, n1).
template <int BITS>
void quant_rows(const float* x, int64_t K, const uint8_t* q, const at::Half* sm, int64_t G, float* y, int64_t N,
                int64_t m0, int rows, int64_t n0, int64_t n1) {
  const int64_t groups = K / G;
  const int64_t row_bytes = BITS == 8 ? K : K / 2;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const at::Half* smn = sm + n * groups * 2;
    float out[kQuantRows] = {0.f, 0.f, 0.f, 0.f};
#ifdef __AVX512F__
    if (G % (BITS == 8 ? 16 : 32) == 0) {
      __m512 acc[kQuantRows];
      for (int r = 0; r < kQuantRows; ++r) acc[r] = _mm512_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        // the group's (scale, min): two float16 converted together, then broadcast
        int32_t pair;
        std::memcpy(&pair, smn + 2 * g, sizeof(pair));
        const __m128 sm2 = _mm_cvtph_ps(_mm_cvtsi32_si128(pair));
        const __m512 scale = _mm512_broadcastss_ps(sm2), min = _mm512_broadcastss_ps(_mm_movehdup_ps(sm2));
        const float* xg = x + m0 * K + g * G;
        if (BITS == 8) {
          const int8_t* qg = reinterpret_cast<const int8_t*>(qn) + g * G;
          for (int64_t j = 0; j < G; j += 16) {
            const __m512 w = dequant16_i8(qg + j, scale, min);
            for (int r = 0; r < rows; ++r) acc[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + r * K + j), acc[r]);
          }
        } else {
          const uint8_t* qg = qn + g * G / 2;
          const int64_t half = G / 2;
          for (int64_t j = 0; j < half; j += 16) {
            __m512 lo, hi;
            dequant32_i4(qg + j, scale, min, &lo, &hi);
            for (int r = 0; r < rows; ++r) {
              acc[r] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xg + r * K + j), acc[r]);
              acc[r] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + r * K + half + j), acc[r]);
            }
          }
        }
      }
      for (int r = 0; r < rows; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
    } else
#endif
    {
      for (int64_t g = 0; g < groups; ++g) {
        const float scale = half_to_float(smn[2 * g]), min = half_to_float(smn[2 * g + 1]);
        for (int r = 0; r < rows; ++r) {
          const float* xg = x + (m0 + r) * K + g * G;
          float acc = 0.f;
          for (int64_t j = 0; j < G; ++j) {
            float v;
            if (BITS == 8) {
              v = static_cast<float>(reinterpret_cast<const int8_t*>(qn)[g * G + j]);
            } else {
              const uint8_t b = qn[g * G / 2 + (j % (G / 2))];
              v = static_cast<float>(j < G / 2 ? (b & 0x0F) : (b >> 4));
            }
            acc += (v * scale + min) * xg[j];
          }
          out[r] += acc;
        }
      }
    }
    for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = out[r];
  }
}

#ifdef __AVX512BW__
// ---- Streaming with int8 activations (llama.cpp's way for its quantized matmuls) ----
// For the few-row matmuls of decode steps, each activation row is quantized to int8 in blocks
// of 32 (scale = block max / 127), so that a weight's integers meet it in integer multiply-adds
// (VNNI's u8 x s8 -> s32 dot of four, 64 bytes an instruction) and the scales are applied once a
// lane of four products: y = sum_lanes (s_w d_x) sum4(q_w q_x) + m_w sum4(x). Exact but for the
// activation's rounding (relative 2^-8 of its block's largest value).
//
// The activation bytes are laid out in the weight's order: natural for bits 8; for bits 4
// (groups of 32, byte j = elements j and j + 16) each run of four groups becomes 64 bytes of
// the low halves, then 64 of the high halves, matching the nibbles of 64 weight bytes. Per
// 4-byte lane of that layout: the activation scale (d) and the float sum of the lane's
// activations (for bits 4, of the low and the high lane together).
struct Int8Rows {
  int64_t K = 0, padded = 0;  // padded: K rounded up to 128 (bits 4) or 64 (bits 8)
  std::vector<int8_t> q;       // [M, padded]
  std::vector<float> d, s;     // [M, padded / 4] (bits 8) or [M, padded / 8] (bits 4)
};

inline int32_t lane_step(int bits) { return bits == 4 ? 8 : 4; }  // activations per entry of d and s

Int8Rows quantize_activations(const float* x, int64_t M, int64_t K, int bits) {
  Int8Rows a;
  a.K = K;
  const int64_t chunk = bits == 4 ? 128 : 64;
  a.padded = (K + chunk - 1) / chunk * chunk;
  const int64_t lanes = a.padded / lane_step(bits);
  a.q.assign(M * a.padded, 0);
  a.d.assign(M * lanes, 0.f);
  a.s.assign(M * lanes, 0.f);
  alignas(64) int8_t block[32];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k0 = 0; k0 < K; k0 += 32) {
      const float* xb = x + m * K + k0;
      const __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
      const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
      const __m512 scale = _mm512_set1_ps(id);
      _mm_store_si128(reinterpret_cast<__m128i*>(block),
                      _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, scale))));
      _mm_store_si128(reinterpret_cast<__m128i*>(block + 16),
                      _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, scale))));
      int8_t* q = a.q.data() + m * a.padded;
      float* dl = a.d.data() + m * lanes;
      float* sl = a.s.data() + m * lanes;
      if (bits == 8) {
        std::memcpy(q + k0, block, 32);
        for (int l = 0; l < 8; ++l) {
          dl[k0 / 4 + l] = d;
          sl[k0 / 4 + l] = xb[4 * l] + xb[4 * l + 1] + xb[4 * l + 2] + xb[4 * l + 3];
        }
      } else {  // group g = k0 / 32 is group g % 4 of its run of four
        const int64_t run = k0 / 128 * 128, slot = (k0 / 32) % 4;
        std::memcpy(q + run + slot * 16, block, 16);
        std::memcpy(q + run + 64 + slot * 16, block + 16, 16);
        for (int l = 0; l < 4; ++l) {
          const int64_t lane = run / 8 + slot * 4 + l;
          dl[lane] = d;
          sl[lane] = xb[4 * l] + xb[4 * l + 1] + xb[4 * l + 2] + xb[4 * l + 3] + xb[16 + 4 * l] + xb[17 + 4 * l] +
                     xb[18 + 4 * l] + xb[19 + 4 * l];
        }
      }
    }
  }
  return a;
}

// acc += sum over 4-byte lanes of u8 x s8 products
inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#ifdef __AVX512VNNI__
  return _mm512_dpbusd_epi32(acc, u, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

// y[m, n] for every row m (M <= kQuantRows) and outputs n in [n0, n1), activations as int8.
template <int BITS>
void quant_rows_int8(const Int8Rows& a, const uint8_t* q, const at::Half* sm, int64_t G, float* y,
                     int64_t N, int64_t m0, int rows, int64_t n0, int64_t n1) {
  const int64_t K = a.K, groups = K / G, row_bytes = BITS == 8 ? K : K / 2;
  const int64_t chunk = BITS == 4 ? 128 : 64, lanes = a.padded / lane_step(BITS);
  // which (scale, min) pair of the chunk's float16 pairs each of the 16 lanes takes
  const int64_t pairs = BITS == 4 ? 4 : std::max<int64_t>(1, 64 / G);
  const int per = 16 / static_cast<int>(pairs);
  alignas(64) int32_t is[16], im[16];
  for (int l = 0; l < 16; ++l) is[l] = 2 * (l / per), im[l] = 2 * (l / per) + 1;
  const __m512i idx_s = _mm512_load_si512(is), idx_m = _mm512_load_si512(im);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const at::Half* smn = sm + n * groups * 2;
    __m512 facc[kQuantRows], macc[kQuantRows];
    for (int r = 0; r < rows; ++r) facc[r] = macc[r] = _mm512_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += chunk) {
      const int64_t left = K - k0;
      const int64_t bytes = BITS == 4 ? std::min<int64_t>(64, left / 2) : std::min<int64_t>(64, left);
      const __mmask64 mask = bytes == 64 ? ~0ULL : (1ULL << bytes) - 1;
      const __m512i w = _mm512_maskz_loadu_epi8(mask, qn + (BITS == 4 ? k0 / 2 : k0));
      // the chunk's (scale, min) pairs as 16 lanes each
      const int64_t g0 = k0 / G, have = std::min<int64_t>(pairs, groups - g0);
      const __m256 sm8 = _mm256_cvtph_ps(_mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << (2 * have)) - 1), smn + 2 * g0));
      const __m512 sm16 = _mm512_castps256_ps512(sm8);
      const __m512 ws = _mm512_permutexvar_ps(idx_s, sm16), wm = _mm512_permutexvar_ps(idx_m, sm16);
      const int64_t lane0 = k0 / lane_step(BITS);
      // bits 4: the low and the high nibbles, against their activation halves; bits 8 (signed):
      // |w| against the activations with w's sign
      __m512i u0, u1 = _mm512_setzero_si512();
      __mmask64 negative = 0;
      if (BITS == 4) {
        u0 = _mm512_and_si512(w, nibble);
        u1 = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
      } else {
        u0 = _mm512_abs_epi8(w);
        negative = _mm512_movepi8_mask(w);
      }
      for (int r = 0; r < rows; ++r) {
        const int8_t* xq = a.q.data() + (m0 + r) * a.padded + k0;
        const __m512i x0 = _mm512_loadu_si512(xq);
        __m512i dot;
        if (BITS == 4) {
          dot = dot_u8s8(dot_u8s8(_mm512_setzero_si512(), u0, x0), u1, _mm512_loadu_si512(xq + 64));
        } else {
          dot = dot_u8s8(_mm512_setzero_si512(), u0, _mm512_mask_sub_epi8(x0, negative, _mm512_setzero_si512(), x0));
        }
        const float* dl = a.d.data() + (m0 + r) * lanes + lane0;
        const float* sl = a.s.data() + (m0 + r) * lanes + lane0;
        facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(ws, _mm512_loadu_ps(dl)), facc[r]);
        macc[r] = _mm512_fmadd_ps(wm, _mm512_loadu_ps(sl), macc[r]);
      }
    }
    for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(facc[r], macc[r]));
  }
}
#endif

void check_quantized(const torch::Tensor& q, const torch::Tensor& sm, int64_t bits, int64_t K) {
  TORCH_CHECK(bits == 8 || bits == 4, "bits must be 8 or 4");
  TORCH_CHECK(q.is_contiguous() && sm.is_contiguous() && sm.scalar_type() == torch::kHalf && sm.dim() == 3,
              "q contiguous, sm float16 [N, K / G, 2]");
  TORCH_CHECK(q.size(1) * (bits == 4 ? 2 : 1) == K, "q's row does not hold K weights");
  TORCH_CHECK(K % sm.size(1) == 0 && (bits == 8 || (K / sm.size(1)) % 2 == 0), "K is not a whole number of groups");
}

// Rows [n0, n0 + rows) of a quantized weight as float32 into `out` ([rows, K], row-major).
void dequantize_into(const uint8_t* qp, const at::Half* smp, int64_t bits, int64_t K, int64_t G, int64_t n0,
                     int64_t rows, float* out) {
  const int64_t groups = K / G, row_bytes = bits == 8 ? K : K / 2;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    const uint8_t* qn = qp + n * row_bytes;
    for (int64_t g = 0; g < groups; ++g) {
      const float scale = half_to_float(smp[(n * groups + g) * 2]), min = half_to_float(smp[(n * groups + g) * 2 + 1]);
      float* o = out + r * K + g * G;
#ifdef __AVX512F__
      if (G % (bits == 8 ? 16 : 32) == 0) {
        const __m512 vs = _mm512_set1_ps(scale), vm = _mm512_set1_ps(min);
        if (bits == 8) {
          const int8_t* qg = reinterpret_cast<const int8_t*>(qn) + g * G;
          for (int64_t j = 0; j < G; j += 16) _mm512_storeu_ps(o + j, dequant16_i8(qg + j, vs, vm));
        } else {
          const uint8_t* qg = qn + g * G / 2;
          for (int64_t j = 0; j < G / 2; j += 16) {
            __m512 lo, hi;
            dequant32_i4(qg + j, vs, vm, &lo, &hi);
            _mm512_storeu_ps(o + j, lo);
            _mm512_storeu_ps(o + G / 2 + j, hi);
          }
        }
        continue;
      }
#endif
      if (bits == 8) {
        const int8_t* qg = reinterpret_cast<const int8_t*>(qn) + g * G;
#pragma omp simd
        for (int64_t j = 0; j < G; ++j) o[j] = static_cast<float>(qg[j]) * scale + min;
      } else {
        const uint8_t* qg = qn + g * G / 2;
        const int64_t half = G / 2;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) {
          o[j] = static_cast<float>(qg[j] & 0x0F) * scale + min;
          o[j + half] = static_cast<float>(qg[j] >> 4) * scale + min;
        }
      }
    }
  }
}

}  // namespace

// y = x W^T + b with W quantized (see the top of this file); x float32 [M, K]. Up to
// `stream_rows` rows: every weight dequantized in registers as it streams (decode is bound by
// the weight bytes read). More rows: the weight dequantized a tile of kTile output rows at a
// time into a buffer that stays in cache, each tile then a float32 GEMM (compute-bound, so
// the dequantization is paid once a weight, not once a row).
torch::Tensor quant_linear(torch::Tensor x, torch::Tensor q, torch::Tensor sm, c10::optional<torch::Tensor> bias,
                           int64_t bits, int64_t stream_rows, bool int8_activations) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x float32 [M, K] contiguous");
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  check_quantized(q, sm, bits, K);
  const int64_t G = K / sm.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const at::Half* smp = sm.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  if (M <= stream_rows) {
    // rows streamed with int8 activations where the weight's layout allows, else float32
#ifdef __AVX512BW__
    const bool int8_fits = K % 32 == 0 && (bits == 4 ? G == 32 : (G == 16 || G == 32 || G % 64 == 0));
    const bool int8 = int8_activations && int8_fits;
    const Int8Rows a = int8 ? quantize_activations(xp, M, K, static_cast<int>(bits)) : Int8Rows{};
#endif
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m0 = 0; m0 < M; m0 += kQuantRows) {
        const int rows = static_cast<int>(std::min<int64_t>(kQuantRows, M - m0));
#ifdef __AVX512BW__
        if (int8) {
          if (bits == 8) {
            quant_rows_int8<8>(a, qp, smp, G, yp, N, m0, rows, begin, end);
          } else {
            quant_rows_int8<4>(a, qp, smp, G, yp, N, m0, rows, begin, end);
          }
          continue;
        }
#endif
        if (bits == 8) {
          quant_rows<8>(xp, K, qp, smp, G, yp, N, m0, rows, begin, end);
        } else {
          quant_rows<4>(xp, K, qp, smp, G, yp, N, m0, rows, begin, end);
        }
      }
    });
  } else {
    constexpr int64_t kTile = 64;  // small enough that a projection's tiles share out evenly
    const int64_t tiles = (N + kTile - 1) / kTile;
    const bool inference = c10::InferenceMode::is_enabled();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      c10::InferenceMode guard(inference);  // the caller's mode, which pool threads do not inherit
      auto buffer = torch::empty({kTile, K}, x.options());
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * kTile, rows = std::min<int64_t>(kTile, N - n0);
        dequantize_into(qp, smp, bits, K, G, n0, rows, buffer.data_ptr<float>());
        y.narrow(1, n0, rows).copy_(at::mm(x, buffer.narrow(0, 0, rows).t()));
      }
    });
  }
  if (bias.has_value()) y.add_(*bias);
  return y;
}

// The float32 weight [rows.size(0), K] of the given rows of a quantized weight (all rows when
// `rows` is empty): for embedding lookups, and for torch paths that want the float weight.
torch::Tensor dequantize_rows(torch::Tensor q, torch::Tensor sm, int64_t bits, torch::Tensor rows) {
  const int64_t K = q.size(1) * (bits == 4 ? 2 : 1);
  check_quantized(q, sm, bits, K);
  const bool all = rows.numel() == 0;
  TORCH_CHECK(all || (rows.scalar_type() == torch::kLong && rows.is_contiguous()), "rows int64");
  const int64_t R = all ? q.size(0) : rows.numel(), N = q.size(0), G = K / sm.size(1);
  const int64_t* ids = all ? nullptr : rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < (all ? 0 : R); ++r) TORCH_CHECK(ids[r] >= 0 && ids[r] < N, "row index out of range");
  auto out = torch::empty({R, K}, torch::dtype(torch::kFloat32));
  const uint8_t* qp = static_cast<const uint8_t*>(q.data_ptr());
  const at::Half* smp = sm.data_ptr<at::Half>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, R, 8, [&](int64_t begin, int64_t end) {
    if (all) {
      dequantize_into(qp, smp, bits, K, G, begin, end - begin, op + begin * K);
      return;
    }
    for (int64_t r = begin; r < end; ++r) dequantize_into(qp, smp, bits, K, G, ids[r], 1, op + r * K);
  });
  return out;
}
