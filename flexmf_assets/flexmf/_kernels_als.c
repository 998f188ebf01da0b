/*
 * Alternating least squares (als.py): one call solves every row of one side given the other side,
 * in place. Interface: _kernels.h (flexmf_als_*_args, mirrored by _abi.py); built with _kernels.c by
 * _native.py. A row is solved by one thread from start to end in a fixed order, and the sums over
 * rows are taken in row order after the parallel loop, so the factors and the objective do not
 * depend on the thread count. Rows are row-major float32 with a row stride (`ld*`), so the caller may
 * pass column views of its tables; bias vectors have their own stride. The torch engine
 * (_als_torch.py) is the reference these kernels are tested against.
 */
#include <math.h>
#include <stdint.h>

#include "_kernels.h"
#include "_kernels_rows.h"

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

/* A row with fewer entries n than unknowns m solves the same ridge system (F^T F + D) x = F^T t in
 * its dual form x = D^-1 F^T (F D^-1 F^T + I)^-1 t: an n x n system instead of m x m (D the diagonal
 * ridge: `ridge` on the factors, `bias_ridge` on a learned bias, both > 0). Most items of a catalogue
 * have fewer ratings than factors. K is [n, n] scratch followed by n more; x goes to b. Returns 0, or
 * 1 when the system is not positive definite (only with non-finite inputs). */
static int als_explicit_dual(const flexmf_als_explicit_args *a, int64_t lo, int64_t hi, double fixed,
                             double ridge, double bias_ridge, double *restrict K, double *restrict b) {
    const int64_t k = a->k, n = hi - lo;
    double *restrict z = K + n * n;
    const double extra = a->learn_bias ? 1.0 / bias_ridge : 0.0;
    for (int64_t p = 0; p < n; p++) {
        const int64_t op = a->indices[lo + p];
        const float *yp = a->Y + op * a->ldy;
        for (int64_t q = p; q < n; q++) {
            const float *yq = a->Y + a->indices[lo + q] * a->ldy;
            double s = 0.0;
#pragma omp simd reduction(+ : s)
            for (int64_t c = 0; c < k; c++) s += (double)yp[c] * (double)yq[c];
            K[p * n + q] = s / ridge + extra + (p == q ? 1.0 : 0.0);
        }
        z[p] = (double)a->values[lo + p] - fixed - (a->yb ? (double)a->yb[op * a->syb] : 0.0);
    }
    if (als_cholesky(K, n)) return 1;
    als_cholesky_solve(K, z, n);
    double zsum = 0.0;
    for (int64_t c = 0; c < k; c++) b[c] = 0.0;
    for (int64_t p = 0; p < n; p++) {
        const float *yp = a->Y + a->indices[lo + p] * a->ldy;
        const double zp = z[p];
#pragma omp simd
        for (int64_t c = 0; c < k; c++) b[c] += zp * (double)yp[c];
        zsum += zp;
    }
    for (int64_t c = 0; c < k; c++) b[c] /= ridge;
    if (a->learn_bias) b[k] = zsum / bias_ridge;
    return 0;
}

/* The sums of the rows' [data, penalty] losses and the count of rows whose data loss is NaN (serial:
 * the same bits for any thread count). */
static void sum_row_losses(flexmf_als_loss *loss, int64_t n_rows) {
    const double *row_loss = loss->row_loss;
    double d = 0.0, p = 0.0;
    int64_t failed = 0;
    for (int64_t r = 0; r < n_rows; r++) {
        failed += isnan(row_loss[2 * r]);
        d += row_loss[2 * r];
        p += row_loss[2 * r + 1];
    }
    loss->data = d, loss->penalty = p, loss->failed = failed;
}

/* Explicit (biased) ALS, one side. Row r's entries are indptr[r] .. indptr[r+1]: the other side's
 * row indices[j] and the target values[j] (rating - global mean), from which the other side's
 * bias is taken, and this side's bias too when it is held fixed (damped means). Each row solves
 *     (sum f f^T + reg n_r I) x = sum (target) f,   f = y (k) or [y, 1] (learn_bias: x = [p, b])
 * by Cholesky (LensKit's ridge reg n_r; reg n_r^reg_exponent in general, the learned bias's
 * bias_reg n_r^reg_exponent). Row losses: the squared errors of its entries after the solve, and
 * its penalty (ridge |p|^2 + bias ridge b^2). An empty row becomes zero.
 * A row whose system is not positive definite is left as it was and counted in `failed` (its loss
 * is NaN). */
int64_t flexmf_als_explicit_half(flexmf_als_explicit_args *a) {
    const int64_t k = a->k, m = k + (a->learn_bias ? 1 : 0), W = (k + 1) * (k + 4);
#pragma omp parallel num_threads(als_threads(a->nthreads))
    {
        double *A = a->work + (int64_t)omp_get_thread_num() * W, *b = A + m * m, *f = b + m;
#pragma omp for schedule(dynamic, 8)
        for (int64_t r = 0; r < a->n_rows; r++) {
            const int64_t lo = a->indptr[r], hi = a->indptr[r + 1];
            float *x = a->X + r * a->ldx;
            double *loss = a->loss.row_loss + 2 * r;
            if (hi == lo) {
                for (int64_t c = 0; c < k; c++) x[c] = 0.0f;
                if (a->learn_bias) a->xb[r * a->sxb] = 0.0f;
                loss[0] = loss[1] = 0.0;
                continue;
            }
            const double fixed = (!a->learn_bias && a->xb) ? a->xb[r * a->sxb] : 0.0;
            const double n = (double)(hi - lo), scale = a->reg_exponent == 1.0 ? n : pow(n, a->reg_exponent);
            const double ridge = a->reg * scale, bias_ridge = a->bias_reg * scale;
            if (hi - lo < m && ridge > 0.0 && (!a->learn_bias || bias_ridge > 0.0)) {
                if (als_explicit_dual(a, lo, hi, fixed, ridge, bias_ridge, A, b)) {
                    loss[0] = loss[1] = NAN;
                    continue;
                }
            } else {
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
                for (int64_t i = 0; i < k; i++) A[i * m + i] += ridge;
                if (a->learn_bias) A[k * m + k] += bias_ridge;
                if (als_cholesky(A, m)) {
                    loss[0] = loss[1] = NAN;
                    continue;
                }
                als_cholesky_solve(A, b, m);
            }
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
    sum_row_losses(&a->loss, a->n_rows);
    return FLEXMF_OK;
}

/* OUT[q] = G V[q] for the ALS_LANES vectors V[q] (rows of k floats) and a symmetric k x k G: blocks
 * of 16 outputs of every vector in registers while the columns of G stream by (OUT[q] = sum_c
 * V[q][c] G[c, :]), so each load of G serves all the vectors and no horizontal sums are needed;
 * the last k % 16 outputs by dot products. Each vector's arithmetic is its own (the lanes never mix). */
#define ALS_LANES FLEXMF_ALS_LANES
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


/* The exact solve of one row into x (0), or 1 when its system is not positive definite. */
static int als_implicit_exact(const flexmf_als_implicit_args *a, int64_t lo, int64_t hi, float *x, double *A) {
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
int64_t flexmf_als_implicit_half(flexmf_als_implicit_args *a) {
    const int64_t k = a->k, m = a->max_count, W = FLEXMF_ALS_WORK(k, m);
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
                    a->loss.row_loss[2 * row] = a->loss.row_loss[2 * row + 1] = 0.0;
                }
                for (int64_t c = 0; c < k; c++) X[q * k + c] = used[q] ? x[c] : 0.0f;
                if (used[q] && a->cg_steps <= 0 && als_implicit_exact(a, a->indptr[row], a->indptr[row + 1],
                                                                      X + q * k, A)) {
                    a->loss.row_loss[2 * row] = a->loss.row_loss[2 * row + 1] = NAN; /* left as it was */
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
                a->loss.row_loss[2 * row] = err;
                a->loss.row_loss[2 * row + 1] = a->reg * sq;
            }
        }
    }
    sum_row_losses(&a->loss, a->n_rows);
    return FLEXMF_OK;
}
