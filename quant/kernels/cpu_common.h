// What cascade's native CPU kernels share: float16/bfloat16 conversion, the run-time choice of
// SIMD, and one pool of helper threads (SpinPool) that runs a Job's work items.
//
// Everything here is inline in a named namespace, so the kernels compiled from several files
// into one extension share a single pool (a function-local static of an inline function is one
// object program-wide).

#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define CASCADE_X86 1
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

namespace cascade_cpu {

enum class Real { kF32, kF16, kBF16 };

inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalize
      exp = 127 - 15 + 1;
      while (!(mant & 0x400)) {
        mant <<= 1;
        --exp;
      }
      bits = sign | (exp << 23) | ((mant & 0x3ff) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000 | (mant << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, as XLA's convert does
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  if ((bits & 0x7fffffff) > 0x7f800000) return uint16_t((bits >> 16) | 0x40);  // quiet NaN
  bits += 0x7fff + ((bits >> 16) & 1);
  return uint16_t(bits >> 16);
}

inline float load_real(const void* p, Real t, int64_t i) {
  switch (t) {
    case Real::kF32: return static_cast<const float*>(p)[i];
    case Real::kF16: return half_to_float(static_cast<const uint16_t*>(p)[i]);
    case Real::kBF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
  }
  return 0.f;
}

#ifdef CASCADE_X86
// One / eight stored reals as float32 (F16C for float16).
AVX2_FN inline float load1_real(const void* p, Real t, int64_t i) {  // F16C for one float16
  return t == Real::kF16 ? _cvtsh_ss(static_cast<const uint16_t*>(p)[i]) : load_real(p, t, i);
}

AVX2_FN inline __m256 load8_real(const void* p, Real t, int64_t i) {
  switch (t) {
    case Real::kF32: return _mm256_loadu_ps(static_cast<const float*>(p) + i);
    case Real::kF16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)));
    case Real::kBF16: {
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
  return _mm256_setzero_ps();
}
#endif

#ifdef CASCADE_X86
inline bool have_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                         __builtin_cpu_supports("f16c");
  return ok;
}
inline bool have_avx512vnni() {
  static const bool ok = have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  return ok;
}
#define AVX512_FN __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
inline bool have_avx2() { return false; }
inline bool have_avx512vnni() { return false; }
#endif

// The instruction sets the kernels have paths for, in order: every path runs where the processor
// has its instructions, and CASCADE_CPU_ISA caps the choice (scalar, avx2, avx512; read at every
// call, so a test can force each path in one process).  CASCADE_CPU_KERNEL_SCALAR=1, the older
// switch, still forces the scalar paths.
enum class Isa { kScalar = 0, kAVX2 = 1, kAVX512VNNI = 2 };

inline Isa hardware_isa() {
  return have_avx512vnni() ? Isa::kAVX512VNNI : have_avx2() ? Isa::kAVX2 : Isa::kScalar;
}

inline Isa isa() {
  const Isa hw = hardware_isa();
  const char* legacy = std::getenv("CASCADE_CPU_KERNEL_SCALAR");
  if (legacy && *legacy && std::strcmp(legacy, "0") != 0) return Isa::kScalar;
  const char* v = std::getenv("CASCADE_CPU_ISA");
  if (!v || !*v) return hw;
  Isa cap = hw;
  if (std::strcmp(v, "scalar") == 0) cap = Isa::kScalar;
  else if (std::strcmp(v, "avx2") == 0) cap = Isa::kAVX2;
  else if (std::strcmp(v, "avx512") == 0) cap = Isa::kAVX512VNNI;
  return int(cap) < int(hw) ? cap : hw;
}

inline const char* isa_name(Isa i) {
  switch (i) {
    case Isa::kAVX512VNNI: return "avx512vnni";
    case Isa::kAVX2: return "avx2";
    default: return "scalar";
  }
}

inline bool use_simd() { return isa() != Isa::kScalar; }

inline int64_t max_workers() {
  static const int64_t n = [] {
    const char* v = std::getenv("CASCADE_NUM_THREADS");
    const long parsed = v ? std::strtol(v, nullptr, 10) : 0;
    return int64_t(parsed > 0 ? parsed : 0);
  }();
  return n;
}

inline void cpu_pause() {
#ifdef CASCADE_X86
  _mm_pause();
#else
  std::this_thread::yield();
#endif
}

// Work shared by the caller and the pool's helpers: items are claimed from an atomic counter,
// so a helper that starts late finds nothing left and returns; the caller waits only for items
// that were claimed.  A job is reference-counted because such a late helper may outlive the call.
struct Job {
  int64_t items = 0;
  std::atomic<int64_t> next{0}, done{0};
  virtual void item(int64_t i) = 0;
  virtual ~Job() = default;
  void work() {
    for (;;) {
      const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
      if (i >= items) return;
      item(i);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

// The kernels' own helper threads, which spin for a while after a call before they sleep.
// A decode step is ~200 small kernel calls with a few microseconds of other work between them;
// waking a sleeping thread (XLA's pool) costs tens of microseconds each time, about as much as a
// whole 576 x 576 product, so the second core went nearly unused (2 threads: +17% tokens/s).
// As llama.cpp's thread pool does, the helpers busy-wait CASCADE_CPU_SPIN_US microseconds
// (default 200; 0: always sleep) for the next call, then block on a condition variable.
class SpinPool {
 public:
  static SpinPool& get() {
    static SpinPool* pool = new SpinPool();  // never destroyed: its threads are detached
    return *pool;
  }
  int64_t helpers() const { return int64_t(n_); }
  // Offer `job` to the first `wanted` helpers (they call job->work(); the caller works too).
  void post(const std::shared_ptr<Job>& job, int64_t wanted) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = job;
      wanted_ = wanted;
      gen_.fetch_add(1, std::memory_order_release);
    }
    cv_.notify_all();
  }

 private:
  SpinPool() {
    unsigned hw = std::thread::hardware_concurrency();
    int64_t threads = hw ? int64_t(hw) : 1;
    if (max_workers() > 0) threads = std::min(threads, max_workers());
    const char* v = std::getenv("CASCADE_CPU_SPIN_US");
    spin_us_ = v && *v ? std::max(0L, std::strtol(v, nullptr, 10)) : 200;
    n_ = size_t(std::max<int64_t>(0, threads - 1));
    for (size_t i = 0; i < n_; ++i) std::thread([this, i] { loop(int64_t(i)); }).detach();
  }
  void loop(int64_t index) {
    uint64_t seen = 0;
    for (;;) {
      uint64_t gen = gen_.load(std::memory_order_acquire);
      if (gen == seen && spin_us_ > 0) {
        const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(spin_us_);
        while ((gen = gen_.load(std::memory_order_acquire)) == seen) {
          for (int i = 0; i < 64; ++i) cpu_pause();
          if (std::chrono::steady_clock::now() > until) break;
        }
      }
      std::shared_ptr<Job> job;
      int64_t wanted;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return gen_.load(std::memory_order_acquire) != seen; });
        seen = gen_.load(std::memory_order_acquire);
        job = job_;
        wanted = wanted_;
      }
      if (job && index < wanted) job->work();
    }
  }
  size_t n_ = 0;
  long spin_us_ = 200;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  std::shared_ptr<Job> job_;
  int64_t wanted_ = 0;
};

// Run all of `job`'s items on the calling thread and up to `workers - 1` helpers; return when
// every item is done.
inline void run_job(const std::shared_ptr<Job>& job, int64_t workers) {
  workers = std::min(workers, job->items);
  if (workers > 1) SpinPool::get().post(job, workers - 1);
  job->work();
  while (job->done.load(std::memory_order_acquire) < job->items) cpu_pause();
}

}  // namespace cascade_cpu
