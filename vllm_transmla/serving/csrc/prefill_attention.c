/*
 * Attention of one request's new tokens over its keys, fused per tile of keys (x86-64, AVX2 + FMA), fp32.
 *
 * out[h, i] = softmax_j(scale * q[h, i] . k[h, j]) @ v[h, j], over j <= offset + i (causal: the queries
 * are the last Tq of Tk positions) or over every j (a chunk of cached context), and when asked
 * lse[h, i] = log sum_j exp(scale * q[h, i] . k[h, j]), the weight vLLM merges partial results by.
 *
 * Why a kernel: in torch the prefill writes a score block (16 heads x 128 query rows x Tk keys, 32 MB at
 * 4K tokens), soft-maxes it in place and multiplies it by V: two passes through memory per block, which
 * held it to 45-55% of the matmul peak (benchmarks/speed/prefill_step.py). Here a block of QB query rows
 * walks the keys TILE at a time: scores of 3 rows x 32 keys are built in 12 registers (no horizontal
 * sums) from the pre-transposed keys, packed tile by tile (a contiguous 16 KB block per tile at d_qk 128:
 * a row stride of Tk floats put every row of a tile in the same cache sets and ran 5x slower), stay in
 * L1, are soft-maxed online (flash attention) and multiplied into the rows' L1-resident accumulators. Work items are (head, query block) on torch's own
 * OpenMP threads, largest first; a row's result depends only on its own query and keys, accumulated in a
 * fixed order, so it does not depend on the rest of the batch.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "tile_ops.h"

#define QB 48 /* query rows of one work item (a multiple of 3, the score register block) */

/* s[i][0 : 32] = q[i] . kt[:, 0 : 32] for 3 rows: q rows qstride floats apart, kt = one tile of K^T
 * (dqk rows of 32 keys), s rows TILE floats apart. Named accumulators, not an array: GCC kept an
 * array's 12 vectors in registers but also stored them to the stack every iteration (2x slower). */
static inline void qk_rows3(const float *q, int qstride, const float *kt, int dqk, float *s) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    __m256 a20 = a00, a21 = a00, a22 = a00, a23 = a00;
    const float *q0 = q, *q1 = q + qstride, *q2 = q + 2 * qstride;
    for (int d = 0; d < dqk; d++) {
        const float *kr = kt + (size_t)d * TILE;
        __m256 k0 = _mm256_loadu_ps(kr), k1 = _mm256_loadu_ps(kr + 8);
        __m256 k2 = _mm256_loadu_ps(kr + 16), k3 = _mm256_loadu_ps(kr + 24);
        __m256 b = _mm256_broadcast_ss(q0 + d);
        a00 = _mm256_fmadd_ps(b, k0, a00), a01 = _mm256_fmadd_ps(b, k1, a01);
        a02 = _mm256_fmadd_ps(b, k2, a02), a03 = _mm256_fmadd_ps(b, k3, a03);
        b = _mm256_broadcast_ss(q1 + d);
        a10 = _mm256_fmadd_ps(b, k0, a10), a11 = _mm256_fmadd_ps(b, k1, a11);
        a12 = _mm256_fmadd_ps(b, k2, a12), a13 = _mm256_fmadd_ps(b, k3, a13);
        b = _mm256_broadcast_ss(q2 + d);
        a20 = _mm256_fmadd_ps(b, k0, a20), a21 = _mm256_fmadd_ps(b, k1, a21);
        a22 = _mm256_fmadd_ps(b, k2, a22), a23 = _mm256_fmadd_ps(b, k3, a23);
    }
    _mm256_storeu_ps(s, a00), _mm256_storeu_ps(s + 8, a01), _mm256_storeu_ps(s + 16, a02), _mm256_storeu_ps(s + 24, a03);
    s += TILE;
    _mm256_storeu_ps(s, a10), _mm256_storeu_ps(s + 8, a11), _mm256_storeu_ps(s + 16, a12), _mm256_storeu_ps(s + 24, a13);
    s += TILE;
    _mm256_storeu_ps(s, a20), _mm256_storeu_ps(s + 8, a21), _mm256_storeu_ps(s + 16, a22), _mm256_storeu_ps(s + 24, a23);
}

/* The same for one row. */
static inline void qk_rows1(const float *q, const float *kt, int dqk, float *s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int d = 0; d < dqk; d++) {
        const float *kr = kt + (size_t)d * TILE;
        __m256 b = _mm256_broadcast_ss(q + d);
        a0 = _mm256_fmadd_ps(b, _mm256_loadu_ps(kr), a0), a1 = _mm256_fmadd_ps(b, _mm256_loadu_ps(kr + 8), a1);
        a2 = _mm256_fmadd_ps(b, _mm256_loadu_ps(kr + 16), a2), a3 = _mm256_fmadd_ps(b, _mm256_loadu_ps(kr + 24), a3);
    }
    _mm256_storeu_ps(s, a0), _mm256_storeu_ps(s + 8, a1), _mm256_storeu_ps(s + 16, a2), _mm256_storeu_ps(s + 24, a3);
}

/* acc[i][0 : 32] += sum_t p[i][t] v[t][0 : 32] for 3 rows (p rows TILE apart, v rows vstride apart, acc
 * rows astride apart), in token order: the score block's shape, 12 named accumulators. */
static inline void pv_rows3(const float *p, const float *v, long vstride, int ntok, float *acc, int astride) {
    float *c0 = acc, *c1 = acc + astride, *c2 = acc + 2 * astride;
    __m256 a00 = _mm256_loadu_ps(c0), a01 = _mm256_loadu_ps(c0 + 8), a02 = _mm256_loadu_ps(c0 + 16), a03 = _mm256_loadu_ps(c0 + 24);
    __m256 a10 = _mm256_loadu_ps(c1), a11 = _mm256_loadu_ps(c1 + 8), a12 = _mm256_loadu_ps(c1 + 16), a13 = _mm256_loadu_ps(c1 + 24);
    __m256 a20 = _mm256_loadu_ps(c2), a21 = _mm256_loadu_ps(c2 + 8), a22 = _mm256_loadu_ps(c2 + 16), a23 = _mm256_loadu_ps(c2 + 24);
    for (int t = 0; t < ntok; t++) {
        const float *vr = v + (size_t)t * vstride;
        __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8), v2 = _mm256_loadu_ps(vr + 16), v3 = _mm256_loadu_ps(vr + 24);
        __m256 b = _mm256_broadcast_ss(p + t);
        a00 = _mm256_fmadd_ps(b, v0, a00), a01 = _mm256_fmadd_ps(b, v1, a01);
        a02 = _mm256_fmadd_ps(b, v2, a02), a03 = _mm256_fmadd_ps(b, v3, a03);
        b = _mm256_broadcast_ss(p + TILE + t);
        a10 = _mm256_fmadd_ps(b, v0, a10), a11 = _mm256_fmadd_ps(b, v1, a11);
        a12 = _mm256_fmadd_ps(b, v2, a12), a13 = _mm256_fmadd_ps(b, v3, a13);
        b = _mm256_broadcast_ss(p + 2 * TILE + t);
        a20 = _mm256_fmadd_ps(b, v0, a20), a21 = _mm256_fmadd_ps(b, v1, a21);
        a22 = _mm256_fmadd_ps(b, v2, a22), a23 = _mm256_fmadd_ps(b, v3, a23);
    }
    _mm256_storeu_ps(c0, a00), _mm256_storeu_ps(c0 + 8, a01), _mm256_storeu_ps(c0 + 16, a02), _mm256_storeu_ps(c0 + 24, a03);
    _mm256_storeu_ps(c1, a10), _mm256_storeu_ps(c1 + 8, a11), _mm256_storeu_ps(c1 + 16, a12), _mm256_storeu_ps(c1 + 24, a13);
    _mm256_storeu_ps(c2, a20), _mm256_storeu_ps(c2 + 8, a21), _mm256_storeu_ps(c2 + 16, a22), _mm256_storeu_ps(c2 + 24, a23);
}

/* acc [rows][dv] += probs [rows][TILE] @ v[:ntok, :dv]: 3 rows x 32 dims at a time, the rest by the
 * shared 8-wide blocks. */
static void block_values(const float *probs, int rows, const float *v, long vstride, int ntok, float *acc, int dv) {
    int d = 0;
    for (; d + 32 <= dv; d += 32) {
        int i = 0;
        for (; i + 3 <= rows; i += 3) pv_rows3(probs + i * TILE, v + d, vstride, ntok, acc + (size_t)i * dv + d, dv);
        for (; i < rows; i++) {
            pv_1x3(probs + i * TILE, TILE, v + d, (int)vstride, ntok, acc + (size_t)i * dv + d, dv);
            pv_1x1(probs + i * TILE, TILE, v + d + 24, (int)vstride, ntok, acc + (size_t)i * dv + d + 24, dv);
        }
    }
    for (; d < dv; d += 8) {
        int i = 0;
        for (; i + 4 <= rows; i += 4) pv_4x1(probs + i * TILE, TILE, v + d, (int)vstride, ntok, acc + (size_t)i * dv + d, dv);
        for (; i < rows; i++) pv_1x1(probs + i * TILE, TILE, v + d, (int)vstride, ntok, acc + (size_t)i * dv + d, dv);
    }
}

#if TILE != 32
#error "the score register block covers 32 keys"
#endif

/*
 * q [heads][tq][dqk] at strides (q_head, q_tok), unscaled; kt [heads][tkp / TILE][dqk][TILE] = K^T packed
 * by tiles of TILE keys, zero-padded to tkp keys (a multiple of TILE), heads kt_head floats apart;
 * v [heads][tk][dv] at strides (v_head, v_tok), dv a multiple of 8; out [heads][tq][dv] at strides
 * (o_head, o_tok); lse [heads][tq] contiguous, or NULL.
 * Returns 0, or 1 for a shape it does not take, 2 when out of memory.
 */
int prefill_attention(const float *q, long q_head, long q_tok, const float *kt, long kt_head, int tkp,
                      const float *v, long v_head, long v_tok, float *out, long o_head, long o_tok, float *lse,
                      int heads, int tq, int tk, int dqk, int dv, float scale, int causal, int threads) {
    int offset = causal ? tk - tq : 0; /* key index of query 0's own position */
    if (dv % 8 != 0 || offset < 0 || tkp < tk || tkp % TILE != 0 || tq <= 0 || tk <= 0) return 1;
    int blocks = (tq + QB - 1) / QB;
    long items = (long)heads * blocks;
    size_t per_thread = (size_t)QB * dqk + (size_t)QB * TILE + (size_t)QB * dv + 2 * QB;
    int failed = 0;

#pragma omp parallel num_threads(threads)
    {
        float *space = malloc(sizeof(float) * per_thread);
        if (!space) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            float *qbuf = space, *scores = qbuf + (size_t)QB * dqk, *acc = scores + (size_t)QB * TILE;
            float *run_max = acc + (size_t)QB * dv, *run_sum = run_max + QB;
#pragma omp for schedule(dynamic, 1)
            for (long it = 0; it < items; it++) {
                int block = blocks - 1 - (int)(it / heads), h = (int)(it % heads); /* the longest rows first */
                int r0 = block * QB, rows = tq - r0 < QB ? tq - r0 : QB;
                for (int i = 0; i < rows; i++) {
                    const float *src = q + h * q_head + (long)(r0 + i) * q_tok;
                    for (int d = 0; d < dqk; d++) qbuf[(size_t)i * dqk + d] = src[d] * scale;
                }
                memset(acc, 0, sizeof(float) * (size_t)rows * dv);
                for (int i = 0; i < rows; i++) run_max[i] = -INFINITY, run_sum[i] = 0.0f;
                int limit = causal ? offset + r0 + rows : tk; /* keys the block's last row sees */
                const float *kth = kt + h * kt_head, *vh = v + h * v_head;
                for (int j0 = 0; j0 < limit; j0 += TILE) {
                    int ntok = limit - j0 < TILE ? limit - j0 : TILE;
                    const float *ktile = kth + (size_t)j0 * dqk; /* tile j0 / TILE: dqk x TILE floats */
                    int i = 0;
                    for (; i + 3 <= rows; i += 3) qk_rows3(qbuf + (size_t)i * dqk, dqk, ktile, dqk, scores + i * TILE);
                    for (; i < rows; i++) qk_rows1(qbuf + (size_t)i * dqk, ktile, dqk, scores + i * TILE);
                    if (causal && j0 + ntok - 1 > offset + r0) /* the diagonal: keys after a row's own position */
                        for (i = 0; i < rows; i++) {
                            int first = offset + r0 + i + 1 - j0; /* the row's first future key in the tile */
                            for (int j = first > 0 ? first : 0; j < ntok; j++) scores[i * TILE + j] = -INFINITY;
                        }
                    tile_softmax(scores, rows, ntok, run_max, run_sum, acc, dv);
                    block_values(scores, rows, vh + (long)j0 * v_tok, v_tok, ntok, acc, dv);
                }
                for (int i = 0; i < rows; i++) {
                    float inv = 1.0f / run_sum[i], *dst = out + h * o_head + (long)(r0 + i) * o_tok;
                    for (int d = 0; d < dv; d++) dst[d] = acc[(size_t)i * dv + d] * inv;
                    if (lse) lse[(long)h * tq + r0 + i] = run_max[i] + logf(run_sum[i]);
                }
            }
        }
        free(space);
    }
    return failed ? 2 : 0;
}
