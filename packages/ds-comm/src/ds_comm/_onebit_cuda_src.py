"""CUDA C source of the 1-bit kernels (compiled at first use by CuPy's NVRTC; cached on disk by CuPy).

Layout facts the kernels rely on (see ``_layout``): chunks are multiples of 128 elements, rows are
``chunk/8 + 16`` bytes, so every row and every 32-bit word of packed signs is 4-byte (indeed 16-byte) aligned.
Packing uses a warp ballot: lane ``k`` holds element ``32*w + k`` of word ``w``, so bit ``k`` of the word is
that element's sign -- the least-significant-first order of ``_packing.pack_signs``.

Work is split by 32-element words: a warp handles ``UNROLL`` consecutive words per step (loads first, then
compute, to keep several loads in flight per thread). Reductions are deterministic: per-block partials in
double, summed in a fixed order by a one-block finalize kernel (no float atomics), so a run is reproducible.
"""

SOURCE = r"""
#define UNROLL 4
#define FULL_MASK 0xffffffffu

__device__ __forceinline__ double block_sum(double v, double* smem) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(FULL_MASK, v, off);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
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

__device__ __forceinline__ float sgn(float x) { return x >= 0.f ? 1.f : -1.f; }

// x = buf + err (0 past numel); packed signs go to row (w / chunk_words) of `send`; sum(x^2) per block.
extern "C" __global__ void worker_pack(const float* __restrict__ buf, const float* __restrict__ err,
                                       long long numel, long long total_words, long long chunk_words,
                                       long long row_words, unsigned int* __restrict__ send,
                                       double* __restrict__ partials) {
    __shared__ double smem[32];
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    float acc = 0.f;
    for (long long w0 = warp * UNROLL; w0 < total_words; w0 += nwarps * UNROLL) {
        float x[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long i = (w0 + u) * 32 + lane;
            x[u] = i < numel ? buf[i] + err[i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long w = w0 + u;
            if (w < total_words) {  // warp-uniform
                acc += x[u] * x[u];
                unsigned int bits = __ballot_sync(FULL_MASK, x[u] >= 0.f);
                if (lane == 0) send[(w / chunk_words) * row_words + (w % chunk_words)] = bits;
            }
        }
    }
    double s = block_sum((double)acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// scale = sqrt(sum(partials) / count) (0 if count == 0), written at `offset_words` of each of `rows` rows.
extern "C" __global__ void finalize_scale(const double* __restrict__ partials, int nparts, long long count,
                                          unsigned int* __restrict__ rows_base, long long row_words,
                                          long long offset_words, int rows) {
    __shared__ double smem[32];
    double v = 0.0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) v += partials[i];
    v = block_sum(v, smem);
    __shared__ float scale;
    if (threadIdx.x == 0) scale = count > 0 ? (float)sqrt(v / (double)count) : 0.f;
    __syncthreads();
    for (int r = threadIdx.x; r < rows; r += blockDim.x)
        reinterpret_cast<float*>(rows_base + r * row_words + offset_words)[0] = scale;
}

// Server chunk value of element (word w, lane): mean_j(+-scale_j) + server_err, 0 past `valid`.
__device__ __forceinline__ float server_value(const unsigned int* __restrict__ recv, long long w, int lane,
                                              int world, long long row_words, long long chunk_words,
                                              const float* __restrict__ serr, long long valid) {
    float m = 0.f;
    for (int j = 0; j < world; ++j) {
        const unsigned int* row = recv + j * row_words;
        float s = reinterpret_cast<const float*>(row + chunk_words)[0];
        m += ((row[w] >> lane) & 1u) ? s : -s;
    }
    long long e = w * 32 + lane;
    return e < valid ? m / (float)world + serr[e] : 0.f;
}

extern "C" __global__ void server_pack(const unsigned int* __restrict__ recv, const float* __restrict__ serr,
                                       int world, long long row_words, long long chunk_words, long long valid,
                                       unsigned int* __restrict__ send_row, double* __restrict__ partials) {
    __shared__ double smem[32];
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    float acc = 0.f;
    for (long long w = warp; w < chunk_words; w += nwarps) {
        float m = server_value(recv, w, lane, world, row_words, chunk_words, serr, valid);
        acc += m * m;
        unsigned int bits = __ballot_sync(FULL_MASK, m >= 0.f);
        if (lane == 0) send_row[w] = bits;
    }
    double s = block_sum((double)acc, smem);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}

// flag = 1 iff every worker scale (rows of recv) and server scale (rows of gathered) is finite.
extern "C" __global__ void check_finite(const unsigned int* __restrict__ recv, const unsigned int* __restrict__ gathered,
                                        int world, long long row_words, long long chunk_words,
                                        int* __restrict__ flag) {
    __shared__ int bad;
    if (threadIdx.x == 0) bad = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < world; j += blockDim.x) {
        float a = reinterpret_cast<const float*>(recv + j * row_words + chunk_words)[0];
        float b = reinterpret_cast<const float*>(gathered + j * row_words + chunk_words)[0];
        if (!isfinite(a) || !isfinite(b)) atomicOr(&bad, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) flag[0] = bad ? 0 : 1;
}

extern "C" __global__ void server_commit(const unsigned int* __restrict__ recv, const unsigned int* __restrict__ gathered,
                                         float* __restrict__ serr, int world, int rank, long long row_words,
                                         long long chunk_words, long long valid, const int* __restrict__ flag) {
    if (!flag[0]) return;
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    const float sscale = reinterpret_cast<const float*>(gathered + rank * row_words + chunk_words)[0];
    for (long long w = warp; w < chunk_words; w += nwarps) {
        long long e = w * 32 + lane;
        if (e < valid) {
            float m = server_value(recv, w, lane, world, row_words, chunk_words, serr, valid);
            serr[e] = m - sscale * sgn(m);
        }
    }
}

// buf[i] = decoded average (or sum); worker error committed from the unchanged buf + err.
extern "C" __global__ void worker_finish(float* __restrict__ buf, float* __restrict__ err,
                                         const unsigned int* __restrict__ recv,
                                         const unsigned int* __restrict__ gathered, int rank,
                                         long long numel, long long total_words, long long chunk_words,
                                         long long row_words, float out_mul, const int* __restrict__ flag) {
    const int lane = threadIdx.x & 31;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    const bool ok = flag[0] != 0;
    const float wscale = reinterpret_cast<const float*>(recv + rank * row_words + chunk_words)[0];
    for (long long w0 = warp * UNROLL; w0 < total_words; w0 += nwarps * UNROLL) {
        float b[UNROLL], e[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long i = (w0 + u) * 32 + lane;
            b[u] = i < numel ? buf[i] : 0.f;
            e[u] = i < numel ? err[i] : 0.f;
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            long long w = w0 + u;
            long long i = w * 32 + lane;
            if (i < numel) {
                const unsigned int* row = gathered + (w / chunk_words) * row_words;
                float s = reinterpret_cast<const float*>(row + chunk_words)[0];
                unsigned int word = row[w % chunk_words];
                float out = ((word >> lane) & 1u) ? s : -s;
                if (ok) {
                    float x = b[u] + e[u];
                    err[i] = x - wscale * sgn(x);
                    buf[i] = out * out_mul;
                } else {
                    buf[i] = __int_as_float(0x7fc00000);  // NaN
                }
            }
        }
    }
}
"""
