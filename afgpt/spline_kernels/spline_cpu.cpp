// Linear-spline activation: CPU forward/backward kernels (OpenMP), fp32 and bf16 inputs.
//
// A spline has K values on evenly spaced anchors a0 + k*h and is constant outside [a0, a0+(K-1)h].
// With t = (x - a0)/h clamped to [0, K-1] and i = min(floor(t), K-2), the value is
// y = c[i] + t*d[i] where d[k] = v[k+1] - v[k] and c[k] = v[k] - k*d[k]: one lookup pair + one FMA.
// The backward recomputes i from x (nothing else is saved) and builds the values gradient from
// histograms A[i] += g, B[i] += g*(t-i) in double: grad_v[k] = A[k] - B[k] + B[k-1].
//
// Table lookups decide the speed. With AVX-512 a shared spline's tables (<= 128 intervals) live
// in registers and are read with permutes (gathers cost ~2 cycles per element on AMD Zen 4);
// per-channel tables are read with gathers, tile by tile so that tables and histograms stay
// in cache. AVX2 CPUs (e.g. Zen 3, where a gather costs ~3 cycles per element) gather (c, d)
// pairs as one 64-bit element; per-channel they gather (v[i], v[i+1]) from a line-aligned copy of
// the values and slopes from a [C][K-1] table, sweeping channel groups and summing histograms of
// 256-row chunks in float before adding them to double ones. Other CPUs run
// plain loops that the compiler vectorises as far as it can.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define AFGPT_AVX512 1
#include <immintrin.h>
#else
#define AFGPT_AVX512 0
#endif
// AVX2 + FMA CPUs without AVX-512 (e.g. AMD Zen 2/3) get their own 8-lane loops.
#if !AFGPT_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define AFGPT_AVX2 1
#include <immintrin.h>
#else
#define AFGPT_AVX2 0
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kSerialBelow = 32768;    // elements: below this, threads cost more than they save
constexpr int64_t kBlock = 512;            // shared backward: elements per record/histogram pass
constexpr int64_t kMaxRegIntervals = 128;  // largest shared table kept in registers
constexpr int64_t kLanes = 16;             // per-channel tables: channels per block
constexpr int64_t kTileRows = 4;           // per-channel tiles: rows per tile (measured best)
constexpr int64_t kCopies = 8;             // shared histograms: copies, element j in copy j % 8

// ---- element conversion (bf16 is stored as uint16; round-to-nearest-even like torch) ----
inline float load(float v) { return v; }
inline float load(uint16_t b) {
  uint32_t u = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, float v) { *p = v; }
inline void store(uint16_t* p, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  *p = v != v ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// ---- grid maths ----
struct Grid {
  float a0, inv_h, tmax;  // t = (x - a0) * inv_h, clamped to [0, tmax = K-1]
  int kmax;               // last interval index, K-2
};

Grid make_grid(int64_t k, double x_min, double x_max) {
  return {float(x_min), float(double(k - 1) / (x_max - x_min)), float(k - 1), int(k - 2)};
}

// Clamp keeping NaN (so NaN inputs give NaN outputs, as torch.clamp does).
inline float clamp_t(float t, float tmax) {
  t = t < 0.f ? 0.f : t;
  return t > tmax ? tmax : t;
}
// Interval index of a clamped t; NaN maps to 0 so the table read stays in bounds.
inline int interval(float tc, int kmax) {
  int i = int(tc >= 0.f ? tc : 0.f);
  return i < kmax ? i : kmax;
}
// grad_x is g * slope strictly inside the range and 0 outside, where the spline is constant.
inline bool inside(float traw, float tmax) { return (traw > 0.f) & (traw < tmax); }

// Interval tables of S splines: cd holds (c, d) pairs for the forward, ds = d/h for grad_x.
// Per-channel tables are blocked by kLanes channels, [S/kLanes][K-1][kLanes], so that the table
// of a tile's channels is contiguous.
struct Tables {
  int64_t splines = 0, intervals = 0, lanes = 1;  // lanes: kLanes per channel, 1 if shared
  std::vector<float> cd, ds;
  int64_t at(int64_t s, int64_t i) const { return (s / lanes * intervals + i) * lanes + s % lanes; }
  int64_t block(int64_t col) const { return col / lanes * intervals * lanes; }  // col's block
};

Tables make_tables(const float* v, int64_t splines, int64_t k, float inv_h, bool backward) {
  Tables tab{splines, k - 1, splines == 1 ? 1 : kLanes, {}, {}};
  int64_t size = (splines + tab.lanes - 1) / tab.lanes * tab.lanes * (k - 1);
  (backward ? tab.ds : tab.cd).assign(size * (backward ? 1 : 2), 0.f);
  for (int64_t s = 0; s < splines; ++s)
    for (int64_t i = 0; i + 1 < k; ++i) {
      float d = v[s * k + i + 1] - v[s * k + i];
      if (backward) {
        tab.ds[tab.at(s, i)] = d * inv_h;
      } else {
        tab.cd[tab.at(s, i) * 2] = v[s * k + i] - float(i) * d;
        tab.cd[tab.at(s, i) * 2 + 1] = d;
      }
    }
  return tab;
}

// Histogram records of a run of elements, filled by the backward loops: per element the cell
// of its (A, B) pair and the pair (g, g*(t - i)) to add there.
struct Records {
  uint32_t* cell;
  float* pair;
};

// Adds n records to hist, cell c being hist[2c], hist[2c+1].
void add_records(const uint32_t* cell, const float* pair, int64_t n, double* hist) {
#if defined(__SSE2__)
  for (int64_t q = 0; q < n; ++q) {  // one 128-bit read-add-write per record
    double* h = hist + 2 * int64_t(cell[q]);
    __m128 gb = _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(pair + 2 * q)));
    __m128d p = _mm_cvtps_pd(gb);
    _mm_storeu_pd(h, _mm_add_pd(_mm_loadu_pd(h), p));
  }
#else
  for (int64_t q = 0; q < n; ++q) {
    double* h = hist + 2 * int64_t(cell[q]);
    h[0] += pair[2 * q];
    h[1] += pair[2 * q + 1];
  }
#endif
}

// ---- threading ----
// Threads used for n elements; a fixed number for a given torch thread setting (determinism).
int threads_for(int64_t n) { return n < kSerialBelow ? 1 : at::get_num_threads(); }

// Calls f(tid, begin, end) on nt contiguous, 64-aligned ranges of [0, n), one per thread.
template <typename F>
void parallel_ranges(int64_t n, int nt, const F& f) {
  int64_t step = ((n + nt - 1) / nt + 63) / 64 * 64;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int tid = 0; tid < nt; ++tid) {
    int64_t b = std::min(n, tid * step), e = std::min(n, b + step);
    f(tid, b, e);
  }
}

// ======== shared spline: one table for all elements ========
// Shared histograms are [K][8][2] with element j in copy j % 8 (cell = i*8 + j % 8), so runs
// of equal intervals do not serialise on one memory cell.

template <typename T>
void forward_shared_plain(const T* __restrict x, T* __restrict y, int64_t len, Grid g,
                          const float* __restrict cd) {
  for (int64_t j = 0; j < len; ++j) {
    float t = clamp_t((load(x[j]) - g.a0) * g.inv_h, g.tmax);
    int i = interval(t, g.kmax);
    store(y + j, cd[2 * i] + t * cd[2 * i + 1]);
  }
}

template <bool Record, typename T>
void grad_shared_plain(const T* __restrict x, const T* __restrict gy, T* __restrict gx,
                       int64_t len, Grid g, const float* __restrict ds, Records rec) {
  for (int64_t j = 0; j < len; ++j) {
    float gj = load(gy[j]);
    float traw = (load(x[j]) - g.a0) * g.inv_h;
    float t = clamp_t(traw, g.tmax);
    int i = interval(t, g.kmax);
    float slope = ds[i];  // loaded unconditionally, so the loop vectorises
    store(gx + j, inside(traw, g.tmax) ? gj * slope : 0.f);
    if constexpr (Record) {
      rec.cell[j] = uint32_t(i) * kCopies + uint32_t(j % kCopies);
      rec.pair[2 * j] = gj;
      rec.pair[2 * j + 1] = gj * (t - float(i));
    }
  }
}

// Shared-spline spans: span<Record>(x, gy, gx, len, rec, hist) writes grad_x and, with Record,
// the histogram records of its elements to rec and adds them to hist.
struct PlainSharedGrad {
  Grid g;
  const float* ds;
  template <bool Record, typename T>
  void operator()(const T* x, const T* gy, T* gx, int64_t len, Records rec, double* hist) const {
    grad_shared_plain<Record>(x, gy, gx, len, g, ds, rec);
    if constexpr (Record) add_records(rec.cell, rec.pair, len, hist);
  }
};

#if AFGPT_AVX512
// ---- AVX-512 helpers and shared-spline loops: 16 lanes, masked tails ----
namespace simd {
using V = __m512;
using VI = __m512i;
using M = __mmask16;

inline M tail(int64_t left) { return left >= 16 ? M(0xFFFF) : M((1u << left) - 1); }
inline V vload(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
inline V vload(const uint16_t* p, M m) {
  VI wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
inline void vstore(float* p, V v, M m) { _mm512_mask_storeu_ps(p, m, v); }
inline void vstore(uint16_t* p, V v, M m) {
  VI u = _mm512_castps_si512(v);
  VI odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  VI bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF));
  VI r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

struct VGrid {
  V a0, inv_h, tmax, zero;
  VI kmax;
  explicit VGrid(const Grid& g)
      : a0(_mm512_set1_ps(g.a0)), inv_h(_mm512_set1_ps(g.inv_h)), tmax(_mm512_set1_ps(g.tmax)),
        zero(_mm512_setzero_ps()), kmax(_mm512_set1_epi32(g.kmax)) {}
  V coord(V x) const { return _mm512_mul_ps(_mm512_sub_ps(x, a0), inv_h); }
  // max/min return their second operand on NaN, so NaN survives the clamp
  V clamp(V t) const { return _mm512_min_ps(tmax, _mm512_max_ps(zero, t)); }
  VI interval(V t) const {
    return _mm512_min_epi32(_mm512_max_epi32(_mm512_cvttps_epi32(t), _mm512_setzero_si512()), kmax);
  }
  M inside(V traw) const {
    return _mm512_cmp_ps_mask(traw, zero, _CMP_GT_OQ) & _mm512_cmp_ps_mask(traw, tmax, _CMP_LT_OQ);
  }
};

// Entries [0, 16R) of a table held in R registers, read with permutes.
template <int R>
inline V pick(const V* r, VI i) {
  if constexpr (R == 1) {
    return _mm512_permutexvar_ps(i, r[0]);
  } else if constexpr (R == 2) {
    return _mm512_permutex2var_ps(r[0], i, r[1]);
  } else {
    M upper = _mm512_test_epi32_mask(i, _mm512_set1_epi32(8 * R));
    return _mm512_mask_blend_ps(upper, pick<R / 2>(r, i), pick<R / 2>(r + R / 2, i));
  }
}

template <int R>
struct RegTable {
  V r[R];
  RegTable(const float* src, int64_t n, int64_t stride) {  // entry i is src[i*stride]
    alignas(64) float buf[16 * R] = {};
    for (int64_t i = 0; i < n; ++i) buf[i] = src[i * stride];
    for (int q = 0; q < R; ++q) r[q] = _mm512_load_ps(buf + 16 * q);
  }
  V operator()(VI i) const { return pick<R>(r, i); }
};

template <int R, typename T>
void forward_shared(const T* x, T* y, int64_t len, const Grid& grid, const Tables& tab) {
  VGrid g(grid);
  RegTable<R> c(tab.cd.data(), tab.intervals, 2), d(tab.cd.data() + 1, tab.intervals, 2);
  for (int64_t j = 0; j < len; j += 16) {
    M m = tail(len - j);
    V t = g.clamp(g.coord(vload(x + j, m)));
    VI i = g.interval(t);
    vstore(y + j, _mm512_fmadd_ps(t, d(i), c(i)), m);
  }
}

template <int R>
struct SharedGrad {
  VGrid g;
  RegTable<R> slope;
  SharedGrad(const Grid& grid, const Tables& tab)
      : g(grid), slope(tab.ds.data(), tab.intervals, 1) {}

  template <bool Record, typename T>
  void operator()(const T* x, const T* gy, T* gx, int64_t len, Records rec, double* hist) const {
    static_assert(kCopies == 8, "cells below assume 8 copies");
    const VI lane_cell = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7);
    const VI first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const VI second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int64_t j = 0; j < len; j += 16) {
      M m = tail(len - j);
      V traw = g.coord(vload(x + j, m));
      V t = g.clamp(traw);
      VI i = g.interval(t);
      V gj = vload(gy + j, m);
      vstore(gx + j, _mm512_maskz_mul_ps(g.inside(traw), gj, slope(i)), m);
      if constexpr (Record) {
        // whole vectors: lanes past len hold g = 0 and a valid cell (buffers are padded)
        _mm512_storeu_si512(rec.cell + j, _mm512_add_epi32(_mm512_slli_epi32(i, 3), lane_cell));
        V gb = _mm512_mul_ps(gj, _mm512_sub_ps(t, _mm512_cvtepi32_ps(i)));
        _mm512_storeu_ps(rec.pair + 2 * j, _mm512_permutex2var_ps(gj, first, gb));
        _mm512_storeu_ps(rec.pair + 2 * j + 16, _mm512_permutex2var_ps(gj, second, gb));
      }
    }
    if constexpr (Record) add_records(rec.cell, rec.pair, len, hist);
  }
};

// Calls f(integral_constant<R>) with the register count for a shared table.
template <typename F>
void with_registers(int64_t intervals, const F& f) {
  if (intervals <= 16)
    f(std::integral_constant<int, 1>{});
  else if (intervals <= 32)
    f(std::integral_constant<int, 2>{});
  else if (intervals <= 64)
    f(std::integral_constant<int, 4>{});
  else
    f(std::integral_constant<int, 8>{});
}
}  // namespace simd
#endif

#if AFGPT_AVX2
// ---- AVX2 loops: 8 lanes, tails done by the plain loops ----
// Tables are read with gathers (Zen 3: about half a cycle per element); a (c, d) pair is one
// 64-bit element. Per-channel work goes by channel groups whose tables and histograms stay in
// L2, each group sweeping all rows of its thread, with the rows ahead prefetched.
namespace avx2 {
using V = __m256;
using VI = __m256i;

inline V vload(const float* p) { return _mm256_loadu_ps(p); }
inline V vload(const uint16_t* p) {
  VI wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline void vstore(float* p, V v) { _mm256_storeu_ps(p, v); }
inline void vstore(uint16_t* p, V v) {  // round to nearest even, NaN -> 0x7FC0, as store()
  VI u = _mm256_castps_si256(v);
  VI odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  VI bias = _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF));
  VI r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  VI nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

inline VI lanes() { return _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); }

struct VGrid {
  V a0, inv_h, tmax, zero;
  VI kmax;
  explicit VGrid(const Grid& g)
      : a0(_mm256_set1_ps(g.a0)), inv_h(_mm256_set1_ps(g.inv_h)), tmax(_mm256_set1_ps(g.tmax)),
        zero(_mm256_setzero_ps()), kmax(_mm256_set1_epi32(g.kmax)) {}
  V coord(V x) const { return _mm256_mul_ps(_mm256_sub_ps(x, a0), inv_h); }
  // max/min return their second operand on NaN, so NaN survives the clamp
  V clamp(V t) const { return _mm256_min_ps(tmax, _mm256_max_ps(zero, t)); }
  VI interval(V t) const {  // NaN converts to INT_MIN, hence interval 0
    return _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(t), _mm256_setzero_si256()), kmax);
  }
  V inside(V traw) const {
    return _mm256_and_ps(_mm256_cmp_ps(traw, zero, _CMP_GT_OQ),
                         _mm256_cmp_ps(traw, tmax, _CMP_LT_OQ));
  }
};

// y = c + t*d with the (c, d) pairs of table cd at positions at (as 64-bit elements).
inline V pair_lerp(const float* cd, VI at, V t) {
  const double* pairs = reinterpret_cast<const double*>(cd);
  V lo = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, _mm256_castsi256_si128(at), 8));
  V hi = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, _mm256_extracti128_si256(at, 1), 8));
  // lanes (0 1 4 5 | 2 3 6 7) after the in-lane shuffles; the 64-bit permute restores order
  V c = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
  V d = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  c = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(c), _MM_SHUFFLE(3, 1, 2, 0)));
  d = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(d), _MM_SHUFFLE(3, 1, 2, 0)));
  return _mm256_fmadd_ps(t, d, c);
}

// Writes the records (cell, (g, g*(t-i))) of 8 elements.
inline void put_records(VI cell, V g, V t, VI i, uint32_t* cells, float* pairs) {
  V gb = _mm256_mul_ps(g, _mm256_sub_ps(t, _mm256_cvtepi32_ps(i)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(cells), cell);
  V lo = _mm256_unpacklo_ps(g, gb), hi = _mm256_unpackhi_ps(g, gb);  // (0 1 | 4 5), (2 3 | 6 7)
  _mm256_storeu_ps(pairs, _mm256_permute2f128_ps(lo, hi, 0x20));
  _mm256_storeu_ps(pairs + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
}

// Adds n records to a float histogram, cell c being (h[2c], h[2c+1]): one 64-bit read-add-write each.
inline void add_float_records(const uint32_t* cell, const float* pair, int64_t n, float* h) {
  for (int64_t q = 0; q < n; ++q) {
    double* p = reinterpret_cast<double*>(h + 2 * int64_t(cell[q]));
    __m128 sum = _mm_add_ps(_mm_castpd_ps(_mm_load_sd(p)),
                            _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(pair + 2 * q))));
    _mm_store_sd(p, _mm_castps_pd(sum));
  }
}

// ---- shared spline ----
template <typename T>
void forward_shared(const T* x, T* y, int64_t len, const Grid& grid, const float* cd) {
  VGrid g(grid);
  int64_t j = 0;
  for (; j + 8 <= len; j += 8) {
    V t = g.clamp(g.coord(vload(x + j)));
    vstore(y + j, pair_lerp(cd, g.interval(t), t));
  }
  forward_shared_plain(x + j, y + j, len - j, grid, cd);
}

struct SharedGrad {
  Grid grid;
  const float* ds;
  // The records of each vector are added while the next one is computed: the read-add-writes,
  // which wait on their loads, overlap the next vector's work (25% faster than adding a whole
  // block's records after it).
  template <bool Record, typename T>
  void operator()(const T* x, const T* gy, T* gx, int64_t len, Records rec, double* hist) const {
    static_assert(kCopies == 8, "copy = lane");
    VGrid g(grid);
    int64_t j = 0;
    for (; j + 8 <= len; j += 8) {
      V traw = g.coord(vload(x + j));
      V t = g.clamp(traw);
      VI i = g.interval(t);
      V gj = vload(gy + j);
      V slope = _mm256_i32gather_ps(ds, i, 4);
      vstore(gx + j, _mm256_and_ps(g.inside(traw), _mm256_mul_ps(gj, slope)));
      if constexpr (Record) {
        put_records(_mm256_add_epi32(_mm256_slli_epi32(i, 3), lanes()), gj, t, i, rec.cell + j,
                    rec.pair + 2 * j);
        if (j >= 8) add_records(rec.cell + j - 8, rec.pair + 2 * (j - 8), 8, hist);
      }
    }
    grad_shared_plain<Record>(x + j, gy + j, gx + j, len - j, grid, ds,
                              Records{Record ? rec.cell + j : nullptr,
                                      Record ? rec.pair + 2 * j : nullptr});
    if constexpr (Record) {  // the last vector's records and the tail's
      int64_t from = std::max<int64_t>(0, j - 8);
      add_records(rec.cell + from, rec.pair + 2 * from, len - from, hist);
    }
  }
};

// ---- per-channel splines ----
// Tables are channel-major: the forward gathers (v[i], v[i+1]) of the values [C][K] as one
// 64-bit element, the backward gathers slopes [C][K-1] (d/h), half the bytes of blocked (c, d)
// tables. A pair that straddles two cache lines costs a second line read, so the forward's copy
// of the values is laid out with whole-line rows, shifted so that the middle interval (where
// centred inputs such as pre-activations fall) sits mid-line. Work goes by tiles of rows x a
// channel group whose tables (or float histograms) stay in cache; see channel_tiles.
constexpr int64_t kAhead = 4;                   // rows prefetched ahead
constexpr int64_t kTableBytes = 128 * 1024;     // forward / grad_x: table bytes of a channel group
constexpr int64_t kHistGroup = 64;              // values gradient: channels of a group (measured)
constexpr int64_t kMinGroup = 64;               // channels: narrower groups read rows too sparsely
constexpr int64_t kChunkRows = 256;             // rows summed in float before a double flush

template <typename T>
inline void prefetch(const T* p, int64_t n) {
  for (int64_t q = 0; q < n; q += 64 / int64_t(sizeof(T)))
    _mm_prefetch(reinterpret_cast<const char*>(p + q), _MM_HINT_T0);
}

// Calls f(row_begin, row_end, ch_begin, ch_end) for tiles of chunk rows x group channels. With
// by_rows (and enough rows) each thread owns a row range, so it streams contiguous memory (the
// forward: up to 20% faster than channel ranges); otherwise a channel range (a multiple of 8 wide),
// which keeps a channel's histogram in one thread. A channel's rows are visited in order.
template <typename F>
void channel_tiles(int64_t rows, int64_t ch, int64_t group, int64_t chunk, int nt, bool by_rows,
                   const F& f) {
  int64_t blocks = (ch + 7) / 8;
  auto sweep = [&](int64_t rb, int64_t re, int64_t cb, int64_t ce) {
    for (int64_t r = rb; r < re; r += chunk)
      for (int64_t c = cb; c < ce; c += group) f(r, std::min(re, r + chunk), c, std::min(ce, c + group));
  };
  if (by_rows && rows >= 2 * nt) {
    parallel_ranges(rows, nt, [&](int, int64_t b, int64_t e) { sweep(b, e, 0, ch); });
    return;
  }
  int n = int(std::min<int64_t>(nt, blocks));
#pragma omp parallel for schedule(static) num_threads(n)
  for (int tid = 0; tid < n; ++tid)
    sweep(0, rows, blocks * tid / n * 8, std::min(ch, blocks * (tid + 1) / n * 8));
}

inline int64_t group_of(int64_t bytes, int64_t bytes_per_channel) {
  return std::max<int64_t>(kMinGroup, bytes / bytes_per_channel / 8 * 8);
}

// The values [C][K] copied to rows of `stride` floats (whole 64-byte lines), each row starting
// `lead` floats into its first line so that the middle pair (v[K/2-1], v[K/2]) is not split.
struct LineTable {
  int64_t stride;
  std::vector<float> buf;
  float* rows;
  LineTable(const float* v, int64_t ch, int64_t k) : stride((k + 15) / 16 * 16), buf(ch * stride + 32) {
    int64_t lead = ((7 - (k / 2 - 1)) % 16 + 16) % 16;
    rows = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) / 64 * 64) + lead;
    for (int64_t c = 0; c < ch; ++c) std::memcpy(rows + c * stride, v + c * k, k * sizeof(float));
  }
};

template <typename T>
void forward_channels(const T* x, T* y, int64_t rows, const Grid& grid, const float* v, int64_t ch,
                      int64_t k) {
  VGrid g(grid);
  LineTable tab(v, ch, k);
  const int64_t stride = tab.stride;
  const double* pairs = reinterpret_cast<const double*>(tab.rows);  // (v[j], v[j+1]) at float j
  const VI lane_k = _mm256_mullo_epi32(lanes(), _mm256_set1_epi32(int(stride)));
  int64_t group = group_of(kTableBytes, stride * 4), chunk = rows;
  channel_tiles(rows, ch, group, chunk, threads_for(rows * ch), true,
                [&](int64_t rb, int64_t re, int64_t cb, int64_t ce) {
    for (int64_t r = rb; r < re; ++r) {
      const T* xr = x + r * ch;
      T* yr = y + r * ch;
      if (r + kAhead < re) prefetch(xr + kAhead * ch + cb, ce - cb);
      int64_t c = cb;
      for (; c + 8 <= ce; c += 8) {
        V t = g.clamp(g.coord(vload(xr + c)));
        VI i = g.interval(t);
        VI at = _mm256_add_epi32(_mm256_add_epi32(i, lane_k), _mm256_set1_epi32(int(c * stride)));
        V lo = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, _mm256_castsi256_si128(at), 4));
        V hi = _mm256_castpd_ps(_mm256_i32gather_pd(pairs, _mm256_extracti128_si256(at, 1), 4));
        V v0 = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));  // lanes (0 1 4 5 | 2 3 6 7)
        V v1 = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
        v0 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v0), _MM_SHUFFLE(3, 1, 2, 0)));
        v1 = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v1), _MM_SHUFFLE(3, 1, 2, 0)));
        V frac = _mm256_sub_ps(t, _mm256_cvtepi32_ps(i));
        vstore(yr + c, _mm256_fmadd_ps(frac, _mm256_sub_ps(v1, v0), v0));
      }
      for (; c < ce; ++c) {
        float t = clamp_t((load(xr[c]) - grid.a0) * grid.inv_h, grid.tmax);
        int i = interval(t, grid.kmax);
        float v0 = v[c * k + i], v1 = v[c * k + i + 1];
        store(yr + c, v0 + (t - float(i)) * (v1 - v0));
      }
    }
  });
}

// hist, if set, is [C][K][2] (A, B). Each group accumulates a chunk of rows into a float
// histogram [w][K][2] (at most chunk terms a cell), added to hist in double after the chunk.
template <typename T>
void backward_channels(const T* x, const T* gy, T* gx, int64_t rows, const Grid& grid,
                       const float* v, int64_t ch, int64_t k, double* hist) {
  VGrid g(grid);
  std::vector<float> slopes(ch * (k - 1));
  for (int64_t c = 0; c < ch; ++c)
    for (int64_t i = 0; i + 1 < k; ++i)
      slopes[c * (k - 1) + i] = (v[c * k + i + 1] - v[c * k + i]) * grid.inv_h;
  const float* ds = slopes.data();
  const VI lane_k = _mm256_mullo_epi32(lanes(), _mm256_set1_epi32(int(k)));
  const VI lane_k1 = _mm256_mullo_epi32(lanes(), _mm256_set1_epi32(int(k - 1)));
  int64_t group = hist ? kHistGroup : group_of(kTableBytes, k * 4);
  int64_t chunk = hist ? kChunkRows : rows;
  channel_tiles(rows, ch, group, chunk, threads_for(rows * ch), !hist,
                [&](int64_t rb, int64_t re, int64_t cb, int64_t ce) {
    int64_t w = ce - cb;
    thread_local std::vector<uint32_t> cell;
    thread_local std::vector<float> pair, fh;
    if (hist) {
      cell.resize(std::max<size_t>(cell.size(), w + 8));
      pair.resize(std::max<size_t>(pair.size(), 2 * (w + 8)));
      fh.assign(w * k * 2, 0.f);
    }
    for (int64_t r = rb; r < re; ++r) {
      int64_t o = r * ch;
      if (r + kAhead < re) {
        prefetch(x + o + kAhead * ch + cb, w);
        prefetch(gy + o + kAhead * ch + cb, w);
      }
      int64_t c = cb;
      for (; c + 8 <= ce; c += 8) {
        V traw = g.coord(vload(x + o + c));
        V t = g.clamp(traw);
        VI i = g.interval(t);
        V gj = vload(gy + o + c);
        VI at = _mm256_add_epi32(_mm256_add_epi32(i, lane_k1), _mm256_set1_epi32(int(c * (k - 1))));
        V slope = _mm256_i32gather_ps(ds, at, 4);
        vstore(gx + o + c, _mm256_and_ps(g.inside(traw), _mm256_mul_ps(gj, slope)));
        if (hist) {
          VI cells = _mm256_add_epi32(_mm256_add_epi32(i, lane_k), _mm256_set1_epi32(int((c - cb) * k)));
          put_records(cells, gj, t, i, &cell[c - cb], &pair[2 * (c - cb)]);
        }
      }
      for (; c < ce; ++c) {
        float gv = load(gy[o + c]);
        float traw = (load(x[o + c]) - grid.a0) * grid.inv_h;
        float t = clamp_t(traw, grid.tmax);
        int i = interval(t, grid.kmax);
        store(gx + o + c, inside(traw, grid.tmax) ? gv * ds[c * (k - 1) + i] : 0.f);
        if (hist) {
          cell[c - cb] = uint32_t((c - cb) * k + i);
          pair[2 * (c - cb)] = gv;
          pair[2 * (c - cb) + 1] = gv * (t - float(i));
        }
      }
      if (hist) add_float_records(cell.data(), pair.data(), w, fh.data());
    }
    if (hist) {
      double* out = hist + cb * k * 2;
      const float* h = fh.data();
      for (int64_t q = 0; q < w * k * 2; ++q) out[q] += double(h[q]);
    }
  });
}
}  // namespace avx2
#endif

// One thread's range of a shared forward.
template <typename T>
void forward_shared_range(const T* x, T* y, int64_t len, const Grid& g, const Tables& tab) {
#if AFGPT_AVX512
  if (tab.intervals <= kMaxRegIntervals)
    return simd::with_registers(tab.intervals, [&](auto r) {
      simd::forward_shared<decltype(r)::value>(x, y, len, g, tab);
    });
#elif AFGPT_AVX2
  return avx2::forward_shared(x, y, len, g, tab.cd.data());
#endif
  forward_shared_plain(x, y, len, g, tab.cd.data());
}

// One thread's range of a shared backward; adds to hist ([K][kCopies][2]) if set.
template <typename T>
void grad_shared_range(const T* x, const T* gy, T* gx, int64_t len, const Grid& g,
                       const Tables& tab, double* hist) {
  auto blocks = [&](const auto& span) {  // span(x, gy, gx, len, records, hist): a run of elements
    if (!hist) return span.template operator()<false>(x, gy, gx, len, Records{}, nullptr);
    alignas(64) uint32_t cell[kBlock];
    alignas(64) float pair[2 * kBlock];
    for (int64_t j = 0; j < len; j += kBlock) {
      int64_t n = std::min(kBlock, len - j);
      span.template operator()<true>(x + j, gy + j, gx + j, n, Records{cell, pair}, hist);
    }
  };
#if AFGPT_AVX512
  if (tab.intervals <= kMaxRegIntervals)
    return simd::with_registers(tab.intervals, [&](auto r) {
      blocks(simd::SharedGrad<decltype(r)::value>(g, tab));
    });
#elif AFGPT_AVX2
  return blocks(avx2::SharedGrad{g, tab.ds.data()});
#endif
  blocks(PlainSharedGrad{g, tab.ds.data()});
}

template <typename T>
void forward_shared(const T* x, T* y, int64_t n, const Grid& g, const Tables& tab) {
  parallel_ranges(n, threads_for(n), [&](int, int64_t b, int64_t e) {
    forward_shared_range(x + b, y + b, e - b, g, tab);
  });
}

// Per-thread histograms, summed in thread order (deterministic for a given thread count).
template <typename T>
void backward_shared(const T* x, const T* gy, T* gx, int64_t n, const Grid& g, const Tables& tab,
                     double* hist) {
  int nt = threads_for(n);
  int64_t k = tab.intervals + 1;
  std::vector<double> part(hist ? nt * k * kCopies * 2 : 0, 0.0);  // per thread [K][kCopies][2]
  parallel_ranges(n, nt, [&](int tid, int64_t b, int64_t e) {
    double* h = hist ? &part[tid * k * kCopies * 2] : nullptr;
    grad_shared_range(x + b, gy + b, gx + b, e - b, g, tab, h);
  });
  if (!hist) return;
  for (int tid = 0; tid < nt; ++tid)
    for (int64_t q = 0; q < k * kCopies; ++q)
      for (int ab = 0; ab < 2; ++ab)
        hist[(q / kCopies) * 2 + ab] += part[(tid * k * kCopies + q) * 2 + ab];
}

// ======== per-channel splines: one table per channel of the last dimension ========
// Channels go by blocks of kLanes (one vector), whose tables [K-1][kLanes] hold lane l's entry
// for interval i at i*kLanes + l. Work goes by tiles of kTileRows rows x one block, so a
// histogram block serves several rows while few enough rows stream to prefetch well.

template <typename T>
void forward_block_plain(const T* __restrict x, T* __restrict y, int64_t w, Grid g,
                         const float* __restrict cd) {
  for (int64_t l = 0; l < w; ++l) {
    float t = clamp_t((load(x[l]) - g.a0) * g.inv_h, g.tmax);
    int64_t at = interval(t, g.kmax) * kLanes + l;
    store(y + l, cd[2 * at] + t * cd[2 * at + 1]);
  }
}

// Records use cell = i*kLanes + lane in a block histogram [K][kLanes][2].
template <bool Record, typename T>
void grad_block_plain(const T* __restrict x, const T* __restrict gy, T* __restrict gx, int64_t w,
                      Grid g, const float* __restrict ds, Records rec) {
  for (int64_t l = 0; l < w; ++l) {
    float gj = load(gy[l]);
    float traw = (load(x[l]) - g.a0) * g.inv_h;
    float t = clamp_t(traw, g.tmax);
    int i = interval(t, g.kmax);
    float slope = ds[i * kLanes + l];
    store(gx + l, inside(traw, g.tmax) ? gj * slope : 0.f);
    if constexpr (Record) {
      rec.cell[l] = uint32_t(i * kLanes + l);
      rec.pair[2 * l] = gj;
      rec.pair[2 * l + 1] = gj * (t - float(i));
    }
  }
}

#if AFGPT_AVX512
namespace simd {
// Per-channel table position of each lane: i*kLanes + lane.
inline VI block_at(VI i) {
  return _mm512_add_epi32(_mm512_slli_epi32(i, 4),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}

// One row of a block (w <= 16 lanes); the (c, d) pairs are gathered as 64-bit words.
template <typename T>
void forward_block(const T* x, T* y, int64_t w, const VGrid& g, const float* cd) {
  static_assert(kLanes == 16, "one vector per block");
  M m = tail(w);
  V t = g.clamp(g.coord(vload(x, m)));
  VI at = block_at(g.interval(t));
  const double* pairs = reinterpret_cast<const double*>(cd);
  V lo = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), __mmask8(m),
                                                   _mm512_castsi512_si256(at), pairs, 8));
  V hi = _mm512_castpd_ps(_mm512_mask_i32gather_pd(_mm512_setzero_pd(), __mmask8(m >> 8),
                                                   _mm512_extracti64x4_epi64(at, 1), pairs, 8));
  const VI even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  V c = _mm512_permutex2var_ps(lo, even, hi);
  V d = _mm512_permutex2var_ps(lo, _mm512_add_epi32(even, _mm512_set1_epi32(1)), hi);
  vstore(y, _mm512_fmadd_ps(t, d, c), m);
}

// Records are whole vectors: lanes past w hold g = 0 and a valid cell.
template <bool Record, typename T>
void grad_block(const T* x, const T* gy, T* gx, int64_t w, const VGrid& g, const float* ds,
                Records rec) {
  M m = tail(w);
  V traw = g.coord(vload(x, m));
  V t = g.clamp(traw);
  VI i = g.interval(t);
  VI at = block_at(i);
  V gj = vload(gy, m);
  V slope = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, at, ds, 4);
  vstore(gx, _mm512_maskz_mul_ps(g.inside(traw), gj, slope), m);
  if constexpr (Record) {
    const VI first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const VI second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    V gb = _mm512_mul_ps(gj, _mm512_sub_ps(t, _mm512_cvtepi32_ps(i)));
    _mm512_storeu_si512(rec.cell, at);
    _mm512_storeu_ps(rec.pair, _mm512_permutex2var_ps(gj, first, gb));
    _mm512_storeu_ps(rec.pair + 16, _mm512_permutex2var_ps(gj, second, gb));
  }
}
}  // namespace simd
#endif

// One row of a block's channels (w <= kLanes); cd / ds point at the block's table.
template <typename T>
void forward_block_any(const T* x, T* y, int64_t w, const Grid& g, const float* cd) {
#if AFGPT_AVX512
  simd::forward_block(x, y, w, simd::VGrid(g), cd);
#else
  forward_block_plain(x, y, w, g, cd);
#endif
}

template <bool Record, typename T>
void grad_block_any(const T* x, const T* gy, T* gx, int64_t w, const Grid& g, const float* ds,
                    Records rec) {
#if AFGPT_AVX512
  simd::grad_block<Record>(x, gy, gx, w, simd::VGrid(g), ds, rec);
#else
  grad_block_plain<Record>(x, gy, gx, w, g, ds, rec);
#endif
}

// Visits rows [rb, re) x channels [cb, ce) tile by tile, calling f(r0, rows, c, w).
template <typename F>
void for_tiles(int64_t rb, int64_t re, int64_t cb, int64_t ce, const F& f) {
  for (int64_t r0 = rb; r0 < re; r0 += kTileRows)
    for (int64_t c = cb; c < ce; c += kLanes)
      f(r0, std::min(kTileRows, re - r0), c, std::min(kLanes, ce - c));
}

template <typename T>
void forward_channels(const T* x, T* y, int64_t rows, const Grid& g, const Tables& tab) {
  int64_t ch = tab.splines;
  parallel_ranges(rows, threads_for(rows * ch), [&](int, int64_t b, int64_t e) {
    for_tiles(b, e, 0, ch, [&](int64_t r0, int64_t n, int64_t c, int64_t w) {
      for (int64_t r = r0; r < r0 + n; ++r)
        forward_block_any(x + r * ch + c, y + r * ch + c, w, g, &tab.cd[2 * tab.block(c)]);
    });
  });
}

// Channels [b, e) of all rows into hist [C][K][2], through block histograms [K][kLanes][2].
template <typename T>
void channel_hist_range(const T* x, const T* gy, T* gx, int64_t rows, int64_t b, int64_t e,
                        const Grid& g, const Tables& tab, double* hist) {
  int64_t ch = tab.splines, k = tab.intervals + 1, cells = k * kLanes * 2;
  std::vector<double> local((e - b + kLanes - 1) / kLanes * cells, 0.0);
  // lanes past a partial block's end keep earlier, valid, cells; those cells are dropped
  std::vector<uint32_t> cell(kTileRows * kLanes, 0);
  std::vector<float> pair(2 * cell.size(), 0.f);
  for_tiles(0, rows, b, e, [&](int64_t r0, int64_t n, int64_t c, int64_t w) {
    for (int64_t r = 0; r < n; ++r) {
      int64_t o = (r0 + r) * ch + c;
      Records rec{&cell[r * kLanes], &pair[2 * r * kLanes]};
      grad_block_any<true>(x + o, gy + o, gx + o, w, g, &tab.ds[tab.block(c)], rec);
    }
    add_records(cell.data(), pair.data(), n * kLanes, &local[(c - b) / kLanes * cells]);
  });
  for (int64_t s = b; s < e; ++s)
    for (int64_t i = 0; i < k; ++i)
      for (int ab = 0; ab < 2; ++ab)
        hist[(s * k + i) * 2 + ab] =
            local[(s - b) / kLanes * cells + (i * kLanes + (s - b) % kLanes) * 2 + ab];
}

// With a values gradient each thread owns a channel range, so histograms need no reduction and
// the result does not depend on the thread count; without, rows are split.
template <typename T>
void backward_channels(const T* x, const T* gy, T* gx, int64_t rows, const Grid& g,
                       const Tables& tab, double* hist) {
  int64_t ch = tab.splines;
  int nt = threads_for(rows * ch);
  if (!hist) {
    parallel_ranges(rows, nt, [&](int, int64_t b, int64_t e) {
      for_tiles(b, e, 0, ch, [&](int64_t r0, int64_t n, int64_t c, int64_t w) {
        for (int64_t r = r0; r < r0 + n; ++r) {
          int64_t o = r * ch + c;
          grad_block_any<false>(x + o, gy + o, gx + o, w, g, &tab.ds[tab.block(c)], Records{});
        }
      });
    });
    return;
  }
  nt = int(std::min<int64_t>(nt, std::max<int64_t>(1, ch / 64)));
  parallel_ranges(ch, nt, [&](int, int64_t b, int64_t e) {
    if (e > b) channel_hist_range(x, gy, gx, rows, b, e, g, tab, hist);
  });
}

// grad_v[k] = A[k] - B[k] + B[k-1] from histograms laid out [S][K][2] (A, B); A, B of K-1 are 0.
void values_grad_from_hist(const double* hist, float* gv, int64_t splines, int64_t k) {
  for (int64_t s = 0; s < splines; ++s) {
    const double* h = hist + s * k * 2;
    for (int64_t j = 0; j < k; ++j)
      gv[s * k + j] = float(h[j * 2] - h[j * 2 + 1] + (j > 0 ? h[(j - 1) * 2 + 1] : 0.0));
  }
}

// ---- op entry points ----
void check_inputs(const at::Tensor& x, const at::Tensor& v) {
  TORCH_CHECK(x.device().is_cpu() && v.device().is_cpu(), "spline_cpu: CPU tensors expected");
  TORCH_CHECK(v.scalar_type() == at::kFloat, "spline_cpu: values must be float32");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "spline_cpu: x must be float32 or bfloat16");
  TORCH_CHECK(v.size(-1) >= 2, "spline_cpu: need at least 2 anchors");
  TORCH_CHECK(v.dim() == 1 || (v.dim() == 2 && x.dim() >= 1 && x.size(-1) == v.size(0)),
              "spline_cpu: values must be [K] or [C, K] with C == x.shape[-1]");
  TORCH_CHECK(v.numel() < (int64_t(1) << 26), "spline_cpu: too many spline values");
}

// Calls f(T{}) with the element type of x: float, or uint16_t for bf16 bits.
template <typename F>
void dispatch_dtype(const at::Tensor& x, const F& f) {
  if (x.scalar_type() == at::kFloat)
    f(float{});
  else
    f(uint16_t{});
}

at::Tensor forward(const at::Tensor& x_in, const at::Tensor& v_in, double x_min, double x_max) {
  check_inputs(x_in, v_in);
  at::Tensor x = x_in.contiguous(), v = v_in.contiguous();
  at::Tensor y = at::empty_like(x);
  int64_t k = v.size(-1), splines = v.dim() == 1 ? 1 : v.size(0);
  Grid g = make_grid(k, x_min, x_max);
  Tables tab = AFGPT_AVX2 && splines > 1 ? Tables{}
                                          : make_tables(v.data_ptr<float>(), splines, k, g.inv_h, false);
  dispatch_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    T* yp = static_cast<T*>(y.data_ptr());
#if AFGPT_AVX2
    if (splines > 1) return avx2::forward_channels(xp, yp, x.numel() / splines, g, v.data_ptr<float>(), splines, k);
#endif
    if (v.dim() == 1)
      forward_shared(xp, yp, x.numel(), g, tab);
    else
      forward_channels(xp, yp, x.numel() / splines, g, tab);
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& gy_in, const at::Tensor& x_in,
                                            const at::Tensor& v_in, double x_min, double x_max,
                                            bool values_grad) {
  check_inputs(x_in, v_in);
  TORCH_CHECK(gy_in.sizes() == x_in.sizes() && gy_in.scalar_type() == x_in.scalar_type(),
              "spline_cpu: grad must match x");
  at::Tensor x = x_in.contiguous(), v = v_in.contiguous(), gy = gy_in.contiguous();
  at::Tensor gx = at::empty_like(x);
  int64_t k = v.size(-1), splines = v.dim() == 1 ? 1 : v.size(0);
  Grid g = make_grid(k, x_min, x_max);
  Tables tab = AFGPT_AVX2 && splines > 1 ? Tables{}
                                          : make_tables(v.data_ptr<float>(), splines, k, g.inv_h, true);
  std::vector<double> hist(values_grad ? splines * k * 2 : 0, 0.0);
  double* hp = values_grad ? hist.data() : nullptr;
  dispatch_dtype(x, [&](auto tag) {
    using T = decltype(tag);
    const T* xp = static_cast<const T*>(x.data_ptr());
    const T* gp = static_cast<const T*>(gy.data_ptr());
    T* gxp = static_cast<T*>(gx.data_ptr());
#if AFGPT_AVX2
    if (splines > 1)
      return avx2::backward_channels(xp, gp, gxp, x.numel() / splines, g, v.data_ptr<float>(), splines, k, hp);
#endif
    if (v.dim() == 1)
      backward_shared(xp, gp, gxp, x.numel(), g, tab, hp);
    else
      backward_channels(xp, gp, gxp, x.numel() / splines, g, tab, hp);
  });
  at::Tensor gv = at::empty(values_grad ? v.sizes() : at::IntArrayRef{0}, v.options());
  if (values_grad) values_grad_from_hist(hist.data(), gv.data_ptr<float>(), splines, k);
  return {gx, gv};
}

}  // namespace

TORCH_LIBRARY(afgpt_spline_cpu, m) {
  m.def("forward(Tensor x, Tensor values, float x_min, float x_max) -> Tensor");
  m.def(
      "backward(Tensor grad, Tensor x, Tensor values, float x_min, float x_max, bool values_grad)"
      " -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(afgpt_spline_cpu, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
}
