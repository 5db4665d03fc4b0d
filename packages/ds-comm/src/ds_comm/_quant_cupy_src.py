"""CUDA C source of the blockwise int8/int4 quantization kernels (compiled at first use by CuPy's NVRTC).

The kernels reproduce :mod:`ds_comm.quantize`'s torch reference bit for bit, so every step copies the
reference's arithmetic, not just its mathematics:

- Subnormals are kept, as torch's kernels keep them: CuPy compiles with ``-ftz=true`` (flush to zero), so every
  float operation that can meet a subnormal is written as PTX without ``.ftz`` (``div_rn``, ``mul_rn``, ...), and
  the tests on magnitudes and scales are done on the bits.
- ``scale = absmax / qmax`` and the slow-path ``x / scale`` are IEEE divisions (``div.rn.f32``), like torch's
  tensor-by-tensor division on CUDA; dequantization is ``mul.rn.f32(q, scale)`` then torch's NaN-preserving clamp.
- The fast path of the codes multiplies by ``r = fl(1 / scale)`` (``rcp.rn.f32``) instead of dividing. That can
  differ from ``fl(x / scale)`` by at most ~3 * 2**-24 relative (|x / scale| <= ~127, so < 5e-5 absolute), which
  can only change ``rint`` when the quotient lies that close to a half-integer. Whenever ``x * r`` is within
  2**-12 of one (about 1 element in 2,000), its vector is recomputed with the exact division and the reference's
  clamp; blocks whose scale is subnormal (``1 / scale`` would overflow) take the exact path for every element
  (``r`` = NaN).
- absmax is the maximum of the magnitudes' bit patterns (``bits & 0x7fffffff``): for non-negative floats the
  integer order is the float order, and NaN / inf sort above every finite value, so one integer max gives both
  the block's absmax and whether it holds a non-finite value (no fmax, which would drop NaN).
- fp16 / bf16 are converted with the same PTX instructions torch's CUDA kernels use (``cvt.f32.f16``,
  ``cvt.rn.f16.f32``, ``cvt.rn.bf16.f32`` on sm_80+, torch's own round-to-nearest-even below), so even NaN
  payloads match.

Work split. ``G`` lanes (a power of two, up to a warp) share one quantization block: the fewest that cover it
with one ``VEC``-element vector each, so small blocks do not idle most of a warp. Every lane loads up to
``R = min(TILE / VEC, MAX_SLOTS)`` vectors of its block (one vector load each when ``ALIGNED``; the host checks
alignment) before using any of them: a block of up to ``G * R`` vectors (2,048 elements for fp32, bf16 and fp16
at full vector width: the default block size) is read from HBM once and quantized from registers; a longer one
is read twice, in chunks (the second read mostly hits L2). Reductions: a lane's own max, then xor shuffles
across its group. Rows: block ``gb`` is block ``gb % nb`` of row ``gb / nb``; blocks never cross rows (the last
block of a row may be short, and its padding is never stored).
"""

SOURCE = r"""
#define FULL_MASK 0xffffffffu
#define TILE 64                         // elements per lane per step (matches _TILE in _quant_cupy)
#define MAX_SLOTS 16                    // vectors per lane per step (matches _MAX_SLOTS in _quant_cupy)
#define NONFINITE 0x7f800000u           // magnitude bits >= this: inf or NaN
#define REF_NAN 0x7fc00000u             // what torch.where(..., torch.nan) stores
#define NEAR_TIE (0.5f - 0x1p-12f)      // |frac(x * r)| above this: recompute with the exact division

// own integer min/max: NVRTC compiles without the runtime headers that overload min/max for every type
__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }

template <int N> struct Raw;            // an N-byte load / store unit
template <> struct Raw<1> { typedef unsigned char T; };
template <> struct Raw<2> { typedef unsigned short T; };
template <> struct Raw<4> { typedef unsigned int T; };
template <> struct Raw<8> { typedef uint2 T; };
template <> struct Raw<16> { typedef uint4 T; };

template <int KIND> struct Conv;        // 0 float32, 1 float16, 2 bfloat16
template <> struct Conv<0> {
    typedef float T;
    static __device__ __forceinline__ float widen(float v) { return v; }
    static __device__ __forceinline__ float narrow(float v) { return v; }
};
template <> struct Conv<1> {
    typedef unsigned short T;
    static __device__ __forceinline__ float widen(unsigned short h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ unsigned short narrow(float f) {
        unsigned short h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};
template <> struct Conv<2> {
    typedef unsigned short T;
    static __device__ __forceinline__ float widen(unsigned short h) { return __uint_as_float((unsigned int)h << 16); }
    static __device__ __forceinline__ unsigned short narrow(float f) {
#if __CUDA_ARCH__ >= 800
        unsigned short h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
#else
        if (f != f) return (unsigned short)0x7fc0;  // c10::detail::round_to_nearest_even, as torch does here
        unsigned int u = __float_as_uint(f);
        return (unsigned short)((u + (((u >> 16) & 1u) + 0x7fffu)) >> 16);
#endif
    }
};

// VEC elements from p (count <= VEC of them real, the rest 0) as fp32.
template <int KIND, int VEC, bool ALIGNED>
__device__ __forceinline__ void load_x(const typename Conv<KIND>::T* p, int count, float* f) {
    typedef typename Conv<KIND>::T T;
    if (ALIGNED && count == VEC) {
        typedef typename Raw<VEC * sizeof(T)>::T R;
        union { R r; T e[VEC]; } u;
        u.r = *reinterpret_cast<const R*>(p);
#pragma unroll
        for (int i = 0; i < VEC; ++i) f[i] = Conv<KIND>::widen(u.e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) f[i] = i < count ? Conv<KIND>::widen(p[i]) : 0.f;
    }
}

template <int KIND, int VEC, bool ALIGNED>
__device__ __forceinline__ void store_y(typename Conv<KIND>::T* p, int count, const float* f) {
    typedef typename Conv<KIND>::T T;
    if (ALIGNED && count == VEC) {
        typedef typename Raw<VEC * sizeof(T)>::T R;
        union { R r; T e[VEC]; } u;
#pragma unroll
        for (int i = 0; i < VEC; ++i) u.e[i] = Conv<KIND>::narrow(f[i]);
        *reinterpret_cast<R*>(p) = u.r;
    } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i)
            if (i < count) p[i] = Conv<KIND>::narrow(f[i]);
    }
}

// CB code bytes (little-endian in `v`), all of them when the vector is whole, else the first `bytes`.
template <int CB>
__device__ __forceinline__ void store_codes(unsigned char* p, unsigned long long v, int bytes) {
    if (bytes == CB) {
        if constexpr (CB == 1) *p = (unsigned char)v;
        else if constexpr (CB == 2) *reinterpret_cast<unsigned short*>(p) = (unsigned short)v;
        else if constexpr (CB == 4) *reinterpret_cast<unsigned int*>(p) = (unsigned int)v;
        else {
            uint2 w;
            w.x = (unsigned int)v;
            w.y = (unsigned int)(v >> 32);
            *reinterpret_cast<uint2*>(p) = w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < CB; ++i)
            if (i < bytes) p[i] = (unsigned char)(v >> (8 * i));
    }
}

template <int CB>
__device__ __forceinline__ unsigned long long load_codes(const unsigned char* p, int bytes) {
    if (bytes == CB) {
        if constexpr (CB == 1) return *p;
        else if constexpr (CB == 2) return *reinterpret_cast<const unsigned short*>(p);
        else if constexpr (CB == 4) return *reinterpret_cast<const unsigned int*>(p);
        else {
            uint2 w = *reinterpret_cast<const uint2*>(p);
            return (unsigned long long)w.x | ((unsigned long long)w.y << 32);
        }
    }
    unsigned long long v = 0;
#pragma unroll
    for (int i = 0; i < CB; ++i)
        if (i < bytes) v |= (unsigned long long)p[i] << (8 * i);
    return v;
}

// Block `base + sub` of a launch over `total` blocks of `nb` per row: its row, block-in-row and length. One
// division per group and step: the step's first block is located with a 64-bit division (none for a single row),
// the few blocks after it by a 32-bit one, only when the step crosses into a later row (b0 < nb < 2**31: the host
// launches row by row otherwise). A lane past the last block gets the step's first block with length 0, so that
// even the addresses it computes (and never dereferences) are real and aligned: the compiler may merge or hoist
// guarded loads, and a wild address from a short, oddly strided row must never reach the memory system.
struct Where {
    long long row, b;
    int len;
};
__device__ __forceinline__ Where locate(long long base, int sub, long long nb, long long n, int bs, long long total) {
    Where w;
    const bool valid = base + sub < total;
    long long row = 0, b = base;
    if (nb != total) {
        row = base / nb;
        b = base - row * nb;
    }
    if (valid) b += sub;
    if (b >= nb) {
        const unsigned int q = (unsigned int)b / (unsigned int)nb;
        row += q;
        b -= (long long)q * nb;
    }
    w.row = row;
    w.b = b;
    w.len = valid ? (int)lmin((long long)bs, n - b * bs) : 0;
    return w;
}

// IEEE fp32 arithmetic that keeps subnormals whatever -ftz the kernel is compiled with (CuPy adds -ftz=true);
// these are the instructions nvcc emits for torch's `a / b`, `a * b` and rint.
__device__ __forceinline__ float div_rn(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float sub_rn(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float rcp_rn(float a) {
    float r;
    asm("rcp.rn.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float rint_rn(float a) {  // round half to even, like torch.round
    float r;
    asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}

// A block's scale s and the multiplier r of its codes, from its largest magnitude's bits.
struct Scale {
    float s, r;
};
template <int BITS>
__device__ __forceinline__ Scale block_scale(unsigned int key) {
    const float qmax = BITS == 8 ? 127.f : 7.f;
    Scale out;
    if (key >= NONFINITE) {  // NaN or inf in the block: NaN scale, codes 0
        out.s = __uint_as_float(REF_NAN);
        out.r = 0.f;
        return out;
    }
    out.s = div_rn(__uint_as_float(key), qmax);
    // r == 0: codes 0 (zero block: s == +0); r == NaN: exact division for every element (subnormal s: 1 / s
    // would overflow). Tested on the bits: s >= 0, and a float compare would flush a subnormal s to 0.
    const unsigned int sbits = __float_as_uint(out.s);
    out.r = sbits == 0u ? 0.f : (sbits >= 0x00800000u ? rcp_rn(out.s) : __uint_as_float(REF_NAN));
    return out;
}

// The reference's code: rint(x / s) clamped, or 0 for a zero / non-finite block. Not inlined: it is the rare path,
// and an inlined IEEE division per unrolled element would only bloat the kernel.
template <int BITS>
__device__ __noinline__ float exact_code(float x, float s, float r) {
    const float qmax = BITS == 8 ? 127.f : 7.f;
    // after rint the value is an integer or +-0, so the clamp's fminf / fmaxf cannot meet a subnormal
    return r != 0.f ? fminf(fmaxf(rint_rn(div_rn(x, s)), -qmax), qmax) : 0.f;
}

__device__ __forceinline__ unsigned int magnitude(float v) { return __float_as_uint(v) & 0x7fffffffu; }

// Codes of a vector: the fast path for all VEC elements without a branch (independent chains the scheduler can
// interleave), then, only if one of them is near a tie or NaN (an exact-path block, non-finite input), the
// reference's arithmetic for the whole vector -- one rare branch per vector instead of one per element.
template <int BITS, int VEC>
__device__ __forceinline__ void quantize_store(const float* f, Scale sc, unsigned char* dst, int count) {
    float q[VEC];
    bool exact = false;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const float y = mul_rn(f[i], sc.r);
        q[i] = rint_rn(y);  // |y| <= qmax + 2**-15 when r is a normal reciprocal: no clamp needed
        exact |= !(fabsf(sub_rn(y, q[i])) <= NEAR_TIE);
    }
    if (exact) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) q[i] = exact_code<BITS>(f[i], sc.s, sc.r);
    }
    unsigned long long packed = 0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) packed |= (unsigned long long)((int)q[i] & ((1 << BITS) - 1)) << (i * BITS);
    store_codes<VEC * BITS / 8>(dst, packed, BITS == 8 ? count : (count + 1) / 2);
}

template <int VEC>
__device__ __forceinline__ int vec_count(int len, int vi) {
    const int c = len - vi * VEC;
    return c < 0 ? 0 : (c < VEC ? c : VEC);
}

// x: rows of n elements, x_row_stride apart; codes: rows code_row_stride bytes apart; scales: total floats.
// G = 2**log2_group lanes per block (32 / G blocks per warp and step); each lane loads R vectors of VEC elements
// per step. A block of at most G * R vectors is read once (kept in registers); a longer one (then G = 32) is
// read twice, in chunks, and so is every block when two_pass is set (for benchmarking the two strategies).
template <int KIND, int BITS, int VEC, bool ALIGNED>
__device__ __forceinline__ void
quantize(const typename Conv<KIND>::T* __restrict__ x, long long x_row_stride, long long n, long long nb,
         long long total, int bs, int log2_group, int two_pass, unsigned char* __restrict__ codes,
         long long code_row_stride, float* __restrict__ scales) {
    constexpr int R = TILE / VEC < MAX_SLOTS ? TILE / VEC : MAX_SLOTS;
    const int lane = threadIdx.x & 31;
    const int G = 1 << log2_group, gl = lane & (G - 1), sub = lane >> log2_group, per_warp = 32 >> log2_group;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;
    const bool in_registers = !two_pass && (bs + VEC - 1) / VEC <= G * R;  // the same for every warp

    for (long long base = warp * per_warp; base < total; base += nwarps * per_warp) {
        const Where w = locate(base, sub, nb, n, bs, total);
        const typename Conv<KIND>::T* xb = x + w.row * x_row_stride + w.b * bs;
        unsigned char* cb = codes + w.row * code_row_stride + ((w.b * bs * BITS) >> 3);
        unsigned int key = 0;
        if (in_registers) {
            float f[R][VEC];
#pragma unroll
            for (int k = 0; k < R; ++k) {
                const int vi = gl + k * G;
                load_x<KIND, VEC, ALIGNED>(xb + (long long)vi * VEC, vec_count<VEC>(w.len, vi), f[k]);
#pragma unroll
                for (int i = 0; i < VEC; ++i) key = umax(key, magnitude(f[k][i]));
            }
            for (int off = 1; off < G; off <<= 1) key = umax(key, __shfl_xor_sync(FULL_MASK, key, off));
            const Scale sc = block_scale<BITS>(key);
            if (gl == 0 && w.len > 0) scales[base + sub] = sc.s;
#pragma unroll
            for (int k = 0; k < R; ++k) {
                const int vi = gl + k * G, count = vec_count<VEC>(w.len, vi);
                if (count > 0) quantize_store<BITS, VEC>(f[k], sc, cb + (((long long)vi * VEC * BITS) >> 3), count);
            }
        } else {
            const int nvec = (w.len + VEC - 1) / VEC;
#pragma unroll 4
            for (int vi = gl; vi < nvec; vi += G) {
                float f[VEC];
                load_x<KIND, VEC, ALIGNED>(xb + (long long)vi * VEC, vec_count<VEC>(w.len, vi), f);
#pragma unroll
                for (int i = 0; i < VEC; ++i) key = umax(key, magnitude(f[i]));
            }
            for (int off = 1; off < G; off <<= 1) key = umax(key, __shfl_xor_sync(FULL_MASK, key, off));
            const Scale sc = block_scale<BITS>(key);
            if (gl == 0 && w.len > 0) scales[base + sub] = sc.s;
#pragma unroll 4
            for (int vi = gl; vi < nvec; vi += G) {
                float f[VEC];
                const int count = vec_count<VEC>(w.len, vi);
                load_x<KIND, VEC, ALIGNED>(xb + (long long)vi * VEC, count, f);
                quantize_store<BITS, VEC>(f, sc, cb + (((long long)vi * VEC * BITS) >> 3), count);
            }
        }
    }
}

template <int KIND, int BITS, int VEC, bool ALIGNED>
__device__ __forceinline__ void dequantize_store(unsigned long long packed, float s, typename Conv<KIND>::T* dst,
                                                 int count) {
    float f[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
        const unsigned int c = (unsigned int)(packed >> (i * BITS)) & ((1u << BITS) - 1);
        // sign-extend the code (a byte, or a two's-complement nibble)
        const int q = BITS == 8 ? (int)(signed char)c : ((int)(c << 28)) >> 28;
        // torch's clamp to +-FLT_MAX: NaN passes through and only +-inf (a product rounded past FLT_MAX) changes.
        // Done on the bits: fminf / fmaxf would flush a subnormal product to 0 under -ftz=true.
        unsigned int v = __float_as_uint(mul_rn((float)q, s));
        if ((v & 0x7fffffffu) == NONFINITE) v = (v & 0x80000000u) | 0x7f7fffffu;
        f[i] = __uint_as_float(v);
    }
    store_y<KIND, VEC, ALIGNED>(dst, count, f);
}

// The inverse: out rows out_row_stride elements apart. Same geometry; each step loads R code vectors per lane
// before decoding any, over as many steps as the block needs.
template <int KIND, int BITS, int VEC, bool ALIGNED>
__device__ __forceinline__ void
dequantize(const unsigned char* __restrict__ codes, long long code_row_stride, const float* __restrict__ scales,
           long long n, long long nb, long long total, int bs, int log2_group,
           typename Conv<KIND>::T* __restrict__ out, long long out_row_stride) {
    constexpr int R = TILE / VEC < MAX_SLOTS ? TILE / VEC : MAX_SLOTS, CB = VEC * BITS / 8;
    const int lane = threadIdx.x & 31;
    const int G = 1 << log2_group, gl = lane & (G - 1), sub = lane >> log2_group, per_warp = 32 >> log2_group;
    const long long warp = ((long long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long long nwarps = ((long long)gridDim.x * blockDim.x) >> 5;

    for (long long base = warp * per_warp; base < total; base += nwarps * per_warp) {
        const Where w = locate(base, sub, nb, n, bs, total);
        const unsigned char* cb = codes + w.row * code_row_stride + ((w.b * bs * BITS) >> 3);
        typename Conv<KIND>::T* ob = out + w.row * out_row_stride + w.b * bs;
        const float s = w.len > 0 ? scales[base + sub] : 0.f;
        const int nvec = (w.len + VEC - 1) / VEC;
        for (int v0 = 0; v0 < nvec; v0 += G * R) {  // all lanes of a group take the same number of steps
            unsigned long long packed[R];
#pragma unroll
            for (int k = 0; k < R; ++k) {
                const int vi = v0 + gl + k * G, count = vec_count<VEC>(w.len, vi);
                packed[k] = count > 0 ? load_codes<CB>(cb + (((long long)vi * VEC * BITS) >> 3),
                                                       BITS == 8 ? count : (count + 1) / 2)
                                      : 0ull;
            }
#pragma unroll
            for (int k = 0; k < R; ++k) {
                const int vi = v0 + gl + k * G, count = vec_count<VEC>(w.len, vi);
                if (count > 0)
                    dequantize_store<KIND, BITS, VEC, ALIGNED>(packed[k], s, ob + (long long)vi * VEC, count);
            }
        }
    }
}
"""

# One module per kernel: SOURCE plus one of these entry points, with plain C names, so that CuPy's disk cache
# (keyed on the source; it is bypassed for templates named through name_expressions) serves later processes.
# MIN_BLOCKS is __launch_bounds__'s minimum of resident 256-thread blocks per SM (a register cap when > 1).
QUANTIZE_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(256, {min_blocks})
quantize_kernel(const void* __restrict__ x, long long x_row_stride, long long n, long long nb, long long total,
                int bs, int log2_group, int two_pass, unsigned char* __restrict__ codes, long long code_row_stride,
                float* __restrict__ scales) {{
    quantize<{kind}, {bits}, {vec}, {aligned}>(static_cast<const typename Conv<{kind}>::T*>(x), x_row_stride, n, nb,
                                               total, bs, log2_group, two_pass, codes, code_row_stride, scales);
}}
"""

DEQUANTIZE_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(256, {min_blocks})
dequantize_kernel(const unsigned char* __restrict__ codes, long long code_row_stride,
                  const float* __restrict__ scales, long long n, long long nb, long long total, int bs,
                  int log2_group, void* __restrict__ out, long long out_row_stride) {{
    dequantize<{kind}, {bits}, {vec}, {aligned}>(codes, code_row_stride, scales, n, nb, total, bs, log2_group,
                                                 static_cast<typename Conv<{kind}>::T*>(out), out_row_stride);
}}
"""
