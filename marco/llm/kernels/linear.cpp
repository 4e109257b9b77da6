// Matrix products for the decode step: y = x w^T with w prepacked into panels. Float32 on AVX2/FMA and AVX-512
// CPUs, bfloat16 on AVX512-BF16 CPUs.
//
// pack_panels(w):           float32 w [out, in] -> panels [ceil(out / NF), in, NF]: panel p holds output
//                           columns NF p .. NF p + NF - 1 (zeros past `out`), one row of NF weights per input
//                           index; NF = 32 (two 64-byte lines) where the build has AVX-512, else 16 (one line);
//                           bfloat16 w [out, in] (in even) -> panels [ceil(out / 32), in / 2, 32, 2]: panel p
//                           holds output columns 32p .. 32p + 31, one 128-byte row per pair of input indices
//                           (each column's two weights side by side, as vdpbf16ps takes them)
// linear_panels(x, p, out): x [rows, in] (the panels' dtype) -> [rows, out] (the same dtype)
//
// Each thread takes whole panels. A tile of rows x a panel's columns keeps its accumulators in registers over
// the whole input dimension: per input index it loads the panel's weights once and broadcasts each row's x.
//   float32, AVX2:    6 rows x 16 columns, 12 accumulators, 2 weight vectors: 12 FMAs an input index;
//   float32, AVX-512: 12 rows x 32 columns, 24 accumulators, 2 weight vectors: 24 FMAs an input index;
//   bfloat16:         12 rows x 32 columns, 24 float32 accumulators; per pair of input indices the panel's 2
//                     vectors and each row's pair of x, 24 vdpbf16ps; outputs rounded to bfloat16 once at the end.
//   bfloat16, AMX:    where the build has AMX-BF16 and the input size is a multiple of 32, the same panels feed
//                     AMX's tiles instead (multiply_amx): 2 blocks of 16 rows x the panel's 2 halves of 16
//                     columns, float32 sums rounded once; on a 2-core Xeon 1.1-1.2x oneDNN's AMX matmul on the
//                     layers' shapes at 61-64 rows with the weights streaming from memory, 1.3-1.7x from cache.
// The panel (36-196 KB at SmolLM2's shapes) stays in L2 for the row tiles after the first, which streams it
// from memory; x stays in L1/L2. At a search's 16-90 rows the bfloat16 path ran SmolLM2's layer products
// 1.16-1.24x faster than oneDNN's prepacked bfloat16 matmul on an AVX512-BF16 EPYC (Zen 4), with the same
// rounding in all but ~0.003% of outputs (one bfloat16 step apart).
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
#include <type_traits>
#include <vector>

#include <sys/syscall.h>
#include <unistd.h>

namespace {

// A tile: rows [0, R) of x (row stride lda) times one panel (`steps` rows of the panel: input indices, or pairs
// of them in bfloat16) into y (row stride ldy); `width` < the panel's columns: only the first `width` columns
// are written (the last panel of an output size that is not a multiple of them). Every `every` steps it asks
// for the next 64-byte line of `next` (part of the next panel) into L2.
template <typename T>
using Tile = void (*)(const T*, int64_t, const T*, int64_t, T*, int64_t, int64_t, const char*, int64_t);

#if defined(__AVX512BF16__)
// y = bfloat16(float(r) + float(y)) for n values: torch's bfloat16 add (both widened, one float32 add, rounded to
// nearest even; NaN as torch's vector kernels write it, 0xffff)
inline void add_bf16(uint16_t* y, const uint16_t* r, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 live = n - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - j)) - 1);
    const auto widen = [&](const uint16_t* p) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
    };
    const __m512 sum = _mm512_add_ps(widen(r + j), widen(y + j));
    const __m512i bits = _mm512_castps_si512(sum);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(sum, sum, _CMP_ORD_Q), _mm512_set1_epi32(0xffff), rounded);
    _mm256_mask_storeu_epi16(y + j, live, _mm512_cvtepi32_epi16(rounded));
  }
}
#endif

// x [rows, k] times the panels of a weight [out, k] (NC columns a panel, `steps` panel rows) into y [rows, out],
// with tiles[n] taking n rows (n <= MROWS). `res`, where given: y = res + x w^T, each tile's block added while it
// is in L1; the same sums as torch's `res + linear(x)`: one float32 add each, in bfloat16 of the product already
// rounded to bfloat16, the sum rounded again (add_bf16).
template <typename T, int64_t NC, int64_t MROWS>
void run_panels(const T* x, int64_t rows, int64_t k, int64_t steps, const T* panels, int64_t out, T* y,
                const Tile<T>* tiles, const T* res = nullptr) {
  const int64_t n_panels = (out + NC - 1) / NC;
  // Only a panel's first tile reads it from memory, faster than memory delivers. So the tiles of each panel
  // share out the next panel's cache lines as prefetches, `chunk` lines a tile.
  const int64_t lines = k * NC * static_cast<int64_t>(sizeof(T)) / 64;
  const int64_t n_tiles = (rows + MROWS - 1) / MROWS;
  const int64_t chunk = (lines + n_tiles - 1) / n_tiles;
  const int64_t every = std::max<int64_t>(1, steps / std::max<int64_t>(chunk, 1));
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const T* panel = panels + p * k * NC;
      // past the last panel: prefetching an address does not fault, and the next line is never read
      const char* next = reinterpret_cast<const char*>(panel + k * NC);
      const int64_t width = std::min(NC, out - p * NC);
      // the rows split evenly over the fewest tiles: 61 rows as 5 x 10 + 11, not 5 x 12 + 1, whose 1-row tile
      // waits on one FMA chain a column vector (latency, not throughput) for most of a full tile's time
      for (int64_t t = 0; t < n_tiles; ++t) {
        const int64_t r = t * rows / n_tiles, n = (t + 1) * rows / n_tiles - r;
        tiles[n](x + r * k, k, panel, steps, y + r * out + p * NC, out, width, next + t * chunk * 64, every);
        if (res != nullptr) {
          for (int64_t i = r; i < r + n; ++i) {
            T* yr = y + i * out + p * NC;
            const T* rr = res + i * out + p * NC;
            if constexpr (std::is_same_v<T, float>) {
              for (int64_t j = 0; j < width; ++j) yr[j] = rr[j] + yr[j];
            } else {
#if defined(__AVX512BF16__)
              add_bf16(yr, rr, width);
#endif
            }
          }
        }
      }
    }
  });
}

#if defined(__AVX512F__)
constexpr bool kAvailable = true;
constexpr int64_t NF = 32;  // float32: output columns per panel (2 vectors of 16)
constexpr int64_t MF = 12;  // float32: rows per tile: 24 accumulators + 2 weight vectors + 1 broadcast of 32

template <int R>
inline void tile(const float* __restrict x, int64_t lda, const float* __restrict panel, int64_t k,
                 float* __restrict y, int64_t ldy, int64_t width, const char* next, int64_t every) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;
  for (int64_t i = 0, due = 0; i < k; ++i) {
    if (i == due) {
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64;
      due += every;
    }
    const __m512 w0 = _mm512_load_ps(panel + i * NF), w1 = _mm512_load_ps(panel + i * NF + 16);
    const float* a = x + i;
#define MARCO_FMA(c, r)                                                           \
  if constexpr (R > r) {                                                          \
    const __m512 b = _mm512_set1_ps(a[r * lda]);                                  \
    c##0 = _mm512_fmadd_ps(b, w0, c##0);                                          \
    c##1 = _mm512_fmadd_ps(b, w1, c##1);                                          \
  }
    MARCO_FMA(c0, 0) MARCO_FMA(c1, 1) MARCO_FMA(c2, 2) MARCO_FMA(c3, 3) MARCO_FMA(c4, 4) MARCO_FMA(c5, 5)
    MARCO_FMA(c6, 6) MARCO_FMA(c7, 7) MARCO_FMA(c8, 8) MARCO_FMA(c9, 9) MARCO_FMA(ca, 10) MARCO_FMA(cb, 11)
#undef MARCO_FMA
  }
  // the last panel's columns past `width` are not written (masked stores)
  const __mmask16 m0 = width >= 16 ? __mmask16(0xffff) : __mmask16((1u << width) - 1);
  const __mmask16 m1 = width >= NF ? __mmask16(0xffff) : width <= 16 ? __mmask16(0) : __mmask16((1u << (width - 16)) - 1);
#define MARCO_STORE(c, r)                                                         \
  if constexpr (R > r) {                                                          \
    _mm512_mask_storeu_ps(y + r * ldy, m0, c##0);                                 \
    _mm512_mask_storeu_ps(y + r * ldy + 16, m1, c##1);                            \
  }
  MARCO_STORE(c0, 0) MARCO_STORE(c1, 1) MARCO_STORE(c2, 2) MARCO_STORE(c3, 3) MARCO_STORE(c4, 4) MARCO_STORE(c5, 5)
  MARCO_STORE(c6, 6) MARCO_STORE(c7, 7) MARCO_STORE(c8, 8) MARCO_STORE(c9, 9) MARCO_STORE(ca, 10) MARCO_STORE(cb, 11)
#undef MARCO_STORE
}

constexpr Tile<float> kTiles[MF + 1] = {nullptr,  tile<1>, tile<2>, tile<3>,  tile<4>,  tile<5>, tile<6>,
                                        tile<7>, tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};
#elif defined(__AVX2__) && defined(__FMA__)
constexpr bool kAvailable = true;
constexpr int64_t NF = 16;  // float32: output columns per panel (2 vectors of 8)
constexpr int64_t MF = 6;   // float32: rows per tile: 12 accumulators + 2 weight vectors + 1 broadcast of 16

template <int R>
inline void tile(const float* __restrict x, int64_t lda, const float* __restrict panel, int64_t k,
                 float* __restrict y, int64_t ldy, int64_t width, const char* next, int64_t every) {
  // named accumulators: GCC keeps an array of __m256 on the stack and stores it on every iteration
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00;
  __m256 c30 = c00, c31 = c00, c40 = c00, c41 = c00, c50 = c00, c51 = c00;
  for (int64_t i = 0, due = 0; i < k; ++i) {
    if (i == due) {
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64;
      due += every;
    }
    const __m256 w0 = _mm256_load_ps(panel + i * NF), w1 = _mm256_load_ps(panel + i * NF + 8);
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
  if (width == NF) {
#define MARCO_STORE(r)                                                \
  if constexpr (R > r) {                                              \
    _mm256_storeu_ps(y + r * ldy, c##r##0);                           \
    _mm256_storeu_ps(y + r * ldy + 8, c##r##1);                       \
  }
    MARCO_STORE(0) MARCO_STORE(1) MARCO_STORE(2) MARCO_STORE(3) MARCO_STORE(4) MARCO_STORE(5)
#undef MARCO_STORE
    return;
  }
  alignas(32) float part[NF];
#define MARCO_PART(r)                                                 \
  if constexpr (R > r) {                                              \
    _mm256_store_ps(part, c##r##0);                                   \
    _mm256_store_ps(part + 8, c##r##1);                               \
    std::memcpy(y + r * ldy, part, width * sizeof(float));            \
  }
  MARCO_PART(0) MARCO_PART(1) MARCO_PART(2) MARCO_PART(3) MARCO_PART(4) MARCO_PART(5)
#undef MARCO_PART
}

constexpr Tile<float> kTiles[MF + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};
#else
constexpr bool kAvailable = false;
constexpr int64_t NF = 16;
constexpr int64_t MF = 1;
constexpr Tile<float> kTiles[MF + 1] = {nullptr, nullptr};
#endif

void multiply(const float* x, int64_t rows, int64_t k, const float* panels, int64_t out, float* y,
              const float* res = nullptr) {
  if constexpr (kAvailable) run_panels<float, NF, MF>(x, rows, k, k, panels, out, y, kTiles, res);
}

constexpr int64_t NB = 32;  // bfloat16: output columns per panel (2 vectors of 16 float32 accumulators)
constexpr int64_t MB = 12;  // bfloat16: rows per tile: 24 accumulators + 2 weight vectors + 1 broadcast of 32

#if defined(__AVX512BF16__)
constexpr bool kAvailableBf16 = true;

// rows [0, R) of x (row stride lda, bfloat16) times one panel (pairs x 32 x 2) into y (bfloat16, row stride ldy)
template <int R>
inline void tile_bf16(const uint16_t* __restrict x, int64_t lda, const uint16_t* __restrict panel, int64_t pairs,
                      uint16_t* __restrict y, int64_t ldy, int64_t width, const char* next, int64_t every) {
  __m512 c00 = _mm512_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  __m512 c40 = c00, c41 = c00, c50 = c00, c51 = c00, c60 = c00, c61 = c00, c70 = c00, c71 = c00;
  __m512 c80 = c00, c81 = c00, c90 = c00, c91 = c00, ca0 = c00, ca1 = c00, cb0 = c00, cb1 = c00;
  for (int64_t j = 0, due = 0; j < pairs; ++j) {
    if (j == due) {
      _mm_prefetch(next, _MM_HINT_T1);
      next += 64;
      due += every;
    }
    const __m512bh w0 = (__m512bh)_mm512_load_si512(panel + j * 2 * NB);
    const __m512bh w1 = (__m512bh)_mm512_load_si512(panel + j * 2 * NB + NB);
    const uint16_t* a = x + 2 * j;
#define MARCO_DP(c, r)                                                            \
  if constexpr (R > r) {                                                          \
    int32_t pair;                                                                 \
    std::memcpy(&pair, a + r * lda, sizeof pair);                                 \
    const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);                         \
    c##0 = _mm512_dpbf16_ps(c##0, b, w0);                                         \
    c##1 = _mm512_dpbf16_ps(c##1, b, w1);                                         \
  }
    MARCO_DP(c0, 0) MARCO_DP(c1, 1) MARCO_DP(c2, 2) MARCO_DP(c3, 3) MARCO_DP(c4, 4) MARCO_DP(c5, 5)
    MARCO_DP(c6, 6) MARCO_DP(c7, 7) MARCO_DP(c8, 8) MARCO_DP(c9, 9) MARCO_DP(ca, 10) MARCO_DP(cb, 11)
#undef MARCO_DP
  }
  alignas(64) uint16_t part[NB];
#define MARCO_STORE_BF16(c, r)                                                                     \
  if constexpr (R > r) {                                                                           \
    const __m256i lo = (__m256i)_mm512_cvtneps_pbh(c##0), hi = (__m256i)_mm512_cvtneps_pbh(c##1);  \
    if (width == NB) {                                                                             \
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), lo);                            \
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy + 16), hi);                       \
    } else {                                                                                       \
      _mm256_store_si256(reinterpret_cast<__m256i*>(part), lo);                                    \
      _mm256_store_si256(reinterpret_cast<__m256i*>(part + 16), hi);                               \
      std::memcpy(y + r * ldy, part, width * sizeof(uint16_t));                                    \
    }                                                                                              \
  }
  MARCO_STORE_BF16(c0, 0) MARCO_STORE_BF16(c1, 1) MARCO_STORE_BF16(c2, 2) MARCO_STORE_BF16(c3, 3)
  MARCO_STORE_BF16(c4, 4) MARCO_STORE_BF16(c5, 5) MARCO_STORE_BF16(c6, 6) MARCO_STORE_BF16(c7, 7)
  MARCO_STORE_BF16(c8, 8) MARCO_STORE_BF16(c9, 9) MARCO_STORE_BF16(ca, 10) MARCO_STORE_BF16(cb, 11)
#undef MARCO_STORE_BF16
}

constexpr Tile<uint16_t> kTilesBf16[MB + 1] = {
    nullptr, tile_bf16<1>, tile_bf16<2>, tile_bf16<3>, tile_bf16<4>, tile_bf16<5>, tile_bf16<6>,
    tile_bf16<7>, tile_bf16<8>, tile_bf16<9>, tile_bf16<10>, tile_bf16<11>, tile_bf16<12>};

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
constexpr bool kAmx = true;

// Linux gives a process AMX's tile registers only on request (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA).
bool amx_ready() {
  static const bool ok = [] {
    constexpr long kReqXcompPerm = 0x1023, kXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtiledata) == 0;
  }();
  return ok;
}

// palette 1, eight tiles of 16 rows x 64 bytes: tmm0-3 the float32 sums of two row blocks x the panel's two
// halves (16 x 16 each), tmm4-5 the two row blocks' x (16 rows x 32 inputs), tmm6-7 the panel's halves (16
// pairs of inputs x 16 columns x 2, the panels' own layout read with a 128-byte stride)
void configure_tiles() {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
    uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
  } config;
  _tile_loadconfig(&config);
}

// The bfloat16 panels on AMX's tiles: per panel and pair of 16-row blocks, 4 tile products a step of 32 inputs,
// each output summed over its inputs in the same order whatever the batch; float32 sums rounded to bfloat16
// once, as the vector tiles do. x's last block, where rows is not a multiple of 16, is read from a copy padded
// with zero rows (a tile loads 16).
void multiply_amx(const uint16_t* x, int64_t rows, int64_t k, const uint16_t* panels, int64_t out, uint16_t* y,
                  const uint16_t* res) {
  const int64_t n_panels = (out + NB - 1) / NB, blocks = (rows + 15) / 16, full = rows / 16, steps = k / 32;
  std::vector<uint16_t> tail;
  if (blocks > full) {
    tail.assign(16 * k, 0);
    std::memcpy(tail.data(), x + full * 16 * k, (rows - full * 16) * k * sizeof(uint16_t));
  }
  const auto block = [&](int64_t b) { return b < full ? x + b * 16 * k : tail.data(); };
  // Tiles stall on memory where they load a panel's weights the first time, and the pairs of row blocks after
  // the first find them in L2. So every step of every pair asks for its share of the lines (k of them) of the
  // panel after next, and memory streams while the tiles multiply (the next panel's: 1.08x slower at 64 rows).
  const int64_t pairs = (blocks + 1) / 2, per_step = (k + pairs * steps - 1) / (pairs * steps);
  at::parallel_for(0, n_panels, 1, [&](int64_t p0, int64_t p1) {
    configure_tiles();
    alignas(64) float sums[2][16][NB];
    for (int64_t p = p0; p < p1; ++p) {
      const uint16_t* panel = panels + p * k * NB;
      // past the last panel: prefetching an address does not fault, and the line is never read
      const char* next = reinterpret_cast<const char*>(panel + 2 * k * NB);
      const char* const end = next + k * 64;
      const int64_t width = std::min(NB, out - p * NB);
      const __mmask32 live = width == NB ? ~__mmask32(0) : (__mmask32(1) << width) - 1;
      for (int64_t b = 0; b < blocks; b += 2) {
        const bool two = b + 1 < blocks;
        const uint16_t* a0 = block(b);
        const uint16_t* a1 = two ? block(b + 1) : a0;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t s = 0; s < steps; ++s) {
          for (int64_t j = 0; j < per_step && next < end; ++j, next += 64) _mm_prefetch(next, _MM_HINT_T1);
          const uint16_t* w = panel + s * 16 * 2 * NB;
          _tile_loadd(6, w, 4 * NB);
          _tile_loadd(7, w + NB, 4 * NB);
          _tile_loadd(4, a0 + s * 32, k * 2);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          if (two) {
            _tile_loadd(5, a1 + s * 32, k * 2);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
        _tile_stored(0, &sums[0][0][0], NB * 4);
        _tile_stored(1, &sums[0][0][16], NB * 4);
        if (two) {
          _tile_stored(2, &sums[1][0][0], NB * 4);
          _tile_stored(3, &sums[1][0][16], NB * 4);
        }
        for (int64_t h = 0; h < (two ? 2 : 1); ++h) {
          const int64_t r0 = (b + h) * 16, n = std::min<int64_t>(16, rows - r0);
          for (int64_t i = 0; i < n; ++i) {
            uint16_t* yr = y + (r0 + i) * out + p * NB;
            const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_load_ps(sums[h][i] + 16), _mm512_load_ps(sums[h][i]));
            _mm512_mask_storeu_epi16(yr, live, (__m512i)both);
            if (res != nullptr) add_bf16(yr, res + (r0 + i) * out + p * NB, width);
          }
        }
      }
    }
    _tile_release();
  });
}
#else
constexpr bool kAmx = false;
bool amx_ready() { return false; }
void multiply_amx(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, const uint16_t*) {}
#endif

void multiply_bf16(const uint16_t* x, int64_t rows, int64_t k, const uint16_t* panels, int64_t out, uint16_t* y,
                   const uint16_t* res = nullptr) {
  if (kAmx && k % 32 == 0 && amx_ready()) {
    multiply_amx(x, rows, k, panels, out, y, res);
    return;
  }
  run_panels<uint16_t, NB, MB>(x, rows, k, k / 2, panels, out, y, kTilesBf16, res);
}
#else
constexpr bool kAvailableBf16 = false;
void multiply_bf16(const uint16_t*, int64_t, int64_t, const uint16_t*, int64_t, uint16_t*, const uint16_t* = nullptr) {}
#endif

at::Tensor pack_panels_bf16(const at::Tensor& w) {
  TORCH_CHECK(kAvailableBf16, "linear_panels in bfloat16 needs AVX512-BF16 (this build has none)");
  const int64_t out = w.size(0), k = w.size(1), n_panels = (out + NB - 1) / NB;
  TORCH_CHECK(k % 2 == 0, "pack_panels: a bfloat16 w needs an even number of input columns, not ", k);
  at::Tensor padded = w.contiguous();
  if (n_panels * NB != out) {
    padded = at::zeros({n_panels * NB, k}, w.options());
    padded.narrow(0, 0, out).copy_(w);
  }
  // [panels, 32, in/2, 2] -> [panels, in/2, 32, 2]; every panel row is 128 bytes, at::empty's storage 64-aligned
  return padded.view({n_panels, NB, k / 2, 2}).permute({0, 2, 1, 3}).contiguous();
}

// bfloat16 checks and the product, plus `res` [rows, out] where defined
at::Tensor linear_panels_bf16(const at::Tensor& x, const at::Tensor& panels, int64_t out, const at::Tensor& res) {
  TORCH_CHECK(kAvailableBf16, "linear_panels in bfloat16 needs AVX512-BF16 (this build has none)");
  TORCH_CHECK(panels.dim() == 4 && panels.size(2) == NB && panels.size(3) == 2 && panels.is_contiguous(),
              "linear_panels: panels must come from pack_panels");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(panels.size(1) * 2 == k, "linear_panels: x has ", k, " columns but the panels were packed for ",
              panels.size(1) * 2);
  TORCH_CHECK(out > (panels.size(0) - 1) * NB && out <= panels.size(0) * NB,
              "linear_panels: out=", out, " does not match ", panels.size(0), " panels");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(panels.data_ptr()) % 64 == 0, "linear_panels: panels not 64-byte aligned");
  const at::Tensor xc = x.contiguous();
  at::Tensor rc;
  if (res.defined()) {
    TORCH_CHECK(res.scalar_type() == at::kBFloat16 && res.dim() == 2 && res.size(0) == rows && res.size(1) == out,
                "linear_panels_add: residual must be bfloat16 [rows, out] = [", rows, ", ", out, "]");
    rc = res.contiguous();
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows && out && k) {
    multiply_bf16(reinterpret_cast<const uint16_t*>(xc.data_ptr()), rows, k,
                  reinterpret_cast<const uint16_t*>(panels.data_ptr()), out, reinterpret_cast<uint16_t*>(y.data_ptr()),
                  rc.defined() ? reinterpret_cast<const uint16_t*>(rc.data_ptr()) : nullptr);
  } else if (rows && out) {
    if (rc.defined()) y.copy_(rc); else y.zero_();
  }
  return y;
}

at::Tensor pack_panels(const at::Tensor& w) {
  if (w.dim() == 2 && w.scalar_type() == at::kBFloat16) {
    return pack_panels_bf16(w);
  }
  TORCH_CHECK(kAvailable, "linear_panels in float32 needs AVX2 and FMA or AVX-512 (this build has neither)");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kFloat, "pack_panels: w must be a 2-d float32 or bfloat16 [out, in]");
  const int64_t out = w.size(0), k = w.size(1), n_panels = (out + NF - 1) / NF;
  at::Tensor padded = w.contiguous();
  if (n_panels * NF != out) {
    padded = at::zeros({n_panels * NF, k}, w.options());
    padded.narrow(0, 0, out).copy_(w);
  }
  // [panels, NF, in] -> [panels, in, NF]; at::empty's storage is 64-byte aligned, and every panel row 64 or 128 bytes
  return padded.view({n_panels, NF, k}).transpose(1, 2).contiguous();
}

// float32 checks and the product, plus `res` [rows, out] where defined
at::Tensor linear_panels_f32(const at::Tensor& x, const at::Tensor& panels, int64_t out, const at::Tensor& res) {
  TORCH_CHECK(kAvailable, "linear_panels in float32 needs AVX2 and FMA or AVX-512 (this build has neither)");
  TORCH_CHECK(panels.dim() == 3 && panels.scalar_type() == at::kFloat && panels.size(2) == NF && panels.is_contiguous(),
              "linear_panels: panels must come from pack_panels");
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(panels.size(1) == k, "linear_panels: x has ", k, " columns but the panels were packed for ", panels.size(1));
  TORCH_CHECK(out > (panels.size(0) - 1) * NF && out <= panels.size(0) * NF,
              "linear_panels: out=", out, " does not match ", panels.size(0), " panels");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(panels.data_ptr<float>()) % 64 == 0, "linear_panels: panels not 64-byte aligned");
  const at::Tensor xc = x.contiguous();
  at::Tensor rc;
  if (res.defined()) {
    TORCH_CHECK(res.scalar_type() == at::kFloat && res.dim() == 2 && res.size(0) == rows && res.size(1) == out,
                "linear_panels_add: residual must be float32 [rows, out] = [", rows, ", ", out, "]");
    rc = res.contiguous();
  }
  at::Tensor y = at::empty({rows, out}, x.options());
  if (rows && out && k) {
    multiply(xc.data_ptr<float>(), rows, k, panels.data_ptr<float>(), out, y.data_ptr<float>(),
             rc.defined() ? rc.data_ptr<float>() : nullptr);
  } else if (rows && out) {
    if (rc.defined()) y.copy_(rc); else y.zero_();
  }
  return y;
}

at::Tensor linear_panels(const at::Tensor& x, const at::Tensor& panels, int64_t out) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == panels.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_panels: x must be a 2-d float32 or bfloat16 [rows, in], in the panels' dtype");
  if (x.scalar_type() == at::kBFloat16) {
    return linear_panels_bf16(x, panels, out, at::Tensor());
  }
  return linear_panels_f32(x, panels, out, at::Tensor());
}

// res + x w^T in one pass (the decode step's residual adds after the o and down projections)
at::Tensor linear_panels_add(const at::Tensor& x, const at::Tensor& panels, int64_t out, const at::Tensor& res) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == panels.scalar_type() &&
              (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "linear_panels_add: x must be a 2-d float32 or bfloat16 [rows, in], in the panels' dtype");
  if (x.scalar_type() == at::kBFloat16) {
    return linear_panels_bf16(x, panels, out, res);
  }
  return linear_panels_f32(x, panels, out, res);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(marco, lib) {
  lib.def("pack_panels(Tensor w) -> Tensor");
  lib.def("linear_panels(Tensor x, Tensor panels, int out) -> Tensor");
  lib.def("linear_panels_add(Tensor x, Tensor panels, int out, Tensor res) -> Tensor");
}

TORCH_LIBRARY_IMPL(marco, CPU, lib) {
  lib.impl("pack_panels", &pack_panels);
  lib.impl("linear_panels", &linear_panels);
  lib.impl("linear_panels_add", &linear_panels_add);
}
