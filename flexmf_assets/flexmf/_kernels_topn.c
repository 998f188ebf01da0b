/*
 * All-user top-N scoring (flexmf_topn, interface in _kernels.h): the top `k` items of each user row
 * by score = user_row . item_row + offset, the user's seen items excluded, without ever writing a
 * score block to memory.
 *
 * Blocking (BLAS-like): the item table is packed once per call into panels of FLEXMF_TOPN_PANEL (16)
 * items, each [width][16] contiguous; a thread takes FLEXMF_TOPN_USERS (192) users at a time, packed
 * [width][6] per micro-block of 6, and walks item tiles of TILE_PANELS panels (the tile stays in
 * L2 while every micro-block of the user block passes over it). The micro-kernel scores 6 users x
 * 16 items in 12 vector accumulators (an inner loop over the width, one broadcast and two loads per
 * step, fused multiply-adds), then compares each user's 16 scores with its current k-th best in one
 * vector compare (a 16-bit mask): almost every score fails it and is dropped in registers. A
 * survivor is checked against the user's sorted seen items (a pointer that only moves forward, since
 * a user's items are visited in ascending order) and pushed into the user's bounded heap of 64-bit
 * keys (score and item in one integer, so one compare orders them), which lives in the output rows.
 *
 * Order and ties: a better item has the higher score, or the same score and the lower item index
 * (the torch path's tie rule, topn.py). Items reach a user in ascending index order, so a new item
 * enters a full heap only when its score is strictly above the heap's worst. A user's scores are
 * the same sums whatever the thread count (users are split across threads, never a dot product),
 * so results are identical for any `threads`.
 */
#include <stdint.h>
#include <string.h>

#include "_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
#endif

#define NR FLEXMF_TOPN_PANEL /* items per panel: two vectors of 8 */
#define MR 6                 /* users per micro-block */
#define MU FLEXMF_TOPN_USERS /* users per block (a multiple of MR) */
#define TILE_PANELS 32       /* 512 items per tile */

typedef float v8 __attribute__((vector_size(32)));

/* A candidate as one key that orders like the tie rule: the score's bits made order-preserving in
 * the high half, the complement of the item index in the low half (so an equal score with a lower
 * index is the larger key). -0 counts as +0, as it compares equal. */
static inline uint64_t key_of(float s, int64_t item) {
    uint32_t bits;
    s += 0.0f;
    memcpy(&bits, &s, sizeof bits);
    bits = bits & 0x80000000u ? ~bits : bits | 0x80000000u;
    return (uint64_t)bits << 32 | (uint32_t)~(uint32_t)item;
}

static inline float score_of(uint64_t key) {
    uint32_t bits = (uint32_t)(key >> 32);
    bits = bits & 0x80000000u ? bits & 0x7fffffffu : ~bits;
    float s;
    memcpy(&s, &bits, sizeof s);
    return s;
}

static inline int64_t item_of(uint64_t key) { return (int64_t)(uint32_t)~(uint32_t)key; }

/* The bounded min-heap of one user's keys (the worst at the root), kept in its output row of items. */
typedef struct {
    uint64_t *key;
    int64_t n, k;
} Heap;

/* Restore the heap after its root changed (Floyd's: the root's hole walks down to a leaf by the
 * smaller child, a choice without a branch, then the root's key climbs back the little it must). */
static void sift_down(uint64_t *h, int64_t n) {
    uint64_t x = h[0];
    int64_t at = 0, c;
    while ((c = 2 * at + 1) + 1 < n) {
        c += h[c + 1] < h[c];
        h[at] = h[c];
        at = c;
    }
    if (c < n) {
        h[at] = h[c];
        at = c;
    }
    for (; at > 0 && h[(at - 1) / 2] > x; at = (at - 1) / 2) h[at] = h[(at - 1) / 2];
    h[at] = x;
}

/* Offer item `it` scored `s` (above the threshold); returns the new threshold. */
static float heap_push(Heap *h, float s, int64_t it) {
    uint64_t x = key_of(s, it), *k = h->key;
    if (h->n < h->k) {
        int64_t at = h->n++;
        for (; at > 0 && k[(at - 1) / 2] > x; at = (at - 1) / 2) k[at] = k[(at - 1) / 2];
        k[at] = x;
        return h->n < h->k ? -__builtin_inff() : score_of(k[0]);
    }
    if (x <= k[0]) return score_of(k[0]); /* equal score, higher index */
    k[0] = x;
    sift_down(k, h->n);
    return score_of(k[0]);
}

/* Heapsort (best first), then each key becomes its item and score. */
static void heap_finish(Heap *h, float *scores) {
    for (int64_t n = h->n; n > 1; n--) {
        uint64_t top = h->key[0];
        h->key[0] = h->key[n - 1];
        h->key[n - 1] = top;
        sift_down(h->key, n - 1);
    }
    for (int64_t j = 0; j < h->n; j++) {
        scores[j] = score_of(h->key[j]);
        h->key[j] = (uint64_t)item_of(h->key[j]);
    }
}

/* Scores of MR packed users ([w][MR]) x one panel ([w][NR]) into acc[2 * MR]. */
static inline __attribute__((always_inline)) void micro(const float *restrict up, const float *restrict vp,
                                                        int64_t w, v8 *acc) {
    v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0};
    v8 b0 = {0}, b1 = {0}, b2 = {0}, b3 = {0}, b4 = {0}, b5 = {0};
    for (int64_t c = 0; c < w; c++) {
        v8 x = *(const v8 *)(vp + c * NR), y = *(const v8 *)(vp + c * NR + 8);
        const float *u = up + c * MR;
        a0 += u[0] * x, b0 += u[0] * y;
        a1 += u[1] * x, b1 += u[1] * y;
        a2 += u[2] * x, b2 += u[2] * y;
        a3 += u[3] * x, b3 += u[3] * y;
        a4 += u[4] * x, b4 += u[4] * y;
        a5 += u[5] * x, b5 += u[5] * y;
    }
    acc[0] = a0, acc[1] = b0, acc[2] = a1, acc[3] = b1, acc[4] = a2, acc[5] = b2;
    acc[6] = a3, acc[7] = b3, acc[8] = a4, acc[9] = b4, acc[10] = a5, acc[11] = b5;
}

/* A user block's state: heaps, thresholds and seen pointers of its MU users. */
typedef struct {
    Heap h[MU];
    float thr[MU];
    const int64_t *seen[MU], *seen_end[MU];
} Block;

/* Bit l set: lane l of the 16 scores (x, y) is above t. */
static inline unsigned above(v8 x, v8 y, float t) {
    v8 tv = (v8){0} + t;
#ifdef __AVX__
    return (unsigned)__builtin_ia32_movmskps256((v8)(x > tv)) | (unsigned)__builtin_ia32_movmskps256((v8)(y > tv)) << 8;
#else
    unsigned m = 0;
    for (int l = 0; l < 8; l++) m |= (unsigned)(x[l] > t) << l | (unsigned)(y[l] > t) << (l + 8);
    return m;
#endif
}

/* User u's survivors (bits of `mask`) among the 16 scores (x, y) of the items from `item0`. */
static void take_survivors(Block *b, int64_t u, int64_t item0, v8 x, v8 y, unsigned mask) {
    float s[NR];
    memcpy(s, &x, sizeof x);
    memcpy(s + 8, &y, sizeof y);
    for (; mask; mask &= mask - 1) {
        int l = __builtin_ctz(mask);
        if (!(s[l] > b->thr[u])) continue; /* the threshold rose since the compare */
        int64_t it = item0 + l;
        const int64_t *p = b->seen[u];
        while (p < b->seen_end[u] && *p < it) p++;
        b->seen[u] = p;
        if (p < b->seen_end[u] && *p == it) continue;
        b->thr[u] = heap_push(&b->h[u], s[l], it);
    }
}

static void pack_items(const flexmf_topn_args *a, int nt) {
    const int64_t w = a->width, panels = (a->n_items + NR - 1) / NR;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t p = 0; p < panels; p++) {
        float *dst = a->packed + p * w * NR;
        for (int64_t l = 0; l < NR; l++) {
            int64_t it = p * NR + l;
            const float *src = a->items + it * w;
            for (int64_t c = 0; c < w; c++) dst[c * NR + l] = it < a->n_items ? src[c] : 0.0f;
        }
    }
}

/* The row of user position j (an unknown or out-of-range row scores as the unknown row). */
static inline int64_t user_row(const flexmf_topn_args *a, int64_t j) {
    int64_t r = a->rows[j];
    return r >= 0 && r < a->n_user_rows ? r : a->unknown_row;
}

static void score_block(const flexmf_topn_args *a, int64_t j0, float *restrict up) {
    const int64_t w = a->width, k = a->k, m = a->m, panels = (a->n_items + NR - 1) / NR;
    const v8 off = (v8){0} + (float)a->offset;
    Block b;
    int64_t n = m - j0 < MU ? m - j0 : MU;
    for (int64_t u = 0; u < MU; u++) {
        int64_t j = j0 + u, r = u < n ? a->rows[j] : -1;
        const float *src = u < n ? a->users + user_row(a, j) * w : 0;
        for (int64_t c = 0; c < w; c++) up[(u / MR) * w * MR + c * MR + u % MR] = src ? src[c] : 0.0f;
        b.h[u] = (Heap){(uint64_t *)a->out_items + (u < n ? j : 0) * k, 0, k};
        b.thr[u] = u < n ? -__builtin_inff() : __builtin_inff(); /* padding users take nothing */
        int has_seen = a->seen_indptr && r >= 0 && r < a->n_seen_users;
        b.seen[u] = has_seen ? a->seen_indices + a->seen_indptr[r] : 0;
        b.seen_end[u] = has_seen ? a->seen_indices + a->seen_indptr[r + 1] : 0;
    }
    int64_t micro_blocks = (n + MR - 1) / MR, tail = a->n_items - (panels - 1) * NR;
    const unsigned last_lanes = tail == NR ? 0xffffu : (1u << tail) - 1u;
    for (int64_t t0 = 0; t0 < panels; t0 += TILE_PANELS) {
        int64_t t1 = t0 + TILE_PANELS < panels ? t0 + TILE_PANELS : panels;
        for (int64_t mb = 0; mb < micro_blocks; mb++) {
            const float *ump = up + mb * w * MR;
            for (int64_t p = t0; p < t1; p++) {
                v8 acc[2 * MR];
                micro(ump, a->packed + p * w * NR, w, acc);
                unsigned lanes = p == panels - 1 ? last_lanes : 0xffffu;
                for (int r = 0; r < MR; r++) {
                    v8 x = acc[2 * r] + off, y = acc[2 * r + 1] + off;
                    unsigned mask = above(x, y, b.thr[mb * MR + r]) & lanes;
                    if (mask) take_survivors(&b, mb * MR + r, p * NR, x, y, mask);
                }
            }
        }
    }
    for (int64_t u = 0; u < n; u++) {
        heap_finish(&b.h[u], a->out_scores + (j0 + u) * k);
        a->out_count[j0 + u] = b.h[u].n;
    }
}

int64_t flexmf_topn(const flexmf_topn_args *a) {
    if (a->k < 1 || a->width < 1 || a->n_items < 1 || a->n_items > UINT32_MAX || a->unknown_row < 0 ||
        a->unknown_row >= a->n_user_rows)
        return FLEXMF_BAD_SIZE;
    const int nt = a->threads < 1 ? 1 : (int)a->threads;
    pack_items(a, nt);
    const int64_t blocks = (a->m + MU - 1) / MU;
#pragma omp parallel num_threads(nt)
    {
        float *up = a->upack + (int64_t)omp_get_thread_num() * MU * a->width;
#pragma omp for schedule(dynamic, 4)
        for (int64_t blk = 0; blk < blocks; blk++) score_block(a, blk * MU, up);
    }
    return FLEXMF_OK;
}
