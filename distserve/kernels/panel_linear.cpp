// Float32 linear layers for decode-sized batches, on a weight laid out in column panels.
//
// A weight W [N, K] is stored as panels [ceil(N / 48), K, 48]: panel p holds output columns
// [48p, 48p + 48) with, for each k, their 48 weights side by side (zero past N). A micro-kernel
// keeps an 8 x 48 block of y in 24 AVX-512 registers and, for each k, loads the panel's three
// vectors once for all eight rows of x; a panel is read from memory once per call, in address
// order, while the next one is prefetched a slice per micro-kernel call, so the reads spread
// evenly over the arithmetic. Against oneDNN's packed weight (benchmarks/small_batch_linear.py)
// this is 1.3-1.8x as fast at 1-16 rows and 1.01-1.16x at 64-128; at 256 rows, 0.9-1.0x.

namespace {

constexpr int64_t kPanel = 48;       // output columns a panel (three zmm)
constexpr int64_t kPanelRows = 8;    // rows of x a micro-kernel call
constexpr int64_t kPanelDepth = 384; // k a micro-kernel call (the panel's slice stays in L2)
constexpr int64_t kPanelChunk = 256; // rows of x a task, at most

#ifdef __AVX512F__
// y[R rows][48] (+)= x[R rows][k0, k0 + kc) . panel[k0, k0 + kc); `load` adds to y, `bias`
// (on the last slice of k) is added, `ncols` < 48 masks the stores of the last panel.
// `next` / `next_bytes`: memory to prefetch into L2 over the call, a line at a time.
template <int R>
inline void panel_micro(const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy, bool load,
                        const float* bias, int64_t ncols, const char* next, int64_t next_bytes) {
  __mmask16 mask[3];
  for (int j = 0; j < 3; ++j) mask[j] = static_cast<__mmask16>((1u << std::clamp<int64_t>(ncols - 16 * j, 0, 16)) - 1);
  __m512 acc[R][3];
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < 3; ++j) acc[r][j] = load ? _mm512_maskz_loadu_ps(mask[j], y + r * ldy + 16 * j) : _mm512_setzero_ps();
  const int64_t lines = next_bytes / 64;
  int64_t line = 0;
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + k * kPanel;
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16), b2 = _mm512_loadu_ps(bk + 32);
    _mm_prefetch(reinterpret_cast<const char*>(bk + 8 * kPanel), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(bk + 8 * kPanel + 32), _MM_HINT_T0);
    for (const int64_t upto = (k + 1) * lines / kc; line < upto; ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T1);
    for (int r = 0; r < R; ++r) {
      const __m512 a = _mm512_set1_ps(x[r * ldx + k]);
      acc[r][0] = _mm512_fmadd_ps(a, b0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(a, b1, acc[r][1]);
      acc[r][2] = _mm512_fmadd_ps(a, b2, acc[r][2]);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const __m512 add = bias ? _mm512_maskz_loadu_ps(mask[j], bias + 16 * j) : _mm512_setzero_ps();
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * ldy + 16 * j, mask[j], _mm512_add_ps(acc[r][j], add));
  }
}

// panel_micro<rows> for 1 <= rows <= R
template <int R>
inline void panel_micro_rows(int rows, const float* x, int64_t ldx, const float* b, int64_t kc, float* y, int64_t ldy,
                             bool load, const float* bias, int64_t ncols, const char* next, int64_t next_bytes) {
  if constexpr (R > 1) {
    if (rows < R) return panel_micro_rows<R - 1>(rows, x, ldx, b, kc, y, ldy, load, bias, ncols, next, next_bytes);
  }
  panel_micro<R>(x, ldx, b, kc, y, ldy, load, bias, ncols, next, next_bytes);
}
#endif

}  // namespace

// The panel layout of a float32 weight W [N, K] (see above), or an empty tensor where the
// kernel is not built (no AVX-512): the caller keeps the plain weight then.
torch::Tensor pack_panels(torch::Tensor w) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat32, "W [N, K] float32");
#ifdef __AVX512F__
  const int64_t N = w.size(0), K = w.size(1), P = (N + kPanel - 1) / kPanel, full = N / kPanel;
  auto panels = torch::zeros({P, K, kPanel}, w.options());
  if (full) panels.narrow(0, 0, full).copy_(w.narrow(0, 0, full * kPanel).view({full, kPanel, K}).transpose(1, 2));
  if (N % kPanel) panels.select(0, P - 1).narrow(1, 0, N % kPanel).copy_(w.narrow(0, full * kPanel, N % kPanel).t());
  return panels;
#else
  return torch::empty({0}, w.options());
#endif
}

// y = x W^T (+ bias): x [M, K] float32, W as `pack_panels` lays it out, N its output columns.
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor panels, int64_t N, c10::optional<torch::Tensor> bias) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x [M, K] float32, contiguous");
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x.size(1) && panels.size(2) == kPanel &&
                  panels.size(0) == (N + kPanel - 1) / kPanel,
              "panels [ceil(N / 48), K, 48] of this K and N");
  TORCH_CHECK(!bias.has_value() || (bias->is_contiguous() && bias->numel() == N), "bias [N]");
  const int64_t M = x.size(0), K = x.size(1), P = panels.size(0);
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
#ifdef __AVX512F__
  const float* xp = x.data_ptr<float>();
  const float* wp = panels.data_ptr<float>();
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // tasks: (chunk of rows, panel), chunks of equal whole micro-kernel calls
  const int64_t chunks = (M + kPanelChunk - 1) / kPanelChunk;
  const int64_t chunk = ((M + chunks - 1) / chunks + kPanelRows - 1) / kPanelRows * kPanelRows;
  const int64_t panel_bytes = K * kPanel * 4;
  at::parallel_for(0, chunks * P, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task % P, m0 = task / P * chunk, m1 = std::min(M, m0 + chunk);
      const float* panel = wp + p * K * kPanel;
      // the task after this one reads the next panel (or this chunk's first again: cached)
      const char* next = reinterpret_cast<const char*>(wp + (task + 1 < end ? (p + 1) % P : p) * K * kPanel);
      const int64_t calls = (K + kPanelDepth - 1) / kPanelDepth * ((m1 - m0 + kPanelRows - 1) / kPanelRows);
      const int64_t share = (panel_bytes / calls + 63) / 64 * 64;
      int64_t call = 0;
      for (int64_t k0 = 0; k0 < K; k0 += kPanelDepth) {
        const int64_t kc = std::min(kPanelDepth, K - k0);
        const bool last = k0 + kc == K;
        for (int64_t m = m0; m < m1; m += kPanelRows, ++call) {
          const int64_t offset = std::min(call * share, panel_bytes);
          panel_micro_rows<kPanelRows>(static_cast<int>(std::min(kPanelRows, m1 - m)), xp + m * K + k0, K,
                                       panel + k0 * kPanel, kc, yp + m * N + p * kPanel, N, k0 > 0,
                                       last ? (bp ? bp + p * kPanel : nullptr) : nullptr,
                                       std::min(kPanel, N - p * kPanel), next + offset,
                                       std::min(share, panel_bytes - offset));
        }
      }
    }
  });
#else
  TORCH_CHECK(false, "panel_linear needs AVX-512");
#endif
  return y;
}
