// Native CPU dequant-matmul, y = x @ dequant(W), registered with XLA as an FFI custom call.
//
// W is a cascade.quant.QuantizedTensor of logical shape (K, N), quantized along K (axis 0) in
// groups of `group` rows, in the layout quant/packing.py documents (no repacking):
//
//   codes  uint8 (ceil(K * bits / 8), N), row-major.  bits = 8: row k holds u[k, :].
//          bits = 4: byte (j, n) holds u[2j, n] in bits 3:0 and u[2j+1, n] in bits 7:4.
//          u is the unsigned code: symmetric specs store u = q + 2^(bits-1).
//   scale  (ceil(K / group), N) or (1, 1) per tensor; float16, bfloat16 or float32.
//   zero   same shape as scale (asymmetric specs only); float16, bfloat16 or float32.  A
//          GGUF Q4_1 import has a real-valued float32 zero (z = -m / d).
//
//   w[k, n] = (u[k, n] - z[g, n]) * s[g, n]  (z = 2^(bits-1) for symmetric specs), g = k / group.
//
// The float weight is never materialized.  Codes are made signed in the integer domain,
// v = u - 2^(bits-1) (exact), so per group and column
//
//   sum_k x[k] * w[k, n] = s[g, n] * (sum_k x[k] * v[k, n]  -  z'[g, n] * sum_k x[k]),
//   z' = z - 2^(bits-1)  (0 for symmetric specs: no correction term),
//
// as llama.cpp does for Q4_1's minimum.  Work items are claimed from an atomic counter by the
// calling thread and the kernel's own helper threads (SpinPool: one per further core,
// CASCADE_NUM_THREADS caps the total; they busy-wait CASCADE_CPU_SPIN_US after a call, as
// llama.cpp's do).  Decode shapes (batch <= 4) with grouped scales split K into bands of whole
// groups, so each thread streams its own contiguous run of code rows, and add the bands' partial
// sums at the end; other shapes split the output columns.  An item sweeps whole rows of its
// columns, so the codes stream sequentially (with software prefetch across the page boundaries
// of each row), and its float accumulators (gacc, acc: rows x columns) stay in L1/L2.  Batch
// rows run four at a time; larger batches re-read the chunk's codes from L2.
//
// SIMD: AVX2 + FMA + F16C kernels chosen at run time (__builtin_cpu_supports); a portable
// scalar path otherwise, and for column tails narrower than 8.  Tested against the reference
// XLA backend (tests/quant/test_kernels_cpu.py).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cascade_cpu;

constexpr int64_t kMaxChunk = 1024;  // output columns per work item at most
constexpr int64_t kDirectRows = 4;   // batch rows accumulated together (larger batches: in blocks)
constexpr int64_t kPrefetchRows = 8;  // rows of codes prefetched ahead of the one in use
constexpr int64_t kL2Codes = 256 << 10;  // bytes of a chunk's codes that batches > kDirectRows re-read from L2

struct Problem {
  int64_t M, K, N;
  bool transposed;  // codes (N, ceil(K * bits / 8)) and scale/zero (N, groups): W^T stored row by row
  int bits;
  int64_t group, groups;
  int64_t g0, g1;  // the band of groups [g0, g1) this call sums over (a K-split work item; else all)
  const uint8_t* codes;
  const void* scale;
  Real scale_type;
  bool scale_per_tensor;  // scale (and zero) of shape (1, 1)
  const void* zero;       // nullptr for symmetric specs
  Real zero_type;
  const float* x;     // (M, K) float32
  const float* xsum;  // (M, groups): sum of x over each group (asymmetric specs only)
  float* y;           // (M, N) float32
  bool simd;          // the AVX2 path (decided once per call: use_simd() reads the environment)
};

// Scale and corrected zero (z - 2^(bits-1)) of group g for columns [n0, n0 + n) as float32.
void group_params(const Problem& p, int64_t g, int64_t n0, int64_t n, float* s, float* z) {
  const float offset = float(1 << (p.bits - 1));
  for (int64_t i = 0; i < n; ++i) {
    const int64_t at = p.scale_per_tensor ? 0 : p.transposed ? (n0 + i) * p.groups + g : g * p.N + n0 + i;
    s[i] = load_real(p.scale, p.scale_type, at);
    if (p.zero) z[i] = load_real(p.zero, p.zero_type, at) - offset;
  }
}

// v = u - 2^(bits-1): the signed code of row k, column n.
inline int code(const Problem& p, int64_t k, int64_t n) {
  if (p.transposed) {
    const int64_t row = (p.K * p.bits + 7) / 8;
    if (p.bits == 8) return int(p.codes[n * row + k]) - 128;
    const uint8_t byte = p.codes[n * row + (k >> 1)];
    return int((k & 1) ? (byte >> 4) : (byte & 0xf)) - 8;
  }
  if (p.bits == 8) return int(p.codes[k * p.N + n]) - 128;
  const uint8_t byte = p.codes[(k >> 1) * p.N + n];
  return int((k & 1) ? (byte >> 4) : (byte & 0xf)) - 8;
}

// ------------------------------------------------------------------------------- scalar path

void columns_scalar(const Problem& p, int64_t n0, int64_t n1) {
  std::vector<float> s(n1 - n0), z(n1 - n0), acc(n1 - n0), gacc(n1 - n0);
  for (int64_t b = 0; b < p.M; ++b) {
    const float* x = p.x + b * p.K;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = p.g0; g < p.g1; ++g) {
      const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
      std::fill(gacc.begin(), gacc.end(), 0.f);
      for (int64_t k = k0; k < k1; ++k)
        for (int64_t n = n0; n < n1; ++n) gacc[n - n0] += x[k] * float(code(p, k, n));
      group_params(p, g, n0, n1 - n0, s.data(), z.data());
      for (int64_t i = 0; i < n1 - n0; ++i) {
        const float corrected = p.zero ? gacc[i] - z[i] * p.xsum[b * p.groups + g] : gacc[i];
        acc[i] += s[i] * corrected;
      }
    }
    std::copy(acc.begin(), acc.end(), p.y + b * p.N + n0);
  }
}

// --------------------------------------------------------------------------------- AVX2 path
#ifdef CASCADE_X86

// Scale and corrected zero of group g for 8 columns starting at n.
AVX2_FN inline void group_params8(const Problem& p, int64_t g, int64_t n, __m256* s, __m256* z) {
  if (p.scale_per_tensor) {
    *s = _mm256_set1_ps(load_real(p.scale, p.scale_type, 0));
    if (p.zero) *z = _mm256_set1_ps(load_real(p.zero, p.zero_type, 0) - float(1 << (p.bits - 1)));
    return;
  }
  *s = load8_real(p.scale, p.scale_type, g * p.N + n);
  if (p.zero)
    *z = _mm256_sub_ps(load8_real(p.zero, p.zero_type, g * p.N + n), _mm256_set1_ps(float(1 << (p.bits - 1))));
}

// Signed codes of 8 columns: int8 row k / int4 rows (2j, 2j+1) as float.
AVX2_FN inline __m256 codes8_int8(const uint8_t* row) {
  const __m128i c = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)), _mm_set1_epi8(char(0x80)));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(c));
}

AVX2_FN inline void codes8_int4(const uint8_t* row, __m256* lo, __m256* hi) {
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row)));
  const __m256i eight = _mm256_set1_epi32(8);
  *lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0xf)), eight));
  *hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(c, 4), eight));
}

// Both paths sweep whole rows of a column chunk: codes are read sequentially (row k of the
// chunk is W contiguous bytes), which the hardware prefetchers stream.  (Keeping a strip of
// columns in registers while walking down K reads one short run per row with a stride of N
// bytes: every row a new page, and the loads stall on memory latency, measured 7x slower.)
// The float accumulators of a chunk, M x W, stay in L1/L2.

// Direct path (M <= kDirectRows): per group, gacc[b][n] += x[b, k] * v[k, n] for the group's rows,
// then acc[b][n] += s[g, n] * (gacc[b][n] - z'[g, n] * xsum[b, g]).  Four rows of K per pass over
// the accumulators (four rows of int8 codes, two bytes of int4 codes); M is a template argument so
// that the batch loop unrolls and the broadcast x values stay in registers.
template <int BITS, int M>
AVX2_FN void direct_chunk_m(const Problem& p, int64_t c0, int64_t c1, float* acc, float* gacc) {
  const int64_t W = c1 - c0;
  const int64_t code_rows = (p.K * BITS + 7) / 8;
  for (int64_t g = p.g0; g < p.g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    std::fill(gacc, gacc + M * W, 0.f);
    for (int64_t k = k0; k < k1; k += 4) {
      const int64_t nk = std::min<int64_t>(4, k1 - k);  // rows this step (a group's tail may be short)
      __m256 xv[M][4];
      for (int b = 0; b < M; ++b)
        for (int i = 0; i < 4; ++i) xv[b][i] = _mm256_set1_ps(i < nk ? p.x[b * p.K + k + i] : 0.f);
      // rows of codes this step: int8 k .. k+3, int4 bytes k/2 and k/2 + 1 (k is even: groups
      // of 4-bit codes are whole bytes); rows past the end are never read, their x is 0
      const int64_t r0 = BITS == 8 ? k : k >> 1;
      const int64_t nr = BITS == 8 ? nk : (nk + 1) / 2;
      const uint8_t* rows[4];
      for (int i = 0; i < 4; ++i) rows[i] = p.codes + std::min(r0 + i, r0 + nr - 1) * p.N + c0;
      // software prefetch of the rows a few steps ahead: a row of the chunk is a short run on its
      // own page, which the hardware prefetchers do not follow across the page boundary
      const int64_t ahead_row = r0 + kPrefetchRows;
      const uint8_t* ahead = p.codes + ahead_row * p.N + c0;
      const int n_ahead = int(std::max<int64_t>(0, std::min<int64_t>(BITS == 8 ? 4 : 2, code_rows - ahead_row)));
      for (int64_t n = 0; n < W; n += 8) {
        if ((n & 63) == 0)
          for (int i = 0; i < n_ahead; ++i) _mm_prefetch(reinterpret_cast<const char*>(ahead + i * p.N + n), _MM_HINT_T0);
        __m256 v[4];
        if (BITS == 8) {
          for (int i = 0; i < 4; ++i) v[i] = codes8_int8(rows[i] + n);
        } else {
          codes8_int4(rows[0] + n, &v[0], &v[1]);
          codes8_int4(rows[1] + n, &v[2], &v[3]);
        }
        for (int b = 0; b < M; ++b) {
          float* ga = gacc + b * W + n;
          __m256 a = _mm256_loadu_ps(ga);
          a = _mm256_fmadd_ps(xv[b][0], v[0], a);
          a = _mm256_fmadd_ps(xv[b][1], v[1], a);
          a = _mm256_fmadd_ps(xv[b][2], v[2], a);
          a = _mm256_fmadd_ps(xv[b][3], v[3], a);
          _mm256_storeu_ps(ga, a);
        }
      }
    }
    for (int64_t n = 0; n < W; n += 8) {
      __m256 s, z;
      group_params8(p, g, c0 + n, &s, &z);
      for (int b = 0; b < M; ++b) {
        __m256 ga = _mm256_loadu_ps(gacc + b * W + n);
        if (p.zero) ga = _mm256_fnmadd_ps(z, _mm256_set1_ps(p.xsum[b * p.groups + g]), ga);
        float* a = acc + b * W + n;
        _mm256_storeu_ps(a, _mm256_fmadd_ps(s, ga, _mm256_loadu_ps(a)));
      }
    }
  }
}

template <int BITS>
AVX2_FN void direct_chunk(const Problem& p, int64_t c0, int64_t c1, float* acc, float* gacc) {
  switch (p.M) {
    case 1: direct_chunk_m<BITS, 1>(p, c0, c1, acc, gacc); break;
    case 2: direct_chunk_m<BITS, 2>(p, c0, c1, acc, gacc); break;
    case 3: direct_chunk_m<BITS, 3>(p, c0, c1, acc, gacc); break;
    default: direct_chunk_m<BITS, 4>(p, c0, c1, acc, gacc); break;
  }
}

// Transposed layout (a tied LM head: the embedding E (N, K) quantized along K, y = x @ E^T): each
// output's codes are one contiguous row, so an output is a dot product, 8 codes of K at a time,
// with a per-group scale applied to the 8-lane partial sums and one horizontal sum at the end.
// Needs the group size to be a multiple of 8 (the wrapper checks); K's tail < 8 is scalar.
AVX2_FN inline float hsum8(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  return _mm_cvtss_f32(h);
}

// Unsigned codes k .. k+7 of one row of the transposed layout, as float (no offset: the kernel
// folds 2^(bits-1) into the per-group correction, one multiply per group instead of a subtract
// per value).
template <int BITS>
AVX2_FN inline __m256 ucodes8_along_k(const uint8_t* row, int64_t k) {
  if (BITS == 8) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + k))));
  // 4 bytes hold codes k .. k+7: lane 2i = byte i & 15, lane 2i+1 = byte i >> 4
  uint32_t four;
  std::memcpy(&four, row + (k >> 1), 4);
  const __m128i b = _mm_cvtsi32_si128(int(four));
  const __m256i dup = _mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b));
  return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(dup, _mm256_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4)),
                                             _mm256_set1_epi32(0xf)));
}

// R outputs (rows of E) at once (each 8 values of x loaded once for the R rows);
// sum_k x[k] w[k] = sum_g s_g (sum_{k in g} x[k] u[k] - z_g xsum_g), z_g = the zero point (or
// 2^(bits-1) for symmetric specs).
template <int BITS, int R>
AVX2_FN void transposed_rows(const Problem& p, int64_t n, const float* x, const float* xsum, float* y) {
  const int64_t row_bytes = (p.K * BITS + 7) / 8;
  const float offset = float(1 << (BITS - 1));
  const uint8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = p.codes + (n + r) * row_bytes;
  __m256 acc[R];
  float tail[R], correction[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), tail[r] = 0.f, correction[r] = 0.f;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group), k8 = k0 + (k1 - k0) / 8 * 8;
    __m256 gacc[R];
    for (int r = 0; r < R; ++r) gacc[r] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k8; k += 8) {
      const __m256 xv = _mm256_loadu_ps(x + k);
      for (int r = 0; r < R; ++r) gacc[r] = _mm256_fmadd_ps(xv, ucodes8_along_k<BITS>(row[r], k), gacc[r]);
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = p.scale_per_tensor ? 0 : (n + r) * p.groups + g;
      const float sc = load1_real(p.scale, p.scale_type, at);
      float gtail = 0.f;
      for (int64_t k = k8; k < k1; ++k) gtail += x[k] * float(code(p, k, n + r) + (1 << (BITS - 1)));
      acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(sc), gacc[r], acc[r]);
      tail[r] += sc * gtail;
      correction[r] += sc * (p.zero ? load1_real(p.zero, p.zero_type, at) : offset) * xsum[g];
    }
  }
  for (int r = 0; r < R; ++r) y[n + r] = hsum8(acc[r]) + tail[r] - correction[r];
}

template <int BITS>
AVX2_FN void transposed_chunk_bits(const Problem& p, int64_t n0, int64_t n1) {
  for (int64_t b = 0; b < p.M; ++b) {
    const float* x = p.x + b * p.K;
    const float* xsum = p.xsum + b * p.groups;
    float* y = p.y + b * p.N;
    // one output at a time: interleaving 2-8 rows (independent FMA chains) measured up to 2x
    // slower, the head's rows being a memory stream that one sequential reader follows best
    for (int64_t n = n0; n < n1; ++n) transposed_rows<BITS, 1>(p, n, x, xsum, y);
  }
}

AVX2_FN void transposed_chunk(const Problem& p, int64_t n0, int64_t n1) {
  if (p.bits == 8) transposed_chunk_bits<8>(p, n0, n1);
  else transposed_chunk_bits<4>(p, n0, n1);
}

// Columns [c0, c1): SIMD strips of 8, the remaining < 8 columns scalar.  Batches larger than
// kDirectRows run in blocks of kDirectRows rows; each block re-reads the chunk's codes, which
// the chunk width keeps small enough to stay in L2 (QMatmulImpl).
AVX2_FN void chunk_avx2(const Problem& p, int64_t c0, int64_t c1, std::vector<float>& gacc, std::vector<float>& acc) {
  const int64_t c1v = c0 + (c1 - c0) / 8 * 8;
  if (c1v > c0) {
    const int64_t W = c1v - c0;
    acc.assign(p.M * W, 0.f);
    gacc.resize(kDirectRows * W);
    for (int64_t b0 = 0; b0 < p.M; b0 += kDirectRows) {
      Problem block = p;
      block.M = std::min(kDirectRows, p.M - b0);
      block.x = p.x + b0 * p.K;
      if (p.zero) block.xsum = p.xsum + b0 * p.groups;
      if (p.bits == 8) direct_chunk<8>(block, c0, c1v, acc.data() + b0 * W, gacc.data());
      else direct_chunk<4>(block, c0, c1v, acc.data() + b0 * W, gacc.data());
    }
    for (int64_t b = 0; b < p.M; ++b) std::copy(acc.data() + b * W, acc.data() + (b + 1) * W, p.y + b * p.N + c0);
  }
  if (c1v < c1) columns_scalar(p, c1v, c1);
}

#endif  // CASCADE_X86

void chunk(const Problem& p, int64_t c0, int64_t c1, std::vector<float>& gacc, std::vector<float>& acc) {
#ifdef CASCADE_X86
  if (p.simd) {
    if (p.transposed) transposed_chunk(p, c0, c1);
    else chunk_avx2(p, c0, c1, gacc, acc);
    return;
  }
#endif
  columns_scalar(p, c0, c1);
}

// One weight of a call: its problem and how its items split it.
struct Part {
  Problem problem;
  int64_t width = 0;       // columns per chunk (a multiple of 32)
  int64_t col_chunks = 0;  // chunks per band
  int64_t bands = 1;       // K-split: bands of whole groups, each summed into its own partial y
  int64_t first = 0;       // the index of its first item
  float* partial = nullptr;  // (bands, M, N) partial sums when bands > 1
};

// A call: one or several weights that multiply the same x (q/k/v, gate/up: fewer calls per layer),
// as one job whose items are (weight, band, column chunk).
struct Shared : Job {
  std::vector<Part> parts;
  void item(int64_t i) override {
    thread_local std::vector<float> gacc, acc;
    size_t w = 0;
    while (w + 1 < parts.size() && i >= parts[w + 1].first) ++w;
    const Part& part = parts[w];
    i -= part.first;
    const int64_t band = i / part.col_chunks, c0 = (i % part.col_chunks) * part.width;
    Problem p = part.problem;
    if (part.bands > 1) {
      p.g0 = band * p.groups / part.bands;
      p.g1 = (band + 1) * p.groups / part.bands;
      p.y = part.partial + band * p.M * p.N;
    }
    chunk(p, c0, std::min(p.N, c0 + part.width), gacc, acc);
  }
};

bool real_type(ffi::DataType t, Real* out) {
  switch (t) {
    case ffi::DataType::F32: *out = Real::kF32; return true;
    case ffi::DataType::F16: *out = Real::kF16; return true;
    case ffi::DataType::BF16: *out = Real::kBF16; return true;
    default: return false;
  }
}

bool x_type_of(ffi::AnyBuffer x, Real* out) { return real_type(x.element_type(), out) && *out != Real::kF16; }

// Check one weight against x (M, K) and fill its problem (everything but x, xsum and y).
ffi::Error describe(int64_t M, int64_t K, ffi::Buffer<ffi::U8> codes, ffi::AnyBuffer scale, ffi::AnyBuffer zero,
                    ffi::Result<ffi::AnyBuffer>& y, int64_t bits, int64_t group, bool has_zero, bool transposed,
                    Real x_type, Problem* out) {
  const auto cd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (cd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("cascade_qmatmul: x, codes, scale and y must be 2-D");
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("cascade_qmatmul: bits must be 4 or 8");
  Problem p{};
  p.M = M;
  p.K = K;
  p.transposed = transposed;
  p.N = transposed ? cd[0] : cd[1];
  p.bits = int(bits);
  p.group = group;
  if (p.group <= 0 || (bits == 4 && p.group % 2 && p.group < p.K) || (transposed && p.group % 8 && p.group < p.K))
    return ffi::Error::InvalidArgument("cascade_qmatmul: bad group size");
  p.groups = (p.K + p.group - 1) / p.group;
  p.g0 = 0;
  p.g1 = p.groups;
  const int64_t code_rows = (p.K * bits + 7) / 8;
  if ((transposed ? cd[1] : cd[0]) != code_rows || yd[0] != p.M || yd[1] != p.N)
    return ffi::Error::InvalidArgument("cascade_qmatmul: shapes do not match");
  p.scale_per_tensor = sd[0] == 1 && sd[1] == 1 && !(p.groups == 1 && p.N == 1);
  const int64_t want0 = transposed ? p.N : p.groups, want1 = transposed ? p.groups : p.N;
  if (!p.scale_per_tensor && (sd[0] != want0 || sd[1] != want1))
    return ffi::Error::InvalidArgument("cascade_qmatmul: scale shape does not match the groups");
  Real y_type;
  if (!real_type(y->element_type(), &y_type) || y_type != x_type || !real_type(scale.element_type(), &p.scale_type))
    return ffi::Error::InvalidArgument("cascade_qmatmul: unsupported dtypes");
  p.codes = codes.typed_data();
  p.scale = scale.untyped_data();
  if (has_zero) {
    if (!real_type(zero.element_type(), &p.zero_type) || zero.element_count() != scale.element_count())
      return ffi::Error::InvalidArgument("cascade_qmatmul: zero must match scale");
    p.zero = zero.untyped_data();
  }
  *out = p;
  return ffi::Error::Success();
}

// How a weight's items split it, the same whether it runs alone or with other weights of a call.
// K bands (decode shapes with grouped scales: each thread streams its own contiguous run of code
// rows, whole rows up to kMaxChunk columns, and the bands' partial sums are added at the end) are
// decided by K and N only, never by the number of rows, so each row's result is the same alone or
// with others (a batch, or the k + 1 rows of a speculative verification against one-row decode
// steps).  Otherwise the output columns are split: about two chunks per thread, a multiple of 32
// columns, at most kMaxChunk wide (the accumulators stay in L1/L2).
Part split(const Problem& p) {
  Part part;
  part.problem = p;
  const int64_t threads = 1 + SpinPool::get().helpers();
  // one worker for small products, where waking a thread costs more than it saves
  const int64_t workers = p.M * p.K * p.N < (int64_t(1) << 18) ? 1 : threads;
  const int64_t code_rows = (p.K * p.bits + 7) / 8;
  int64_t width;
  if (threads > 1 && p.K * p.N >= (int64_t(1) << 18) && !p.transposed && p.groups >= 2 * threads &&
      p.M * p.N * 2 * threads <= (int64_t(1) << 22)) {
    part.bands = 2 * threads;
    width = std::min(kMaxChunk, (p.N + 31) / 32 * 32);
    // batches larger than kDirectRows re-read a chunk's codes (its band's rows) from L2
    if (p.M > kDirectRows) width = std::min(width, kL2Codes / std::max<int64_t>(1, code_rows / part.bands) / 32 * 32);
  } else {
    const int64_t per = (p.N + 2 * workers - 1) / (2 * workers);
    width = std::min(kMaxChunk, (per + 31) / 32 * 32);
    if (p.M > kDirectRows && !p.transposed) width = std::min(width, kL2Codes / code_rows / 32 * 32);
  }
  part.width = std::max<int64_t>(32, width);
  part.col_chunks = (p.N + part.width - 1) / part.width;
  return part;
}

// Run every weight of a call against x (M, K): x converted to float32 and its group sums taken
// once; outs[i]: where weight i's float32 result goes.
void run_call(std::vector<Problem>& ps, const void* xdata, Real x_type, const std::vector<float*>& outs) {
  const Problem& p0 = ps[0];
  const int64_t M = p0.M, K = p0.K;
  std::vector<float> xf, xsum;
  const float* x = static_cast<const float*>(xdata);
  if (x_type != Real::kF32) {
    xf.resize(M * K);
    const uint16_t* xh = static_cast<const uint16_t*>(xdata);
    for (int64_t i = 0; i < M * K; ++i) xf[i] = bf16_to_float(xh[i]);
    x = xf.data();
  }
  bool need_xsum = false;  // the transposed kernel folds the code offset in through xsum
  for (const Problem& p : ps) need_xsum |= p.zero != nullptr || p.transposed;
  if (need_xsum) {  // the weights of a call share their group size
    xsum.assign(M * p0.groups, 0.f);
    for (int64_t b = 0; b < M; ++b)
      for (int64_t k = 0; k < K; ++k) xsum[b * p0.groups + k / p0.group] += x[b * K + k];
  }
  const bool simd = use_simd();
  auto shared = std::make_shared<Shared>();
  int64_t work = 0, partial_floats = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    Problem& p = ps[i];
    p.x = x;
    p.xsum = need_xsum ? xsum.data() : nullptr;
    p.y = outs[i];
    p.simd = simd;
    Part part = split(p);
    part.first = shared->items;
    shared->items += part.bands * part.col_chunks;
    if (part.bands > 1) partial_floats += part.bands * p.M * p.N;
    shared->parts.push_back(part);
    work += p.M * p.K * p.N;
  }
  std::vector<float> partial(partial_floats);  // every item writes all its columns
  float* at = partial.data();
  for (Part& part : shared->parts)
    if (part.bands > 1) {
      part.partial = at;
      at += part.bands * part.problem.M * part.problem.N;
    }
  run_job(shared, work < (int64_t(1) << 18) ? 1 : 1 + SpinPool::get().helpers());
  for (const Part& part : shared->parts) {  // y = the sum of the bands' partial sums
    if (part.bands <= 1) continue;
    const int64_t mn = part.problem.M * part.problem.N;
    for (int64_t i = 0; i < mn; ++i) {
      float t = 0.f;
      for (int64_t b = 0; b < part.bands; ++b) t += part.partial[b * mn + i];
      part.problem.y[i] = t;
    }
  }
}

ffi::Error QMatmulImpl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> codes, ffi::AnyBuffer scale,
                       ffi::AnyBuffer zero, ffi::Result<ffi::AnyBuffer> y, int64_t bits, int64_t group,
                       bool has_zero, bool transposed) {
  const auto xd = x.dimensions();
  if (xd.size() != 2) return ffi::Error::InvalidArgument("cascade_qmatmul: x, codes, scale and y must be 2-D");
  Real x_type;
  if (!x_type_of(x, &x_type)) return ffi::Error::InvalidArgument("cascade_qmatmul: unsupported dtypes");
  std::vector<Problem> ps(1);
  ffi::Error err = describe(xd[0], xd[1], codes, scale, zero, y, bits, group, has_zero, transposed, x_type, &ps[0]);
  if (err.failure()) return err;
  const int64_t M = ps[0].M, N = ps[0].N;
  if (M == 0 || N == 0) return ffi::Error::Success();
  std::vector<float> yf;
  float* yout = x_type == Real::kF32 ? static_cast<float*>(y->untyped_data()) : (yf.resize(M * N), yf.data());
  run_call(ps, x.untyped_data(), x_type, {yout});
  if (x_type == Real::kBF16) {
    uint16_t* yh = static_cast<uint16_t*>(y->untyped_data());
    for (int64_t i = 0; i < M * N; ++i) yh[i] = float_to_bf16(yf[i]);
  }
  return ffi::Error::Success();
}

// Several weights of the same bits, group and zero-point kind against one x: arguments x, then
// (codes, scale, zero) per weight; one result per weight, each exactly its own call's.
ffi::Error QMatmulManyImpl(ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t bits,
                           int64_t group, bool has_zero) {
  const auto xd = x.dimensions();
  Real x_type;
  if (xd.size() != 2) return ffi::Error::InvalidArgument("cascade_qmatmul_many: x must be 2-D");
  if (!x_type_of(x, &x_type)) return ffi::Error::InvalidArgument("cascade_qmatmul_many: unsupported dtypes");
  const size_t count = rets.size();
  if (count == 0 || args.size() != 3 * count)
    return ffi::Error::InvalidArgument("cascade_qmatmul_many: expected (codes, scale, zero) per result");
  std::vector<Problem> ps(count);
  std::vector<ffi::Result<ffi::AnyBuffer>> ys;
  for (size_t i = 0; i < count; ++i) {
    auto codes = args.get<ffi::Buffer<ffi::U8>>(3 * i);
    auto scale = args.get<ffi::AnyBuffer>(3 * i + 1);
    auto zero = args.get<ffi::AnyBuffer>(3 * i + 2);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (codes.has_error() || scale.has_error() || zero.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("cascade_qmatmul_many: bad operand types");
    ys.push_back(*y);
    ffi::Error err = describe(xd[0], xd[1], *codes, *scale, *zero, ys.back(), bits, group, has_zero, false, x_type,
                              &ps[i]);
    if (err.failure()) return err;
  }
  const int64_t M = xd[0];
  std::vector<std::vector<float>> temps(count);
  std::vector<Problem> nonempty;
  std::vector<float*> outs;
  for (size_t i = 0; i < count; ++i) {
    float* out = static_cast<float*>(ys[i]->untyped_data());
    if (x_type != Real::kF32) temps[i].resize(M * ps[i].N), out = temps[i].data();
    if (M && ps[i].N) nonempty.push_back(ps[i]), outs.push_back(out);
  }
  if (nonempty.empty()) return ffi::Error::Success();
  run_call(nonempty, x.untyped_data(), x_type, outs);
  if (x_type == Real::kBF16)
    for (size_t i = 0; i < count; ++i) {
      uint16_t* yh = static_cast<uint16_t*>(ys[i]->untyped_data());
      for (int64_t j = 0; j < M * ps[i].N; ++j) yh[j] = float_to_bf16(temps[i][j]);
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeQMatmul, QMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()        // x (M, K) float32 / bfloat16
                                  .Arg<ffi::Buffer<ffi::U8>>()  // codes
                                  .Arg<ffi::AnyBuffer>()        // scale
                                  .Arg<ffi::AnyBuffer>()        // zero (ignored unless has_zero)
                                  .Ret<ffi::AnyBuffer>()        // y (M, N), x's dtype
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("has_zero")
                                  .Attr<bool>("transposed"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeQMatmulMany, QMatmulManyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) float32 / bfloat16
                                  .RemainingArgs()        // (codes, scale, zero) per weight
                                  .RemainingRets()        // y (M, N_i) per weight, x's dtype
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("has_zero"));
