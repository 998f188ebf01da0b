/*
 * The interface of the fused CPU kernels (_kernels.c, _kernels_als.c): one argument struct per kernel, the enums and
 * the optimizer constants. Python mirrors every struct and enum in _abi.py (ctypes.Structure);
 * tests/test_native.py compiles a program against this header and checks every size, offset and
 * value of the mirror. Change both together.
 *
 * Tables are row-major float32. With Adam a row holds its parameters and both moments side by side,
 * [p | m | v] (stride 3 * width); with SGD rows are `width` apart. Every kernel returns an
 * enum flexmf_status; anything but FLEXMF_OK means nothing was computed.
 */
#ifndef FLEXMF_KERNELS_H
#define FLEXMF_KERNELS_H

#include <stdint.h>

/* Adam's constants (optim.py ADAM_BETAS, ADAM_EPS) */
#define FLEXMF_ADAM_B1 0.9
#define FLEXMF_ADAM_B2 0.999
#define FLEXMF_ADAM_EPS 1e-8f
/* the most negatives per positive the implicit kernel takes */
#define FLEXMF_MAX_NEGATIVES 64

enum flexmf_status {
    FLEXMF_OK = 0,
    FLEXMF_UNKNOWN_LOSS = 1,
    FLEXMF_UNKNOWN_OPTIMIZER = 2,
    FLEXMF_BAD_NEGATIVES = 3, /* negatives outside 1..FLEXMF_MAX_NEGATIVES, or not 1 for WARP */
    FLEXMF_BAD_SIZE = 4,      /* top-N: k or width below 1, n_items outside 1..2^32-1, or a bad unknown_row */
};

/* the implicit losses (losses.py LOSSES: each entry names its kind) */
enum flexmf_loss {
    FLEXMF_LOSS_LOGISTIC = 0, /* softplus(-s+) * positive_weight + sum softplus(s-) */
    FLEXMF_LOSS_PAIRWISE = 1, /* BPR: sum softplus(s- - s+) */
    FLEXMF_LOSS_WARP = 2,     /* weight * relu(1 - s+ + s-), one negative */
};

enum flexmf_optimizer {
    FLEXMF_SGD = 0,  /* explicit only: a row's step scaled by 1/sqrt(its ratings in the batch) */
    FLEXMF_ADAM = 1, /* sparse Adam(W) over the rows of a batch */
};

/* One parameter table and the caller-owned scratch of its per-batch gradients (_abi.Scratch). */
typedef struct {
    float *rows;       /* [n_rows, stride] */
    int64_t *last;     /* [n_rows] Adam step of each row's last update: idle steps are caught up in
                          closed form (implicit); NULL: lazy Adam, idle rows do not move (explicit) */
    int64_t n_rows;
    int64_t const_col; /* the column held at 1 (the other side's bias meets it), or -1 */
    float *grad;       /* [slots, width], slots >= n_rows + 16 * (threads + 2) */
    float *count;      /* [slots] */
    int64_t *touched;  /* [slots] */
    int32_t *slot;     /* [n_rows] row -> slot, all -1 on entry and on exit */
} flexmf_table;

/* What every training kernel shares: both tables, the optimizer and its state. */
typedef struct {
    flexmf_table user, item;
    int64_t width;     /* parameters per row */
    int64_t optimizer; /* enum flexmf_optimizer */
    double lr;
    double l2;         /* L2 penalty in the gradient */
    double decay;      /* decoupled weight decay (AdamW) */
    int64_t step;      /* in/out: Adam's step counter, one per batch */
    int64_t threads;
    double loss;       /* out: the summed loss of the call */
} flexmf_train;

/* Explicit feedback: prediction = user_row . item_row (biases ride in the rows), squared error. */
typedef struct {
    flexmf_train train;
    const int64_t *users, *items; /* [n] rows of each rating */
    const float *resid;           /* [n] rating - global mean */
    int64_t n, batch;
    float *err;                   /* [batch] scratch */
} flexmf_explicit_args;

/* Implicit feedback: positives with sampled negatives, one Adam(W) step per batch. */
typedef struct {
    flexmf_train train;
    int64_t loss_kind;            /* enum flexmf_loss */
    int64_t k;                    /* embedding columns: the L2 penalty's */
    int64_t negatives;            /* c, at most FLEXMF_MAX_NEGATIVES (WARP: 1) */
    const int64_t *users, *pos;   /* [n] */
    const int64_t *neg;           /* [n, c] */
    const uint8_t *valid;         /* [n, c]: 0 masks a negative (a positive of the user, no violator) */
    const float *weight;          /* [n] WARP's rank weight of each pair, or NULL */
    int64_t n, batch;
    double positive_weight;
    float *ds;                    /* [batch, 1 + c] scratch */
} flexmf_implicit_args;

/* Membership of (users[j], items[j, x]) in the training pairs. */
typedef struct {
    const uint8_t *bits; /* a dense users x n_items bit table of `cells` cells, or NULL: */
    int64_t cells;
    const int64_t *keys; /* else the sorted unique keys user * n_items + item */
    int64_t n_keys;
    int64_t n_items;
    const int64_t *users; /* [n] */
    const int64_t *items; /* [n, c] */
    int64_t n, c;
    uint8_t *out;         /* [n, c] */
} flexmf_contains_args;

/* Top-N scoring (_kernels_topn.c): the best k items of each user row by user_row . item_row + offset,
 * seen items excluded; ties go to the lower item index. Output rows are best first. */
#define FLEXMF_TOPN_PANEL 16 /* items per packed panel */
#define FLEXMF_TOPN_USERS 192 /* users per thread block (a multiple of 6) */
typedef struct {
    const float *users;           /* [n_user_rows, width] */
    int64_t n_user_rows;
    int64_t unknown_row;          /* the row a user outside 0..n_user_rows-1 (e.g. -1) scores as */
    const float *items;           /* [n_items, width] (row-major, rows `width` apart) */
    int64_t n_items, width;
    const int64_t *rows;          /* [m] the user rows to score */
    int64_t m;
    const int64_t *seen_indptr;   /* [n_seen_users + 1] CSR of each row's items, ascending; NULL: none */
    const int64_t *seen_indices;
    int64_t n_seen_users;
    double offset;
    int64_t k;
    int64_t threads;
    float *packed;                /* scratch [ceil(n_items / PANEL) * PANEL * width] */
    float *upack;                 /* scratch [threads * FLEXMF_TOPN_USERS * width] */
    float *out_scores;            /* [m, k] best first */
    int64_t *out_items;           /* [m, k] */
    int64_t *out_count;           /* [m] the filled slots of each row (k, or fewer when seen items leave fewer) */
} flexmf_topn_args;

/* Alternating least squares (_kernels_als.c): one call solves every row of one side given the other,
 * in place; the rows of the CSR side are indptr[r] .. indptr[r + 1] of indices/values. */
#define FLEXMF_ALS_LANES 4 /* implicit rows solved together, sharing each pass over the Gram matrix */
/* scratch doubles per thread: a (k + 1)-system and right-hand side, then (implicit CG) 6 vectors of k
 * floats and 2 per-entry buffers of m floats for each of the FLEXMF_ALS_LANES rows */
#define FLEXMF_ALS_WORK(k, m) (((k) + 1) * ((k) + 4) + 3 * FLEXMF_ALS_LANES * (k) + FLEXMF_ALS_LANES * (m))

/* A half-step's loss: each row's [data, penalty] terms and their sums (out). */
typedef struct {
    double *row_loss; /* [n_rows, 2] */
    double data, penalty;
    int64_t failed; /* rows whose data loss is NaN */
} flexmf_als_loss;

/* Explicit (biased) ALS, one side: ridge solves of [p_r | b_r] against the other side's rows. */
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
    double *work;     /* [nthreads, FLEXMF_ALS_WORK(k, 0)] (uses (k + 1) * (k + 4)) */
    flexmf_als_loss loss;
} flexmf_als_explicit_args;

/* Implicit (weighted) ALS, one side: CG steps or exact solves with Y^T Y given (gram). */
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
    double *work;     /* [nthreads, FLEXMF_ALS_WORK(k, max_count)] */
    flexmf_als_loss loss;
} flexmf_als_implicit_args;

int64_t flexmf_explicit_epoch(flexmf_explicit_args *a);
int64_t flexmf_implicit_batches(flexmf_implicit_args *a);
/* catch every row of both tables up to a->step (what dense AdamW's parameters would be now) */
int64_t flexmf_adam_flush(flexmf_train *a);
int64_t flexmf_contains(const flexmf_contains_args *a);
int64_t flexmf_topn(const flexmf_topn_args *a);
int64_t flexmf_als_explicit_half(flexmf_als_explicit_args *a);
int64_t flexmf_als_implicit_half(flexmf_als_implicit_args *a);

#endif
