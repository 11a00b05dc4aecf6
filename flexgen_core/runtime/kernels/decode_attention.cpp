// CPU decode attention over a sequence-major KV cache (t, b, nh, d), read in place (no copy, no fp32 workspace).
// Built at first use by flexgen_core.runtime.kernels (torch.utils.cpp_extension); see that module.
// q: (b, nh, d) any float dtype; k, v: (t, b, nh, d) float32/float16/bfloat16, contiguous within a position;
// valid: (b, t) bool. Returns (b, nh, d) float32. Softmax and accumulation in float32.
// The loop runs without the GIL, so the engine's host-attention thread leaves the main thread free to issue work.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FLEXGEN_SIMD 1
#endif

static inline float to_float(float x) { return x; }
static inline float to_float(at::Half x) { return static_cast<float>(x); }
static inline float to_float(at::BFloat16 x) { return static_cast<float>(x); }

#ifdef FLEXGEN_SIMD
static inline __m256 vload(const float* p) { return _mm256_loadu_ps(p); }
static inline __m256 vload(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
static inline __m256 vload(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 sh = _mm_movehdup_ps(lo);
  __m128 s = _mm_add_ps(lo, sh);
  sh = _mm_movehl_ps(sh, s);
  s = _mm_add_ss(s, sh);
  return _mm_cvtss_f32(s);
}
#endif

template <typename T>
static inline float dot(const float* q, const T* k, int64_t d) {
#ifdef FLEXGEN_SIMD
  if (d % 32 == 0) {  // four independent FMA chains
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < d; j += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), vload(k + j), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 8), vload(k + j + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 16), vload(k + j + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j + 24), vload(k + j + 24), a3);
    }
    return hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
  }
  if (d % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < d; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), vload(k + j), acc);
    return hsum(acc);
  }
#endif
  float s = 0.f;
  for (int64_t j = 0; j < d; ++j) s += q[j] * to_float(k[j]);
  return s;
}

template <typename T>
static inline void axpy(float p, const T* v, float* acc, int64_t d) {
#ifdef FLEXGEN_SIMD
  if (d % 8 == 0) {
    const __m256 pv = _mm256_set1_ps(p);
    for (int64_t j = 0; j < d; j += 8)
      _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(pv, vload(v + j), _mm256_loadu_ps(acc + j)));
    return;
  }
#endif
  for (int64_t j = 0; j < d; ++j) acc[j] += p * to_float(v[j]);
}

// Rows bh = (sequence, head) pairs; each thread owns a contiguous range of rows and walks the positions in
// order, so for every position it reads one contiguous block of K (then V): streaming, prefetch-friendly.
template <typename T>
static void attend(const float* q, const T* k, const T* v, const bool* valid, float* out,
                   int64_t t, int64_t b, int64_t nh, int64_t d, float scale) {
  const int64_t rows = b * nh;
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const int64_t n = end - begin;
    std::vector<float> scores(n * t), mx(n, -std::numeric_limits<float>::infinity()), sum(n, 0.f);
    std::vector<int64_t> seq(n);
    for (int64_t r = 0; r < n; ++r) seq[r] = (begin + r) / nh;
    for (int64_t i = 0; i < t; ++i) {
      const T* kp = k + (i * rows + begin) * d;
      for (int64_t r = 0; r < n; ++r) {
        float s = -std::numeric_limits<float>::infinity();
        if (valid[seq[r] * t + i]) {
          s = dot(q + (begin + r) * d, kp + r * d, d) * scale;
          mx[r] = s > mx[r] ? s : mx[r];
        }
        scores[r * t + i] = s;
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      float* sr = scores.data() + r * t;
      for (int64_t i = 0; i < t; ++i) {
        const float e = sr[i] == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(sr[i] - mx[r]);
        sr[i] = e;
        sum[r] += e;
      }
    }
    float* op = out + begin * d;
    std::memset(op, 0, n * d * sizeof(float));
    for (int64_t i = 0; i < t; ++i) {
      const T* vp = v + (i * rows + begin) * d;
      for (int64_t r = 0; r < n; ++r) {
        const float p = scores[r * t + i];
        if (p != 0.f) axpy(p, vp + r * d, op + r * d, d);
      }
    }
    for (int64_t r = 0; r < n; ++r) {
      const float inv = 1.f / sum[r];
      for (int64_t j = 0; j < d; ++j) op[r * d + j] *= inv;
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor valid, double scale) {
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes(), "k, v: (t, b, nh, d)");
  TORCH_CHECK(k.stride(3) == 1 && k.stride(2) == k.size(3) && k.stride(1) == k.size(2) * k.size(3),
              "k must be contiguous within a position");
  TORCH_CHECK(v.strides() == k.strides(), "k and v must have the same layout");
  auto qf = q.to(torch::kFloat).contiguous();
  auto vm = valid.to(torch::kBool).contiguous();
  const int64_t t = k.size(0), b = k.size(1), nh = k.size(2), d = k.size(3);
  TORCH_CHECK(k.stride(0) == b * nh * d, "positions must be contiguous");
  auto out = torch::empty({b, nh, d}, qf.options());
  const float sc = static_cast<float>(scale);
  pybind11::gil_scoped_release no_gil;  // only raw pointers below: no Python objects are touched
  switch (k.scalar_type()) {
    case at::kFloat:
      attend(qf.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), vm.data_ptr<bool>(), out.data_ptr<float>(), t, b, nh, d, sc);
      break;
    case at::kHalf:
      attend(qf.data_ptr<float>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(), vm.data_ptr<bool>(), out.data_ptr<float>(), t, b, nh, d, sc);
      break;
    case at::kBFloat16:
      attend(qf.data_ptr<float>(), k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>(), vm.data_ptr<bool>(), out.data_ptr<float>(), t, b, nh, d, sc);
      break;
    default:
      TORCH_CHECK(false, "decode_attention: cache dtype must be float32, float16 or bfloat16, got ", k.scalar_type());
  }
  return out;
}
