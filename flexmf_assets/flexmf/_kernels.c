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
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (a compiler without it): one thread, same results */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

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
                if (j + PF < end) {
                    prefetch_row(P + users[j + PF] * stride, w);
                    prefetch_row(Q + items[j + PF] * stride, w);
                }
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
 * (dj[1 + x]), divided by the batch size, and the pair's loss. Masked negatives add nothing.
 * ------------------------------------------------------------------------------------------------ */
typedef struct {
    float s0;                   /* the positive's score */
    const float *sn;            /* [c] the negatives' scores */
    const uint8_t *vj;          /* [c] valid negatives */
    int64_t c;
    float inv_b, weight;        /* 1 / batch size, WARP's rank weight */
    double pos_weight;          /* logistic */
} PairScores;

static inline double loss_logistic(const PairScores *s, float *dj) {
    double sp = 0.0, total;
    dj[0] = (sigmoid_softplus(s->s0, &sp) - 1.0f) * (float)s->pos_weight * s->inv_b;
    total = s->pos_weight * (sp - (double)s->s0); /* softplus(-x) = softplus(x) - x */
    for (int64_t x = 0; x < s->c; x++) {
        dj[1 + x] = s->vj[x] ? sigmoid_softplus(s->sn[x], &sp) * s->inv_b : 0.0f;
        if (s->vj[x]) total += sp;
    }
    return total;
}

static inline double loss_pairwise(const PairScores *s, float *dj) {
    double sp = 0.0, total = 0.0;
    float sum = 0.0f;
    for (int64_t x = 0; x < s->c; x++) {
        float g = 0.0f;
        if (s->vj[x]) {
            g = sigmoid_softplus(s->sn[x] - s->s0, &sp);
            total += sp;
        }
        dj[1 + x] = g * s->inv_b;
        sum += g;
    }
    dj[0] = -sum * s->inv_b;
    return total;
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
    Acc au = acc_for(&tr->user, w, tid, T), ai = acc_for(&tr->item, w, tid, T);
    int64_t lo = start + (end - start) * tid / T, hi = start + (end - start) * (tid + 1) / T;
    for (int64_t j = lo; j < hi; j++) {
        if (j + PF < hi) {
            prefetch_row(U + users[j + PF] * stride, w);
            prefetch_row(I + pos[j + PF] * stride, w);
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
        case FLEXMF_LOSS_LOGISTIC: total += loss_logistic(&ps, dj); break;
        case FLEXMF_LOSS_PAIRWISE: total += loss_pairwise(&ps, dj); break;
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
    double total = 0.0;
    for (int64_t start = 0; start < n; start += batch) {
        int64_t end = start + batch < n ? start + batch : n;
        Adam opt = adam_at(tr->lr, tr->decay, ++tr->step);
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

/* ------------------------------------------------------------------------------------------------
 * Alternating least squares (als.py): one call solves every row of one side given the other side,
 * in place. Each kernel takes one argument struct (mirrored by ctypes.Structure in als.py). A row
 * is solved by one thread from start to end in a fixed order, and the sums over rows are taken in
 * row order after the parallel loop, so the factors and the objective do not depend on the thread
 * count. Rows are row-major float32 with a row stride (`ld*`), so the caller may pass column views
 * of its tables; bias vectors have their own stride.
 * ------------------------------------------------------------------------------------------------ */

/* Cholesky factorisation in place: the upper triangle of the m x m row-major A becomes U with
 * A = U^T U (right-looking, contiguous inner loops). Returns 0, or 1 when A is not positive
 * definite (a pivot <= 0 or not finite). */
static int als_cholesky(double *restrict A, int64_t m) {
    for (int64_t j = 0; j < m; j++) {
        double d = A[j * m + j];
        if (!(d > 0.0) || !isfinite(d)) return 1;
        d = sqrt(d);
        double inv = 1.0 / d, *restrict rj = A + j * m;
        rj[j] = d;
        for (int64_t c = j + 1; c < m; c++) rj[c] *= inv;
        for (int64_t a = j + 1; a < m; a++) {
            double f = rj[a], *restrict ra = A + a * m;
#pragma omp simd
            for (int64_t c = a; c < m; c++) ra[c] -= f * rj[c];
        }
    }
    return 0;
}

/* Solve U^T U x = b for the factor of als_cholesky; b becomes x. */
static void als_cholesky_solve(const double *restrict U, double *restrict b, int64_t m) {
    for (int64_t j = 0; j < m; j++) { /* U^T z = b */
        double z = b[j] / U[j * m + j];
        b[j] = z;
        for (int64_t c = j + 1; c < m; c++) b[c] -= U[j * m + c] * z;
    }
    for (int64_t j = m - 1; j >= 0; j--) { /* U x = z */
        double s = b[j];
        for (int64_t c = j + 1; c < m; c++) s -= U[j * m + c] * b[c];
        b[j] = s / U[j * m + j];
    }
}

static inline int als_threads(int64_t nthreads) { return nthreads < 1 ? 1 : (int)nthreads; }

/* Explicit (biased) ALS, one side. Row r's entries are indptr[r] .. indptr[r+1]: the other side's
 * row indices[j] and the target values[j] (rating - global mean), from which the other side's
 * bias is taken, and this side's bias too when it is held fixed (damped means). Each row solves
 *     (sum f f^T + reg n_r I) x = sum (target) f,   f = y (k) or [y, 1] (learn_bias: x = [p, b])
 * by Cholesky (LensKit's ridge reg n_r; reg n_r^reg_exponent in general, the learned bias's
 * bias_reg n_r^reg_exponent). Row losses: the squared errors of its entries after the solve, and
 * its penalty (ridge |p|^2 + bias ridge b^2). An empty row becomes zero.
 * A row whose system is not positive definite is left as it was and counted in `failed` (its loss
 * is NaN). */
typedef struct {
    float *X;
    int64_t ldx;
    float *xb; /* this side's biases (NULL: none) */
    int64_t sxb;
    const float *Y;
    int64_t ldy;
    const float *yb; /* the other side's biases (NULL: none) */
    int64_t syb;
    const int64_t *indptr, *indices;
    const float *values;
    int64_t n_rows, k, learn_bias, nthreads;
    double reg, reg_exponent; /* a row's ridge: reg * n_r^reg_exponent */
    double bias_reg;          /* learn_bias: the bias's ridge is bias_reg * n_r^reg_exponent */
    double *work;     /* [nthreads, (k + 1) * (k + 4)] */
    double *row_loss; /* [n_rows, 2] */
    double data, penalty; /* out */
    int64_t failed;       /* out */
} ALSExplicitArgs;

void flexmf_als_explicit_half(ALSExplicitArgs *a) {
    const int64_t k = a->k, m = k + (a->learn_bias ? 1 : 0), W = (k + 1) * (k + 4);
#pragma omp parallel num_threads(als_threads(a->nthreads))
    {
        double *A = a->work + (int64_t)omp_get_thread_num() * W, *b = A + m * m, *f = b + m;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < a->n_rows; r++) {
            const int64_t lo = a->indptr[r], hi = a->indptr[r + 1];
            float *x = a->X + r * a->ldx;
            double *loss = a->row_loss + 2 * r;
            if (hi == lo) {
                for (int64_t c = 0; c < k; c++) x[c] = 0.0f;
                if (a->learn_bias) a->xb[r * a->sxb] = 0.0f;
                loss[0] = loss[1] = 0.0;
                continue;
            }
            const double fixed = (!a->learn_bias && a->xb) ? a->xb[r * a->sxb] : 0.0;
            for (int64_t c = 0; c < m * m + m; c++) A[c] = 0.0;
            f[k] = 1.0;
            for (int64_t j = lo; j < hi; j++) {
                const int64_t o = a->indices[j];
                const float *y = a->Y + o * a->ldy;
                double t = (double)a->values[j] - fixed - (a->yb ? (double)a->yb[o * a->syb] : 0.0);
                for (int64_t c = 0; c < k; c++) f[c] = y[c];
                for (int64_t i = 0; i < m; i++) {
                    double fi = f[i], *restrict ai = A + i * m;
#pragma omp simd
                    for (int64_t c = i; c < m; c++) ai[c] += fi * f[c];
                    b[i] += t * fi;
                }
            }
            const double n = (double)(hi - lo), scale = a->reg_exponent == 1.0 ? n : pow(n, a->reg_exponent);
            const double ridge = a->reg * scale, bias_ridge = a->bias_reg * scale;
            for (int64_t i = 0; i < k; i++) A[i * m + i] += ridge;
            if (a->learn_bias) A[k * m + k] += bias_ridge;
            if (als_cholesky(A, m)) {
                loss[0] = loss[1] = NAN;
                continue;
            }
            als_cholesky_solve(A, b, m);
            double sq = 0.0;
            for (int64_t c = 0; c < k; c++) {
                x[c] = (float)b[c];
                sq += (double)x[c] * (double)x[c];
            }
            double own = 0.0;
            if (a->learn_bias) {
                a->xb[r * a->sxb] = (float)b[k];
                own = (double)a->xb[r * a->sxb];
            }
            double err = 0.0;
            for (int64_t j = lo; j < hi; j++) {
                const int64_t o = a->indices[j];
                double t = (double)a->values[j] - fixed - own - (a->yb ? (double)a->yb[o * a->syb] : 0.0);
                double e = t - (double)dotf(x, a->Y + o * a->ldy, k);
                err += e * e;
            }
            loss[0] = err;
            loss[1] = ridge * sq + bias_ridge * own * own;
        }
    }
    double data = 0.0, penalty = 0.0;
    int64_t failed = 0;
    for (int64_t r = 0; r < a->n_rows; r++) {
        failed += isnan(a->row_loss[2 * r]);
        data += a->row_loss[2 * r];
        penalty += a->row_loss[2 * r + 1];
    }
    a->data = data, a->penalty = penalty, a->failed = failed;
}

/* Implicit (weighted) ALS, one side (Hu, Koren and Volinsky): row r minimises
 *     sum over ALL other rows y of c (p - x.y)^2 + reg |x|^2,   p = 1, c = conf[j] on its entries,
 *                                                               p = 0, c = 1 elsewhere
 * whose normal equations are (G + reg I + sum_j (c_j - 1) y_j y_j^T) x = sum_j c_j y_j with
 * G = Y^T Y (`gram`, symmetric, computed by the caller): the unobserved rows enter only through G.
 * cg_steps > 0: that many conjugate-gradient steps from the current x (Takacs et al.), stopping
 * early when the residual vanishes; 0: exact Cholesky solve. Rows go in fixed blocks of ALS_LANES
 * whose products with G share the loads of G (a row's arithmetic is the same in any block). Row
 * losses: x^T G x + sum_j [c_j (1 - s_j)^2 - s_j^2] (s_j = x.y_j), the row's weighted squared
 * error over all other rows, and reg |x|^2. */
typedef struct {
    float *X;
    int64_t ldx;
    const float *Y;
    int64_t ldy;
    const int64_t *indptr, *indices;
    const float *conf;
    const float *gram; /* [k, k] */
    int64_t n_rows, k, cg_steps, nthreads;
    int64_t max_count; /* the most entries of a row */
    double reg;
    double *work;     /* [nthreads, ALS_WORK(k, max_count)] */
    double *row_loss; /* [n_rows, 2] */
    double data, penalty; /* out */
    int64_t failed;       /* out */
} ALSImplicitArgs;

/* OUT[q] = G V[q] for the ALS_LANES vectors V[q] (rows of k floats) and a symmetric k x k G: blocks
 * of 16 outputs of every vector in registers while the columns of G stream by (OUT[q] = sum_c
 * V[q][c] G[c, :]), so each load of G serves all the vectors and no horizontal sums are needed;
 * the last k % 16 outputs by dot products. Each vector's arithmetic is its own (the lanes never mix). */
#define ALS_LANES 4
#define ALS_MV_BLOCK 16
static void als_gram_times(const float *restrict G, const float *restrict V, float *restrict OUT, int64_t k) {
    int64_t i0 = 0;
    for (; i0 + ALS_MV_BLOCK <= k; i0 += ALS_MV_BLOCK) {
        float acc[ALS_LANES][ALS_MV_BLOCK] = {{0}};
        for (int64_t c = 0; c < k; c++) {
            const float *restrict g = G + c * k + i0;
            for (int q = 0; q < ALS_LANES; q++) {
                const float vc = V[q * k + c];
#pragma omp simd
                for (int t = 0; t < ALS_MV_BLOCK; t++) acc[q][t] += vc * g[t];
            }
        }
        for (int q = 0; q < ALS_LANES; q++)
            for (int t = 0; t < ALS_MV_BLOCK; t++) OUT[q * k + i0 + t] = acc[q][t];
    }
    for (int q = 0; q < ALS_LANES; q++)
        for (int64_t i = i0; i < k; i++) OUT[q * k + i] = dotf(G + i * k, V + q * k, k);
}

/* Scratch doubles per thread: the exact solve's k x k system and right-hand side, then the CG
 * block's 6 x ALS_LANES vectors of k floats and 2 x ALS_LANES per-entry buffers of m floats (see
 * _scratch in als.py). */
#define ALS_WORK(k, m) (((k) + 1) * ((k) + 4) + 3 * ALS_LANES * (k) + ALS_LANES * (m))

/* The exact solve of one row into x (0), or 1 when its system is not positive definite. */
static int als_implicit_exact(const ALSImplicitArgs *a, int64_t lo, int64_t hi, float *x, double *A) {
    const int64_t k = a->k;
    double *b = A + k * k;
    for (int64_t i = 0; i < k; i++)
        for (int64_t c = i; c < k; c++) A[i * k + c] = a->gram[i * k + c];
    for (int64_t i = 0; i < k; i++) A[i * k + i] += a->reg, b[i] = 0.0;
    for (int64_t j = lo; j < hi; j++) {
        const float *y = a->Y + a->indices[j] * a->ldy;
        const double c1 = (double)a->conf[j] - 1.0, cj = a->conf[j];
        for (int64_t i = 0; i < k; i++) {
            double fi = c1 * (double)y[i], *restrict ai = A + i * k;
#pragma omp simd
            for (int64_t c = i; c < k; c++) ai[c] += fi * (double)y[c];
            b[i] += cj * (double)y[i];
        }
    }
    if (als_cholesky(A, k)) return 1;
    als_cholesky_solve(A, b, k);
    for (int64_t c = 0; c < k; c++) x[c] = (float)b[c];
    return 0;
}

void flexmf_als_implicit_half(ALSImplicitArgs *a) {
    const int64_t k = a->k, m = a->max_count, W = ALS_WORK(k, m);
    const int64_t blocks = (a->n_rows + ALS_LANES - 1) / ALS_LANES;
    const float reg = (float)a->reg;
#pragma omp parallel num_threads(als_threads(a->nthreads))
    {
        double *A = a->work + (int64_t)omp_get_thread_num() * W;
        /* a block of ALS_LANES rows: their x, residual r, direction p, A p, G p and G x, and per
         * entry s_j = y_j.x and d_j = y_j.p. G x and s are carried through the steps (Gx += alpha G p,
         * s += alpha d), so the loss needs neither another product with G nor another pass over
         * the rows y_j */
        float *X = (float *)(A + (k + 1) * (k + 4)), *R = X + ALS_LANES * k, *P = R + ALS_LANES * k;
        float *AP = P + ALS_LANES * k, *GP = AP + ALS_LANES * k, *GX = GP + ALS_LANES * k;
        float *S = GX + ALS_LANES * k, *D = S + ALS_LANES * m;
#pragma omp for schedule(dynamic, 2)
        for (int64_t blk = 0; blk < blocks; blk++) {
            const int64_t r0 = blk * ALS_LANES;
            float rs[ALS_LANES];
            int live[ALS_LANES], used[ALS_LANES];
            for (int q = 0; q < ALS_LANES; q++) {
                const int64_t row = r0 + q;
                used[q] = row < a->n_rows && a->indptr[row + 1] > a->indptr[row];
                float *x = a->X + row * a->ldx;
                if (row < a->n_rows && !used[q]) { /* an empty row becomes zero */
                    for (int64_t c = 0; c < k; c++) x[c] = 0.0f;
                    a->row_loss[2 * row] = a->row_loss[2 * row + 1] = 0.0;
                }
                for (int64_t c = 0; c < k; c++) X[q * k + c] = used[q] ? x[c] : 0.0f;
                if (used[q] && a->cg_steps <= 0 && als_implicit_exact(a, a->indptr[row], a->indptr[row + 1],
                                                                      X + q * k, A)) {
                    a->row_loss[2 * row] = a->row_loss[2 * row + 1] = NAN; /* left as it was */
                    used[q] = 0;
                }
            }
            als_gram_times(a->gram, X, GX, k);
            for (int q = 0; q < ALS_LANES; q++) {
                live[q] = 0;
                for (int64_t c = 0; c < k; c++) P[q * k + c] = 0.0f;
                if (!used[q] || a->cg_steps <= 0) continue;
                const int64_t row = r0 + q;
                float *x = X + q * k, *r_ = R + q * k, *p = P + q * k, *sq_ = S + q * m;
                /* r = b - A x = -(G + reg I) x + sum_j [c_j - (c_j - 1) y_j.x] y_j */
                for (int64_t c = 0; c < k; c++) r_[c] = -GX[q * k + c] - reg * x[c];
                const int64_t lo = a->indptr[row];
                for (int64_t j = lo; j < a->indptr[row + 1]; j++) {
                    const float *y = a->Y + a->indices[j] * a->ldy;
                    const float cj = a->conf[j], sj = dotf(y, x, k);
                    sq_[j - lo] = sj;
                    axpyf(r_, cj - (cj - 1.0f) * sj, y, k);
                }
                for (int64_t c = 0; c < k; c++) p[c] = r_[c];
                rs[q] = dotf(r_, r_, k);
                live[q] = rs[q] >= 1e-20f;
            }
            for (int64_t it = 0; it < a->cg_steps; it++) {
                int any = 0;
                for (int q = 0; q < ALS_LANES; q++) any |= live[q];
                if (!any) break;
                als_gram_times(a->gram, P, GP, k);
                for (int q = 0; q < ALS_LANES; q++) {
                    if (!live[q]) continue;
                    const int64_t row = r0 + q;
                    float *x = X + q * k, *r_ = R + q * k, *p = P + q * k, *Ap = AP + q * k, *Gp = GP + q * k;
                    const int64_t lo = a->indptr[row], n = a->indptr[row + 1] - lo;
                    /* Ap = (G + reg I) p + sum_j (c_j - 1) (y_j.p) y_j */
                    for (int64_t c = 0; c < k; c++) Ap[c] = Gp[c] + reg * p[c];
                    for (int64_t j = lo; j < lo + n; j++) {
                        const float *y = a->Y + a->indices[j] * a->ldy, dj = dotf(y, p, k);
                        D[q * m + j - lo] = dj;
                        axpyf(Ap, (a->conf[j] - 1.0f) * dj, y, k);
                    }
                    const float alpha = rs[q] / dotf(p, Ap, k);
                    axpyf(x, alpha, p, k);
                    axpyf(GX + q * k, alpha, Gp, k);
                    axpyf(S + q * m, alpha, D + q * m, n);
                    axpyf(r_, -alpha, Ap, k);
                    const float rs_new = dotf(r_, r_, k);
                    if (rs_new < 1e-20f) {
                        live[q] = 0;
                        continue;
                    }
                    const float beta = rs_new / rs[q];
                    for (int64_t c = 0; c < k; c++) p[c] = r_[c] + beta * p[c];
                    rs[q] = rs_new;
                }
            }
            for (int q = 0; q < ALS_LANES; q++) { /* write back; the row's loss at its new x */
                if (!used[q]) continue;
                const int64_t row = r0 + q;
                float *x = a->X + row * a->ldx, *xq = X + q * k;
                double err = (double)dotf(xq, GX + q * k, k), sq = 0.0;
                for (int64_t c = 0; c < k; c++) {
                    x[c] = xq[c];
                    sq += (double)xq[c] * (double)xq[c];
                }
                for (int64_t j = a->indptr[row]; j < a->indptr[row + 1]; j++) {
                    const double s = a->cg_steps > 0 ? S[q * m + j - a->indptr[row]]
                                                     : dotf(xq, a->Y + a->indices[j] * a->ldy, k);
                    const double cj = a->conf[j];
                    err += cj * (1.0 - s) * (1.0 - s) - s * s;
                }
                a->row_loss[2 * row] = err;
                a->row_loss[2 * row + 1] = a->reg * sq;
            }
        }
    }
    double data = 0.0, penalty = 0.0;
    int64_t failed = 0;
    for (int64_t r = 0; r < a->n_rows; r++) {
        failed += isnan(a->row_loss[2 * r]);
        data += a->row_loss[2 * r];
        penalty += a->row_loss[2 * r + 1];
    }
    a->data = data, a->penalty = penalty, a->failed = failed;
}
