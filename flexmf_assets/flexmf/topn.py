"""Top-N selection for :meth:`.scorer.FlexMFScorer.recommend`, one tie rule for both paths.

* :func:`topk_rows` is the torch path (the reference, and the GPU path): ``torch.topk`` over a
  block of scores, then made deterministic. ``torch.topk`` leaves the order of equal scores to its
  implementation; here a better item has the higher score, or the same score and the lower item
  index: within the selection by a stable sort, at the boundary (more items tied with the k-th
  score than places left) by taking the lowest indices.
* :func:`native_topn` is the CPU path: the fused kernel ``flexmf_topn`` (``_kernels_topn.c``) scores
  user blocks against item tiles and keeps a bounded heap per user, so no score block is written to
  memory; seen items are skipped as they come; users are split across threads (the same result for
  any thread count). Same items, same tie rule, scores equal up to float summation order.
"""

from __future__ import annotations

import numpy as np
import torch

from flexmf_assets.flexmf import _abi, _native
from flexmf_assets.flexmf.ids import SeenItems


def topk_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(scores, k, dim=1)`` (sorted) with ties to the lower column index."""
    top_s, top_i = torch.topk(scores, k, dim=1)
    kth = top_s[:, -1:]
    # rows where an item left out ties with the k-th score: the lowest tied indices take the places
    short = ((scores == kth).sum(1) > (top_s == kth).sum(1)).nonzero().flatten().tolist()
    for r in short:
        above = (scores[r] > kth[r]).nonzero().flatten()
        tied = (scores[r] == kth[r]).nonzero().flatten()[: k - len(above)]
        top_i[r] = torch.cat([above, tied])
        top_s[r] = scores[r, top_i[r]]
    # best first: by score, then index (two stable sorts)
    order = torch.argsort(top_i, dim=1, stable=True)
    top_s, top_i = top_s.gather(1, order), top_i.gather(1, order)
    order = torch.argsort(top_s, dim=1, descending=True, stable=True)
    return top_s.gather(1, order), top_i.gather(1, order)


def native_topn(users: torch.Tensor, items: torch.Tensor, rows: torch.Tensor, n: int, offset: float,
                seen: SeenItems | None, threads: int | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The top ``n`` of each user row with the fused CPU kernel.

    ``users``: the user table (its last row is "unknown": rows < 0 score as it); ``items``: the
    ``[n_items, width]`` rows to rank; ``seen``: each user row's items to skip, or None. Returns
    :func:`.scorer.recommend_in_batches`'s ``(position in rows, item row, score, rank)``.
    """
    nt = threads or _native.threads()
    users, items = users.contiguous(), items.contiguous()
    rows = rows.to(torch.int64).contiguous()
    n_items, width = items.shape
    k = min(n, n_items)
    m = rows.numel()
    panels = -(-n_items // _abi.TOPN_PANEL)
    packed = torch.empty(panels * _abi.TOPN_PANEL * width)
    upack = torch.empty(nt * _abi.TOPN_USERS * width)
    out_s, out_i = torch.empty(m, k), torch.empty(m, k, dtype=torch.int64)
    count = torch.empty(m, dtype=torch.int64)
    indptr = indices = None
    if seen is not None:
        indptr, indices = seen.indptr.contiguous(), seen.indices.contiguous()
    _native.run("flexmf_topn", _abi.TopNArgs(
        users=_abi.ptr(users), n_user_rows=users.shape[0], unknown_row=users.shape[0] - 1, items=_abi.ptr(items),
        n_items=n_items, width=width, rows=_abi.ptr(rows), m=m, seen_indptr=_abi.ptr(indptr),
        seen_indices=_abi.ptr(indices), n_seen_users=0 if indptr is None else indptr.numel() - 1, offset=offset,
        k=k, threads=nt, packed=_abi.ptr(packed), upack=_abi.ptr(upack), out_scores=_abi.ptr(out_s),
        out_items=_abi.ptr(out_i), out_count=_abi.ptr(count)))
    keep = (torch.arange(k).unsqueeze(0) < count.unsqueeze(1)).numpy()
    pos = np.broadcast_to(np.arange(m)[:, None], (m, k))[keep]
    ranks = np.broadcast_to(np.arange(1, k + 1)[None, :], (m, k))[keep]
    return pos, out_i.numpy()[keep], out_s.numpy()[keep], ranks


__all__ = ["native_topn", "topk_rows"]
