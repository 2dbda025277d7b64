"""Does a refactor move what models learn? The same seeded trainings in two source trees, compared.

Each check trains one model family on the generated data (the tests' `small_data`; for list
models also the tests' small DIN teacher and cascade) with a fixed seed, in a fresh process per
tree (`PYTHONPATH=<tree>/src`), and keeps the final weights and the test metrics. The report gives,
per check, the largest weight difference and the metrics of both trees; 0.0 means the two trees
train bit for bit the same.

    python benchmarks/before_after.py --before ../old-checkout --after . --out benchmarks/results/contract_before_after

State-dict keys renamed between the trees are matched through `--rename OLD=NEW` (substring).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# One training per check, run inside the tree under test: only APIs both trees share.
CHECK_SCRIPT = r'''
import inspect, json, sys
import torch
from prerank.data.pipeline import ProtocolConfig
from prerank.data.synthetic import load_synthetic
from prerank.models import create_model
from prerank.train.run import train_and_evaluate
from prerank.train.trainer import Trainer, TrainConfig

check, out = json.loads(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
# Older trees set the embedding dim in the protocol, newer ones in the model or the loader.
in_loader = "embed_dim" in inspect.signature(load_synthetic).parameters
protocol = ProtocolConfig(seq_len=8) if in_loader else ProtocolConfig(seq_len=8, embed_dim=8)
data = load_synthetic(protocol, n_users=120, n_items=60, events_per_user=20, seed=3, **({"embed_dim": 8} if in_loader else {}))
cascade = None
if check.get("cascade"):
    from prerank.cascade import CascadeConfig, build_cascade
    torch.manual_seed(0)
    teacher = create_model("din", data.schema, {"hidden": [16], "attention_hidden": [8]})
    Trainer(teacher, TrainConfig(epochs=3, patience=3, lr=1e-2, batch_size=128, progress=False)).fit(data.train, data.valid)
    cascade = build_cascade(data, teacher.eval(), CascadeConfig(retrieval_size=20, random_items=5, prerank_size=8,
                                                                 exposure_size=3, window=4))
config = TrainConfig(progress=False, num_threads=1, **check["train"])
metrics, model = train_and_evaluate(data, check["model"], config, check["options"], cascade=cascade)
keep = {"test": metrics["test"]}
for key in ("test_lists", "test_two_stage"):
    if key in metrics:
        keep[key] = {k: v for k, v in metrics[key].items() if isinstance(v, float) and "latency" not in k and "upqe" not in k}
torch.save({"state": {k: v.detach().clone() for k, v in model.state_dict().items()}, "metrics": keep}, out)
'''

SMALL_LTTD = {"dim": 16, "field_hidden": 16, "tower_hidden": [16], "residual_dim": 4, "residual_hidden": [16],
              "model_dim": 16, "heads": 2, "feedforward": 32, "layers": 1}
SMALL_FIT = {"hidden": [32, 16], "num_meta": 4, "attention_hidden": [8], "user_heads": 2, "item_heads": 3, "head_dim": 8}
CHECKS = {
    "two_tower": {"model": "two_tower", "options": {"hidden": [32, 16]}, "train": {"epochs": 2, "batch_size": 64}},
    "fit (constant tau)": {"model": "fit", "options": {**SMALL_FIT, "tau_start": 0.3, "tau_end": 0.3},
                           "train": {"epochs": 2, "batch_size": 64}},
    "fit (annealed tau)": {"model": "fit", "options": {**SMALL_FIT, "tau_start": 1.0, "tau_end": 0.01, "anneal_steps": 50},
                           "train": {"epochs": 2, "batch_size": 64}},
    "tarq": {"model": "tarq", "options": {"hidden": [32, 16], "levels": 2, "codebook_size": 8},
             "train": {"epochs": 2, "batch_size": 64}},
    "lttd joint (cascade)": {"model": "lttd", "options": {**SMALL_LTTD, "mode": "joint"}, "cascade": True,
                             "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "patience": 3}},
    "lttd disjoint (cascade)": {"model": "lttd", "options": {**SMALL_LTTD, "mode": "disjoint"}, "cascade": True,
                                "train": {"epochs": 3, "batch_size": 16, "lr": 3e-3, "patience": 3}},
}


def run_check(tree: Path, check: dict, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CHECK_SCRIPT, json.dumps(check), str(out)], env=env, cwd=tree,
                          capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"check failed in {tree}:\n{done.stderr[-3000:]}")


def main() -> None:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, required=True)
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--checks", nargs="+", default=list(CHECKS), choices=list(CHECKS))
    parser.add_argument("--rename", action="append", default=["log_inv_temperature=similarity_scale.log_inv_temperature"],
                        help="OLD=NEW: a state-dict key part renamed between the trees")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    renames = [pair.split("=", 1) for pair in args.rename]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.checks:
            results = {}
            for side, tree in (("before", args.before), ("after", args.after)):
                path = Path(tmp) / f"{side}.pt"
                run_check(tree.resolve(), CHECKS[name], path)
                results[side] = torch.load(path, weights_only=True)
            before, after = results["before"]["state"], results["after"]["state"]
            differences, unmatched = [], []
            for key, value in before.items():
                match = key if key in after else next((key.replace(old, new) for old, new in renames
                                                       if key.replace(old, new) in after), None)
                if match is None:
                    unmatched.append(key)
                    continue
                differences.append(float((value.double() - after[match].double()).abs().max()) if value.numel() else 0.0)
            rows.append({"check": name, "max_weight_difference": max(differences), "unmatched_keys": unmatched,
                         "metrics_before": results["before"]["metrics"], "metrics_after": results["after"]["metrics"]})
            print(f"{name}: max weight difference {max(differences):.3g}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps({"before": str(args.before), "after": str(args.after), "checks": rows}, indent=2))
    lines = ["| check | max weight difference | test AUC before / after | list NDCG@10 before / after |", "|---|---|---|---|"]
    for r in rows:
        b, a = r["metrics_before"], r["metrics_after"]
        ndcg = (f"{b['test_lists']['ndcg@10']:.6f} / {a['test_lists']['ndcg@10']:.6f}" if "test_lists" in b else "–")
        lines.append(f"| {r['check']} | {r['max_weight_difference']:.3g} | {b['test']['auc']:.6f} / {a['test']['auc']:.6f} | {ndcg} |")
    (args.out / "summary.md").write_text("# Before / after: the same seeded trainings in two trees\n\n"
                                         f"Before: `{args.before}`; after: `{args.after}`. Generated data (the tests' "
                                         "`small_data`), one thread.\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
