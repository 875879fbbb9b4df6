// Paged attention on CPU over FastServe's block pool, read in place.
//
// One call covers a whole step: decodes (one query row each) and prefill chunks (many rows,
// possibly starting mid-prompt) of any number of jobs, with the same metadata a GPU varlen
// kernel takes (vLLM's flash_attn_varlen_func with a block table): query rows job after job,
// cumulative query starts, context lengths, block tables. The keys and values of every query are
// in the pool already (the step writes this step's K/V first), addressed as
// (block_tables[seq][pos / block_size], pos % block_size).
//
// Work items are (job, KV head, tile of up to kTile query rows); each runs flash attention's
// online softmax over its keys one block at a time, for all query heads that share the KV head
// (GQA), so every key block is loaded once per tile and stays in L1 while those rows use it.
// Sums and softmax are in float32 whatever the storage type. OpenMP spreads work items over the
// threads; it is the same libgomp that torch's own CPU kernels run on (one thread pool).
//
// Built at first use with the other native ops (services/worker/native/__init__.py) and called
// through ctypes with raw pointers and strides: no torch headers, so it builds in seconds.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "storage.h"

namespace {

constexpr int kTile = 16;  // query rows of one job per work item

struct Params {
  const void* query;
  int64_t q_stride_row, q_stride_head;
  const void* key_cache;
  const void* value_cache;
  int64_t kv_stride_block, kv_stride_pos, kv_stride_head;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* query_start;  // [num_seqs + 1]
  const int32_t* seq_lens;     // [num_seqs]
  int32_t num_seqs, num_heads, num_kv_heads, head_dim, block_size;
  float scale;
  int32_t window;  // 0: none; else a query at p sees keys in (p - window, p]
  void* out;
  int64_t out_stride_row, out_stride_head;
  int32_t num_threads;
};

template <typename T>
void run_item(const Params& p, int seq, int kv_head, int row_begin, int row_end) {
  const int group = p.num_heads / p.num_kv_heads;
  const int dim = p.head_dim;
  const int q_len = p.query_start[seq + 1] - p.query_start[seq];
  const int ctx = p.seq_lens[seq];
  const int first_pos = ctx - q_len;  // position of the job's first query row
  const int num_rows = (row_end - row_begin) * group;

  // Query vectors (pre-scaled), running state and one block of keys and values, in float32,
  // in a per-thread scratch buffer that grows to the largest item seen.
  thread_local std::vector<float> scratch;
  const size_t need = static_cast<size_t>(num_rows) * (2 * dim + 3) +
                      static_cast<size_t>(p.block_size) * (2 * dim + 1);
  if (scratch.size() < need) scratch.resize(need);
  float* q_all = scratch.data();
  float* acc_all = q_all + static_cast<size_t>(num_rows) * dim;
  float* k_all = acc_all + static_cast<size_t>(num_rows) * dim;
  float* v_all = k_all + static_cast<size_t>(p.block_size) * dim;
  float* row_max = v_all + static_cast<size_t>(p.block_size) * dim;
  float* row_sum = row_max + num_rows;
  float* scores = row_sum + num_rows;
  int* row_pos = reinterpret_cast<int*>(scores + p.block_size);  // int and float: same size
  auto q = [&](int i) { return q_all + static_cast<size_t>(i) * dim; };
  auto acc = [&](int i) { return acc_all + static_cast<size_t>(i) * dim; };
  auto k_block = [&](int j) { return k_all + static_cast<size_t>(j) * dim; };
  auto v_block = [&](int j) { return v_all + static_cast<size_t>(j) * dim; };
  const T* query = static_cast<const T*>(p.query);
  for (int r = row_begin; r < row_end; ++r) {
    for (int g = 0; g < group; ++g) {
      int i = (r - row_begin) * group + g;
      const T* src = query + (p.query_start[seq] + r) * p.q_stride_row +
                     (kv_head * group + g) * p.q_stride_head;
      for (int d = 0; d < dim; ++d) q(i)[d] = to_float(src[d]) * p.scale;
      std::fill(acc(i), acc(i) + dim, 0.0f);
      row_max[i] = -std::numeric_limits<float>::infinity();
      row_sum[i] = 0.0f;
      row_pos[i] = first_pos + r;
    }
  }
  const int last_pos = first_pos + row_end - 1;  // newest query of the tile
  int lowest_key = 0;
  if (p.window > 0) lowest_key = std::max(0, first_pos + row_begin - p.window + 1);
  const T* keys = static_cast<const T*>(p.key_cache);
  const T* values = static_cast<const T*>(p.value_cache);
  const int32_t* table = p.block_tables + seq * p.block_table_stride;

  for (int block_start = (lowest_key / p.block_size) * p.block_size; block_start <= last_pos;
       block_start += p.block_size) {
    const int64_t base = static_cast<int64_t>(table[block_start / p.block_size]) *
                             p.kv_stride_block + kv_head * p.kv_stride_head;
    const int num_keys = std::min(p.block_size, last_pos + 1 - block_start);
    for (int j = 0; j < num_keys; ++j) {
      const T* k = keys + base + j * p.kv_stride_pos;
      const T* v = values + base + j * p.kv_stride_pos;
      float* kf = k_block(j);
      float* vf = v_block(j);
#pragma omp simd
      for (int d = 0; d < dim; ++d) {
        kf[d] = to_float(k[d]);
        vf[d] = to_float(v[d]);
      }
    }
    for (int i = 0; i < num_rows; ++i) {
      // Keys this row sees in the block: [lo, hi).
      int lo = 0, hi = std::min(num_keys, row_pos[i] - block_start + 1);
      if (p.window > 0) lo = std::max(0, row_pos[i] - p.window + 1 - block_start);
      if (hi <= lo) continue;
      float block_max = -std::numeric_limits<float>::infinity();
      for (int j = lo; j < hi; ++j) {
        const float* qi = q(i);
        const float* kj = k_block(j);
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int d = 0; d < dim; ++d) s += qi[d] * kj[d];
        scores[j] = s;
        block_max = std::max(block_max, s);
      }
      const float new_max = std::max(row_max[i], block_max);
      const float rescale = std::exp(row_max[i] - new_max);  // exp(-inf) = 0 on the first block
      row_max[i] = new_max;
      float sum = row_sum[i] * rescale;
      float* a = acc(i);
#pragma omp simd
      for (int d = 0; d < dim; ++d) a[d] *= rescale;
      for (int j = lo; j < hi; ++j) {
        const float w = std::exp(scores[j] - new_max);
        sum += w;
        const float* vj = v_block(j);
#pragma omp simd
        for (int d = 0; d < dim; ++d) a[d] += w * vj[d];
      }
      row_sum[i] = sum;
    }
  }
  T* out = static_cast<T*>(p.out);
  for (int r = row_begin; r < row_end; ++r) {
    for (int g = 0; g < group; ++g) {
      int i = (r - row_begin) * group + g;
      T* dst = out + (p.query_start[seq] + r) * p.out_stride_row +
               (kv_head * group + g) * p.out_stride_head;
      const float inv = row_sum[i] > 0.0f ? 1.0f / row_sum[i] : 0.0f;
      for (int d = 0; d < dim; ++d) from_float(acc(i)[d] * inv, dst + d);
    }
  }
}

template <typename T>
void run(const Params& p) {
  // Work items: (seq, kv head, tile). Tiles are listed up front so OpenMP can balance them.
  std::vector<int32_t> items;  // triples: seq, kv_head, first row
  items.reserve(static_cast<size_t>(p.num_seqs) * p.num_kv_heads * 3);
  for (int s = 0; s < p.num_seqs; ++s) {
    int q_len = p.query_start[s + 1] - p.query_start[s];
    for (int h = 0; h < p.num_kv_heads; ++h) {
      for (int r = 0; r < q_len; r += kTile) {
        items.push_back(s);
        items.push_back(h);
        items.push_back(r);
      }
    }
  }
  const int64_t num_items = static_cast<int64_t>(items.size() / 3);
#pragma omp parallel for schedule(dynamic, 1) num_threads(p.num_threads) if (num_items > 1)
  for (int64_t n = 0; n < num_items; ++n) {
    int s = items[3 * n], h = items[3 * n + 1], r = items[3 * n + 2];
    int q_len = p.query_start[s + 1] - p.query_start[s];
    run_item<T>(p, s, h, r, std::min(q_len, r + kTile));
  }
}

}  // namespace

extern "C" {

// dtype: 0 float32, 1 bfloat16, 2 float16. Returns 0, or a non-zero code for arguments the
// kernel cannot take (the Python side checks them first and names the problem).
int fastserve_paged_attention(const Params* p, int dtype) {
  if (p->head_dim <= 0 || p->block_size <= 0) return 1;
  if (p->num_kv_heads <= 0 || p->num_heads % p->num_kv_heads != 0) return 2;
  switch (dtype) {
    case 0: run<float>(*p); return 0;
    case 1: run<uint16_t>(*p); return 0;
    case 2: run<Half>(*p); return 0;
    default: return 4;
  }
}

}  // extern "C"
