// Decode attention over the paged KV cache (one query token a sequence), and the one-call
// LLaMA decoder layer built on it. Compiled in one unit after cpu_ops.cpp (its helpers and
// elementwise kernels).

namespace {

// Scratch space of one thread of the decode attention.
struct AttentionScratch {
  std::vector<const float*> k_tokens, v_tokens;
  std::vector<float> scores, acc, qs, m, l;
};

// Decode attention is bound by reading K and V from memory, in block-sized pieces scattered
// over the cache (benchmarks/decode_attention.py). The reads are kept going while the core
// computes: a cursor walks the rows the kernel will read, in the order it reads them, and
// asks for them into L2 kReadAheadLines cache lines in front, a few lines after every
// register block, so that as many lines are asked for as are consumed. Asked for in one
// burst ahead of each block instead, the requests queue up behind each other while the
// arithmetic waits, and the two do not overlap (about a fifth less KV bandwidth).
constexpr int64_t kReadAheadLines = 512;
constexpr int64_t kChunkTokens = 64;  // tokens between two updates of the online softmax
constexpr int64_t kValueTokens = 16;  // value rows added into the accumulators at a time

// Token t's row of a paged cache: its block from the sequence's table, then its slot
// (strides in floats)
inline const float* token_row(const float* base, const int64_t* table, int64_t t, int64_t bs, int64_t sb, int64_t st) {
  return base + table[t / bs] * sb + (t % bs) * st;
}

// The cursor over a sequence's K and V rows (heads [h0, h1) of each token), chunk by chunk:
// the chunk's K rows, then its V rows.
struct ReadAhead {
  const int64_t* table;
  int64_t len, bs, chunk;
  const float *k, *v;  // head h0 of the caches
  int64_t k_sb, k_st, v_sb, v_st;
  int64_t lines_per_row;
  int64_t c0 = 0, t = 0, line = 0, asked = 0;
  bool in_v = false;
  const char* row = nullptr;
  ReadAhead* next = nullptr;  // the sequence read after this one: past this one's end, its lines

  // the cursor over heads [h0, h1) of sequence `table`, `len`
  static ReadAhead over(const int64_t* table, int64_t len, const float* kp, const float* vp, int64_t bs, int64_t k_sb,
                        int64_t k_st, int64_t k_sh, int64_t v_sb, int64_t v_st, int64_t v_sh, int64_t h0, int64_t h1) {
    const int64_t chunk = std::max<int64_t>(1, kChunkTokens / bs) * bs;
    return ReadAhead{table, len, bs, chunk, kp + h0 * k_sh, vp + h0 * v_sh, k_sb, k_st, v_sb, v_st,
                     ((h1 - h0) * k_sh * 4 + 63) / 64};
  }

  // ask for the next n lines
  void advance(int64_t n) {
    asked += n;
    while (n > 0) {
      if (line == 0) {
        if (c0 >= len) {
          if (next) next->advance(n);
          return;
        }
        row = reinterpret_cast<const char*>(in_v ? token_row(v, table, t, bs, v_sb, v_st)
                                                 : token_row(k, table, t, bs, k_sb, k_st));
      }
      const int64_t take = std::min(n, lines_per_row - line);
      for (int64_t i = line; i < line + take; ++i) __builtin_prefetch(row + i * 64, 0, 1);  // prefetcht2 on x86
      n -= take;
      line += take;
      if (line < lines_per_row) return;
      line = 0;
      if (++t == std::min(c0 + chunk, len)) {  // the chunk's K rows are done: its V rows; those done: the next chunk
        if (in_v) c0 = t;
        else t = c0;
        in_v = !in_v;
      }
    }
  }
};

#ifdef __AVX2__
// Query rows of one KV head taken together by the register-blocked kernels below: three
// need 24 accumulators (AVX-512VL's 32 vector registers); with AVX2's 16, one.
#ifdef __AVX512VL__
constexpr int kRowsAtOnce = 3;
#else
constexpr int kRowsAtOnce = 1;
#endif

// s[g * stride + i] = qs_g . k_i for eight key rows i and NG query rows g (D a multiple of
// 8): every key vector is loaded once for the NG rows; the eight sums of a row end in one
// vector by a transposing reduction.
template <int NG>
inline void scores8(const float* qs, int64_t D, const float* const* k, float* s, int64_t stride) {
  __m256 a[NG][8];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < 8; ++i) a[g][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    __m256 qv[NG];
    for (int g = 0; g < NG; ++g) qv[g] = _mm256_loadu_ps(qs + g * D + d);
    for (int i = 0; i < 8; ++i) {
      const __m256 kv = _mm256_loadu_ps(k[i] + d);
      for (int g = 0; g < NG; ++g) a[g][i] = _mm256_fmadd_ps(kv, qv[g], a[g][i]);
    }
  }
  for (int g = 0; g < NG; ++g) {
    const __m256 s01 = _mm256_hadd_ps(a[g][0], a[g][1]), s23 = _mm256_hadd_ps(a[g][2], a[g][3]);
    const __m256 s45 = _mm256_hadd_ps(a[g][4], a[g][5]), s67 = _mm256_hadd_ps(a[g][6], a[g][7]);
    const __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    _mm256_storeu_ps(s + g * stride, _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20),
                                                   _mm256_permute2f128_ps(s0123, s4567, 0x31)));
  }
}

// acc_g[d0, d0 + 8W) += sum_t p[g * stride + t] v_t[d0, d0 + 8W) over n value rows, for NG
// query rows g (acc_g = acc + g * D): the sums stay in registers over the rows.
template <int NG, int W>
inline void values(const float* p, int64_t stride, const float* const* v, int64_t n, int64_t d0, int64_t D, float* acc) {
  __m256 a[NG][W];
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < W; ++i) a[g][i] = _mm256_loadu_ps(acc + g * D + d0 + 8 * i);
  for (int64_t t = 0; t < n; ++t) {
    __m256 pv[NG];
    for (int g = 0; g < NG; ++g) pv[g] = _mm256_set1_ps(p[g * stride + t]);
    const float* vt = v[t] + d0;
    for (int i = 0; i < W; ++i) {
      const __m256 x = _mm256_loadu_ps(vt + 8 * i);
      for (int g = 0; g < NG; ++g) a[g][i] = _mm256_fmadd_ps(pv[g], x, a[g][i]);
    }
  }
  for (int g = 0; g < NG; ++g)
    for (int i = 0; i < W; ++i) _mm256_storeu_ps(acc + g * D + d0 + 8 * i, a[g][i]);
}

template <int NG>
inline void values_rows(const float* p, int64_t stride, const float* const* v, int64_t n, int64_t D, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) values<NG, 8>(p, stride, v, n, d0, D, acc);
  switch ((D - d0) / 8) {
    case 1: values<NG, 1>(p, stride, v, n, d0, D, acc); break;
    case 2: values<NG, 2>(p, stride, v, n, d0, D, acc); break;
    case 3: values<NG, 3>(p, stride, v, n, d0, D, acc); break;
    case 4: values<NG, 4>(p, stride, v, n, d0, D, acc); break;
    case 5: values<NG, 5>(p, stride, v, n, d0, D, acc); break;
    case 6: values<NG, 6>(p, stride, v, n, d0, D, acc); break;
    case 7: values<NG, 7>(p, stride, v, n, d0, D, acc); break;
    default: break;
  }
}

// f(g0, NG) over the query rows [0, G) of a KV head, kRowsAtOnce at a time
template <typename F>
inline void by_row_groups(int64_t G, F&& f) {
  int64_t g0 = 0;
  for (; g0 + kRowsAtOnce <= G; g0 += kRowsAtOnce) f(g0, std::integral_constant<int, kRowsAtOnce>{});
  if constexpr (kRowsAtOnce == 3) {
    if (G - g0 == 2) f(g0, std::integral_constant<int, 2>{});
    if (G - g0 == 1) f(g0, std::integral_constant<int, 1>{});
  }
}

// `attend` for D a multiple of 8, kChunkTokens at a time with an online softmax: the chunk's
// scores (register blocks of 8 keys x kRowsAtOnce query rows of a KV head; every head of
// eight tokens, then the next eight, so memory is read in address order), the running max
// and sum of every query row, then the value rows added into the rows' accumulators
// (kRowsAtOnce rows x 64 dims in registers over kValueTokens rows).
inline void attend_blocked(const float* q, float* out, const int64_t* table, int64_t len, const float* kp,
                           const float* vp, int64_t bs, int64_t k_sb, int64_t k_st, int64_t k_sh, int64_t v_sb,
                           int64_t v_st, int64_t v_sh, int64_t h0, int64_t h1, int64_t G, int64_t D, float scale,
                           ReadAhead& ahead, AttentionScratch& w) {
  const int64_t heads = h1 - h0, rows = heads * G, lines_per_row = ahead.lines_per_row;
  const int64_t chunk = ahead.chunk, stride = (chunk + 7) / 8 * 8;
  w.qs.resize(rows * D);
  for (int64_t i = 0; i < rows * D; ++i) w.qs[i] = q[h0 * G * D + i] * scale;
  w.acc.assign(rows * D, 0.f);
  w.m.assign(rows, -std::numeric_limits<float>::infinity());
  w.l.assign(rows, 0.f);
  w.scores.resize(rows * stride);
  w.k_tokens.resize(stride);
  w.v_tokens.resize(stride);
  ahead.advance(kReadAheadLines - ahead.asked);  // what the previous sequence's tail has not asked for
  for (int64_t c0 = 0; c0 < len; c0 += chunk) {
    const int64_t n = std::min(chunk, len - c0);
    for (int64_t i = 0; i < (n + 7) / 8 * 8; ++i) {  // rows past n repeat the last one; their scores are never read
      const int64_t t = c0 + std::min(i, n - 1);
      w.k_tokens[i] = token_row(kp, table, t, bs, k_sb, k_st);
      w.v_tokens[i] = token_row(vp, table, t, bs, v_sb, v_st);
    }
    for (int64_t t0 = 0; t0 < n; t0 += 8) {
      for (int64_t h = h0; h < h1; ++h) {
        const float* k8[8];
        for (int64_t i = 0; i < 8; ++i) k8[i] = w.k_tokens[t0 + i] + h * k_sh;
        by_row_groups(G, [&](int64_t g0, auto NG) {
          const int64_t r = (h - h0) * G + g0;
          scores8<decltype(NG)::value>(w.qs.data() + r * D, D, k8, w.scores.data() + r * stride + t0, stride);
        });
        ahead.advance(8 * lines_per_row / heads);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* s = w.scores.data() + r * stride;
      const float m_new = std::max(w.m[r], max_of(s, n));
      const float alpha = std::exp(w.m[r] - m_new);  // 0 on the first chunk
      w.l[r] = w.l[r] * alpha + exp_shifted(s, n, m_new);
      w.m[r] = m_new;
      if (alpha != 1.f)
        for (int64_t d = 0; d < D; ++d) w.acc[r * D + d] *= alpha;
    }
    for (int64_t t0 = 0; t0 < n; t0 += kValueTokens) {
      const int64_t m = std::min(kValueTokens, n - t0);
      for (int64_t h = h0; h < h1; ++h) {
        const float* v16[kValueTokens];
        for (int64_t i = 0; i < m; ++i) v16[i] = w.v_tokens[t0 + i] + h * v_sh;
        by_row_groups(G, [&](int64_t g0, auto NG) {
          const int64_t r = (h - h0) * G + g0;
          values_rows<decltype(NG)::value>(w.scores.data() + r * stride + t0, stride, v16, m, D, w.acc.data() + r * D);
        });
        ahead.advance(m * lines_per_row / heads);
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; ++d) out[h0 * G * D + r * D + d] = w.acc[r * D + d] * inv;
  }
}
#endif

// Attention of one sequence's query heads for the KV heads [h0, h1) over its `len` cached
// tokens: `attend_blocked` when D is a multiple of 8 (every shape we know; `ahead` is its
// read-ahead cursor), else block by block the scores of a block's tokens, then after the
// softmax the values. Every head's
// arithmetic is the same whichever heads are done together, so the result does not depend on
// how the batch is split over threads.
inline void attend(const float* q, float* out, const int64_t* table, int64_t len, const float* kp, const float* vp,
                   int64_t bs, int64_t k_sb, int64_t k_st, int64_t k_sh, int64_t v_sb, int64_t v_st, int64_t v_sh,
                   int64_t h0, int64_t h1, int64_t G, int64_t D, float scale, ReadAhead& ahead,
                   AttentionScratch& w) {
#ifdef __AVX2__
  if (D % 8 == 0)
    return attend_blocked(q, out, table, len, kp, vp, bs, k_sb, k_st, k_sh, v_sb, v_st, v_sh, h0, h1, G, D, scale,
                          ahead, w);
#endif
  const int64_t heads = h1 - h0, rows_per_token = heads * G;
  w.k_tokens.resize(len);
  w.v_tokens.resize(len);
  for (int64_t t = 0; t < len; ++t) {
    w.k_tokens[t] = token_row(kp, table, t, bs, k_sb, k_st);
    w.v_tokens[t] = token_row(vp, table, t, bs, v_sb, v_st);
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
  struct Task {
    int64_t b, h0, h1;  // the sequence and its KV heads
  };
  const auto task_at = [&](int64_t task) {
    return per_head ? Task{task / Hkv, task % Hkv, task % Hkv + 1} : Task{task, 0, Hkv};
  };
  // a thread's tasks read one after another: the read-ahead runs on from one into the next
  const auto read_ahead = [&](int64_t task) {
    const Task t = task_at(task);
    return ReadAhead::over(bt + t.b * max_blocks, lens[t.b], kp, vp, bs, k_sb, k_st, k_sh, v_sb, v_st, v_sh, t.h0, t.h1);
  };
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    AttentionScratch scratch;
    ReadAhead ahead = read_ahead(begin), next{};
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h0, h1] = task_at(task);
      if (task + 1 < end) {
        next = read_ahead(task + 1);
        ahead.next = &next;
      }
      attend(qp + b * Hq * D, op + b * Hq * D, bt + b * max_blocks, lens[b], kp, vp, bs, k_sb, k_st, k_sh, v_sb, v_st,
             v_sh, h0, h1, G, D, fscale, ahead, scratch);
      ahead = next;
    }
  });
  return out;
}

// x W^T + b for a decode step inside the one-call layer: up to `stream_rows` rows on the panel
// kernel (w: panels [P, K, 48]) or the streaming one (w: plain [N, K]), more on oneDNN's packed
// weight (what the layer by layer path runs through torch.ops.mkldnn._linear_pointwise).
// A quantized weight comes as its int8 / uint8 storage (w) and its scales and mins (packed);
// `quant_rows` and `int8_activations` are quant_linear's `stream_rows` and `int8_activations`.
static torch::Tensor project(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& b,
                             const torch::Tensor& packed, int64_t stream_rows, int64_t quant_rows,
                             bool int8_activations) {
  if (w.scalar_type() == torch::kChar || w.scalar_type() == torch::kByte) {
    return quant_linear(x, w, packed, b, w.scalar_type() == torch::kChar ? 8 : 4, quant_rows, int8_activations);
  }
  if (x.size(0) <= stream_rows) return w.dim() == 3 ? panel_linear(x, w, packed.size(0), b) : linear_small_batch(x, w, b);
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
// Each projection takes its kept weight (w: panels or plain) and oneDNN's packed one (p), or its quantized
// storage and scales; see `project`.
torch::Tensor llama_decode_layer(torch::Tensor x, torch::Tensor ln1, torch::Tensor qkv_w, torch::Tensor qkv_p,
                                 c10::optional<torch::Tensor> qkv_b, torch::Tensor o_w, torch::Tensor o_p,
                                 c10::optional<torch::Tensor> o_b, torch::Tensor ln2, torch::Tensor gate_up_w,
                                 torch::Tensor gate_up_p, c10::optional<torch::Tensor> gate_up_b, torch::Tensor down_w,
                                 torch::Tensor down_p, c10::optional<torch::Tensor> down_b, torch::Tensor k_cache,
                                 torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables,
                                 torch::Tensor seq_lens, torch::Tensor cos, torch::Tensor sin, int64_t num_heads,
                                 int64_t num_kv_heads, int64_t head_dim, double eps, double scale, int64_t stream_rows,
                                 int64_t quant_rows, bool int8_activations) {
  const int64_t B = x.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  auto qkv = project(rms_norm(x, ln1, eps), qkv_w, qkv_b, qkv_p, stream_rows, quant_rows, int8_activations);
  rotary_embedding(qkv, cos, sin, num_heads + num_kv_heads, head_dim);
  reshape_and_cache(qkv.narrow(1, q_size, kv_size), qkv.narrow(1, q_size + kv_size, kv_size), k_cache, v_cache,
                    slot_mapping);
  auto q = qkv.narrow(1, 0, q_size).contiguous().view({B, num_heads, head_dim});
  auto attn = paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale).view({B, q_size});
  auto h = project(attn, o_w, o_b, o_p, stream_rows, quant_rows, int8_activations).add_(x);
  auto mlp = project(silu_and_mul(project(rms_norm(h, ln2, eps), gate_up_w, gate_up_b, gate_up_p, stream_rows, quant_rows, int8_activations)),
                     down_w, down_b, down_p, stream_rows, quant_rows, int8_activations);
  return mlp.add_(h);
}

// One decoder layer with layer norms, biases and a pointwise MLP activation (OPT, GPT-2) for
// a decode step, in one call (see llama_decode_layer). Pre-LN (GPT-2, most OPT sizes):
//   h = x + out_proj(attn(qkv_proj(ln1(x))));   y = h + fc2(act(fc1(ln2(h))))
// post-LN (OPT-350m):
//   h = ln1(x + out_proj(attn(qkv_proj(x))));   y = ln2(h + fc2(act(fc1(h))))
// act: "relu", "gelu" or "gelu_tanh".
torch::Tensor layer_norm_decode_layer(torch::Tensor x, c10::optional<torch::Tensor> ln1_w,
    c10::optional<torch::Tensor> ln1_b, torch::Tensor qkv_w, torch::Tensor qkv_p, c10::optional<torch::Tensor> qkv_b,
    torch::Tensor o_w, torch::Tensor o_p, c10::optional<torch::Tensor> o_b, c10::optional<torch::Tensor> ln2_w,
    c10::optional<torch::Tensor> ln2_b, torch::Tensor fc1_w, torch::Tensor fc1_p, c10::optional<torch::Tensor> fc1_b,
    torch::Tensor fc2_w, torch::Tensor fc2_p, c10::optional<torch::Tensor> fc2_b, torch::Tensor k_cache,
    torch::Tensor v_cache, torch::Tensor slot_mapping, torch::Tensor block_tables, torch::Tensor seq_lens,
    int64_t num_heads, int64_t head_dim, double eps, double scale, int64_t stream_rows, int64_t quant_rows,
    bool int8_activations, bool pre_ln, const std::string& activation) {
  const int64_t B = x.size(0), H = x.size(1), size = num_heads * head_dim;
  auto ln1 = [&](const torch::Tensor& t) { return at::layer_norm(t, {H}, ln1_w, ln1_b, eps); };
  auto ln2 = [&](const torch::Tensor& t) { return at::layer_norm(t, {H}, ln2_w, ln2_b, eps); };
  auto qkv = project(pre_ln ? ln1(x) : x, qkv_w, qkv_b, qkv_p, stream_rows, quant_rows, int8_activations);
  reshape_and_cache(qkv.narrow(1, size, size), qkv.narrow(1, 2 * size, size), k_cache, v_cache, slot_mapping);
  auto q = qkv.narrow(1, 0, size).contiguous().view({B, num_heads, head_dim});
  auto attn = paged_attention_decode(q, k_cache, v_cache, block_tables, seq_lens, scale).view({B, size});
  auto h = project(attn, o_w, o_b, o_p, stream_rows, quant_rows, int8_activations).add_(x);
  if (!pre_ln) h = ln1(h);
  auto hidden = project(pre_ln ? ln2(h) : h, fc1_w, fc1_b, fc1_p, stream_rows, quant_rows, int8_activations);
  if (activation == "relu")
    hidden.relu_();
  else if (activation == "gelu_tanh")
    gelu_tanh_(hidden);
  else
    at::gelu_(hidden);
  auto y = project(hidden, fc2_w, fc2_b, fc2_p, stream_rows, quant_rows, int8_activations).add_(h);
  return pre_ln ? y : ln2(y);
}
