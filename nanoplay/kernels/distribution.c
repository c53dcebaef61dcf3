/*
 * The sampler's passes over the vocabulary, for the common cases, in C (sampling.py holds the whole
 * chain in torch, and uses these where the kernels load):
 *  - distribution_stats: the figures every generated or scored token reports about its model's
 *    next-token distribution (sampling.py's Distribution), for rows of float32 logits: each row's
 *    maximum, log Z = log sum_j e^(x_j - max) and entropy in float64, and its most likely ids;
 *  - temperature_race: a token drawn at a temperature with no other setting (the playground's and
 *    gen's default), by sampling.choose's exponential race over float64 logits and noise;
 *  - uniform_noise: that noise, sampling.draw_noise's counter-based uniform numbers.
 *
 * Why C: in torch each is several passes over the vocabulary in float64 (log_softmax, exp, a
 * product, a sum, topk; a division, log_softmax, a log, a comparison, argmax), 0.4-0.8 ms a row on a
 * 2-core CPU: a tenth of a small model's decode step or more. Here each takes one or two passes and
 * a fraction of that time.
 *
 * The sums run in float64 with e^x to double precision (Cephes' rational approximation, within
 * 2 ulp of libm's exp, tested), and log Z as log1p of what the maximum's 1 leaves, so a
 * log-probability (x - max) - log Z is correct to float64 rounding even for a model all but certain
 * of its next token (where torch's log_softmax takes the log of 1 + 1e-20 as 0). Rows are cut into
 * chunks of CHUNK entries whose partial results are combined in order, so no result depends on the
 * number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vectors.h"

enum { CHUNK = 4096 };

typedef double f64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
static inline int any8(i32x8 mask) { /* is any lane of a comparison's mask set */
    int64_t lanes[4];
    memcpy(lanes, &mask, sizeof lanes);
    return (lanes[0] | lanes[1] | lanes[2] | lanes[3]) != 0;
}

/* e^d for 4 doubles with -708 <= d <= 0 (the caller's range: e^-708 is still a normal double).
 * d = n ln2 + r, |r| <= ln2 / 2; e^r = 1 + 2 r P(r^2) / (Q(r^2) - r P(r^2)) (Cephes' exp.c); times 2^n
 * built in the exponent bits. */
static inline f64x4 exp4d(f64x4 d) {
    const double magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer in the low bits */
    f64x4 t = d * 1.4426950408889634073599 + magic;
    f64x4 n = t - magic;
    i64x4 k;
    memcpy(&k, &t, sizeof k);
    int64_t magic_bits;
    memcpy(&magic_bits, &magic, sizeof magic_bits);
    k -= magic_bits; /* n as an integer */
    f64x4 r = d - n * 6.93145751953125e-1;
    r = r - n * 1.42860682030941723212e-6;
    f64x4 rr = r * r;
    f64x4 p = ((rr * 1.26177193074810590878e-4 + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1) * r;
    f64x4 q = ((rr * 3.00198505138664455042e-6 + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
              2.00000000000000000009e0;
    f64x4 e = 1.0 + 2.0 * (p / (q - p));
    i64x4 bits = (k + 1023) << 52;
    f64x4 scale;
    memcpy(&scale, &bits, sizeof scale);
    return e * scale;
}

static inline int any4(i64x4 mask) { return (mask[0] | mask[1] | mask[2] | mask[3]) != 0; }

static inline f64x4 select4d(i64x4 mask, f64x4 a, f64x4 b) { /* a where mask (all ones), else b */
    i64x4 ai, bi;
    memcpy(&ai, &a, sizeof ai), memcpy(&bi, &b, sizeof bi);
    ai = (ai & mask) | (bi & ~mask);
    memcpy(&a, &ai, sizeof a);
    return a;
}

/* The largest of n >= 1 values x[0..n) into *max, and whether every one is finite (x - x is 0 only then):
 * float32 values 8 at a time, float64 ones 4 at a time. */
static int max_f32(const float *x, int64_t n, double *max) {
    f32x8 best8 = (f32x8){0} + x[0], nonfinite8 = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        f32x8 v = load_f32(x + i);
        best8 = select8(v > best8, v, best8);
        nonfinite8 += v - v; /* NaN where v is NaN or infinite */
    }
    float best = best8[0], nonfinite = 0;
    for (int j = 0; j < 8; j++) best = best8[j] > best ? best8[j] : best, nonfinite += nonfinite8[j];
    for (; i < n; i++) best = x[i] > best ? x[i] : best, nonfinite += x[i] - x[i];
    *max = best;
    return nonfinite == 0;
}

static int max_f64(const double *x, int64_t n, double *max) {
    f64x4 best4 = (f64x4){0} + x[0], nonfinite4 = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        f64x4 v;
        memcpy(&v, x + i, sizeof v);
        best4 = select4d(v > best4, v, best4);
        nonfinite4 += v - v;
    }
    double best = best4[0], nonfinite = 0;
    for (int j = 0; j < 4; j++) best = best4[j] > best ? best4[j] : best, nonfinite += nonfinite4[j];
    for (; i < n; i++) best = x[i] > best ? x[i] : best, nonfinite += x[i] - x[i];
    *max = best;
    return nonfinite == 0;
}

/* A chunk's part of a row: the sum of e^(x - max) over its entries below the maximum, how many equal it
 * (each adds 1: kept apart, so that a total of 1 + 1e-300 keeps its 1e-300 for log1p), the sum of
 * e^(x - max) (x - max), and its `top` most likely ids (most likely first; of equal logits the lower id
 * first, as argmax takes). */
typedef struct {
    double below, s;
    int64_t at_max, count;  /* count: ids held so far, up to top */
} Part;

/* Insert id j with logit v into the sorted list (vals, ids) of `count` entries holding at most `top`,
 * if it belongs there: after every entry at least as likely, so equal logits keep id order. */
static inline void keep_top(float *vals, int64_t *ids, int64_t *count, int64_t top, float v, int64_t j) {
    if (*count == top && !(v > vals[top - 1])) return;
    int64_t at = *count < top ? (*count)++ : top - 1;
    while (at > 0 && vals[at - 1] < v) {
        vals[at] = vals[at - 1], ids[at] = ids[at - 1];
        at--;
    }
    vals[at] = v, ids[at] = j;
}

static void chunk_part(const float *x, int64_t n, int64_t offset, float max, int64_t top, Part *part, float *vals,
                       int64_t *ids) {
    f64x4 z = {0}, s = {0};
    i64x4 ties = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        f32x4 v;
        memcpy(&v, x + i, sizeof v);
        f64x4 d = __builtin_convertvector(v, f64x4) - (double)max; /* exact: two floats' difference */
        i64x4 normal = d >= -708.0;                                /* all ones where e^d is a normal double */
        f64x4 e = exp4d(select4d(normal, d, (f64x4){0} - 708.0));
        e = select4d(normal, e, (f64x4){0});                       /* below e^-708: nothing a sum of >= 1 keeps */
        ties -= d == 0.0;
        z += select4d(d < 0.0, e, (f64x4){0});
        s += e * d;
    }
    double zt = (z[0] + z[2]) + (z[1] + z[3]), st = (s[0] + s[2]) + (s[1] + s[3]);
    int64_t at_max = ties[0] + ties[1] + ties[2] + ties[3];
    for (; i < n; i++) {
        double d = (double)x[i] - (double)max, e = d < -708.0 ? 0.0 : exp(d);
        zt += d < 0.0 ? e : 0.0, st += e * d, at_max += d == 0.0;
    }
    part->below = zt, part->s = st, part->at_max = at_max, part->count = 0;
    /* the top entries: most values fail one comparison with the least of those kept, 8 at a time */
    for (i = 0; i < n; i += 8) {
        const int64_t end = i + 8 < n ? i + 8 : n;
        if (end - i == 8 && part->count == top && !any8(load_f32(x + i) > vals[top - 1])) continue;
        for (int64_t j = i; j < end; j++) keep_top(vals, ids, &part->count, top, x[j], offset + j);
    }
}

/*
 * logits (rows, vocab) float32 -> max (rows,) float32, log_z and entropy (rows,) float64, in nats,
 * top_ids (rows, top) int64, with 1 <= top <= vocab, and their log-probabilities top_logprobs (rows, top)
 * float64, (x - max) - log_z as sampling.py's _logprobs computes them. Returns 0; 1 if a row holds NaN or +-inf (the
 * caller's exact path handles those: nothing is written); -1 if out of memory.
 */
int distribution_stats(const float *logits, int64_t rows, int64_t vocab, int64_t top, int threads, float *max,
                       double *log_z, double *entropy, int64_t *top_ids, double *top_logprobs) {
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    Part *parts = malloc(sizeof(Part) * rows * chunks);
    float *chunk_max = malloc(sizeof(float) * rows * chunks), *vals = malloc(sizeof(float) * rows * chunks * top);
    float *merged = malloc(sizeof(float) * top);  /* a row's top logits, as its chunks' are merged */
    int64_t *ids = malloc(sizeof(int64_t) * rows * chunks * top);
    int status = parts && chunk_max && vals && merged && ids ? 0 : -1;
    if (status == 0) {
        int finite = 1;
#pragma omp parallel num_threads(threads)
        {
            /* the maximum of each chunk, and whether every value is finite (x - x is 0 only then) */
#pragma omp for schedule(static) reduction(&& : finite)
            for (int64_t k = 0; k < rows * chunks; k++) {
                const int64_t row = k / chunks, start = k % chunks * CHUNK;
                const int64_t n = vocab - start < CHUNK ? vocab - start : CHUNK;
                double best;
                const int ok = max_f32(logits + row * vocab + start, n, &best);
                chunk_max[k] = (float)best; /* a float's value: exact */
                finite = finite && ok;
            }
            if (finite) {
#pragma omp for schedule(static)
                for (int64_t k = 0; k < rows * chunks; k++) {
                    const int64_t row = k / chunks, start = k % chunks * CHUNK;
                    float best = chunk_max[row * chunks];
                    for (int64_t c = 1; c < chunks; c++) best = chunk_max[row * chunks + c] > best ? chunk_max[row * chunks + c] : best;
                    chunk_part(logits + row * vocab + start, vocab - start < CHUNK ? vocab - start : CHUNK, start, best,
                               top, &parts[k], vals + k * top, ids + k * top);
                }
            }
        }
        if (!finite) status = 1;
        for (int64_t row = 0; row < rows && status == 0; row++) {
            float best = chunk_max[row * chunks];
            double below = 0, s = 0;
            int64_t at_max = 0, count = 0;
            for (int64_t c = 0; c < chunks; c++) {  /* in chunk order: the same figures for any number of threads */
                const int64_t k = row * chunks + c;
                best = chunk_max[k] > best ? chunk_max[k] : best;
                below += parts[k].below, s += parts[k].s, at_max += parts[k].at_max;
                for (int64_t i = 0; i < parts[k].count; i++)
                    keep_top(merged, top_ids + row * top, &count, top, vals[k * top + i], ids[k * top + i]);
            }
            /* z = sum e^(x - max) = 1 + rest: log z = log1p(rest), exact even where rest is below 1e-16 */
            const double rest = below + (double)(at_max - 1);
            max[row] = best;
            log_z[row] = log1p(rest);
            entropy[row] = log1p(rest) - s / (1.0 + rest); /* -sum p log p, p = e^(x - max) / z; both terms >= 0 */
            for (int64_t i = 0; i < top; i++) top_logprobs[row * top + i] = ((double)merged[i] - (double)best) - log_z[row];
        }
    }
    free(parts), free(chunk_max), free(vals), free(merged), free(ids);
    return status;
}

/*
 * sampling.draw_noise's uniform numbers for one token's choice: out[i] = the top 53 bits of
 * mix(step_key + (i + 1) * golden) as a double in [0, 1), SplitMix64's output at position i + 1 of the
 * stream that starts at step_key (Steele, Lea and Flood 2014; Vigna's constants). Integer arithmetic and
 * an exact scaling: the same bits as sampling.py's torch version, on any machine.
 */
static inline uint64_t splitmix64_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

void uniform_noise(uint64_t step_key, int64_t n, double *out) {
    const uint64_t golden = 0x9E3779B97F4A7C15u;
    for (int64_t i = 0; i < n; i++) out[i] = (double)(splitmix64_mix(step_key + (uint64_t)(i + 1) * golden) >> 11) * 0x1p-53;
}

/* Can p / E beat the best key so far, with E = -log1p(-u) >= u? Not when p / u is below it by a margin
 * (1e-12, relative) that covers the rounding of log1p, of the division and of both products here. */
static inline int could_win(double p, double u, double best) { return !(p * (1.0 + 1e-12) < best * u); }
static inline int could_win4(f64x4 p, f64x4 u, double best) { /* could_win in any of 4 lanes */
    return any4(~(p * (1.0 + 1e-12) < best * u));
}

/* A token's key p / E in the race: E = 0 (u = 0) wins where the token can be drawn at all, not where
 * d = (x - max) / T is -inf. */
static inline double race_key(double p, double d, double u) {
    double e = -log1p(-u);
    return e == 0.0 ? (d > -INFINITY ? INFINITY : 0.0) : p / e;
}

/*
 * The exponential race at a temperature, sampling.choose's for a row of finite logits (vocab,), float64
 * where `is_double`, else float32 (read as float64: exactly), with no other setting:
 * token = argmax_j p_j / E_j with p_j proportional to e^((x_j - max) / T) and
 * E_j = -log1p(-U_j) for uniform noise U_j in [0, 1) (an E_j of 0 wins, the first such, unless
 * (x_j - max) / T is -inf; equal keys go to the lower id, as torch.argmax's).
 * The key e^((x_j - max) / T) / E_j orders tokens as torch's (x_j - max) / T - log Z - log E_j does,
 * up to float64 rounding of a near tie. E_j >= U_j, so a token whose p_j / U_j is below the best key so
 * far cannot win: its logarithm is skipped (with a margin far above the rounding of either side), which
 * leaves about 120 logarithms in a row of 50304 (random rows, 4096-entry chunks). Writes the token,
 * the row's maximum and log Z at temperature T (log_z: the sampling log-probability of j is
 * (x_j - max) / T - log_z). Returns 0; 1 if the row holds
 * NaN or +-inf (nothing written: the caller's torch chain handles it); -1 if out of memory.
 */
static inline double logit_at(const void *logits, int is_double, int64_t i) {
    return is_double ? ((const double *)logits)[i] : (double)((const float *)logits)[i];
}

static inline f64x4 logits_at(const void *logits, int is_double, int64_t i) { /* entries i..i+3 */
    f64x4 x;
    if (is_double) {
        memcpy(&x, (const double *)logits + i, sizeof x);
    } else {
        f32x4 v;
        memcpy(&v, (const float *)logits + i, sizeof v);
        x = __builtin_convertvector(v, f64x4);
    }
    return x;
}

int temperature_race(const void *logits, int is_double, int64_t vocab, double temperature, const double *uniforms,
                     int threads, int64_t *token, double *max, double *log_z) {
    const int64_t chunks = (vocab + CHUNK - 1) / CHUNK;
    double *chunk_max = malloc(sizeof(double) * chunks), *below = malloc(sizeof(double) * chunks);
    double *best_key = malloc(sizeof(double) * chunks);
    int64_t *at_max = malloc(sizeof(int64_t) * chunks), *best_id = malloc(sizeof(int64_t) * chunks);
    int status = chunk_max && below && best_key && at_max && best_id ? 0 : -1;
    if (status == 0) {
        int finite = 1;
        double row_max = 0;
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static) reduction(&& : finite)
            for (int64_t c = 0; c < chunks; c++) {
                const int64_t start = c * CHUNK, n = vocab - start < CHUNK ? vocab - start : CHUNK;
                const int ok = is_double ? max_f64((const double *)logits + start, n, &chunk_max[c])
                                         : max_f32((const float *)logits + start, n, &chunk_max[c]);
                finite = finite && ok;
            }
#pragma omp single
            {
                row_max = chunk_max[0];
                for (int64_t c = 1; c < chunks; c++) row_max = chunk_max[c] > row_max ? chunk_max[c] : row_max;
            }
            if (finite) {
#pragma omp for schedule(static)
                for (int64_t c = 0; c < chunks; c++) {
                    const int64_t start = c * CHUNK, n = vocab - start < CHUNK ? vocab - start : CHUNK;
                    f64x4 z = {0};
                    i64x4 ties = {0};
                    double key = -1.0; /* every key is >= 0 */
                    int64_t id = -1, i = start;
                    for (; i + 4 <= start + n; i += 4) {
                        /* (x - max) / T, as filter_logits scales; x / 1 is x: no division at the default */
                        f64x4 d = logits_at(logits, is_double, i) - row_max;
                        if (temperature != 1.0) d /= temperature;
                        i64x4 normal = d >= -708.0;
                        f64x4 q = select4d(normal, exp4d(select4d(normal, d, (f64x4){0} - 708.0)), (f64x4){0});
                        ties -= d == 0.0;
                        z += select4d(d < 0.0, q, (f64x4){0});
                        f64x4 u;
                        memcpy(&u, uniforms + i, sizeof u);
                        if (!could_win4(q, u, key)) continue; /* in no lane: most often */
                        for (int l = 0; l < 4; l++)
                            if (could_win(q[l], uniforms[i + l], key)) {
                                double k = race_key(q[l], d[l], uniforms[i + l]);
                                if (k > key) key = k, id = i + l;
                            }
                    }
                    double zt = (z[0] + z[2]) + (z[1] + z[3]);
                    int64_t tied = ties[0] + ties[1] + ties[2] + ties[3];
                    for (; i < start + n; i++) {
                        double d = (logit_at(logits, is_double, i) - row_max) / temperature;
                        double q = d < -708.0 ? 0.0 : exp(d);
                        zt += d < 0.0 ? q : 0.0, tied += d == 0.0;
                        if (could_win(q, uniforms[i], key)) {
                            double k = race_key(q, d, uniforms[i]);
                            if (k > key) key = k, id = i;
                        }
                    }
                    below[c] = zt, at_max[c] = tied, best_key[c] = key, best_id[c] = id;
                }
            }
        }
        if (!finite) status = 1;
        if (status == 0) {
            double rest = 0, key = -1.0;
            int64_t tied = 0, id = -1;
            for (int64_t c = 0; c < chunks; c++) { /* in chunk order: a tie goes to the lower id */
                rest += below[c], tied += at_max[c];
                if (best_key[c] > key) key = best_key[c], id = best_id[c];
            }
            *token = id, *max = row_max, *log_z = log1p(rest + (double)(tied - 1));
        }
    }
    free(chunk_max), free(below), free(best_key), free(at_max), free(best_id);
    return status;
}
