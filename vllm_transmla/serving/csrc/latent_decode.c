/*
 * Absorbed MLA decode over a paged latent cache, fused per tile of tokens (x86-64, AVX2 + FMA + F16C).
 *
 * out[b, h, :R] = softmax_t(scale * q[b, h] . c[b, t]) @ c[b, t, :R], c = the cached latent rows
 * (R latent dims + D rope dims, fp32 / bf16 / fp16), one query token per sequence.
 *
 * Why a kernel: in torch the decode is gather blocks -> convert to fp32 -> [H x W] @ [W x S] ->
 * softmax -> [H x S] @ [S x R], each pass through memory, and the 16-row GEMMs run at 40-55% of the
 * matmul peak (benchmarks/speed/decode_step.py). Here every tile of TILE tokens is converted once into
 * an L2-resident fp32 block (fp32 rows that lie in one cache block are read where they are), both
 * products run from registers (4 heads x 3 tokens and 4 heads x 24 dims accumulators, 4 x 2 blocks for
 * the remainders), and the softmax is online (flash-decoding)
 * so nothing sequence-sized is written. Work items are (sequence, SPLIT-token range), run on torch's
 * own OpenMP pool; their partial results are merged in a fixed order, so a sequence's output does not
 * depend on the rest of the batch.
 *
 * Every dot product accumulates in the same order whatever register block computes it, so results do
 * not depend on the number of heads (tensor parallelism) either.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 64 tokens a tile (prefill keeps 32): half the accumulator loads/stores and softmax rescales per token,
 * 4-8% faster here; the fp32 tile (64 x 576 floats, 147 KB) still sits in L2. */
#define TILE 64
#include "tile_ops.h"

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

/* One cached row (width values of dtype) -> fp32 dst, zero-padded to padded (a multiple of 8). */
static inline void load_row(const void *src, int dtype, int width, int padded, float *dst) {
    int i = 0;
    if (dtype == DT_F32) {
        memcpy(dst, src, (size_t)width * 4);
        i = width;
    } else if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 8 <= width; i += 8) {
            __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + i)));
            _mm256_storeu_ps(dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
        }
        for (; i < width; i++) {
            uint32_t bits = (uint32_t)s[i] << 16;
            memcpy(dst + i, &bits, 4);
        }
    } else {
        const uint16_t *s = (const uint16_t *)src;
        for (; i + 8 <= width; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
        for (; i < width; i++) dst[i] = _cvtsh_ss(s[i]);
    }
    for (; i < padded; i++) dst[i] = 0.0f;
}
#ifndef SPLIT
#define SPLIT 512 /* tokens of one work item (flash-decoding split) */
#endif

/* scores[i][j] = q[i] . c[j] for NH heads x NT tokens over wp dims (multiple of 8). */
#define DEFINE_QK(NH, NT)                                                                              \
    static inline void qk_##NH##x##NT(const float *q, const float *c, int wp, float *s, int sstride) { \
        __m256 acc[NH][NT];                                                                            \
        for (int i = 0; i < NH; i++)                                                                   \
            for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();                              \
        for (int d = 0; d < wp; d += 8) {                                                              \
            __m256 cv[NT];                                                                             \
            for (int j = 0; j < NT; j++) cv[j] = _mm256_loadu_ps(c + (size_t)j * wp + d);              \
            for (int i = 0; i < NH; i++) {                                                             \
                __m256 qv = _mm256_loadu_ps(q + (size_t)i * wp + d);                                   \
                for (int j = 0; j < NT; j++) acc[i][j] = _mm256_fmadd_ps(qv, cv[j], acc[i][j]);        \
            }                                                                                          \
        }                                                                                              \
        for (int i = 0; i < NH; i++)                                                                   \
            for (int j = 0; j < NT; j++) s[i * sstride + j] = hsum(acc[i][j]);                         \
    }
DEFINE_QK(4, 3)
DEFINE_QK(4, 2)
DEFINE_QK(4, 1)
DEFINE_QK(1, 1)
DEFINE_PV(4, 2) /* the value remainder blocks only this kernel uses (tile_ops.h has the shared ones) */
DEFINE_PV(1, 2)

/* The cached row of position `pos` of a sequence whose block-table row is `blocks`. */
static inline const char *cached_row(const void *cache, const int32_t *blocks, int block_size, size_t row_bytes,
                                     int pos) {
    return (const char *)cache + ((size_t)blocks[pos / block_size] * block_size + pos % block_size) * row_bytes;
}

/*
 * The next tile's cached rows, fetched into the caches a few lines at a time while this tile computes.
 * Read from memory by the copy into the fp32 tile they cost ~16% of the kernel (a build that copied
 * only each work item's first tile was 16-19% faster). Prefetching a whole tile in one burst did not
 * help; a few lines after each 4-head register block, of scores and of values, wins most of it back
 * (benchmarks/speed/kernel_ab.py: 1.06-1.14x).
 */
typedef struct {
    const char *rows[TILE];
    int lines_per_row, lines, next; /* 64-byte lines per row, in all, and the next one to fetch */
    int per_block;                  /* lines per register block, so that one tile's blocks fetch them all */
} prefetcher;

/* Start fetching p->rows[:nrows] (set by the caller), spread over `register_blocks` calls of prefetch_some. */
static inline void prefetch_plan(prefetcher *p, int nrows, int register_blocks) {
    p->lines = nrows * p->lines_per_row, p->next = 0;
    p->per_block = register_blocks > 0 ? (p->lines + register_blocks - 1) / register_blocks : 0;
}

static inline void prefetch_some(prefetcher *p) {
    for (int k = 0; k < p->per_block && p->next < p->lines; k++, p->next++)
        _mm_prefetch(p->rows[p->next / p->lines_per_row] + (size_t)(p->next % p->lines_per_row) * 64, _MM_HINT_T0);
}

/* scores [heads][TILE] of one tile. */
static void tile_scores(const float *q, int heads, const float *tile, int ntok, int wp, float *scores, prefetcher *next) {
    int h = 0;
    for (; h + 4 <= heads; h += 4) {
        int t = 0;
        for (; t + 3 <= ntok; t += 3, prefetch_some(next)) qk_4x3(q + (size_t)h * wp, tile + (size_t)t * wp, wp, scores + h * TILE + t, TILE);
        if (t + 2 <= ntok) { /* a 4 x 1 block alone is FMA-latency bound: 4 chains for 5 cycles each */
            qk_4x2(q + (size_t)h * wp, tile + (size_t)t * wp, wp, scores + h * TILE + t, TILE);
            t += 2;
        }
        for (; t < ntok; t++) qk_4x1(q + (size_t)h * wp, tile + (size_t)t * wp, wp, scores + h * TILE + t, TILE);
    }
    for (; h < heads; h++)
        for (int t = 0; t < ntok; t++) qk_1x1(q + (size_t)h * wp, tile + (size_t)t * wp, wp, scores + h * TILE + t, TILE);
}

/* 24-dim value blocks for rp dims (the rest go in 16- and 8-dim blocks). */
static inline int value_blocks24(int rp) {
    int blocks24 = rp / 24;
    if (rp % 24 == 8 && blocks24 > 0) blocks24--; /* 8 dims left -> 32 = two 16-dim blocks (8 chains, not 4) */
    return blocks24;
}

/* acc [rows][rp] += probs [rows][TILE] @ vals[:ntok, :rp] (vals rows vstride floats apart, rp a multiple of 8). */
static void tile_values(const float *probs, int rows, const float *vals, int ntok, int vstride, float *acc, int rp,
                        prefetcher *next) {
    int d = 0, blocks24 = value_blocks24(rp);
    for (; d < blocks24 * 24; d += 24) {
        int h = 0;
        for (; h + 4 <= rows; h += 4, prefetch_some(next)) pv_4x3(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
        for (; h < rows; h++) pv_1x3(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
    }
    for (; d + 16 <= rp; d += 16) {
        int h = 0;
        for (; h + 4 <= rows; h += 4) pv_4x2(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
        for (; h < rows; h++) pv_1x2(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
    }
    for (; d < rp; d += 8) {
        int h = 0;
        for (; h + 4 <= rows; h += 4) pv_4x1(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
        for (; h < rows; h++) pv_1x1(probs + h * TILE, TILE, vals + d, vstride, ntok, acc + (size_t)h * rp + d, rp);
    }
}

/* Floats of workspace the caller provides: per item partials, then per thread tile buffers. */
long latent_decode_workspace_floats(int batch, const int32_t *seq_lens, int heads, int width, int rank, int threads) {
    long items = 0;
    for (int b = 0; b < batch; b++) items += seq_lens[b] > 0 ? (seq_lens[b] + SPLIT - 1) / SPLIT : 1;
    int wp = (width + 7) / 8 * 8, rp = (rank + 7) / 8 * 8;
    return items * heads * (rp + 2) + (long)threads * (TILE * wp + heads * TILE);
}

/*
 * q [batch][heads][wp] fp32, pre-scaled, zero-padded to wp = roundup(width, 8);
 * cache [num_blocks][block_size][width] of dtype; block_table [batch][table_stride] int32;
 * seq_lens [batch] int32; out [batch][heads][rank] fp32; workspace of latent_decode_workspace_floats().
 */
int latent_decode(const float *q, const void *cache, int dtype, int block_size, int width, int rank,
                  const int32_t *block_table, int table_stride, const int32_t *seq_lens, int batch, int heads,
                  float *out, float *workspace, int threads) {
    int wp = (width + 7) / 8 * 8, rp = (rank + 7) / 8 * 8;
    if (rp > wp) return 1;
    size_t elem = dtype == DT_F32 ? 4 : 2, row_bytes = (size_t)width * elem;
    /* fp32 rows of a width the register blocks can walk are used in place when a tile lies in one block
     * (vLLM's CPU default of 128-token blocks): no copy into the tile, 1.09-1.26x on the kernel at batch 8
     * (benchmarks/speed/kernel_ab_in_place.json). */
    int in_place = dtype == DT_F32 && wp == width;
    long items = 0;
    for (int b = 0; b < batch; b++) items += seq_lens[b] > 0 ? (seq_lens[b] + SPLIT - 1) / SPLIT : 1;
    int *item_seq = malloc(sizeof(int) * 2 * items), *item_start = item_seq + items;
    long *first_item = malloc(sizeof(long) * (batch + 1));
    if (!item_seq || !first_item) return 2;
    long n = 0;
    for (int b = 0; b < batch; b++) {
        first_item[b] = n;
        int len = seq_lens[b] > 0 ? seq_lens[b] : 1;
        for (int start = 0; start < len; start += SPLIT) item_seq[n] = b, item_start[n++] = start;
    }
    first_item[batch] = n;
    float *partial_acc = workspace, *partial_max = workspace + items * heads * rp;
    float *partial_sum = partial_max + items * heads, *thread_space = partial_sum + items * heads;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (long it = 0; it < items; it++) {
        int b = item_seq[it], start = item_start[it], len = seq_lens[b];
        int end = start + SPLIT < len ? start + SPLIT : len;
        float *tile = thread_space + (long)omp_get_thread_num() * (TILE * wp + heads * TILE);
        float *scores = tile + TILE * wp;
        float *acc = partial_acc + it * heads * rp, *run_max = partial_max + it * heads, *run_sum = partial_sum + it * heads;
        memset(acc, 0, sizeof(float) * heads * rp);
        for (int h = 0; h < heads; h++) run_max[h] = -INFINITY, run_sum[h] = 0.0f;
        const float *qb = q + (size_t)b * heads * wp;
        const int32_t *blocks = block_table + (size_t)b * table_stride;
        prefetcher next = {.lines_per_row = (int)((row_bytes + 63) / 64)};
        for (int t0 = start; t0 < end; t0 += TILE) {
            int ntok = end - t0 < TILE ? end - t0 : TILE;
            const float *rows = tile;
            if (in_place && t0 % block_size + ntok <= block_size)
                rows = (const float *)cached_row(cache, blocks, block_size, row_bytes, t0);
            else
                for (int t = 0; t < ntok; t++)
                    load_row(cached_row(cache, blocks, block_size, row_bytes, t0 + t), dtype, width, wp, tile + (size_t)t * wp);
            int next_tok = end - t0 - ntok < TILE ? end - t0 - ntok : TILE; /* <= 0 on the item's last tile */
            for (int t = 0; t < next_tok; t++) next.rows[t] = cached_row(cache, blocks, block_size, row_bytes, t0 + ntok + t);
            prefetch_plan(&next, next_tok > 0 ? next_tok : 0, (heads / 4) * (ntok / 3 + value_blocks24(rp)));
            tile_scores(qb, heads, rows, ntok, wp, scores, &next);
            tile_softmax(scores, heads, ntok, run_max, run_sum, acc, rp);
            tile_values(scores, heads, rows, ntok, wp, acc, rp, &next);
        }
    }

    /* merge each sequence's splits in order */
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int b = 0; b < batch; b++) {
        for (int h = 0; h < heads; h++) {
            float *o = out + ((size_t)b * heads + h) * rank;
            if (seq_lens[b] <= 0) {
                memset(o, 0, sizeof(float) * rank);
                continue;
            }
            float m = -INFINITY, total = 0.0f;
            for (long it = first_item[b]; it < first_item[b + 1]; it++)
                if (partial_max[it * heads + h] > m) m = partial_max[it * heads + h];
            for (int d = 0; d < rank; d++) o[d] = 0.0f;
            for (long it = first_item[b]; it < first_item[b + 1]; it++) {
                float w = expf(partial_max[it * heads + h] - m);
                total += w * partial_sum[it * heads + h];
                const float *a = partial_acc + (it * heads + h) * rp;
                for (int d = 0; d < rank; d++) o[d] += w * a[d];
            }
            for (int d = 0; d < rank; d++) o[d] /= total;
        }
    }
    free(item_seq);
    free(first_item);
    return 0;
}
