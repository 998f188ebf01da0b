"""The torch engine of the ALS solvers (als.py): the reference on CPU (float64) and the GPU path.

Rows of one side are grouped by their count (within a power of two) into padded batches; each
batch is solved at once, by batched Cholesky factorisations or batched conjugate-gradient steps,
with the same semantics as the C kernels (``_kernels.c``): same systems, same warm starts, same
early stop of CG, same row losses, rows whose system is not positive definite left as they were.
"""

from __future__ import annotations

import math

import torch

#: padded entries (rows x longest count x width) and Gram elements per batch
_BATCH_ENTRIES = 1 << 22
_BATCH_GRAMS = 1 << 24
#: CG stops on a row once its squared residual norm falls below this (as ``implicit`` does)
CG_TOL = 1e-20


class Side:
    """One side's rows in CSR: row r's entries ``indptr[r]:indptr[r+1]`` name rows of the other side
    (``indices``) and carry ``values``."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int):
        order = torch.argsort(rows, stable=True)
        self.indices = cols[order].contiguous()
        self.values = values[order].contiguous()
        self.counts = torch.bincount(rows, minlength=n_rows)
        self.indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows.device)
        torch.cumsum(self.counts, 0, out=self.indptr[1:])
        self.n_rows = n_rows
        self.empty = torch.nonzero(self.counts == 0).flatten()
        self._plan: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def plan(self, width: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Torch engine batches ``(rows, positions [B, m], mask [B, m])``: non-empty rows grouped by
        count (within a power of two, so padding at most doubles the work), split to fit the budget."""
        if self._plan is None:
            counts = self.counts.cpu()
            rows = torch.nonzero(counts > 0).flatten()
            rows = rows[torch.argsort(counts[rows], stable=True)]
            bucket = torch.ceil(torch.log2(counts[rows].double())).long()
            self._plan = []
            start = 0
            for size in torch.unique_consecutive(bucket, return_counts=True)[1].tolist():
                group = rows[start : start + size]
                start += size
                longest = int(counts[group[-1]])
                per = max(1, min(_BATCH_ENTRIES // (longest * width), _BATCH_GRAMS // (width * width)))
                for b in range(0, len(group), per):
                    r = group[b : b + per].to(self.indptr.device)
                    ar = torch.arange(longest, device=r.device)
                    mask = ar[None, :] < self.counts[r][:, None]
                    pos = torch.where(mask, self.indptr[r][:, None] + ar[None, :], 0)
                    self._plan.append((r, pos, mask))
        return self._plan


def explicit_half(this: Side, X: torch.Tensor, xb: torch.Tensor, Y: torch.Tensor, yb: torch.Tensor, *,
                  reg: float, reg_exponent: float, bias_reg: float, learn: bool,
                  dtype: torch.dtype) -> tuple[float, float, int]:
    """Solve every row of ``this`` side (factors ``X``, biases ``xb``) given the other (``Y``, ``yb``):
    (data term, this side's penalty, rows not positive definite)."""
    dt, k = dtype, X.shape[1]
    Yd, ybd = Y.to(dt), yb.to(dt)
    data = torch.zeros((), dtype=torch.float64, device=X.device)
    penalty, failed = data.clone(), 0
    for rows, pos, mask in this.plan(k + 1):
        cols, m = this.indices[pos], mask.to(dt)
        t = (this.values[pos].to(dt) - ybd[cols]) * m
        if not learn:
            t -= xb[rows].to(dt)[:, None] * m
        F = Yd[cols]
        if learn:
            F = torch.cat([F, torch.ones_like(F[..., :1])], -1)
        F *= m[..., None]
        scale = this.counts[rows].to(dt) ** reg_exponent
        ridge = (reg * scale)[:, None].repeat(1, F.shape[-1])
        if learn:
            ridge[:, k] = bias_reg * scale
        A = F.transpose(1, 2) @ F
        A.diagonal(dim1=1, dim2=2).add_(ridge)
        L, info = torch.linalg.cholesky_ex(A)
        sol = torch.cholesky_solve((F.transpose(1, 2) @ t[..., None]), L)[..., 0]
        ok = info == 0
        failed += int((~ok).sum())
        X[rows[ok]] = sol[ok, :k].to(X.dtype)
        if learn:
            xb[rows[ok]] = sol[ok, k].to(xb.dtype)
        e = t - (F @ sol[..., None])[..., 0]
        data += torch.where(ok, (e * e).sum(1), math.nan).sum()
        penalty += (ridge * sol * sol).sum()
    X[this.empty] = 0.0
    if learn:
        xb[this.empty] = 0.0
    return float(data), float(penalty), failed


def implicit_half(this: Side, X: torch.Tensor, Y: torch.Tensor, *, reg: float, cg_steps: int,
                  dtype: torch.dtype) -> tuple[float, float, int]:
    """Solve every row of ``this`` side (``X``) given the other (``Y``); ``cg_steps`` 0 solves exactly:
    (data term, this side's penalty, rows not positive definite)."""
    dt, k = dtype, X.shape[1]
    Yd = Y.to(dt)
    G = Yd.T @ Yd
    data = torch.zeros((), dtype=torch.float64, device=X.device)
    penalty, failed = data.clone(), 0
    eye = torch.eye(k, dtype=dt, device=X.device)
    for rows, pos, mask in this.plan(k):
        m = mask.to(dt)
        F = Yd[this.indices[pos]] * m[..., None]  # [B, m, k], padding rows zero
        c = this.values[pos].to(dt) * m  # confidence, 0 on padding
        c1 = (c - 1.0) * m
        b = torch.einsum("bmk,bm->bk", F, c)
        ok = torch.ones(len(rows), dtype=torch.bool, device=X.device)
        if cg_steps <= 0:
            A = G + reg * eye + torch.einsum("bmk,bm,bml->bkl", F, c1, F)
            L, info = torch.linalg.cholesky_ex(A)
            x = torch.cholesky_solve(b[..., None], L)[..., 0]
            ok = info == 0
            failed += int((~ok).sum())
        else:
            def times_a(v: torch.Tensor) -> torch.Tensor:
                return v @ G + reg * v + torch.einsum("bmk,bm->bk", F, c1 * torch.einsum("bmk,bk->bm", F, v))

            x = X[rows].to(dt)
            res = b - times_a(x)
            p, rs = res.clone(), (res * res).sum(1)
            live = rs >= CG_TOL
            for _ in range(cg_steps):
                Ap = times_a(p)
                alpha = torch.where(live, rs / (p * Ap).sum(1), 0.0)
                x += alpha[:, None] * p
                res -= alpha[:, None] * Ap
                rs_new = (res * res).sum(1)
                live &= rs_new >= CG_TOL
                p = res + torch.where(live, rs_new / rs, 0.0)[:, None] * p
                rs = torch.where(live, rs_new, rs)
        X[rows[ok]] = x[ok].to(X.dtype)
        sc = torch.einsum("bmk,bk->bm", F, x)
        err = ((x @ G) * x).sum(1) + ((c * (1.0 - sc) ** 2 - sc * sc) * m).sum(1)
        data += torch.where(ok, err, math.nan).sum()
        penalty += reg * (x * x).sum()
    X[this.empty] = 0.0
    return float(data), float(penalty), failed
