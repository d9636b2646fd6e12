// Native CPU matmul with int8 activations and integer dot products (the -a8 specs), registered
// with XLA as an FFI custom call.  The arithmetic is cascade.quant.activations.a8_reference's:
//
//   d[m, g]  = max|x[m, block g]| / 127 (1 for a block of zeros),  xq = clip(round(x / d), +-127)
//   I[m,g,n] = sum_{k in g} xq[m, k] * u[k, n]  (int32, exact),     X[m, g] = sum_{k in g} xq[m, k]
//   y[m, n]  = sum_g d[m, g] * s[g, n] * (I[m, g, n] - z[g, n] * X[m, g])
//
// with u the unsigned codes of the weight in the layout quant/packing.py documents (read in place,
// no repacking), blocks = the weight's groups (or the whole row), z = 2^(bits-1) for symmetric
// specs (then I - z X is formed in int32, exactly as the reference does).  The rounding is round
// half to even on x / d computed in float32, so xq equals the reference's bit for bit.
//
// Layouts (cpu_qmatmul.cc has the byte tables): "K-major" codes (ceil(K*bits/8), N), a code row
// holds one (int8) or two (int4: k = 2r in bits 3:0, 2r+1 in bits 7:4) values of the reduction
// axis for every output column; "transposed" codes (N, ceil(K*bits/8)), a tied LM head, one output's
// codes contiguous along K.
//
// Paths, chosen at every call (cpu_common.h: isa(), capped by CASCADE_CPU_ISA):
//   scalar       every shape and layout.
//   avx2         K-major: strips of 32 columns per block of the weight.  int4: the two nibbles of
//                a code row are interleaved into (u[2r], u[2r+1]) byte pairs per column and
//                multiplied by the pair (xq[2r], xq[2r+1]) with vpmaddubsw (16-bit sums, at most
//                8 x 2 x 15 x 127 = 30,480 before they are widened); int8: codes widened to 16
//                bits, pairs of rows multiplied with vpmaddwd.  Transposed (group a multiple of 32,
//                K of 64): 32 bytes of one output's codes against 32 activation bytes, vpmaddubsw +
//                vpmaddwd (llama.cpp's Q8_0 dot), symmetric int4/narrow int8 through the sign trick.
//   avx512vnni   K-major: strips of 64 columns; the codes of four consecutive k per column are
//                gathered into one 32-bit lane (a dword permute of each loaded row and two rounds of
//                byte/word unpacks) and multiplied by the activation quad with vpdpbusd.
//                Transposed: the avx2 code.
// Every path decodes a tile of codes (one block of the weight x a strip of columns) once, into a
// small buffer in L1, and then runs it against every row of x, up to 16 rows a call and more
// (speculative verification and small batches: rows for the price of one).
// Tested against the XLA reference and numpy's int64 arithmetic on every path
// (tests/quant/test_kernels_a8.py).

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

// A growable 64-byte-aligned scratch buffer (one per thread): decoded tiles of codes.
struct Scratch {
  void* data = nullptr;
  size_t size = 0;
  ~Scratch() { std::free(data); }
  template <typename T>
  T* get(size_t count) {
    const size_t bytes = (count * sizeof(T) + 63) / 64 * 64;
    if (bytes > size) {
      std::free(data);
      data = std::aligned_alloc(64, bytes);
      size = data ? bytes : 0;
    }
    return static_cast<T*>(data);
  }
};

struct A8 {
  int64_t M, K, N;
  bool transposed;
  int bits;
  int64_t group, groups;  // the activation block = the weight's group (or K)
  int64_t g0, g1;         // the band of blocks [g0, g1) this item sums
  const uint8_t* codes;
  const void* scale;
  Real scale_type;
  bool scale_per_tensor;
  const void* zero;  // nullptr: symmetric, z = 2^(bits-1)
  Real zero_type;
  int64_t KX;         // row stride of xq: K rounded up to 64, zero-padded
  const int8_t* xq;   // (M, KX)
  const float* d;     // (M, groups)
  const int32_t* xs;  // (M, groups)
  // the activations of each block regrouped for the SIMD paths, zero past the block's end:
  // element (m, g, j) of each is at [m * row + g * block + j]
  const uint16_t* xp2;   // bytes (xq[k], xq[k+1]) of pair j, k = k0 + 2j (int4: xq itself, blocks are even)
  int64_t xp2_row, xp2_block;
  const int32_t* xw2;    // the same pair as two int16 words (vpmaddwd; int8 on avx2 only)
  int64_t xw2_row, xw2_block;
  const int32_t* xq4;    // bytes xq[k .. k+3] of quad j, k = k0 + 4j (xq itself when blocks are whole quads)
  int64_t xq4_row, xq4_block;
  float* y;              // (M, N)
};

inline int64_t param_at(const A8& p, int64_t g, int64_t n) {
  return p.scale_per_tensor ? 0 : p.transposed ? n * p.groups + g : g * p.N + n;
}

inline int ucode(const A8& p, int64_t k, int64_t n) {
  if (p.transposed) {
    const int64_t row = (p.K * p.bits + 7) / 8;
    if (p.bits == 8) return p.codes[n * row + k];
    const uint8_t b = p.codes[n * row + (k >> 1)];
    return (k & 1) ? b >> 4 : b & 0xf;
  }
  if (p.bits == 8) return p.codes[k * p.N + n];
  const uint8_t b = p.codes[(k >> 1) * p.N + n];
  return (k & 1) ? b >> 4 : b & 0xf;
}

// acc[m * W + c] += d[m, g] * s[g, n0 + c] * (I - z X) for the integer sums isum[m * W + c] of block g.
void flush_scalar(const A8& p, int64_t g, int64_t n0, int64_t W, const int32_t* isum, float* acc, int64_t accW) {
  const int offset = 1 << (p.bits - 1);
  for (int64_t m = 0; m < p.M; ++m) {
    const float dm = p.d[m * p.groups + g];
    const int32_t xs = p.xs[m * p.groups + g];
    for (int64_t c = 0; c < W; ++c) {
      const int64_t at = param_at(p, g, n0 + c);
      const float s = load_real(p.scale, p.scale_type, at);
      const float v = p.zero ? float(isum[m * W + c]) - load_real(p.zero, p.zero_type, at) * float(xs)
                             : float(isum[m * W + c] - offset * xs);
      acc[m * accW + c] += dm * s * v;
    }
  }
}

// ------------------------------------------------------------------------------- scalar path

// Columns [c0, c1) of y (K-major or transposed), blocks [g0, g1), into acc (M x (c1 - c0)).
void columns_scalar(const A8& p, int64_t c0, int64_t c1, float* acc) {
  const int64_t W = c1 - c0;
  std::vector<int32_t> isum(p.M * W);
  std::vector<int> u(W);
  for (int64_t g = p.g0; g < p.g1; ++g) {
    const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
    std::fill(isum.begin(), isum.end(), 0);
    for (int64_t k = k0; k < k1; ++k) {
      for (int64_t c = 0; c < W; ++c) u[c] = ucode(p, k, c0 + c);
      for (int64_t m = 0; m < p.M; ++m) {
        const int xv = p.xq[m * p.KX + k];
        if (!xv) continue;
        int32_t* row = isum.data() + m * W;
        for (int64_t c = 0; c < W; ++c) row[c] += xv * u[c];
      }
    }
    flush_scalar(p, g, c0, W, isum.data(), acc, W);
  }
}

#ifdef CASCADE_X86

// Vectorized flush of 8 columns: acc8 += d * s * (I - z X).
AVX2_FN inline void flush8(const A8& p, int64_t g, int64_t n, int64_t m, __m256i isum, float* acc) {
  const float dm = p.d[m * p.groups + g];
  const int32_t xs = p.xs[m * p.groups + g];
  __m256 s, v;
  if (p.scale_per_tensor) s = _mm256_set1_ps(load_real(p.scale, p.scale_type, 0));
  else s = load8_real(p.scale, p.scale_type, g * p.N + n);
  if (p.zero) {
    const __m256 z = p.scale_per_tensor ? _mm256_set1_ps(load_real(p.zero, p.zero_type, 0))
                                        : load8_real(p.zero, p.zero_type, g * p.N + n);
    v = _mm256_fnmadd_ps(z, _mm256_set1_ps(float(xs)), _mm256_cvtepi32_ps(isum));
  } else {
    v = _mm256_cvtepi32_ps(_mm256_sub_epi32(isum, _mm256_set1_epi32((1 << (p.bits - 1)) * xs)));
  }
  const __m256 ds = _mm256_mul_ps(_mm256_set1_ps(dm), s);
  _mm256_storeu_ps(acc, _mm256_fmadd_ps(ds, v, _mm256_loadu_ps(acc)));
}

// Prefetch the codes of block g + 1 that the strip at columns [n, n + width) will read next (the
// rows of a block are short runs at a stride of N bytes, which the hardware prefetchers do not
// follow far enough ahead).
AVX2_FN inline void prefetch_next_block(const A8& p, int64_t g, int64_t n, int64_t width_bytes) {
  if (g + 1 >= p.g1) return;
  const int64_t k0 = (g + 1) * p.group, k1 = std::min(p.K, k0 + p.group);
  const int64_t r0 = p.bits == 4 ? k0 >> 1 : k0, r1 = p.bits == 4 ? (k1 + 1) >> 1 : k1;
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < width_bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(p.codes + r * p.N + n + b), _MM_HINT_T0);
}

// ---- avx2, K-major, int4: a strip of 32 columns [n, n + 32) of block g.
// Decoded per code row r: A = pairs of columns {0-7, 16-23}, B = {8-15, 24-31} (vpunpck*bw work
// within 128-bit lanes; the widening at the end puts the columns back in order).  Rows of x in
// blocks of MB: each decoded row of codes is loaded once per block and used for its MB rows.
template <int MB>
AVX2_FN void int4_rows(const A8& p, int64_t g, int64_t n, int64_t m0, float* acc, int64_t accW, const __m256i* buf,
                       int64_t rows) {
  alignas(32) int32_t s32[MB][32] = {};
  const int64_t stride = p.xp2_row;
  const uint16_t* xp = p.xp2 + m0 * stride + g * p.xp2_block;
  for (int64_t r = 0; r < rows; r += 8) {
    __m256i a[MB], b[MB];
    for (int i = 0; i < MB; ++i) a[i] = b[i] = _mm256_setzero_si256();
    const int64_t re = std::min(rows, r + 8);  // at most 8 x 3,810 in a 16-bit sum
    for (int64_t j = r; j < re; ++j) {
      const __m256i A = buf[2 * j], B = buf[2 * j + 1];
      for (int i = 0; i < MB; ++i) {
        const __m256i x = _mm256_set1_epi16(short(xp[i * stride + j]));
        a[i] = _mm256_add_epi16(a[i], _mm256_maddubs_epi16(A, x));
        b[i] = _mm256_add_epi16(b[i], _mm256_maddubs_epi16(B, x));
      }
    }
    for (int i = 0; i < MB; ++i) {
      __m256i* t = reinterpret_cast<__m256i*>(s32[i]);
      t[0] = _mm256_add_epi32(t[0], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(a[i])));       // 0-7
      t[1] = _mm256_add_epi32(t[1], _mm256_cvtepi16_epi32(_mm256_castsi256_si128(b[i])));       // 8-15
      t[2] = _mm256_add_epi32(t[2], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(a[i], 1)));  // 16-23
      t[3] = _mm256_add_epi32(t[3], _mm256_cvtepi16_epi32(_mm256_extracti128_si256(b[i], 1)));  // 24-31
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int c = 0; c < 4; ++c)
      flush8(p, g, n + 8 * c, m0 + i, _mm256_load_si256(reinterpret_cast<const __m256i*>(s32[i] + 8 * c)),
             acc + (m0 + i) * accW + 8 * c);
}

AVX2_FN void strip32_int4(const A8& p, int64_t g, int64_t n, float* acc, int64_t accW, __m256i* buf) {
  const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
  const int64_t r0 = k0 >> 1, r1 = (k1 + 1) >> 1, rows = r1 - r0;
  const __m256i low = _mm256_set1_epi8(0x0f);
  prefetch_next_block(p, g, n, 32);
  for (int64_t r = 0; r < rows; ++r) {
    const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.codes + (r0 + r) * p.N + n));
    const __m256i lo = _mm256_and_si256(c, low), hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
    buf[2 * r] = _mm256_unpacklo_epi8(lo, hi);
    buf[2 * r + 1] = _mm256_unpackhi_epi8(lo, hi);
  }
  int64_t m0 = 0;
  for (; m0 + 4 <= p.M; m0 += 4) int4_rows<4>(p, g, n, m0, acc, accW, buf, rows);
  switch (p.M - m0) {
    case 3: int4_rows<3>(p, g, n, m0, acc, accW, buf, rows); break;
    case 2: int4_rows<2>(p, g, n, m0, acc, accW, buf, rows); break;
    case 1: int4_rows<1>(p, g, n, m0, acc, accW, buf, rows); break;
    default: break;
  }
}

// ---- avx2, K-major, int8: a strip of 32 columns; pairs of code rows (k, k + 1) widened to 16 bits
// and interleaved: E0 = columns {0-3, 8-11}, E1 = {4-7, 12-15}, E2 = {16-19, 24-27}, E3 = {20-23, 28-31}.
template <int MB>
AVX2_FN void int8_rows(const A8& p, int64_t g, int64_t n, int64_t m0, float* acc, int64_t accW, const __m256i* buf,
                       int64_t pairs) {
  const int64_t stride = p.xw2_row;
  const int32_t* xw = p.xw2 + m0 * stride + g * p.xw2_block;
  __m256i e[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) e[i][j] = _mm256_setzero_si256();
  for (int64_t q = 0; q < pairs; ++q) {
    const __m256i b0 = buf[4 * q], b1 = buf[4 * q + 1], b2 = buf[4 * q + 2], b3 = buf[4 * q + 3];
    for (int i = 0; i < MB; ++i) {
      const __m256i x = _mm256_set1_epi32(xw[i * stride + q]);
      e[i][0] = _mm256_add_epi32(e[i][0], _mm256_madd_epi16(b0, x));
      e[i][1] = _mm256_add_epi32(e[i][1], _mm256_madd_epi16(b1, x));
      e[i][2] = _mm256_add_epi32(e[i][2], _mm256_madd_epi16(b2, x));
      e[i][3] = _mm256_add_epi32(e[i][3], _mm256_madd_epi16(b3, x));
    }
  }
  for (int i = 0; i < MB; ++i) {
    float* a = acc + (m0 + i) * accW;
    flush8(p, g, n, m0 + i, _mm256_permute2x128_si256(e[i][0], e[i][1], 0x20), a);
    flush8(p, g, n + 8, m0 + i, _mm256_permute2x128_si256(e[i][0], e[i][1], 0x31), a + 8);
    flush8(p, g, n + 16, m0 + i, _mm256_permute2x128_si256(e[i][2], e[i][3], 0x20), a + 16);
    flush8(p, g, n + 24, m0 + i, _mm256_permute2x128_si256(e[i][2], e[i][3], 0x31), a + 24);
  }
}

AVX2_FN void strip32_int8(const A8& p, int64_t g, int64_t n, float* acc, int64_t accW, __m256i* buf) {
  const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
  const int64_t pairs = (k1 - k0 + 1) / 2;
  prefetch_next_block(p, g, n, 32);
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t k = k0 + 2 * i;
    const uint8_t* r0 = p.codes + k * p.N + n;
    const uint8_t* r1 = p.codes + std::min(k + 1, k1 - 1) * p.N + n;  // a lone last row: x is zero there
    const __m256i a0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0)));
    const __m256i a1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)));
    const __m256i b0 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0 + 16)));
    const __m256i b1 = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r1 + 16)));
    buf[4 * i] = _mm256_unpacklo_epi16(a0, a1);
    buf[4 * i + 1] = _mm256_unpackhi_epi16(a0, a1);
    buf[4 * i + 2] = _mm256_unpacklo_epi16(b0, b1);
    buf[4 * i + 3] = _mm256_unpackhi_epi16(b0, b1);
  }
  int64_t m0 = 0;
  for (; m0 + 2 <= p.M; m0 += 2) int8_rows<2>(p, g, n, m0, acc, accW, buf, pairs);
  if (m0 < p.M) int8_rows<1>(p, g, n, m0, acc, accW, buf, pairs);
}

// ---- avx512 vnni, K-major: a strip of 64 columns; quads of k per column in 32-bit lanes.
// Each loaded 64-byte row is dword-permuted (lane l <- dwords l, 4 + l, 8 + l, 12 + l), so that after
// the byte and word unpacks (which work within 128-bit lanes) Q0..Q3 hold columns 0-15, 16-31,
// 32-47, 48-63 in order, each lane (u[k], u[k+1], u[k+2], u[k+3]).
AVX512_FN inline __m512i permute_rows(const uint8_t* at) {
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_epi32(idx, _mm512_loadu_si512(at));
}

AVX512_FN inline __m512 load16_real(const void* p, Real t, int64_t i) {
  switch (t) {
    case Real::kF32: return _mm512_loadu_ps(static_cast<const float*>(p) + i);
    case Real::kF16:
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)));
    case Real::kBF16: {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
  return _mm512_setzero_ps();
}

// acc16 += d * s * (I - z X) for 16 columns.
AVX512_FN inline void flush16(const A8& p, int64_t g, int64_t n, int64_t m, __m512i isum, float* acc) {
  const float dm = p.d[m * p.groups + g];
  const int32_t xs = p.xs[m * p.groups + g];
  __m512 s, v;
  if (p.scale_per_tensor) s = _mm512_set1_ps(load_real(p.scale, p.scale_type, 0));
  else s = load16_real(p.scale, p.scale_type, g * p.N + n);
  if (p.zero) {
    const __m512 z = p.scale_per_tensor ? _mm512_set1_ps(load_real(p.zero, p.zero_type, 0))
                                        : load16_real(p.zero, p.zero_type, g * p.N + n);
    v = _mm512_fnmadd_ps(z, _mm512_set1_ps(float(xs)), _mm512_cvtepi32_ps(isum));
  } else {
    v = _mm512_cvtepi32_ps(_mm512_sub_epi32(isum, _mm512_set1_epi32((1 << (p.bits - 1)) * xs)));
  }
  const __m512 ds = _mm512_mul_ps(_mm512_set1_ps(dm), s);
  _mm512_storeu_ps(acc, _mm512_fmadd_ps(ds, v, _mm512_loadu_ps(acc)));
}

template <int MB>
AVX512_FN void vnni_rows(const A8& p, int64_t g, int64_t n, int64_t m0, float* acc, int64_t accW, const __m512i* buf,
                         int64_t quads) {
  const int64_t stride = p.xq4_row;
  const int32_t* xq = p.xq4 + m0 * stride + g * p.xq4_block;
  __m512i e[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) e[i][j] = _mm512_setzero_si512();
  for (int64_t q = 0; q < quads; ++q) {
    const __m512i b0 = buf[4 * q], b1 = buf[4 * q + 1], b2 = buf[4 * q + 2], b3 = buf[4 * q + 3];
    for (int i = 0; i < MB; ++i) {
      const __m512i x = _mm512_set1_epi32(xq[i * stride + q]);
      e[i][0] = _mm512_dpbusd_epi32(e[i][0], b0, x);
      e[i][1] = _mm512_dpbusd_epi32(e[i][1], b1, x);
      e[i][2] = _mm512_dpbusd_epi32(e[i][2], b2, x);
      e[i][3] = _mm512_dpbusd_epi32(e[i][3], b3, x);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) flush16(p, g, n + 16 * j, m0 + i, e[i][j], acc + (m0 + i) * accW + 16 * j);
}

AVX512_FN void strip64_vnni(const A8& p, int64_t g, int64_t n, float* acc, int64_t accW, __m512i* buf) {
  const int64_t k0 = g * p.group, k1 = std::min(p.K, k0 + p.group);
  const int64_t quads = (k1 - k0 + 3) / 4;
  const __m512i low = _mm512_set1_epi8(0x0f);
  prefetch_next_block(p, g, n, 64);
  for (int64_t i = 0; i < quads; ++i) {
    const int64_t k = k0 + 4 * i;
    __m512i p0, p1, q0, q1;  // word pairs of (k, k+1) and of (k+2, k+3), columns in lane order
    if (p.bits == 4) {
      const int64_t r = k >> 1, rlast = ((k1 + 1) >> 1) - 1;
      const __m512i a = permute_rows(p.codes + r * p.N + n);
      const __m512i b = permute_rows(p.codes + std::min(r + 1, rlast) * p.N + n);
      const __m512i alo = _mm512_and_si512(a, low), ahi = _mm512_and_si512(_mm512_srli_epi16(a, 4), low);
      const __m512i blo = _mm512_and_si512(b, low), bhi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
      p0 = _mm512_unpacklo_epi8(alo, ahi);
      p1 = _mm512_unpackhi_epi8(alo, ahi);
      q0 = _mm512_unpacklo_epi8(blo, bhi);
      q1 = _mm512_unpackhi_epi8(blo, bhi);
    } else {
      const __m512i r0 = permute_rows(p.codes + k * p.N + n);
      const __m512i r1 = permute_rows(p.codes + std::min(k + 1, k1 - 1) * p.N + n);
      const __m512i r2 = permute_rows(p.codes + std::min(k + 2, k1 - 1) * p.N + n);
      const __m512i r3 = permute_rows(p.codes + std::min(k + 3, k1 - 1) * p.N + n);
      p0 = _mm512_unpacklo_epi8(r0, r1);
      p1 = _mm512_unpackhi_epi8(r0, r1);
      q0 = _mm512_unpacklo_epi8(r2, r3);
      q1 = _mm512_unpackhi_epi8(r2, r3);
    }
    buf[4 * i] = _mm512_unpacklo_epi16(p0, q0);
    buf[4 * i + 1] = _mm512_unpackhi_epi16(p0, q0);
    buf[4 * i + 2] = _mm512_unpacklo_epi16(p1, q1);
    buf[4 * i + 3] = _mm512_unpackhi_epi16(p1, q1);
  }
  int64_t m0 = 0;
  for (; m0 + 4 <= p.M; m0 += 4) vnni_rows<4>(p, g, n, m0, acc, accW, buf, quads);
  switch (p.M - m0) {
    case 3: vnni_rows<3>(p, g, n, m0, acc, accW, buf, quads); break;
    case 2: vnni_rows<2>(p, g, n, m0, acc, accW, buf, quads); break;
    case 1: vnni_rows<1>(p, g, n, m0, acc, accW, buf, quads); break;
    default: break;
  }
}

// Columns [c0, c1) of a K-major weight, blocks [g0, g1): strips of 64 (vnni), then 32 (avx2), the
// rest scalar.
AVX2_FN void columns_kmajor_avx2(const A8& p, int64_t c0, int64_t c1, float* acc, bool vnni) {
  const int64_t W = c1 - c0;
  const int64_t tile_rows = p.bits == 4 ? (p.group + 1) / 2 : p.group;  // code rows of one block at most
  thread_local Scratch scratch;
  int64_t c = c0;
  if (vnni && W >= 64) {
    __m512i* buf = scratch.get<__m512i>(4 * ((p.group + 3) / 4));
    const int64_t c64 = c0 + W / 64 * 64;
    for (int64_t g = p.g0; g < p.g1; ++g)
      for (int64_t n = c0; n < c64; n += 64) strip64_vnni(p, g, n, acc + (n - c0), W, buf);
    c = c64;
  }
  if (c1 - c >= 32) {
    __m256i* buf = scratch.get<__m256i>(p.bits == 4 ? 2 * tile_rows : 4 * ((p.group + 1) / 2));
    const int64_t c32 = c + (c1 - c) / 32 * 32;
    for (int64_t g = p.g0; g < p.g1; ++g)
      for (int64_t n = c; n < c32; n += 32) {
        if (p.bits == 4) strip32_int4(p, g, n, acc + (n - c0), W, buf);
        else strip32_int8(p, g, n, acc + (n - c0), W, buf);
      }
    c = c32;
  }
  if (c < c1) {
    std::vector<float> tail(p.M * (c1 - c), 0.f);
    columns_scalar(p, c, c1, tail.data());
    for (int64_t m = 0; m < p.M; ++m)
      for (int64_t i = 0; i < c1 - c; ++i) acc[m * W + (c - c0) + i] += tail[m * (c1 - c) + i];
  }
}

// ---- avx2, transposed (a tied head): per output n, 32 code bytes at a time against 32 activation
// bytes.  int4: 32 bytes = 64 values of K, two blocks of 32 (or halves of a larger block); the
// activations are split into even and odd k (xe, xo) once per call.  int8: 32 bytes = 32 values.
// Symmetric int4 and narrow int8 use signed codes (v = u - 2^(bits-1), never -128) through the sign
// trick (|x| as the unsigned operand), so the integer sums are I - z X directly; asymmetric int4 uses
// the unsigned codes; asymmetric and full-grid int8 split each code into nibbles (u = 16 uh + ul) so
// that no 16-bit sum saturates, and subtract z X in float32 per block.
struct Transposed {
  int64_t chunks;                      // 32-byte chunks of a row of codes
  std::vector<int8_t> xa, xb;          // 32 bytes per row m and chunk: int4: xe and xo; int8: xq (xb unused)
  std::vector<int8_t> xabs_a, xabs_b;  // |x| of the same (sign trick)
  std::vector<float> dv;               // 8 per row m and chunk: d of the chunk's two halves (int4) / of the chunk
  std::vector<float> dxs;              // (M, groups): d * X, for the float correction
};

AVX2_FN inline __m256i load256(const void* at) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(at)); }
AVX2_FN inline void store256(void* at, __m256i v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), v); }

AVX2_FN void prepare_transposed(const A8& p, Transposed& t) {
  const int64_t bytes = (p.K * p.bits + 7) / 8;
  t.chunks = bytes / 32;
  t.xa.resize(32 * p.M * t.chunks);
  t.xb.resize(32 * p.M * t.chunks);
  t.xabs_a.resize(32 * p.M * t.chunks);
  t.xabs_b.resize(32 * p.M * t.chunks);
  t.dv.resize(8 * p.M * t.chunks);
  t.dxs.resize(p.M * p.groups);
  alignas(32) int8_t e[32], o[32];
  for (int64_t m = 0; m < p.M; ++m) {
    const int8_t* x = p.xq + m * p.KX;
    for (int64_t i = 0; i < t.chunks; ++i) {
      __m256i a, b = _mm256_setzero_si256();
      if (p.bits == 4) {
        for (int j = 0; j < 32; ++j) e[j] = x[64 * i + 2 * j], o[j] = x[64 * i + 2 * j + 1];
        a = load256(e);
        b = load256(o);
      } else {
        a = load256(x + 32 * i);
      }
      const int64_t at = 32 * (m * t.chunks + i);
      store256(&t.xa[at], a);
      store256(&t.xb[at], b);
      store256(&t.xabs_a[at], _mm256_abs_epi8(a));
      store256(&t.xabs_b[at], _mm256_abs_epi8(b));
      const int64_t klo = p.bits == 4 ? 64 * i : 32 * i, khi = p.bits == 4 ? 64 * i + 32 : 32 * i;
      const float dlo = p.d[m * p.groups + klo / p.group], dhi = p.d[m * p.groups + khi / p.group];
      _mm256_storeu_ps(&t.dv[8 * (m * t.chunks + i)], _mm256_setr_ps(dlo, dlo, dlo, dlo, dhi, dhi, dhi, dhi));
    }
    for (int64_t g = 0; g < p.groups; ++g)
      t.dxs[m * p.groups + g] = p.d[m * p.groups + g] * float(p.xs[m * p.groups + g]);
  }
}

template <int BITS, bool SIGNED>
AVX2_FN void transposed_row(const A8& p, const Transposed& t, int64_t n) {
  const int64_t bytes = (p.K * BITS + 7) / 8;
  const uint8_t* row = p.codes + n * bytes;
  const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
  const __m256i bias = _mm256_set1_epi8(char(BITS == 4 ? 8 : 0x80));
  constexpr int kMaxM = 16;
  for (int64_t m0 = 0; m0 < p.M; m0 += kMaxM) {
    const int64_t mb = std::min<int64_t>(kMaxM, p.M - m0);
    __m256 acc[kMaxM];
    for (int64_t m = 0; m < mb; ++m) acc[m] = _mm256_setzero_ps();
    for (int64_t i = 0; i < t.chunks; ++i) {
      const __m256i c = load256(row + 32 * i);
      __m256 sv;
      if (BITS == 4) {
        const int64_t glo = 64 * i / p.group, ghi = (64 * i + 32) / p.group;
        const float slo = load1_real(p.scale, p.scale_type, param_at(p, glo, n));
        const float shi = load1_real(p.scale, p.scale_type, param_at(p, ghi, n));
        sv = _mm256_set_m128(_mm_set1_ps(shi), _mm_set1_ps(slo));
      } else {
        sv = _mm256_set1_ps(load1_real(p.scale, p.scale_type, param_at(p, 32 * i / p.group, n)));
      }
      __m256i lo, hi;  // int4: even / odd k; int8: the codes (signed) or their nibbles (unsigned)
      if (BITS == 4) {
        lo = _mm256_and_si256(c, low);
        hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
        if (SIGNED) lo = _mm256_sub_epi8(lo, bias), hi = _mm256_sub_epi8(hi, bias);
      } else if (SIGNED) {
        lo = _mm256_xor_si256(c, bias);
        hi = lo;
      } else {
        lo = _mm256_and_si256(c, low);
        hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low);
      }
      for (int64_t m = 0; m < mb; ++m) {
        const int64_t at = (m0 + m) * t.chunks + i;
        const __m256i xa = load256(&t.xa[32 * at]), xb = load256(&t.xb[32 * at]);
        const __m256i xabs_a = load256(&t.xabs_a[32 * at]), xabs_b = load256(&t.xabs_b[32 * at]);
        __m256i s;
        if (BITS == 4 && SIGNED) {
          const __m256i pa = _mm256_maddubs_epi16(xabs_a, _mm256_sign_epi8(lo, xa));
          const __m256i pb = _mm256_maddubs_epi16(xabs_b, _mm256_sign_epi8(hi, xb));
          s = _mm256_madd_epi16(_mm256_add_epi16(pa, pb), ones);
        } else if (BITS == 4) {
          s = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xa), _mm256_maddubs_epi16(hi, xb)), ones);
        } else if (SIGNED) {
          s = _mm256_madd_epi16(_mm256_maddubs_epi16(xabs_a, _mm256_sign_epi8(lo, xa)), ones);
        } else {
          const __m256i sl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xa), ones);
          const __m256i sh = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xa), ones);
          s = _mm256_add_epi32(sl, _mm256_slli_epi32(sh, 4));
        }
        acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(s), _mm256_loadu_ps(&t.dv[8 * at])), sv, acc[m]);
      }
    }
    for (int64_t m = 0; m < mb; ++m) {
      __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[m]), _mm256_extractf128_ps(acc[m], 1));
      h = _mm_add_ps(h, _mm_movehl_ps(h, h));
      h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
      float y = _mm_cvtss_f32(h);
      if (!SIGNED) {  // subtract sum_g s z d X
        const float* dxs = t.dxs.data() + (m0 + m) * p.groups;
        const float offset = float(1 << (BITS - 1));
        float corr = 0.f;
        for (int64_t g = 0; g < p.groups; ++g) {
          const int64_t at = param_at(p, g, n);
          const float z = p.zero ? load1_real(p.zero, p.zero_type, at) : offset;
          corr += load1_real(p.scale, p.scale_type, at) * z * dxs[g];
        }
        y -= corr;
      }
      p.y[(m0 + m) * p.N + n] = y;
    }
  }
}

AVX2_FN void columns_transposed_avx2(const A8& p, const Transposed& t, int64_t c0, int64_t c1) {
  const bool narrow8 = p.bits == 8 && !p.zero;  // the wrapper passes full-grid int8 with zero = its offset 128
  for (int64_t n = c0; n < c1; ++n) {
    if (p.bits == 4) {
      if (p.zero) transposed_row<4, false>(p, t, n);
      else transposed_row<4, true>(p, t, n);
    } else if (narrow8) {
      transposed_row<8, true>(p, t, n);
    } else {
      transposed_row<8, false>(p, t, n);
    }
  }
}

#endif  // CASCADE_X86

// xq = clip(round_half_even(v / d), +-127) for one value: the reference's float32 operations.
inline int quantize_one(float v, float d) { return int(std::min(127.f, std::max(-127.f, std::nearbyint(v / d)))); }

// One block of activations, portable: d = max|x| / 127 (1 for zeros), q, X = sum q.
void quantize_block_scalar(const float* x, int64_t n, int8_t* q, float* d_out, int32_t* sum_out) {
  float amax = 0.f;
  for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(x[k]));
  const float d = amax > 0.f ? amax / 127.f : 1.f;
  int32_t sum = 0;
  for (int64_t k = 0; k < n; ++k) sum += q[k] = int8_t(quantize_one(x[k], d));
  *d_out = d;
  *sum_out = sum;
}

#ifdef CASCADE_X86
// One block of activations: d = max|x| / 127 (1 for zeros), q = clip(round_half_even(x / d), +-127),
// X = sum q; the same float32 operations as the scalar code (a true division, not a reciprocal).
AVX2_FN void quantize_block_avx2(const float* x, int64_t n, int8_t* q, float* d_out, int32_t* sum_out) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 vmax = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(abs_mask, _mm256_loadu_ps(x + k)));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, vmax);
  float amax = 0.f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
  for (int64_t j = k; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax > 0.f ? amax / 127.f : 1.f;
  const __m256 dv = _mm256_set1_ps(d), hi = _mm256_set1_ps(127.f), lo = _mm256_set1_ps(-127.f);
  __m256i vsum = _mm256_setzero_si256();
  alignas(32) int32_t ints[8];
  for (k = 0; k + 8 <= n; k += 8) {
    __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + k), dv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i c = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
    vsum = _mm256_add_epi32(vsum, c);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ints), c);
    for (int i = 0; i < 8; ++i) q[k + i] = int8_t(ints[i]);
  }
  _mm256_store_si256(reinterpret_cast<__m256i*>(ints), vsum);
  int32_t sum = 0;
  for (int i = 0; i < 8; ++i) sum += ints[i];
  for (; k < n; ++k) sum += q[k] = int8_t(quantize_one(x[k], d));
  *d_out = d;
  *sum_out = sum;
}

AVX2_FN int64_t sum_bands_avx2(const float* partial, int64_t bands, int64_t mn, float* y) {
  int64_t i = 0;
  for (; i + 8 <= mn; i += 8) {
    __m256 s = _mm256_loadu_ps(partial + i);
    for (int64_t b = 1; b < bands; ++b) s = _mm256_add_ps(s, _mm256_loadu_ps(partial + b * mn + i));
    _mm256_storeu_ps(y + i, s);
  }
  return i;
}

#endif  // CASCADE_X86

// One weight of a call: its problem and how its items split it.
struct Part {
  A8 problem;
  int64_t width = 0, col_chunks = 0, bands = 1, first = 0;  // first: the index of its first item
  float* partial = nullptr;  // (bands, M, N) when bands > 1
};

// A call: one or several weights that multiply the same x (q/k/v, gate/up: fewer calls per layer),
// as one job whose items are (weight, band, column chunk).
struct Shared : Job {
  std::vector<Part> parts;
  Isa path;
#ifdef CASCADE_X86
  const Transposed* transposed = nullptr;
#endif
  void item(int64_t i) override {
    size_t w = 0;
    while (w + 1 < parts.size() && i >= parts[w + 1].first) ++w;
    const Part& part = parts[w];
    i -= part.first;
    const int64_t band = i / part.col_chunks, c0 = (i % part.col_chunks) * part.width;
    A8 p = part.problem;
    const int64_t c1 = std::min(p.N, c0 + part.width);
#ifdef CASCADE_X86
    if (p.transposed && path != Isa::kScalar) {
      columns_transposed_avx2(p, *transposed, c0, c1);
      return;
    }
#endif
    float* out = p.y;
    if (part.bands > 1) {
      p.g0 = band * p.groups / part.bands;
      p.g1 = (band + 1) * p.groups / part.bands;
      out = part.partial + band * p.M * p.N;
    }
    thread_local std::vector<float> acc;
    const int64_t W = c1 - c0;
    acc.assign(p.M * W, 0.f);
#ifdef CASCADE_X86
    if (path != Isa::kScalar) columns_kmajor_avx2(p, c0, c1, acc.data(), path == Isa::kAVX512VNNI);
    else columns_scalar(p, c0, c1, acc.data());
#else
    columns_scalar(p, c0, c1, acc.data());
#endif
    for (int64_t m = 0; m < p.M; ++m) std::copy(acc.data() + m * W, acc.data() + (m + 1) * W, out + m * p.N + c0);
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

// Check one weight against x (M, K) and fill its problem (everything but the activations).
ffi::Error describe(int64_t M, int64_t K, ffi::Buffer<ffi::U8> codes, ffi::AnyBuffer scale, ffi::AnyBuffer zero,
                    ffi::Result<ffi::AnyBuffer>& y, int64_t bits, int64_t group, bool has_zero, bool transposed,
                    Real x_type, A8* out) {
  const auto cd = codes.dimensions(), sd = scale.dimensions(), yd = y->dimensions();
  if (cd.size() != 2 || sd.size() != 2 || yd.size() != 2)
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8: x, codes, scale and y must be 2-D");
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("cascade_qmatmul_a8: bits must be 4 or 8");
  A8 p{};
  p.M = M;
  p.K = K;
  p.transposed = transposed;
  p.N = transposed ? cd[0] : cd[1];
  p.bits = int(bits);
  p.group = std::min(group, p.K);
  if (group <= 0 || (bits == 4 && p.group % 2 && p.group < p.K))
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8: bad group size");
  p.groups = p.K ? (p.K + p.group - 1) / p.group : 0;
  p.g0 = 0;
  p.g1 = p.groups;
  const int64_t code_bytes = (p.K * bits + 7) / 8;
  if ((transposed ? cd[1] : cd[0]) != code_bytes || yd[0] != p.M || yd[1] != p.N)
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8: shapes do not match");
  p.scale_per_tensor = sd[0] == 1 && sd[1] == 1 && !(p.groups == 1 && p.N == 1);
  const int64_t want0 = transposed ? p.N : p.groups, want1 = transposed ? p.groups : p.N;
  if (!p.scale_per_tensor && (sd[0] != want0 || sd[1] != want1))
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8: scale shape does not match the groups");
  Real y_type;
  if (!real_type(y->element_type(), &y_type) || y_type != x_type || !real_type(scale.element_type(), &p.scale_type))
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8: unsupported dtypes");
  p.codes = codes.typed_data();
  p.scale = scale.untyped_data();
  if (has_zero) {
    if (!real_type(zero.element_type(), &p.zero_type) || zero.element_count() != scale.element_count())
      return ffi::Error::InvalidArgument("cascade_qmatmul_a8: zero must match scale");
    p.zero = zero.untyped_data();
  }
  *out = p;
  return ffi::Error::Success();
}

// Quantize x once and run every weight of the call; outs[i]: where weight i's float32 result goes.
void run_call(std::vector<A8>& ps, const void* xdata, Real x_type, const std::vector<float*>& outs) {
  A8& p0 = ps[0];
  const int64_t M = p0.M, K = p0.K, group = p0.group, groups = p0.groups;
  // the activations, quantized per block exactly as the reference does (thread-local buffers,
  // reused from call to call)
  thread_local Scratch s_xq, s_d, s_xs, s_regroup, s_regroup4, s_partial, s_row;
  const Isa path = isa();
  const int64_t KX = (K + 63) / 64 * 64;
  int8_t* xq = s_xq.get<int8_t>(M * KX + 64);  // + 64: reads of a quad past K stay inside
  float* d = s_d.get<float>(M * groups);
  int32_t* xs = s_xs.get<int32_t>(M * groups);
  const float* xf32 = x_type == Real::kF32 ? static_cast<const float*>(xdata) : nullptr;
  const uint16_t* xbf = static_cast<const uint16_t*>(xdata);
  float* row = s_row.get<float>(K);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = xf32 ? xf32 + m * K : row;
    if (!xf32)
      for (int64_t k = 0; k < K; ++k) row[k] = bf16_to_float(xbf[m * K + k]);
    int8_t* q = xq + m * KX;
    std::memset(q + K, 0, KX - K + (m == M - 1 ? 64 : 0));
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
#ifdef CASCADE_X86
      if (path != Isa::kScalar) {
        quantize_block_avx2(xr + k0, k1 - k0, q + k0, &d[m * groups + g], &xs[m * groups + g]);
        continue;
      }
#endif
      quantize_block_scalar(xr + k0, k1 - k0, q + k0, &d[m * groups + g], &xs[m * groups + g]);
    }
  }
  // the pairs and quads the SIMD paths read: views of xq where blocks are whole pairs / quads
  // (every int4 block is, and blocks of a multiple of 4), regrouped with zeros otherwise
  A8 xv{};
  const bool one_block = groups == 1;
  xv.xp2 = reinterpret_cast<const uint16_t*>(xq);
  xv.xp2_row = KX / 2;
  xv.xp2_block = group / 2;
  if (group % 4 == 0 || one_block) {
    xv.xq4 = reinterpret_cast<const int32_t*>(xq);
    xv.xq4_row = KX / 4;
    xv.xq4_block = group / 4;
  }
  bool need_w2 = false;  // avx2 int8 strips: also the vnni path's column tails
  for (const A8& p : ps) need_w2 |= path != Isa::kScalar && p.bits == 8 && !p.transposed;
  const bool need_q4 = path == Isa::kAVX512VNNI && !p0.transposed && !(group % 4 == 0 || one_block);
  for (const bool w2 : {true, false}) {
    if (w2 ? !need_w2 : !need_q4) continue;
    const int64_t per = w2 ? (group + 1) / 2 : (group + 3) / 4;
    int32_t* out = (w2 ? s_regroup : s_regroup4).get<int32_t>(M * groups * per);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k0 = g * group, k1 = std::min(K, k0 + group);
        const int8_t* xm = xq + m * KX;
        auto at = [&](int64_t k) { return k < k1 ? int(xm[k]) : 0; };
        int32_t* o = out + (m * groups + g) * per;
        for (int64_t j = 0; j < per; ++j) {
          if (w2) {
            const int64_t k = k0 + 2 * j;
            o[j] = int32_t(uint32_t(uint16_t(int16_t(at(k)))) | (uint32_t(uint16_t(int16_t(at(k + 1)))) << 16));
          } else {
            const int64_t k = k0 + 4 * j;
            o[j] = int32_t(uint32_t(uint8_t(at(k))) | (uint32_t(uint8_t(at(k + 1))) << 8) |
                           (uint32_t(uint8_t(at(k + 2))) << 16) | (uint32_t(uint8_t(at(k + 3))) << 24));
          }
        }
      }
    if (w2) xv.xw2 = out, xv.xw2_row = groups * per, xv.xw2_block = per;
    else xv.xq4 = out, xv.xq4_row = groups * per, xv.xq4_block = per;
  }

  auto shared = std::make_shared<Shared>();
  shared->path = path;
#ifdef CASCADE_X86
  Transposed t;
  if (p0.transposed && path != Isa::kScalar) {
    // the transposed avx2 path takes whole 32-byte chunks and blocks of a multiple of 32 values
    if (!(group % 32 == 0 && (p0.bits == 8 ? K % 32 : K % 64) == 0)) shared->path = Isa::kScalar;
  }
#endif
  int64_t workers = 1 + SpinPool::get().helpers();
  int64_t work = 0;
  for (const A8& p : ps) work += p.M * p.K * p.N;
  if (work < (int64_t(1) << 18)) workers = 1;
  int64_t partial_floats = 0;
  for (size_t i = 0; i < ps.size(); ++i) {
    A8& p = ps[i];
    p.KX = KX, p.xq = xq, p.d = d, p.xs = xs;
    p.xp2 = xv.xp2, p.xp2_row = xv.xp2_row, p.xp2_block = xv.xp2_block;
    p.xq4 = xv.xq4, p.xq4_row = xv.xq4_row, p.xq4_block = xv.xq4_block;
    p.xw2 = xv.xw2, p.xw2_row = xv.xw2_row, p.xw2_block = xv.xw2_block;
    p.y = outs[i];
    Part part;
    part.problem = p;
    // bands (a split of K, whose partial sums are added at the end) as a call of this weight alone
    // with any number of rows would split it: decided by K and N only, never by M, so each row's
    // result is the same whether it comes alone or with others (a fused call, a batch, or the k + 1
    // rows of a speculative verification against the one-row decode step: greedy stays exact)
    const int64_t threads = 1 + SpinPool::get().helpers();
    if (threads > 1 && p.K * p.N >= (int64_t(1) << 18) && !p.transposed && p.groups >= 2 * threads &&
        p.M * p.N * 2 * threads <= (int64_t(1) << 22)) {
      part.bands = 2 * threads;
      part.width = (p.N + 63) / 64 * 64;  // whole rows: each band streams one contiguous run of codes
      partial_floats += part.bands * p.M * p.N;
    } else {
      const int64_t per = (p.N + 2 * workers - 1) / (2 * workers);
      part.width = std::max<int64_t>(64, std::min(kMaxChunk, (per + 63) / 64 * 64));
    }
    part.col_chunks = (p.N + part.width - 1) / part.width;
    part.first = shared->items;
    shared->items += part.bands * part.col_chunks;
    shared->parts.push_back(part);
  }
  float* partial = partial_floats ? s_partial.get<float>(partial_floats) : nullptr;  // every item writes all its columns
  for (Part& part : shared->parts)
    if (part.bands > 1) {
      part.partial = partial;
      partial += part.bands * part.problem.M * part.problem.N;
    }
#ifdef CASCADE_X86
  if (p0.transposed && shared->path != Isa::kScalar) {
    prepare_transposed(shared->parts[0].problem, t);
    shared->transposed = &t;
  }
#endif
  run_job(shared, workers);
  for (const Part& part : shared->parts) {
    if (part.bands <= 1) continue;
    const int64_t mn = part.problem.M * part.problem.N;
    int64_t i = 0;
#ifdef CASCADE_X86
    if (path != Isa::kScalar) i = sum_bands_avx2(part.partial, part.bands, mn, part.problem.y);
#endif
    for (; i < mn; ++i) {
      float s = 0.f;
      for (int64_t b = 0; b < part.bands; ++b) s += part.partial[b * mn + i];
      part.problem.y[i] = s;
    }
  }
}

bool x_type_of(ffi::AnyBuffer x, Real* out) { return real_type(x.element_type(), out) && *out != Real::kF16; }

ffi::Error QMatmulA8Impl(ffi::AnyBuffer x, ffi::Buffer<ffi::U8> codes, ffi::AnyBuffer scale, ffi::AnyBuffer zero,
                         ffi::Result<ffi::AnyBuffer> y, int64_t bits, int64_t group, bool has_zero, bool transposed) {
  const auto xd = x.dimensions();
  Real x_type;
  if (xd.size() != 2) return ffi::Error::InvalidArgument("cascade_qmatmul_a8: x must be 2-D");
  if (!x_type_of(x, &x_type)) return ffi::Error::InvalidArgument("cascade_qmatmul_a8: unsupported dtypes");
  std::vector<A8> ps(1);
  ffi::Error err = describe(xd[0], xd[1], codes, scale, zero, y, bits, group, has_zero, transposed, x_type, &ps[0]);
  if (err.failure()) return err;
  const A8& p = ps[0];
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  std::vector<float> yf;
  float* yout = x_type == Real::kF32 ? static_cast<float*>(y->untyped_data()) : (yf.resize(p.M * p.N), yf.data());
  if (p.K == 0) std::fill(yout, yout + p.M * p.N, 0.f);
  else run_call(ps, x.untyped_data(), x_type, {yout});
  if (x_type == Real::kBF16) {
    uint16_t* yh = static_cast<uint16_t*>(y->untyped_data());
    for (int64_t i = 0; i < p.M * p.N; ++i) yh[i] = float_to_bf16(yf[i]);
  }
  return ffi::Error::Success();
}

// Several weights of the same bits, group and zero-point kind against one x: arguments x, then
// (codes, scale, zero) per weight; one result per weight.
ffi::Error QMatmulA8ManyImpl(ffi::AnyBuffer x, ffi::RemainingArgs args, ffi::RemainingRets rets, int64_t bits,
                             int64_t group, bool has_zero) {
  const auto xd = x.dimensions();
  Real x_type;
  if (xd.size() != 2) return ffi::Error::InvalidArgument("cascade_qmatmul_a8_many: x must be 2-D");
  if (!x_type_of(x, &x_type)) return ffi::Error::InvalidArgument("cascade_qmatmul_a8_many: unsupported dtypes");
  const size_t count = rets.size();
  if (count == 0 || args.size() != 3 * count)
    return ffi::Error::InvalidArgument("cascade_qmatmul_a8_many: expected (codes, scale, zero) per result");
  std::vector<A8> ps(count);
  std::vector<ffi::Result<ffi::AnyBuffer>> ys;
  for (size_t i = 0; i < count; ++i) {
    auto codes = args.get<ffi::Buffer<ffi::U8>>(3 * i);
    auto scale = args.get<ffi::AnyBuffer>(3 * i + 1);
    auto zero = args.get<ffi::AnyBuffer>(3 * i + 2);
    auto y = rets.get<ffi::AnyBuffer>(i);
    if (codes.has_error() || scale.has_error() || zero.has_error() || y.has_error())
      return ffi::Error::InvalidArgument("cascade_qmatmul_a8_many: bad operand types");
    ys.push_back(*y);
    ffi::Error err = describe(xd[0], xd[1], *codes, *scale, *zero, ys.back(), bits, group, has_zero, false, x_type,
                              &ps[i]);
    if (err.failure()) return err;
  }
  const int64_t M = xd[0], K = xd[1];
  std::vector<std::vector<float>> temps(count);
  std::vector<float*> outs(count);
  int64_t total_n = 0;
  for (size_t i = 0; i < count; ++i) {
    total_n += ps[i].N;
    if (x_type == Real::kF32) outs[i] = static_cast<float*>(ys[i]->untyped_data());
    else temps[i].resize(M * ps[i].N), outs[i] = temps[i].data();
  }
  if (M == 0 || total_n == 0) return ffi::Error::Success();
  if (K == 0) {
    for (size_t i = 0; i < count; ++i) std::fill(outs[i], outs[i] + M * ps[i].N, 0.f);
  } else {
    std::vector<A8> nonempty;
    std::vector<float*> nonempty_outs;
    for (size_t i = 0; i < count; ++i)
      if (ps[i].N) nonempty.push_back(ps[i]), nonempty_outs.push_back(outs[i]);
    run_call(nonempty, x.untyped_data(), x_type, nonempty_outs);
  }
  if (x_type == Real::kBF16)
    for (size_t i = 0; i < count; ++i) {
      uint16_t* yh = static_cast<uint16_t*>(ys[i]->untyped_data());
      for (int64_t j = 0; j < M * ps[i].N; ++j) yh[j] = float_to_bf16(temps[i][j]);
    }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeQMatmulA8Many, QMatmulA8ManyImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x (M, K) float32 / bfloat16
                                  .RemainingArgs()        // (codes, scale, zero) per weight
                                  .RemainingRets()        // y (M, N_i) per weight, x's dtype
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<bool>("has_zero"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeQMatmulA8, QMatmulA8Impl,
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
