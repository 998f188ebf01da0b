/*
 * Fused CPU training steps for FlexMF, in place on the storage of the torch tensors the Python engine
 * owns. Interface: _kernels.h (mirrored by _abi.py); built and checked by _native.py. The eager-torch
 * strategies of explicit.py and implicit.py are the reference these kernels are tested against.
 *
 * Semantics are those of the torch engine, batch by batch: every gradient of a minibatch is taken
 * at the parameters before the batch (pass 1 reads, pass 2 writes), gradients are summed per
 * distinct row, and only the rows touched by the batch are stepped. What the fusion removes is the
 * dozen full passes over batch x width temporaries that eager ops make, and the per-op dispatch.
 *
 * Threads (`threads`, OpenMP): pass 1a computes the batch's errors / score gradients split by
 * rating; pass 1b sums them into per-row gradients, each thread summing only the rows it owns
 * (blocks of 16 rows dealt round-robin, so threads never share a cache line of counts), in rating
 * order; pass 2 steps each thread's own rows. So a row's gradient is summed in the same order
 * whatever the thread count, and no two threads write the same row. One thread fuses 1a and 1b.
 */
#include <math.h>
#include <stdint.h>

#include "_kernels.h"
#include "_kernels_rows.h"

/* Catch every row of both tables up to step a->step (end of an epoch: dense AdamW's values). */
int64_t flexmf_adam_flush(flexmf_train *a) {
    Adam o = adam_at(a->lr, a->decay, a->step + 1); /* step_prev = step size at a->step */
    const int64_t w = a->width, t = a->step;
    for (int side = 0; side < 2; side++) {
        const flexmf_table *tb = side ? &a->item : &a->user;
        if (!tb->last) continue;
#pragma omp parallel for num_threads(threads_of(a->threads)) schedule(static)
        for (int64_t r = 0; r < tb->n_rows; r++) {
            adam_row(tb->rows + r * 3 * w, 0, 1.0f, 0.0f, w, tb->const_col, t - tb->last[r], &o);
            tb->last[r] = t;
        }
    }
    return FLEXMF_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Explicit: prediction = user_row . item_row (biases ride in the rows), squared error, SGD or lazy
 * sparse Adam (l2 in the gradient, decoupled decay). Returns the summed squared error in train.loss.
 * ------------------------------------------------------------------------------------------------ */
static inline void explicit_accumulate(Acc *au, Acc *ai, const float *P, const float *Q, int64_t stride,
                                       int64_t u, int64_t i, float e, int tid, int T) {
    int64_t w = au->w;
    if (OWNS(u, tid, T)) acc_add(au, u, e, Q + i * stride, w);
    if (OWNS(i, tid, T)) acc_add(ai, i, e, P + u * stride, w);
}

int64_t flexmf_explicit_epoch(flexmf_explicit_args *A) {
    flexmf_train *tr = &A->train;
    if (tr->optimizer != FLEXMF_SGD && tr->optimizer != FLEXMF_ADAM) return FLEXMF_UNKNOWN_OPTIMIZER;
    const int nt = threads_of(tr->threads);
    const int64_t w = tr->width, n = A->n, batch = A->batch, stride = tr->optimizer == FLEXMF_SGD ? w : 3 * w;
    const float *P = tr->user.rows, *Q = tr->item.rows, *resid = A->resid;
    const int64_t *users = A->users, *items = A->items;
    float *err = A->err;
    double loss = 0.0;
    for (int64_t start = 0; start < n; start += batch) {
        int64_t end = start + batch < n ? start + batch : n;
        Adam opt = {0};
        if (tr->optimizer == FLEXMF_ADAM) opt = adam_at(tr->lr, tr->decay, ++tr->step);
        RowStep rs = {tr, stride, -1.0f, 0, 0.0f, &opt, tr->step};
#pragma omp parallel num_threads(nt) reduction(+ : loss)
        {
            int tid = omp_get_thread_num(), T = omp_get_num_threads();
            Acc au = acc_for(&tr->user, w, tid, T), ai = acc_for(&tr->item, w, tid, T);
#pragma omp for schedule(static)
            for (int64_t j = start; j < end; j++) {
                if (j + PF < end) prefetch_pair(P, users[j + PF], Q, items[j + PF], stride, w);
                float e = resid[j] - dotf(P + users[j] * stride, Q + items[j] * stride, w);
                err[j - start] = e;
                loss += (double)e * (double)e;
                if (T == 1) explicit_accumulate(&au, &ai, P, Q, stride, users[j], items[j], e, 0, 1);
            }
            if (T > 1) {
                for (int64_t j = start; j < end; j++)
                    explicit_accumulate(&au, &ai, P, Q, stride, users[j], items[j], err[j - start], tid, T);
#pragma omp barrier
            }
            step_rows(&au, &tr->user, &rs);
            step_rows(&ai, &tr->item, &rs);
        }
    }
    tr->loss = loss;
    return FLEXMF_OK;
}

/* ------------------------------------------------------------------------------------------------
 * Implicit: positives and sampled negatives, Adam(W) whose idle steps are caught up in closed form.
 * A loss is one function: d(pair loss)/d(score) of the positive (dj[0]) and of each negative
 * (dj[1 + x]), divided by the batch size, and the pair's loss (added to a SoftplusSum, or returned).
 * Masked negatives add nothing.
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    float s0;                   /* the positive's score */
    const float *sn;            /* [c] the negatives' scores */
    const uint8_t *vj;          /* [c] valid negatives */
    int64_t c;
    float inv_b, weight;        /* 1 / batch size, WARP's rank weight */
    double pos_weight;          /* logistic */
} PairScores;

static inline void loss_logistic(const PairScores *s, float *dj, SoftplusSum *acc) {
    /* softplus(-x) = softplus(x) - x */
    dj[0] = (sigmoid_softplus(s->s0, s->pos_weight, acc) - 1.0f) * (float)s->pos_weight * s->inv_b;
    acc->lin -= s->pos_weight * (double)s->s0;
    for (int64_t x = 0; x < s->c; x++) dj[1 + x] = s->vj[x] ? sigmoid_softplus(s->sn[x], 1.0, acc) * s->inv_b : 0.0f;
}

static inline void loss_pairwise(const PairScores *s, float *dj, SoftplusSum *acc) {
    float sum = 0.0f;
    for (int64_t x = 0; x < s->c; x++) {
        float g = s->vj[x] ? sigmoid_softplus(s->sn[x] - s->s0, 1.0, acc) : 0.0f;
        dj[1 + x] = g * s->inv_b;
        sum += g;
    }
    dj[0] = -sum * s->inv_b;
}

static inline double loss_warp(const PairScores *s, float *dj) { /* one negative */
    float margin = 1.0f - s->s0 + s->sn[0];
    float wt = s->vj[0] ? s->weight : 0.0f;
    float g = margin > 0.0f ? wt : 0.0f;
    dj[0] = -g * s->inv_b;
    dj[1] = g * s->inv_b;
    return margin > 0.0f ? (double)wt * (double)margin : 0.0;
}

/* One negative per positive (the common case), fused: the user row takes both item rows in one
 * pass, the two item rows take the user row in one pass. Used for every thread count, so the
 * arithmetic (explicit fmaf) is the same whatever the threads. */
static inline void implicit_accumulate1(Acc *au, Acc *ai, const float *U, const float *I, int64_t stride,
                                        int64_t u, int64_t p, int64_t q, const float *dj, int tid, int T,
                                        const int64_t w) {
    const float *restrict pu = U + u * stride, *restrict xp = I + p * stride, *restrict xq = I + q * stride;
    const float d0 = dj[0], d1 = dj[1];
    int fresh;
    if (OWNS(u, tid, T)) {
        float *restrict g = acc_slot(au, u, &fresh, w);
        if (fresh) {
#pragma omp simd
            for (int64_t c = 0; c < w; c++) g[c] = fmaf(d0, xp[c], d1 * xq[c]);
        } else {
#pragma omp simd
            for (int64_t c = 0; c < w; c++) g[c] = fmaf(d0, xp[c], fmaf(d1, xq[c], g[c]));
        }
    }
    /* item rows: a fresh slot holds stale values, so it is zeroed first (then fmaf(d, x, 0) = d * x) */
    int own_p = OWNS(p, tid, T), own_q = OWNS(q, tid, T);
    if (own_p && own_q && p != q) {
        int fp, fq;
        float *restrict gp = acc_slot(ai, p, &fp, w), *restrict gq = acc_slot(ai, q, &fq, w);
        if (fp)
            for (int64_t c = 0; c < w; c++) gp[c] = 0.0f;
        if (fq)
            for (int64_t c = 0; c < w; c++) gq[c] = 0.0f;
#pragma omp simd
        for (int64_t c = 0; c < w; c++) {
            gp[c] = fmaf(d0, pu[c], gp[c]);
            gq[c] = fmaf(d1, pu[c], gq[c]);
        }
        return;
    }
    for (int side = 0; side < 2; side++) { /* p == q (a masked negative) or one row not ours */
        int64_t r = side ? q : p;
        float d = side ? d1 : d0;
        if (!(side ? own_q : own_p)) continue;
        float *restrict g = acc_slot(ai, r, &fresh, w);
        if (fresh)
            for (int64_t c = 0; c < w; c++) g[c] = 0.0f;
#pragma omp simd
        for (int64_t c = 0; c < w; c++) g[c] = fmaf(d, pu[c], g[c]);
    }
}

/* Sum pair j's score gradients `dj` into the gradients of the rows this thread owns. */
static inline void implicit_accumulate(Acc *au, Acc *ai, const float *U, const float *I, int64_t stride,
                                       int64_t u, int64_t p, const int64_t *nj, int64_t c, const float *dj,
                                       int tid, int T, const int64_t w) {
    const float *pu = U + u * stride;
    if (OWNS(u, tid, T)) {
        float *g_user = acc_add(au, u, dj[0], I + p * stride, w);
        for (int64_t x = 0; x < c; x++) axpyf(g_user, dj[1 + x], I + nj[x] * stride, w);
    }
    if (OWNS(p, tid, T)) acc_add(ai, p, dj[0], pu, w);
    for (int64_t x = 0; x < c; x++)
        if (OWNS(nj[x], tid, T)) acc_add(ai, nj[x], dj[1 + x], pu, w);
}

/* One batch [start, end) for thread tid of T (T == 1: called outside any parallel region, passes
 * 1a and 1b fused). */
static inline __attribute__((always_inline)) double implicit_batch(const flexmf_implicit_args *A,
                                                                   const int64_t w, int64_t start, int64_t end,
                                                                   const Adam *opt, int64_t tnow, int tid,
                                                                   int T) {
    const flexmf_train *tr = &A->train;
    const int64_t stride = 3 * w, c = A->negatives, c1 = c + 1, kind = A->loss_kind;
    const float *U = tr->user.rows, *I = tr->item.rows;
    const int64_t *users = A->users, *pos = A->pos, *neg = A->neg;
    const uint8_t *valid = A->valid;
    float inv_b = 1.0f / (float)(end - start);
    double total = 0.0;
    SoftplusSum sp = {0.0, 1.0, 0.0, 0};
    Acc au = acc_for(&tr->user, w, tid, T), ai = acc_for(&tr->item, w, tid, T);
    int64_t lo = start + (end - start) * tid / T, hi = start + (end - start) * (tid + 1) / T;
    for (int64_t j = lo; j < hi; j++) {
        if (j + PF < hi) {
            prefetch_pair(U, users[j + PF], I, pos[j + PF], stride, w);
            for (int64_t x = 0; x < c; x++) prefetch_row(I + neg[(j + PF) * c + x] * stride, w);
        }
        const float *pu = U + users[j] * stride;
        const int64_t *nj = neg + j * c;
        const uint8_t *vj = valid + j * c;
        float *dj = A->ds + (j - start) * c1;
        float s0, sn[FLEXMF_MAX_NEGATIVES]; /* c <= FLEXMF_MAX_NEGATIVES (checked on entry) */
        if (c == 1) {
            const float *restrict xp = I + pos[j] * stride, *restrict xq = I + nj[0] * stride;
            float a = 0.0f, b = 0.0f;
#pragma omp simd reduction(+ : a, b)
            for (int64_t col = 0; col < w; col++) {
                a += pu[col] * xp[col];
                b += pu[col] * xq[col];
            }
            s0 = a, sn[0] = b;
        } else {
            s0 = dotf(pu, I + pos[j] * stride, w);
            for (int64_t x = 0; x < c; x++) sn[x] = dotf(pu, I + nj[x] * stride, w);
        }
        PairScores ps = {s0, sn, vj, c, inv_b, A->weight ? A->weight[j] : 0.0f, A->positive_weight};
        switch (kind) { /* checked on entry */
        case FLEXMF_LOSS_LOGISTIC: loss_logistic(&ps, dj, &sp); break;
        case FLEXMF_LOSS_PAIRWISE: loss_pairwise(&ps, dj, &sp); break;
        case FLEXMF_LOSS_WARP: total += loss_warp(&ps, dj); break;
        }
        if (T == 1 && c == 1) implicit_accumulate1(&au, &ai, U, I, stride, users[j], pos[j], nj[0], dj, 0, 1, w);
        else if (T == 1) implicit_accumulate(&au, &ai, U, I, stride, users[j], pos[j], nj, c, dj, 0, 1, w);
    }
    if (T > 1) {
#pragma omp barrier
        for (int64_t j = start; j < end; j++) {
            if (c == 1)
                implicit_accumulate1(&au, &ai, U, I, stride, users[j], pos[j], neg[j], A->ds + (j - start) * 2, tid,
                                     T, w);
            else
                implicit_accumulate(&au, &ai, U, I, stride, users[j], pos[j], neg + j * c, c,
                                    A->ds + (j - start) * c1, tid, T, w);
        }
#pragma omp barrier
    }
    total += softplus_total(&sp);
    RowStep rs = {tr, stride, 1.0f, A->k, inv_b, opt, tnow};
    total += step_rows(&au, &tr->user, &rs);
    total += step_rows(&ai, &tr->item, &rs);
    return total;
}

/* Batches of `batch` pairs, one Adam(W) step each (train.step counts them); the summed loss, L2 term
 * included, in train.loss. */
int64_t flexmf_implicit_batches(flexmf_implicit_args *A) {
    flexmf_train *tr = &A->train;
    const int64_t kind = A->loss_kind, c = A->negatives;
    if (kind != FLEXMF_LOSS_LOGISTIC && kind != FLEXMF_LOSS_PAIRWISE && kind != FLEXMF_LOSS_WARP)
        return FLEXMF_UNKNOWN_LOSS;
    if (tr->optimizer != FLEXMF_ADAM) return FLEXMF_UNKNOWN_OPTIMIZER;
    if (c < 1 || c > FLEXMF_MAX_NEGATIVES || (kind == FLEXMF_LOSS_WARP && c != 1)) return FLEXMF_BAD_NEGATIVES;
    const int nt = threads_of(tr->threads);
    const int64_t w = tr->width, n = A->n, batch = A->batch;
    double total = 0.0, idle[4 * IDLE_CACHE];
    Adam first = adam_at(tr->lr, tr->decay, tr->step + 1);
    idle_table(idle, &first);
    for (int64_t start = 0; start < n; start += batch) {
        int64_t end = start + batch < n ? start + batch : n;
        Adam opt = adam_at(tr->lr, tr->decay, ++tr->step);
        opt.idle = idle;
        int64_t tnow = tr->step;
        if (nt == 1) {
            total += implicit_batch(A, w, start, end, &opt, tnow, 0, 1);
        } else {
            double part = 0.0;
#pragma omp parallel num_threads(nt) reduction(+ : part)
            part += implicit_batch(A, w, start, end, &opt, tnow, omp_get_thread_num(), omp_get_num_threads());
            total += part;
        }
    }
    tr->loss = total;
    return FLEXMF_OK;
}

/* out[j * c + x] = is (users[j], items[j * c + x]) a training pair? Membership in a dense bit table
 * (8x smaller than a bool table, so it stays in cache), else in the sorted unique keys (binary
 * search). A row outside the table has no positives. */
int64_t flexmf_contains(const flexmf_contains_args *a) {
    const uint8_t *bits = a->bits; /* locals: stores to out (bytes) may alias the struct */
    const int64_t *keys = a->keys, *users = a->users, *items = a->items, nkeys = a->n_keys, c = a->c;
    const int64_t n = a->n, n_items = a->n_items, cells = a->cells;
    uint8_t *out = a->out;
    for (int64_t j = 0; j < n; j++) {
        for (int64_t x = 0; x < c; x++) {
            int64_t u = users[j], i = items[j * c + x], key = u * n_items + i;
            uint8_t hit = 0;
            if (u >= 0 && i >= 0 && bits) {
                hit = key < cells ? (bits[key >> 3] >> (key & 7)) & 1 : 0;
            } else if (u >= 0 && i >= 0) {
                int64_t lo = 0, hi = nkeys;
                while (lo < hi) {
                    int64_t mid = lo + (hi - lo) / 2;
                    if (keys[mid] < key) lo = mid + 1; else hi = mid;
                }
                hit = lo < nkeys && keys[lo] == key;
            }
            out[j * c + x] = hit;
        }
    }
    return FLEXMF_OK;
}
