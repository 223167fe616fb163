// Closest-candidate search kernels, f32, row-major contiguous matrices.
// Keys are "smaller is better"; ties go to the lower candidate index; empty slots hold
// key +inf and index -1. The CPU path in src/distance/ is the reference.
//
// l1_topk_f32: a block takes L1_QUERIES queries (kept in shared memory) and scans every
//   candidate; each thread keeps a private top-k per query over the candidates it visits,
//   then the block merges them, reusing the query area for the merge buffers once every thread
//   is past the scan (shared memory = max(queries, merge buffers)). Optional classes skip
//   same-class candidates.
// topk_rows_f32: the fused epilogue after a GEMM tile of dot products [q, n]:
//   key = mode 0: cand_sq_norm[j] - 2 * dot (L2 without the per-query constant)
//         mode 1: -dot (cosine on normalised rows)
//   and the tile's top-k per row, indices offset by `col0`.

#define MAX_K 16
#define L1_QUERIES 8
#define THREADS 256

__device__ __forceinline__ bool better(float a, long long ia, float b, long long ib) {
  return a < b || (a == b && (ib < 0 || ia < ib));
}

__device__ __forceinline__ void push(float* keys, long long* idx, int k, float key, long long i) {
  if (!better(key, i, keys[k - 1], idx[k - 1])) return;
  int pos = k - 1;
  while (pos > 0 && better(key, i, keys[pos - 1], idx[pos - 1])) {
    keys[pos] = keys[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  keys[pos] = key;
  idx[pos] = i;
}

// Merges the per-thread lists in shared memory (THREADS lists of k for one query) into out.
__device__ void block_merge(float* s_keys, long long* s_idx, int k, float* out_keys, long long* out_idx) {
  if (threadIdx.x == 0) {
    float keys[MAX_K];
    long long idx[MAX_K];
    for (int j = 0; j < k; ++j) { keys[j] = INFINITY; idx[j] = -1; }
    for (int t = 0; t < blockDim.x; ++t)
      for (int j = 0; j < k; ++j)
        if (s_idx[t * k + j] >= 0) push(keys, idx, k, s_keys[t * k + j], s_idx[t * k + j]);
    for (int j = 0; j < k; ++j) { out_keys[j] = keys[j]; out_idx[j] = idx[j]; }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) l1_topk_f32(
    const float* __restrict__ q, const float* __restrict__ c,
    const long long* __restrict__ q_class, const long long* __restrict__ c_class,
    float* __restrict__ out_keys, long long* __restrict__ out_idx,
    int nq, int nc, int dim, int k) {
  extern __shared__ unsigned char shared[];
  float* s_q = (float*)shared;                                   // L1_QUERIES * dim
  // The merge buffers alias the query area: written only after the barrier below the scan.
  float* s_keys = (float*)shared;                                 // THREADS * k
  long long* s_idx = (long long*)(s_keys + THREADS * k + (THREADS * k) % 2);  // THREADS * k
  int q0 = blockIdx.x * L1_QUERIES;
  int nqb = min(L1_QUERIES, nq - q0);
  for (int i = threadIdx.x; i < nqb * dim; i += blockDim.x) s_q[i] = q[(long long)q0 * dim + i];
  __syncthreads();

  float keys[L1_QUERIES][MAX_K];
  long long idx[L1_QUERIES][MAX_K];
  for (int a = 0; a < L1_QUERIES; ++a)
    for (int j = 0; j < k; ++j) { keys[a][j] = INFINITY; idx[a][j] = -1; }

  for (int cand = threadIdx.x; cand < nc; cand += blockDim.x) {
    const float* row = c + (long long)cand * dim;
    float acc[L1_QUERIES];
    for (int a = 0; a < L1_QUERIES; ++a) acc[a] = 0.f;
    for (int d = 0; d < dim; ++d) {
      float v = row[d];
      for (int a = 0; a < L1_QUERIES; ++a) acc[a] += fabsf(s_q[a * dim + d] - v);
    }
    for (int a = 0; a < nqb; ++a) {
      if (q_class && q_class[q0 + a] == c_class[cand]) continue;
      push(keys[a], idx[a], k, acc[a], cand);
    }
  }
  __syncthreads();  // every thread is done with s_q before the merge buffers overwrite it
  for (int a = 0; a < nqb; ++a) {
    for (int j = 0; j < k; ++j) {
      s_keys[threadIdx.x * k + j] = keys[a][j];
      s_idx[threadIdx.x * k + j] = idx[a][j];
    }
    __syncthreads();
    block_merge(s_keys, s_idx, k, out_keys + (long long)(q0 + a) * k, out_idx + (long long)(q0 + a) * k);
    __syncthreads();
  }
}

// One block per row of the dot-product tile.
extern "C" __global__ void __launch_bounds__(THREADS) topk_rows_f32(
    const float* __restrict__ dots, const float* __restrict__ c_sq_norm,
    const long long* __restrict__ q_class, const long long* __restrict__ c_class,
    float* __restrict__ out_keys, long long* __restrict__ out_idx,
    int rows, int cols, int col0, int row0, int k, int mode) {
  extern __shared__ unsigned char shared[];
  float* s_keys = (float*)shared;
  long long* s_idx = (long long*)(s_keys + THREADS * k + (THREADS * k) % 2);
  int r = blockIdx.x;
  if (r >= rows) return;
  float keys[MAX_K];
  long long idx[MAX_K];
  for (int j = 0; j < k; ++j) { keys[j] = INFINITY; idx[j] = -1; }
  const float* row = dots + (long long)r * cols;
  for (int j = threadIdx.x; j < cols; j += blockDim.x) {
    long long cand = (long long)col0 + j;
    if (q_class && q_class[row0 + r] == c_class[cand]) continue;
    float key = mode == 0 ? c_sq_norm[cand] - 2.f * row[j] : -row[j];
    push(keys, idx, k, key, cand);
  }
  for (int j = 0; j < k; ++j) {
    s_keys[threadIdx.x * k + j] = keys[j];
    s_idx[threadIdx.x * k + j] = idx[j];
  }
  __syncthreads();
  block_merge(s_keys, s_idx, k, out_keys + (long long)r * k, out_idx + (long long)r * k);
}
