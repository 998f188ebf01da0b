/*
 * Internal to _kernels.c (not part of the interface, _kernels.h): the row machinery every training
 * kernel shares. Pass 1 sums per-row gradients in accumulators (Acc); pass 2 (step_rows) steps each
 * touched row with the optimizer: SGD (explicit) or Adam(W), lazy or with the idle steps caught up in
 * closed form (optim.py SparseAdam is its torch form).
 */
#ifndef FLEXMF_KERNELS_ROWS_H
#define FLEXMF_KERNELS_ROWS_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "_kernels.h"
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (a compiler without it): one thread, same results */
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

#define B1 FLEXMF_ADAM_B1
#define B2 FLEXMF_ADAM_B2
#define EPS FLEXMF_ADAM_EPS

static inline float dotf(const float *restrict a, const float *restrict b, int64_t w) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < w; c++) s += a[c] * b[c];
    return s;
}

static inline void axpyf(float *restrict y, float a, const float *restrict x, int64_t w) {
#pragma omp simd
    for (int64_t c = 0; c < w; c++) y[c] += a * x[c];
}

/* A sum of softplus terms, log(1 + e^x) = max(x, 0) + log(1 + e^-|x|): the linear parts added, the
 * log parts of unit weight as the log of their product (each factor is in (1, 2]: one log per 64
 * terms instead of one per term). */
typedef struct {
    double lin, prod, logs;
    int n;
} SoftplusSum;

static inline double softplus_total(const SoftplusSum *a) { return a->lin + a->logs + log(a->prod); }

/* sigmoid(x), stable; adds weight * log(1 + e^x) to `acc` (sharing the one exp) */
static inline float sigmoid_softplus(float x, double weight, SoftplusSum *acc) {
    float e = expf(-fabsf(x));
    if (weight == 1.0) {
        acc->lin += (double)fmaxf(x, 0.0f);
        acc->prod *= 1.0 + (double)e;
        if (++acc->n == 64) acc->logs += log(acc->prod), acc->prod = 1.0, acc->n = 0;
    } else {
        acc->lin += weight * ((double)fmaxf(x, 0.0f) + log1p((double)e));
    }
    return x >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
}

/* Per-batch gradient accumulator of one table for one thread. A row touched by the batch gets the
 * thread's next free slot (slot[r], -1 when untouched): its gradient and count live at that slot, so
 * a batch's gradients sit contiguous and cache-hot whatever the table size. The slot map is shared
 * by the threads (rows are disjoint by ownership); gradients, counts and the touched list are per
 * thread stretches. */
typedef struct {
    float *g;      /* [slots, w] */
    float *cnt;    /* [slots] */
    int64_t *list; /* [slots]: the row of each slot */
    int32_t *slot; /* [rows] */
    int64_t n;
    int64_t w;
} Acc;

#define OWN_SHIFT 4 /* rows are owned in blocks of 16 (one cache line of the slot map) */
#define OWNS(r, tid, nt) ((nt) == 1 || (((r) >> OWN_SHIFT) % (nt)) == (tid))
#define PF 6        /* software prefetch distance, in ratings */

static inline int threads_of(int64_t threads) { return threads < 1 ? 1 : (int)threads; }

/* The gradient accumulator of table `t` for thread tid of nt (scratch: see _kernels.h). */
static inline Acc acc_for(const flexmf_table *t, int64_t w, int tid, int nt) {
    int64_t blocks = (t->n_rows >> OWN_SHIFT) + 1, base = (int64_t)tid * (((blocks + nt - 1) / nt) << OWN_SHIFT);
    Acc a = {t->grad + base * w, t->count + base, t->touched + base, t->slot, 0, w};
    return a;
}

/* The gradient row of r, counted once more; *fresh says the row was untouched in this batch (its
 * slot holds stale values: overwrite, do not add). */
static inline float *acc_slot(Acc *a, int64_t r, int *fresh, const int64_t w) {
    int32_t sl = a->slot[r];
    *fresh = sl < 0;
    if (sl < 0) {
        sl = (int32_t)a->n++;
        a->slot[r] = sl;
        a->list[sl] = r;
        a->cnt[sl] = 0.0f;
    }
    a->cnt[sl] += 1.0f;
    return a->g + (int64_t)sl * w;
}

/* Count row r once more and add s * x to its gradient (the first touch in a batch overwrites).
 * Returns the gradient row. */
static inline float *acc_add(Acc *a, int64_t r, float s, const float *restrict x, const int64_t w) {
    int fresh;
    float *restrict g = acc_slot(a, r, &fresh, w);
    if (fresh) {
#pragma omp simd
        for (int64_t c = 0; c < w; c++) g[c] = s * x[c];
    } else {
        axpyf(g, s, x, w);
    }
    return g;
}

static inline void prefetch_row(const float *row, int64_t floats) {
    for (int64_t c = 0; c < floats; c += 16) __builtin_prefetch(row + c);
}

/* The first w floats of user row u of U and item row i of I (rows `stride` floats apart): a pair's. */
static inline void prefetch_pair(const float *U, int64_t u, const float *I, int64_t i, int64_t stride, int64_t w) {
    prefetch_row(U + u * stride, w);
    prefetch_row(I + i * stride, w);
}

/* ------------------------------------------------------------------------------------------------
 * Optimizers, one row at a time (optim.py is the torch form). Adam's moments keep the gradient's
 * sign; a row is [p | m | v].
 * ------------------------------------------------------------------------------------------------ */
static double adam_step_size(double lr, int64_t t) {
    if (t < 1) t = 1;
    return lr * sqrt(1.0 - pow(B2, (double)t)) / (1.0 - pow(B1, (double)t));
}

/* the idle-step factors of d = 0..IDLE_CACHE-1 idle steps are tabulated once per kernel call */
#define IDLE_CACHE 512

/* Adam(W) at step t: its step size, and what the closed-form catch-up of idle steps needs (`idle`:
 * a table of IDLE_CACHE x {a^d, q^d, b1^d, b2^d}, or NULL) */
typedef struct {
    double lr, wd, step_prev, step_t, log_a, log_q, q, log_b1, log_b2;
    const double *idle;
} Adam;

static Adam adam_at(double lr, double wd, int64_t t) {
    double a = 1.0 - lr * wd, q = B1 / sqrt(B2) / a;
    Adam o = {lr, wd, adam_step_size(lr, t - 1), adam_step_size(lr, t), log(a), log(q), q, log(B1), log(B2), 0};
    return o;
}

/* Fill `table` (IDLE_CACHE x 4) with the idle-step factors of `o` (they do not depend on the step). */
static void idle_table(double *table, const Adam *o) {
    for (int64_t d = 0; d < IDLE_CACHE; d++) {
        table[4 * d] = exp((double)d * o->log_a);
        table[4 * d + 1] = exp((double)d * o->log_q);
        table[4 * d + 2] = exp((double)d * o->log_b1);
        table[4 * d + 3] = exp((double)d * o->log_b2);
    }
}

/* The catch-up of a row's idle steps (below; `f` NULL: none) and then, when `step`, its AdamW step with
 * the gradient sign * g + reg * p (`plain`: g itself), in one pass over the row. `f`, `step` and `plain`
 * are constants at each call site, so each gets its own loop. */
static inline __attribute__((always_inline)) void idle_then_step(float *restrict p, const float *restrict g,
                                                                 float sign, float reg, int64_t w, const float *f,
                                                                 const Adam *o, const int step, const int plain) {
    float *restrict m = p + w, *restrict v = p + 2 * w;
    float keep = (float)(1.0 - o->lr * o->wd), st = (float)o->step_t;
#pragma omp simd
    for (int64_t c = 0; c < w; c++) {
        float pc = p[c], mc = m[c], vc = v[c];
        if (f) pc = pc * f[0] - mc * f[1] / (sqrtf(vc) + EPS), mc *= f[2], vc *= f[3];
        if (step) {
            float gc = plain ? g[c] : sign * g[c] + reg * pc;
            mc += (float)(1.0 - B1) * (gc - mc);
            vc = (float)B2 * vc + (float)(1.0 - B2) * gc * gc;
            pc = pc * keep - st * mc / (sqrtf(vc) + EPS);
        }
        p[c] = pc, m[c] = mc, v[c] = vc;
    }
}

/* `idle` zero-gradient steps in closed form: idle step j does p <- a p - step q^j a^j m / sqrt(v)
 * with a = 1 - lr wd and q a = b1 / sqrt(b2); after d steps p a^d - step m / sqrt(v) a^d
 * sum_{j=1..d} q^j, m b1^d, v b2^d. Then (g != NULL) one AdamW step with the gradient
 * sign * g + reg * p. */
static void adam_row(float *restrict p, const float *restrict g, float sign, float reg, int64_t w, int64_t cst,
                     int64_t idle, const Adam *o) {
    const int plain = sign == 1.0f && reg == 0.0f;
    if (idle > 0) {
        double d = (double)idle, e[4];
        if (o->idle && idle < IDLE_CACHE) {
            memcpy(e, o->idle + 4 * idle, sizeof e);
        } else {
            e[0] = exp(d * o->log_a), e[1] = exp(d * o->log_q), e[2] = exp(d * o->log_b1), e[3] = exp(d * o->log_b2);
        }
        double tail = (1.0 - e[1]) * e[0] * o->step_prev * o->q / (1.0 - o->q);
        float f[4] = {o->wd != 0.0 ? (float)e[0] : 1.0f, (float)tail, (float)e[2], (float)e[3]};
        if (g == 0) idle_then_step(p, g, sign, reg, w, f, o, 0, 0);
        else if (plain) idle_then_step(p, g, sign, reg, w, f, o, 1, 1);
        else idle_then_step(p, g, sign, reg, w, f, o, 1, 0);
    } else if (g != 0 && plain) {
        idle_then_step(p, g, sign, reg, w, 0, o, 1, 1);
    } else if (g != 0) {
        idle_then_step(p, g, sign, reg, w, 0, o, 1, 0);
    }
    if (cst >= 0) p[cst] = 1.0f; /* the constant column (its moments are never read) */
}

/* SGD (explicit): row += lr / sqrt(c) * (a - l2 * c * row) for the summed ascent a of its c ratings */
static inline void sgd_row(float *restrict p, const float *restrict g, float cnt, int64_t w, int64_t cst, double lr,
                           double l2) {
    float keep = cst >= 0 ? p[cst] : 0.0f; /* every column is updated (vectorisable), then restored */
    float s = (float)lr / sqrtf(cnt), reg = (float)l2 * cnt;
#pragma omp simd
    for (int64_t c = 0; c < w; c++) p[c] += s * (g[c] - reg * p[c]);
    if (cst >= 0) p[cst] = keep;
}

/* How pass 2 steps a row from what pass 1 summed for it. */
typedef struct {
    const flexmf_train *tr;
    int64_t stride;
    float sign;       /* the sums are sign * gradient: explicit sums the ascent (-1), implicit the gradient */
    int64_t l2_cols;  /* > 0 (implicit): 2 l2 / b * count * row on the first l2_cols columns, added to
                         the loss; 0 (explicit): l2 * count * row on every column, not in the loss */
    float inv_b;
    const Adam *adam;
    int64_t tnow;
} RowStep;

/* Pass 2: step every row this thread summed in the batch and free its slot; returns the L2 loss. */
static inline double step_rows(Acc *a, const flexmf_table *tb, const RowStep *s) {
    const flexmf_train *tr = s->tr;
    const int64_t w = tr->width, stride = s->stride, cst = tb->const_col;
    double l2_loss = 0.0;
    for (int64_t x = 0; x < a->n; x++) {
        int64_t r = a->list[x];
        float *p = tb->rows + r * stride, *restrict g = a->g + x * w, cnt = a->cnt[x];
        if (x + PF < a->n) prefetch_row(tb->rows + a->list[x + PF] * stride, stride);
        if (tr->optimizer == FLEXMF_SGD) {
            sgd_row(p, g, cnt, w, cst, tr->lr, tr->l2);
        } else {
            if (s->l2_cols > 0 && tr->l2 != 0.0) {
                float coef = 2.0f * (float)tr->l2 * s->inv_b * cnt;
                double sq = 0.0;
                for (int64_t col = 0; col < s->l2_cols; col++) {
                    g[col] += coef * p[col];
                    sq += (double)p[col] * (double)p[col];
                }
                l2_loss += tr->l2 * (double)cnt * sq;
            }
            float reg = s->l2_cols == 0 ? (float)tr->l2 * cnt : 0.0f;
            adam_row(p, g, s->sign, reg, w, cst, tb->last ? (s->tnow - 1) - tb->last[r] : 0, s->adam);
            if (tb->last) tb->last[r] = s->tnow;
        }
        a->slot[r] = -1;
    }
    return l2_loss;
}

#endif
