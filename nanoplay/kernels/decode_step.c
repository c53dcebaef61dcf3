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
    const void *weight;   /* (out, in) packed (pack_matrix): float32, bfloat16 or int8 (the model's weight_type) */
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

/* The matrix products' vectors: 16 floats where the CPU has AVX-512, else the 8 above.
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
 * them); an engine that must give a row the same logits alone and in a batch takes one path for both
 * (AMX sums a pair in another way: its sums differ from vdpbf16ps's in the last bits, in either pair
 * order). What bounds batch 4 there, measured one core at a time: vdpbf16ps retires one per ~2.2 cycles
 * where float32 multiply-adds retire two per cycle, so the pairs' 32 products cost about what 32 widened
 * ones do; the pairs split into two float32 vectors (and, shift) and multiplied-added odd then even give
 * the same bits (320,000 sums) and no faster a step (batch 4: 3.04-3.54 ms against 2.92-3.11). */
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

/* The matrix products read their weights packed (pack_matrix): the outputs in groups of GROUP, each
 * group's weights input by input, so that a group's GROUP sums are whole vectors of lanes, each lane
 * one output, each input's value broadcast to every lane and multiplied into all of them:
 *     float32, int8, bf16 widened:  packed[g][k][j]    = W[g * GROUP + j][k]
 *     bf16 pairs (BF16_PAIRS):      packed[g][k/2][j][k%2], the input padded to an even width
 * with zeros past the last output. No lane ever sums across lanes, so no horizontal sums, and a group
 * streams its weights once, in order, for up to 4 activation rows at a time. Each output's sum runs over
 * its inputs in order, one chain of multiply-adds, whatever the batch and the block: a sequence's
 * logits do not depend on its batch. Measured on a 2-core Intel Xeon (Emerald Rapids), 30M shape, the
 * products alone, alternating against the (out, in) rows they replace (dot products of 1-4 weight rows
 * with 1-4 activation rows, then summed across lanes): bf16 pairs 2-15% faster at batch 1 and 30-55% at
 * batch 4, int8 20-58% and 62-92%, float32 6-16% and 4-40%. Groups of 64 outputs (4 vectors of 16
 * lanes: 16 sums in registers for 4 rows) against 32: the same within the VM's noise for bf16 and
 * float32, int8 faster at batch 1. The price: the packed copy is a second copy of the weights beside
 * torch's, which prefills and scoring read (cpu_kernel.packed_weights). */
#define GROUP 64
#if LANES == 16
#define PASS_VECTORS 4  /* vectors of lanes per pass over a group's weights: 16 sums for 4 rows in 32 registers */
#else
#define PASS_VECTORS 2  /* 8 sums for 4 rows in AVX2's 16 registers: 4 passes, the later ones from the L1/L2 */
#endif
#define PASS (PASS_VECTORS * LANES)

static size_t weight_width(int type) { return type == WEIGHT_F32 ? 4 : type == WEIGHT_BF16 ? 2 : 1; }

/* 1 where products of weight type `type` take their inputs in pairs (bf16 with BF16_PAIRS) */
static int in_pairs(int type) { return BF16_PAIRS && type == WEIGHT_BF16; }

/* inputs a packed row holds: in, or in rounded up to even for pairs */
static int64_t packed_inputs(int type, int64_t in) { return in_pairs(type) ? in + (in & 1) : in; }

/* bytes of a packed (out, in) matrix of weight type `type` */
int64_t packed_bytes(int type, int64_t out, int64_t in) {
    return (out + GROUP - 1) / GROUP * GROUP * packed_inputs(type, in) * (int64_t)weight_width(type);
}

/* packed (packed_bytes) = w (out, in), row-major, of weight type `type`, packed as the products read it:
 * each group input by input, writing in order (a gigabyte in about a second on 2 cores) */
#define PACK_GROUP(T)                                                                                   \
    do {                                                                                                \
        const T *rows = (const T *)w + g * GROUP * in;                                                  \
        T *dst = (T *)packed + g * GROUP * inputs;                                                      \
        for (int64_t k = 0; k < inputs; k += step)                                                      \
            for (int64_t j = 0; j < GROUP; j++)                                                         \
                for (int64_t e = 0; e < step; e++)                                                      \
                    *dst++ = j < count && k + e < in ? rows[j * in + k + e] : 0;                        \
    } while (0)

void pack_matrix(int type, const void *w, int64_t out, int64_t in, void *packed, int threads) {
    const int64_t groups = (out + GROUP - 1) / GROUP, inputs = packed_inputs(type, in);
    const int64_t step = in_pairs(type) ? 2 : 1;  /* inputs side by side in a lane */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const int64_t count = out - g * GROUP < GROUP ? out - g * GROUP : GROUP;  /* the group's real outputs */
        if (type == WEIGHT_F32) PACK_GROUP(float);
        else if (type == WEIGHT_BF16) PACK_GROUP(uint16_t);
        else PACK_GROUP(int8_t);
    }
}

/* A pass of a group's products: sums[c][v] = the PASS outputs' sums (PASS_VECTORS vectors from the
 * group's lane `first`) for NX activation rows x + c * stride, over `in` inputs (pairs of them for bf16
 * pairs). The next rows of weights are prefetched 4 KB ahead into every cache level, on the first pass:
 * measured on the rows the packed layout replaced (Emerald Rapids, 300 MB L3), float32 steps 3.2x faster
 * than with a non-temporal hint 1 KB ahead, which kept the weights out of the L3 that could hold them
 * between steps, 2.5x faster than with none. A prefetch past a matrix's end never faults. */
#define GROUP_PASS(NAME, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP, NX)                           \
    static void NAME(const W_TYPE *w, int64_t first, const X_TYPE *x, int64_t stride, int64_t in,        \
                     f32xL sums[4][PASS_VECTORS]) {                                                     \
        f32xL acc[NX][PASS_VECTORS];                                                                  \
        for (int c = 0; c < NX; c++)                                                                  \
            for (int v = 0; v < PASS_VECTORS; v++) acc[c][v] = (f32xL){0};                            \
        for (int64_t k = 0; k < in; k += K_STEP) {                                                    \
            const W_TYPE *row = w + k * GROUP;                                                        \
            if (first == 0)                                                                           \
                for (size_t line = 0; line < GROUP * K_STEP * sizeof(W_TYPE); line += 64)            \
                    __builtin_prefetch((const char *)row + 4096 + line, 0, 3);                        \
            __typeof__(X_BROADCAST(x, 0)) xv[NX];                                                     \
            for (int c = 0; c < NX; c++) xv[c] = X_BROADCAST(x + c * stride, k);                      \
            for (int v = 0; v < PASS_VECTORS; v++) {                                                  \
                __typeof__(W_LOAD(row)) wv = W_LOAD(row + (first + v * LANES) * K_STEP);              \
                for (int c = 0; c < NX; c++) acc[c][v] = MAC(wv, xv[c], acc[c][v]);                   \
            }                                                                                         \
        }                                                                                             \
        for (int c = 0; c < NX; c++)                                                                  \
            for (int v = 0; v < PASS_VECTORS; v++) sums[c][v] = acc[c][v];                            \
    }

#define GROUP_PASSES(TYPE, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP)                             \
    GROUP_PASS(pass_##TYPE##_1, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP, 1)                    \
    GROUP_PASS(pass_##TYPE##_2, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP, 2)                    \
    GROUP_PASS(pass_##TYPE##_3, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP, 3)                    \
    GROUP_PASS(pass_##TYPE##_4, W_TYPE, W_LOAD, X_TYPE, X_BROADCAST, MAC, K_STEP, 4)                    \
    static void pass_##TYPE(const void *w, int64_t first, const void *x, int64_t stride, int64_t in, int nx, \
                            f32xL sums[4][PASS_VECTORS]) {                                              \
        void (*pass[4])(const W_TYPE *, int64_t, const X_TYPE *, int64_t, int64_t, f32xL[4][PASS_VECTORS]) = \
            {pass_##TYPE##_1, pass_##TYPE##_2, pass_##TYPE##_3, pass_##TYPE##_4};                        \
        pass[nx - 1]((const W_TYPE *)w, first, (const X_TYPE *)x, stride, in, sums);                     \
    }

static inline f32xL broadcast_f32(const float *x, int64_t k) { return (f32xL){0} + x[k]; }

GROUP_PASSES(f32, float, load_f32xL, float, broadcast_f32, fmaL, 1)
/* int8 widened to float32, 2 instructions per 16 weights. Tried on Emerald Rapids and slower: each weight
 * as a bf16 (-127..127 are exact), for the pair products: the magnitude looked up for both bytes of its
 * bf16 (vpermi2b, which retires one per 2 cycles there), the sign or-ed in, the bytes interleaved, 5
 * instructions per 64 weights; steps 20-30% slower at batch 1 and 4 (30M shape, alternating). */
GROUP_PASSES(int8, int8_t, load_int8xL, float, broadcast_f32, fmaL, 1)
#if BF16_PAIRS  /* a pair of inputs k, k + 1 broadcast to every lane, as one 32-bit value */
static inline bf16x32 broadcast_pair(const uint16_t *x, int64_t k) {
    uint32_t pair;
    memcpy(&pair, x + k, sizeof pair);
    return (bf16x32)_mm512_set1_epi32((int)pair);
}
GROUP_PASSES(bf16, uint16_t, load_bf16x32, uint16_t, broadcast_pair, dot_pairs, 2)
#else
GROUP_PASSES(bf16, uint16_t, load_bf16xL, float, broadcast_f32, fmaL, 1)
#endif

/* y[o..o + n) (+)= sums scaled (int8: each rounded to bf16, as torch's result is) plus the bias: LANES at a
 * time, the same arithmetic as one by one */
typedef uint32_t u32xL __attribute__((vector_size(sizeof(f32xL))));
static inline f32xL round_to_bf16(f32xL v) {  /* float_to_bf16, lane by lane, back in float32 */
    u32xL u;
    memcpy(&u, &v, sizeof u);
    const u32xL nan = (u32xL)((u & 0x7fffffffu) > 0x7f800000u);  /* all ones where NaN: it stays NaN */
    u = ((u | 0x400000u) & nan) | ((u + 0x7fffu + ((u >> 16) & 1u)) & ~nan);
    u &= 0xffff0000u;
    memcpy(&v, &u, sizeof v);
    return v;
}

static inline void store(const Matrix *w, float *y, int64_t o, int64_t n, f32xL sums, int accumulate) {
    if (n == LANES) {
        if (w->scales) sums = round_to_bf16(sums * load_f32xL(w->scales + o));
        if (w->bias) sums += load_f32xL(w->bias + o);
        if (accumulate) sums += load_f32xL(y + o);
        memcpy(y + o, &sums, sizeof sums);
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        float v = sums[j];
        if (w->scales) v = bf16_to_float(float_to_bf16(v * w->scales[o + j]));
        if (w->bias) v += w->bias[o + j];
        y[o + j] = accumulate ? y[o + j] + v : v;
    }
}

/* y (B, out) = x (B, in) @ W.T + bias, or y += that when accumulate (the residual stream), from W packed
 * (pack_matrix); int8 rounds x to bf16 in place first and each result to bf16 before the bias (torch's
 * int8 product, precision.py); bf16 with BF16_PAIRS multiplies x rounded to bf16 in x_bf16 (B, in + 1),
 * scratch of the step's. Called inside the parallel region: the groups of outputs are shared among the
 * threads, and each thread streams its share of the packed matrix in order, once per 4 rows. */
static void matmul(const Model *m, const Matrix *w, float *x, int64_t B, float *y, int accumulate,
                   uint16_t *x_bf16) {
    const int64_t in = w->in, out = w->out, inputs = packed_inputs(m->weight_type, in);
    if (m->weight_type == WEIGHT_INT8) {
        /* int8 products take bf16 inputs, as torch's int8 kernel does (precision.py): the same numbers
         * with and without a compiler, and in `score`. x is this product's own scratch input. */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * in; i++) x[i] = bf16_to_float(float_to_bf16(x[i]));
    }
    const char *input = (const char *)x;
    int64_t stride = in;  /* elements from one input row to the next */
    size_t input_width = sizeof(float);
    if (in_pairs(m->weight_type)) {  /* rows padded to an even width with a zero */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < B * inputs; i++) x_bf16[i] = i % inputs < in ? float_to_bf16(x[i / inputs * in + i % inputs]) : 0;
        input = (const char *)x_bf16, stride = inputs, input_width = sizeof(uint16_t);
    }
    const size_t width = weight_width(m->weight_type);
    void (*pass)(const void *, int64_t, const void *, int64_t, int64_t, int, f32xL[4][PASS_VECTORS]) =
        m->weight_type == WEIGHT_F32 ? pass_f32 : m->weight_type == WEIGHT_BF16 ? pass_bf16 : pass_int8;
    const int64_t groups = (out + GROUP - 1) / GROUP;
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const char *weights = (const char *)w->weight + g * GROUP * inputs * width;
        for (int64_t b = 0; b < B; b += 4) {
            const int nx = B - b < 4 ? (int)(B - b) : 4;
            for (int64_t first = 0; first < GROUP; first += PASS) {
                f32xL sums[4][PASS_VECTORS];
                pass(weights, first, input + b * stride * input_width, stride, inputs, nx, sums);
                for (int c = 0; c < nx; c++)
                    for (int v = 0; v < PASS_VECTORS; v++) {
                        const int64_t o = g * GROUP + first + v * LANES, n = out - o < LANES ? out - o : LANES;
                        if (n > 0) store(w, y + (b + c) * out, o, n, sums[c][v], accumulate);
                    }
            }
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
            const uint16_t *key = keys + base + t * n;
            f32xL sum = {0};
            int64_t i = 0;
            for (; i + 32 <= n; i += 32) sum = dot_pairs(load_bf16x32(key + i), load_bf16x32(q_bf16 + i), sum);
            float total = sumL(sum);
            for (; i < n; i++) total += bf16_to_float(key[i]) * bf16_to_float(q_bf16[i]);
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

/* The sum of x[0..n), read as the products read their weights: in order, each thread its share in
 * blocks of 1024, 4 vectors of lanes at a time, each line prefetched 4 KB ahead into every cache level.
 * bench's streaming read, its bound on a decode step (torch's sum, which leaves the reading to the
 * hardware's prefetchers, read 495 MB at 22 GB/s where the step streamed them at 25). */
double stream_sum(const float *x, int64_t n, int threads) {
    double total = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (int64_t block = 0; block < (n + 1023) / 1024; block++) {
        const int64_t end = (block + 1) * 1024 < n ? (block + 1) * 1024 : n;
        f32xL sum[4] = {{0}};
        int64_t i = block * 1024;
        for (; i + 4 * LANES <= end; i += 4 * LANES) {
            for (int64_t line = 0; line < 4 * LANES * 4; line += 64) __builtin_prefetch((const char *)(x + i) + 4096 + line, 0, 3);
            for (int j = 0; j < 4; j++) sum[j] += load_f32xL(x + i + j * LANES);
        }
        float rest = 0;
        for (; i < end; i++) rest += x[i];
        total += sumL((sum[0] + sum[1]) + (sum[2] + sum[3])) + rest;
    }
    return total;
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
    uint16_t *x_bf16 = malloc(sizeof(uint16_t) * B * (wide + 1));  /* the products' inputs for BF16_PAIRS */
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
