"""Data-parallel training: two gloo processes under torchrun match one process with the same
global batch, exit 0, and leave no process behind."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prerank.cli import app
from prerank.train.distributed import Context, eval_rows, per_rank_batch_size, shard_order
from tests import distributed_helper

ROOT = Path(__file__).resolve().parents[1]


def test_ranks_batches_together_are_the_single_process_batch():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    global_batch, world = 6, 3
    shards = [shard_order(order, Context(r, world)) for r in range(world)]
    assert {len(s) for s in shards} == {8}  # padded to the same length: DDP needs equal step counts
    local = per_rank_batch_size(global_batch, Context(0, world))
    for start in range(0, len(order), global_batch):
        together = torch.cat([s[start // world : start // world + local] for s in shards])
        single = order[start : start + global_batch]
        padding = sorted(set(together.tolist()) - set(single.tolist()))
        assert set(single.tolist()) <= set(together.tolist())
        assert len(together) - len(single) == len(padding) <= world - 1  # the last batch's padded rows ...
        assert set(padding) <= set(order[: world - 1].tolist())  # ... repeat the head of the order
    with pytest.raises(ValueError, match="batch_size 7 is the global batch.*divisible.*3"):
        per_rank_batch_size(7, Context(0, 3))


def test_evaluation_rows_partition_the_table():
    rows = [eval_rows(10, Context(r, 3)) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate(rows), np.arange(10))


def processes_running(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "tests" / "distributed_helper.py"), str(out)]
    proc = subprocess.Popen(command, env=env, cwd=out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_running(str(out)):
            os.kill(pid, signal.SIGKILL)
        raise
    return proc.returncode, log.decode(errors="replace"), out


def test_two_processes_exit_cleanly(two_process_run):
    returncode, log, out = two_process_run
    assert returncode == 0, log[-3000:]
    assert processes_running(str(out)) == []
    assert log.count("wrote ") == 1  # only rank 0 reports (and writes)


def test_cli_run_matches_one_process(two_process_run, tmp_path):
    returncode, log, out = two_process_run
    assert returncode == 0, log[-3000:]
    app(distributed_helper.CLI_ARGS + ["--out", str(tmp_path)], standalone_mode=False)
    import json

    single = json.loads((tmp_path / "metrics.json").read_text())
    parallel = json.loads((out / "cli" / "metrics.json").read_text())
    assert parallel["test"]["rows"] == single["test"]["rows"]  # evaluated on the full set
    for split in ("valid", "test"):
        for metric in ("auc", "gauc", "logloss"):
            assert parallel[split][metric] == pytest.approx(single[split][metric], abs=1e-5), (split, metric)
    for a, b in zip(parallel["history"], single["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-5)
    weights_single = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["state_dict"]
    weights_parallel = torch.load(out / "cli" / "checkpoint.pt", weights_only=True)["state_dict"]
    for key, value in weights_single.items():
        torch.testing.assert_close(weights_parallel[key], value, atol=1e-5, rtol=1e-4)


def test_auxiliary_losses_train_the_same_under_ddp(two_process_run):
    returncode, log, out = two_process_run
    assert returncode == 0, log[-3000:]
    parallel = torch.load(out / "aux.pt", weights_only=True)
    assert parallel["world_size"] == 2
    model, history = distributed_helper.train_aux()
    assert [h["aux_losses"].keys() for h in history] == [h["aux_losses"].keys() for h in parallel["history"]]
    for a, b in zip(parallel["history"], history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
        assert a["aux_losses"]["user_norm"] == pytest.approx(b["aux_losses"]["user_norm"], rel=1e-4)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(parallel["state_dict"][key], value, atol=1e-5, rtol=1e-4)


def test_listwise_training_matches_one_process(two_process_run):
    returncode, log, out = two_process_run
    assert returncode == 0, log[-3000:]
    parallel = torch.load(out / "lists.pt", weights_only=True)
    model, history = distributed_helper.train_lists()
    assert len(history) == len(parallel["history"]) == 2
    for a, b in zip(parallel["history"], history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["valid_auc"] == pytest.approx(b["valid_auc"], abs=1e-6)  # validation NDCG@10 in listwise runs
        assert a["aux_losses"].keys() == b["aux_losses"].keys()
    for key, value in model.state_dict().items():
        if key == "bias":
            # The list losses are invariant to shifting every logit, so the output bias's gradient
            # is rounding noise, which Adam scales up to full steps of either sign.
            continue
        # The same holds, weaker, for single coordinates whose gradient cancels to ~1e-9, below
        # Adam's eps (1e-8) (e.g. a user-id embedding row that two requests pull in opposite ways):
        # the all-reduce sums in another order, and Adam turns that rounding into up to a tenth of
        # a step (lr 3e-3) per update; 1e-3 stays under one step, so a real divergence still fails.
        torch.testing.assert_close(parallel["state_dict"][key], value, atol=1e-3, rtol=1e-3)


def test_evaluation_uses_rank_0s_batchnorm_statistics(two_process_run):
    returncode, log, out = two_process_run
    assert returncode == 0, log[-3000:]
    torch.testing.assert_close(torch.load(out / "aux.pt", weights_only=True)["running_mean_sum"], torch.full((2,), 2.0))
