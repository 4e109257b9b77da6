// Float32 matrix products for the decode step on AVX2/FMA CPUs: y = x w^T with w prepacked into panels.
//
// pack_panels(w):           w [out, in] -> panels [ceil(out / 16), in, 16]: panel p holds output columns
//                           16p .. 16p + 15 (zeros past `out`), one 64-byte row of 16 weights per input index
// linear_panels(x, p, out): x [rows, in] (float32) -> [rows, out]
//
// Each thread takes whole panels. A tile of up to 6 rows x 16 columns keeps its 12 accumulators in registers
// over the whole input dimension: per input index it loads the panel's 16 weights (2 vectors) once and
// broadcasts each row's x, 12 FMAs. The panel (at most 16 x in x 4 bytes, 36-98 KB at SmolLM2's shapes) stays
// in L2 for the row tiles after the first, which streams it from memory; x stays in L1/L2.
//
// Why not MKL's or oneDNN's sgemm: at a search's 16-128 rows both spend time on blocking and packing meant for
// larger products, and run the decode step's layer shapes 1.1-1.3x slower than this on an AVX2 EPYC
// (bench/packed_linear.py). A side benefit: every output is the sum over the input index in order, in one
// float32 accumulator, so a row's result does not depend on how many rows are in the batch or which.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace {

constexpr int64_t NR = 16;  // output columns per panel
constexpr int64_t MR = 6;   // rows per tile: 12 accumulators + 2 weight vectors + 1 broadcast of 16 registers

#if defined(__AVX2__) && defined(__FMA__)
constexpr bool kAvailable = true;

// rows [0, R) of x (row stride lda) times one panel (k x 16) into y (row stride ldy); `width` < 16: only the
// first `width` columns are written (the last panel of an output size that is not a multiple of 16).
// Every `every` input indices it asks for the next line of `next` (part of the next panel) into L2.
template <int R>
inline void tile(const float* __restrict x, int64_t lda, const float* __restrict panel, int64_t k,
                 float* __restrict y, int64_t ldy, int64_t width, const float* next, int64_t every) {
  // named accumulators: GCC keeps an array of __m256 on the stack and stores it on every iteration
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0, due = 0; i < k; ++i) {
    if (i == due) {
      _mm_prefetch(reinterpret_cast<const char*>(next), _MM_HINT_T1);
      next += NR;
      due += every;
    }
    const __m256 w0 = _mm256_load_ps(panel + i * NR), w1 = _mm256_load_ps(panel + i * NR + 8);
    const float* a = x + i;
#define MARCO_FMA(r)                                                  \
  if constexpr (R > r) {                                              \
    const __m256 b = _mm256_broadcast_ss(a + r * lda);                \
    c##r##0 = _mm256_fmadd_ps(b, w0, c##r##0);                        \
    c##r##1 = _mm256_fmadd_ps(b, w1, c##r##1);                        \
  }
    MARCO_FMA(0) MARCO_FMA(1) MARCO_FMA(2) MARCO_FMA(3) MARCO_FMA(4) MARCO_FMA(5)
#undef MARCO_FMA
  }
  if (width == NR) {
#define MARCO_STORE(r)                                                \
  if constexpr (R > r) {                                              \
    _mm256_storeu_ps(y + r * ldy, c##r##0);                           \
    _mm256_storeu_ps(y + r * ldy + 8, c##r##1);                       \
  }
    MARCO_STORE(0) MARCO_STORE(1) MARCO_STORE(2) MARCO_STORE(3) MARCO_STORE(4) MARCO_STORE(5)
#undef MARCO_STORE
    return;
  }
  alignas(32) float part[NR];
#define MARCO_PART(r)                                                 \
  if constexpr (R > r) {                                              \
    _mm256_store_ps(part, c##r##0);                                   \
    _mm256_store_ps(part + 8, c##r##1);                               \
    std::memcpy(y + r * ldy, part, width * sizeof(float));            \
  }
  MARCO_PART(0) MARCO_PART(1) MARCO_PART(2) MARCO_PART(3) MARCO_PART(4) MARCO_PART(5)
#undef MARCO_PART
}

using Tile = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, int64_t, const float*, int64_t);
constexpr Tile kTiles[MR + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

void multiply(const float* x, int64_t rows, int64_t k, const float* panels, int64_t out, float* y) {
  const int64_t n_panels = (out + NR - 1) / NR;
  // Only a panel's first tile reads it from memory, at 64 bytes per 12 FMAs: faster than memory delivers.
  // So the tiles of each panel share out the next panel's lines as prefetches, `chunk` lines a tile.
  const int64_t tiles = (rows + MR - 1) / MR;
  const int64_t chunk = (k + tiles - 1) / tiles;
  const int64_t every = std::max<int64_t>(1, k / std::max<int64_t>(chunk, 1));
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const float* panel = panels + p * k * NR;
      // past the last panel: prefetching an address does not fault, and the next line is never read
      const float* next = panel + k * NR;
      const int64_t width = std::min(NR, out - p * NR);
      for (int64_t r = 0, t = 0; r < rows; r += MR, ++t) {
        const int64_t n = std::min(MR, rows - r);
        kTiles[n](x + r * k, k, panel, k, y + r * out + p * NR, out, width, next + t * chunk * NR, every);
      }
    }
  });
}
#else
constexpr bool kAvailable = false;
void multiply(const float*, int64_t, int64_t, const float*, int64_t, float*) {}
#endif

at::Tensor pack_panels(const at::Tensor& w) {
  TORCH_CHECK(kAvailable, "linear_panels needs AVX2 and FMA (this build has neither)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_panels: w must be a 2-d float32 [out, in]");
  const int64_t out = w.size(0), k = w.size(1), n_panels = (out + NR - 1) / NR;
  at::Tensor padded = w.contiguous();
  if (n_panels * NR != out) {
    padded = at::zeros({n_panels * NR, k}, w.options());
    padded.narrow(0, 0, out).copy_(w);
  }
  // [panels, 16, in] -> [panels, in, 16]; at::empty's storage is 64-byte aligned, and every panel row is 64 bytes
  return padded.view({n_panels, NR, k}).transpose(1, 2).contiguous();
}

at::Tensor linear_panels(const at::Tensor& x, const at::Tensor& panels, int64_t out) {
  TORCH_CHECK(kAvailable, "linear_panels needs AVX2 and FMA (this build has neither)");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "linear_panels: x must be a 2-d float32 [rows, in]");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.size(2) == NR && panels.is_contiguous(),
              "linear_panels: panels must come from pack_panels");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(panels.size(1) == k, "linear_panels: x has ", k, " columns but the panels were packed for ", panels.size(1));
  TORCH_CHECK(out > (panels.size(0) - 1) * NR && out <= panels.size(0) * NR,
              "linear_panels: out=", out, " does not match ", panels.size(0), " panels");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(panels.data_ptr<float>()) % 32 == 0, "linear_panels: panels not 32-byte aligned");
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows && out && k) {
    multiply(xc.data_ptr<float>(), rows, k, panels.data_ptr<float>(), out, y.data_ptr<float>());
  } else if (rows && out) {
    y.zero_();
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marco, lib) {
  lib.def("pack_panels(Tensor w) -> Tensor");
  lib.def("linear_panels(Tensor x, Tensor panels, int out) -> Tensor");
}

TORCH_LIBRARY_IMPL(marco, CPU, lib) {
  lib.impl("pack_panels", &pack_panels);
  lib.impl("linear_panels", &linear_panels);
}
