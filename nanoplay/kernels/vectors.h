/*
 * 8 floats in one vector, for decode_step.c and distribution.c: GCC's and Clang's vector extensions,
 * which compile to AVX (or two NEON registers) with -march=native; loads go through memcpy, as nothing
 * here is aligned.
 */
#ifndef NANOPLAY_VECTORS_H
#define NANOPLAY_VECTORS_H

#include <stdint.h>
#include <string.h>

typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));

static inline f32x8 load_f32(const float *p) { f32x8 v; memcpy(&v, p, sizeof v); return v; }

static inline f32x8 select8(i32x8 mask, f32x8 a, f32x8 b) {  /* a where mask (all ones), else b */
    i32x8 ai, bi;
    memcpy(&ai, &a, sizeof ai), memcpy(&bi, &b, sizeof bi);
    ai = (ai & mask) | (bi & ~mask);
    memcpy(&a, &ai, sizeof a);
    return a;
}

#endif
