"""CUDA C source of the 1-bit kernels (compiled at first use by CuPy's NVRTC; cached on disk by CuPy).

Layout facts the kernels rely on (see ``_layout``): chunks are multiples of 128 elements, rows are
``chunk/8 + 16`` bytes, so every row and every 32-bit word of packed signs is 4-byte (indeed 16-byte) aligned.
Packing uses a warp ballot: lane ``k`` holds element ``32*w + k`` of word ``w``, so bit ``k`` of the word is
that element's sign -- the least-significant-first order of ``_packing.pack_signs``.

Four kernels per allreduce (worker_pack, server_pack, server_commit, worker_finish). Work is split by 32-element
words; a warp handles ``UNROLL`` consecutive words per step with all loads issued before any use, so enough
bytes are in flight to saturate HBM. Norm reductions are deterministic: per-block partials in double, summed in
a fixed order by whichever block finishes last (a counter, no float atomics), so runs are reproducible.
Word indices are 32-bit (tensors up to 2**37 elements; the Python side checks).
"""

SOURCE = r"""
#define FULL_MASK 0xffffffffu
#define UNROLL 8

__device__ __forceinline__ double block_sum(double v, double* smem) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(FULL_MASK, v, off);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // smem may still be read by a previous call
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = 0.0;
    if (warp == 0) {
        int nwarps = (blockDim.x + 31) >> 5;
        v = lane < nwarps ? smem[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(FULL_MASK, v, off);
    }
    return v;  // valid in thread 0
}

// Store this block's partial sum; the last block to finish turns all partials into
// scale = sqrt(sum / count) and writes it at `offset_words` of each of `rows` rows. Resets the counter.
__device__ void finish_scale(double block_total, double* partials, unsigned int* counter, long long count,
                             unsigned int* rows_base, unsigned int row_words, unsigned int offset_words, int rows) {
    __shared__ double smem[32];
    __shared__ bool last;
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = block_total;
        __threadfence();
        last = atomicAdd(counter, 1u) == gridDim.x - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    double v = 0.0;
    for (int i = threadIdx.x; i < gridDim.x; i += blockDim.x) v += ((volatile double*)partials)[i];
    v = block_sum(v, smem);
    __shared__ float scale;
    if (threadIdx.x == 0) {
        scale = count > 0 ? (float)sqrt(v / (double)count) : 0.f;
        *counter = 0u;
    }
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        reinterpret_cast<float*>(rows_base + (size_t)r * row_words + offset_words)[0] = scale;
}

// 1 if every worker scale (rows of recv) and every server scale (rows of gathered) is finite; whole block.
__device__ bool all_scales_finite(const unsigned int* recv, const unsigned int* gathered, int world,
                                  unsigned int row_words, unsigned int chunk_words) {
    int bad = 0;
    for (int j = threadIdx.x; j < world; j += blockDim.x) {
        float a = reinterpret_cast<const float*>(recv + (size_t)j * row_words + chunk_words)[0];
        float b = reinterpret_cast<const float*>(gathered + (size_t)j * row_words + chunk_words)[0];
        bad |= !isfinite(a) || !isfinite(b);
    }
    return !__syncthreads_or(bad);
}

__device__ __forceinline__ float sgn(float x) { return x >= 0.f ? 1.f : -1.f; }

// x = buf [/ div] + err (0 past numel); signs packed into row (w / chunk_words) of `send`; scale = RMS(x).
// div: the preconditioner, or null (a uniform branch).
extern "C" __global__ void worker_pack(const float* __restrict__ buf, const float* __restrict__ div,
                                       const float* __restrict__ err,
                                       long long numel, unsigned int total_words, unsigned int chunk_words,
                                       unsigned int row_words, int world, unsigned int* __restrict__ send,
                                       double* __restrict__ partials, unsigned int* __restrict__ counter) {
    __shared__ double smem[32];
    const int lane = threadIdx.x & 31;
    const unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned int nwarps = (gridDim.x * blockDim.x) >> 5;
    float acc = 0.f;
    for (unsigned int w0 = warp * UNROLL; w0 < total_words; w0 += nwarps * UNROLL) {
        float x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long i = (long long)(w0 + u) * 32 + lane;
            x[u] = i < numel ? (div ? buf[i] / div[i] : buf[i]) + err[i] : 0.f;
        }
        unsigned int mine = 0;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            acc += x[u] * x[u];
            unsigned int bits = __ballot_sync(FULL_MASK, x[u] >= 0.f);
            if (lane == u) mine = bits;
        }
        // lanes 0..UNROLL-1 store one word each: one coalesced store per warp
        unsigned int w = w0 + lane;
        if (lane < UNROLL && w < total_words) {
            unsigned int row = w / chunk_words;
            send[(size_t)row * row_words + (w - row * chunk_words)] = mine;
        }
    }
    double total = block_sum((double)acc, smem);
    finish_scale(total, partials, counter, numel, send, row_words, chunk_words, world);
}

// Worker scales of the received rows, staged in shared memory (world <= MAX_WORLD_SHARED) or read in place.
#define MAX_WORLD_SHARED 1024
__device__ const float* stage_scales(const unsigned int* rows, int world, unsigned int row_words,
                                     unsigned int chunk_words, float* smem_scales) {
    if (world > MAX_WORLD_SHARED) return nullptr;
    for (int j = threadIdx.x; j < world; j += blockDim.x)
        smem_scales[j] = reinterpret_cast<const float*>(rows + (size_t)j * row_words + chunk_words)[0];
    __syncthreads();
    return smem_scales;
}

__device__ __forceinline__ float scale_of(const float* staged, const unsigned int* rows, int j,
                                          unsigned int row_words, unsigned int chunk_words) {
    return staged ? staged[j] : reinterpret_cast<const float*>(rows + (size_t)j * row_words + chunk_words)[0];
}

#define SERVER_UNROLL 4

extern "C" __global__ void server_pack(const unsigned int* __restrict__ recv, const float* __restrict__ serr,
                                       int world, unsigned int row_words, unsigned int chunk_words,
                                       long long valid, unsigned int* __restrict__ send_row,
                                       double* __restrict__ partials, unsigned int* __restrict__ counter) {
    __shared__ double smem[32];
    __shared__ float smem_scales[MAX_WORLD_SHARED];
    const float* staged = stage_scales(recv, world, row_words, chunk_words, smem_scales);
    const int lane = threadIdx.x & 31;
    const unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned int nwarps = (gridDim.x * blockDim.x) >> 5;
    float acc = 0.f;
    for (unsigned int w0 = warp * SERVER_UNROLL; w0 < chunk_words; w0 += nwarps * SERVER_UNROLL) {
        float e[SERVER_UNROLL];
#pragma unroll
        for (int u = 0; u < SERVER_UNROLL; ++u) {
            long long i = (long long)(w0 + u) * 32 + lane;
            e[u] = i < valid ? serr[i] : 0.f;
        }
        unsigned int mine = 0;
#pragma unroll
        for (int u = 0; u < SERVER_UNROLL; ++u) {
            unsigned int w = w0 + u;
            float m = 0.f;
            if (w < chunk_words) {
                m = 0.f;
                for (int j = 0; j < world; ++j) {
                    float s = scale_of(staged, recv, j, row_words, chunk_words);
                    m += ((recv[(size_t)j * row_words + w] >> lane) & 1u) ? s : -s;
                }
                m = ((long long)w * 32 + lane) < valid ? m / (float)world + e[u] : 0.f;
            }
            acc += m * m;
            unsigned int bits = __ballot_sync(FULL_MASK, m >= 0.f);
            if (lane == u) mine = bits;
        }
        unsigned int w = w0 + lane;
        if (lane < SERVER_UNROLL && w < chunk_words) send_row[w] = mine;
    }
    double total = block_sum((double)acc, smem);
    finish_scale(total, partials, counter, valid, send_row, 0u, chunk_words, 1);
}

// server_err = m - server_scale * sign(m), only if every scale of this call is finite.
extern "C" __global__ void server_commit(const unsigned int* __restrict__ recv, const unsigned int* __restrict__ gathered,
                                         float* __restrict__ serr, int world, int rank, unsigned int row_words,
                                         unsigned int chunk_words, long long valid) {
    __shared__ float smem_scales[MAX_WORLD_SHARED];
    if (!all_scales_finite(recv, gathered, world, row_words, chunk_words)) return;
    const float* staged = stage_scales(recv, world, row_words, chunk_words, smem_scales);
    const float sscale = reinterpret_cast<const float*>(gathered + (size_t)rank * row_words + chunk_words)[0];
    const int lane = threadIdx.x & 31;
    const unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (unsigned int w0 = warp * SERVER_UNROLL; w0 < chunk_words; w0 += nwarps * SERVER_UNROLL) {
        float e[SERVER_UNROLL];
#pragma unroll
        for (int u = 0; u < SERVER_UNROLL; ++u) {
            long long i = (long long)(w0 + u) * 32 + lane;
            e[u] = i < valid ? serr[i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < SERVER_UNROLL; ++u) {
            unsigned int w = w0 + u;
            long long i = (long long)w * 32 + lane;
            if (i < valid) {
                float m = 0.f;
                for (int j = 0; j < world; ++j) {
                    float s = scale_of(staged, recv, j, row_words, chunk_words);
                    m += ((recv[(size_t)j * row_words + w] >> lane) & 1u) ? s : -s;
                }
                m = m / (float)world + e[u];
                serr[i] = m - sscale * sgn(m);
            }
        }
    }
}

// buf[i] = decoded average (times out_mul, times div); worker error committed from the unchanged
// buf [/ div] + err. Non-finite scales anywhere: buf = NaN, error untouched, and block 0 bumps *nonfinite_count.
extern "C" __global__ void worker_finish(float* __restrict__ buf, const float* __restrict__ div,
                                         float* __restrict__ err,
                                         const unsigned int* __restrict__ recv,
                                         const unsigned int* __restrict__ gathered, int world, int rank,
                                         long long numel, unsigned int total_words, unsigned int chunk_words,
                                         unsigned int row_words, float out_mul,
                                         long long* __restrict__ nonfinite_count) {
    const bool ok = all_scales_finite(recv, gathered, world, row_words, chunk_words);
    if (!ok && blockIdx.x == 0 && threadIdx.x == 0) *nonfinite_count += 1;
    const float wscale = reinterpret_cast<const float*>(recv + (size_t)rank * row_words + chunk_words)[0];
    const int lane = threadIdx.x & 31;
    const unsigned int warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const unsigned int nwarps = (gridDim.x * blockDim.x) >> 5;
    for (unsigned int w0 = warp * UNROLL; w0 < total_words; w0 += nwarps * UNROLL) {
        float b[UNROLL], e[UNROLL], d[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long i = (long long)(w0 + u) * 32 + lane;
            b[u] = i < numel ? buf[i] : 0.f;
            e[u] = i < numel ? err[i] : 0.f;
            d[u] = div && i < numel ? div[i] : 1.f;
        }
        // the row and offset of word w0, advanced word by word: one division per UNROLL words
        unsigned int row = w0 / chunk_words;
        unsigned int off = w0 - row * chunk_words;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long i = (long long)(w0 + u) * 32 + lane;
            if (i < numel) {
                const unsigned int* r = gathered + (size_t)row * row_words;
                float s = reinterpret_cast<const float*>(r + chunk_words)[0];
                float out = ((r[off] >> lane) & 1u) ? s : -s;
                if (ok) {
                    float x = (div ? b[u] / d[u] : b[u]) + e[u];
                    err[i] = x - wscale * sgn(x);
                    buf[i] = div ? (out * out_mul) * d[u] : out * out_mul;
                } else {
                    buf[i] = __int_as_float(0x7fc00000);  // NaN
                }
            }
            if (++off == chunk_words) { off = 0; ++row; }
        }
    }
}
"""
