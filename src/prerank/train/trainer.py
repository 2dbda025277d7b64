"""The training loop: plain PyTorch, written out so every step is visible.

Adam over shuffled mini-batches of a tensorised sample table; the loss is the model's pointwise
BCE plus whatever auxiliary losses its `forward` returns; early stopping on validation AUC with
the best weights kept; seeded and deterministic on CPU. Under `torchrun` the same loop runs
data-parallel (see `prerank.train.distributed`): `batch_size` stays the global batch, each rank
steps on its shard through DDP, validation predictions are gathered from every rank, and only
rank 0 writes files and progress.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from prerank.config import NonEmptyStr, NonNegativeFloat, PositiveFloat, PositiveInt, Seed, config_dataclass
from prerank.data.table import LABEL, SampleTable
from prerank.metrics import auc, pointwise_report
from prerank.models.base import PreRankModel
from prerank.train import distributed
from prerank.models.checkpoint import atomic_torch_save, save_checkpoint


EvalCandidates = Annotated[str, Field(pattern=r"^(dataset|full|sampled(:[1-9][0-9]*)?|none)$")]


# The per-epoch resume state a run writes in its output folder (`Trainer.run_epochs`).
RESUME_FILE = "resume.pt"


@config_dataclass
class TrainConfig:
    epochs: PositiveInt = 10
    batch_size: PositiveInt = 2048
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    patience: PositiveInt = 3  # epochs without a better validation AUC before stopping
    seed: Seed = 2022
    device: NonEmptyStr = "cpu"
    eval_batch_size: PositiveInt = 16384
    num_threads: PositiveInt | None = None
    progress: bool = True
    max_grad_norm: PositiveFloat | None = None
    # Top-K evaluation of implicit datasets (train/ranking.py, `ranking_candidates`): "dataset"
    # keeps the dataset's own candidate sets (the full catalogue and 100 sampled items).
    eval_candidates: EvalCandidates = "dataset"
    # Continue from the resume state (`RESUME_FILE`) a run left in its output folder; every epoch
    # writes one, so an interrupted run ends as the uninterrupted one would have.
    resume: bool = False


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    valid_auc: float
    seconds: float  # wall clock of the epoch's training steps
    rows_per_second: float  # examples (rows or lists) per wall-clock second
    aux_losses: dict = field(default_factory=dict)
    # CPU time of the process (all its threads) over the same steps: the cost, free of the time a
    # busy machine kept the run descheduled, which inflates the wall clock.
    cpu_seconds: float = 0.0


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)


def model_columns(model: PreRankModel) -> list[str]:
    return [f.name for f in model.schema.features]


def to_device_tensors(table: SampleTable, columns: list[str], device: torch.device) -> dict[str, Tensor]:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ValueError(f"sample table lacks columns the model's schema needs: {missing}")
    tensors = SampleTable({c: table[c] for c in columns}).to_tensors()
    return {k: v.to(device) for k, v in tensors.items()}


def iterate_batches(tensors: dict[str, Tensor], batch_size: int, generator: torch.Generator | None = None,
                    shard: distributed.Context | None = None):
    """Mini-batches by index selection on whole-table tensors (no per-row Python work); with
    `shard`, only that rank's share of the (shuffled) order."""
    n = len(next(iter(tensors.values())))
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    if shard is not None:
        order = distributed.shard_order(order, shard)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size].to(next(iter(tensors.values())).device)
        yield {k: v.index_select(0, rows) for k, v in tensors.items()}


def predict_gathered(model: PreRankModel, table: SampleTable, batch_size: int = 16384, device: str | torch.device = "cpu") -> np.ndarray:
    """`predict_table` split across the ranks of a process group and gathered (every rank gets
    all rows, in row order); plain `predict_table` without one. Collective: call on every rank."""
    ctx = distributed.context()
    if not ctx.enabled:
        return predict_table(model, table, batch_size, device)
    distributed.broadcast_buffers(model, ctx)
    local = predict_table(model, table.subset(distributed.eval_rows(len(table), ctx)), batch_size, device)
    return distributed.gather_predictions(local, len(table), ctx, torch.device(device))


@torch.no_grad()
def predict_table(model: PreRankModel, table: SampleTable, batch_size: int = 16384, device: str | torch.device = "cpu") -> np.ndarray:
    """Pointwise probabilities for every row of `table`, in row order."""
    was_training = model.training
    model.eval()
    tensors = to_device_tensors(table, model_columns(model), torch.device(device))
    out = [model.predict(batch).cpu() for batch in iterate_batches(tensors, batch_size)]
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def evaluate(model: PreRankModel, table: SampleTable, batch_size: int = 16384, device: str | torch.device = "cpu") -> dict:
    """Metrics on the whole table (under torchrun: predictions gathered from every rank)."""
    probabilities = predict_gathered(model, table, batch_size, device)
    return pointwise_report(table[LABEL], probabilities, table[model.schema.user_id])


def fit_plan(model: PreRankModel, fit_phase: Callable[[Path | None], "Trainer"], out_dir: Path | None = None) -> list["Trainer"]:
    """Run the model's training plan: each phase of `model.training_phases()` in order, inside
    `model.training_phase(phase)` (only its parameters train), as `fit_phase(phase_dir)`, which
    builds, fits and returns a trainer. One phase writes to `out_dir`; several write to
    OUT/phase<i>_<name>/. Returns the phases' trainers."""
    phases = model.training_phases()
    trainers = []
    for i, phase in enumerate(phases, 1):
        phase_dir = out_dir if out_dir is None or len(phases) == 1 else Path(out_dir) / f"phase{i}_{phase.name}"
        with model.training_phase(phase):
            trainers.append(fit_phase(phase_dir))
    return trainers


class Trainer:
    """Pointwise training (`fit`); `run_epochs` is the loop every trainer shares."""

    metric_name = "valid AUC"

    def __init__(self, model: PreRankModel, config: TrainConfig) -> None:
        self.model = model
        self.network: torch.nn.Module = model  # what training steps call: DDP over `model` under torchrun
        self.config = config
        self.device = torch.device(config.device)
        self.history: list[EpochLog] = []
        self.best_epoch = 0
        self.best_valid = -math.inf  # the early-stopping metric of the best epoch (`metric_name`)
        # What OUT/history.json says about the data beside the epochs (e.g. that its protocol leaks labels).
        self.history_context: dict = {}

    @property
    def best_valid_auc(self) -> float:
        return self.best_valid

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        output = self.network(batch)
        bce = F.binary_cross_entropy_with_logits(output.logits.reshape(-1), batch[LABEL])
        return bce + sum(output.aux_losses.values(), torch.zeros((), device=bce.device)), output.aux_losses

    def prepare(self) -> tuple[distributed.Context, int]:
        """Threads, seed, device and the DDP wrap; returns the process context and this rank's batch size."""
        c = self.config
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        seed_everything(c.seed)
        self.model.to(self.device)
        ctx = distributed.context()
        self.network = distributed.wrap(self.model, self.device, ctx)
        return ctx, distributed.per_rank_batch_size(c.batch_size, ctx)

    def fit(self, train: SampleTable, valid: SampleTable, out_dir: Path | None = None, checkpoint_extra: dict | None = None) -> list[EpochLog]:
        ctx, batch_size = self.prepare()
        train_tensors = to_device_tensors(train, model_columns(self.model) + [LABEL], self.device)

        def save_best(epoch: int, valid_auc: float) -> None:
            if out_dir is not None and ctx.is_main:
                save_checkpoint(Path(out_dir) / "checkpoint.pt", self.model, extra={**(checkpoint_extra or {}), "epoch": epoch, "valid_auc": valid_auc})

        return self.run_epochs(
            lambda generator: iterate_batches(train_tensors, batch_size, generator, ctx),
            math.ceil(len(train) / self.config.batch_size), self.loss, LABEL,
            lambda: auc(valid[LABEL], predict_gathered(self.model, valid, self.config.eval_batch_size, self.device)),
            ctx, on_best=save_best, out_dir=out_dir,
        )

    def run_epochs(self, batches, n_batches: int, loss_fn, count_key: str, validate, ctx: distributed.Context,
                   on_best=None, out_dir: Path | None = None) -> list[EpochLog]:
        """Adam over `batches(generator)` each epoch, early stopping on `validate()` (higher is
        better), best weights restored at the end. `loss_fn(batch)` gives (loss, named terms);
        `count_key` names the batch tensor whose length counts the batch's examples (rows or
        requests) for the logged means; `on_best(epoch, value)` runs when validation improves.

        With `out_dir`, the end of every epoch writes OUT/`RESUME_FILE`: weights, optimizer, the
        batch order's and torch's random states, the best weights so far, early stopping and the
        history. With `config.resume` the loop starts from that file (a finished one returns at once)."""
        c = self.config
        progress = c.progress and ctx.is_main
        optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=c.lr, weight_decay=c.weight_decay)
        generator = torch.Generator().manual_seed(c.seed)
        best_state = copy.deepcopy(self.model.state_dict())
        stale, first_epoch = 0, 1
        resume_path = None if out_dir is None else Path(out_dir) / RESUME_FILE
        if c.resume and resume_path is not None and resume_path.exists():
            saved = torch.load(resume_path, map_location=self.device, weights_only=False)
            self.model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            generator.set_state(saved["generator"])
            torch.set_rng_state(saved["torch_rng"])
            best_state, stale, first_epoch = saved["best_state"], saved["stale"], saved["epoch"] + 1
            self.best_valid, self.best_epoch = saved["best_valid"], saved["best_epoch"]
            self.history = [EpochLog(**h) for h in saved["history"]]
            if ctx.is_main:
                tqdm.write(f"resuming after epoch {saved['epoch']} ({resume_path})")
            if saved["finished"]:
                first_epoch = c.epochs + 1
        for epoch in range(first_epoch, c.epochs + 1):
            self.model.train()
            started, cpu_started = time.perf_counter(), time.process_time()
            total, count, term_totals = 0.0, 0, {}
            bar = tqdm(batches(generator), total=n_batches, disable=not progress, desc=f"epoch {epoch}/{c.epochs}", leave=False, unit="batch")
            for batch in bar:
                loss, terms = loss_fn(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm)
                optimizer.step()
                examples = len(batch[count_key])
                total += loss.item() * examples
                count += examples
                for name, value in terms.items():
                    term_totals[name] = term_totals.get(name, 0.0) + value.item() * examples
                if progress:
                    bar.set_postfix(loss=f"{total / count:.4f}")
            seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
            if ctx.enabled:
                names = sorted(term_totals)
                total, count, *sums = distributed.sum_over_ranks([total, count, *(term_totals[k] for k in names)], ctx, self.device)
                term_totals = dict(zip(names, sums))
            valid_value = validate()
            log = EpochLog(epoch, total / max(count, 1), valid_value, seconds, count / seconds,
                           {k: v / max(count, 1) for k, v in term_totals.items()}, cpu_seconds)
            self.history.append(log)
            if ctx.is_main:  # the epoch line prints whether or not the bars show
                tqdm.write(f"epoch {epoch}: loss {log.train_loss:.4f}  {self.metric_name} {valid_value:.4f}  {seconds:.1f}s "
                           f"(CPU {cpu_seconds:.1f}s)  {log.rows_per_second:,.0f} {'rows' if count_key == LABEL else 'lists'}/s")
            if valid_value > self.best_valid:
                self.best_valid, self.best_epoch, stale = valid_value, epoch, 0
                best_state = copy.deepcopy(self.model.state_dict())
                if on_best is not None:
                    on_best(epoch, valid_value)
            else:
                stale += 1
            finished = stale >= c.patience or epoch == c.epochs
            if resume_path is not None and ctx.is_main:
                atomic_torch_save({"model": self.model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                                   "best_state": best_state, "best_valid": self.best_valid, "best_epoch": self.best_epoch,
                                   "stale": stale, "epoch": epoch, "finished": finished,
                                   "history": [asdict(h) for h in self.history]}, resume_path)
            if finished:
                break
        self.model.load_state_dict(best_state)
        if out_dir is not None and ctx.is_main:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            payload = {**self.history_context, "epochs": [asdict(h) for h in self.history]}
            (Path(out_dir) / "history.json").write_text(json.dumps(payload, indent=2))
        return self.history

    @property
    def seconds_per_epoch(self) -> float:
        return float(np.mean([h.seconds for h in self.history])) if self.history else 0.0

    @property
    def cpu_seconds_per_epoch(self) -> float:
        return float(np.mean([h.cpu_seconds for h in self.history])) if self.history else 0.0

    @property
    def rows_per_second(self) -> float:
        return float(np.mean([h.rows_per_second for h in self.history])) if self.history else 0.0
