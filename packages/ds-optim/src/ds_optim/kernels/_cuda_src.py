"""CUDA C source of the CuPy optimizer kernels (NVRTC, compiled at first use per device and dtype combination).

The host (``_cupy``) prepends ``#define``s: ``PT``/``GT``/``OT`` (param, grad and copy-out storage types:
``float``, ``bf16_t`` or ``f16_t``), ``HAS_OUT``, ``BLOCK`` (threads per block) and one ``K_<UPDATE>`` that
selects which kernels to compile. Nothing is included: fp16 goes through the PTX ``cvt`` instructions (RNE,
subnormals, inf/NaN as IEEE), bf16 through its bits with our own round-to-nearest-even, so missing NVRTC
include paths cannot break the build.

Numerics are the CPU reference's op order (``kernels/_torch.py`` run on the CPU): every operation is an
explicit ``__f*_rn`` intrinsic, which NVRTC never contracts (and ``--fmad=false`` is passed as well), and the
FMAs are exactly the ones torch's CPU kernels perform (``lerp``, ``add(alpha=)``, ``addcmul``). Bias
corrections are computed once per thread from the device ``step`` in double precision, as the reference does on
the host. ``found_inf != 0`` (NaN included) makes every thread return before any write.

Elementwise kernels are grid-stride loops. With ``vec != 0`` (the host checked that every pointer is aligned
to 4 elements) a thread moves 4 elements per iteration with one 16-byte (fp32) or 8-byte (16-bit) access per
array, then the ``n % 4`` tail is done element by element; otherwise everything is element by element.

LAMB: ``lamb_moments`` (one block per chunk; chunks never cross tensors) updates m, v and writes the float64
sums of p**2 and u**2 of its chunk (deterministic shuffle + shared-memory tree); ``lamb_coeffs`` (one block
per tensor) adds its chunks' partials in a fixed order and writes ``coeff * step_size`` (and ``coeffs``);
``lamb_apply`` recomputes u bit-identically and writes p. No atomics: trust ratios are reproducible.
The chunk table is one int64 array: ``lo[C] | hi[C] | tensor[C] | first[T + 1]``.
"""

SOURCE = r"""
typedef unsigned short u16;
typedef long long i64;

struct bf16_t { u16 x; };
struct f16_t { u16 x; };

// ---- storage <-> fp32 -----------------------------------------------------------------------------------------
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v.x) << 16); }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.x));
    return f;
}

__device__ __forceinline__ u16 bf16_bits(float f) {
    const unsigned int b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (u16)((b >> 16) | 0x40u);  // NaN stays (quiet) NaN
    return (u16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);                  // round to nearest even
}
__device__ __forceinline__ u16 f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
__device__ __forceinline__ void put(float& d, float f) { d = f; }
__device__ __forceinline__ void put(bf16_t& d, float f) { d.x = bf16_bits(f); }
__device__ __forceinline__ void put(f16_t& d, float f) { d.x = f16_bits(f); }

// one element, or four (one 16-byte / 8-byte access) at a time
template <class T> struct io {  // 16-bit storage (bf16_t, f16_t)
    static __device__ __forceinline__ float load1(const T* __restrict__ a, i64 i) { return to_f32(a[i]); }
    static __device__ __forceinline__ void store1(T* __restrict__ a, i64 i, float f) { put(a[i], f); }
    static __device__ __forceinline__ void load4(const T* __restrict__ a, i64 q, float r[4]) {
        const uint2 w = reinterpret_cast<const uint2*>(a)[q];
        T h;
        h.x = (u16)(w.x & 0xffffu); r[0] = to_f32(h);
        h.x = (u16)(w.x >> 16);     r[1] = to_f32(h);
        h.x = (u16)(w.y & 0xffffu); r[2] = to_f32(h);
        h.x = (u16)(w.y >> 16);     r[3] = to_f32(h);
    }
    static __device__ __forceinline__ void store4(T* __restrict__ a, i64 q, const float r[4]) {
        T h[4];
        #pragma unroll
        for (int k = 0; k < 4; ++k) put(h[k], r[k]);
        uint2 w;
        w.x = (unsigned int)h[0].x | ((unsigned int)h[1].x << 16);
        w.y = (unsigned int)h[2].x | ((unsigned int)h[3].x << 16);
        reinterpret_cast<uint2*>(a)[q] = w;
    }
};
template <> struct io<float> {
    static __device__ __forceinline__ float load1(const float* __restrict__ a, i64 i) { return a[i]; }
    static __device__ __forceinline__ void store1(float* __restrict__ a, i64 i, float f) { a[i] = f; }
    static __device__ __forceinline__ void load4(const float* __restrict__ a, i64 q, float r[4]) {
        const float4 w = reinterpret_cast<const float4*>(a)[q];
        r[0] = w.x; r[1] = w.y; r[2] = w.z; r[3] = w.w;
    }
    static __device__ __forceinline__ void store4(float* __restrict__ a, i64 q, const float r[4]) {
        reinterpret_cast<float4*>(a)[q] = make_float4(r[0], r[1], r[2], r[3]);
    }
};

// grads: sign flip (exact), then / grad_scale (torch: g / grad_scale, then neg; the same bits)
__device__ __forceinline__ float prep_grad(float g, float gsign, bool has_scale, float scale) {
    g = __fmul_rn(g, gsign);
    return has_scale ? __fdiv_rn(g, scale) : g;
}

__device__ __forceinline__ bool skip(const float* __restrict__ found_inf) {
    return found_inf != nullptr && *found_inf != 0.f;
}

// deterministic block sum of two doubles (fixed shuffle + tree order); result valid in thread 0
__device__ __forceinline__ void block_sum2(double& a, double& b) {
    __shared__ double sa[BLOCK / 32], sb[BLOCK / 32];
    #pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous call's readers are done
    if (lane == 0) { sa[warp] = a; sb[warp] = b; }
    __syncthreads();
    a = 0.0; b = 0.0;
    if (warp == 0) {
        if (lane < BLOCK / 32) { a = sa[lane]; b = sb[lane]; }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            a += __shfl_down_sync(0xffffffffu, a, off);
            b += __shfl_down_sync(0xffffffffu, b, off);
        }
    }
}

#define GRID_STRIDE_SETUP                                                   \
    const i64 stride = (i64)gridDim.x * blockDim.x;                         \
    const i64 tid = (i64)blockIdx.x * blockDim.x + threadIdx.x;             \
    i64 head = 0;

#ifdef K_ADAM
__device__ __forceinline__ void adam_elem(float& p, float g, float& m, float& v, int l2, float wd, float decay,
                                          float lerp_w, int lerp_small, float b2, float w2, float eps, float bc2s,
                                          float step_size) {
    if (l2) g = __fmaf_rn(p, wd, g);        // g.add(p, alpha=wd)
    else p = __fmul_rn(p, decay);           // p.mul_(1 - lr * wd); decay == 1 without weight decay
    m = __fmaf_rn(lerp_w, __fsub_rn(g, m), lerp_small ? m : g);  // exp_avg.lerp_(g, 1 - beta1)
    v = __fmaf_rn(__fmul_rn(w2, g), g, __fmul_rn(v, b2));        // exp_avg_sq.mul_(b2).addcmul_(g, g, 1 - b2)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2s), eps);
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(step_size, m), denom));  // p.addcdiv_(m, denom, -lr / bc1)
}

extern "C" __global__ void __launch_bounds__(BLOCK) adam(
        PT* __restrict__ p, const GT* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
        OT* __restrict__ out, const i64 n, const int vec, const float* __restrict__ step,
        const float* __restrict__ gscale, const float* __restrict__ found_inf, const float gsign, const int l2,
        const float wd, const float decay, const float lerp_w, const int lerp_small, const float b2, const float w2,
        const float eps, const double lr, const double beta1, const double beta2, const int bias_correction) {
    if (skip(found_inf)) return;
    const bool has_scale = gscale != nullptr;
    const float scale = has_scale ? *gscale : 1.f;
    float step_size = (float)(-lr), bc2s = 1.f;
    if (bias_correction) {
        const double t = (double)*step;
        step_size = (float)(-lr / (1.0 - pow(beta1, t)));
        bc2s = (float)sqrt(1.0 - pow(beta2, t));
    }
    GRID_STRIDE_SETUP
    if (vec) {
        const i64 nq = n >> 2;
        for (i64 q = tid; q < nq; q += stride) {
            float pr[4], gr[4], mr[4], vr[4];
            io<PT>::load4(p, q, pr);
            io<GT>::load4(g, q, gr);
            io<float>::load4(m, q, mr);
            io<float>::load4(v, q, vr);
            #pragma unroll
            for (int k = 0; k < 4; ++k)
                adam_elem(pr[k], prep_grad(gr[k], gsign, has_scale, scale), mr[k], vr[k], l2, wd, decay, lerp_w,
                          lerp_small, b2, w2, eps, bc2s, step_size);
            io<float>::store4(m, q, mr);
            io<float>::store4(v, q, vr);
            io<PT>::store4(p, q, pr);
#if HAS_OUT
            io<OT>::store4(out, q, pr);
#endif
        }
        head = nq << 2;
    }
    for (i64 i = head + tid; i < n; i += stride) {
        float pi = io<PT>::load1(p, i), mi = m[i], vi = v[i];
        adam_elem(pi, prep_grad(io<GT>::load1(g, i), gsign, has_scale, scale), mi, vi, l2, wd, decay, lerp_w,
                  lerp_small, b2, w2, eps, bc2s, step_size);
        m[i] = mi;
        v[i] = vi;
        io<PT>::store1(p, i, pi);
#if HAS_OUT
        io<OT>::store1(out, i, pi);
#endif
    }
}
#endif  // K_ADAM

#ifdef K_LION
__device__ __forceinline__ void lion_elem(float& p, float g, float& m, float decay, float neg_lr, float b1,
                                          float w1, float b2, float w2) {
    const float c = __fmaf_rn(g, w1, __fmul_rn(m, b1));    // exp_avg.mul(b1).add_(g, alpha=1 - b1)
    const float u = c > 0.f ? 1.f : (c < 0.f ? -1.f : 0.f); // sign; 0 for 0 and NaN, as torch.sign
    p = __fmaf_rn(u, neg_lr, __fmul_rn(p, decay));
    m = __fmaf_rn(g, w2, __fmul_rn(m, b2));
}

extern "C" __global__ void __launch_bounds__(BLOCK) lion(
        PT* __restrict__ p, const GT* __restrict__ g, float* __restrict__ m, OT* __restrict__ out, const i64 n,
        const int vec, const float* __restrict__ gscale, const float* __restrict__ found_inf, const float gsign,
        const float decay, const float neg_lr, const float b1, const float w1, const float b2, const float w2) {
    if (skip(found_inf)) return;
    const bool has_scale = gscale != nullptr;
    const float scale = has_scale ? *gscale : 1.f;
    GRID_STRIDE_SETUP
    if (vec) {
        const i64 nq = n >> 2;
        for (i64 q = tid; q < nq; q += stride) {
            float pr[4], gr[4], mr[4];
            io<PT>::load4(p, q, pr);
            io<GT>::load4(g, q, gr);
            io<float>::load4(m, q, mr);
            #pragma unroll
            for (int k = 0; k < 4; ++k)
                lion_elem(pr[k], prep_grad(gr[k], gsign, has_scale, scale), mr[k], decay, neg_lr, b1, w1, b2, w2);
            io<float>::store4(m, q, mr);
            io<PT>::store4(p, q, pr);
#if HAS_OUT
            io<OT>::store4(out, q, pr);
#endif
        }
        head = nq << 2;
    }
    for (i64 i = head + tid; i < n; i += stride) {
        float pi = io<PT>::load1(p, i), mi = m[i];
        lion_elem(pi, prep_grad(io<GT>::load1(g, i), gsign, has_scale, scale), mi, decay, neg_lr, b1, w1, b2, w2);
        m[i] = mi;
        io<PT>::store1(p, i, pi);
#if HAS_OUT
        io<OT>::store1(out, i, pi);
#endif
    }
}
#endif  // K_LION

#ifdef K_ADAGRAD
__device__ __forceinline__ void adagrad_elem(float& p, float g, float& s, int l2, float wd, float eps,
                                             float neg_clr) {
    if (l2) g = __fmaf_rn(p, wd, g);
    s = __fmaf_rn(g, g, s);  // state_sum.addcmul_(g, g, value=1)
    p = __fadd_rn(p, __fdiv_rn(__fmul_rn(neg_clr, g), __fadd_rn(__fsqrt_rn(s), eps)));
}

extern "C" __global__ void __launch_bounds__(BLOCK) adagrad(
        PT* __restrict__ p, const GT* __restrict__ g, float* __restrict__ s, OT* __restrict__ out, const i64 n,
        const int vec, const float* __restrict__ step, const float* __restrict__ gscale,
        const float* __restrict__ found_inf, const float gsign, const int l2, const float wd, const float eps,
        const double lr, const double lr_decay) {
    if (skip(found_inf)) return;
    const bool has_scale = gscale != nullptr;
    const float scale = has_scale ? *gscale : 1.f;
    const float neg_clr = (float)(-(lr / (1.0 + ((double)*step - 1.0) * lr_decay)));
    GRID_STRIDE_SETUP
    if (vec) {
        const i64 nq = n >> 2;
        for (i64 q = tid; q < nq; q += stride) {
            float pr[4], gr[4], sr[4];
            io<PT>::load4(p, q, pr);
            io<GT>::load4(g, q, gr);
            io<float>::load4(s, q, sr);
            #pragma unroll
            for (int k = 0; k < 4; ++k)
                adagrad_elem(pr[k], prep_grad(gr[k], gsign, has_scale, scale), sr[k], l2, wd, eps, neg_clr);
            io<float>::store4(s, q, sr);
            io<PT>::store4(p, q, pr);
#if HAS_OUT
            io<OT>::store4(out, q, pr);
#endif
        }
        head = nq << 2;
    }
    for (i64 i = head + tid; i < n; i += stride) {
        float pi = io<PT>::load1(p, i), si = s[i];
        adagrad_elem(pi, prep_grad(io<GT>::load1(g, i), gsign, has_scale, scale), si, l2, wd, eps, neg_clr);
        s[i] = si;
        io<PT>::store1(p, i, pi);
#if HAS_OUT
        io<OT>::store1(out, i, pi);
#endif
    }
}
#endif  // K_ADAGRAD

#ifdef K_LAMB
__device__ __forceinline__ float lamb_u(float p, float m, float v, float eps, int l2, float wd) {
    const float u = __fdiv_rn(m, __fadd_rn(__fsqrt_rn(v), eps));  // exp_avg / (exp_avg_sq.sqrt() + eps)
    return l2 ? __fmaf_rn(p, wd, u) : u;                           // update.add_(p, alpha=wd)
}

extern "C" __global__ void __launch_bounds__(BLOCK) lamb_moments(
        const PT* __restrict__ p, const GT* __restrict__ g, float* __restrict__ m, float* __restrict__ v,
        const i64* __restrict__ table, const i64 nchunks, double* __restrict__ partial,
        const float* __restrict__ gscale, const float* __restrict__ found_inf, const float gsign, const float b1,
        const float w1, const float b2, const float w2, const float eps, const int l2, const float wd) {
    if (skip(found_inf)) return;
    const bool has_scale = gscale != nullptr;
    const float scale = has_scale ? *gscale : 1.f;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 lo = table[c], hi = table[nchunks + c];
        double sp = 0.0, su = 0.0;
        #pragma unroll 4
        for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            const float gi = prep_grad(io<GT>::load1(g, i), gsign, has_scale, scale);
            const float mi = __fmaf_rn(gi, w1, __fmul_rn(m[i], b1));            // mul_(b1).add_(g, 1 - b1)
            const float vi = __fmaf_rn(__fmul_rn(w2, gi), gi, __fmul_rn(v[i], b2));
            m[i] = mi;
            v[i] = vi;
            const float pi = io<PT>::load1(p, i);
            const float u = lamb_u(pi, mi, vi, eps, l2, wd);
            sp = __dadd_rn(sp, __dmul_rn((double)pi, (double)pi));
            su = __dadd_rn(su, __dmul_rn((double)u, (double)u));
        }
        block_sum2(sp, su);
        if (threadIdx.x == 0) {
            partial[2 * c] = sp;
            partial[2 * c + 1] = su;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK) lamb_coeffs(
        const i64* __restrict__ table, const i64 nchunks, const i64 ntensors, const double* __restrict__ partial,
        float* __restrict__ scaled, float* __restrict__ coeffs, const float* __restrict__ step,
        const float* __restrict__ found_inf, const double lr, const double beta1, const double beta2,
        const int bias_correction, const float min_coeff, const float max_coeff) {
    if (skip(found_inf)) return;
    float step_size = (float)lr;
    if (bias_correction) {
        const double t = (double)*step;
        step_size = (float)(lr * sqrt(1.0 - pow(beta2, t)) / (1.0 - pow(beta1, t)));
    }
    const i64* __restrict__ first = table + 3 * nchunks;
    for (i64 k = blockIdx.x; k < ntensors; k += gridDim.x) {
        double sp = 0.0, su = 0.0;
        for (i64 c = first[k] + threadIdx.x; c < first[k + 1]; c += blockDim.x) {
            sp = __dadd_rn(sp, partial[2 * c]);
            su = __dadd_rn(su, partial[2 * c + 1]);
        }
        block_sum2(sp, su);
        if (threadIdx.x == 0) {
            // fp32 norms, as torch's vector_norm (a sum of squares past FLT_MAX is inf there too)
            const float p_norm = __fsqrt_rn((float)sp), u_norm = __fsqrt_rn((float)su);
            float coeff = 1.f;
            if (p_norm > 0.f && u_norm > 0.f) {
                coeff = __fdiv_rn(p_norm, u_norm);
                if (coeff == coeff) coeff = fminf(fmaxf(coeff, min_coeff), max_coeff);  // clamp keeps NaN
            }
            scaled[k] = __fmul_rn(coeff, step_size);
            if (coeffs != nullptr) coeffs[k] = coeff;
        }
    }
}

extern "C" __global__ void __launch_bounds__(BLOCK) lamb_apply(
        PT* __restrict__ p, const float* __restrict__ m, const float* __restrict__ v, OT* __restrict__ out,
        const i64* __restrict__ table, const i64 nchunks, const float* __restrict__ scaled,
        const float* __restrict__ found_inf, const float eps, const int l2, const float wd) {
    if (skip(found_inf)) return;
    for (i64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const i64 lo = table[c], hi = table[nchunks + c];
        const float k = scaled[table[2 * nchunks + c]];
        #pragma unroll 4
        for (i64 i = lo + threadIdx.x; i < hi; i += blockDim.x) {
            const float pi = io<PT>::load1(p, i);
            const float pn = __fsub_rn(pi, __fmul_rn(lamb_u(pi, m[i], v[i], eps, l2, wd), k));
            io<PT>::store1(p, i, pn);
#if HAS_OUT
            io<OT>::store1(out, i, pn);
#endif
        }
    }
}
#endif  // K_LAMB
"""

#: kernels compiled for each update (``K_<NAME>`` selects them in the source)
KERNELS = {
    "adam": ("adam",),
    "lion": ("lion",),
    "adagrad": ("adagrad",),
    "lamb": ("lamb_moments", "lamb_coeffs", "lamb_apply"),
}
