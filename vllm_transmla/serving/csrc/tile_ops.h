/*
 * SIMD pieces shared by the CPU kernels (AVX2 + FMA): a horizontal sum, exp, the probs @ values register
 * blocks, and the online softmax of a tile of TILE scores per row (flash attention's running max/sum).
 * What only one kernel uses stays in its own file.
 */
#ifndef TRANSMLA_TILE_OPS_H
#define TRANSMLA_TILE_OPS_H
#include <immintrin.h>
#include <math.h>

#ifndef TILE
#define TILE 32 /* keys whose scores are computed, soft-maxed and multiplied together */
#endif

static inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}

/* exp for x <= 0 (Cephes polynomial, ~1 ulp); -inf and anything below -87 give ~0. */
static inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500E-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* acc[i][d0 : d0 + 8 NV] += sum_t p[i][t] c[t][d0 : d0 + 8 NV] for NH heads, in token order. */
#define DEFINE_PV(NH, NV)                                                                                    \
    static inline void pv_##NH##x##NV(const float *p, int pstride, const float *c, int cstride, int ntok, \
                                      float *acc, int astride) {                                           \
        __m256 a[NH][NV];                                                                                    \
        for (int i = 0; i < NH; i++)                                                                         \
            for (int j = 0; j < NV; j++) a[i][j] = _mm256_loadu_ps(acc + (size_t)i * astride + 8 * j);       \
        for (int t = 0; t < ntok; t++) {                                                                     \
            __m256 cv[NV];                                                                                   \
            for (int j = 0; j < NV; j++) cv[j] = _mm256_loadu_ps(c + (size_t)t * cstride + 8 * j);           \
            for (int i = 0; i < NH; i++) {                                                                   \
                __m256 pv = _mm256_broadcast_ss(p + (size_t)i * pstride + t);                                \
                for (int j = 0; j < NV; j++) a[i][j] = _mm256_fmadd_ps(pv, cv[j], a[i][j]);                  \
            }                                                                                                \
        }                                                                                                    \
        for (int i = 0; i < NH; i++)                                                                         \
            for (int j = 0; j < NV; j++) _mm256_storeu_ps(acc + (size_t)i * astride + 8 * j, a[i][j]);       \
    }
DEFINE_PV(4, 3)
DEFINE_PV(4, 1)
DEFINE_PV(1, 3)
DEFINE_PV(1, 1)

/* Online softmax of one tile for `heads` rows: scores [rows][TILE] -> probs in place, running max/sum
 * updated, acc [rows][rp] rescaled; lanes from ntok on count as -inf. */
static inline void tile_softmax(float *scores, int heads, int ntok, float *run_max, float *run_sum, float *acc, int rp) {
    for (int h = 0; h < heads; h++) {
        float *s = scores + h * TILE;
        for (int t = ntok; t < TILE; t++) s[t] = -INFINITY;  /* pad lanes give exp = 0 */
        __m256 m = _mm256_set1_ps(-INFINITY);
        for (int t = 0; t < TILE; t += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float tile_max = _mm_cvtss_f32(m4);
        float new_max = run_max[h] > tile_max ? run_max[h] : tile_max;
        __m256 nm = _mm256_set1_ps(new_max), total = _mm256_setzero_ps();
        for (int t = 0; t < TILE; t += 8) {
            __m256 v = _mm256_loadu_ps(s + t), real = _mm256_cmp_ps(v, _mm256_set1_ps(-INFINITY), _CMP_GT_OQ);
            __m256 e = _mm256_and_ps(real, exp_ps(_mm256_sub_ps(v, nm)));
            _mm256_storeu_ps(s + t, e);
            total = _mm256_add_ps(total, e);
        }
        if (new_max != run_max[h]) {
            float alpha = run_max[h] == -INFINITY ? 0.0f : expf(run_max[h] - new_max);
            __m256 av = _mm256_set1_ps(alpha);
            float *a = acc + (size_t)h * rp;
            for (int d = 0; d < rp; d += 8) _mm256_storeu_ps(a + d, _mm256_mul_ps(av, _mm256_loadu_ps(a + d)));
            run_sum[h] *= alpha;
            run_max[h] = new_max;
        }
        run_sum[h] += hsum(total);
    }
}

#endif
