"""Run under `torchrun --nproc-per-node 2` by tests/test_distributed.py (not collected by pytest).

    torchrun ... tests/distributed_helper.py OUT

1. `prerank train` on the generated dataset, through the CLI exactly as users launch it; rank 0
   writes OUT/cli/{metrics.json,checkpoint.pt}.
2. A Two-Tower with an auxiliary loss (returned from `forward`, so DDP sees it) trained by the
   Trainer; rank 0 writes OUT/aux.pt (weights and history).
3. A Two-Tower trained on cascade lists with the hybrid loss (ListwiseTrainer); rank 0 writes
   OUT/lists.pt.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path

import torch

from prerank.cascade import CascadeConfig, build_cascade
from prerank.cli import app
from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.models import create_model
from prerank.models.two_tower import TwoTower
from prerank.train import Trainer, TrainConfig, distributed
from prerank.train.listwise import ListwiseTrainer

CLI_ARGS = ["train", "--dataset", "synthetic", "--model", "two_tower", "--epochs", "2", "--batch-size", "512",
            "--seq-len", "8", "--embed-dim", "8", "--set", "hidden=[16,8]", "--set", "batch_norm=false",
            "--threads", "1", "--no-progress"]
AUX_TRAIN = TrainConfig(epochs=2, batch_size=64, seed=5, progress=False)
LISTS_TRAIN = TrainConfig(epochs=2, batch_size=8, lr=3e-3, seed=5, progress=False)


class TwoTowerWithAux(TwoTower):
    """A Two-Tower plus a user-vector norm penalty: an auxiliary loss touching the user tower."""

    def auxiliary_losses(self, batch, user_state, item_state, logits):
        return {"user_norm": 1e-2 * user_state["vector"].pow(2).sum(-1).mean()}


def small_data():
    return load_synthetic(ProtocolConfig(seq_len=8), n_users=120, n_items=60, events_per_user=20, seed=3, embed_dim=8)


def aux_model(schema):
    torch.manual_seed(11)
    reference = create_model("two_tower", schema, {"hidden": [16, 8], "batch_norm": False, "similarity": "dot"})
    model = TwoTowerWithAux(schema, reference.config)
    model.load_state_dict(reference.state_dict())
    return model


def train_lists():
    """Hybrid-loss training on a cascade every rank builds identically (seeded teacher and sampling)."""
    data = small_data()
    torch.manual_seed(2)
    teacher = create_model("din", data.schema, {"hidden": [8], "attention_hidden": [4]}).eval()
    cascade = build_cascade(data, teacher, CascadeConfig(retrieval_size=16, random_items=4, prerank_size=6, exposure_size=3, window=4))
    torch.manual_seed(11)
    model = create_model("two_tower", data.schema, {"hidden": [16, 8], "batch_norm": False})
    trainer = ListwiseTrainer(model, LISTS_TRAIN)
    trainer.fit_lists(data, cascade.lists("train"), cascade.lists("valid"))
    return model, [asdict(h) for h in trainer.history]


def train_aux():
    data = small_data()
    model = aux_model(data.schema)
    trainer = Trainer(model, AUX_TRAIN)
    trainer.fit(data.train, data.valid)
    return model, [asdict(h) for h in trainer.history]


if __name__ == "__main__":
    out = Path(sys.argv[1])
    with distributed.session("cpu"):  # the CLI's own session joins this one's process group
        app(CLI_ARGS + ["--out", str(out / "cli")], standalone_mode=False)
        model, history = train_aux()
        list_model, list_history = train_lists()
        ctx = distributed.context()
        norm = torch.nn.BatchNorm1d(2)
        norm.running_mean.fill_(ctx.rank + 1.0)
        distributed.broadcast_buffers(norm, ctx)
        running_mean_sum = norm.running_mean.clone()
        torch.distributed.all_reduce(running_mean_sum)  # world_size x rank 0's value if broadcast
        if ctx.is_main:
            torch.save({"state_dict": model.state_dict(), "history": history, "world_size": ctx.world_size,
                        "running_mean_sum": running_mean_sum}, out / "aux.pt")
            torch.save({"state_dict": list_model.state_dict(), "history": list_history}, out / "lists.pt")
