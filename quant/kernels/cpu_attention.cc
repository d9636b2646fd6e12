// Attention of a few queries over a stored KV cache, read in place: the decode step's attention
// without a float copy (or a transposed copy) of the cache.  Registered with XLA as two FFI
// custom calls, one per storage:
//
//   cascade_cache_attention_float: k, v (B, S, KV, hd) float32 / float16 / bfloat16.
//   cascade_cache_attention_kivi:  the int8/int4 KIVI layout of cascade.quant.kv (README, KV cache):
//     keys   kp uint8 (B, S * bits / 8, D), codes packed along positions as quant/packing.py lays
//            them out (int4: position 2j in the low nibble of byte row j, 2j+1 in the high one);
//            ks, kz (B, S / G, D): k[p, c] = (u - kz[p / G, c]) * ks[p / G, c];
//     values vp uint8 (B, S, D * bits / 8), codes packed along the token's vector (int4: channel
//            2i in the low nibble of byte i); vs (B, S, D / N): v[p, c] = (u - 2^(bits-1)) * vs[p, c / N].
//   D = KV * hd; channel c = head * hd + i.
//
// Queries q (B, T, H, hd) float32, already scaled by hd^-0.5; head h reads KV head h / (H / KV).
// The query at (b, t) sees cache positions [lo[b, t], hi[b, t]) (an empty range is allowed).
// Outputs are a softmax *partial*, so the caller can merge it with other parts of the context
// (the float16 window of an int cache): per (b, t, h),
//   m = max_j s_j,  l = sum_j exp(s_j - m),  acc = sum_j exp(s_j - m) v_j   (s_j = q . k_j),
// with m = -inf, l = 0, acc = 0 when no position is visible.
//
// Work items are (b, KV head, block of positions); each keeps an online softmax (Milakov &
// Gimelshein 2018, as flash-decoding does) for all T * H / KV queries of its KV head, so every
// key and value is loaded (and dequantized) once for all the queries that share it.  Blocks are
// merged at the end.  AVX2 + FMA + F16C where the processor has them and hd % 8 == 0 (and, for int
// values, N % 8 == 0); a scalar path otherwise.

#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace cascade_cpu;

constexpr int64_t kSub = 16;  // positions loaded together (keys of a sub-block stay in L1)
constexpr int64_t kAhead = 2 * kSub;  // positions between a prefetch and the load it prepares
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Attn {
  int64_t B, T, H, KV, hd, S, G;  // G = H / KV query heads per KV head; Q = T * G queries per item
  const float* q;
  const int32_t* lo;
  const int32_t* hi;
  bool quantized;
  // float cache
  const void* k;
  const void* v;
  Real kv_type;
  // int cache
  int bits;
  int64_t kgroup, vgroup, D;
  const uint8_t* kp;
  const void* ks;
  const void* kz;
  const uint8_t* vp;
  const void* vs;
  Real ks_type, kz_type, vs_type;
};

// ----------------------------------------------------------------------- loading one position

// Key of position p of KV head h (batch row b) into out[hd]; sz: the key group's scale and zero
// for this head's channels (int caches), refreshed by the caller when the group changes.
void key_scalar(const Attn& a, int64_t b, int64_t h, int64_t p, const float* s, const float* z, float* out) {
  if (!a.quantized) {
    const int64_t base = ((b * a.S + p) * a.KV + h) * a.hd;
    for (int64_t i = 0; i < a.hd; ++i) out[i] = load_real(a.k, a.kv_type, base + i);
    return;
  }
  const int64_t c0 = h * a.hd;
  if (a.bits == 8) {
    const uint8_t* row = a.kp + (b * a.S + p) * a.D + c0;
    for (int64_t i = 0; i < a.hd; ++i) out[i] = (float(row[i]) - z[i]) * s[i];
  } else {
    const uint8_t* row = a.kp + (b * (a.S / 2) + p / 2) * a.D + c0;
    const int shift = (p & 1) * 4;
    for (int64_t i = 0; i < a.hd; ++i) out[i] = (float((row[i] >> shift) & 0xf) - z[i]) * s[i];
  }
}

void value_scalar(const Attn& a, int64_t b, int64_t h, int64_t p, float* out) {
  if (!a.quantized) {
    const int64_t base = ((b * a.S + p) * a.KV + h) * a.hd;
    for (int64_t i = 0; i < a.hd; ++i) out[i] = load_real(a.v, a.kv_type, base + i);
    return;
  }
  const int64_t c0 = h * a.hd, groups = a.D / a.vgroup;
  const float offset = float(1 << (a.bits - 1));
  for (int64_t i = 0; i < a.hd; ++i) {
    const int64_t c = c0 + i;
    const float s = load_real(a.vs, a.vs_type, (b * a.S + p) * groups + c / a.vgroup);
    int u;
    if (a.bits == 8) {
      u = a.vp[(b * a.S + p) * a.D + c];
    } else {
      const uint8_t byte = a.vp[(b * a.S + p) * (a.D / 2) + c / 2];
      u = (c & 1) ? (byte >> 4) : (byte & 0xf);
    }
    out[i] = (float(u) - offset) * s;
  }
}

void group_scale_zero(const Attn& a, int64_t b, int64_t h, int64_t g, float* s, float* z) {
  const int64_t at = (b * (a.S / a.kgroup) + g) * a.D + h * a.hd;
  for (int64_t i = 0; i < a.hd; ++i) {
    s[i] = load_real(a.ks, a.ks_type, at + i);
    z[i] = load_real(a.kz, a.kz_type, at + i);
  }
}

float dot_scalar(const float* x, const float* y, int64_t n) {
  float t = 0.f;
  for (int64_t i = 0; i < n; ++i) t += x[i] * y[i];
  return t;
}

void axpy_scalar(float w, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

#ifdef CASCADE_X86
AVX2_FN inline __m256 bytes8(const uint8_t* p) {  // 8 unsigned bytes as floats
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

AVX2_FN void key_avx2(const Attn& a, int64_t b, int64_t h, int64_t p, const float* s, const float* z, float* out) {
  if (!a.quantized) {
    const int64_t base = ((b * a.S + p) * a.KV + h) * a.hd;
    for (int64_t i = 0; i < a.hd; i += 8) _mm256_storeu_ps(out + i, load8_real(a.k, a.kv_type, base + i));
    return;
  }
  const int64_t c0 = h * a.hd;
  if (a.bits == 8) {
    const uint8_t* row = a.kp + (b * a.S + p) * a.D + c0;
    for (int64_t i = 0; i < a.hd; i += 8)
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(bytes8(row + i), _mm256_loadu_ps(z + i)), _mm256_loadu_ps(s + i)));
  } else {
    const uint8_t* row = a.kp + (b * (a.S / 2) + p / 2) * a.D + c0;
    const __m128i shift = _mm_cvtsi32_si128(int((p & 1) * 4));
    const __m256i mask = _mm256_set1_epi32(0xf);
    for (int64_t i = 0; i < a.hd; i += 8) {
      const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + i)));
      const __m256 u = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srl_epi32(c, shift), mask));
      _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(u, _mm256_loadu_ps(z + i)), _mm256_loadu_ps(s + i)));
    }
  }
}

AVX2_FN void value_avx2(const Attn& a, int64_t b, int64_t h, int64_t p, float* out) {
  if (!a.quantized) {
    const int64_t base = ((b * a.S + p) * a.KV + h) * a.hd;
    for (int64_t i = 0; i < a.hd; i += 8) _mm256_storeu_ps(out + i, load8_real(a.v, a.kv_type, base + i));
    return;
  }
  const int64_t c0 = h * a.hd;
  const __m256 offset = _mm256_set1_ps(float(1 << (a.bits - 1)));
  // value groups are whole multiples of 8 channels: the scale changes at most once per 8
  const int64_t srow = (b * a.S + p) * (a.D / a.vgroup);
  int64_t g = c0 / a.vgroup, next = (g + 1) * a.vgroup;
  __m256 s = _mm256_set1_ps(load1_real(a.vs, a.vs_type, srow + g));
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i mask = _mm256_set1_epi32(0xf);
  const uint8_t* row = a.bits == 8 ? a.vp + (b * a.S + p) * a.D : a.vp + (b * a.S + p) * (a.D / 2);
  for (int64_t i = 0; i < a.hd; i += 8) {
    if (c0 + i >= next) {
      ++g;
      next += a.vgroup;
      s = _mm256_set1_ps(load1_real(a.vs, a.vs_type, srow + g));
    }
    __m256 u;
    if (a.bits == 8) {
      u = bytes8(row + c0 + i);
    } else {
      int32_t word;
      std::memcpy(&word, row + (c0 + i) / 2, 4);  // channels c..c+7: low nibble first
      u = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts), mask));
    }
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_sub_ps(u, offset), s));
  }
}

// A key group's scales and zero points for this head's channels (F16C).
AVX2_FN void group_scale_zero_avx2(const Attn& a, int64_t b, int64_t h, int64_t g, float* s, float* z) {
  const int64_t at = (b * (a.S / a.kgroup) + g) * a.D + h * a.hd;
  for (int64_t i = 0; i < a.hd; i += 8) {
    _mm256_storeu_ps(s + i, load8_real(a.ks, a.ks_type, at + i));
    _mm256_storeu_ps(z + i, load8_real(a.kz, a.kz_type, at + i));
  }
}

AVX2_FN inline float hsum8(__m256 t) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

AVX2_FN float dot_avx2(const float* x, const float* y, int64_t n) {
  __m256 t0 = _mm256_setzero_ps(), t1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    t0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), t0);
    t1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), t1);
  }
  for (; i < n; i += 8) t0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), t0);
  return hsum8(_mm256_add_ps(t0, t1));
}

// Ask for the cache lines of position p's key and value of head h ahead of their use: the
// lines of one head are strided (the other heads' channels sit between them), which the
// hardware prefetchers follow late.
AVX2_FN inline void prefetch_position(const Attn& a, int64_t b, int64_t h, int64_t p) {
  const char* k;
  const char* v;
  int64_t bytes;
  if (!a.quantized) {
    const int64_t size = a.kv_type == Real::kF32 ? 4 : 2, at = ((b * a.S + p) * a.KV + h) * a.hd * size;
    k = static_cast<const char*>(a.k) + at;
    v = static_cast<const char*>(a.v) + at;
    bytes = a.hd * size;
  } else {
    k = reinterpret_cast<const char*>(a.bits == 8 ? a.kp + (b * a.S + p) * a.D : a.kp + (b * (a.S / 2) + p / 2) * a.D) + h * a.hd;
    v = reinterpret_cast<const char*>(a.vp + (b * a.S + p) * (a.D * a.bits / 8)) + h * a.hd * a.bits / 8;
    bytes = a.hd * a.bits / 8;
  }
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(k + o, _MM_HINT_T0);
    _mm_prefetch(v + o, _MM_HINT_T0);
  }
}

// exp(x) for 8 floats (Cephes' expf polynomial, as in avx_mathfun): relative error ~2e-7.
AVX2_FN inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.f));
  const __m256i n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(n));
}

#endif  // CASCADE_X86

bool simd_ok(const Attn& a) {
  return use_simd() && a.hd % 8 == 0 && (!a.quantized || a.vgroup % 8 == 0);
}

// ------------------------------------------------------------------------ one block of positions

struct Partials {
  int64_t Q, hd;
  std::vector<float> m, l, acc;  // (items, Q), (items, Q), (items, Q, hd)
};

// Queries of one (b, KV head h): pointers into q and their visible ranges.
struct Queries {
  std::vector<const float*> q;
  std::vector<int32_t> lo, hi;
  Queries(const Attn& a, int64_t b, int64_t h) : q(a.T * a.G), lo(a.T * a.G), hi(a.T * a.G) {
    for (int64_t t = 0; t < a.T; ++t)
      for (int64_t g = 0; g < a.G; ++g) {
        q[t * a.G + g] = a.q + ((b * a.T + t) * a.H + h * a.G + g) * a.hd;
        lo[t * a.G + g] = a.lo[b * a.T + t];
        hi[t * a.G + g] = a.hi[b * a.T + t];
      }
  }
};

// The online softmax of one (b, KV head h) over positions [p0, p1), into m[Q], l[Q], acc[Q][hd]
// (portable path).
void attend_block_scalar(const Attn& a, int64_t b, int64_t h, int64_t p0, int64_t p1, float* m, float* l, float* acc) {
  const int64_t Q = a.T * a.G, hd = a.hd;
  const Queries qs(a, b, h);
  std::vector<float> key(hd), val(hd), sbuf(hd), zbuf(hd), w(Q);
  std::fill(m, m + Q, kNegInf);
  std::fill(l, l + Q, 0.f);
  std::fill(acc, acc + Q * hd, 0.f);
  int64_t group = -1;
  for (int64_t p = p0; p < p1; ++p) {
    if (a.quantized && p / a.kgroup != group) {
      group = p / a.kgroup;
      group_scale_zero(a, b, h, group, sbuf.data(), zbuf.data());
    }
    key_scalar(a, b, h, p, sbuf.data(), zbuf.data(), key.data());
    bool any = false;
    for (int64_t i = 0; i < Q; ++i) {
      w[i] = 0.f;
      if (p < qs.lo[i] || p >= qs.hi[i]) continue;
      const float sc = dot_scalar(qs.q[i], key.data(), hd);
      if (sc > m[i]) {  // a new maximum: rescale what was accumulated under the old one
        const float corr = m[i] == kNegInf ? 0.f : std::exp(m[i] - sc);
        l[i] *= corr;
        for (int64_t d = 0; d < hd; ++d) acc[i * hd + d] *= corr;
        m[i] = sc;
      }
      w[i] = std::exp(sc - m[i]);
      l[i] += w[i];
      any = true;
    }
    if (!any) continue;
    value_scalar(a, b, h, p, val.data());
    for (int64_t i = 0; i < Q; ++i)
      if (w[i] != 0.f) axpy_scalar(w[i], val.data(), acc + i * hd, hd);
  }
}

#ifdef CASCADE_X86
// The same with AVX2, kSub positions at a time: their keys and values are dequantized once into
// L1 buffers for all Q queries; scores and exp 8 at a time; each accumulator vector takes kSub
// FMAs per load and store.
AVX2_FN void attend_block_avx2(const Attn& a, int64_t b, int64_t h, int64_t p0, int64_t p1, float* m, float* l,
                               float* acc) {
  const int64_t Q = a.T * a.G, hd = a.hd;
  const Queries qs(a, b, h);
  thread_local std::vector<float> keys, vals, scores, sbuf, zbuf;
  keys.resize(kSub * hd);
  vals.resize(kSub * hd);
  scores.resize(Q * kSub);
  sbuf.resize(hd);
  zbuf.resize(hd);
  std::vector<char> live(Q);
  std::fill(m, m + Q, kNegInf);
  std::fill(l, l + Q, 0.f);
  std::fill(acc, acc + Q * hd, 0.f);
  const __m256 neg_inf = _mm256_set1_ps(kNegInf);
  int64_t group_end = -1;  // one past the last position of the key group in sbuf, zbuf
  for (int64_t s0 = p0; s0 < p1; s0 += kSub) {
    const int64_t n = std::min(kSub, p1 - s0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t p = s0 + j;
      if (a.quantized && p >= group_end) {
        const int64_t group = p / a.kgroup;
        group_end = (group + 1) * a.kgroup;
        group_scale_zero_avx2(a, b, h, group, sbuf.data(), zbuf.data());
      }
      key_avx2(a, b, h, p, sbuf.data(), zbuf.data(), keys.data() + j * hd);
      if (p + kAhead < p1) prefetch_position(a, b, h, p + kAhead);
    }
    bool any = false;
    for (int64_t i = 0; i < Q; ++i) {
      float* sc = scores.data() + i * kSub;
      float mx = kNegInf;
      for (int64_t j = 0; j < kSub; ++j) {
        const int64_t p = s0 + j;
        sc[j] = (j < n && p >= qs.lo[i] && p < qs.hi[i]) ? dot_avx2(qs.q[i], keys.data() + j * hd, hd) : kNegInf;
        mx = std::max(mx, sc[j]);
      }
      live[i] = mx != kNegInf;
      if (!live[i]) continue;
      any = true;
      if (mx > m[i]) {
        if (m[i] != kNegInf) {  // rescale what was accumulated under the old maximum
          const float corr = std::exp(m[i] - mx);
          l[i] *= corr;
          const __m256 c = _mm256_set1_ps(corr);
          for (int64_t d = 0; d < hd; d += 8) _mm256_storeu_ps(acc + i * hd + d, _mm256_mul_ps(c, _mm256_loadu_ps(acc + i * hd + d)));
        }
        m[i] = mx;
      }
      const __m256 mm = _mm256_set1_ps(m[i]);
      __m256 sum = _mm256_setzero_ps();
      for (int64_t j = 0; j < kSub; j += 8) {
        const __m256 x = _mm256_loadu_ps(sc + j);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, mm)), _mm256_cmp_ps(x, neg_inf, _CMP_NEQ_OQ));
        _mm256_storeu_ps(sc + j, e);
        sum = _mm256_add_ps(sum, e);
      }
      l[i] += hsum8(sum);
    }
    if (!any) continue;
    for (int64_t j = 0; j < n; ++j) value_avx2(a, b, h, s0 + j, vals.data() + j * hd);
    for (int64_t i = 0; i < Q; ++i) {
      if (!live[i]) continue;
      const float* w = scores.data() + i * kSub;
      float* out = acc + i * hd;
      for (int64_t d = 0; d < hd; d += 8) {
        __m256 r = _mm256_loadu_ps(out + d);
        for (int64_t j = 0; j < n; ++j) r = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(vals.data() + j * hd + d), r);
        _mm256_storeu_ps(out + d, r);
      }
    }
  }
}
#endif  // CASCADE_X86

struct AttnJob : Job {
  Attn a;
  int64_t blocks, first, block;  // positions [first + k * block, ...) per block k
  int64_t last;                   // one past the last position any query sees
  Partials* out;
  bool simd;
  void item(int64_t it) override {
    const int64_t blk = it % blocks, bh = it / blocks, b = bh / a.KV, h = bh % a.KV;
    const int64_t p0 = first + blk * block, p1 = std::min(last, p0 + block);
    const int64_t Q = out->Q;
    float* m = out->m.data() + it * Q;
    float* l = out->l.data() + it * Q;
    float* acc = out->acc.data() + it * Q * a.hd;
#ifdef CASCADE_X86
    if (simd) {
      attend_block_avx2(a, b, h, p0, p1, m, l, acc);
      return;
    }
#endif
    attend_block_scalar(a, b, h, p0, p1, m, l, acc);
  }
};

ffi::Error run(Attn& a, ffi::Result<ffi::Buffer<ffi::F32>> acc, ffi::Result<ffi::Buffer<ffi::F32>> m_out,
               ffi::Result<ffi::Buffer<ffi::F32>> l_out) {
  const int64_t Q = a.T * a.G, hd = a.hd;
  // the positions any query of the call sees: blocks cover only them
  int64_t first = a.S, last = 0;
  for (int64_t i = 0; i < a.B * a.T; ++i) {
    const int64_t lo = std::max<int64_t>(0, a.lo[i]), hi = std::min<int64_t>(a.S, a.hi[i]);
    if (lo < hi) {
      first = std::min(first, lo);
      last = std::max(last, hi);
    }
  }
  float* acc_o = acc->typed_data();
  float* m_o = m_out->typed_data();
  float* l_o = l_out->typed_data();
  if (first >= last) {  // nothing visible anywhere
    std::fill(acc_o, acc_o + a.B * a.T * a.H * hd, 0.f);
    std::fill(m_o, m_o + a.B * a.T * a.H, kNegInf);
    std::fill(l_o, l_o + a.B * a.T * a.H, 0.f);
    return ffi::Error::Success();
  }
  const int64_t span = last - first;
  int64_t workers = 1 + SpinPool::get().helpers();
  if (span * a.B * a.KV * hd * (Q + 2) < (int64_t(1) << 17)) workers = 1;  // waking a helper costs more
  // about four items per worker, blocks of at least 64 positions
  const int64_t want = (4 * workers + a.B * a.KV - 1) / (a.B * a.KV);
  const int64_t blocks = std::max<int64_t>(1, std::min(want, span / 64));
  auto job = std::make_shared<AttnJob>();
  job->a = a;
  job->blocks = blocks;
  job->block = (span + blocks - 1) / blocks;
  job->first = first;
  job->last = last;
  job->simd = simd_ok(a);
  Partials parts{Q, hd, {}, {}, {}};
  job->items = a.B * a.KV * blocks;
  parts.m.resize(job->items * Q);
  parts.l.resize(job->items * Q);
  parts.acc.resize(job->items * Q * hd);
  job->out = &parts;
  run_job(job, workers);

  // merge the blocks of each (b, KV head) and scatter to (b, t, head)
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t h = 0; h < a.KV; ++h)
      for (int64_t i = 0; i < Q; ++i) {
        const int64_t t = i / a.G, head = h * a.G + i % a.G;
        const int64_t o = (b * a.T + t) * a.H + head;
        const int64_t it0 = (b * a.KV + h) * blocks;
        float mx = kNegInf;
        for (int64_t k = 0; k < blocks; ++k) mx = std::max(mx, parts.m[(it0 + k) * Q + i]);
        float* dst = acc_o + o * hd;
        std::fill(dst, dst + hd, 0.f);
        float lsum = 0.f;
        if (mx != kNegInf) {
          for (int64_t k = 0; k < blocks; ++k) {
            const float mk = parts.m[(it0 + k) * Q + i];
            if (mk == kNegInf) continue;
            const float w = std::exp(mk - mx);
            lsum += w * parts.l[(it0 + k) * Q + i];
            const float* src = parts.acc.data() + ((it0 + k) * Q + i) * hd;
            for (int64_t d = 0; d < hd; ++d) dst[d] += w * src[d];
          }
        }
        m_o[o] = mx;
        l_o[o] = lsum;
      }
  return ffi::Error::Success();
}

bool real_of(ffi::DataType t, Real* out) {
  switch (t) {
    case ffi::DataType::F32: *out = Real::kF32; return true;
    case ffi::DataType::F16: *out = Real::kF16; return true;
    case ffi::DataType::BF16: *out = Real::kBF16; return true;
    default: return false;
  }
}

ffi::Error common(Attn& a, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, int64_t kv_heads,
                  int64_t positions, ffi::Result<ffi::Buffer<ffi::F32>> acc) {
  const auto qd = q.dimensions(), ld = lo.dimensions(), hd = hi.dimensions(), ad = acc->dimensions();
  if (qd.size() != 4 || ld.size() != 2 || hd.size() != 2)
    return ffi::Error::InvalidArgument("cascade_cache_attention: q must be (B, T, H, hd), lo and hi (B, T)");
  a.B = qd[0];
  a.T = qd[1];
  a.H = qd[2];
  a.hd = qd[3];
  a.KV = kv_heads;
  a.S = positions;
  if (a.KV <= 0 || a.H % a.KV || ld[0] != a.B || ld[1] != a.T || hd[0] != a.B || hd[1] != a.T || ad.size() != 4 ||
      ad[0] != a.B || ad[1] != a.T || ad[2] != a.H || ad[3] != a.hd)
    return ffi::Error::InvalidArgument("cascade_cache_attention: shapes do not match");
  a.G = a.H / a.KV;
  a.q = q.typed_data();
  a.lo = lo.typed_data();
  a.hi = hi.typed_data();
  return ffi::Error::Success();
}

ffi::Error FloatImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, ffi::AnyBuffer k,
                     ffi::AnyBuffer v, ffi::Result<ffi::Buffer<ffi::F32>> acc, ffi::Result<ffi::Buffer<ffi::F32>> m,
                     ffi::Result<ffi::Buffer<ffi::F32>> l) {
  const auto kd = k.dimensions(), vd = v.dimensions();
  if (kd.size() != 4 || vd.size() != 4 || kd[0] != vd[0] || kd[1] != vd[1] || kd[2] != vd[2] || kd[3] != vd[3])
    return ffi::Error::InvalidArgument("cascade_cache_attention_float: k and v must be (B, S, KV, hd)");
  Attn a{};
  a.quantized = false;
  if (auto e = common(a, q, lo, hi, kd[2], kd[1], acc); e.failure()) return e;
  if (kd[0] != a.B || kd[3] != a.hd || k.element_type() != v.element_type() || !real_of(k.element_type(), &a.kv_type))
    return ffi::Error::InvalidArgument("cascade_cache_attention_float: k and v do not match q, or have an unsupported dtype");
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  return run(a, acc, m, l);
}

ffi::Error KiviImpl(ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi, ffi::Buffer<ffi::U8> kp,
                    ffi::AnyBuffer ks, ffi::AnyBuffer kz, ffi::Buffer<ffi::U8> vp, ffi::AnyBuffer vs,
                    ffi::Result<ffi::Buffer<ffi::F32>> acc, ffi::Result<ffi::Buffer<ffi::F32>> m,
                    ffi::Result<ffi::Buffer<ffi::F32>> l, int64_t bits, int64_t key_group, int64_t value_group,
                    int64_t kv_heads) {
  if (bits != 4 && bits != 8) return ffi::Error::InvalidArgument("cascade_cache_attention_kivi: bits must be 4 or 8");
  const auto vpd = vp.dimensions();
  if (vpd.size() != 3) return ffi::Error::InvalidArgument("cascade_cache_attention_kivi: vp must be (B, S, D * bits / 8)");
  Attn a{};
  a.quantized = true;
  a.bits = int(bits);
  if (auto e = common(a, q, lo, hi, kv_heads, vpd[1], acc); e.failure()) return e;
  a.D = a.KV * a.hd;
  a.kgroup = key_group;
  a.vgroup = value_group;
  const auto kpd = kp.dimensions(), ksd = ks.dimensions(), kzd = kz.dimensions(), vsd = vs.dimensions();
  const bool ok = key_group > 0 && a.S % key_group == 0 && (bits == 8 || key_group % 2 == 0) && value_group > 0 &&
                  a.D % value_group == 0 && (bits == 8 || value_group % 2 == 0) && kpd.size() == 3 &&
                  kpd[0] == a.B && kpd[1] == a.S * bits / 8 && kpd[2] == a.D && ksd.size() == 3 && ksd[0] == a.B &&
                  ksd[1] == a.S / key_group && ksd[2] == a.D && kzd.size() == 3 && kzd[0] == ksd[0] &&
                  kzd[1] == ksd[1] && kzd[2] == ksd[2] && vpd[0] == a.B && vpd[2] == a.D * bits / 8 &&
                  vsd.size() == 3 && vsd[0] == a.B && vsd[1] == a.S && vsd[2] == a.D / value_group &&
                  real_of(ks.element_type(), &a.ks_type) && real_of(kz.element_type(), &a.kz_type) &&
                  real_of(vs.element_type(), &a.vs_type);
  if (!ok) return ffi::Error::InvalidArgument("cascade_cache_attention_kivi: cache buffers do not match the layout");
  a.kp = kp.typed_data();
  a.ks = ks.untyped_data();
  a.kz = kz.untyped_data();
  a.vp = vp.typed_data();
  a.vs = vs.untyped_data();
  return run(a, acc, m, l);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeCacheAttentionFloat, FloatImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (B, T, H, hd), scaled
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lo (B, T)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // hi (B, T)
                                  .Arg<ffi::AnyBuffer>()         // k (B, S, KV, hd)
                                  .Arg<ffi::AnyBuffer>()         // v (B, S, KV, hd)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acc (B, T, H, hd)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m (B, T, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()); // l (B, T, H)

XLA_FFI_DEFINE_HANDLER_SYMBOL(CascadeCacheAttentionKivi, KiviImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q (B, T, H, hd), scaled
                                  .Arg<ffi::Buffer<ffi::S32>>()  // lo (B, T)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // hi (B, T)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // key codes (B, S * bits / 8, D)
                                  .Arg<ffi::AnyBuffer>()         // key scales (B, S / G, D)
                                  .Arg<ffi::AnyBuffer>()         // key zero points (B, S / G, D)
                                  .Arg<ffi::Buffer<ffi::U8>>()   // value codes (B, S, D * bits / 8)
                                  .Arg<ffi::AnyBuffer>()         // value scales (B, S, D / N)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // acc (B, T, H, hd)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // m (B, T, H)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // l (B, T, H)
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("key_group")
                                  .Attr<int64_t>("value_group")
                                  .Attr<int64_t>("kv_heads"));
