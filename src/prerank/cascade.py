"""A simulated cascade on logged data: requests, retrieval, the ranking teacher, pre-ranking and
exposure passes, written as one columnar (parquet) file of full-stage samples.

Public datasets hold one stage (interactions). Following the design notes §6.6 ([I]), for each
request — a user at a point in time — `build_cascade`:

1. retrieves the top `retrieval_size` (N0) catalogue items with a retriever that saw only the
   train split (item co-occurrence, or a trained two-tower checkpoint), excluding the items of the
   request's behaviour sequence, and adds `random_items` uniform catalogue items;
2. adds the items the user really interacted with in the request's window;
3. scores every candidate with the ranking teacher (a trained `is_ranker` model, e.g. `din`);
4. marks the pre-ranking pass (teacher top `prerank_size` (N1) of the retrieved items) and the
   exposure pass (teacher top `exposure_size` (N2) of those, plus the real interactions).

Each (request, item) row carries its furthest `stage` (STAGES), the teacher's `teacher_score`
(logit), its graded `relevance` and the real `grade`/`label` where the user interacted.

Requests (leakage-free under the `temporal` protocol): each split's events of one user, in time
order, are cut into windows of `window` consecutive events counted from the most recent; the most
recent `train_requests_per_user` windows of the train split and `eval_requests_per_user` windows of
validation and test each form one request. The request's user features are those of its first
event (the behaviour sequence holds only positives strictly before it); its real interactions are
the window's events. Retriever and teacher are trained on the train split only, so validation and
test requests see nothing of their own future. (Train requests are, like every train row, also
seen by the teacher and the co-occurrence retriever in training.)

Graded relevance (`relevance_by_grade`, ML-1M stars): 5 -> 4, 4 -> 3, rated <= 3 -> 2; exposed
but not interacted -> 1; everything else 0. Without grades (-1), positive labels get the top
level and negative ones the lowest interacted level.

Readers: `load_cascade(path)` -> `Cascade`; `Cascade.lists(split)` gives padded per-request
arrays, what listwise training and evaluation (`prerank.train.listwise`) take.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from prerank.atomic import atomic_path
from prerank.config import NonNegativeInt, PositiveInt, Seed, config_dataclass
from prerank.data.schema import FIRST_KNOWN_INDEX, PAD_INDEX
from prerank.data.table import GRADE, ITEM_ROW, LABEL, TIMESTAMP, DataError, PreparedData, SampleTable
from prerank.models.base import PreRankModel
from prerank.models.scoring import item_table, score_requests

SPLITS = ("train", "valid", "test")
# Furthest stage reached, in cascade order.
RANDOM, RETRIEVED, PRERANKED, EXPOSED = 0, 1, 2, 3
STAGES = {"random": RANDOM, "retrieved": RETRIEVED, "preranked": PRERANKED, "exposed": EXPOSED}
FORMAT_VERSION = 1


@config_dataclass
class CascadeConfig:
    retriever: Literal["itemcf", "model"] = "itemcf"  # "model": a trained decoupled model (two-tower)
    retrieval_size: PositiveInt = 500  # N0
    random_items: NonNegativeInt = 50
    prerank_size: PositiveInt = 100  # N1: teacher top-N1 of the retrieved items pass pre-ranking
    exposure_size: PositiveInt = 10  # N2: teacher top-N2 of those are exposed (plus the real interactions)
    window: PositiveInt = 20  # events per request
    train_requests_per_user: PositiveInt = 2
    eval_requests_per_user: PositiveInt = 1
    # relevance of an interacted item by grade 1..5 (ML-1M stars), and of an exposed, unrated one
    relevance_by_grade: Annotated[tuple[NonNegativeInt, ...], Field(min_length=1)] = (2, 2, 2, 3, 4)
    exposed_relevance: NonNegativeInt = 1
    max_users: PositiveInt | None = None  # a seeded sample of users (None: all), for quick builds
    seed: Seed = 2022
    requests_per_scoring_batch: PositiveInt = 8

    def __post_init__(self) -> None:
        if not (self.exposure_size <= self.prerank_size <= self.retrieval_size):
            raise ValueError("cascade sizes must satisfy exposure_size <= prerank_size <= retrieval_size, got "
                             f"{self.exposure_size}, {self.prerank_size}, {self.retrieval_size}")


@dataclass
class Requests:
    split: str
    source_rows: np.ndarray  # [R] row of the split's sample table giving the user features
    truth_rows: list[np.ndarray]  # per request, the split rows of its real interactions


def form_requests(table: SampleTable, user_column: str, split: str, window: int, per_user: int) -> Requests:
    """Windows of `window` events per user (most recent first), the last `per_user` of them."""
    user, ts = table[user_column], table[TIMESTAMP]
    n = len(user)
    if n == 0:
        return Requests(split, np.zeros(0, np.int64), [])
    # Rows come sorted by (raw user, time): a new user starts where the id changes or time goes back
    # (unseen users share the OOV id).
    new = np.r_[True, (user[1:] != user[:-1]) | (ts[1:] < ts[:-1])]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], n]
    sources, truths = [], []
    for lo, hi in zip(starts, ends):
        for k in range(per_user):
            w_hi = hi - k * window
            if w_hi <= lo:
                break
            w_lo = max(lo, w_hi - window)
            sources.append(w_lo)
            truths.append(np.arange(w_lo, w_hi))
    return Requests(split, np.asarray(sources, np.int64), truths)


def _catalogue_row_of_index(data: PreparedData) -> np.ndarray:
    """Vocabulary index of the item id -> catalogue row (-1: padding, OOV or unknown)."""
    item_ids = data.items[data.schema.item_id]
    lookup = np.full(data.schema[data.schema.item_id].vocab_size, -1, np.int64)
    known = np.flatnonzero(item_ids >= FIRST_KNOWN_INDEX)
    lookup[item_ids[known]] = known
    return lookup


def history_rows(data: PreparedData, users: SampleTable) -> list[np.ndarray]:
    seq = data.schema.sequence_feature
    if seq is None:
        return [np.zeros(0, np.int64) for _ in range(len(users))]
    lookup = _catalogue_row_of_index(data)
    hist = users[seq.name]
    rows = np.where(hist > PAD_INDEX, lookup[np.clip(hist, 0, len(lookup) - 1)], -1)
    return [r[r >= 0] for r in rows]


class ItemCF:
    """Item co-occurrence retriever over the train split's positives: cosine-normalised counts."""

    def __init__(self, data: PreparedData) -> None:
        import scipy.sparse as sp

        train = data.train
        positive = train[LABEL] > 0
        n_items = len(data.item_raw_ids)
        _, user_code = np.unique(train[data.schema.user_id][positive], return_inverse=True)
        x = sp.csr_matrix((np.ones(positive.sum(), np.float32), (user_code, train[ITEM_ROW][positive])),
                          shape=(user_code.max() + 1 if len(user_code) else 0, n_items))
        x.data[:] = 1.0
        counts = np.asarray(x.sum(0)).reshape(-1)
        co = (x.T @ x).toarray()
        np.fill_diagonal(co, 0.0)
        norm = np.sqrt(np.maximum(counts, 1.0))
        self.similarity = (co / norm[:, None] / norm[None, :]).astype(np.float32)
        # Ties (e.g. an empty history) are broken by popularity.
        self.prior = (1e-6 * counts / max(counts.max(), 1.0)).astype(np.float32)

    def scores(self, histories: list[np.ndarray], users: SampleTable) -> np.ndarray:
        out = np.tile(self.prior, (len(histories), 1))
        for r, hist in enumerate(histories):
            if len(hist):
                out[r] += self.similarity[hist].sum(0)
        return out


class ModelRetriever:
    """Retrieval with a trained decoupled model (e.g. two-tower): all catalogue items scored."""

    def __init__(self, model: PreRankModel, data: PreparedData) -> None:
        if not model.decoupled:
            raise ValueError(f"retriever model {model.name!r} is not decoupled; use a two-tower-like model")
        self.model = model.eval()
        self.table = item_table(model, data.items.to_tensors())

    def scores(self, histories: list[np.ndarray], users: SampleTable) -> np.ndarray:
        return score_requests(self.model, self.table, users.to_tensors(), batch_size=len(users) or 1)


@dataclass
class Cascade:
    """Full-stage samples: one row per (request, item); `meta` records how they were built."""

    columns: dict[str, np.ndarray]
    meta: dict = field(default_factory=dict)

    def lists(self, split: str) -> CascadeLists:
        code = SPLITS.index(split)
        keep = np.flatnonzero(self.columns["split"] == code)
        cols = {k: v[keep] for k, v in self.columns.items()}
        request = cols["request"]
        uniq, start, length = np.unique(request, return_index=True, return_counts=True)
        width = int(length.max()) if len(length) else 0
        pos = np.arange(len(request)) - np.repeat(start, length)
        row = np.repeat(np.arange(len(uniq)), length)

        def pad(values, fill, dtype):
            out = np.full((len(uniq), width), fill, dtype)
            out[row, pos] = values
            return out

        return CascadeLists(
            split=split,
            source_rows=cols["source_row"][start].astype(np.int64),
            item_rows=pad(cols[ITEM_ROW], 0, np.int64),
            mask=pad(np.ones(len(request), bool), False, bool),
            stage=pad(cols["stage"], -1, np.int64),
            teacher=pad(cols["teacher_score"], 0.0, np.float32),
            relevance=pad(cols["relevance"], 0, np.int64),
            label=pad(cols[LABEL], -1, np.int64),
        )

    def summary(self) -> dict:
        out = {"rows": int(len(self.columns["request"]))}
        for code, split in enumerate(SPLITS):
            sel = self.columns["split"] == code
            out[f"{split}_requests"] = int(len(np.unique(self.columns["request"][sel])))
            out[f"{split}_rows_by_stage"] = {name: int((self.columns["stage"][sel] == s).sum()) for name, s in STAGES.items()}
        return out


@dataclass
class CascadeLists:
    """One split's requests as padded arrays [R, N] (padding: mask False, stage -1)."""

    split: str
    source_rows: np.ndarray  # [R] rows of the split's sample table: the request's user features
    item_rows: np.ndarray  # [R, N] catalogue rows
    mask: np.ndarray
    stage: np.ndarray
    teacher: np.ndarray
    relevance: np.ndarray
    label: np.ndarray  # real label of interacted items, -1 otherwise

    def __len__(self) -> int:
        return len(self.source_rows)


def _relevance(grade: np.ndarray, label: np.ndarray, config: CascadeConfig) -> np.ndarray:
    levels = np.asarray(config.relevance_by_grade)
    graded = levels[np.clip(grade, 1, len(levels)) - 1]
    ungraded = np.where(label > 0, levels.max(), levels.min())
    return np.where(grade >= 1, graded, ungraded)


def _teacher_scores(teacher: PreRankModel, table: dict, users: SampleTable, candidates: np.ndarray, batch: int) -> np.ndarray:
    return score_requests(teacher, table, users.to_tensors(), candidates, batch_size=batch)


def build_cascade(data: PreparedData, teacher: PreRankModel, config: CascadeConfig | None = None,
                  retriever_model: PreRankModel | None = None, progress=None) -> Cascade:
    """Simulate the cascade for every request of every split (see the module docstring)."""
    config = config or CascadeConfig()
    if not teacher.is_ranker:
        raise ValueError(f"teacher {teacher.name!r} is not a ranker (is_ranker = False); train one with `--model din`")
    if config.retriever == "model" and retriever_model is None:
        raise ValueError("retriever 'model' needs a trained retriever model (e.g. a two-tower checkpoint)")
    say = progress or (lambda message: None)
    started = time.perf_counter()
    rng = np.random.default_rng(config.seed)
    teacher = teacher.eval()
    n_items = len(data.item_raw_ids)
    retriever = ItemCF(data) if config.retriever == "itemcf" else ModelRetriever(retriever_model, data)
    teacher_table = item_table(teacher, data.items.to_tensors())
    n0 = min(config.retrieval_size, n_items)
    width = n0 + config.random_items + config.window
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("request", "split", "source_row", "user", TIMESTAMP, ITEM_ROW,
                                                       "stage", "teacher_score", "relevance", GRADE, LABEL)}
    users_kept = None
    if config.max_users is not None:
        all_users = np.unique(data.train[data.schema.user_id])
        users_kept = np.sort(rng.choice(all_users, size=min(config.max_users, len(all_users)), replace=False))
    request_id = 0
    for code, split in enumerate(SPLITS):
        table = data.splits[split]
        per_user = config.train_requests_per_user if split == "train" else config.eval_requests_per_user
        requests = form_requests(table, data.schema.user_id, split, config.window, per_user)
        if users_kept is not None:
            keep = np.flatnonzero(np.isin(table[data.schema.user_id][requests.source_rows], users_kept))
            requests = Requests(split, requests.source_rows[keep], [requests.truth_rows[i] for i in keep])
        say(f"{split}: {len(requests.source_rows)} requests")
        for lo in range(0, len(requests.source_rows), 256):
            sources = requests.source_rows[lo : lo + 256]
            users = table.subset(sources)
            histories = history_rows(data, users)
            retrieval_scores = retriever.scores(histories, users)
            for r, hist in enumerate(histories):
                retrieval_scores[r, hist] = -np.inf
            retrieved = np.argpartition(-retrieval_scores, n0 - 1, axis=1)[:, :n0]
            candidates = np.zeros((len(sources), width), np.int64)
            stage = np.full((len(sources), width), -1, np.int64)
            grade = np.full((len(sources), width), -1, np.int64)
            label = np.full((len(sources), width), -1, np.int64)
            for r in range(len(sources)):
                truth = requests.truth_rows[lo + r]
                truth_items = table[ITEM_ROW][truth].astype(np.int64)
                pool = np.setdiff1d(np.arange(n_items), retrieved[r], assume_unique=True)
                randoms = rng.choice(pool, size=min(config.random_items, len(pool)), replace=False)
                items = np.r_[retrieved[r], randoms]
                item_stage = np.r_[np.full(n0, RETRIEVED), np.full(len(randoms), RANDOM)]
                # Real interactions join the list (a repeated item keeps its latest event).
                position = {item: i for i, item in enumerate(items.tolist())}
                item_grade = np.full(len(items), -1, np.int64)
                item_label = np.full(len(items), -1, np.int64)
                extra_items, extra_grade, extra_label = [], [], []
                for item, g, y in zip(truth_items.tolist(), table[GRADE][truth].tolist(), table[LABEL][truth].tolist()):
                    if item in position and position[item] < len(items):
                        item_grade[position[item]], item_label[position[item]] = g, int(y)
                    elif item in position:
                        extra_grade[position[item] - len(items)], extra_label[position[item] - len(items)] = g, int(y)
                    else:
                        position[item] = len(items) + len(extra_items)
                        extra_items.append(item)
                        extra_grade.append(g)
                        extra_label.append(int(y))
                m = len(items) + len(extra_items)
                candidates[r, :m] = np.r_[items, extra_items]
                stage[r, :m] = np.r_[item_stage, np.full(len(extra_items), EXPOSED)]
                grade[r, :m] = np.r_[item_grade, extra_grade]
                label[r, :m] = np.r_[item_label, extra_label]
            teacher_scores = _teacher_scores(teacher, teacher_table, users, candidates, config.requests_per_scoring_batch)
            # Pre-ranking and exposure passes: the teacher's order over what retrieval returned.
            ranked = np.where(stage == RETRIEVED, teacher_scores, -np.inf)
            order = np.argsort(-ranked, axis=1, kind="stable")
            rank = np.empty_like(order)
            np.put_along_axis(rank, order, np.arange(width)[None, :].repeat(len(sources), 0), axis=1)
            retrieved_mask = stage == RETRIEVED
            stage = np.where(retrieved_mask & (rank < config.prerank_size), PRERANKED, stage)
            stage = np.where(retrieved_mask & (rank < config.exposure_size), EXPOSED, stage)
            interacted = label >= 0
            stage = np.where(interacted, EXPOSED, stage)
            relevance = np.where(interacted, _relevance(grade, label, config), np.where(stage == EXPOSED, config.exposed_relevance, 0))
            valid = stage >= 0
            counts = valid.sum(1)
            out["request"].append(np.repeat(request_id + np.arange(len(sources)), counts))
            out["split"].append(np.full(counts.sum(), code, np.int8))
            out["source_row"].append(np.repeat(sources, counts))
            out["user"].append(np.repeat(users[data.schema.user_id], counts))
            out[TIMESTAMP].append(np.repeat(users[TIMESTAMP], counts))
            out[ITEM_ROW].append(candidates[valid])
            out["stage"].append(stage[valid])
            out["teacher_score"].append(teacher_scores[valid])
            out["relevance"].append(relevance[valid])
            out[GRADE].append(grade[valid])
            out[LABEL].append(label[valid])
            request_id += len(sources)
            say(f"{split}: {lo + len(sources)}/{len(requests.source_rows)} requests ({time.perf_counter() - started:.0f} s)")
    dtypes = {"request": np.int32, "split": np.int8, "source_row": np.int32, "user": np.int32, TIMESTAMP: np.int64,
              ITEM_ROW: np.int32, "stage": np.int8, "teacher_score": np.float32, "relevance": np.int8, GRADE: np.int8, LABEL: np.int8}
    columns = {k: np.concatenate(v).astype(dtypes[k]) if v else np.zeros(0, dtypes[k]) for k, v in out.items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "config": asdict(config),
        "stages": STAGES,
        "teacher": teacher.name,
        "retriever": config.retriever if retriever_model is None else f"model:{retriever_model.name}",
        "dataset": data.meta.get("dataset"),
        "dataset_label": data.meta.get("dataset_label"),
        "protocol": data.meta.get("protocol"),
        "catalogue_items": n_items,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Cascade(columns, meta)


def save_cascade(cascade: Cascade, path: Path) -> None:
    """Parquet, written to a temporary sibling and renamed; `meta` goes in the file's metadata."""
    table = pa.table(cascade.columns).replace_schema_metadata({"prerank.cascade": json.dumps(cascade.meta)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def check_cascade_matches(cascade: Cascade, data: PreparedData) -> None:
    """A cascade indexes the catalogue and the split tables of the data it was built on."""
    built_on = (cascade.meta.get("dataset"), cascade.meta.get("protocol"), cascade.meta.get("catalogue_items"))
    here = (data.meta.get("dataset"), data.meta.get("protocol"), len(data.item_raw_ids))
    if built_on != here:
        raise DataError(f"the cascade was built on (dataset, protocol, items) = {built_on}, but the training data are {here}; "
                        "rebuild it with `prerank cascade build` on the same data")


def load_cascade(path: Path) -> Cascade:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: cascade file not found (build one with `prerank cascade build`)")
    table = pq.read_table(path)
    raw = (table.schema.metadata or {}).get(b"prerank.cascade")
    if raw is None:
        raise ValueError(f"{path}: not a prerank cascade file (no 'prerank.cascade' metadata)")
    meta = json.loads(raw)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: unsupported cascade format {meta.get('format_version')!r}")
    return Cascade({name: table.column(name).to_numpy() for name in table.column_names}, meta)
