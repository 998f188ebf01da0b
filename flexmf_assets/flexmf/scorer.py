"""The scorer core both feedback types share: id indexes, seen items, the parameter tables, the epoch
loop, predict and recommend, save and load. A track (:mod:`.explicit`, :mod:`.implicit`) adds what
differs: its configuration, how training pairs are read, the validation metric and the training
strategies (:class:`.training.Strategy`) that update the tables.

Tables: a user row is ``[embedding | user_bias? | 1?]`` and an item row ``[embedding | 1? | item_bias?]``
(the user-bias column meets a constant 1 on the item side and the item-bias column a constant 1 on
the user side), so one gather per side and one dot product give the full score, plus
``score_offset`` (the explicit model's global mean). The constant columns are left out of every
update. One extra, never trained row at the end of each table (zeros, with its constant 1) stands
for "unknown": a user or item unseen in training scores by the other side's bias alone.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import polars as pl
import torch

from flexmf_assets.errors import ConfigError, DataValidationError
from flexmf_assets.flexmf import _native
from flexmf_assets.flexmf.device import DeviceSettings, resolve_device
from flexmf_assets.flexmf.ids import IdIndex, SeenItems
from flexmf_assets.flexmf.model_files import (
    CONFIG_FILE,
    TENSOR_FILE,
    Fields,
    check_score_range,
    check_tensor_names,
    load_model_dir,
    save_model_dir,
)
from flexmf_assets.flexmf.topn import native_topn, topk_rows
from flexmf_assets.flexmf.training import (
    DivergenceGuard,
    Strategy,
    TrainingData,
    hot_loop_threads,
    make_generator,
    oom_guard,
    requested_threads,
)

#: called with each epoch's record; a callback that returns True stops training after that epoch (the
#: best epoch is kept as with early stopping: a tuner's pruning)
Callback = Callable[[dict[str, Any]], "bool | None"]
Device = DeviceSettings | str | torch.device | None
_PREDICT_CHUNK = 1 << 20


@dataclass(frozen=True)
class TableLayout:
    """The columns of the user and item tables (see the module docstring)."""

    k: int
    user_bias: bool
    item_bias: bool

    @property
    def width(self) -> int:
        return self.k + int(self.user_bias) + int(self.item_bias)

    @property
    def user_bias_col(self) -> int | None:
        return self.k if self.user_bias else None

    @property
    def item_bias_col(self) -> int | None:
        return self.k + int(self.user_bias) if self.item_bias else None

    @property
    def user_const(self) -> int | None:
        """The user table's constant column (it meets the item bias)."""
        return self.item_bias_col

    @property
    def item_const(self) -> int | None:
        """The item table's constant column (it meets the user bias)."""
        return self.user_bias_col

    def table(self, embeddings: torch.Tensor, device: torch.device, *, user_side: bool) -> torch.Tensor:
        """``embeddings`` (``[rows, k]``) as a table: bias columns 0, constant column 1, plus the
        unknown row."""
        table = torch.zeros(embeddings.shape[0] + 1, self.width, device=device)
        table[:-1, : self.k] = embeddings
        const = self.user_const if user_side else self.item_const
        if const is not None:
            table[:, const] = 1.0
        return table


class FlexMFScorer:
    """Train and score matrix factorization; a track subclass fills in the ``_hooks`` below.

    ``Scorer(config=None, *, device=None, **overrides)``: ``config`` is the track's configuration or
    a mapping of its fields; ``overrides`` replace fields. After ``fit`` (or ``load``): ``history``
    (a record per epoch: ``epoch``, ``train_loss``, the validation metric, ``seconds`` of training),
    ``epochs_run``, ``best_epoch``, ``train_seconds`` (all of ``fit``), ``updates_per_second``,
    ``engine`` (the strategy that trained), ``n_users``, ``n_items``, ``users``/``items`` (id
    indexes), ``seen`` and the tables ``user_table``/``item_table``.
    """

    #: set by a track
    config_class: type
    kind: str
    #: the validation metric's key in ``history`` and whether higher is better
    metric: str
    higher_is_better: bool
    #: the strategies a saved model may name as its ``engine``
    engines: tuple[str, ...] = ("native", "torch", "als")
    #: set by ``fit`` or ``load``
    users: IdIndex
    items: IdIndex
    seen: SeenItems
    user_table: torch.Tensor
    item_table: torch.Tensor

    def __init__(self, config: Any = None, *, device: Device = None, **overrides: Any):
        cls = self.config_class
        if config is None or isinstance(config, Mapping):
            self.config = cls.from_dict({**dict(config or {}), **overrides})
        elif isinstance(config, cls):
            self.config = config.replace(**overrides) if overrides else config
        else:
            raise ConfigError(f"config: expected {cls.__name__} or a mapping, got {type(config).__name__}")
        self._device_spec = device
        self.device = resolve_device(device)
        self.history: list[dict[str, Any]] = []
        self.epochs_run = 0
        self.best_epoch: int | None = None
        self.train_seconds = 0.0
        self.updates_per_second = 0.0
        self.engine = "torch"
        self.n_users = self.n_items = 0
        self.score_offset = 0.0

    # ------------------------------------------------------------------------------------------
    # hooks of a track
    # ------------------------------------------------------------------------------------------

    @property
    def layout(self) -> TableLayout:
        raise NotImplementedError

    def _training_pairs(self, train: pl.DataFrame) -> pl.DataFrame:
        """The checked ``user_id, item_id[, rating]`` pairs to train on."""
        raise NotImplementedError

    def _training_data(self, pairs: pl.DataFrame, users: np.ndarray, items: np.ndarray) -> TrainingData:
        """The pairs as table rows on the device (and what the track derives from them)."""
        raise NotImplementedError

    def _initial_embeddings(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``[n_users, k]`` and ``[n_items, k]`` starting embeddings (``generator``: the training
        data's, which a track may draw them from)."""
        raise NotImplementedError

    def _initial_loss(self, data: TrainingData) -> float:
        """The expected mean training loss at initialization (the divergence guard's scale)."""
        raise NotImplementedError

    def _strategy(self) -> Strategy:
        raise NotImplementedError

    def _validation_set(self, frame: pl.DataFrame) -> Any:
        raise NotImplementedError

    def _validation_metric(self, validation: Any) -> float:
        raise NotImplementedError

    def _clamp(self) -> tuple[float, float] | None:
        """The range predictions are clipped to, or None."""
        return None

    def _save_fields(self) -> dict[str, Any]:
        """Track fields of metadata.json."""
        return {}

    def _load_fields(self, meta: Fields) -> None:
        """Read (and check) what :meth:`_save_fields` wrote."""

    def parameters(self) -> dict[str, torch.Tensor]:
        """The named parameter tensors, as saved."""
        raise NotImplementedError

    def _tables_from(self, tensors: dict[str, torch.Tensor], where: Path) -> tuple[torch.Tensor, torch.Tensor, set[str]]:
        """The tables from saved parameter tensors (checked) and the names of those tensors."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def fit(self, train: pl.DataFrame, validation: pl.DataFrame | None = None, *,
            callback: Callback | None = None) -> "FlexMFScorer":
        """Train on ``train``; ``validation`` (if given) is scored after every epoch: the best epoch's
        parameters are kept and ``patience`` epochs without improvement stop training, as does a
        ``callback`` that returns True."""
        t0 = time.perf_counter()
        cfg, dev = self.config, self.device
        pairs = self._training_pairs(train)
        self.users, u_np = IdIndex.fit(pairs["user_id"])
        self.items, i_np = IdIndex.fit(pairs["item_id"])
        self.n_users, self.n_items = len(self.users), len(self.items)
        data = self._training_data(pairs, u_np, i_np)
        self.seen = SeenItems.build(u_np, i_np, self.n_users, dev)
        val = self._validation_set(validation) if validation is not None else None
        data.generator = make_generator(cfg.seed, dev)
        sizes = f"embedding_size={cfg.embedding_size} ({self.n_users} users, {self.n_items} items)"
        with oom_guard(cfg.batch_size, "model allocation", setting=sizes):
            user_emb, item_emb = self._initial_embeddings(data.generator)
            self.user_table = self.layout.table(user_emb, dev, user_side=True)
            self.item_table = self.layout.table(item_emb, dev, user_side=False)
        strategy = self._strategy()
        self.engine = strategy.name
        guard = strategy.guard(self, data)
        self._epochs(strategy, data, val, guard, callback)
        self.train_seconds = time.perf_counter() - t0
        self.updates_per_second = self.epochs_run * len(data) / max(self.train_seconds, 1e-9)
        return self

    def _epochs(self, strategy: Strategy, data: TrainingData, val: Any, guard: DivergenceGuard,
                callback: Callback | None) -> None:
        """The epoch loop: train, check, validate, keep the best state, stop early."""
        cfg, dev = self.config, self.device
        self.history, self.best_epoch, self.epochs_run = [], None, 0
        best, best_state, stale = math.nan, None, 0
        sizes = None if cfg.solver == "sgd" else f"embedding_size={cfg.embedding_size}"  # ALS: no batches
        with oom_guard(cfg.batch_size, setting=sizes), hot_loop_threads(dev, requested_threads(self._device_spec)), \
                torch.no_grad():
            strategy.setup(self, data)
            for epoch in range(1, cfg.epochs + 1):
                e0 = time.perf_counter()
                loss = strategy.epoch(epoch)
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                record: dict[str, Any] = {"epoch": epoch, "train_loss": loss, self.metric: None,
                                          "seconds": time.perf_counter() - e0}
                guard.check(epoch, loss, self.user_table, self.item_table)
                self.epochs_run = epoch
                if val is None:
                    self.best_epoch = epoch
                else:
                    record[self.metric] = metric = self._validation_metric(val)
                    if self._better(metric, best):
                        best, self.best_epoch, stale = metric, epoch, 0
                        best_state = (self.user_table.clone(), self.item_table.clone())
                    else:
                        stale += 1
                self.history.append(record)
                if callback is not None and callback(dict(record)):
                    break
                if val is not None and cfg.patience is not None and stale >= cfg.patience:
                    break
            strategy.finish()
        if best_state is not None and self.best_epoch != self.epochs_run:
            self.user_table, self.item_table = best_state
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def _better(self, metric: float, best: float) -> bool:
        """``metric`` improves on ``best`` (NaN never does; anything beats a NaN best)."""
        if math.isnan(metric):
            return False
        return math.isnan(best) or (metric > best if self.higher_is_better else metric < best)

    # ------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------

    def _require_fit(self) -> None:
        if not hasattr(self, "user_table"):
            raise DataValidationError(f"{type(self).__name__}: call fit() (or load()) before scoring")

    def _rows(self, index: IdIndex, values: Any, unknown: int) -> np.ndarray:
        rows = index.lookup(values)
        rows[rows < 0] = unknown
        return rows

    @torch.no_grad()
    def _predict_rows(self, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        P, Q = self.user_table, self.item_table
        out = torch.empty(len(u), device=P.device)
        for s in range(0, len(u), _PREDICT_CHUNK):
            pu = P.index_select(0, u[s : s + _PREDICT_CHUNK])
            qi = Q.index_select(0, i[s : s + _PREDICT_CHUNK])
            out[s : s + _PREDICT_CHUNK] = (pu * qi).sum(1) + self.score_offset
        clamp = self._clamp()
        if clamp is not None:
            out.clamp_(*clamp)
        return out

    def predict(self, users: Any, items: Any) -> np.ndarray:
        """Scores (float32) of parallel arrays of raw user and item ids.

        An id unseen in training is never an error or NaN: it scores by the other side's bias
        (both unknown: ``score_offset``).
        """
        self._require_fit()
        u = self._rows(self.users, users, self.n_users)
        i = self._rows(self.items, items, self.n_items)
        if len(u) != len(i):
            raise DataValidationError(f"predict: {len(u)} users but {len(i)} items")
        dev = self.user_table.device
        return self._predict_rows(torch.from_numpy(u).to(dev), torch.from_numpy(i).to(dev)).cpu().numpy()

    def predict_frame(self, df: pl.DataFrame) -> pl.DataFrame:
        """``df`` (with ``user_id``, ``item_id``) plus a Float32 ``prediction`` column."""
        pred = self.predict(df["user_id"], df["item_id"])
        return df.with_columns(pl.Series("prediction", pred, dtype=pl.Float32))

    def recommend(self, users: Any = None, n: int = 20, exclude_seen: bool = True,
                  batch_size: int = 1024) -> pl.DataFrame:
        """Top-``n`` items per user: ``user_id, item_id, score, rank`` (rank 1-based).

        ``users=None`` means every training user; an unknown user gets the items of the highest
        item bias. Scores are unclamped; items the user had in training are excluded when
        ``exclude_seen``; equal scores rank the lower item row first. On a CPU with the fused kernels
        (:func:`.topn.native_topn`) users are scored in blocks against item tiles, keeping a bounded
        top-``n`` per user (memory: the outputs plus a packed copy of the item table; ``batch_size``
        is not used); otherwise ``batch_size`` users at a time on the model's device (memory
        ``batch_size x n_items``).
        """
        self._require_fit()
        if users is None:
            raw = self.users.ids
        elif isinstance(users, pl.Series):
            raw = users.to_numpy()
        else:
            raw = np.asarray(users)
            if raw.ndim == 0 and raw.dtype == object:  # a set, a generator, ...
                raw = np.asarray(list(users))
            raw = raw.reshape(-1)
        rows = torch.from_numpy(self.users.lookup(raw)).to(self.user_table.device)
        pos, item_rows, scores, ranks = self._recommend_rows(rows, n, exclude_seen, batch_size)
        return pl.DataFrame({
            "user_id": pl.Series(raw[pos]) if len(pos) else pl.Series(raw[:0]),
            "item_id": pl.Series(self.items.ids[item_rows]) if len(item_rows) else pl.Series(self.items.ids[:0]),
            "score": pl.Series(scores, dtype=pl.Float32),
            "rank": pl.Series(ranks, dtype=pl.Int32),
        })

    def _recommend_rows(self, rows: torch.Tensor, n: int, exclude_seen: bool,
                        batch_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(position in rows, item row, score, rank)`` of the top ``n`` of each user row (-1: unknown)."""
        P = self.user_table
        seen = self.seen if exclude_seen else None
        if _native.usable(P.device):  # the fused kernel: no score block in memory, threads split users
            _check_sizes(n, batch_size)
            return native_topn(P, self.item_table[: self.n_items], rows, n, self.score_offset, seen)
        QT = self.item_table[: self.n_items].T.contiguous()

        def score(batch: torch.Tensor) -> torch.Tensor:
            safe = torch.where(batch >= 0, batch, torch.full_like(batch, self.n_users))
            return (P.index_select(0, safe) @ QT).add_(self.score_offset)

        return recommend_in_batches(score, rows, n, self.n_items, seen, batch_size)

    # ------------------------------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the model to directory ``path`` atomically (safetensors + JSON, no pickle)."""
        self._require_fit()
        tensors = {**self.parameters(), "seen_indptr": self.seen.indptr, "seen_indices": self.seen.indices}
        meta: dict[str, Any] = {"kind": self.kind, "n_users": self.n_users, "n_items": self.n_items,
                                **self._save_fields(), "history": self.history, "epochs_run": self.epochs_run,
                                "best_epoch": self.best_epoch, "train_seconds": self.train_seconds,
                                "updates_per_second": self.updates_per_second, "engine": self.engine,
                                "device": str(self.device)}
        for name, index in (("user", self.users), ("item", self.items)):
            t, m = index.to_state(name)
            tensors.update(t)
            meta.update(m)
        return save_model_dir(path, tensors, self.config.to_dict(), meta)

    @classmethod
    def load(cls, path: str | os.PathLike, device: Device = None) -> "FlexMFScorer":
        """Load a model saved with :meth:`save` onto ``device``.

        Verifies the tensor file's sha256 first, then every field and tensor against the others
        (types, ranges, shapes against the recorded sizes and the config, finite weights, seen items
        within the catalogue): a forged or corrupt file is a one-line :class:`ConfigError` naming it.
        """
        dev = resolve_device(device)
        tensors, config, meta = load_model_dir(path, dev, kind=cls.kind)
        tensor_file = Path(path) / TENSOR_FILE
        self = cls(cls.config_class.from_dict(config, where=f"{Path(path) / CONFIG_FILE}"), device=dev)
        # models of the first implicit format recorded no sizes: their ids give them
        sizes = [meta.integer(f, lo=1) if f in meta.data else None for f in ("n_users", "n_items")]
        self.users = IdIndex.from_state("user", tensors, meta, tensor_file, sizes[0])
        self.items = IdIndex.from_state("item", tensors, meta, tensor_file, sizes[1])
        self.n_users, self.n_items = len(self.users), len(self.items)
        if not self.n_users or not self.n_items:
            raise ConfigError(f"{tensor_file}: a model without users or items ({self.n_users} users, "
                              f"{self.n_items} items)")
        self.user_table, self.item_table, names = self._tables_from(tensors, tensor_file)
        self.seen = SeenItems.from_state(tensors, self.n_users, self.n_items, tensor_file)
        check_tensor_names(tensors, {*names, "seen_indptr", "seen_indices", "user_ids", "item_ids"}, tensor_file)
        self._load_fields(meta)
        check_score_range(self.user_table, self.item_table, tensor_file, extra=abs(self.score_offset))
        self._load_common_fields(meta)
        return self

    def _load_common_fields(self, meta: Fields) -> None:
        self.history = meta.history()
        self.epochs_run = meta.integer("epochs_run", default=0)
        self.best_epoch = meta.integer("best_epoch", lo=1, hi=self.epochs_run, default=None, optional=True)
        self.train_seconds = meta.number("train_seconds", lo=0, default=0.0)
        self.updates_per_second = meta.number("updates_per_second", lo=0, default=0.0)
        self.engine = meta.choice("engine", self.engines, default="torch")


def _check_sizes(n: int, batch_size: int) -> None:
    for name, value in (("n", n), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")


def recommend_in_batches(
    score_batch: Callable[[torch.Tensor], torch.Tensor],
    user_rows: torch.Tensor,
    n: int,
    n_items: int,
    seen: SeenItems | None,
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Top-``n`` items for every user row, scored ``batch_size`` users at a time.

    ``score_batch(rows)`` returns a float ``(len(rows), n_items)`` tensor (rows may be ``-1`` for
    users unknown to the model). Seen items (when ``seen`` is given) get ``-inf`` and are dropped,
    so a user may receive fewer than ``n`` rows. Returns numpy arrays ``(batch position in
    user_rows, item row, score, rank)``, rank 1-based, ordered by user then rank.
    """
    _check_sizes(n, batch_size)
    k = min(n, n_items)
    out_u, out_i, out_s, out_r = [], [], [], []
    if k == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32), empty
    ranks = torch.arange(1, k + 1, device=user_rows.device).expand(min(batch_size, len(user_rows)), k)
    with oom_guard(batch_size, "recommendation"), torch.no_grad():
        for start in range(0, len(user_rows), batch_size):
            rows = user_rows[start : start + batch_size]
            scores = score_batch(rows)
            if seen is not None:
                pos, items = seen.pairs(rows)
                scores[pos, items] = float("-inf")
            top_s, top_i = topk_rows(scores, k)
            keep = torch.isfinite(top_s)
            upos = torch.arange(start, start + len(rows), device=rows.device).unsqueeze(1).expand(-1, k)
            out_u.append(upos[keep].cpu())
            out_i.append(top_i[keep].cpu())
            out_s.append(top_s[keep].cpu())
            out_r.append(ranks[: len(rows)][keep].cpu())
    cat = lambda xs: torch.cat(xs).numpy()  # noqa: E731
    return cat(out_u), cat(out_i), cat(out_s), cat(out_r)


__all__ = ["FlexMFScorer", "TableLayout", "recommend_in_batches"]
