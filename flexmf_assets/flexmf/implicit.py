"""FlexMF for implicit feedback: logistic, pairwise (BPR) and WARP losses with sampled negatives.

Training is minibatch Adam(W) over pre-permuted index tensors (no DataLoader); negatives come from
:mod:`flexmf_assets.flexmf.sampling` and are drawn for a whole batch at once, so an epoch has no
per-sample Python work and no device sync per batch. Scoring and recommendation reuse the shared
machinery of :mod:`flexmf_assets.flexmf._common`.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.flexmf._common import (
    IdIndex,
    SeenItems,
    check_finite,
    epoch_batches,
    hot_loop_threads,
    load_model_dir,
    make_generator,
    oom_guard,
    recommend_in_batches,
    requested_threads,
    save_model_dir,
)
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device
from flexmf_assets.flexmf.implicit_config import FlexMFImplicitConfig
from flexmf_assets.flexmf.sampling import PositiveSet, make_sampler, warp_rank_weights

KIND = "flexmf-implicit"
Callback = Callable[[dict[str, Any]], None]


def interactions(frame: pl.DataFrame, min_rating: float | None, *, what: str = "train") -> pl.DataFrame:
    """Distinct ``user_id, item_id`` pairs of ``frame`` that count as interactions under ``min_rating``."""
    for col in ("user_id", "item_id"):
        if col not in frame.columns:
            raise DataValidationError(f"{what} frame lacks column {col!r}; it has {', '.join(frame.columns)}")
    if min_rating is not None:
        if "rating" not in frame.columns:
            raise DataValidationError(
                f"{what} frame has no 'rating' column but min_rating={min_rating} is set"
            )
        frame = frame.filter(pl.col("rating") >= min_rating)
    return frame.select("user_id", "item_id").unique(maintain_order=True)


class FlexMFImplicitScorer:
    """Implicit-feedback matrix factorization; same library API as the explicit scorer.

    ``FlexMFImplicitScorer(config=None, *, device=None, **overrides)``: ``config`` is a
    :class:`FlexMFImplicitConfig` or a mapping of its fields; ``overrides`` replace fields.
    """

    def __init__(
        self,
        config: FlexMFImplicitConfig | Mapping[str, Any] | None = None,
        *,
        device: DeviceSettings | str | torch.device | None = None,
        **overrides: Any,
    ) -> None:
        if config is None or isinstance(config, Mapping):
            self.config = FlexMFImplicitConfig.from_dict({**dict(config or {}), **overrides})
        elif isinstance(config, FlexMFImplicitConfig):
            self.config = config.replace(**overrides) if overrides else config
        else:
            raise ConfigError(f"config: expected FlexMFImplicitConfig or a mapping, got {type(config).__name__}")
        self._device_spec = device
        self.device = resolve_device(device)
        self.history: list[dict[str, Any]] = []
        self.epochs_run = 0
        self.best_epoch: int | None = None
        self.train_seconds = 0.0
        self.updates_per_second = 0.0
        self.users_: IdIndex | None = None
        self.items_: IdIndex | None = None
        self.seen_: SeenItems | None = None
        self.params_: dict[str, torch.Tensor] = {}

    @property
    def n_users(self) -> int:
        """Users seen in training (0 before ``fit``)."""
        return len(self.users_) if self.users_ is not None else 0

    @property
    def n_items(self) -> int:
        """Items seen in training (0 before ``fit``)."""
        return len(self.items_) if self.items_ is not None else 0

    # ------------------------------------------------------------------------------------------
    # scoring primitives
    # ------------------------------------------------------------------------------------------

    def _score(self, p: dict[str, torch.Tensor], users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Scores of ``users[B]`` against ``items[B]`` or ``items[B, T]``."""
        uvec = p["user_embedding"][users]
        ivec = p["item_embedding"][items]
        if items.dim() == 2:
            s = torch.bmm(ivec, uvec.unsqueeze(2)).squeeze(2)
        else:
            s = (uvec * ivec).sum(-1)
        if "item_bias" in p:
            s = s + p["item_bias"][items]
        if "user_bias" in p:
            ub = p["user_bias"][users]
            s = s + (ub.unsqueeze(1) if items.dim() == 2 else ub)
        return s

    def _score_all(self, rows: torch.Tensor) -> torch.Tensor:
        """``(len(rows), n_items)`` scores; rows ``-1`` (unknown users) get item biases only."""
        p = self.params_
        known = rows >= 0
        safe = torch.where(known, rows, torch.zeros_like(rows))
        uvec = p["user_embedding"][safe] * known.unsqueeze(1)
        s = uvec @ p["item_embedding"].T
        if "item_bias" in p:
            s = s + p["item_bias"].unsqueeze(0)
        if "user_bias" in p:
            s = s + (p["user_bias"][safe] * known).unsqueeze(1)
        return s

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def fit(
        self,
        train: pl.DataFrame,
        validation: pl.DataFrame | None = None,
        *,
        callback: Callback | None = None,
    ) -> "FlexMFImplicitScorer":
        """Train on ``train`` (``user_id, item_id[, rating]``); early-stop on ``validation`` NDCG."""
        cfg = self.config
        dev = self.device
        pairs = interactions(train, cfg.min_rating)
        if pairs.height == 0:
            raise DataValidationError(
                f"train: no interactions left (rows={train.height}, min_rating={cfg.min_rating})"
            )
        self.users_, u_np = IdIndex.fit(pairs["user_id"])
        self.items_, i_np = IdIndex.fit(pairs["item_id"])
        n_users, n_items = len(self.users_), len(self.items_)
        if n_items < 2:
            raise DataValidationError("train: needs at least 2 distinct items to sample negatives")
        self.seen_ = SeenItems.build(u_np, i_np, n_users, dev)
        users_t = torch.from_numpy(u_np).to(dev)
        items_t = torch.from_numpy(i_np).to(dev)

        val = self._validation_pairs(validation) if validation is not None else None

        init = torch.Generator().manual_seed(cfg.seed)  # CPU init: same start on every device
        k = cfg.embedding_size
        p: dict[str, torch.Tensor] = {
            "user_embedding": torch.randn(n_users, k, generator=init) * cfg.init_scale,
            "item_embedding": torch.randn(n_items, k, generator=init) * cfg.init_scale,
        }
        if cfg.user_bias:
            p["user_bias"] = torch.zeros(n_users)
        if cfg.item_bias:
            p["item_bias"] = torch.zeros(n_items)
        p = {name: t.to(dev).requires_grad_(True) for name, t in p.items()}
        self.params_ = p

        wd = cfg.regularization if cfg.reg_method == "AdamW" else 0.0
        opt = torch.optim.AdamW(list(p.values()), lr=cfg.learning_rate, weight_decay=wd,
                                foreach=True)
        gen = make_generator(cfg.seed, dev)
        positives = PositiveSet(users_t, items_t, n_items)
        sampler = make_sampler(cfg.negative_strategy, positives, items_t,
                               candidates=cfg.misranked_candidates)
        warp_table = warp_rank_weights(n_items, dev) if cfg.loss == "warp" else None
        score_fn = lambda us, its: self._score(p, us, its)  # noqa: E731

        self.history, self.best_epoch, self.epochs_run = [], None, 0
        best_metric, best_state, stale = -math.inf, None, 0
        n = users_t.numel()
        train_time = 0.0
        with oom_guard(cfg.batch_size), hot_loop_threads(dev, requested_threads(self._device_spec)):
            for epoch in range(1, cfg.epochs + 1):
                t0 = time.perf_counter()
                total = torch.zeros((), device=dev)
                for idx in epoch_batches(n, cfg.batch_size, gen, dev):
                    us, pos = users_t[idx], items_t[idx]
                    loss = self._batch_loss(p, us, pos, sampler, score_fn, gen, warp_table)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.detach() * idx.numel()
                epoch_loss = float(total) / n
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                seconds = time.perf_counter() - t0
                train_time += seconds
                check_finite(epoch_loss, epoch, cfg.learning_rate)
                row: dict[str, Any] = {"epoch": epoch, "train_loss": epoch_loss, "val_ndcg": None,
                                       "seconds": seconds}
                self.epochs_run = epoch
                if val is not None:
                    metric = self._validation_ndcg(*val)
                    row["val_ndcg"] = metric
                    if metric > best_metric:
                        best_metric, self.best_epoch, stale = metric, epoch, 0
                        best_state = {name: t.detach().clone() for name, t in p.items()}
                    else:
                        stale += 1
                self.history.append(row)
                if callback is not None:
                    callback(dict(row))
                if val is not None and cfg.patience is not None and stale >= cfg.patience:
                    break
        if best_state is not None:
            with torch.no_grad():
                for name, t in p.items():
                    t.copy_(best_state[name])
        elif val is None:
            self.best_epoch = self.epochs_run
        self.params_ = {name: t.detach() for name, t in p.items()}
        self.train_seconds = train_time
        self.updates_per_second = n * self.epochs_run / train_time if train_time > 0 else 0.0
        return self

    def _batch_loss(self, p, us, pos, sampler, score_fn, gen, warp_table) -> torch.Tensor:
        cfg = self.config
        s_pos = self._score(p, us, pos)
        b = us.numel()
        if cfg.loss == "warp":
            neg = sampler.sample(us, 1, pos_scores=s_pos.detach(), score_fn=score_fn, generator=gen)
            s_neg = self._score(p, us, neg.items[:, 0])
            weight = warp_table[neg.trials[:, 0]] * neg.valid[:, 0]
            loss = (weight * F.relu(1.0 - s_pos + s_neg)).sum() / b
        else:
            neg = sampler.sample(us, cfg.negative_count, score_fn=score_fn, generator=gen)
            s_neg = self._score(p, us, neg.items)
            valid = neg.valid.to(s_neg.dtype)
            if cfg.loss == "pairwise":
                loss = (F.softplus(s_neg - s_pos.unsqueeze(1)) * valid).sum() / b
            else:
                loss = (cfg.positive_weight * F.softplus(-s_pos).sum()
                        + (F.softplus(s_neg) * valid).sum()) / b
        if cfg.reg_method == "L2" and cfg.regularization > 0:
            sq = p["user_embedding"][us].square().sum() + p["item_embedding"][pos].square().sum()
            sq = sq + p["item_embedding"][neg.items].square().sum()
            loss = loss + cfg.regularization * sq / b
        return loss

    def _validation_pairs(self, validation: pl.DataFrame) -> tuple[torch.Tensor, pl.DataFrame]:
        pairs = interactions(validation, self.config.min_rating, what="validation")
        rows = self.users_.lookup(pairs["user_id"])
        pairs = pairs.filter(pl.Series(rows >= 0))
        users = np.unique(self.users_.lookup(pairs["user_id"]))
        return torch.from_numpy(users).to(self.device), pairs

    def _validation_ndcg(self, rows: torch.Tensor, truth: pl.DataFrame) -> float:
        from flexmf_assets.evaluation.topn import topn_metrics

        k = self.config.eval_k
        with torch.no_grad():
            recs = self._recommend_rows(rows, k, True, 1024)
        if recs.height == 0 or truth.height == 0:
            return 0.0
        return topn_metrics(recs, truth, ks=(k,)).means[f"ndcg@{k}"]

    # ------------------------------------------------------------------------------------------
    # scoring API
    # ------------------------------------------------------------------------------------------

    def _require_fitted(self) -> None:
        if self.users_ is None or self.items_ is None or not self.params_:
            raise DataValidationError("FlexMFImplicitScorer: call fit() or load() before scoring")

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Scores of aligned ``users``/``items`` (logits; higher = more likely); NaN for unknown ids."""
        self._require_fitted()
        u = self.users_.lookup(users)
        i = self.items_.lookup(items)
        if len(u) != len(i):
            raise DataValidationError(f"predict: {len(u)} users but {len(i)} items")
        ok = (u >= 0) & (i >= 0)
        out = np.full(len(u), np.nan, dtype=np.float32)
        if ok.any():
            ut = torch.from_numpy(u[ok]).to(self.device)
            it = torch.from_numpy(i[ok]).to(self.device)
            with torch.no_grad():
                out[ok] = self._score(self.params_, ut, it).cpu().numpy()
        return out

    def predict_frame(self, df: pl.DataFrame) -> pl.DataFrame:
        """``df`` with a Float32 ``prediction`` column (the model's score) added."""
        pred = self.predict(df["user_id"], df["item_id"])
        return df.with_columns(pl.Series("prediction", pred, dtype=pl.Float32))

    def recommend(
        self,
        users: Any = None,
        n: int = 20,
        exclude_seen: bool = True,
        batch_size: int = 1024,
    ) -> pl.DataFrame:
        """Top-``n`` items per user as ``user_id, item_id, score, rank`` (rank 1 = best).

        ``users=None`` recommends for every training user. Unknown users get the items with the
        highest item bias. Items the user interacted with in training are excluded by default.
        """
        self._require_fitted()
        if users is None:
            rows = np.arange(len(self.users_), dtype=np.int64)
            raw = self.users_.ids
        else:
            raw = users.to_numpy() if isinstance(users, pl.Series) else np.asarray(list(users))
            rows = self.users_.lookup(raw)
        recs = self._recommend_rows(torch.from_numpy(rows).to(self.device), n, exclude_seen, batch_size)
        upos = recs["_pos"].to_numpy()
        return recs.select(
            pl.Series("user_id", np.asarray(raw)[upos]),
            "item_id", "score", "rank",
        )

    def _recommend_rows(self, rows: torch.Tensor, n: int, exclude_seen: bool, batch_size: int) -> pl.DataFrame:
        upos, irow, score, rank = recommend_in_batches(
            self._score_all, rows, n, len(self.items_), self.seen_ if exclude_seen else None, batch_size
        )
        user_ids = self.users_.ids[np.clip(rows.cpu().numpy()[upos], 0, None)]
        return pl.DataFrame(
            {
                "_pos": upos,
                "user_id": user_ids,
                "item_id": self.items_.ids[irow],
                "score": score.astype(np.float32),
                "rank": rank.astype(np.int32),
            }
        )

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model directory atomically (safetensors + JSON; no pickle)."""
        self._require_fitted()
        tensors = dict(self.params_)
        meta: dict[str, Any] = {"kind": KIND, "device": str(self.device), "eval_k": self.config.eval_k}
        for name, index in (("user", self.users_), ("item", self.items_)):
            t, m = index.to_state(name)
            tensors.update(t)
            meta.update(m)
        tensors["seen_indptr"] = self.seen_.indptr
        tensors["seen_indices"] = self.seen_.indices
        meta.update(
            history=self.history, epochs_run=self.epochs_run, best_epoch=self.best_epoch,
            train_seconds=self.train_seconds, updates_per_second=self.updates_per_second,
        )
        return save_model_dir(path, tensors, self.config.to_dict(), meta)

    @classmethod
    def load(
        cls, path: str | os.PathLike, device: DeviceSettings | str | torch.device | None = None
    ) -> "FlexMFImplicitScorer":
        """Read a directory written by :meth:`save` onto ``device``."""
        dev = resolve_device(device)
        tensors, config, meta = load_model_dir(path, dev, kind=KIND)
        model = cls(FlexMFImplicitConfig.from_dict(config, where=f"{path}/config.json"), device=dev)
        model.users_ = IdIndex.from_state("user", tensors, meta)
        model.items_ = IdIndex.from_state("item", tensors, meta)
        model.seen_ = SeenItems(tensors["seen_indptr"], tensors["seen_indices"])
        names = ("user_embedding", "item_embedding", "user_bias", "item_bias")
        model.params_ = {n: tensors[n] for n in names if n in tensors}
        model.history = list(meta.get("history", []))
        model.epochs_run = int(meta.get("epochs_run", 0))
        model.best_epoch = meta.get("best_epoch")
        model.train_seconds = float(meta.get("train_seconds", 0.0))
        model.updates_per_second = float(meta.get("updates_per_second", 0.0))
        return model


__all__ = ["FlexMFImplicitScorer", "interactions"]
