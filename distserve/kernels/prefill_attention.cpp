// Causal attention of a step's prompt tokens over the paged KV cache, flash-style: whole
// prompts, and prompt chunks after cached context (chunked prefill, prefix-cache hits) alike,
// since the step's own K and V are in the cache before attention runs.
//
// Compiled in one unit after cpu_ops.cpp (it uses exp8 / exp16_nonpositive from there).
//
// Work is split into tiles of (sequence, KV head, TQ query tokens); the tile's rows are its
// tokens' query heads of that KV head (GQA: G heads share each key), so every key and value
// read serves TQ * G query rows. Everything is kept transposed, rows along the vector lanes:
// Q^T [D, rows] (packed once a tile), S^T = K Q^T [keys, rows], acc^T [D, rows]. Keys and
// values are read one element at a time (broadcast), and the softmax runs down the columns,
// a vector of rows at a time (sixteen with AVX-512, eight with AVX2). For each tile of TK keys
// up to the diagonal: S^T (register blocks of 8 keys x 48 rows with AVX-512, 4 x 24 with
// AVX2: 128 keys are whole blocks), the causal mask on the diagonal tiles, an online softmax
// (running max and sum per row, acc^T rescaled), and acc^T += V^T P^T (blocks of 8 head dims
// x 48 rows, or 4 x 24: 64 or 128 head dims are whole blocks). Against 12 x 32 blocks (a
// tail block of 8 keys and one of 4 head dims, and 14 loads every 24 multiply-adds against
// 11) this ran 1.1-1.15x over GQA shapes and 1.0-1.06x over 16 KV heads.
// Keys and values are read in place from the cache, or, for sequences of kPackMinKeys keys
// and more, from a copy made head by head (see prefill_attention below).
// Costs differ by tile (later tokens see more keys), so threads take tiles dynamically,
// costliest first.
//
// Tiles of 48 rows (one register row block with AVX-512), where they were 96: a tile's Q^T,
// S^T and acc^T then take 48 KiB (D = 64), about L1, and on the diagonal fewer products past
// a row's position are computed and masked. With that and a tile's query and output rows
// asked for at once: 1.06-1.16x over the offline benchmark's shapes
// (benchmarks/prefill_attention.py), results bitwise the same.

#ifdef __AVX2__
namespace {

// TK: 128 keys ran 2-4% faster than 64 with 96-row tiles (a 1,024-token prompt of 12 query
// over 4 KV heads); with 48-row tiles 64, 128 and 256 were level
constexpr int64_t kTileKeys = 128;
constexpr int64_t kTileRows = 48;  // TQ * G, about (a multiple of kRowBlock after padding); see above

// Register blocks of kBlock keys (or head dims) x kRowVecs vectors of rows: each key's
// broadcast serves kRowVecs accumulators, and 128 keys or 64 head dims are whole blocks.
#ifdef __AVX512F__
constexpr int kBlock = 8;  // x 3 zmm of 16 rows: 24 accumulators of AVX-512's 32 registers
constexpr int kLanes = 16;
using vec = __m512;
inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm512_set1_ps(x); }
inline vec vzero() { return _mm512_setzero_ps(); }
#else
constexpr int kBlock = 4;  // x 3 ymm of 8 rows: 12 accumulators of AVX2's 16 registers
constexpr int kLanes = 8;
using vec = __m256;
inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
inline vec vset1(float x) { return _mm256_set1_ps(x); }
inline vec vzero() { return _mm256_setzero_ps(); }
#endif
constexpr int kRowVecs = 3;
constexpr int64_t kRowBlock = kRowVecs * kLanes;  // rows a register block

// st[j, c:c+kRowBlock) = sum_d k_j[d] * qt[d, c:c+kRowBlock) for R keys
template <int R>
inline void qk_block(const float* const* k, const float* qt, int64_t D, int64_t RP, int64_t c, float* st) {
  vec acc[R][kRowVecs];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kRowVecs; ++i) acc[r][i] = vzero();
  for (int64_t d = 0; d < D; ++d) {
    vec b[kRowVecs];
    for (int i = 0; i < kRowVecs; ++i) b[i] = vload(qt + d * RP + c + i * kLanes);
    for (int r = 0; r < R; ++r) {
      const vec a = vset1(k[r][d]);
      for (int i = 0; i < kRowVecs; ++i) acc[r][i] = vfma(a, b[i], acc[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kRowVecs; ++i) vstore(st + r * RP + c + i * kLanes, acc[r][i]);
}

// acc^T[d0 + r, c:c+kRowBlock) += sum_j v_j[d0 + r] * p^T[j, c:c+kRowBlock) for R head dims r
template <int R>
inline void pv_block(const float* const* v, int64_t n, int64_t d0, const float* pt, int64_t RP, int64_t c, float* acct) {
  vec a[R][kRowVecs];
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kRowVecs; ++i) a[r][i] = vload(acct + (d0 + r) * RP + c + i * kLanes);
  for (int64_t j = 0; j < n; ++j) {
    vec b[kRowVecs];
    for (int i = 0; i < kRowVecs; ++i) b[i] = vload(pt + j * RP + c + i * kLanes);
    const float* vj = v[j] + d0;
    for (int r = 0; r < R; ++r) {
      const vec w = vset1(vj[r]);
      for (int i = 0; i < kRowVecs; ++i) a[r][i] = vfma(w, b[i], a[r][i]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < kRowVecs; ++i) vstore(acct + (d0 + r) * RP + c + i * kLanes, a[r][i]);
}

// block(i, R) for i = 0, kBlock, 2 kBlock, ... < n, R = min(kBlock, n - i) as a compile-time constant
template <int R = kBlock, typename F>
inline void tail_block(int64_t i, int64_t r, F&& block) {
  if constexpr (R > 0) {
    if (r == R) return block(i, std::integral_constant<int, R>{});
    tail_block<R - 1>(i, r, block);
  }
}

template <typename F>
inline void by_blocks(int64_t n, F&& block) {
  int64_t i = 0;
  for (; i + kBlock <= n; i += kBlock) block(i, std::integral_constant<int, kBlock>{});
  if (n > i) tail_block(i, n - i, block);
}

struct PrefillScratch {
  std::vector<float> qt, st, acct, m, l, pos;
  std::vector<const float*> k, v;
};

struct PrefillTile {
  int64_t seq, head, first, count;  // query tokens [first, first + count) of the sequence
  double cost;
};

// What every tile of a call reads and writes besides keys and values: the query rows (scaled
// by `scale` as a tile packs them), where each sequence's rows start and its length with
// context, and the output rows; G query heads a KV head of D dims, tiles of up to max_rp rows.
struct PrefillQueries {
  const float* q;
  int64_t q_stride;
  const int64_t *starts, *lens;
  float* out;
  int64_t out_stride, G, D, max_rp;
  float scale;
};

// Ask for `n` rows of `bytes` each, `stride` floats apart, all at once (for writing if
// `write`): rows a whole QKV or output row apart, read or written one after another, do not
// overlap their misses
inline void prefetch_rows(const float* first, int64_t n, int64_t stride, int64_t bytes, bool write) {
  for (int64_t t = 0; t < n; ++t) {
    const char* row = reinterpret_cast<const char*>(first + t * stride);
    for (int64_t b = 0; b < bytes; b += 64) {
      if (write) __builtin_prefetch(row + b, 1);
      else _mm_prefetch(row + b, _MM_HINT_T0);
    }
  }
}

#ifdef __AVX512F__
inline vec vexp(vec x) { return exp16_nonpositive(x); }  // x <= 0
// keys past the row's position (key > pos) become -inf
inline vec vmask(vec s, vec key, vec pos) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(key, pos, _CMP_LE_OQ), vset1(-std::numeric_limits<float>::infinity()), s);
}
#else
inline vec vexp(vec x) { return exp8<true>(x); }
inline vec vmask(vec s, vec key, vec pos) {
  return _mm256_blendv_ps(vset1(-std::numeric_limits<float>::infinity()), s, _mm256_cmp_ps(key, pos, _CMP_LE_OQ));
}
#endif

// The online softmax over one key tile (keys k0 + [0, n)), a row block at a time (kRowVecs
// independent vectors, for the pipelines): S^T becomes P^T in place, m and l move to the new
// maxima, acc^T is rescaled. `masked`: some key lies past some row's position (the diagonal
// tile); those scores become -inf first.
inline void softmax_tile(PrefillScratch& w, int64_t k0, int64_t n, int64_t RP, int64_t D, bool masked) {
  constexpr int V = kRowVecs;
  for (int64_t c = 0; c < RP; c += kRowBlock) {
    float* st = w.st.data() + c;
    if (masked) {
      vec pos[V];
      for (int i = 0; i < V; ++i) pos[i] = vload(w.pos.data() + c + i * kLanes);
      for (int64_t j = 0; j < n; ++j) {
        const vec key = vset1(static_cast<float>(k0 + j));
        float* sj = st + j * RP;
        for (int i = 0; i < V; ++i) vstore(sj + i * kLanes, vmask(vload(sj + i * kLanes), key, pos[i]));
      }
    }
    vec mx[V], m[V], alpha[V], sum[V];
    for (int i = 0; i < V; ++i) mx[i] = vset1(-std::numeric_limits<float>::infinity());
    for (int64_t j = 0; j < n; ++j)
      for (int i = 0; i < V; ++i) mx[i] = vmax(mx[i], vload(st + j * RP + i * kLanes));
    for (int i = 0; i < V; ++i) {
      const vec m_old = vload(w.m.data() + c + i * kLanes);
      m[i] = vmax(m_old, mx[i]);  // finite: key 0 is in every row's first tile
      alpha[i] = vexp(vsub(m_old, m[i]));
      sum[i] = vzero();
    }
    for (int64_t j = 0; j < n; ++j) {
      float* sj = st + j * RP;
      for (int i = 0; i < V; ++i) {
        const vec p = vexp(vsub(vload(sj + i * kLanes), m[i]));
        vstore(sj + i * kLanes, p);
        sum[i] = vadd(sum[i], p);
      }
    }
    for (int i = 0; i < V; ++i) {
      float* l = w.l.data() + c + i * kLanes;
      vstore(l, vfma(vload(l), alpha[i], sum[i]));
      vstore(w.m.data() + c + i * kLanes, m[i]);
    }
    for (int64_t d = 0; d < D; ++d) {
      float* a = w.acct.data() + d * RP + c;
      for (int i = 0; i < V; ++i) vstore(a + i * kLanes, vmul(vload(a + i * kLanes), alpha[i]));
    }
  }
}

// The tiles of one batch, run over the threads (dynamically, in the order given). `rows(tile,
// k0, n, w)` points w.k[j] and w.v[j] at the key and value rows of positions k0 + j (j < n)
// of the tile's sequence and KV head.
template <typename Rows>
void run_tiles(const std::vector<PrefillTile>& tiles, const PrefillQueries& a, Rows&& rows_of) {
  const float* qp = a.q;
  const int64_t* starts = a.starts;
  const int64_t* lens = a.lens;
  const int64_t G = a.G, D = a.D, max_rp = a.max_rp;
#pragma omp parallel num_threads(at::get_num_threads())
  {
    PrefillScratch w;
    w.qt.resize(D * max_rp);
    w.st.resize(kTileKeys * max_rp);
    w.acct.resize(D * max_rp);
    w.m.resize(max_rp);
    w.l.resize(max_rp);
    w.pos.resize(max_rp);
    w.k.resize(kTileKeys);
    w.v.resize(kTileKeys);
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < static_cast<int64_t>(tiles.size()); ++i) {
      const PrefillTile& tile = tiles[i];
      const int64_t qlen = starts[tile.seq + 1] - starts[tile.seq], context = lens[tile.seq] - qlen;
      const int64_t rows = tile.count * G, RP = (rows + kRowBlock - 1) / kRowBlock * kRowBlock, h = tile.head;
      // Q^T, scaled; row r = (token first + r / G, query head h * G + r % G); padding rows
      // repeat the last row (their results are dropped). The tile's query rows (and at the
      // end its output rows) are asked for all at once first
      const float* q0 = qp + (starts[tile.seq] + tile.first) * a.q_stride + h * G * D;
      prefetch_rows(q0, tile.count, a.q_stride, G * D * 4, false);
      for (int64_t r = 0; r < RP; ++r) {
        const int64_t rr = std::min(r, rows - 1), t = rr / G;
        const float* src = q0 + t * a.q_stride + rr % G * D;
        for (int64_t d = 0; d < D; ++d) w.qt[d * RP + r] = src[d] * a.scale;
        w.pos[r] = static_cast<float>(context + tile.first + t);
      }
      std::fill(w.acct.begin(), w.acct.begin() + D * RP, 0.f);
      std::fill(w.m.begin(), w.m.begin() + RP, -std::numeric_limits<float>::infinity());
      std::fill(w.l.begin(), w.l.begin() + RP, 0.f);
      const int64_t first_pos = context + tile.first, keys = first_pos + tile.count;  // last row's position + 1
      for (int64_t k0 = 0; k0 < keys; k0 += kTileKeys) {
        const int64_t n = std::min(kTileKeys, keys - k0);
        rows_of(tile, k0, n, w);
        by_blocks(n, [&](int64_t j, auto R) {
          for (int64_t c = 0; c < RP; c += kRowBlock) qk_block<decltype(R)::value>(w.k.data() + j, w.qt.data(), D, RP, c, w.st.data() + j * RP);
        });
        softmax_tile(w, k0, n, RP, D, k0 + n - 1 > first_pos);
        by_blocks(D, [&](int64_t d0, auto R) {
          for (int64_t c = 0; c < RP; c += kRowBlock) pv_block<decltype(R)::value>(w.v.data(), n, d0, w.st.data(), RP, c, w.acct.data());
        });
      }
      float* out0 = a.out + (starts[tile.seq] + tile.first) * a.out_stride + h * G * D;
      prefetch_rows(out0, tile.count, a.out_stride, G * D * 4, true);
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / w.l[r];
        float* o = out0 + r / G * a.out_stride + r % G * D;
        for (int64_t d = 0; d < D; ++d) o[d] = w.acct[d * RP + r] * inv;
      }
    }
  }
}

// Sequences of fewer keys are read in place: copying them out costs more than it saves
constexpr int64_t kPackMinKeys = 256;

}  // namespace
#endif

// q: [T, Hq * D] (rows may be strided: a view of the QKV projection); k_cache/v_cache:
// [NB, bs, Hkv, D]; block_tables: [S, max_blocks]; query_starts: [S + 1] (the sequences'
// tokens are rows [query_starts[s], query_starts[s + 1]) of q); seq_lens: [S] (context
// including those tokens); out: [T, Hq * D] (rows contiguous, may be a slice of a larger
// step's output).
//
// pack_bytes: scratch the kernel may copy keys and values into. In the cache one head's rows
// lie a whole token row apart (4 KiB with 16 heads of 64), so they fall into a few cache sets,
// and a head's keys do not stay in L2 from one query tile to the next. A sequence of at least
// kPackMinKeys keys therefore has them copied out, a group of KV heads at a time (as many as
// pack_bytes holds, at least one), each head's rows in one run, and the group's tiles run head
// by head over the copy (over 16 KV heads 1.1-1.15x at 1,024-2,048 keys and 1.25x for a chunk
// after 1,536 cached; level over 4). 0: everything is read in place. The arithmetic is the
// same either way, and so are the results.
void prefill_attention(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor block_tables,
                       torch::Tensor query_starts, torch::Tensor seq_lens, int64_t num_heads, double scale, torch::Tensor out,
                       int64_t pack_bytes) {
#ifndef __AVX2__
  TORCH_CHECK(false, "prefill_attention needs AVX2");
#else
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k_cache.scalar_type() == torch::kFloat32, "float32 only");
  TORCH_CHECK(q.dim() == 2 && q.stride(1) == 1, "q: [T, heads * head_dim], rows contiguous");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  TORCH_CHECK(block_tables.is_contiguous() && query_starts.is_contiguous() && seq_lens.is_contiguous(), "contiguous metadata");
  const int64_t T = q.size(0), Hq = num_heads, D = q.size(1) / num_heads;
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), G = Hq / Hkv;
  TORCH_CHECK(D == k_cache.size(3) && Hq % Hkv == 0, "query and cache head shapes disagree");
  const int64_t S = seq_lens.size(0), max_blocks = block_tables.size(1);
  TORCH_CHECK(out.size(0) == T && out.size(1) == Hq * D && out.stride(1) == 1, "out: [T, heads * head_dim]");
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t k_sb = k_cache.stride(0), k_st = k_cache.stride(1), k_sh = k_cache.stride(2);
  const int64_t v_sb = v_cache.stride(0), v_st = v_cache.stride(1), v_sh = v_cache.stride(2);
  const int64_t* bt = block_tables.data_ptr<int64_t>();
  const int64_t* starts = query_starts.data_ptr<int64_t>();
  const int64_t* lens = seq_lens.data_ptr<int64_t>();
  const int64_t TQ = std::max<int64_t>(1, kTileRows / G);
  const PrefillQueries queries{q.data_ptr<float>(), q.stride(0), starts, lens, out.data_ptr<float>(), out.stride(0), G, D,
                               (TQ * G + kRowBlock - 1) / kRowBlock * kRowBlock, static_cast<float>(scale)};
  const auto tiles_of = [&](int64_t s, int64_t h, std::vector<PrefillTile>& tiles) {  // costliest (last) first
    const int64_t qlen = starts[s + 1] - starts[s], context = lens[s] - qlen;
    for (int64_t first = (qlen - 1) / TQ * TQ; first >= 0; first -= TQ) {
      const int64_t count = std::min(TQ, qlen - first);
      tiles.push_back({s, h, first, count, static_cast<double>(count) * (context + first + count)});
    }
  };

  // sequences read in place: all their tiles together, costliest first
  std::vector<PrefillTile> tiles;
  std::vector<int64_t> packed_seqs;
  for (int64_t s = 0; s < S; ++s) {
    if (starts[s + 1] == starts[s]) continue;
    if (pack_bytes > 0 && lens[s] >= kPackMinKeys) {
      packed_seqs.push_back(s);
      continue;
    }
    for (int64_t h = 0; h < Hkv; ++h) tiles_of(s, h, tiles);
  }
  std::stable_sort(tiles.begin(), tiles.end(), [](const PrefillTile& a, const PrefillTile& b) { return a.cost > b.cost; });
  if (!tiles.empty())
    run_tiles(tiles, queries, [&](const PrefillTile& tile, int64_t k0, int64_t n, PrefillScratch& w) {
                const int64_t* table = bt + tile.seq * max_blocks;
                for (int64_t j = 0; j < n; ++j) {
                  w.k[j] = token_row(kp, table, k0 + j, bs, k_sb, k_st) + tile.head * k_sh;
                  w.v[j] = token_row(vp, table, k0 + j, bs, v_sb, v_st) + tile.head * v_sh;
                }
              });

  // the others a group of KV heads at a time: copied out ([heads, len, D] for K, then for V),
  // then the group's tiles head by head
  static thread_local std::vector<float> copy;
  for (const int64_t s : packed_seqs) {
    const int64_t len = lens[s], head_floats = len * D;
    const int64_t group = std::clamp<int64_t>(pack_bytes / (2 * head_floats * 4), 1, Hkv);
    if (static_cast<int64_t>(copy.size()) < 2 * group * head_floats) copy.resize(2 * group * head_floats);
    const int64_t* table = bt + s * max_blocks;
    for (int64_t h0 = 0; h0 < Hkv; h0 += group) {
      const int64_t h1 = std::min(Hkv, h0 + group);
      float* ck = copy.data();
      float* cv = ck + (h1 - h0) * head_floats;
      at::parallel_for(0, (len + bs - 1) / bs, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t t = b * bs; t < std::min(len, (b + 1) * bs); ++t) {
            const float* krow = token_row(kp, table, t, bs, k_sb, k_st);
            const float* vrow = token_row(vp, table, t, bs, v_sb, v_st);
            for (int64_t h = h0; h < h1; ++h) {
              std::memcpy(ck + (h - h0) * head_floats + t * D, krow + h * k_sh, D * 4);
              std::memcpy(cv + (h - h0) * head_floats + t * D, vrow + h * v_sh, D * 4);
            }
          }
      });
      tiles.clear();
      for (int64_t h = h0; h < h1; ++h) tiles_of(s, h, tiles);
      run_tiles(tiles, queries, [&](const PrefillTile& tile, int64_t k0, int64_t n, PrefillScratch& w) {
                  const float* hk = ck + (tile.head - h0) * head_floats + k0 * D;
                  const float* hv = cv + (tile.head - h0) * head_floats + k0 * D;
                  for (int64_t j = 0; j < n; ++j) {
                    w.k[j] = hk + j * D;
                    w.v[j] = hv + j * D;
                  }
                });
    }
  }
  if (static_cast<int64_t>(copy.size()) * 4 > std::max<int64_t>(pack_bytes, 0)) {  // one long sequence's head: not kept
    copy.clear();
    copy.shrink_to_fit();
  }
#endif
}
