/*
 * One decode step of nanoplay's GPT (model.py) on a CPU: one new token for each of B sequences, whose
 * keys and values are appended to the KV cache (kvcache.py), giving the logits of each row.
 *
 * Why C: a decode step reads every weight once, so its speed is the rate at which it streams them. In
 * torch each step runs ~350 small operations whose dispatch, between the products, costs about as much
 * as the products of a small model; and for a few rows, no well-kept CPU library here reads each weight
 * once for all of them (see cpu_decode.py and `nanoplay bench`). So this file runs the whole step in
 * one parallel region: every matrix product streams its weights once for all B rows, whatever their
 * dtype (float32, bfloat16, or int8 with a scale per output row), with float32 sums throughout (bf16
 * and int8 products round their inputs to bf16 first: BF16_PAIRS, matmul).
 *
 * The maths is model.py's, in the same order: x = wte[token] + wpe[position]; for each block
 * x += attn(ln_1(x)), x += mlp(ln_2(x)); logits = lm_head(ln_f(x)). Sums run in float32 in another
 * order than torch's, so logits agree with a torch forward to float rounding (the tests bound it).
 *
 * Compiled on first use by cpu_kernel.py with the machine's C compiler, for its own CPU (-march=native),
 * with OpenMP for the threads and -ffp-contract=off (every fused multiply-add is written out: fma8).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

enum { WEIGHT_F32 = 0, WEIGHT_BF16 = 1, WEIGHT_INT8 = 2 };
enum { ACT_GELU_TANH = 0, ACT_GELU = 1, ACT_RELU = 2, ACT_SILU = 3, ACT_QUICK_GELU = 4 };

typedef struct {
    const void *weight;   /* (out, in) row-major: float32, bfloat16 or int8 (the model's weight_type) */
    const float *scales;  /* (out,): int8 row scales, else NULL */
    const float *bias;    /* (out,) or NULL */
    int64_t in, out;
} Matrix;

typedef struct {
    const float *ln_1_weight, *ln_1_bias, *ln_2_weight, *ln_2_bias;  /* (n_embd,); biases may be NULL */
    Matrix c_attn, attn_proj, c_fc, mlp_proj;
    void *k_cache, *v_cache;  /* (slots, n_head, cache_len, head_dim), float32 or bfloat16 (cache_type) */
    float attn_scale;
} Layer;

typedef struct {
    int64_t n_layer, n_head, n_embd, mlp_width, vocab_size, cache_len;
    int32_t weight_type, cache_type, embedding_type, activation;  /* WEIGHT_*: F32, BF16 (INT8: weights only) */
    float layer_norm_epsilon;
    const void *wte, *wpe;  /* (vocab_size, n_embd), (block_size, n_embd), both of embedding_type */
    const float *ln_f_weight, *ln_f_bias;
    Matrix lm_head;
    const Layer *layers;  /* (n_layer,) */
} Model;

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}

/* Widening int8 and bfloat16 to float (vectors.h's 8-float vectors) takes AVX2's instructions where
 * there are (GCC 12 does such a __builtin_convertvector one lane at a time), else a loop the compiler
 * vectorises as it can. */
#if defined(__AVX2__)
#include <immintrin.h>
static inline f32x8 load_int8(const int8_t *p) {
    return (f32x8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline f32x8 load_bf16(const uint16_t *p) {
    __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
    return (f32x8)_mm256_castsi256_ps(u);
}
#else
static inline f32x8 load_int8(const int8_t *p) { f32x8 v; for (int i = 0; i < 8; i++) v[i] = p[i]; return v; }
static inline f32x8 load_bf16(const uint16_t *p) { f32x8 v; for (int i = 0; i < 8; i++) v[i] = bf16_to_float(p[i]); return v; }
#endif
/* a * b + c, rounded once with the CPU's FMA, else twice: always the same way, whatever the block shape
 * around it (the file is compiled with -ffp-contract=off, so the compiler never chooses for itself) */
static inline f32x8 fma8(f32x8 a, f32x8 b, f32x8 c) {
#if defined(__AVX2__) && defined(__FMA__)
    return (f32x8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
#else
    return a * b + c;
#endif
}
static inline float sum8(f32x8 v) { return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7])); }

/* The matrix products' vectors (DOT_BLOCK): 16 floats where the CPU has AVX-512, else the 8 above.
 * Measured on a 2-core Intel Xeon (Emerald Rapids), 30M shape, alternating: 16 lanes made bf16 steps
 * 19% faster (batch 1 and 4) and int8 steps 25% (batch 1) and 11% (batch 4); float32 steps, which
 * wait on memory, the same. */
#if defined(__AVX512F__)
#define LANES 16
typedef float f32xL __attribute__((vector_size(64)));
static inline f32xL load_f32xL(const float *p) { f32xL v; memcpy(&v, p, sizeof v); return v; }
static inline f32xL load_bf16xL(const uint16_t *p) {
    __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (f32xL)_mm512_castsi512_ps(u);
}
static inline f32xL load_int8xL(const int8_t *p) {
    return (f32xL)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline f32xL fmaL(f32xL a, f32xL b, f32xL c) {
    return (f32xL)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
static inline float sumL(f32xL v) {  /* the two halves added lane by lane, then as sum8 */
    f32x8 low, high;
    memcpy(&low, &v, sizeof low), memcpy(&high, (const char *)&v + sizeof low, sizeof high);
    return sum8(low + high);
}
#else
#define LANES 8
typedef f32x8 f32xL;
#define load_f32xL load_f32
#define load_bf16xL load_bf16
#define load_int8xL load_int8
#define fmaL fma8
#define sumL sum8
#endif

/* bf16 weights times bf16 activations, 32 at a time in pairs, where the CPU multiplies bf16 (AVX512_BF16:
 * Zen 4, Cooper Lake, Sapphire Rapids and later): lane i adds w[2i + 1] x[2i + 1], then w[2i] x[2i], to
 * its float32 sum, each product exact and each sum rounded (vdpbf16ps). Half the instructions of
 * widening each bf16 weight to float32, for activations rounded to bf16 first, as torch's bf16 products
 * round them. Measured on a 2-core Intel Xeon (Emerald Rapids), 30M shape, alternating: decode steps
 * 11% faster at batch 1, 10% at batch 4. AMX's tiles, tried there too, made batch 4's products as fast
 * as batch 1's but batch 1 15% slower (their loads read 16 weight rows at once, slower than streaming
 * them); an engine that must give a row the same logits alone and in a batch takes one path for both. */
#if defined(__AVX512BF16__)
#define BF16_PAIRS 1
typedef __m512bh bf16x32;
static inline bf16x32 load_bf16x32(const uint16_t *p) { return (bf16x32)_mm512_loadu_si512(p); }
static inline f32xL dot_pairs(bf16x32 w, bf16x32 x, f32xL sum) {
    return (f32xL)_mm512_dpbf16_ps((__m512)sum, w, x);
}
#else
#define BF16_PAIRS 0
#endif

/* e^x for 8 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes' degree-6 polynomial (within 2 ulp
 * of libm's expf), times 2^n built in the exponent bits. x below -87.3 gives 0 (no subnormals), above log(FLT_MAX)
 * infinity, NaN stays NaN. */
static inline f32x8 exp8(f32x8 x) {
    const f32x8 zero = {0};
    const i32x8 over = x > 88.72283935546875f, under = x < -87.3f, nan = x != x;
    x = select8(under, zero - 87.3f, select8(over, zero + 88.72283935546875f, x));
    f32x8 n = x * 1.44269504088896341f + 12582912.0f;  /* round to nearest: 1.5 * 2^23 */
    n -= 12582912.0f;
    f32x8 r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    f32x8 p = zero + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    i32x8 k = __builtin_convertvector(n, i32x8), positive = k > 0;
    p = select8(positive, p + p, p);  /* 2^n as 2 * 2^(n-1) above 0: 2^128 has no float */
    i32x8 bits = (k + positive + 127) << 23;  /* positive is -1 where true */
    f32x8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return select8(nan, x, select8(over, zero + INFINITY, select8(under, zero, p * scale)));
}

#define SCALAR_F32(v) (v)
#define SCALAR_BF16(v) bf16_to_float(v)
#define SCALAR_INT8(v) ((float)(v))

/* out[r * NX + c] = w_r . x_c for NW weight rows w_r = w + r * n and NX activation rows x_c = x + c * n:
 * each weight vector is loaded (and widened) once for all activation rows, each activation vector once
 * for all weight rows. Every dot product is CH chains of multiply-adds (MAC) of STEP values (LANES
 * floats, or 32 bf16 pairs), chain h taking the vectors h, h + CH, h + 2 CH, ... (the vectors after the
 * last whole round go to chain 0), then the chains added in order, the lanes summed (sumL), and the
 * n % STEP tail added one by one: the same order in every block shape, so a sequence's logits do not
 * depend on its batch. bf16 and float32 take 2 chains:
 * one chain of dependent multiply-adds bounds them (measured on a 2-core AMD EPYC, alternating A/B:
 * bf16 decode steps 8-10% faster at the 30M shape, batch 1 and 4; float32 ones 5-11% at the 30M and 124M
 * shapes, batch 1 and 4, though 4 chains gained nothing); int8's 4-row batches ran 19% slower with 2.
 * Each weight row is prefetched 4 KB ahead into every cache level, every 64-byte line of a round of
 * chains. Measured on a 2-core Intel Xeon (Emerald Rapids, 300 MB L3), alternating, 30M shape, batch 1:
 * float32 steps 3.2x faster than with the non-temporal hint 1 KB ahead that an AMD EPYC had preferred
 * (5-11% over none there), which on this Intel kept the weights out of the L3 that could hold them
 * between steps; 2.5x faster than no prefetch, 10-15% faster than 512 bytes or 2 KB ahead; bf16 steps
 * 10-18% faster than without; and float32 steps 9-13% faster (30M, 124M) than prefetching only the
 * first of the two lines a round spans with 16 lanes. A prefetch past a matrix's end never faults. */
#define DOT_BLOCK(NAME, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, NW, NX, CH)         \
    static void NAME(const W_TYPE *w, const X_TYPE *x, int64_t n, float *out) {                     \
        f32xL acc[NW][NX][CH];                                                                      \
        for (int r = 0; r < NW; r++)                                                                \
            for (int c = 0; c < NX; c++)                                                            \
                for (int h = 0; h < CH; h++) acc[r][c][h] = (f32xL){0};                             \
        int64_t i = 0;                                                                              \
        for (; i + STEP * CH <= n; i += STEP * CH)                                                  \
            for (int h = 0; h < CH; h++) {                                                          \
                __typeof__(X_LOAD(x)) xv[NX];                                                       \
                for (int c = 0; c < NX; c++) xv[c] = X_LOAD(x + c * n + i + STEP * h);              \
                for (int r = 0; r < NW; r++) {                                                      \
                    if (h == 0) /* 4 KB ahead, to every cache level, each line (see above) */       \
                        for (size_t line = 0; line < STEP * CH * sizeof(W_TYPE); line += 64)        \
                            __builtin_prefetch((const char *)(w + r * n + i) + 4096 + line, 0, 3);  \
                    __typeof__(W_LOAD(w)) wv = W_LOAD(w + r * n + i + STEP * h);                    \
                    for (int c = 0; c < NX; c++) acc[r][c][h] = MAC(wv, xv[c], acc[r][c][h]);       \
                }                                                                                   \
            }                                                                                       \
        for (; i + STEP <= n; i += STEP) {                                                          \
            __typeof__(X_LOAD(x)) xv[NX];                                                           \
            for (int c = 0; c < NX; c++) xv[c] = X_LOAD(x + c * n + i);                             \
            for (int r = 0; r < NW; r++) {                                                          \
                __typeof__(W_LOAD(w)) wv = W_LOAD(w + r * n + i);                                   \
                for (int c = 0; c < NX; c++) acc[r][c][0] = MAC(wv, xv[c], acc[r][c][0]);           \
            }                                                                                       \
        }                                                                                           \
        for (int r = 0; r < NW; r++)                                                                \
            for (int c = 0; c < NX; c++) {                                                          \
                f32xL sum = acc[r][c][0];                                                           \
                for (int h = 1; h < CH; h++) sum += acc[r][c][h];                                   \
                float total = sumL(sum);                                                            \
                for (int64_t j = i; j < n; j++) total += W_SCALAR(w[r * n + j]) * X_SCALAR(x[c * n + j]); \
                out[r * NX + c] = total;                                                            \
            }                                                                                       \
    }

/* one sequence: 1, 2 or 4 weight rows at a time; a batch: 1 or 2 weight rows for up to 4 activation rows */
#define DOT_BLOCKS(TYPE, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, CH)                 \
    DOT_BLOCK(dot_##TYPE##_1x1, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 1, 1, CH) \
    DOT_BLOCK(dot_##TYPE##_2x1, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 2, 1, CH) \
    DOT_BLOCK(dot_##TYPE##_4x1, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 4, 1, CH) \
    DOT_BLOCK(dot_##TYPE##_1x2, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 1, 2, CH) \
    DOT_BLOCK(dot_##TYPE##_1x3, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 1, 3, CH) \
    DOT_BLOCK(dot_##TYPE##_1x4, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 1, 4, CH) \
    DOT_BLOCK(dot_##TYPE##_2x2, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 2, 2, CH) \
    DOT_BLOCK(dot_##TYPE##_2x3, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 2, 3, CH) \
    DOT_BLOCK(dot_##TYPE##_2x4, W_TYPE, W_LOAD, W_SCALAR, X_TYPE, X_LOAD, X_SCALAR, MAC, STEP, 2, 4, CH) \
    static void dot_##TYPE(const void *weight, const void *input, int64_t n, int nw, int nx, float *out) { \
        const W_TYPE *w = (const W_TYPE *)weight;                                                \
        const X_TYPE *x = (const X_TYPE *)input;                                                 \
        switch (nw * 10 + nx) {                                                                   \
        case 41: dot_##TYPE##_4x1(w, x, n, out); break;                                          \
        case 21: dot_##TYPE##_2x1(w, x, n, out); break;                                          \
        case 22: dot_##TYPE##_2x2(w, x, n, out); break;                                          \
        case 23: dot_##TYPE##_2x3(w, x, n, out); break;                                          \
        case 24: dot_##TYPE##_2x4(w, x, n, out); break;                                          \
        case 12: dot_##TYPE##_1x2(w, x, n, out); break;                                          \
        case 13: dot_##TYPE##_1x3(w, x, n, out); break;                                          \
        case 14: dot_##TYPE##_1x4(w, x, n, out); break;                                          \
        default: dot_##TYPE##_1x1(w, x, n, out); break;                                          \
        }                                                                                         \
    }

DOT_BLOCKS(f32, float, load_f32xL, SCALAR_F32, float, load_f32xL, SCALAR_F32, fmaL, LANES, 2)
#if BF16_PAIRS  /* one chain: two were 3-5% slower (Emerald Rapids, batch 1 and 4) */
DOT_BLOCKS(bf16, uint16_t, load_bf16x32, SCALAR_BF16, uint16_t, load_bf16x32, SCALAR_BF16, dot_pairs, 32, 1)
#else
DOT_BLOCKS(bf16, uint16_t, load_bf16xL, SCALAR_BF16, float, load_f32xL, SCALAR_F32, fmaL, LANES, 2)
#endif
DOT_BLOCKS(int8, int8_t, load_int8xL, SCALAR_INT8, float, load_f32xL, SCALAR_F32, fmaL, LANES, 1)

static inline void store(const Matrix *w, float *y, int64_t b, int64_t o, float v, int accumulate) {
    if (w->scales) v = bf16_to_float(float_to_bf16(v * w->scales[o]));  /* int8: a bf16 result, as torch's */
    if (w->bias) v += w->bias[o];
    float *dst = y + b * w->out + o;
    *dst = accumulate ? *dst + v : v;
}

/* y (B, out) = x (B, in) @ W.T + bias, or y += that when accumulate (the residual stream); int8 rounds
 * x to bf16 in place first and each result to bf16 before the bias (torch's int8 product, precision.py);
 * bf16 with BF16_PAIRS multiplies x rounded to bf16 in x_bf16 (B, in), scratch of the step's.
 * Called inside the parallel region: the output rows are shared among the threads, and each thread
 * streams its share of the matrix in order. A batch takes one weight row for up to 4 activation rows
 * at a time, one sequence one weight row; int8, and bf16 with AVX-512's 16 lanes (and 32 registers),
 * take 2 weight rows for a batch and 4 for one sequence, as widening needs more work per load.
 * Measured against one row: with AVX2 on an AMD EPYC, 15% faster for int8 but 1.4x slower for bf16
 * and float32; with AVX-512 on an Intel Xeon (30M shape, alternating), bf16 steps 12% faster for one
 * sequence and 9% for 4, float32 ones 9-10% slower; bf16 pairs (BF16_PAIRS), 28% faster for one
 * sequence and 3% for 4. */
static void matmul(const Model *m, const Matrix *w, float *x, int64_t B, float *y, int accumulate,
                   uint16_t *x_bf16) {
    const int64_t in = w->in, out = w->out;
    if (m->weight_type == WEIGHT_INT8) {
        /* int8 products take bf16 inputs, as torch's int8 kernel does (precision.py): the same numbers
         * with and without a compiler, and in `score`. x is this product's own scratch input. */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * in; i++) x[i] = bf16_to_float(float_to_bf16(x[i]));
    }
    const char *input = (const char *)x;
    size_t input_width = sizeof(float);
    if (BF16_PAIRS && m->weight_type == WEIGHT_BF16) {
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * in; i++) x_bf16[i] = float_to_bf16(x[i]);
        input = (const char *)x_bf16, input_width = sizeof(uint16_t);
    }
    const size_t width = m->weight_type == WEIGHT_F32 ? 4 : m->weight_type == WEIGHT_BF16 ? 2 : 1;
    void (*dot)(const void *, const void *, int64_t, int, int, float *) =
        m->weight_type == WEIGHT_F32 ? dot_f32 : m->weight_type == WEIGHT_BF16 ? dot_bf16 : dot_int8;
    const char *weight = (const char *)w->weight;
    const int several = m->weight_type == WEIGHT_INT8 || (m->weight_type == WEIGHT_BF16 && LANES == 16);
    const int64_t rows = !several ? 1 : B == 1 ? 4 : 2;  /* weight rows per block */
    float block[8];
#pragma omp for schedule(static)
    for (int64_t o = 0; o < out; o += rows) {
        for (int64_t r = o; r < o + rows && r < out;) {  /* the matrix's last block may be 2 and 1 rows */
            int nw = out - r >= rows ? (int)rows : out - r >= 2 ? 2 : 1;
            for (int64_t b = 0; b < B; b += 4) {
                int nx = B - b < 4 ? (int)(B - b) : 4;
                dot(weight + r * in * width, input + b * in * input_width, in, nw, nx, block);
                for (int i = 0; i < nw; i++)
                    for (int c = 0; c < nx; c++) store(w, y, b + c, r + i, block[i * nx + c], accumulate);
            }
            r += nw;
        }
    }
}

/* y (B, n) = LayerNorm(x (B, n)), as torch's: biased variance, eps inside the square root */
static void layer_norm(const float *x, const float *weight, const float *bias, int64_t B, int64_t n,
                       float eps, float *y) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * n;
        float *yb = y + b * n;
        double mean = 0, var = 0;
        for (int64_t i = 0; i < n; i++) mean += xb[i];
        mean /= n;
        for (int64_t i = 0; i < n; i++) var += (xb[i] - mean) * (xb[i] - mean);
        var /= n;
        float rstd = (float)(1.0 / sqrt(var + eps)), mu = (float)mean;
        for (int64_t i = 0; i < n; i++) yb[i] = (xb[i] - mu) * rstd * weight[i] + (bias ? bias[i] : 0.0f);
    }
}

static float activate_one(int activation, float x) {
    switch (activation) {
    case ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
    case ACT_RELU: return x > 0 ? x : 0;
    case ACT_SILU: return x / (1.0f + expf(-x));
    default: return x / (1.0f + expf(-1.702f * x));  /* ACT_QUICK_GELU */
    }
}

/* h[0..n) = activation(h), 8 at a time where e^x is all it needs (tanh u = 1 - 2 / (e^2u + 1)) */
static void activate(int activation, float *h, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n && activation != ACT_GELU && activation != ACT_RELU; i += 8) {
        f32x8 x = load_f32(h + i), y;
        if (activation == ACT_GELU_TANH) {
            f32x8 u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
            y = 0.5f * x * (1.0f + (1.0f - 2.0f / (exp8(u + u) + 1.0f)));
        } else {
            y = x / (1.0f + exp8((activation == ACT_SILU ? -1.0f : -1.702f) * x));
        }
        memcpy(h + i, &y, sizeof y);
    }
    for (; i < n; i++) h[i] = activate_one(activation, h[i]);
}

/* h (B, n) = activation(h), shared among the threads in pieces of 256 within each row: where a value
 * falls (8-wide or one by one) then depends on its column alone, never on the batch */
static void activate_rows(int activation, float *h, int64_t B, int64_t n) {
    const int64_t pieces = (n + 255) / 256;
#pragma omp for schedule(static)
    for (int64_t k = 0; k < B * pieces; k++) {
        const int64_t b = k / pieces, start = k % pieces * 256;
        activate(activation, h + b * n + start, n - start < 256 ? n - start : 256);
    }
}

static inline float load_as(int type, const void *p, int64_t i) {  /* element i of a float32 or bf16 array */
    return type == WEIGHT_BF16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_as(int type, void *p, int64_t i, float v) {
    if (type == WEIGHT_BF16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

static inline f32xL load_cached(int type, const void *cache, int64_t i) {  /* LANES values from element i */
    return type == WEIGHT_BF16 ? load_bf16xL((const uint16_t *)cache + i) : load_f32xL((const float *)cache + i);
}

/* s[t] = q . key t * scale for the count cached key rows of n values (float32 or bf16) from element base.
 * bf16 keys with BF16_PAIRS take q rounded to bf16 (as a bf16 model's q is in torch) in pair products:
 * attention 15-30% faster (Emerald Rapids, 30M shape, batch 1 and 4). */
static void score_keys(int type, const void *cache, int64_t base, const float *q, int64_t n, int64_t count,
                       float scale, float *s) {
#if BF16_PAIRS
    if (type == WEIGHT_BF16) {
        const uint16_t *keys = (const uint16_t *)cache;
        uint16_t q_bf16[n];
        for (int64_t i = 0; i < n; i++) q_bf16[i] = float_to_bf16(q[i]);
        for (int64_t t = 0; t < count; t++) {
            float total;
            dot_bf16_1x1(keys + base + t * n, q_bf16, n, &total);  /* the products' own pair dot product */
            s[t] = total * scale;
        }
        return;
    }
#endif
    for (int64_t t = 0; t < count; t++) {
        const int64_t row = base + t * n;
        f32xL sum = {0};
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES) sum += load_cached(type, cache, row + i) * load_f32xL(q + i);
        float total = sumL(sum);
        for (; i < n; i++) total += load_as(type, cache, row + i) * q[i];
        s[t] = total * scale;
    }
}

/* y[0..n) = the sum over t of p[t] * value t, for the count cached value rows of n values from element
 * base, t in order; 4 vectors of y at a time stay in registers through all the rows (the cache is read
 * once per 4 vectors, and 4 chains of additions overlap), the rest one vector, then one value, at a time */
static void weigh_values(int type, const void *cache, int64_t base, const float *p, int64_t n, int64_t count,
                         float *y) {
    int64_t i = 0;
    for (; i + 4 * LANES <= n; i += 4 * LANES) {
        f32xL sum[4] = {{0}};
        for (int64_t t = 0; t < count; t++)
            for (int j = 0; j < 4; j++) sum[j] += p[t] * load_cached(type, cache, base + t * n + i + j * LANES);
        memcpy(y + i, sum, sizeof sum);
    }
    for (; i + LANES <= n; i += LANES) {
        f32xL sum = {0};
        for (int64_t t = 0; t < count; t++) sum += p[t] * load_cached(type, cache, base + t * n + i);
        memcpy(y + i, &sum, sizeof sum);
    }
    for (; i < n; i++) {
        float sum = 0;
        for (int64_t t = 0; t < count; t++) sum += p[t] * load_as(type, cache, base + t * n + i);
        y[i] = sum;
    }
}

/* s[0..n) = e^(s - max s) / sum, as torch's softmax */
static void softmax(float *s, int64_t n) {
    float best = -INFINITY, total = 0;
    for (int64_t t = 0; t < n; t++) best = s[t] > best ? s[t] : best;
    int64_t t = 0;
    for (; t + 8 <= n; t += 8) {
        f32x8 e = exp8(load_f32(s + t) - best);
        memcpy(s + t, &e, sizeof e);
    }
    for (; t < n; t++) s[t] = expf(s[t] - best);
    for (t = 0; t < n; t++) total += s[t];
    for (t = 0; t < n; t++) s[t] /= total;
}

/* Each row's query attends to its own sequence's keys 0..position. Every row's key and value are stored
 * first, so rows of one sequence at consecutive positions (a speculative check) each see the ones
 * before them: a causal forward of several tokens. qkv (B, 3 * n_embd) -> y (B, n_embd); scores is
 * scratch of (B * n_head, cache_len). */
static void attention(const Model *m, const Layer *layer, const float *qkv, int64_t B, const int64_t *slots,
                      const int64_t *positions, float *scores, float *y) {
    const int64_t C = m->n_embd, H = m->n_head, hs = C / H, T = m->cache_len;
    const int type = m->cache_type;
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const float *k = qkv + b * 3 * C + C + h * hs, *v = k + C;
            const int64_t at = ((slots[b] * H + h) * T + positions[b]) * hs;
            for (int64_t i = 0; i < hs; i++) {
                store_as(type, layer->k_cache, at + i, k[i]);
                store_as(type, layer->v_cache, at + i, v[i]);
            }
        }
    }
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            const float *q = qkv + b * 3 * C + h * hs;
            const int64_t base = (slots[b] * H + h) * T * hs, pos = positions[b];  /* (slot, head) of the cache */
            float *s = scores + (b * H + h) * T;
            score_keys(type, layer->k_cache, base, q, hs, pos + 1, layer->attn_scale, s);
            softmax(s, pos + 1);
            weigh_values(type, layer->v_cache, base, s, hs, pos + 1, y + b * C + h * hs);
        }
    }
}

/* 1 where bf16 products run as bf16 pairs, their inputs rounded to bf16 (BF16_PAIRS: what the compiler
 * targets, which the CPU's flags alone do not say), else 0 */
int decode_bf16_pairs(void) { return BF16_PAIRS; }

/* The step. tokens, positions, slots: (B,); logits: (B, vocab_size). Returns 0, or -1 if out of memory. */
int decode_step(const Model *m, int64_t B, const int64_t *tokens, const int64_t *positions, const int64_t *slots,
                float *logits, int threads) {
    const int64_t C = m->n_embd, wide = 3 * C > m->mlp_width ? 3 * C : m->mlp_width;
    float *x = malloc(sizeof(float) * B * C), *xn = malloc(sizeof(float) * B * C);
    float *hidden = malloc(sizeof(float) * B * wide), *att = malloc(sizeof(float) * B * C);
    float *scores = malloc(sizeof(float) * B * m->n_head * m->cache_len);
    uint16_t *x_bf16 = malloc(sizeof(uint16_t) * B * wide);  /* the products' inputs for BF16_PAIRS */
    int ok = x && xn && hidden && att && scores && x_bf16;
    if (ok) {
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < C; i++)
                    x[b * C + i] = load_as(m->embedding_type, m->wte, tokens[b] * C + i) + load_as(m->embedding_type, m->wpe, positions[b] * C + i);
            for (int64_t l = 0; l < m->n_layer; l++) {
                const Layer *layer = &m->layers[l];
                layer_norm(x, layer->ln_1_weight, layer->ln_1_bias, B, C, m->layer_norm_epsilon, xn);
                matmul(m, &layer->c_attn, xn, B, hidden, 0, x_bf16);
                attention(m, layer, hidden, B, slots, positions, scores, att);
                matmul(m, &layer->attn_proj, att, B, x, 1, x_bf16);
                layer_norm(x, layer->ln_2_weight, layer->ln_2_bias, B, C, m->layer_norm_epsilon, xn);
                matmul(m, &layer->c_fc, xn, B, hidden, 0, x_bf16);
                activate_rows(m->activation, hidden, B, m->mlp_width);
                matmul(m, &layer->mlp_proj, hidden, B, x, 1, x_bf16);
            }
            layer_norm(x, m->ln_f_weight, m->ln_f_bias, B, C, m->layer_norm_epsilon, xn);
            matmul(m, &m->lm_head, xn, B, logits, 0, x_bf16);
        }
    }
    free(x), free(xn), free(hidden), free(att), free(scores), free(x_bf16);
    return ok ? 0 : -1;
}
