// The element-wise parts of a decoder layer on CPU, each fused into one pass, as vLLM's CPU
// backend does with its own C++ ops: residual add + RMSNorm, rotary embedding + K/V store into
// the block pool, and SiLU(gate) * up. In a decode step these tensors are a few KB, so the cost
// of a layer outside its matmuls is the number of ops, not their arithmetic: this turns about
// fifteen torch ops per layer into three calls.
//
// Rounding follows Hugging Face's modules op by op (each torch op rounds its result to the
// storage type): the rotary embedding is round(round(x * cos) + round(rotate_half(x) * sin)),
// RMSNorm's weight multiplies the normalised value after it is rounded to the storage type.
// Built with -ffp-contract=off so no multiply-add is fused where torch rounds in between.
#include <cmath>
#include <cstdint>
#include <cstring>

#include "storage.h"

namespace {

template <typename T>
void add_rms_norm(T* x, const T* delta, const T* weight, T* out, int64_t rows, int64_t hidden,
                  int64_t x_stride, int64_t delta_stride, int64_t out_stride, float eps,
                  int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * hidden > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    T* xr = x + r * x_stride;
    T* o = out + r * out_stride;
    float sum = 0.0f;
    if (delta != nullptr) {
      const T* dr = delta + r * delta_stride;
      for (int64_t d = 0; d < hidden; ++d) {
        T value;
        from_float(to_float(xr[d]) + to_float(dr[d]), &value);
        xr[d] = value;
      }
    }
#pragma omp simd reduction(+ : sum)
    for (int64_t d = 0; d < hidden; ++d) {
      float v = to_float(xr[d]);
      sum += v * v;
    }
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(hidden) + eps);
    for (int64_t d = 0; d < hidden; ++d) {
      T normed;
      from_float(to_float(xr[d]) * inv, &normed);
      from_float(to_float(weight[d]) * to_float(normed), o + d);
    }
  }
}

template <typename T>
inline T mul(T a, float b) {
  T out;
  from_float(to_float(a) * b, &out);
  return out;
}

template <typename T>
void rope_store(T* qkv, int64_t rows, int64_t row_stride, int num_heads, int num_kv_heads,
                int head_dim, const T* cos, const T* sin, const int32_t* positions,
                T* key_cache, T* value_cache, int64_t cache_stride_block,
                int64_t cache_stride_pos, int64_t cache_stride_head, const int32_t* slot_blocks,
                const int32_t* slot_offsets, int num_threads) {
  const int half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    T* row = qkv + r * row_stride;
    const T* c = cos + static_cast<int64_t>(positions[r]) * head_dim;
    const T* s = sin + static_cast<int64_t>(positions[r]) * head_dim;
    for (int h = 0; h < num_heads + num_kv_heads; ++h) {  // q heads, then k heads
      T* x = row + h * head_dim;
      for (int d = 0; d < half; ++d) {
        T a1 = mul(x[d], to_float(c[d])), b1 = mul(x[d + half], -to_float(s[d]));
        T a2 = mul(x[d + half], to_float(c[d + half])), b2 = mul(x[d], to_float(s[d + half]));
        from_float(to_float(a1) + to_float(b1), x + d);
        from_float(to_float(a2) + to_float(b2), x + d + half);
      }
    }
    const int64_t slot = static_cast<int64_t>(slot_blocks[r]) * cache_stride_block +
                         static_cast<int64_t>(slot_offsets[r]) * cache_stride_pos;
    for (int h = 0; h < num_kv_heads; ++h) {
      std::memcpy(key_cache + slot + h * cache_stride_head,
                  row + (num_heads + h) * head_dim, head_dim * sizeof(T));
      std::memcpy(value_cache + slot + h * cache_stride_head,
                  row + (num_heads + num_kv_heads + h) * head_dim, head_dim * sizeof(T));
    }
  }
}

template <typename T>
void silu_mul(const T* gate_up, T* out, int64_t rows, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * width > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const T* gate = gate_up + r * 2 * width;
    const T* up = gate + width;
    T* o = out + r * width;
    for (int64_t d = 0; d < width; ++d) {
      const float g = to_float(gate[d]);
      T act;
      from_float(g / (1.0f + std::exp(-g)), &act);
      from_float(to_float(act) * to_float(up[d]), o + d);
    }
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16 (as in paged_attention.cpp). Returns 0, or 4 for an
// unknown dtype.
int fastserve_add_rms_norm(void* x, const void* delta, const void* weight, void* out,
                           int64_t rows, int64_t hidden, int64_t x_stride, int64_t delta_stride,
                           int64_t out_stride, float eps, int dtype, int num_threads) {
  switch (dtype) {
    case 0:
      add_rms_norm(static_cast<float*>(x), static_cast<const float*>(delta),
                   static_cast<const float*>(weight), static_cast<float*>(out), rows, hidden,
                   x_stride, delta_stride, out_stride, eps, num_threads);
      return 0;
    case 1:
      add_rms_norm(static_cast<uint16_t*>(x), static_cast<const uint16_t*>(delta),
                   static_cast<const uint16_t*>(weight), static_cast<uint16_t*>(out), rows,
                   hidden, x_stride, delta_stride, out_stride, eps, num_threads);
      return 0;
    case 2:
      add_rms_norm(static_cast<Half*>(x), static_cast<const Half*>(delta),
                   static_cast<const Half*>(weight), static_cast<Half*>(out), rows, hidden,
                   x_stride, delta_stride, out_stride, eps, num_threads);
      return 0;
  }
  return 4;
}

int fastserve_rope_store(void* qkv, int64_t rows, int64_t row_stride, int num_heads,
                         int num_kv_heads, int head_dim, const void* cos, const void* sin,
                         const int32_t* positions, void* key_cache, void* value_cache,
                         int64_t cache_stride_block, int64_t cache_stride_pos,
                         int64_t cache_stride_head, const int32_t* slot_blocks,
                         const int32_t* slot_offsets, int dtype, int num_threads) {
#define FASTSERVE_ROPE(T)                                                                   \
  rope_store(static_cast<T*>(qkv), rows, row_stride, num_heads, num_kv_heads, head_dim,    \
             static_cast<const T*>(cos), static_cast<const T*>(sin), positions,            \
             static_cast<T*>(key_cache), static_cast<T*>(value_cache), cache_stride_block, \
             cache_stride_pos, cache_stride_head, slot_blocks, slot_offsets, num_threads)
  switch (dtype) {
    case 0: FASTSERVE_ROPE(float); return 0;
    case 1: FASTSERVE_ROPE(uint16_t); return 0;
    case 2: FASTSERVE_ROPE(Half); return 0;
  }
#undef FASTSERVE_ROPE
  return 4;
}

int fastserve_silu_mul(const void* gate_up, void* out, int64_t rows, int64_t width, int dtype,
                       int num_threads) {
  switch (dtype) {
    case 0:
      silu_mul(static_cast<const float*>(gate_up), static_cast<float*>(out), rows, width,
               num_threads);
      return 0;
    case 1:
      silu_mul(static_cast<const uint16_t*>(gate_up), static_cast<uint16_t*>(out), rows, width,
               num_threads);
      return 0;
    case 2:
      silu_mul(static_cast<const Half*>(gate_up), static_cast<Half*>(out), rows, width,
               num_threads);
      return 0;
  }
  return 4;
}

}  // extern "C"
